"""SIMU (selective influence machine unlearning) and SO-GradDiff (SOUL).

SIMU, in two stages:

1. **Score neurons.** For every updated MLP weight ``W`` the diagonal of the Hessian of
   the forget loss and of the retain loss is estimated by the Gauss-Newton/Fisher EMA
   ``h ← β h + (1 − β) g ⊙ g`` over ``score_batches`` batches (``hessian_ema_``). Each
   neuron gets the Optimal-Brain-Damage saliency ``s = ½ Σ h ⊙ w²`` over its weights
   (``neuron_scores``, on the MLP-neuron axis ``models.roles`` finds: rows of Linear up/gate
   projections, columns of down projections, the other way round for Conv1D, per expert for
   MoE weights ``[E, ·, ·]``), on both sets, and the top ``fraction`` by
   ``s_f / (s_r + ε)`` are selected per weight (``select_neurons``). ``scorer =
   "integrated_gradients"`` replaces the saliency by the paper's attribution
   ``|Σ W ⊙ mean_k ∇L(α_k W)|`` along the path ``α ∈ (0, 1]`` (``ig_steps`` points).
2. **Unlearn** with the GradDiff objective ``−NLL(forget) + γ · NLL(retain)`` and the
   second-order Sophia-G optimizer restricted to the selected neurons
   (``MaskedSophia``: clipped ``sign(m) · min(|m| / (ρ·h + ε), 1)`` steps, Hessian EMA from
   the gradients every ``hessian_interval`` steps).

SO-GradDiff is GradDiff with the same Sophia optimizer on every selected weight, no masks.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

import torch
from pydantic import Field

from ..errors import UserError
from ..ops import hessian_ema_, neuron_scores, select_neurons
from ..optim import MaskedSophia
from ..models.roles import hidden_size
from . import distributed
from .loss_based import GradDiff, LossConfig, nll
from .settings import Count, Fraction, NonNegative, Number, Pair, Share, config_dataclass
from .spec import Memory, MethodSpec


Beta = Annotated[Number, Field(ge=0, lt=1)]   # an EMA factor, in [0, 1)


@config_dataclass
class SOGradDiffConfig(LossConfig):
    epochs: Annotated[Count, Field(description="passes over the forget set when steps is 0")] = 3
    betas: Annotated[Pair[Beta], Field(description="Sophia's EMA factors (gradient, Hessian)")] = (0.965, 0.99)
    rho: Annotated[NonNegative, Field(description="Sophia's clipping scale")] = 0.04
    weight_decay: Annotated[NonNegative, Field(description="decoupled weight decay")] = 0.0
    hessian_interval: Annotated[Count, Field(description="steps between Hessian estimates")] = 10


class SOGradDiff(GradDiff):
    """GradDiff with the Sophia-G optimizer (SOUL)."""

    name = "SO-GradDiff"
    spec = MethodSpec(config=SOGradDiffConfig, length="epochs", knobs=("lr",),
                      memory=Memory(loss="head", updates="mlp", optimizer="Sophia"))
    reference_lr = 3e-5        # 7B-equivalent Sophia rate (1e-3 on the 128-wide embedded model; SOUL's 1e-4
                               # scaled to that width moved retain accuracy to 0.74)

    def masks(self) -> dict:
        return {}

    def make_optimizer(self):
        self._steps = 0
        return MaskedSophia(list(self.optimized.values()), lr=self.config.lr, betas=self.config.betas,
                            rho=self.config.rho, weight_decay=self.config.weight_decay,
                            masks=self.masks(), backend=self.config.backend)

    def before_step(self):
        if self._steps % self.config.hessian_interval == 0:
            self.optimizer.update_hessian()
        self._steps += 1

    def extra_state(self) -> dict:
        return {"hessian_steps": self._steps}

    def load_extra_state(self, state: dict) -> None:
        self._steps = int(state["hessian_steps"])


@config_dataclass
class SIMUConfig(SOGradDiffConfig):
    fraction: Annotated[Fraction, Field(description="neurons kept per weight (per expert of an MoE weight)")] = 0.1
    scorer: Annotated[Literal["obd", "integrated_gradients"], Field(description=(
        'neuron scores: "obd" or "integrated_gradients"'))] = "obd"
    score_batches: Annotated[Count, Field(description="batches per set for the neuron scores")] = 8
    score_beta: Annotated[Share, Field(description="EMA factor of the Hessian diagonals while scoring")] = 0.9
    ig_steps: Annotated[Count, Field(description="integrated-gradient steps (scorer integrated_gradients)")] = 4


class SIMU(SOGradDiff):
    """Score MLP neurons on forget vs retain, then masked Sophia GradDiff on the top ones."""

    name = "SIMU"
    spec = dataclasses.replace(SOGradDiff.spec, config=SIMUConfig, saves=("weights", "masks"),
                               refuses={"collapse_step": "projecting a down projection's step mixes its input "
                                                         "neurons, so unselected neurons would change"})

    def __init__(self, model, tokenizer, config=None, **overrides):
        super().__init__(model, tokenizer, config, **overrides)
        self.params = {name: p for name, p in self.params.items() if p.dim() >= 2}
        if not self.params:
            raise UserError(f"SIMU: {self.config.update} selects no 2-D weight to score neurons of")
        if distributed.is_sharded(self.model) and any(p.dim() == 3 for p in self.params.values()):
            raise UserError("SIMU does not run on FSDP2-sharded MoE experts [E, ., .] yet: pass the plain or "
                            "DDP-wrapped model")
        self._neuron_dims = self._find_neuron_dims()

    def neuron_dim(self, name: str) -> int:
        """The MLP-neuron axis of the selected weight ``name``: its role's axis from
        ``models.roles`` (rows of a Linear up/gate ``[w, d]``, columns of a down ``[d, w]``,
        the other way round for GPT-2's ``Conv1D``, axis 1/2 of MoE experts ``[E, ·, ·]``); for a
        weight outside the role table, the one axis whose size is not the hidden size. A weight
        with no such single axis (square, or neither side the hidden size) is refused rather
        than guessed."""
        return self._neuron_dims[name]

    def _find_neuron_dims(self) -> dict[str, int]:
        try:
            roles = self.model_roles()
        except ValueError:
            roles = None
        hidden = hidden_size(self.model)
        dims = {}
        for name, p in self.params.items():
            axis = roles.neuron_axis(name) if roles is not None else None
            if axis is None:
                axes = [a for a in (0, 1) if p.shape[a] != hidden] if p.dim() == 2 else []
                if len(axes) != 1:
                    raise UserError(f"SIMU: cannot tell the MLP-neuron axis of {name} {list(p.shape)} (hidden "
                                    f"size {hidden}): select MLP projections, whose one side is the hidden size")
                axis = axes[0]
            dims[name] = axis
        return dims

    def _global_grads(self, loss) -> list[torch.Tensor]:
        """The gradient of the global batch's loss for each selected weight, whole (each rank's
        loss is its share: the shares' gradients are summed; an FSDP2 model's are gathered by
        a backward, whose reduce-scatter averages them, then scaled by the world size)."""
        params = list(self.params.values())
        if not distributed.is_sharded(self.model):
            return [distributed.total(g) for g in torch.autograd.grad(loss, params)]
        for p in params:
            p.grad = None
        loss.backward()
        grads = [distributed.full(p.grad) * distributed.world_size() for p in params]
        for p in params:
            p.grad = None
        return grads

    def _hessians(self, texts: list[str], offset: int) -> dict[str, torch.Tensor]:
        hess = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in self.params.items()}
        batches = self.batches(texts, offset)
        for _ in range(self.config.score_batches):
            grads = self._global_grads(nll(self.model, next(batches)))
            for (name, _), g in zip(self.params.items(), grads):
                hessian_ema_(hess[name], g, beta=self.config.score_beta, backend=self.config.backend)
        return hess

    def _integrated_gradients(self, texts: list[str], offset: int) -> dict[str, torch.Tensor]:
        batch = next(self.batches(texts, offset))
        total = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in self.params.items()}
        originals = {name: p.detach().clone() for name, p in self.params.items()}
        try:
            for k in range(1, self.config.ig_steps + 1):
                alpha = k / self.config.ig_steps
                with torch.no_grad():
                    for name, p in self.params.items():
                        p.copy_(alpha * originals[name])
                grads = self._global_grads(nll(self.model, batch))
                for (name, _), g in zip(self.params.items(), grads):
                    total[name] += g.float() / self.config.ig_steps
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(originals[name])
        return {name: (distributed.full(originals[name]).float() * total[name]).abs() for name in self.params}

    def _scores(self, name: str, weight, hess_f, hess_r):
        """(s_f, s_r) per neuron; an MoE weight ``[E, ·, ·]`` is scored per expert ``[E, w]``."""
        axis = self.neuron_dim(name)
        if weight.dim() == 2:
            return neuron_scores(weight, hess_f, hess_r, dim=axis, backend=self.config.backend)
        pairs = [neuron_scores(weight[e], hess_f[e], hess_r[e], dim=axis - 1, backend=self.config.backend)
                 for e in range(weight.shape[0])]
        return torch.stack([f for f, _ in pairs]), torch.stack([r for _, r in pairs])

    def setup(self, forget, retain):
        if self.config.scorer == "obd":
            h_f, h_r = self._hessians(forget, 21), self._hessians(retain, 22)
            scores = {name: self._scores(name, distributed.full(p.detach()), h_f[name], h_r[name])
                      for name, p in self.params.items()}
        else:
            a_f, a_r = self._integrated_gradients(forget, 21), self._integrated_gradients(retain, 22)
            scores = {}
            for name, p in self.params.items():
                other = [a for a in range(p.dim()) if a != self.neuron_dim(name) and not (p.dim() == 3 and a == 0)]
                scores[name] = (a_f[name].sum(other), a_r[name].sum(other))
        self.neuron_masks = {name: self._select(s_f, s_r) for name, (s_f, s_r) in scores.items()}
        # MoE weights are masked by restoring their unselected neurons after each step
        self._expert_originals = {name: p.detach().clone() for name, p in self.params.items() if p.dim() == 3}

    def _select(self, s_f, s_r):
        if s_f.dim() == 1:
            return select_neurons(s_f, s_r, fraction=self.config.fraction)
        return torch.stack([select_neurons(f, r, fraction=self.config.fraction) for f, r in zip(s_f, s_r)])

    def _expert_mask(self, name: str, p) -> torch.Tensor:
        """The [E, w] neuron mask of an MoE weight broadcast to its shape."""
        mask = self.neuron_masks[name].to(p.device)
        return mask[:, :, None] if self.neuron_dim(name) == 1 else mask[:, None, :]

    def masks(self) -> dict:
        return {self.optimized[name]: (self.neuron_masks[name], self.neuron_dim(name) if self.neuron_dim(name) == 0
                                       else -1)
                for name, p in self.params.items() if p.dim() == 2}

    def _step(self, step, forget_batches, retain_batches, bar):
        super()._step(step, forget_batches, retain_batches, bar)
        if self._expert_originals:
            with torch.no_grad():
                for name, original in self._expert_originals.items():
                    for target in {id(self.params[name]): self.params[name],
                                   id(self.optimized[name]): self.optimized[name]}.values():
                        target.copy_(torch.where(self._expert_mask(name, target), target,
                                                 original.to(target.dtype)))

    def saved_masks(self) -> dict:
        return dict(self.neuron_masks)

    def report(self):
        return {**super().report(), "selected_neurons": {k: int(v.sum()) for k, v in self.neuron_masks.items()}}
