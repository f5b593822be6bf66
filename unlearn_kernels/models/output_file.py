"""Every single file the package writes goes through here: atomically, and never over a file
that is not ours.

Rules (the same as ``models.output_dir`` for model folders):

- a write goes to a temporary file in the target's folder (``.{name}.XXXX``), is fsynced,
  renamed over the target, and the folder is fsynced: at every instant the path holds the
  complete old file or the complete new one, and an error leaves no temporary file behind;
- the target is new, or a previous output of this package and ``overwrite=True`` (``--overwrite``);
  a folder, or an existing file that is not ours, is refused whatever ``overwrite`` says;
- it is none of the inputs of the same command (a model folder, a file inside it, a data or
  question file it reads).

How a file is recognised as ours — by its content, whatever its name:

- JSON: the top-level object carries an ``"unlearn_kernels"`` object (as ``report.json`` does);
- JSON lines: the first row carries an ``"unlearn_kernels"`` object (a key of that row, so the
  rows stay rows; with no rows the file is that one marker row);
- PNG: a ``Software`` text chunk starting with ``unlearn_kernels`` (matplotlib's ``metadata``).

At most the first 64 MiB of a file are read to tell (a JSON file larger than that is not
recognised, so it is refused).

Other files (plain text) carry no marker: they are written only where they are new.
Refusals are :class:`~unlearn_kernels.models.output_dir.OutputPathError` (a UserError, one line
naming the path). Check all outputs of a command with :func:`check_output_files` before any
model is loaded.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

from .output_dir import MARKER, OutputPathError, _fsync_dir, marker, refuse_inputs, umask

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
READ_LIMIT = 64 << 20     # a JSON output larger than this is not recognised (refused), JSON lines are


def is_our_file(path: Path | str) -> bool:
    """True for a file written by this package (the marker of the module docstring)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(PNG_SIGNATURE))
            if head == PNG_SIGNATURE:
                return _png_software(f).startswith(MARKER)
            text = (head + f.read(READ_LIMIT)).decode("utf-8", errors="replace")   # never a whole model
    except OSError:
        return False
    for candidate in (text, text.split("\n", 1)[0]):     # JSON, then the first row of JSON lines
        try:
            payload = json.loads(candidate)
        except ValueError:
            continue
        return isinstance(payload, dict) and isinstance(payload.get(MARKER), dict)
    return False


def _png_software(f) -> str:
    """The ``Software`` tEXt chunk of the PNG open at ``f`` (after the signature), or ''."""
    while len(header := f.read(8)) == 8:
        length, kind = struct.unpack(">I4s", header)
        if kind == b"IDAT":          # text chunks written by matplotlib come before the image
            return ""
        data = f.read(length)
        f.read(4)                    # CRC
        if kind == b"tEXt" and data.startswith(b"Software\0"):
            return data[len(b"Software\0"):].decode("latin-1")
    return ""


def check_output_file(path: Path | str, inputs=(), *, overwrite: bool = False, flag: str = "output") -> Path:
    """The resolved ``path``, or OutputPathError (one line, ``flag`` and the path) saying why it
    may not be written: it overlaps an input, is a folder, or exists and is not a previous
    output of ours, or is one and ``overwrite`` is false."""
    out = Path(path).expanduser().resolve()
    refuse_inputs(out, inputs, flag, "choose another output path")
    if out.is_dir():
        raise OutputPathError(f"{flag} {out} is a folder: give a file path")
    if out.exists() or Path(path).is_symlink():
        if not out.is_file() or not is_our_file(out):
            raise OutputPathError(f"{flag} {out} exists and is not an output of unlearn_kernels: refusing to "
                                  "replace it")
        if not overwrite:
            raise OutputPathError(f"{flag} {out} holds a previous output of unlearn_kernels: pass --overwrite "
                                  "to replace it")
    return out


def check_output_files(outputs: dict, inputs=(), *, overwrite: bool = False) -> None:
    """Every output file of a command (``{flag: path}``; None or '-' for stdout is skipped) may
    be written (:func:`check_output_file`), each to its own path; checked before any model is
    loaded."""
    seen = {}
    for flag, path in outputs.items():
        if path and path != "-":
            out = check_output_file(path, [p for p in inputs if p], overwrite=overwrite, flag=flag)
            if out in seen:
                raise OutputPathError(f"{flag} {out} is also {seen[out]}: give each output its own path")
            seen[out] = flag


def write_atomic(path: Path | str, write, *, overwrite: bool = False) -> Path:
    """``write(binary_file)`` into a temporary file beside ``path``, fsynced and renamed over it
    (:func:`check_output_file` first); the temporary file is removed on any error."""
    path = check_output_file(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())   # mkstemp makes it private; an output is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: Path | str, text: str, *, overwrite: bool = False) -> Path:
    """``text`` (UTF-8) at ``path``, atomically (:func:`write_atomic`)."""
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")), overwrite=overwrite)


def write_json_atomic(path: Path | str, payload: dict, *, overwrite: bool = False) -> Path:
    """``payload`` as indented JSON carrying the marker, atomically."""
    payload = payload if isinstance(payload.get(MARKER), dict) else {**payload, MARKER: marker()}
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n",
                             overwrite=overwrite)


def write_jsonl_atomic(path: Path | str, rows: list[dict], *, overwrite: bool = False) -> Path:
    """One JSON object per line, the first carrying the marker, atomically."""
    rows = [{**(rows[0] if rows else {}), MARKER: marker()}, *rows[1:]]
    return write_text_atomic(path, "".join(json.dumps(r, default=str) + "\n" for r in rows), overwrite=overwrite)


def save_figure_atomic(fig, path: Path | str, dpi: int = 100, *, overwrite: bool = False) -> Path:
    """A matplotlib figure as PNG carrying the marker, atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    import unlearn_kernels

    try:
        return write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi, metadata={
            "Software": f"{MARKER} {unlearn_kernels.__version__}"}), overwrite=overwrite)
    finally:
        plt.close(fig)
