"""Disruption masking (MUDMAN, Sondej et al. 2025): update a weight only where the unlearning
gradient and the retaining gradient agree in sign.

With ``g`` the gradient of the loss minimised to forget, ``r`` the gradient of the retain
loss and ``s`` a scale::

    agree_i = g_i · r_i > 0          (both nonzero, same sign)
    out_i   = s · g_i   if agree_i
            = 0         otherwise (they disagree, either is zero, or either is NaN)
    kept    = Σ_i agree_i             (int64)

so a step along ``−out`` lowers the forget loss without raising the retain loss to first
order in any coordinate it moves. MUDMAN normalises the masked update: the caller computes
``s = lr / ‖masked g‖`` (or any factor) with torch, which keeps the kernel elementwise (no
float reduction in it: every backend and every CPU instruction set gives the same bits).

Numerics, the same on every backend:

- ``agree_i`` is decided on the signs (``g > 0 and r > 0`` or ``g < 0 and r < 0``), which is
  ``g_i · r_i > 0`` in exact arithmetic; no rounded product is formed, so tiny gradients whose
  product would underflow (bf16/fp32 ``1e-30 · 1e-30``) still count as agreeing. ``±0``
  agrees with nothing, NaN agrees with nothing (``NaN · r > 0`` is false), ``±inf`` agrees
  with a nonzero value of its sign.
- ``s · g_i`` is one multiply in fp32 (fp64 for fp64 tensors), ``s`` first rounded to that
  type, rounded once to ``g``'s dtype. A kept ``inf`` stays ``±inf`` (``s > 0``); masked
  entries are ``+0.0``.

Layout: any shape; non-contiguous inputs are read through a contiguous copy. The result of
:func:`disruption_mask` is a new contiguous tensor of ``grad``'s shape and dtype;
:func:`disruption_mask_` writes into ``grad`` (a non-contiguous ``grad`` through a contiguous
copy written back: an extra pass). Not differentiable: gradients are this op's *inputs*
(optimizer-side work, like :func:`hessian_ema_`), so the inputs are detached and the result
never requires grad; call it under ``torch.no_grad()`` or on ``p.grad``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _validation as check
from ._registration import register


def _disruption_mask_torch(grad: Tensor, retain_grad: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Reference kernel, straight from the math: ``sign(g)·sign(r) > 0`` is ``g·r > 0``
    exactly (NaN signs compare false); ``s·g`` in the arithmetic type, rounded once."""
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    g = grad.to(acc)
    agree = torch.sign(g) * torch.sign(retain_grad.to(acc)) > 0
    s = torch.tensor(scale, dtype=acc, device=grad.device)
    out = torch.where(agree, g * s, torch.zeros((), dtype=acc, device=grad.device))
    return out.to(grad.dtype), agree.sum(dtype=torch.int64)


def _disruption_mask_inplace_torch(grad: Tensor, retain_grad: Tensor, scale: float) -> Tensor:
    out, kept = _disruption_mask_torch(grad, retain_grad, scale)
    grad.copy_(out)
    return kept


