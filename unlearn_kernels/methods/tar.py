"""TAR: tamper-resistant unlearning by adversarial fine-tuning inside the unlearning loop.

TAR (Tamirisa et al., 2024) trains against the attack it must survive. Each outer step
simulates a relearning attack on a copy of the weights and moves the real weights so that,
*after* the attack, the forget text is still not predicted.

With ``θ`` the weights, ``A`` the weights the simulated attacker fine-tunes (``adversary_update``,
by default every weight, as a relearning attack does), ``S`` the weights unlearning updates
(``update``), a forget batch ``f``, a retain batch ``r`` and attack batches ``a_1 … a_K`` drawn
from the forget set:

- the attack: ``θ_0 = θ``; ``θ_k = Adam(θ_{k−1}, ∇_A NLL(a_k; θ_{k−1}), lr = η)`` for
  ``k = 1 … K``, a fresh Adam (β = 0.9, 0.999, ε = 1e-8) at a rate ``η`` drawn log-uniformly in
  ``adversary_lrs`` at every outer step (RTT sweeps the attacker's rate);
- the tamper loss ``T(f; θ) = −H(f; θ)``, minus the mean entropy of the next-token
  distribution over the loss tokens of ``f`` (TAR's entropy objective: bounded, unlike
  ascending the NLL, and it leaves no answer to relearn because every answer is as likely);
- the objective::

      L(θ) = T(f; θ) + w_t · (1/K) Σ_{k=1..K} T(f; θ_k) + γ · NLL(r; θ)

  (``tamper_weight`` = w_t, ``retain_weight`` = γ).

The attack's trajectory is not differentiated through: the gradient of the middle term is the
first-order meta-gradient ``(1/K) Σ_k ∇_S T(f; θ)|_{θ = θ_k}`` (first-order MAML, as TAR's
implementation uses). It is handed to the shared training loop as a surrogate term whose value
is the post-attack tamper loss and whose gradient is that sum. ``adversary_steps = 0`` turns the
method into plain entropy-maximisation unlearning with a retain NLL (the baseline TAR improves on).

One outer step costs ``2K + 2`` forward/backward passes of the model (K attack steps, K post-attack
tamper losses, the direct tamper loss and the retain loss). The simulated attack runs in one
process: under ``torch.distributed`` the method refuses to start.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..models.layers import parameters_matching
from . import distributed
from .base import MethodConfig, UnlearningMethod, model_inputs
from .loss_based import nll

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
TAMPER_LOSSES = ("entropy", "nll")


@dataclass
class TARConfig(MethodConfig):
    steps: int = 100           # outer (unlearning) steps
    adversary_steps: int = 4   # K: fine-tuning steps of the simulated attack per outer step (0: no attack)
    adversary_lrs: tuple[float, float] = (1e-4, 1e-3)  # the attack's Adam rate, log-uniform in [low, high]
    adversary_update: list[str] | None = None  # weights the simulated attack fine-tunes; auto: every weight
    tamper_points: int = 0       # the tamper loss is taken after each of the last this many attack steps (0: all K)
    tamper_loss: str = "entropy"  # post-attack loss: entropy (T = −H) or nll (T = −NLL, ascent)
    tamper_weight: float = 1.0   # w_t: weight of the post-attack tamper loss
    retain_weight: float = 1.0   # γ: weight of the retain NLL


def entropy(logits: torch.Tensor, batch) -> torch.Tensor:
    """Mean entropy of the next-token distributions at the loss tokens of ``batch`` (the tokens
    ``token_logprobs`` scores: non-padding, answer tokens only for QA pairs)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    per_token = -(logp.exp() * logp).sum(-1)
    mask = batch["attention_mask"][:, 1:].bool()
    if batch.get("loss_mask") is not None:
        mask = mask & batch["loss_mask"][:, 1:].bool()
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def tamper_loss(model, batch, weights: dict[str, torch.Tensor] | None = None, kind: str = "entropy") -> torch.Tensor:
    """``T = −H`` (minus the mean next-token entropy) or ``T = −NLL`` on ``batch``, with the
    model's weights replaced by ``weights`` where given."""
    from .loss_based import token_logprobs

    inputs = {**model_inputs(batch), "use_cache": False}
    out = functional_call(model, weights, (), inputs) if weights else model(**inputs)
    if kind == "entropy":
        return -entropy(out.logits, batch)
    lp, mask = token_logprobs(out.logits, batch)
    return (lp * mask).sum() / mask.sum().clamp(min=1)


def _lm_loss(model, batch, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The attacker's causal-LM loss (mean NLL over the loss tokens) under ``weights``."""
    from .loss_based import token_logprobs

    logits = functional_call(model, weights, (), {**model_inputs(batch), "use_cache": False}).logits
    lp, mask = token_logprobs(logits, batch)
    return -(lp * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def adam_update(weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], state: dict, lr: float,
                step: int) -> dict[str, torch.Tensor]:
    """One Adam step (``torch.optim.Adam``'s update, no weight decay) on detached copies:
    ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``, ``w ← w − lr · m̂ / (√v̂ + ε)`` with
    ``m̂ = m/(1−β₁^t)``, ``v̂ = v/(1−β₂^t)``; ``state`` holds m and v, updated in place."""
    b1, b2 = ADAM_BETAS
    updated = {}
    for name, w in weights.items():
        g = grads[name].float()
        m, v = state.setdefault(name, (torch.zeros_like(g), torch.zeros_like(g)))
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v / (1 - b2 ** step)).sqrt_().add_(ADAM_EPS)
        updated[name] = (w.float() - lr * (m / (1 - b1 ** step)) / denom).to(w.dtype)
    return updated


