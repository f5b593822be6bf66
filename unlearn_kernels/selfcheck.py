"""Self-check: every available backend against the plain-PyTorch reference on fresh inputs.

Used by ``unlearn-kernels demo`` and ``unlearn-kernels selfcheck`` so a user can see, on
their own machine, which backends run and that they agree with the reference.
"""

from __future__ import annotations

import torch

from .ops import _backend, masked_edit, masked_moments, misdirection_loss

_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def _errors(backend: str, device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, float]:
    """Largest relative error of each op (loss, gradient, moments, edit) against the reference."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (3, 37, 131)
    h = torch.randn(shape, generator=g).to(device, dtype)
    anchor = torch.randn(shape, generator=g).to(device, dtype)
    control = torch.randn(131, generator=g).to(device)
    importance = torch.rand(131, generator=g).to(device)
    mask = (torch.rand(shape[:-1], generator=g) > 0.25).to(device)

    def rel(a, b):
        return float((a.detach().double() - b.detach().double()).abs().max() / b.double().abs().max().clamp(min=1e-12))

    results = {}
    grads = []
    for name in (backend, "torch"):
        x = h.clone().requires_grad_(True)
        loss = misdirection_loss(x, control, importance, anchor, mask, backend=name)
        loss.backward()
        grads.append((loss, x.grad))
    results["misdirection loss"] = rel(grads[0][0], grads[1][0])
    results["misdirection grad"] = rel(grads[0][1], grads[1][1])
    got, ref = masked_moments(h, mask, backend=backend), masked_moments(h, mask, backend="torch")
    results["moments mean"] = rel(got.mean, ref.mean)
    results["moments m2"] = rel(got.m2, ref.m2)
    results["masked_edit"] = rel(masked_edit(h, importance, control, 0.6, mask, backend=backend),
                                 masked_edit(h, importance, control, 0.6, mask, backend="torch"))
    return results


def run(out=print, seed: int = 0) -> bool:
    """Check every backend available here in every dtype it runs; True when all pass."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    ok = True
    out("| backend | device | dtype | max relative error | tolerance | result |")
    out("|---|---|---|---|---|---|")
    for device in devices:
        for backend in ("cuda", "triton", "cpu"):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                if not _backend.available(backend, device, dtype):
                    continue
                if backend == "triton" and device.type == "cpu" and dtype != torch.float32:
                    continue  # the Triton interpreter handles fp32 only
                worst = max(_errors(backend, device, dtype, seed).values())
                passed = worst <= _TOLERANCE[dtype]
                ok &= passed
                out(f"| {backend} | {device.type} | {str(dtype).split('.')[-1]} | {worst:.2e} | "
                    f"{_TOLERANCE[dtype]:.0e} | {'ok' if passed else 'FAIL'} |")
    return ok
