"""Loaders for user data: text corpora, WMDP-style multiple-choice questions, TOFU-style QA pairs.

Tables are read offline (local files only, never the Hub):

- ``.jsonl`` / ``.ndjson`` / ``.json`` — JSON lines, or one JSON array of objects, read with
  Python's ``json`` module (every value keeps its JSON type; a value nested too deeply is a
  DataError). Never with Arrow's JSON reader, which a deeply nested line crashes with a
  segmentation fault — a data file must never take the process down;
- the other formats with the ``datasets`` library:
- ``.csv`` — a header row, every cell read as text (``load_dataset("csv")``, no NA guessing);
- ``.parquet`` (``load_dataset("parquet")``);
- a ``Dataset.save_to_disk`` folder (``load_from_disk``); for a ``DatasetDict`` the single
  split, else the split named ``train`` (then ``test``), else an error listing the splits;
- ``.jsonl.gz``, ``.json.gz``, ``.csv.gz`` (and ``.txt.gz``): gzip-compressed versions.

``.txt`` (and any unknown suffix, for texts) is one document per non-empty line, read in
plain Python. Each load builds its Arrow table in a temporary cache that is deleted right
after, so a changed file always gives its new content and ``~/.cache`` is left alone.

The columns:

- texts: a string column (``text_field``, default ``text``); empty strings are skipped;
- multiple choice: ``question`` (non-empty string), ``choices`` (a list of at least two
  non-empty strings) and ``answer`` (an integer index into ``choices``; booleans are not
  indices; integral floats and numpy integers are accepted), optionally ``subject``. In a
  ``.csv`` file ``choices`` is one cell holding a JSON-encoded list (``["a", "b"]``) and
  ``answer`` a cell holding a decimal integer. In any format, a table without a
  ``choices`` column may instead have columns ``choice0``, ``choice1``, ... (empty or null
  trailing cells are dropped, so rows may have different numbers of choices);
- QA pairs: ``question`` and ``answer`` (non-empty strings; the names are arguments).

The marker of a file written by :func:`write_jsonl` (a key of its first row) is not a column.

Every problem with the data raises :class:`DataError` with a one-line message naming the
file, the row (``file:LINE:`` for JSON lines and ``.txt``, ``file: row N:`` otherwise, both
1-based) and the field.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import math
import numbers
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import UserError
from ..models.output_file import MARKER, write_jsonl_atomic

__all__ = ["DataError", "DataFileNotFound", "MCQuestion", "QAPair", "read_texts", "read_multiple_choice",
           "read_qa_pairs", "write_jsonl"]

SUPPORTED = (".txt, .jsonl, .json, .csv, .parquet, their .gz versions (not .parquet) "
             "or a datasets save_to_disk folder")


class DataError(UserError):
    """A problem with user data; the message is one line naming the file, row and field."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class DataFileNotFound(DataError, FileNotFoundError):
    """The data file does not exist (also a ``FileNotFoundError``)."""


@dataclass(frozen=True)
class MCQuestion:
    question: str
    choices: list[str]
    answer: int
    fact: object = None
    subject: str | None = None


@dataclass(frozen=True)
class QAPair:
    """A TOFU-style question/answer pair.

    ``prompt`` is the question followed by one space (none added when it already ends with
    whitespace) and ``text = prompt + answer``; loss-based unlearning methods put their
    loss on the answer tokens only (``UnlearningMethod.batches`` yields a ``loss_mask``).
    """

    question: str
    answer: str

    @property
    def prompt(self) -> str:
        return self.question if self.question[-1:].isspace() or not self.question else self.question + " "

    @property
    def text(self) -> str:
        return self.prompt + self.answer


# --- files ----------------------------------------------------------------------------------
def _existing(path: Path | str) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataFileNotFound(f"data file {path} does not exist")
    if not path.is_dir() and not path.is_file():
        raise DataError(f"{path}: not a regular file or folder")
    return path


def _format(path: Path) -> tuple[str | None, bool]:
    """(format, gzip-compressed) from the name: json, csv, parquet, txt, disk or None."""
    if path.is_dir():
        return "disk", False
    name = path.name.lower()
    compressed = name.endswith(".gz")
    base = name[:-3] if compressed else name
    for suffix, kind in ((".jsonl", "json"), (".ndjson", "json"), (".json", "json"), (".csv", "csv"),
                         (".parquet", "parquet"), (".txt", "txt")):
        if base.endswith(suffix):
            if compressed and kind == "parquet":
                raise DataError(f"{path}: compressed parquet is not supported (parquet compresses "
                                "internally); supported: " + SUPPORTED)
            return kind, compressed
    return None, compressed


