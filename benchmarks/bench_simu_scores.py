"""Throughput of SIMU's and CMF's scoring ops against eager PyTorch and torch.compile.

Ops and shapes (the issue's; ``--scale`` divides the row counts, the CPU default is 16):
- ``hessian_ema_`` on 14336×4096: fp32 ``hess``, bf16 ``(z, Hz)`` (Hutchinson) and bf16
  ``g`` (Gauss-Newton, ``b = None``);
- ``neuron_scores`` with forget and retain Hessians: bf16 weight, fp32 Hessians, on
  14336×4096 and 4096×14336, ``dim`` 0 and 1 (up/gate proj rows, down proj columns);
- ``class_means``: 65536×4096 bf16 features, 100 classes (the public op, which checks the
  labels' range with one host sync).

``--dtype`` sets the weight / probe / feature dtype (Hessian state stays fp32); the CPU
default is float32. Each row: byte floor (bytes the op must move at the device copy
bandwidth measured in the same run), every available backend, eager, torch.compile,
achieved TB/s and speedups.

    python benchmarks/bench_simu_scores.py                        # the device machine
    python benchmarks/bench_simu_scores.py --device cpu           # CPU, shapes / 16
"""

from __future__ import annotations

import argparse
import sys

import torch

from unlearn_kernels.benchmark import Case, _time_ms, copy_bandwidth, format_table
from unlearn_kernels.ops import _backend
from unlearn_kernels.ops.class_means import class_means
from unlearn_kernels.ops.hessian import hessian_ema_
from unlearn_kernels.ops.neuron_scores import neuron_scores

BETA = 0.99


def _ema_eager(hess, a, b):
    """Sophia's update: ``hess.mul_(β).addcmul_(a, b, value=1 − β)``."""
    return hess.mul_(BETA).addcmul_(a, a if b is None else b, value=1 - BETA)


def _scores_eager(weight, h_f, h_r, dim):
    w2 = weight.float() ** 2
    return 0.5 * (h_f * w2).sum(1 - dim), 0.5 * (h_r * w2).sum(1 - dim)


def _means_eager(x, labels, num_classes):
    sums = torch.zeros(num_classes, x.shape[1], device=x.device).index_add_(0, labels, x.float())
    counts = torch.bincount(labels, minlength=num_classes)
    return sums / counts.clamp(min=1)[:, None], counts


def _cases(dtype: torch.dtype, device: torch.device, scale: int) -> list[tuple[Case, torch.dtype]]:
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dt=dtype):
        return torch.randn(shape, device=device, generator=g).to(dt)

    ff, d = 14336 // scale, 4096
    hess = torch.rand(ff, d, device=device, generator=g)
    z, hz = randn(ff, d).sign(), randn(ff, d)
    ema_bytes = hess.numel() * 4 * 2
    cases = [
        (Case(f"hessian_ema_ Hutchinson {ff}x{d}",
              lambda b: lambda: hessian_ema_(hess, z, hz, beta=BETA, backend=b),
              lambda: _ema_eager(hess, z, hz), ema_bytes + 2 * z.numel() * z.element_size()), dtype),
        (Case(f"hessian_ema_ Gauss-Newton {ff}x{d}",
              lambda b: lambda: hessian_ema_(hess, hz, beta=BETA, backend=b),
              lambda: _ema_eager(hess, hz, None), ema_bytes + hz.numel() * hz.element_size()), dtype),
    ]
    for rows, cols in ((ff, d), (d, ff)):
        weight, h_f, h_r = randn(rows, cols), randn(rows, cols, dt=torch.float32).abs(), randn(
            rows, cols, dt=torch.float32).abs()
        nbytes = weight.numel() * (weight.element_size() + 8)
        for dim in (0, 1):
            cases.append((Case(
                f"neuron_scores f+r dim={dim} {rows}x{cols}",
                lambda b, w=weight, f=h_f, r=h_r, k=dim: lambda: neuron_scores(w, f, r, dim=k, backend=b),
                lambda w=weight, f=h_f, r=h_r, k=dim: _scores_eager(w, f, r, k), nbytes), dtype))
    n, classes = 65536 // scale, 100
    x = randn(n, d)
    labels = torch.randint(0, classes, (n,), device=device, generator=g)
    cases.append((Case(f"class_means {n}x{d}, {classes} classes",
                       lambda b: lambda: class_means(x, labels, classes, backend=b),
                       lambda: _means_eager(x, labels, classes),
                       x.numel() * x.element_size() + labels.numel() * 8 + classes * d * 4), dtype))
    return cases


def _row(case: Case, dtype, device, bandwidth, repeats, compile_baseline) -> dict:
    row = {"op": case.name, "floor ms": case.nbytes / bandwidth * 1e3}
    kernels = [k for k in ("cuda", "triton", "cpu") if _backend.available(k, device, dtype)]
    timings = {k: _time_ms(case.fused(k), device, repeats) for k in kernels}
    baselines = {"eager": _time_ms(case.eager, device, repeats)}
    if compile_baseline:
        baselines["compile"] = _time_ms(torch.compile(case.eager), device, repeats)
    row.update({f"{k} ms": ms for k, ms in {**timings, **baselines}.items()})
    for k, ms in timings.items():
        row[f"{k} TB/s"] = case.nbytes / (ms * 1e-3) / 1e12
        row.update({f"{k} x {base}": base_ms / ms for base, base_ms in baselines.items()})
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--scale", type=int, default=None, help="divide the row counts (CPU default 16)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (median)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    scale = args.scale or (1 if gpu else 16)
    repeats = args.repeats or (50 if gpu else 10)
    bandwidth = copy_bandwidth(device, 1 << 28 if gpu else 1 << 26, repeats)
    print(f"device {device} ({torch.cuda.get_device_name(device) if gpu else 'CPU'}), dtype {dtype} "
          f"(Hessians fp32), torch {torch.__version__}, copy bandwidth {bandwidth / 1e12:.3f} TB/s")
    rows = [_row(case, dt, device, bandwidth, repeats, not args.no_compile)
            for case, dt in _cases(dtype, device, scale)]
    header = ["op", "floor ms"] + [k for k in rows[0] if k not in ("op", "floor ms")]
    print(format_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
