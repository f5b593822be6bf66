"""``torch.func.grad`` and ``torch.autograd.functional`` through the differentiable fused ops
equal the same over plain-torch formulas; ``vmap`` raises a clear error instead of a wrong
answer."""

from __future__ import annotations

import pytest
import torch

from conftest import FP32_BACKENDS as BACKENDS, device_of
from unlearn_kernels.ops import low_rank_project, masked_edit, misdirection_loss


def data(dev):
    g = torch.Generator().manual_seed(5)
    h, c, m = torch.randn(4, 9, generator=g), torch.randn(9, generator=g), torch.rand(9, generator=g)
    a = torch.randn(4, 9, generator=g)
    u, _ = torch.linalg.qr(torch.randn(9, 3, generator=g))
    mask = torch.tensor([True, False, True, True])
    return [t.to(dev) for t in (h, c, m, a, u, mask)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_grad_and_hessian_of_misdirection(backend):
    h, c, m, a, _, mask = data(device_of(backend))
    ours = lambda x: misdirection_loss(x, c, m, a, mask, backend=backend)                # noqa: E731
    ref = lambda x: torch.where(mask[:, None], m * (x - c) ** 2 + (1 - m) * (x - a) ** 2, 0).sum() / (3 * 9)  # noqa: E731
    torch.testing.assert_close(torch.func.grad(ours)(h), torch.func.grad(ref)(h))
    torch.testing.assert_close(torch.autograd.functional.hessian(ours, h), torch.autograd.functional.hessian(ref, h))
    torch.testing.assert_close(torch.func.jacrev(torch.func.grad(ours))(h), torch.func.jacrev(torch.func.grad(ref))(h))


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_grad_of_low_rank_project_and_masked_edit(backend):
    h, c, m, _, u, mask = data(device_of(backend))
    f = lambda x, u: (low_rank_project(x, u, 0.5, assume_orthonormal=True, backend=backend) ** 2).sum()  # noqa: E731
    r = lambda x, u: ((x - 0.5 * (x @ u) @ u.T) ** 2).sum()                               # noqa: E731
    for ours, ref in zip(torch.func.grad(f, argnums=(0, 1))(h, u), torch.func.grad(r, argnums=(0, 1))(h, u)):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    e = lambda x: (masked_edit(x, m, c, 0.5, mask, backend=backend) ** 2).sum()          # noqa: E731
    re = lambda x: (torch.where(mask[:, None], x + 0.5 * m * (c - x), x) ** 2).sum()     # noqa: E731
    torch.testing.assert_close(torch.func.grad(e)(h), torch.func.grad(re)(h))


def test_vmap_raises_a_clear_error():
    h, c, m, _, u, _ = data(torch.device("cpu"))
    batch = torch.stack([h, h])
    with pytest.raises(NotImplementedError, match="misdirection_loss has no torch.func.vmap rule"):
        torch.func.vmap(lambda x: misdirection_loss(x, c))(batch)
    with pytest.raises(NotImplementedError, match="masked_edit has no torch.func.vmap rule"):
        torch.func.vmap(lambda x: masked_edit(x, m, c))(batch)
    with pytest.raises(NotImplementedError, match="low_rank_project has no torch.func.vmap rule"):
        torch.func.vmap(lambda x: low_rank_project(x, u))(batch)
