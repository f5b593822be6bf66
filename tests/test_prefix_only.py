"""Prefix-only loading (``models.prefix``, ``--prefix-only``): a random Llama saved in several
shards, unlearned from its first l+1 layers, is written back as the full checkpoint equal,
tensor for tensor, to what the full-model run saves; plain ``transformers`` loads it; the peak
memory of the prefix run does not grow with depth (the full run's does)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from unlearn_kernels.cli import main
from unlearn_kernels.data.entangled import generate
from unlearn_kernels.models import tiny
from unlearn_kernels.models.prefix import checkpoint_keys, load_prefix, save_prefix_output

ROOT = Path(__file__).resolve().parents[1]


def _sharded_model(folder: Path, depth: int = 6, hidden: int = 64, shard: str = "60KB", width: int = 96) -> Path:
    torch.manual_seed(depth)
    _, tokenizer = tiny.load()
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=width,
                            num_hidden_layers=depth, num_attention_heads=4, pad_token_id=tokenizer.pad_token_id,
                            tie_word_embeddings=False)
    tf.LlamaForCausalLM(config).save_pretrained(folder, max_shard_size=shard)
    tokenizer.save_pretrained(folder)
    return folder


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(set(checkpoint_keys(folder).values())):
        out.update(load_file(str(folder / shard)))
    return out


def _data(tmp_path: Path) -> list[str]:
    bench = generate(0.25)
    (tmp_path / "forget.txt").write_text("\n".join(bench.corpus(bench.forget_facts())) + "\n")
    (tmp_path / "retain.txt").write_text("\n".join(bench.corpus(bench.retain_facts())) + "\n")
    return ["--forget", str(tmp_path / "forget.txt"), "--retain", str(tmp_path / "retain.txt"), "--device", "cpu"]


@pytest.mark.parametrize("method", ["RMU", "SRMU"])
def test_prefix_run_equals_the_full_run_tensor_for_tensor(tmp_path, method):
    src = _sharded_model(tmp_path / "src")
    assert len(set(checkpoint_keys(src).values())) > 3
    common = ["unlearn", "--model", str(src), "--method", method, *_data(tmp_path), "--set", "steps=3",
              "--set", "stats_batches=2", "--set", "layer=2"] if method == "SRMU" else \
             ["unlearn", "--model", str(src), "--method", method, *_data(tmp_path), "--set", "steps=3", "--set", "layer=2"]
    assert main([*common, "--out", str(tmp_path / "prefix"), "--prefix-only"]) == 0
    assert main([*common, "--out", str(tmp_path / "full"), "--no-prefix-only"]) == 0
    prefix, full = _tensors(tmp_path / "prefix"), _tensors(tmp_path / "full")
    source = _tensors(src)
    assert prefix.keys() == full.keys() == source.keys()
    changed = [k for k in prefix if not torch.equal(prefix[k], source[k])]
    assert changed and all(".layers.0." in k or ".layers.1." in k or ".layers.2." in k for k in changed)
    for key in full:
        assert torch.equal(prefix[key], full[key]), key
    report = json.loads((tmp_path / "prefix" / "report.json").read_text())
    assert report["prefix_only"] == {"layers_loaded": 3, "depth": 6, "layer": 2, "layer_chosen_by_structure": False}
    # untouched shards are the source's bytes; the folder loads as the full unlearned model
    untouched = {v for k, v in checkpoint_keys(src).items()} - {checkpoint_keys(src)[k] for k in changed}
    for shard in untouched:
        assert (tmp_path / "prefix" / shard).read_bytes() == (src / shard).read_bytes()
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "prefix")
    assert loaded.config.num_hidden_layers == 6
    for name, p in loaded.named_parameters():
        assert torch.equal(p, full[name]), name


def test_auto_uses_the_prefix_and_keeps_the_full_run_for_evaluation(tmp_path):
    src = _sharded_model(tmp_path / "src")
    args = ["unlearn", "--model", str(src), "--method", "RMU", *_data(tmp_path), "--set", "steps=2"]
    assert main([*args, "--out", str(tmp_path / "auto")]) == 0
    report = json.loads((tmp_path / "auto" / "report.json").read_text())
    # the default layer of 6 layers is 2 (max(2, round(7·6/32))): 3 of 6 layers loaded
    assert report["prefix_only"] == {"layers_loaded": 3, "depth": 6, "layer": 2, "layer_chosen_by_structure": True}
    assert main([*args, "--out", str(tmp_path / "top"), "--set", "layer=5"]) == 0
    assert "prefix_only" not in json.loads((tmp_path / "top" / "report.json").read_text())


@pytest.mark.parametrize("extra, message", [
    (["--method", "GradDiff", "--prefix-only"], "GradDiff runs the whole model"),
    (["--method", "MRP", "--prefix-only"], "MRP runs the whole model"),
    (["--method", "RMU", "--prefix-only", "--eval-forget", "QUESTIONS"], "need the whole model"),
])
def test_refusals(tmp_path, capsys, extra, message):
    src = _sharded_model(tmp_path / "src")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "q?", "choices": ["a", "b"], "answer": 0}) + "\n")
    extra = [str(questions) if e == "QUESTIONS" else e for e in extra]
    assert main(["unlearn", "--model", str(src), *_data(tmp_path), "--out", str(tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_load_prefix_reads_only_the_first_layers(tmp_path):
    src = _sharded_model(tmp_path / "src")
    model, _ = load_prefix(src, 3)
    assert len(model.model.layers) == 3 and model.unlearn_prefix["depth"] == 6
    full = _tensors(src)
    for name, p in model.named_parameters():
        assert torch.equal(p, full[name]), name
    with pytest.raises(ValueError, match="the model has 6 decoder layers"):
        load_prefix(src, 7)


@pytest.mark.parametrize("dtype, tied", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_the_direct_reader_equals_transformers_loader(tmp_path, dtype, tied):
    """The prefix read tensor by tensor from the shards (no converting loader) is the model
    transformers' own ``from_pretrained`` builds: every parameter and buffer (rotary tables
    included), the dtype, and a tied head that stays tied."""
    import unlearn_kernels.models.prefix as prefix

    src = _sharded_model(tmp_path / "src")
    if tied:
        cfg = json.loads((src / "config.json").read_text())
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**cfg, "tie_word_embeddings": True}))
        model.save_pretrained(tmp_path / "tied", max_shard_size="60KB")
        src = tmp_path / "tied"
    config = tf.AutoConfig.from_pretrained(src)
    config.num_hidden_layers = 3
    ours = prefix._read_prefix(src, config, dtype)
    assert ours is not None
    theirs = tf.AutoModelForCausalLM.from_pretrained(src, config=config, dtype=dtype)
    a, b = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == dtype for k in a)
    a, b = dict(ours.named_buffers()), dict(theirs.named_buffers())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied


def test_a_name_the_checkpoint_lacks_is_refused(tmp_path):
    src = _sharded_model(tmp_path / "src")
    with pytest.raises(ValueError, match="stores no tensor named model.layers.9"):
        save_prefix_output(src, tmp_path / "out", {"model.layers.9.mlp.down_proj.weight": torch.zeros(1)})
    assert not (tmp_path / "out").exists()


PEAK = r"""
import json, re, sys
from pathlib import Path
from unlearn_kernels.cli import main
rc = main(sys.argv[1:])
# VmHWM: this process's peak RSS (ru_maxrss would carry the forking pytest's peak across exec)
peak = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
print(json.dumps({"rc": rc, "rss": peak}))
"""


def _peak(tmp_path: Path, src: Path, out: str, flag: str) -> int:
    result = subprocess.run([sys.executable, "-c", PEAK, "unlearn", "--model", str(src), "--method", "RMU",
                             *_data(tmp_path), "--set", "steps=1", "--set", "layer=2", "--set", "batch_size=2",
                             "--set", "max_length=16", "--out", str(tmp_path / out), flag],
                            capture_output=True, text=True, timeout=600, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                                              "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["rc"] == 0
    return info["rss"]


def test_prefix_peak_memory_does_not_grow_with_depth(tmp_path):
    """Depth 8 → 16 of a model whose layers are ~28 MB each: the full run's peak grows by the
    added layers, the prefix run's (layers 0–2 loaded) stays within 10 %."""
    shallow = _sharded_model(tmp_path / "d8", depth=8, hidden=768, shard="60MB", width=2048)
    deep = _sharded_model(tmp_path / "d16", depth=16, hidden=768, shard="60MB", width=2048)
    full = [_peak(tmp_path, src, f"full{i}", "--no-prefix-only") for i, src in enumerate((shallow, deep))]
    prefix = [_peak(tmp_path, src, f"prefix{i}", "--prefix-only") for i, src in enumerate((shallow, deep))]
    assert full[1] > 1.1 * full[0], full          # the measurement can see the added layers
    assert prefix[1] <= 1.1 * prefix[0], prefix


