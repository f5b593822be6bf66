"""The shared interface of the LLM unlearning methods.

A method is made from a model, its tokenizer and a config dataclass; ``fit(forget, retain)``
runs the unlearning (progress bar, loss log in ``history``) and returns the method;
``report()`` describes what was done. Config errors (unknown layer, no matching parameter,
empty forget set) raise before any work starts.

``forget`` and ``retain`` are each a list of strings (documents) or a list of
``QAPair`` (TOFU-style question/answer pairs, ``data.loaders.read_qa_pairs``); a list
mixing the two raises ``ValueError``. A QA pair is tokenised as its full text
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
import math
import time
import random
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..data.loaders import QAPair
from ..models.layers import check_layer, parameters_matching

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


@dataclass
class MethodConfig:
    """Fields every method has."""

    update: list[str] = field(default_factory=lambda: ["layers.{5,6,7}.mlp.down_proj"])  # weights to change (glob/brace patterns)
    lr: float = 5e-5          # learning rate
    batch_size: int = 4       # texts per step (each of forget and retain)
    max_length: int = 512     # tokens per text (longer ones are truncated)
    steps: int = 0            # 0: one pass over the forget batches
    seed: int = 0             # seeds the batch order and every random draw
    backend: str = "auto"     # fused-op backend
    progress: bool = True     # progress bar


def fingerprint(items: list) -> str:
    """SHA-256 of the texts (order-sensitive; a QA pair counts as its ``text``), to record
    which data a run saw."""
    digest = hashlib.sha256()
    for item in items:
        digest.update((item.text if isinstance(item, QAPair) else item).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def data_kind(items: list, what: str = "data") -> str:
    """``"text"`` for a list of strings, ``"qa"`` for a list of QA pairs; ValueError otherwise."""
    if all(isinstance(item, str) for item in items):
        return "text"
    if all(isinstance(item, QAPair) for item in items):
        return "qa"
    kinds = sorted({type(item).__name__ for item in items})
    if set(kinds) <= {"str", "QAPair"}:
        raise ValueError(f"{what} mixes strings and QAPair items: give only texts or only QA pairs")
    raise ValueError(f"{what} must be a list of strings or of QAPair, got items of type {', '.join(kinds)}")


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
        raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token (e.g. to its eos_token)")
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


class NonFiniteError(FloatingPointError):
    """A loss term or an updated weight stopped being finite: the run is aborted, nothing saved."""


def check_finite(method: str, step: int, losses: dict[str, torch.Tensor], params=()) -> None:
    """NonFiniteError naming the step and the loss term (or parameter) that is not finite."""
    for name, value in losses.items():
        if not bool(torch.isfinite(value.detach()).all()):
            raise NonFiniteError(f"{method}: loss term {name!r} is {float(value.detach())} at step {step}; "
                                 "aborting without saving (lower lr or steering?)")
    for name, p in (params.items() if isinstance(params, dict) else enumerate(params)):
        if not bool(torch.isfinite(p.detach()).all()):
            raise NonFiniteError(f"{method}: parameter {name} has non-finite values after step {step}; "
                                 "aborting without saving")


def check_finite_config(config) -> None:
    """ValueError naming the first config field holding a non-finite number."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"setting {f.name}={value!r} is not a finite number")


