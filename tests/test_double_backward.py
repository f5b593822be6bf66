"""Second derivatives through the fused ops equal plain PyTorch's, on every backend that runs
here: Hessian-vector products by ``torch.autograd.grad(..., create_graph=True)`` twice, and
``hutchinson_pairs`` over our ops against the same over the reference formulas."""

from __future__ import annotations

import pytest
import torch

from conftest import FP32_BACKENDS as BACKENDS, device_of
from unlearn_kernels.ops import hutchinson_pairs, low_rank_project, masked_edit, misdirection_loss


def hvp(f, x, v):
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), x)
    return hv


def reference_misdirection(h, control, importance, anchor, mask):
    w = importance if importance is not None else torch.ones_like(control)
    terms = w * (h - control) ** 2
    if anchor is not None:
        terms = terms + (1 - w) * (h - anchor) ** 2
    valid = mask[..., None]
    return torch.where(valid, terms, 0).sum() / (mask.sum() * h.shape[-1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_anchor", [False, True])
def test_misdirection_hvp_matches_plain_torch(backend, with_anchor):
    dev = device_of(backend)
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(3, 7, 13, generator=gen).to(dev).requires_grad_()
    control, importance = torch.randn(13, generator=gen).to(dev), torch.rand(13, generator=gen).to(dev)
    anchor = torch.randn(3, 7, 13, generator=gen).to(dev) if with_anchor else None
    mask = (torch.rand(3, 7, generator=gen) > 0.3).to(dev)
    mask[1] = False                                        # a sequence with no valid token
    v = torch.randn(3, 7, 13, generator=gen).to(dev)
    ours = hvp(lambda x: misdirection_loss(x, control, importance, anchor, mask, backend=backend), h, v)
    ref = hvp(lambda x: reference_misdirection(x, control, importance, anchor, mask), h, v)
    assert ref.abs().max() > 0
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    # the first derivative is unchanged by the create_graph path
    (g1,) = torch.autograd.grad(misdirection_loss(h, control, importance, anchor, mask, backend=backend), h)
    (g2,) = torch.autograd.grad(reference_misdirection(h, control, importance, anchor, mask), h)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hutchinson_over_misdirection_is_not_zero(backend):
    """The loss of a linear layer's output: Hz from our op equals Hz from the reference."""
    dev = device_of(backend)
    torch.manual_seed(0)
    w = torch.randn(6, 13, device=dev, requires_grad=True)
    x = torch.randn(4, 5, 6, device=dev)
    control = torch.randn(13, device=dev)
    mask = torch.ones(4, 5, dtype=torch.bool, device=dev)
    ours = hutchinson_pairs(misdirection_loss(x @ w, control, backend=backend), [w],
                            generator=torch.Generator(device=dev).manual_seed(3))
    ref = hutchinson_pairs(reference_misdirection(x @ w, control, None, None, mask), [w],
                           generator=torch.Generator(device=dev).manual_seed(3))
    (z1, hz1), (z2, hz2) = ours[0], ref[0]
    assert torch.equal(z1, z2) and hz2.abs().max() > 1e-3
    torch.testing.assert_close(hz1, hz2, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_rank_project_double_backward(backend):
    dev = device_of(backend)
    gen = torch.Generator().manual_seed(2)
    u0, _ = torch.linalg.qr(torch.randn(16, 3, generator=gen))
    x = torch.randn(2, 5, 16, generator=gen).to(dev).requires_grad_()
    u = u0.to(dev).requires_grad_()
    target = torch.randn(2, 5, 16, generator=gen).to(dev)

    def loss(fn, x, u):
        return ((fn(x, u) - target) ** 2).sum()

    ours = lambda x, u: low_rank_project(x, u, 0.7, backend=backend)       # noqa: E731
    ref = lambda x, u: x - 0.7 * (x @ u) @ u.T                              # noqa: E731
    vx, vu = torch.randn_like(x), torch.randn_like(u)
    results = []
    for fn in (ours, ref):
        gx, gu = torch.autograd.grad(loss(fn, x, u), (x, u), create_graph=True)
        results.append(torch.autograd.grad((gx * vx).sum() + (gu * vu).sum(), (x, u)))
    for a, b in zip(*results):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_edit_double_backward(backend):
    dev = device_of(backend)
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(3, 11, generator=gen).to(dev).requires_grad_()
    m, c = torch.rand(11, generator=gen).to(dev), torch.randn(11, generator=gen).to(dev)
    mask = torch.tensor([True, False, True], device=dev)
    v = torch.randn(3, 11, generator=gen).to(dev)
    ours = hvp(lambda x: (masked_edit(x, m, c, 0.6, mask, backend=backend) ** 3).sum(), h, v)
    ref = hvp(lambda x: (torch.where(mask[:, None], x + 0.6 * m * (c - x), x) ** 3).sum(), h, v)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
