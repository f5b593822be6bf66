"""Class-wise unlearning baselines and the interface every classifier method shares.

``Method(model, config, **overrides).fit(split)`` unlearns ``split.forget_classes`` from
``model`` in place (a ``SmallCNN`` or any module with ``features(x)`` and ``head``), logs the
losses per step in ``history`` and returns the method; ``report()`` says what was done.
Configs are typed as the LLM methods' are (``methods.settings``): a value out of its range
is a one-line ``SettingError`` naming the setting when the method is made, before any work.
A step ends as the LLM methods' do (``methods.base.optimizer_step``, ``log_step``): a loss
term or a weight that is not finite raises ``NonFiniteError`` naming the step.
``fit(split, checkpoint=Checkpointer(path, every=k))`` writes a resumable checkpoint
(``methods.checkpoint``) after every ``k``-th epoch and on SIGINT/SIGTERM, and
``resume=True`` continues from it bit for bit.
Training data: retain ∪ forget training images (``uses_forget``) or the retain images only,
shuffled per epoch, Adam without weight decay (so a parameter whose gradient is always
masked to zero never moves). ``F = forget`` and ``R = retain`` below; ``CE`` is cross-entropy
averaged over the samples of that group in the batch (0 when the batch has none).

- Retrain:  re-initialise every layer, train ``CE(R)`` with the original recipe (the gold standard).
- FineTune: ``CE(R)`` from the trained weights (forgetting by catastrophic interference).
- RandomLabel (RL): ``CE(R ∪ F)`` where each forget image carries a label drawn uniformly from
  the retain classes (never its true class), once (``resample_each_epoch=False``: a consistent
  target, as a relabelled dataset) or anew every epoch.
- NegGrad+ (Kurmanji et al., 2023): ``β·CE(R) − (1 − β)·CE(F)``.
- SalUn (Fan et al., 2024): the saliency mask ``m = 1[|∇_θ Σ_F CE| in the top `fraction` of all
  weights]`` (one global threshold over every trainable tensor), then RL with ``∇θ ← m ⊙ ∇θ``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..data.class_split import ClassSplit
from ..errors import UserError
from ..eval.classifier import accuracy
from ..methods.base import check_finite, log_step, optimizer_step
from ..methods.checkpoint import RunInterrupted
from ..methods.settings import Auto, Count, Fraction, Integer, Positive, Share, config_dataclass, make_config
from ..models.output_dir import marker
from .model import TRAIN_RECIPE, shuffled_batches

Epochs = Annotated[Count, Field(description="passes over the training data (fewer when stop_at_forget_acc is met)")]
LearningRate = Annotated[Positive, Field(description="Adam's learning rate")]
BatchSize = Annotated[Count, Field(description="images per step")]
Resample = Annotated[bool, Field(description=(
    "draw the forget images' new labels anew every epoch (false: once, as a relabelled dataset)"))]


@config_dataclass
class ClassifierConfig:
    """Fields every classifier method has."""

    epochs: Epochs = 5
    lr: LearningRate = 1e-3
    batch_size: BatchSize = 64
    seed: Annotated[Integer, Field(description="seeds the batch order and every random draw")] = 0
    progress: Annotated[bool, Field(description="progress bar")] = True
    stop_at_forget_acc: Annotated[Auto[Share], Field(description=(
        "stop after the first epoch whose forget-set accuracy (eval mode) is <= this; None: run every epoch"))] = None


def group_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values[mask]``; an exact 0 (still in the graph) when the mask is empty."""
    return values[mask].mean() if bool(mask.any()) else values.sum() * 0.0


