"""hessian_ema_ and its probes: every backend against the reference, the reference against
the math, in-place semantics on views, Hutchinson's E[z ⊙ Hz] = diag(H), errors, opcheck."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from unlearn_kernels.ops.hessian import gauss_newton_pairs, hessian_ema_, hutchinson_pairs

from conftest import TOLERANCES, backend_cases

SHAPES = [(7,), (3, 5, 7), (1029,), (64, 33), (0,), (), (2, 4099)]


def ema_by_definition(hess, a, b, beta):
    """The EMA in fp64, rounded once to hess's dtype."""
    b = a if b is None else b
    return (beta * hess.double() + (1 - beta) * a.double() * b.double()).to(hess.dtype)


def test_reference_matches_hand_computed():
    hess = torch.tensor([1.0, 2.0])
    hessian_ema_(hess, torch.tensor([3.0, 4.0]), torch.tensor([5.0, 6.0]), beta=0.5, backend="torch")
    assert hess.tolist() == [8.0, 13.0]  # 0.5·1 + 0.5·15, 0.5·2 + 0.5·24
    hessian_ema_(hess, torch.tensor([2.0, 0.0]), beta=0.75, backend="torch")
    assert hess.tolist() == [7.0, 9.75]  # 0.75·8 + 0.25·4, 0.75·13


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("hess_dtype", ["fp32", "same"])
@pytest.mark.parametrize("with_b", [True, False])
def test_backend_matches_reference(backend, device, dtype, shape, hess_dtype, with_b):
    g = torch.Generator().manual_seed(len(shape) + int(with_b))
    h_dt = torch.float32 if hess_dtype == "fp32" else dtype
    hess = torch.rand(shape, generator=g).to(device=device, dtype=h_dt)
    a = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(shape, generator=g).to(device=device, dtype=dtype) if with_b else None
    a_before, original = a.clone(), hess.clone()
    expected = hess.clone()
    hessian_ema_(expected, a, b, beta=0.3, backend="torch")
    ptr = hess.data_ptr()
    out = hessian_ema_(hess, a, b, beta=0.3, backend=backend)
    assert out is hess and hess.data_ptr() == ptr and hess.dtype == h_dt
    atol, rtol = TOLERANCES[h_dt]
    torch.testing.assert_close(hess.double(), expected.double(), atol=atol, rtol=rtol)
    torch.testing.assert_close(expected.double(), ema_by_definition(original, a, b, 0.3).double(),
                               atol=atol, rtol=rtol)
    assert torch.equal(a, a_before)


@pytest.mark.parametrize("backend,device,dtype", [c for c in backend_cases() if "float32" in c.id])
def test_non_contiguous_views_update_in_place(backend, device, dtype):
    big = torch.rand(6, 10, device=device)
    before = big.clone()
    hess = big[:, ::2].t()  # [5, 6], strided both ways
    a = torch.randn(6, 5, device=device).t()
    b = torch.randn(10, 6, device=device)[::2]
    hessian_ema_(hess, a, b, beta=0.9, backend=backend)
    expected = ema_by_definition(before[:, ::2].t(), a, b, 0.9)
    torch.testing.assert_close(big[:, ::2].t(), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(big[:, 1::2], before[:, 1::2], atol=0, rtol=0)


@pytest.mark.parametrize("backend,device,dtype", [c for c in backend_cases() if "float32" in c.id])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_beta_extremes(backend, device, dtype, beta):
    hess = torch.rand(5, 9, device=device)
    start = hess.clone()
    a, b = torch.randn(5, 9, device=device), torch.randn(5, 9, device=device)
    hessian_ema_(hess, a, b, beta=beta, backend=backend)
    expected = start if beta == 1.0 else a * b
    torch.testing.assert_close(hess, expected, atol=0, rtol=0)


def test_state_that_requires_grad_is_updated_without_autograd():
    hess = torch.zeros(3, requires_grad=True)
    hessian_ema_(hess, torch.ones(3), beta=0.5)
    assert hess.detach().tolist() == [0.5, 0.5, 0.5]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 300), beta=st.floats(0, 1), with_b=st.booleans(), seed=st.integers(0, 999),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
def test_cpu_kernel_property(n, beta, with_b, seed, dtype):
    pytest.importorskip("unlearn_kernels._C")
    g = torch.Generator().manual_seed(seed)
    hess = torch.rand(n, generator=g)
    a = torch.randn(n, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if with_b else None
    got, expected = hess.clone(), hess.clone()
    hessian_ema_(got, a, b, beta=beta, backend="cpu")
    hessian_ema_(expected, a, b, beta=beta, backend="torch")
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(beta=float("nan")), ValueError, "beta must be finite"),
    (dict(beta=1.5), ValueError, r"beta must lie in \[0, 1\]"),
    (dict(beta=-0.1), ValueError, r"beta must lie in \[0, 1\]"),
    (dict(beta="x"), TypeError, "beta must be a real number"),
    (dict(a=torch.ones(4, 2)), ValueError, "a must have the shape of hess"),
    (dict(a=torch.ones(2, 4, dtype=torch.int32)), TypeError, "a must be float32"),
    (dict(hess=torch.ones(2, 4, dtype=torch.float16), a=torch.ones(2, 4, dtype=torch.bfloat16)),
     TypeError, "hess must be float32 or the dtype of a"),
    (dict(b=torch.ones(2, 4, dtype=torch.float16)), TypeError, "b must have the dtype of a"),
    (dict(b=torch.ones(4)), ValueError, "b must have the shape of a"),
    (dict(hess=torch.ones(4).expand(2, 4)), ValueError, "hess must not be an expanded"),
    (dict(hess=[1.0]), TypeError, "hess must be a torch.Tensor"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
])
def test_errors_named(kwargs, error, words):
    args = dict(hess=torch.ones(2, 4), a=torch.ones(2, 4), b=None, beta=0.9)
    args.update(kwargs)
    with pytest.raises(error, match=words):
        hessian_ema_(**args)


