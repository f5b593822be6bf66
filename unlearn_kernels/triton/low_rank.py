"""Triton kernels of the low-rank family: the projection and the masked Gram matrix.

``low_rank_project``: for x [n, d] and U [d, r] (r <= 256),

    c = x U                 (coeffs, fp32)
    y = x - scale c U^T

Programs are persistent (one per SM) and take row tiles of BLOCK_M rows in turn, so about
SMs x BLOCK_M x d elements are "open" (read once, not yet re-read) at any time: 34 MiB at
d = 4096 in bf16, inside L2. The first loop streams the row tile in BLOCK_K-column chunks and accumulates c [BLOCK_M, BLOCK_R] with ``tl.dot``; the second loop walks the
chunks backwards (the most recently read first, so the re-read hits L2) and writes
y = x + (-scale c) U^T. x is loaded with an L2 evict_last hint the first time and
evict_first the second time. Half-precision x and U go through the tensor cores with -scale c
rounded to x's type; for fp16 it is first scaled by a power of two sigma per tile (so that
max |scale c| sigma lies in [2^14, 2^15), inside fp16's range) and the result is divided by
sigma. fp32 runs the dots in full fp32 ("ieee"), not TF32.

``masked_gram``: G = X^T X over the rows kept by the mask, each program one
[BLOCK_D, BLOCK_D] tile of G, looping over the rows (fp32 accumulation).
"""

import torch
import triton
import triton.language as tl

from .misdirection import _device_properties

MAX_RANK = 256


@triton.jit
def _low_rank_kernel(
    x_ptr, x_stride, u_ptr, y_ptr, c_ptr, n, d, r, scale,
    HALF: tl.constexpr, SCALE_FP16: tl.constexpr, NEED_COEFFS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < r
    num_chunks = tl.cdiv(d, BLOCK_K)
    for tile in range(tl.program_id(0), tl.cdiv(n, BLOCK_M), tl.num_programs(0)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * x_stride

        coef = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < d
            x = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0,
                        eviction_policy="evict_last")
            u = tl.load(u_ptr + cols[:, None] * r + ranks[None, :],
                        mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
            coef += tl.dot(x, u, input_precision="ieee")
        if NEED_COEFFS:
            tl.store(c_ptr + rows.to(tl.int64)[:, None] * r + ranks[None, :], coef,
                     mask=row_ok[:, None] & rank_ok[None, :])

        a = coef * (-scale)
        sigma = 1.0
        if SCALE_FP16:
            m = tl.max(tl.max(tl.abs(a), axis=1), axis=0)
            finite = (m > 0.0) & (m < float("inf"))
            e = 14.0 - tl.floor(tl.log2(tl.where(finite, m, 1.0)))
            e = tl.where(finite, tl.minimum(tl.maximum(e, -100.0), 60.0), 0.0)
            sigma = tl.exp2(e)
            a = a * sigma
        if HALF:
            a = a.to(x_ptr.dtype.element_ty)

        for i in range(0, num_chunks):
            cols = (num_chunks - 1 - i) * BLOCK_K + tl.arange(0, BLOCK_K)
            col_ok = cols < d
            ok = row_ok[:, None] & col_ok[None, :]
            x = tl.load(x_rows + cols[None, :], mask=ok, other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
            u_t = tl.load(u_ptr + cols[None, :] * r + ranks[:, None],
                          mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
            y = (x * sigma + tl.dot(a, u_t, input_precision="ieee")) / sigma
            tl.store(y_ptr + rows.to(tl.int64)[:, None] * d + cols[None, :],
                     y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gram_kernel(x_ptr, x_stride, mask_ptr, g_ptr, n, d, HAS_MASK: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    cols_i = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    cols_j = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok_i = cols_i < d
    ok_j = cols_j < d
    acc = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, n, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        keep = rows < n
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + rows, mask=keep, other=0) != 0)
        base = x_ptr + rows.to(tl.int64)[:, None] * x_stride
        xi = tl.load(base + cols_i[None, :], mask=keep[:, None] & ok_i[None, :], other=0.0)
        xj = tl.load(base + cols_j[None, :], mask=keep[:, None] & ok_j[None, :], other=0.0)
        acc += tl.dot(tl.trans(xi), xj, input_precision="ieee")
    tl.store(g_ptr + cols_i[:, None] * d + cols_j[None, :], acc, mask=ok_i[:, None] & ok_j[None, :])


def _launch(device: torch.device, n: int, r: int) -> tuple[int, int, int, int, int]:
    """(programs, BLOCK_M, BLOCK_K, BLOCK_R, num_warps) of the projection."""
    block_r = max(16, triton.next_power_of_2(r))
    if device.type != "cuda":  # the interpreter: small tiles, a few programs
        return min(triton.cdiv(n, 16), 4), 16, 32, block_r, 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    programs = _device_properties(index).multi_processor_count
    return min(triton.cdiv(n, 32), programs), 32, 64, block_r, (4 if block_r <= 64 else 8)


def low_rank_project(x: torch.Tensor, basis: torch.Tensor, scale: float,
                     need_coeffs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, coeffs) with y = x - scale (x U) U^T and coeffs = x U (fp32, empty unless asked)."""
    n, d = x.shape
    r = basis.shape[1]
    half = x.dtype in (torch.bfloat16, torch.float16)
    u = basis.to(x.dtype if half else torch.float32).contiguous()
    y = torch.empty((n, d), dtype=x.dtype, device=x.device)
    coeffs = torch.empty((n, r) if need_coeffs else (0,), dtype=torch.float32, device=x.device)
    if n == 0:
        return y, coeffs
    programs, block_m, block_k, block_r, num_warps = _launch(x.device, n, r)
    _low_rank_kernel[(programs,)](
        x, x.stride(0), u, y, coeffs if need_coeffs else y, n, d, r, float(scale),
        HALF=half, SCALE_FP16=x.dtype == torch.float16, NEED_COEFFS=need_coeffs,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=num_warps,
    )
    return y, coeffs


def masked_gram(x: torch.Tensor, token_mask) -> torch.Tensor:
    """fp32 X^T X over the rows of x [n, d] that token_mask (bool [n] or None) keeps."""
    n, d = x.shape
    gram = torch.empty((d, d), dtype=torch.float32, device=x.device)
    gpu = x.device.type == "cuda"
    block_d = 64 if gpu else 16
    block_n = 64 if gpu else 16
    grid = (triton.cdiv(d, block_d), triton.cdiv(d, block_d))
    _gram_kernel[grid](
        x, x.stride(0), token_mask if token_mask is not None else x, gram, n, d,
        HAS_MASK=token_mask is not None, BLOCK_D=block_d, BLOCK_N=block_n,
        num_warps=4 if gpu else 1,
    )
    return gram
