"""Triton kernels of the per-class feature means (deterministic, no float atomics).

For features x [n, d] and labels y [n] in [0, C):

    counts_c = #{i : y_i = c},    means_c = sum_{i : y_i = c} x_i / counts_c   (0 if empty)

torch puts the rows in a stable order by label (argsort) and cuts each class's rows into
segments of SEG rows; the segment table is built on the device from a static upper bound
on the number of segments (n / SEG + C), so nothing waits on the host. Kernel 1: program
(segment, column block) sums its segment's rows of its columns in order, each row scaled by
1 / counts_c first (so no partial sum leaves the range of the values: features near 3e38 give
a finite mean). Kernel 2: program (class, column block) adds its class's segment sums in order.
"""

import torch
import triton
import triton.language as tl

_SEG_GPU = 512
_SEG_CPU = 16
_BLOCK_D_GPU = 256
_BLOCK_D_CPU = 32


@triton.jit
def _segment_sums_kernel(
    x_ptr, x_stride, perm_ptr, seg_begin_ptr, seg_end_ptr, seg_scale_ptr, partial_ptr, d,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    s = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    begin = tl.load(seg_begin_ptr + s)
    end = tl.load(seg_end_ptr + s)
    scale = tl.load(seg_scale_ptr + s)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for p0 in range(begin, end, BLOCK_M):
        p = p0 + tl.arange(0, BLOCK_M)
        p_ok = p < end
        rows = tl.load(perm_ptr + p, mask=p_ok, other=0)
        offsets = rows.to(tl.int64)[:, None] * x_stride + cols[None, :]
        acc += tl.load(x_ptr + offsets, mask=p_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32) * scale
    tl.store(partial_ptr + s.to(tl.int64) * d + cols, tl.sum(acc, axis=0), mask=col_ok)


@triton.jit
def _merge_kernel(partial_ptr, seg_first_ptr, means_ptr, d, BLOCK_D: tl.constexpr):
    c = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    s0 = tl.load(seg_first_ptr + c)
    s1 = tl.load(seg_first_ptr + c + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    ptrs = partial_ptr + s0.to(tl.int64) * d + cols
    for _ in range(s0, s1):
        acc += tl.load(ptrs, mask=col_ok, other=0.0)
        ptrs += d
    tl.store(means_ptr + c.to(tl.int64) * d + cols, acc, mask=col_ok)


def class_means(features, labels, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(means fp32 [num_classes, d], counts int64 [num_classes]); labels already checked."""
    n, d = features.shape
    device = features.device
    # Integer scatter-add: exact and, unlike bincount on a GPU, without a host sync.
    counts = torch.zeros(num_classes, dtype=torch.int64, device=device).index_add_(
        0, labels, torch.ones_like(labels))
    means = torch.zeros((num_classes, d), dtype=torch.float32, device=device)
    if n == 0 or d == 0:
        return means, counts
    seg = _SEG_GPU if features.is_cuda else _SEG_CPU
    perm = torch.argsort(labels, stable=True)
    start = torch.cumsum(counts, 0) - counts
    segs = (counts + seg - 1) // seg
    seg_first = torch.zeros(num_classes + 1, dtype=torch.int64, device=device)
    seg_first[1:] = torch.cumsum(segs, 0)
    max_segs = triton.cdiv(n, seg) + num_classes
    ids = torch.arange(max_segs, device=device)
    owner = (torch.searchsorted(seg_first, ids, right=True) - 1).clamp(max=num_classes - 1)
    seg_begin = start[owner] + (ids - seg_first[owner]) * seg
    seg_end = torch.minimum(seg_begin + seg, start[owner] + counts[owner])
    seg_end = torch.where(ids < seg_first[-1], seg_end, seg_begin)  # unused ids: empty
    seg_scale = 1.0 / counts.clamp(min=1).to(torch.float32)[owner]
    partials = torch.empty((max_segs, d), dtype=torch.float32, device=device)
    block_d = min(triton.next_power_of_2(d), _BLOCK_D_GPU if features.is_cuda else _BLOCK_D_CPU)
    block_m = 16 if features.is_cuda else 4
    num_warps = 4 if features.is_cuda else 1
    col_blocks = triton.cdiv(d, block_d)
    _segment_sums_kernel[(max_segs, col_blocks)](
        features, features.stride(0), perm, seg_begin, seg_end, seg_scale, partials, d,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )
    _merge_kernel[(num_classes, col_blocks)](
        partials, seg_first, means, d, BLOCK_D=block_d, num_warps=num_warps,
    )
    return means, counts
