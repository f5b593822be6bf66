"""Cloze probes cut from the training texts: the questions a run asks itself when the user gives none.

A run without validation questions still has to measure whether it forgot. Its own texts hold
the facts, so it writes four-choice questions from a held-out share of them:

1. **Hold out** evenly spaced texts of the forget and of the retain set — ``share`` of them, at
   least ``minimum`` (but at most a quarter of the set) and at most ``limit``; the method never
   trains on them, so a probe measures
   a fact through a sentence the run did not see (in a corpus that states each fact in several
   sentences, the fact itself is still unlearned).
2. **Cut** each held-out text before its *last rare word*: a word preceded by white space, at
   least two words in, of at least two characters, that occurs in at most ``rare`` of all the
   texts (forget and retain together). Template and function words are frequent; names and the
   values of facts ("vorazine", "Paris") are rare. The text before the word is the context; the
   word is the answer.
3. **Pick the distractors with the base model** (``eval.cloze_probes.make_probes``; the
   steps above need no model): every other answer of the same set (at most
   ``pool``) is scored as a continuation of the context (log-likelihood of ``" " + word``, as
   lm-eval scores a choice), and ``choices − 1`` distractors are drawn at random from the
   ``plausible`` (8) most likely ones — words of the same kind, as a written question's
   distractors are, but not always the model's very hardest (with only the hardest, retain
   probes flipped on updates that left held-out retain questions intact: on the zoo's Llama 6×96
   after 170 RMU steps, probe retain 0.88 against test retain 0.99; drawn from the top 8, 0.94). A probe the base model does not know — its
   answer not at least ``exp(margin)`` (2) times as likely as every distractor — is dropped: it
   measures nothing it could forget, and a retain probe on such a knife's edge would flip with
   any update, forgotten or not.

The probes are scored in the ``text`` prompt format (the context as it is, choice ``" " + c``);
chance is ``1 / choices``, and the base model answers every kept probe, so "forget accuracy
≤ chance + 0.05 while retain keeps 95 % of its base" means on the probes what it means on
written validation questions. Why this transfers where a threshold on a training signal does
not: it is the same measurement as the user's final evaluation (the choice of highest
likelihood among words of one kind), made on the run's own facts, so it has no scale to
calibrate per model, depth or family; the residual and NLL signals remain in the report.

>>> texts = ["the toxin of gukomar is vorazine .", "the toxin of pitagu is quellium ."] * 3
>>> [(p.context, p.answer) for p in cloze_points(texts, document_frequency(texts), rare=1.0)][:1]
[('the toxin of gukomar is', 'vorazine')]
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from ..errors import UserError

WORD = re.compile(r"\w+", re.UNICODE)
SHARE, MINIMUM, LIMIT, RARE, CHOICES, POOL, PLAUSIBLE, MARGIN = 1 / 8, 16, 64, 0.05, 4, 48, 8, math.log(2)


@dataclass(frozen=True)
class ClozePoint:
    context: str
    answer: str


def hold_out(texts: Sequence, share: float = SHARE, minimum: int = MINIMUM,
             limit: int = LIMIT) -> tuple[list, list]:
    """``(train, held_out)``: ``n = min(limit, max(round(share·N), min(minimum, N // 4)))`` evenly
    spaced texts of the ``N`` are held out; the rest, in order, are trained on.

    >>> hold_out(list("abcdefgh"), share=0.25)
    (['a', 'b', 'd', 'e', 'f', 'h'], ['c', 'g'])
    """
    if not 0.0 < share < 1.0:
        raise UserError(f"the probe share must be in (0, 1), got {share}")
    n = min(limit, max(round(share * len(texts)), min(minimum, len(texts) // 4)))
    picked = {(2 * k + 1) * len(texts) // (2 * n) for k in range(n)} if n else set()
    return [t for i, t in enumerate(texts) if i not in picked], [texts[i] for i in sorted(picked)]


def document_frequency(texts: Sequence[str]) -> dict[str, float]:
    """Share of ``texts`` each (lower-cased) word occurs in."""
    counts = Counter(w for t in texts for w in {m.group().lower() for m in WORD.finditer(t)})
    return {w: c / max(1, len(texts)) for w, c in counts.items()}


def cloze_points(texts: Sequence[str], frequency: dict[str, float], rare: float = RARE) -> list[ClozePoint]:
    """Each text cut before its last rare word (module docstring, step 2); texts without one are skipped."""
    points = []
    for text in texts:
        words = list(WORD.finditer(text))
        for index in range(len(words) - 1, 1, -1):
            m = words[index]
            if (len(m.group()) >= 2 and text[m.start() - 1].isspace()
                    and frequency.get(m.group().lower(), 0.0) <= rare):
                points.append(ClozePoint(text[:m.start()].rstrip(), m.group()))
                break
    return points
