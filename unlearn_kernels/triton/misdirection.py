"""Triton kernels of the misdirection family: the fused loss and gradient, and the masked edit.

For hidden states h [n, d], a control vector c [d], per-feature importances u [d] and
anchor states a [n, d], with weight w_j = u_j (importance given), 1 (control only) or
0 (anchor only), each valid row i contributes

    e_ij    = w_j (h_ij - c_j)^2 + [anchor] (1 - w_j) (h_ij - a_ij)^2
    loss    = scale * sum_{valid i, j} e_ij
    grad_ij = 2 scale (w_j (h_ij - c_j) + [anchor] (1 - w_j) (h_ij - a_ij))

and rows whose token-mask entry is False contribute nothing (their gradient is 0). The
masked edit is out_ij = h_ij + alpha u_j (c_j - h_ij) on valid rows and h_ij on the others.

The row kernels here and in moments.py stream over a matrix in tiles of BLOCK_M rows by
BLOCK_D columns (16-byte loads along the unit-stride columns, any row stride). Axis 0 of
the grid picks a column block, axis 1 a row program that loops over every
num_programs(1)-th row tile; on CUDA the grid is one full wave of resident programs. Per
column vectors are thus loaded once per program, and the loss is accumulated in registers
into one partial per program, which torch sums in a fixed order: the loss is
deterministic. Math is fp32 throughout.
"""

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Elements per tile: 16 KiB of fp32, 8 KiB of bf16.
_TILE = 4096
# The CPU interpreter's cost is per operation, so it gets few programs (and loop trips).
_CPU_MAX_BLOCK_D = 256
_CPU_PROGRAMS = 8
# Programs per SM until the first launch of a kernel variant tells how many fit.
_GUESS_PER_SM = 2
_resident_per_sm: dict[tuple, int] = {}


@functools.lru_cache(maxsize=None)
def _device_properties(device_index: int):
    return torch.cuda.get_device_properties(device_index)


@dataclass(frozen=True)
class _RowTiling:
    """Tile shape, warps and grid (column blocks, row programs) of one launch."""

    block_m: int
    block_d: int
    num_warps: int
    grid: tuple[int, int]
    key: tuple


