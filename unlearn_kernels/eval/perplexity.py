"""Perplexity ``exp(mean token NLL)`` of a model on texts (padding excluded)."""

from __future__ import annotations

import math

import torch

from ..errors import UserError


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], batch_size: int = 32) -> float:
    if not texts:
        raise UserError("perplexity needs at least one text")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True).to(device)
        logits = model(**enc, use_cache=False).logits[:, :-1].float()
        target = enc["input_ids"][:, 1:]
        mask = enc["attention_mask"][:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        total += float(nll[mask].sum())
        count += int(mask.sum())
    return math.exp(total / max(count, 1))
