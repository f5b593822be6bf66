"""The small CNN of the classifier track, its heads, its supervised training loop and the
shipped weights.

``SmallCNN`` = ``features`` (three 3×3 conv layers, max-pool, adaptive average pool to 2×2,
a fully connected layer; ReLU after each: the penultimate representation ``z``, ``[n, d]``)
followed by ``head`` (``nn.Linear(d, C)``, or a ``CMFHead``: the cosine nearest-class-mean
head of :mod:`unlearn_kernels.models.cmf_head`). ``model(x) = head(features(x))``. This module
is the bottom of the classifier track: it imports none of the others; its data
(:mod:`unlearn_kernels.data.class_split`) and the evaluation helpers it shares with the metrics
(:mod:`unlearn_kernels.eval.classifier`) live in the layers below.

``python -m unlearn_kernels.classifier.model`` trains it on the digits training split (Adam,
deterministic, ~98 % test accuracy) and saves ``config.json`` + ``model.safetensors``
atomically into ``unlearn_kernels/assets/digits-cnn`` (the package ships the result, ~100 kB).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.class_split import digits_split
from ..errors import MissingFileError, UserError
from ..eval.classifier import accuracy
from ..methods.base import check_finite
from ..models.cmf_head import CMFHead

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "digits-cnn"
WEIGHTS = "model.safetensors"
TRAIN_RECIPE = dict(epochs=30, lr=2e-3, batch_size=64)   # the shipped model's and Retrain's recipe


class SmallCNN(nn.Module):
    """A small CNN with a ``features(x)`` (penultimate, ``[n, feature_dim]``) and a ``head``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16, feature_dim: int = 64):
        super().__init__()
        self.config = dict(num_classes=num_classes, in_channels=in_channels, width=width, feature_dim=feature_dim)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(16 * width, feature_dim), nn.ReLU(),
        )
        self.head: nn.Module = nn.Linear(feature_dim, num_classes)

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]

    @property
    def feature_dim(self) -> int:
        return self.config["feature_dim"]

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def reset_parameters(self, seed: int) -> None:
        """Fresh initialisation (seeded) of every layer that has one (a CMF head keeps its buffers)."""
        torch.manual_seed(seed)
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    # --- saving ---------------------------------------------------------------------------
    def head_config(self) -> dict:
        if isinstance(self.head, CMFHead):
            return {"type": "cmf", "tau": self.head.tau, "center": self.head.center_mode}
        return {"type": "linear"}

    def save_pretrained(self, out_dir: Path | str, safe_serialization: bool = True) -> None:
        """``config.json`` and ``model.safetensors`` into ``out_dir`` (the interface
        ``models.io.save_pretrained_atomic`` drives; wrap calls in it for atomicity)."""
        from safetensors.torch import save_file

        if not safe_serialization:
            raise UserError("safe_serialization: only safetensors is written")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps({**self.config, "head": self.head_config()}, indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(out_dir / WEIGHTS))
        (out_dir / WEIGHTS).chmod(0o644)

    @classmethod
    def from_pretrained(cls, path: Path | str) -> "SmallCNN":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "config.json").is_file() or not (path / WEIGHTS).is_file():
            raise MissingFileError(f"{path} has no config.json + {WEIGHTS}; train the default model with "
                                   "`python -m unlearn_kernels.classifier.model`")
        config = json.loads((path / "config.json").read_text())
        head = config.pop("head", {"type": "linear"})
        model = cls(**config)
        if head["type"] == "cmf":
            model.head = CMFHead(model.feature_dim, model.num_classes, tau=head["tau"], center=head["center"])
        model.load_state_dict(load_file(str(path / WEIGHTS)))
        return model.eval()


def load_digits_cnn(path: Path | str = ASSET_DIR) -> SmallCNN:
    """The shipped digits CNN (or the one saved at ``path``), in eval mode."""
    return SmallCNN.from_pretrained(path)


# --- batches and the supervised loop ---------------------------------------------------------
def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Index batches of one shuffled pass over ``range(n)`` (the last one may be smaller)."""
    order = torch.randperm(n, generator=generator)
    yield from order.split(batch_size)


def train_supervised(model: SmallCNN, x: Tensor, y: Tensor, *, epochs: int, lr: float, batch_size: int = 64,
                     seed: int = 0, progress: bool = True, desc: str = "training",
                     refresh: Callable[[], None] | None = None) -> list[dict]:
    """Cross-entropy training of every trainable parameter with Adam; ``refresh`` (e.g. a CMF
    head rebuild) runs at the start and after every epoch. Returns the per-epoch loss log.
    A loss or weight that is not finite raises ``NonFiniteError`` naming the step."""
    from tqdm import tqdm

    if len(x) == 0:
        raise UserError(f"{desc}: no training data")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam(list(params.values()), lr=lr)
    history, steps_per_epoch = [], -(-len(x) // batch_size)
    model.train()
    if refresh:
        refresh()
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        total, count = 0.0, 0
        for step, idx in enumerate(shuffled_batches(len(x), batch_size, generator), epoch * steps_per_epoch):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            check_finite(desc, step, {"ce": loss}, params)
            total, count = total + float(loss.detach()) * len(idx), count + len(idx)
        history.append({"epoch": epoch, "loss": total / count})
        bar.set_postfix(loss=f"{total / count:.3g}")
        if refresh:
            refresh()
    model.eval()
    return history


# --- the shipped model ---------------------------------------------------------------------
def train_digits(out_dir: Path | str = ASSET_DIR, seed: int = 0, progress: bool = True) -> dict:
    """Train the default CNN on the digits training split and save it atomically."""
    from ..models.io import save_pretrained_atomic

    split = digits_split()
    model = SmallCNN(num_classes=split.num_classes)
    model.reset_parameters(seed)
    history = train_supervised(model, split.x_train, split.y_train, seed=seed, progress=progress,
                               desc="training the digits CNN", **TRAIN_RECIPE)
    report = {"data": "sklearn digits, stratified 80/20 split, seed 0", "recipe": {**TRAIN_RECIPE, "seed": seed},
              "final_loss": history[-1]["loss"],
              "train_acc": accuracy(model, split.x_train, split.y_train),
              "test_acc": accuracy(model, split.x_test, split.y_test)}
    save_pretrained_atomic(model, None, out_dir, report=report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the digits CNN the classifier track ships.")
    parser.add_argument("--out", default=str(ASSET_DIR))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = train_digits(args.out, args.seed)
    print(f"train accuracy {report['train_acc']:.4f}, test accuracy {report['test_acc']:.4f}; saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
