"""The misdirection family: RMU/SRMU's loss and the inference-time activation edit.

``misdirection_loss`` (differentiable in ``h``, forward and backward fused)::

    w_j  = importance_j            if importance is given
         = 1                       if only control is given
         = 0                       if control is None
    L    = Σ_{valid t} Σ_j [ w_j (h_tj − control_j)² + (1 − w_j)(h_tj − anchor_tj)² ] / (n_valid · d)
    ∂L/∂h_tj = 2 [ w_j (h_tj − control_j) + (1 − w_j)(h_tj − anchor_tj) ] / (n_valid · d)

(the anchor term is dropped when ``anchor`` is None; masked tokens get zero gradient).
``control = c·u`` alone is RMU's forget loss, ``anchor = h₀`` alone is RMU's retain loss,
and importance + control + anchor is SRMU's selective loss.

``masked_edit``: ``h + α · m ⊙ (control − h)`` on valid tokens (``h`` elsewhere), with
``∂out/∂h = 1 − α m``.

Each backend computes the loss and its gradient in one pass (one read of ``h`` and
``anchor``, one write of ``∂h``); the gradient is kept from the forward and handed back by
autograd, scaled only when the incoming gradient is not exactly 1. Under
``create_graph=True`` the gradient is recomputed from ``h`` in plain torch ops instead, so
double backward (Hessian-vector products, ``hutchinson_pairs``) is exact:
``∂²L/∂h_tj² = 2 [w_j + (1 − w_j)·[anchor given]] / (n_valid · d)`` on valid tokens, 0
elsewhere. ``masked_edit`` is affine in ``h``; its backward is plain torch, so its second
derivative (0 in ``h``) comes out of autograd as well.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _backend, _validation as check
from ._registration import refuse_grads, register


def _misdirection_torch(h: Tensor, control: Optional[Tensor], importance: Optional[Tensor],
                        anchor: Optional[Tensor], token_mask: Optional[Tensor], scale: float,
                        need_grad: bool) -> tuple[Tensor, Tensor]:
    """Reference kernel on ``[n, d]`` rows: the loss and its gradient, straight from the math."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    x = h.to(acc)
    residual = torch.zeros_like(x)  # Σ of w·(h − c) and (1 − w)·(h − a)
    terms = torch.zeros_like(x)
    w = importance if importance is not None else torch.full_like(x[0], float(control is not None))
    root = math.sqrt(scale)     # each term is scaled before the sum, so no partial sum overflows
    if control is not None:
        delta = x - control.to(acc)
        terms = terms + w * (delta * root) ** 2
        residual = residual + w * delta
    if anchor is not None:
        delta = x - anchor.to(acc)
        terms = terms + (1 - w) * (delta * root) ** 2
        residual = residual + (1 - w) * delta
    if token_mask is not None:
        valid = token_mask[:, None]
        terms = torch.where(valid, terms, 0)
        residual = torch.where(valid, residual, 0)
    loss = terms.sum()
    grad = (2 * scale * residual).to(h.dtype) if need_grad else h.new_empty(0)
    return loss, grad


@torch.library.custom_op("unlearn_kernels::triton_misdirection_fwd_bwd", mutates_args=())
def _misdirection_triton(h: Tensor, control: Optional[Tensor], importance: Optional[Tensor],
                         anchor: Optional[Tensor], token_mask: Optional[Tensor], scale: float,
                         need_grad: bool) -> tuple[Tensor, Tensor]:
    from ..triton import misdirection_fwd_bwd

    return misdirection_fwd_bwd(h, control, importance, anchor, token_mask, scale, need_grad)


def _misdirection_fake(h, control, importance, anchor, token_mask, scale, need_grad):
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    grad = h.new_empty(h.shape) if need_grad else h.new_empty(0)
    return h.new_empty((), dtype=acc), grad


