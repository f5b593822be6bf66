"""``collapse_rank`` (CIR) on a method: the gradient the optimizer receives is, per updated Linear
weight, ``Σ gᵀ (x − x V Vᵀ)`` over the unlearning terms' passes plus the plain retain gradient
``Σ gᵀ x``, with ``V`` the top-k eigenvectors of the retain inputs' Gram matrix — all computed
here by hand in plain torch (fp64 eigendecomposition, hooks on the modules) and compared with
what the method hands its optimizer. The forward is unchanged, ``collapse_rank=0`` is the plain
step bit for bit, and the setting is refused where it cannot be done."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from unlearn_kernels.data import entangled
from unlearn_kernels.errors import UserError
from unlearn_kernels.methods import distributed, registry
from unlearn_kernels.methods.base import model_inputs
from unlearn_kernels.methods.settings import make_config

RANK = 8
UPDATES = {"GradDiff": ["layers.1.mlp.*", "layers.2.self_attn.*"],
           "RMU": ["layers.1.mlp.down_proj.weight", "layers.2.mlp.*"]}


@pytest.fixture(scope="module")
def data():
    bench = entangled.generate(0.3)
    return bench.corpus(bench.forget_facts())[:16], bench.corpus(bench.retain_facts())[:16]


def build(name, model, tokenizer, **settings):
    extra = {"layer": 2} if name == "RMU" else {}
    settings = {"steps": 1, "batch_size": 4, "lr": 1e-3, "progress": False, "update": UPDATES.get(name),
                "collapse_batches": 3, **extra, **settings}
    config = make_config(registry[name].config_class, **settings)
    return registry[name](model, tokenizer, config=config)


def recording(method):
    """Record the gradients the optimizer is handed (just before its step)."""
    seen = {}

    def before_step():
        seen.update({n: p.grad.clone() for n, p in method.params.items()})
    method.before_step = before_step
    return seen


def linears(method) -> dict[str, nn.Linear]:
    """The Linear modules owning the method's selected weights, by module name."""
    return {n.removesuffix(".weight"): m for n, m in
            ((n, method.model.get_submodule(n.removesuffix(".weight"))) for n in method.params)
            if isinstance(m, nn.Linear) and n.endswith(".weight")}


