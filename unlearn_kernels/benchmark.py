"""Throughput benchmark of the fused ops against eager PyTorch and torch.compile.

For each op and shape, on the same inputs in one run, it times every available backend
(cuda, triton, cpu), the eager PyTorch formula, and that formula under ``torch.compile``;
it prints the byte floor (the bytes the op must move at the copy bandwidth measured in the
same run), the achieved bandwidth and the speedups. GPU timings use CUDA events, CPU timings
``perf_counter``; each figure is the median of many runs on random (never zero) inputs.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass
from typing import Annotated, Callable, ClassVar, Literal

import torch
from pydantic import BeforeValidator, Field

from .config_types import Count, config_dataclass, flag_label
from .ops import _backend, disruption_mask, masked_edit, masked_moments, misdirection_loss


def _elapsed_ms(fn: Callable[[], object], cuda: bool) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(calls: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                     warmup: int = 3) -> dict[str, float]:
    """Median milliseconds of each call after ``warmup`` runs, the calls interleaved round by
    round in a rotating order (a slow spell of a shared machine hits them alike); CUDA events
    on a GPU, ``perf_counter`` on the CPU."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(_elapsed_ms(calls[name], cuda))
    return {name: statistics.median(times) for name, times in samples.items()}


def _time_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    return time_interleaved({"fn": fn}, device, repeats, warmup)["fn"]


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Device copy bandwidth in bytes/s (read + write) on a buffer of ``nbytes``."""
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * 4 / (ms * 1e-3)


@dataclass
class Case:
    """One benchmarked op: the fused call per backend, its eager formula, bytes it must move."""

    name: str
    fused: Callable[[str], Callable[[], object]]
    eager: Callable[[], object]
    nbytes: int


def _misdirection_eager(h, control=None, importance=None, anchor=None):
    x = h.float()
    if importance is None:
        loss = ((x - control) ** 2).mean()
    else:
        loss = (importance * (x - control) ** 2 + (1 - importance) * (x - anchor.float()) ** 2).mean()
    (grad,) = torch.autograd.grad(loss, h)
    return loss, grad


def _moments_eager(x):
    xf = x.float()
    mean = xf.mean(0)
    return mean, ((xf - mean) ** 2).sum(0)


def _edit_eager(h, importance, control, alpha):
    x = h.float()
    return (x + alpha * importance * (control - x)).to(h.dtype)


def _mask_eager(grad, retain, scale):
    return torch.where(grad * retain > 0, grad * scale, 0)


def _cases(n: int, d: int, dtype: torch.dtype, device: torch.device) -> list[Case]:
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n, d, device=device, dtype=dtype, generator=g).requires_grad_(True)
    anchor = torch.randn(n, d, device=device, dtype=dtype, generator=g)
    u = torch.rand(d, device=device, generator=g)
    control = 6.5 * u / u.norm()
    importance = torch.rand(d, device=device, generator=g)
    size = h.numel() * h.element_size()

    def loss_step(**kw):
        def run(backend):
            def call():
                h.grad = None
                misdirection_loss(h, backend=backend, **kw).backward()
            return call
        return run

    return [
        Case("misdirection RMU fwd+bwd", loss_step(control=control),
             lambda: _misdirection_eager(h, control), 2 * size),
        Case("misdirection SRMU fwd+bwd", loss_step(control=control, importance=importance, anchor=anchor),
             lambda: _misdirection_eager(h, control, importance, anchor), 3 * size),
        Case("masked_moments", lambda b: lambda: masked_moments(h.detach(), backend=b),
             lambda: _moments_eager(h.detach()), size),
        Case("masked_edit", lambda b: lambda: masked_edit(h.detach(), importance, control, 0.5, backend=b),
             lambda: _edit_eager(h.detach(), importance, control, 0.5), 2 * size),
        Case("disruption_mask", lambda b: lambda: disruption_mask(h.detach(), anchor, 0.5, backend=b),
             lambda: _mask_eager(h.detach(), anchor, 0.5), 3 * size),
    ]


def columns(kernels: list[str], compile_baseline: bool) -> list[str]:
    """The measurement columns of a table (after its label columns), as :func:`measure` fills them."""
    header = ["floor ms"] + [f"{k} ms" for k in kernels] + ["eager ms"]
    header += ["compile ms"] if compile_baseline else []
    header += [f"{k} TB/s" for k in kernels] + [f"{k} x eager" for k in kernels]
    header += [f"{k} x compile" for k in kernels] if compile_baseline else []
    return header


def measure(case: Case, kernels: list[str], device: torch.device, repeats: int,
            compile_baseline: bool, bandwidth: float) -> dict:
    """Times ``case`` on each backend of ``kernels``, eager and (optionally) compiled."""
    row = {"floor ms": case.nbytes / bandwidth * 1e3}
    for k in kernels:
        row[f"{k} ms"] = _time_ms(case.fused(k), device, repeats)
    row["eager ms"] = _time_ms(case.eager, device, repeats)
    if compile_baseline:
        row["compile ms"] = _time_ms(torch.compile(case.eager), device, repeats)
    for k in kernels:
        row[f"{k} TB/s"] = case.nbytes / (row[f"{k} ms"] * 1e-3) / 1e12
        row[f"{k} x eager"] = row["eager ms"] / row[f"{k} ms"]
        if compile_baseline:
            row[f"{k} x compile"] = row["compile ms"] / row[f"{k} ms"]
    return row


def run(shapes: list[tuple[int, int]], dtype: torch.dtype, device: torch.device, repeats: int = 50,
        compile_baseline: bool = True, out=print) -> list[dict]:
    """Benchmark every op on every shape; prints a table and returns its rows."""
    kernels = [b for b in ("cuda", "triton", "cpu") if _backend.available(b, device, dtype)]
    bandwidth = copy_bandwidth(device, 1 << 28 if device.type == "cuda" else 1 << 26, repeats)
    out(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"dtype {dtype}, torch {torch.__version__}, copy bandwidth {bandwidth / 1e12:.3f} TB/s")
    rows = []
    for n, d in shapes:
        for case in _cases(n, d, dtype, device):
            rows.append({"op": case.name, "shape": f"{n}x{d}",
                         **measure(case, kernels, device, repeats, compile_baseline, bandwidth)})
    out(format_table(["op", "shape"] + columns(kernels, compile_baseline), rows))
    return rows


def format_table(header: list[str], rows: list[dict]) -> str:
    """A Markdown table (floats with 3 significant decimals)."""
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in header) + " |" for r in rows]
    return "\n".join(lines)


def _shape(value):
    """``"16384x4096"`` -> ``(16384, 4096)``."""
    if isinstance(value, str):
        if not re.fullmatch(r"\s*\d+\s*[xX]\s*\d+\s*", value):
            raise ValueError("takes ROWSxFEATURES such as 16384x4096")
        return tuple(int(v) for v in value.lower().split("x"))
    return value


@config_dataclass(kw_only=True)
class BenchConfig:
    """The options of ``unlearn-kernels bench`` (its fields are the flags)."""

    device: Annotated[Literal["auto", "cpu", "cuda"], Field(description="auto: CUDA when present")] = "auto"
    dtype: Annotated[Literal["float32", "bfloat16", "float16"], Field(description="the inputs' dtype")] = "bfloat16"
    shapes: Annotated[list[Annotated[tuple[Count, Count], BeforeValidator(_shape)]], Field(
        min_length=1, description="ROWSxFEATURES, several allowed (default 4096x4096 16384x4096 65536x4096)")] = \
        Field(default_factory=lambda: [(4096, 4096), (16384, 4096), (65536, 4096)])
    repeats: Annotated[Count, Field(description="timed runs per figure (median)")] = 50
    no_compile: Annotated[bool, Field(description="skip the torch.compile baseline")] = False

    label: ClassVar = staticmethod(flag_label)


def run_command(config: BenchConfig, out=print) -> list[dict]:
    """``unlearn-kernels bench``: :func:`run` on the config's shapes, dtype and device."""
    from .eval.files import check_device

    device = torch.device(check_device(config.device))
    return run(config.shapes, getattr(torch, config.dtype), device, config.repeats,
               compile_baseline=not config.no_compile, out=out)