@pytest.mark.parametrize("flag", ["--prefix-only", "--no-prefix-only"])
def test_a_missing_shard_is_one_line_before_any_work(tmp_path, capsys, flag):
    src = _sharded_model(tmp_path / "src")
    shard = sorted(set(checkpoint_keys(src).values()))[-1]
    (src / shard).unlink()
    capsys.readouterr()
    assert main(["unlearn", "--model", str(src), "--method", "RMU", *_data(tmp_path), "--out", str(tmp_path / "o"),
                 flag]) == 2
    err = capsys.readouterr().err
    assert f"lists 1 shard(s) the folder lacks, first {shard}" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()



def test_a_projected_source_loads_whole_in_auto_and_is_refused_when_asked(tmp_path, capsys):
    """An MRP output carries projections a partial load and a shard rewrite would drop: auto
    loads it whole, with its projection attached, which no other run's output can keep: refused
    before any training; --prefix-only says why it cannot."""
    data = _data(tmp_path)
    assert main(["unlearn", "--model", str(tiny.ASSET_DIR), "--method", "MRP", *data, "--set", "stats_batches=2",
                 "--set", "train_steps=0", "--out", str(tmp_path / "mrp")]) == 0
    args = ["unlearn", "--model", str(tmp_path / "mrp"), "--method", "RMU", *data, "--set", "steps=2"]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "auto")]) == 2
    err = capsys.readouterr().err
    assert "carries MRP projections (after layer 2) that an output of RMU cannot keep" in err
    assert "RMU:" not in err and "step" not in err     # no progress line: nothing ran
    assert not (tmp_path / "auto").exists()
    assert main([*args, "--out", str(tmp_path / "asked"), "--prefix-only"]) == 2
    err = capsys.readouterr().err
    assert "--prefix-only:" in err and "carries MRP projections, which the shard rewrite would drop" in err
    assert not (tmp_path / "asked").exists()