def _raw_bytes(path: Path, compressed: bool) -> bytes:
    try:
        if compressed:
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(f"{path}: cannot be read ({type(error).__name__}: {error})") from None


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); "
                        "re-encode the file as UTF-8") from None


def _read_text_file(path: Path, compressed: bool) -> str:
    text = _decode(path, _raw_bytes(path, compressed))
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


# --- datasets, quietly and offline -----------------------------------------------------------
@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """``datasets`` with its progress bars and logging off; both restored afterwards."""
    import datasets
    from datasets.utils import logging as dlogging

    bars_were_off = datasets.are_progress_bars_disabled()
    verbosity = dlogging.get_verbosity()
    datasets.disable_progress_bars()
    dlogging.set_verbosity(dlogging.CRITICAL)
    try:
        yield datasets
    finally:
        dlogging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()


def _root_cause(error: BaseException) -> BaseException:
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        nxt = error.__cause__ or error.__context__
        if nxt is None or type(nxt).__name__ == "SchemaInferenceError":
            break
        error = nxt
    return error


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _load(path: Path, kind: str, compressed: bool):
    """A ``datasets.Dataset`` of a local file or folder, or (JSON only, when Arrow cannot
    type a column, e.g. mixed types) the rows parsed by the ``json`` module; DataError on
    any failure."""
    if kind != "disk" and path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if kind == "json":   # never Arrow's JSON reader: deeply nested values crash the process in it
        rows = _json_rows(path, compressed)
        if not rows:
            raise DataError(f"{path}: the file is empty (no rows)")
        return rows
    extra: dict = {}
    if kind == "csv":
        extra = _csv_options(path, compressed)
    failure: Exception | None = None
    with _quiet_datasets() as datasets:
        try:
            if kind == "disk":
                loaded = datasets.load_from_disk(str(path))
            else:
                with tempfile.TemporaryDirectory(prefix="unlearn-kernels-data-") as cache, \
                        warnings.catch_warnings():
                    # pandas only warns (and drops cells) when the first csv row is too long
                    warnings.filterwarnings("error", message="Length of header or names does not match")
                    loaded = datasets.load_dataset(kind, data_files=str(path.resolve()), split="train",
                                                   cache_dir=cache, keep_in_memory=True, **extra)
        except DataError:
            raise
        except Exception as error:  # datasets, pyarrow, pandas, codecs: never leak them
            failure = error
    if failure is not None:
        raise _diagnose(path, kind, compressed, failure) from None
    elif kind == "disk" and isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        chosen = splits[0] if len(splits) == 1 else next((s for s in ("train", "test") if s in loaded), None)
        if chosen is None:
            raise DataError(f"{path}: a DatasetDict with splits {', '.join(splits)}; save a single split "
                            "or one named 'train' or 'test'")
        loaded = loaded[chosen]
    if len(loaded) == 0:
        raise DataError(f"{path}: the file is empty (no rows)")
    return loaded


def _csv_options(path: Path, compressed: bool) -> dict:
    """Read every csv cell as text, with no NA guessing (``NA`` stays the string ``NA``)."""
    from datasets import Features, Value

    try:
        if compressed:
            with gzip.open(path, "rt", encoding="utf-8-sig", newline="") as handle:
                header = next(csv.reader(handle), [])
        else:
            with open(path, encoding="utf-8-sig", newline="") as handle:
                header = next(csv.reader(handle), [])
    except (UnicodeDecodeError, OSError, EOFError, csv.Error):
        header = None
    if header is None:
        _read_text_file(path, compressed)   # names the problem (non-UTF-8, bad gzip, empty)
        raise DataError(f"{path}:1: the header row cannot be read")
    if not any(name.strip() for name in header):
        _read_text_file(path, compressed)   # an empty file says so
        raise DataError(f"{path}:1: no header row (the first line names the columns)")
    if len(set(header)) != len(header):
        raise DataError(f"{path}:1: the header repeats a column name ({', '.join(header)})")
    return dict(features=Features({name: Value("string") for name in header}),
                keep_default_na=False, na_filter=False, encoding="utf-8-sig", index_col=False)


def _json_rows(path: Path, compressed: bool) -> list[dict]:
    """The objects of a JSON-lines file or JSON array, by the ``json`` module (DataError
    naming the line of the first syntax error, non-object or value nested too deeply)."""
    try:
        return _parse_json_rows(path, _read_text_file(path, compressed))   # empty, non-UTF-8: DataError
    except RecursionError:
        raise DataError(f"{path}: a value is nested too deeply to read (more than "
                        f"{sys.getrecursionlimit()} levels)") from None


