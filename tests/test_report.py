"""report.json says what a run really did."""

import torch

from unlearn_kernels.data import entangled
from unlearn_kernels.methods import registry
from unlearn_kernels.models import tiny

from conftest import our_png_size


def test_weights_that_get_no_gradient_are_refused_by_name():
    import pytest

    model, tokenizer = tiny.load()
    bench = entangled.generate(0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # the loss is at layer 1: layer 2's down_proj is above it -- refused when the method is built
    with pytest.raises(ValueError, match=r"1 selected parameter\(s\) sit above the loss layer 1.*layers\.2\.mlp\.down_proj"):
        registry["RMU"](model, tokenizer, layer=1, update=["layers.{1,2}.mlp.down_proj"], steps=3)
    with pytest.raises(ValueError, match=r"sit above the loss layer 1.*layers\.3\.mlp\.down_proj"):
        registry["SRMU"](model, tokenizer, layer=1, update=["layers.3.mlp.down_proj"], steps=3)
    # outside the layer list (the final norm runs after the last layer): caught at the first step
    method = registry["RMU"](model, tokenizer, layer=1, update=["layers.1.mlp.down_proj", "model.norm"], steps=3,
                             batch_size=4, lr=1e-3, progress=False)
    with pytest.raises(ValueError, match=r"1 selected parameter\(s\) get no gradient.*model\.norm\.weight"):
        method.fit(bench.corpus(bench.forget_facts()), bench.corpus(bench.retain_facts()))
    only_norm = registry["RMU"](model, tokenizer, layer=1, update=["model.norm"], steps=3, batch_size=4, lr=1e-3,
                                progress=False)
    with pytest.raises(ValueError, match="no selected parameter gets a gradient"):
        only_norm.fit(bench.corpus(bench.forget_facts()), bench.corpus(bench.retain_facts()))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_report_lists_only_weights_that_changed_with_their_change():
    model, tokenizer = tiny.load()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bench = entangled.generate(0.25)
    method = registry["RMU"](model, tokenizer, layer=1, update=["layers.1.mlp.down_proj"], steps=3,
                             batch_size=4, lr=1e-3, progress=False)
    method.fit(bench.corpus(bench.forget_facts()), bench.corpus(bench.retain_facts()))
    report = method.report()
    changed = {k: float((v - before[k]).abs().max()) for k, v in model.state_dict().items()
               if not torch.equal(v, before[k])}
    assert set(report["updated_parameters"]) == set(changed) == {"model.layers.1.mlp.down_proj.weight"}
    for name, entry in report["updated_parameters"].items():
        assert entry["max_abs_delta"] == changed[name] > 0
    assert report["selected_but_unchanged"] == []
    assert len(report["history"]) == 3 and report["wall_time_s"] > 0 and report["device"] == "cpu"
    assert report["dtype"] == "float32" and report["peak_memory"]["cpu_max_rss_bytes"] > 0
    assert report["unlearn_kernels"]["report_schema"] == 1 and report["needs"] == []
    assert {"torch", "transformers", "unlearn_kernels"} <= set(report["versions"])


def test_mrp_report_names_the_projection_it_needs_and_no_weight():
    model, tokenizer = tiny.load()
    bench = entangled.generate(0.25)
    method = registry["MRP"](model, tokenizer, layer=1, rank=4, train_steps=0, batch_size=8, progress=False)
    method.fit(bench.corpus(bench.forget_facts()), bench.corpus(bench.retain_facts()))
    report = method.report()
    assert report["updated_parameters"] == {} and report["needs"] == ["unlearn_projections.safetensors"]


def test_cli_report_holds_before_after_accuracy_relearning_and_a_plot(tmp_path, capsys):
    import json

    from unlearn_kernels import cli
    from unlearn_kernels.data.loaders import write_jsonl

    bench = entangled.generate(0.25)
    facts = bench.forget_facts()
    (tmp_path / "forget.txt").write_text("\n".join(bench.corpus(facts)))
    (tmp_path / "retain.txt").write_text("\n".join(bench.corpus(bench.retain_facts())))
    (tmp_path / "attack.txt").write_text("\n".join(bench.corpus(facts[::2])))
    write_jsonl(tmp_path / "f.jsonl", [q.to_json() for q in bench.questions(facts[1::2])])
    write_jsonl(tmp_path / "r.jsonl", [q.to_json() for q in bench.questions(bench.retain_facts()[:24])])
    code = cli.main(["unlearn", "--model", str(tiny.ASSET_DIR), "--method", "GradDiff", "--forget",
                     str(tmp_path / "forget.txt"), "--retain", str(tmp_path / "retain.txt"), "--out",
                     str(tmp_path / "out"), "--set", "steps=20", "--set", "lr=2e-3", "--set", "progress=false",
                     "--eval-forget", str(tmp_path / "f.jsonl"), "--eval-retain", str(tmp_path / "r.jsonl"),
                     "--relearn", str(tmp_path / "attack.txt")])
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    ev = report["evaluation"]
    assert ev["before"]["forget"]["acc"] == 1.0 and ev["after"]["forget"]["acc"] < 1.0
    assert set(ev["after"]) == {"forget", "retain"} and report["relearning"]["max_acc"] >= 0
    width, height = our_png_size(tmp_path / "out" / "report.png")   # panels of 5.5 x 4 inches at 100 dpi
    assert height == 400 and width in (550, 1100, 1650)
    assert "forget accuracy: 1.000 ->" in capsys.readouterr().out


def test_settings_a_method_ignores_are_refused():
    import pytest

    model, tokenizer = tiny.load()
    for name, setting in (("AdaptiveRMU", {"steering": 1000.0}), ("SRMU", {"steering": 1.0}),
                          ("MRP", {"steps": 10}), ("MRP", {"update": ["layers.1.mlp.*"]})):
        with pytest.raises(ValueError, match=f"does not use the setting {next(iter(setting))}"):
            registry[name](model, tokenizer, layer=1, **setting)
    registry["RMU"](model, tokenizer, layer=1, update=["layers.1.mlp.down_proj"], steering=1000.0)  # RMU uses it
