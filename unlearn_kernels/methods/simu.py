"""SIMU (selective influence machine unlearning) and SO-GradDiff (SOUL).

SIMU, in two stages:

1. **Score neurons.** For every updated MLP weight ``W`` the diagonal of the Hessian of
   the forget loss and of the retain loss is estimated by the Gauss-Newton/Fisher EMA
   ``h ← β h + (1 − β) g ⊙ g`` over ``score_batches`` batches (``hessian_ema_``). Each
   neuron gets the Optimal-Brain-Damage saliency ``s = ½ Σ h ⊙ w²`` over its weights
   (``neuron_scores``; rows of up/gate projections, columns of down projections, the
   dimension of size ``intermediate_size``), on both sets, and the top ``fraction`` by
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

from dataclasses import dataclass, field

import torch

from ..ops import hessian_ema_, neuron_scores, select_neurons
from ..optim import MaskedSophia
from .loss_based import GradDiff, LossConfig, nll


@dataclass
class SOGradDiffConfig(LossConfig):
    lr: float = 1e-4           # learning rate (Sophia)
    betas: tuple[float, float] = (0.965, 0.99)  # Sophia's EMA factors (gradient, Hessian)
    rho: float = 0.04          # Sophia's clipping scale
    weight_decay: float = 0.0  # decoupled weight decay
    hessian_interval: int = 10  # steps between Hessian estimates


class SOGradDiff(GradDiff):
    """GradDiff with the Sophia-G optimizer (SOUL)."""

    name = "SO-GradDiff"
    config_class = SOGradDiffConfig

    def masks(self) -> dict:
        return {}

    def make_optimizer(self):
        self._steps = 0
        return MaskedSophia(list(self.params.values()), lr=self.config.lr, betas=self.config.betas,
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


@dataclass
class SIMUConfig(SOGradDiffConfig):
    update: list[str] = field(default_factory=lambda: ["layers.{5,6,7}.mlp.{gate_proj,up_proj,down_proj}"])
    fraction: float = 0.1          # neurons kept per weight
    scorer: str = "obd"            # neuron scores: "obd" or "integrated_gradients"
    score_batches: int = 8         # batches per set for the neuron scores
    score_beta: float = 0.9        # EMA factor of the Hessian diagonals while scoring
    ig_steps: int = 4              # integrated-gradient steps (scorer integrated_gradients)


class SIMU(SOGradDiff):
    """Score MLP neurons on forget vs retain, then masked Sophia GradDiff on the top ones."""

    name = "SIMU"
    config_class = SIMUConfig

    def __init__(self, model, tokenizer, config=None, **overrides):
        super().__init__(model, tokenizer, config, **overrides)
        self.params = {name: p for name, p in self.params.items() if p.dim() == 2}
        if not self.params:
            raise ValueError(f"SIMU: {self.config.update} selects no 2-D weight to score neurons of")
        self._neuron_dims = self._find_neuron_dims()

    def check_config(self):
        super().check_config()
        if not 0 < self.config.fraction <= 1:
            raise ValueError(f"SIMU: fraction must be in (0, 1], got {self.config.fraction}")
        if self.config.scorer not in ("obd", "integrated_gradients"):
            raise ValueError(f"SIMU: scorer must be 'obd' or 'integrated_gradients', got {self.config.scorer!r}")

    def neuron_dim(self, weight: torch.Tensor) -> int:
        """The MLP-neuron axis of a selected weight, by structure: the axis whose size is not the
        model's hidden size (read off the input embeddings, so it holds for Llama's ``down_proj``
        ``[d, w]``, GPT-2's Conv1D ``c_fc`` ``[d, w]`` and OPT's ``fc2`` ``[d, w]`` alike; a fused
        ``gate_up_proj`` ``[2w, d]`` gives its 2w rows). A weight with no such single axis
        (square, or neither side the hidden size) is refused rather than guessed."""
        return self._neuron_dims[id(weight)]

    def _find_neuron_dims(self) -> dict[int, int]:
        hidden = self.model.get_input_embeddings().weight.shape[1]
        dims = {}
        for name, p in self.params.items():
            axes = [axis for axis in (0, 1) if p.shape[axis] != hidden]
            if len(axes) != 1:
                raise ValueError(f"SIMU: cannot tell the MLP-neuron axis of {name} {list(p.shape)} (hidden size "
                                 f"{hidden}): select MLP projections, whose one side is the hidden size")
            dims[id(p)] = axes[0]
        return dims

    def _hessians(self, texts: list[str], offset: int) -> dict[str, torch.Tensor]:
        hess = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in self.params.items()}
        batches = self.batches(texts, offset)
        for _ in range(self.config.score_batches):
            grads = torch.autograd.grad(nll(self.model, next(batches)), list(self.params.values()))
            for (name, _), g in zip(self.params.items(), grads):
                hessian_ema_(hess[name], g, beta=self.config.score_beta, backend=self.config.backend)
        return hess

    def _integrated_gradients(self, texts: list[str], offset: int) -> dict[str, torch.Tensor]:
        batch = next(self.batches(texts, offset))
        total = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in self.params.items()}
        originals = {name: p.detach().clone() for name, p in self.params.items()}
        try:
            for k in range(1, self.config.ig_steps + 1):
                alpha = k / self.config.ig_steps
                with torch.no_grad():
                    for name, p in self.params.items():
                        p.copy_(alpha * originals[name])
                grads = torch.autograd.grad(nll(self.model, batch), list(self.params.values()))
                for (name, _), g in zip(self.params.items(), grads):
                    total[name] += g.float() / self.config.ig_steps
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(originals[name])
        return {name: (originals[name].float() * total[name]).abs() for name in self.params}

    def setup(self, forget, retain):
        if self.config.scorer == "obd":
            h_f, h_r = self._hessians(forget, 21), self._hessians(retain, 22)
            scores = {name: neuron_scores(p.detach(), h_f[name], h_r[name], dim=self.neuron_dim(p),
                                          backend=self.config.backend) for name, p in self.params.items()}
        else:
            a_f, a_r = self._integrated_gradients(forget, 21), self._integrated_gradients(retain, 22)
            scores = {name: (a_f[name].sum(1 - self.neuron_dim(p)), a_r[name].sum(1 - self.neuron_dim(p)))
                      for name, p in self.params.items()}
        self.neuron_masks = {name: select_neurons(s_f, s_r, fraction=self.config.fraction)
                             for name, (s_f, s_r) in scores.items()}

    def masks(self) -> dict:
        return {p: (self.neuron_masks[name], self.neuron_dim(p) if self.neuron_dim(p) == 0 else -1)
                for name, p in self.params.items()}

    def saved_masks(self) -> dict:
        return dict(self.neuron_masks)

    def report(self):
        return {**super().report(), "selected_neurons": {k: int(v.sum()) for k, v in self.neuron_masks.items()}}
