"""misdirection_loss and masked_edit: every backend against the reference, the reference
against the math, gradients, masks, odd shapes, strided views and torch.compile."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from unlearn_kernels.ops import masked_edit, misdirection_loss
from unlearn_kernels.ops.misdirection import _masked_edit_torch, _misdirection_torch

from conftest import assert_close, backend_cases

FORMS = ["rmu_forget", "rmu_retain", "srmu", "control_and_anchor"]


def make_inputs(shape, dtype, device, form, masked="some", seed=0):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    h = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    u = torch.rand(d, generator=g)
    control = (6.5 * u / u.norm()).to(device)
    importance = torch.rand(d, generator=g).to(device)
    anchor = (torch.randn(shape, generator=g) * 0.5).to(device=device, dtype=dtype)
    mask = None
    if masked != "none":
        mask = torch.rand(shape[:-1], generator=g) > 0.3
        if masked == "first_empty":  # a whole sequence (or the first token) masked out
            mask[0] = False
            mask.view(-1)[-1] = True
    if mask is not None:
        mask = mask.to(device)
    kwargs = {
        "rmu_forget": dict(control=control),
        "rmu_retain": dict(anchor=anchor),
        "srmu": dict(control=control, importance=importance, anchor=anchor),
        "control_and_anchor": dict(control=control, anchor=anchor),
    }[form]
    return h, kwargs, mask


def loss_by_loops(h, control=None, importance=None, anchor=None, mask=None):
    """The DESIGN.md definition written out element by element, in float64."""
    h2 = h.double().reshape(-1, h.shape[-1])
    a2 = None if anchor is None else anchor.double().reshape(h2.shape)
    valid = [True] * h2.shape[0] if mask is None else mask.reshape(-1).tolist()
    total, n_valid = 0.0, 0
    for t in range(h2.shape[0]):
        if not valid[t]:
            continue
        n_valid += 1
        for j in range(h2.shape[1]):
            m = float(importance[j]) if importance is not None else (1.0 if control is not None else 0.0)
            if control is not None:
                total += m * (float(h2[t, j]) - float(control[j])) ** 2
            if a2 is not None:
                total += (1 - m) * (float(h2[t, j]) - float(a2[t, j])) ** 2
    return total / (n_valid * h2.shape[1])


@pytest.mark.parametrize("form", FORMS)
def test_reference_matches_definition(form):
    h, kwargs, mask = make_inputs((2, 3, 5), torch.float64, "cpu", form)
    expected = loss_by_loops(h, mask=mask, **kwargs)
    got = misdirection_loss(h, token_mask=mask, backend="torch", **kwargs)
    assert abs(got.item() - expected) < 1e-12


def test_rmu_forget_is_mse_to_control():
    h = torch.randn(4, 9, 33, dtype=torch.float64)
    control = torch.randn(33, dtype=torch.float64)
    expected = torch.nn.functional.mse_loss(h, control.expand_as(h))
    assert torch.allclose(misdirection_loss(h, control, backend="torch"), expected)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("form", FORMS)
def test_gradcheck_fp64(backend, form):
    h, kwargs, mask = make_inputs((2, 3, 6), torch.float64, "cpu", form)
    if backend == "cpu":
        pytest.importorskip("unlearn_kernels._C")
    h.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: misdirection_loss(x, token_mask=mask, backend=backend, **kwargs) * 3.0, (h,))


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape,masked", [((3, 7, 131), "some"), ((5, 1), "none"), ((4, 33, 7), "first_empty"),
                                          ((1, 1), "none"), ((2, 70, 1029), "some")])
def test_backend_matches_reference(backend, device, dtype, form, shape, masked):
    h, kwargs, mask = make_inputs(shape, dtype, device, form, masked)
    ref_h = h.detach().clone().requires_grad_(True)
    ref = misdirection_loss(ref_h, token_mask=mask, backend="torch", **kwargs)
    ref.backward()
    h.requires_grad_(True)
    got = misdirection_loss(h, token_mask=mask, backend=backend, **kwargs)
    got.backward()
    assert got.dtype == torch.float32 and h.grad.dtype == dtype and h.grad.shape == h.shape
    assert_close(got, ref, torch.float32, scale=10)
    assert_close(h.grad, ref_h.grad, dtype, scale=1e-3)
    if mask is not None:
        assert (h.grad[~mask] == 0).all()


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
def test_strided_views_and_grad_scaling(backend, device, dtype):
    wide = torch.randn(6, 300, device=device, dtype=dtype)
    h = wide[:, 17:148]  # rows 300 apart, not contiguous
    anchor_wide = torch.randn(6, 400, device=device, dtype=dtype)
    anchor = anchor_wide[:, 200:331]
    control = torch.randn(131, device=device)
    importance = torch.rand(131, device=device)
    grads = []
    for name in ("torch", backend):
        x = h.detach().clone().requires_grad_(True) if name == "torch" else h.detach().requires_grad_(True)
        loss = misdirection_loss(x, control, importance, anchor, backend=name)
        (loss * -2.5).backward()
        grads.append((loss, x.grad))
    assert not h.is_contiguous()
    assert_close(grads[1][0], grads[0][0], torch.float32, scale=10)
    assert_close(grads[1][1], grads[0][1], dtype, scale=1e-3)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), d=st.integers(1, 70), form=st.sampled_from(FORMS),
       keep=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_cpu_kernel_property(rows, d, form, keep, seed):
    pytest.importorskip("unlearn_kernels._C")
    h, kwargs, _ = make_inputs((rows, d), torch.float32, "cpu", form, "none", seed)
    mask = torch.rand(rows, generator=torch.Generator().manual_seed(seed)) < keep
    mask[seed % rows] = True  # at least one valid token
    loss, grad = torch.ops.unlearn_kernels.misdirection_fwd_bwd(
        h, kwargs.get("control"), kwargs.get("importance"), kwargs.get("anchor"), mask, 0.25, True)
    ref_loss, ref_grad = _misdirection_torch(h, kwargs.get("control"), kwargs.get("importance"),
                                             kwargs.get("anchor"), mask, 0.25, True)
    assert_close(loss, ref_loss, torch.float32, scale=10)
    assert_close(grad, ref_grad, torch.float32)


def test_no_grad_path_returns_loss_only():
    h, kwargs, mask = make_inputs((3, 7, 131), torch.float32, "cpu", "srmu")
    with torch.no_grad():
        loss = misdirection_loss(h, token_mask=mask, **kwargs)
    assert not loss.requires_grad
    assert_close(loss, misdirection_loss(h, token_mask=mask, backend="torch", **kwargs), torch.float32, 10)


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("masked", ["none", "some"])
def test_masked_edit_matches_reference(backend, device, dtype, masked):
    h, _, mask = make_inputs((3, 7, 131), dtype, device, "srmu", masked)
    importance = torch.rand(131, device=device)
    control = torch.randn(131, device=device) * 4
    got = masked_edit(h, importance, control, 0.7, mask, backend=backend)
    ref = masked_edit(h, importance, control, 0.7, mask, backend="torch")
    assert got.shape == h.shape and got.dtype == dtype
    assert_close(got, ref, dtype)
    if mask is not None:
        assert torch.equal(got[~mask], h[~mask])


def test_masked_edit_math_and_gradient():
    h = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    m = torch.tensor([0.0, 0.5, 1.0, 0.25])
    c = torch.tensor([1.0, -2.0, 3.0, 0.0])
    mask = torch.tensor([[True, False, True], [True, True, False]])
    out = masked_edit(h, m, c, 0.8, mask, backend="torch")
    expected = torch.where(mask[..., None], h + 0.8 * m.double() * (c.double() - h), h)
    assert torch.allclose(out, expected)
    for backend in ("torch", "cpu"):
        assert torch.autograd.gradcheck(lambda x: masked_edit(x, m, c, 0.8, mask, backend=backend), (h,))


def test_reference_kernels_agree_with_edit_definition_on_rows():
    h = torch.randn(5, 8)
    m, c = torch.rand(8), torch.randn(8)
    assert torch.allclose(_masked_edit_torch(h, m, c, 1.0, None), h + m * (c - h))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_torch_compile_traces_the_loss(backend):
    pytest.importorskip("unlearn_kernels._C")
    h, kwargs, mask = make_inputs((3, 5, 16), torch.float32, "cpu", "srmu")

    def step(x):
        return misdirection_loss(x, token_mask=mask, backend=backend, **kwargs)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=False)
    x1 = h.clone().requires_grad_(True)
    x2 = h.clone().requires_grad_(True)
    compiled(x1).backward()
    step(x2).backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-6)


def test_opcheck_compiled_ops():
    pytest.importorskip("unlearn_kernels._C")
    h = torch.randn(9, 13)
    args = [(h, torch.randn(13), torch.rand(13), torch.randn(9, 13), torch.rand(9) > 0.5, 0.1, True),
            (h, None, None, torch.randn(9, 13), None, 0.5, False)]
    for a in args:
        torch.library.opcheck(torch.ops.unlearn_kernels.misdirection_fwd_bwd, a)
    torch.library.opcheck(torch.ops.unlearn_kernels.masked_edit,
                          (h, torch.rand(13), torch.randn(13), 0.5, torch.rand(9) > 0.5))


def test_loss_is_deterministic():
    pytest.importorskip("unlearn_kernels._C")
    h, kwargs, mask = make_inputs((8, 64, 257), torch.float32, "cpu", "srmu")
    values = {misdirection_loss(h, token_mask=mask, backend="cpu", **kwargs).item() for _ in range(3)}
    assert len(values) == 1


ALL_BACKENDS = ["torch", "cpu"]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bad,error,words", [
    (dict(h=torch.arange(6).view(2, 3)), TypeError, "h must be float"),
    (dict(control=torch.randn(4)), ValueError, "control must have shape [3]"),
    (dict(importance=torch.full((3,), 1.5)), ValueError, "importance must lie in [0, 1]"),
    (dict(anchor=torch.randn(2, 4)), ValueError, "anchor must have the shape"),
    (dict(anchor=torch.randn(2, 3, dtype=torch.float16)), TypeError, "anchor must have the dtype"),
    (dict(token_mask=torch.zeros(2, dtype=torch.bool)), ValueError, "selects no token"),
    (dict(token_mask=torch.ones(3, dtype=torch.bool)), ValueError, "token_mask must have shape"),
    (dict(token_mask=torch.tensor([0, 2])), ValueError, "only 0 and 1"),
    (dict(control=None, importance=None, anchor=None), ValueError, "needs control, anchor"),
    (dict(control=None), ValueError, "importance weights the control term"),
    (dict(control=torch.arange(3)), TypeError, "control must be a floating"),
    (dict(h=torch.randn(0, 3), anchor=None), ValueError, "selects no token"),
])
def test_bad_input_is_named(backend, bad, error, words):
    pytest.importorskip("unlearn_kernels._C")
    args = dict(h=torch.randn(2, 3), control=torch.randn(3), importance=torch.rand(3), anchor=torch.randn(2, 3),
                token_mask=None)
    args.update(bad)
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        misdirection_loss(**args, backend=backend)


def test_bad_backend_and_device_named():
    with pytest.raises(ValueError, match="backend must be one of"):
        misdirection_loss(torch.randn(2, 3), torch.randn(3), backend="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='cuda' cannot run"):
            misdirection_loss(torch.randn(2, 3), torch.randn(3), backend="cuda")
    else:
        with pytest.raises(ValueError, match="control is on"):
            misdirection_loss(torch.randn(2, 3, device="cuda"), torch.randn(3))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_masked_edit_bad_alpha(backend):
    pytest.importorskip("unlearn_kernels._C")
    for alpha, error in ((float("nan"), ValueError), (float("inf"), ValueError), ("x", TypeError)):
        with pytest.raises(error, match="alpha"):
            masked_edit(torch.randn(2, 3), torch.rand(3), torch.randn(3), alpha, backend=backend)



@pytest.mark.parametrize("which", ["control", "anchor", "importance"])
def test_a_constant_that_requires_grad_is_refused(which):
    """The loss differentiates h only: a control, anchor or importance that requires grad would get
    no gradient without a word, so it is refused (detached ones run)."""
    h = torch.randn(4, 6, requires_grad=True)
    args = {"control": torch.randn(6), "anchor": torch.randn(4, 6), "importance": torch.rand(6)}
    args[which].requires_grad_(True)
    with pytest.raises(ValueError, match=f"no gradient to {which}"):
        misdirection_loss(h, **args)
    args[which] = args[which].detach()
    misdirection_loss(h, **args).backward()
    assert h.grad is not None
