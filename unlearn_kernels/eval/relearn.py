"""Relearning attack (Deeb & Roger's RTT): is the forgotten knowledge gone, or only hidden?

A copy of the unlearned model is fine-tuned (all weights, AdamW, the causal-LM loss on every
non-padding token) on texts stating one part of the forget facts; the accuracy on questions
about the *held-out* part — facts the attack never shows — is measured along the way with the
lm-eval evaluator (:func:`~unlearn_kernels.eval.multiple_choice.evaluate_multiple_choice`).
Knowledge that was only suppressed comes back on those facts; knowledge that is gone comes
back no faster than in a model that never learned it. The attack runs at several learning
rates (RTT sweeps them, since the best one differs per model) and reports, per rate, the
curve ``[(step, acc)]`` and the highest held-out accuracy reached: the attacker's best.
"""

from __future__ import annotations

import copy
import random

import torch

from .multiple_choice import evaluate_multiple_choice

DEFAULT_LRS = (1e-5, 1e-4, 1e-3)


def relearn_curve(model, tokenizer, train_texts: list[str], heldout_questions, *, steps: int = 30,
                  every: int = 10, lr: float = 1e-3, batch_size: int = 8, seed: int = 0,
                  format: str = "cloze", metric: str = "acc") -> list[tuple[int, float]]:
    """``[(step, held-out accuracy)]`` from step 0 to ``steps`` every ``every`` steps, one lr;
    ``model`` itself is left untouched."""
    if not train_texts or not heldout_questions:
        raise ValueError("relearning needs attack texts and held-out questions")
    if steps < 0 or every < 1 or lr <= 0 or batch_size < 1:
        raise ValueError(f"relearning needs steps >= 0, every >= 1, lr > 0, batch_size >= 1 "
                         f"(got steps={steps}, every={every}, lr={lr}, batch_size={batch_size})")
    if metric not in ("acc", "acc_norm"):
        raise ValueError(f"metric must be 'acc' or 'acc_norm', got {metric!r}")

    def score(m) -> float:
        return evaluate_multiple_choice(m, tokenizer, heldout_questions, format=format, progress=False)[metric]

    attacked = copy.deepcopy(model)
    for p in attacked.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(attacked.parameters(), lr=lr)
    device = next(attacked.parameters()).device
    rng = random.Random(seed)
    torch.manual_seed(seed)
    curve = [(0, score(attacked))]
    for step in range(1, steps + 1):
        attacked.train()
        enc = tokenizer(rng.sample(train_texts, min(batch_size, len(train_texts))), return_tensors="pt",
                        padding=True).to(device)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = attacked(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"relearning loss is {float(loss)} at step {step} (lr {lr}): the model "
                                     "produces non-finite logits")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == steps:
            curve.append((step, score(attacked)))
    del attacked
    return curve


def relearn_attack(model, tokenizer, train_texts: list[str], heldout_questions, *, lrs=DEFAULT_LRS,
                   steps: int = 30, every: int = 10, batch_size: int = 8, seed: int = 0, format: str = "cloze",
                   metric: str = "acc") -> dict:
    """RTT at every learning rate in ``lrs``: ``{"curves": {lr: [(step, acc)]}, "max_acc",
    "best_lr", "initial_acc", "metric", "format", "steps", "n_train", "n_heldout"}``."""
    lrs = tuple(float(lr) for lr in lrs)
    if not lrs:
        raise ValueError("lrs is empty: give at least one learning rate")
    curves = {lr: relearn_curve(model, tokenizer, train_texts, heldout_questions, steps=steps, every=every, lr=lr,
                                batch_size=batch_size, seed=seed, format=format, metric=metric) for lr in lrs}
    best_lr = max(lrs, key=lambda lr: (max(a for _, a in curves[lr]), -lrs.index(lr)))
    return {"curves": curves, "max_acc": max(a for _, a in curves[best_lr]), "best_lr": best_lr,
            "initial_acc": curves[lrs[0]][0][1], "metric": metric, "format": format, "steps": steps,
            "n_train": len(train_texts), "n_heldout": len(heldout_questions)}
