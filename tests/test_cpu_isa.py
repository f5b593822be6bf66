"""Every instruction-set variant of the compiled CPU kernels that this machine supports
(DEFAULT, AVX2, AVX-512; chosen with UNLEARN_KERNELS_CPU_CAPABILITY in a fresh process)
agrees with the torch reference on fresh random odd-sized inputs, fp32 and bf16, and every
variant gives the same bits as every other one: each op, each dtype (fp32, bf16, fp16 and
fp64 where the op takes it), on fresh random inputs of odd sizes (a tail in every vector
loop), strided and non-contiguous views and masks with dropped rows (and all-dropped chunks),
saved by each variant's child process and compared bit for bit (NaN-aware: raw bits)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


# Runs in the child: every CPU op on inputs drawn from the seed in argv[2]; every output is
# saved (torch.save of a dict of tensors) to argv[3] for the parent to compare across variants.
BITS_CHILD = r'''
import sys

import torch

import unlearn_kernels._extension as ext
from unlearn_kernels import ops

want, seed, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
assert ext.cpu_capability() == want, (ext.cpu_capability(), want)
g = torch.Generator().manual_seed(seed)
out = {}


def keep(name, value):
    if isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            keep(f"{name}[{i}]", v)
    elif value is not None:
        out[name] = value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(value)


def rnd(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def views(n, d, dtype):
    """A contiguous [n, d], a row-strided slice of a wider matrix, a transposed (column-strided)
    view and a 3-D [.., .., d] tensor."""
    wide = rnd(n, d + 9, dtype=dtype)
    return {"contig": rnd(n, d, dtype=dtype), "rowstride": wide[:, 4:4 + d],
            "transposed": rnd(d, n, dtype=dtype).t(), "3d": rnd(3, n // 3, d, dtype=dtype)}


def token_mask(x):
    """About 60 % of the tokens kept, a run of dropped rows longer than a kernel's row chunk
    (half the rows at most), and the last token kept (so a mean over tokens exists)."""
    lead = x.shape[:-1]
    flat = (torch.rand(lead, generator=g) >= 0.4).reshape(-1)
    flat[3:3 + min(40, flat.numel() // 2)] = False
    flat[-1] = True
    return flat.reshape(lead)


FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def with_fp32(dtype):
    """dtype and fp32, in a fixed order (a set of dtypes iterates in an order that differs
    between processes, and so would the random draws)."""
    return (dtype,) if dtype == torch.float32 else (dtype, torch.float32)

for n, d in ((203, 77), (61, 5), (47, 300)):   # 77 = 4*16+13, 5 < 16, 300 = 18*16+12
    for dtype in FLOATS:
        tag = f"{n}x{d}/{str(dtype)[6:]}"
        control, importance = rnd(d), torch.rand(d, generator=g)
        for vname, h in views(n, d, dtype).items():
            anchor = rnd(*h.shape, dtype=dtype)
            mask = token_mask(h)
            for kname, kw in (("c", {"control": control}),
                              ("cia", {"control": control, "importance": importance, "anchor": anchor}),
                              ("a", {"anchor": anchor}),
                              ("ciam", {"control": control, "importance": importance, "anchor": anchor,
                                        "token_mask": mask})):
                x = h.clone().requires_grad_(True)
                loss = ops.misdirection_loss(x, backend="cpu", **kw)
                loss.backward()
                keep(f"misdirection/{kname}/{vname}/{tag}", (loss, x.grad))
                keep(f"misdirection_nograd/{kname}/{vname}/{tag}",
                     ops.misdirection_loss(h, backend="cpu", **kw))
            for mname, m in (("nomask", None), ("mask", mask)):
                keep(f"masked_edit/{mname}/{vname}/{tag}", ops.masked_edit(h, importance, control, 0.7, m, backend="cpu"))
                mo = ops.masked_moments(h, m, backend="cpu")
                keep(f"masked_moments/{mname}/{vname}/{tag}", (mo.count, mo.mean, mo.m2))
                keep(f"masked_gram/{mname}/{vname}/{tag}", ops.masked_gram(h, m, backend="cpu"))
            basis = torch.linalg.qr(rnd(d, min(d, 7), dtype=torch.float64))[0]
            basis = basis.to(torch.float64 if dtype == torch.float64 else torch.float32)
            x = h.clone().requires_grad_(True)
            y = ops.low_rank_project(x, basis, 0.9, backend="cpu")
            y.backward(rnd(*y.shape, dtype=dtype))
            keep(f"low_rank_project/{vname}/{tag}", (y, x.grad))
            labels = torch.randint(0, 7, h.shape[:-1], generator=g)
            keep(f"class_means/{vname}/{tag}", ops.class_means(h, labels, 8, backend="cpu"))
        fm = ops.masked_moments(rnd(n, d, dtype=dtype) * 3 + 1, backend="cpu")
        rm = ops.masked_moments(rnd(n, d, dtype=dtype), backend="cpu")
        keep(f"feature_scores/{tag}", ops.feature_scores(fm, rm, backend="cpu"))
        keep(f"feature_importance/{tag}", ops.feature_importance(fm, rm, 0.3, backend="cpu"))
        # Hessian EMA: state in a's dtype and (for reduced a) fp32; b absent or present.
        for hdtype in with_fp32(dtype):
            for bname in ("b", "nob"):
                a = rnd(n, d, dtype=dtype)
                b = rnd(n, d, dtype=dtype) if bname == "b" else None
                hess = torch.rand(n, d, generator=g).to(hdtype)
                ops.hessian_ema_(hess, a, b, beta=0.97, backend="cpu")
                keep(f"hessian_ema_/{bname}/{str(hdtype)[6:]}/{tag}", hess)
        # neuron scores: rows and columns, Hessians in w's dtype or fp32, retain or not, strided w.
        for wshape in ((n, d), (d, n)):
            w = rnd(*wshape, dtype=dtype)
            for hdtype in with_fp32(dtype) if dtype != torch.float64 else (dtype,):
                hf = torch.rand(*wshape, generator=g).to(hdtype)
                hr = torch.rand(*wshape, generator=g).to(hdtype)
                for dim in (0, 1):
                    keep(f"neuron_scores/{wshape}/{str(hdtype)[6:]}/dim{dim}/{tag}",
                         ops.neuron_scores(w, hf, hr, dim=dim, backend="cpu"))
                    keep(f"neuron_scores_noretain/{wshape}/{str(hdtype)[6:]}/dim{dim}/{tag}",
                         ops.neuron_scores(w, hf, None, dim=dim, backend="cpu"))
                    keep(f"neuron_scores_t/{wshape}/{str(hdtype)[6:]}/dim{dim}/{tag}",
                         ops.neuron_scores(w.t(), hf.t(), hr.t(), dim=dim, backend="cpu"))
        if dtype != torch.float64:
            for sdtype in with_fp32(dtype):
                shapes = [(n, d), (d, n), (n * d + 3,)]
                base = [(rnd(*s, dtype=dtype), rnd(*s, dtype=dtype, scale=1e-2), rnd(*s, dtype=sdtype, scale=1e-3),
                         (torch.rand(*s, generator=g) * 1e-2).to(sdtype)) for s in shapes]
                for mname, masks in (("nomask", None),
                                     ("mask", [torch.rand(n, generator=g) < 0.5,
                                               (torch.rand(n, generator=g) < 0.5, -1), None])):
                    t = [[x.clone() for x in group] for group in base]
                    ops.masked_sophia_step_([x[0] for x in t], [x[1] for x in t], [x[2] for x in t],
                                            [x[3] for x in t], masks, lr=1e-2, backend="cpu")
                    keep(f"masked_sophia_step_/{mname}/{str(sdtype)[6:]}/{tag}",
                         [x[0] for x in t] + [x[2] for x in t])
torch.save(out, path)
print("ok", want, len(out))
'''


def _raw_bits(t):
    """The tensor's raw bits as integers (so that NaNs compare by their bits, -0 != +0)."""
    t = t.contiguous()
    if t.is_floating_point():
        return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
    return t


def test_every_isa_variant_gives_the_same_bits(tmp_path):
    isas = _supported()
    if len(isas) < 2:
        pytest.skip("this CPU (or build) has one CPU kernel variant only")
    seed = secrets.randbelow(2**31)
    saved = {}
    for isa in isas:
        env = {**os.environ, "UNLEARN_KERNELS_CPU_CAPABILITY": isa}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        path = tmp_path / f"{isa}.pt"
        result = subprocess.run([sys.executable, "-c", BITS_CHILD, isa, str(seed), str(path)], env=env,
                                capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert result.returncode == 0, result.stdout + result.stderr
        saved[isa] = torch.load(path)
    first = isas[0]
    for isa in isas[1:]:
        assert saved[isa].keys() == saved[first].keys()
        differ = []
        for key, ref in saved[first].items():
            got = saved[isa][key]
            if ref.dtype != got.dtype or ref.shape != got.shape or not torch.equal(_raw_bits(ref), _raw_bits(got)):
                differ.append(key)
        assert not differ, (f"seed {seed}: {isa} and {first} differ in {len(differ)} of {len(saved[first])} "
                            f"outputs, e.g. " + ", ".join(differ[:25]))
