"""disruption_mask / disruption_mask_ (MUDMAN): every backend against the reference bit for bit,
the reference against the math (exact in fp32/fp64, within one rounding in bf16/fp16), odd
sizes, strided views, all-agree / all-disagree, NaN and inf, the in-place variant, the count and
errors (opcheck: tests/test_opcheck.py; torch.compile: tests/test_compile.py)."""

import pytest
import torch

from unlearn_kernels.errors import UserError
from unlearn_kernels.ops import _backend, disruption_mask, disruption_mask_
from unlearn_kernels.ops.disruption_mask import _disruption_mask_torch

from conftest import backend_cases

SHAPES = [(1,), (7,), (3, 5, 7), (1029,), (64, 33), (0,), (), (2, 4099)]
CPU = torch.device("cpu")
CPU_FP64 = pytest.param("cpu", CPU, torch.float64, id="cpu-float64", marks=pytest.mark.skipif(
    not _backend.available("cpu", CPU, torch.float64), reason="C++ extension not built"))
CASES = backend_cases() + [CPU_FP64]
FP32_CASES = [c for c in backend_cases() if "float32" in c.id]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def by_definition(g: torch.Tensor, r: torch.Tensor, scale: float) -> tuple[torch.Tensor, int]:
    """``s·g`` where ``g·r > 0`` in exact arithmetic (the fp64 product of two fp32 values is
    exact; fp64 inputs compare signs), rounded once from fp64 to g's dtype; and the count."""
    gd, rd = g.double(), r.double()
    agree = (gd * rd > 0) if g.dtype != torch.float64 else (torch.sign(gd) * torch.sign(rd) > 0)
    s = float(torch.tensor(scale, dtype=torch.float64 if g.dtype == torch.float64 else torch.float32))
    return torch.where(agree, gd * s, 0.0).to(g.dtype), int(agree.sum())


def assert_within_one_rounding(got: torch.Tensor, expected: torch.Tensor):
    """Exact in fp32/fp64; one unit in the last place of bf16/fp16 (the kernels round the fp32
    product once more, to the storage type)."""
    if got.dtype in (torch.float32, torch.float64):
        assert torch.equal(bits(got), bits(expected))
        return
    info = torch.finfo(got.dtype)
    torch.testing.assert_close(got.double(), expected.double(), rtol=info.eps, atol=info.smallest_normal * info.eps)


def inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(shape, generator=g)
    retain = torch.randn(shape, generator=g)
    grad[torch.rand(shape, generator=g) < 0.05] = 0.0   # some zeros: they agree with nothing
    return grad.to(device=device, dtype=dtype), retain.to(device=device, dtype=dtype)


def test_reference_matches_hand_computed():
    g = torch.tensor([1.0, -2.0, 3.0, -4.0, 0.0, 5.0, -0.0, 6.0])
    r = torch.tensor([0.5, -1.0, -1.0, 2.0, 2.0, 0.0, -3.0, 7.0])
    out, kept = _disruption_mask_torch(g, r, 0.5)
    assert out.tolist() == [0.5, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0]
    assert kept.dtype == torch.int64 and kept.item() == 3
    assert not torch.signbit(out[2:7]).any()   # masked entries are +0.0