def random_labels(n: int, classes: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """``n`` labels drawn uniformly from ``classes``."""
    pool = torch.tensor(classes, dtype=torch.int64)
    return pool[torch.randint(len(pool), (n,), generator=generator)]


class ClassifierMethod:
    """Base class: the config, the data, the epoch loop, checkpoints and the report."""

    name = "method"
    config_class = ClassifierConfig
    uses_forget = True   # train on retain ∪ forget (False: on retain only)

    def __init__(self, model: nn.Module, config: ClassifierConfig | None = None, **overrides):
        if not (isinstance(model, nn.Module) and hasattr(model, "features") and hasattr(model, "head")):
            raise TypeError(f"{self.name}: model must be an nn.Module with features(x) and a head, "
                            f"got {type(model).__name__}")
        self.config = make_config(self.config_class, config, **overrides)
        self.model = model
        self.history: list[dict] = []
        self.data: dict = {}
        self.time_s = 0.0
        self.epochs_run = 0
        self.check_config()

    def check_config(self) -> None:
        """Checks the field types cannot make (the environment, several fields together)."""

    # --- the loop ------------------------------------------------------------------------
    def fit(self, split: ClassSplit, *, checkpoint=None, resume: bool = False) -> "ClassifierMethod":
        """Unlearn ``split.forget_classes``. ``checkpoint`` (a ``methods.checkpoint.Checkpointer``)
        writes a checkpoint after every ``checkpoint.every``-th epoch and, on SIGINT/SIGTERM, after
        the current epoch (then raises ``RunInterrupted``); ``resume=True`` continues from it, on
        the same original model, config and split, and ends bit for bit where an uninterrupted run
        would. The checkpoint stays until the caller removes it (``checkpoint.remove()``)."""
        from tqdm import tqdm

        if resume and checkpoint is None:
            raise UserError(f"{self.name}: resume=True needs a checkpoint")
        if not isinstance(split, ClassSplit):
            raise TypeError(f"{self.name}: split must be a ClassSplit, got {type(split).__name__}")
        classes = getattr(self.model, "num_classes", split.num_classes)
        if classes != split.num_classes:
            raise UserError(f"{self.name}: split has {split.num_classes} classes, the model {classes}")
        start = time.perf_counter()
        self.data = split.describe()
        self.split = split
        (xr, yr), (xf, yf) = split.retain, split.forget
        self.n_retain, self.n_forget = len(yr), len(yf)
        self.x = torch.cat([xr, xf]) if self.uses_forget else xr
        self.y = torch.cat([yr, yf]) if self.uses_forget else yr
        self.is_forget = torch.arange(len(self.y)) >= self.n_retain
        self.generator = torch.Generator().manual_seed(self.config.seed)
        torch.manual_seed(self.config.seed)
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.model.train()
        self.setup(split)
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimized = self.params        # what the optimizer updates (no master copies here)
        self.optimizer = self.make_optimizer()
        self.epochs_run = checkpoint.load(self) + 1 if resume else 0
        steps_per_epoch = math.ceil(len(self.y) / self.config.batch_size)
        bar = tqdm(total=self.config.epochs * steps_per_epoch, initial=self.epochs_run * steps_per_epoch,
                   desc=self.name, disable=not self.config.progress, leave=False)
        with checkpoint if checkpoint is not None else nullcontext():
            for epoch in range(self.epochs_run, self.config.epochs):
                self.run_epoch(epoch, bar)
                if self.forgotten(split):
                    break
                if checkpoint is not None and checkpoint.due(epoch):
                    checkpoint.save(self, epoch)
                    if checkpoint.stop_requested:
                        raise RunInterrupted(f"{self.name}: stopped after epoch {epoch}; checkpoint in "
                                             f"{checkpoint.path} (resume to continue)")
        bar.close()
        self.model.eval()
        self.time_s = time.perf_counter() - start
        return self

    def run_epoch(self, epoch: int, bar) -> None:
        """One shuffled pass over the training data, between ``start_epoch`` and ``end_epoch``."""
        self.start_epoch(epoch)
        for idx in shuffled_batches(len(self.y), self.config.batch_size, self.generator):
            step = len(self.history)
            losses = self.loss(self.x[idx], self.y[idx], self.is_forget[idx], idx)
            check_finite(self.name, step, losses)
            self.optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer_step(self, step, self.params)
            bar.update()
            log_step(self, bar, {k: float(v.detach()) for k, v in losses.items()}, epoch=epoch, step=step)
        self.end_epoch(epoch)
        self.epochs_run = epoch + 1

    def forgotten(self, split: ClassSplit) -> bool:
        """Whether ``stop_at_forget_acc`` is set and reached."""
        target = self.config.stop_at_forget_acc
        return target is not None and accuracy(self.model, *split.forget) <= target

    def forget_index(self, idx: Tensor, forget: Tensor) -> Tensor:
        """Positions in the forget set of the batch's forget samples."""
        return idx[forget] - self.n_retain

    def extra_state(self) -> dict:
        """What a checkpoint carries besides weights and optimizer state: the batch and label
        generator's state and the model's buffers (a CMF head's, batch-norm statistics)."""
        return {"generator": self.generator.get_state(),
                **{f"buffer.{n}": b for n, b in self.model.named_buffers()}}

    def load_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        with torch.no_grad():
            for n, b in self.model.named_buffers():
                b.copy_(state[f"buffer.{n}"])

    # --- hooks for subclasses ------------------------------------------------------------
    def setup(self, split: ClassSplit) -> None:
        """Work before the first step, a deterministic function of the model, the config and the
        split (a resumed run repeats it before loading its checkpoint)."""

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(list(self.params.values()), lr=self.config.lr)

    def start_epoch(self, epoch: int) -> None:
        """Called before each epoch's first batch."""

    def end_epoch(self, epoch: int) -> None:
        """Called after each epoch's last step."""

    def before_step(self) -> None:
        """Called between backward and the optimizer step."""

    def loss(self, x: Tensor, y: Tensor, forget: Tensor, idx: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def report(self) -> dict:
        return {"unlearn_kernels": marker(), "method": self.name, "config": dataclasses.asdict(self.config),
                "data": self.data, "time_s": self.time_s, "epochs_run": self.epochs_run, "steps": len(self.history),
                "final_losses": self.history[-1] if self.history else None}


def _has_trainable_head(model: nn.Module) -> bool:
    return any(True for _ in model.head.parameters())


class FineTune(ClassifierMethod):
    """``CE(R)``: keep training on the retain images only."""

    name = "FT"
    uses_forget = False

    def loss(self, x, y, forget, idx):
        return {"retain": F.cross_entropy(self.model(x), y)}


@config_dataclass
class RetrainConfig(ClassifierConfig):
    epochs: Epochs = TRAIN_RECIPE["epochs"]
    lr: LearningRate = TRAIN_RECIPE["lr"]
    batch_size: BatchSize = TRAIN_RECIPE["batch_size"]


class Retrain(FineTune):
    """Re-initialise every layer (seeded) and train ``CE(R)`` with the original recipe."""

    name = "Retrain"
    config_class = RetrainConfig

    def setup(self, split):
        if not _has_trainable_head(self.model):
            raise UserError("Retrain: the model's head has no parameters (a CMF head); retrain a model "
                            "with a linear head")
        self.model.reset_parameters(self.config.seed)


@config_dataclass
class RandomLabelConfig(ClassifierConfig):
    resample_each_epoch: Resample = False


class RandomLabel(ClassifierMethod):
    """``CE(R ∪ F)`` with forget labels drawn uniformly from the retain classes."""

    name = "RL"
    config_class = RandomLabelConfig

    def draw_targets(self) -> None:
        self.forget_targets = random_labels(self.n_forget, self.split.retain_classes, self.generator)

    def setup(self, split):
        self.draw_targets()

    def start_epoch(self, epoch):
        if epoch > 0 and self.config.resample_each_epoch:
            self.draw_targets()

    def loss(self, x, y, forget, idx):
        targets = y.clone()
        targets[forget] = self.forget_targets[self.forget_index(idx, forget)]
        return {"ce": F.cross_entropy(self.model(x), targets)}


@config_dataclass
class NegGradPlusConfig(ClassifierConfig):
    epochs: Epochs = 3
    beta: Annotated[Share, Field(description=(
        "weight of the retain loss; 1 - beta on the (negated, unbounded) forget loss"))] = 0.99


class NegGradPlus(ClassifierMethod):
    """``β·CE(R) − (1 − β)·CE(F)``."""

    name = "NegGrad+"
    config_class = NegGradPlusConfig

    def loss(self, x, y, forget, idx):
        ce = F.cross_entropy(self.model(x), y, reduction="none")
        return {"retain": self.config.beta * group_mean(ce, ~forget),
                "forget": -(1.0 - self.config.beta) * group_mean(ce, forget)}


@config_dataclass
class SalUnConfig(RandomLabelConfig):
    fraction: Annotated[Fraction, Field(description=(
        "share of the weights (by |gradient| of the forget loss) that may move"))] = 0.5


def saliency_masks(model: nn.Module, x: Tensor, y: Tensor, fraction: float,
                   batch_size: int = 256) -> dict[str, Tensor]:
    """SalUn's weight-saliency masks: 1 on the ``ceil(fraction · #weights)`` entries with the
    largest ``|∂ Σ_F CE / ∂θ|`` (one global ranking over every trainable tensor, exact count)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        loss = F.cross_entropy(model(xb), yb, reduction="sum")
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            grads[n] += g
    scores = torch.cat([g.abs().flatten() for g in grads.values()])
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[scores.topk(math.ceil(fraction * scores.numel())).indices] = True
    masks, offset = {}, 0
    for n, g in grads.items():
        masks[n] = keep[offset:offset + g.numel()].view_as(g)
        offset += g.numel()
    return masks


class SalUn(RandomLabel):
    """RL restricted to the salient weights (``∇θ ← m ⊙ ∇θ`` before every step)."""

    name = "SalUn"
    config_class = SalUnConfig

    def setup(self, split):
        super().setup(split)
        xf, yf = split.forget
        self.masks = saliency_masks(self.model, xf, yf, self.config.fraction)
        self.masked = [(p, self.masks[n]) for n, p in self.model.named_parameters() if n in self.masks]

    def before_step(self):
        for p, mask in self.masked:
            if p.grad is not None:
                p.grad.mul_(mask)

    def report(self):
        kept = sum(int(m.sum()) for m in self.masks.values())
        total = sum(m.numel() for m in self.masks.values())
        return {**super().report(), "salient_weights": kept, "weights": total}
