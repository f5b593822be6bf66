"""Typed settings, defaults chosen from the model, and the training options every method shares:
gradient accumulation, fp32 master weights, activation checkpointing."""

from __future__ import annotations

import pytest
import torch

from unlearn_kernels.data import entangled
from unlearn_kernels.errors import UserError
from unlearn_kernels.methods import registry
from unlearn_kernels.methods.settings import make_config
from unlearn_kernels.methods.rmu import RMUConfig
from unlearn_kernels.methods.simu import SIMUConfig
from unlearn_kernels.models import tiny
from unlearn_kernels.models.layers import layer_output


@pytest.fixture(scope="module")
def data():
    bench = entangled.generate(0.25)
    return bench.corpus(bench.forget_facts()), bench.corpus(bench.retain_facts())


def test_settings_arrive_typed():
    config = make_config(RMUConfig, lr="5e-5", steps="10", progress="false", update="layers.1.mlp.*",
                         layer="auto", alpha=3, grad_accum="1e1")
    assert config.lr == 5e-5 and isinstance(config.lr, float)
    assert config.steps == 10 and config.progress is False and config.update == ["layers.1.mlp.*"]
    assert config.layer is None and config.alpha == 3.0 and isinstance(config.alpha, float) and config.grad_accum == 10
    assert make_config(SIMUConfig, betas="0.9,0.95").betas == (0.9, 0.95)


@pytest.mark.parametrize("settings, message", [
    (dict(lr="fast"), "setting lr expects a number, got 'fast'"),
    (dict(steps=1.5), "setting steps expects an integer"),
    (dict(steps=True), "setting steps expects an integer"),
    (dict(update=[1]), r"setting update expects a list of non-empty strings \(one string is a list of one\), got \[1\]"),
    (dict(progress="maybe"), "setting progress expects true or false"),
    (dict(alpha=None), "setting alpha expects float, got None"),
    (dict(stering=1.0), r"RMU has no setting stering \(did you mean steering\?\); its settings: .*alpha=100.0"),
])
def test_bad_settings_name_the_field(settings, message):
    with pytest.raises(UserError, match=message):
        make_config(RMUConfig, **settings)


def test_the_python_api_types_settings_too():
    model, tokenizer = tiny.load()
    method = registry["RMU"](model, tokenizer, lr="1e-3", steps="2")
    assert method.config.lr == 1e-3 and method.config.steps == 2
    with pytest.raises(ValueError, match="setting lr expects a number"):
        registry["GradDiff"](model, tokenizer, lr="x")


def test_defaults_are_chosen_from_the_model_and_reported(data):
    model, tokenizer = tiny.load()
    method = registry["RMU"](model, tokenizer, steps=2, progress=False).fit(*data)
    report = method.report()
    chosen = report["chosen_by_structure"]
    assert chosen["layer"] == 2 and chosen["update"] == ["model.layers.{0,1,2}.mlp.down_proj"]
    assert chosen["lr"] == pytest.approx(5e-5 * 4096 / 128) and "table (llama)" in chosen["roles"]
    assert report["config"]["layer"] == 2 and set(report["updated_parameters"]) == {
        f"model.layers.{i}.mlp.down_proj.weight" for i in range(3)}
    # steering auto: c = 5 · mean ‖h_forget‖ at the layer, on the unmodified model
    fresh, _ = tiny.load()
    batch = next(registry["RMU"](fresh, tokenizer).batches(data[0], 7))
    h = layer_output(fresh, 2, batch["input_ids"], batch["attention_mask"]).detach()
    expected = 5 * float(h[batch["attention_mask"].bool()].norm(dim=-1).mean())
    assert report["control_norm"] == pytest.approx(expected, rel=1e-5)
    explicit = registry["RMU"](fresh, tokenizer, layer=1, update=["layers.1.mlp.down_proj"], lr=1e-3)
    assert explicit.chosen == {} and explicit.chosen_by_structure() == {}
    only_layer = registry["SRMU"](fresh, tokenizer, layer=3)
    assert only_layer.chosen["update"] == ["model.layers.{1,2,3}.mlp.down_proj"] and "layer" not in only_layer.chosen


