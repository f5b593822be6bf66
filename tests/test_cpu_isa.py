"""Every instruction-set variant of the compiled CPU kernels that this machine supports
(DEFAULT, AVX2, AVX-512; chosen with UNLEARN_KERNELS_CPU_CAPABILITY in a fresh process)
agrees with the torch reference on fresh random odd-sized inputs, fp32 and bf16."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from unlearn_kernels import _extension

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["default", "avx2", "avx512"]

pytestmark = pytest.mark.skipif(not _extension.compiled(), reason="the C++ extension was not built")


def _supported() -> list[str]:
    if not _extension.compiled():
        return []
    best = _extension._C.best_cpu_capability()
    return ORDER[:ORDER.index(best) + 1]


# Runs in the child: every CPU op against backend="torch", on odd sizes that leave vector tails.
CHILD = r'''
import sys

import torch

import unlearn_kernels._extension as ext
from unlearn_kernels import ops

want = sys.argv[1]
assert ext.cpu_capability() == want, (ext.cpu_capability(), want)
g = torch.Generator().manual_seed(1234 + len(want))
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2)}


def close(a, b, dtype, what, scale=1.0):
    atol, rtol = TOL[dtype]
    for x, y in zip(a if isinstance(a, (tuple, list)) else [a], b if isinstance(b, (tuple, list)) else [b]):
        if x is None and y is None:
            continue
        torch.testing.assert_close(x.double(), y.double(), atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


n, d = 203, 77  # odd: every vector loop has a tail
for dtype in (torch.float32, torch.bfloat16):
    h = rnd(n, d, dtype=dtype)
    anchor = rnd(n, d, dtype=dtype)
    control = rnd(d)
    importance = torch.rand(d, generator=g)
    mask = torch.rand(n, generator=g) < 0.6
    for kw in ({"control": control}, {"control": control, "importance": importance, "anchor": anchor},
               {"anchor": anchor}, {"control": control, "importance": importance, "anchor": anchor, "token_mask": mask}):
        out = {}
        for b in ("cpu", "torch"):
            x = h.clone().requires_grad_(True)
            loss = ops.misdirection_loss(x, backend=b, **kw)
            loss.backward()
            out[b] = (loss.detach(), x.grad)
        close(out["cpu"], out["torch"], dtype, f"misdirection {sorted(kw)}", scale=10)
    for m in (None, mask):
        close(ops.masked_edit(h, importance, control, 0.7, m, backend="cpu"),
              ops.masked_edit(h, importance, control, 0.7, m, backend="torch"), dtype, "masked_edit")
        a = ops.masked_moments(h, m, backend="cpu")
        b = ops.masked_moments(h, m, backend="torch")
        close((a.mean, a.m2), (b.mean, b.m2), dtype, "masked_moments", scale=100)
        assert int(a.count) == int(b.count)
        close(ops.masked_gram(h, m, backend="cpu"), ops.masked_gram(h, m, backend="torch"), dtype, "masked_gram", scale=100)
    basis = torch.linalg.qr(torch.randn(d, 5, generator=g))[0]
    close(ops.low_rank_project(h, basis, 0.9, backend="cpu"), ops.low_rank_project(h, basis, 0.9, backend="torch"),
          dtype, "low_rank_project", scale=10)
    fm, rm = ops.masked_moments(h, backend="torch"), ops.masked_moments(anchor, backend="torch")
    close(ops.feature_scores(fm, rm, backend="cpu"), ops.feature_scores(fm, rm, backend="torch"), torch.float32, "feature_scores")
    labels = torch.randint(0, 7, (n,), generator=g)
    close(ops.class_means(h, labels, 8, backend="cpu"), ops.class_means(h, labels, 8, backend="torch"), dtype, "class_means")
    w = rnd(91, 133, dtype=dtype)
    hf, hr = torch.rand(91, 133, generator=g).to(dtype), torch.rand(91, 133, generator=g).to(dtype)
    for dim in (0, 1):
        close(ops.neuron_scores(w, hf, hr, dim=dim, backend="cpu"), ops.neuron_scores(w, hf, hr, dim=dim, backend="torch"),
              dtype, f"neuron_scores dim {dim}", scale=10)
    for b_arg in (None, rnd(n, d, dtype=dtype)):
        acc = {bk: torch.rand(n, d, generator=torch.Generator().manual_seed(3)).to(dtype) for bk in ("cpu", "torch")}
        for bk, buf in acc.items():
            ops.hessian_ema_(buf, h, b_arg, beta=0.97, backend=bk)
        close(acc["cpu"], acc["torch"], dtype, "hessian_ema_")
    for scale in (0.37, -2.0):  # elementwise, one multiply: the same bits on every instruction set
        (out_c, kept_c), (out_t, kept_t) = (ops.disruption_mask(h, anchor, scale, return_kept=True, backend=bk)
                                            for bk in ("cpu", "torch"))
        assert torch.equal(out_c.view(torch.uint8), out_t.view(torch.uint8)), f"disruption_mask {dtype}"
        assert int(kept_c) == int(kept_t)
    shapes = [(37, 53), (53, 37), (129,)]
    base = [(rnd(*s, dtype=dtype), rnd(*s, dtype=dtype) * 1e-2, rnd(*s) * 1e-3, torch.rand(*s, generator=g) * 1e-2)
            for s in shapes]
    masks_sets = [None, [torch.rand(37, generator=g) < 0.5, (torch.rand(37, generator=g) < 0.5, -1), None]]
    for masks in masks_sets:
        res = {}
        for bk in ("cpu", "torch"):
            t = [[x.clone() for x in group] for group in base]
            ops.masked_sophia_step_([x[0] for x in t], [x[1] for x in t], [x[2] for x in t], [x[3] for x in t],
                                    masks, lr=1e-2, backend=bk)
            res[bk] = [x[0] for x in t] + [x[2] for x in t]
        close(res["cpu"], res["torch"], dtype, f"masked_sophia_step_ masks={masks is not None}")
print("ok", want)
'''


@pytest.mark.parametrize("isa", ORDER)
def test_isa_variant_matches_the_reference(isa):
    if isa not in _supported():
        pytest.skip(f"this CPU (or build) has no {isa} variant")
    env = {**os.environ, "UNLEARN_KERNELS_CPU_CAPABILITY": isa}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", CHILD, isa], env=env, capture_output=True, text=True,
                            timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ok {isa}" in result.stdout


def test_unknown_capability_falls_back_to_the_best_with_a_warning():
    env = {**os.environ, "UNLEARN_KERNELS_CPU_CAPABILITY": "sse9"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    code = "import unlearn_kernels._extension as e; print(e.cpu_capability(), e._C.best_cpu_capability())"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    active, best = result.stdout.split()
    assert active == best and "ignoring UNLEARN_KERNELS_CPU_CAPABILITY=sse9" in result.stderr


def test_aten_cpu_capability_is_honoured():
    env = {k: v for k, v in os.environ.items() if k != "UNLEARN_KERNELS_CPU_CAPABILITY"}
    env["ATEN_CPU_CAPABILITY"] = "default"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    code = "import unlearn_kernels._extension as e; print(e.cpu_capability())"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "default", result.stdout + result.stderr
