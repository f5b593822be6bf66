"""CMF's head: per-class mean features and counts, in one pass over the features.

For features ``x`` (``[..., d]``) and integer labels ``y`` in ``[0, C)``::

    counts_c = #{t : y_t = c}
    means_c  = Σ_{t : y_t = c} x_t / counts_c          (the zero vector when counts_c = 0)

Every backend scales each row by ``1 / counts_c`` before adding it (``means_c = Σ x_t / counts_c``
summed term by term), so no partial sum leaves the range of the values: a mean that fits in
fp32 is finite even for features near 3e38. An empty class gets count 0 and a zero mean (never NaN): check ``counts == 0`` before using
its mean, e.g. for a cosine nearest-class-mean head. Every backend is deterministic: rows are
summed in a fixed order (a stable sort by label, then per-class segments added in order), no
float atomics. Differentiable in ``x``: ``∂L/∂x_t = (∂L/∂means)_{y_t} / counts_{y_t}``.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from . import _backend, _validation as check
from ._registration import register


def _class_means_torch(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Reference kernel on ``[n, d]`` rows: each row scaled by ``1 / counts`` of its label, then
    summed by ``index_add_`` (the scaling first keeps every partial sum within the values' range)."""
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    counts = torch.bincount(labels, minlength=num_classes)
    inv = 1.0 / counts.clamp(min=1).to(acc)
    means = torch.zeros((num_classes, features.shape[1]), dtype=acc, device=features.device)
    means.index_add_(0, labels, features.to(acc) * inv.index_select(0, labels)[:, None])
    return means, counts


@torch.library.custom_op("unlearn_kernels::triton_class_means", mutates_args=())
def _class_means_triton(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    from ..triton.class_means import class_means

    return class_means(features, labels, num_classes)


def _class_means_fake(features, labels, num_classes):
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    return (features.new_empty((num_classes, features.shape[1]), dtype=acc),
            features.new_empty(num_classes, dtype=torch.int64))


def _class_means_setup(ctx, inputs, output):
    features, labels, _ = inputs
    ctx.save_for_backward(labels, output[1])
    ctx.dtype = features.dtype


def _class_means_kernel_backward(ctx, grad_means, _grad_counts):
    """``mean_c = Σ_{label = c} x / n_c``: ``∂/∂x_t = g[label_t] / n_{label_t}``."""
    labels, counts = ctx.saved_tensors
    grad = grad_means / counts.clamp(min=1).to(grad_means.dtype)[:, None]
    return grad.index_select(0, labels).to(ctx.dtype), None, None


register("class_means", _class_means_fake, _class_means_kernel_backward, _class_means_setup)


def _kernel(backend: str):
    """The class_means implementation of ``backend``."""
    if backend == "torch":
        return _class_means_torch
    if backend == "triton":
        return _class_means_triton
    return _backend.compiled_op("class_means")


class _ClassMeans(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, rows, labels, num_classes, kernel):
        means, counts = kernel(rows, labels, num_classes)
        ctx.mark_non_differentiable(counts)
        ctx.save_for_backward(labels, counts)
        ctx.shape, ctx.dtype = features.shape, features.dtype
        return means, counts

    @staticmethod
    def backward(ctx, grad_means, grad_counts):
        labels, counts = ctx.saved_tensors
        per_class = grad_means / counts.clamp(min=1).to(grad_means.dtype)[:, None]
        return per_class[labels].to(ctx.dtype).view(ctx.shape), None, None, None, None


def _labels(labels, features: Tensor, num_classes: int) -> Tensor:
    """Integer labels for ``features``'s rows, checked against ``num_classes``: flat int64.
    The range check reads the labels and is kept under ``torch.compile`` too (a graph break):
    an out-of-range label would make a kernel write outside its output."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if labels.shape != features.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(features.shape[:-1])} (features without "
                         f"its last dim), got {tuple(labels.shape)}")
    check.same_device("labels", labels, features, "features")
    labels = labels.reshape(-1).to(torch.int64).contiguous()
    if labels.numel():
        low, high = (int(v) for v in torch.aminmax(labels))
        if low < 0 or high >= num_classes:
            raise ValueError(f"labels must lie in [0, num_classes={num_classes}), found values "
                             f"{low} .. {high}")
    return labels


def class_means(features: Tensor, labels: Tensor, num_classes: int, *,
                backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Per-class mean features and counts (see the module docstring).

    Args:
        features: ``[..., d]`` (fp32, bf16 or fp16; fp64 on the cpu/torch backends).
        labels: integer class ids with shape ``features.shape[:-1]``, each in
            ``[0, num_classes)`` (ValueError otherwise; one host sync to check).
        num_classes: ``C >= 1``.
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"torch"``.

    Returns:
        ``(means, counts)``: ``means`` fp32 ``[C, d]`` (fp64 for fp64 features), zero for
        an empty class; ``counts`` int64 ``[C]``, 0 for an empty class. ``means`` is
        differentiable in ``features``.

    Example:
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        >>> means, counts = class_means(x, torch.tensor([0, 2, 0]), 3)
        >>> means.tolist(), counts.tolist()
        ([[3.0, 4.0], [0.0, 0.0], [3.0, 4.0]], [2, 0, 1])
    """
    check.activations("features", features)
    if isinstance(num_classes, bool):   # operator.index(True) is 1: a flag where a count belongs
        raise TypeError("num_classes must be an int, got bool")
    try:
        num_classes = operator.index(num_classes)
    except TypeError:
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}") from None
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    labels = _labels(labels, features, num_classes)
    name = _backend.resolve(backend, features.device, features.dtype)
    return _ClassMeans.apply(features, check.rows_view(features.detach()), labels, num_classes,
                             _kernel(name))
