"""Target-driven runs (``unlearn_kernels.target`` through ``pipeline.run`` and the CLI): the run
measures as it goes, stops at the target, backtracks at the retain limit, saves the best point,
and exits 3 when the target was not reached — never a silent "done"."""

import json
from pathlib import Path

import pytest
import torch

from unlearn_kernels import cli
from unlearn_kernels.data import entangled
from unlearn_kernels.models import tiny

MODEL = Path(tiny.ASSET_DIR)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("target-data")
    bench = entangled.generate(0.3)
    forget, retain = bench.forget_facts(), bench.retain_facts()
    (folder / "forget.txt").write_text("\n".join(bench.corpus(forget)))
    (folder / "retain.txt").write_text("\n".join(bench.corpus(retain)))
    for name, qs in (("val_forget", bench.questions(forget)[::6]), ("val_retain", bench.questions(retain)[::10])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(q.to_json()) + "\n" for q in qs))
    return folder


def unlearn(capsys, files, out, *extra, method="RMU"):
    code = cli.main([str(a) for a in ("unlearn", "--model", MODEL, "--method", method, "--forget",
                                      files / "forget.txt", "--retain", files / "retain.txt", "--out", out,
                                      "--val-forget", files / "val_forget.jsonl", "--val-retain",
                                      files / "val_retain.jsonl", "--set", "progress=false", *extra)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def saved_weights_equal_source(out: Path) -> bool:
    from safetensors.torch import load_file

    mine, source = load_file(str(out / "model.safetensors")), load_file(str(MODEL / "model.safetensors"))
    return mine.keys() == source.keys() and all(torch.equal(mine[k], source[k]) for k in mine)


def plain_accuracy(folder: Path, questions: Path) -> float:
    """The saved folder loaded by plain transformers, scored by our evaluator."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unlearn_kernels.data.loaders import read_multiple_choice
    from unlearn_kernels.eval.multiple_choice import evaluate_multiple_choice

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return evaluate_multiple_choice(model, tokenizer, read_multiple_choice(questions), progress=False)["acc"]


def test_a_reached_target_stops_early_and_saves_the_measured_point(capsys, files, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = unlearn(capsys, files, out, "--target", "0.9", "--val-every", "10")
    assert code == 0, err
    assert "target reached at step" in stdout
    target = json.loads((out / "report.json").read_text())["target"]
    assert target["reached"] and target["reason"] == "target reached"
    assert target["budget"] == {"setting": "steps", "value": 600, "default": 150, "factor": 4.0}
    last, best = target["trajectory"][-1], target["best"]
    assert last["step"] < 599 and last["forget"] <= 0.9 and best["forget"] <= 0.9 and best["keeps_retain"]
    # the first crossing (measured every 10) is walked again from the point before it, every 2 steps
    crossing = next(p for p in target["trajectory"] if p["forget"] <= 0.9)
    assert (crossing["step"] + 1) % 10 == 0 and crossing["refine"]["every"] == 2
    assert best["step"] in (crossing["step"], last["step"])
    # the folder holds the best point: a plain transformers load scores what the report says
    assert plain_accuracy(out, files / "val_forget.jsonl") == pytest.approx(best["forget"], abs=1e-12)
    assert plain_accuracy(out, files / "val_retain.jsonl") == pytest.approx(best["retain"], abs=1e-12)


def test_an_unreached_target_exits_3_with_one_line_and_the_best_point(capsys, files, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = unlearn(capsys, files, out, "--set", "lr=1e-12", "--set", "steps=4", "--val-every", "2")
    assert code == 3
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("target not reached (budget exhausted)")
    target = json.loads((out / "report.json").read_text())["target"]
    assert not target["reached"] and target["budget"]["set_by"] == "user"
    assert [p["step"] for p in target["trajectory"]] == [-1, 1, 3]
    if target["best_is_start"]:        # nothing forgot: the model it started from, unchanged
        assert saved_weights_equal_source(out) and "starting model" in lines[0]


def test_a_wrecking_run_backtracks_then_stops_at_the_retain_limit(capsys, files, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = unlearn(capsys, files, out, "--set", "lr=0.2", "--set", "steps=8", "--val-every", "1",
                                method="GradAscent")
    assert code == 3 and "retain limit hit" in err
    target = json.loads((out / "report.json").read_text())["target"]
    assert target["reason"] == "retain limit hit" and target["backtracks"] == 3
    lrs = [p["backtrack"]["lr"] for p in target["trajectory"] if "backtrack" in p]
    assert lrs == pytest.approx([0.1, 0.05, 0.025])
    best = target["best"]
    assert best["retain"] >= 0.95 * target["base"]["retain"]     # never the wrecked model
    if target["best_is_start"]:
        assert saved_weights_equal_source(out)


@pytest.mark.parametrize("extra, message", [
    (["--target", "1.0"], "nothing to unlearn"),
    (["--keep", "1.5"], "keep"),
    (["--budget", "0.5"], "--budget"),
])
def test_bad_targets_are_one_line_errors(capsys, files, tmp_path, extra, message):
    code, _, err = unlearn(capsys, files, tmp_path / "out", "--set", "steps=2", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_validation_needs_both_sets(capsys, files, tmp_path):
    code = cli.main(["unlearn", "--model", str(MODEL), "--method", "RMU", "--forget", str(files / "forget.txt"),
                     "--retain", str(files / "retain.txt"), "--out", str(tmp_path / "out"),
                     "--val-forget", str(files / "val_forget.jsonl")])
    assert code == 2 and "--val-retain" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--keep", "0.5", "--stop", "rule"], ["--target", "0.3", "--stop", "fixed"],
                                   ["--val-every", "5", "--set", "steps=3"],
                                   ["--budget", "2", "--stop", "fixed"], ["--budget", "2", "--set", "steps=3"]])
def test_target_flags_without_validation_are_refused(capsys, files, tmp_path, extra):
    code = cli.main(["unlearn", "--model", str(MODEL), "--method", "RMU", "--forget", str(files / "forget.txt"),
                     "--retain", str(files / "retain.txt"), "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and extra[0] in err and "--val-forget" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_mrp_keeps_its_best_basis(files, tmp_path):
    """MRP's strength is its basis: the statistics' basis is a point, then its training."""
    from unlearn_kernels.pipeline import RunConfig, run

    result = run(RunConfig(model=str(MODEL), method="MRP", forget=[str(files / "forget.txt")],
                           retain=[str(files / "retain.txt")], out=str(tmp_path / "out"),
                           settings={"train_steps": 4, "progress": False}, val_forget=str(files / "val_forget.jsonl"),
                           val_retain=str(files / "val_retain.jsonl"), val_every=2, target=0.05))
    target = result.report["target"]
    assert result.reached is False and result.message.startswith("target not reached")
    assert [p["step"] for p in target["trajectory"]][:2] == [-1, 0]
    saved = (tmp_path / "out" / "unlearn_projections.safetensors").exists()
    assert saved == (not target["best_is_start"])
