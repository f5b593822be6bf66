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
attack texts are tokenised once (the tokenizer's default special tokens) and padded on the
right per batch, and the held-out questions are tokenised once for every checkpoint.

The loop itself, :func:`attack_curve`, is the classifier track's relearning attack too
(``eval.classifier.relearn_curve``): only the loss and the measurement differ.
"""

from __future__ import annotations

import copy
import random

import torch

from ..errors import UserError
from . import scores
from .multiple_choice import pad_rows

DEFAULT_LRS = (1e-5, 1e-4, 1e-3)


def _check_attack(train_texts, heldout_questions, steps, every, lrs, batch_size, metric) -> None:
    if isinstance(train_texts, str) or not train_texts or not heldout_questions:
        raise UserError("relearning needs a list of attack texts and held-out questions")
    if steps < 0 or every < 1 or batch_size < 1 or not all(lr > 0 for lr in lrs):
        raise UserError(f"relearning needs steps >= 0, every >= 1, lr > 0, batch_size >= 1 "
                        f"(got steps={steps}, every={every}, lrs={lrs}, batch_size={batch_size})")
    if metric not in ("acc", "acc_norm"):
        raise UserError(f"metric must be 'acc' or 'acc_norm', got {metric!r}")


def _batch(rows: list[list[int]], pad: int, device) -> dict:
    ids, mask = pad_rows(rows, pad, device)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


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
    _check_attack(train_texts, heldout_questions, steps, every, lrs, batch_size, metric)
    if tokenizer.pad_token_id is None:
        raise UserError("the tokenizer has no pad token: the attack pads its batches")
    heldout = scores.prepare(tokenizer, heldout_questions, format)
    rows = [list(ids) for ids in tokenizer(list(train_texts))["input_ids"]]
    device = next(model.parameters()).device

    def accuracy(m) -> float:
        return float(scores.score(m, tokenizer, heldout)[metric].mean())

    initial = accuracy(model)
    curves = {}
    for lr in lrs:
        rng = random.Random(seed)
        torch.manual_seed(seed)

        def loss_at(attacked, step):
            picked = rng.sample(range(len(rows)), min(batch_size, len(rows)))
            return attacked(**_batch([rows[i] for i in picked], tokenizer.pad_token_id, device)).loss

        curves[lr] = attack_curve(model, loss_at, accuracy, lambda params: torch.optim.AdamW(params, lr=lr),
                                  steps=steps, every=every, initial=initial, where=f" (lr {lr})")
    return curves


def attack_curve(model, loss_at, measure, optimizer, *, steps: int, every: int, initial: float | None = None,
                 where: str = "") -> list[tuple[int, float]]:
    """The attack loop every relearning metric shares (LLM and classifier): a deep copy of
    ``model``, every weight trainable, takes ``steps`` steps of ``loss_at(copy, step)`` (in train
    mode) with ``optimizer(parameters)``; returns ``[(step, measure(copy))]`` at step 0
    (``initial`` when given), every ``every`` steps and at ``steps``. A non-finite loss raises
    FloatingPointError naming the step (and ``where``). ``model`` itself is left untouched."""
    attacked = copy.deepcopy(model)
    for p in attacked.parameters():
        p.requires_grad_(True)
    opt = optimizer(attacked.parameters())
    curve = [(0, measure(attacked) if initial is None else initial)]
    for step in range(1, steps + 1):
        attacked.train()
        loss = loss_at(attacked, step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"relearning loss is {float(loss.detach())} at step {step}{where}: the model "
                                     "produces non-finite logits")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            curve.append((step, measure(attacked)))
    return curve


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
