"""Membership inference on texts and MUSE's PrivLeak: has the model still seen the forget set?

A text is tokenized as the tokenizer does by default (its own special tokens included, so a
Llama tokenizer's BOS comes first, as in MUSE's ``tokenizer.encode``) into x_1..x_T. Token 1
is context only; every later token is scored given its prefix, n = T − 1 scores::

    ℓ_t  = log p(x_t | x_<t)                                   t = 2..T
    μ_t  = E_{z∼p(·|x_<t)} log p(z | x_<t)     = Σ_z p(z) log p(z)
    σ_t² = E_{z∼p(·|x_<t)} (log p(z | x_<t))² − μ_t²   = Σ_z p(z) (log p(z) − μ_t)²

From them, one membership score per text (m = max(1, ⌊k·n⌋), "lowest" taken over the n
scored positions; ``k`` ∈ (0, 1], default 0.4 as MUSE's headline ``Min-40%``)::

    loss             = (1/n) Σ_t ℓ_t                           = −(mean token NLL)
    zlib             = −NLL / zlib(x) = ((1/n) Σ_t ℓ_t) / len(zlib.compress(x.encode("utf-8")))
    min_k            = (1/m) Σ (the m lowest ℓ_t)                      Min-K% Prob
    min_k_plus_plus  = (1/m) Σ (the m lowest z_t),  z_t = (ℓ_t − μ_t) / σ_t     Min-K%++

Convention: every score is oriented so that **higher = more member-like** (the text looks
trained on). The references compute the same quantities with the opposite sign (MUSE's
``PPL`` is the NLL, its ``PPL/zlib`` is NLL / zlib length after Carlini et al. 2021, its
``Min-K%`` is −mean of the lowest log-probs; OpenUnlearning negates Min-K%++ likewise) and
then rank by the negation, so the four scores here are theirs negated and rank texts
identically. ``mia_auc`` is the ROC AUC (``sklearn.metrics.roc_auc_score``) of telling members
(label 1: the forget texts) from non-members (label 0: holdout texts never trained on) by the
score, so 1 = forget texts fully detectable as trained on, 0.5 = indistinguishable from
holdout; this is OpenUnlearning's orientation ("auc is 1 when the forget data is much more
likely than the holdout data"). MUSE's ``forget_holdout`` AUC puts the labels the other way
round (forget 0, holdout 1), so AUC_MUSE = 1 − AUC, and its PrivLeak, reported ×100 as MUSE's
``eval.py`` and tables do, with the retrained model as the reference, is::

    PrivLeak = (AUC_MUSE(unlearned) − AUC_MUSE(reference)) / AUC_MUSE(reference) · 100
             = ((1 − AUC) − (1 − AUC_ref)) / (1 − AUC_ref) · 100

(OpenUnlearning's ``privleak`` makes the same 1 − x conversion). It is ≈ 0 for a model that
leaks as much as one never trained on the forget set, strongly negative (→ −100) for one that
still knows it (under-unlearning: MUSE's target models score ≈ −100), and positive for
over-unlearning (forget texts look *less* familiar than holdout). It is undefined (NaN) when the
reference's AUC is 1. σ_t² is floored at 1e-6 before the square root (as OpenUnlearning) so a
one-hot prediction gives a finite z. Logits are cast to fp32 before the log-softmax; batches
are right-padded and padded positions are never scored.
"""

from __future__ import annotations

import math
import numbers
import zlib
from typing import Optional

import numpy as np
import torch

from ..errors import UserError
from .multiple_choice import pad_rows

SCORES = ("loss", "zlib", "min_k", "min_k_plus_plus")
VARIANCE_FLOOR = 1e-6
CONVENTION = ("higher score = more member-like (trained on); AUC: forget texts label 1, holdout label 0 "
              "(0.5 = indistinguishable, 1 = forget fully detectable); PrivLeak = "
              "((1-AUC) - (1-AUC_ref)) / (1-AUC_ref) * 100, MUSE's sign and scale (≈0 ideal, -100 = not unlearned)")


def _check_texts(texts, name: str) -> None:
    if isinstance(texts, str):
        raise UserError(f"{name} must be a list of strings, not a single string")
    if len(texts) == 0:
        raise UserError(f"{name} is empty: nothing to score")


def _check_k(k: float) -> None:
    if not (isinstance(k, numbers.Real) and 0 < k <= 1):
        raise UserError(f"k must be in (0, 1], got {k!r}")


def _check_batch_size(batch_size: int) -> None:
    if not (isinstance(batch_size, numbers.Integral) and batch_size >= 1):
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")


