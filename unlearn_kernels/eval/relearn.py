"""Relearning attack: is the forgotten knowledge gone, or only hidden?

A copy of the unlearned model is fine-tuned (all weights, AdamW) on the corpus of one part
of the forget facts; accuracy on the *held-out* part is measured along the way. Knowledge
that was only suppressed comes back on facts the attack never saw.
"""

from __future__ import annotations

import copy
import random

import torch

from .multiple_choice import accuracy


def relearn_curve(model, tokenizer, train_texts: list[str], heldout_questions, *, steps: int = 30,
                  every: int = 10, lr: float = 1e-3, batch_size: int = 8, seed: int = 0) -> list[tuple[int, float]]:
    """``[(step, held-out accuracy)]`` from step 0 to ``steps`` every ``every`` steps."""
    if not train_texts or not heldout_questions:
        raise ValueError("relearn_curve needs attack texts and held-out questions")
    attacked = copy.deepcopy(model).train()
    for p in attacked.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(attacked.parameters(), lr=lr)
    device = next(attacked.parameters()).device
    rng = random.Random(seed)
    curve = [(0, accuracy(attacked.eval(), tokenizer, heldout_questions))]
    for step in range(1, steps + 1):
        attacked.train()
        enc = tokenizer(rng.sample(train_texts, min(batch_size, len(train_texts))), return_tensors="pt",
                        padding=True).to(device)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = attacked(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == steps:
            curve.append((step, accuracy(attacked.eval(), tokenizer, heldout_questions)))
    return curve
