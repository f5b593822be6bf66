"""unlearn_kernels.plan against measurements at small scale: the parameter count exactly (transformers
models built from the same configs), and the single-GPU memory bill of RMU, RMU with activation
checkpointing, SIMU and TAR on a small random Llama in fp32 on the CPU against the bytes actually
held: parameters, frozen copy, gradients, optimizer state and TAR's attacker (its weights θ_k, their
gradient, the meta-gradient, its Adam moments) exactly, the peak over one loss evaluation of the
tensors autograd saves for backward (counted by storage with ``saved_tensors_hooks`` while their
graph lives, weights left out: the model's own and the attack's leaves) within 10 %, the sum within 5 %."""

from __future__ import annotations

import fnmatch
import json
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import pytest
import torch

from unlearn_kernels import plan as planner

ROOT = Path(__file__).resolve().parents[1]
LLAMA_70B = ROOT / "unlearn_kernels" / "assets" / "configs" / "llama-70b.json"
SMALL = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=12, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300)
BATCH, SEQ = 2, 64


def _numel(config: dict) -> int:
    import transformers as tf

    cfg = tf.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())     # shared (tied) weights once


@pytest.mark.parametrize("config", [
    dict(model_type="llama", **SMALL),
    dict(model_type="llama", **SMALL, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    dict(model_type="mistral", **SMALL),
    dict(model_type="qwen2", **SMALL),
    dict(model_type="qwen3", **SMALL, head_dim=48),
], ids=["llama", "llama-tied-biases", "mistral", "qwen2", "qwen3"])
def test_parameter_count_equals_transformers(config):
    assert planner.parameter_counts(planner.Shape.from_config(config))["total"] == _numel(config)


def test_the_shipped_70b_config():
    config = json.loads(LLAMA_70B.read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"],
            config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == \
        (8192, 80, 28672, 64, 8, 128256)
    total = planner.parameter_counts(planner.Shape.from_config(config))["total"]
    assert total == _numel(config) == 70_553_706_496
    pattern = __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["unlearn_kernels"]
    assert any(fnmatch.fnmatch("assets/configs/llama-70b.json", p) for p in pattern)   # shipped in the wheel


def test_prefix_and_sharding_arithmetic():
    config = json.loads(LLAMA_70B.read_text())
    counts = planner.parameter_counts(planner.Shape.from_config(config))
    eight = planner.plan(config, 8, method="RMU")["methods"]["RMU"]
    assert eight["prefix_only"] and eight["layer"] == 18 and eight["band"] == [16, 17, 18]
    assert eight["memory"]["weights"] == (counts["embedding"] + 19 * counts["layer"]) * 2 / 8
    full = planner.plan(config, 8, method="RMU", prefix_only=False)["methods"]["RMU"]
    assert full["memory"]["weights"] == counts["total"] * 2 / 8 > eight["memory"]["weights"]
    sixteen = planner.plan(config, 16, method="RMU")["methods"]["RMU"]
    assert sixteen["memory"]["optimizer"] == eight["memory"]["optimizer"] / 2
    ckpt = planner.plan(config, 8, method="SIMU", checkpointing=True)["methods"]["SIMU"]
    assert ckpt["memory"]["activations"] < planner.plan(config, 8, method="SIMU")["methods"]["SIMU"]["memory"][
        "activations"] / 10
    assert planner.plan(config, 1, method="RMU")["methods"]["RMU"]["communication"]["total"] == 0


# --- the memory bill against a measured small run ------------------------------------------------------
def _small_run(method_name: str, checkpointing: bool = False):
    import transformers as tf

    from unlearn_kernels.methods import registry
    from unlearn_kernels.methods.base import activation_checkpointing
    from unlearn_kernels.models import tiny

    torch.manual_seed(0)
    words = [f"w{i}" for i in range(SMALL["vocab_size"] - 4)]
    tokenizer = tiny.build_tokenizer(words)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(pad_token_id=0, **SMALL))
    g = torch.Generator().manual_seed(1)
    texts = [" ".join(words[i] for i in torch.randint(0, len(words), (SEQ,), generator=g).tolist())
             for _ in range(BATCH)]
    extra = {"score_batches": 1} if method_name == "SIMU" else {}
    method = registry[method_name](model, tokenizer, steps=1, batch_size=BATCH, max_length=SEQ, progress=False,
                                   checkpointing=checkpointing, **extra)
    method.fit(texts, texts)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)   # noqa: E731
    measured = {
        "weights": nbytes(model.parameters()),
        "frozen_copy": nbytes(method.frozen.frozen.values()) if hasattr(method, "frozen") else 0,
        "optimizer": nbytes(v for s in method.optimizer.state.values() for k, v in s.items()
                            if torch.is_tensor(v) and k in ("exp_avg", "exp_avg_sq", "hessian")),
        "grads": nbytes(p for p in method.params.values()),          # one gradient per updated weight
    }
    for p in method.params.values():             # fit turned them off again
        p.requires_grad_(True)
    model.train()
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    live: dict[int, list[int]] = {}       # storage -> [saved references, bytes], while a graph holds it
    held = [0, 0]                         # bytes now, peak

    class Saved:
        def __init__(self, t):
            self.t, self.ptr = t, t.untyped_storage().data_ptr()
            entry = live.setdefault(self.ptr, [0, t.untyped_storage().nbytes()])
            held[0] += entry[1] if entry[0] == 0 else 0
            held[1] = max(held)
            entry[0] += 1

        def __del__(self):
            entry = live[self.ptr]
            entry[0] -= 1
            if entry[0] == 0:
                held[0] -= live.pop(self.ptr)[1]

    def pack(t):
        base = t if t._base is None else t._base
        if t.untyped_storage().data_ptr() in own or (base.is_leaf and base.requires_grad):   # a weight
            return t
        return Saved(t)

    attacker = {}

    def adam_update(weights, grads, state, lr, step):
        new = adam_update.original(weights, grads, state, lr, step)
        attacker.update(adversary=nbytes(new.values()) + nbytes(grads.values()),
                        adversary_optimizer=nbytes(t for pair in state.values() for t in pair))
        return new

    def post_attack_gradients(forget_batch):
        meta, value = type(method).post_attack_gradients(method, forget_batch)
        attacker["meta"] = nbytes(meta.values())
        return meta, value

    batch = next(method.batches(texts))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t.t if isinstance(t, Saved) else t), \
            (activation_checkpointing(model) if checkpointing else nullcontext()):
        if method_name == "TAR":
            from unlearn_kernels.methods import tar

            adam_update.original = tar.adam_update
            with mock.patch.object(tar, "adam_update", adam_update), \
                    mock.patch.object(method, "post_attack_gradients", post_attack_gradients):
                method.loss(batch, batch, 0)
        else:
            method.loss(batch, batch, 0)
    measured["activations"] = held[1]
    measured["adversary"] = attacker.get("adversary", 0) + attacker.get("meta", 0)
    measured["adversary_optimizer"] = attacker.get("adversary_optimizer", 0)
    return measured