@torch.library.custom_op("unlearn_kernels::triton_masked_edit", mutates_args=())
def _masked_edit_triton(h: Tensor, importance: Tensor, control: Tensor, alpha: float,
                        token_mask: Optional[Tensor]) -> Tensor:
    from ..triton import masked_edit

    return masked_edit(h, importance, control, alpha, token_mask)


def _masked_edit_torch(h: Tensor, importance: Tensor, control: Tensor, alpha: float,
                       token_mask: Optional[Tensor]) -> Tensor:
    """Reference kernel: ``h + α m ⊙ (c − h)`` on valid rows, ``h`` on masked rows."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    x = h.to(acc)
    edited = x + alpha * importance.to(acc) * (control.to(acc) - x)
    if token_mask is not None:
        edited = torch.where(token_mask[:, None], edited, x)
    return edited.to(h.dtype)


def _masked_edit_fake(h, importance, control, alpha, token_mask):
    return h.new_empty(h.shape)


def _misdirection_setup(ctx, inputs, output):
    h, control, importance, anchor, token_mask, scale, need_grad = inputs
    ctx.save_for_backward(h, control, importance, anchor, token_mask, output[1] if need_grad else None)
    ctx.scale, ctx.need_grad = scale, need_grad


def _misdirection_kernel_backward(ctx, grad_loss, grad_grad):
    """The kernel's outputs are ``L`` and ``∂L/∂h``: ``∂/∂h`` of ``a·L + ⟨B, ∂L/∂h⟩`` is
    ``a·∂L/∂h + B ⊙ ∂²L/∂h²`` with the diagonal ``∂²L/∂h² = 2·scale·(w + (1 − w)[anchor])``."""
    refuse_grads("misdirection_fwd_bwd", ctx, (0,))
    h, control, importance, anchor, token_mask, grad = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return (None,) * 7
    first = grad if grad is not None else _differentiable_grad(h, control, importance, anchor, token_mask,
                                                               ctx.scale, None)
    total = grad_loss.to(torch.float32) * first.to(torch.float32)
    if ctx.need_grad and grad_grad is not None and grad_grad.numel():
        w = (importance if importance is not None else
             torch.full((h.shape[-1],), float(control is not None), device=h.device)).to(torch.float32)
        diagonal = 2 * ctx.scale * (w + (1 - w) * float(anchor is not None))
        if token_mask is not None:
            diagonal = torch.where(token_mask.view(-1, 1), diagonal, 0)
        total = total + grad_grad.to(torch.float32) * diagonal
    return (total.to(h.dtype),) + (None,) * 6


def _masked_edit_setup(ctx, inputs, output):
    _, importance, _, alpha, token_mask = inputs
    ctx.save_for_backward(importance, token_mask)
    ctx.alpha = alpha


def _edit_grad(grad_out: Tensor, importance: Tensor, token_mask: Optional[Tensor], alpha: float) -> Tensor:
    """``∂L/∂h = g ⊙ (1 − α m)`` on valid tokens, ``g`` on masked ones (``token_mask`` flat)."""
    factor = 1 - alpha * importance
    if token_mask is not None:
        keep = token_mask.view(grad_out.shape[:-1] + (1,))
        factor = torch.where(keep, factor, torch.ones_like(factor))
    return (grad_out * factor).to(grad_out.dtype)


def _masked_edit_kernel_backward(ctx, grad_out):
    refuse_grads("masked_edit", ctx, (0,))
    importance, token_mask = ctx.saved_tensors
    return _edit_grad(grad_out, importance, token_mask, ctx.alpha), None, None, None, None


register("misdirection_fwd_bwd", _misdirection_fake, _misdirection_kernel_backward, _misdirection_setup)
register("masked_edit", _masked_edit_fake, _masked_edit_kernel_backward, _masked_edit_setup)


def _kernels(backend: str):
    """(misdirection_fwd_bwd, masked_edit) implementations of ``backend``."""
    if backend == "torch":
        return _misdirection_torch, _masked_edit_torch
    if backend == "triton":
        return _misdirection_triton, _masked_edit_triton
    return _backend.compiled_op("misdirection_fwd_bwd"), _backend.compiled_op("masked_edit")


def _differentiable_grad(h: Tensor, control, importance, anchor, token_mask, scale: float, factor) -> Tensor:
    """``∂L/∂h`` from the reference kernel's formulas, plain torch ops of ``h`` (used under
    ``create_graph=True``), so that the gradient is itself differentiable:
    ``∂²L/∂h_tj² = 2 [w_j + (1 − w_j)·[anchor]] / (n_valid·d)`` on valid tokens, the
    Hessian-vector products double backward needs. ``anchor`` is in rows, ``token_mask`` flat;
    ``factor`` (a tensor, or None) multiplies the scale under ``torch.compile``."""
    rows = h.reshape(-1, h.shape[-1])
    grad = _misdirection_torch(rows, control, importance, anchor, token_mask, scale, True)[1].view(h.shape)
    return grad if factor is None else grad * factor.to(grad.dtype)


def _no_vmap(op: str):
    def vmap(info, in_dims, *args):
        raise NotImplementedError(f"{op} has no torch.func.vmap rule (its kernels are fused over all rows); "
                                  "call it on the stacked batch, or loop")
    return staticmethod(vmap)


class _FusedMisdirection(torch.autograd.Function):
    """Loss and (non-differentiable, saved) gradient from one fused kernel call. The
    ``forward``/``setup_context`` split makes it usable under ``torch.func.grad``."""

    @staticmethod
    def forward(h, rows, control, importance, anchor, token_mask, scale, kernel, factor, need_grad):
        loss, grad = kernel(rows, control, importance, anchor, token_mask, scale, need_grad)
        if factor is not None:          # compiled with a mask: 1 / n_valid as a tensor
            loss = loss * factor.to(loss.dtype)
            grad = (grad * factor.to(grad.dtype)) if need_grad else grad
        return loss, (grad.view(h.shape) if need_grad else grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, _, control, importance, anchor, token_mask, scale, _, factor, need_grad = inputs
        _, grad = output
        ctx.mark_non_differentiable(grad)
        # h itself is kept (not a copy: it is the caller's activation) for double backward
        ctx.save_for_backward(grad if need_grad else None, h, control, importance, anchor, token_mask, factor)
        ctx.scale, ctx.need_grad = scale, need_grad

    @staticmethod
    def backward(ctx, grad_loss, _unused):
        grad, h, control, importance, anchor, token_mask, factor = ctx.saved_tensors
        none = (None,) * 9
        if torch.is_grad_enabled() or not ctx.need_grad:   # create_graph=True (or no fused grad)
            grad = _differentiable_grad(h, control, importance, anchor, token_mask, ctx.scale, factor)
            return (grad * grad_loss.to(grad.dtype),) + none
        if torch.compiler.is_compiling() or not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            grad = grad * grad_loss.to(grad.dtype)
        return (grad,) + none

    vmap = _no_vmap("misdirection_loss")


def misdirection_loss(h: Tensor, control: Tensor | None = None, importance: Tensor | None = None,
                      anchor: Tensor | None = None, token_mask: Tensor | None = None, *,
                      backend: str = "auto") -> Tensor:
    """RMU/SRMU misdirection loss with a fused forward and backward (see the module docstring).

    Args:
        h: activations ``[..., d]`` (fp32, bf16 or fp16; fp64 on the cpu/torch backends).
        control: the misdirection target ``[d]`` (``c · u``), or None.
        importance: per-feature weights ``[d]`` in [0, 1] (SRMU's map); needs ``control``.
        anchor: the frozen model's activations, same shape and dtype as ``h``, or None.
        token_mask: ``h.shape[:-1]`` bool or 0/1; masked tokens contribute nothing.
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"torch"``.

    Returns:
        the scalar loss (fp32; fp64 for fp64 ``h``). Gradients flow to ``h`` only.

    Example:
        >>> h = torch.randn(2, 5, 8, requires_grad=True)
        >>> u = torch.rand(8); control = 6.5 * u / u.norm()
        >>> loss = misdirection_loss(h, control)          # RMU forget loss
        >>> loss.backward()
    """
    check.activations("h", h)
    if control is None and anchor is None:
        raise ValueError("misdirection_loss needs control, anchor or both (got neither)")
    if importance is not None and control is None:
        raise ValueError("importance weights the control term: pass control too")
    for name, t in (("control", control), ("importance", importance), ("anchor", anchor)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"misdirection_loss gives no gradient to {name}, which requires grad: pass "
                             f"{name}.detach() (the loss differentiates h only)")
    if control is not None:
        control = check.feature_vector("control", control, h, "h")
    if importance is not None:
        importance = check.feature_vector("importance", importance, h, "h")
        check.unit_interval("importance", importance)
    if anchor is not None:
        anchor = check.matching("anchor", anchor, h, "h")
    mask = check.token_mask(token_mask, h, "h")
    rows = check.rows_view(h)
    factor = None
    if torch.compiler.is_compiling() and mask is not None:
        # the token count is data: kept as a tensor so the graph does not break on int(mask.sum())
        scale, factor = 1.0 / rows.shape[1], 1.0 / mask.sum().to(torch.float32)
    else:
        n_valid = check.count_valid(mask, rows.shape[0], "misdirection_loss (a mean over tokens)")
        scale = 1.0 / (n_valid * rows.shape[1])
    name = _backend.resolve(backend, h.device, h.dtype)
    kernel = _kernels(name)[0]
    anchor_rows = None if anchor is None else check.rows_view(anchor.detach())
    need_grad = h.requires_grad and torch.is_grad_enabled()
    return _FusedMisdirection.apply(h, rows.detach(), control, importance, anchor_rows, mask,
                                    scale, kernel, factor, need_grad)[0]


class _MaskedEdit(torch.autograd.Function):
    @staticmethod
    def forward(h, rows, importance, control, alpha, token_mask, kernel):
        return kernel(rows, importance, control, alpha, token_mask).view(h.shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, importance, _, alpha, token_mask, _ = inputs
        ctx.save_for_backward(importance, token_mask)
        ctx.alpha = alpha

    @staticmethod
    def backward(ctx, grad_out):
        importance, token_mask = ctx.saved_tensors
        return _edit_grad(grad_out, importance, token_mask, ctx.alpha), None, None, None, None, None, None

    vmap = _no_vmap("masked_edit")


def masked_edit(h: Tensor, importance: Tensor, control: Tensor, alpha: float = 1.0,
                token_mask: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    """Training-free activation edit ``h + α · m ⊙ (control − h)`` (SRMU at inference time).

    ``importance`` (``m``, ``[d]`` in [0, 1]) chooses the features to steer, ``control`` is
    the target ``[d]``, ``alpha`` the strength (1 replaces the selected features by the
    target). Tokens where ``token_mask`` is False pass through unchanged. Returns a new
    tensor of ``h``'s shape and dtype, differentiable in ``h``.

    Example:
        >>> h = torch.randn(4, 16)
        >>> m = torch.zeros(16); m[:3] = 1
        >>> out = masked_edit(h, m, torch.full((16,), 5.0), alpha=0.5)
    """
    check.activations("h", h)
    importance = check.feature_vector("importance", importance, h, "h")
    check.unit_interval("importance", importance)
    control = check.feature_vector("control", control, h, "h")
    alpha = check.finite_scalar("alpha", alpha)
    mask = check.token_mask(token_mask, h, "h")
    name = _backend.resolve(backend, h.device, h.dtype)
    kernel = _kernels(name)[1]
    return _MaskedEdit.apply(h, check.rows_view(h).detach(), importance, control, alpha, mask,
                             kernel)
