"""Linear probes on layer-l activations: is the forgotten answer still linearly decodable?

For each question, the feature is the layer-l residual stream at the last token of the
question's evaluation context — lm-eval's cloze prompt ``Question: {q}\nAnswer:`` encoded with
its BOS rule (:func:`~unlearn_kernels.eval.multiple_choice.encode_many`), i.e. exactly where the
evaluator reads the answer's first-token distribution. Per attribute, a multinomial logistic
regression is fitted on questions whose facts the model is meant to *keep* knowing and
scored on the forget questions. A model that hid the answer only at the output keeps a high
probe accuracy; one whose representations no longer carry it drops to chance.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from ..errors import UserError
from ..models.layers import layer_output
from .multiple_choice import encode_many, pad_rows
from ..data.prompts import cloze_context


@torch.no_grad()
def question_features(model, tokenizer, questions, layer: int, batch_size: int = 64) -> np.ndarray:
    """``[n, d]`` layer-``layer`` activations at the last context token of each question."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = encode_many(tokenizer, [cloze_context(q.question) for q in questions])
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids, mask = pad_rows(chunk, pad, device)
        h = layer_output(model, layer, ids, mask).float()
        last = torch.tensor([len(r) - 1 for r in chunk], device=device)
        out.append(h[torch.arange(len(chunk), device=device), last].cpu().numpy())
    return np.concatenate(out)


def linear_probe(x_train: np.ndarray, labels, seed: int = 0):
    """The linear probe of both tracks: a multinomial logistic regression (``max_iter=2000``,
    seeded) on ``x_train`` standardised per feature by its training mean and std + 1e-6;
    returns ``predict(x)``, which standardises ``x`` the same way."""
    from sklearn.linear_model import LogisticRegression

    mean, scale = x_train.mean(0), x_train.std(0) + 1e-6
    clf = LogisticRegression(max_iter=2000, random_state=seed).fit((x_train - mean) / scale, labels)
    return lambda x: clf.predict((x - mean) / scale)


def probe_accuracy(model, tokenizer, train_questions, test_questions, layer: int, seed: int = 0) -> float:
    """Accuracy of per-attribute linear probes (:func:`linear_probe`) fitted on ``train_questions``,
    on ``test_questions``."""
    if not train_questions or not test_questions:
        raise UserError("probe_accuracy needs training and test questions")
    groups = defaultdict(lambda: ([], []))
    for split, qs in ((0, train_questions), (1, test_questions)):
        for q in qs:
            groups[q.fact.attribute][split].append(q)
    correct = total = 0
    for attribute, (train, test) in groups.items():
        if not test:
            continue
        if len({q.fact.value for q in train}) < 2:
            raise UserError(f"probe for {attribute!r} has fewer than two answer classes to learn from")
        x_train = question_features(model, tokenizer, train, layer)
        x_test = question_features(model, tokenizer, test, layer)
        pred = linear_probe(x_train, [q.fact.value for q in train], seed)(x_test)
        correct += int(sum(p == q.fact.value for p, q in zip(pred, test)))
        total += len(test)
    return correct / total
