"""class_means: every backend against the reference (odd sizes, empty classes, strided
views, dtypes, leading dims), the reference against the math, gradients, determinism,
errors and opcheck."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from unlearn_kernels.ops.class_means import class_means

from conftest import backend_cases

CASES = [(100, 37, 7), (1000, 64, 3), (5, 9, 20), (0, 4, 3), (70, 1, 2), (33, 1029, 5), (2, 3, 1)]


def means_by_definition(x, y, num_classes):
    """Σ onehot(y)ᵀ x / counts in fp64, zero for empty classes."""
    onehot = torch.nn.functional.one_hot(y.reshape(-1), num_classes).double()
    counts = onehot.sum(0)
    sums = onehot.t() @ x.reshape(-1, x.shape[-1]).double()
    return torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], 0.0), counts.long()


def make(n, d, num_classes, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g) * 2 + 1).to(device=device, dtype=dtype)
    # Skewed labels over the even classes only: odd classes stay empty.
    y = torch.randint(0, (num_classes + 1) // 2, (n,), generator=g) ** 2 % num_classes
    y = (y // 2 * 2).to(device)
    return x, y


def test_reference_matches_hand_computed():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    means, counts = class_means(x, torch.tensor([0, 2, 0]), 3, backend="torch")
    assert means.tolist() == [[3.0, 4.0], [0.0, 0.0], [3.0, 4.0]] and counts.tolist() == [2, 0, 1]


def test_reference_matches_definition():
    x, y = make(50, 6, 9, torch.float64, "cpu")
    means, counts = class_means(x, y, 9, backend="torch")
    expected, expected_counts = means_by_definition(x, y, 9)
    assert torch.equal(counts, expected_counts) and (counts[1::2] == 0).all()
    torch.testing.assert_close(means, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("n,d,num_classes", CASES)
def test_backend_matches_reference(backend, device, dtype, n, d, num_classes):
    x, y = make(n, d, num_classes, dtype, device, seed=n + d)
    means, counts = class_means(x, y, num_classes, backend=backend)
    ref_means, ref_counts = class_means(x, y, num_classes, backend="torch")
    assert means.dtype == torch.float32 and counts.dtype == torch.int64
    assert means.shape == (num_classes, d) and torch.equal(counts, ref_counts)
    # Same inputs in fp32, only the summation order differs.
    torch.testing.assert_close(means, ref_means, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(means).all() and (means[counts == 0] == 0).all()


@pytest.mark.parametrize("backend,device,dtype", [c for c in backend_cases() if "float32" in c.id])
def test_strided_features_leading_dims_and_int32_labels(backend, device, dtype):
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(4, 6, 50, generator=g).to(device)
    x = wide[..., 3:40]  # [4, 6, 37], row stride 50
    y = torch.randint(0, 5, (4, 6), generator=g).to(device=device, dtype=torch.int32)
    means, counts = class_means(x, y, 5, backend=backend)
    expected, expected_counts = means_by_definition(x.cpu(), y.cpu().long(), 5)
    assert torch.equal(counts.cpu(), expected_counts)
    torch.testing.assert_close(means.cpu().double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck_fp64(backend):
    pytest.importorskip("unlearn_kernels._C")
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0, 2, 2, 0], [2, 2, 0, 2], [0, 0, 0, 3]])
    assert torch.autograd.gradcheck(lambda t: class_means(t, y, 5, backend=backend)[0], (x,))


@pytest.mark.parametrize("backend,device,dtype", [c for c in backend_cases() if "float32" in c.id])
def test_gradient_is_the_mean_of_the_class(backend, device, dtype):
    x = torch.randn(6, 3, device=device, requires_grad=True)
    y = torch.tensor([1, 0, 1, 1, 0, 1], device=device)
    means, _ = class_means(x, y, 3, backend=backend)
    means[1].sum().backward()
    expected = torch.tensor([0.25, 0, 0.25, 0.25, 0, 0.25], device=device)[:, None].expand(6, 3)
    torch.testing.assert_close(x.grad, expected)


def test_deterministic():
    pytest.importorskip("unlearn_kernels._C")
    x, y = make(3000, 300, 11, torch.bfloat16, "cpu")
    first, second = class_means(x, y, 11, backend="cpu"), class_means(x, y, 11, backend="cpu")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 200), d=st.integers(1, 40), num_classes=st.integers(1, 30), seed=st.integers(0, 999),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
def test_cpu_kernel_property(n, d, num_classes, seed, dtype):
    pytest.importorskip("unlearn_kernels._C")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    y = torch.randint(0, num_classes, (n,), generator=g)
    means, counts = class_means(x, y, num_classes, backend="cpu")
    ref_means, ref_counts = class_means(x, y, num_classes, backend="torch")
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(means, ref_means, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(labels=torch.tensor([0, 1, 3])), ValueError, r"labels must lie in \[0, num_classes=3\), found values 0 .. 3"),
    (dict(labels=torch.tensor([0, -1, 2])), ValueError, r"labels must lie in \[0, num_classes=3\)"),
    (dict(labels=torch.tensor([0.0, 1.0, 2.0])), TypeError, "labels must be an integer tensor"),
    (dict(labels=torch.tensor([0, 1])), ValueError, r"labels must have shape \(3,\)"),
    (dict(labels=[0, 1, 2]), TypeError, "labels must be a torch.Tensor"),
    (dict(num_classes=0), ValueError, "num_classes must be >= 1"),
    (dict(num_classes=2.5), TypeError, "num_classes must be an int"),
    (dict(features=torch.ones(3, 2, dtype=torch.int32)), TypeError, "features must be float"),
    (dict(features=torch.ones(3, 0)), ValueError, r"features must have shape \[..., d\]"),
])
def test_errors_named(kwargs, error, words):
    args = dict(features=torch.ones(3, 2), labels=torch.tensor([0, 1, 2]), num_classes=3)
    args.update(kwargs)
    with pytest.raises(error, match=words):
        class_means(**args)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_torch_compile_traces_the_head(backend):
    pytest.importorskip("unlearn_kernels._C")
    y = torch.tensor([0, 2, 2, 1, 0, 2])

    def cosine_logits(x):
        means, _ = class_means(x, y, 3, backend=backend)
        return torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(means, dim=1).t()

    compiled = torch.compile(cosine_logits, backend="aot_eager")
    x1 = torch.randn(6, 5, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    compiled(x1).sum().backward()
    cosine_logits(x2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_opcheck_compiled_op():
    pytest.importorskip("unlearn_kernels._C")
    op = torch.ops.unlearn_kernels.class_means
    torch.library.opcheck(op, (torch.randn(17, 6), torch.randint(0, 4, (17,)), 5))
    torch.library.opcheck(op, (torch.randn(0, 6).bfloat16(), torch.zeros(0, dtype=torch.int64), 2))


def test_opcheck_triton_op():
    from unlearn_kernels.ops import _backend

    if not _backend.available("triton", torch.device("cpu"), torch.float32):
        pytest.skip("triton does not run here")
    torch.library.opcheck(torch.ops.unlearn_kernels.triton_class_means,
                          (torch.randn(9, 6), torch.randint(0, 3, (9,)), 4))


def test_a_bool_is_not_a_class_count():
    with pytest.raises(TypeError, match="num_classes must be an int, got bool"):
        class_means(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), True)
