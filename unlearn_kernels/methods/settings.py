"""A method's settings as people write and read them: typed, checked, and described.

:func:`make_config` builds a method's config from settings as they arrive (Python values,
YAML, ``--set KEY=VALUE`` strings), converting each to its field's declared type (``"5e-5"``
is a float, ``"true"`` a bool, one pattern a list of one) and refusing, with the field's
name and the expected type, what cannot be converted; an unknown key lists the valid ones
with their defaults, and the closest match. Fields typed ``X | None`` accept ``none``/``auto``
for "chosen from the model" (the default layer, update band and learning rate).

:func:`make_config` also checks the ranges: each config class has a ``validate()`` (built
from :func:`check_ranges`) that it calls, so an out-of-range value fails before any model is
loaded, naming the setting and its valid range.

:func:`describe` is what ``unlearn-kernels methods NAME`` prints: every setting, its type,
default and one line of meaning — the comment written beside the field in its config
dataclass (the one place it is kept), inherited fields included, in declaration order.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re

from ..errors import UserError

_FIELD = re.compile(r"^\s+(\w+)\s*:\s*[^=#]+(?:=[^#]*)?#\s*(.+)$")
_NONE = ("none", "null", "auto", "")
_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def field_comments(config_class) -> dict[str, str]:
    """``{field: comment}`` from the source of ``config_class`` and its bases."""
    comments: dict[str, str] = {}
    for cls in reversed(config_class.__mro__):
        if not dataclasses.is_dataclass(cls):
            continue
        try:
            lines = inspect.getsource(cls).splitlines()
        except (OSError, TypeError):
            continue
        for line in lines:
            match = _FIELD.match(line)
            if match:
                comments[match.group(1)] = match.group(2).strip()
    return comments


def _annotation(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def _number(name: str, value, kind: str):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"setting {name} expects {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
    try:
        number = float(value) if kind == "float" else (int(value) if not isinstance(value, float) and
                                                        re.fullmatch(r"\s*[+-]?\d+\s*", str(value)) else float(value))
    except ValueError:
        raise UserError(f"setting {name} expects {'an integer' if kind == 'int' else 'a number'}, "
                        f"got {value!r}") from None
    if kind == "int":
        if isinstance(number, float):
            if not (math.isfinite(number) and number.is_integer()):
                raise UserError(f"setting {name} expects an integer, got {value!r}")
            number = int(number)
    return number


def coerce(name: str, annotation: str, value):
    """``value`` converted to the type ``annotation`` names; ValueError naming ``name`` otherwise."""
    kind = annotation.replace(" ", "")
    optional = kind.endswith("|None")
    kind = kind.removesuffix("|None")
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE):
        if optional:
            return None
        raise UserError(f"setting {name} expects {kind}, got None")
    if kind in ("float", "int"):
        return _number(name, value, kind)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).strip().lower() in _BOOLS:
            return _BOOLS[str(value).strip().lower()]
        raise UserError(f"setting {name} expects true or false, got {value!r}")
    if kind == "str":
        if not isinstance(value, str):
            raise UserError(f"setting {name} expects a string, got {value!r}")
        return value
    if kind == "list[str]":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise UserError(f"setting {name} expects a list of patterns (strings), got {value!r}")
        return list(items)
    match = re.fullmatch(r"tuple\[(\w+)(?:,(\w+))*\]", kind)
    if match:
        parts = kind[len("tuple["):-1].split(",")
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or len(items) != len(parts):
            raise UserError(f"setting {name} expects {len(parts)} values ({', '.join(parts)}), got {value!r}")
        return tuple(coerce(name, part, item) for part, item in zip(parts, items))
    return value


def make_config(config_class, config=None, **settings):
    """``config`` (default: ``config_class()``) with ``settings`` applied, every field typed."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        defaults = config_class()
        close = difflib.get_close_matches(unknown[0], list(fields), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        valid = ", ".join(f"{k}={getattr(defaults, k)!r}" for k in fields)
        raise UserError(f"{config_class.__name__.removesuffix('Config')} has no setting "
                        f"{', '.join(unknown)}{hint}; its settings: {valid}")
    base = config if config is not None else config_class()
    if not dataclasses.is_dataclass(base) or isinstance(base, type):
        raise TypeError(f"config must be a {config_class.__name__}, got {type(base).__name__}")
    merged = {f.name: settings.get(f.name, getattr(base, f.name)) for f in dataclasses.fields(base)}
    annotations = {f.name: _annotation(f) for f in dataclasses.fields(base)}
    typed = {k: coerce(k, annotations[k], v) for k, v in merged.items()}
    config = dataclasses.replace(base, **typed)
    if hasattr(config, "validate"):
        config.validate()
    return config


RANGES = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1,
          "in (0, 1]": lambda v: 0 < v <= 1, "in [0, 1]": lambda v: 0 <= v <= 1, "in [0, 1)": lambda v: 0 <= v < 1}


def check_ranges(config, **ranges: str) -> None:
    """UserError naming the first setting of ``config`` outside its range, given as a key of
    :data:`RANGES` (``check_ranges(c, beta="> 0", stats_batches=">= 1")``). None (auto) passes;
    each value of a tuple is checked."""
    for name, valid in ranges.items():
        value = getattr(config, name)
        values = value if isinstance(value, tuple) else (value,)
        if value is not None and not all(RANGES[valid](v) for v in values):
            raise UserError(f"setting {name} must be {valid}, got {value!r}")


def describe(method_class) -> str:
    """A table of every setting of ``method_class`` (what ``unlearn-kernels methods NAME`` prints).
    A default of None whose meaning says ``auto:`` reads ``auto`` (chosen from the model when
    the method is built)."""
    config = method_class.config_class()
    comments = field_comments(method_class.config_class)
    doc = (method_class.__doc__ or "").strip().splitlines()
    summary = doc[0] if doc else ""
    summary = summary if summary.startswith(method_class.name) else f"{method_class.name}: {summary}"
    lines = [summary, "", "| setting | type | default | meaning |",
             "|---|---|---|---|"]
    for f in dataclasses.fields(config):
        value, comment = getattr(config, f.name), comments.get(f.name, "")
        shown = "auto" if value is None and "auto:" in comment else repr(value)
        kind = _annotation(f).replace(" | None", " or None")
        lines.append(f"| {f.name} | {kind} | {shown} | {comment} |")
    return "\n".join(lines)
