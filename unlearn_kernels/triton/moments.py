"""Triton kernels for masked per-feature moments and the feature scores built from them.

masked_moments(x, mask) returns, over the valid rows i of x [n, d],

    count  = #{valid i}
    mean_j = (1 / count) sum_i x_ij
    m2_j   = sum_i (x_ij - mean_j)^2

(all zero when no row is valid) in one pass over x. It uses the row tiling of
misdirection.py: every program keeps a Welford summary (count, mean, M2) per row slot of
its [BLOCK_M, BLOCK_D] tile while it loops over its row tiles, merges its slots into one
summary per column and writes that to a partials buffer; a second small kernel merges the
partials of each column (one launch where a chain of torch ops would cost about ten, which
matters next to a pass over x that takes tens of microseconds). Both merges use Chan's
formula for K summaries (n_k, mean_k, M2_k):

    n    = sum_k n_k
    mean = sum_k n_k mean_k / n,  refined once by  sum_k n_k (mean_k - mean) / n
    M2   = sum_k M2_k + sum_k n_k (mean_k - mean)^2

Like the Welford updates this never forms sum x^2, so a large mean costs no precision.
The order of every sum is fixed, so the result is deterministic.

Every row is first shifted by a pivot p (the first valid row, found on the device) and scaled
by S = 1/8 (exact): the kernels summarise c = S x - S p and the merge kernel returns
mean = (S p + mean_c) / S and M2 = M2_c / S^2. The shift makes the centred terms exact
differences at mean/sigma = 1e6; the scale keeps |c| and every difference of two means of c
inside fp32's range, and the weighted sums are convex combinations (weights n_k / n), so the
mean of rows near 3e38 stays finite. An M2 beyond fp32's range is +inf: every product that may
overflow is formed with its possibly-zero weight first, so it never meets a 0 (no NaN).

feature_scores is elementwise: score_j = (mean_f_j - mean_r_j)^2 / (var_f_j + var_r_j + eps).
"""

import torch
import triton
import triton.language as tl

from .misdirection import _load_tile, _note_occupancy, _row_masks, _row_tiling

# Partial summaries merged per program of the merge kernel (BLOCK_P * BLOCK_D).
_MERGE_TILE = 4096
# Power-of-two scale of the shifted rows (see the module docstring).
SHIFT_SCALE = tl.constexpr(0.125)
_SCORES_BLOCK = 1024


@triton.jit
def _merge_rows(n_k, mean_k, m2_k):
    """Chan's merge along axis 0 of summaries with counts n_k [K] and mean_k, m2_k [K, D]."""
    weight = n_k[:, None]
    n = tl.sum(n_k, axis=0)
    frac = weight * (1.0 / tl.maximum(n, 1.0))
    mean = tl.sum(frac * mean_k, axis=0)
    # One refinement step: the weighted sum of deviations is small, so it is summed
    # almost exactly and removes the rounding error of the large first sum.
    dev = mean_k - mean[None, :]
    fix = tl.sum(frac * dev, axis=0)
    mean += fix
    dev -= fix[None, :]
    m2 = tl.sum(m2_k + (weight * dev) * dev, axis=0)
    return n, mean, m2


