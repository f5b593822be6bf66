"""LLM unlearning methods on the embedded model: what changes, saving, bad configs, the data."""

import dataclasses
import json

import pytest
import torch

from unlearn_kernels.data import entangled
from unlearn_kernels.data.loaders import read_texts, write_jsonl
from unlearn_kernels.eval.multiple_choice import accuracy
from unlearn_kernels.methods import registry
from unlearn_kernels.models import tiny
from unlearn_kernels.models.io import load_local, save_pretrained_atomic

from conftest import our_png_size

pytest.importorskip("transformers")
SETTINGS = {
    "RMU": dict(layer=2, update=["layers.{1,2}.mlp.down_proj"], steering=10.0, alpha=10.0, lr=1e-3),
    "AdaptiveRMU": dict(layer=2, update=["layers.{1,2}.mlp.down_proj"], lr=1e-3),
    "SRMU": dict(layer=2, update=["layers.{1,2}.mlp.down_proj"], lr=1e-3, stats_batches=2, sparsity=0.1,
                 temperature=0.25),
    "GradAscent": dict(update=["layers.1.mlp.*"], lr=1e-3),
    "GradDiff": dict(update=["layers.1.mlp.*"], lr=1e-3),
    "NPO": dict(update=["layers.1.mlp.*"], lr=1e-3),
    "SIMU": dict(update=["layers.{1,2}.mlp.{up_proj,down_proj}"], lr=1e-3, fraction=0.25, score_batches=2,
                 hessian_interval=1),
    "SO-GradDiff": dict(update=["layers.1.mlp.*"], lr=1e-3, hessian_interval=1),
}


@pytest.fixture(scope="module")
def base(shipped):
    return shipped()


@pytest.fixture(scope="module")
def split():
    bench = entangled.generate(0.25)
    return bench, bench.corpus(bench.forget_facts()), bench.corpus(bench.retain_facts())


def fresh(base):
    model, tokenizer = base
    clone = type(model)(model.config)
    clone.load_state_dict(model.state_dict())
    return clone.eval(), tokenizer


