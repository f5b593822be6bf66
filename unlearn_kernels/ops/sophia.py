"""The masked Sophia-G step: SIMU's second-order update restricted to selected neurons.

``masked_sophia_step_`` updates lists of tensors in place. For every element that the
tensor's neuron mask selects, it is exactly the official Sophia-G step (Liuhong99/Sophia,
``_single_tensor_sophiag``)::

    p ← p · (1 − lr · wd)
    m ← β₁ · m + (1 − β₁) · g
    p ← p − lr · sign(m) · min(|m| / (ρ · bs · h + ε), 1)

(``h`` is the Hessian-diagonal EMA; β₂ only enters its update, see
:class:`unlearn_kernels.optim.MaskedSophia`). Elements the mask leaves out keep ``p`` and
``m`` unchanged, weight decay included. With every mask None it equals the official
per-tensor loop (``_sophia_reference_loop``) to float rounding.

Neuron masks, one entry per tensor:

- ``None``: every element is updated;
- a bool tensor ``[shape[0]]``: a row mask over the first dim (the output neurons of a
  ``Linear`` weight ``[out, in]``, e.g. an MLP's up/gate projection), selecting whole rows;
- ``(mask, dim)`` with ``dim`` 0 or −1: a bool mask over the first or the last dim
  (``(mask, -1)`` selects columns: the input neurons of a down projection ``[d, hidden]``).

1-D params take a mask of their length. Dtypes: ``params`` and ``grads`` fp32, bf16 or fp16
(the same per pair); ``exp_avgs`` and ``hessians`` fp32 or the param's dtype (the same per
pair). Arithmetic is fp32; ``p`` and ``m`` are rounded once to their storage types. A list
may mix dtypes. Non-contiguous tensors are updated through a contiguous copy.

Backends: ``"cuda"`` one fused launch over the whole list (a table of tensors in the kernel
parameters, 16-byte vectors, unselected rows never loaded), ``"triton"`` one launch per
dtype group, ``"cpu"`` one ``at::parallel_for`` over chunks of all the tensors, ``"torch"``
the formula above in fp32 as ``torch._foreach_*`` ops over the list. Sophia is memory bound: per updated element it reads
``p, g, m, h`` and writes ``p, m`` (24 bytes in fp32).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _backend, _validation as check
from ._registration import register

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _sophia_reference_loop(params: Sequence[Tensor], grads: Sequence[Tensor],
                           exp_avgs: Sequence[Tensor], hessians: Sequence[Tensor], *, lr: float,
                           beta1: float, rho: float, weight_decay: float, eps: float = 1e-15,
                           bs: float = 1) -> None:
    """The official Sophia-G per-tensor loop (no masks), in each tensor's own dtype.

    The eager baseline of the benchmark and the ground truth of the tests.
    """
    for p, g, m, h in zip(params, grads, exp_avgs, hessians):
        p.mul_(1 - lr * weight_decay)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        ratio = (m.abs() / (rho * bs * h + eps)).clamp(None, 1)
        p.addcmul_(m.sign(), ratio, value=-lr)


def _sophia_torch(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                  hessians: list[Tensor], masks: list[Optional[Tensor]], mask_dims: list[int],
                  lr: float, beta1: float, rho: float, weight_decay: float, eps: float,
                  bs: float) -> None:
    """Reference kernel: the step in fp32, as ``torch._foreach_*`` ops over the whole list,
    written back where selected. Unmasked fp32 ``p``/``m`` are updated in place; the others
    through fp32 copies, then ``torch.where`` by the mask and a copy back. Every element sees
    the same fp32 operations in the same order as the per-tensor formula::

        m' = β₁·m + (1 − β₁)·g,   r = min(|m'| / (ρ·bs·h + ε), 1),   p' = p·(1 − lr·wd) − (lr·sign(m'))·r
    """
    if not params:
        return
    f32 = torch.float32
    direct = [mask is None and p.dtype == f32 and m.dtype == f32
              for p, m, mask in zip(params, exp_avgs, masks)]
    p32 = [p if d else p.to(f32, copy=True) for p, d in zip(params, direct)]
    m32 = [m if d else m.to(f32, copy=True) for m, d in zip(exp_avgs, direct)]
    g32 = [g.float() for g in grads]
    h32 = [h.float() for h in hessians]
    torch._foreach_mul_(m32, beta1)
    torch._foreach_add_(m32, torch._foreach_mul(g32, 1 - beta1))
    ratio = torch._foreach_abs(m32)
    denominator = torch._foreach_mul(h32, rho * bs)
    torch._foreach_add_(denominator, eps)
    torch._foreach_div_(ratio, denominator)
    torch._foreach_clamp_max_(ratio, 1.0)
    step = torch._foreach_sign(m32)
    torch._foreach_mul_(step, lr)
    torch._foreach_mul_(step, ratio)
    torch._foreach_mul_(p32, 1 - lr * weight_decay)
    torch._foreach_sub_(p32, step)
    for p, m, new_p, new_m, mask, dim, d in zip(params, exp_avgs, p32, m32, masks, mask_dims, direct):
        if d:
            continue
        if mask is not None:
            selected = mask.view(-1, *[1] * (p.dim() - 1)) if dim == 0 else mask
            new_p = torch.where(selected, new_p, p)
            new_m = torch.where(selected, new_m, m)
        p.copy_(new_p)
        m.copy_(new_m)


@torch.library.custom_op("unlearn_kernels::triton_masked_sophia_step_",
                         mutates_args=("params", "exp_avgs"))
def _sophia_triton(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                   hessians: list[Tensor], masks: list[Optional[Tensor]], mask_dims: list[int],
                   lr: float, beta1: float, rho: float, weight_decay: float, eps: float,
                   bs: float) -> None:
    from ..triton.sophia import masked_sophia_step

    masked_sophia_step(params, grads, exp_avgs, hessians, masks, mask_dims, lr, beta1, rho,
                       weight_decay, eps, bs)


def _sophia_fake(params, grads, exp_avgs, hessians, masks, mask_dims, lr, beta1, rho,
                 weight_decay, eps, bs) -> None:
    return None


register("masked_sophia_step_", _sophia_fake)


def _kernel(backend: str):
    """The masked_sophia_step_ implementation of ``backend``."""
    if backend == "torch":
        return _sophia_torch
    if backend == "triton":
        return _sophia_triton
    return _backend.compiled_op("masked_sophia_step_")


def sophia_hyperparameters(lr, betas, rho, weight_decay, eps, bs) -> dict[str, float]:
    """The step's scalars as floats, checked: ValueError/TypeError naming the bad one."""
    values = {"lr": lr, "rho": rho, "weight_decay": weight_decay, "eps": eps, "bs": bs}
    out = {name: check.finite_scalar(name, v) for name, v in values.items()}
    for name in ("lr", "rho", "weight_decay", "eps"):
        if out[name] < 0:
            raise ValueError(f"{name} must be >= 0, got {out[name]}")
    if out["bs"] <= 0:
        raise ValueError(f"bs must be > 0, got {out['bs']}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        beta = check.finite_scalar(f"betas[{i}]", beta)
        if not 0 <= beta < 1:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
        out[f"beta{i + 1}"] = beta
    return out


def neuron_mask(name: str, mask, param: Tensor) -> tuple[Optional[Tensor], int]:
    """``mask`` (None, a bool tensor, or a ``(bool tensor, dim)`` pair) for ``param`` as
    ``(contiguous bool mask or None, dim)`` with dim 0 (first dim) or −1 (last dim)."""
    if mask is None:
        return None, 0
    dim = 0
    if isinstance(mask, (tuple, list)):
        if len(mask) != 2:
            raise TypeError(f"{name} must be None, a bool tensor or a (mask, dim) pair, got {len(mask)} items")
        mask, dim = mask
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"{name}: dim must be an int, got {type(dim).__name__}")
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be None, a bool tensor or a (mask, dim) pair, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {mask.dtype}")
    if param.dim() == 0:
        raise ValueError(f"{name}: a 0-dim param takes no neuron mask")
    if dim not in (0, -1, param.dim() - 1):
        raise ValueError(f"{name}: dim must be 0 or -1 (the first or last dim), got {dim} "
                         f"for a param of shape {tuple(param.shape)}")
    dim = 0 if dim == 0 or param.dim() == 1 else -1
    size = param.shape[dim]
    if mask.shape != (size,):
        raise ValueError(f"{name} must have shape [{size}] (dim {dim} of a param of shape "
                         f"{tuple(param.shape)}), got {tuple(mask.shape)}")
    check.same_device(name, mask, param, "its param")
    return mask.contiguous(), dim