@triton.jit
def _moments_partial_kernel(
    x_ptr, x_stride, mask_ptr, pivot_ptr, count_ptr, mean_ptr, m2_ptr, n, d,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    pivot = _pivot(x_ptr, x_stride, pivot_ptr, cols, col_ok) * SHIFT_SCALE
    # Welford summary of each row slot; counts are exact in fp32 below 2^24 rows a slot.
    count = tl.zeros([BLOCK_M], dtype=tl.float32)
    mean = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for row0 in range(pid_m * BLOCK_M, n, tl.num_programs(1) * BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        _, valid = _row_masks(mask_ptr, rows, n, HAS_MASK)
        ok = valid[:, None] & col_ok[None, :]
        x = _load_tile(x_ptr, x_stride, rows, cols, ok)
        c = tl.where(ok, x * SHIFT_SCALE - pivot[None, :], 0.0)
        v = valid.to(tl.float32)
        count += v
        delta = c - mean
        mean += delta * (v / tl.maximum(count, 1.0))[:, None]
        m2 += delta * ((c - mean) * v[:, None])
    total, mean_p, m2_p = _merge_rows(count, mean, m2)
    offsets = pid_m.to(tl.int64) * d + cols
    tl.store(mean_ptr + offsets, mean_p, mask=col_ok)
    tl.store(m2_ptr + offsets, m2_p, mask=col_ok)
    if pid_d == 0:
        tl.store(count_ptr + pid_m, total)


@triton.jit
def _pivot(x_ptr, x_stride, pivot_ptr, cols, col_ok):
    """The pivot row's values (fp32, 0 outside the columns)."""
    row = tl.load(pivot_ptr).to(tl.int64)
    return tl.load(x_ptr + row * x_stride + cols, mask=col_ok, other=0.0).to(tl.float32)


@triton.jit
def _moments_merge_kernel(
    count_ptr, mean_ptr, m2_ptr, count_out_ptr, mean_out_ptr, m2_out_ptr, parts, d,
    x_ptr, x_stride, pivot_ptr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    k = tl.arange(0, BLOCK_P)
    k_ok = k < parts
    cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    n_k = tl.load(count_ptr + k, mask=k_ok, other=0.0)
    ok = k_ok[:, None] & col_ok[None, :]
    mean_k = _load_tile(mean_ptr, d, k, cols, ok)
    m2_k = _load_tile(m2_ptr, d, k, cols, ok)
    n, mean, m2 = _merge_rows(n_k, mean_k, m2_k)
    pivot = _pivot(x_ptr, x_stride, pivot_ptr, cols, col_ok) * SHIFT_SCALE
    inv_scale = 1.0 / SHIFT_SCALE
    mean = tl.where(n > 0, (pivot + mean) * inv_scale, 0.0)
    tl.store(mean_out_ptr + cols, mean, mask=col_ok)
    tl.store(m2_out_ptr + cols, m2 * (inv_scale * inv_scale), mask=col_ok)
    if pid == 0:
        tl.store(count_out_ptr, tl.sum(n_k.to(tl.int64), axis=0))


@triton.jit
def _feature_scores_kernel(
    mean_f_ptr, var_f_ptr, mean_r_ptr, var_r_ptr, out_ptr, d, eps, BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < d
    gap = tl.load(mean_f_ptr + offsets, mask=ok, other=0.0) - tl.load(
        mean_r_ptr + offsets, mask=ok, other=0.0)
    var = tl.load(var_f_ptr + offsets, mask=ok, other=0.0) + tl.load(
        var_r_ptr + offsets, mask=ok, other=0.0)
    tl.store(out_ptr + offsets, gap * gap / (var + eps), mask=ok)


def masked_moments(x, token_mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, m2) over the rows of ``x`` kept by ``token_mask`` (all rows if None)."""
    n, d = x.shape
    if n == 0 or d == 0:
        zeros = torch.zeros(d, dtype=torch.float32, device=x.device)
        return torch.zeros((), dtype=torch.int64, device=x.device), zeros, zeros.clone()
    has_mask = token_mask is not None
    # Narrow column blocks put more of the programs side by side along d, so fewer row
    # programs, hence fewer partials, share each column.
    tiling = _row_tiling(_moments_partial_kernel, x, (has_mask,), 256, 4)
    parts = tiling.grid[1]
    if has_mask:  # the first valid row (row 0 when there is none: the count is 0 then)
        pivot_row = torch.argmax(token_mask.to(torch.uint8)).view(1)
    else:
        pivot_row = torch.zeros(1, dtype=torch.int64, device=x.device)
    # One buffer for the partial means [parts, d], M2s [parts, d] and counts [parts].
    buffer = torch.empty(parts * (2 * d + 1), dtype=torch.float32, device=x.device)
    part_mean, part_m2 = buffer[:2 * parts * d].view(2, parts, d)
    part_count = buffer[2 * parts * d:]
    compiled = _moments_partial_kernel[tiling.grid](
        x, x.stride(0), token_mask if has_mask else part_count, pivot_row, part_count, part_mean,
        part_m2, n, d,
        HAS_MASK=has_mask, BLOCK_M=tiling.block_m, BLOCK_D=tiling.block_d,
        num_warps=tiling.num_warps,
    )
    _note_occupancy(tiling, compiled)
    count = torch.empty((), dtype=torch.int64, device=x.device)
    mean = torch.empty(d, dtype=torch.float32, device=x.device)
    m2 = torch.empty(d, dtype=torch.float32, device=x.device)
    block_p = triton.next_power_of_2(parts)
    merge_block_d = min(triton.next_power_of_2(d), max(1, _MERGE_TILE // block_p))
    _moments_merge_kernel[(triton.cdiv(d, merge_block_d),)](
        part_count, part_mean, part_m2, count, mean, m2, parts, d, x, x.stride(0), pivot_row,
        BLOCK_P=block_p, BLOCK_D=merge_block_d, num_warps=4,
    )
    return count, mean, m2


def feature_scores(mean_f, var_f, mean_r, var_r, eps: float) -> torch.Tensor:
    """(mean_f - mean_r)^2 / (var_f + var_r + eps), elementwise over fp32 [d] vectors."""
    d = mean_f.numel()
    out = torch.empty(d, dtype=torch.float32, device=mean_f.device)
    if d == 0:
        return out
    _feature_scores_kernel[(triton.cdiv(d, _SCORES_BLOCK),)](
        mean_f, var_f, mean_r, var_r, out, d, float(eps), BLOCK=_SCORES_BLOCK, num_warps=4,
    )
    return out
