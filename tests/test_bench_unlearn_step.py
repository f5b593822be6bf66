"""benchmarks/bench_unlearn_step.py: its ``--quick`` run (one process per configuration) gives
complete records, and the reference loops are faithful: from the same weights their first-step
losses equal our methods' (fp32, 1e-5 relative) — RMU against WMDP's loop, SRMU and SIMU
against the naive loops written in its style. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import benchmark_script

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_unlearn_step.py"
EXPECTED = {("RMU", "reference"), ("RMU", "ours"), ("RMU", "ours-prefix"), ("SRMU", "reference"), ("SRMU", "ours"),
            ("SRMU", "ours-prefix"), ("SIMU", "reference"), ("SIMU", "ours")}


def _bench():
    return benchmark_script("bench_unlearn_step")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out)], capture_output=True,
                         text=True, env=env, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    payload = json.loads(out.read_text())
    return payload, {(r["method"], r["impl"]): r for r in payload["records"]}, run.stdout


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b)) + 1e-12


def test_every_configuration_has_a_complete_record(quick):
    payload, records, _ = quick
    assert set(records) == EXPECTED
    layer, depth = payload["layer"], payload["depths"][0]
    steps = payload["warmup"] + payload["steps"]
    for (method, impl), r in records.items():
        assert "error" not in r, r
        assert r["dtype"] == "float32" and r["depth"] == depth and r["layer"] == layer
        assert len(r["step_times_s"]) == steps and len(r["losses"]) == steps
        assert r["median_step_s"] > 0
        assert r["peak_rss_bytes"] >= r["rss_before_load_bytes"] > 0
        assert r["cuda_max_allocated_bytes"] is None          # a CPU run
        assert r["first_losses"] == r["losses"][0]
        if impl == "ours-prefix":
            assert r["layers_in_memory"] == layer + 1
            assert r["loading"] == "models.prefix.load_prefix"
        else:
            assert r["layers_in_memory"] == depth and r["loading"] is None


@pytest.mark.parametrize("method", ["RMU", "SRMU", "SIMU"])
def test_reference_loop_matches_ours_on_the_first_step(quick, method):
    _, records, _ = quick
    ref, ours = records[(method, "reference")]["first_losses"], records[(method, "ours")]["first_losses"]
    for term in ("forget", "retain"):
        assert _close(ref[term], ours[term]), (method, term, ref[term], ours[term])
    assert abs(ref["forget"]) > 1e-6          # a real loss, not two zeros
    if (method, "ours-prefix") in records:    # the prefix model computes the same function
        prefix = records[(method, "ours-prefix")]["first_losses"]
        assert all(_close(prefix[t], ours[t]) for t in ("forget", "retain"))


def test_the_table_has_the_ratios_and_the_goals(quick):
    _, _, stdout = quick
    assert "| method | layers | dtype | impl |" in stdout and "ref / this time" in stdout
    assert "goal ≥ 6×" in stdout and "goal ≥ 8×" in stdout
    assert stdout.count("| RMU |") == 3


def test_get_params_is_the_down_projection():
    """WMDP selects parameter number 6 of each decoder layer: on Llama, ``mlp.down_proj.weight``."""
    import transformers as tf

    model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                               num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    chosen = _bench().get_params(model, [0, 2])
    assert [p is q for p, q in zip(chosen, [model.model.layers[0].mlp.down_proj.weight,
                                            model.model.layers[2].mlp.down_proj.weight])] == [True, True]


def test_a_depth_at_or_below_the_loss_layer_is_refused(capsys):
    assert _bench().main(["--quick", "--depths", "2"]) == 2
    assert "must exceed the loss layer" in capsys.readouterr().err


def test_control_vector_is_our_rmu_direction():
    """The reference's ``c·u`` is drawn as RMU draws its direction (same seed, same numbers)."""
    bench = _bench()
    g = torch.Generator().manual_seed(bench.SEED)
    u = torch.rand(16, generator=g)
    torch.testing.assert_close(bench._control(16, 2.0, torch.float32, "cpu").flatten(), 2.0 * u / u.norm())
