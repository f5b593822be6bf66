"""UNDO: distil the unlearned model into a noised copy of itself (Lee et al., 2025, "Distillation
Robustifies Unlearning"), the phase a gradient method runs after its unlearning steps when
``distill_noise`` (α) is above 0.

With ``θ_T`` the unlearned weights (the teacher, frozen) and ``N`` a fresh initialisation of the
same weights, the student starts from::

    θ_S = (1 − α) · θ_T + α · β · N          (α = distill_noise ∈ (0, 1], β = distill_scale)

``N`` is what the model's own initialiser gives a new model (Hugging Face ``_init_weights``): a
matrix (linear or embedding weight) ``~ normal(0, σ²)`` with ``σ = config.initializer_range``
(0.02 when the config has none) and the embedding's padding row 0; a normalisation weight 1; any
other vector (a bias) 0. It is drawn on the CPU in fp32 from ``torch.Generator().manual_seed(seed)``
(the method's ``seed``), weight by weight in the order of ``model.named_parameters()``, then cast
to the weight's device and dtype: the same student on every device. α = 1, β = 1 starts the
student from a fresh model; α = 0 is no distillation at all (nothing is drawn).

The student is then trained for ``distill_steps`` steps (0: as many as the unlearning run's
steps) of AdamW (``distill_lr``, no weight decay, torch's fused kernel where it applies; the rate
warms up linearly over the first 10 % of the steps, then decays to 0 on a cosine: :func:`rate_factor`)
on batches of the retain texts (``batch_size`` each, the method's own batching with its own
shuffle), to minimise the forward KL from the teacher's next-token distribution to the
student's, over every position the attention mask keeps (a QA pair counts as its full text)::

    L(θ_S) = Σ_{valid t} Σ_v p_T(v | x_<t) [log p_T(v | x_<t) − log p_S(v | x_<t)] / n_valid

(logits cast to fp32, temperature 1; the teacher runs in eval mode without a graph, the student in
train mode). Its gradient is ``Σ_v (p_S − p_T) ∂ logit_S`` per valid position: teacher-led, so the
student is pulled toward what the teacher predicts on retain text and toward nothing else — the
forget knowledge that the noise destroyed is not handed back, which is the paper's claim (a
relearning attack then has less latent structure to revive). Only the retain texts are seen.

``distill_weights`` chooses what is noised and trained: ``"all"`` — every floating weight of the
model (the paper's variant; the teacher is then a full copy of the weights, one model's memory
more, and everything changes) — ``"mlp"`` — every decoder layer's MLP projections (found by role)
— or ``"update"`` — only the method's update band (``self.params``, the weights the unlearning
itself changed; the rest of the model stays bit for bit). The default is ``"all"``, the only one
that keeps the forgetting: measured on the shipped benchmark after RMU (``benchmarks/RESULTS.md``,
2026-12-07, seed 0, α = 0.6, 300 steps) ``"update"`` gives the forget facts back (forget accuracy
0.900 against RMU's 0.267: the knowledge sits outside RMU's band, which only hid it, and a band
re-learned from retain text passes it through again), ``"mlp"`` partly (0.389), ``"all"`` not
(0.294, the oracle's + 0.05). Under the attack suite, over seeds 0-2, ``"all"`` with α = 0.6 and
1200 steps cut RMU's worst recovery from 81 ± 2 % to 13 ± 1 % (TAR's: 13 ± 5 %) at forget
0.289 ± 0.010, but retain came back only to 0.937 ± 0.008 (0.808 after 300 steps; the goal asks
0.95), and the phase made the run 8× as long as RMU's on that CPU (5.4× with 800 steps); α = 0.5
with 1200 steps met the whole robustness goal on 1 seed of 3 (worst recovery 14 ± 4 %).

The phase is recorded in the method's report under ``"distillation"`` (α, β, steps, rate, the
weights, the KL at the first and the last step, seconds). It runs in one process, in one go (it is
not checkpointed), on a whole model, after any target-driven run would have stopped: so it is
refused under ``torch.distributed``, with a checkpoint or resume, with validation questions
(a target), and with an empty retain set; MRP, which changes no weight, refuses the settings."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..errors import UserError
from . import distributed

# the rate at hidden 4096 that the auto ``distill_lr`` scales from (× 4096 / hidden, as the methods'
# own rates): 3.2e-3 at the shipped model's hidden 128, the rate that model was pretrained with
REFERENCE_LR = 1e-4
WARMUP = 0.1           # the share of the steps over which the rate warms up linearly
SETTINGS = ("distill_steps", "distill_lr", "distill_weights", "distill_scale")


def auto_lr(hidden: int) -> float:
    return float(f"{REFERENCE_LR * 4096 / hidden:.3g}")


def rate_factor(t: int, steps: int) -> float:
    """The rate of step ``t`` (from 0) of ``steps``, as a share of ``distill_lr``: a linear warm-up over
    the first ``WARMUP`` of the steps, times a cosine decay to 0 (``½(1 + cos(π t / steps))``)."""
    warm = max(1, round(WARMUP * steps))
    return min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * t / steps))


def check(method, retain: list, *, checkpoint=None, resume: bool = False, monitor=None) -> None:
    """UserError (one line) where the distillation cannot run, before any work; nothing when off."""
    config, name = method.config, method.name
    if not config.distill_noise:
        defaults = type(config)()
        moved = [s for s in SETTINGS if getattr(config, s) != getattr(defaults, s)
                 and not (s == "distill_lr" and s in getattr(method, "chosen", {}))]
        if moved:
            raise UserError(f"{name}: {', '.join(moved)} set but distill_noise is 0 (no distillation); "
                            "set distill_noise in (0, 1] or leave them out")
        return
    if distributed.active():
        raise UserError(f"{name}: distill_noise runs in one process (the distillation phase is not distributed)")
    if checkpoint is not None or resume:
        raise UserError(f"{name}: distill_noise cannot run with a checkpoint or resume (the distillation phase "
                        "is not checkpointed); drop the checkpoint or distill_noise")
    if monitor is not None:
        raise UserError(f"{name}: distill_noise cannot run with validation questions (the target is measured "
                        "before the distillation would change the model); drop the --val-* files or distill_noise")
    if not retain:
        raise UserError(f"{name}: distill_noise distils on the retain texts, and the retain set is empty")


def distilled_weights(method) -> dict[str, nn.Parameter]:
    """The weights the phase noises and trains (``distill_weights``), by name."""
    if method.config.distill_weights == "update":
        return dict(method.params)
    if method.config.distill_weights == "mlp":
        from ..models.layers import parameters_matching
        from ..models.roles import ROLES

        roles = method.model_roles()
        return parameters_matching(method.model, roles.patterns(list(range(roles.depth)), ROLES))
    return {n: p for n, p in method.model.named_parameters() if p.is_floating_point()}


def fresh_init(model: nn.Module, names: list[str], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``N`` of the module docstring for each of ``names`` (fp32, on the CPU), drawn in that order."""
    std = float(getattr(getattr(model, "config", None), "initializer_range", None) or 0.02)
    modules = dict(model.named_modules())
    fresh = {}
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = modules[owner]
        p = getattr(module, attr)
        if p.dim() >= 2:
            value = torch.randn(tuple(p.shape), generator=generator, dtype=torch.float32) * std
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                value[module.padding_idx] = 0
        elif attr == "weight" and "norm" in type(module).__name__.lower():
            value = torch.ones(tuple(p.shape), dtype=torch.float32)
        else:
            value = torch.zeros(tuple(p.shape), dtype=torch.float32)
        fresh[name] = value
    return fresh


