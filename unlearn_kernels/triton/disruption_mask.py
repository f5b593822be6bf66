"""Triton kernel of the disruption mask (MUDMAN), elementwise over n contiguous elements:

    agree_i = (g_i > 0 and r_i > 0) or (g_i < 0 and r_i < 0)      (g_i · r_i > 0, exactly)
    out_i   = scale · g_i if agree_i else 0
    kept    = Σ_i agree_i

Signs are compared (no product that could underflow; NaN agrees with nothing); ``scale · g_i``
is one fp32 multiply rounded once to the storage type. Each program handles BLOCK elements
and writes its count to a partials buffer, summed afterwards as integers (exact, any order).
``out`` may be ``grad`` itself (in place): a program loads its elements before it stores them.
"""

import torch
import triton
import triton.language as tl

_BLOCK_GPU = 4096
_BLOCK_CPU = 1024


@triton.jit
def _disruption_mask_kernel(grad_ptr, retain_ptr, out_ptr, partials_ptr, n, scale,
                            BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    g = tl.load(grad_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    r = tl.load(retain_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    agree = ((g > 0) & (r > 0)) | ((g < 0) & (r < 0))
    out = tl.where(agree, g * scale, 0.0)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(partials_ptr + pid, tl.sum(agree.to(tl.int32), axis=0))


def disruption_mask(grad: torch.Tensor, retain: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Writes the masked ``scale · grad`` into ``out`` (contiguous, grad's numel and dtype; may
    be ``grad``); returns the int64 count of agreeing elements (a 0-dim tensor)."""
    n = grad.numel()
    if n == 0:
        return torch.zeros((), dtype=torch.int64, device=grad.device)
    block = _BLOCK_GPU if grad.is_cuda else _BLOCK_CPU
    programs = triton.cdiv(n, block)
    partials = torch.empty(programs, dtype=torch.int32, device=grad.device)
    _disruption_mask_kernel[(programs,)](grad, retain, out, partials, n, float(scale),
                                         BLOCK=block, num_warps=8)
    return partials.sum(dtype=torch.int64)
