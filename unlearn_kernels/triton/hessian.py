"""Triton kernel of the Hessian-diagonal EMA, in place over n contiguous elements:

    hess_i <- beta * hess_i + (1 - beta) * a_i * b_i        (b = a when absent)

fp32 arithmetic, one rounding to hess's dtype. Each program handles BLOCK elements.
"""

import torch
import triton
import triton.language as tl

_BLOCK_GPU = 2048
_BLOCK_CPU = 1024


@triton.jit
def _hessian_ema_kernel(hess_ptr, a_ptr, b_ptr, n, beta, one_minus_beta,
                        HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    h = tl.load(hess_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    else:
        b = a
    out = beta * h + one_minus_beta * (a * b)
    tl.store(hess_ptr + offsets, out.to(hess_ptr.dtype.element_ty), mask=ok)


def hessian_ema_(hess: torch.Tensor, a: torch.Tensor, b, beta: float) -> None:
    """In-place EMA on contiguous tensors of one numel (hess fp32 or a's dtype)."""
    n = hess.numel()
    if n == 0:
        return
    block = _BLOCK_GPU if hess.is_cuda else _BLOCK_CPU
    _hessian_ema_kernel[(triton.cdiv(n, block),)](
        hess, a, b if b is not None else a, n, float(beta), float(1.0 - beta),
        HAS_B=b is not None, BLOCK=block, num_warps=8,
    )