def _tensor_list(name: str, value, length: int | None = None) -> list[Tensor]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(value).__name__}")
    for i, t in enumerate(value):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    if length is not None and len(value) != length:
        raise ValueError(f"{name} has {len(value)} tensors but params has {length}")
    return list(value)


def _check_tensors(params, grads, exp_avgs, hessians) -> None:
    for i, (p, g, m, h) in enumerate(zip(params, grads, exp_avgs, hessians)):
        if p.dtype not in PARAM_DTYPES:
            raise TypeError(f"params[{i}] must be float32, bfloat16 or float16, got {p.dtype}")
        check.same_device(f"params[{i}]", p, params[0], "params[0]")
        check.matching(f"grads[{i}]", g, p, f"params[{i}]")
        if m.shape != p.shape:
            raise ValueError(f"exp_avgs[{i}] must have the shape of params[{i}] {tuple(p.shape)}, got {tuple(m.shape)}")
        if m.dtype not in (torch.float32, p.dtype):
            raise TypeError(f"exp_avgs[{i}] must be float32 or the dtype of params[{i}] ({p.dtype}), got {m.dtype}")
        check.same_device(f"exp_avgs[{i}]", m, p, f"params[{i}]")
        check.matching(f"hessians[{i}]", h, m, f"exp_avgs[{i}]")


