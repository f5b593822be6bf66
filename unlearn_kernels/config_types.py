"""Typed configuration: the range types, the config class and its one-line errors, and the
command-line flags generated from a config class.

A config class is a pydantic v2 dataclass made by :func:`config_dataclass`: each field has a
type that holds its range (``NonNegative``, ``Positive``, ``Count`` ...), a default and a
``Field(description=...)`` — the one place its meaning is written, read by ``methods NAME``
(``methods.settings.describe``) and by the command line's help (:func:`add_flags`). Pydantic
*dataclasses* rather than ``BaseModel``: the package and its users handle configs with
``dataclasses.fields``, ``replace`` and ``asdict`` (reports, checkpoints, the target
controller), which keep working unchanged, while pydantic does the typing and the checks
(``extra="forbid"``, every assignment validated, no NaN or infinity).

Values arrive as Python values, YAML, flags or ``--set KEY=VALUE`` strings; the types convert
what people write: ``"5e-5"`` is a float, ``"10"`` or ``"1e1"`` an int (a bool is never a
number), ``"true"``/``"off"`` a bool, ``"auto"``/``"none"`` None for an optional field (chosen
from the model), one string a list of one, ``"0.9,0.95"`` a pair.

Every validation error becomes, here and only here, a :class:`SettingError` (a
``UserError``): one line naming the setting (or the flag, for a command's config: a class's
``label``), the value and what is valid; an unknown key lists the valid ones with their
defaults and the closest match. So an invalid value fails when the config is built — before
any model is loaded.

Every command of ``unlearn-kernels`` is a config class and a function of it: the flags are
the fields (:func:`add_flags`), ``--kebab-name`` for ``kebab_name``::

    >>> import argparse
    >>> from typing import Annotated
    >>> from pydantic import Field
    >>> @config_dataclass
    ... class Job:
    ...     steps: Annotated[Count, Field(description="how many")] = 3
    ...     label = staticmethod(flag_label)
    >>> parser = argparse.ArgumentParser()
    >>> add_flags(parser, Job)
    >>> Job(**flag_values(parser.parse_args(["--steps", "5"]), Job)).steps
    5
    >>> Job(steps="0")
    Traceback (most recent call last):
    ...
    unlearn_kernels.config_types.SettingError: --steps must be >= 1, got '0'
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from typing import Annotated, Literal, TypeVar, Union

import pydantic
from pydantic import BeforeValidator, ConfigDict, Field, ValidationError

from .errors import UserError

__all__ = ["Auto", "Count", "File", "Files", "Fraction", "Integer", "NonNegative", "NonNegativeInt", "Number", "Pair",
           "Patterns", "Positive", "SettingError", "Share", "add_flags", "config_dataclass", "field_description",
           "flag_label", "flag_values", "type_name", "unknown_setting"]

_NONE = ("none", "null", "auto", "")


def _integer(value):
    """``"10"``, ``"1e1"``, ``10.0`` -> 10; a bool or a fraction stays as is (and is refused)."""
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        try:
            value = float(text)
        except ValueError:
            return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _refuse_bool(what: str):
    def check(value):
        if isinstance(value, bool):
            raise ValueError(f"expects {what}, not true/false")
        return value
    return BeforeValidator(check)


def _auto(value):
    """``auto``/``none``/``null``/empty -> None (an optional field chosen from the model)."""
    return None if isinstance(value, str) and value.strip().lower() in _NONE else value


def _one_or_list(value):
    return [value] if isinstance(value, str) else value


def _pair(value):
    return [v.strip() for v in value.split(",")] if isinstance(value, str) else value


Integer = Annotated[int, BeforeValidator(_integer), _refuse_bool("an integer")]   # validators run last first
Number = Annotated[float, _refuse_bool("a number")]
NonNegativeInt = Annotated[Integer, Field(ge=0)]
Count = Annotated[Integer, Field(ge=1)]
NonNegative = Annotated[Number, Field(ge=0)]
Positive = Annotated[Number, Field(gt=0)]
Share = Annotated[Number, Field(ge=0, le=1)]         # in [0, 1]
Fraction = Annotated[Number, Field(gt=0, le=1)]      # in (0, 1]
Patterns = Annotated[list[Annotated[str, Field(min_length=1)]], BeforeValidator(_one_or_list)]
File = Annotated[str, BeforeValidator(lambda v: os.fspath(v) if isinstance(v, os.PathLike) else v),
                 Field(min_length=1)]                                          # a path (str or os.PathLike)
Files = Annotated[list[File], BeforeValidator(lambda v: [v] if isinstance(v, (str, os.PathLike)) else v)]
T = TypeVar("T")
Pair = Annotated[tuple[T, T], BeforeValidator(_pair)]      # "0.9,0.95" -> (0.9, 0.95)
Auto = Annotated[Union[T, None], BeforeValidator(_auto)]   # None (auto): chosen when the method is built

CONFIG = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SettingError(UserError):
    """An invalid setting: ``field`` names it, ``problem`` says what is wrong with its value."""

    def __init__(self, label: str, field: str | None, problem: str, unknown: bool = False):
        super().__init__(f"{label} {problem}".strip())
        self.field, self.problem, self.unknown = field, problem, unknown


def config_dataclass(cls=None, **options):
    """``cls`` as a pydantic dataclass (module docstring) whose construction and assignment raise
    :class:`SettingError` instead of pydantic's ``ValidationError``. A class may define
    ``label(name)`` (how a message names a field; default ``setting NAME``) and ``title`` (what
    has the settings, for an unknown key; default the class name without ``Config``)."""
    if cls is None:
        return functools.partial(config_dataclass, **options)
    cls = pydantic.dataclasses.dataclass(cls, config=CONFIG, **options)
    init, assign = cls.__init__, cls.__setattr__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except ValidationError as error:
            raise _setting_error(type(self), error, kwargs) from None

    @functools.wraps(assign)
    def __setattr__(self, name, value):
        try:
            assign(self, name, value)
        except ValidationError as error:
            raise _setting_error(type(self), error, {name: value}) from None

    cls.__init__, cls.__setattr__ = __init__, __setattr__
    return cls


def _label(cls, name: str) -> str:
    label = getattr(cls, "label", None)
    return label(name) if label is not None else f"setting {name}"


def _default(cls, f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def unknown_setting(cls, names: list[str]) -> SettingError:
    """The error for keys ``names`` that ``cls`` has no field for (the closest match, the valid keys)."""
    fields = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(names[0], fields, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    valid = ", ".join(f"{f.name}={_default(cls, f)!r}" for f in dataclasses.fields(cls))
    title = getattr(cls, "title", None) or cls.__name__.removesuffix("Config")
    return SettingError(f"{title} has no setting", names[0], f"{', '.join(names)}{hint}; its settings: {valid}",
                        unknown=True)


_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _range_of(bounds: dict) -> str:
    """``>= 0``, ``> 0``, or ``in (0, 1]`` for a lower and an upper bound."""
    bounds = {k: v for k, v in bounds.items() if k in _BOUNDS and v is not None}
    low = next(((k, v) for k, v in bounds.items() if k in ("ge", "gt")), None)
    high = next(((k, v) for k, v in bounds.items() if k in ("le", "lt")), None)
    if low and high:
        return f"in {'[' if low[0] == 'ge' else '('}{low[1]:g}, {high[1]:g}{']' if high[0] == 'le' else ')'}"
    return " and ".join(f"{_BOUNDS[k]} {v:g}" for k, v in bounds.items())


def _bounds(annotation, metadata=()) -> dict:
    """The bounds (``ge``, ``gt``, ``le``, ``lt``) a type declares: its own, else the first found
    inside it (through Optional and Annotated, e.g. each value of a pair)."""
    found = {}
    for extra in [*metadata, *getattr(annotation, "__metadata__", ())]:
        for item in getattr(extra, "metadata", None) or [extra]:
            found.update({k: getattr(item, k) for k in _BOUNDS if getattr(item, k, None) is not None})
    for arg in typing.get_args(annotation):
        found = found or _bounds(arg)
    return found


def _setting_error(cls, error: ValidationError, given: dict) -> SettingError:
    """The first error of ``error`` as one line (module docstring)."""
    errors = error.errors(include_url=False)
    unknown = [str(e["loc"][0]) for e in errors if e["type"] == "unexpected_keyword_argument"]
    if unknown:
        return unknown_setting(cls, unknown)
    e = errors[0]
    kind, ctx = e["type"], e.get("ctx", {})
    if not e["loc"]:                                  # a check across fields (a model validator)
        return SettingError("", None, str(ctx.get("error", e["msg"])))
    name = str(e["loc"][0])
    value = given.get(name, e["input"])
    if kind == "missing" and len(e["loc"]) == 1:
        return SettingError(_label(cls, name), name, "is required")
    expected = type_name(cls.__pydantic_fields__[name].annotation) if name in cls.__pydantic_fields__ else ""
    if value is None:
        problem = f"expects {expected}, got None"
    elif kind == "value_error":                     # a validator of ours: its text says what is valid
        problem = f"{ctx.get('error', e['msg'])}, got {value!r}"
    elif kind in ("int_parsing", "int_type", "int_from_float"):
        problem = f"expects an integer, got {value!r}"
    elif kind in ("float_parsing", "float_type"):
        problem = f"expects a number, got {value!r}"
    elif kind in ("bool_parsing", "bool_type"):
        problem = f"expects true or false, got {value!r}"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        info = cls.__pydantic_fields__[name]
        problem = f"must be {_range_of(_bounds(info.annotation, info.metadata) or ctx)}, got {value!r}"
    elif kind == "finite_number":
        problem = f"is not a finite number: {value!r}"
    elif kind == "literal_error":
        problem = f"must be {ctx['expected'].replace(chr(39), '')}, got {value!r}"
    elif kind == "too_short" and len(e["loc"]) == 1:          # the list itself, not one of its values
        problem = f"needs at least {ctx.get('min_length', 1)} value(s), got {value!r}"
    elif expected.startswith("list"):
        problem = f"expects a list of non-empty strings (one string is a list of one), got {value!r}"
    elif expected.startswith("tuple"):
        problem = f"expects {expected} (two values, e.g. 0.9,0.95), got {value!r}"
    elif kind == "dict_type":
        problem = f"must be a mapping (setting: value), got {value!r}"
    elif kind == "string_type":
        problem = f"expects a string, got {value!r}"
    else:
        problem = f"expects {expected}, got {value!r} ({e['msg']})"
    return SettingError(_label(cls, name), name, problem)


def type_name(annotation) -> str:
    """How a field's type reads in tables and messages: ``int``, ``float or None``,
    ``list[str]``, ``tuple[float, float]``; a ``Literal`` of strings reads ``str``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return type_name(args[0])
    if origin in (Union, types.UnionType):
        kinds = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(kinds) + (" or None" if type(None) in args else "")
    if origin is Literal:
        return type_name(type(args[0]))
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def field_description(cls, name: str) -> str:
    """The ``Field(description=...)`` of ``cls``'s field ``name`` ("" when it has none)."""
    return cls.__pydantic_fields__[name].description or ""


