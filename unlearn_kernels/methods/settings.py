"""Typed settings: the one configuration type of a run and of every method, validated once.

A config class is a pydantic v2 dataclass made by :func:`config_dataclass`: each field has a
type that holds its range (``NonNegative``, ``Positive``, ``Count`` ...), a default and a
``Field(description=...)`` — the one place its meaning is written, read by ``methods NAME``
(:func:`describe`) and the command line's help. Pydantic *dataclasses* rather than
``BaseModel``: the package and its users handle configs with ``dataclasses.fields``,
``replace`` and ``asdict`` (reports, checkpoints, the target controller), which keep working
unchanged, while pydantic does the typing and the checks (``extra="forbid"``, every assignment
validated, no NaN or infinity).

Settings arrive as Python values, YAML, or ``--set KEY=VALUE`` strings; the types convert what
people write: ``"5e-5"`` is a float, ``"10"`` or ``"1e1"`` an int (a bool is never a number),
``"true"``/``"off"`` a bool, ``"auto"``/``"none"`` None for an optional field (chosen from the
model), one string a list of one, ``"0.9,0.95"`` a pair.

Every validation error becomes, here and only here, a :class:`SettingError` (a
``UserError``): one line naming the setting, the value and what is valid; an unknown key lists
the valid ones with their defaults and the closest match. So an invalid value fails when the
config is built — before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from typing import Annotated, Literal, TypeVar, Union

import pydantic
from pydantic import BeforeValidator, ConfigDict, Field, ValidationError

from ..errors import UserError

__all__ = ["Auto", "Count", "Fraction", "Integer", "NonNegative", "NonNegativeInt", "Number", "Pair", "Patterns",
           "Positive", "SettingError", "Share", "config_dataclass", "describe", "field_description", "make_config",
           "type_name"]

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


def _unknown(cls, names: list[str]) -> SettingError:
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
        return _unknown(cls, unknown)
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


def make_config(config_class, config=None, **settings):
    """``config`` (default: ``config_class()``) with ``settings`` applied, every field typed and
    checked (a :class:`SettingError` naming the first bad one)."""
    if config is None:
        return config_class(**settings)
    if not isinstance(config, config_class):
        raise TypeError(f"config must be a {config_class.__name__}, got {type(config).__name__}")
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(config)})
    if unknown:
        raise _unknown(type(config), unknown)
    return dataclasses.replace(config, **settings)


def describe(method_class) -> str:
    """What ``unlearn-kernels methods NAME`` prints: the method's summary, a line from its spec
    (``methods.spec``; a classifier method has none), and a table of every setting of its
    ``config_class``: name, type, default and the field's description, inherited fields first.
    A default of None whose description says ``auto:`` reads ``auto`` (chosen from the model
    when the method is built)."""
    spec, config_class = getattr(method_class, "spec", None), method_class.config_class
    config = config_class()
    doc = (method_class.__doc__ or "").strip().splitlines()
    summary = doc[0] if doc else ""
    summary = summary if summary.startswith(method_class.name) else f"{method_class.name}: {summary}"
    lines = [summary]
    if spec is not None:
        prefix = {"auto": "on when the loss layer is below the top", "never": "no",
                  "statistics": "no (unlearn-kernels plan models its statistics alone)"}[spec.prefix]
        lines.append(f"length: {spec.length} (a target-driven run's budget multiplies it); prefix-only loading: "
                     f"{prefix}; saves: {', '.join(spec.saves)}; retain data: "
                     f"{'needed' if spec.needs_retain else 'optional'}")
    lines += ["", "| setting | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(config):
        value, meaning = getattr(config, f.name), field_description(config_class, f.name)
        shown = "auto" if value is None and "auto:" in meaning else repr(value)
        lines.append(f"| {f.name} | {type_name(config_class.__pydantic_fields__[f.name].annotation)} | {shown} | "
                     f"{meaning} |")
    return "\n".join(lines)
