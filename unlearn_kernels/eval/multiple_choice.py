"""Multiple-choice accuracy by choice log-likelihood (the lm-eval-harness protocol).

For a question q with choices c_1..c_k the model scores ``ℓ_i = Σ log p(c_i tokens | q)``;
``acc`` takes argmax_i ℓ_i, ``acc_norm`` takes argmax_i ℓ_i / len(c_i in characters).
The continuation is the choice preceded by one space, as lm-eval-harness does.
"""

from __future__ import annotations

from typing import Sequence

import torch


@torch.no_grad()
def choice_loglikelihoods(model, tokenizer, questions: Sequence, batch_size: int = 64) -> list[list[float]]:
    """``ℓ_i`` for every choice of every question (items with .question, .choices)."""
    pairs = [(q.question, " " + c) for q in questions for c in q.choices]
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        contexts = [tokenizer(c, add_special_tokens=False)["input_ids"] for c, _ in chunk]
        conts = [tokenizer(x, add_special_tokens=False)["input_ids"] for _, x in chunk]
        seqs = [a + b for a, b in zip(contexts, conts)]
        width = max(map(len, seqs))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = ids[:, 1:].to(device)
        token_lp = logprobs.gather(-1, targets[..., None])[..., 0]
        for i, (a, b) in enumerate(zip(contexts, conts)):
            scores.append(float(token_lp[i, len(a) - 1:len(a) + len(b) - 1].sum()))
    out, k = [], 0
    for q in questions:
        out.append(scores[k:k + len(q.choices)])
        k += len(q.choices)
    return out


def accuracy(model, tokenizer, questions: Sequence, normalize: bool = False, batch_size: int = 64) -> float:
    """Fraction of questions whose answer has the highest (length-normalised) log-likelihood."""
    if not questions:
        raise ValueError("questions is empty: nothing to evaluate")
    lls = choice_loglikelihoods(model, tokenizer, questions, batch_size)
    correct = 0
    for q, ll in zip(questions, lls):
        if normalize:
            ll = [v / max(1, len(c)) for v, c in zip(ll, q.choices)]
        correct += int(max(range(len(ll)), key=ll.__getitem__) == q.answer)
    return correct / len(questions)
