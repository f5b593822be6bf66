"""Throughput of the fused masked Sophia-G step against the official per-tensor loop.

The parameter set is the anchor's: 3 × [4096, 14336] + 6 × [14336, 4096] fp32 params with
fp32 state (528 M parameters, three Mistral-7B MLPs), every dim divided by ``--scale``.
Two cases, on the same tensors in one run:

- no masks: each fused backend vs the official Sophia-G per-tensor loop (eager) and that
  loop under ``torch.compile``; byte floor 24 B/param (read p, g, m, h; write p, m);
- neuron masks keeping ``--keep`` of the neurons (rows of the [14336, 4096] up/gate
  projections, columns of the [4096, 14336] down projections): each fused backend vs the
  masked reference (the fp32 formula and ``torch.where``) eager and compiled; the floor
  counts the selected elements only.

On the device machine:  python benchmarks/bench_sophia.py
On a CPU:               python benchmarks/bench_sophia.py --device cpu   (dims / 8)
"""

from __future__ import annotations

import argparse
import functools

import torch

from unlearn_kernels.benchmark import Case, columns, copy_bandwidth, format_table, measure
from unlearn_kernels.ops import _backend
from unlearn_kernels.ops.sophia import _sophia_reference_loop, _sophia_torch, masked_sophia_step_

HYPER = dict(lr=1e-4, beta1=0.965, rho=0.04, weight_decay=0.1, eps=1e-15, bs=1)
BYTES_PER_ELEMENT = 24  # fp32: read p, g, m, h; write p, m


def parameter_set(scale: int, device: torch.device):
    """(params, grads, exp_avgs, hessians, masks) of the anchor's MLP set, dims / scale."""
    hidden, d = 14336 // scale, 4096 // scale
    shapes = [(d, hidden)] * 3 + [(hidden, d)] * 6
    g = torch.Generator(device=device).manual_seed(0)
    new = lambda s: torch.randn(s, device=device, generator=g)  # noqa: E731
    params = [new(s) for s in shapes]
    grads = [new(s).mul_(1e-2) for s in shapes]
    exp_avgs = [new(s).mul_(1e-3) for s in shapes]
    hessians = [torch.rand(s, device=device, generator=g).mul_(1e-2) for s in shapes]
    return params, grads, exp_avgs, hessians


def neuron_masks(params, keep: float, device: torch.device):
    """Masks over the hidden neurons: columns of [d, hidden] params, rows of [hidden, d] ones."""
    g = torch.Generator(device=device).manual_seed(1)
    masks = []
    for p in params:
        dim = -1 if p.shape[1] > p.shape[0] else 0
        masks.append((torch.rand(p.shape[dim], device=device, generator=g) < keep, dim))
    return masks


def selected_elements(params, masks) -> int:
    total = 0
    for p, (mask, dim) in zip(params, masks):
        total += int(mask.sum()) * (p.numel() // p.shape[dim])
    return total


def run(device: torch.device, scale: int, keep: float, repeats: int, compile_baseline: bool, out=print):
    tensors = parameter_set(scale, device)
    params = tensors[0]
    masks = neuron_masks(params, keep, device)
    kernels = [b for b in ("cuda", "triton", "cpu") if _backend.available(b, device, torch.float32)]
    if device.type == "cpu":
        kernels = [b for b in kernels if b != "triton"]  # the interpreter is not a benchmark
    numel = sum(p.numel() for p in params)
    bandwidth = copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 26, repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    out(f"device {device} ({name}), torch {torch.__version__}, copy bandwidth {bandwidth / 1e12:.3f} TB/s, "
        f"{len(params)} fp32 params, {numel / 1e6:.1f} M elements, fp32 state")

    step = dict(lr=HYPER["lr"], betas=(HYPER["beta1"], 0.99), rho=HYPER["rho"],
                weight_decay=HYPER["weight_decay"], eps=HYPER["eps"], bs=HYPER["bs"])

    def fused(case_masks):
        return lambda backend: functools.partial(masked_sophia_step_, *tensors, case_masks, backend=backend, **step)

    cases = [
        Case("no masks (official Sophia-G)", fused(None),
             functools.partial(_sophia_reference_loop, *tensors, **HYPER), numel * BYTES_PER_ELEMENT),
        Case(f"neuron masks, keep {keep:g}", fused(masks),
             functools.partial(_sophia_torch, *tensors, [m for m, _ in masks], [d for _, d in masks], **HYPER),
             selected_elements(params, masks) * BYTES_PER_ELEMENT),
    ]
    rows = [{"case": case.name, **measure(case, kernels, device, repeats, compile_baseline, bandwidth)}
            for case in cases]
    out(format_table(["case"] + columns(kernels, compile_baseline), rows))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=int, default=None,
                        help="divide every dim by this (default 1 on a GPU, 8 on the CPU)")
    parser.add_argument("--keep", type=float, default=0.1, help="fraction of neurons the masks keep")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per figure (median)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    scale = args.scale or (1 if device.type == "cuda" else 8)
    with torch.no_grad():
        run(device, scale, args.keep, args.repeats, not args.no_compile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