class TAR(UnlearningMethod):
    """TAR: unlearn so that the forget text stays unpredicted after a simulated fine-tuning attack (see module)."""

    name = "TAR"
    config_class = TARConfig
    reference_lr = 1e-5       # the loss-based methods' 7B rate (AdamW)

    def check_config(self) -> None:
        super().check_config()
        c = self.config
        low, high = c.adversary_lrs
        if c.adversary_steps < 0 or not 0 < low <= high:
            raise ValueError(f"{self.name}: adversary_steps must be >= 0 and adversary_lrs a range 0 < low <= high "
                             f"(got adversary_steps={c.adversary_steps}, adversary_lrs={c.adversary_lrs})")
        if c.tamper_loss not in TAMPER_LOSSES:
            raise ValueError(f"{self.name}: tamper_loss must be one of {', '.join(TAMPER_LOSSES)}, got {c.tamper_loss!r}")
        if not 0 <= c.tamper_points <= c.adversary_steps:
            raise ValueError(f"{self.name}: tamper_points must be in 0..adversary_steps={c.adversary_steps} "
                             f"(got {c.tamper_points})")
        if c.tamper_weight < 0 or c.retain_weight < 0:
            raise ValueError(f"{self.name}: tamper_weight and retain_weight must be >= 0 "
                             f"(got {c.tamper_weight}, {c.retain_weight})")
        if distributed.active():
            raise ValueError(f"{self.name}: the simulated attack runs in one process; run TAR without torch.distributed")

    def check_selection(self) -> None:
        super().check_selection()
        patterns = self.config.adversary_update
        self.adversary = (parameters_matching(self.model, patterns) if patterns
                          else dict(self.model.named_parameters()))

    def setup(self, forget, retain):
        self._attack_batches = self.batches(forget, 3)
        self._rng = random.Random(self.config.seed + 5)
        self._attacks = 0

    def extra_state(self) -> dict:
        return {"attacks": self._attacks}

    def load_extra_state(self, state: dict) -> None:
        """Replay the draws of the attacks already run (rates and batches), so a resumed run
        continues the same sequence."""
        for _ in range(int(state["attacks"])):
            self.attack_rate()
            for _ in range(self.config.adversary_steps):
                next(self._attack_batches)
        self._attacks = int(state["attacks"])

    def attack_rate(self) -> float:
        low, high = self.config.adversary_lrs
        return math.exp(self._rng.uniform(math.log(low), math.log(high)))

    def post_attack_gradients(self, forget_batch) -> tuple[dict[str, torch.Tensor], float]:
        """The first-order meta-gradient ``(1/K) Σ_k ∇_S T(f; θ_k)`` of the selected weights and
        the mean post-attack tamper loss, from one simulated attack (see module)."""
        K, lr = self.config.adversary_steps, self.attack_rate()
        self._attacks += 1
        first = K - (self.config.tamper_points or K) + 1
        weights = {n: p.detach() for n, p in self.adversary.items()}
        state: dict = {}
        sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        total = 0.0
        for k in range(1, K + 1):
            leaves = {n: w.clone().requires_grad_(True) for n, w in weights.items()}
            batch = next(self._attack_batches)
            names = list(leaves)
            grads = torch.autograd.grad(_lm_loss(self.model, batch, leaves), [leaves[n] for n in names],
                                        allow_unused=True)
            grads = {n: (g if g is not None else torch.zeros_like(leaves[n])) for n, g in zip(names, grads)}
            weights = adam_update(weights, grads, state, lr, k)
            if k < first:
                continue
            attacked = {n: w.requires_grad_(True) for n, w in ((n, w.clone()) for n, w in weights.items())}
            targets = [attacked[n] if n in attacked else p for n, p in self.params.items()]
            loss = tamper_loss(self.model, forget_batch, attacked, self.config.tamper_loss)
            for (n, _), g in zip(self.params.items(), torch.autograd.grad(loss, targets, allow_unused=True)):
                if g is not None:
                    sums[n] += g.float()
            total += float(loss.detach())
        return {n: s / (K - first + 1) for n, s in sums.items()}, total / (K - first + 1)

    def loss(self, forget_batch, retain_batch, step):
        c = self.config
        losses = {"forget": tamper_loss(self.model, forget_batch)}
        if c.adversary_steps and c.tamper_weight:
            grads, value = self.post_attack_gradients(forget_batch)
            surrogate = sum((p * grads[n].to(p.dtype)).sum() for n, p in self.params.items())
            losses["tamper"] = c.tamper_weight * (surrogate - surrogate.detach() + value)
        if c.retain_weight:
            losses["retain"] = c.retain_weight * nll(self.model, retain_batch)
        return losses
