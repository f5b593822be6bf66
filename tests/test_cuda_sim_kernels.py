"""Every CUDA kernel of csrc/cuda, executed on the CPU harness (tests/cuda_sim) through the
launchers the extension calls, against the plain-PyTorch reference of its op at the CUDA
tolerances: the shapes of the backend tests (odd sizes, sizes around each tile and block size,
masks with empty rows, zero-size inputs, strided and misaligned views), fp32/bf16/fp16. Each
case runs under two opposite thread schedules and must agree bit for bit."""

import pytest
import torch

from unlearn_kernels.ops.class_means import _class_means_torch
from unlearn_kernels.ops.disruption_mask import _disruption_mask_torch
from unlearn_kernels.ops.hessian import _hessian_ema_torch
from unlearn_kernels.ops.low_rank import _project_torch
from unlearn_kernels.ops.misdirection import _masked_edit_torch, _misdirection_torch
from unlearn_kernels.ops.moments import _feature_scores_torch, _moments_torch
from unlearn_kernels.ops.neuron_scores import _neuron_scores_torch
from unlearn_kernels.ops.sophia import _sophia_torch

from conftest import TOLERANCES
from cuda_sim.fixtures import WORST, bits, both_schedules, sim  # noqa: F401  (fixture)
from cuda_sim.ops import guarded_input, strided_rows

pytestmark = pytest.mark.cuda_sim

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["fp32", "bf16", "fp16"]


def check(name: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, scale: float = 1.0,
          exact: bool = False):
    """assert_close at the tolerance of dtype, recording the worst error / tolerance ratio and
    the worst absolute error. ``exact``: the kernel does the reference's fp32 operations and
    rounds once, so a 16-bit result must also equal the reference bit for bit on at least 99 %
    of the elements (a rounding mode other than nearest-even moves about half of them by one
    ulp, within the tolerance)."""
    atol, rtol = TOLERANCES[dtype]
    atol *= scale
    assert got.shape == ref.shape, (got.shape, ref.shape)
    g, r = got.double(), ref.double()
    key = f"{name} {str(dtype).split('.')[-1]}"
    if g.numel():
        ratio = ((g - r).abs() / (atol + rtol * r.abs())).nan_to_num(nan=float("inf")).max().item()
        WORST[key + " err/tol"] = max(WORST[key + " err/tol"], ratio)
        WORST[key + " abs err"] = max(WORST[key + " abs err"], (g - r).abs().nan_to_num(nan=float("inf")).max().item())
    torch.testing.assert_close(g, r, atol=atol, rtol=rtol)
    if exact and got.dtype in (torch.bfloat16, torch.float16) and got.numel():
        same = (got.contiguous().view(torch.int16) == ref.to(got.dtype).contiguous().view(torch.int16))
        differ = 1.0 - same.double().mean().item()
        WORST[key + " bits differ"] = max(WORST[key + " bits differ"], differ)
        assert differ <= 0.01, f"{differ:.1%} of the {got.dtype} results differ from the reference's rounding"


