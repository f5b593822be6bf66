"""Where an unlearned model may be written, and how it is put there without ever losing one.

Rules (checked before any model is loaded):

- the output path is new, or a previous output of this package — a folder whose
  ``report.json`` carries the ``"unlearn_kernels"`` marker — and replacing one needs
  ``overwrite=True``; a file, a folder of someone else's files, or an older output without the
  marker is refused;
- it is not, does not contain, and does not sit inside the input model folder or any input
  file;
- its parent is writable and has free space for ≥ 1.2 × the input model's weight files.

Writing goes to a staging folder beside the output (``.{name}.unlearn-tmp-{pid}-{random}``,
holding a ``.unlearn_kernels_staging`` file with the pid), every file and the folder are
fsynced, and the staging folder then takes the output's place in one step: on Linux
``renameat2(RENAME_EXCHANGE)`` swaps it with the old output atomically, so at every instant
the path holds either the complete old model or the complete new one; where that call is
missing (other systems, old kernels, file systems without it) the old output is first renamed
aside and the new one renamed in — two renames, with a short window in which the path is
absent but never half-written. A staging folder left by a process that died (a kill during the
save) is removed by the next save to the same output (an old output set aside by the
fallback is put back if the new one never arrived); nothing else is ever deleted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import secrets
import shutil
from pathlib import Path

from ..errors import UserError

MARKER = "unlearn_kernels"
REPORT_SCHEMA = 1
STAGING_FILE = ".unlearn_kernels_staging"
SPACE_FACTOR = 1.2
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class OutputPathError(UserError):
    """An output path that may not be written (one line, names the path)."""


def marker(**extra) -> dict:
    """The ``"unlearn_kernels"`` entry of a report.json: what makes a folder an output of ours."""
    import unlearn_kernels

    return {"version": unlearn_kernels.__version__, "report_schema": REPORT_SCHEMA, **extra}


def versions() -> dict:
    """Versions of the package and of what it ran on (lm-eval when installed)."""
    import torch
    import transformers

    import unlearn_kernels

    out = {"unlearn_kernels": unlearn_kernels.__version__, "torch": torch.__version__,
           "transformers": transformers.__version__}
    try:
        import lm_eval

        out["lm_eval"] = lm_eval.__version__
    except ImportError:
        pass
    return out


def is_previous_output(path: Path | str) -> bool:
    """True for a folder whose ``report.json`` carries this package's marker."""
    report = Path(path) / "report.json"
    try:
        payload = json.loads(report.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(payload, dict) and isinstance(payload.get(MARKER), dict)


def weights_size(model_dir: Path | str) -> int:
    """Bytes of the weight files of a model folder."""
    folder = Path(model_dir)
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def refuse_inputs(out: Path, inputs, flag: str, advice: str) -> None:
    """OutputPathError when the resolved output ``out`` is, contains or sits inside one of
    ``inputs`` (``flag`` and ``advice`` word the one line)."""
    for item in inputs:
        source = Path(item).expanduser().resolve()
        if out == source or out in source.parents or source in out.parents:
            where = "is" if out == source else "contains" if out in source.parents else "sits inside"
            raise OutputPathError(f"{flag} {out} {where} the input {source}: {advice}")


def check_output_path(out: Path | str, inputs=(), *, overwrite: bool = False,
                      needed_bytes: int | None = None) -> Path:
    """The resolved output path, or :class:`OutputPathError` saying why it may not be written."""
    out = Path(out).expanduser().resolve()
    refuse_inputs(out, inputs, "--out", "choose a separate output folder")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise OutputPathError(f"--out {out} exists and is not a folder: refusing to replace it")
        if not is_previous_output(out):
            raise OutputPathError(f"--out {out} exists and is not an output of unlearn_kernels "
                                  f"(no report.json with the {MARKER!r} marker): refusing to touch it")
        if not overwrite:
            raise OutputPathError(f"--out {out} holds a previous unlearned model: pass --overwrite to replace it")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"--out {out}: {parent} is not a writable folder")
    if needed_bytes:
        free = shutil.disk_usage(parent).free
        if free < SPACE_FACTOR * needed_bytes:
            raise OutputPathError(f"--out {out}: {free / 2**30:.2f} GiB free in {parent}, the model needs "
                                  f"{SPACE_FACTOR * needed_bytes / 2**30:.2f} GiB ({SPACE_FACTOR}x its weights)")
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove staging folders for ``out`` left by processes that no longer run; returns them."""
    removed = []
    for candidate in out.parent.glob(f".{out.name}.unlearn-tmp-*"):
        marker = candidate / STAGING_FILE
        try:
            pid = int(marker.read_text().strip())
        except (OSError, ValueError):
            continue        # not one of ours: never delete it
        if pid == os.getpid() or _alive(pid):
            continue
        if "-old-" in candidate.name and not out.exists():
            os.replace(candidate, out)   # the old output, set aside by a save that died: restore it
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed


def umask() -> int:
    """The process's umask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_staging(out: Path) -> Path:
    """A new staging folder beside ``out`` (permissions from the umask, like any folder)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    staging = out.parent / f".{out.name}.unlearn-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir(mode=0o777)
    (staging / STAGING_FILE).write_text(str(os.getpid()))
    return staging


def fix_permissions(folder: Path) -> None:
    """Files 0666 and folders 0777, less the umask (temp-file helpers create 0600)."""
    mask = umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def fsync_tree(folder: Path) -> None:
    """fsync every file, then every folder (so the names are durable too)."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux ``renameat2``; False where it is not available."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False


def swap_into_place(staging: Path, out: Path) -> None:
    """Put the complete ``staging`` folder at ``out``; the previous output (if any) is removed
    only once the new one is in place."""
    (staging / STAGING_FILE).unlink(missing_ok=True)
    fsync_tree(staging)
    if not out.exists():
        os.replace(staging, out)
    elif _exchange(staging, out):
        (staging / STAGING_FILE).write_text(str(os.getpid()))  # the old model, now at ``staging``
        shutil.rmtree(staging, ignore_errors=True)
    else:
        aside = out.parent / f".{out.name}.unlearn-tmp-{os.getpid()}-old-{secrets.token_hex(4)}"
        os.replace(out, aside)
        (aside / STAGING_FILE).write_text(str(os.getpid()))
        os.replace(staging, out)
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(out.parent)
