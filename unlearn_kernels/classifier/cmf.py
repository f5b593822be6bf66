"""CMF: a class-mean-feature cosine head (``model.CMFHead``), so that unlearning has to move the features.

With penultimate features ``z`` normalised to ``ẑ = z / ‖z‖``, class means (``ops.class_means``)
``m_c = mean_{y_t = c} ẑ_t`` and a centre ``μ``::

    W_c = normalize(m_c − μ)                     (the head, [C, d]; no trainable parameter)
    logits(z) = τ · normalize(ẑ − μ) · Wᵀ        (cosine to each centred class mean, scaled by τ)

``μ`` is the mean of the non-empty class means (``center="classes"``, the centre of the
neural-collapse simplex, independent of class sizes) or of all samples (``"samples"``).
A class without samples gets logit ``−τ`` (never above a present class).

The head is rebuilt from the current features at the start and after every epoch and held
fixed in between (no gradient flows into ``W`` or ``μ``). A linear head can make forget
samples "not class c" by turning its own weights away from features that stay where they
were (feature–classifier misalignment: a linear probe still decodes the class). With CMF the
class-c weight *is* the (centred) mean of the class-c features, so lowering forget accuracy
forces the features themselves to leave their cluster.

CMF-RL and CMF-NegGrad+ are RL (``CE(R ∪ F)`` with random retain-class labels on the forget
images) and NegGrad+ (``β·CE(R) − (1 − β)·CE(F)``) with every cross-entropy computed through
this head; only the feature extractor has parameters to move. Through the head the forget
cross-entropy is bounded (``≤ 2τ + log C``), so NegGrad+ cannot diverge the way it can with
a linear head, and its default ``β`` is 0.9 instead of 0.99.

Choices the paper leaves open (config fields):
- ``head_data="all"``: the head is rebuilt from retain **and** forget training images with their
  true labels, so the forgotten class keeps a prototype that follows its own samples (with
  ``"retain"`` the forgotten classes have no prototype: their logits sit at ``−τ`` and the
  output forgets instantly while the features stay, the misalignment CMF is meant to exclude);
- ``tau=16`` (cosine logits lie in ``[−τ, τ]``); ``center="classes"`` (a method's ``tau`` /
  ``center`` override those of a model that already has a CMF head);
- a linear-head model is first switched to CMF by :func:`to_cmf` (``convert_epochs`` of
  cross-entropy on the full training set with the head fixed) unless it already has one.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from torch import Tensor

from ..data.class_split import ClassSplit
from ..eval.classifier import features_of
from ..methods.settings import Auto, NonNegativeInt, Positive, Share, config_dataclass
from ..models.cmf_head import CENTERS, CMFHead
from .methods import NegGradPlus, NegGradPlusConfig, RandomLabel, RandomLabelConfig
from .model import SmallCNN, train_supervised


def rebuild_cmf_head(model: SmallCNN, x: Tensor, y: Tensor) -> CMFHead:
    """Rebuild ``model.head`` (a CMFHead) from the model's current features of ``x``."""
    if not isinstance(model.head, CMFHead):
        raise TypeError(f"model.head must be a CMFHead, got {type(model.head).__name__}")
    return model.head.rebuild(features_of(model, x), y)


def to_cmf(model: SmallCNN, x: Tensor, y: Tensor, *, epochs: int = 3, lr: float = 1e-3, tau: float = 16.0,
           center: str = "classes", batch_size: int = 64, seed: int = 0, progress: bool = True) -> list[dict]:
    """Switch ``model`` to a CMF head built from ``(x, y)`` and fine-tune its features with the
    head fixed (rebuilt at the start and after every epoch); ``epochs=0`` only swaps the head.
    Returns the loss log."""
    model.head = CMFHead(model.feature_dim, model.num_classes, tau=tau, center=center).to(x.device)
    if epochs == 0:
        rebuild_cmf_head(model, x, y)
        return []
    return train_supervised(model, x, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                            progress=progress, desc="switching to a CMF head",
                            refresh=lambda: rebuild_cmf_head(model, x, y))


@config_dataclass
class CMFOptions:
    """The CMF variants' own settings (module docstring)."""

    tau: Annotated[Auto[Positive], Field(description=(
        "cosine-logit scale; None: keep the head's (16 when converting a linear-head model)"))] = None
    center: Annotated[Auto[Literal[CENTERS]], Field(description=(
        "centre of the class means; None: keep the head's (classes when converting)"))] = None
    head_data: Annotated[Literal["all", "retain"], Field(description=(
        "images the head is rebuilt from: all (retain + forget, true labels) or retain only"))] = "all"
    convert_epochs: Annotated[NonNegativeInt, Field(description=(
        "to_cmf epochs when the model still has a linear head"))] = 3


class CMFMixin:
    """Makes a method compute its losses through a CMF head rebuilt every epoch."""

    def setup(self, split: ClassSplit) -> None:
        self._head_data = split.retain if self.config.head_data == "retain" else (split.x_train, split.y_train)
        c = self.config
        if not isinstance(self.model.head, CMFHead):
            self.converted = to_cmf(self.model, split.x_train, split.y_train, epochs=c.convert_epochs,
                                    tau=c.tau or 16.0, center=c.center or "classes", seed=c.seed,
                                    progress=c.progress)
            self.model.train()
        if c.tau is not None:
            self.model.head.tau = float(c.tau)
        if c.center is not None:
            self.model.head.center_mode = c.center
        super().setup(split)
        self.rebuild()

    def rebuild(self) -> None:
        rebuild_cmf_head(self.model, *self._head_data)

    def end_epoch(self, epoch: int) -> None:
        super().end_epoch(epoch)
        self.rebuild()


@config_dataclass
class CMFRandomLabelConfig(RandomLabelConfig, CMFOptions):
    pass


@config_dataclass
class CMFNegGradPlusConfig(NegGradPlusConfig, CMFOptions):
    beta: Annotated[Share, Field(description=(
        "weight of the retain loss; 1 - beta on the forget loss, bounded through the CMF head "
        "(logits in [-tau, tau]), so it may weigh more than with a linear head"))] = 0.9


class CMFRandomLabel(CMFMixin, RandomLabel):
    """Random-label unlearning through a CMF head (see the module docstring and ``RandomLabel``)."""

    name = "CMF-RL"
    config_class = CMFRandomLabelConfig


class CMFNegGradPlus(CMFMixin, NegGradPlus):
    """NegGrad+ through a CMF head (see the module docstring and ``NegGradPlus``)."""

    name = "CMF-NegGrad+"
    config_class = CMFNegGradPlusConfig
