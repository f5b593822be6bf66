"""One evaluation of a model on an entangled-benchmark split: the numbers of the demo table,
each next to the retrained oracle's when one is given.

Measured on every model (lm-eval's cloze protocol, :mod:`.multiple_choice`):

- ``forget_acc``, ``retain_acc``: accuracy on the split's forget and retain questions;
  ``shared_retain_acc`` on the retain facts of the forget entities (None without entanglement).
- Relearning (:mod:`.relearn`, RTT): the model is fine-tuned on the attack half of the forget
  facts at every rate of ``lrs`` for ``relearn_steps`` steps; ``heldout_acc`` is the accuracy on
  the other half before the attack, ``relearn_accs[lr]`` the same accuracy at the end of the
  attack at ``lr``, ``relearn_curves[lr]`` its curve (every ``relearn_steps // 3`` steps);
  ``relearn_acc = max_lr relearn_accs[lr]`` is the attacker's best rate, ``relearn_best_lr`` that
  rate (the smallest on ties) and ``relearn_curve`` its curve.
- ``probe_acc``: linear probes at ``layer`` (:mod:`.probe`).
- ``mia_auc``: the ROC AUC of Min-K% Prob (k = 0.4, MUSE's headline score) telling the forget
  texts (members) from the split's ``holdout_texts`` (:mod:`.privacy`; 0.5 = indistinguishable);
  ``mia_aucs`` all four scores. The holdout texts of :meth:`Split.from_benchmark` are the
  forget sentences with the true value replaced by one of the question's distractors:
  same entities, templates and answer vocabulary, never in any training corpus — matched
  non-members, as the neighbourhood comparison of Mattern et al. (2023) uses.
- ``forget_log_truth_ratios``: the per-question statistic of forget quality (:mod:`.scores`).

With ``oracle`` (the retrained model, or its own earlier result of this function on the same
split and settings, so that it is evaluated once per split), the oracle's values come next
to them as ``oracle_<key>``, with ``forget_quality`` (the KS p-value of :mod:`.oracle`) and
``forget_quality_ks`` (its statistic D); :func:`compare` does this for results already measured. With ``base`` as well (the original model before
unlearning, or its result), ``recovery[lr]`` and ``recovery_max`` of :mod:`.oracle`;
``recovery_note`` says why recovery is None when it is. ``settings`` records what the numbers
depend on, and results passed in are refused when their settings differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import torch

from ..data.entangled import EntangledBenchmark
from ..errors import UserError
from . import privacy, scores
from .multiple_choice import accuracy
from .oracle import MIN_GAP, forget_quality, recovery_by_lr
from .probe import probe_accuracy
from .relearn import DEFAULT_LRS, relearn_curves

MIA_SCORE = "min_k"
ORACLE_KEYS = ("forget_acc", "retain_acc", "heldout_acc", "relearn_acc", "relearn_accs", "probe_acc", "mia_auc")


@dataclass
class Split:
    """Questions and texts of one forget/retain split, with the halves the attacks use."""

    forget_questions: list
    retain_questions: list
    forget_texts: list[str]
    retain_texts: list[str]
    attack_texts: list[str]           # relearning fine-tunes on these forget facts ...
    heldout_questions: list           # ... and is scored on these others
    probe_train_questions: list       # forget-domain facts the model keeps
    shared_retain_questions: list     # retain facts about the forget entities (entanglement)
    holdout_texts: list[str] = field(default_factory=list)   # MIA non-members: never trained on

    @classmethod
    def from_benchmark(cls, bench: EntangledBenchmark) -> "Split":
        forget = bench.forget_facts()
        entities = sorted({f.entity for f in forget})
        attack_entities = set(entities[::2])
        attack = [f for f in forget if f.entity in attack_entities]
        heldout = [f for f in forget if f.entity not in attack_entities]
        chosen = set(bench.forget_entities)
        known = [f for f in bench.facts if f.domain == "forget" and f.entity not in chosen]
        shared = [f for f in bench.retain_facts() if f.entity in chosen]
        forget_questions = bench.questions(forget)
        counterfactual = [dataclasses.replace(q.fact, value=q.choices[(q.answer + 1) % len(q.choices)])
                          for q in forget_questions]
        return cls(forget_questions, bench.questions(bench.retain_facts()), bench.corpus(forget),
                   bench.corpus(bench.retain_facts()), bench.corpus(attack), bench.questions(heldout),
                   bench.questions(known), bench.questions(shared), bench.corpus(counterfactual))


def _digest(questions) -> str:
    text = "\n".join(f"{q.question}\t{'|'.join(q.choices)}\t{q.answer}" for q in questions)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _settings(split: Split, layer: int, relearn_steps: int, seed: int, lrs: tuple[float, ...]) -> dict:
    return {"layer": layer, "relearn_steps": relearn_steps, "seed": seed, "lrs": list(lrs),
            "forget_questions": _digest(split.forget_questions), "heldout_questions": _digest(split.heldout_questions),
            "n_forget": len(split.forget_questions), "n_heldout": len(split.heldout_questions),
            "n_holdout_texts": len(split.holdout_texts)}


def measure(model, tokenizer, split: Split, layer: int, relearn_steps: int = 30, seed: int = 0,
            lrs=DEFAULT_LRS) -> dict:
    """The model's own numbers of the module docstring (no oracle keys)."""
    lrs = tuple(float(lr) for lr in lrs)
    if not split.forget_questions or not split.retain_questions:
        raise UserError("the split has no forget or no retain questions: nothing to evaluate")
    forget = scores.score(model, tokenizer, scores.prepare(tokenizer, split.forget_questions))
    curves = relearn_curves(model, tokenizer, split.attack_texts, split.heldout_questions, lrs=lrs,
                            steps=relearn_steps, every=max(1, relearn_steps // 3), seed=seed)
    final = {lr: curve[-1][1] for lr, curve in curves.items()}
    best = max(lrs, key=lambda lr: (final[lr], -lr))
    aucs = None
    if split.holdout_texts:
        member, nonmember = (privacy.membership_scores(model, tokenizer, texts, batch_size=64, progress=False)
                             for texts in (split.forget_texts, split.holdout_texts))
        aucs = privacy.mia_auc(member, nonmember)
    return {
        "forget_acc": float(forget["acc"].mean()),
        "retain_acc": accuracy(model, tokenizer, split.retain_questions),
        "shared_retain_acc": (accuracy(model, tokenizer, split.shared_retain_questions)
                              if split.shared_retain_questions else None),
        "heldout_acc": curves[lrs[0]][0][1],
        "relearn_acc": final[best],
        "relearn_best_lr": best,
        "relearn_curve": curves[best],
        "relearn_accs": final,
        "relearn_curves": curves,
        "probe_acc": probe_accuracy(model, tokenizer, split.probe_train_questions, split.forget_questions,
                                    layer, seed),
        "mia_auc": None if aucs is None else aucs[MIA_SCORE],
        "mia_aucs": aucs,
        "forget_log_truth_ratios": [float(v) for v in forget["log_truth_ratio"]],
        "settings": _settings(split, layer, relearn_steps, seed, lrs),
    }


def _given(reference, name: str, settings: dict, needed: tuple[str, ...]) -> dict:
    """An earlier :func:`measure`/:func:`evaluate` result, checked against this call's settings."""
    if not isinstance(reference, dict):
        raise TypeError(f"{name} must be a model or a dict returned by evaluate(), got {type(reference).__name__}")
    missing = [k for k in needed + ("settings",) if k not in reference]
    if missing:
        raise UserError(f"{name} results lack {missing}: pass a dict returned by evaluate()")
    differ = sorted(k for k in settings if reference["settings"].get(k) != settings[k])
    if differ:
        raise UserError(f"{name} results were computed with other settings ({', '.join(differ)}): "
                        "evaluate it on the same split with the same layer, relearning steps, seed and lrs")
    return reference


_ORACLE_NEEDS = ORACLE_KEYS + ("forget_log_truth_ratios",)


def compare(own: dict, oracle: dict | None = None, base: dict | None = None, min_gap: float = MIN_GAP) -> dict:
    """``own`` (a :func:`measure` result) with the oracle's numbers, forget quality and recovery
    of the module docstring added; ``oracle`` and ``base`` are results of the same settings."""
    settings = own["settings"]
    out = {**own, **{f"oracle_{k}": None for k in ORACLE_KEYS}, "forget_quality": None, "forget_quality_ks": None,
           "base_heldout_acc": None, "recovery": None, "recovery_max": None, "recovery_note": None}
    if base is not None:
        out["base_heldout_acc"] = _given(base, "base", settings, ("heldout_acc",))["heldout_acc"]
    if oracle is None:
        out["recovery_note"] = "no oracle given"
        return out
    oracle = _given(oracle, "oracle", settings, _ORACLE_NEEDS)
    out.update({f"oracle_{k}": oracle[k] for k in ORACLE_KEYS})
    quality = forget_quality(own["forget_log_truth_ratios"], oracle["forget_log_truth_ratios"])
    out["forget_quality"], out["forget_quality_ks"] = quality["p_value"], quality["ks_statistic"]
    if base is None:
        out["recovery_note"] = "no base model given"
        return out
    out["recovery"], out["recovery_note"] = recovery_by_lr(own["relearn_accs"], oracle["relearn_accs"],
                                                           out["base_heldout_acc"], oracle["heldout_acc"], min_gap)
    if out["recovery"] is not None:
        out["recovery_max"] = max(out["recovery"].values())
    return out


def evaluate(model, tokenizer, split: Split, layer: int, relearn_steps: int = 30, seed: int = 0, *,
             lrs=DEFAULT_LRS, oracle=None, base=None, min_gap: float = MIN_GAP) -> dict:
    """:func:`measure` of ``model`` and, side by side, the oracle's numbers, forget quality and
    recovery (:func:`compare`); ``oracle`` and ``base`` are models (sharing ``tokenizer``) or
    earlier results of this function, checked before any work; ``base`` may be ``model`` itself."""
    lrs = tuple(float(lr) for lr in lrs)
    settings = _settings(split, layer, relearn_steps, seed, lrs)
    for name, given, needed in (("oracle", oracle, _ORACLE_NEEDS), ("base", base, ("heldout_acc",))):
        if given is not None and not isinstance(given, torch.nn.Module):
            _given(given, name, settings, needed)
    own = measure(model, tokenizer, split, layer, relearn_steps, seed, lrs)
    if isinstance(oracle, torch.nn.Module):
        oracle = measure(oracle, tokenizer, split, layer, relearn_steps, seed, lrs)
    if base is model:
        base = own
    elif isinstance(base, torch.nn.Module):
        heldout = scores.score(base, tokenizer, scores.prepare(tokenizer, split.heldout_questions))
        base = {"heldout_acc": float(heldout["acc"].mean()), "settings": settings}
    return compare(own, oracle, base, min_gap)