def rows_input(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x [n, d] as the kernels may receive it: contiguous, strided rows, or shifted by one
    element (misaligned for the 16-byte path); always inside NaN guard zones."""
    if layout == "strided":
        return strided_rows(x, pad=3)
    if layout == "aligned_stride":
        return strided_rows(x, pad=8)
    return guarded_input(x, offset=1 if layout == "misaligned" else 0)


def make_mask(n: int, kind: str, g: torch.Generator):
    if kind == "none":
        return None
    mask = torch.rand(n, generator=g) > 0.3
    if kind == "first_empty" and n:
        mask[: max(1, n // 4)] = False
        mask[-1] = True
    elif kind == "empty":
        mask[:] = False
    elif kind == "first_rows":
        mask[:] = False
        mask[: min(n, 3)] = True
    return guarded_input(mask)


# ---- misdirection.cu: misdirection_kernel, sum_partials_kernel, masked_edit_kernel ----------

FORMS = ["rmu_forget", "rmu_retain", "srmu", "control_and_anchor", "importance_only"]
ROW_CASES = [  # (n, d, mask, layout): the backend tests' shapes, then tile and block edges
    (21, 131, "some", "contiguous"), (5, 1, "none", "contiguous"), (132, 7, "first_empty", "contiguous"),
    (1, 1, "none", "contiguous"), (140, 1029, "some", "contiguous"), (0, 8, "none", "contiguous"),
    (4, 0, "none", "contiguous"), (33, 256, "some", "contiguous"), (31, 255, "none", "contiguous"),
    (12, 257, "first_empty", "contiguous"), (64, 8, "some", "aligned_stride"), (40, 96, "some", "strided"),
    (17, 264, "none", "misaligned"), (300, 32, "empty", "contiguous"),
]
ROW_IDS = [f"{n}x{d}-{m}-{layout}" for n, d, m, layout in ROW_CASES]


def misdirection_inputs(n, d, mask_kind, layout, dtype, form, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = rows_input(torch.randn(n, d, generator=g).to(dtype), layout)
    u = torch.rand(d, generator=g)
    control = guarded_input(6.5 * u / u.norm().clamp(min=1e-6))
    importance = guarded_input(torch.rand(d, generator=g))
    anchor = rows_input((torch.randn(n, d, generator=g) * 0.5).to(dtype), layout)
    mask = make_mask(n, mask_kind, g)
    args = {"rmu_forget": (control, None, None), "rmu_retain": (None, None, anchor),
            "srmu": (control, importance, anchor), "control_and_anchor": (control, None, anchor),
            "importance_only": (control, importance, None)}[form]
    valid = n if mask is None else int(mask.sum())
    scale = 1.0 / (max(valid, 1) * max(d, 1))
    return h, args, mask, scale


# Device "sm90_3sm" (3 SMs: a handful of blocks, long loops in each) and an H100's launch shapes.
GRIDS = ["sm90_3sm", "h100"]


# An H100's grid for 140 x 1029 is 2310 blocks of 256 threads: one form there is enough.
MISDIRECTION_CASES = [pytest.param(*case, form, grid, id=f"{case_id}-{form}-{grid}")
                      for case, case_id in zip(ROW_CASES, ROW_IDS) for form in FORMS for grid in GRIDS
                      if not (grid == "h100" and case[:2] == (140, 1029) and form != "srmu")]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("n,d,mask_kind,layout,form,grid", MISDIRECTION_CASES)
def test_misdirection(sim, n, d, mask_kind, layout, dtype, form, grid):  # noqa: F811
    h, (control, importance, anchor), mask, scale = misdirection_inputs(n, d, mask_kind, layout, dtype, form)
    need_grad = form != "control_and_anchor"  # the loss-only launch too
    loss, grad = both_schedules(sim, lambda: sim.misdirection_fwd_bwd(h, control, importance, anchor, mask,
                                                                    scale, need_grad), grid)
    if n == 0:  # the reference needs a row; the sum over no rows is 0
        ref_loss, ref_grad = torch.zeros(()), torch.empty(0, d, dtype=dtype)
    else:
        ref_loss, ref_grad = _misdirection_torch(h, control, importance, anchor, mask, scale, need_grad)
    check("misdirection_kernel+sum_partials_kernel loss", loss, ref_loss.float(), dtype)
    if need_grad:
        check("misdirection_kernel grad", grad, ref_grad, dtype, exact=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("n,d,mask_kind,layout", ROW_CASES, ids=ROW_IDS)
def test_masked_edit(sim, n, d, mask_kind, layout, dtype):  # noqa: F811
    h, (control, importance, _), mask, _ = misdirection_inputs(n, d, mask_kind, layout, dtype, "srmu", seed=1)
    out = both_schedules(sim, lambda: sim.masked_edit(h, importance, control, 0.7, mask))
    check("masked_edit_kernel", out, _masked_edit_torch(h, importance, control, 0.7, mask), dtype, exact=True)


# ---- moments.cu: moments_partial_kernel, moments_merge_kernel, feature_scores_kernel --------

MOMENT_CASES = [
    (21, 131, "some", "contiguous"), (5, 1, "none", "contiguous"), (40, 1029, "some", "contiguous"),
    (6, 7, "empty", "contiguous"), (1, 9, "none", "contiguous"), (0, 4, "none", "contiguous"),
    (300, 67, "first_rows", "contiguous"), (33, 256, "first_empty", "contiguous"),
    (64, 8, "some", "aligned_stride"), (19, 40, "none", "strided"), (25, 264, "some", "misaligned"),
    (5, 0, "none", "contiguous"),
]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("n,d,mask_kind,layout", MOMENT_CASES,
                         ids=[f"{n}x{d}-{m}-{lay}" for n, d, m, lay in MOMENT_CASES])
def test_masked_moments(sim, n, d, mask_kind, layout, dtype, grid):  # noqa: F811
    g = torch.Generator().manual_seed(n + d)
    x = rows_input((torch.randn(n, d, generator=g) * 3 + 2).to(dtype), layout)
    mask = make_mask(n, mask_kind, g)
    count, mean, m2 = both_schedules(sim, lambda: sim.masked_moments(x, mask), grid)
    ref_count, ref_mean, ref_m2 = _moments_torch(x, mask)
    assert int(count) == int(ref_count)
    check("moments_partial_kernel+moments_merge_kernel mean", mean, ref_mean, dtype)
    check("moments_partial_kernel+moments_merge_kernel m2", m2, ref_m2, dtype, scale=max(1.0, n))


@pytest.mark.parametrize("d", [1, 127, 128, 129, 1029])
def test_feature_scores(sim, d):  # noqa: F811
    g = torch.Generator().manual_seed(d)
    mf, mr = (guarded_input(torch.randn(d, generator=g)) for _ in range(2))
    vf, vr = (guarded_input(torch.rand(d, generator=g)) for _ in range(2))
    got = both_schedules(sim, lambda: sim.feature_scores(mf, vf, mr, vr, 1e-6))
    check("feature_scores_kernel", got, _feature_scores_torch(mf, vf, mr, vr, 1e-6), torch.float32)


# ---- low_rank.cu: low_rank_tensor_core_kernel (bf16/fp16), low_rank_generic_kernel ---------

LOW_RANK_CASES = [  # (n, d, r, scale): the backend tests' shapes, then tile edges
    (21, 40, 8, 1.0), (5, 131, 1, 0.6), (18, 64, 64, 1.0), (1, 1, 1, -0.5), (37, 256, 256, 1.0),
    (6, 72, 19, 2.0), (0, 16, 4, 1.0), (31, 64, 32, 1.0), (33, 65, 33, 1.0), (65, 136, 128, 0.5),
    (70, 136, 129, 1.0), (17, 200, 3, 1.0),
]


def orthonormal(d, r, g):
    q, _ = torch.linalg.qr(torch.randn(d, max(r, 1), generator=g, dtype=torch.float64))
    return q[:, :r].float().contiguous()


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("path,layout", [("auto", "contiguous"), ("generic", "contiguous"),
                                         ("auto", "aligned_stride"), ("auto", "strided")])
@pytest.mark.parametrize("n,d,r,scale", LOW_RANK_CASES, ids=[f"{n}x{d}-r{r}" for n, d, r, _ in LOW_RANK_CASES])
def test_low_rank_project(sim, n, d, r, scale, path, layout, dtype):  # noqa: F811
    g = torch.Generator().manual_seed(n * 7 + d + r)
    x = rows_input(torch.randn(n, d, generator=g).to(dtype), layout)
    basis = orthonormal(d, r, g)
    tensor_core = path == "auto" and n > 0 and sim.tensor_core_ok(x, r)
    if path == "auto" and dtype != torch.float32 and d % 8 == 0 and n > 0 and layout != "strided":
        assert tensor_core, "the tensor-core path should take an aligned bf16/fp16 input"
    y, coeffs = both_schedules(sim, lambda: sim.low_rank_project(x, basis, scale, True, path))
    ref_y, ref_coeffs = _project_torch(x, basis, scale, True)
    name = "low_rank_tensor_core_kernel" if tensor_core else "low_rank_generic_kernel"
    # The tensor-core kernel rounds U and -s c to x's type (its design note): y's error is of
    # the order of y's own rounding, times the terms of the product.
    check(f"{name} y", y, ref_y, dtype, scale=2.0 * max(1.0, abs(scale)) if tensor_core else 1.0)
    check(f"{name} coeffs", coeffs, ref_coeffs, dtype, scale=2.0 if tensor_core else 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_rank_tensor_core_h100_grid(sim, dtype):  # noqa: F811
    """The tensor-core kernel with an H100's grid (132 persistent CTAs, fewer tiles than CTAs
    here) and with 3 SMs (each CTA sweeps several tiles, the fused previous-tile product)."""
    g = torch.Generator().manual_seed(5)
    x = guarded_input((torch.randn(200, 192, generator=g) * 50).to(dtype))
    basis = orthonormal(192, 24, g)
    ref_y, ref_c = _project_torch(x, basis, 1.0, True)
    for device in ("h100", "sm90_3sm"):
        y, c = both_schedules(sim, lambda: sim.low_rank_project(x, basis, 1.0, True, "tensor_core"), device)
        check("low_rank_tensor_core_kernel y", y, ref_y, dtype, scale=100.0)
        check("low_rank_tensor_core_kernel coeffs", c, ref_c, dtype, scale=100.0)


def test_low_rank_tensor_core_refused_before_ampere(sim):  # noqa: F811
    x = guarded_input(torch.randn(8, 64).to(torch.bfloat16))
    sim.configure(device="sm75")
    try:
        assert not sim.tensor_core_ok(x, 8)
    finally:
        sim.configure()
    assert sim.tensor_core_ok(x, 8)


# ---- hessian.cu: hessian_ema_kernel ---------------------------------------------------------

HESSIAN_SIZES = [7, 105, 1029, 2112, 0, 1, 8198, 4096]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("hess_kind", ["fp32", "same"])
@pytest.mark.parametrize("with_b", [True, False])
@pytest.mark.parametrize("numel", HESSIAN_SIZES)
@pytest.mark.parametrize("offset", [0, 1])
def test_hessian_ema(sim, numel, with_b, hess_kind, dtype, offset):  # noqa: F811
    g = torch.Generator().manual_seed(numel + offset)
    hess_dtype = torch.float32 if hess_kind == "fp32" else dtype
    hess0 = torch.rand(numel, generator=g).to(hess_dtype)
    a = guarded_input(torch.randn(numel, generator=g).to(dtype), offset)
    b = guarded_input(torch.randn(numel, generator=g).to(dtype), offset) if with_b else None

    def run():
        hess = guarded_input(hess0, offset).clone()
        sim.hessian_ema_(hess, a, b, 0.875)
        return hess

    got = both_schedules(sim, run)
    ref = hess0.clone()
    _hessian_ema_torch(ref, a, b, 0.875)
    check("hessian_ema_kernel", got, ref, dtype, exact=True)


# ---- disruption_mask.cu: disruption_mask_kernel ----------------------------------------------

# Sizes: below one pack, packs with and without a tail, one and several blocks, a grid-stride
# loop on 3 SMs (8198 elements / 256 threads / 2 packs in flight), empty.
MASK_SIZES = [1, 7, 8, 9, 105, 1029, 2112, 0, 8198, 50001]


def mask_inputs(numel: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    grad, retain = torch.randn(numel, generator=g), torch.randn(numel, generator=g)
    grad[torch.rand(numel, generator=g) < 0.05] = 0.0
    retain[torch.rand(numel, generator=g) < 0.05] = float("nan")
    return grad.to(dtype), retain.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("numel", MASK_SIZES)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("grid", GRIDS)
def test_disruption_mask(sim, numel, dtype, offset, grid):  # noqa: F811
    grad0, retain0 = mask_inputs(numel, dtype, numel + offset)
    grad, retain = guarded_input(grad0, offset), guarded_input(retain0, offset)
    ref, ref_kept = _disruption_mask_torch(grad0, retain0, 0.37)
    out, kept = both_schedules(sim, lambda: sim.disruption_mask(grad, retain, 0.37), grid)
    assert torch.equal(bits(out), bits(ref)) and int(kept) == int(ref_kept)

    def in_place():
        g = grad0.clone()
        return g, sim.disruption_mask_(g, retain, 0.37, offset)

    g, kept = both_schedules(sim, in_place, grid)
    assert torch.equal(bits(g), bits(ref)) and int(kept) == int(ref_kept)


def test_disruption_mask_in_place_on_itself(sim):  # noqa: F811
    grad0, _ = mask_inputs(1029, torch.bfloat16, 3)
    g = grad0.clone()
    kept = sim.disruption_mask_(g, None, -2.0)
    ref, ref_kept = _disruption_mask_torch(grad0, grad0, -2.0)
    assert torch.equal(bits(g), bits(ref)) and int(kept) == int(ref_kept) == int((grad0 != 0).sum())


# ---- neuron_scores.cu: row_scores_kernel, col_scores_kernel, col_merge_kernel ---------------

SCORE_SHAPES = [(37, 53), (12, 1029), (5, 1), (1, 7), (300, 16), (3, 4104), (1000, 24), (2, 2048)]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("h_kind", ["fp32", "same"])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("shape", SCORE_SHAPES, ids=[f"{r}x{c}" for r, c in SCORE_SHAPES])
def test_neuron_scores(sim, shape, dim, h_kind, dtype, grid):  # noqa: F811
    g = torch.Generator().manual_seed(shape[0] + shape[1])
    h_dtype = torch.float32 if h_kind == "fp32" else dtype
    layout = "strided" if shape[0] % 2 else "contiguous"
    w = rows_input(torch.randn(shape, generator=g).to(dtype), layout)
    hf = rows_input(torch.rand(shape, generator=g).to(h_dtype), layout)
    retain = (shape[0] + shape[1] + dim) % 2 == 0 or shape[0] == 3
    hr = rows_input((torch.rand(shape, generator=g) - 0.2).to(h_dtype), layout) if retain else None
    s_f, s_r = both_schedules(sim, lambda: sim.neuron_scores(w, hf, hr, dim), grid)
    ref_f, ref_r = _neuron_scores_torch(w, hf, hr, dim)
    kernel = "row_scores_kernel" if dim == 0 else "col_scores_kernel+col_merge_kernel"
    reduced = shape[1 - dim]
    check(kernel, s_f, ref_f, dtype, scale=max(1.0, reduced ** 0.5))
    if hr is not None:
        check(kernel, s_r, ref_r, dtype, scale=max(1.0, reduced ** 0.5))


# ---- class_means.cu: rank_kernel<true/false>, scan_kernel, scatter_kernel, segment_sums_kernel,
# merge_kernel -----------------------------------------------------------------------------

CLASS_CASES = [(100, 37, 7), (1000, 64, 3), (5, 9, 20), (0, 4, 3), (70, 1, 2), (33, 1029, 5), (2, 3, 1),
               (3000, 8, 5), (300, 5, 3000), (130, 0, 4), (4100, 16, 1)]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("n,d,classes", CLASS_CASES, ids=[f"{n}x{d}-c{c}" for n, d, c in CLASS_CASES])
def test_class_means(sim, n, d, classes, dtype, grid):  # noqa: F811
    g = torch.Generator().manual_seed(n + d)
    x = rows_input((torch.randn(n, d, generator=g) * 2 + 1).to(dtype), "strided" if n % 2 else "contiguous")
    y = torch.randint(0, (classes + 1) // 2, (n,), generator=g) ** 2 % classes
    y = guarded_input((y // 2 * 2).to(torch.int64))  # skewed, odd classes empty
    means, counts = both_schedules(sim, lambda: sim.class_means(x, y, classes), grid)
    ref_means, ref_counts = _class_means_torch(x, y, classes)
    assert torch.equal(counts, ref_counts)
    check("rank/scan/scatter/segment_sums/merge kernels", means, ref_means, dtype)


# ---- sophia.cu: sophia_kernel -----------------------------------------------------------------

HYPER = dict(lr=0.05, beta1=0.9, rho=0.04, weight_decay=0.1, eps=1e-15, bs=3.0)
SOPHIA_SHAPES = [(37, 29), (13,), (5, 3, 8), (1,), (70, 131), (0, 4), (2, 6), (40, 264), (64, 136),
                 (31, 12), (4100,)]


def sophia_state(shapes, dtype, state_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    new = lambda s, k=1.0: torch.randn(s, generator=g) * k  # noqa: E731
    params = [new(s).to(dtype) for s in shapes]
    grads = [guarded_input(new(s, 0.3).to(dtype)) for s in shapes]
    exp_avgs = [new(s, 0.1).to(state_dtype) for s in shapes]
    hessians = [guarded_input((torch.rand(s, generator=g) * 0.5).to(state_dtype)) for s in shapes]
    masks, dims = [], []
    for i, s in enumerate(shapes):
        kind = i % 3
        if kind == 0 or not s or s[0] == 0:
            masks.append(None)
            dims.append(0)
        else:
            dim = 0 if kind == 1 else -1
            size = s[0] if dim == 0 else s[-1]
            masks.append(guarded_input(torch.rand(size, generator=g) > 0.4))
            dims.append(dim)
    return params, grads, exp_avgs, hessians, masks, dims


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("state", ["fp32", "same"])
def test_masked_sophia_step(sim, dtype, state):  # noqa: F811
    state_dtype = torch.float32 if state == "fp32" else dtype
    p0, grads, m0, hessians, masks, dims = sophia_state(SOPHIA_SHAPES, dtype, state_dtype, seed=1)

    def run():
        params, exp_avgs = [p.clone() for p in p0], [m.clone() for m in m0]
        sim.masked_sophia_step_(params, grads, exp_avgs, hessians, masks, dims, **HYPER)
        return params + exp_avgs

    got = both_schedules(sim, run)
    params, exp_avgs = [p.clone() for p in p0], [m.clone() for m in m0]
    _sophia_torch(params, grads, exp_avgs, hessians, masks, dims, **HYPER)
    for a, b in zip(got, params + exp_avgs):
        check("sophia_kernel", a, b, dtype, exact=True)


def test_masked_sophia_step_many_tensors(sim):  # noqa: F811
    """470 tensors: more than one kernel-parameter table (448 slots), mixed dtypes."""
    shapes = [(1 + i % 7, 1 + (i * 5) % 11) for i in range(470)]
    p0, grads, m0, hessians, masks, dims = sophia_state(shapes, torch.float32, torch.float32, seed=3)
    params, exp_avgs = [p.clone() for p in p0], [m.clone() for m in m0]
    sim.masked_sophia_step_(params, grads, exp_avgs, hessians, masks, dims, **HYPER)
    ref_p, ref_m = [p.clone() for p in p0], [m.clone() for m in m0]
    _sophia_torch(ref_p, grads, ref_m, hessians, masks, dims, **HYPER)
    for a, b in zip(params + exp_avgs, ref_p + ref_m):
        check("sophia_kernel", a, b, torch.float32)


# ---- coverage ---------------------------------------------------------------------------------

def kernels_in_sources() -> set[str]:
    """Every __global__ function of csrc/cuda, by name."""
    from pathlib import Path
    import re

    names = set()
    for path in (Path(__file__).resolve().parents[1] / "csrc" / "cuda").glob("*.cu"):
        text = re.sub(r"//[^\n]*", "", path.read_text())
        names |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(", text))
    return names


def test_every_kernel_runs(sim):  # noqa: F811
    """One small call per launcher path, then every __global__ function of csrc/cuda must be in
    the harness's launch log (a new kernel without a test here fails this)."""
    g = torch.Generator().manual_seed(9)
    x = guarded_input(torch.randn(40, 64, generator=g).to(torch.bfloat16))
    vec = guarded_input(torch.rand(64, generator=g))
    mask = guarded_input(torch.rand(40, generator=g) > 0.5)
    sim.misdirection_fwd_bwd(x, vec, vec, None, mask, 0.01, True)
    sim.masked_edit(x, vec, vec, 0.5, mask)
    sim.masked_moments(x, mask)
    sim.feature_scores(vec, vec, vec, vec, 1e-6)
    basis = orthonormal(64, 8, g)
    sim.low_rank_project(x, basis, 1.0, True, "tensor_core")
    sim.low_rank_project(x, basis, 1.0, True, "generic")
    hess = x.float().reshape(-1).clone()
    sim.hessian_ema_(hess, x.reshape(-1), None, 0.9)
    sim.disruption_mask(x.reshape(-1), x.reshape(-1), 0.5)
    w = guarded_input(torch.randn(300, 16, generator=g))
    sim.neuron_scores(w, w, w, 0)
    sim.neuron_scores(w, w, w, 1)
    for classes in (5, 3000):
        sim.class_means(x, guarded_input(torch.arange(40) % classes), classes)
    p0, grads, m0, hessians, masks, dims = sophia_state([(4, 8)], torch.float32, torch.float32, 0)
    sim.masked_sophia_step_(p0, grads, m0, hessians, masks, dims, **HYPER)
    launched = {name.split("<")[0].split("::")[-1] for name in sim.launch_log()}
    missing = kernels_in_sources() - launched
    assert not missing, f"kernels of csrc/cuda the harness never ran: {sorted(missing)}"
    assert len(kernels_in_sources()) >= 17