class UnlearningMethod:
    """Base class: parameter selection, batching, the training loop and the report."""

    name = "method"
    config_class = MethodConfig

    def __init__(self, model: nn.Module, tokenizer, config: MethodConfig | None = None, **overrides):
        self.config = dataclasses.replace(config or self.config_class(), **overrides)
        self.model = model
        self.tokenizer = tokenizer
        self.history: list[dict] = []
        self.data: dict = {}
        self.check_config()
        self.params = parameters_matching(model, self.config.update) if self.config.update else {}

    def check_config(self) -> None:
        """Raise ValueError on a config that cannot run (before any work)."""
        check_finite_config(self.config)
        defaults = self.config_class()
        for name, why in self.unused_settings.items():
            if getattr(self.config, name) != getattr(defaults, name):
                raise ValueError(f"{self.name} does not use the setting {name} ({why}); leave it out")
        if self.config.lr <= 0 or self.config.batch_size < 1 or self.config.steps < 0:
            raise ValueError(f"{self.name}: lr must be > 0, batch_size >= 1 and steps >= 0 (got {self.config})")
        if hasattr(self.config, "layer"):
            check_layer(self.model, self.config.layer)

    # --- data -----------------------------------------------------------------------------
    def batches(self, items: list, seed_offset: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Endless shuffled batches of tokenised ``items`` (padded, truncated).

        Texts give ``input_ids`` and ``attention_mask``; QA pairs also a ``loss_mask`` on
        the answer tokens (see the module docstring; call the model on ``model_inputs``).
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
                yield collate_qa(self.tokenizer, [encoded[i] for i in chosen], device)
                continue
            enc = self.tokenizer([items[i] for i in chosen], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.config.max_length)
            yield {k: v.to(device) for k, v in enc.items() if k in MODEL_KEYS}

    def num_steps(self, forget: list) -> int:
        return self.config.steps or -(-len(forget) // self.config.batch_size)

    # --- the loop --------------------------------------------------------------------------
    def fit(self, forget: list, retain: list, *, checkpoint=None, resume: bool = False) -> "UnlearningMethod":
        """Unlearn ``forget`` (strings or QA pairs) while keeping ``retain``.

        ``checkpoint`` (a :class:`~unlearn_kernels.methods.checkpoint.Checkpointer`) writes
        resumable checkpoints every ``checkpoint.every`` steps and on SIGINT/SIGTERM (then
        raises ``RunInterrupted``); ``resume=True`` continues from its last checkpoint, on the
        same original model, config and data, and ends bit for bit where an uninterrupted run
        would."""
        from contextlib import nullcontext

        from tqdm import tqdm

        from .checkpoint import RunInterrupted

        if not forget:
            raise ValueError(f"{self.name}: the forget set is empty")
        if not retain and self.needs_retain:
            raise ValueError(f"{self.name}: the retain set is empty")
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
        self.optimizer = self.make_optimizer()
        forget_batches = self.batches(forget)
        retain_batches = self.batches(retain, 1) if retain else None
        steps = self.num_steps(forget)
        start = 0
        if resume:
            if checkpoint is None:
                raise ValueError(f"{self.name}: resume=True needs a checkpoint")
            start = checkpoint.load(self) + 1
            for _ in range(start):       # replay the batch order without running the steps
                next(forget_batches)
                if retain_batches is not None:
                    next(retain_batches)
        with checkpoint if checkpoint is not None else nullcontext():
            bar = tqdm(range(start, steps), desc=self.name, disable=not self.config.progress, leave=False)
            for step in bar:
                self._step(step, forget_batches, retain_batches, bar)
                if checkpoint is not None and checkpoint.due(step):
                    checkpoint.save(self, step)
                    if checkpoint.stop_requested:
                        raise RunInterrupted(f"{self.name}: stopped after step {step}; checkpoint in "
                                             f"{checkpoint.path} (resume to continue)")
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._finish_run()
        return self

    def _step(self, step: int, forget_batches, retain_batches, bar) -> None:
        """One optimisation step: loss, finiteness checks, backward, update, history."""
        optimizer = self.optimizer
        losses = self.loss(next(forget_batches), next(retain_batches) if retain_batches else None, step)
        check_finite(self.name, step, losses)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        if not self._checked_gradients and not total.requires_grad:
            raise ValueError(f"{self.name}: no selected parameter gets a gradient from the loss "
                             f"({', '.join(sorted(self.params)) or 'none selected'}): choose weights at or below "
                             "the loss layer with update=[...]")
        total.backward()
        if not self._checked_gradients:
            idle = sorted(n for n, p in self.params.items() if p.grad is None)
            if idle:
                raise ValueError(f"{self.name}: {len(idle)} selected parameter(s) get no gradient from the loss "
                                 f"and would not change: {', '.join(idle[:6])}{' ...' if len(idle) > 6 else ''} "
                                 "(above the loss layer?); drop them from update")
            self._checked_gradients = True
        self.before_step()
        optimizer.step()
        check_finite(self.name, step, {}, self.params)
        record = {k: float(v.detach()) for k, v in losses.items()}
        self.history.append({"step": step, **record})
        bar.set_postfix({k: f"{v:.3g}" for k, v in record.items()})

    def extra_state(self) -> dict:
        """JSON-able counters a checkpoint must carry besides weights and optimizer state."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore :meth:`extra_state`."""

    # --- what a run did ------------------------------------------------------------------
    def _start_run(self) -> None:
        """Host copies of the selected weights (to report what really changed), the clock and
        the peak-memory counters."""
        self._originals = {n: p.detach().to("cpu", copy=True) for n, p in self.params.items()}
        self._started = time.perf_counter()
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def _finish_run(self) -> None:
        import resource

        device = next(self.model.parameters()).device
        originals = getattr(self, "_originals", {})
        self.changes = {n: float((p.detach().cpu().float() - originals[n].float()).abs().max())
                        for n, p in self.params.items() if n in originals and p.numel()}
        peak = {"cpu_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if device.type == "cuda":
            peak["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        self.run_info = {"wall_time_s": time.perf_counter() - getattr(self, "_started", time.perf_counter()),
                         "peak_memory": peak, "device": str(device),
                         "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch.")}
        self._originals = {}

    def _record_data(self, forget: list, retain: list) -> None:
        """Check the data (ValueError on a mixed list) and record its size and fingerprint."""
        kinds = {"forget": data_kind(forget, f"{self.name}: the forget set"),
                 "retain": data_kind(retain, f"{self.name}: the retain set")}
        self.data = {"forget": {"n": len(forget), "kind": kinds["forget"], "sha256": fingerprint(forget)},
                     "retain": {"n": len(retain), "kind": kinds["retain"], "sha256": fingerprint(retain)}}

    def projections(self) -> dict[str, torch.Tensor]:
        """Tensors that must be saved beside the weights (MRP's bases); none by default."""
        return {}

    def saved_masks(self) -> dict[str, torch.Tensor]:
        """Neuron masks saved beside the weights (SIMU's selection); none by default."""
        return {}

    # --- hooks for subclasses ------------------------------------------------------------
    needs_retain = True
    unused_settings: dict[str, str] = {}   # inherited fields a method ignores: setting one is refused

    def setup(self, forget: list, retain: list) -> None:
        """Work before the first step (frozen copies, statistics)."""

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(list(self.params.values()), lr=self.config.lr, weight_decay=0.0)

    def before_step(self) -> None:
        """Called between backward and the optimizer step."""

    def loss(self, forget_batch, retain_batch, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def report(self) -> dict:
        from ..models.io import MASKS, PROJECTIONS
        from ..models.output_dir import marker, versions

        changes = getattr(self, "changes", {})
        needs = ([PROJECTIONS] if self.projections() else []) + ([MASKS] if self.saved_masks() else [])
        return {"unlearn_kernels": marker(git_commit=_git_commit()),
                "method": self.name, "config": dataclasses.asdict(self.config),
                "updated_parameters": {n: {"max_abs_delta": d} for n, d in sorted(changes.items()) if d > 0},
                "selected_but_unchanged": sorted(n for n, d in changes.items() if d == 0),
                "needs": needs, "data": self.data, "history": self.history,
                "final_losses": self.history[-1] if self.history else None,
                **getattr(self, "run_info", {}), "versions": versions()}
