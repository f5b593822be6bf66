"""The error model: what the user can fix is a :class:`UserError`, anything else is a bug.

A ``UserError`` reports something the user gave or can change — a setting, a flag, a file, a
path, a model folder, a device, a missing optional package. Its message is one line that names
the bad thing (the file and row, the field, the setting) and says what would be valid. The
command line prints that line and exits 2; ``--debug`` (or ``UNLEARN_KERNELS_TRACEBACK=1``)
shows the traceback.

Every other exception — a plain ``ValueError``, ``KeyError``, ``OSError`` … raised anywhere in
the package — is a bug of ours: the command line prints its traceback and asks for a report
(exit 1). So raise a ``UserError`` (or a subclass) exactly where the user's input is first
read and found wrong, and let internal invariants fail loudly.

``UserError`` subclasses ``ValueError``, so Python callers that catch ``ValueError`` keep
working; :class:`MissingFileError` is also a ``FileNotFoundError`` and
:class:`MissingPackageError` an ``ImportError``. This module imports nothing from the package.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user gave or can fix; the message is one line naming it."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class MissingPackageError(UserError, ImportError):
    """An optional package a requested feature needs is not installed."""


def path_error(path, error: OSError, what: str = "") -> UserError:
    """A :class:`UserError` for an ``OSError`` met reading ``path`` (a file or folder the user
    named): one line with the path and the reason, a :class:`MissingFileError` when it does not
    exist."""
    cls = MissingFileError if isinstance(error, FileNotFoundError) else UserError
    reason = error.strerror or type(error).__name__
    return cls(f"{what + ' ' if what else ''}{path}: cannot be read ({reason})")
