"""The README's "Unlearning a model" examples run as written, on a GPT-2-style model (Conv1D
MLPs, ``transformer.h`` layers: no Llama name anywhere) saved at ``path/to/hf-model``."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import torch
import transformers as tf

from unlearn_kernels import cli
from unlearn_kernels.data import entangled
from unlearn_kernels.models import tiny

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(kind: str) -> list[str]:
    section = README.read_text().split("## Unlearning a model", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{kind}\n(.*?)```", section, re.S)


def gpt2_folder(root: Path) -> Path:
    _, tokenizer = tiny.load()
    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=4, n_head=4, n_positions=128,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    path = root / "path" / "to" / "hf-model"
    tf.GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def texts():
    bench = entangled.generate(0.25)
    return bench.corpus(bench.forget_facts())[:32], bench.corpus(bench.retain_facts())[:32], bench


def test_python_example_runs_on_gpt2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    gpt2_folder(tmp_path)
    forget_texts, retain_texts, _ = texts()
    (code,) = blocks("python")
    namespace = {"forget_texts": forget_texts, "retain_texts": retain_texts}
    exec(compile(code, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "transformer.h.{0,1,2}.mlp.c_proj" in printed and "table (gpt2)" in printed
    report = json.loads((tmp_path / "unlearned" / "report.json").read_text())
    assert set(report["updated_parameters"]) >= {f"transformer.h.{i}.mlp.c_proj.weight" for i in range(3)}
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "unlearned")     # plain transformers
    unlearned = namespace["model"].state_dict()
    assert all(torch.equal(v, unlearned[k]) for k, v in reloaded.state_dict().items())
    original = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "path" / "to" / "hf-model")
    assert not torch.equal(original.transformer.h[0].mlp.c_proj.weight, reloaded.transformer.h[0].mlp.c_proj.weight)


def test_shell_example_runs_on_gpt2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    gpt2_folder(tmp_path)
    forget, retain, bench = texts()
    Path("forget.txt").write_text("\n".join(forget) + "\n")
    Path("retain.txt").write_text("\n".join(retain) + "\n")
    with open("wmdp_bio.jsonl", "w") as f:
        for q in bench.questions(bench.forget_facts())[:8]:
            f.write(json.dumps({"question": q.question, "choices": list(q.choices), "answer": q.answer}) + "\n")
    (code,) = blocks("bash")
    commands = [line.split("#", 1)[0].strip() for line in code.replace("\\\n", " ").splitlines()]
    commands = [shlex.split(c) for c in commands if c]
    assert [c[1] for c in commands] == ["methods", "unlearn", "eval"]
    outs = []
    for command in commands:
        assert command[0] == "unlearn-kernels"
        code = cli.main(command[1:] + (["--device", "cpu"] if command[1] in ("unlearn",) else []))
        captured = capsys.readouterr()
        outs.append(captured.out)
        report = json.loads(Path("unlearned/report.json").read_text()) if command[1] == "unlearn" else None
        if command[1] == "unlearn" and code == 3:   # a random GPT-2: the stopping rule may be out of reach
            assert not report["target"]["reached"] and captured.err.count("\n") == 1, captured.err
            assert captured.err.split("\r")[-1].startswith("stopping rule not met ("), captured.err  # after the bar
        else:
            assert code == 0, (command, captured.err)
        if report is not None:      # the run stopped on SRMU's rule, as the README says
            assert report["target"]["rule"] == "residual <= 0.6 with retain_drift <= 0.25"
            assert report["config"]["sparsity"] == 0.2 and report["chosen_by_structure"]["layer"] == 2
    out = "".join(outs)
    assert "| sparsity |" in out and "acc" in out
