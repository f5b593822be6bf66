"""Metrics of class-wise unlearning (the classifier track): output level, membership
inference, representation level and relearning.

Output level (``acc`` = top-1 accuracy of the model's own head, ``classifier.model.accuracy``,
which the training loop and the methods' stopping rule use too):
- ``UA = 1 − acc(forget training images)``, ``RA = acc(retain training images)``,
  ``TA = acc(test images of the retain classes)``; ``forget_acc = 1 − UA`` and
  ``test_forget_acc`` (test images of the forgotten classes) are kept too.

MIA-efficacy (the SalUn protocol, confidence attack): with ``conf(x) = p(y | x)``, an RBF SVM
(``SVC(C=3, gamma="auto")``) is fitted to tell *members* (a seeded random subset of the retain
training images, as many as there are non-members) from *non-members* (every test image, of
the retain and of the forgotten classes) by ``conf``; MIA-efficacy is the fraction of forget
training images it calls non-members (1: the forget set looks unseen). The forgotten classes'
test images are in the non-member set because a model with ~99 % test accuracy gives the
attack almost no low-confidence non-member otherwise, and the RBF SVM's answer far from its
data is then its intercept, not a measurement.

Representation level, on the frozen penultimate features ``f(x)``:
- linear probe (``eval.probe.linear_probe``, the LLM track's probe): a multinomial logistic
  regression on standardised features of the training images (retain and forget, true labels: the CMF paper's probe training set), scored on the
  forget set as in the paper, but cross-validated so that the probe never scores an image it
  was fitted on: the forget images are cut into ``probe_folds`` seeded folds, each scored by a
  probe fitted on every retain image and the other folds (``probe_forget_acc``, pooled over
  folds). ``probe_test_forget_acc``: the probe fitted on every training image, scored on the
  test images of the forgotten classes (seen by neither the model nor the probe);
- nearest class mean: the CMF cosine head built from the training features (true labels),
  scored on the forget images (``ncm_forget_acc``).

Relearning (``eval.attacks.finetune_curve``, the LLM track's attack loop): a copy of the model
is fine-tuned (Adam, every weight, full batches; a CMF head keeps its prototypes, which are
buffers) on ``relearn_samples`` forget training images with their true labels;
``relearn_acc`` is its accuracy on the held-out forget test images after ``relearn_steps``
steps (``relearn_curve`` along the way).

``add_gaps(rows, reference)`` adds ``|metric − metric(Retrain)|`` per row and their mean.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.class_split import ClassSplit
from ..errors import UserError
from ..models.cmf_head import CMFHead
from .attacks import finetune_curve
from .probe import linear_probe

GAP_METRICS = ("UA", "RA", "TA", "MIA", "probe_forget_acc", "ncm_forget_acc")



@torch.no_grad()
def batched(fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int = 512) -> Tensor:
    return torch.cat([fn(chunk) for chunk in x.split(batch_size)]) if len(x) else fn(x)


def _in_eval_mode(model: nn.Module, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``batched(fn, x)`` with ``model`` in eval mode, its mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        return batched(fn, x)
    finally:
        model.train(was_training)


def logits_of(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` in eval mode, without gradients, in batches."""
    return _in_eval_mode(model, model, x)


