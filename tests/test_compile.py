"""``torch.compile(fullgraph=True)`` through every optional argument of the misdirection ops,
matching eager; value checks (mask counts, [0, 1] ranges) run in eager mode only."""

from __future__ import annotations

import pytest
import torch

from unlearn_kernels.ops import _backend, masked_edit, misdirection_loss

BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not _backend.available(b, torch.device("cpu"), torch.float32),
                                                     reason=f"{b} unavailable here"))
            for b in ("cpu", "torch")]


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 6, 16, generator=g)
    mask = torch.rand(2, 6, generator=g) > 0.4
    mask[0, 0] = True
    return h, torch.randn(16, generator=g), torch.rand(16, generator=g), torch.randn(2, 6, 16, generator=g), mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_misdirection_loss_compiles_with_every_argument(backend):
    torch._dynamo.reset()
    h, control, importance, anchor, mask = inputs()

    def step(h, control, importance, anchor, mask):
        return misdirection_loss(h, control, importance, anchor, mask, backend=backend)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x1, x2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    eager, graph = step(x1, control, importance, anchor, mask), compiled(x2, control, importance, anchor, mask)
    torch.testing.assert_close(graph, eager)
    eager.backward()
    graph.backward()
    torch.testing.assert_close(x2.grad, x1.grad)
    explained = torch._dynamo.explain(step)(h.clone().requires_grad_(), control, importance, anchor, mask)
    assert explained.graph_break_count == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_edit_compiles(backend):
    torch._dynamo.reset()
    h, control, importance, _, mask = inputs(1)

    def edit(h, importance, control, mask):
        return masked_edit(h, importance, control, 0.5, mask, backend=backend)

    compiled = torch.compile(edit, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(h, importance, control, mask), edit(h, importance, control, mask))


def test_value_checks_still_run_in_eager():
    h, control, importance, anchor, mask = inputs()
    with pytest.raises(ValueError, match="importance must lie in"):
        misdirection_loss(h, control, importance + 2, anchor, mask)
    with pytest.raises(ValueError, match="selects no token"):
        misdirection_loss(h, control, importance, anchor, torch.zeros_like(mask))
