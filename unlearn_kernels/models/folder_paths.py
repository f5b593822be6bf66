"""Names read from a model folder stay inside that folder.

A model folder is user input, and some of its files name other files: the shard index
(``model.safetensors.index.json``: tensor → shard file), ``auto_map`` entries of
``config.json`` and ``tokenizer_config.json`` (``module.Class`` → ``module.py``), ``*_file``
fields (which transformers does not follow: it reads tokenizer files by fixed names). A hostile folder can name ``../elsewhere/model.safetensors``; a reader that follows
the name reads outside the folder, and a writer that reuses it (the shard rewrite of
``models.prefix``) writes outside ``--out``.

The rule: a name is a relative POSIX path of plain components — not absolute, no ``..``, no
empty or ``.`` component, no backslash, no NUL — so ``folder / name`` lies in ``folder``
lexically. A file inside the folder that is a symbolic link is still followed, as transformers
follows it (the Hugging Face cache stores every file as a link into ``blobs/``); what a name
can never do is leave the folder, and nothing is ever *written* through a link or a name that
leaves the staging folder (:func:`inside`). Every violation is an :class:`UnsafePathError`
naming the file and the entry, raised before any work.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from ..errors import MissingFileError, UserError, path_error

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
NAMING_FILES = ("config.json", "tokenizer_config.json", "generation_config.json", "processor_config.json")


class UnsafePathError(UserError):
    """A name in a model folder (or a path we would write) that leaves its folder."""


def inside(folder: Path | str, name, *, source: str = "", entry: str = "") -> Path:
    """``folder / name`` when ``name`` is a plain relative path that stays in ``folder``;
    :class:`UnsafePathError` naming ``source`` (the file that holds the name) and ``entry``
    otherwise."""
    where = f"{source}: {entry}" if source and entry else source or entry or "path"
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"{where}: expected a file name, got {name!r}")
    parts = PurePosixPath(name).parts
    if (name.startswith("/") or "\\" in name or "\x00" in name or ".." in parts
            or any(p in ("", ".") for p in name.split("/"))):
        raise UnsafePathError(f"{where}: {name!r} leaves the folder (only plain names inside it are allowed)")
    folder = Path(folder)
    path = folder / name
    if not path.absolute().is_relative_to(folder.absolute()):   # belt and braces after the lexical rule
        raise UnsafePathError(f"{where}: {name!r} leaves the folder {folder}")
    return path


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None      # unreadable files are reported by whoever reads them for real


def _auto_map_modules(value) -> list[str]:
    """The module references of an ``auto_map`` value (``"mod.Class"``, ``"repo--mod.Class"``,
    or a list of them for tokenizers)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [v for v in values if v is not None]


def read_config(folder: Path | str) -> dict:
    """The ``config.json`` of a model folder, a JSON object; UserError naming it otherwise."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise MissingFileError(f"{folder} is not a model directory (no config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise path_error(path, error) from None
    except ValueError as error:
        raise UserError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} holds a {type(config).__name__}, not a JSON object (the model's config)")
    return config


def check_model_folder(folder: Path | str) -> None:
    """:class:`UnsafePathError` when any name a model folder's files give leaves the folder:
    the shard index's files and ``auto_map`` modules (and references to other repositories,
    ``repo--module.Class``). Tokenizer files are read by transformers under fixed names in the
    folder (the ``*_file`` paths old ``tokenizer_config.json`` files record are not used)."""
    folder = Path(folder)
    for index in INDEX_FILES:
        payload = _json(folder / index) if (folder / index).is_file() else None
        if payload is None:
            continue
        weight_map = payload.get("weight_map") if isinstance(payload, dict) else None
        if not isinstance(weight_map, dict):
            raise UnsafePathError(f"{folder / index}: no 'weight_map' object (tensor name -> shard file)")
        for tensor, shard in weight_map.items():
            inside(folder, shard, source=str(folder / index), entry=f"weight_map[{tensor!r}]")
    for name in NAMING_FILES:
        payload = _json(folder / name) if (folder / name).is_file() else None
        if not isinstance(payload, dict):
            continue
        auto_map = payload.get("auto_map")
        if isinstance(auto_map, dict):
            for key, value in auto_map.items():
                for ref in _auto_map_modules(value):
                    if not isinstance(ref, str) or "." not in ref:
                        raise UnsafePathError(f"{folder / name}: auto_map[{key!r}]: expected 'module.Class', got {ref!r}")
                    if "--" in ref:
                        raise UnsafePathError(f"{folder / name}: auto_map[{key!r}] = {ref!r} names code in another "
                                              "repository; only files inside the model folder may be named")
                    module = ref.rsplit(".", 1)[0]
                    inside(folder, module.replace(".", "/") + ".py", source=str(folder / name),
                           entry=f"auto_map[{key!r}]")
