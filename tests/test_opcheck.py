"""``torch.library.opcheck`` (schema, autograd registration, fake tensor, dynamic shapes) on
the differentiable kernels of every backend, **with** ``requires_grad`` inputs; and an input
the kernel formula gives no gradient for raises instead of returning None."""

from __future__ import annotations

import pytest
import torch

from unlearn_kernels._extension import compiled
from unlearn_kernels.ops import _backend, masked_gram

TRITON = _backend.available("triton", torch.device("cpu"), torch.float32) or torch.cuda.is_available()
KINDS = [pytest.param("", marks=pytest.mark.skipif(not compiled(), reason="C++ extension not built")),
         pytest.param("triton_", marks=pytest.mark.skipif(not TRITON, reason="triton unavailable here"))]


def op(prefix: str, name: str):
    return getattr(torch.ops.unlearn_kernels, prefix + name)


def device(prefix):
    return torch.device("cuda") if prefix == "triton_" and torch.cuda.is_available() else torch.device("cpu")


def rows(n, d, dev, grad=True):
    g = torch.Generator().manual_seed(n * 31 + d)
    return torch.randn(n, d, generator=g).to(dev).requires_grad_(grad)


@pytest.mark.parametrize("prefix", KINDS)
def test_misdirection_kernel(prefix):
    dev = device(prefix)
    h, c, w = rows(7, 12, dev), torch.randn(12, device=dev), torch.rand(12, device=dev)
    a, mask = torch.randn(7, 12, device=dev), torch.tensor([True, False] * 3 + [True], device=dev)
    for args in [(h, c, w, a, mask, 0.02, True), (h, c, None, None, None, 0.1, True), (h, None, None, a, mask, 0.3, False)]:
        torch.library.opcheck(op(prefix, "misdirection_fwd_bwd"), args)


@pytest.mark.parametrize("prefix", KINDS)
def test_masked_edit_kernel(prefix):
    dev = device(prefix)
    h, w, c = rows(5, 9, dev), torch.rand(9, device=dev), torch.randn(9, device=dev)
    mask = torch.tensor([True, False, True, True, False], device=dev)
    torch.library.opcheck(op(prefix, "masked_edit"), (h, w, c, 0.7, mask))
    torch.library.opcheck(op(prefix, "masked_edit"), (h, w, c, 1.0, None))


@pytest.mark.parametrize("prefix", KINDS)
def test_low_rank_kernels(prefix):
    dev = device(prefix)
    u, _ = torch.linalg.qr(torch.randn(16, 3))
    u = u.to(dev).requires_grad_()
    x = rows(6, 16, dev)
    torch.library.opcheck(op(prefix, "low_rank_project"), (x, u, 0.8, True))
    torch.library.opcheck(op(prefix, "low_rank_project"), (x, u.detach(), 1.0, False))
    mask = torch.tensor([True, True, False, True, False, True], device=dev)
    torch.library.opcheck(op(prefix, "masked_gram"), (x, mask))
    torch.library.opcheck(op(prefix, "masked_gram"), (x, None))


@pytest.mark.parametrize("prefix", KINDS)
def test_no_gradient_for_the_control_raises(prefix):
    dev = device(prefix)
    h, c = rows(4, 8, dev), torch.randn(8, device=dev, requires_grad=True)
    loss, _ = op(prefix, "misdirection_fwd_bwd")(h, c, None, None, None, 0.1, True)
    with pytest.raises(RuntimeError, match="no gradient for input"):
        loss.backward()


def test_masked_gram_is_differentiable_and_agrees():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, False, True, True, False, True])
    for backend in [b for b in ("cpu", "torch") if _backend.available(b, torch.device("cpu"), torch.float64)]:
        assert torch.autograd.gradcheck(lambda x: masked_gram(x, mask, backend=backend), (x,))


