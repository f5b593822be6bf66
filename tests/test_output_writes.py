"""Every file the package writes: atomically, never over an input, a foreign file or a folder,
and over a previous output of ours only with ``--overwrite`` (``models.output_file``)."""

import json
import os
import shutil

import pytest
import torch

from unlearn_kernels import cli
from unlearn_kernels.data import entangled
from unlearn_kernels.errors import UserError
from unlearn_kernels.models import output_file, tiny
from unlearn_kernels.models.output_dir import OutputPathError


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A copy of the tiny model, a small question file, attack texts and a config for ``plan``."""
    root = tmp_path_factory.mktemp("inputs")
    shutil.copytree(tiny.ASSET_DIR, root / "model")
    bench = entangled.generate(0.25)
    facts = bench.forget_facts()
    (root / "q.jsonl").write_text("".join(json.dumps(q.to_json()) + "\n" for q in bench.questions(facts[:4])))
    (root / "attack.txt").write_text("\n".join(bench.corpus(facts[4:8])))
    shutil.copy(root / "model" / "config.json", root / "plan-config.json")
    return root


# flag -> the command line writing OUT there
COMMANDS = {
    "eval --json": lambda d, out: ["eval", "--model", str(d / "model"), "--questions", str(d / "q.jsonl"),
                                   "--device", "cpu", "--json", out],
    "eval --log-samples": lambda d, out: ["eval", "--model", str(d / "model"), "--questions", str(d / "q.jsonl"),
                                          "--device", "cpu", "--log-samples", out],
    "relearn --json": lambda d, out: ["relearn", "--model", str(d / "model"), "--train", str(d / "attack.txt"),
                                      "--questions", str(d / "q.jsonl"), "--lrs", "1e-3", "--steps", "1",
                                      "--every", "1", "--device", "cpu", "--json", out],
    "relearn --plot": lambda d, out: ["relearn", "--model", str(d / "model"), "--train", str(d / "attack.txt"),
                                      "--questions", str(d / "q.jsonl"), "--lrs", "1e-3", "--steps", "1",
                                      "--every", "1", "--device", "cpu", "--plot", out],
    "plan --json": lambda d, out: ["plan", "--config", str(d / "plan-config.json"), "--gpus", "1", "--json", out],
}
# what the target is -> its path (the plan's input is its config file, not a model or questions)
TARGETS = {
    "model weights": lambda d, flag: d / "model" / "model.safetensors",
    "model config": lambda d, flag: d / "model" / "config.json",
    "question file": lambda d, flag: d / ("plan-config.json" if flag.startswith("plan") else "q.jsonl"),
    "foreign file": lambda d, flag: d / "foreign.json",
    "folder": lambda d, flag: d / "a-folder",
}


def run(capsys, argv):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("flag", COMMANDS)
def test_refused_targets_stay_as_they_were(capsys, inputs, no_loading, flag, target):
    (inputs / "foreign.json").write_text('{"mine": 1}\n')
    (inputs / "a-folder").mkdir(exist_ok=True)
    path = TARGETS[target](inputs, flag)
    before = path.read_bytes() if path.is_file() else sorted(os.listdir(path))
    code, err = run(capsys, COMMANDS[flag](inputs, str(path)))
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(path.resolve()) in lines[0], err
    assert (path.read_bytes() if path.is_file() else sorted(os.listdir(path))) == before


@pytest.mark.parametrize("flag", COMMANDS)
def test_new_path_written_and_our_output_replaced_only_with_overwrite(capsys, inputs, tmp_path, flag):
    out = tmp_path / "sub" / "out"
    code, err = run(capsys, COMMANDS[flag](inputs, str(out)))
    assert code == 0, err
    assert output_file.is_our_file(out)
    first = out.read_bytes()
    code, err = run(capsys, COMMANDS[flag](inputs, str(out)))
    assert code == 2 and "--overwrite" in err and out.read_bytes() == first
    code, err = run(capsys, COMMANDS[flag](inputs, str(out)) + ["--overwrite"])
    assert code == 0, err
    assert output_file.is_our_file(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]     # no temporary file left


def test_overwrite_never_replaces_a_foreign_file(capsys, inputs, tmp_path, no_loading):
    foreign = tmp_path / "r.json"
    foreign.write_text('{"mine": 1}\n')
    code, err = run(capsys, COMMANDS["eval --json"](inputs, str(foreign)) + ["--overwrite"])
    assert code == 2 and "not an output of unlearn_kernels" in err and foreign.read_text() == '{"mine": 1}\n'


def test_two_outputs_of_one_command_on_one_path_are_refused(capsys, inputs, tmp_path, no_loading):
    out = str(tmp_path / "both")
    code, err = run(capsys, COMMANDS["eval --json"](inputs, out) + ["--log-samples", out])
    assert code == 2 and "each output its own path" in err and not (tmp_path / "both").exists()


def test_markers(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = [output_file.write_json_atomic(tmp_path / "a.json", {"x": 1}),
               output_file.write_jsonl_atomic(tmp_path / "a.jsonl", [{"x": 1}, {"x": 2}]),
               output_file.write_jsonl_atomic(tmp_path / "empty.jsonl", []),
               output_file.save_figure_atomic(plt.figure(), tmp_path / "a.png")]
    assert all(map(output_file.is_our_file, written))
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["x"] for r in rows] == [1, 2] and "unlearn_kernels" in rows[0]     # rows stay rows
    (tmp_path / "plain.png").write_bytes(output_file.PNG_SIGNATURE + b"\0" * 20)
    (tmp_path / "plain.jsonl").write_text('{"x": 1}\n{"unlearn_kernels": {}}\n')
    assert not any(map(output_file.is_our_file, [tmp_path / "plain.png", tmp_path / "plain.jsonl",
                                                 tiny.ASSET_DIR / "config.json"]))


def test_demos_check_their_outputs_before_loading(tmp_path, no_loading, monkeypatch):
    from unlearn_kernels import demo
    from unlearn_kernels.classifier import demo as classifier_demo

    monkeypatch.setattr(classifier_demo, "load_digits_cnn", lambda *a: pytest.fail("loaded"))
    (tmp_path / "results.json").write_text("{}")
    for run_demo in (demo.run, classifier_demo.run):
        with pytest.raises(OutputPathError, match="results.json exists and is not an output"):
            run_demo(tmp_path, methods=["RL"] if run_demo is classifier_demo.run else ["GradDiff"])
    assert (tmp_path / "results.json").read_text() == "{}"


@pytest.mark.parametrize("track,where", [("llm", ""), ("classifier", "classifier")])
def test_demo_command_refuses_before_any_work(capsys, tmp_path, no_loading, track, where):
    (tmp_path / where).mkdir(exist_ok=True)
    (tmp_path / where / "results.json").write_text("{}")
    code = cli.main(["demo", "--track", track, "--out", str(tmp_path), "--quiet"])
    captured = capsys.readouterr()
    assert code == 2 and "results.json exists and is not an output" in captured.err
    assert "Self-check" not in captured.out and (tmp_path / where / "results.json").read_text() == "{}"


# --- the Python API ------------------------------------------------------------------------------
@pytest.fixture()
def model_copy(tmp_path):
    from unlearn_kernels.models.io import load_local

    shutil.copytree(tiny.ASSET_DIR, tmp_path / "model")
    return tmp_path / "model", *load_local(tmp_path / "model")


def test_save_over_the_source_folder_is_refused(model_copy):
    from unlearn_kernels.models.io import save_pretrained_atomic

    folder, model, tokenizer = model_copy
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for out in (folder, folder / "inside", folder.parent):
        with pytest.raises(OutputPathError, match="the input"):
            save_pretrained_atomic(model, tokenizer, out, {"method": "none"})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_nan_weights_are_neither_saved_nor_evaluated(model_copy, tmp_path):
    from unlearn_kernels.eval.multiple_choice import evaluate_multiple_choice
    from unlearn_kernels.models.io import save_pretrained_atomic

    _, model, tokenizer = model_copy
    name, param = list(model.named_parameters())[3]
    with torch.no_grad():
        param[0, 0] = float("nan")
    with pytest.raises(UserError, match=f"weight {name} holds 1 non-finite"):
        save_pretrained_atomic(model, tokenizer, tmp_path / "out", {"method": "none"})
    assert not (tmp_path / "out").exists()
    bench = entangled.generate(0.25)
    with pytest.raises(UserError, match=f"weight {name} holds 1 non-finite"):
        evaluate_multiple_choice(model, tokenizer, bench.questions(bench.forget_facts()[:2]), progress=False)


# --- interrupted writes --------------------------------------------------------------------------
def test_an_interrupted_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = output_file.write_json_atomic(tmp_path / "r.json", {"x": 1})
    old = path.read_bytes()

    def no_rename(*a):
        raise OSError("disk gone")

    with monkeypatch.context() as m:
        m.setattr(output_file.os, "replace", no_rename)
        with pytest.raises(OSError, match="disk gone"):
            output_file.write_json_atomic(path, {"x": 2}, overwrite=True)
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["r.json"]

    png = output_file.save_figure_atomic(plt.figure(), tmp_path / "f.png")
    old = png.read_bytes()
    fig = plt.figure()

    def half_written(f, **kwargs):
        f.write(b"\x89PNG half")
        raise RuntimeError("killed mid-way")

    fig.savefig = half_written
    with pytest.raises(RuntimeError, match="mid-way"):
        output_file.save_figure_atomic(fig, png, overwrite=True)
    assert png.read_bytes() == old and sorted(os.listdir(tmp_path)) == ["f.png", "r.json"]
