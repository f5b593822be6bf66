"""SIMU's neuron selection: Optimal-Brain-Damage saliency per neuron, and the ranking.

``neuron_scores(weight, hess_forget, hess_retain, dim=...)``: deleting neuron ``i`` (zeroing
its weights ``w_i·``) changes the loss by about ``½ Σ_j H_ij,ij w_ij²`` (OBD, a diagonal
Hessian and a trained, zero-gradient point), so with the Hessian diagonals ``h`` estimated on
the forget and on the retain set::

    dim=0 (neurons are rows, e.g. an MLP up/gate proj [d_ff, d]):  s_i = ½ Σ_j h_ij w_ij²
    dim=1 (neurons are columns, e.g. down_proj [d, d_ff]):          s_j = ½ Σ_i h_ij w_ij²

for ``h = hess_forget`` and ``h = hess_retain``, in one pass over the weight.

``select_neurons(s_f, s_r, fraction=… | threshold=…)`` keeps the neurons that matter most to
the forget set relative to the retain set, by the ratio::

    ρ_i = s_f,i / (max(s_r,i, 0) + ε)

the top ``fraction`` of neurons by ``ρ`` (ties: the lower index first), or those with
``ρ > threshold``. Retain scores below 0 (Hutchinson estimates of a non-convex loss can be
negative) count as 0: they say the retain loss would not grow.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor

from . import _backend, _validation as check
from ._registration import register


def _neuron_scores_torch(weight: Tensor, hess_forget: Tensor, hess_retain: Optional[Tensor],
                         dim: int) -> tuple[Tensor, Tensor]:
    """Reference kernel on 2-D tensors: the sums straight from the math."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w2 = weight.to(acc) ** 2
    s_f = 0.5 * (hess_forget.to(acc) * w2).sum(1 - dim)
    s_r = 0.5 * (hess_retain.to(acc) * w2).sum(1 - dim) if hess_retain is not None else s_f.new_empty(0)
    return s_f, s_r


@torch.library.custom_op("unlearn_kernels::triton_neuron_scores", mutates_args=())
def _neuron_scores_triton(weight: Tensor, hess_forget: Tensor, hess_retain: Optional[Tensor],
                          dim: int) -> tuple[Tensor, Tensor]:
    from ..triton.neuron_scores import neuron_scores

    return neuron_scores(weight, hess_forget, hess_retain, dim)


def _neuron_scores_fake(weight, hess_forget, hess_retain, dim):
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    n = weight.shape[dim]
    return (weight.new_empty(n, dtype=acc),
            weight.new_empty(n if hess_retain is not None else 0, dtype=acc))


def _neuron_scores_setup(ctx, inputs, output):
    weight, hess_forget, hess_retain, dim = inputs
    ctx.save_for_backward(weight, hess_forget, hess_retain)
    ctx.dim = dim


def _neuron_scores_kernel_backward(ctx, grad_f, grad_r):
    """``s_k = ½ Σ h ⊙ w²`` over neuron k's weights: ``∂/∂w = (g_f h_f + g_r h_r) ⊙ w`` and
    ``∂/∂h = ½ g ⊙ w²`` (``g`` broadcast along the neuron axis)."""
    weight, hess_forget, hess_retain = ctx.saved_tensors
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32

    def along(g):
        return g.to(acc).view((-1, 1) if ctx.dim in (0, -2) else (1, -1))

    w = weight.to(acc)
    d_weight = along(grad_f) * hess_forget.to(acc) * w
    d_hr = None
    if hess_retain is not None and grad_r is not None and grad_r.numel():
        d_weight = d_weight + along(grad_r) * hess_retain.to(acc) * w
        d_hr = (0.5 * along(grad_r) * w * w).to(hess_retain.dtype)
    d_hf = (0.5 * along(grad_f) * w * w).to(hess_forget.dtype)
    return d_weight.to(weight.dtype), d_hf, d_hr, None


register("neuron_scores", _neuron_scores_fake, _neuron_scores_kernel_backward, _neuron_scores_setup)


