"""A method's settings as people read them: name, type, default and one line of meaning.

The meaning is the comment written beside the field in its config dataclass (the one place it
is kept); fields are listed in declaration order, inherited ones included.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

_FIELD = re.compile(r"^\s+(\w+)\s*:\s*[^=#]+(?:=[^#]*)?#\s*(.+)$")


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


def describe(method_class) -> str:
    """A table of every setting of ``method_class`` (what ``unlearn-kernels methods NAME`` prints)."""
    config = method_class.config_class()
    comments = field_comments(method_class.config_class)
    doc = (method_class.__doc__ or "").strip().splitlines()
    lines = [f"{method_class.name}: {doc[0] if doc else ''}", "", "| setting | type | default | meaning |",
             "|---|---|---|---|"]
    for f in dataclasses.fields(config):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        lines.append(f"| {f.name} | {kind} | {getattr(config, f.name)!r} | {comments.get(f.name, '')} |")
    return "\n".join(lines)
