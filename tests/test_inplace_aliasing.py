"""In-place ops are honest: they bump autograd version counters on every backend (a graph that
saved the tensor raises, as after ``torch.optim``), and refuse overlapping or expanded arguments
with a named error before touching anything."""

from __future__ import annotations

import pytest
import torch

from conftest import FP32_BACKENDS as BACKENDS, device_of
from unlearn_kernels.ops import disruption_mask_, hessian_ema_, masked_sophia_step_


# the elementwise in-place ops, each writing its first argument from a second of the same shape
ELEMENTWISE = {"hessian_ema_": lambda t, other, backend: hessian_ema_(t, other, beta=0.5, backend=backend),
               "disruption_mask_": lambda t, other, backend: disruption_mask_(t, other, 0.5, backend=backend)}


@pytest.mark.parametrize("op", list(ELEMENTWISE))
@pytest.mark.parametrize("backend", BACKENDS)
def test_elementwise_ops_bump_the_version_counter(backend, op):
    dev = device_of(backend)
    w = torch.randn(4, 3, device=dev, requires_grad=True)
    loss = (w * w).sum()                       # saves w
    version = w._version
    ELEMENTWISE[op](w.detach(), torch.ones(4, 3, device=dev), backend)
    assert w._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sophia_step_bumps_param_and_state_versions(backend):
    dev = device_of(backend)
    w = torch.randn(8, 4, device=dev, requires_grad=True)
    loss = (w * w).sum()
    m, h = torch.zeros(8, 4, device=dev), torch.rand(8, 4, device=dev)
    versions = (w._version, m._version)
    with torch.no_grad():
        masked_sophia_step_([w], [torch.randn(8, 4, device=dev)], [m], [h], lr=1e-2, backend=backend)
    assert w._version > versions[0] and m._version > versions[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # as torch.optim does
    v = torch.randn(3, requires_grad=True)
    later = (v * v).sum()
    v.grad = torch.ones(3)
    torch.optim.SGD([v], lr=0.1).step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        later.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_hessian_ema_refuses_partial_overlap(backend):
    dev = device_of(backend)
    buf = torch.rand(10, device=dev)
    before = buf.clone()
    with pytest.raises(ValueError, match="hess and a overlap in memory"):
        hessian_ema_(buf[1:], buf[:-1], beta=0.5, backend=backend)
    with pytest.raises(ValueError, match="hess and b overlap in memory"):
        hessian_ema_(buf[:6], torch.ones(6, device=dev), buf[3:9], beta=0.5, backend=backend)
    assert torch.equal(buf, before)
    # the same tensor as hess and a is fine (elementwise): h ← β h + (1 − β) h²
    same = torch.rand(5, device=dev)
    expected = 0.5 * same + 0.5 * same * same
    hessian_ema_(same, same, beta=0.5, backend=backend)
    torch.testing.assert_close(same, expected)
    # disjoint halves of one buffer are fine too
    halves = torch.rand(10, device=dev)
    expected = 0.5 * halves[:5] + 0.5 * halves[5:] ** 2
    hessian_ema_(halves[:5], halves[5:], beta=0.5, backend=backend)
    torch.testing.assert_close(halves[:5], expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sophia_refuses_aliased_or_expanded_arguments_before_touching_any(backend):
    dev = device_of(backend)
    a, b = torch.randn(4, 3, device=dev), torch.randn(4, 3, device=dev)
    grads = [torch.randn(4, 3, device=dev) for _ in range(2)]
    m = [torch.zeros(4, 3, device=dev) for _ in range(2)]
    h = [torch.rand(4, 3, device=dev) for _ in range(2)]
    snapshot = [t.clone() for t in (a, b, *m)]
    expanded = torch.randn(1, 3, device=dev).expand(4, 3)
    cases = [
        (([a, expanded], grads, m, [h[0], h[1]]), r"params\[1\] must not be an expanded"),
        (([a, b], [grads[0], a], m, h), r"params\[0\] and grads\[1\] are the same memory"),
        (([a, b], grads, [m[0], m[0]], h), r"exp_avgs\[0\] and exp_avgs\[1\] are the same memory"),
        (([a, b], grads, m, [h[0], b]), r"params\[1\] and hessians\[1\] are the same memory"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            masked_sophia_step_(*args, lr=1e-2, backend=backend)
        assert all(torch.equal(t, s) for t, s in zip((a, b, *m), snapshot))   # nothing touched
    flat = torch.randn(10, device=dev)
    overlapping = [flat[:6].view(2, 3), flat[4:10].view(2, 3)]
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] overlap in memory"):
        masked_sophia_step_(overlapping, [torch.ones(2, 3, device=dev)] * 2,
                            [torch.zeros(2, 3, device=dev) for _ in range(2)],
                            [torch.ones(2, 3, device=dev) for _ in range(2)], lr=1e-2, backend=backend)
