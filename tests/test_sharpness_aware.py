"""``sam_rho`` on a method: the gradient the optimizer receives is ``∇L_u(θ + ε) + ∇L_r(θ)`` with
``ε = ρ g / ‖g‖``, ``g = ∇L_u(θ)`` and ``‖·‖`` the 2-norm over every updated weight — computed here
by hand in plain torch on the same batches and compared with what the method hands its optimizer
— the weights are put back exactly before the update, ``sam_rho=0`` is the plain step bit for
bit, and the setting is refused where it cannot mean anything."""

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
    settings = {"steps": 1, "batch_size": 4, "lr": 1e-3, "progress": False,
                "update": ["layers.1.mlp.*", "layers.2.mlp.*"], **settings}
    config = make_config(registry[name].config_class, **settings)
    return registry[name](model, tokenizer, config=config)


def recording(method):
    """Record the gradients and the weights the optimizer is handed (just before its step)."""
    seen = {"grads": {}, "weights": {}}

    def before_step():
        seen["grads"].update({n: p.grad.clone() for n, p in method.params.items()})
        seen["weights"].update({n: p.detach().clone() for n, p in method.params.items()})
    method.before_step = before_step
    return seen


def by_hand(name, model, tokenizer, forget, retain, rho, grad_accum=1, **settings):
    """``(∇L_u(θ + ε) + ∇L_r(θ))`` per weight, from the method's own loss terms on its own batches,
    with ε formed and applied here in plain torch."""
    reference = build(name, model, tokenizer, grad_accum=grad_accum, **settings)
    reference.prepare(forget, retain)
    names, params = list(reference.params), list(reference.params.values())
    forget_batches, retain_batches = reference.batches(forget), reference.batches(retain, 1)
    drawn = [(next(forget_batches), next(retain_batches)) for _ in range(grad_accum)]
    unlearn = [torch.zeros_like(p) for p in params]
    keep = [torch.zeros_like(p) for p in params]
    for f, r in drawn:
        losses = reference.loss(f, r, 0)
        u = torch.autograd.grad(sum(v for k, v in losses.items() if k != "retain") / grad_accum, params,
                                retain_graph=True)
        k = torch.autograd.grad(losses["retain"] / grad_accum, params)
        unlearn = [a + b for a, b in zip(unlearn, u)]
        keep = [a + b for a, b in zip(keep, k)]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in unlearn))
    originals = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, unlearn):
            p.add_(rho * g / norm.to(g.dtype))
    at_eps = [torch.zeros_like(p) for p in params]
    for f, r in drawn:
        losses = reference.loss(f, r, 0)
        u = torch.autograd.grad(sum(v for k, v in losses.items() if k != "retain") / grad_accum, params)
        at_eps = [a + b for a, b in zip(at_eps, u)]
    return ({n: a + k for n, a, k in zip(names, at_eps, keep)}, {n: g + k for n, g, k in zip(names, unlearn, keep)},
            dict(zip(names, originals)))


@pytest.mark.parametrize("name, rho, grad_accum", [("GradDiff", 0.05, 1), ("NPO", 0.05, 1), ("GradDiff", 0.05, 2),
                                                   ("RMU", 0.02, 1)])
def test_the_update_is_the_unlearning_gradient_at_the_perturbed_weights_plus_the_retain_gradient(
        data, name, rho, grad_accum):
    forget, retain = data
    model, tokenizer = tiny.load()
    untouched = copy.deepcopy(model)
    extra = {"layer": 2} if name == "RMU" else {}
    method = build(name, model, tokenizer, sam_rho=rho, grad_accum=grad_accum, **extra)
    seen = recording(method)
    method.fit(forget, retain)

    want, plain, originals = by_hand(name, untouched, tokenizer, forget, retain, rho, grad_accum, **extra)
    differs = 0.0
    for n in want:
        torch.testing.assert_close(seen["grads"][n], want[n], rtol=1e-4, atol=1e-6)
        differs = max(differs, float((want[n] - plain[n]).abs().max() / plain[n].abs().max()))
        assert torch.equal(seen["weights"][n], originals[n])     # put back exactly before the update
    assert differs > 1e-3                          # the perturbation changes the gradient: the test can fail