# --- flags -------------------------------------------------------------------------------------
def flag_label(name: str) -> str:
    """How an error of a command's config names a field: by its flag (``--batch-size``)."""
    return f"--{name.replace('_', '-')}"


def _default_text(info) -> str:
    if info.is_required():
        return " (required)"
    default = info.get_default(call_default_factory=True)
    if default is None or default is False or default == [] or "default" in (info.description or ""):
        return ""
    shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
    return f" (default {shown})"


def add_flags(parser, cls, *, skip=(), group_of=None) -> None:
    """One flag per field of the config class ``cls``: ``--kebab-name``, the field's description
    (and its default) as help, a ``Literal``'s values as choices, a bool a switch (``--x/--no-x``
    when it may be None), a list one or more values (the flag may repeat). A flag not given is
    left out of the namespace (:func:`flag_values`), so a config file's value or the field's
    default holds, and a required field left out is refused by the config (``--model is
    required``). ``skip`` names fields with no flag of their own; ``group_of(name)`` may return an
    argparse group for a field. The values stay strings: the config types them."""
    for name, info in cls.__pydantic_fields__.items():
        if name in skip:
            continue
        kind = info.annotation
        options = typing.get_args(kind) if typing.get_origin(kind) in (Union, types.UnionType) else (kind,)
        given = [option for option in options if option is not type(None)]
        bare = [typing.get_args(o)[0] if typing.get_origin(o) is Annotated else o for o in given]
        literal = next((o for o in bare if typing.get_origin(o) is Literal), None)
        spec = {"help": ((info.description or "") + _default_text(info)).replace("%", "%%"),
                "default": argparse.SUPPRESS}
        if bare == [bool]:
            spec["action"] = argparse.BooleanOptionalAction if len(options) > 1 else "store_true"
        elif literal is not None:
            spec["choices"] = [str(v) for v in typing.get_args(literal)]
        elif typing.get_origin(bare[0]) is list:
            spec.update(action="extend", nargs="+")
        target = (group_of(name) if group_of else None) or parser
        target.add_argument(flag_label(name), dest=name, **spec)


def flag_values(args, cls) -> dict:
    """The fields of ``cls`` given as flags in the namespace ``args`` (:func:`add_flags`)."""
    return {name: getattr(args, name) for name in cls.__pydantic_fields__ if hasattr(args, name)}
