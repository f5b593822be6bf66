"""Argument checks shared by every op, so that bad input fails the same way on every backend.

Wrong types and dtypes raise ``TypeError``; wrong shapes, devices, values and empty
selections raise ``ValueError``. Every message names the argument.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def float_tensor(name: str, t) -> torch.Tensor:
    """A tensor of one of :data:`FLOAT_DTYPES`; TypeError naming ``name`` otherwise."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    return t


def activations(name: str, x) -> torch.Tensor:
    """A floating tensor ``[..., d]`` with d >= 1."""
    float_tensor(name, x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have shape [..., d] with d >= 1, got {tuple(x.shape)}")
    return x


def same_device(name: str, t: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")


def feature_vector(name: str, v, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """A per-feature vector for ``like``'s last dim: returned as contiguous fp32 ``[d]``.

    Leading singleton dims (``[1, 1, d]``) are accepted.
    """
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if not v.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {v.dtype}")
    d = like.shape[-1]
    if v.dim() == 0 or v.shape[-1] != d or v.numel() != d:
        raise ValueError(f"{name} must have shape [{d}] (the last dim of {like_name}), got {tuple(v.shape)}")
    same_device(name, v, like, like_name)
    return v.reshape(d).to(torch.float32).contiguous()


def unit_interval(name: str, v: torch.Tensor) -> None:
    """Values in [0, 1] (one host sync on a GPU). Eager only: under ``torch.compile`` a check
    that reads tensor values would break the graph, so it is skipped there."""
    if torch.compiler.is_compiling():
        return
    if not bool(((v >= 0) & (v <= 1)).all()):
        raise ValueError(f"{name} must lie in [0, 1] (found values {v.min().item():g} .. {v.max().item():g})")


def matching(name: str, t, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """A tensor with exactly ``like``'s shape, dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(t.shape)}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} must have the dtype of {like_name} ({like.dtype}), got {t.dtype}")
    same_device(name, t, like, like_name)
    return t


def token_mask(mask, like: torch.Tensor, like_name: str) -> torch.Tensor | None:
    """``[...]`` bool or 0/1 mask over ``like``'s tokens, as a contiguous flat bool tensor."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"token_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != like.shape[:-1]:
        raise ValueError(
            f"token_mask must have shape {tuple(like.shape[:-1])} ({like_name} without its last dim), "
            f"got {tuple(mask.shape)}"
        )
    same_device("token_mask", mask, like, like_name)
    if mask.dtype != torch.bool:
        if mask.is_complex():
            raise TypeError(f"token_mask must be bool or 0/1 numbers, got {mask.dtype}")
        if not torch.compiler.is_compiling() and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("token_mask must hold only 0 and 1 (or be bool)")
        mask = mask != 0
    return mask.reshape(-1).contiguous()


def count_valid(mask: torch.Tensor | None, rows: int, what: str) -> int:
    """Number of selected tokens; ValueError when a mean over them is asked and there is none."""
    n_valid = rows if mask is None else int(mask.sum())
    if n_valid == 0:
        raise ValueError(f"token_mask selects no token (or the input is empty): {what} needs at least one")
    return n_valid


def finite_scalar(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[n, d]`` with unit column stride, a view where the strides allow it."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.numel() == 0:     # an empty tensor counts as contiguous whatever its strides
        return x2.new_empty(x2.shape)
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """``[first, last)`` bytes of ``t``'s storage that its elements can touch."""
    if t.numel() == 0:
        return 0, 0
    start = t.storage_offset() * t.element_size()
    extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    return start, start + extent * t.element_size()


def same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same elements of the same storage (an exact alias)."""
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.dtype == b.dtype
            and a.storage_offset() == b.storage_offset() and a.shape == b.shape and a.stride() == b.stride())


def no_partial_overlap(name: str, t: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    """ValueError when ``t`` (written in place) and ``other`` share memory without being the same
    elements: an in-place kernel would read values it has already overwritten. Views whose
    spans merely interleave (``x[::2]`` and ``x[1::2]``) are refused too."""
    if torch.compiler.is_compiling() or t.numel() == 0 or other.numel() == 0:
        return      # eager-only: a traced graph has no storages to compare (functionalised)
    if t.untyped_storage().data_ptr() != other.untyped_storage().data_ptr() or same_memory(t, other):
        return
    (a0, a1), (b0, b1) = _byte_span(t), _byte_span(other)
    if a0 < b1 and b0 < a1:
        raise ValueError(f"{name} and {other_name} overlap in memory without being the same tensor; "
                         f"{name} is updated in place: pass non-overlapping tensors (e.g. .clone() one)")


def not_expanded(name: str, t: torch.Tensor) -> None:
    """ValueError for a tensor with internal overlap (stride 0 over a dim > 1, as after
    ``expand``): writing it in place would write one element many times."""
    if any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape)):
        raise ValueError(f"{name} must not be an expanded (stride-0) view: it is updated in place")


def mark_mutated(*tensors: torch.Tensor) -> None:
    """Bump the autograd version counters of tensors a compiled kernel wrote through their data
    pointers (the dispatcher does not for our C++ ops), so that a graph that saved one of them
    raises "modified by an inplace operation" in backward, as after ``torch.optim``. Under
    ``torch.compile`` the traced op's declared mutation does this."""
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        torch.autograd.graph.increment_version(t)