def test_shipped_model_knows_both_domains(base):
    model, tokenizer = base
    bench = entangled.generate(0.25)
    assert accuracy(model, tokenizer, bench.questions(bench.forget_facts())) >= 0.9
    assert accuracy(model, tokenizer, bench.questions(bench.retain_facts())) >= 0.9


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_only_the_selected_parameters_change(base, split, name):
    model, tokenizer = fresh(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = registry[name](model, tokenizer, steps=3, batch_size=4, progress=False, **SETTINGS[name])
    method.fit(split[1], split[2])
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= set(method.params), changed - set(method.params)
    assert len(method.history) == 3 and all(torch.isfinite(torch.tensor(list(h.values()))).all()
                                            for h in method.history)
    assert not any(p.requires_grad for p in model.parameters())


def test_srmu_importance_is_a_sparse_map(base, split):
    model, tokenizer = fresh(base)
    method = registry["SRMU"](model, tokenizer, steps=1, progress=False, **SETTINGS["SRMU"])
    method.fit(split[1], split[2])
    m = method.importance
    assert m.shape == (model.config.hidden_size,) and ((m >= 0) & (m <= 1)).all()
    assert 0.05 * m.numel() < float(m.sum()) < 0.3 * m.numel()


def test_save_and_load_round_trip(base, split, tmp_path):
    model, tokenizer = fresh(base)
    method = registry["RMU"](model, tokenizer, steps=2, progress=False, **SETTINGS["RMU"])
    method.fit(split[1], split[2])
    out = save_pretrained_atomic(model, tokenizer, tmp_path / "unlearned", method.report())
    loaded, loaded_tok = load_local(out)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "RMU" and report["data"]["forget"]["n"] == len(split[1])
    assert loaded_tok("the toxin")["input_ids"] == tokenizer("the toxin")["input_ids"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_bad_configs_fail_before_work(base, split):
    model, tokenizer = fresh(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        registry["RMU"](model, tokenizer, layer=9)
    with pytest.raises(ValueError, match="no parameter matches"):
        registry["RMU"](model, tokenizer, layer=2, update=["layers.7.mlp.down_proj"])
    with pytest.raises(ValueError, match="forget set is empty"):
        registry["RMU"](model, tokenizer, **SETTINGS["RMU"]).fit([], split[2])
    with pytest.raises(ValueError, match="lr must be > 0"):
        registry["GradDiff"](model, tokenizer, lr=0.0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_texts("/nonexistent/forget.txt")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_benchmark_is_deterministic_and_entangled():
    a, b = entangled.generate(0.25, seed=3), entangled.generate(0.25, seed=3)
    assert a.facts == b.facts and a.forget_entities == b.forget_entities
    assert sum(f.entangled for f in a.forget_facts()) == 8 * 6  # round(0.25 x 30) shared entities x 6 attributes
    assert not any(f.entangled for f in entangled.generate(0.0).forget_facts())
    retain_entities = {f.entity for f in a.retain_facts()}
    assert {f.entity for f in a.forget_facts() if f.entangled} <= retain_entities
    q = a.questions(a.forget_facts()[:1])[0]
    assert q.choices[q.answer] == a.forget_facts()[0].value and len(set(q.choices)) == 4
    with pytest.raises(ValueError, match="overlap must be in"):
        entangled.generate(0.9)


def test_mrp_projects_and_changes_no_weight(base, split, tmp_path):
    from unlearn_kernels.models.layers import layer_output

    model, tokenizer = fresh(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = registry["MRP"](model, tokenizer, layer=1, rank=4, batch_size=8, stats_batches=2, progress=False)
    method.fit(split[1], split[2])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    u = method.basis
    assert u.shape == (model.config.hidden_size, 4)
    torch.testing.assert_close(u.T @ u, torch.eye(4), atol=1e-5, rtol=0)
    enc = tokenizer(split[1][:4], return_tensors="pt", padding=True)
    h = layer_output(model, 1, enc["input_ids"], enc["attention_mask"])
    assert float((h @ u).abs().max()) < 1e-3 * float(h.abs().max())
    first = u.clone()
    method.add_request(split[1][:8], split[2][:8])
    assert method.basis.shape[1] == 8 and torch.equal(method.basis[:, :4], first)
    out = save_pretrained_atomic(model, tokenizer, tmp_path / "mrp", method.report(), method.projections())
    reloaded, _ = load_local(out)
    h2 = layer_output(reloaded, 1, enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(h2, layer_output(model, 1, enc["input_ids"], enc["attention_mask"]))


@pytest.mark.parametrize("scorer", ["obd", "integrated_gradients"])
def test_simu_updates_only_selected_neurons(base, split, scorer, tmp_path):
    model, tokenizer = fresh(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = registry["SIMU"](model, tokenizer, steps=3, batch_size=4, progress=False, scorer=scorer,
                              **SETTINGS["SIMU"])
    method.fit(split[1], split[2])
    width = model.config.intermediate_size
    for name, mask in method.neuron_masks.items():
        assert mask.shape == (width,) and int(mask.sum()) == round(0.25 * width)
        delta = (model.state_dict()[name] - before[name]).abs()
        per_neuron = delta.sum(1) if "up_proj" in name else delta.sum(0)
        assert (per_neuron[~mask] == 0).all() and (per_neuron[mask] > 0).any()
    assert "selected_neurons" in method.report()
    out = save_pretrained_atomic(model, tokenizer, tmp_path / f"simu-{scorer}", method.report(),
                                 masks=method.saved_masks())
    reloaded, _ = load_local(out)
    assert set(reloaded.unlearn_masks) == set(method.neuron_masks)
    assert all(torch.equal(reloaded.unlearn_masks[k], v) for k, v in method.neuron_masks.items())
    with pytest.raises(ValueError, match="fraction must be in"):
        registry["SIMU"](model, tokenizer, fraction=0.0, update=["layers.1.mlp.up_proj"])


def test_demo_writes_table_results_curves_and_oracle(tmp_path, monkeypatch):
    """The default split with the shipped oracle: base, oracle and a two-point GradDiff curve,
    each with recovery and forget quality; the table, results.json and the plot are written."""
    from unlearn_kernels import demo

    monkeypatch.setitem(demo.SWEEPS, "GradDiff", ("steps", (3, 30), (3, 10, 30)))
    lines = []
    rows = demo.run(tmp_path, methods=["GradDiff"], relearn_steps=1, progress=False, out=lines.append)
    assert [(r["method"], r["value"]) for r in rows] == [("base", None), ("oracle", None), ("GradDiff", 3),
                                                          ("GradDiff", 30)]
    base, oracle, short, longer = rows
    assert base["overlap"] == demo.DEFAULT_OVERLAP and base["forget_acc"] >= 0.9
    assert oracle["forget_acc"] < base["forget_acc"] - 0.3 and oracle["recovery_max"] == 0.0
    assert longer["forget_acc"] < base["forget_acc"]
    for r in (short, longer):
        assert set(r["recovery"]) == {1e-5, 1e-4, 1e-3} and 0 <= r["forget_quality"] <= 1
    assert "| 30% | GradDiff | steps=30 |" in lines[0] and "| 30% | oracle |" in lines[0]
    saved = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["method"] for r in saved] == ["base", "oracle", "GradDiff", "GradDiff"]
    width, height = our_png_size(tmp_path / "tradeoff.png")        # 5.5 x 9 inches per overlap at 100 dpi
    assert height == 900 and width == 550 * len({r["overlap"] for r in rows})
    # each row scores the folder the pipeline saved, as a plain transformers load sees it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unlearn_kernels.eval.multiple_choice import evaluate_multiple_choice
    from unlearn_kernels.eval.suite import Split

    folder = tmp_path / "models" / "GradDiff-steps=30"
    assert longer["folder"] == str(folder.resolve())
    report = json.loads((folder / "report.json").read_text())
    assert report["method"] == "GradDiff" and report["config"]["steps"] == 30 and "unlearn_kernels" in report
    plain = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    split = Split.from_benchmark(entangled.generate(demo.DEFAULT_OVERLAP))
    with torch.no_grad():
        acc = evaluate_multiple_choice(plain, AutoTokenizer.from_pretrained(folder), split.forget_questions,
                                       progress=False)["acc"]
    assert acc == pytest.approx(longer["forget_acc"], abs=1e-12)
    with pytest.raises(ValueError, match="unknown demo methods"):
        demo.run(tmp_path, methods=["Nope"])
    # a folder in a run's way that is not an output of ours is refused before any model loads
    (tmp_path / "models" / "GradDiff-steps=3" / "report.json").write_text("{}")
    with pytest.raises(ValueError, match="not an output of unlearn_kernels"):
        demo.run(tmp_path, methods=["GradDiff"], progress=False, out=lines.append)


def test_demo_sweeps_every_method_on_its_knob():
    from unlearn_kernels import demo
    from unlearn_kernels.methods import registry

    assert set(demo.SWEEPS) == set(demo.DEMO_SETTINGS) and set(demo.DEMO_SETTINGS) <= set(registry)
    for name, (knob, quick, full) in demo.SWEEPS.items():
        fields = {f.name for f in dataclasses.fields(registry[name].config_class)}
        assert knob in fields, (name, knob)
        assert set(quick) <= set(full) and len(full) >= 3, name
    assert demo.runs(["TAR", "RMU"], full=False) == [("TAR", "steps", 60), ("TAR", "steps", 120),
                                                     ("RMU", "steering", 100.0), ("RMU", "steering", 300.0)]
    assert demo.runs(["MRP"], full=True) == [("MRP", "rank", r) for r in (8, 16, 32, 64)]
    assert demo.runs([], full=True) == []


def _row(method, forget, retain, value=None, recovery=None, overlap=0.3):
    return {"overlap": overlap, "method": method, "knob": None if value is None else "steps", "value": value,
            "forget_acc": forget, "retain_acc": retain, "shared_retain_acc": None, "recovery": recovery,
            "recovery_max": None if recovery is None else max(recovery.values())}


def test_verdict_reports_the_goal_and_srmu_vs_rmu_honestly():
    from unlearn_kernels.demo import verdict

    ref = [_row("base", 1.0, 1.0), _row("oracle", 0.25, 0.99)]
    good = _row("TAR", 0.27, 0.96, 80, {1e-5: 0.0, 1e-4: 0.05, 1e-3: 0.18})
    leaky = _row("TAR", 0.27, 0.96, 40, {1e-5: 0.0, 1e-4: 0.05, 1e-3: 0.31})
    curves = [_row("SRMU", 0.3, 0.95, 1), _row("SRMU", 0.5, 0.99, 2), _row("RMU", 0.3, 0.85, 1), _row("RMU", 0.5, 0.95, 2)]
    text = verdict(ref + [good, leaky] + curves)
    assert "TAR steps=80 at 30% overlap meets the goal" in text
    assert "TAR steps=40 at 30% overlap MISSES recovery <= 20 % at every rate" in text
    assert "SRMU vs RMU (30% overlap), best accuracy at equal or lower forget accuracy, SRMU minus RMU: " \
           "retain +0.040 to +0.100." in text
    # a knob that moves retain but not forget: the frontier compares the best of each side
    flat = verdict(ref + [_row("SRMU", 0.3, 0.7, 1), _row("SRMU", 0.3, 0.9, 2), _row("RMU", 0.25, 0.95, 1)])
    assert "SRMU minus RMU: retain -0.050 to -0.050." in flat
    far = verdict(ref + [_row("TAR", 0.45, 0.99, 80, {1e-5: 0.0})])
    assert "MISSES forget within 5 points of the oracle" in far


def test_seed_table_gives_the_spread_and_counts_the_goal_per_seed():
    from unlearn_kernels.demo import seed_table

    rows = [{**_row("RMU", 0.30, 0.99, 300), "seed": 0}]          # one seed only: no spread to show
    for seed, (retain, rec) in enumerate([(0.96, 0.10), (0.90, 0.12), (0.97, 0.30)]):
        rows += [{**_row("base", 1.0, 1.0), "seed": seed}, {**_row("oracle", 0.25, 0.99), "seed": seed},
                 {**_row("TAR", 0.27, retain, 120, {1e-5: 0.0, 1e-3: rec}), "seed": seed}]
    text = seed_table(rows)
    # retain 0.96/0.90/0.97: mean 0.943, sd 0.038; recovery 10/12/30 %: mean 17 %, sd 11 %; only seed 0 meets it
    assert "| TAR | steps=120 | 0.270 ± 0.000 | 0.943 ± 0.038 | 17% ± 11% | 30% | 1/3 |" in text, text
    assert "| RMU |" not in text and "seeds 0, 1, 2" in text


def test_demo_repeats_its_runs_over_seeds(tmp_path, monkeypatch):
    """Further seeds rerun the quick settings at the default overlap, with the method's seed and
    the attack's, each into its own folder, and the spread is printed."""
    from unlearn_kernels import demo

    monkeypatch.setitem(demo.SWEEPS, "GradDiff", ("steps", (3,), (3, 10, 30)))
    lines = []
    rows = demo.run(tmp_path, methods=["GradDiff"], relearn_steps=1, progress=False, out=lines.append, seeds=(1,))
    assert [(r["method"], r["seed"]) for r in rows] == [("base", 0), ("oracle", 0), ("GradDiff", 0), ("base", 1),
                                                        ("oracle", 1), ("GradDiff", 1)]
    folder = tmp_path / "models" / "seed-1" / "GradDiff-steps=3"
    assert rows[-1]["folder"] == str(folder.resolve())
    assert json.loads((folder / "report.json").read_text())["config"]["seed"] == 1
    assert "| GradDiff | steps=3 |" in lines[2] and "Over seeds 0, 1" in lines[2]
    assert "| 30% | GradDiff | steps=3 |" in lines[0] and lines[0].count("GradDiff") == 1   # the seed-0 table


def test_cli_unlearn_with_yaml_then_eval(tmp_path, capsys):
    from unlearn_kernels.cli import main

    bench = entangled.generate(0.25)
    (tmp_path / "forget.txt").write_text("\n".join(bench.corpus(bench.forget_facts())))
    (tmp_path / "retain.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                   for t in bench.corpus(bench.retain_facts())))
    write_jsonl(tmp_path / "q.jsonl", [q.to_json() for q in bench.questions(bench.forget_facts())])
    (tmp_path / "run.yaml").write_text(
        f"model: {tiny.ASSET_DIR}\nmethod: GradDiff\nforget: {tmp_path / 'forget.txt'}\n"
        f"retain: {tmp_path / 'retain.jsonl'}\nout: {tmp_path / 'out'}\n"
        "settings:\n  update: ['layers.*']\n  lr: 0.001\n  batch_size: 16\n")
    assert main(["unlearn", "--config", str(tmp_path / "run.yaml"), "--set", "steps=30", "--set", "progress=false"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["method"] == "GradDiff" and report["config"]["steps"] == 30
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "out"), "--questions", str(tmp_path / "q.jsonl"), "--json", "-"]) == 0
    acc = json.loads(capsys.readouterr().out)["results"]["q"]["acc"]
    assert acc < 0.6  # the base model answers all of them
    capsys.readouterr()
    assert main(["unlearn", "--method", "RMU"]) == 2
    assert "unlearn needs" in capsys.readouterr().err
    assert main(["unlearn", "--config", str(tmp_path / "run.yaml"), "--method", "Nope"]) == 2
    assert "unknown method" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown method"):
        main(["--debug", "unlearn", "--config", str(tmp_path / "run.yaml"), "--method", "Nope"])


@pytest.mark.parametrize("name", ["MRP", "GradDiff"])
def test_continual_unlearning_rows(base, name):
    from unlearn_kernels.eval.continual import continual_unlearning

    model, tokenizer = fresh(base)
    settings = {"MRP": dict(layer=1, rank=4, batch_size=8, stats_batches=2),
                "GradDiff": dict(update=["layers.*"], lr=1e-3, batch_size=16, steps=15)}[name]
    rows = continual_unlearning(model, tokenizer, registry[name], dict(settings, progress=False),
                                entangled.generate(0.25), n_requests=2)
    assert [r["request"] for r in rows] == [1, 2] and rows[0]["earlier_forget_acc"] is None
    assert all(0 <= r["seen_forget_acc"] <= 1 and 0 <= r["retain_acc"] <= 1 for r in rows)
    if name == "GradDiff":
        assert rows[-1]["seen_forget_acc"] < 0.9
    with pytest.raises(ValueError, match="n_requests must be in"):
        continual_unlearning(model, tokenizer, registry[name], settings, entangled.generate(0.25), n_requests=0)


@pytest.mark.parametrize("family, update, width", [
    ("gpt2", ["h.*.mlp.{c_fc,c_proj}"], 128),           # Conv1D: c_fc [d, w], c_proj [w, d]
    ("opt", ["layers.*.{fc1,fc2}"], 64),                 # Linear: fc1 [w, d], fc2 [d, w]; no intermediate_size
])
def test_simu_masks_lie_on_the_mlp_neuron_axis_of_any_layout(base, split, family, update, width):
    import transformers as tf

    _, tokenizer = base
    torch.manual_seed(0)
    config = {"gpt2": tf.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64),
              "opt": tf.OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)}[family]
    model = tf.AutoModelForCausalLM.from_config(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = registry["SIMU"](model, tokenizer, update=update, steps=3, batch_size=4, lr=1e-2, fraction=0.25,
                              score_batches=2, hessian_interval=1, progress=False)
    method.fit(split[1], split[2])
    assert len(method.neuron_masks) == 4
    for name, mask in method.neuron_masks.items():
        assert mask.shape == (width,) and int(mask.sum()) == width // 4, name
        weight = dict(model.named_parameters())[name]
        axis = [a for a in (0, 1) if weight.shape[a] == width][0]
        moved = (weight.detach() != before[name]).any(dim=1 - axis)       # per neuron: did it change?
        assert moved.any() and not (moved & ~mask.to(moved.device)).any(), name   # only selected neurons


def test_simu_refuses_weights_without_a_neuron_axis(base):
    model, tokenizer = fresh(base)
    with pytest.raises(ValueError, match="cannot tell the MLP-neuron axis"):
        registry["SIMU"](model, tokenizer, update=["layers.1.self_attn.q_proj"], progress=False)