def projectors(method, retain, rank) -> dict[str, torch.Tensor]:
    """``I − V Vᵀ`` (fp64) per Linear, ``V`` the top-``rank`` eigenvectors of ``Σ xᵀx`` over the
    non-padding tokens of the method's statistics batches (full forwards of the plain model)."""
    modules, grams = linears(method), {}
    handles = []
    for name, module in modules.items():
        def hook(_m, args, name=name):
            x = args[0].detach().double()[current["mask"]]
            grams[name] = grams.get(name, 0) + x.T @ x
        handles.append(module.register_forward_pre_hook(hook))
    current = {}
    stream = method.batches(retain, 31)
    method.model.eval()
    with torch.no_grad():
        for _ in range(min(method.config.collapse_batches, -(-len(retain) // method.config.batch_size))):
            batch = next(stream)
            current["mask"] = batch["attention_mask"].bool()
            method.model(**model_inputs(batch), use_cache=False)
    method.model.train()
    for h in handles:
        h.remove()
    out = {}
    for name, g in grams.items():
        _, vectors = torch.linalg.eigh(g)
        v = vectors[:, -rank:]
        out[name] = torch.eye(g.shape[0], dtype=torch.float64) - v @ v.T
    return out


def by_hand(name, model, tokenizer, forget, retain, rank):
    """(collapsed unlearning gradient + plain retain gradient, plain unlearning gradient, plain
    retain gradient) per selected weight, from the method's own loss terms on its own batches."""
    reference = build(name, model, tokenizer)          # collapse_rank 0: the plain loss
    reference.prepare(forget, retain)
    proj = projectors(reference, retain, rank)
    modules = linears(reference)
    names, params = list(reference.params), list(reference.params.values())
    calls = {n: [] for n in modules}
    handles = []
    for mname, module in modules.items():
        def hook(_m, args, out, mname=mname):
            if out.requires_grad:
                x = args[0].detach()
                out.register_hook(lambda g, x=x: calls[mname].append((x, g.detach())))
        handles.append(module.register_forward_hook(hook))
    f, r = next(reference.batches(forget)), next(reference.batches(retain, 1))
    losses = reference.loss(f, r, 0)
    for h in handles:
        h.remove()
    unlearn = sum(v for k, v in losses.items() if k != "retain")
    plain_u = dict(zip(names, torch.autograd.grad(unlearn, params, retain_graph=True)))
    collapsed = {}
    for mname, pairs in calls.items():
        assert pairs, mname
        collapsed[mname + ".weight"] = sum(
            (g.reshape(-1, g.shape[-1]).double().T @ (x.reshape(-1, x.shape[-1]).double() @ proj[mname])).float()
            for x, g in pairs)
    for mname in calls:
        calls[mname].clear()
    plain_r = dict(zip(names, torch.autograd.grad(losses["retain"], params)))
    want = {n: collapsed.get(n, plain_u[n]) + plain_r[n] for n in names}
    return want, plain_u, plain_r, proj


@pytest.mark.parametrize("name", ["GradDiff", "RMU"])
def test_the_update_is_the_collapsed_unlearning_gradient_plus_the_plain_retain_gradient(data, shipped, name):
    forget, retain = data
    model, tokenizer = shipped()
    untouched = copy.deepcopy(model)
    method = build(name, model, tokenizer, collapse_rank=RANK)
    seen = recording(method)
    method.fit(forget, retain)

    want, plain_u, plain_r, _ = by_hand(name, untouched, tokenizer, forget, retain, RANK)
    differs = 0.0
    for n in want:
        scale = float(want[n].abs().max())
        torch.testing.assert_close(seen[n], want[n], rtol=1e-4, atol=1e-5 * scale)
        plain = plain_u[n] + plain_r[n]
        differs = max(differs, float((want[n] - plain).abs().max() / plain.abs().max()))
    assert differs > 1e-2                   # the collapse changes the gradient: the test can fail
    assert set(method.report()["collapse"]["basis_rank"].values()) == {RANK}


def test_the_retain_gradient_is_untouched(data, shipped):
    """The retain term's gradient, taken apart inside the step, is the plain one; projecting its
    inputs too would change it by far more than the tolerance."""
    forget, retain = data
    model, tokenizer = shipped()
    untouched = copy.deepcopy(model)
    method = build("GradDiff", model, tokenizer, collapse_rank=RANK)
    taken = {}
    apart = method._backward_apart

    def spy(losses, grads):
        apart(losses, grads)
        taken.update({n: g.clone() for n, g in grads["retain"].items()})
    method._backward_apart = spy
    method.fit(forget, retain)

    _, _, plain_r, proj = by_hand("GradDiff", untouched, tokenizer, forget, retain, RANK)
    for n, g in plain_r.items():
        torch.testing.assert_close(taken[n], g, rtol=1e-5, atol=1e-7 * float(g.abs().max()))
    # the same retain gradient from projected inputs is far off: a projected retain term would fail
    projected = plain_r["model.layers.1.mlp.down_proj.weight"].double() @ proj["model.layers.1.mlp.down_proj"]
    assert float((projected.float() - plain_r["model.layers.1.mlp.down_proj.weight"]).abs().max()) > \
        1e-2 * float(plain_r["model.layers.1.mlp.down_proj.weight"].abs().max())


def test_the_basis_is_orthonormal_and_spans_the_top_retain_directions(data, shipped):
    forget, retain = data
    model, tokenizer = shipped()
    untouched = copy.deepcopy(model)
    method = build("GradDiff", model, tokenizer, collapse_rank=RANK, steps=0, epochs=1)
    method.prepare(forget, retain)
    reference = build("GradDiff", untouched, tokenizer)
    reference.prepare(forget, retain)
    want = projectors(reference, retain, RANK)
    for name, layer in method._collapse.layers.items():
        v = layer.basis.double()
        assert v.shape[1] == RANK
        torch.testing.assert_close(v.T @ v, torch.eye(RANK, dtype=torch.float64), rtol=0, atol=1e-5)
        p = torch.eye(v.shape[0], dtype=torch.float64) - v @ v.T
        torch.testing.assert_close(p, want[name], rtol=0, atol=1e-4)


def test_a_basis_that_is_not_orthonormal_changes_the_gradient(data, shipped):
    """The formula needs orthonormal rows: with a scaled basis the projection is no longer one
    and the update no longer matches the hand computation (the check above is not vacuous)."""
    forget, retain = data
    model, tokenizer = shipped()
    untouched = copy.deepcopy(model)
    method = build("GradDiff", model, tokenizer, collapse_rank=RANK)
    prepare = method.prepare

    def skewed(f, r):
        prepare(f, r)
        for layer in method._collapse.layers.values():
            layer.basis = layer.basis * 1.5
    method.prepare = skewed
    seen = recording(method)
    method.fit(forget, retain)
    want, *_ = by_hand("GradDiff", untouched, tokenizer, forget, retain, RANK)
    off = max(float((seen[n] - want[n]).abs().max() / want[n].abs().max()) for n in want)
    assert off > 1e-3


@pytest.mark.parametrize("name", ["GradDiff", "NPO", "RMU"])
def test_the_forward_is_unchanged(data, shipped, name):
    forget, retain = data
    model, tokenizer = shipped()
    method = build(name, model, tokenizer, collapse_rank=RANK)
    method.prepare(forget, retain)
    batch = next(method.batches(retain))
    with torch.enable_grad():
        plain = model(**model_inputs(batch), use_cache=False).logits
        with method._collapse.installed():
            collapsed = model(**model_inputs(batch), use_cache=False).logits
            assert collapsed.requires_grad
    assert torch.equal(plain, collapsed)
    assert all("forward" not in vars(m) for m in model.modules())     # uninstalled


@pytest.mark.parametrize("name", ["GradDiff", "NPO", "RMU"])
def test_rank_zero_is_the_plain_step_bit_for_bit(data, shipped, name):
    forget, retain = data
    runs = []
    for settings in ({}, {"collapse_rank": 0}):
        model, tokenizer = shipped()
        build(name, model, tokenizer, steps=3, **settings).fit(forget, retain)
        runs.append(model.state_dict())
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_it_composes_with_sam_and_grad_accum(data, shipped):
    forget, retain = data
    model, tokenizer = shipped()
    method = build("NPO", model, tokenizer, collapse_rank=4, sam_rho=0.01, grad_accum=2, steps=2)
    method.fit(forget, retain)
    assert all(d > 0 for d in method.changes.values())


@pytest.mark.parametrize("name, message", [("TAR", "meta-gradient"), ("MRP", "changes no weight")])
def test_refused_by_methods_without_linear_weight_gradients(shipped, name, message):
    model, tokenizer = shipped()
    with pytest.raises(UserError, match=f"{name} does not use the setting collapse_rank.*{message}"):
        registry[name](model, tokenizer, config=make_config(registry[name].config_class, collapse_rank=4))


def test_refuses_weights_that_are_not_linear(data, shipped):
    forget, retain = data
    model, tokenizer = shipped()
    method = build("GradDiff", model, tokenizer, collapse_rank=4, update=["layers.1.*"])
    with pytest.raises(UserError, match=r"collapse_rank projects the inputs of nn.Linear weights; 2 selected "
                                        r"parameter\(s\) are not: .*layernorm"):
        method.fit(forget, retain)


def test_refuses_without_retain_data_and_under_distributed(data, shipped, monkeypatch):
    forget, retain = data
    model, tokenizer = shipped()
    with pytest.raises(UserError, match="collapse_rank needs retain data"):
        build("GradAscent", model, tokenizer, collapse_rank=4, update=["layers.1.mlp.*"]).fit(forget, [])
    method = build("GradDiff", model, tokenizer, collapse_rank=4)
    monkeypatch.setattr(distributed, "active", lambda: True)
    with pytest.raises(UserError, match="collapse_rank runs in one process"):
        method.fit(forget, retain)


def test_rank_range():
    with pytest.raises(UserError, match="collapse_rank"):
        make_config(registry["GradDiff"].config_class, collapse_rank=257)
    with pytest.raises(UserError, match="collapse_rank"):
        make_config(registry["GradDiff"].config_class, collapse_rank=-1)


def test_collapse_step_takes_the_whole_step_off_the_retain_directions(data, shipped):
    """``collapse_step``: the weights move by the optimizer's step with its span(V) part removed
    (AdamW alone puts part of it back there even from a collapsed gradient)."""
    forget, retain = data
    runs = {}
    for step in (False, True):
        model, tokenizer = shipped()
        method = build("GradDiff", model, tokenizer, collapse_rank=RANK, collapse_step=step, retain_weight=0.0)
        before = {n: p.detach().clone() for n, p in method.params.items()}
        method.fit(forget, retain)
        runs[step] = {n: method.params[n].detach() - before[n] for n in before}
        bases = {n + ".weight": layer.basis for n, layer in method._collapse.layers.items()}
    for n, v in bases.items():
        plain, projected = runs[False][n], runs[True][n]
        assert float((plain @ v).norm() / plain.norm()) > 0.02       # AdamW's step leaks into span(V)
        assert float((projected @ v).norm() / projected.norm()) < 1e-5
        torch.testing.assert_close(projected, plain - (plain @ v) @ v.T, rtol=0, atol=1e-7)


def test_collapse_step_needs_a_rank(data, shipped):
    forget, retain = data
    model, tokenizer = shipped()
    with pytest.raises(UserError, match="collapse_step needs collapse_rank"):
        build("GradDiff", model, tokenizer, collapse_step=True).fit(forget, retain)


def test_simu_collapses_its_gradient_but_refuses_collapse_step(shipped):
    model, tokenizer = shipped()
    with pytest.raises(UserError, match="SIMU does not use the setting collapse_step.*unselected neurons"):
        registry["SIMU"](model, tokenizer, config=make_config(registry["SIMU"].config_class, collapse_rank=4,
                                                               collapse_step=True))
    registry["SIMU"](model, tokenizer, config=make_config(registry["SIMU"].config_class, collapse_rank=4))
