"""The shared interface of the LLM unlearning methods, and the end of a step that every method
shares, the classifier track's too (``check_finite``, ``optimizer_step``, ``log_step``:
NonFiniteError naming the step, the update, the loss log and the progress bar).

A method is made from a model, its tokenizer and a config dataclass; ``fit(forget, retain)``
runs the unlearning (progress bar, loss log in ``history``) and returns the method;
``report()`` describes what was done. Config errors (unknown layer, no matching parameter,
empty forget set) raise before any work starts.

``forget`` and ``retain`` are each a list of strings (documents) or a list of
``QAPair`` (TOFU-style question/answer pairs, ``data.loaders.read_qa_pairs``); a list
mixing the two raises ``UserError``. A QA pair is tokenised as its full text
``prompt + answer`` and its batches carry, besides ``input_ids``/``attention_mask``, a
``loss_mask`` ``[b, T]`` that is 1 exactly on the answer tokens (not on the prompt, on
special tokens the tokenizer adds such as BOS/EOS, or on padding; a pair whose answer is
cut off by ``max_length`` has none). ``loss_mask`` is not a model input: code that calls
the model passes ``model_inputs(batch)``. The loss-based objectives (GradAscent, GradDiff,
NPO, SO-GradDiff, SIMU's scoring and training, MRP's optional basis training) put their
NLL on the answer tokens only; the representation objectives (RMU, Adaptive RMU and SRMU
activations and moments, MRP's Gram matrices) treat a QA pair as its full text (every
non-padding token).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import time
import warnings
from typing import Annotated, Iterator, Literal

import torch
from pydantic import Field
from torch import nn

from ..data.loaders import QAPair
from ..errors import UserError
from ..models.layers import check_layer, layer_index_of, parameters_matching
from ..models.roles import ROLES, find_roles, hidden_size
from ..ops import disruption_mask_
from ..ops._backend import BACKENDS
from . import collapse, distill, distributed
from .spec import MethodSpec
from .settings import (Auto, Count, Integer, NonNegative, NonNegativeInt, Patterns, Positive, Share,
                       config_dataclass, make_config)

MODEL_KEYS = ("input_ids", "attention_mask")


def _git_commit() -> str | None:
    """The commit of the package's source checkout, when it is one."""
    import subprocess
    from pathlib import Path

    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@config_dataclass
class MethodConfig:
    """Fields every method has. ``None`` (``auto`` on the command line) is chosen from the model
    when the method is built (``models.roles``) and recorded in the report."""

    update: Annotated[Auto[Patterns], Field(description=(
        "weights to change (glob/brace patterns); auto: the method's MLP band by structure"))] = None
    lr: Annotated[Auto[Positive], Field(description="learning rate; auto: the method's 7B rate x 4096 / hidden size")] = None
    batch_size: Annotated[Count, Field(description="texts per batch (each of forget and retain)")] = 4
    max_length: Annotated[Count, Field(description="tokens per text (longer ones are truncated)")] = 512
    steps: Annotated[NonNegativeInt, Field(description="optimizer steps; 0: epochs passes over the forget set")] = 0
    epochs: Annotated[Count, Field(description="passes over the forget set when steps is 0")] = 1
    grad_accum: Annotated[Count, Field(description="batches per optimizer step (gradients averaged)")] = 1
    master_dtype: Annotated[Auto[Literal["float32"]], Field(description=(
        "float32: fp32 master copies of the updated weights of a bf16/fp16 model"))] = None
    checkpointing: Annotated[bool, Field(description=(
        "activation checkpointing: decoder layers recompute their activations in backward"))] = False
    seed: Annotated[Integer, Field(description="seeds the batch order and every random draw")] = 0
    backend: Annotated[Literal[("auto",) + BACKENDS], Field(description="fused-op backend")] = "auto"
    progress: Annotated[bool, Field(description="progress bar")] = True
    disruption_mask: Annotated[bool, Field(description=(
        "update a weight only where the unlearning and the retain gradients agree in sign (MUDMAN); "
        "the retain gradient is added in full"))] = False
    sam_rho: Annotated[NonNegative, Field(description=(
        "sharpness-aware unlearning (Fan et al., 2025), radius rho of the weight perturbation: the unlearning "
        "gradient is taken at theta + rho g/||g|| (g: the unlearning gradient at theta, ||.|| over all updated "
        "weights), the retain gradient at theta; 0: off"))] = 0.0
    collapse_rank: Annotated[NonNegativeInt, Field(le=256, description=(
        "collapse of irrelevant representations (CIR, Sondej & Yang 2025), k: the unlearning terms' gradient "
        "of each updated Linear weight is taken from its inputs with the top-k principal directions of the "
        "retain inputs removed (methods.collapse); the retain gradient stays plain; 0: off"))] = 0
    collapse_batches: Annotated[Count, Field(description=(
        "retain batches whose Linear inputs give collapse_rank's principal directions"))] = 8
    collapse_step: Annotated[bool, Field(description=(
        "with collapse_rank, also take each collapsed weight's whole optimizer step (retain term included) off "
        "the retain directions: AdamW's element-wise scaling otherwise puts part of it back there"))] = False
    distill_noise: Annotated[Share, Field(description=(
        "UNDO (Lee et al., 2025) after unlearning: alpha of the student theta_S = (1-alpha) theta_T + alpha beta N "
        "(N a fresh initialisation), distilled from the unlearned teacher on the retain texts; 0: off"))] = 0.0
    distill_steps: Annotated[NonNegativeInt, Field(description=(
        "distillation steps (forward KL teacher -> student on retain batches); 0: as many as the unlearning "
        "steps"))] = 0
    distill_lr: Annotated[Auto[Positive], Field(description=(
        "AdamW rate of the distillation; auto: 1e-4 x 4096 / hidden size"))] = None
    distill_weights: Annotated[Literal["all", "mlp", "update"], Field(description=(
        "weights noised and distilled: all (the paper's), mlp (every layer's MLP projections) or update "
        "(the method's band only)"))] = "all"
    distill_scale: Annotated[NonNegative, Field(description=(
        "beta, the scale of the fresh initialisation N in the student"))] = 1.0


