"""The low-rank family: MRP's projection and the Gram matrices its bases come from.

``low_rank_project(x, U, s)`` with ``U`` = ``basis`` ``[d, r]`` (orthonormal columns)::

    c = x U                     (the coordinates of x in span(U), fp32)
    y = x − s · c Uᵀ            (s = 1: the orthogonal projection onto span(U)^⊥)

For ``s = 1`` the map is idempotent and ``y ⟂ span(U)``; ``0 < s < 1`` only damps the
subspace. Gradients, with ``g = ∂L/∂y``::

    ∂L/∂x = g − s (g U) Uᵀ                       (the same projection applied to g)
    ∂L/∂U = −s (xᵀ (g U) + gᵀ (x U))             (fp32 accumulation)

so the backward pass re-uses the forward kernel on ``g``; its by-product ``g U`` and the
forward's ``x U`` (kept only when ``U`` requires grad) give ``∂L/∂U`` with two thin matrix
products. Under ``create_graph=True`` the same two formulas run as plain torch ops, so
double backward is exact (the map is linear in ``x``: ``∂²/∂x² = 0``; the mixed and ``U``
terms come from differentiating the formulas). ``∂L/∂U`` holds for any ``U``; orthonormality is a property of the input that is
checked (``‖UᵀU − I‖_max``, an r×r product and one host sync) unless ``assume_orthonormal``.

``masked_gram(x, token_mask)``: ``G = Σ_valid x_tᵀ x_t`` in fp32, ``[d, d]``; feed it to
:func:`~unlearn_kernels.ops.low_rank_basis.forget_basis` and ``grow_basis``.

Each compiled/Triton projection kernel reads x from memory once per call: a row tile's
first product streams it in column chunks, and its second product re-reads those chunks
from L2 (CUDA, Triton) or from the core's cache (CPU) — see the kernels' top comments.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import _backend, _validation as check
from ._registration import register

MAX_RANK = 256
# Tolerance of ‖UᵀU − I‖_max by the basis' dtype: well above what rounding an orthonormal
# basis to that dtype produces, far below the O(1) error of a basis that is not orthonormal.
ORTHONORMAL_TOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2,
                   torch.bfloat16: 5e-2}
_CHUNK_ELEMENTS = 1 << 24  # elements of a half-precision operand upcast at once for ∂U


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _project_torch(x: Tensor, basis: Tensor, scale: float, need_coeffs: bool) -> tuple[Tensor, Tensor]:
    """Reference kernel on ``[n, d]`` rows: ``(x − s (xU) Uᵀ, xU or empty)``."""
    acc = _acc_dtype(x)
    xf, u = x.to(acc), basis.to(acc)
    coeffs = xf @ u
    y = (xf - scale * (coeffs @ u.T)).to(x.dtype)
    return y, coeffs if need_coeffs else x.new_empty(0, dtype=acc)


def _gram_torch(x: Tensor, token_mask: Optional[Tensor]) -> Tensor:
    """Reference kernel: ``X_validᵀ X_valid`` in fp32 (fp64 for fp64 x)."""
    rows = (x if token_mask is None else x[token_mask]).to(_acc_dtype(x))
    return rows.T @ rows


@torch.library.custom_op("unlearn_kernels::triton_low_rank_project", mutates_args=())
def _project_triton(x: Tensor, basis: Tensor, scale: float, need_coeffs: bool) -> tuple[Tensor, Tensor]:
    from ..triton.low_rank import low_rank_project

    return low_rank_project(x, basis, scale, need_coeffs)


@torch.library.custom_op("unlearn_kernels::triton_masked_gram", mutates_args=())
def _gram_triton(x: Tensor, token_mask: Optional[Tensor]) -> Tensor:
    from ..triton.low_rank import masked_gram

    return masked_gram(x, token_mask)


def _project_fake(x, basis, scale, need_coeffs):
    shape = (x.shape[0], basis.shape[1]) if need_coeffs else (0,)
    return x.new_empty(x.shape), x.new_empty(shape, dtype=_acc_dtype(x))


def _gram_fake(x, token_mask):
    return x.new_empty((x.shape[1], x.shape[1]), dtype=_acc_dtype(x))


def _project_setup(ctx, inputs, output):
    x, basis, scale, need_coeffs = inputs
    ctx.save_for_backward(x, basis)
    ctx.scale, ctx.need_coeffs = scale, need_coeffs


def _project_kernel_backward(ctx, grad_y, grad_coeffs):
    """Outputs ``y = x − s (xU) Uᵀ`` and ``c = xU`` (see :func:`_project_grads`)."""
    x, basis = ctx.saved_tensors
    k = grad_coeffs if ctx.need_coeffs and grad_coeffs is not None and grad_coeffs.numel() else None
    grad_x, grad_u = _project_grads(grad_y, x, basis, ctx.scale, ctx.needs_input_grad[0], ctx.needs_input_grad[1], k)
    return grad_x, grad_u, None, None


def _gram_setup(ctx, inputs, output):
    x, token_mask = inputs
    ctx.save_for_backward(x, token_mask)


def _gram_kernel_backward(ctx, grad_gram):
    """``G = Σ_valid xᵀx``: ``∂/∂x = x (K + Kᵀ)`` on valid rows, 0 on masked ones."""
    x, token_mask = ctx.saved_tensors
    grad = x.to(grad_gram.dtype) @ (grad_gram + grad_gram.T)
    if token_mask is not None:
        grad = torch.where(token_mask.view(-1, 1), grad, 0)
    return grad.to(x.dtype), None


register("low_rank_project", _project_fake, _project_kernel_backward, _project_setup)
register("masked_gram", _gram_fake, _gram_kernel_backward, _gram_setup)


def _kernels(backend: str):
    """(low_rank_project, masked_gram) implementations of ``backend``."""
    if backend == "torch":
        return _project_torch, _gram_torch
    if backend == "triton":
        return _project_triton, _gram_triton
    return _backend.compiled_op("low_rank_project"), _backend.compiled_op("masked_gram")


def _transposed_product(a: Tensor, b: Tensor) -> Tensor:
    """``aᵀ b`` for ``a`` ``[n, d]`` (any float dtype) and ``b`` ``[n, r]`` (fp32/fp64), in b's dtype.

    Half-precision ``a`` is upcast a row chunk at a time, so the product accumulates in fp32
    without materialising an fp32 copy of all of ``a``.
    """
    if a.dtype == b.dtype:
        return a.T @ b
    out = b.new_zeros((a.shape[1], b.shape[1]))
    step = max(1, _CHUNK_ELEMENTS // max(1, a.shape[1]))
    for i in range(0, a.shape[0], step):
        out.addmm_(a[i:i + step].T.to(b.dtype), b[i:i + step])
    return out


class _LowRankProject(torch.autograd.Function):
    @staticmethod
    def forward(x, rows, basis, scale, kernel, need_basis_grad, given):
        y, coeffs = kernel(rows, basis, scale, need_basis_grad)
        return y.view(x.shape), coeffs

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, basis, scale, kernel, need_basis_grad, given = inputs
        _, coeffs = output
        ctx.mark_non_differentiable(coeffs)
        # x itself (the caller's tensor, no copy) is kept when U needs a gradient: ∂L/∂U reads it
        ctx.save_for_backward(x if need_basis_grad else None, basis, coeffs if need_basis_grad else None)
        # the caller's basis (a contiguous copy of it is what is saved, so autograd cannot see an
        # in-place change of the original; this check does, as autograd does for a contiguous one)
        ctx.scale, ctx.kernel, ctx.given = scale, kernel, given
        ctx.given_version = given[0]._version if given is not None else None

    @staticmethod
    def vmap(info, in_dims, *args):
        raise NotImplementedError("low_rank_project has no torch.func.vmap rule (its kernel is fused over all "
                                  "rows); call it on the stacked batch, or loop")

    @staticmethod
    def backward(ctx, grad_y, _unused):
        x, basis, coeffs = ctx.saved_tensors
        if ctx.given is not None and ctx.given[0]._version != ctx.given_version:
            raise RuntimeError("low_rank_project: the basis was modified in place between the forward and the "
                               f"backward (version {ctx.given_version} -> {ctx.given[0]._version}); clone it, or "
                               "change it after backward")
        need_basis_grad = ctx.needs_input_grad[2] and coeffs is not None
        if torch.is_grad_enabled() or (ctx.needs_input_grad[2] and coeffs is None):
            # create_graph=True: the same formulas in plain torch ops
            grad_x, grad_basis = _project_grads(grad_y, x, basis, ctx.scale, ctx.needs_input_grad[0],
                                                ctx.needs_input_grad[2])
            return grad_x, None, grad_basis, None, None, None, None
        g = check.rows_view(grad_y)
        grad_rows, grad_coeffs = ctx.kernel(g, basis, ctx.scale, need_basis_grad)
        grad_x = grad_rows.view(grad_y.shape) if ctx.needs_input_grad[0] else None
        grad_basis = None
        if need_basis_grad:
            rows = check.rows_view(x.detach())
            grad_basis = (_transposed_product(rows, grad_coeffs) + _transposed_product(g, coeffs))
            grad_basis = (-ctx.scale * grad_basis).to(basis.dtype)
        return grad_x, None, grad_basis, None, None, None, None


def _project_grads(grad_y, x, basis, scale, need_x, need_basis, grad_coeffs=None):
    """``(∂L/∂x, ∂L/∂U)`` of ``y = x − s (xU) Uᵀ`` as differentiable torch ops of ``grad_y``
    (``g``), ``x`` and ``U`` (module docstring), so that second derivatives (``∂²/∂U∂x``,
    ``∂²/∂U²``) are exact; with ``grad_coeffs`` (``k``, the gradient of the kernel's second
    output ``c = xU``) also ``+ k Uᵀ`` and ``+ xᵀ k``."""
    acc = torch.float64 if grad_y.dtype == torch.float64 else torch.float32
    u = basis.to(acc)
    g = grad_y.reshape(-1, grad_y.shape[-1]).to(acc)
    gu = g @ u
    k = None if grad_coeffs is None else grad_coeffs.to(acc)
    grad_x = grad_basis = None
    if need_x:
        grad_x = g - scale * gu @ u.T
        grad_x = (grad_x if k is None else grad_x + k @ u.T).view(grad_y.shape).to(grad_y.dtype)
    if need_basis:
        rows = x.reshape(-1, x.shape[-1]).to(acc)
        grad_basis = -scale * (rows.T @ gu + g.T @ (rows @ u))
        grad_basis = (grad_basis if k is None else grad_basis + rows.T @ k).to(basis.dtype)
    return grad_x, grad_basis


def check_basis(basis, d: int, like: Tensor | None = None) -> int:
    """Validate ``basis`` as a ``[d, r]`` floating tensor with 1 ≤ r ≤ min(d, 256); returns r.

    With ``like`` (the activations), the basis must also share its device and be fp32 or
    its dtype.
    """
    if not isinstance(basis, Tensor):
        raise TypeError(f"basis must be a torch.Tensor, got {type(basis).__name__}")
    if not basis.is_floating_point():
        raise TypeError(f"basis must be a floating tensor, got {basis.dtype}")
    if basis.dim() != 2:
        raise ValueError(f"basis must be 2-D [d, r], got shape {tuple(basis.shape)}")
    if basis.shape[0] != d:
        raise ValueError(f"basis must have shape [{d}, r] (d = the last dim of x), got {tuple(basis.shape)}")
    r = basis.shape[1]
    if r < 1:
        raise ValueError("basis must have at least one column (rank r >= 1)")
    if r > d:
        raise ValueError(f"basis rank r={r} exceeds d={d}: at most d orthonormal columns exist")
    if r > MAX_RANK:
        raise ValueError(f"basis rank r={r} exceeds the supported maximum {MAX_RANK}")
    if like is not None:
        if basis.dtype not in (torch.float32, like.dtype):
            raise TypeError(f"basis must be float32 or x's dtype ({like.dtype}), got {basis.dtype}")
        check.same_device("basis", basis, like, "x")
    return r


def check_orthonormal(basis: Tensor) -> None:
    """ValueError unless ``‖UᵀU − I‖_max`` is within :data:`ORTHONORMAL_TOL` (one host sync).
    Eager only: under ``torch.compile`` it would break the graph, so it is skipped there."""
    if torch.compiler.is_compiling():
        return
    u = basis.detach().to(torch.float64)
    eye = torch.eye(u.shape[1], dtype=torch.float64, device=u.device)
    error = float((u.T @ u - eye).abs().max())
    tol = ORTHONORMAL_TOL.get(basis.dtype, 1e-4)
    if not error <= tol:
        raise ValueError(
            f"basis columns must be orthonormal: max |UᵀU − I| = {error:.3g} > {tol:g} for "
            f"{basis.dtype}; orthonormalise it (torch.linalg.qr) or pass assume_orthonormal=True")


def low_rank_project(x: Tensor, basis: Tensor, scale: float = 1.0, *, assume_orthonormal: bool = False,
                     backend: str = "auto") -> Tensor:
    """``x − scale · (x U) Uᵀ``: remove (``scale = 1``) or damp the subspace spanned by ``basis``.

    Args:
        x: activations ``[..., d]`` (fp32, bf16 or fp16; fp64 on the cpu/torch backends).
        basis: ``U``, ``[d, r]`` with orthonormal columns, 1 ≤ r ≤ min(d, 256); fp32 or
            x's dtype, on x's device. Gradients flow to it when it requires grad (MRP
            trains its basis).
        scale: finite real ``s``; 1 gives the orthogonal projection onto span(U)^⊥.
        assume_orthonormal: skip the ``‖UᵀU − I‖_max`` check (and its host sync).
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"torch"``.

    Returns:
        a tensor of x's shape and dtype, differentiable in x and basis (math in the
        module docstring). The bf16/fp16 kernels on the GPU feed U and the coefficients to
        the tensor cores in x's dtype (fp32 accumulation).

    Example:
        >>> u, _ = torch.linalg.qr(torch.randn(16, 2))
        >>> h = torch.randn(3, 5, 16)
        >>> y = low_rank_project(h, u)
        >>> bool((y @ u).abs().max() < 1e-5)
        True
    """
    check.activations("x", x)
    check_basis(basis, x.shape[-1], x)
    scale = check.finite_scalar("scale", scale)
    if not assume_orthonormal:
        check_orthonormal(basis)
    name = _backend.resolve(backend, x.device, x.dtype)
    kernel = _kernels(name)[0]
    # the caller's tensor, whose version the backward checks (not traced under torch.compile,
    # where the check would break the graph)
    given = None if torch.compiler.is_compiling() else (basis,)
    if x.dtype == torch.float64 and basis.dtype != torch.float64:
        basis = basis.to(torch.float64)     # fp64 activations: every backend projects in fp64
    need_basis_grad = basis.requires_grad and torch.is_grad_enabled()
    if not need_basis_grad:   # a trainable basis under no_grad: the kernels' out= calls refuse it otherwise
        basis = basis.detach()
    return _LowRankProject.apply(x, check.rows_view(x).detach(), basis.contiguous(), scale, kernel,
                                 need_basis_grad, given)[0]


def projection_hook(basis: Tensor, scale: float = 1.0, *, assume_orthonormal: bool = False,
                    backend: str = "auto") -> Callable:
    """A forward hook that applies :func:`low_rank_project` to a module's output.

    Use with ``module.register_forward_hook(projection_hook(U))``: a tensor output is
    projected; a tuple output (a transformer block's ``(hidden_states, ...)``) has its first
    element projected and the rest passed through. The basis is validated (and its
    orthonormality checked) once, here; it is moved to the output's device on the fly (fp32
    unless it already has the output's dtype) and keeps receiving gradients.

    Example:
        >>> u, _ = torch.linalg.qr(torch.randn(8, 2))
        >>> layer = torch.nn.Linear(8, 8)
        >>> handle = layer.register_forward_hook(projection_hook(u))
        >>> bool((layer(torch.randn(4, 8)) @ u).abs().max() < 1e-5)
        True
        >>> handle.remove()
    """
    check_basis(basis, basis.shape[0] if isinstance(basis, Tensor) and basis.dim() == 2 else -1)
    scale = check.finite_scalar("scale", scale)
    if not assume_orthonormal:
        check_orthonormal(basis)

    def project(h: Tensor) -> Tensor:
        u = basis
        if u.device != h.device or u.dtype not in (torch.float32, h.dtype):
            u = u.to(device=h.device, dtype=_acc_dtype(h))
        return low_rank_project(h, u, scale, assume_orthonormal=True, backend=backend)

    def hook(module, inputs, output):
        if isinstance(output, Tensor):
            return project(output)
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (project(output[0]),) + tuple(output[1:])
        raise TypeError(f"projection_hook expects a tensor or a tuple starting with one, got "
                        f"{type(output).__name__} from {type(module).__name__}")

    return hook


def masked_gram(x: Tensor, token_mask: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    """``Σ_valid x_tᵀ x_t``: the fp32 ``[d, d]`` Gram matrix of the tokens ``token_mask`` keeps.

    Gram matrices of several batches add up; pass forget and retain Grams to
    :func:`~unlearn_kernels.ops.low_rank_basis.forget_basis`. A mask that keeps nothing
    gives zeros. Differentiable in x (``∂/∂x = x (K + Kᵀ)`` on valid rows), on every backend.

    Example:
        >>> x = torch.randn(2, 6, 4)
        >>> g = masked_gram(x, torch.tensor([[1, 1, 0, 0, 1, 1], [0, 1, 1, 1, 1, 1]]))
        >>> g.shape, g.dtype
        (torch.Size([4, 4]), torch.float32)
    """
    check.activations("x", x)
    mask = check.token_mask(token_mask, x, "x")
    name = _backend.resolve(backend, x.device, x.dtype)
    return _kernels(name)[1](check.rows_view(x), mask)