# ---- range and precision (tests/test_numerics.py's claims, on the CUDA kernels) ---------------

def test_misdirection_scales_before_summing(sim):  # noqa: F811
    """Every term of h = 1e19 is 1e38: the mean fits in fp32, the sum would not."""
    h = guarded_input(torch.full((8, 64), 1e19, dtype=torch.bfloat16))
    control = guarded_input(torch.zeros(64))
    loss, _ = sim.misdirection_fwd_bwd(h, control, None, None, None, 1.0 / (8 * 64), False)
    expected = float(h[0, 0].double()) ** 2
    assert torch.isfinite(loss) and float(loss) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("masked", [False, True], ids=["all-rows", "masked"])
@pytest.mark.parametrize("grid", GRIDS)
def test_moments_keep_the_variance_at_mean_over_sigma_1e6(sim, masked, grid):  # noqa: F811
    g = torch.Generator().manual_seed(11)
    x = (1e6 + torch.randn(4099, 37, generator=g, dtype=torch.float64)).float()
    keep = torch.rand(4099, generator=g) < 0.7 if masked else torch.ones(4099, dtype=torch.bool)
    keep[:5] = not masked
    sim.configure(device=grid)
    try:
        count, mean, m2 = sim.masked_moments(guarded_input(x), guarded_input(keep) if masked else None)
    finally:
        sim.configure()
    rows = x[keep].double()
    assert int(count) == rows.shape[0]
    torch.testing.assert_close(mean.double(), rows.mean(0), rtol=1e-7, atol=0)
    torch.testing.assert_close(m2.double(), ((rows - rows.mean(0)) ** 2).sum(0), rtol=1e-4, atol=0)


