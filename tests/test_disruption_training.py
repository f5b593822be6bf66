"""``disruption_mask=True`` on a method: the gradient the optimizer receives is, weight by weight,
``where(g·r > 0, g, 0) + r`` with ``g`` the gradient of the unlearning terms and ``r`` that of the
retain term — computed here by hand with ``torch.autograd.grad`` on the same batches — and the
setting is refused where it cannot mean anything."""

from __future__ import annotations

import copy

import pytest
import torch

from unlearn_kernels.data import entangled
from unlearn_kernels.errors import UserError
from unlearn_kernels.methods import registry
from unlearn_kernels.methods.settings import make_config
from unlearn_kernels.models import tiny


@pytest.fixture(scope="module")
def data():
    bench = entangled.generate(0.3)
    return bench.corpus(bench.forget_facts())[:16], bench.corpus(bench.retain_facts())[:16]


def build(name, model, tokenizer, **settings):
    config = make_config(registry[name].config_class, steps=1, batch_size=4, lr=1e-3, progress=False,
                         update=["layers.1.mlp.*", "layers.2.mlp.*"], **settings)
    return registry[name](model, tokenizer, config=config)


@pytest.mark.parametrize("name, settings", [("GradDiff", {}), ("NPO", {})])
def test_the_update_is_the_masked_unlearning_gradient_plus_the_retain_gradient(data, name, settings):
    forget, retain = data
    model, tokenizer = tiny.load()
    untouched = copy.deepcopy(model)
    method = build(name, model, tokenizer, disruption_mask=True, **settings)
    seen = {}
    method.before_step = lambda: seen.update({n: p.grad.clone() for n, p in method.params.items()})
    method.fit(forget, retain)

    reference = build(name, untouched, tokenizer, **settings)
    reference.prepare(forget, retain)
    losses = reference.loss(next(reference.batches(forget)), next(reference.batches(retain, 1)), 0)
    params = list(reference.params.values())
    unlearn = torch.autograd.grad(sum(v for k, v in losses.items() if k != "retain"), params, retain_graph=True)
    keep = torch.autograd.grad(losses["retain"], params)
    kept = total = 0
    for (n, _), g, r in zip(reference.params.items(), unlearn, keep):
        want = torch.where(g * r > 0, g, torch.zeros_like(g)) + r
        torch.testing.assert_close(seen[n], want, rtol=1e-5, atol=1e-7)
        kept, total = kept + int((g * r > 0).sum()), total + g.numel()
    assert 0 < kept < total                        # some entries agree, some do not: the mask bites
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), untouched.parameters()))


def test_without_it_the_update_is_the_plain_sum(data):
    forget, retain = data
    model, tokenizer = tiny.load()
    untouched = copy.deepcopy(model)
    method = build("GradDiff", model, tokenizer)
    seen = {}
    method.before_step = lambda: seen.update({n: p.grad.clone() for n, p in method.params.items()})
    method.fit(forget, retain)
    reference = build("GradDiff", untouched, tokenizer)
    reference.prepare(forget, retain)
    losses = reference.loss(next(reference.batches(forget)), next(reference.batches(retain, 1)), 0)
    grads = torch.autograd.grad(sum(losses.values()), list(reference.params.values()))
    for n, g in zip(reference.params, grads):
        torch.testing.assert_close(seen[n], g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name, message", [("GradAscent", "no retain loss"), ("MRP", "changes no weight"),
                                           ("RMU", "nothing would agree"), ("SRMU", "nothing would agree")])
def test_methods_without_a_retain_gradient_refuse_it(name, message):
    model, tokenizer = tiny.load()
    with pytest.raises(UserError, match=f"disruption_mask.*{message}"):
        registry[name](model, tokenizer, config=make_config(registry[name].config_class, disruption_mask=True))


def test_it_needs_a_retain_term(data):
    forget, retain = data
    model, tokenizer = tiny.load()
    method = build("NPO", model, tokenizer, disruption_mask=True, retain_weight=0.0)
    with pytest.raises(UserError, match="disruption_mask needs a retain loss term"):
        method.fit(forget, retain)


def test_a_run_refuses_it_before_loading_the_model(tmp_path, no_loading):
    from unlearn_kernels.pipeline import RunConfig, run

    (tmp_path / "f.txt").write_text("a forget text\n")
    with pytest.raises(UserError, match="RMU does not use the setting disruption_mask"):
        run(RunConfig(model=str(tiny.ASSET_DIR), method="RMU", forget=[str(tmp_path / "f.txt")],
                      retain=[str(tmp_path / "f.txt")], out=str(tmp_path / "out"), stop="fixed",
                      settings={"disruption_mask": True}))
    assert not (tmp_path / "out").exists()
