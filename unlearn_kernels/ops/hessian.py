"""Hessian-diagonal estimates for SIMU (and Sophia): the in-place EMA and its probes.

``hessian_ema_(hess, a, b, beta=β)`` updates a running estimate of ``diag(H)`` in place::

    hess ← β · hess + (1 − β) · a ⊙ b          (b = a when b is None)

with the pair ``(a, b)`` one of

- Hutchinson: ``(z, Hz)`` for a Rademacher probe ``z`` (``z_i = ±1``), so
  ``E[z ⊙ Hz] = diag(H)`` because ``E[z_i z_j] = δ_ij`` (:func:`hutchinson_pairs`);
- Gauss-Newton / empirical Fisher: ``(g, g)``, the squared gradient of a loss on labels
  sampled from the model (Sophia-G multiplies by the batch size; scale ``g`` or ``lr``
  accordingly) (:func:`gauss_newton_pairs`).

Storage: ``hess`` is fp32 or the dtype of ``a`` (e.g. bf16 state for bf16 parameters);
``a`` and ``b`` share one dtype (fp32, bf16 or fp16; fp64 on the cpu/torch backends). The
update is computed in fp32 (fp64 for fp64 tensors) and rounded once into ``hess``.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from . import _backend, _validation as check
from ._registration import register


def _hessian_ema_torch(hess: Tensor, a: Tensor, b: Optional[Tensor], beta: float) -> None:
    """Reference kernel on contiguous flat tensors: the EMA straight from the math."""
    acc = torch.float64 if torch.float64 in (hess.dtype, a.dtype) else torch.float32
    x = a.to(acc)
    y = x if b is None else b.to(acc)
    hess.copy_(beta * hess.to(acc) + (1.0 - beta) * (x * y))


@torch.library.custom_op("unlearn_kernels::triton_hessian_ema_", mutates_args=("hess",))
def _hessian_ema_triton(hess: Tensor, a: Tensor, b: Optional[Tensor], beta: float) -> None:
    from ..triton.hessian import hessian_ema_

    hessian_ema_(hess, a, b, beta)


def _hessian_ema_fake(hess, a, b, beta):
    return None


register("hessian_ema_", _hessian_ema_fake)


def _kernel(backend: str):
    """The hessian_ema_ implementation of ``backend``."""
    if backend == "torch":
        return _hessian_ema_torch
    if backend == "triton":
        return _hessian_ema_triton
    return _backend.compiled_op("hessian_ema_")


def _flat(t: Tensor) -> Tensor:
    return t.detach().reshape(-1).contiguous()


def hessian_ema_(hess: Tensor, a: Tensor, b: Tensor | None = None, *, beta: float,
                 backend: str = "auto") -> Tensor:
    """In place ``hess ← beta · hess + (1 − beta) · a ⊙ (b if b is not None else a)``.

    Args:
        hess: the running diagonal estimate, fp32 or ``a``'s dtype, ``a``'s shape. Any
            layout: a non-contiguous ``hess`` is updated through a contiguous copy that is
            written back (an extra pass); expanded (stride-0) tensors are refused.
        a: ``z`` (Hutchinson) or ``g`` (Gauss-Newton), fp32, bf16 or fp16.
        b: ``Hz``, or None for ``a ⊙ a``; ``a``'s shape and dtype.
        beta: EMA factor, finite, in [0, 1] (``beta = 0`` overwrites, ``1`` keeps).
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"torch"``.

    Returns:
        ``hess`` (the same tensor, updated). Not differentiable (optimizer state).

    Example:
        >>> hess = torch.zeros(4, 3)
        >>> g = torch.full((4, 3), 2.0)
        >>> hessian_ema_(hess, g, beta=0.9)[0, 0].item()          # 0.1 * 2 * 2
        0.4000000059604645
    """
    check.float_tensor("hess", hess)
    check.float_tensor("a", a)
    if hess.dtype not in (torch.float32, a.dtype):
        raise TypeError(f"hess must be float32 or the dtype of a ({a.dtype}), got {hess.dtype}")
    if a.shape != hess.shape:
        raise ValueError(f"a must have the shape of hess {tuple(hess.shape)}, got {tuple(a.shape)}")
    check.same_device("a", a, hess, "hess")
    if b is not None:
        b = check.matching("b", b, a, "a")
    beta = check.finite_scalar("beta", beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    check.not_expanded("hess", hess)
    check.no_partial_overlap("hess", hess, "a", a)
    if b is not None:
        check.no_partial_overlap("hess", hess, "b", b)
    name = _backend.resolve(backend, hess.device, a.dtype)
    target = hess.detach()
    work = target.view(-1) if target.is_contiguous() else target.reshape(-1).clone()
    _kernel(name)(work, _flat(a), None if b is None else _flat(b), beta)
    if not target.is_contiguous():
        target.copy_(work.view(target.shape))
    elif name in ("cpu", "cuda"):
        check.mark_mutated(hess)
    return hess


def _rademacher(p: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """``±1`` with probability 1/2 each, ``p``'s shape, dtype and device."""
    z = torch.empty(p.shape, dtype=p.dtype, device=p.device)
    return z.bernoulli_(0.5, generator=generator).mul_(2).sub_(1)