NEAR_LIMIT = {
    "all-3e38": torch.full((67, 9), 3e38),
    "mixture-2e38": torch.tensor([[2e38], [-2e38], [2e38], [2e38]]).repeat(17, 9),
    "mixed-sizes": torch.cat([torch.full((40, 9), 3.3e38), torch.full((23, 9), -1e30), torch.full((5, 9), 1.5)]),
}


@pytest.mark.parametrize("case", list(NEAR_LIMIT))
@pytest.mark.parametrize("grid", GRIDS)
def test_moments_near_fp32_limit_finite_mean_never_nan(sim, case, grid):  # noqa: F811
    x = NEAR_LIMIT[case].float()
    sim.configure(device=grid)
    try:
        _, mean, m2 = sim.masked_moments(guarded_input(x), None)
    finally:
        sim.configure()
    rows = x.double()
    ref_mean, ref_m2 = rows.mean(0), ((rows - rows.mean(0)) ** 2).sum(0)
    assert torch.isfinite(mean).all()
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=0)
    assert not torch.isnan(m2).any()
    fits = ref_m2 <= torch.finfo(torch.float32).max
    torch.testing.assert_close(m2.double()[fits], ref_m2[fits], rtol=1e-5, atol=0)
    assert torch.isposinf(m2[~fits]).all()