def test_the_step_is_adamw_on_that_gradient(data):
    """After the step, each weight is θ − lr · ĝ / (|ĝ| + eps) (AdamW's first step, bias-corrected,
    no weight decay) with ĝ the hand-computed sharpness-aware gradient. Where ĝ is so small that its
    rounding decides its sign, the step is only checked to be at most lr."""
    forget, retain = data
    model, tokenizer = tiny.load()
    untouched = copy.deepcopy(model)
    method = build("GradDiff", model, tokenizer, sam_rho=0.05)
    method.fit(forget, retain)
    want, _, originals = by_hand("GradDiff", untouched, tokenizer, forget, retain, 0.05)
    for n, g in want.items():
        expected = originals[n] - 1e-3 * g / (g.abs() + 1e-8)
        clear = g.abs() > 1e-5 * g.abs().max()
        assert clear.float().mean() > 0.9
        torch.testing.assert_close(method.params[n].detach()[clear], expected[clear], rtol=0, atol=2e-6)
        assert float((method.params[n].detach() - originals[n]).abs().max()) <= 1e-3 * (1 + 1e-5)


@pytest.mark.parametrize("name", ["GradDiff", "NPO", "RMU"])
def test_rho_zero_is_the_plain_step_bit_for_bit(data, name):
    forget, retain = data
    extra = {"layer": 2, "steps": 3} if name == "RMU" else {"steps": 3}
    runs = []
    for settings in ({}, {"sam_rho": 0.0}):
        model, tokenizer = tiny.load()
        build(name, model, tokenizer, **extra, **settings).fit(forget, retain)
        runs.append(model.state_dict())
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_without_a_retain_term_it_perturbs_the_forget_loss_alone(data):
    """GradAscent has no retain term: the update is ∇L_u(θ + ε) alone."""
    forget, retain = data
    model, tokenizer = tiny.load()
    untouched = copy.deepcopy(model)
    method = build("GradAscent", model, tokenizer, sam_rho=0.05)
    seen = recording(method)
    method.fit(forget, retain)
    reference = build("GradAscent", untouched, tokenizer)
    reference.prepare(forget, retain)
    batch = next(reference.batches(forget))
    params = list(reference.params.values())
    g = torch.autograd.grad(sum(reference.loss(batch, None, 0).values()), params)
    norm = torch.sqrt(sum((x ** 2).sum() for x in g))
    with torch.no_grad():
        for p, x in zip(params, g):
            p.add_(0.05 * x / norm)
    at_eps = torch.autograd.grad(sum(reference.loss(batch, None, 0).values()), params)
    for n, x in zip(reference.params, at_eps):
        torch.testing.assert_close(seen["grads"][n], x, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name, message", [("TAR", "simulated attack"), ("MRP", "changes no weight")])
def test_methods_where_it_has_no_meaning_refuse_it(name, message):
    model, tokenizer = tiny.load()
    with pytest.raises(UserError, match=f"{name} does not use the setting sam_rho.*{message}"):
        registry[name](model, tokenizer, config=make_config(registry[name].config_class, sam_rho=0.1))


def test_a_negative_radius_is_refused():
    with pytest.raises(Exception, match="sam_rho"):
        make_config(registry["GradDiff"].config_class, sam_rho=-0.1)


@pytest.mark.parametrize("name, settings", [("SIMU", {"score_batches": 1}), ("SO-GradDiff", {}), ("SRMU", {"layer": 2}),
                                            ("AdaptiveRMU", {"layer": 2, "checkpointing": True})])
def test_the_other_gradient_methods_run_with_it_and_put_the_weights_back(data, name, settings):
    """One step with and without ``sam_rho`` from the same start: both move the weights, to
    different places (the perturbation was used and then undone, not left in the weights)."""
    forget, retain = data
    ends = []
    for rho in (0.0, 0.05):
        model, tokenizer = tiny.load()
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        method = build(name, model, tokenizer, sam_rho=rho, **settings)
        method.fit(forget, retain)
        ends.append({n: p.detach().clone() for n, p in method.params.items()})
        assert any(not torch.equal(p, start[n]) for n, p in ends[-1].items())
        untouched = [n for n, p in model.named_parameters() if n not in method.params]
        assert all(torch.equal(dict(model.named_parameters())[n], start[n]) for n in untouched)
    assert any(not torch.equal(ends[0][n], ends[1][n]) for n in ends[0])
