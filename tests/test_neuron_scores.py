"""neuron_scores and the neuron selection: every backend against the reference (both dims,
odd sizes, strided and transposed views, dtypes), the reference against the math, the
ranking rules, errors and opcheck."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from unlearn_kernels.ops.neuron_scores import neuron_scores, select_neurons, select_neurons_per_layer

from conftest import backend_cases

SHAPES = [(37, 53), (12, 1029), (5, 1), (1, 7), (300, 16), (3, 4104)]


def scores_by_definition(w, h, dim):
    """½ Σ h w² over the other dim, by einsum in fp64."""
    spec = "ij,ij->i" if dim == 0 else "ij,ij->j"
    return 0.5 * torch.einsum(spec, h.double(), w.double() ** 2)


def make(shape, dtype, h_dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    h_f = torch.rand(shape, generator=g).to(device=device, dtype=h_dtype)
    h_r = (torch.rand(shape, generator=g) - 0.2).to(device=device, dtype=h_dtype)  # some negative
    return w, h_f, h_r


def test_reference_matches_hand_computed():
    w = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    s_f, s_r = neuron_scores(w, torch.ones(2, 2), torch.full((2, 2), 2.0), backend="torch")
    assert s_f.tolist() == [2.5, 4.5] and s_r.tolist() == [5.0, 9.0]
    s_f, s_r = neuron_scores(w, torch.tensor([[1.0, 1.0], [0.5, 4.0]]), dim=1, backend="torch")
    assert s_f.tolist() == [0.5 * (1 + 0.5 * 9), 0.5 * 4] and s_r is None


@pytest.mark.parametrize("dim", [0, 1])
def test_reference_matches_definition(dim):
    w, h_f, h_r = make((9, 13), torch.float64, torch.float64, "cpu")
    s_f, s_r = neuron_scores(w, h_f, h_r, dim=dim, backend="torch")
    torch.testing.assert_close(s_f, scores_by_definition(w, h_f, dim), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(s_r, scores_by_definition(w, h_r, dim), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("h_kind", ["fp32", "same"])
def test_backend_matches_reference(backend, device, dtype, shape, dim, h_kind):
    w, h_f, h_r = make(shape, dtype, torch.float32 if h_kind == "fp32" else dtype, device)
    got_f, got_r = neuron_scores(w, h_f, h_r, dim=dim, backend=backend)
    ref_f, ref_r = neuron_scores(w, h_f, h_r, dim=dim, backend="torch")
    assert got_f.dtype == got_r.dtype == torch.float32 and got_f.shape == (shape[dim],)
    # Same inputs in fp32, only the summation order differs.
    torch.testing.assert_close(got_f, ref_f, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_r, ref_r, atol=1e-4, rtol=1e-4)
    only_f, none = neuron_scores(w, h_f, dim=dim, backend=backend)
    assert none is None
    torch.testing.assert_close(only_f, got_f, atol=0, rtol=0)


@pytest.mark.parametrize("backend,device,dtype", [c for c in backend_cases() if "float32" in c.id])
@pytest.mark.parametrize("layout", ["transposed", "column_slice", "mixed"])
@pytest.mark.parametrize("dim", [0, 1])
def test_strided_views(backend, device, dtype, layout, dim):
    w, h_f, h_r = make((40, 67), dtype, torch.float32, device, seed=2)
    if layout == "transposed":  # column-major storage, as a transposed weight
        views = [t.t().contiguous().t() for t in (w, h_f, h_r)]
    elif layout == "column_slice":
        views = [torch.stack([t, t], 2).flatten(1)[:, ::2] for t in (w, h_f, h_r)]
    else:
        views = [w.t().contiguous().t(), h_f, torch.stack([h_r, h_r], 1).flatten(0, 1)[::2]]
    got = neuron_scores(*views, dim=dim, backend=backend)
    ref = neuron_scores(w, h_f, h_r, dim=dim, backend="torch")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dim", [0, 1])
def test_fp64_weights(backend, dim):
    pytest.importorskip("unlearn_kernels._C")
    w, h_f, h_r = make((17, 23), torch.float64, torch.float64, "cpu")
    s_f, s_r = neuron_scores(w, h_f, h_r, dim=dim, backend=backend)
    assert s_f.dtype == torch.float64
    torch.testing.assert_close(s_f, scores_by_definition(w, h_f, dim), atol=1e-12, rtol=1e-12)
    s32 = neuron_scores(w, h_f.float(), dim=dim, backend=backend)[0]
    torch.testing.assert_close(s32, scores_by_definition(w, h_f.float(), dim), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend,device,dtype", [c for c in backend_cases() if "float32" in c.id])
@pytest.mark.parametrize("shape", [(0, 5), (4, 0)])
@pytest.mark.parametrize("dim", [0, 1])
def test_empty_weights(backend, device, dtype, shape, dim):
    w = torch.zeros(shape, device=device)
    s_f, s_r = neuron_scores(w, w, w, dim=dim, backend=backend)
    assert s_f.shape == s_r.shape == (shape[dim],) and (s_f == 0).all() and (s_r == 0).all()


@pytest.mark.parametrize("dim", [0, 1])
def test_deterministic(dim):
    pytest.importorskip("unlearn_kernels._C")
    w, h_f, h_r = make((300, 700), torch.bfloat16, torch.float32, "cpu")
    first = neuron_scores(w, h_f, h_r, dim=dim, backend="cpu")
    second = neuron_scores(w, h_f, h_r, dim=dim, backend="cpu")
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 70), cols=st.integers(1, 70), dim=st.integers(0, 1), seed=st.integers(0, 999),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_cpu_kernel_property(rows, cols, dim, seed, dtype):
    pytest.importorskip("unlearn_kernels._C")
    w, h_f, h_r = make((rows, cols), dtype, torch.float32, "cpu", seed)
    got = neuron_scores(w, h_f, h_r, dim=dim, backend="cpu")
    ref = neuron_scores(w, h_f, h_r, dim=dim, backend="torch")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(weight=torch.ones(2, 3, 4)), ValueError, r"weight must be 2-D \[out, in\]"),
    (dict(weight=torch.ones(2, 3, dtype=torch.int64)), TypeError, "weight must be float32"),
    (dict(weight="w"), TypeError, "weight must be a torch.Tensor"),
    (dict(dim=2), ValueError, r"dim must be 0 \(neurons are rows\) or 1"),
    (dict(dim=True), ValueError, "dim must be 0"),
    (dict(hess_forget=torch.ones(3, 2)), ValueError, r"hess_forget must have the shape of weight \(2, 3\)"),
    (dict(hess_forget=torch.ones(2, 3, dtype=torch.float16)), TypeError,
     "hess_forget must be float32 or the dtype of weight"),
    (dict(hess_retain=torch.ones(2, 3, dtype=torch.float64)), TypeError, "hess_retain must be float32"),
    (dict(weight=torch.ones(2, 3, dtype=torch.bfloat16), hess_retain=torch.ones(2, 3, dtype=torch.bfloat16)),
     TypeError, "hess_retain must have the dtype of hess_forget"),
    (dict(backend="cuda"), ValueError, "backend='cuda' cannot run"),
])
def test_errors_named(kwargs, error, words):
    args = dict(weight=torch.ones(2, 3), hess_forget=torch.ones(2, 3), hess_retain=None, dim=0)
    args.update(kwargs)
    if torch.cuda.is_available() and args.get("backend") == "cuda":
        pytest.skip("cuda runs here")
    with pytest.raises(error, match=words):
        neuron_scores(**args)


@pytest.mark.parametrize("dim", [0, 1])
def test_opcheck_compiled_op(dim):
    pytest.importorskip("unlearn_kernels._C")
    op = torch.ops.unlearn_kernels.neuron_scores
    w, h_f, h_r = make((11, 13), torch.float32, torch.float32, "cpu")
    torch.library.opcheck(op, (w, h_f, h_r, dim))
    torch.library.opcheck(op, (w.bfloat16(), h_f, None, dim))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_torch_compile_traces_the_scores(backend):
    pytest.importorskip("unlearn_kernels._C")
    w, h_f, h_r = make((12, 20), torch.float32, torch.float32, "cpu")

    def ratio(weight):
        s_f, s_r = neuron_scores(weight, h_f, h_r, dim=1, backend=backend)
        return s_f / (s_r.clamp(min=0) + 1e-3)

    compiled = torch.compile(ratio, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(w), ratio(w))


def test_opcheck_triton_op():
    from unlearn_kernels.ops import _backend

    if not _backend.available("triton", torch.device("cpu"), torch.float32):
        pytest.skip("triton does not run here")
    w, h_f, h_r = make((6, 10), torch.float32, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.unlearn_kernels.triton_neuron_scores, (w, h_f, h_r, 1))


# ---- selection ------------------------------------------------------------------------

def test_select_by_fraction_and_threshold():
    s_f = torch.tensor([1.0, 8.0, 3.0, 0.5])
    s_r = torch.tensor([1.0, 1.0, 0.0, -2.0])  # ratios ≈ 1, 8, 3e8, 5e7 (negative retain → 0)
    assert select_neurons(s_f, s_r, fraction=0.5).tolist() == [False, False, True, True]
    assert select_neurons(s_f, s_r, threshold=2.0).tolist() == [False, True, True, True]
    assert select_neurons(s_f, None, fraction=0.25).tolist() == [False, True, False, False]
    assert select_neurons(s_f, s_r, fraction=1e-6).sum() == 1  # at least one neuron


def test_select_ties_go_to_the_lower_index():
    s = torch.ones(6)
    assert select_neurons(s, s, fraction=0.5).tolist() == [True] * 3 + [False] * 3


def test_select_matches_sorted_ratio():
    g = torch.Generator().manual_seed(0)
    s_f, s_r = torch.rand(100, generator=g), torch.rand(100, generator=g)
    mask = select_neurons(s_f, s_r, fraction=0.1, eps=1e-3)
    ratio = s_f / (s_r + 1e-3)
    assert mask.sum() == 10 and ratio[mask].min() > ratio[~mask].max()


def test_select_per_layer_and_global():
    scores = {"a": (torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.ones(4)),
              "b": torch.tensor([0.1, 0.2, 0.3, 0.4])}
    per_layer = select_neurons_per_layer(scores, fraction=0.5)
    assert per_layer["a"].tolist() == [True, True, False, False]
    assert per_layer["b"].tolist() == [False, False, True, True]
    shared = select_neurons_per_layer(scores, fraction=0.5, scope="global")
    assert shared["a"].all() and not shared["b"].any()
    threshold = select_neurons_per_layer(scores, threshold=0.25)
    assert threshold["b"].tolist() == [False, False, True, True]


@pytest.mark.parametrize("call,error,words", [
    (lambda: select_neurons(torch.ones(3), None), ValueError, "exactly one of fraction and threshold"),
    (lambda: select_neurons(torch.ones(3), None, fraction=0.5, threshold=1.0), ValueError, "exactly one"),
    (lambda: select_neurons(torch.ones(3), None, fraction=0.0), ValueError, r"fraction must be in \(0, 1\]"),
    (lambda: select_neurons(torch.ones(3), None, threshold=float("inf")), ValueError, "threshold must be finite"),
    (lambda: select_neurons(torch.ones(3), torch.ones(3), fraction=0.5, eps=0), ValueError, "eps must be > 0"),
    (lambda: select_neurons(torch.tensor([1.0, float("nan")]), None, fraction=0.5), ValueError,
     "scores_forget holds non-finite values"),
    (lambda: select_neurons(torch.ones(3), torch.ones(4), fraction=0.5), ValueError,
     "scores_retain must have the shape of scores_forget"),
    (lambda: select_neurons(torch.ones(3, 2), None, fraction=0.5), ValueError, "scores_forget must be a 1-D"),
    (lambda: select_neurons([1.0], None, fraction=0.5), TypeError, "scores_forget must be a torch.Tensor"),
    (lambda: select_neurons_per_layer([], fraction=0.5), TypeError, "scores must be a mapping"),
    (lambda: select_neurons_per_layer({"x": torch.ones(2)}, fraction=0.5, scope="model"), ValueError,
     "scope must be 'layer' or 'global'"),
    (lambda: select_neurons_per_layer({"x": (torch.ones(2), torch.ones(2, 1))}, fraction=0.5), ValueError,
     r"scores_retain\['x'\] must be a 1-D"),
])
def test_select_errors_named(call, error, words):
    with pytest.raises(error, match=words):
        call()