@pytest.mark.parametrize("method,checkpointing", [("RMU", False), ("RMU", True), ("SIMU", False), ("TAR", False)])
def test_memory_estimate_matches_the_measured_bytes(method, checkpointing):
    measured = _small_run(method, checkpointing)
    estimate = planner.plan(dict(model_type="llama", torch_dtype="float32", **SMALL), 1, method=method,
                            batch=BATCH, seq=SEQ, prefix_only=False, checkpointing=checkpointing)
    memory = estimate["methods"][method]["memory"]
    exact = ("weights", "frozen_copy", "optimizer", "grads", "adversary", "adversary_optimizer")
    for part in exact:
        assert memory[part] == measured[part], part
    assert measured["activations"] > 0 and (measured["adversary"] > 0) == (method == "TAR")
    assert abs(memory["activations"] - measured["activations"]) <= 0.10 * measured["activations"], \
        (memory["activations"], measured["activations"])
    parts = exact + ("activations",)
    total, bill = sum(measured[p] for p in parts), sum(memory[p] for p in parts)
    assert abs(bill - total) <= 0.05 * total, (bill, total)


# --- the command-line pair ------------------------------------------------------------------------------
def _run(*argv):
    """``unlearn-kernels plan ARGV`` through the real command line."""
    from unlearn_kernels.cli import main

    return main(["plan", *argv])


def test_run_prints_every_method(capsys):
    assert _run("--config", str(LLAMA_70B), "--gpus", "8") == 0
    out = capsys.readouterr().out
    assert "70.554 B parameters" in out
    assert all(f"| {name} |" in out for name in planner.METHODS if name != "TAR")
    assert "| TAR * |" in out and "* TAR: one process only" in out


@pytest.mark.parametrize("argv,message", [
    (("--config", "/nonexistent/config.json", "--gpus", "8"), "no config file"),
    (("--config", str(LLAMA_70B), "--gpus", "0"), "--gpus must be >= 1, got '0'"),
    (("--config", str(LLAMA_70B), "--gpus", "8", "--batch", "0"), "--batch must be >= 1, got '0'"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    assert _run(*argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("unlearn-kernels plan: error:")


def test_a_config_without_sizes_is_refused(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    assert _run("--config", str(path), "--gpus", "2") == 2
    assert "lacks intermediate_size" in capsys.readouterr().err
    path.write_text("{not json")
    assert _run("--config", str(path), "--gpus", "2") == 2
    assert "not valid JSON" in capsys.readouterr().err