def _parse_json_rows(path: Path, text: str) -> list[dict]:
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as bad:
            raise DataError(f"{path}:{bad.lineno}: not valid JSON ({bad.msg}, column {bad.colno})") from None
        for number, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise DataError(f"{path}: row {number}: expected a JSON object, got {type(row).__name__}")
        return rows
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as bad:
            if not rows:
                try:   # one (pretty-printed) object
                    whole = json.loads(text)
                except json.JSONDecodeError:
                    whole = None
                if isinstance(whole, dict):
                    return [whole]
            raise DataError(f"{path}:{number}: not valid JSON ({bad.msg}, column {bad.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _diagnose(path: Path, kind: str, compressed: bool, error: Exception) -> DataError:
    """What is wrong with a file or folder ``datasets`` could not read (one-line DataError)."""
    cause = _root_cause(error)
    if kind == "disk":
        if isinstance(cause, FileNotFoundError):
            return DataError(f"{path}: a folder, but not one written by datasets' save_to_disk "
                             "(no dataset_info.json or dataset_dict.json)")
        return DataError(f"{path}: cannot be loaded with datasets.load_from_disk ({_first_line(cause)})")
    if kind == "parquet":
        return DataError(f"{path}: not a readable parquet file ({_first_line(cause)})")
    try:
        _read_text_file(path, compressed)      # empty, non-UTF-8, bad gzip
    except DataError as found:
        return found
    if "corresponds to no data" in str(cause):
        return DataError(f"{path}: the file is empty (no rows)")
    if kind == "csv":
        match = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(cause))
        if match:
            return DataError(f"{path}:{match.group(2)}: {match.group(3)} cells where the header has "
                             f"{match.group(1)} columns")
        if "Length of header or names does not match" in str(cause):
            return DataError(f"{path}:2: more cells than the header has columns")
    return DataError(f"{path}: cannot be read as {kind} ({type(cause).__name__}: {_first_line(cause)})")


# --- tables -----------------------------------------------------------------------------------
class _Table:
    """The columns of a loaded file, with row locations for messages."""

    def __init__(self, path: Path, kind: str, compressed: bool, limit: int | None = None):
        self.path, self.kind, self.compressed = path, kind, compressed
        self.data = _load(path, kind, compressed)
        if isinstance(self.data, list):
            self.data = self.data[:limit] if limit is not None else self.data
            self.columns = [key for key in dict.fromkeys(key for row in self.data for key in row) if key != MARKER]
        else:
            if limit is not None and limit < len(self.data):
                self.data = self.data.select(range(limit))
            self.columns = list(self.data.column_names)
        self._lines: list[int] | None = None

    def __len__(self) -> int:
        return len(self.data)

    def column(self, name: str) -> list:
        if isinstance(self.data, list):
            return [row.get(name) for row in self.data]
        failure = None
        try:
            return list(self.data[name])
        except Exception as error:   # e.g. strings that are not UTF-8 inside a json file
            failure = error
        raise _diagnose(self.path, self.kind, self.compressed, failure) from None

    def require(self, name: str, hint: str = "") -> None:
        if name not in self.columns:
            raise DataError(f"{self.where(0)} no field {name!r} (the columns are: {', '.join(self.columns)})"
                            + (f"; {hint}" if hint else ""))

    def where(self, index: int) -> str:
        """``file:LINE:`` for JSON lines, ``file: row N:`` otherwise (``index`` is 0-based)."""
        if self.kind == "json":
            if self._lines is None:
                text = _decode(self.path, _raw_bytes(self.path, self.compressed))
                self._lines = ([] if text.lstrip().startswith("[") else
                               [n for n, line in enumerate(text.splitlines(), 1) if line.strip()])
            if index < len(self._lines):
                return f"{self.path}:{self._lines[index]}:"
        return f"{self.path}: row {index + 1}:"

    def missing(self, index: int, name: str) -> DataError:
        return DataError(f"{self.where(index)} field {name!r} is missing or null "
                         f"(the columns are: {', '.join(self.columns)})")


def _is_null(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _string(table: _Table, index: int, name: str, value) -> str:
    if _is_null(value):
        raise table.missing(index, name)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{table.where(index)} field {name!r} must be a non-empty string, got {_short(value)}")
    return value


def _index(value, allow_text: bool = False) -> int | None:
    """``value`` as an integer index, or None when it is not one (booleans are not)."""
    try:
        import numpy as np
        if isinstance(value, np.bool_):
            return None
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    if allow_text and isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    return None


def _choice_columns(columns: list[str]) -> list[str]:
    found = []
    while f"choice{len(found)}" in columns:
        found.append(f"choice{len(found)}")
    return found


def _choices(table: _Table, index: int, value, from_columns: bool) -> list[str]:
    field = "choice0.." if from_columns else "choices"
    if from_columns:
        while value and (_is_null(value[-1]) or value[-1] == ""):
            value = value[:-1]
    elif isinstance(value, str) and table.kind == "csv":
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{table.where(index)} field 'choices' must hold a JSON-encoded list of strings "
                            f"in a csv file, got {_short(value)}") from None
    elif _is_null(value):
        raise table.missing(index, "choices")
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    if (not isinstance(value, (list, tuple)) or len(value) < 2
            or not all(isinstance(c, str) and c.strip() for c in value)):
        raise DataError(f"{table.where(index)} field {field!r} must be a list of at least two non-empty strings, "
                        f"got {_short(value)}")
    return list(value)


