"""Relearning attack (Deeb & Roger's RTT): is the forgotten knowledge gone, or only hidden?

A copy of the unlearned model is fine-tuned (all weights, AdamW, the causal-LM loss on every
non-padding token) on texts stating one part of the forget facts; the accuracy on questions
about the *held-out* part — facts the attack never shows — is measured along the way with the
lm-eval evaluator (:mod:`.multiple_choice`, through :mod:`.scores`).
Knowledge that was only suppressed comes back on those facts; knowledge that is gone comes
back no faster than in a model that never learned it. The attack runs at several learning
rates (RTT sweeps them, since the best one differs per model) and reports, per rate, the
curve ``[(step, acc)]`` and the highest held-out accuracy reached: the attacker's best.

Each rate starts from the same model with the same batches (``random.Random(seed)`` draws
``batch_size`` texts per step), so the step-0 accuracy is measured once for all rates; the
held-out questions are tokenised once for every checkpoint. The training loop is
:func:`.attacks.attack_curve`'s (RTT is the ``rtt@LR`` rows of the attack suite).
"""

from __future__ import annotations

from ..errors import UserError
from . import scores
from .attacks import attack_curve, check_attack, rtt

DEFAULT_LRS = (1e-5, 1e-4, 1e-3)


def relearn_curves(model, tokenizer, train_texts: list[str], heldout_questions, *, lrs=DEFAULT_LRS,
                   steps: int = 30, every: int = 10, batch_size: int = 8, seed: int = 0, format: str = "cloze",
                   metric: str = "acc") -> dict[float, list[tuple[int, float]]]:
    """``{lr: [(step, held-out accuracy)]}`` from step 0 to ``steps`` every ``every`` steps
    (and at ``steps``), one attack per rate; ``model`` itself is left untouched."""
    lrs = tuple(float(lr) for lr in lrs)
    if not lrs:
        raise UserError("lrs is empty: give at least one learning rate")
    if len(set(lrs)) != len(lrs):
        raise UserError(f"lrs has repeated rates: {lrs}")
    if isinstance(train_texts, str) or not train_texts or not heldout_questions:
        raise UserError("relearning needs a list of attack texts and held-out questions")
    for lr in lrs:
        check_attack(tokenizer, rtt(lr, steps), train_texts, every=every, batch_size=batch_size, metric=metric)
    heldout = scores.prepare(tokenizer, heldout_questions, format)
    initial = float(scores.score(model, tokenizer, heldout)[metric].mean())
    return {lr: attack_curve(model, tokenizer, rtt(lr, steps), train_texts, heldout, every=every,
                             batch_size=batch_size, seed=seed, initial=initial, format=format, metric=metric)
            for lr in lrs}


def relearn_curve(model, tokenizer, train_texts: list[str], heldout_questions, *, steps: int = 30,
                  every: int = 10, lr: float = 1e-3, batch_size: int = 8, seed: int = 0,
                  format: str = "cloze", metric: str = "acc") -> list[tuple[int, float]]:
    """``[(step, held-out accuracy)]`` from step 0 to ``steps`` every ``every`` steps, one lr;
    ``model`` itself is left untouched."""
    return relearn_curves(model, tokenizer, train_texts, heldout_questions, lrs=(lr,), steps=steps, every=every,
                          batch_size=batch_size, seed=seed, format=format, metric=metric)[float(lr)]


def relearn_attack(model, tokenizer, train_texts: list[str], heldout_questions, *, lrs=DEFAULT_LRS,
                   steps: int = 30, every: int = 10, batch_size: int = 8, seed: int = 0, format: str = "cloze",
                   metric: str = "acc") -> dict:
    """RTT at every learning rate in ``lrs``: ``{"curves": {lr: [(step, acc)]}, "max_acc",
    "best_lr", "initial_acc", "metric", "format", "steps", "n_train", "n_heldout"}``."""
    lrs = tuple(float(lr) for lr in lrs)
    curves = relearn_curves(model, tokenizer, train_texts, heldout_questions, lrs=lrs, steps=steps, every=every,
                            batch_size=batch_size, seed=seed, format=format, metric=metric)
    best_lr = max(lrs, key=lambda lr: (max(a for _, a in curves[lr]), -lrs.index(lr)))
    return {"curves": curves, "max_acc": max(a for _, a in curves[best_lr]), "best_lr": best_lr,
            "initial_acc": curves[lrs[0]][0][1], "metric": metric, "format": format, "steps": steps,
            "n_train": len(train_texts), "n_heldout": len(heldout_questions)}