@torch.no_grad()
def token_logprob_stats(model, tokenizer, texts: list[str], batch_size: int = 16,
                        max_length: int | None = None, progress: bool | None = None) -> list[dict]:
    """Per text, over its n scored tokens: ``logprobs`` ℓ_t, ``mu`` μ_t and ``sigma`` σ_t
    (float64 arrays of length n). ``max_length`` truncates the token sequences (BOS included);
    ``progress`` None shows a bar from four batches on.
    A batch holds a few fp32 ``[batch_size, length, vocab]`` tensors: lower ``batch_size`` for
    long texts under a large vocabulary."""
    _check_texts(texts, "texts")
    _check_batch_size(batch_size)
    if max_length is not None and not (isinstance(max_length, int) and max_length >= 2):
        raise UserError(f"max_length must be an integer >= 2 or None, got {max_length!r}")
    from tqdm import tqdm

    sequences = [list(ids) for ids in tokenizer(list(texts))["input_ids"]]
    if max_length is not None:
        sequences = [ids[:max_length] for ids in sequences]
    for i, ids in enumerate(sequences):
        if len(ids) < 2:
            raise UserError(f"texts[{i}] gives {len(ids)} token(s): at least 2 are needed "
                            f"(one of context, one to score): {texts[i][:80]!r}")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    starts = range(0, len(sequences), batch_size)
    was_training = model.training
    model.eval()
    out: list[dict] = []
    try:
        for start in tqdm(starts, desc="membership scores", leave=False,
                          disable=len(starts) < 4 if progress is None else not progress):
            chunk = sequences[start:start + batch_size]
            ids, mask = pad_rows(chunk, pad, device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)                # [B, W-1, V]: p(· | x_<t)
            token_lp = logp.gather(-1, ids[:, 1:, None])[..., 0]    # ℓ_t
            p = logp.exp()
            mu = torch.where(p > 0, p * logp, 0).sum(-1)           # Σ p log p (0·log 0 = 0)
            centred = torch.where(p > 0, logp - mu[..., None], 0)
            var = (p * centred * centred).sum(-1)
            sigma = var.clamp_min(VARIANCE_FLOOR).sqrt()
            for i, s in enumerate(chunk):
                n = len(s) - 1
                out.append({"logprobs": token_lp[i, :n].double().cpu().numpy(),
                            "mu": mu[i, :n].double().cpu().numpy(),
                            "sigma": sigma[i, :n].double().cpu().numpy()})
    finally:
        model.train(was_training)
    return out


def _lowest_mean(values: np.ndarray, k: float) -> float:
    m = max(1, int(len(values) * k))
    return float(np.sort(values)[:m].mean())


def membership_scores(model, tokenizer, texts, *, k: float = 0.4, batch_size: int = 16,
                      max_length: int | None = None, progress: bool | None = None) -> dict[str, np.ndarray]:
    """The four scores of the module docstring, one value per text, higher = more member-like."""
    _check_k(k)
    stats = token_logprob_stats(model, tokenizer, texts, batch_size=batch_size, max_length=max_length,
                                progress=progress)
    scores: dict[str, list[float]] = {name: [] for name in SCORES}
    for text, s in zip(texts, stats):
        lp = s["logprobs"]
        mean_lp = float(lp.mean())
        scores["loss"].append(mean_lp)
        scores["zlib"].append(mean_lp / len(zlib.compress(text.encode("utf-8"))))
        scores["min_k"].append(_lowest_mean(lp, k))
        scores["min_k_plus_plus"].append(_lowest_mean((lp - s["mu"]) / s["sigma"], k))
    return {name: np.asarray(v, dtype=np.float64) for name, v in scores.items()}


def mia_auc(member: dict[str, np.ndarray], nonmember: dict[str, np.ndarray]) -> dict[str, float]:
    """ROC AUC per score of members (label 1) against non-members (label 0); higher score is
    taken as more member-like, so 1.0 = perfectly separated, 0.5 = chance, 0.0 = inverted."""
    from sklearn.metrics import roc_auc_score

    if set(member) != set(nonmember):
        raise UserError(f"member and nonmember must have the same scores, got {sorted(member)} "
                        f"and {sorted(nonmember)}")
    if not member:
        raise UserError("member has no scores")
    out = {}
    for name in member:
        pos = np.asarray(member[name], dtype=np.float64).ravel()
        neg = np.asarray(nonmember[name], dtype=np.float64).ravel()
        for arg, values in (("member", pos), ("nonmember", neg)):
            if values.size == 0:
                raise UserError(f"{arg}[{name!r}] is empty: an AUC needs both classes")
            if not np.isfinite(values).all():
                raise UserError(f"{arg}[{name!r}] has non-finite values")
        labels = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
        out[name] = float(roc_auc_score(labels, np.concatenate([pos, neg])))
    return out


def privleak(auc: float, reference_auc: float) -> float:
    """MUSE's PrivLeak (×100) from AUCs in this module's orientation (see the docstring)."""
    muse, muse_ref = 1.0 - auc, 1.0 - reference_auc
    if muse_ref == 0:
        return math.nan
    return (muse - muse_ref) / muse_ref * 100.0


def privacy_report(model, tokenizer, forget_texts, holdout_texts, *, reference_model=None, k: float = 0.4,
                   batch_size: int = 16, max_length: int | None = None) -> dict:
    """MIA AUCs of ``model`` on forget (members) vs holdout (non-members) texts, and PrivLeak
    against ``reference_model`` (MUSE: the model retrained without the forget set; it shares
    ``tokenizer``) when one is given, else None."""
    _check_texts(forget_texts, "forget_texts")
    _check_texts(holdout_texts, "holdout_texts")
    _check_k(k)

    def aucs(m) -> dict[str, float]:
        kw = dict(k=k, batch_size=batch_size, max_length=max_length)
        return mia_auc(membership_scores(m, tokenizer, forget_texts, **kw),
                       membership_scores(m, tokenizer, holdout_texts, **kw))

    auc = aucs(model)
    reference_auc: Optional[dict[str, float]] = None
    leak: Optional[dict[str, float]] = None
    if reference_model is not None:
        reference_auc = aucs(reference_model)
        leak = {name: privleak(auc[name], reference_auc[name]) for name in auc}
    return {"auc": auc, "privleak": leak, "reference_auc": reference_auc, "n_forget": len(forget_texts),
            "n_holdout": len(holdout_texts), "k": k, "convention": CONVENTION}