@pytest.mark.parametrize("grid", GRIDS)
def test_class_means_near_fp32_limit_are_finite(sim, grid):  # noqa: F811
    g = torch.Generator().manual_seed(5)
    n, d, classes = 203, 19, 5
    labels = torch.randint(0, classes - 1, (n,), generator=g)  # the last class stays empty
    x = torch.where(torch.rand(n, d, generator=g) < 0.8, 3e38, -2e38).float()
    x[labels == 1] = 3.2e38
    sim.configure(device=grid)
    try:
        means, _ = sim.class_means(guarded_input(x), guarded_input(labels), classes)
    finally:
        sim.configure()
    expected = torch.zeros(classes, d, dtype=torch.float64)
    for c in range(classes - 1):
        expected[c] = x[labels == c].double().mean(0)
    assert torch.isfinite(means).all()
    torch.testing.assert_close(means.double(), expected, rtol=1e-5, atol=0)


# ---- random interleavings ----------------------------------------------------------------------

def representative_calls(sim):  # noqa: F811
    """One launch sequence per launcher on shapes with several blocks and partial tiles."""
    g = torch.Generator().manual_seed(13)
    x = guarded_input(torch.randn(77, 136, generator=g).to(torch.float16))
    xf = guarded_input(torch.randn(77, 131, generator=g))
    vec = guarded_input(torch.rand(136, generator=g))
    mask = make_mask(77, "first_empty", g)
    basis = orthonormal(136, 40, g)
    labels = guarded_input(torch.randint(0, 9, (1500,), generator=g))
    feats = guarded_input(torch.randn(1500, 24, generator=g).to(torch.bfloat16))
    p0, grads, m0, hessians, masks, dims = sophia_state(SOPHIA_SHAPES, torch.bfloat16, torch.float32, 2)
    hess0 = torch.rand(2112, generator=g)

    def run():
        out = [*sim.misdirection_fwd_bwd(x, vec, vec, x, mask, 1e-3, True), sim.masked_edit(x, vec, vec, 0.3, mask),
               *sim.masked_moments(xf, None), *sim.low_rank_project(x, basis, 1.0, True, "tensor_core"),
               *sim.low_rank_project(xf, basis[:131].contiguous(), 1.0, True, "generic"),
               *sim.neuron_scores(xf, xf, xf, 0), *sim.neuron_scores(xf, xf, None, 1),
               *sim.class_means(feats, labels, 9)]
        params, exp_avgs = [p.clone() for p in p0], [m.clone() for m in m0]
        sim.masked_sophia_step_(params, grads, exp_avgs, hessians, masks, dims, **HYPER)
        hess = hess0.clone()
        sim.hessian_ema_(hess, xf.reshape(-1)[:2112], None, 0.5)
        masked = list(sim.disruption_mask(xf.reshape(-1), x.reshape(-1)[:77 * 131].float(), 0.25))
        return out + params + exp_avgs + [hess] + masked

    return run


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_schedules_agree_bitwise(sim, seed):  # noqa: F811
    """Seeded random interleavings of each block's threads give the deterministic schedule's
    results bit for bit."""
    from cuda_sim.fixtures import bits

    run = representative_calls(sim)
    expected = run()
    sim.configure("random", seed=seed)
    try:
        got = run()
    finally:
        sim.configure()
    for i, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(bits(a), bits(b)), f"result {i} depends on the interleaving"
