"""UNDO (``distill_noise`` = α, ``methods.distill``): after unlearning, the weights are noised toward a
fresh initialisation, ``θ_S = (1 − α) θ_T + α β N``, and the student is distilled on the retain
texts with the forward KL from the frozen teacher (the unlearned model). Checked here against a
plain-torch computation from that formula (noise from a fixed generator, KL, AdamW's first
step), for both directions of the KL and a teacher that is not detached (the test can fail);
``distill_noise=0`` is the plain run bit for bit; α = β = 1 is the fresh initialisation; the
settings are refused where the phase cannot run."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F

from unlearn_kernels.data import entangled
from unlearn_kernels.errors import UserError
from unlearn_kernels.methods import distill, distributed, registry
from unlearn_kernels.methods.settings import make_config

UPDATE = ["layers.1.mlp.*", "layers.2.mlp.*"]


@pytest.fixture(scope="module")
def data():
    bench = entangled.generate(0.3)
    return bench.corpus(bench.forget_facts())[:16], bench.corpus(bench.retain_facts())[:16]


def build(name, model, tokenizer, **settings):
    settings = {"steps": 1, "batch_size": 4, "lr": 1e-3, "progress": False, "update": UPDATE,
                **({"layer": 2} if "RMU" in name else {}), **settings}
    return registry[name](model, tokenizer, config=make_config(registry[name].config_class, **settings))


def hand_fresh(model, names, seed):
    """N of the formula, drawn here: normal(0, 0.02²) matrices in named_parameters order from
    Generator().manual_seed(seed) (the embedding's padding row 0), norm weights 1."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    pad = model.config.pad_token_id
    out = {}
    for n in names:
        p = params[n]
        if p.dim() == 2:
            w = torch.randn(tuple(p.shape), generator=g) * model.config.initializer_range
            if n.endswith("embed_tokens.weight"):
                w[pad] = 0
            out[n] = w
        else:
            assert "norm" in n, n
            out[n] = torch.ones_like(p)
    return out


def hand_step(teacher_model, tokenizer, retain, *, alpha, beta, lr, seed, weights, kl="forward",
              detach=True, batch_size=4):
    """The student after one distillation step, from the formula in plain torch: θ_S, the KL on
    the first retain batch (shuffled with random.Random(seed + 3)), AdamW's first step."""
    student = copy.deepcopy(teacher_model)
    keep = {"all": lambda n: True, "mlp": lambda n: ".mlp." in n,
            "update": lambda n: any(f"layers.{i}.mlp." in n for i in (1, 2))}[weights]
    names = [n for n, _ in student.named_parameters() if keep(n)]
    fresh = hand_fresh(student, names, seed)
    params = dict(student.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].copy_((1 - alpha) * params[n] + alpha * beta * fresh[n])
    for p in student.parameters():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    rng = random.Random(seed + 3)
    order = rng.sample(range(len(retain)), len(retain))[:batch_size]
    batch = tokenizer([retain[i] for i in order], return_tensors="pt", padding=True, truncation=True, max_length=512)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    if detach:
        teacher_model.eval()
        with torch.no_grad():
            t = teacher_model(**inputs).logits
        teacher_source = None
    else:                       # the wrong teacher: the student itself, gradients flowing through it
        teacher_source = student
    student.train()
    s = student(**inputs).logits
    if teacher_source is not None:
        t = student(**inputs).logits
    log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
    if kl == "forward":
        per = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    else:
        per = F.kl_div(log_t, log_s, log_target=True, reduction="none").sum(-1)
    valid = inputs["attention_mask"].bool()
    loss = per[valid].mean()
    optimizer = torch.optim.AdamW([params[n] for n in names], lr=lr, weight_decay=0.0)
    loss.backward()
    grads = {n: params[n].grad.clone() if params[n].grad is not None else torch.zeros_like(params[n]) for n in names}
    optimizer.step()
    return {n: params[n].detach().clone() for n in names}, grads


@pytest.mark.parametrize("name, weights", [("RMU", "all"), ("GradDiff", "update"), ("NPO", "mlp")])
def test_one_distillation_step_is_the_formula_by_hand(shipped, data, name, weights):
    forget, retain = data
    model, tokenizer = shipped()
    plain_model = copy.deepcopy(model)
    alpha, beta, lr = 0.4, 0.7, 1e-3
    method = build(name, model, tokenizer, distill_noise=alpha, distill_scale=beta, distill_steps=1,
                   distill_lr=lr, distill_weights=weights)
    method.fit(forget, retain)
    build(name, plain_model, tokenizer).fit(forget, retain)    # the teacher: the same run without the phase

    want, grads = hand_step(plain_model, tokenizer, retain, alpha=alpha, beta=beta, lr=lr, seed=0, weights=weights)
    reverse, _ = hand_step(plain_model, tokenizer, retain, alpha=alpha, beta=beta, lr=lr, seed=0, weights=weights,
                           kl="reverse")
    undetached, _ = hand_step(plain_model, tokenizer, retain, alpha=alpha, beta=beta, lr=lr, seed=0,
                              weights=weights, detach=False)
    got = dict(method.model.named_parameters())
    far_reverse = far_undetached = 0.0
    for n, w in want.items():
        clear = grads[n].abs() > 1e-3 * grads[n].abs().max()      # AdamW's first step is lr·sign(g) there
        assert clear.float().mean() > (0.2 if "embed" in n else 0.5), n   # rows of unused tokens: head only
        torch.testing.assert_close(got[n].detach()[clear], w[clear], rtol=0, atol=1e-6)
        assert float((got[n].detach() - w).abs().max()) <= lr * (1 + 1e-4) + 1e-6
        far_reverse = max(far_reverse, float((reverse[n] - w)[clear].abs().max()))
        far_undetached = max(far_undetached, float((undetached[n] - w)[clear].abs().max()))
    assert far_reverse > 0.5 * lr and far_undetached > 0.5 * lr   # the wrong KL or teacher would be seen
    untouched = [n for n, _ in plain_model.named_parameters() if n not in want]
    plain = dict(plain_model.named_parameters())
    assert all(torch.equal(got[n], plain[n]) for n in untouched)
    assert (weights == "all") == (not untouched)
    report = method.report()["distillation"]
    assert (report["noise"], report["scale"], report["steps"], report["lr"], report["weights"]) == \
        (alpha, beta, 1, lr, weights)
    assert report["seconds"] > 0 and report["kl_first"] > 0


def test_forward_kl_gradient_is_student_minus_teacher_and_leaves_the_teacher_alone():
    torch.manual_seed(0)
    s = torch.randn(2, 5, 7, requires_grad=True)
    t = torch.randn(2, 5, 7, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    distill.forward_kl(s, t, mask).backward()
    want = (s.softmax(-1) - t.softmax(-1)).detach() * mask[..., None] / mask.sum()
    torch.testing.assert_close(s.grad, want)
    assert t.grad is None


@pytest.mark.parametrize("name", ["RMU", "NPO"])
def test_noise_zero_is_the_plain_run_bit_for_bit(shipped, data, name):
    forget, retain = data
    runs = []
    for settings in ({}, {"distill_noise": 0.0}):
        model, tokenizer = shipped()
        method = build(name, model, tokenizer, steps=3, **settings)
        method.fit(forget, retain)
        assert "distillation" not in method.report()
        runs.append(model.state_dict())
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_alpha_one_beta_one_is_the_fresh_initialisation(shipped):
    model, _ = shipped()
    weights = dict(model.named_parameters())
    distill.noise_(model, weights, 1.0, 1.0, seed=5)
    fresh = hand_fresh(model, list(weights), 5)
    for n, p in weights.items():
        assert torch.equal(p.detach(), fresh[n]), n
    matrices = torch.cat([p.detach().flatten() for n, p in weights.items() if p.dim() == 2 and "embed" not in n])
    assert abs(float(matrices.std()) - 0.02) < 1e-3 and abs(float(matrices.mean())) < 1e-3


def test_the_auto_rate_scales_with_the_hidden_size_and_is_recorded(shipped):
    model, tokenizer = shipped()
    method = build("GradDiff", model, tokenizer, distill_noise=0.5)
    assert method.config.distill_lr == distill.auto_lr(128) == pytest.approx(3.2e-3)
    assert method.chosen["distill_lr"] == method.config.distill_lr
    assert build("GradDiff", shipped()[0], tokenizer).config.distill_lr is None   # off: not chosen


def test_refusals(shipped, data, monkeypatch):
    forget, retain = data
    model, tokenizer = shipped()
    with pytest.raises(UserError, match="MRP does not use the setting distill_noise.*changes no weight"):
        registry["MRP"](model, tokenizer, config=make_config(registry["MRP"].config_class, distill_noise=0.5))
    with pytest.raises(UserError, match="distill_steps set but distill_noise is 0"):
        build("GradDiff", model, tokenizer, distill_steps=5).fit(forget, retain)
    with pytest.raises(UserError, match="retain set is empty"):
        build("GradAscent", model, tokenizer, distill_noise=0.5).fit(forget, [])
    with pytest.raises(UserError, match="not checkpointed"):
        build("GradDiff", model, tokenizer, distill_noise=0.5).fit(forget, retain, checkpoint=object())
    with pytest.raises(UserError, match="not checkpointed"):
        build("GradDiff", model, tokenizer, distill_noise=0.5).fit(forget, retain, resume=True)
    with pytest.raises(UserError, match="validation questions"):
        build("GradDiff", model, tokenizer, distill_noise=0.5).fit(forget, retain, monitor=object())
    for bad in (-0.1, 1.5):
        with pytest.raises(UserError, match="distill_noise"):
            make_config(registry["RMU"].config_class, distill_noise=bad)
    method = build("GradDiff", model, tokenizer, distill_noise=0.5)
    monkeypatch.setattr(distributed, "active", lambda: True)
    with pytest.raises(UserError, match="distill_noise runs in one process"):
        distill.check(method, retain)


def test_prefix_only_loading_is_refused_with_it(tmp_path):
    from unlearn_kernels import pipeline
    from unlearn_kernels.models import tiny

    config = pipeline.RunConfig(model=str(tiny.ASSET_DIR), method="RMU", forget=["f.txt"], retain=["r.txt"],
                                out=str(tmp_path / "o"), prefix_only=True)
    method_config = make_config(registry["RMU"].config_class, layer=2, distill_noise=0.5)
    with pytest.raises(UserError, match="prefix-only.*distill_noise"):
        pipeline._prefix_plan(config, registry["RMU"], method_config, False)
    auto = pipeline.RunConfig(model=str(tiny.ASSET_DIR), method="RMU", forget=["f.txt"], retain=["r.txt"],
                              out=str(tmp_path / "o"))
    assert pipeline._prefix_plan(auto, registry["RMU"], method_config, False)[1] is None


@pytest.mark.parametrize("name, settings", [("TAR", {"adversary_steps": 1}), ("SIMU", {"score_batches": 1}),
                                            ("SRMU", {}), ("AdaptiveRMU", {"checkpointing": True})])
def test_the_other_gradient_methods_distil(shipped, data, name, settings):
    forget, retain = data
    model, tokenizer = shipped()
    method = build(name, model, tokenizer, distill_noise=0.5, distill_steps=2, distill_lr=1e-3, **settings)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    method.fit(forget, retain)
    assert method.report()["distillation"]["steps"] == 2
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(p.requires_grad for p in model.parameters())


def test_the_rate_warms_up_then_decays_on_a_cosine():
    assert distill.rate_factor(0, 1) == 1.0                      # one step: the whole rate
    factors = [distill.rate_factor(t, 100) for t in range(100)]
    assert factors[:10] == pytest.approx([(t + 1) / 10 * 0.5 * (1 + math.cos(math.pi * t / 100)) for t in range(10)])
    assert max(factors) == factors[9] and factors[-1] < 1e-3 and all(a >= b for a, b in zip(factors[9:], factors[10:]))
