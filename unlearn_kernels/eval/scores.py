"""Per-question scores from one pass of the lm-eval scorer: accuracy and the truth ratio.

The evaluator (:mod:`.multiple_choice`) gives, for question q with choices c_0 … c_{k-1},
answer a and continuation token counts n_i, the log-likelihoods ℓ_i = Σ_t log p(y_i,t | x, y_i,<t).
From the same numbers, without a second forward:

    acc_q      = 1[argmax_i ℓ_i = a]                  (lowest index on ties, as lm-eval)
    acc_norm_q = 1[argmax_i ℓ_i / len(c_i) = a]       (len in characters)

and the log truth ratio, TOFU's truth ratio (Maini et al. 2024) with the question's distractors
as the perturbed answers and its correct choice as the answer (there is no paraphrase here)::

    log R_q = log( (1/(k-1)) Σ_{i≠a} exp(ℓ_i / n_i) ) − ℓ_a / n_a

ℓ_i / n_i is the mean log-probability per token, so exp(ℓ_i / n_i) is the per-token geometric
mean probability that TOFU compares, and choices of different token lengths weigh alike. R_q < 1
(log R_q < 0): the model prefers the true value to the distractors; R_q ≈ 1: it cannot tell
them apart, as a model that never saw the fact. A shift common to all choices of a question
(a model that lowered or raised the whole answer vocabulary at that prompt) cancels in R_q.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import UserError
from .multiple_choice import Request, _check as check_questions, build_requests, predictions, score_requests


@dataclass(frozen=True)
class Prepared:
    """Questions tokenised once, to be scored on several models (or checkpoints)."""

    requests: list[Request]
    answers: list[int]


def prepare(tokenizer, questions: Sequence, format: str = "cloze", subject: str | None = None) -> Prepared:
    questions = list(questions)
    check_questions(questions)
    return Prepared(build_requests(tokenizer, questions, format, subject), [int(q.answer) for q in questions])


def log_truth_ratios(loglikelihoods: Sequence[Sequence[float]], token_counts: Sequence[Sequence[int]],
                     answers: Sequence[int]) -> np.ndarray:
    """``log R_q`` of the module docstring for every question (float64)."""
    if not len(loglikelihoods) == len(token_counts) == len(answers):
        raise ValueError(f"loglikelihoods, token_counts and answers differ in length "
                         f"({len(loglikelihoods)}, {len(token_counts)}, {len(answers)})")
    if not len(answers):
        raise UserError("no questions: nothing to score")
    out = np.empty(len(answers))
    for q, (ll, counts, a) in enumerate(zip(loglikelihoods, token_counts, answers)):
        ll, counts = np.asarray(ll, dtype=np.float64), np.asarray(counts, dtype=np.float64)
        if ll.shape != counts.shape or ll.size < 2 or not 0 <= a < ll.size:
            raise ValueError(f"question {q}: needs >= 2 choices with one token count each and an answer "
                             f"index into them (got {ll.size} log-likelihoods, {counts.size} counts, answer {a})")
        if (counts < 1).any() or not np.isfinite(ll).all():
            raise ValueError(f"question {q}: token counts must be >= 1 and log-likelihoods finite")
        per_token = ll / counts
        others = np.delete(per_token, a)
        out[q] = np.logaddexp.reduce(others) - np.log(others.size) - per_token[a]
    return out


def score(model, tokenizer, prepared: Prepared, batch_size: int = 16) -> dict:
    """``{"acc", "acc_norm", "log_truth_ratio"}`` per question (float64 arrays, question
    order) and ``"loglikelihoods"`` (lists), from one pass of the evaluator."""
    lls = score_requests(model, tokenizer, prepared.requests, batch_size, progress=False)
    answers = np.asarray(prepared.answers)
    pred, pred_norm = np.array([predictions(r, ll) for r, ll in zip(prepared.requests, lls)]).T
    counts = [[len(c) for c in r.continuation_ids] for r in prepared.requests]
    return {"acc": (pred == answers).astype(np.float64), "acc_norm": (pred_norm == answers).astype(np.float64),
            "log_truth_ratio": log_truth_ratios(lls, counts, prepared.answers), "loglikelihoods": lls}
