"""The attack suite: the ways an attacker holding the weights tries to bring forgotten knowledge back.

Every attack fine-tunes a copy of the model (the model itself is left untouched) and scores the
held-out forget questions — facts the attack never shows — along the way with the lm-eval
evaluator; its result is the highest accuracy reached (the attacker keeps the best checkpoint).
Recovery against an oracle is :func:`.oracle.recovery` of that number.

========== ============================ ======================================== ===== ======
attack     texts                        what is trained, schedule                steps lr
========== ============================ ======================================== ===== ======
rtt@LR     one part of the forget facts all weights, AdamW, constant lr           30   1e-5,
           (Deeb & Roger's RTT)                                                       1e-4, 1e-3
long       the same                     all weights, AdamW, linear warm-up over   300  1e-4
                                        the first 10 %, cosine decay to 0
                                        (how Qi et al. 2024 attack TAR)
retain     retain texts only, unrelated all weights, AdamW, constant lr           100  1e-3
           to the forget facts (Łucki
           et al.'s "unrelated examples")
lora       one part of the forget facts rank-8 LoRA adapters on every linear      100  1e-3
                                        layer (``peft``, ``target_modules=
                                        "all-linear"``), AdamW, constant lr
========== ============================ ======================================== ===== ======

Batches: ``batch_size`` texts drawn per step by ``random.Random(seed)``, padded on the right,
the causal-LM loss on every non-padding token; ``torch.manual_seed(seed)`` before each attack
(LoRA's initialisation and dropout-free training are then fixed by the seed). The step-0 accuracy
is measured once and shared by every attack.

Example::

    from unlearn_kernels.eval.attacks import attack_suite
    result = attack_suite(model, tokenizer, attack_texts, retain_texts, heldout_questions, seed=0)
    result["worst"], result["attacks"]["long"]["max_acc"]
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import MissingPackageError, UserError
from . import scores
from .multiple_choice import pad_rows


@dataclass(frozen=True)
class Attack:
    """One fine-tuning attack (a row of the module's table)."""

    name: str
    lr: float
    steps: int
    data: Literal["forget", "retain"] = "forget"
    schedule: Literal["constant", "cosine"] = "constant"
    warmup: float = 0.0            # share of ``steps`` with a linear warm-up (cosine schedule)
    lora_rank: int | None = None   # train rank-r LoRA adapters instead of all weights


def rtt(lr: float, steps: int = 30) -> Attack:
    """Deeb & Roger's RTT at one learning rate."""
    return Attack(f"rtt@{lr:g}", lr, steps)


SUITE: tuple[Attack, ...] = (rtt(1e-5), rtt(1e-4), rtt(1e-3),
                             Attack("long", 1e-4, 300, schedule="cosine", warmup=0.1),
                             Attack("retain", 1e-3, 100, data="retain"),
                             Attack("lora", 1e-3, 100, lora_rank=8))


def check_attack(tokenizer, attack: Attack, texts, *, every: int, batch_size: int, metric: str) -> None:
    """UserError for anything that would stop ``attack`` on ``texts`` (callers check before any
    scoring): its settings, the texts, ``every``, ``batch_size``, ``metric``, a pad token."""
    _check(attack)
    if isinstance(texts, str) or not texts:
        raise UserError(f"attack {attack.name} needs a list of texts to train on")
    if every < 1 or batch_size < 1:
        raise UserError(f"attacks need every >= 1 and batch_size >= 1 (got every={every}, batch_size={batch_size})")
    if metric not in ("acc", "acc_norm"):
        raise UserError(f"metric must be 'acc' or 'acc_norm', got {metric!r}")
    if tokenizer.pad_token_id is None:
        raise UserError("the tokenizer has no pad token: the attack pads its batches")


def _check(attack: Attack) -> None:
    if not (attack.lr > 0 and attack.steps >= 0 and 0 <= attack.warmup < 1):
        raise UserError(f"attack {attack.name}: needs lr > 0, steps >= 0 and warmup in [0, 1) "
                        f"(got lr={attack.lr}, steps={attack.steps}, warmup={attack.warmup})")
    if attack.lora_rank is not None and (isinstance(attack.lora_rank, bool) or attack.lora_rank < 1):
        raise UserError(f"attack {attack.name}: lora_rank must be an integer >= 1, got {attack.lora_rank!r}")


def _with_lora(model, rank: int):
    try:
        import peft
    except ImportError:
        raise MissingPackageError("the LoRA attack needs the peft package: pip install peft") from None
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                             bias="none")
    return peft.get_peft_model(model, config)


def _scheduler(optimizer, attack: Attack):
    import transformers

    if attack.schedule == "cosine":
        return transformers.get_cosine_schedule_with_warmup(optimizer, round(attack.warmup * attack.steps),
                                                            max(1, attack.steps))
    return transformers.get_constant_schedule(optimizer)


