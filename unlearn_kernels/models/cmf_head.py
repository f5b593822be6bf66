"""The CMF head: a cosine nearest-class-mean classifier head built from features.

For features ``z`` (``[n, d]``) and labels, ``rebuild`` sets, with ``u = z / ‖z‖``, the class
means ``μ_c`` of ``u`` (``ops.class_means``), the centre ``m`` (the mean of the present
classes' means, or of all samples with ``center="samples"``) and the weights
``w_c = (μ_c − m) / ‖μ_c − m‖`` (0 for a class with no sample); then

    logits_c(z) = τ · ⟨(u − m) / ‖u − m‖, w_c⟩        (−τ for a class with no sample)

It lives here, below the evaluation code, because both the classifier track's model
(``classifier.model``) and its nearest-class-mean metric (``eval.classifier``) build it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..ops import class_means

CENTERS = ("classes", "samples")


class CMFHead(nn.Module):
    """Cosine nearest-class-mean head; ``rebuild(features, labels)`` sets it from data."""

    def __init__(self, feature_dim: int, num_classes: int, tau: float = 16.0, center: str = "classes"):
        super().__init__()
        if not tau > 0:
            raise UserError(f"tau must be > 0, got {tau}")
        if center not in CENTERS:
            raise UserError(f"center must be one of {CENTERS}, got {center!r}")
        self.tau, self.center_mode, self.num_classes = float(tau), center, num_classes
        self.register_buffer("weight", torch.zeros(num_classes, feature_dim))
        self.register_buffer("center", torch.zeros(feature_dim))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.int64))

    @torch.no_grad()
    def rebuild(self, features: Tensor, labels: Tensor) -> "CMFHead":
        unit = F.normalize(features.detach().float(), dim=-1)
        means, counts = class_means(unit, labels, self.num_classes)
        present = counts > 0
        center = means[present].mean(0) if self.center_mode == "classes" else unit.mean(0)
        self.weight.copy_(F.normalize(means - center, dim=-1) * present[:, None])
        self.center.copy_(center)
        self.counts.copy_(counts)
        return self

    def forward(self, z: Tensor) -> Tensor:
        direction = F.normalize(F.normalize(z, dim=-1) - self.center, dim=-1)
        logits = self.tau * direction @ self.weight.T
        return logits.masked_fill(self.counts == 0, -self.tau)

    def extra_repr(self) -> str:
        return f"classes={self.num_classes}, tau={self.tau}, center={self.center_mode!r}"