def _kernel(backend: str):
    """The neuron_scores implementation of ``backend``."""
    if backend == "torch":
        return _neuron_scores_torch
    if backend == "triton":
        return _neuron_scores_triton
    return _backend.compiled_op("neuron_scores")


def _hessian(name: str, h, weight: Tensor) -> Tensor:
    if not isinstance(h, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(h).__name__}")
    if h.dtype not in (torch.float32, weight.dtype):
        raise TypeError(f"{name} must be float32 or the dtype of weight ({weight.dtype}), got {h.dtype}")
    if h.shape != weight.shape:
        raise ValueError(f"{name} must have the shape of weight {tuple(weight.shape)}, got {tuple(h.shape)}")
    check.same_device(name, h, weight, "weight")
    return h.detach()


def _unit_cols(t: Tensor) -> bool:
    return t.shape[1] <= 1 or t.stride(1) == 1


def _row_major(tensors: list[Tensor], dim: int) -> tuple[list[Tensor], int]:
    """Views with unit column stride: transposed (and ``dim`` flipped) when all are
    column-major, else a contiguous copy of each one that is not row-major."""
    if all(_unit_cols(t) for t in tensors):
        return tensors, dim
    if all(_unit_cols(t.t()) for t in tensors):
        return [t.t() for t in tensors], 1 - dim
    return [t if _unit_cols(t) else t.contiguous() for t in tensors], dim


def neuron_scores(weight: Tensor, hess_forget: Tensor, hess_retain: Tensor | None = None, *,
                  dim: int = 0, backend: str = "auto") -> tuple[Tensor, Optional[Tensor]]:
    """Per-neuron OBD saliency ``½ Σ h ⊙ w²`` for the forget and retain Hessians (module docstring).

    Args:
        weight: a 2-D weight ``[out, in]``, fp32, bf16 or fp16 (fp64 on the cpu/torch
            backends); any strides.
        hess_forget: its Hessian diagonal on the forget set (e.g. from :func:`hessian_ema_`),
            ``weight``'s shape, fp32 or ``weight``'s dtype.
        hess_retain: the same on the retain set (``hess_forget``'s dtype), or None.
        dim: 0 when neurons are the rows of ``weight`` (up/gate proj), 1 when they are its
            columns (down proj).
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"torch"``.

    Returns:
        ``(s_forget, s_retain)``, fp32 ``[weight.shape[dim]]`` (fp64 for fp64 weights);
        ``s_retain`` is None without ``hess_retain``. Not differentiable.

    Example:
        >>> w = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
        >>> s_f, s_r = neuron_scores(w, torch.ones(2, 2), torch.full((2, 2), 2.0))
        >>> s_f.tolist(), s_r.tolist()
        ([2.5, 4.5], [5.0, 9.0])
    """
    check.float_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim not in (0, 1, -1, -2):
        raise ValueError(f"dim must be 0 (neurons are rows) or 1 (neurons are columns), got {dim!r}")
    dim %= 2
    tensors = [weight.detach(), _hessian("hess_forget", hess_forget, weight)]
    if hess_retain is not None:
        tensors.append(_hessian("hess_retain", hess_retain, weight))
        if hess_retain.dtype != hess_forget.dtype:
            raise TypeError(f"hess_retain must have the dtype of hess_forget ({hess_forget.dtype}), "
                            f"got {hess_retain.dtype}")
    name = _backend.resolve(backend, weight.device, weight.dtype)
    tensors, kernel_dim = _row_major(tensors, dim)
    w, h_f = tensors[0], tensors[1]
    h_r = tensors[2] if hess_retain is not None else None
    s_f, s_r = _kernel(name)(w, h_f, h_r, kernel_dim)
    return s_f, (s_r if hess_retain is not None else None)


