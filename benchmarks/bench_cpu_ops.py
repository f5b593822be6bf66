"""Every compiled CPU op against its eager PyTorch reference and that reference under
``torch.compile``, fp32 and bf16, on the same inputs in one run.

For each op, dtype and shape (tokens × features; 4096×1024 and 16384×4096 by default) it
times, interleaved call by call (the order rotating every round, so a noisy neighbour hits
all three alike), the compiled kernel (``torch.ops.unlearn_kernels.<op>``), the reference
kernel of the ``"torch"`` backend (the math in each op's docstring) and that reference under
``torch.compile`` (warm: compile time excluded). Each figure is the median of ``--repeats``
rounds. The byte floor is what the op must read and write at the copy bandwidth measured in
the same run; GB/s is floor bytes over the kernel's time. The goal column marks
``≥ 2× eager and ≥ 1× compile``. Inputs are random, never zero.

    python benchmarks/bench_cpu_ops.py                      # both shapes, fp32 and bf16
    python benchmarks/bench_cpu_ops.py --shapes 4096x1024 --repeats 15
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

import torch

from unlearn_kernels import _extension
from unlearn_kernels.benchmark import copy_bandwidth, format_table, time_interleaved
from unlearn_kernels.ops.class_means import _class_means_torch
from unlearn_kernels.ops.disruption_mask import _disruption_mask_inplace_torch, _disruption_mask_torch
from unlearn_kernels.ops.hessian import _hessian_ema_torch
from unlearn_kernels.ops.low_rank import _gram_torch, _project_torch
from unlearn_kernels.ops.misdirection import _masked_edit_torch, _misdirection_torch
from unlearn_kernels.ops.moments import _feature_scores_torch, _moments_torch
from unlearn_kernels.ops.neuron_scores import _neuron_scores_torch
from unlearn_kernels.ops.sophia import _sophia_torch

SOPHIA = dict(lr=1e-4, beta1=0.965, rho=0.04, weight_decay=0.1, eps=1e-15, bs=1.0)


@dataclass
class Case:
    """One op on one input set: the call with the compiled kernel and with the reference."""

    name: str
    kernel: Callable[[], object]
    reference: Callable[[], object]
    compiled_reference: Callable[[], object]
    nbytes: int


def _same_call(op, ref, *args):
    """(kernel call, reference call, compiled-reference call) on the same arguments."""
    compiled = torch.compile(ref, dynamic=False)
    return (lambda: op(*args)), (lambda: ref(*args)), (lambda: compiled(*args))


def cases(n: int, d: int, dtype: torch.dtype) -> list[Case]:
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    ops = torch.ops.unlearn_kernels
    size = n * d * torch.finfo(dtype).bits // 8
    h, anchor = rand(n, d), rand(n, d)
    control = torch.randn(d, generator=g) * 0.2 + 0.1
    importance = torch.rand(d, generator=g) * 0.98 + 0.01
    mask = torch.rand(n, generator=g) < 0.7
    scale, masked_scale = 1.0 / (n * d), 1.0 / (int(mask.sum()) * d)
    basis = torch.linalg.qr(torch.randn(d, 16, generator=g))[0]
    labels = torch.randint(0, 10, (n,), generator=g)
    hf, hr = torch.rand(n, d, generator=g).add_(0.01).to(dtype), torch.rand(n, d, generator=g).add_(0.01).to(dtype)
    stats = [v.float().contiguous() for v in (h[0].abs(), h[1].abs() + 0.1, h[2].abs(), h[3].abs() + 0.1)]
    hess_buf = torch.rand(n * d, generator=g).add_(0.01).to(dtype)
    grad_flat = rand(n * d)

    out = []

    def add(name, op, ref, args, nbytes):
        out.append(Case(name, *_same_call(op, ref, *args), nbytes))

    add("misdirection RMU fwd+bwd", ops.misdirection_fwd_bwd, _misdirection_torch,
        (h, control, None, None, None, scale, True), 2 * size)
    add("misdirection SRMU (importance+anchor) fwd+bwd", ops.misdirection_fwd_bwd, _misdirection_torch,
        (h, control, importance, anchor, None, scale, True), 3 * size)
    add("misdirection SRMU + mask fwd+bwd", ops.misdirection_fwd_bwd, _misdirection_torch,
        (h, control, importance, anchor, mask, masked_scale, True), 3 * size)
    add("misdirection retain (anchor only) fwd+bwd", ops.misdirection_fwd_bwd, _misdirection_torch,
        (h, None, None, anchor, None, scale, True), 3 * size)
    add("masked_edit", ops.masked_edit, _masked_edit_torch, (h, importance, control, 0.5, None), 2 * size)
    add("low_rank_project r=16", ops.low_rank_project, _project_torch, (h, basis, 1.0, False), 2 * size)
    add("masked_gram (mask)", ops.masked_gram, _gram_torch, (h, mask), size)
    add("masked_moments", ops.masked_moments, _moments_torch, (h, None), size)
    add("masked_moments (mask)", ops.masked_moments, _moments_torch, (h, mask), size)
    add("feature_scores [d]", ops.feature_scores, _feature_scores_torch, (*stats, 1e-6), 5 * 4 * d)
    add("class_means (10 classes)", ops.class_means, _class_means_torch, (h, labels, 10), size + 8 * n)
    add("neuron_scores dim 0 (forget+retain)", ops.neuron_scores, _neuron_scores_torch, (h, hf, hr, 0), 3 * size)
    add("neuron_scores dim 1 (forget+retain)", ops.neuron_scores, _neuron_scores_torch, (h, hf, hr, 1), 3 * size)
    add("disruption_mask (+count)", ops.disruption_mask, _disruption_mask_torch, (h, anchor, 0.5), 3 * size)
    # in place with scale 1: after the first call the masked entries are 0 and every call
    # writes the same values (the kernels' work does not depend on them)
    add("disruption_mask_ in place (+count)", ops.disruption_mask_, _disruption_mask_inplace_torch,
        (h.clone(), anchor, 1.0), 3 * size)
    add("hessian_ema_ (a⊙a)", ops.hessian_ema_, _hessian_ema_torch, (hess_buf, grad_flat, None, 0.99), 3 * size)

    # Sophia: two tensors [n/2, d] (row mask) and [d, n/2] (column mask), state in the param dtype.
    shapes = [(n // 2, d), (d, n // 2)]
    params = [rand(*s) for s in shapes]
    grads = [rand(*s).mul_(1e-2) for s in shapes]
    exp_avgs = [rand(*s).mul_(1e-3) for s in shapes]
    hessians = [torch.rand(*s, generator=g).mul_(1e-2).add_(1e-4).to(dtype) for s in shapes]
    neuron = [torch.rand(n // 2, generator=g) < 0.5, torch.rand(n // 2, generator=g) < 0.5]
    selected = (int(neuron[0].sum()) * d + int(neuron[1].sum()) * d) / (n * d)
    step = tuple(SOPHIA.values())
    add("masked_sophia_step_ unmasked", ops.masked_sophia_step_, _sophia_torch,
        (params, grads, exp_avgs, hessians, [None, None], [0, 0], *step), 6 * size)
    add("masked_sophia_step_ neuron masks (50 %)", ops.masked_sophia_step_, _sophia_torch,
        (params, grads, exp_avgs, hessians, neuron, [0, -1], *step), int(6 * size * selected))
    return out


def run(shapes: list[tuple[int, int]], dtypes: list[torch.dtype], repeats: int, out=print) -> list[dict]:
    if not _extension.compiled():
        raise SystemExit("the compiled extension (unlearn_kernels._C) is not built")
    bandwidth = copy_bandwidth(torch.device("cpu"), 1 << 28, max(repeats, 10))
    out(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU kernels: "
        f"{_extension.cpu_capability()}, copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write, 256 MiB)")
    rows = []
    for n, d in shapes:
        for dtype in dtypes:
            for case in cases(n, d, dtype):
                ms = time_interleaved({"cpu": case.kernel, "eager": case.reference,
                                       "compile": case.compiled_reference}, torch.device("cpu"), repeats, warmup=2)
                x_eager, x_compile = ms["eager"] / ms["cpu"], ms["compile"] / ms["cpu"]
                rows.append({"op": case.name, "dtype": str(dtype).split(".")[-1], "shape": f"{n}x{d}",
                             "floor ms": case.nbytes / bandwidth * 1e3, "cpu ms": ms["cpu"],
                             "eager ms": ms["eager"], "compile ms": ms["compile"],
                             "cpu GB/s": case.nbytes / (ms["cpu"] * 1e-3) / 1e9,
                             "x eager": x_eager, "x compile": x_compile,
                             "goal": "met" if x_eager >= 2 and x_compile >= 1 else "MISSED"})
                out(format_table(list(rows[-1]), rows[-1:]).splitlines()[-1])
    out("")
    out(format_table(list(rows[0]), rows))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x1024,16384x4096", help="tokens x features, comma separated")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=21, help="rounds; the median is reported")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    run(shapes, [getattr(torch, t) for t in args.dtypes.split(",")], args.repeats)


if __name__ == "__main__":
    main()
