"""Triton kernels of the Optimal-Brain-Damage neuron scores, forget and retain in one pass.

For a weight w [rows, cols] and Hessian diagonals hf, hr of its shape (unit column stride),

    dim 0:  s_i = 1/2 sum_j h_ij w_ij^2        dim 1:  s_j = 1/2 sum_i h_ij w_ij^2

dim 0: a program owns BLOCK_R rows and walks their columns in BLOCK_C tiles, keeping a
[BLOCK_R, BLOCK_C] accumulator that is summed over columns at the end. dim 1: the grid of
misdirection.py (column blocks x row programs striding over row tiles); every program
writes its partial column sums and torch adds the partials in a fixed order. fp32 math.
"""

import torch
import triton
import triton.language as tl

from .misdirection import _load_tile, _note_occupancy, _row_tiling

_ROW_TILE_GPU = 4096  # elements of a dim-0 tile
_ROW_TILE_CPU = 256


@triton.jit
def _row_scores_kernel(
    w_ptr, w_stride, hf_ptr, hf_stride, hr_ptr, hr_stride, sf_ptr, sr_ptr, rows, cols,
    HAS_RETAIN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    acc_f = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for c0 in range(0, cols, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ok = r_ok[:, None] & (c < cols)[None, :]
        w = _load_tile(w_ptr, w_stride, r, c, ok)
        w2 = w * w
        acc_f += _load_tile(hf_ptr, hf_stride, r, c, ok) * w2
        if HAS_RETAIN:
            acc_r += _load_tile(hr_ptr, hr_stride, r, c, ok) * w2
    tl.store(sf_ptr + r, 0.5 * tl.sum(acc_f, axis=1), mask=r_ok)
    if HAS_RETAIN:
        tl.store(sr_ptr + r, 0.5 * tl.sum(acc_r, axis=1), mask=r_ok)


@triton.jit
def _col_partials_kernel(
    w_ptr, w_stride, hf_ptr, hf_stride, hr_ptr, hr_stride, pf_ptr, pr_ptr, rows, cols,
    HAS_RETAIN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_m = tl.program_id(1)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    c_ok = c < cols
    acc_f = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for row0 in range(pid_m * BLOCK_M, rows, tl.num_programs(1) * BLOCK_M):
        r = row0 + tl.arange(0, BLOCK_M)
        ok = (r < rows)[:, None] & c_ok[None, :]
        w = _load_tile(w_ptr, w_stride, r, c, ok)
        w2 = w * w
        acc_f += _load_tile(hf_ptr, hf_stride, r, c, ok) * w2
        if HAS_RETAIN:
            acc_r += _load_tile(hr_ptr, hr_stride, r, c, ok) * w2
    offsets = pid_m.to(tl.int64) * cols + c
    tl.store(pf_ptr + offsets, tl.sum(acc_f, axis=0), mask=c_ok)
    if HAS_RETAIN:
        tl.store(pr_ptr + offsets, tl.sum(acc_r, axis=0), mask=c_ok)


def neuron_scores(weight, hess_forget, hess_retain, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_forget, s_retain) fp32; s_retain is empty [0] when hess_retain is None."""
    rows, cols = weight.shape
    neurons = rows if dim == 0 else cols
    retain = hess_retain is not None
    device = weight.device
    if rows == 0 or cols == 0:
        zeros = torch.zeros(neurons, dtype=torch.float32, device=device)
        return zeros, zeros.clone() if retain else zeros.new_empty(0)
    hr = hess_retain if retain else hess_forget
    args = (weight, weight.stride(0), hess_forget, hess_forget.stride(0), hr, hr.stride(0))
    if dim == 0:
        s_f = torch.empty(rows, dtype=torch.float32, device=device)
        s_r = torch.empty(rows if retain else 0, dtype=torch.float32, device=device)
        tile = _ROW_TILE_GPU if weight.is_cuda else _ROW_TILE_CPU
        block_c = min(triton.next_power_of_2(cols), tile // 4)
        block_r = tile // block_c
        _row_scores_kernel[(triton.cdiv(rows, block_r),)](
            *args, s_f, s_r if retain else s_f, rows, cols,
            HAS_RETAIN=retain, BLOCK_R=block_r, BLOCK_C=block_c,
            num_warps=8 if weight.is_cuda else 1,
        )
        return s_f, s_r
    tiling = _row_tiling(_col_partials_kernel, weight, (retain,), 1024, 8)
    p_f = torch.empty((tiling.grid[1], cols), dtype=torch.float32, device=device)
    p_r = torch.empty_like(p_f) if retain else p_f
    compiled = _col_partials_kernel[tiling.grid](
        *args, p_f, p_r, rows, cols,
        HAS_RETAIN=retain, BLOCK_M=tiling.block_m, BLOCK_D=tiling.block_d, num_warps=tiling.num_warps,
    )
    _note_occupancy(tiling, compiled)
    s_f = 0.5 * p_f.sum(0)
    return s_f, 0.5 * p_r.sum(0) if retain else s_f.new_empty(0)