@pytest.mark.parametrize("prefix", KINDS)
def test_statistics_kernels(prefix):
    dev = device(prefix)
    x = rows(9, 6, dev)
    mask = torch.tensor([True, False, True, True, True, False, True, True, False], device=dev)
    # its first output is the int64 count, which opcheck's AOT test cannot sum with the float
    # outputs: that test is replaced by gradcheck below
    no_aot = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(op(prefix, "masked_moments"), (x, mask), test_utils=no_aot)
    torch.library.opcheck(op(prefix, "masked_moments"), (x, None), test_utils=no_aot)
    from unlearn_kernels.ops.moments import _moments_torch

    a, b = torch.randn(6, device=dev), torch.randn(6, device=dev)
    grads = [torch.autograd.grad((kernel(x, mask)[1] * a).sum() + (kernel(x, mask)[2] * b).sum(), x)[0]
             for kernel in (op(prefix, "masked_moments"), _moments_torch)]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)
    means = [torch.randn(6, device=dev, requires_grad=True) for _ in range(2)]
    variances = [(torch.rand(6, device=dev) + 0.1).requires_grad_() for _ in range(2)]
    torch.library.opcheck(op(prefix, "feature_scores"), (means[0], variances[0], means[1], variances[1], 1e-6))
    labels = torch.tensor([0, 2, 2, 1, 0, 2, 0, 1, 2], device=dev)
    torch.library.opcheck(op(prefix, "class_means"), (x, labels, 4))
    w = rows(5, 7, dev)
    hf, hr = torch.rand(5, 7, device=dev, requires_grad=True), torch.rand(5, 7, device=dev, requires_grad=True)
    for dim in (0, 1):
        torch.library.opcheck(op(prefix, "neuron_scores"), (w, hf, hr, dim))
    torch.library.opcheck(op(prefix, "neuron_scores"), (w, hf, None, 1))


@pytest.mark.parametrize("prefix", KINDS)
def test_mutating_kernels(prefix):
    """The in-place ops (schema ``Tensor(a!)``) under every opcheck util, with inputs that
    require grad: they have no derivative of their own (optimizer state updates), and their
    fake kernels, schemas and dynamic shapes agree with the real ones."""
    dev = device(prefix)
    hess = torch.rand(7, 5, device=dev)
    a, b = rows(7, 5, dev), rows(7, 5, dev)
    torch.library.opcheck(op(prefix, "hessian_ema_"), (hess, a, b, 0.9))
    torch.library.opcheck(op(prefix, "hessian_ema_"), (hess, a.detach(), None, 0.5))
    shapes = [(6, 4), (5,)]
    params = [torch.randn(s, device=dev) for s in shapes]
    grads = [torch.randn(s, device=dev, requires_grad=True) for s in shapes]
    exp_avgs = [torch.randn(s, device=dev) for s in shapes]
    hessians = [torch.rand(s, device=dev) for s in shapes]
    masks = [torch.tensor([True, False, True, True, False, True], device=dev), None]
    args = (params, grads, exp_avgs, hessians, masks, [0, 0], 1e-2, 0.9, 0.05, 0.01, 1e-12, 1.0)
    torch.library.opcheck(op(prefix, "masked_sophia_step_"), args)


@pytest.mark.parametrize("prefix", KINDS)
def test_disruption_mask_kernels(prefix):
    """Not differentiable (its inputs are gradients): opcheck on inputs that do not require
    grad, every dtype of the backend, the in-place variant and an empty tensor."""
    dev = device(prefix)
    dtypes = [torch.float32] if prefix == "triton_" and dev.type == "cpu" else \
        [torch.float32, torch.bfloat16, torch.float16] + ([torch.float64] if prefix == "" else [])
    for dtype in dtypes:
        g, r = rows(9, 13, dev, grad=False).to(dtype), rows(13, 9, dev, grad=False).t().contiguous().to(dtype)
        torch.library.opcheck(op(prefix, "disruption_mask"), (g, r, 0.25))
        torch.library.opcheck(op(prefix, "disruption_mask_"), (g.clone(), r, -1.5))
    empty = torch.ones(0, device=dev)
    torch.library.opcheck(op(prefix, "disruption_mask"), (empty, empty, 1.0))
