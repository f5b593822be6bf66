"""Loss-based LLM unlearning baselines: GradAscent, GradDiff and NPO.

With ``NLL(x) = −(1/|x|) Σ_t log p_θ(x_t | x_<t)`` over the loss tokens ``x`` (every
non-padding token of a text; only the answer tokens of a ``QAPair``, marked by the batch's
``loss_mask``):

- GradAscent: ``L = −NLL(forget)`` (maximise the forget loss).
- GradDiff:   ``L = −NLL(forget) + γ · NLL(retain)``.
- NPO (Zhang et al., 2024): with sequence log-likelihoods ``ℓ_θ(x)`` and the frozen
  reference ``ℓ_ref(x)``, ``L = −(2/β) · mean_x log σ(−β (ℓ_θ(x) − ℓ_ref(x))) + γ · NLL(retain)``
  (the NPO+RT form; ``γ = 0`` gives plain NPO). The reference shares every weight but the
  updated ones (``FrozenCopy``).

**Stopping without validation questions** (``NLL_RULE``, ``unlearn_kernels.stopping``): on a fixed
forget and retain probe batch, measured 240 times over the budget (these methods move fast), the
run stops when the forget NLL has risen by at least 1 nat per token over the starting model's
while the retain NLL rose by at most 25 % of its starting value. The forget rise is a change of
log-likelihood per token, which means the same whatever the model's size or vocabulary: every
forget token e times less likely on average. The retain limit is relative because the same
absolute rise is harmless on a model whose retain NLL is high and ruinous on one that has
memorised its retain facts (on the zoo's NeoX 8x64, retain NLL 0.76 → 1.18, +0.41 nat, took
retain accuracy from 0.99 to 0.59; on the shipped model +0.43 nat from 1.19 kept 0.95).

Published setups update all weights on 7B models; the default here updates the MLPs of the
band RMU reads (``models.roles``: layers ``l−2 … l`` with ``l = max(2, round(7/32 · depth))``)
at ``1e-5 · 4096 / hidden``, which forgets on small models without rewriting the embeddings
and the head; ``update=["*"]`` selects everything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.layers import FrozenCopy
from ..stopping import StoppingRule
from . import distributed
from .base import MethodConfig, UnlearningMethod, model_inputs


def token_logprobs(logits: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(x_t | x_<t) ``[b, T−1]`` and the mask of the targets that count:
    non-padding, and answer tokens only when the batch has a ``loss_mask`` (QA pairs)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    target = batch["input_ids"][:, 1:]
    mask = batch["attention_mask"][:, 1:].bool()
    if batch.get("loss_mask") is not None:
        mask = mask & batch["loss_mask"][:, 1:].bool()
    return logp.gather(-1, target[..., None])[..., 0], mask


def nll(model, batch) -> torch.Tensor:
    """Mean NLL over the batch's loss tokens (the model sees only ``model_inputs(batch)``);
    distributed, this rank's share of the global batch's mean (``methods.distributed``)."""
    lp, mask = token_logprobs(model(**model_inputs(batch), use_cache=False).logits, batch)
    return distributed.global_mean(-(lp * mask).sum() / mask.sum().clamp(min=1), mask.sum())


@dataclass
class LossConfig(MethodConfig):
    retain_weight: float = 1.0   # γ: weight of the retain NLL
    epochs: int = 5           # passes over the forget set when steps is 0 (TOFU's 5)


# Validation-free stopping (``unlearn_kernels.stopping``): the forget NLL up by at least 1 nat per
# token (each forget token e times less likely) while the retain NLL rose by at most 25 %.
NLL_RULE = StoppingRule(remaining="forget_nll", done_at=-1.0, drift="retain_nll", drift_limit=0.25,
                        relative=True, rises=True, drift_share=True, measures=240)


class _LossMethod(UnlearningMethod):
    reference_lr = 1e-5       # TOFU/NPO's 7B fine-tuning rate (AdamW)
    stopping_rule = NLL_RULE

    @torch.no_grad()
    def stopping_signal(self, forget_batch, retain_batch) -> dict:
        """Mean NLL (nats per loss token) of the model on the forget and retain probe batches;
        the rule (``unlearn_kernels.stopping``) reads their change from the start."""
        signal = {"forget_nll": float(nll(self.model, forget_batch))}
        signal["retain_nll"] = float(nll(self.model, retain_batch)) if retain_batch is not None else 0.0
        return signal


class GradAscent(_LossMethod):
    """``L = −NLL(forget)``."""

    name = "GradAscent"
    config_class = LossConfig
    needs_retain = False

    def loss(self, forget_batch, retain_batch, step):
        return {"forget": -nll(self.model, forget_batch)}


class GradDiff(_LossMethod):
    """``L = −NLL(forget) + γ · NLL(retain)``."""

    name = "GradDiff"
    config_class = LossConfig

    def loss(self, forget_batch, retain_batch, step):
        return {"forget": -nll(self.model, forget_batch),
                "retain": self.config.retain_weight * nll(self.model, retain_batch)}


@dataclass
class NPOConfig(LossConfig):
    beta: float = 0.1          # NPO's inverse temperature


class NPO(_LossMethod):
    """Negative preference optimisation against the frozen reference (+ retain NLL)."""

    name = "NPO"
    config_class = NPOConfig

    def setup(self, forget, retain):
        self.reference = FrozenCopy(self.model, self.params)

    def loss(self, forget_batch, retain_batch, step):
        inputs = model_inputs(forget_batch)
        lp, mask = token_logprobs(self.model(**inputs, use_cache=False).logits, forget_batch)
        ref, _ = token_logprobs(self.reference.forward(**inputs).logits, forget_batch)
        log_ratio = ((lp - ref) * mask).sum(-1)
        npo = -(2 / self.config.beta) * F.logsigmoid(-self.config.beta * log_ratio).mean()
        losses = {"forget": distributed.global_mean(npo, log_ratio.shape[0])}
        if self.config.retain_weight:
            losses["retain"] = self.config.retain_weight * nll(self.model, retain_batch)
        return losses