def hutchinson_pairs(loss: Tensor, params: Iterable[Tensor], *,
                     generator: torch.Generator | None = None,
                     retain_graph: bool = False) -> list[tuple[Tensor, Tensor]]:
    """Hutchinson probes ``(z, Hz)`` for each parameter, by double backward.

    ``z`` is Rademacher (independent ``±1`` entries, from ``generator`` when given; it must
    live on the parameters' device), and ``Hz`` the parameter's block row of the full
    Hessian-vector product ``∇(∇L · z)``, so ``E[z ⊙ Hz] = diag(H)``. A parameter that
    ``loss`` does not depend on (or depends on linearly) gets ``Hz = 0``. Feed the pairs
    to :func:`hessian_ema_`. ``retain_graph=True`` keeps ``loss``'s graph (e.g. for a
    later ``loss.backward()``).

    Example:
        >>> w = torch.randn(5, requires_grad=True)
        >>> loss = (torch.arange(5.0) * w ** 2).sum() / 2        # H = diag(0, 1, 2, 3, 4)
        >>> [(z, hz)] = hutchinson_pairs(loss, [w])
        >>> torch.equal(z * hz, torch.arange(5.0))
        True
    """
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError("loss must be a scalar tensor")
    if not loss.requires_grad:
        raise ValueError("loss must require grad (computed from the params with autograd on)")
    params = list(params)
    for i, p in enumerate(params):
        if not isinstance(p, Tensor) or not p.requires_grad:
            raise ValueError(f"params[{i}] must be a tensor that requires grad")
        check.float_tensor(f"params[{i}]", p)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    probes = [_rademacher(p.detach(), generator) for p in params]
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    hvps = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params]
    if live:
        found = torch.autograd.grad([grads[i] for i in live], [params[i] for i in live],
                                    grad_outputs=[probes[i] for i in live],
                                    retain_graph=retain_graph, allow_unused=True)
        for i, hz in zip(live, found):
            if hz is not None:
                hvps[i] = hz.detach()
    return list(zip(probes, hvps))


def gauss_newton_pairs(grads: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """``(g, g)`` per gradient: the Gauss-Newton / Fisher pairs for :func:`hessian_ema_`.

    ``grads`` should come from a loss on labels sampled from the model's own predictions
    (Sophia-G's estimator); ``hessian_ema_(h, g, g)`` then tracks ``E[g ⊙ g]``.

    Example:
        >>> g = torch.tensor([1.0, -2.0])
        >>> [(a, b)] = gauss_newton_pairs([g])
        >>> (a * b).tolist()
        [1.0, 4.0]
    """
    pairs = []
    for i, g in enumerate(grads):
        check.float_tensor(f"grads[{i}]", g)
        g = g.detach()
        pairs.append((g, g))
    return pairs