def attack_curve(model, tokenizer, attack: Attack, texts: list[str], heldout, *, every: int = 10,
                 batch_size: int = 8, seed: int = 0, initial: float | None = None, format: str = "cloze",
                 metric: str = "acc") -> list[tuple[int, float]]:
    """``[(step, held-out accuracy)]`` of ``attack`` trained on ``texts``: step 0 (``initial``
    when given), every ``every`` steps and the last step. ``heldout`` is a list of questions or
    :func:`.scores.prepare`'s result; ``model`` is left untouched."""
    check_attack(tokenizer, attack, texts, every=every, batch_size=batch_size, metric=metric)
    if isinstance(heldout, list):
        heldout = scores.prepare(tokenizer, heldout, format)
    rows = [list(ids) for ids in tokenizer(list(texts))["input_ids"]]
    device = next(model.parameters()).device

    def accuracy(m) -> float:
        return float(scores.score(m, tokenizer, heldout)[metric].mean())

    def loss_at(attacked, step):
        picked = rng.sample(range(len(rows)), min(batch_size, len(rows)))
        ids, mask = pad_rows([rows[i] for i in picked], tokenizer.pad_token_id, device)
        return attacked(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss

    torch.manual_seed(seed)
    rng = random.Random(seed)
    return finetune_curve(model, loss_at, accuracy, lambda params: torch.optim.AdamW(params, lr=attack.lr),
                          steps=attack.steps, every=every, initial=initial, where=f" of attack {attack.name}",
                          wrap=(lambda m: _with_lora(m, attack.lora_rank)) if attack.lora_rank is not None else None,
                          schedule=lambda optimizer: _scheduler(optimizer, attack))


def finetune_curve(model, loss_at, measure, optimizer, *, steps: int, every: int, initial: float | None = None,
                   where: str = "", wrap=None, schedule=None) -> list[tuple[int, float]]:
    """The fine-tuning loop every attack shares (LLM and classifier tracks): a deep copy of
    ``model`` — every weight trainable, or ``wrap(copy)`` (which freezes what it does not train,
    as LoRA does) — takes ``steps`` steps of ``loss_at(copy, step)`` (train mode) with
    ``optimizer(trainable parameters)`` and ``schedule(optimizer)``'s learning rates (constant
    without); returns ``[(step, measure(copy))]`` at step 0 (``initial`` when given), every
    ``every`` steps and at ``steps``. A non-finite loss raises FloatingPointError naming the step
    (and ``where``). ``model`` itself is left untouched."""
    attacked = copy.deepcopy(model)
    for p in attacked.parameters():
        p.requires_grad_(True)
    if wrap is not None:
        attacked = wrap(attacked)
    opt = optimizer([p for p in attacked.parameters() if p.requires_grad])
    scheduler = schedule(opt) if schedule is not None else None
    curve = [(0, measure(attacked) if initial is None else initial)]
    for step in range(1, steps + 1):
        attacked.train()
        loss = loss_at(attacked, step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"relearning loss is {float(loss.detach())} at step {step}{where}: the model "
                                     "produces non-finite logits")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        if step % every == 0 or step == steps:
            curve.append((step, measure(attacked)))
    return curve


def attack_suite(model, tokenizer, forget_texts: list[str], retain_texts: list[str], heldout_questions, *,
                 attacks: tuple[Attack, ...] = SUITE, every: int = 10, batch_size: int = 8, seed: int = 0,
                 format: str = "cloze", metric: str = "acc") -> dict:
    """Every attack of ``attacks`` on ``model``: ``{"initial_acc", "attacks": {name: {"curve",
    "max_acc", "lr", "steps"}}, "worst"}`` — ``worst`` is the attack reaching the highest held-out
    accuracy (the first listed on ties). ``forget_texts`` are the attacker's forget-fact texts,
    ``retain_texts`` the unrelated ones of the ``retain`` attack."""
    if not attacks:
        raise UserError("attacks is empty: give at least one attack")
    names = [a.name for a in attacks]
    if len(set(names)) != len(names):
        raise UserError(f"attack names repeat: {names}")
    if not heldout_questions:
        raise UserError("the attack suite needs held-out questions")
    for attack in attacks:
        check_attack(tokenizer, attack, retain_texts if attack.data == "retain" else forget_texts, every=every,
                     batch_size=batch_size, metric=metric)
    heldout = scores.prepare(tokenizer, heldout_questions, format)
    initial = float(scores.score(model, tokenizer, heldout)[metric].mean())
    results = {}
    for attack in attacks:
        texts = retain_texts if attack.data == "retain" else forget_texts
        curve = attack_curve(model, tokenizer, attack, texts, heldout, every=every, batch_size=batch_size,
                             seed=seed, initial=initial, format=format, metric=metric)
        results[attack.name] = {"curve": curve, "max_acc": max(a for _, a in curve), "lr": attack.lr,
                                "steps": attack.steps}
    worst = max(names, key=lambda n: (results[n]["max_acc"], -names.index(n)))
    return {"initial_acc": initial, "attacks": results, "worst": worst, "metric": metric, "format": format}
