"""Triton kernels of the misdirection family: the fused loss and gradient, and the masked edit.

For hidden states h [n, d], a control vector c [d], per-feature importances u [d] and
anchor states a [n, d], with weight w_j = u_j (importance given), 1 (control only) or
0 (anchor only), each valid row i contributes

    e_ij    = w_j (h_ij - c_j)^2 + [anchor] (1 - w_j) (h_ij - a_ij)^2
    loss    = scale * sum_{valid i, j} e_ij
    grad_ij = 2 scale (w_j (h_ij - c_j) + [anchor] (1 - w_j) (h_ij - a_ij))

and rows whose token-mask entry is False contribute nothing (their gradient is 0). The
masked edit is out_ij = h_ij + alpha u_j (c_j - h_ij) on valid rows and h_ij on the others.

Every kernel here (and in moments.py) streams over h in tiles of BLOCK_M rows by BLOCK_D
columns: axis 0 of the grid picks a column block, axis 1 a row program that loops over
every num_programs(1)-th row tile, so per-column vectors are loaded once per program and
the loss is reduced in registers to one partial per program. The partials are summed by
torch in a fixed order, which keeps the loss deterministic. Math is fp32 throughout.
"""

import functools

import torch
import triton
import triton.language as tl

# Elements per tile: 16 KiB of fp32, 32 values per thread at 8 warps.
_TILE = 4096
_GPU_WARPS = 8
_PROGRAMS_PER_SM = 4
# Small blocks and grids keep the CPU interpreter fast.
_CPU_BLOCK_D = 64
_CPU_BLOCK_M = 8
_CPU_PROGRAMS = 8


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _tile_config(x: torch.Tensor) -> tuple[int, int, int, tuple[int, int]]:
    """(BLOCK_M, BLOCK_D, num_warps, grid) for streaming over the rows of a 2-D ``x``."""
    n, d = x.shape
    if x.device.type == "cuda":
        block_d = min(triton.next_power_of_2(d), 1024)
        block_m = _TILE // block_d
        num_warps = _GPU_WARPS
        programs = _PROGRAMS_PER_SM * _sm_count(x.device.index)
    else:
        block_d = min(triton.next_power_of_2(d), _CPU_BLOCK_D)
        block_m = _CPU_BLOCK_M
        num_warps = 1
        programs = _CPU_PROGRAMS
    col_blocks = triton.cdiv(d, block_d)
    row_programs = max(1, min(triton.cdiv(n, block_m), programs // col_blocks))
    return block_m, block_d, num_warps, (col_blocks, row_programs)


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
    grad_ptr, partial_ptr, n, d, scale,
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
        if HAS_CONTROL:
            diff = h - control
            if HAS_IMPORTANCE:
                wdiff = w * diff
            else:
                wdiff = diff
            g += wdiff
            e += wdiff * diff
        if USE_ANCHOR:
            diff = h - _load_tile(anchor_ptr, anchor_stride, rows, cols, ok)
            if HAS_IMPORTANCE:
                wdiff = (1.0 - w) * diff
            else:
                wdiff = diff
            g += wdiff
            e += wdiff * diff
        acc += tl.where(ok, e, 0.0)
        if NEED_GRAD:
            grad = tl.where(ok, (2.0 * scale) * g, 0.0)
            offsets = rows.to(tl.int64)[:, None] * d + cols[None, :]
            tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty),
                     mask=in_range[:, None] & col_ok[None, :])
    tl.store(partial_ptr + pid_m * tl.num_programs(0) + pid_d, scale * tl.sum(acc))


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
    block_m, block_d, num_warps, grid = _tile_config(h)
    partials = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=h.device)
    # With control but no importance every weight is 1, so the anchor term vanishes.
    use_anchor = anchor is not None and (control is None or importance is not None)
    _misdirection_kernel[grid](
        h, h.stride(0),
        control if control is not None else partials,
        importance if importance is not None else partials,
        anchor if use_anchor else h, anchor.stride(0) if use_anchor else 0,
        token_mask if token_mask is not None else partials,
        grad if need_grad else h, partials, n, d, float(scale),
        HAS_CONTROL=control is not None, HAS_IMPORTANCE=importance is not None,
        USE_ANCHOR=use_anchor, HAS_MASK=token_mask is not None, NEED_GRAD=need_grad,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )
    return partials.sum(), grad


def masked_edit(h, importance, control, alpha: float, token_mask) -> torch.Tensor:
    """h + alpha * importance * (control - h) on the rows kept by ``token_mask``, h elsewhere."""
    n, d = h.shape
    out = torch.empty((n, d), dtype=h.dtype, device=h.device)
    if n == 0 or d == 0:
        return out
    block_m, block_d, num_warps, grid = _tile_config(h)
    _masked_edit_kernel[grid](
        h, h.stride(0), importance, control,
        token_mask if token_mask is not None else importance, out, n, d, float(alpha),
        HAS_MASK=token_mask is not None, BLOCK_M=block_m, BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return out
