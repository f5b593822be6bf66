"""The two prompt formats of lm-evaluation-harness 0.4.13 for multiple-choice questions.

- ``cloze`` (lm-eval's default for a custom ``multiple_choice`` task): the context is
  ``Question: {question}\\nAnswer:`` and choice ``c`` is scored as the continuation ``" " + c``.
- ``mmlu`` (lm-eval's ``mmlu`` and ``wmdp_*`` tasks): the context is
  ``{description}{question.strip()}\\nA. {c_0}\\nB. {c_1}…\\nAnswer:`` with the description
  ``The following are multiple choice questions (with answers) about {subject}.\\n\\n`` when a
  subject is given (empty otherwise), and the continuations are ``" A"``, ``" B"``, …; the
  length normaliser of ``acc_norm`` is then the length of the letter (1), so acc_norm = acc.
- ``text`` (ours, for cloze probes cut from running text, ``data.probes``): the context is the
  question string as it is and choice ``c`` is the continuation ``" " + c`` (lm-eval's
  ``multiple_choice`` task with ``doc_to_text: "{{question}}"``).

The continuation is the target delimiter ``" "`` followed by the choice, as lm-eval builds it
(``f"{target_delimiter}{choice}"``); the strings below are exactly what its Jinja templates
render for zero-shot evaluation without a chat template.
"""

from __future__ import annotations

import string

from ..errors import UserError

FORMATS = ("cloze", "mmlu", "text")
LETTERS = string.ascii_uppercase
TARGET_DELIMITER = " "


def cloze_context(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def mmlu_description(subject: str | None) -> str:
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""


def mmlu_context(question: str, choices: list[str], subject: str | None = None) -> str:
    if len(choices) > len(LETTERS):
        raise UserError(f"format 'mmlu' labels choices A-Z: at most {len(LETTERS)} choices, got {len(choices)}")
    lines = [question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return mmlu_description(subject) + "\n".join(lines) + "\nAnswer:"


def request(question: str, choices: list[str], format: str = "cloze", subject: str | None = None):
    """``(context, continuations, normalisers)`` of one question: the strings lm-eval scores and
    the strings whose character length divides the log-likelihood for ``acc_norm``."""
    if format == "cloze":
        return cloze_context(question), [TARGET_DELIMITER + c for c in choices], list(choices)
    if format == "text":
        return question, [TARGET_DELIMITER + c for c in choices], list(choices)
    if format == "mmlu":
        letters = list(LETTERS[:len(choices)])
        return mmlu_context(question, choices, subject), [TARGET_DELIMITER + x for x in letters], letters
    raise UserError(f"format must be one of {FORMATS}, got {format!r}")
