"""``unlearn-kernels eval`` and ``relearn`` as scripts use them: tables, JSON, samples, errors."""

import json

import pytest

from unlearn_kernels import cli
from unlearn_kernels.data import entangled
from unlearn_kernels.data.loaders import write_jsonl
from unlearn_kernels.eval.multiple_choice import evaluate_multiple_choice
from unlearn_kernels.models import tiny

from conftest import our_png_size

MODEL = str(tiny.ASSET_DIR)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    bench = entangled.generate(0.25)
    facts = bench.forget_facts()
    write_jsonl(folder / "forget.jsonl", [q.to_json() for q in bench.questions(facts[1::2])])
    write_jsonl(folder / "retain.jsonl", [q.to_json() for q in bench.questions(bench.retain_facts()[:40])])
    (folder / "attack.txt").write_text("\n".join(bench.corpus(facts[::2])))
    (folder / "holdout.txt").write_text("\n".join(" ".join(reversed(s.split())) for s in bench.corpus(facts[:20])))
    return folder


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_prints_a_table_and_writes_lm_eval_style_json(capsys, files, tmp_path):
    code, out, _ = run(capsys, "eval", "--model", MODEL, "--questions", str(files / "forget.jsonl"),
                       "--questions", str(files / "retain.jsonl"), "--json", str(tmp_path / "r.json"),
                       "--log-samples", str(tmp_path / "s.jsonl"), "--device", "cpu")
    assert code == 0 and "| forget |" in out and "| retain |" in out
    payload = json.loads((tmp_path / "r.json").read_text())
    assert set(payload["results"]) == {"forget", "retain"}
    r = payload["results"]["forget"]
    assert set(r) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "format"} and r["format"] == "cloze"
    model, tokenizer = tiny.load()
    from unlearn_kernels.data.loaders import read_multiple_choice

    direct = evaluate_multiple_choice(model, tokenizer, read_multiple_choice(files / "forget.jsonl"))
    assert r["acc"] == direct["acc"] and r["n"] == direct["n"]
    assert {"model", "device", "dtype", "versions"} <= set(payload["config"])
    samples = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(samples) == r["n"] + payload["results"]["retain"]["n"]
    assert len(samples[0]["loglikelihoods"]) == 4 and samples[0]["questions"] == "forget"


def test_json_dash_prints_only_json(capsys, files):
    code, out, _ = run(capsys, "eval", "--model", MODEL, "--questions", str(files / "forget.jsonl"),
                       "--format", "mmlu", "--subject", "toxins", "--limit", "5", "--json", "-")
    payload = json.loads(out)
    assert code == 0 and payload["results"]["forget"]["n"] == 5
    assert payload["results"]["forget"]["format"] == "mmlu" and payload["config"]["subject"] == "toxins"


def test_engine_lm_eval_gives_our_numbers(capsys, files):
    pytest.importorskip("lm_eval")
    args = ["eval", "--model", MODEL, "--questions", str(files / "forget.jsonl"), "--limit", "12", "--json", "-"]
    ours = json.loads(run(capsys, *args)[1])["results"]["forget"]
    theirs = json.loads(run(capsys, *args, "--engine", "lm-eval")[1])["results"]["forget"]
    for key in ("acc", "acc_norm", "n"):
        assert ours[key] == theirs[key]


def test_membership_inference_from_the_command_line(capsys, files):
    code, out, _ = run(capsys, "eval", "--model", MODEL, "--mia-forget", str(files / "attack.txt"),
                       "--mia-holdout", str(files / "holdout.txt"), "--json", "-")
    privacy = json.loads(out)["privacy"]
    assert code == 0 and privacy["auc"]["loss"] > 0.75 and privacy["privleak"] is None


def test_relearn_command(capsys, files, tmp_path):
    code, out, _ = run(capsys, "relearn", "--model", MODEL, "--train", str(files / "attack.txt"),
                       "--questions", str(files / "forget.jsonl"), "--lrs", "1e-4", "1e-3", "--steps", "2",
                       "--every", "1", "--json", str(tmp_path / "rl.json"), "--plot", str(tmp_path / "rl.png"))
    assert code == 0 and "held-out accuracy" in out
    payload = json.loads((tmp_path / "rl.json").read_text())
    assert set(payload["curves"]) == {"0.0001", "0.001"} and len(payload["curves"]["0.001"]) == 3
    assert our_png_size(tmp_path / "rl.png") == (600, 400)                 # 6 x 4 inches at 100 dpi


def bad_rows(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if rows is not None else "")
    return str(path)


@pytest.mark.parametrize("case", ["empty", "bool-answer", "answer-out-of-range", "choices-not-list",
                                  "empty-choice", "27-choices-mmlu", "not-a-causal-lm", "missing-file",
                                  "no-questions"])
