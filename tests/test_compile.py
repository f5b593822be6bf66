"""``torch.compile(fullgraph=True)`` through every optional argument of the misdirection ops,
matching eager; value checks (mask counts, [0, 1] ranges) run in eager mode only."""

from __future__ import annotations

import pytest
import torch

from unlearn_kernels.ops import _backend, disruption_mask, disruption_mask_, masked_edit, misdirection_loss

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


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_rank_and_statistics_compile_without_breaks(backend):
    from unlearn_kernels.ops import low_rank_project, masked_gram, masked_moments

    torch._dynamo.reset()
    h, _, _, _, mask = inputs(2)
    u0, _ = torch.linalg.qr(torch.randn(16, 3))

    def step(h, u, mask):
        y = low_rank_project(h, u, backend=backend)
        stats = masked_moments(h, mask, backend=backend)
        return (y ** 2).sum() + masked_gram(h, mask, backend=backend).sum() + stats.m2.sum()

    u1, u2 = u0.clone().requires_grad_(), u0.clone().requires_grad_()
    eager = step(h, u1, mask)
    graph = torch.compile(step, backend="aot_eager", fullgraph=True)(h, u2, mask)
    torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-3)
    eager.backward()
    graph.backward()
    torch.testing.assert_close(u2.grad, u1.grad, rtol=1e-5, atol=1e-4)


def test_class_means_keeps_its_label_check_under_compile():
    """An out-of-range label would make the kernels write outside the output: that check reads
    the labels and stays (one graph break) rather than being skipped."""
    from unlearn_kernels.ops import class_means

    torch._dynamo.reset()
    compiled = torch.compile(lambda x, y: class_means(x, y, 3)[0], backend="aot_eager")
    x = torch.randn(6, 4)
    torch.testing.assert_close(compiled(x, torch.tensor([0, 1, 2, 0, 1, 2])),
                               class_means(x, torch.tensor([0, 1, 2, 0, 1, 2]), 3)[0])
    with pytest.raises(ValueError, match="labels must lie in"):
        compiled(x, torch.tensor([0, 1, 5, 0, 1, 2]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_disruption_mask_compiles_both_variants(backend):
    torch._dynamo.reset()

    def step(g, r):
        out, kept = disruption_mask(g, r, 0.5, return_kept=True, backend=backend)
        _, kept_in_place = disruption_mask_(g, r, 2.0, return_kept=True, backend=backend)
        return out, kept, kept_in_place, g.sum()

    gen = torch.Generator().manual_seed(4)
    g, r = torch.randn(6, 7, generator=gen), torch.randn(6, 7, generator=gen)
    g_eager, g_graph = g.clone(), g.clone()
    eager = step(g_eager, r)
    graph = torch.compile(step, backend="aot_eager", fullgraph=True)(g_graph, r)
    for a, b in zip(graph, eager):
        assert torch.equal(a, b)
    assert torch.equal(g_graph, g_eager)