def fingerprint(items: list) -> str:
    """SHA-256 of the texts (order-sensitive; a QA pair counts as its ``text``), to record
    which data a run saw."""
    digest = hashlib.sha256()
    for item in items:
        digest.update((item.text if isinstance(item, QAPair) else item).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def data_kind(items: list, what: str = "data") -> str:
    """``"text"`` for a list of strings, ``"qa"`` for a list of QA pairs; UserError otherwise (one
    string is refused: it is not a list of texts)."""
    if isinstance(items, str):
        raise UserError(f"{what} must be a list of texts or QA pairs, got one string ({items[:40]!r})")
    if all(isinstance(item, str) for item in items):
        return "text"
    if all(isinstance(item, QAPair) for item in items):
        return "qa"
    kinds = sorted({type(item).__name__ for item in items})
    if set(kinds) <= {"str", "QAPair"}:
        raise UserError(f"{what} mixes strings and QAPair items: give only texts or only QA pairs")
    raise UserError(f"{what} must be a list of strings or of QAPair, got items of type {', '.join(kinds)}")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's inputs of a batch (drops ``loss_mask`` and any other bookkeeping key)."""
    return {k: v for k, v in batch.items() if k in MODEL_KEYS}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_qa(tokenizer, pairs: list[QAPair], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, answer mask) of each pair's ``text``, special tokens included, truncated.

    The answer tokens are those of ``prompt + answer`` after the prompt's tokens (the
    longest common prefix of the two token sequences, so a token merged across the
    boundary counts as answer). BOS/EOS the tokenizer adds are located by tokenising
    without special tokens and are never answer tokens. Truncation keeps ``max_length``
    tokens from the tokenizer's ``truncation_side``.
    """
    prompts = tokenizer([p.prompt for p in pairs], add_special_tokens=False)["input_ids"]
    contents = tokenizer([p.text for p in pairs], add_special_tokens=False)["input_ids"]
    fulls = tokenizer([p.text for p in pairs])["input_ids"]
    left = getattr(tokenizer, "truncation_side", "right") == "left"
    encoded = []
    for pair, prompt, content, full in zip(pairs, prompts, contents, fulls):
        prompt, content, full = list(prompt), list(content), list(full)
        start = next((i for i in range(len(full) - len(content) + 1) if full[i:i + len(content)] == content), None)
        if start is None:   # specials interleaved with content: count against the prompt with specials
            with_specials = list(tokenizer(pair.prompt)["input_ids"])
            special = set(tokenizer.all_special_ids)
            while with_specials and with_specials[-1] in special:
                with_specials.pop()
            begin, end = _common_prefix(with_specials, full), len(full)
        else:
            begin, end = start + _common_prefix(prompt, content), start + len(content)
        mask = [int(begin <= i < end) for i in range(len(full))]
        if len(full) > max_length:
            cut = slice(len(full) - max_length, None) if left else slice(0, max_length)
            full, mask = full[cut], mask[cut]
        encoded.append((full, mask))
    return encoded


def collate_qa(tokenizer, rows: list[tuple[list[int], list[int]]], device) -> dict[str, torch.Tensor]:
    """Pad encoded QA rows (the tokenizer's pad token and padding side)."""
    pad = tokenizer.pad_token_id
    if pad is None:
        raise UserError("the tokenizer has no pad token: set tokenizer.pad_token (e.g. to its eos_token)")
    width = max(len(ids) for ids, _ in rows)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    batch = {"input_ids": torch.full((len(rows), width), pad, dtype=torch.long),
             "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
             "loss_mask": torch.zeros((len(rows), width), dtype=torch.long)}
    for i, (ids, mask) in enumerate(rows):
        cols = slice(width - len(ids), width) if left else slice(0, len(ids))
        batch["input_ids"][i, cols] = torch.tensor(ids, dtype=torch.long)
        batch["attention_mask"][i, cols] = 1
        batch["loss_mask"][i, cols] = torch.tensor(mask, dtype=torch.long)
    return {k: v.to(device) for k, v in batch.items()}


def activation_checkpointing(model: nn.Module):
    """Within the block every decoder layer's ``forward`` runs under
    ``torch.utils.checkpoint`` (non-reentrant): its activations are recomputed in backward
    instead of stored. Forward hooks (the stop at layer l, MRP's projection) stay outside the
    recomputation, so they run once, as without checkpointing; any model with a decoder-layer
    list works, HF's ``gradient_checkpointing_enable`` is not needed."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    from ..models.layers import decoder_layers, overridden_forwards

    def wrapped(forward, *args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return overridden_forwards(model, {i: (lambda forward: partial(wrapped, forward))
                                       for i in range(len(decoder_layers(model)))})


class NonFiniteError(FloatingPointError):
    """A loss term or an updated weight stopped being finite: the run is aborted, nothing saved."""


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """``isfinite(t).all()`` as a 0-d bool tensor, from one read of ``t``: ``min(t)`` and
    ``max(t)`` are both finite exactly when every entry is (a NaN makes both NaN, ±inf is the
    max or the min); True for an empty tensor."""
    if t.numel() == 0 or not t.is_floating_point():
        return torch.ones((), dtype=torch.bool, device=t.device)
    return torch.isfinite(torch.stack(torch.aminmax(t))).all()


def check_finite(method: str, step: int, losses: dict[str, torch.Tensor], params=()) -> None:
    """NonFiniteError naming the step and the loss term (or parameter) that is not finite."""
    for name, value in losses.items():
        if not bool(torch.isfinite(value.detach()).all()):
            raise NonFiniteError(f"{method}: loss term {name!r} is {float(value.detach())} at step {step}; "
                                 "aborting without saving (lower lr or steering?)")
    from torch.distributed.tensor import DTensor

    named = list(params.items() if isinstance(params, dict) else enumerate(params))
    if not named:
        return
    # each rank checks its shard; one reduction gives every rank the same answer
    finite = torch.stack([all_finite((p.to_local() if isinstance(p, DTensor) else p).detach())
                          for _, p in named]).to(torch.int64)
    finite = distributed.total(finite)
    for (name, _), ranks in zip(named, finite.tolist()):
        if ranks != distributed.world_size():
            raise NonFiniteError(f"{method}: parameter {name} has non-finite values after step {step}; "
                                 "aborting without saving")


def optimizer_step(method, step: int, params) -> None:
    """The end of every method's step, LLM and classifier alike, after the backward pass:
    ``method.before_step()`` (gradient edits), ``method.optimizer.step()``, then NonFiniteError
    naming ``step`` and the first of ``params`` (name → tensor) that is no longer finite."""
    method.before_step()
    method.optimizer.step()
    check_finite(method.name, step, {}, params)


def log_step(method, bar, values: dict[str, float], **where) -> None:
    """``{**where, **values}`` appended to ``method.history``; ``values`` shown on the progress bar."""
    method.history.append({**where, **values})
    bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()})


class UnlearningMethod:
    """Base class: parameter selection, batching, the training loop and the report."""

    name = "method"
    spec = MethodSpec(config=MethodConfig, length="steps")   # each method declares its own (``methods.spec``)
    config_class = MethodConfig                             # ``spec.config``, set for every subclass

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.config_class = cls.spec.config

    def __init__(self, model: nn.Module, tokenizer, config: MethodConfig | None = None, **overrides):
        self.config = make_config(self.config_class, config, **overrides)
        model = distributed.unwrap(model)
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise UserError(f"{self.name}: {type(model).__name__} is an encoder-decoder; the methods unlearn "
                            "decoder-only causal LMs")
        self.model = model
        self.tokenizer = tokenizer
        self.history: list[dict] = []
        self.data: dict = {}
        self.spec.refuse_unused(self.config, self.name)
        self.chosen = self.resolve_defaults()
        self.check_config()
        self.params = parameters_matching(model, self.config.update) if self.config.update else {}
        self.check_selection()

    # --- defaults and checks ---------------------------------------------------------------
    reference_lr = 5e-5                    # the rate at hidden 4096 (7B) that auto lr scales from
    default_roles: tuple[str, ...] = ROLES  # MLP projections of the band a default update selects

    def model_roles(self):
        """The model's MLP roles (``models.roles.find_roles``), found once."""
        if getattr(self, "_roles", None) is None:
            self._roles = find_roles(self.model)
        return self._roles

    def resolve_defaults(self) -> dict:
        """Fill the ``None`` fields from the model (``models.roles``): the loss layer
        ``max(2, round(7/32 · depth))``, the update band (the ``default_roles`` projections of
        that layer and the two below it) and the learning rate ``reference_lr · 4096 / hidden``
        (Adam's step on a hidden matrix scales as 1/width, so the published 7B value carries
        over). Returns what was chosen (recorded in the report)."""
        config, chosen = self.config, {}
        has_layer = hasattr(config, "layer")
        if (has_layer and config.layer is None) or config.update is None:
            roles = self.model_roles()
            layer = config.layer if has_layer and config.layer is not None else roles.default_layer()
            if has_layer and config.layer is None:
                chosen["layer"] = layer
            if config.update is None:
                chosen["update"] = roles.patterns(roles.band(check_layer(self.model, layer)), self.default_roles)
        if config.lr is None:
            chosen["lr"] = float(f"{self.reference_lr * 4096 / hidden_size(self.model):.3g}")
        if getattr(config, "distill_noise", 0) and config.distill_lr is None:
            chosen["distill_lr"] = distill.auto_lr(hidden_size(self.model))
        self.config = dataclasses.replace(config, **chosen)
        return chosen

    def check_config(self) -> None:
        """UserError on a config that cannot run on this model or launch (before any work); the
        types and ranges of the settings are checked when the config is built (``methods.settings``)."""
        distributed.check_batch_size(self.name, self.config.batch_size)
        if hasattr(self.config, "layer"):
            check_layer(self.model, self.config.layer)

    def check_selection(self) -> None:
        """Representation methods read layer ``layer``: a selected weight above it gets no
        gradient and is refused by name here, before any work."""
        if not self.params or not getattr(self, "reads_layer", False):
            return
        top = check_layer(self.model, self.config.layer)
        above = sorted(n for n in self.params if (layer_index_of(self.model, n) or 0) > top)
        if above:
            raise UserError(f"{self.name}: {len(above)} selected parameter(s) sit above the loss layer {top} and "
                            f"would get no gradient: {', '.join(above[:4])}{' ...' if len(above) > 4 else ''}; "
                            f"choose weights in layers 0..{top}")

    # --- data -----------------------------------------------------------------------------
    def batches(self, items: list, seed_offset: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Endless shuffled batches of tokenised ``items`` (padded, truncated).

        Texts give ``input_ids`` and ``attention_mask``; QA pairs also a ``loss_mask`` on
        the answer tokens (see the module docstring; call the model on ``model_inputs``).
        Under ``torch.distributed`` every rank draws the same global batch, padded as one,
        and keeps its rows (``methods.distributed``).
        """
        kind = data_kind(items, f"{self.name}: the data")
        rng = random.Random(self.config.seed + seed_offset)
        device = next(self.model.parameters()).device
        encoded = None
        if kind == "qa":
            encoded = encode_qa(self.tokenizer, items, self.config.max_length)
            empty = sum(1 for _, mask in encoded if not any(mask))
            if empty:
                warnings.warn(f"{self.name}: {empty} of {len(items)} QA pairs have no answer token within "
                              f"max_length={self.config.max_length}; they add no loss", stacklevel=2)
        order: list[int] = []
        while True:
            if len(order) < self.config.batch_size:
                order += rng.sample(range(len(items)), len(items))
            chosen, order = order[:self.config.batch_size], order[self.config.batch_size:]
            if encoded is not None:
                yield distributed.local_rows(collate_qa(self.tokenizer, [encoded[i] for i in chosen], device))
                continue
            enc = self.tokenizer([items[i] for i in chosen], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.config.max_length)
            yield distributed.local_rows({k: v.to(device) for k, v in enc.items() if k in MODEL_KEYS})

    def num_steps(self, forget: list) -> int:
        per_step = self.config.batch_size * self.config.grad_accum
        return self.config.steps or -(-self.config.epochs * len(forget) // per_step)

    # --- the loop --------------------------------------------------------------------------
    def fit(self, forget: list, retain: list, *, checkpoint=None, resume: bool = False,
            monitor=None) -> "UnlearningMethod":
        """Unlearn ``forget`` (strings or QA pairs) while keeping ``retain``.

        ``checkpoint`` (a :class:`~unlearn_kernels.methods.checkpoint.Checkpointer`) writes
        resumable checkpoints every ``checkpoint.every`` steps and on SIGINT/SIGTERM (then
        raises ``RunInterrupted``); ``resume=True`` continues from its last checkpoint, on the
        same original model, config and data, and ends bit for bit where an uninterrupted run
        would. ``monitor`` (a :class:`~unlearn_kernels.target.TargetController`) measures the
        run as it goes, may stop it early, and sets the model to its best point at the end;
        its ``summary`` goes into the report (``"target"``)."""
        from contextlib import nullcontext

        from tqdm import tqdm

        from .checkpoint import RunInterrupted

        if not forget:
            raise UserError(f"{self.name}: the forget set is empty")
        if monitor is not None and (resume or distributed.active()):
            raise UserError(f"{self.name}: target-driven runs (validation questions) cannot resume a checkpoint or "
                            "run under torch.distributed yet; drop --resume/--parallel or the --val-* files")
        if not retain and self.spec.needs_retain:
            raise UserError(f"{self.name}: the retain set is empty")
        if self.config.disruption_mask and distributed.active():
            raise UserError(f"{self.name}: disruption_mask runs in one process (the mask of summed gradients is "
                            "not the sum of per-rank masks)")
        if self.config.sam_rho and distributed.active():
            raise UserError(f"{self.name}: sam_rho runs in one process (its perturbation needs the norm of the "
                            "whole batch's gradient before the update)")
        if self.config.collapse_rank and distributed.active():
            raise UserError(f"{self.name}: collapse_rank runs in one process (its bases come from one process's "
                            "retain batches)")
        if self.config.collapse_step and not self.config.collapse_rank:
            raise UserError(f"{self.name}: collapse_step needs collapse_rank > 0")
        distill.check(self, retain, checkpoint=checkpoint, resume=resume, monitor=monitor)
        self.distillation = None
        self.prepare(forget, retain)
        forget_batches = self.batches(forget)
        retain_batches = self.batches(retain, 1) if retain else None
        steps = self.num_steps(forget)
        start = 0
        if resume:
            if checkpoint is None:
                raise UserError(f"{self.name}: resume=True needs a checkpoint")
            start = checkpoint.load(self) + 1
            for _ in range(start * self.config.grad_accum):   # replay the batch order without the steps
                next(forget_batches)
                if retain_batches is not None:
                    next(retain_batches)
        checkpointed = activation_checkpointing(self.model) if self.config.checkpointing else nullcontext()
        self.target = None
        if monitor is not None:
            self._probe = (next(self.batches(forget, 21)), next(self.batches(retain, 22)) if retain else None)
            self.planned_steps = steps
            monitor.start(self)
        last = start - 1
        collapsing = self._collapse.installed() if self._collapse is not None else nullcontext()
        with checkpoint if checkpoint is not None else nullcontext(), checkpointed, collapsing:
            bar = tqdm(range(start, steps), desc=self.name, disable=not self.config.progress, leave=False)
            for step in bar:
                self._step(step, forget_batches, retain_batches, bar)
                last = step
                if checkpoint is not None and checkpoint.due(step):
                    checkpoint.save(self, step)
                    if checkpoint.stop_requested:
                        raise RunInterrupted(f"{self.name}: stopped after step {step}; checkpoint in "
                                             f"{checkpoint.path} (resume to continue)")
                if monitor is not None and monitor.after_step(self, step):
                    break
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if monitor is not None:
            self.target = monitor.finish(self, last)
        if self.config.distill_noise:
            self.distillation = distill.distill(self, retain, steps, model_inputs=model_inputs,
                                                check_finite=check_finite,
                                                activation_checkpointing=activation_checkpointing)
        self._finish_run()
        return self

    def prepare(self, forget: list, retain: list) -> None:
        """What :meth:`fit` does before its loop: record the data, seed, select the trainable
        weights, :meth:`setup`, the master copies and the optimizer."""
        self._record_data(forget, retain)
        self._start_run()
        self._checked_gradients = False
        torch.manual_seed(self.config.seed)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.params.values():
            p.requires_grad_(True)
        self.model.train()
        self.setup(forget, retain)
        self._collapse = collapse.build(self, retain) if self.config.collapse_rank else None
        self.optimized = self._master_copies()
        self.optimizer = self.make_optimizer()

    def _step(self, step: int, forget_batches, retain_batches, bar) -> None:
        """One optimisation step: ``grad_accum`` batches of loss and backward (each loss divided by
        ``grad_accum``, so the gradient is their mean), finiteness checks, update, history.
        Distributed, the loss terms are each rank's share of the global mean: their sum over the
        ranks is checked and logged, and the gradients are summed before the update.

        With ``disruption_mask``, ``sam_rho`` or ``collapse_rank`` the unlearning gradient (of every
        loss term but ``retain``) and the retain gradient are taken apart (``collapse_rank``: the
        unlearning one from collapsed Linear inputs, ``methods.collapse``); ``sam_rho`` then replaces the
        unlearning gradient by its value at the perturbed weights (:meth:`_sharpness_aware`) and
        ``disruption_mask`` masks it (:meth:`_masked_gradients`); the update gets their sum."""
        masters = self.optimized is not self.params
        sam = self.config.sam_rho > 0
        apart = self.config.disruption_mask or sam or bool(self.config.collapse_rank)
        self.optimizer.zero_grad(set_to_none=True)
        if masters:                       # the model's own weights collect the gradients
            for p in self.params.values():
                p.grad = None
        totals: dict[str, float] = {}
        split_grads: dict[str, dict] = {"unlearn": {}, "retain": {}}
        drawn = []
        for _ in range(self.config.grad_accum):
            forget_batch, retain_batch = next(forget_batches), next(retain_batches) if retain_batches else None
            if sam:
                drawn.append((forget_batch, retain_batch))
            losses = self.loss(forget_batch, retain_batch, step)
            values = distributed.summed_values(losses)
            check_finite(self.name, step, {k: torch.tensor(v) for k, v in values.items()})
            total = sum(losses.values())
            if not self._checked_gradients and not total.requires_grad:
                raise UserError(f"{self.name}: no selected parameter gets a gradient from the loss "
                                f"({', '.join(sorted(self.params)) or 'none selected'}): choose weights at or "
                                "below the loss layer with update=[...]")
            if apart:
                self._backward_apart(losses, split_grads)
            else:
                (total / self.config.grad_accum).backward()
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v / self.config.grad_accum
        if sam:
            split_grads["unlearn"] = self._sharpness_aware(drawn, split_grads["unlearn"], step)
        if self.config.disruption_mask:
            self._masked_gradients(split_grads)
        elif apart:
            for name, p in self.params.items():
                g, r = split_grads["unlearn"].get(name), split_grads["retain"].get(name)
                p.grad = r if g is None else g if r is None else g + r
        distributed.sum_gradients(self.params.values())
        if not self._checked_gradients:
            idle = sorted(n for n, p in self.params.items() if p.grad is None)
            if idle:
                raise UserError(f"{self.name}: {len(idle)} selected parameter(s) get no gradient from the loss "
                                f"and would not change: {', '.join(idle[:6])}{' ...' if len(idle) > 6 else ''} "
                                "(above the loss layer?); drop them from update")
            self._checked_gradients = True
        if masters:
            for name, p in self.params.items():
                self.optimized[name].grad = None if p.grad is None else p.grad.to(torch.float32)
        collapsed = getattr(self, "_collapse", None)
        before = collapsed.before_step(self.optimized) if collapsed is not None else None
        optimizer_step(self, step, self.optimized)
        if before:
            collapsed.project_step(self.optimized, before)
        if masters:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(self.optimized[name])
        log_step(self, bar, totals, step=step)

    def _backward_apart(self, losses: dict, grads: dict) -> None:
        """The gradients of the unlearning terms (every loss but ``retain``) and of the retain
        term (when there is one), each divided by ``grad_accum``, accumulated apart into ``grads``."""
        if "retain" not in losses and self.config.disruption_mask:
            raise UserError(f"{self.name}: disruption_mask needs a retain loss term (retain data and a "
                            "retain weight above 0)")
        parts = [("unlearn", sum(v for k, v in losses.items() if k != "retain"))]
        if "retain" in losses:
            parts.append(("retain", losses["retain"]))
        names, params = list(self.params), list(self.params.values())
        for i, (part, loss) in enumerate(parts):
            if not torch.is_tensor(loss) or not loss.requires_grad:
                continue
            keep = i + 1 < len(parts)
            with self._collapsing(part == "unlearn"):
                taken = torch.autograd.grad(loss / self.config.grad_accum, params, retain_graph=keep,
                                            allow_unused=True)
            for name, g in zip(names, taken):
                if g is not None:
                    grads[part][name] = g if name not in grads[part] else grads[part][name] + g

    def _collapsing(self, on: bool = True):
        """A block whose weight gradients are collapsed ones (``collapse_rank``) when ``on``."""
        from contextlib import nullcontext

        collapse = getattr(self, "_collapse", None)
        return collapse.unlearning() if on and collapse is not None else nullcontext()

    def unlearn_loss(self, forget_batch, retain_batch, step: int) -> dict[str, torch.Tensor]:
        """The unlearning terms of :meth:`loss` (every term but ``retain``), which ``sam_rho``
        evaluates a second time at the perturbed weights. The default computes the whole loss and
        drops ``retain``; a method whose forget terms can be had alone overrides it."""
        return {k: v for k, v in self.loss(forget_batch, retain_batch, step).items() if k != "retain"}

    def _sharpness_aware(self, drawn: list, grads: dict, step: int) -> dict:
        """Sharpness-aware unlearning (``sam_rho`` = ρ; Fan et al., 2025, "Towards LLM unlearning
        resilient to relearning attacks: a sharpness-aware minimization perspective").

        With ``L_u`` the unlearning loss (every term but ``retain``, minimised), ``g = ∇L_u(θ)`` its
        gradient over the step's batches ``drawn`` (``grads``, the mean over ``grad_accum``) and
        ``‖g‖`` the global 2-norm over every updated weight (fp32), the first-order worst point of
        ``L_u`` in the ball ``‖ε‖ ≤ ρ`` is ``ε = ρ g / ‖g‖``. The weights are moved to ``θ + ε``, the
        unlearning gradient ``∇L_u(θ + ε)`` is taken on the same batches, and the weights are put
        back exactly (copied from a saved copy, not subtracted). The update then uses
        ``∇L_u(θ + ε) + ∇L_r(θ)``: minimising ``max_{‖ε‖≤ρ} L_u(θ + ε) + L_r(θ)``, so the forget
        set stays unlearned in a neighbourhood of the weights, which is what a relearning attack
        explores. ``g = 0`` (or not finite) leaves ``g`` as it is. One step costs one more forward
        and backward of the unlearning terms. Returns the new unlearning gradients.

        Measured on the shipped benchmark (``benchmarks/RESULTS.md``, 2026-12-07, three seeds, the
        attack suite): a radius too large for the model stops the forgetting (GradDiff at ρ ≥ 0.1 on
        its 1 M-weight band); at ρ = 0.3 RMU's worst recovery fell from 81 to 76 %, at ρ = 0.01 NPO's
        moved within its seed spread (40 → 38 %); no setting met the robustness goal, which TAR meets
        on 2 of 3 seeds."""
        names = [n for n in self.params if n in grads]
        if not names:
            return grads
        norm = torch.stack([grads[n].detach().float().pow(2).sum() for n in names]).sum().sqrt()
        if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
            return grads
        scale = self.config.sam_rho / norm
        saved = {n: self.params[n].detach().clone() for n in names}
        with torch.no_grad():
            for n in names:
                p = self.params[n]
                p.add_((grads[n].float() * scale).to(p.dtype))
        perturbed: dict[str, torch.Tensor] = {}
        params = [self.params[n] for n in names]
        try:
            for forget_batch, retain_batch in drawn:
                losses = self.unlearn_loss(forget_batch, retain_batch, step)
                check_finite(self.name, step, {f"{k} (sam_rho)": v for k, v in losses.items()})
                loss = sum(losses.values()) / self.config.grad_accum
                with self._collapsing():
                    taken = torch.autograd.grad(loss, params, allow_unused=True)
                for n, g in zip(names, taken):
                    if g is not None:
                        perturbed[n] = g if n not in perturbed else perturbed[n] + g
        finally:
            with torch.no_grad():
                for n in names:
                    self.params[n].copy_(saved[n])
        return perturbed

    def _masked_gradients(self, grads: dict) -> None:
        """``p.grad = mask(g_unlearn, g_retain) + g_retain`` (``ops.disruption_mask_``): the
        unlearning gradient kept only where it agrees in sign with the retain gradient."""
        for name, p in self.params.items():
            g, r = grads["unlearn"].get(name), grads["retain"].get(name)
            if g is not None and r is not None:
                disruption_mask_(g, r, backend=self.config.backend)
                p.grad = g + r
            elif g is not None:     # the retain loss does not reach this weight: nothing agrees
                p.grad = torch.zeros_like(g)
            else:
                p.grad = r

    def _master_copies(self) -> dict[str, torch.Tensor]:
        """What the optimizer updates: the selected weights themselves, or with
        ``master_dtype="float32"`` fp32 copies of those held in a lower precision (the model,
        its activations and frozen copies stay in the model's dtype; each step rounds the
        masters into the model's weights, as mixed-precision training does)."""
        if self.config.master_dtype is None or all(p.dtype == torch.float32 for p in self.params.values()):
            return self.params
        return {n: p.detach().to(torch.float32).clone().requires_grad_(True) for n, p in self.params.items()}

    def chosen_by_structure(self) -> dict:
        """The settings filled from the model (``resolve_defaults``) and the roles they came from."""
        if not self.chosen:
            return {}
        roles = getattr(self, "_roles", None)
        return {**self.chosen, **({"roles": roles.describe()} if roles is not None else {})}

    def extra_state(self) -> dict:
        """JSON-able counters a checkpoint must carry besides weights and optimizer state."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore :meth:`extra_state`."""

    # --- what a run did ------------------------------------------------------------------
    def _start_run(self) -> None:
        """Host copies of the selected weights (to report what really changed), the clock and
        the peak-memory counters."""
        self._originals = {n: distributed.full(p).detach().to("cpu", copy=True) for n, p in self.params.items()}
        self._started = time.perf_counter()
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def _finish_run(self) -> None:
        import resource

        device = next(self.model.parameters()).device
        originals = getattr(self, "_originals", {})
        self.changes = {n: float((distributed.full(p).detach().cpu().float() - originals[n].float()).abs().max())
                        for n, p in self.params.items() if n in originals and p.numel()}
        peak = {"cpu_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if device.type == "cuda":
            peak["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        self.run_info = {"wall_time_s": time.perf_counter() - getattr(self, "_started", time.perf_counter()),
                         "peak_memory": peak, "device": str(device),
                         "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch.")}
        self._originals = {}

    def _record_data(self, forget: list, retain: list) -> None:
        """Check the data (UserError on a mixed list) and record its size and fingerprint."""
        kinds = {"forget": data_kind(forget, f"{self.name}: the forget set"),
                 "retain": data_kind(retain, f"{self.name}: the retain set")}
        self.data = {"forget": {"n": len(forget), "kind": kinds["forget"], "sha256": fingerprint(forget)},
                     "retain": {"n": len(retain), "kind": kinds["retain"], "sha256": fingerprint(retain)}}

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Host copies of what the run changes (the selected weights), for a target-driven run to
        return to its best point (:meth:`restore`)."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.params.items()}

    def restore(self, snapshot: dict[str, torch.Tensor] | None) -> None:
        """Set what the run changes back to ``snapshot``; None: to the model the run started from."""
        source = snapshot if snapshot is not None else (getattr(self, "_originals", None) or {})
        optimized = getattr(self, "optimized", self.params)
        with torch.no_grad():
            for targets in ((self.params,) if optimized is self.params else (self.params, optimized)):
                for name, p in targets.items():    # fp32 masters too, or the next step would undo it
                    if name in source:
                        p.copy_(source[name].to(p.device, p.dtype))

    def probe_signal(self) -> dict | None:
        """:meth:`stopping_signal` on the fixed probe batches of a monitored run, in eval mode
        (no dropout); None for a method without one."""
        probe = getattr(self, "_probe", None)
        if probe is None:
            return None
        training = self.model.training
        self.model.eval()
        try:
            return self.stopping_signal(*probe)
        finally:
            self.model.train(training)

    def projections(self) -> dict[str, torch.Tensor]:
        """Tensors that must be saved beside the weights (MRP's bases); none by default."""
        return {}

    def saved_masks(self) -> dict[str, torch.Tensor]:
        """Neuron masks saved beside the weights (SIMU's selection); none by default."""
        return {}

    # --- hooks for subclasses ------------------------------------------------------------
    stopping_rule = None                   # a stopping.StoppingRule: validation-free runs stop on it

    def setup(self, forget: list, retain: list) -> None:
        """Work before the first step (frozen copies, statistics)."""

    def make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW without weight decay; torch's fused kernel (one pass per tensor instead of about
        eight) where every updated tensor is a plain floating CPU or CUDA tensor (FSDP2's DTensors
        keep the per-op implementation). Both are torch's AdamW: equal to float rounding."""
        from torch.distributed.tensor import DTensor

        params = list(self.optimized.values())
        fused = all(not isinstance(p, DTensor) and p.is_floating_point()
                    and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(params, lr=self.config.lr, weight_decay=0.0, **({"fused": True} if fused else {}))

    def before_step(self) -> None:
        """Called between backward and the optimizer step."""

    def stopping_signal(self, forget_batch, retain_batch) -> dict | None:
        """Scale-free measures of progress on a forget and a retain probe batch, for the
        validation-free stopping rule (``unlearn_kernels.stopping``); None: the method has none."""
        return None

    def loss(self, forget_batch, retain_batch, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def report(self) -> dict:
        from ..models.io import MASKS, PROJECTIONS
        from ..models.output_dir import marker, versions

        changes = getattr(self, "changes", {})
        needs = ([PROJECTIONS] if self.projections() else []) + ([MASKS] if self.saved_masks() else [])
        return {"unlearn_kernels": marker(git_commit=_git_commit()),
                "method": self.name, "config": dataclasses.asdict(self.config),
                "chosen_by_structure": self.chosen_by_structure(),
                "updated_parameters": {n: {"max_abs_delta": d} for n, d in sorted(changes.items()) if d > 0},
                "selected_but_unchanged": sorted(n for n, d in changes.items() if d == 0),
                "needs": needs, "data": self.data, "history": self.history,
                "final_losses": self.history[-1] if self.history else None,
                **({"target": self.target} if getattr(self, "target", None) else {}),
                **({"collapse": {"rank": self.config.collapse_rank, "basis_rank": self._collapse.ranks()}}
                   if getattr(self, "_collapse", None) is not None else {}),
                **({"distillation": self.distillation} if getattr(self, "distillation", None) else {}),
                **getattr(self, "run_info", {}), "versions": versions()}