# --- public readers --------------------------------------------------------------------------
def read_texts(path: Path | str, text_field: str = "text") -> list[str]:
    """The documents of a text corpus (see the module docstring for the formats)."""
    path = _existing(path)
    kind, compressed = _format(path)
    if kind in (None, "txt"):
        text = _read_text_file(path, compressed)
        return [line.strip() for line in text.splitlines() if line.strip()]
    table = _Table(path, kind, compressed)
    table.require(text_field, "choose the text column with text_field (--text-field)")
    texts = []
    for index, value in enumerate(table.column(text_field)):
        if _is_null(value):
            raise table.missing(index, text_field)
        if not isinstance(value, str):
            raise DataError(f"{table.where(index)} field {text_field!r} must be a string, got {_short(value)}")
        if value.strip():
            texts.append(value)
    if not texts:
        raise DataError(f"{path}: field {text_field!r} is empty in every row: no text")
    return texts


def _table_for(path: Path | str, what: str, limit: int | None = None) -> _Table:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit must be a positive integer or None, got {limit!r}")
    path = _existing(path)
    kind, compressed = _format(path)
    if kind in (None, "txt"):
        raise DataError(f"{path}: {what} need a table; supported: {SUPPORTED.replace('.txt, ', '')}")
    return _Table(path, kind, compressed, limit)


def read_multiple_choice(path: Path | str, limit: int | None = None) -> list[MCQuestion]:
    """WMDP-style questions (``question``, ``choices``, ``answer``, optional ``subject``).

    ``limit`` keeps the first ``limit`` rows (only those are checked).
    """
    table = _table_for(path, "multiple-choice questions", limit)
    table.require("question")
    choice_columns = [] if "choices" in table.columns else _choice_columns(table.columns)
    if "choices" not in table.columns and not choice_columns:
        raise DataError(f"{table.where(0)} no field 'choices' (nor columns choice0, choice1, ...) "
                        f"(the columns are: {', '.join(table.columns)})")
    table.require("answer")
    questions = table.column("question")
    answers = table.column("answer")
    if choice_columns:
        choices = list(zip(*(table.column(c) for c in choice_columns)))
    else:
        choices = table.column("choices")
    subjects = table.column("subject") if "subject" in table.columns else [None] * len(table)
    out = []
    for index in range(len(table)):
        question = _string(table, index, "question", questions[index])
        options = _choices(table, index, list(choices[index]) if choice_columns else choices[index],
                           bool(choice_columns))
        raw = answers[index]
        if _is_null(raw) or (table.kind == "csv" and raw == ""):
            raise table.missing(index, "answer")
        answer = _index(raw, allow_text=table.kind == "csv")
        if answer is None or not 0 <= answer < len(options):
            raise DataError(f"{table.where(index)} field 'answer' must be an integer index into the "
                            f"{len(options)} choices (0..{len(options) - 1}), got {_short(raw)}")
        subject = subjects[index]
        if _is_null(subject) or subject == "":
            subject = None
        elif not isinstance(subject, str):
            raise DataError(f"{table.where(index)} field 'subject' must be a string, got {_short(subject)}")
        out.append(MCQuestion(question, options, answer, subject=subject))
    return out


def read_qa_pairs(path: Path | str, question_field: str = "question",
                  answer_field: str = "answer") -> list[QAPair]:
    """TOFU-style question/answer pairs (two non-empty string columns)."""
    table = _table_for(path, "QA pairs")
    table.require(question_field)
    table.require(answer_field)
    questions, answers = table.column(question_field), table.column(answer_field)
    return [QAPair(_string(table, i, question_field, questions[i]), _string(table, i, answer_field, answers[i]))
            for i in range(len(table))]


def write_jsonl(path: Path | str, rows: list[dict], *, overwrite: bool = False) -> Path:
    """``rows`` as JSON lines at ``path``, as every file of ours is written
    (``models.output_file``): atomically, the first row carrying the package's marker, never
    over a file that is not ours, over one of ours only with ``overwrite``."""
    return write_jsonl_atomic(path, rows, overwrite=overwrite)