def _check_aliasing(params, grads, exp_avgs, hessians) -> None:
    """Every written tensor (params, exp_avgs) is checked against every tensor of the call before
    any is touched: no expanded view, no memory shared with another argument (an exact alias
    of a read-only argument is refused too: the step reads it after writing)."""
    written = [(f"params[{i}]", p) for i, p in enumerate(params)] + \
              [(f"exp_avgs[{i}]", m) for i, m in enumerate(exp_avgs)]
    read = [(f"grads[{i}]", g) for i, g in enumerate(grads)] + [(f"hessians[{i}]", h) for i, h in enumerate(hessians)]
    for name, t in written:
        check.not_expanded(name, t)
    if torch.compiler.is_compiling():
        return
    by_storage: dict[int, list] = {}
    for k, (name, t) in enumerate(written + read):
        if t.numel():
            by_storage.setdefault(t.untyped_storage().data_ptr(), []).append((k < len(written), name, t))
    for group in (g for g in by_storage.values() if len(g) > 1):   # tensors sharing one storage
        for i, (is_written, name, t) in enumerate(group):
            if not is_written:
                continue
            for _, other_name, other in group[i + 1:]:
                if check.same_memory(t, other):
                    raise ValueError(f"{name} and {other_name} are the same memory; {name} is updated in place: "
                                     "pass separate tensors")
                check.no_partial_overlap(name, t, other_name, other)


def masked_sophia_step_(params: Sequence[Tensor], grads: Sequence[Tensor],
                        exp_avgs: Sequence[Tensor], hessians: Sequence[Tensor],
                        masks: Sequence | None = None, *, lr: float,
                        betas: tuple[float, float] = (0.965, 0.99), rho: float = 0.04,
                        weight_decay: float = 0.1, eps: float = 1e-15, bs: float = 1,
                        backend: str = "auto") -> None:
    """Fused in-place Sophia-G step on the neurons ``masks`` select (see the module docstring).

    Args:
        params, grads, exp_avgs, hessians: equally long lists of tensors of equal shapes on
            one device; ``params`` and ``exp_avgs`` are updated in place.
        masks: None (update everything) or one entry per param: None, a bool row mask
            ``[shape[0]]``, or ``(bool mask, dim)`` with dim 0 or −1.
        lr, betas, rho, weight_decay, eps, bs: Sophia-G's hyperparameters (β₂ is checked
            but used only by the Hessian EMA).
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"torch"``.

    Example:
        >>> w, b = torch.randn(8, 4), torch.randn(8)
        >>> grads = [torch.randn_like(w), torch.randn_like(b)]
        >>> m = [torch.zeros_like(w), torch.zeros_like(b)]
        >>> h = [torch.rand_like(w), torch.rand_like(b)]
        >>> neurons = torch.tensor([True, False] * 4)
        >>> before = w.clone()
        >>> masked_sophia_step_([w, b], grads, m, h, [neurons, neurons], lr=1e-2)
        >>> bool((w[1::2] == before[1::2]).all()), bool((w[::2] != before[::2]).any())
        (True, True)
    """
    params = _tensor_list("params", params)
    n = len(params)
    grads = _tensor_list("grads", grads, n)
    exp_avgs = _tensor_list("exp_avgs", exp_avgs, n)
    hessians = _tensor_list("hessians", hessians, n)
    masks = [None] * n if masks is None else masks
    if not isinstance(masks, (list, tuple)):
        raise TypeError(f"masks must be None or a list with one entry per param, got {type(masks).__name__}")
    if len(masks) != n:
        raise ValueError(f"masks has {len(masks)} entries but params has {n}")
    hp = sophia_hyperparameters(lr, betas, rho, weight_decay, eps, bs)
    _check_tensors(params, grads, exp_avgs, hessians)
    _check_aliasing(params, grads, exp_avgs, hessians)
    pairs = [neuron_mask(f"masks[{i}]", mask, p) for i, (mask, p) in enumerate(zip(masks, params))]
    if n == 0:
        return
    name = _backend.resolve(backend, params[0].device, params[0].dtype)
    kernel = _kernel(name)
    with torch.no_grad():
        work_p, work_m = [p.contiguous() for p in params], [m.contiguous() for m in exp_avgs]
        kernel(work_p, [g.contiguous() for g in grads], work_m, [h.contiguous() for h in hessians],
               [mask for mask, _ in pairs], [dim for _, dim in pairs], hp["lr"], hp["beta1"],
               hp["rho"], hp["weight_decay"], hp["eps"], hp["bs"])
        for t, work in zip(params + exp_avgs, work_p + work_m):
            if work is not t:
                t.copy_(work)
            elif name in ("cpu", "cuda"):
                check.mark_mutated(t)
