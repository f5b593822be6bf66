"""A hostile model folder or data file: never a write outside ``--out``, never its code run,
never a user's folder deleted, never a broken model reported as unlearned, never a crash.

Every fixture is made here: the folders, their indexes, the marker files.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unlearn_kernels import cli
from unlearn_kernels.data import entangled
from unlearn_kernels.models import tiny
from unlearn_kernels.models.folder_paths import UnsafePathError, check_model_folder, inside

MODEL = Path(tiny.ASSET_DIR)


@pytest.fixture()
def data(tmp_path):
    bench = entangled.generate(0.25)
    (tmp_path / "forget.txt").write_text("\n".join(bench.corpus(bench.forget_facts())[:8]))
    (tmp_path / "retain.txt").write_text("\n".join(bench.corpus(bench.retain_facts())[:8]))
    qs = bench.questions(bench.forget_facts())[:6]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q.to_json()) + "\n" for q in qs))
    return tmp_path


def copy_model(to: Path, source: Path = MODEL) -> Path:
    to.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file() and f.name != "report.json":
            shutil.copyfile(f, to / f.name)
    return to


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def unlearn(capsys, data, model, out, *extra, method="RMU"):
    return run_cli(capsys, "unlearn", "--model", model, "--method", method, "--forget", data / "forget.txt",
                   "--retain", data / "retain.txt", "--out", out, "--set", "steps=2", "--set", "progress=false",
                   *extra)


# --- 1. names in a folder stay in it ----------------------------------------------------------
@pytest.mark.parametrize("name", ["../x.safetensors", "/etc/passwd", "a/../../b", "..", "./m.safetensors",
                                  "a\\..\\b", "", "a//b", "x\x00y"])
def test_names_leaving_the_folder_are_refused(tmp_path, name):
    with pytest.raises(UnsafePathError, match="index.json"):
        inside(tmp_path, name, source="index.json", entry="weight_map['w']")


@pytest.mark.parametrize("name", ["model.safetensors", "model-00001-of-00002.safetensors", "sub/m.safetensors"])
def test_plain_names_are_kept(tmp_path, name):
    assert inside(tmp_path, name) == tmp_path / name


@pytest.mark.parametrize("ref", ["../../evil.Model", "other/repo--modeling.Model", "..evil.Model", "noclass"])
def test_auto_map_outside_the_folder_is_refused(tmp_path, ref):
    folder = copy_model(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": ref}}))
    with pytest.raises(UnsafePathError, match="auto_map"):
        check_model_folder(folder)


def traversal_folder(tmp_path) -> tuple[Path, Path]:
    """A model folder whose shard index maps every tensor to ``../elsewhere/model.safetensors``
    (which holds the real weights, so every read succeeds)."""
    from safetensors import safe_open

    folder = copy_model(tmp_path / "hostile")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.replace(folder / "model.safetensors", elsewhere / "model.safetensors")
    with safe_open(str(elsewhere / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    index = {"metadata": {}, "weight_map": {k: "../elsewhere/model.safetensors" for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder, elsewhere / "model.safetensors"


@pytest.mark.parametrize("extra", [["--dtype", "bfloat16"], ["--prefix-only"], []])
def test_a_shard_index_pointing_outside_writes_nothing(capsys, data, tmp_path, extra):
    folder, target = traversal_folder(tmp_path)
    before = (target.read_bytes(), target.stat().st_mtime_ns)
    out = tmp_path / "out"
    code, err = unlearn(capsys, data, folder, out, *extra)
    assert code == 2 and "leaves the folder" in one_line(err) and "weight_map" in err
    assert (target.read_bytes(), target.stat().st_mtime_ns) == before
    assert not out.exists() and sorted(p.name for p in target.parent.iterdir()) == ["model.safetensors"]


def test_save_prefix_output_never_writes_outside_its_staging_folder(tmp_path):
    """The writer itself refuses, even when called past the CLI's checks."""
    from unlearn_kernels.models.prefix import save_prefix_output

    folder, target = traversal_folder(tmp_path)
    before = target.read_bytes()
    with pytest.raises(UnsafePathError):
        save_prefix_output(folder, tmp_path / "out", {"model.embed_tokens.weight": torch.zeros(1)})
    assert target.read_bytes() == before and not (tmp_path / "out").exists()


def test_eval_refuses_a_traversing_index(capsys, data, tmp_path):
    folder, _ = traversal_folder(tmp_path)
    code, err = run_cli(capsys, "eval", "--model", folder, "--questions", data / "q.jsonl")
    assert code == 2 and "leaves the folder" in one_line(err)


# --- 2. no code from a folder runs without --trust-remote-code --------------------------------
PAYLOAD = """
from pathlib import Path
Path({marker!r}).write_text("ran")
"""


