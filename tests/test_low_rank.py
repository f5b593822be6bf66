"""low_rank_project, projection_hook, masked_gram and the basis helpers: every backend against
the reference, the reference against the math, gradients, hooks, bases and errors."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from unlearn_kernels.ops.low_rank import (
    _project_torch, check_orthonormal, low_rank_project, masked_gram, projection_hook)
from unlearn_kernels.ops.low_rank_basis import forget_basis, grow_basis, retain_subspace

from unlearn_kernels.ops import _backend

from conftest import FP32_BACKENDS, assert_close, backend_cases, device_of


def orthonormal(d, r, seed=0, dtype=torch.float32, device="cpu"):
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.to(device=device, dtype=dtype)


def activations(shape, dtype, device, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


def needs_compiled():
    pytest.importorskip("unlearn_kernels._C")


# --- the reference against the math -------------------------------------------------------

def test_reference_hand_computed():
    x = torch.tensor([[3.0, -1.0, 2.0], [0.5, 4.0, -2.0]], dtype=torch.float64)
    u = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)  # e0: zero (or damp) feature 0
    assert torch.equal(low_rank_project(x, u, backend="torch"), torch.tensor([[0.0, -1.0, 2.0], [0.0, 4.0, -2.0]],
                                                                            dtype=torch.float64))
    assert torch.equal(low_rank_project(x, u, 0.25, backend="torch")[:, 0], torch.tensor([2.25, 0.375],
                                                                                       dtype=torch.float64))
    v = torch.tensor([[0.6], [0.8], [0.0]], dtype=torch.float64)
    row = x[0] - (x[0] @ v[:, 0]) * v[:, 0]  # 3·0.6 − 0.8 = 1.0
    assert torch.allclose(low_rank_project(x, v, backend="torch")[0], row)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("r", [1, 8, 64, 256])
def test_idempotent_and_orthogonal(backend, r):
    if backend == "cpu":
        needs_compiled()
    d = 256 if r == 256 else 300
    u = orthonormal(d, r, seed=r, dtype=torch.float64)
    x = activations((3, 11, d), torch.float64, "cpu")
    y = low_rank_project(x, u, backend=backend)
    assert torch.allclose(low_rank_project(y, u, backend=backend), y, atol=1e-12)
    assert (y @ u).abs().max() < 1e-12
    assert torch.allclose(x - y, (x @ u) @ u.T, atol=1e-12)  # removed part lies in span(U)
    if r == d:
        assert y.abs().max() < 1e-12


# --- every backend against the reference ---------------------------------------------------

@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("shape,r,scale", [((3, 7, 40), 8, 1.0), ((5, 131), 1, 0.6), ((2, 9, 64), 64, 1.0),
                                           ((1, 1), 1, -0.5), ((37, 256), 256, 1.0), ((3, 2, 72), 19, 2.0)])
def test_backend_matches_reference(backend, device, dtype, shape, r, scale):
    if backend == "triton" and device.type == "cpu" and r > 64:
        shape = (4, shape[-1])  # the interpreter is slow; the wide case is covered by the rest
    u = orthonormal(shape[-1], r, seed=r, device=device)
    x = activations(shape, dtype, device).requires_grad_(True)
    basis = u.clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    basis_ref = u.clone().requires_grad_(True)
    g = activations(shape, dtype, device, seed=1)
    y = low_rank_project(x, basis, scale, backend=backend)
    y_ref = low_rank_project(x_ref, basis_ref, scale, backend="torch")
    (y.float() * g.float()).sum().backward()
    (y_ref.float() * g.float()).sum().backward()
    assert y.dtype == dtype and y.shape == x.shape and x.grad.dtype == dtype
    assert_close(y, y_ref, dtype)
    assert_close(x.grad, x_ref.grad, dtype)
    assert_close(basis.grad, basis_ref.grad, dtype, scale=max(1.0, shape[0]))


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("view", ["batched", "misaligned_rows", "aligned_rows"])
def test_strided_views_and_basis_dtype(backend, device, dtype, view):
    if view == "batched":  # copied by the [n, d] reshape
        x = activations((6, 5, 300), dtype, device)[:, 1:, 17:97]
    elif view == "misaligned_rows":  # rows 300 apart, starting 17 elements in: the CUDA generic kernel
        x = activations((6, 300), dtype, device)[:, 17:97]
    else:  # rows 320 apart, 16-byte aligned: the CUDA tensor-core kernel with a row stride
        x = activations((6, 320), dtype, device)[:, 16:96]
    assert not x.is_contiguous()
    u = orthonormal(80, 16, device=device)
    y_ref = low_rank_project(x, u, backend="torch")
    assert_close(low_rank_project(x, u, backend=backend), y_ref, dtype)
    assert_close(low_rank_project(x, u.to(dtype), backend=backend),  # basis in x's dtype
                 low_rank_project(x, u.to(dtype), backend="torch"), dtype)


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
def test_empty_input(backend, device, dtype):
    x = torch.empty(0, 3, 32, device=device, dtype=dtype)
    assert low_rank_project(x, orthonormal(32, 4, device=device), backend=backend).shape == x.shape
    assert masked_gram(x, backend=backend).abs().max() == 0


def test_auto_backend_on_cpu_uses_compiled_kernel():
    needs_compiled()
    x, u = activations((4, 24), torch.float32, "cpu"), orthonormal(24, 3)
    assert torch.equal(low_rank_project(x, u), low_rank_project(x, u, backend="cpu"))


def fp16_cases():
    cases = [c for c in backend_cases() if c.values[2] == torch.float16]
    if not torch.cuda.is_available():  # the interpreter runs fp16 too
        cases.append(pytest.param("triton", torch.device("cpu"), torch.float16, id="triton-float16-interpreted",
                                  marks=pytest.mark.skipif(not _backend.available("triton", torch.device("cpu"),
                                                                                  torch.float16),
                                                           reason="Triton interpreter unavailable")))
    return cases


@pytest.mark.parametrize("backend,device,dtype", fp16_cases())
def test_fp16_coefficients_beyond_fp16_range(backend, device, dtype):
    x = (activations((20, 256), torch.float32, "cpu") * 8000).clamp(-60000, 60000)
    u, _ = torch.linalg.qr(x[:3].T.double())  # x's own directions: |x U| reaches ~1.4e5 > 65504
    x, u = x.to(device=device, dtype=dtype), u.to(device=device, dtype=torch.float32)
    y = low_rank_project(x, u, backend=backend)
    ref = low_rank_project(x, u, backend="torch")
    assert torch.isfinite(y).all()
    assert (y.float() - ref.float()).abs().max() < 2e-3 * x.float().abs().max()


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), d=st.integers(1, 90), rank_share=st.floats(0.0, 1.0),
       scale=st.floats(-2.0, 2.0), seed=st.integers(0, 10_000))
def test_cpu_kernel_property(rows, d, rank_share, scale, seed):
    needs_compiled()
    r = max(1, min(d, round(rank_share * d)))
    x = activations((rows, d), torch.float32, "cpu", seed)
    u = orthonormal(d, r, seed)
    y, c = torch.ops.unlearn_kernels.low_rank_project(x, u, scale, True)
    y_ref, c_ref = _project_torch(x, u, scale, True)
    assert_close(y, y_ref, torch.float32, scale=10)
    assert_close(c, c_ref, torch.float32, scale=10)
    if scale == 1.0:
        assert (y @ u).abs().max() < 1e-4


# --- gradients ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("r", [1, 3])
def test_gradcheck_fp64(backend, r):
    if backend == "cpu":
        needs_compiled()
    x = activations((2, 3, 6), torch.float64, "cpu").requires_grad_(True)
    u = orthonormal(6, r, dtype=torch.float64).requires_grad_(True)

    def fn(a, b):  # gradcheck perturbs U off orthonormality: the gradient formula holds for any U
        return low_rank_project(a, b, 0.7, assume_orthonormal=True, backend=backend) * 1.5

    assert torch.autograd.gradcheck(fn, (x, u))


def test_gradient_formulas():
    x = activations((7, 10), torch.float64, "cpu").requires_grad_(True)
    u = orthonormal(10, 3, dtype=torch.float64).requires_grad_(True)
    g = activations((7, 10), torch.float64, "cpu", seed=3)
    low_rank_project(x, u, 0.4, backend="torch").backward(g)
    assert torch.allclose(x.grad, g - 0.4 * (g @ u) @ u.T)
    assert torch.allclose(u.grad, -0.4 * (x.T @ (g @ u) + g.T @ (x @ u)))


def test_double_backward_in_fp64_is_exact():
    """fp64 gradgradcheck over x and U (tests/test_double_backward.py compares HVPs in fp32)."""
    needs_compiled()
    x = activations((3, 8), torch.float64, "cpu").requires_grad_(True)
    u = orthonormal(8, 2, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda x, u: low_rank_project(x, u, 0.5, assume_orthonormal=True,
                                                                      backend="cpu"), (x, u))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_torch_compile_traces_forward_and_backward(backend):
    needs_compiled()
    x = activations((3, 5, 16), torch.float32, "cpu")
    u = orthonormal(16, 4)

    def step(a, b):
        return (low_rank_project(a, b, 0.5, assume_orthonormal=True, backend=backend) ** 2).sum()

    compiled = torch.compile(step, backend="aot_eager")
    grads = []
    for fn in (compiled, step):
        a, b = x.clone().requires_grad_(True), u.clone().requires_grad_(True)
        fn(a, b).backward()
        grads.append((a.grad, b.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5)


def test_opcheck_compiled_ops():
    needs_compiled()
    x = activations((9, 13), torch.float32, "cpu")
    for need in (True, False):
        torch.library.opcheck(torch.ops.unlearn_kernels.low_rank_project, (x, orthonormal(13, 4), 0.5, need))
    torch.library.opcheck(torch.ops.unlearn_kernels.low_rank_project,
                          (x.to(torch.float64), orthonormal(13, 2, dtype=torch.float64), 1.0, True))
    torch.library.opcheck(torch.ops.unlearn_kernels.masked_gram, (x, torch.rand(9) > 0.5))
    torch.library.opcheck(torch.ops.unlearn_kernels.masked_gram, (x, None))


# --- the forward hook ------------------------------------------------------------------------

class Block(torch.nn.Module):
    """A tiny 'transformer layer': returns (hidden_states, aux) like an HF decoder layer."""

    def __init__(self, d, tuple_output=True):
        super().__init__()
        self.linear = torch.nn.Linear(d, d)
        self.tuple_output = tuple_output

    def forward(self, h):
        out = self.linear(h)
        return (out, h.sum()) if self.tuple_output else out


@pytest.mark.parametrize("tuple_output", [True, False])
def test_projection_hook(tuple_output):
    torch.manual_seed(0)
    block = Block(12, tuple_output)
    u = orthonormal(12, 3).requires_grad_(True)
    h = torch.randn(2, 5, 12)
    plain = block(h)
    handle = block.register_forward_hook(projection_hook(u, backend="torch"))
    hooked = block(h)
    first, plain_first = (hooked[0], plain[0]) if tuple_output else (hooked, plain)
    assert torch.allclose(first, plain_first - (plain_first @ u) @ u.T, atol=1e-6)
    assert (first @ u).abs().max() < 1e-5
    if tuple_output:
        assert hooked[1] is not None and torch.equal(hooked[1], plain[1])
    first.pow(2).sum().backward()  # MRP trains U through the hook
    assert u.grad is not None and block.linear.weight.grad is not None
    handle.remove()
    assert torch.equal(block(h)[0] if tuple_output else block(h), plain_first)


def test_projection_hook_moves_basis_and_checks_once():
    u64 = orthonormal(8, 2, dtype=torch.float64)
    hook = projection_hook(u64)  # fp64 basis, fp32 activations: converted on the fly
    out = hook(None, (), torch.randn(3, 8))
    assert out.dtype == torch.float32 and (out @ u64.float()).abs().max() < 1e-5
    with pytest.raises(ValueError, match="orthonormal"):
        projection_hook(torch.ones(8, 2))
    with pytest.raises(TypeError, match="expects a tensor or a tuple"):
        hook(torch.nn.Identity(), (), {"h": torch.randn(3, 8)})


# --- masked_gram -----------------------------------------------------------------------------

def test_gram_reference_matches_loops():
    x = activations((2, 4, 3), torch.float64, "cpu")
    mask = torch.tensor([[True, False, True, True], [False, False, True, False]])
    expected = torch.zeros(3, 3, dtype=torch.float64)
    for b in range(2):
        for t in range(4):
            if mask[b, t]:
                expected += torch.outer(x[b, t], x[b, t])
    assert torch.allclose(masked_gram(x, mask, backend="torch"), expected)


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("shape,masked", [((3, 7, 40), "some"), ((70, 33), "none"), ((4, 9, 5), "first_empty"),
                                          ((2, 3, 8), "all_masked")])
def test_gram_backend_matches_reference(backend, device, dtype, shape, masked):
    x = activations(shape, dtype, device)
    mask = None
    if masked != "none":
        mask = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(2)) > 0.3
        if masked == "first_empty":
            mask[0] = False
        if masked == "all_masked":
            mask[:] = False
        mask = mask.to(device)
    got = masked_gram(x, mask, backend=backend)
    ref = masked_gram(x, mask, backend="torch")
    assert got.dtype == torch.float32 and got.shape == (shape[-1], shape[-1])
    assert_close(got, ref, torch.float32, scale=10)
    if masked == "all_masked":
        assert got.abs().max() == 0


def test_gram_accepts_01_masks_and_strided_views():
    needs_compiled()
    x = activations((5, 40), torch.float32, "cpu")[:, 3:30]
    mask = torch.tensor([1, 0, 1, 1, 0])
    assert_close(masked_gram(x, mask, backend="cpu"), masked_gram(x, mask.bool(), backend="torch"),
                 torch.float32, scale=10)


# --- bases ------------------------------------------------------------------------------------

def planted_grams(d=24, seed=0):
    """Forget activations along e0, e1 (plus noise); retain activations dominated by e1, e2."""
    g = torch.Generator().manual_seed(seed)
    forget = torch.randn(400, d, generator=g) * 0.1
    forget[:, 0] += 3 * torch.randn(400, generator=g)
    forget[:, 1] += 5 * torch.randn(400, generator=g)
    retain = torch.randn(400, d, generator=g) * 0.1
    retain[:, 1] += 4 * torch.randn(400, generator=g)
    retain[:, 2] += 4 * torch.randn(400, generator=g)
    return masked_gram(forget, backend="torch"), masked_gram(retain, backend="torch")


def test_forget_basis_avoids_retain_subspace():
    g_f, g_r = planted_grams()
    v = retain_subspace(g_r, 0.9)
    assert v.shape[1] == 2  # e1 and e2 hold > 90 % of the retain energy
    u = forget_basis(g_f, g_r, rank=3, retain_energy=0.9)
    assert u.shape == (24, 3) and u.dtype == torch.float32
    check_orthonormal(u)
    assert (u.double().T @ v).abs().max() < 1e-6
    assert int(u[:, 0].abs().argmax()) == 0  # e1 is shared with retain, so e0 comes first
    without_retain = forget_basis(g_f, None, rank=2)
    assert sorted(without_retain.abs().argmax(0).tolist()) == [0, 1]


def test_forget_basis_when_projected_gram_is_rank_deficient():
    g_f = torch.diag(torch.tensor([5.0, 0, 0, 0]))  # forget energy only along e0 ...
    g_r = torch.diag(torch.tensor([9.0, 0, 0, 0]))  # ... which retain owns entirely
    u = forget_basis(g_f, g_r, rank=2, retain_energy=0.5)
    assert u[0].abs().max() < 1e-6  # nothing of e0, even though P G_f P = 0
    check_orthonormal(u)


def test_grow_basis_keeps_old_columns_exactly():
    g_f, g_r = planted_grams()
    old = forget_basis(g_f, g_r, rank=2, retain_energy=0.9)
    g_new, _ = planted_grams(seed=5)
    grown = grow_basis(old, g_new, 3, g_r, retain_energy=0.9)
    assert grown.shape == (24, 5) and torch.equal(grown[:, :2], old)
    check_orthonormal(grown)
    assert (grown[:, 2:].double().T @ retain_subspace(g_r, 0.9)).abs().max() < 1e-6
    again = grow_basis(grown, g_new, 1)
    assert torch.equal(again[:, :5], grown)


@pytest.mark.parametrize("call,error,words", [
    (lambda g: forget_basis(g, None, 0), ValueError, r"rank must be in \[1, 6\]"),
    (lambda g: forget_basis(g, None, 7), ValueError, "rank must be in"),
    (lambda g: forget_basis(g, None, 2.0), TypeError, "rank must be an int"),
    (lambda g: forget_basis(g, g, 6, retain_energy=0.5), ValueError, "dimensions are left after removing"),
    (lambda g: forget_basis(g, g, 1, retain_energy=1.5), ValueError, "retain_energy must be in"),
    (lambda g: forget_basis(g[:, :5], None, 1), ValueError, "gram_forget must be a square"),
    (lambda g: forget_basis(g, torch.eye(5), 1), ValueError, r"gram_retain must be \[6, 6\]"),
    (lambda g: forget_basis(g * float("nan"), None, 1), ValueError, "non-finite"),
    (lambda g: grow_basis(torch.eye(6)[:, :5], g, 2), ValueError, "rank_new must be in"),
    (lambda g: grow_basis(torch.ones(6, 2), g, 1), ValueError, "orthonormal"),
    (lambda g: grow_basis(torch.eye(6)[:, :2], torch.eye(5), 1), ValueError, r"gram_new must be \[6, 6\]"),
])
def test_basis_errors(call, error, words):
    g = torch.diag(torch.arange(1.0, 7.0))
    with pytest.raises(error, match=words):
        call(g)


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("x,basis,kw,error,words", [
    (torch.randn(2, 6), torch.ones(6, 2), {}, ValueError, "basis columns must be orthonormal"),
    (torch.randn(2, 6), torch.eye(6)[:, 0], {}, ValueError, r"basis must be 2-D \[d, r\]"),
    (torch.randn(2, 6), torch.eye(7)[:, :2], {}, ValueError, r"basis must have shape \[6, r\]"),
    (torch.randn(2, 3), torch.ones(3, 4), {}, ValueError, "rank r=4 exceeds d=3"),
    (torch.randn(2, 300), torch.zeros(300, 257), {}, ValueError, "exceeds the supported maximum 256"),
    (torch.randn(2, 6), torch.eye(6)[:, :0], {}, ValueError, "at least one column"),
    (torch.randn(2, 6), torch.eye(6, dtype=torch.float16)[:, :2], {}, TypeError, "basis must be float32 or x's"),
    (torch.randn(2, 6), torch.eye(6, dtype=torch.int64)[:, :2], {}, TypeError, "basis must be a floating"),
    (torch.randn(2, 6), [[1.0]], {}, TypeError, "basis must be a torch.Tensor"),
    (torch.arange(6).view(2, 3), torch.eye(3)[:, :1], {}, TypeError, "x must be float"),
    (torch.randn(2, 6), torch.eye(6)[:, :2], {"scale": float("nan")}, ValueError, "scale must be finite"),
    (torch.randn(2, 6), torch.eye(6, device="meta")[:, :2], {}, ValueError, "basis is on meta"),
])
def test_bad_input_is_named(backend, x, basis, kw, error, words):
    needs_compiled()
    with pytest.raises(error, match=words):
        low_rank_project(x, basis, backend=backend, **kw)


def test_assume_orthonormal_skips_the_check():
    x, u = torch.randn(2, 6), torch.ones(6, 2)
    expected = x - (x @ u) @ u.T
    assert torch.allclose(low_rank_project(x, u, assume_orthonormal=True, backend="torch"), expected)


def test_bad_backend_and_gram_mask_named():
    x, u = torch.randn(2, 6), torch.eye(6)[:, :2]
    with pytest.raises(ValueError, match="backend must be one of"):
        low_rank_project(x, u, backend="fast")
    with pytest.raises(ValueError, match="backend='cuda' cannot run|basis is on"):
        low_rank_project(x, u, backend="cuda")
    with pytest.raises(ValueError, match="backend='triton' cannot run"):
        low_rank_project(x.double(), u.double(), backend="triton")
    with pytest.raises(ValueError, match="token_mask must have shape"):
        masked_gram(x, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="only 0 and 1"):
        masked_gram(x, torch.tensor([0, 2]))


@pytest.mark.parametrize("backend", FP32_BACKENDS)
def test_a_trainable_basis_under_no_grad(backend):
    """Regression: scoring a model whose projection basis is being trained (MRP's basis training
    measured by a target-driven run) ran the kernels' out= calls on a basis requiring grad."""
    dev = device_of(backend)
    basis = torch.nn.Parameter(torch.linalg.qr(torch.randn(37, 3, dtype=torch.float64))[0].float().to(dev))
    x = torch.randn(5, 37, device=dev)
    with torch.no_grad():
        y = low_rank_project(x, basis, backend=backend)
    assert not y.requires_grad
    expected = x - (x @ basis.detach()) @ basis.detach().T
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("contiguous", [True, False])
def test_a_basis_changed_in_place_before_backward_is_refused(contiguous):
    """Autograd sees an in-place change of a contiguous basis (saved as is); a non-contiguous one
    is saved as a copy, so the op checks the caller's tensor itself: both refuse."""
    from unlearn_kernels.ops import low_rank_project

    u, _ = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64))
    u = u.to(torch.float32)
    u = u.contiguous() if contiguous else u.T.contiguous().T
    assert u.is_contiguous() == contiguous
    h = torch.randn(5, 8, requires_grad=True)
    out = low_rank_project(h, u, backend="torch")
    u.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation|modified in place"):
        out.sum().backward()
