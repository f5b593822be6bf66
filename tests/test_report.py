"""report.json says what a run really did."""

import torch

from unlearn_kernels.data import entangled
from unlearn_kernels.methods import registry
from unlearn_kernels.models import tiny


def test_report_lists_only_weights_that_changed_with_their_change():
    model, tokenizer = tiny.load()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bench = entangled.generate(0.25)
    # the loss is at layer 1: layer 2's down_proj is selected but gets no gradient
    method = registry["RMU"](model, tokenizer, layer=1, update=["layers.{1,2}.mlp.down_proj"], steps=3,
                             batch_size=4, lr=1e-3, progress=False)
    method.fit(bench.corpus(bench.forget_facts()), bench.corpus(bench.retain_facts()))
    report = method.report()
    changed = {k: float((v - before[k]).abs().max()) for k, v in model.state_dict().items()
               if not torch.equal(v, before[k])}
    assert set(report["updated_parameters"]) == set(changed) == {"model.layers.1.mlp.down_proj.weight"}
    for name, entry in report["updated_parameters"].items():
        assert entry["max_abs_delta"] == changed[name] > 0
    assert report["selected_but_unchanged"] == ["model.layers.2.mlp.down_proj.weight"]
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
