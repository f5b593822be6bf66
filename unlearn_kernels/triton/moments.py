"""Triton kernels for masked per-feature moments and the feature scores built from them.

masked_moments(x, mask) returns, over the valid rows i of x [n, d],

    count  = #{valid i}
    mean_j = (1 / count) sum_i x_ij
    m2_j   = sum_i (x_ij - mean_j)^2

(all zero when no row is valid) in one pass over x. It uses the tiling of misdirection.py:
every program keeps a Welford summary (count, mean, M2) per row slot of its
[BLOCK_M, BLOCK_D] tile while it loops over its row tiles, merges its slots into one
summary per column, and writes that to a partials buffer; a second small kernel merges the
partials of each column. Both merges use Chan's formula for K summaries (n_k, mean_k, M2_k):

    n    = sum_k n_k
    mean = sum_k n_k mean_k / n
    M2   = sum_k M2_k + sum_k n_k (mean_k - mean)^2

which, like the Welford updates, never forms sum x^2, so large means cost no precision.
The order of every sum is fixed, so the result is deterministic.

feature_scores is elementwise: score_j = (mean_f_j - mean_r_j)^2 / (var_f_j + var_r_j + eps).
"""

import torch
import triton
import triton.language as tl

from .misdirection import _load_tile, _row_masks, _tile_config

# Partial summaries merged per program of the merge kernel (BLOCK_P * BLOCK_D).
_MERGE_TILE = 4096
_SCORES_BLOCK_GPU = 1024
_SCORES_BLOCK_CPU = 64


@triton.jit
def _merge_rows(n_k, mean_k, m2_k):
    """Chan's merge along axis 0 of summaries with counts n_k [K] and mean_k, m2_k [K, D]."""
    weight = n_k[:, None]
    n = tl.sum(n_k, axis=0)
    mean = tl.sum(weight * mean_k, axis=0) / tl.maximum(n, 1.0)
    dev = mean_k - mean[None, :]
    m2 = tl.sum(m2_k + weight * dev * dev, axis=0)
    return n, mean, m2


@triton.jit
def _moments_partial_kernel(
    x_ptr, x_stride, mask_ptr, count_ptr, mean_ptr, m2_ptr, n, d,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    # Welford summary of each row slot; counts are exact in fp32 below 2^24 rows a slot.
    count = tl.zeros([BLOCK_M], dtype=tl.float32)
    mean = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for row0 in range(pid_m * BLOCK_M, n, tl.num_programs(1) * BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        _, valid = _row_masks(mask_ptr, rows, n, HAS_MASK)
        x = _load_tile(x_ptr, x_stride, rows, cols, valid[:, None] & col_ok[None, :])
        v = valid.to(tl.float32)
        count += v
        delta = x - mean
        mean += delta * (v / tl.maximum(count, 1.0))[:, None]
        m2 += delta * (x - mean) * v[:, None]
    total, mean_p, m2_p = _merge_rows(count, mean, m2)
    offsets = pid_m.to(tl.int64) * d + cols
    tl.store(mean_ptr + offsets, mean_p, mask=col_ok)
    tl.store(m2_ptr + offsets, m2_p, mask=col_ok)
    if pid_d == 0:
        tl.store(count_ptr + pid_m, total)


@triton.jit
def _moments_merge_kernel(
    count_ptr, mean_ptr, m2_ptr, count_out_ptr, mean_out_ptr, m2_out_ptr, parts, d,
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
    _, mean, m2 = _merge_rows(n_k, mean_k, m2_k)
    tl.store(mean_out_ptr + cols, mean, mask=col_ok)
    tl.store(m2_out_ptr + cols, m2, mask=col_ok)
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
    block_m, block_d, num_warps, grid = _tile_config(x)
    parts = grid[1]
    part_count = torch.empty(parts, dtype=torch.float32, device=x.device)
    part_mean = torch.empty((parts, d), dtype=torch.float32, device=x.device)
    part_m2 = torch.empty((parts, d), dtype=torch.float32, device=x.device)
    _moments_partial_kernel[grid](
        x, x.stride(0), token_mask if token_mask is not None else part_count,
        part_count, part_mean, part_m2, n, d,
        HAS_MASK=token_mask is not None, BLOCK_M=block_m, BLOCK_D=block_d,
        num_warps=num_warps,
    )
    count = torch.empty((), dtype=torch.int64, device=x.device)
    mean = torch.empty(d, dtype=torch.float32, device=x.device)
    m2 = torch.empty(d, dtype=torch.float32, device=x.device)
    block_p = triton.next_power_of_2(parts)
    merge_block_d = min(triton.next_power_of_2(d), max(1, _MERGE_TILE // block_p))
    _moments_merge_kernel[(triton.cdiv(d, merge_block_d),)](
        part_count, part_mean, part_m2, count, mean, m2, parts, d,
        BLOCK_P=block_p, BLOCK_D=merge_block_d, num_warps=4,
    )
    return count, mean, m2


def feature_scores(mean_f, var_f, mean_r, var_r, eps: float) -> torch.Tensor:
    """(mean_f - mean_r)^2 / (var_f + var_r + eps), elementwise over fp32 [d] vectors."""
    d = mean_f.numel()
    out = torch.empty(d, dtype=torch.float32, device=mean_f.device)
    if d == 0:
        return out
    block = _SCORES_BLOCK_GPU if mean_f.is_cuda else _SCORES_BLOCK_CPU
    _feature_scores_kernel[(triton.cdiv(d, block),)](
        mean_f, var_f, mean_r, var_r, out, d, float(eps), BLOCK=block, num_warps=4,
    )
    return out