def test_gradient_accumulation_equals_the_larger_batch(data):
    """NPO without the retain term is a mean over sequences: two batches of 2 accumulated give
    the gradient of one batch of 4 (the same texts, in the same order)."""
    class PlainSGD(registry["NPO"]):      # Adam's sign-like first steps would amplify rounding
        def make_optimizer(self):
            return torch.optim.SGD(list(self.optimized.values()), lr=self.config.lr)

    finals = []
    for batch_size, accum in ((4, 1), (2, 2)):
        model, tokenizer = tiny.load()
        method = PlainSGD(model, tokenizer, steps=3, batch_size=batch_size, grad_accum=accum,
                          retain_weight=0.0, lr=1.0, progress=False).fit(*data)
        finals.append({k: v.detach().clone() for k, v in method.params.items()})
        assert len(method.history) == 3
    start, _ = tiny.load()
    # equal up to fp32 rounding, which scales with the largest update (lr 1.0 makes it large)
    scale = max(float((v - start.get_parameter(k).detach()).abs().max()) for k, v in finals[0].items())
    for key in finals[0]:
        torch.testing.assert_close(finals[0][key], finals[1][key], atol=1e-5 * scale, rtol=0, msg=key)
    assert any(not torch.equal(v, start.get_parameter(k)) for k, v in finals[0].items())


def test_one_pass_counts_the_accumulated_batches():
    model, tokenizer = tiny.load()
    method = registry["GradDiff"](model, tokenizer, batch_size=4, grad_accum=2, epochs=3)
    assert method.num_steps(["x"] * 20) == 8          # ceil(3 · 20 / 8)


@pytest.mark.parametrize("name", ["RMU", "GradDiff", "SIMU"])
def test_activation_checkpointing_gives_the_same_run(data, name, monkeypatch):
    import torch.utils.checkpoint as tc

    calls = []
    original = tc.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tc, "checkpoint", counting)
    finals = []
    for checkpointing in (False, True):
        model, tokenizer = tiny.load()
        method = registry[name](model, tokenizer, steps=3, batch_size=4, checkpointing=checkpointing,
                                progress=False, **({"score_batches": 2} if name == "SIMU" else {})).fit(*data)
        finals.append(({k: v.detach().clone() for k, v in method.params.items()}, method.history))
        assert not any("forward" in vars(layer) for layer in model.model.layers)   # unwrapped after the run
        assert bool(calls) == checkpointing
    (a, history_a), (b, history_b) = finals
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [h["step"] for h in history_a] == [h["step"] for h in history_b]
    assert all(x == pytest.approx(y, rel=1e-5) for ha, hb in zip(history_a, history_b)
               for x, y in zip(ha.values(), hb.values()))


def test_fp32_master_weights_of_a_bf16_model(data):
    model, tokenizer = tiny.load(dtype=torch.bfloat16)
    method = registry["GradDiff"](model, tokenizer, steps=3, lr=1e-5, master_dtype="float32",
                                  progress=False).fit(*data)
    assert method.optimized is not method.params
    for name, p in method.params.items():
        master = method.optimized[name]
        assert p.dtype == torch.bfloat16 and master.dtype == torch.float32
        assert torch.equal(p, master.to(torch.bfloat16))
        assert method.optimizer.state[master]["exp_avg"].dtype == torch.float32
    # updates below bf16's resolution accumulate in the masters
    start, _ = tiny.load(dtype=torch.bfloat16)
    moved = {n: float((m.detach() - start.get_parameter(n).float()).abs().max()) for n, m in method.optimized.items()}
    assert all(v > 0 for v in moved.values())
    with pytest.raises(ValueError, match="master_dtype must be float32"):
        registry["GradDiff"](model, tokenizer, master_dtype="float16")
    fp32, _ = tiny.load()
    same = registry["GradDiff"](fp32, tokenizer, steps=1, master_dtype="float32", progress=False).fit(*data)
    assert same.optimized is same.params               # fp32 weights are their own masters


def test_mrp_refuses_training_options_it_does_not_use():
    model, tokenizer = tiny.load()
    for setting in (dict(grad_accum=2), dict(master_dtype="float32"), dict(checkpointing=True), dict(epochs=2)):
        with pytest.raises(ValueError, match="MRP does not use the setting"):
            registry["MRP"](model, tokenizer, **setting)
