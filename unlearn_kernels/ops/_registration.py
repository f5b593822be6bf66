"""One place that registers an op family's kernels with ``torch.library``: for a kernel named
``NAME`` there is the Triton custom op ``unlearn_kernels::triton_NAME`` and, when the C++
extension is built, the compiled ``unlearn_kernels::NAME`` (schema in ``csrc/ops``). Both get
the same fake (meta) kernel, and, for the differentiable kernels, the same autograd formula
(``register_autograd``: a backward made of plain torch ops and a ``setup_context``), so that
``torch.library.opcheck`` passes with ``requires_grad`` inputs on every backend alike."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .._extension import compiled


def kernel_names(name: str) -> list[str]:
    """The qualified names of kernel ``name`` on the backends that are registered here."""
    return [f"unlearn_kernels::triton_{name}"] + ([f"unlearn_kernels::{name}"] if compiled() else [])


def register(name: str, fake: Callable, backward: Optional[Callable] = None,
             setup_context: Optional[Callable] = None) -> None:
    """Register ``fake`` (and ``backward``/``setup_context``) for every backend of ``name``."""
    for qualname in kernel_names(name):
        torch.library.register_fake(qualname)(fake)
        if backward is not None:
            torch.library.register_autograd(qualname, backward, setup_context=setup_context)


def refuse_grads(op: str, ctx, allowed: tuple[int, ...]) -> None:
    """RuntimeError when an input outside ``allowed`` asks for a gradient the kernel formula
    does not give (never a silent None)."""
    asked = [i for i, need in enumerate(ctx.needs_input_grad) if need and i not in allowed]
    if asked:
        raise RuntimeError(f"unlearn_kernels::{op}: no gradient for input(s) {asked}; gradients flow to "
                           f"input(s) {list(allowed)} only")
