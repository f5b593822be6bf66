"""Triton kernel of the fused multi-tensor masked Sophia-G step.

For every element a tensor's neuron mask selects (math in unlearn_kernels/ops/sophia.py)::

    p <- p * (1 - lr * wd)
    m <- beta1 * m + (1 - beta1) * g
    p <- p - lr * sign(m) * min(|m| / (rho * bs * h + eps), 1)

in fp32, rounded once to the storage types; unselected elements keep their exact bits.

One launch per group of tensors that share (param dtype, state dtype, vector width); a list
of one dtype, as an optimizer passes, is one launch. Within a group, the tensors are
addressed as element offsets from the group's lowest-addressed tensor of each role (the
kernel's pointer arguments, which fix the element types), listed in an int64 table
``[n, 8]``: offsets of p, g, m, h and the mask, numel, row length ``inner`` and mask mode
(0 none, 1 rows: ``mask[i // inner]``, 2 columns: ``mask[i % inner]``). Each program owns
``BLOCK`` elements of one tensor and finds it by a binary search over the cumulative
program counts. When every tensor of the group is 16-byte aligned and its size a multiple
of the vector width, the offsets are declared multiples of it so p, g, m and h move as
16-byte vectors (checked in the PTX of an offline sm_90 compile). Programs whose elements
are all unselected return before loading anything. (A single launch over mixed dtypes would
need a branch per dtype pair inside the kernel; grouping keeps the kernel small. Base
pointer plus loaded offset, rather than int64 addresses cast to pointers, keeps the element
types static and runs unchanged under ``TRITON_INTERPRET=1``, on CPU tensors, fp32 only.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_GPU = 2048
_BLOCK_CPU = 1024


@triton.jit
def _sophia_kernel(
    p_base, g_base, m_base, h_base, mask_base, table_ptr, starts_ptr, n_tensors,
    decay, beta1, one_minus_beta1, rho_bs, eps, lr,
    SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr,
):
    pid = tl.program_id(0)
    lo = 0  # starts[lo] <= pid < starts[hi]
    hi = n_tensors
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        go = tl.load(starts_ptr + mid) <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    row = table_ptr + lo * 8
    p_off = tl.load(row)
    g_off = tl.load(row + 1)
    m_off = tl.load(row + 2)
    h_off = tl.load(row + 3)
    numel = tl.load(row + 5)
    mode = tl.load(row + 7)
    if VEC > 1:
        p_off = tl.multiple_of(p_off, VEC)
        g_off = tl.multiple_of(g_off, VEC)
        m_off = tl.multiple_of(m_off, VEC)
        h_off = tl.multiple_of(h_off, VEC)
        numel = tl.multiple_of(numel, VEC)
    idx = (pid - tl.load(starts_ptr + lo)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = idx < numel
    if mode == 0:
        selected = live
    else:
        inner = tl.load(row + 6)
        q = idx // inner
        key = tl.where(mode == 1, q, idx - q * inner)
        flag = tl.load(mask_base + tl.load(row + 4) + key, mask=live, other=0)
        selected = live & (flag != 0)
    if tl.max(selected.to(tl.int32), axis=0) > 0:
        p_ptrs = p_base + p_off + idx
        m_ptrs = m_base + m_off + idx
        p = tl.load(p_ptrs, mask=live, other=0.0).to(tl.float32)
        g = tl.load(g_base + g_off + idx, mask=live, other=0.0).to(tl.float32)
        m = tl.load(m_ptrs, mask=live, other=0.0).to(tl.float32)
        h = tl.load(h_base + h_off + idx, mask=live, other=0.0).to(tl.float32)
        new_m = beta1 * m + one_minus_beta1 * g
        ratio = tl.abs(new_m) / (rho_bs * h + eps)
        ratio = tl.where(ratio > 1.0, 1.0, ratio)  # keeps NaN, like torch.clamp
        sign = (new_m > 0).to(tl.float32) - (new_m < 0).to(tl.float32)
        new_p = p * decay - lr * sign * ratio
        tl.store(p_ptrs, tl.where(selected, new_p, p).to(p_base.dtype.element_ty), mask=live)
        tl.store(m_ptrs, tl.where(selected, new_m, m).to(m_base.dtype.element_ty), mask=live)


def _vector_width(p, g, m, h) -> int:
    """Elements per 16-byte vector of p when every tensor allows it, else 1."""
    width = 16 // p.element_size()
    aligned = all(t.data_ptr() % 16 == 0 for t in (p, g, m, h))
    return width if aligned and p.numel() % width == 0 else 1


def _launch(items, block: int, vec: int, hyper: tuple[float, ...]) -> None:
    """One launch over ``items``: (p, g, m, h, mask as uint8 or None, mode, inner) sharing dtypes."""
    bases = [min((it[k] for it in items), key=lambda t: t.data_ptr()) for k in range(4)]
    masks = [it[4] for it in items if it[4] is not None]
    mask_base = min(masks, key=lambda t: t.data_ptr()) if masks else None
    table, starts = [], [0]
    for p, g, m, h, mask, mode, inner in items:
        table += [(t.data_ptr() - b.data_ptr()) // t.element_size() for t, b in zip((p, g, m, h), bases)]
        table += [0 if mask is None else mask.data_ptr() - mask_base.data_ptr(), p.numel(), inner, mode]
        starts.append(starts[-1] + triton.cdiv(p.numel(), block))
    packed = torch.tensor(table + starts, dtype=torch.int64)
    device = items[0][0].device
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    table_t, starts_t = packed[:len(table)], packed[len(table):]
    _sophia_kernel[(starts[-1],)](
        *bases, starts_t.view(torch.uint8) if mask_base is None else mask_base, table_t, starts_t,
        len(items), *hyper, SEARCH_STEPS=(len(items) - 1).bit_length(), BLOCK=block, VEC=vec,
        num_warps=4,
    )


def masked_sophia_step(params, grads, exp_avgs, hessians, masks, mask_dims, lr: float,
                       beta1: float, rho: float, weight_decay: float, eps: float,
                       bs: float) -> None:
    """In-place masked Sophia-G step over lists of contiguous tensors (see the module doc).

    ``masks[i]`` is None or a bool mask over the first (``mask_dims[i] == 0``) or last
    (``-1``) dim of ``params[i]``.
    """
    hyper = (1.0 - lr * weight_decay, beta1, 1.0 - beta1, rho * bs, eps, lr)
    groups: dict[tuple, list] = {}
    for p, g, m, h, mask, dim in zip(params, grads, exp_avgs, hessians, masks, mask_dims):
        if p.numel() == 0:
            continue
        mode, inner = 0, 1
        if mask is not None:
            mode = 1 if dim == 0 else 2
            inner = p.numel() // p.shape[0] if dim == 0 else p.shape[-1]
            mask = mask.view(torch.uint8)
        key = (p.dtype, m.dtype, _vector_width(p, g, m, h))
        groups.setdefault(key, []).append((p, g, m, h, mask, mode, inner))
    block = _BLOCK_GPU if params and params[0].is_cuda else _BLOCK_CPU
    for (_, _, vec), items in groups.items():
        _launch(items, block, vec, hyper)
