"""Loaders for user data: text corpora and WMDP-style multiple-choice jsonl.

- texts: ``.txt`` (one document per non-empty line) or ``.jsonl`` (one object per line
  with a ``"text"`` field);
- multiple choice: ``.jsonl`` with ``question`` (str), ``choices`` (list of str) and
  ``answer`` (index into choices), the WMDP format.
Every error names the file and the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MCQuestion:
    question: str
    choices: list[str]
    answer: int
    fact: object = None


def _existing(path: Path | str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    return path


def _jsonl(path: Path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None


def read_texts(path: Path | str) -> list[str]:
    path = _existing(path)
    if path.suffix == ".jsonl":
        texts = []
        for number, row in _jsonl(path):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}:{number}: expected an object with a string field 'text'")
            texts.append(row["text"])
    else:
        texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{path} holds no text")
    return texts


def read_multiple_choice(path: Path | str) -> list[MCQuestion]:
    path = _existing(path)
    questions = []
    for number, row in _jsonl(path):
        try:
            q, choices, answer = row["question"], row["choices"], row["answer"]
        except (KeyError, TypeError):
            raise ValueError(f"{path}:{number}: needs 'question', 'choices' and 'answer'") from None
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
            raise ValueError(f"{path}:{number}: 'choices' must be a list of at least two strings")
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"{path}:{number}: 'answer' must be an index into choices, got {answer!r}")
        questions.append(MCQuestion(str(q), choices, answer))
    if not questions:
        raise ValueError(f"{path} holds no question")
    return questions


def write_jsonl(path: Path | str, rows: list[dict]) -> None:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
