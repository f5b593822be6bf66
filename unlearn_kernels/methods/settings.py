"""The methods' settings: a config built from settings (:func:`make_config`) and the table
``unlearn-kernels methods NAME`` prints (:func:`describe`).

The types, the config class and its errors live in :mod:`unlearn_kernels.config_types` (shared
with the run and the commands); the names the method files use are re-exported here.
"""

from __future__ import annotations

import dataclasses

from ..config_types import (Auto, Count, Fraction, Integer, NonNegative, NonNegativeInt, Number, Pair, Patterns,
                            Positive, SettingError, Share, config_dataclass, field_description, type_name,
                            unknown_setting)

__all__ = ["Auto", "Count", "Fraction", "Integer", "NonNegative", "NonNegativeInt", "Number", "Pair", "Patterns",
           "Positive", "SettingError", "Share", "config_dataclass", "describe", "field_description", "make_config",
           "type_name"]


def make_config(config_class, config=None, **settings):
    """``config`` (default: ``config_class()``) with ``settings`` applied, every field typed and
    checked (a :class:`SettingError` naming the first bad one)."""
    if config is None:
        return config_class(**settings)
    if not isinstance(config, config_class):
        raise TypeError(f"config must be a {config_class.__name__}, got {type(config).__name__}")
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(config)})
    if unknown:
        raise unknown_setting(type(config), unknown)
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
