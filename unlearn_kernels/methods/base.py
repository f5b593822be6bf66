"""The shared interface of the LLM unlearning methods.

A method is made from a model, its tokenizer and a config dataclass; ``fit(forget, retain)``
runs the unlearning (progress bar, loss log in ``history``) and returns the method;
``report()`` describes what was done. Config errors (unknown layer, no matching parameter,
empty forget set) raise before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..models.layers import check_layer, parameters_matching


@dataclass
class MethodConfig:
    """Fields every method has."""

    update: list[str] = field(default_factory=lambda: ["layers.{5,6,7}.mlp.down_proj"])
    lr: float = 5e-5
    batch_size: int = 4
    max_length: int = 512
    steps: int = 0            # 0: one pass over the forget batches
    seed: int = 0
    backend: str = "auto"     # fused-op backend
    progress: bool = True


def fingerprint(texts: list[str]) -> str:
    """SHA-256 of the texts (order-sensitive), to record which data a run saw."""
    digest = hashlib.sha256()
    for t in texts:
        digest.update(t.encode())
        digest.update(b"\0")
    return digest.hexdigest()


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
        if self.config.lr <= 0 or self.config.batch_size < 1 or self.config.steps < 0:
            raise ValueError(f"{self.name}: lr must be > 0, batch_size >= 1 and steps >= 0 (got {self.config})")
        if hasattr(self.config, "layer"):
            check_layer(self.model, self.config.layer)

    # --- data -----------------------------------------------------------------------------
    def batches(self, texts: list[str], seed_offset: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Endless shuffled batches of tokenised ``texts`` (padded, truncated)."""
        rng = random.Random(self.config.seed + seed_offset)
        device = next(self.model.parameters()).device
        order: list[int] = []
        while True:
            if len(order) < self.config.batch_size:
                order += rng.sample(range(len(texts)), len(texts))
            chosen, order = order[:self.config.batch_size], order[self.config.batch_size:]
            enc = self.tokenizer([texts[i] for i in chosen], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.config.max_length)
            yield {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def num_steps(self, forget: list[str]) -> int:
        return self.config.steps or -(-len(forget) // self.config.batch_size)

    # --- the loop --------------------------------------------------------------------------
    def fit(self, forget: list[str], retain: list[str]) -> "UnlearningMethod":
        from tqdm import tqdm

        if not forget:
            raise ValueError(f"{self.name}: the forget set is empty")
        if not retain and self.needs_retain:
            raise ValueError(f"{self.name}: the retain set is empty")
        self._record_data(forget, retain)
        torch.manual_seed(self.config.seed)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.params.values():
            p.requires_grad_(True)
        self.model.train()
        self.setup(forget, retain)
        self.optimizer = optimizer = self.make_optimizer()
        forget_batches = self.batches(forget)
        retain_batches = self.batches(retain, 1) if retain else None
        steps = self.num_steps(forget)
        bar = tqdm(range(steps), desc=self.name, disable=not self.config.progress, leave=False)
        for step in bar:
            losses = self.loss(next(forget_batches), next(retain_batches) if retain_batches else None, step)
            total = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.before_step()
            optimizer.step()
            record = {k: float(v.detach()) for k, v in losses.items()}
            self.history.append({"step": step, **record})
            bar.set_postfix({k: f"{v:.3g}" for k, v in record.items()})
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        return self

    def _record_data(self, forget: list[str], retain: list[str]) -> None:
        self.data = {"forget": {"n": len(forget), "sha256": fingerprint(forget)},
                     "retain": {"n": len(retain), "sha256": fingerprint(retain)}}

    def projections(self) -> dict[str, torch.Tensor]:
        """Tensors that must be saved beside the weights (MRP's bases); none by default."""
        return {}

    def saved_masks(self) -> dict[str, torch.Tensor]:
        """Neuron masks saved beside the weights (SIMU's selection); none by default."""
        return {}

    # --- hooks for subclasses ------------------------------------------------------------
    needs_retain = True

    def setup(self, forget: list[str], retain: list[str]) -> None:
        """Work before the first step (frozen copies, statistics)."""

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(list(self.params.values()), lr=self.config.lr, weight_decay=0.0)

    def before_step(self) -> None:
        """Called between backward and the optimizer step."""

    def loss(self, forget_batch, retain_batch, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def report(self) -> dict:
        return {"method": self.name, "config": dataclasses.asdict(self.config),
                "updated_parameters": sorted(self.params), "data": self.data,
                "final_losses": self.history[-1] if self.history else None}
