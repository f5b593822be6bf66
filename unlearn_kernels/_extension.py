"""Loads the compiled module ``unlearn_kernels._C`` when it was built.

Importing ``_C`` registers the ``torch.ops.unlearn_kernels.*`` schemas and their CPU (and,
when built with CUDA, CUDA) kernels. Without it the package still works on the ``"torch"``
reference backend (and ``"triton"`` where Triton runs).
"""

from __future__ import annotations

import importlib

import torch  # noqa: F401  (the torch libraries must be loaded before _C)

try:
    _C = importlib.import_module("unlearn_kernels._C")
    LOAD_ERROR: str | None = None
except ImportError as error:  # the package was installed without building the extension
    _C = None
    LOAD_ERROR = str(error)


def compiled() -> bool:
    """True when the compiled C++ kernels are importable."""
    return _C is not None


def compiled_with_cuda() -> bool:
    """True when the compiled module holds the CUDA kernels."""
    return _C is not None and bool(_C.with_cuda)


def cpu_capability() -> str | None:
    """Instruction set of the compiled CPU kernels in use: ``"default"``, ``"avx2"`` or
    ``"avx512"`` (the best this CPU supports, unless ``UNLEARN_KERNELS_CPU_CAPABILITY`` or
    ``ATEN_CPU_CAPABILITY`` asks for a lower one); None when ``_C`` was not built."""
    return None if _C is None else str(_C.cpu_capability())
