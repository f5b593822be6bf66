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

**Stopping on the training signal** (``--stop rule``; without validation questions a run is
target-driven on cloze probes by default, ``data.probes``) (``NLL_RULE``, ``unlearn_kernels.stopping``): on a fixed
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

How a log-likelihood is computed (:func:`target_logprobs`): with the loss positions
``S = {(i, t) : x_{i,t+1} is a loss token}`` (``loss_positions``), only the hidden states
``h_{i,t}, (i, t) ∈ S`` go through the LM head (a forward pre-hook on the model's output
embeddings gathers them to ``[1, |S|, d]``, so the model's own head code, soft-capping or
scaling included, runs on them), and per position

    log p(x_{t+1} | x_≤t) = z_{x_{t+1}} − logsumexp_v z_v        (z: the position's logits, fp32)
    ∂/∂z_v = [v = x_{t+1}] − softmax(z)_v

(``_TargetLogProb``: the head's output is ``[|S|, V]`` instead of ``[b, T, V]``, reduced in
fp32 row by row, and backward keeps only it, not a log-softmax of the whole vocabulary). The
means are over ``|S|`` as before (``distributed.global_mean`` weighs each rank by its ``|S|``);
padding and prompt positions never reach the head. A model whose head is not a module it calls
on ``[b, T, d]`` hidden states gets the same numbers from its full logits. NPO's reference pass
shares the decoder layers below the lowest updated weight with the live pass
(``models.layers.prefix_outputs``): they run once per batch.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from ..models.layers import FrozenCopy, layer_index_of, prefix_outputs, replayed
from ..stopping import StoppingRule
from . import distributed
from .base import MethodConfig, UnlearningMethod, model_inputs
from .settings import Count, NonNegative, Positive, config_dataclass
from .spec import Memory, MethodSpec


def loss_positions(batch) -> torch.Tensor:
    """``[b, T−1]`` bool: position ``t`` predicts a loss token ``x_{t+1}`` (non-padding, and an
    answer token when the batch has a ``loss_mask``)."""
    mask = batch["attention_mask"][:, 1:].bool()
    if batch.get("loss_mask") is not None:
        mask = mask & batch["loss_mask"][:, 1:].bool()
    return mask


def token_logprobs(logits: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(x_t | x_<t) ``[b, T−1]`` from full logits ``[b, T, V]`` and the mask of
    the targets that count (``loss_positions``). The losses here use :func:`target_logprobs`,
    which computes only the masked entries."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    target = batch["input_ids"][:, 1:]
    return logp.gather(-1, target[..., None])[..., 0], loss_positions(batch)


class _TargetLogProb(torch.autograd.Function):
    """``lp_i = z_{i,y_i} − logsumexp_v z_{i,v}`` on ``[n, V]`` logits ``z`` (any float dtype,
    reduced in fp32, or fp64 for fp64 logits), targets ``y`` ``[n]``;
    ``∂lp_i/∂z_{i,v} = [v = y_i] − softmax(z_i)_v``.

    Forward keeps only the logits (the head's own output) and the targets; backward forms
    ``g_i ([v = y_i] − softmax(z_i)_v)`` in one softmax pass. Under ``create_graph=True`` the
    backward is recorded in plain differentiable ops, so second derivatives are exact.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))
        ctx.save_for_backward(logits, target)
        return z.gather(-1, target[:, None])[:, 0] - torch.logsumexp(z, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, target = ctx.saved_tensors
        g = grad[:, None]
        probs = torch.softmax(logits, dim=-1, dtype=grad.dtype)
        if torch.is_grad_enabled():      # create_graph: keep the ops differentiable
            out = (-probs * g).scatter_add(-1, target[:, None], g)
        else:
            out = probs.mul_(-g).scatter_add_(-1, target[:, None], g)
        return out.to(logits.dtype), None


_FULL_LOGITS: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()   # models whose head output is not per row


@contextmanager
def _head_on_rows(model: torch.nn.Module, rows: torch.Tensor, seen: list):
    """Within the block the model's output embeddings see ``hidden[:, :-1][rows]`` as
    ``[1, n, d]`` instead of ``hidden`` ``[b, T, d]``; ``seen`` gets True when they did."""
    head = None if model in _FULL_LOGITS else getattr(model, "get_output_embeddings", lambda: None)()
    if not isinstance(head, torch.nn.Module):
        yield
        return

    def gather(_module, args):
        if len(args) != 1 or args[0].dim() != 3 or args[0].shape[:2] != (rows.shape[0], rows.shape[1] + 1):
            return None
        seen.append(True)
        return (args[0][:, :-1][rows][None],)

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def target_logprobs(model: torch.nn.Module, batch, forward=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(x_{t+1} | x_≤t)`` at the loss positions ``[n]`` (row-major order) and the
    position mask ``[b, T−1]`` they come from (``loss_positions``), computing the LM head and
    the log-normaliser at those ``n`` positions only (module docstring). ``forward`` calls the
    model (default ``model(**inputs, use_cache=False)``; NPO passes the frozen copy's)."""
    mask = loss_positions(batch)
    inputs = model_inputs(batch)
    call = forward or (lambda **kw: model(**kw, use_cache=False))
    target = batch["input_ids"][:, 1:][mask]
    seen: list = []
    with _head_on_rows(model, mask, seen):
        logits = call(**inputs).logits
    if seen and tuple(logits.shape[:2]) != (1, target.shape[0]):
        _FULL_LOGITS.add(model)      # the head's output was reshaped: use the full logits from now on
        logits = call(**inputs).logits
        seen = []
    rows = logits[0] if seen else logits[:, :-1][mask]
    return _TargetLogProb.apply(rows, target), mask


def nll(model, batch) -> torch.Tensor:
    """Mean NLL over the batch's loss tokens (the model sees only ``model_inputs(batch)``);
    distributed, this rank's share of the global batch's mean (``methods.distributed``)."""
    lp, mask = target_logprobs(model, batch)
    count = mask.sum()
    return distributed.global_mean(-lp.sum() / count.clamp(min=1), count)


@config_dataclass
class LossConfig(MethodConfig):
    retain_weight: Annotated[NonNegative, Field(description="γ: weight of the retain NLL")] = 1.0
    epochs: Annotated[Count, Field(description="passes over the forget set when steps is 0 (TOFU's 5)")] = 5


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
    spec = MethodSpec(config=LossConfig, length="epochs", knobs=("lr",), needs_retain=False,
                      memory=Memory(loss="head", updates="mlp", graphs=1),
                      refuses={"disruption_mask": "it has no retain loss to agree with"})

    def loss(self, forget_batch, retain_batch, step):
        return {"forget": -nll(self.model, forget_batch)}


class GradDiff(_LossMethod):
    """``L = −NLL(forget) + γ · NLL(retain)``."""

    name = "GradDiff"
    spec = MethodSpec(config=LossConfig, length="epochs", knobs=("lr",), memory=Memory(loss="head", updates="mlp"))

    def loss(self, forget_batch, retain_batch, step):
        return {**self.unlearn_loss(forget_batch, retain_batch, step),
                "retain": self.config.retain_weight * nll(self.model, retain_batch)}

    def unlearn_loss(self, forget_batch, retain_batch, step):
        return {"forget": -nll(self.model, forget_batch)}


@config_dataclass
class NPOConfig(LossConfig):
    beta: Annotated[Positive, Field(description="NPO's inverse temperature")] = 0.1


class NPO(_LossMethod):
    """Negative preference optimisation against the frozen reference (+ retain NLL)."""

    name = "NPO"
    spec = MethodSpec(config=NPOConfig, length="epochs", knobs=("lr",),
                      memory=Memory(loss="head", updates="mlp", frozen_copy=True, reference_pass=True))

    def setup(self, forget, retain):
        self.reference = FrozenCopy(self.model, self.params)
        indices = [layer_index_of(self.model, name) for name in self.params]
        # decoder layers 0 … k−1 below the lowest updated one: the same function live and frozen
        self._prefix = 0 if not indices or any(i is None for i in indices) else min(indices)

    def loss(self, forget_batch, retain_batch, step):
        losses = self.unlearn_loss(forget_batch, retain_batch, step)
        if self.config.retain_weight:
            losses["retain"] = self.config.retain_weight * nll(self.model, retain_batch)
        return losses

    def unlearn_loss(self, forget_batch, retain_batch, step):
        ids, attention = forget_batch["input_ids"], forget_batch["attention_mask"]
        with replayed(self.model, prefix_outputs(self.model, self._prefix, ids, attention)):
            lp, mask = target_logprobs(self.model, forget_batch)
            ref, _ = target_logprobs(self.model, forget_batch, self.reference.forward)
        rows = mask.nonzero()[:, 0]
        log_ratio = torch.zeros(mask.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp - ref)
        npo = -(2 / self.config.beta) * F.logsigmoid(-self.config.beta * log_ratio).mean()
        return {"forget": distributed.global_mean(npo, log_ratio.shape[0])}