def _row_tiling(kernel, x: torch.Tensor, variant: tuple, max_block_d: int,
                num_warps: int) -> _RowTiling:
    """Tiling of a 2-D ``x`` for ``kernel``: on CUDA one full wave of resident programs.

    Each row program loops over many row tiles, so a grid larger than what the GPU holds at
    once would leave a tail wave running at low occupancy. The number of programs an SM
    holds depends on the registers of the compiled variant, which ``_note_occupancy``
    records after its first launch; ``variant`` holds the constexpr flags that select it.
    """
    n, d = x.shape
    on_gpu = x.device.type == "cuda"
    block_d = min(triton.next_power_of_2(d), max_block_d if on_gpu else _CPU_MAX_BLOCK_D)
    block_m = _TILE // block_d
    if on_gpu:
        key = (kernel, x.device.index, x.dtype, block_m, block_d, num_warps, variant,
               d % 16 == 0, x.stride(0) % 16 == 0)
        per_sm = _resident_per_sm.get(key, _GUESS_PER_SM)
        programs = per_sm * _device_properties(x.device.index).multi_processor_count
    else:
        key = ()
        programs = _CPU_PROGRAMS
    col_blocks = triton.cdiv(d, block_d)
    row_programs = max(1, min(triton.cdiv(n, block_m), programs // col_blocks))
    return _RowTiling(block_m, block_d, num_warps, (col_blocks, row_programs), key)


def _note_occupancy(tiling: _RowTiling, compiled) -> None:
    """Remember how many programs of a freshly launched CUDA kernel fit on one SM."""
    if not tiling.key or tiling.key in _resident_per_sm:
        return
    n_regs = getattr(compiled, "n_regs", 0)
    if not n_regs:
        return
    props = _device_properties(tiling.key[1])
    warps = tiling.num_warps
    regs_per_warp = triton.cdiv(n_regs * 32, 256) * 256
    shared = getattr(compiled.metadata, "shared", 0) + 1024
    _resident_per_sm[tiling.key] = max(1, min(
        getattr(props, "regs_per_multiprocessor", 65536) // regs_per_warp // warps,
        getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps),
        getattr(props, "shared_memory_per_multiprocessor", 228 * 1024) // shared,
        32,
    ))


@triton.jit
def _row_masks(mask_ptr, rows, n, HAS_MASK: tl.constexpr):
    """(in range, in range and kept by the token mask) for a vector of row indices."""
    in_range = rows < n
    if HAS_MASK:
        valid = in_range & (tl.load(mask_ptr + rows, mask=in_range, other=0) != 0)
    else:
        valid = in_range
    return in_range, valid


@triton.jit
def _load_tile(ptr, row_stride, rows, cols, mask):
    """A [rows, cols] tile of a unit-column-stride matrix as fp32, 0 where masked out."""
    offsets = rows.to(tl.int64)[:, None] * row_stride + cols[None, :]
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _misdirection_kernel(
    h_ptr, h_stride, control_ptr, importance_ptr, anchor_ptr, anchor_stride, mask_ptr,
    grad_ptr, partial_ptr, n, d, scale, root_scale,
    HAS_CONTROL: tl.constexpr, HAS_IMPORTANCE: tl.constexpr, USE_ANCHOR: tl.constexpr,
    HAS_MASK: tl.constexpr, NEED_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    if HAS_CONTROL:
        control = tl.load(control_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_IMPORTANCE:
        w = tl.load(importance_ptr + cols, mask=col_ok, other=0.0)[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for row0 in range(pid_m * BLOCK_M, n, tl.num_programs(1) * BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        in_range, valid = _row_masks(mask_ptr, rows, n, HAS_MASK)
        ok = valid[:, None] & col_ok[None, :]
        h = _load_tile(h_ptr, h_stride, rows, cols, ok)
        # g = de/dh / 2 and e = the loss terms, built from the control and anchor parts.
        g = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        e = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        # e is scaled before it is summed (root_scale = sqrt(scale)), so no partial overflows
        if HAS_CONTROL:
            diff = h - control
            if HAS_IMPORTANCE:
                wdiff = w * diff
            else:
                wdiff = diff
            g += wdiff
            e += (wdiff * root_scale) * (diff * root_scale)
        if USE_ANCHOR:
            diff = h - _load_tile(anchor_ptr, anchor_stride, rows, cols, ok)
            if HAS_IMPORTANCE:
                wdiff = (1.0 - w) * diff
            else:
                wdiff = diff
            g += wdiff
            e += (wdiff * root_scale) * (diff * root_scale)
        acc += tl.where(ok, e, 0.0)
        if NEED_GRAD:
            grad = tl.where(ok, (2.0 * scale) * g, 0.0)
            offsets = rows.to(tl.int64)[:, None] * d + cols[None, :]
            tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty),
                     mask=in_range[:, None] & col_ok[None, :])
    tl.store(partial_ptr + pid_m * tl.num_programs(0) + pid_d, tl.sum(acc))


@triton.jit
def _masked_edit_kernel(
    h_ptr, h_stride, importance_ptr, control_ptr, mask_ptr, out_ptr, n, d, alpha,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    step = alpha * tl.load(importance_ptr + cols, mask=col_ok, other=0.0)[None, :]
    control = tl.load(control_ptr + cols, mask=col_ok, other=0.0)[None, :]
    for row0 in range(pid_m * BLOCK_M, n, tl.num_programs(1) * BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        in_range, valid = _row_masks(mask_ptr, rows, n, HAS_MASK)
        ok = in_range[:, None] & col_ok[None, :]
        h = _load_tile(h_ptr, h_stride, rows, cols, ok)
        out = tl.where(valid[:, None], h + step * (control - h), h)
        offsets = rows.to(tl.int64)[:, None] * d + cols[None, :]
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=ok)


def misdirection_fwd_bwd(h, control, importance, anchor, token_mask, scale: float,
                         need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, grad) of the misdirection objective; grad is empty unless ``need_grad``."""
    n, d = h.shape
    grad = (torch.empty((n, d), dtype=h.dtype, device=h.device) if need_grad
            else torch.empty(0, dtype=h.dtype, device=h.device))
    if n == 0 or d == 0:
        return torch.zeros((), dtype=torch.float32, device=h.device), grad
    # With control but no importance every weight is 1, so the anchor term vanishes.
    use_anchor = anchor is not None and (control is None or importance is not None)
    flags = dict(HAS_CONTROL=control is not None, HAS_IMPORTANCE=importance is not None,
                 USE_ANCHOR=use_anchor, HAS_MASK=token_mask is not None, NEED_GRAD=need_grad)
    tiling = _row_tiling(_misdirection_kernel, h, tuple(flags.values()), 1024, 8)
    partials = torch.empty(tiling.grid[0] * tiling.grid[1], dtype=torch.float32,
                           device=h.device)
    compiled = _misdirection_kernel[tiling.grid](
        h, h.stride(0),
        control if control is not None else partials,
        importance if importance is not None else partials,
        anchor if use_anchor else h, anchor.stride(0) if use_anchor else 0,
        token_mask if token_mask is not None else partials,
        grad if need_grad else h, partials, n, d, float(scale), math.sqrt(scale),
        BLOCK_M=tiling.block_m, BLOCK_D=tiling.block_d, num_warps=tiling.num_warps, **flags,
    )
    _note_occupancy(tiling, compiled)
    return partials.sum(), grad


def masked_edit(h, importance, control, alpha: float, token_mask) -> torch.Tensor:
    """h + alpha * importance * (control - h) on the rows kept by ``token_mask``, h elsewhere."""
    n, d = h.shape
    out = torch.empty((n, d), dtype=h.dtype, device=h.device)
    if n == 0 or d == 0:
        return out
    has_mask = token_mask is not None
    tiling = _row_tiling(_masked_edit_kernel, h, (has_mask,), 1024, 8)
    compiled = _masked_edit_kernel[tiling.grid](
        h, h.stride(0), importance, control, token_mask if has_mask else importance, out,
        n, d, float(alpha),
        HAS_MASK=has_mask, BLOCK_M=tiling.block_m, BLOCK_D=tiling.block_d,
        num_warps=tiling.num_warps,
    )
    _note_occupancy(tiling, compiled)
    return out
