"""Backend selection: which implementation of an op runs for a given tensor.

Backends: ``"cuda"`` (compiled CUDA kernels), ``"triton"``, ``"cpu"`` (compiled C++),
``"torch"`` (the plain-PyTorch reference). ``"auto"`` picks the fastest one available for
the tensor's device and dtype: cuda > triton > torch on a GPU, cpu > torch on the CPU.
fp64 inputs (used by gradcheck) run on ``"cpu"`` and ``"torch"`` only.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

import torch

from .._extension import compiled, compiled_with_cuda
from ..errors import UserError

BACKENDS = ("cuda", "triton", "cpu", "torch")
_HALF_PRECISION = (torch.float32, torch.bfloat16, torch.float16)


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_runs_on(device: torch.device) -> bool:
    """Triton runs on CUDA devices, and on the CPU under ``TRITON_INTERPRET=1``."""
    if not triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def available(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``backend`` can run an op on tensors of this device and dtype."""
    if backend == "torch":
        return True
    if backend == "cpu":
        return compiled() and device.type == "cpu"
    if dtype not in _HALF_PRECISION:
        return False
    if backend == "cuda":
        return compiled_with_cuda() and device.type == "cuda"
    if backend == "triton":
        return triton_runs_on(device)
    return False


def backends(device: torch.device | str | None = None) -> dict[str, bool]:
    """Which backends can run fp32 ops on ``device`` (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {name: available(name, device, torch.float32) for name in BACKENDS}


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for ``backend`` (which may be ``"auto"``); UserError if unusable."""
    if backend == "auto":
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        return next(name for name in order if available(name, device, dtype))
    if backend not in BACKENDS:
        raise UserError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if not available(backend, device, dtype):
        hint = " (triton is not installed: pip install triton)" if backend == "triton" and not triton_importable() else ""
        raise UserError(
            f"backend={backend!r} cannot run on {device.type} tensors of dtype {dtype}; "
            f"available here: {[b for b, ok in backends(device).items() if ok]}{hint}"
        )
    return backend


def compiled_op(name: str) -> Callable:
    """``torch.ops.unlearn_kernels.<name>`` (the cpu and cuda backends)."""
    return getattr(torch.ops.unlearn_kernels, name)
