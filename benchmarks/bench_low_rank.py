"""Throughput of low_rank_project (forward, and the backward to x) against eager PyTorch and
torch.compile, with the byte floor (read x or g + write y or ∂x) at the copy bandwidth
measured in the same run.

On the device machine:  python benchmarks/bench_low_rank.py
On a CPU:               python benchmarks/bench_low_rank.py --device cpu

Eager formula: ``x - (x @ U) @ U.T * s`` (U in x's dtype); its backward is autograd's.
"""

from __future__ import annotations

import argparse

import torch

from unlearn_kernels.benchmark import _time_ms, copy_bandwidth, format_table
from unlearn_kernels.ops import _backend
from unlearn_kernels.ops.low_rank import low_rank_project

SCALE = 1.0


def eager(x, u):
    return x - (x @ u) @ u.T * SCALE


def fused(backend):
    return lambda x, u: low_rank_project(x, u, SCALE, assume_orthonormal=True, backend=backend)


def backward_call(fn, x, u, g):
    """A closure timing only the backward pass of ``fn`` (the graph is built once)."""
    xr = x.detach().requires_grad_(True)
    y = fn(xr, u)
    return lambda: torch.autograd.grad(y, xr, g, retain_graph=True)


def bench(n, d, ranks, dtype, device, repeats, compile_baseline, out=print):
    kernels = [b for b in ("cuda", "triton", "cpu") if _backend.available(b, device, dtype)]
    bandwidth = copy_bandwidth(device, 1 << 28 if device.type == "cuda" else 1 << 26, repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    out(f"device {device} ({name}), {n}x{d} {dtype}, torch {torch.__version__}, "
        f"copy bandwidth {bandwidth / 1e12:.3f} TB/s")
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, d, device=device, dtype=dtype, generator=gen)
    g = torch.randn(n, d, device=device, dtype=dtype, generator=gen)
    nbytes = 2 * x.numel() * x.element_size()
    impls = {k: fused(k) for k in kernels}
    impls["eager"] = eager
    if compile_baseline:
        impls["compile"] = torch.compile(eager)
    header = ["pass", "r", "floor ms"] + [f"{k} ms" for k in impls]
    header += [f"{k} TB/s" for k in kernels] + [f"{k} x eager" for k in kernels]
    header += [f"{k} x compile" for k in kernels] if compile_baseline else []
    rows = []
    for r in ranks:
        q, _ = torch.linalg.qr(torch.randn(d, r, device=device, dtype=torch.float32, generator=gen))
        u = q.to(dtype)
        for pass_name in ("fwd", "bwd"):
            row = {"pass": pass_name, "r": r, "floor ms": nbytes / bandwidth * 1e3}
            for label, fn in impls.items():
                call = (lambda fn=fn: fn(x, u)) if pass_name == "fwd" else backward_call(fn, x, u, g)
                row[f"{label} ms"] = _time_ms(call, device, repeats)
            for k in kernels:
                row[f"{k} TB/s"] = nbytes / (row[f"{k} ms"] * 1e-3) / 1e12
                row[f"{k} x eager"] = row["eager ms"] / row[f"{k} ms"]
                if compile_baseline:
                    row[f"{k} x compile"] = row["compile ms"] / row[f"{k} ms"]
            rows.append(row)
    out(format_table(header, rows))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default=None, help="NxD (default 16384x4096 on cuda, 4096x1024 on cpu)")
    parser.add_argument("--ranks", default="8,64,256")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    n, d = map(int, (args.shape or ("16384x4096" if gpu else "4096x1024")).split("x"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    repeats = args.repeats or (50 if gpu else 10)
    bench(n, d, [int(r) for r in args.ranks.split(",")], dtype, device, repeats, not args.no_compile)


if __name__ == "__main__":
    main()