@torch.library.custom_op("unlearn_kernels::triton_disruption_mask", mutates_args=())
def _disruption_mask_triton(grad: Tensor, retain_grad: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    from ..triton.disruption_mask import disruption_mask

    out = torch.empty_like(grad, memory_format=torch.contiguous_format)
    return out, disruption_mask(grad, retain_grad, scale, out)


@torch.library.custom_op("unlearn_kernels::triton_disruption_mask_", mutates_args=("grad",))
def _disruption_mask_inplace_triton(grad: Tensor, retain_grad: Tensor, scale: float) -> Tensor:
    from ..triton.disruption_mask import disruption_mask

    return disruption_mask(grad, retain_grad, scale, grad)


def _disruption_mask_fake(grad, retain_grad, scale):
    return (torch.empty_like(grad, memory_format=torch.contiguous_format),
            grad.new_empty((), dtype=torch.int64))


def _disruption_mask_inplace_fake(grad, retain_grad, scale):
    return grad.new_empty((), dtype=torch.int64)


register("disruption_mask", _disruption_mask_fake)
register("disruption_mask_", _disruption_mask_inplace_fake)


def _kernels(backend: str):
    """(out-of-place, in-place) implementations of ``backend``; each takes contiguous tensors
    of one shape and dtype and returns the count (the out-of-place one: ``(out, kept)``)."""
    if backend == "torch":
        return _disruption_mask_torch, _disruption_mask_inplace_torch
    if backend == "triton":
        return _disruption_mask_triton, _disruption_mask_inplace_triton
    return _backend.compiled_op("disruption_mask"), _backend.compiled_op("disruption_mask_")


def _checked(grad, retain_grad, scale) -> tuple[Tensor, float]:
    check.float_tensor("grad", grad)
    retain_grad = check.matching("retain_grad", check.float_tensor("retain_grad", retain_grad), grad, "grad")
    return retain_grad, check.finite_scalar("scale", scale)


def _contiguous(t: Tensor) -> Tensor:
    return t.detach().contiguous()


def disruption_mask(grad: Tensor, retain_grad: Tensor, scale: float = 1.0, *,
                    return_kept: bool = False, backend: str = "auto") -> Tensor | tuple[Tensor, Tensor]:
    """MUDMAN's disruption mask: ``scale · grad`` where ``grad`` and ``retain_grad`` agree in
    sign, 0 elsewhere (see the module docstring for the exact numerics).

    Args:
        grad: the unlearning gradient ``g`` (of the loss minimised to forget); any shape and
            layout, fp32, bf16, fp16 or fp64 (fp64 on the cpu/torch backends).
        retain_grad: the retain-loss gradient ``r``; ``grad``'s shape, dtype and device.
        scale: a finite factor ``s`` (e.g. ``lr / ‖masked g‖``, computed by the caller).
        return_kept: also return ``kept``, the number of agreeing entries (0-dim int64).
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"torch"``.

    Returns:
        a new contiguous tensor of ``grad``'s shape and dtype (not requiring grad), or
        ``(out, kept)`` with ``return_kept=True``.

    Example:
        >>> g = torch.tensor([1.0, -2.0, 3.0, 0.0])
        >>> r = torch.tensor([0.5, -1.0, -1.0, 2.0])
        >>> out, kept = disruption_mask(g, r, 0.5, return_kept=True)
        >>> out.tolist(), kept.item()
        ([0.5, -1.0, 0.0, 0.0], 2)
    """
    retain_grad, scale = _checked(grad, retain_grad, scale)
    name = _backend.resolve(backend, grad.device, grad.dtype)
    out, kept = _kernels(name)[0](_contiguous(grad), _contiguous(retain_grad), scale)
    return (out, kept) if return_kept else out


def disruption_mask_(grad: Tensor, retain_grad: Tensor, scale: float = 1.0, *,
                     return_kept: bool = False, backend: str = "auto") -> Tensor | tuple[Tensor, Tensor]:
    """In-place :func:`disruption_mask`: ``grad ← scale · grad`` where ``grad`` and
    ``retain_grad`` agree in sign, 0 elsewhere; ``retain_grad`` is only read. What an
    optimizer hook uses on ``p.grad`` (no extra buffer when ``grad`` is contiguous).

    ``retain_grad`` may be ``grad`` itself, but must not otherwise overlap it; ``grad`` must
    not be an expanded (stride-0) view. Returns ``grad``, or ``(grad, kept)`` with
    ``return_kept=True``.

    Example:
        >>> g = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
        >>> _ = disruption_mask_(g, torch.tensor([[1.0, 1.0], [-1.0, 2.0]]), 2.0)
        >>> g.tolist()
        [[2.0, 0.0], [0.0, 8.0]]
    """
    retain_grad, scale = _checked(grad, retain_grad, scale)
    check.not_expanded("grad", grad)
    check.no_partial_overlap("grad", grad, "retain_grad", retain_grad)
    name = _backend.resolve(backend, grad.device, grad.dtype)
    target = grad.detach()
    work = target if target.is_contiguous() else target.contiguous()
    kept = _kernels(name)[1](work, _contiguous(retain_grad), scale)
    if work is not target:
        target.copy_(work)
    elif name in ("cpu", "cuda"):
        check.mark_mutated(grad)
    return (grad, kept) if return_kept else grad