def _scores_vector(name: str, s) -> Tensor:
    if not isinstance(s, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(s).__name__}")
    if not s.is_floating_point() or s.dim() != 1:
        raise ValueError(f"{name} must be a 1-D floating tensor of scores, got {s.dtype} {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"{name} holds non-finite values")
    return s


def _ratio(s_f, s_r, eps: float, what: str) -> Tensor:
    """``s_f / (max(s_r, 0) + eps)`` in fp64 (``s_f`` alone without ``s_r``)."""
    s_f = _scores_vector(f"scores_forget{what}", s_f).double()
    if s_r is None:
        return s_f
    s_r = _scores_vector(f"scores_retain{what}", s_r)
    if s_r.shape != s_f.shape:
        raise ValueError(f"scores_retain{what} must have the shape of scores_forget {tuple(s_f.shape)}, "
                         f"got {tuple(s_r.shape)}")
    check.same_device(f"scores_retain{what}", s_r, s_f, f"scores_forget{what}")
    return s_f / (s_r.double().clamp(min=0) + eps)


def _rule(fraction, threshold, eps) -> tuple[Optional[float], Optional[float], float]:
    if (fraction is None) == (threshold is None):
        raise ValueError("pass exactly one of fraction and threshold")
    if fraction is not None:
        fraction = check.finite_scalar("fraction", fraction)
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if threshold is not None:
        threshold = check.finite_scalar("threshold", threshold)
    eps = check.finite_scalar("eps", eps)
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return fraction, threshold, eps


def _mask(ratio: Tensor, fraction: Optional[float], threshold: Optional[float]) -> Tensor:
    if threshold is not None:
        return ratio > threshold
    n = ratio.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=ratio.device)
    if n:
        k = min(n, max(1, round(fraction * n)))
        order = torch.sort(ratio, descending=True, stable=True).indices
        mask[order[:k]] = True
    return mask


def select_neurons(scores_forget: Tensor, scores_retain: Tensor | None, *,
                   fraction: float | None = None, threshold: float | None = None,
                   eps: float = 1e-8) -> Tensor:
    """Boolean mask of the neurons to update: by ``ρ = s_f / (max(s_r, 0) + eps)``.

    Exactly one of ``fraction`` (keep the top ``max(1, round(fraction · n))`` neurons by
    ``ρ``, ties to the lower index) and ``threshold`` (keep ``ρ > threshold``). Without
    ``scores_retain``, ``ρ = s_f``. Scores must be finite; ``eps > 0``.

    Example:
        >>> select_neurons(torch.tensor([1.0, 8.0, 3.0]), torch.tensor([1.0, 1.0, 0.0]),
        ...                fraction=2 / 3).tolist()
        [False, True, True]
    """
    fraction, threshold, eps = _rule(fraction, threshold, eps)
    return _mask(_ratio(scores_forget, scores_retain, eps, ""), fraction, threshold)


def select_neurons_per_layer(scores: Mapping[str, object], *, fraction: float | None = None,
                             threshold: float | None = None, eps: float = 1e-8,
                             scope: str = "layer") -> dict[str, Tensor]:
    """Masks for many layers: ``{name: (s_f, s_r)}`` (or ``{name: s_f}``) → ``{name: mask}``.

    ``scope="layer"`` applies :func:`select_neurons` to each layer on its own (each keeps
    its top ``fraction``); ``scope="global"`` ranks all neurons of all layers together, so
    layers with more forget-specific neurons keep more. Each mask lives on its scores' device.

    Example:
        >>> scores = {"mlp.0": neuron_scores(torch.randn(6, 4), torch.rand(6, 4), torch.rand(6, 4)),
        ...           "mlp.1": (torch.rand(6), torch.rand(6))}
        >>> masks = select_neurons_per_layer(scores, fraction=0.5)
        >>> [int(m.sum()) for m in masks.values()]
        [3, 3]
    """
    fraction, threshold, eps = _rule(fraction, threshold, eps)
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a mapping name -> (s_f, s_r), got {type(scores).__name__}")
    ratios = {}
    for name, value in scores.items():
        s_f, s_r = (value, None) if isinstance(value, Tensor) else tuple(value)
        ratios[name] = _ratio(s_f, s_r, eps, f"[{name!r}]")
    if scope == "layer":
        return {name: _mask(r, fraction, threshold) for name, r in ratios.items()}
    if not ratios:
        return {}
    flat = _mask(torch.cat([r.cpu() for r in ratios.values()]), fraction, threshold)
    masks, start = {}, 0
    for name, r in ratios.items():
        masks[name] = flat[start:start + r.numel()].to(r.device)
        start += r.numel()
    return masks
