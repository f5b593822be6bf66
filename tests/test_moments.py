"""masked_moments, Moments merging and feature_importance: backends against the
reference, the reference against the definition, numerics and error messages."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from unlearn_kernels.ops import Moments, feature_importance, feature_scores, masked_moments

from conftest import assert_close, backend_cases


def moments_by_definition(x, mask=None):
    rows = x.double().reshape(-1, x.shape[-1])
    if mask is not None:
        rows = rows[mask.reshape(-1)]
    mean = rows.mean(0) if len(rows) else torch.zeros(x.shape[-1], dtype=torch.float64)
    return len(rows), mean, ((rows - mean) ** 2).sum(0)


def test_reference_matches_definition():
    x = torch.randn(4, 6, 9, dtype=torch.float64) * 3 + 1
    mask = torch.rand(4, 6) > 0.4
    n, mean, m2 = moments_by_definition(x, mask)
    stats = masked_moments(x, mask, backend="torch")
    assert int(stats.count) == n == int(mask.sum())
    assert torch.allclose(stats.mean.double(), mean, atol=1e-6)
    assert torch.allclose(stats.m2.double(), m2, rtol=1e-5)
    assert torch.allclose(stats.variance(unbiased=True).double(), x[mask].var(0, unbiased=True), rtol=1e-5)


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("shape,masked", [((3, 7, 131), "some"), ((5, 1), "none"), ((40, 1029), "some"),
                                          ((2, 3, 7), "empty"), ((1, 9), "none"), ((0, 4), "none"),
                                          ((300, 67), "first_rows")])
def test_backend_matches_reference(backend, device, dtype, shape, masked):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device=device, dtype=dtype)
    mask = {"none": None, "some": torch.rand(shape[:-1], generator=g) > 0.3,
            "empty": torch.zeros(shape[:-1], dtype=torch.bool),
            "first_rows": torch.arange(shape[0]) < 3}[masked]
    mask = None if mask is None else mask.to(device)
    got = masked_moments(x, mask, backend=backend)
    ref = masked_moments(x, mask, backend="torch")
    assert got.count.dtype == torch.int64 and got.mean.dtype == torch.float32 and got.m2.dtype == torch.float32
    assert int(got.count) == int(ref.count)
    assert_close(got.mean, ref.mean, torch.float32, scale=10)
    assert_close(got.m2, ref.m2, torch.float32, scale=100)
    assert torch.isfinite(got.mean).all() and torch.isfinite(got.m2).all()


@pytest.mark.parametrize("backend,device,dtype", [c for c in backend_cases() if "float32" in c.id])
def test_large_mean_is_stable(backend, device, dtype):
    x = (torch.randn(2000, 33, dtype=torch.float64) + 1000.0)
    got = masked_moments(x.to(device=device, dtype=dtype), backend=backend)
    _, mean, m2 = moments_by_definition(x.float())
    torch.testing.assert_close(got.mean.double().cpu(), mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.m2.double().cpu(), m2, rtol=2e-3, atol=0)


@pytest.mark.parametrize("backend,device,dtype", [c for c in backend_cases() if "float32" in c.id])
def test_strided_rows(backend, device, dtype):
    wide = torch.randn(50, 200, device=device, dtype=dtype)
    x = wide[:, 3:134]
    got = masked_moments(x, backend=backend)
    ref = masked_moments(x.contiguous(), backend="torch")
    assert_close(got.mean, ref.mean, torch.float32, 10)
    assert_close(got.m2, ref.m2, torch.float32, 100)


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 20), min_size=1, max_size=5), d=st.integers(1, 40), seed=st.integers(0, 999))
def test_merge_equals_moments_of_concatenation(sizes, d, seed):
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n, d, generator=g) * 3 + 2 for n in sizes]
    merged = Moments.empty(d)
    for p in parts:
        merged = merged.merge(masked_moments(p, backend="torch") if len(p) else Moments.empty(d))
    whole = masked_moments(torch.cat(parts), backend="torch")
    assert int(merged.count) == int(whole.count)
    assert merged.mean.dtype == torch.float64                  # merges are kept in fp64
    torch.testing.assert_close(merged.mean, whole.mean.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.m2, whole.m2.double(), atol=1e-3, rtol=1e-4)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(0, 80), d=st.integers(1, 50), keep=st.floats(0, 1), seed=st.integers(0, 999))
def test_cpu_kernel_property(rows, d, keep, seed):
    pytest.importorskip("unlearn_kernels._C")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g)
    mask = torch.rand(rows, generator=g) < keep
    got = masked_moments(x, mask, backend="cpu")
    ref = masked_moments(x, mask, backend="torch")
    assert int(got.count) == int(ref.count)
    torch.testing.assert_close(got.mean, ref.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.m2, ref.m2, atol=1e-4, rtol=1e-4)


def test_variance_refuses_empty():
    with pytest.raises(ValueError, match="variance needs at least 1 tokens"):
        Moments.empty(3).variance()


def _separable_stats(d=32, informative=(3, 7, 11, 20), n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    shift = torch.zeros(d)
    shift[list(informative)] = torch.tensor([4.0, 3.0, 2.5, 2.0])[: len(informative)]
    forget = masked_moments(torch.randn(n, d, generator=g) + shift, backend="torch")
    retain = masked_moments(torch.randn(n, d, generator=g), backend="torch")
    return forget, retain


@pytest.mark.parametrize("backend,device,dtype", [c for c in backend_cases() if "float32" in c.id] +
                         [pytest.param("torch", torch.device("cpu"), torch.float32, id="torch")])
def test_feature_scores_backends(backend, device, dtype):
    forget, retain = _separable_stats()
    move = lambda s: Moments(s.count.to(device), s.mean.to(device), s.m2.to(device))  # noqa: E731
    got = feature_scores(move(forget), move(retain), backend=backend)
    expected = (forget.mean - retain.mean) ** 2 / (forget.variance() + retain.variance() + 1e-6)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-6)


def test_importance_finds_the_separating_features():
    forget, retain = _separable_stats()
    hard = feature_importance(forget, retain, sparsity=4 / 32, hard=True)
    assert set(hard.nonzero().flatten().tolist()) == {3, 7, 11, 20}
    soft = feature_importance(forget, retain, sparsity=4 / 32, temperature=0.25)
    assert ((soft >= 0) & (soft <= 1)).all()
    assert (soft[[3, 7, 11, 20]] > 0.5).all()
    others = torch.ones(32, dtype=torch.bool)
    others[[3, 7, 11, 20]] = False
    assert (soft[others] < 0.5).all()
    assert feature_importance(forget, retain, sparsity=1.0).eq(1).all()


def test_importance_is_scale_invariant():
    forget, retain = _separable_stats()
    scaled = [Moments(s.count, s.mean * 100, s.m2 * 10_000) for s in (forget, retain)]
    a = feature_importance(forget, retain, sparsity=0.2, eps=0)
    b = feature_importance(*scaled, sparsity=0.2, eps=0)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(sparsity=0.0), ValueError, "sparsity must be in"),
    (dict(sparsity=float("nan")), ValueError, "sparsity must be finite"),
    (dict(temperature=-1.0), ValueError, "temperature must be >= 0"),
    (dict(stats_retain="x"), TypeError, "stats_retain must be Moments"),
    (dict(stats_retain=Moments.empty(32)), ValueError, "stats_retain holds no token"),
    (dict(stats_retain=Moments.empty(5)), ValueError, "stats_retain has d=5"),
])
def test_importance_errors_named(kwargs, error, words):
    forget, retain = _separable_stats()
    args = dict(stats_forget=forget, stats_retain=retain, sparsity=0.1)
    args.update(kwargs)
    with pytest.raises(error, match=words):
        feature_importance(**args)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_moments_errors_named(backend):
    pytest.importorskip("unlearn_kernels._C")
    with pytest.raises(TypeError, match="x must be float"):
        masked_moments(torch.ones(3, 4, dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match="token_mask must have shape"):
        masked_moments(torch.ones(3, 4), torch.ones(4, dtype=torch.bool), backend=backend)
    with pytest.raises(ValueError, match=r"x must have shape \[..., d\]"):
        masked_moments(torch.ones(3, 0), backend=backend)


def test_opcheck_compiled_ops():
    pytest.importorskip("unlearn_kernels._C")
    x = torch.randn(11, 13)
    torch.library.opcheck(torch.ops.unlearn_kernels.masked_moments, (x, torch.rand(11) > 0.5))
    torch.library.opcheck(torch.ops.unlearn_kernels.masked_moments, (x, None))
    v = [torch.rand(13) for _ in range(4)]
    torch.library.opcheck(torch.ops.unlearn_kernels.feature_scores, (*v, 1e-6))