@torch.no_grad()
def noise_(model: nn.Module, weights: dict[str, torch.Tensor], alpha: float, scale: float, seed: int) -> None:
    """``θ ← (1 − α) θ + α β N`` in place on ``weights`` (the model's own tensors), fp32 arithmetic."""
    fresh = fresh_init(model, list(weights), torch.Generator().manual_seed(seed))
    for name, p in weights.items():
        mixed = (1 - alpha) * p.float() + alpha * scale * fresh[name].to(p.device)
        p.copy_(mixed.to(p.dtype))


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``KL(p_T ‖ p_S)`` summed over the vocabulary, mean over the positions where ``mask`` is set."""
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    per_token = (log_t.exp() * (log_t - log_s)).sum(-1)
    valid = mask.bool()
    return per_token[valid].sum() / valid.sum().clamp(min=1)


def distill(method, retain: list, unlearning_steps: int, *, model_inputs, check_finite,
            activation_checkpointing) -> dict:
    """The phase of the module docstring on ``method.model`` (``distill_steps`` 0: ``unlearning_steps``);
    returns what the report records. ``model_inputs``, ``check_finite`` and ``activation_checkpointing``
    are ``methods.base``'s (handed in: ``base`` imports this module)."""
    from contextlib import nullcontext

    from tqdm import tqdm

    config, model = method.config, method.model
    started = time.perf_counter()
    steps = config.distill_steps or unlearning_steps
    weights = distilled_weights(method)
    teacher = {n: p.detach().clone() for n, p in weights.items()}
    noise_(model, weights, config.distill_noise, config.distill_scale, config.seed)
    masters = config.master_dtype is not None
    optimized = {n: p.detach().float().clone().requires_grad_(True) if masters and p.dtype != torch.float32 else p
                 for n, p in weights.items()}
    for p in weights.values():
        p.requires_grad_(True)
    params = list(optimized.values())
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(params, lr=config.distill_lr, weight_decay=0.0, **({"fused": True} if fused else {}))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: rate_factor(t, steps))
    batches = method.batches(retain, 3)
    losses = []
    checkpointed = activation_checkpointing(model) if config.checkpointing else nullcontext()
    with checkpointed:
        for step in tqdm(range(steps), desc=f"{method.name} distil", disable=not config.progress, leave=False):
            batch = next(batches)
            inputs = model_inputs(batch)
            model.eval()
            with torch.no_grad():
                teacher_logits = functional_call(model, teacher, (), {**inputs, "use_cache": False}).logits
            model.train()
            loss = forward_kl(model(**inputs, use_cache=False).logits, teacher_logits, inputs["attention_mask"])
            check_finite(method.name, step, {"distill_kl": loss})
            optimizer.zero_grad(set_to_none=True)
            for p in weights.values():
                p.grad = None
            loss.backward()
            if masters:
                for n, p in weights.items():
                    if optimized[n] is not p:
                        optimized[n].grad = None if p.grad is None else p.grad.float()
            optimizer.step()
            schedule.step()
            if masters:
                with torch.no_grad():
                    for n, p in weights.items():
                        if optimized[n] is not p:
                            p.copy_(optimized[n])
            check_finite(method.name, step, {}, weights)
            losses.append(float(loss.detach()))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    return {"noise": config.distill_noise, "scale": config.distill_scale, "steps": steps, "lr": config.distill_lr,
            "weights": config.distill_weights, "tensors": len(weights),
            "numel": sum(p.numel() for p in weights.values()),
            "kl_first": losses[0] if losses else None, "kl_last": losses[-1] if losses else None,
            "seconds": time.perf_counter() - started}