def features_of(model: nn.Module, x: Tensor) -> Tensor:
    """``model.features(x)`` in eval mode, without gradients, in batches."""
    return _in_eval_mode(model, model.features, x)


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy (nan for no samples)."""
    if len(y) == 0:
        return float("nan")
    return float((logits_of(model, x).argmax(-1) == y).float().mean())


def confidences(model, x: Tensor, y: Tensor) -> np.ndarray:
    """``p(y | x)`` per image."""
    probs = logits_of(model, x).float().softmax(-1)
    return probs.gather(1, y[:, None])[:, 0].numpy()


def svc_mia(member: np.ndarray, nonmember: np.ndarray, target: np.ndarray) -> float:
    """Fraction of ``target`` scores an RBF SVM, fitted on members (1) vs non-members (0),
    calls non-members."""
    from sklearn.svm import SVC

    if len(member) == 0 or len(nonmember) == 0 or len(target) == 0:
        raise UserError("svc_mia needs member, non-member and target scores")
    x = np.concatenate([member, nonmember]).reshape(-1, 1)
    labels = np.concatenate([np.ones(len(member)), np.zeros(len(nonmember))])
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, labels)
    return float((clf.predict(np.asarray(target).reshape(-1, 1)) == 0).mean())


def mia_efficacy(model, split: ClassSplit, seed: int = 0) -> float:
    """MIA-efficacy (module docstring): the share of forget images :func:`svc_mia` calls non-members."""
    (xr, yr), (xt, yt), (xf, yf) = split.retain, (split.x_test, split.y_test), split.forget
    n = min(len(yt), len(yr))
    pick = torch.randperm(len(yr), generator=torch.Generator().manual_seed(seed))[:n]
    return svc_mia(confidences(model, xr[pick], yr[pick]), confidences(model, xt, yt), confidences(model, xf, yf))


def fit_probe(train_features: Tensor, train_labels: Tensor, seed: int = 0):
    """The linear probe (``eval.probe.linear_probe``) on ``train_features`` in float64; returns
    ``accuracy(features, labels)`` (nan for no samples)."""
    predict = linear_probe(train_features.double().numpy(), train_labels.numpy(), seed)

    def score(features: Tensor, labels: Tensor) -> float:
        if len(labels) == 0:
            return float("nan")
        return float((predict(features.double().numpy()) == labels.numpy()).mean())

    return score


def ncm_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 num_classes: int) -> float:
    """Accuracy of the cosine nearest-centred-class-mean rule (the CMF head) built from the train features."""
    if len(test_labels) == 0:
        return float("nan")
    head = CMFHead(train_features.shape[1], num_classes).rebuild(train_features, train_labels)
    return float((head(test_features).argmax(-1) == test_labels).float().mean())


def relearn_curve(model, split: ClassSplit, *, samples: int = 16, steps: int = 20, lr: float = 1e-3,
                  every: int = 5, seed: int = 0) -> list[tuple[int, float]]:
    """``[(step, held-out forget accuracy)]`` while a copy relearns from ``samples`` forget images."""
    xf, yf = split.forget
    x_test, y_test = split.test_forget
    if samples < 1 or steps < 0:
        raise UserError(f"relearning needs samples >= 1 and steps >= 0, got {samples} and {steps}")
    pick = torch.randperm(len(yf), generator=torch.Generator().manual_seed(seed))[:samples]
    return finetune_curve(model, lambda attacked, step: F.cross_entropy(attacked(xf[pick]), yf[pick]),
                          lambda attacked: accuracy(attacked, x_test, y_test),
                          lambda params: torch.optim.Adam(params, lr=lr), steps=steps, every=every)


def cross_validated_probe(features: Tensor, labels: Tensor, held: Tensor, folds: int = 3, seed: int = 0) -> float:
    """Probe accuracy on the rows in ``held`` (bool mask), each fold scored by a probe fitted on
    every other row."""
    rows = held.nonzero().flatten()
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]
    correct = 0
    for part in rows.tensor_split(folds):
        train = torch.ones(len(labels), dtype=torch.bool)
        train[part] = False
        correct += fit_probe(features[train], labels[train], seed)(features[part], labels[part]) * len(part)
    return correct / len(rows)


def evaluate(model, split: ClassSplit, *, probe_folds: int = 3, relearn_samples: int = 16, relearn_steps: int = 20,
             seed: int = 0) -> dict:
    """Every metric of the module docstring for ``model`` on ``split``."""
    (xf, yf), (xr, yr), (xtr, ytr), (xtf, ytf) = split.forget, split.retain, split.test_retain, split.test_forget
    forget_acc = accuracy(model, xf, yf)
    features, is_forget = features_of(model, split.x_train), split.is_forget(split.y_train)
    curve = relearn_curve(model, split, samples=relearn_samples, steps=relearn_steps, seed=seed)
    return {
        "UA": 1.0 - forget_acc, "RA": accuracy(model, xr, yr), "TA": accuracy(model, xtr, ytr),
        "forget_acc": forget_acc, "test_forget_acc": accuracy(model, xtf, ytf),
        "MIA": mia_efficacy(model, split, seed),
        "probe_forget_acc": cross_validated_probe(features, split.y_train, is_forget, probe_folds, seed),
        "probe_test_forget_acc": fit_probe(features, split.y_train, seed)(features_of(model, xtf), ytf),
        "ncm_forget_acc": ncm_accuracy(features, split.y_train, features[is_forget], yf, split.num_classes),
        "relearn_acc": curve[-1][1], "relearn_curve": curve,
    }


def add_gaps(rows: list[dict], reference: dict) -> list[dict]:
    """Each row with ``gap_<metric> = |row − reference|`` and ``avg_gap`` over ``GAP_METRICS``."""
    out = []
    for row in rows:
        gaps = {f"gap_{m}": abs(row[m] - reference[m]) for m in GAP_METRICS}
        out.append({**row, **gaps, "avg_gap": sum(gaps.values()) / len(gaps)})
    return out