def projected_folder(tmp_path, marker: Path) -> Path:
    """An MRP-style projected folder of ours whose modeling file was replaced by a payload that
    writes ``marker`` when imported."""
    from unlearn_kernels.models.io import load_local, save_pretrained_atomic

    model, tokenizer = load_local(MODEL)
    d = model.config.hidden_size
    basis = torch.linalg.qr(torch.randn(d, 2, generator=torch.Generator().manual_seed(0)))[0]
    out = save_pretrained_atomic(model, tokenizer, tmp_path / "projected", {"method": "MRP"}, {"layer.1": basis})
    modeling = out / "modeling_unlearn.py"
    modeling.write_text(PAYLOAD.format(marker=str(marker)) + modeling.read_text())
    return out


@pytest.mark.parametrize("engine", ["lm-eval", "ours"])
def test_eval_never_runs_a_projected_folders_code(capsys, data, tmp_path, engine):
    pytest.importorskip("lm_eval")
    marker = tmp_path / "marker"
    folder = projected_folder(tmp_path, marker)
    code, err = run_cli(capsys, "eval", "--model", folder, "--questions", data / "q.jsonl", "--engine", engine,
                        "--json", tmp_path / f"{engine}.json")
    assert code == 0, err
    assert not marker.exists()


def test_both_engines_agree_on_a_projected_folder(capsys, data, tmp_path):
    """lm-eval scores the projected model (projection included), not the base model."""
    pytest.importorskip("lm_eval")
    folder = projected_folder(tmp_path, tmp_path / "marker")
    results = {}
    for engine in ("ours", "lm-eval"):
        assert run_cli(capsys, "eval", "--model", folder, "--questions", data / "q.jsonl", "--engine", engine,
                       "--log-samples", tmp_path / f"{engine}.jsonl")[0] == 0
        results[engine] = [v for line in (tmp_path / f"{engine}.jsonl").read_text().splitlines()
                           for v in json.loads(line)["loglikelihoods"]]
    base = run_cli(capsys, "eval", "--model", MODEL, "--questions", data / "q.jsonl", "--log-samples",
                   tmp_path / "base.jsonl")
    assert base[0] == 0
    base_ll = [v for line in (tmp_path / "base.jsonl").read_text().splitlines() for v in json.loads(line)["loglikelihoods"]]
    assert results["ours"] == pytest.approx(results["lm-eval"], abs=1e-4)
    assert results["ours"] != pytest.approx(base_ll, abs=1e-4)
    assert not (tmp_path / "marker").exists()


