"""Data for class-wise unlearning: a train/test split and the classes to forget.

The offline default is scikit-learn's digits (1797 8×8 greyscale images, 10 classes, shipped
with scikit-learn): a stratified 80/20 split with a fixed seed, pixels scaled to [0, 1].
The *forget set* is every training image of the forgotten classes, the *retain set* the
other training images; the test split is divided the same way (``test_forget`` are images
of the forgotten classes that no model and no probe trains on).

Users with CIFAR or an ImageFolder tree on disk load it with :func:`torchvision_split`
(torchvision is imported only then; it is not a dependency of the package).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import MissingFileError, MissingPackageError, UserError

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FORGET_CLASS = (3,)          # the single-class default
FORGET_SET = (3, 5, 8)       # the 3-class default: the digits whose strokes overlap most


@dataclass(frozen=True)
class ClassSplit:
    """Images ``[N, channels, H, W]`` (fp32) and int64 labels, split and marked for forgetting."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    forget_classes: tuple[int, ...]
    class_names: tuple[str, ...]
    name: str = "data"

    def __post_init__(self):
        object.__setattr__(self, "forget_classes", check_forget_classes(self.forget_classes, len(self.class_names)))
        if not bool(self.is_forget(self.y_train).any()):
            raise UserError(f"forget_classes {self.forget_classes}: the forget set is empty (no training "
                            f"image of these classes)")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def retain_classes(self) -> tuple[int, ...]:
        return tuple(c for c in range(self.num_classes) if c not in self.forget_classes)

    def is_forget(self, labels: Tensor) -> Tensor:
        return torch.isin(labels, torch.tensor(self.forget_classes, dtype=labels.dtype))

    def _part(self, x: Tensor, y: Tensor, forget: bool) -> tuple[Tensor, Tensor]:
        keep = self.is_forget(y) if forget else ~self.is_forget(y)
        return x[keep], y[keep]

    @property
    def forget(self) -> tuple[Tensor, Tensor]:
        return self._part(self.x_train, self.y_train, True)

    @property
    def retain(self) -> tuple[Tensor, Tensor]:
        return self._part(self.x_train, self.y_train, False)

    @property
    def test_forget(self) -> tuple[Tensor, Tensor]:
        return self._part(self.x_test, self.y_test, True)

    @property
    def test_retain(self) -> tuple[Tensor, Tensor]:
        return self._part(self.x_test, self.y_test, False)

    def with_forget(self, forget_classes) -> "ClassSplit":
        """The same images with other classes to forget."""
        return ClassSplit(self.x_train, self.y_train, self.x_test, self.y_test, forget_classes,
                          self.class_names, self.name)

    def describe(self) -> dict:
        return {"name": self.name, "num_classes": self.num_classes, "forget_classes": list(self.forget_classes),
                "forget_names": [self.class_names[c] for c in self.forget_classes],
                "n_forget": len(self.forget[1]), "n_retain": len(self.retain[1]),
                "n_test_forget": len(self.test_forget[1]), "n_test_retain": len(self.test_retain[1])}


def check_forget_classes(forget_classes, num_classes: int) -> tuple[int, ...]:
    """``forget_classes`` as a sorted tuple of distinct ints in ``[0, num_classes)``, leaving at
    least one class to retain (ValueError naming the argument otherwise)."""
    if isinstance(forget_classes, int):
        forget_classes = (forget_classes,)
    try:
        classes = tuple(operator.index(c) for c in forget_classes)
    except TypeError:
        raise TypeError(f"forget_classes must be an int or a sequence of ints, got {forget_classes!r}") from None
    if not classes:
        raise UserError("forget_classes is empty: the forget set is empty")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UserError(f"forget_classes {bad} out of range [0, {num_classes})")
    if len(set(classes)) != len(classes):
        raise UserError(f"forget_classes {classes} has repeated classes")
    if len(classes) == num_classes:
        raise UserError(f"forget_classes {classes} leaves no class to retain")
    return tuple(sorted(classes))


def _stratified_split(y: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Train and test indices: per class, a seeded permutation; its first ``round(n·f)`` go to test."""
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(y).tolist():
        members = torch.nonzero(y == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        k = round(len(members) * test_fraction)
        test.append(members[:k])
        train.append(members[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def digits_split(forget_classes=FORGET_CLASS, *, test_fraction: float = 0.2, seed: int = 0) -> ClassSplit:
    """scikit-learn's digits, stratified into train/test (deterministic in ``seed``).

    >>> split = digits_split((3,))
    >>> split.x_train.shape, split.describe()["n_forget"]
    (torch.Size([1437, 1, 8, 8]), 146)
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    train, test = _stratified_split(y, test_fraction, seed)
    return ClassSplit(x[train], y[train], x[test], y[test], forget_classes, DIGIT_NAMES, name="digits")


def _stack(dataset, transform) -> tuple[Tensor, Tensor]:
    xs, ys = [], []
    for image, label in dataset:
        xs.append(transform(image))
        ys.append(int(label))
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


def torchvision_split(root: Path | str, forget_classes=FORGET_CLASS, *, kind: str = "imagefolder",
                      test_root: Path | str | None = None, test_fraction: float = 0.2, image_size: int = 32,
                      seed: int = 0) -> ClassSplit:
    """A dataset on disk through torchvision (no download), held in memory as fp32 tensors.

    ``kind``: ``"cifar10"`` / ``"cifar100"`` (the python-pickle batches under ``root``, their own
    train/test split) or ``"imagefolder"`` (``root/<class>/<image>``; ``test_root`` in the same
    layout, else a stratified ``test_fraction`` of ``root``). Images are resized to
    ``image_size`` and scaled to [0, 1]. Memory: ``N·3·size²·4`` bytes (CIFAR-10: ~740 MB).
    """
    try:
        import torchvision
        from torchvision import transforms
    except ImportError as err:
        raise MissingPackageError("torchvision_split needs torchvision (pip install torchvision); the digits data "
                                  "(digits_split) needs nothing beyond scikit-learn") from err
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"root {root} is not a directory")
    transform = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor()])
    if kind in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
        train_set = cls(str(root), train=True, download=False)
        test_set = cls(str(root), train=False, download=False)
        names = tuple(train_set.classes)
        x_train, y_train = _stack(train_set, transform)
        x_test, y_test = _stack(test_set, transform)
    elif kind == "imagefolder":
        folder = torchvision.datasets.ImageFolder(str(root))
        names = tuple(folder.classes)
        x, y = _stack(folder, transform)
        if test_root is None:
            train, test = _stratified_split(y, test_fraction, seed)
            x_train, y_train, x_test, y_test = x[train], y[train], x[test], y[test]
        else:
            test_folder = torchvision.datasets.ImageFolder(str(test_root))
            if tuple(test_folder.classes) != names:
                raise UserError(f"test_root {test_root} has classes {test_folder.classes}, root has {list(names)}")
            x_train, y_train = x, y
            x_test, y_test = _stack(test_folder, transform)
    else:
        raise UserError(f"kind must be 'cifar10', 'cifar100' or 'imagefolder', got {kind!r}")
    return ClassSplit(x_train, y_train, x_test, y_test, forget_classes, names,
                      name=kind if kind != "imagefolder" else root.name)