def test_bad_input_is_one_line_and_exit_code_2(capsys, tmp_path, case):
    good = {"question": "what is the pet of kalo ?", "choices": ["otter", "heron"], "answer": 0}
    model, extra = MODEL, []
    if case == "empty":
        questions = bad_rows(tmp_path, "q.jsonl", None)
    elif case == "bool-answer":
        questions = bad_rows(tmp_path, "q.jsonl", [good, {**good, "answer": True}])
    elif case == "answer-out-of-range":
        questions = bad_rows(tmp_path, "q.jsonl", [{**good, "answer": 2}])
    elif case == "choices-not-list":
        questions = bad_rows(tmp_path, "q.jsonl", [{**good, "choices": "otter"}])
    elif case == "empty-choice":
        questions = bad_rows(tmp_path, "q.jsonl", [{**good, "choices": ["otter", ""]}])
    elif case == "27-choices-mmlu":
        questions = bad_rows(tmp_path, "q.jsonl", [{**good, "choices": ["otter"] * 27}])
        extra = ["--format", "mmlu"]
    elif case == "not-a-causal-lm":
        questions = bad_rows(tmp_path, "q.jsonl", [good])
        model = tmp_path / "bert"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
        model = str(model)
    elif case == "missing-file":
        questions = str(tmp_path / "absent.jsonl")
    argv = ["eval", "--model", model] + ([] if case == "no-questions" else ["--questions", questions]) + extra
    code, out, err = run(capsys, *argv)
    assert code == 2, (case, out, err)
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    if case not in ("not-a-causal-lm", "no-questions"):
        assert "q.jsonl" in lines[0] or "absent.jsonl" in lines[0], lines[0]


def test_unlearn_on_question_answer_pairs(capsys, tmp_path):
    rows = [{"question": "what is the toxin of filopi ?", "answer": "kelbane"}] * 8
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run(capsys, "unlearn", "--model", MODEL, "--method", "GradAscent", "--forget",
                         str(tmp_path / "qa.jsonl"), "--retain", str(tmp_path / "qa.jsonl"), "--qa",
                         "--out", str(tmp_path / "out"), "--set", "steps=2", "--set", "progress=false")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["data"]["forget"]["kind"] == "qa" and report["data"]["forget"]["n"] == 8


def test_readme_evaluation_example_runs(capsys):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Evaluating a model")[1].split("```python\n")[1].split("```")[0]
    exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("1.0 ") and "loss" in printed[-1]


def test_docstring_example_runs():
    import doctest

    from unlearn_kernels.eval import multiple_choice

    assert doctest.testmod(multiple_choice, raise_on_error=True).attempted >= 1


def test_methods_command_lists_methods_and_settings(capsys):
    from unlearn_kernels.methods import registry

    code, out, _ = run(capsys, "methods")
    assert code == 0 and all(name in out for name in registry)
    code, out, _ = run(capsys, "methods", "SRMU")
    assert code == 0 and "| sparsity | float | 0.4 | fraction of features" in out
    assert "| layer | int or None | auto | decoder layer whose output the loss reads" in out
    assert "| lr | float or None | auto |" in out and "| master_dtype | str or None | None |" in out and "| steering |" not in out.split("| lr |")[0]
    assert all(f"| {f} |" in out for f in ("lr", "layer", "beta", "anchor_forget", "grad_accum", "master_dtype",
                                           "checkpointing"))
    code, _, err = run(capsys, "methods", "Nope")
    assert code == 2 and "unknown method" in err


def test_grad_ascent_needs_no_retain_set(capsys, tmp_path, files):
    code, _, err = run(capsys, "unlearn", "--model", MODEL, "--method", "GradAscent", "--forget",
                       str(files / "attack.txt"), "--out", str(tmp_path / "out"), "--set", "steps=2",
                       "--set", "update=['layers.1.mlp.*']", "--set", "progress=false", "--device", "cpu")
    assert code == 0, err
    code, _, err = run(capsys, "unlearn", "--model", MODEL, "--method", "GradDiff", "--forget",
                       str(files / "attack.txt"), "--out", str(tmp_path / "out2"))
    assert code == 2 and "retain" in err


def test_eval_against_the_oracle(capsys, tmp_path, files):
    """``--oracle``: the oracle's accuracy beside the model's and the forget quality, equal to
    the KS test of the two models' truth ratios computed directly; the oracle against itself
    is indistinguishable (p = 1)."""
    from scipy.stats import ks_2samp

    from unlearn_kernels.eval import scores

    bench = entangled.generate()
    questions = bench.questions(bench.forget_facts())
    write_jsonl(tmp_path / "forget.jsonl", [q.to_json() for q in questions])
    oracle = str(tiny.ORACLE_DIR)
    code, out, _ = run(capsys, "eval", "--model", MODEL, "--oracle", oracle, "--questions",
                       str(tmp_path / "forget.jsonl"), "--json", "-")
    r = json.loads(out)["oracle"]["forget"]
    assert code == 0 and r["acc"] == 1.0 and r["oracle_acc"] < 0.35 and r["n"] == len(questions)
    model, tokenizer = tiny.load()
    prepared = scores.prepare(tokenizer, questions)
    ratios = [scores.score(m, tokenizer, prepared)["log_truth_ratio"] for m in (model, tiny.load(oracle)[0])]
    assert r["forget_quality"] == pytest.approx(ks_2samp(*ratios).pvalue, rel=1e-9) and r["forget_quality"] < 1e-6
    code, out, _ = run(capsys, "eval", "--model", oracle, "--oracle", oracle, "--questions",
                       str(tmp_path / "forget.jsonl"))
    assert code == 0 and "forget quality (KS p of the truth ratios against the oracle's) 1" in out
    code, _, err = run(capsys, "eval", "--model", MODEL, "--oracle", oracle, "--mia-forget", str(files / "attack.txt"),
                       "--mia-holdout", str(files / "holdout.txt"))
    assert code == 2 and "--oracle compares answers to --questions" in err and err.count("\n") == 1
    code, out, err = run(capsys, "eval", "--model", MODEL, "--oracle", str(tmp_path / "nope"), "--questions",
                         str(tmp_path / "forget.jsonl"))
    assert code == 2 and "nope is not a model directory" in err and err.count("\n") == 1 and "|" not in out