@pytest.mark.parametrize("backend,device,dtype", CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backend_matches_reference(backend, device, dtype, shape):
    grad, retain = inputs(shape, dtype, device, seed=len(shape))
    before = (grad.clone(), retain.clone())
    out, kept = disruption_mask(grad, retain, 0.37, return_kept=True, backend=backend)
    ref, ref_kept = disruption_mask(grad, retain, 0.37, return_kept=True, backend="torch")
    assert out.shape == grad.shape and out.dtype == dtype and out.device == grad.device and out.is_contiguous()
    assert torch.equal(bits(out), bits(ref)), "every backend does the reference's operations"
    assert kept.dtype == torch.int64 and kept.shape == () and kept.item() == ref_kept.item()
    expected, count = by_definition(grad.cpu(), retain.cpu(), 0.37)
    assert_within_one_rounding(ref.cpu(), expected)
    assert ref_kept.item() == count
    assert torch.equal(grad, before[0]) and torch.equal(retain, before[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_large_odd_size(dtype):
    if not _backend.available("cpu", CPU, dtype):
        pytest.skip("C++ extension not built")
    grad, retain = inputs((1_000_003,), dtype, CPU, seed=3)
    out, kept = disruption_mask(grad, retain, 1e-3, return_kept=True, backend="cpu")
    ref, ref_kept = _disruption_mask_torch(grad, retain, 1e-3)
    assert torch.equal(bits(out), bits(ref)) and kept.item() == ref_kept.item()


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES + [pytest.param("torch", CPU, torch.float32, id="torch")])
def test_strided_and_transposed_views(backend, device, dtype):
    g = torch.Generator().manual_seed(5)
    big = torch.randn(6, 10, generator=g).to(device)
    grad = big[:, ::2].t()                                     # [5, 6], strided both ways
    retain = torch.randn(6, 5, generator=g).to(device).t()
    expected, count = by_definition(grad.cpu(), retain.cpu(), 2.0)
    out, kept = disruption_mask(grad, retain, 2.0, return_kept=True, backend=backend)
    assert out.is_contiguous() and out.shape == (5, 6)
    assert torch.equal(out.cpu(), expected) and kept.item() == count
    before = big.clone()
    same, kept_ = disruption_mask_(grad, retain, 2.0, return_kept=True, backend=backend)
    assert same is grad and kept_.item() == count
    assert torch.equal(big[:, ::2].t().cpu(), expected)
    assert torch.equal(big[:, 1::2], before[:, 1::2])          # the elements between are untouched


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_all_agree_and_all_disagree(backend, device, dtype):
    grad, _ = inputs((3, 257), dtype, device, seed=7)
    grad[grad == 0] = 1.0
    out, kept = disruption_mask(grad, grad * 3, 0.5, return_kept=True, backend=backend)
    assert torch.equal(bits(out), bits(_disruption_mask_torch(grad, grad, 0.5)[0]))
    assert_within_one_rounding(out.cpu(), (grad.cpu().double() * 0.5).to(dtype))
    assert kept.item() == grad.numel()
    out, kept = disruption_mask(grad, -grad, 0.5, return_kept=True, backend=backend)
    assert torch.equal(bits(out), bits(torch.zeros_like(out))) and kept.item() == 0


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_nan_and_inf(backend, device, dtype):
    """NaN agrees with nothing (NaN·r > 0 is false) and gives +0; ±inf agrees with a nonzero
    value of its sign and stays ±inf (scale > 0); products that underflow still agree."""
    nan, inf = float("nan"), float("inf")
    g = torch.tensor([nan, 1.0, nan, inf, -inf, inf, -inf, 1e-30, 2.0], dtype=dtype, device=device)
    r = torch.tensor([1.0, nan, nan, 2.0, -1.0, -1.0, 0.0, 1e-30, inf], dtype=dtype, device=device)
    if dtype == torch.float16:   # 1e-30 is 0 in fp16: the underflow case is bf16/fp32/fp64's
        g[7], r[7] = 6e-8, 6e-8
    out, kept = disruption_mask(g, r, 0.5, return_kept=True, backend=backend)
    tiny = (g[7].double() * 0.5).to(dtype).item()
    expected = torch.tensor([0.0, 0.0, 0.0, inf, -inf, 0.0, 0.0, tiny, 1.0], dtype=dtype)
    assert torch.equal(bits(out.cpu()), bits(expected))
    assert kept.item() == 4


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_in_place_writes_only_grad(backend, device, dtype):
    grad, retain = inputs((4, 99), dtype, device, seed=11)
    expected, ref_kept = _disruption_mask_torch(grad, retain, -1.5)
    retain_before, ptr = retain.clone(), grad.data_ptr()
    result = disruption_mask_(grad, retain, -1.5, backend=backend)
    assert result is grad and grad.data_ptr() == ptr
    assert torch.equal(bits(grad), bits(expected))
    assert torch.equal(bits(retain), bits(retain_before))
    again, kept = disruption_mask_(retain, retain, 1.0, return_kept=True, backend=backend)  # r is g
    assert again is retain and kept.item() == int((retain_before != 0).sum())
    assert torch.equal(bits(retain), bits(_disruption_mask_torch(retain_before, retain_before, 1.0)[0]))
    assert ref_kept.item() == by_definition(*inputs((4, 99), dtype, device, seed=11), -1.5)[1]


def test_results_never_require_grad():
    g = torch.randn(5, requires_grad=True)
    r = torch.randn(5, requires_grad=True)
    assert not disruption_mask(g, r).requires_grad
    leaf = torch.randn(5, requires_grad=True)
    disruption_mask_(leaf, r)           # optimizer-side: updated without autograd
    assert leaf.requires_grad and leaf.grad_fn is None


def test_scale_is_rounded_to_fp32_once():
    g, r = torch.randn(1000), torch.ones(1000)
    g = g.abs() + 0.1
    for backend in [b for b in ("cpu", "torch") if _backend.available(b, CPU, torch.float32)]:
        out = disruption_mask(g, r, 0.1, backend=backend)
        assert torch.equal(out, g * torch.tensor(0.1, dtype=torch.float32)), backend


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(retain_grad=torch.ones(4, 2)), ValueError, r"retain_grad must have the shape of grad \(2, 4\), got \(4, 2\)"),
    (dict(retain_grad=torch.ones(2, 4, dtype=torch.float16)), TypeError,
     "retain_grad must have the dtype of grad"),
    (dict(retain_grad=torch.ones(2, 4, device="meta")), ValueError, "retain_grad is on meta but grad is on cpu"),
    (dict(grad=torch.ones(2, 4, dtype=torch.int32)), TypeError, "grad must be float32"),
    (dict(retain_grad=[1.0]), TypeError, "retain_grad must be a torch.Tensor"),
    (dict(grad=None), TypeError, "grad must be a torch.Tensor"),
    (dict(scale=float("inf")), ValueError, "scale must be finite"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(scale="x"), TypeError, "scale must be a real number"),
    (dict(backend="gpu"), UserError, "backend must be one of"),
])
@pytest.mark.parametrize("fn", [disruption_mask, disruption_mask_], ids=["out", "in_place"])
def test_errors_named(fn, kwargs, error, words):
    args = dict(grad=torch.ones(2, 4), retain_grad=torch.ones(2, 4), scale=1.0)
    args.update(kwargs)
    with pytest.raises(error, match=words) as info:
        fn(**args)
    assert "\n" not in str(info.value)


def test_in_place_refuses_overlap_and_expanded_grad():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="grad and retain_grad overlap in memory"):
        disruption_mask_(x[:8], x[2:])
    with pytest.raises(ValueError, match="grad must not be an expanded"):
        disruption_mask_(torch.ones(4).expand(3, 4), torch.ones(3, 4))