def test_opcheck_compiled_op():
    pytest.importorskip("unlearn_kernels._C")
    op = torch.ops.unlearn_kernels.hessian_ema_
    torch.library.opcheck(op, (torch.rand(37), torch.randn(37), torch.randn(37), 0.9))
    torch.library.opcheck(op, (torch.rand(37), torch.randn(37).bfloat16(), None, 0.5))
    torch.library.opcheck(op, (torch.rand(5).half(), torch.randn(5).half(), None, 0.0))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_torch_compile_traces_the_update(backend):
    pytest.importorskip("unlearn_kernels._C")

    def step(hess, a, b):
        hessian_ema_(hess, a, b, beta=0.9, backend=backend)
        return hess.sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    hess, a, b = torch.rand(6, 7), torch.randn(6, 7), torch.randn(6, 7)
    expected = hess.clone()
    step(expected, a, b)
    total = compiled(hess, a, b)
    torch.testing.assert_close(hess, expected)
    torch.testing.assert_close(total, expected.sum())


def test_opcheck_triton_op():
    from unlearn_kernels.ops import _backend

    if not _backend.available("triton", torch.device("cpu"), torch.float32):
        pytest.skip("triton does not run here")
    op = torch.ops.unlearn_kernels.triton_hessian_ema_
    torch.library.opcheck(op, (torch.rand(19), torch.randn(19), torch.randn(19), 0.9))


# ---- probes ---------------------------------------------------------------------------

def test_hutchinson_exact_on_a_diagonal_quadratic():
    d = torch.linspace(-1.0, 3.0, 11)
    w = torch.randn(11, requires_grad=True)
    loss = 0.5 * (d * w ** 2).sum()
    [(z, hz)] = hutchinson_pairs(loss, [w], generator=torch.Generator().manual_seed(0))
    assert set(z.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(z * hz, d)


def test_hutchinson_joint_hessian_vector_product():
    # L = ½ Σ c x² + x·y: H = [[diag c, I], [I, 0]], so Hz_x = c z_x + z_y and Hz_y = z_x.
    c = torch.arange(1.0, 6.0)
    x = torch.randn(5, requires_grad=True)
    y = torch.randn(5, requires_grad=True)
    loss = 0.5 * (c * x ** 2).sum() + (x * y).sum()
    (zx, hx), (zy, hy) = hutchinson_pairs(loss, [x, y])
    torch.testing.assert_close(hx, c * zx + zy)
    torch.testing.assert_close(hy, zx)


def test_hutchinson_mean_estimates_the_diagonal():
    g = torch.Generator().manual_seed(3)
    m = torch.randn(6, 6, generator=g)
    a = m @ m.t() + torch.diag(torch.arange(1.0, 7.0))
    w = torch.randn(6, requires_grad=True)
    hess = torch.zeros(6)
    samples = 4000
    for k in range(samples):
        loss = 0.5 * w @ a @ w
        [(z, hz)] = hutchinson_pairs(loss, [w], generator=g)
        hessian_ema_(hess, z, hz, beta=k / (k + 1))  # running mean
    # Var(z_i (Az)_i) = Σ_{j≠i} A_ij², so the mean is within a few σ/√N of diag(A).
    sigma = ((a ** 2).sum(1) - a.diag() ** 2).sqrt() / samples ** 0.5
    assert ((hess - a.diag()).abs() < 5 * sigma).all()


def test_hutchinson_unused_and_linear_params_get_zero():
    w = torch.randn(4, requires_grad=True)
    linear = torch.randn(3, requires_grad=True)
    unused = torch.randn(2, requires_grad=True)
    loss = (w ** 2).sum() + linear.sum()
    pairs = hutchinson_pairs(loss, [w, linear, unused], retain_graph=True)
    torch.testing.assert_close(pairs[0][0] * pairs[0][1], torch.full((4,), 2.0))
    assert torch.equal(pairs[1][1], torch.zeros(3)) and torch.equal(pairs[2][1], torch.zeros(2))
    loss.backward()  # the graph was kept
    assert w.grad is not None


def test_hutchinson_generator_is_reproducible():
    w = torch.randn(50, requires_grad=True)
    probes = [hutchinson_pairs((w ** 3).sum(), [w], generator=torch.Generator().manual_seed(7))[0][0]
              for _ in range(2)]
    assert torch.equal(*probes)


def test_hutchinson_errors_named():
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="loss must be a scalar"):
        hutchinson_pairs(w * 2, [w])
    with pytest.raises(ValueError, match="loss must require grad"):
        hutchinson_pairs(torch.tensor(1.0), [w])
    with pytest.raises(ValueError, match=r"params\[1\] must be a tensor that requires grad"):
        hutchinson_pairs((w ** 2).sum(), [w, torch.ones(2)])


def test_gauss_newton_pairs_track_the_squared_gradient():
    g = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    [(a, b)] = gauss_newton_pairs([g * 1])
    assert not a.requires_grad and a is b
    hess = torch.zeros(3)
    hessian_ema_(hess, a, b, beta=0.0)
    assert hess.tolist() == [1.0, 4.0, 0.25]
    with pytest.raises(TypeError, match=r"grads\[0\] must be float32"):
        gauss_newton_pairs([torch.ones(2, dtype=torch.int64)])