def custom_code_folder(tmp_path, marker: Path) -> Path:
    """A folder of a model type transformers does not ship, with its own modeling file (a Llama
    subclass that writes ``marker`` when imported)."""
    folder = copy_model(tmp_path / "custom")
    (folder / "modeling_custom.py").write_text(PAYLOAD.format(marker=str(marker)) + (
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n"))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom_llama", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_custom_code_runs_only_with_trust_remote_code(capsys, data, tmp_path):
    marker = tmp_path / "marker"
    folder = custom_code_folder(tmp_path, marker)
    code, err = run_cli(capsys, "eval", "--model", folder, "--questions", data / "q.jsonl")
    assert code == 2 and not marker.exists()
    one_line(err)
    code, err = run_cli(capsys, "eval", "--model", folder, "--questions", data / "q.jsonl", "--trust-remote-code")
    assert code == 0 and marker.exists() and "--trust-remote-code" in err


# --- 3. a checkpoint is ours only with our marker ---------------------------------------------
def test_a_folder_at_the_checkpoint_path_is_never_deleted(capsys, data, tmp_path):
    out = tmp_path / "out"
    users = tmp_path / "out.checkpoint"
    users.mkdir()
    (users / "state.json").write_text('{"step": 3, "mine": true}')
    (users / "notes.txt").write_text("years of work")
    for extra in (["--overwrite"], ["--resume"], []):
        code, err = unlearn(capsys, data, MODEL, out, "--checkpoint-every", "1000", *extra)
        assert code == 2 and "not an unlearn_kernels checkpoint" in one_line(err)
    assert sorted(p.name for p in users.iterdir()) == ["notes.txt", "state.json"]
    assert (users / "notes.txt").read_text() == "years of work" and not out.exists()


def test_our_checkpoints_carry_the_marker_and_are_removed_after_the_save(capsys, data, tmp_path):
    from unlearn_kernels.methods.checkpoint import is_checkpoint

    out = tmp_path / "out"
    code, err = run_cli(capsys, "unlearn", "--model", MODEL, "--method", "GradAscent", "--forget",
                        data / "forget.txt", "--out", out, "--set", "steps=2", "--set", "progress=false",
                        "--checkpoint-every", "1")
    assert code == 0, err
    assert not (tmp_path / "out.checkpoint").exists()
    from unlearn_kernels.methods.checkpoint import Checkpointer

    class Stub:   # the writer refuses to swap over a folder that is not a checkpoint
        pass

    users = tmp_path / "users"
    users.mkdir()
    (users / "state.json").write_text("{}")
    assert not is_checkpoint(users)
    with pytest.raises(ValueError, match="not an unlearn_kernels checkpoint"):
        Checkpointer(users)._write(Stub(), 0, {})
    Checkpointer(users).remove()
    assert (users / "state.json").read_text() == "{}"


# --- 4. a broken model never looks unlearned --------------------------------------------------
def broken_folder(tmp_path, kind: str) -> Path:
    folder = copy_model(tmp_path / kind)
    config = json.loads((folder / "config.json").read_text())
    if kind in ("nan", "inf"):
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(folder / "model.safetensors"))
        name = sorted(k for k in tensors if "layers.4.mlp.down_proj" in k)[0]
        tensors[name][0, 0] = float(kind)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif kind == "bert-config":
        from transformers import BertConfig

        bert = BertConfig(vocab_size=config["vocab_size"], hidden_size=config["hidden_size"], num_hidden_layers=2,
                          num_attention_heads=config["num_attention_heads"], intermediate_size=128, is_decoder=True)
        (folder / "config.json").write_text(bert.to_json_string())
    elif kind == "more-layers":
        config["num_hidden_layers"] += 2
        (folder / "config.json").write_text(json.dumps(config))
    return folder


BROKEN = ["nan", "inf", "bert-config", "more-layers"]
REASON = {"nan": "non-finite", "inf": "non-finite", "bert-config": "lack", "more-layers": "lack"}


@pytest.mark.parametrize("kind", BROKEN)
@pytest.mark.parametrize("engine", ["ours", "lm-eval"])
def test_eval_refuses_a_broken_model(capsys, data, tmp_path, kind, engine):
    if engine == "lm-eval":
        pytest.importorskip("lm_eval")
    folder = broken_folder(tmp_path, kind)
    code, err = run_cli(capsys, "eval", "--model", folder, "--questions", data / "q.jsonl", "--engine", engine)
    assert code == 2 and REASON[kind] in one_line(err)


@pytest.mark.parametrize("kind", ["nan", "more-layers"])
def test_oracle_and_reference_must_be_sound(capsys, data, tmp_path, kind):
    folder = broken_folder(tmp_path, kind)
    code, err = run_cli(capsys, "eval", "--model", MODEL, "--questions", data / "q.jsonl", "--oracle", folder)
    assert code == 2 and REASON[kind] in one_line(err)
    code, err = run_cli(capsys, "eval", "--model", MODEL, "--mia-forget", data / "forget.txt", "--mia-holdout",
                        data / "retain.txt", "--mia-reference", folder)
    assert code == 2 and REASON[kind] in one_line(err)


@pytest.mark.parametrize("kind", BROKEN)
@pytest.mark.parametrize("method, extra", [("RMU", ["--prefix-only"]), ("RMU", ["--no-prefix-only"]),
                                           ("GradDiff", [])])
def test_unlearn_refuses_a_broken_model(capsys, data, tmp_path, kind, method, extra):
    if kind == "bert-config" and extra == ["--prefix-only"]:
        pytest.skip("a BERT config is refused as not a causal LM with any loading")
    folder = broken_folder(tmp_path, kind)
    out = tmp_path / "out"
    code, err = unlearn(capsys, data, folder, out, *extra, method=method)
    assert code == 2 and not out.exists()
    one_line(err)


def test_evaluation_refuses_non_finite_log_likelihoods():
    from unlearn_kernels.eval.multiple_choice import NonFiniteScoreError, evaluate_multiple_choice
    from unlearn_kernels.models.io import load_local

    model, tokenizer = load_local(MODEL)
    bench = entangled.generate(0.25)
    questions = bench.questions(bench.forget_facts())[:3]
    model.lm_head.register_forward_hook(lambda m, i, out: out.masked_fill(out > out.mean(), float("nan")))
    with pytest.raises(NonFiniteScoreError, match="non-finite log-likelihood"):
        evaluate_multiple_choice(model, tokenizer, questions, progress=False)


# --- 5. a nested JSON line never crashes the process ------------------------------------------
@pytest.mark.parametrize("depth", [100_000, 2_000])
def test_a_deeply_nested_json_line_is_a_one_line_error(tmp_path, depth):
    path = tmp_path / "nested.jsonl"
    path.write_text('{"text": "fine"}\n{"text": ' + "[" * depth + "]" * depth + "}\n")
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0, "x": ' + "{\"a\":" * depth + "1"
                         + "}" * depth + "}\n")
    for command in (["eval", "--model", str(MODEL), "--questions", str(questions)],
                    ["relearn", "--model", str(MODEL), "--train", str(path), "--questions", str(questions)]):
        run = subprocess.run([sys.executable, "-m", "unlearn_kernels.cli", *command], capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
        assert "nested too deeply" in one_line(run.stderr)


def test_moderately_nested_values_still_load(tmp_path):
    from unlearn_kernels.data.loaders import read_multiple_choice

    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "q", "choices": ["a", "b"], "answer": 1, "meta": ' + "[" * 50 + "]" * 50 + "}\n")
    assert read_multiple_choice(path)[0].answer == 1
