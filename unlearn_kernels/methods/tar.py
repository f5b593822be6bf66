"""TAR: tamper-resistant unlearning, with a simulated fine-tuning attack inside the unlearning loop.

TAR (Tamirisa et al., 2024) trains against the attack it must survive: each outer step
fine-tunes a copy of the weights on forget text for a few steps, as a relearning attack would,
and moves the real weights so that the forget text stays unpredicted *after* that attack.

With ``θ`` the weights, ``A`` those the simulated attacker fine-tunes (``adversary_update``; by
default every weight, as a relearning attack does), ``S`` those unlearning updates (``update``),
a forget batch ``f``, a retain batch ``r`` and attack batches ``a_1 … a_K`` drawn from the
forget set (their own shuffled stream):

- the attack: ``θ_0 = θ``, ``θ_k = Adam(θ_{k−1}, ∇_A NLL(a_k; θ_{k−1}), η)`` for ``k = 1 … K``
  (a fresh Adam, β = 0.9, 0.999, ε = 1e-8, no weight decay; ``η`` drawn log-uniformly in
  ``adversary_lrs`` at every outer step, since RTT sweeps the attacker's rate);
- the post-attack tamper loss ``T(f; θ_k)``: ``nll`` (the default) is ``−NLL(f; θ_k)``, gradient
  ascent on what the attacked copy predicts; ``entropy`` is ``−H(f; θ_k)``, minus the mean
  next-token entropy (TAR's choice for its weaponisation domain);
- the objective, with ``P`` the last ``tamper_points`` attack steps (all K when 0)::

      L(θ) = −H(f; θ) + w_t · (1/|P|) Σ_{k∈P} T(f; θ_k) + γ · NLL(r; θ)

  (``tamper_weight`` = w_t, ``retain_weight`` = γ). The direct term maximises the entropy of
  the unattacked model on forget text, which brings forget accuracy to chance without pushing
  the true answer below the others (ascending the NLL there does: forget accuracy 0.14 at
  chance 0.25 for a long GradDiff run).

The attack's trajectory is not differentiated through: the middle term's gradient is the
first-order meta-gradient ``(1/|P|) Σ_{k∈P} ∇_S T(f; θ)|_{θ=θ_k}`` (first-order MAML, as TAR's
implementation uses). It reaches the shared training loop as a surrogate term whose value is
the post-attack tamper loss and whose gradient is that mean, so gradient accumulation, fp32
master copies and checkpoints work as for every method. ``adversary_steps = 0`` leaves
entropy maximisation with a retain NLL, the non-robust baseline.

One outer step costs ``K + |P| + 2`` forward/backward passes (K attack steps, the |P|
post-attack reads, the direct and the retain loss). The simulated attack runs in one process:
under ``torch.distributed`` the method refuses to start. Besides the model and the AdamW state of
``S`` it holds the attacked weights ``θ_k`` (the pass's leaves alias them), their gradient, the
attack's Adam moments in fp32 and the meta-gradient sum (``unlearn_kernels.plan`` models it).

On the shipped 6-layer benchmark with its retrained oracle (30 % overlap; 90 held-out
questions; recovery ``(relearned − oracle relearned) / (base − oracle)`` per attack rate,
``eval.oracle``), at the demo's settings (every weight, lr 7e-4, γ = 3, K = 4 at η = 3e-3,
|P| = 1, ``nll``): 120 steps give forget 0.283 (oracle 0.244), retain 0.955 (base 1.000) and a
recovery of 6 / 0 / 10 % at attack lr 1e-5 / 1e-4 / 1e-3, which meets the goal of issue 13
(≤ 20 % at every rate, forget within 5 points of the oracle, retain ≥ 95 % of the base), and
only just: 100 steps recover 25 % (retain 0.949), 60 steps 44 % (0.910); seed 1 at 120 steps
keeps recovery ≤ 15 % at retain 0.913; lr 1e-3 and 80 steps reach 3–14 % at retain 0.87–0.89;
updating the MLPs only keeps retain 0.94 at 32 % recovery. The demo's baselines recover 30 %
(GradDiff), 34 % (NPO), 38 % (SIMU), 52 % (MRP) and 61–65 % (RMU, SRMU).

Earlier, on the 4-layer word-level model at 25 % overlap (forget accuracy, retain accuracy, and
the held-out forget accuracy the RTT attack of ``eval.relearn`` reaches — AdamW, batch 8, 30
steps, best of the checkpoints every 10 steps — taken as the maximum over lr 1e-5, 1e-4, 1e-3;
the base model scores 1.00 on all three, chance is 0.25; 32 held-out questions, so 3 points of
resolution). With ``update=["layers.*"]``, lr 1e-3, batch 16, 80 steps, K = 4 at η = 3e-3,
|P| = 1, ``nll``, w_t = γ = 1 (16–24 s on one shared core), seeds 0 / 1 / 2: forget 0.23 / 0.20 /
0.31, retain 0.97 / 0.97 / 0.99, relearned 0.34 / 0.41 / 0.38, a recovery
``(relearned − 0.25) / (1 − 0.25)`` of 13 / 21 / 17 %. Controls at the same budget: without the
attack (η = 1e-7, the post-attack term is NLL ascent at θ) forget 0.19 / 0.12 / 0.25 and
relearned 0.25 / 0.22 / 0.34; GradDiff (all layers, lr 1e-3, γ = 1, 80 steps, seeds 0 / 1)
forget 0.20 / 0.16, relearned 0.38 / 0.31. So on this model NLL ascent strong enough already
resists the 30-step attack; what the simulated attack adds is a forget accuracy near chance
instead of below it (mean 0.25 vs 0.19 and 0.18). ``entropy`` as the post-attack loss relearned
to 0.50–0.94, and the demo's 40-step GradDiff and RMU to 0.88 and 0.91. A 100-step attack on
seed 0 reaches 0.50: the resistance is to the budgeted attack, not to unlimited relearning.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch.func import functional_call

from ..errors import UserError
from ..models.layers import parameters_matching
from . import distributed
from .base import MethodConfig, UnlearningMethod, model_inputs
from .loss_based import nll
from .settings import Auto, NonNegative, NonNegativeInt, Pair, Patterns, Positive, config_dataclass
from .spec import Memory, MethodSpec

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
TAMPER_LOSSES = ("nll", "entropy")
ATTACK_LR_RATIO = 3.0   # auto adversary_lrs: the attack fine-tunes at 3 x the unlearning rate


@config_dataclass
class TARConfig(MethodConfig):
    steps: Annotated[NonNegativeInt, Field(description="outer (unlearning) steps")] = 80
    adversary_steps: Annotated[NonNegativeInt, Field(description=(
        "K: fine-tuning steps of the simulated attack per outer step (0: no attack)"))] = 4
    adversary_lrs: Annotated[Auto[Pair[Positive]], Field(description=(
        "the attack's Adam rate, log-uniform in [low, high]; auto: 3 x lr"))] = None
    adversary_update: Annotated[Auto[Patterns], Field(description=(
        "weights the simulated attack fine-tunes; auto: every weight"))] = None
    tamper_points: Annotated[NonNegativeInt, Field(description=(
        "the tamper loss is read after each of the last this many attack steps (0: all K)"))] = 1
    tamper_loss: Annotated[Literal[TAMPER_LOSSES], Field(description=(
        "post-attack loss: nll (T = −NLL, ascent) or entropy (T = −H)"))] = "nll"
    tamper_weight: Annotated[NonNegative, Field(description="w_t: weight of the post-attack tamper loss")] = 1.0
    retain_weight: Annotated[NonNegative, Field(description="γ: weight of the retain NLL")] = 1.0

    @model_validator(mode="after")
    def _ranges(self):
        if self.adversary_lrs is not None and not self.adversary_lrs[0] <= self.adversary_lrs[1]:
            raise ValueError(f"setting adversary_lrs must be a range 0 < low <= high, got {self.adversary_lrs}")
        if self.tamper_points > self.adversary_steps:
            raise ValueError(f"setting tamper_points must be in 0..adversary_steps={self.adversary_steps}, "
                             f"got {self.tamper_points}")
        return self


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
    spec = MethodSpec(config=TARConfig, length="steps", knobs=("lr",), tamper_resistant=True,
                      memory=Memory(loss="head", updates="mlp", adversary=True),
                      refuses={"checkpointing": "the attack's graphs run under torch.func.functional_call, "
                                                "whose weights a recomputation in backward would not see",
                               "sam_rho": "each loss evaluation runs a simulated attack, its own robustness term",
                               "collapse_rank": "its tamper term's gradient is a meta-gradient from the simulated "
                                                "attack's weights, not a Linear weight's gradient from its inputs",
                               "collapse_batches": "it does not use collapse_rank",
                               "collapse_step": "it does not use collapse_rank"})
    reference_lr = 1e-5       # the loss-based methods' 7B rate (AdamW)

    def resolve_defaults(self) -> dict:
        chosen = super().resolve_defaults()
        if self.config.adversary_lrs is None:
            rate = float(f"{ATTACK_LR_RATIO * self.config.lr:.3g}")
            chosen["adversary_lrs"] = (rate, rate)
            self.config = dataclasses.replace(self.config, adversary_lrs=(rate, rate))
        return chosen

    def check_config(self) -> None:
        super().check_config()
        if distributed.active():
            raise UserError(f"{self.name}: the simulated attack runs in one process; run TAR without torch.distributed")

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
        if low == high:
            return low
        return math.exp(self._rng.uniform(math.log(low), math.log(high)))

    def post_attack_gradients(self, forget_batch) -> tuple[dict[str, torch.Tensor], float]:
        """The first-order meta-gradient ``(1/|P|) Σ_{k∈P} ∇_S T(f; θ_k)`` of the selected weights
        and the mean post-attack tamper loss, from one simulated attack (see module)."""
        K, lr = self.config.adversary_steps, self.attack_rate()
        self._attacks += 1
        first = K - (self.config.tamper_points or K) + 1
        weights = {n: p.detach() for n, p in self.adversary.items()}
        state: dict = {}
        sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        total = 0.0
        for k in range(1, K + 1):
            leaves = {n: w.detach().requires_grad_(True) for n, w in weights.items()}   # aliases, not copies
            batch = next(self._attack_batches)
            names = list(leaves)
            grads = torch.autograd.grad(-tamper_loss(self.model, batch, leaves, "nll"), [leaves[n] for n in names],
                                        allow_unused=True)
            grads = {n: (g if g is not None else torch.zeros_like(leaves[n])) for n, g in zip(names, grads)}
            weights = adam_update(weights, grads, state, lr, k)
            del leaves, grads            # at most θ_k and its gradient are held between passes (plan)
            if k < first:
                continue
            attacked = {n: w.detach().requires_grad_(True) for n, w in weights.items()}
            targets = [attacked[n] if n in attacked else p for n, p in self.params.items()]
            loss = tamper_loss(self.model, forget_batch, attacked, self.config.tamper_loss)
            for (n, _), g in zip(self.params.items(), torch.autograd.grad(loss, targets, allow_unused=True)):
                if g is not None:
                    sums[n] += g.float()
            total += float(loss.detach())
            del attacked, targets, loss  # their graph would keep θ_k alive into the next step
        return {n: s.div_(K - first + 1) for n, s in sums.items()}, total / (K - first + 1)

    def loss(self, forget_batch, retain_batch, step):
        c = self.config
        losses = {"forget": tamper_loss(self.model, forget_batch, kind="entropy")}
        if c.adversary_steps and c.tamper_weight:
            grads, value = self.post_attack_gradients(forget_batch)
            surrogate = sum((p * grads[n].to(p.dtype)).sum() for n, p in self.params.items())
            losses["tamper"] = c.tamper_weight * (surrogate - surrogate.detach() + value)
        if c.retain_weight:
            losses["retain"] = c.retain_weight * nll(self.model, retain_batch)
        return losses
