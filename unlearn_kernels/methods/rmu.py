"""Representation misdirection: RMU, Adaptive RMU and SRMU.

RMU (Li et al., 2024, WMDP). With ``h`` the residual stream after layer ``l`` of the model
being updated, ``h₀`` that of the frozen model, ``u ~ U[0,1)^d`` normalised and fixed::

    L = mean_t ‖h_f − c·u‖² / d  +  α · mean_t ‖h_r − h₀_r‖² / d

on forget (f) and retain (r) tokens, updating only a few MLP down-projections at and below
``l`` (published 7B defaults: l = 7, layers 5–7, c = 6.5, α = 1200, lr 5e-5, batch 4, 512
tokens; here ``l`` and the band are fractions of depth and lr scales as 4096 / hidden size,
see ``models.roles`` and ``MethodConfig``). Padding tokens are masked out (the reference script averages over them too).

Adaptive RMU (Dang et al., 2025): ``c = β · mean_t ‖h_f‖`` measured on the first forget
batch with the unmodified model, so the target scales with the layer's activations.

SRMU (selective RMU): a per-feature importance map ``m = feature_importance(M_f, M_r,
sparsity)`` from masked moments of layer-l activations on the forget and retain sets
(computed once, on the unmodified model) restricts the misdirection to the features that
separate forget from retain; elsewhere forget activations are anchored to the frozen model::

    L_f = mean_t Σ_j [ m_j (h_f − c·u)_j² + (1 − m_j)(h_f − h₀_f)_j² ] / d

which leaves the features that forget and retain text share (entangled knowledge) in place.
Choices the paper leaves open, taken here: a Fisher separability score, a soft top-k mask
in log-score space (``sparsity``, ``temperature``) and an adaptive ``c`` (``beta``).
``anchor_forget=False`` (the default) drops the anchor term on forget tokens (the
unselected features then drift freely, as in RMU): on the earlier embedded 4-layer model the
anchor kept too much of the answer (forget accuracy 0.63 vs 0.28 at 25 % overlap).

Defaults (none of them needs setting): the loss layer is a fraction of depth and the update
band its MLP down-projections and those of the two layers below (``models.roles``); lr is the
7B rate scaled by 4096 / hidden; RMU's c is 5 × the mean forget-activation norm when not given
(the published c is per model: 6.5 for Zephyr-7B, 300 for Mixtral-8x7B); α = 100 and 150 steps
(WMDP's batch budget). Chosen on the embedded model and checked on 6-, 12- and 32-layer ones
(``benchmarks/defaults_by_depth.py``, table in ``benchmarks/RESULTS.md``; the 4-layer
word-level model of that time): the published α = 1200 left forget accuracy at 1.00 there at
every c and lr tried; α = 100 forgets (RMU 0.52, SRMU 0.70 at 25 % overlap, chance 0.25) with
retain accuracy 1.00.

**Stopping on the training signal** (``--stop rule``; without validation questions a run is
target-driven on cloze probes by default, ``data.probes``) (``RMU_RULE``, ``unlearn_kernels.stopping``). The
run measures, on a fixed forget and retain probe batch, the *residual* ρ — the distance of the
forget activations from ``c·u`` in units of ``‖c·u‖`` (≈ 1.02 at the start with c = 5‖h‖; 0 when
every forget token sits on the control vector) — and the retain activations' *drift* δ, their
mean distance from the frozen model's relative to its norm. It stops when ρ ≤ 0.6 with
δ ≤ 0.25. Both are ratios of activations at one layer, so no width, depth, activation scale or
tokenizer enters them; at ρ = 0.6 the component of the forget activations along ``u`` is at
least about twice their original norm, which is what the layers above then read. Measured with
the validation questions beside it (``benchmarks/calibrate_signals.py``): on the shipped model
forget accuracy was 0.29–0.31 (chance 0.25) when ρ crossed 0.6, on SmolLM2-135M 0.24–0.29, with
δ ≤ 0.10 on both (``benchmarks/RESULTS.md``, "Validation-free stopping"). The controller raises
the learning rate when ρ stalls and lets the run go on to 4 × its length.

Measured against the retrained oracle on the shipped 6-layer benchmark (the demo, 30 %
overlap, layer 3, updating the MLPs of layers 1–3), SRMU's selectivity does not show as an
advantage: at c = 100 / 300 RMU reaches forget 0.278 / 0.267 at retain 0.994 / 0.958, SRMU at
β = 10 / 20 forget 0.283 / 0.311 at retain 0.994 / 0.907 (shared-entity retain 0.98 / 0.87
against RMU's 1.00 / 0.98), and both leave the knowledge recoverable (61–65 % of it comes back
under the relearning attack). ``demo --full`` gives the curves at 0–30 % overlap.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

import torch
from pydantic import Field

from ..models.layers import FrozenCopy, layer_index_of, layer_output, prefix_outputs, replayed
from ..ops import Moments, feature_importance, masked_moments, misdirection_loss
from . import distributed
from ..stopping import StoppingRule
from .base import MethodConfig, UnlearningMethod
from .settings import Auto, Count, Fraction, Integer, NonNegative, NonNegativeInt, Positive, config_dataclass
from .spec import Memory, MethodSpec


@config_dataclass
class RMUConfig(MethodConfig):
    layer: Annotated[Auto[Integer], Field(description=(
        "decoder layer whose output the loss reads; auto: max(2, round(7/32 · depth))"))] = None
    steering: Annotated[Auto[Positive], Field(description=(
        "c; auto: 5 x mean ‖h_forget‖ at the layer (published: 6.5 Zephyr-7B, 300 Mixtral)"))] = None
    alpha: Annotated[NonNegative, Field(description=(
        "retain weight (published 1200 at 7B stops all forgetting on small models)"))] = 100.0
    steps: Annotated[NonNegativeInt, Field(description="optimizer steps (WMDP's max_num_batches)")] = 150
    share_prefix: Annotated[bool, Field(description=(
        "run the layers below the lowest updated one once per batch, for the live and frozen passes"))] = True


AUTO_STEERING = 5.0   # c = 5 · mean ‖h_forget‖ when steering is auto (Adaptive RMU's β = 5 rule, once)
# Validation-free stopping (``unlearn_kernels.stopping``): the forget activations within 0.6 of the
# control vector's length from it, the retain activations moved by at most 25 % of their norm.
RMU_RULE = StoppingRule(remaining="residual", done_at=0.6, drift="retain_drift", drift_limit=0.25)


# The RMU family's retain loss is the distance to the frozen model: 0, with a 0 gradient, at the
# start, so no weight's gradients would agree in sign and a disruption-masked run would never move.
NO_MASK = "its retain loss, the distance to the frozen model, is 0 with a 0 gradient at the start: nothing would agree"


class RMU(UnlearningMethod):
    """RMU: push forget activations at layer l to ``c·u``, keep retain activations (see module)."""

    name = "RMU"
    spec = MethodSpec(config=RMUConfig, length="steps", knobs=("lr",), prefix="auto",   # runs layers 0..l only
                      memory=Memory(loss="layer", updates="down", frozen_copy=True),
                      refuses={"disruption_mask": NO_MASK})
    reads_layer = True
    default_roles = ("down",)     # the MLP output projections of the loss layer and the two below
    reference_lr = 5e-5       # WMDP's RMU rate at 7B
    stopping_rule = RMU_RULE

    @torch.no_grad()
    def control_scale(self, forget_batch) -> float:
        if self.config.steering is not None:
            return self.config.steering
        return AUTO_STEERING * self._forget_norm(forget_batch)

    def _forget_norm(self, forget_batch) -> float:
        """Mean ‖h‖ of the forget tokens at the loss layer, on the unmodified model."""
        h = self.frozen_activations(forget_batch).float()
        norms = h[forget_batch["attention_mask"].bool()].norm(dim=-1)
        return float(distributed.total(norms.double().sum()) / distributed.total(torch.tensor(norms.numel(), device=h.device)).clamp(min=1))

    def setup(self, forget, retain):
        d = self.model.config.hidden_size
        generator = torch.Generator().manual_seed(self.config.seed)
        u = torch.rand(d, generator=generator)
        self.direction = (u / u.norm()).to(next(self.model.parameters()).device)
        self.frozen = FrozenCopy(self.model, self.params)
        self._prefix = self.shared_prefix()
        self.control = self.control_scale(next(self.batches(forget, 7))) * self.direction

    def activations(self, batch):
        return layer_output(self.model, self.config.layer, batch["input_ids"], batch["attention_mask"])

    def shared_prefix(self) -> int:
        """Decoder layers ``0 … k−1`` below the lowest updated one, where the live and the frozen
        model are the same function (0 when a weight outside the layers, e.g. the embedding, is
        updated, or with ``share_prefix=False``)."""
        if not self.config.share_prefix or not self.params:
            return 0
        indices = [layer_index_of(self.model, name) for name in self.params]
        return 0 if any(i is None for i in indices) else min(indices)

    def live_and_frozen(self, batch, frozen: bool = True):
        """Layer-l activations of the live model (with a graph) and, if asked, of the frozen one.
        The layers below the lowest updated one run once, without a graph, and both passes
        branch above them (identical results to two full passes, less work and memory; with
        dropout active both passes see the prefix's one dropout draw)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with replayed(self.model, prefix_outputs(self.model, self._prefix, ids, mask)):
            anchor = self.frozen_activations(batch) if frozen else None
            return self.activations(batch), anchor

    @staticmethod
    def batch_mean(loss, batch):
        """A token mean of this rank's rows as its share of the global batch's token mean
        (``methods.distributed``; the mean itself in one process)."""
        return distributed.global_mean(loss, batch["attention_mask"].sum())

    def frozen_activations(self, batch):
        return self.frozen.layer_output(self.config.layer, batch["input_ids"], batch["attention_mask"])

    def forget_loss(self, batch):
        live, _ = self.live_and_frozen(batch, frozen=False)
        return self.batch_mean(misdirection_loss(live, self.control, token_mask=batch["attention_mask"],
                                                 backend=self.config.backend), batch)

    def loss(self, forget_batch, retain_batch, step):
        live, anchor = self.live_and_frozen(retain_batch)
        retain = self.batch_mean(misdirection_loss(live, anchor=anchor, token_mask=retain_batch["attention_mask"],
                                                   backend=self.config.backend), retain_batch)
        return {"forget": self.forget_loss(forget_batch), "retain": self.config.alpha * retain}

    def unlearn_loss(self, forget_batch, retain_batch, step):
        return {"forget": self.forget_loss(forget_batch)}

    def feature_weights(self):
        """Weights ``m`` of the features the forget term misdirects (all ones for RMU)."""
        return None

    @torch.no_grad()
    def stopping_signal(self, forget_batch, retain_batch) -> dict:
        """Scale-free progress, on fixed probe batches (the validation-free stopping rule,
        ``unlearn_kernels.stopping``):

        - ``residual`` ρ = sqrt(Σ_t ‖m ⊙ (h_t − c·u)‖²) / sqrt(T · ‖m ⊙ c·u‖²): how far the forget
          activations still are from the control vector, in units of its own length (about
          sqrt(1 + 1/β²) at the start, 0 when the forget tokens all sit on ``c·u``);
        - ``alignment``: mean cosine of ``h_t`` with ``u``;
        - ``retain_drift`` δ = Σ_t ‖h_r − h₀_r‖ / Σ_t ‖h₀_r‖: how far retain activations moved,
          relative to their own norm.

        Both are ratios of activations at the same layer, so they do not depend on the
        model's width, depth or activation scale (which is why the same thresholds serve a
        6-layer toy and a 30-layer pretrained model, where the raw loss differs by orders of
        magnitude)."""
        live, _ = self.live_and_frozen(forget_batch, frozen=False)
        mask = forget_batch["attention_mask"].bool()
        h = live[mask].float()
        target = self.control.float()
        weights = self.feature_weights()
        w = torch.ones_like(target) if weights is None else weights.float()
        residual = (((h - target) ** 2 * w).sum() / (h.shape[0] * ((target ** 2) * w).sum())).sqrt()
        alignment = torch.nn.functional.cosine_similarity(h, target[None], dim=-1).mean()
        live_r, anchor = self.live_and_frozen(retain_batch)
        keep = retain_batch["attention_mask"].bool()
        drift = (live_r[keep] - anchor[keep]).float().norm(dim=-1).sum() / anchor[keep].float().norm(dim=-1).sum()
        return {"residual": float(residual), "alignment": float(alignment), "retain_drift": float(drift)}

    def report(self):
        return {**super().report(), "control_norm": float(self.control.norm())}


@config_dataclass
class AdaptiveRMUConfig(RMUConfig):
    beta: Annotated[Positive, Field(description="c = beta · mean ‖h_forget‖")] = 5.0


class AdaptiveRMU(RMU):
    """RMU with ``c = β · mean‖h_f‖`` measured on the first forget batch (see module)."""

    name = "AdaptiveRMU"
    spec = dataclasses.replace(RMU.spec, config=AdaptiveRMUConfig,
                               refuses={"steering": "c = beta · mean ‖h_forget‖ replaces it",
                                        "disruption_mask": NO_MASK})

    @torch.no_grad()
    def control_scale(self, forget_batch) -> float:
        return self.config.beta * self._forget_norm(forget_batch)


@config_dataclass
class SRMUConfig(AdaptiveRMUConfig):
    sparsity: Annotated[Fraction, Field(description="fraction of features the misdirection acts on")] = 0.4
    temperature: Annotated[NonNegative, Field(description="softness of the importance map (0: hard top-k)")] = 0.1
    stats_batches: Annotated[Count, Field(description="batches per set for the moments")] = 16
    anchor_forget: Annotated[bool, Field(description=(
        "anchor the unselected features of forget tokens to the frozen model"))] = False


class SRMU(AdaptiveRMU):
    """Selective RMU: misdirect only the features that separate forget from retain (see module)."""

    name = "SRMU"
    spec = dataclasses.replace(AdaptiveRMU.spec, config=SRMUConfig, selective_of="RMU")

    @torch.no_grad()
    def _moments(self, texts, offset) -> Moments:
        stats = None
        batches = self.batches(texts, offset)
        for _ in range(min(self.config.stats_batches, -(-len(texts) // self.config.batch_size))):
            batch = next(batches)
            h = self.frozen_activations(batch)
            part = masked_moments(h, batch["attention_mask"], backend=self.config.backend)
            stats = part if stats is None else stats.merge(part)
        return stats.all_reduce() if distributed.active() else stats

    def setup(self, forget, retain):
        super().setup(forget, retain)
        self.importance = feature_importance(self._moments(forget, 11), self._moments(retain, 12),
                                             self.config.sparsity, temperature=self.config.temperature,
                                             backend=self.config.backend)

    def forget_loss(self, batch):
        live, anchor = self.live_and_frozen(batch, frozen=self.config.anchor_forget)
        return self.batch_mean(misdirection_loss(live, self.control, self.importance, anchor,
                                                 token_mask=batch["attention_mask"], backend=self.config.backend), batch)

    def feature_weights(self):
        return self.importance

    def report(self):
        return {**super().report(), "importance_mass": float(self.importance.sum())}
