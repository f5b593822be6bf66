"""The real-model tier, end to end: RMU, SRMU and NPO unlearn SmolLM2-135M-Instruct.

Each method runs target-driven through ``pipeline.run`` with no method settings (the package's
defaults) on the real-knowledge set (``assets/real-knowledge``): ``forget.txt``/``retain.txt`` as
training data, the ``val_*`` questions steering the run (forget the capitals, keep general
knowledge and the other facts about the same countries). The output folder is then loaded by
plain ``transformers`` (``AutoModelForCausalLM``/``AutoTokenizer``, not our loader) and the
held-out ``test_*`` questions are scored by lm-evaluation-harness itself (``eval.harness``).

What is asserted is what the run says about itself, checked on questions the controller never saw:

- a run that reaches its target (forget accuracy <= chance + 0.05 on ``val_forget`` while retain
  and entangled stay >= 0.95 x base on ``val_*``) is as far along on the test questions, within
  their noise: test forget accuracy <= ``FORGET_BOUND`` and test retain >= ``RETAIN_FLOOR``;
- a run that cannot reach it within the time this tier has (NPO: the full model runs forward and
  backward, about six times an RMU step on a CPU) says so: ``reached`` False, exit-3
  semantics ("target not reached (budget exhausted)"), and the saved model is the best measured
  point, which still keeps the retain limit on ``val_*``.

The test split measures the same kind of fact with other questions (every capital is in
``forget.txt``; the split decides which questions score the run), so its forget accuracy differs
from the controller's by sampling noise: 32 test questions at p = 0.3 have a binomial standard
error of 0.08 (three questions), and the controller stops at the first measured point under the
target, so the val number is biased low. RMU measured 0.238 on val and 0.344 (11/32) on test,
SRMU 0.286 and 0.375 (12/32); ``FORGET_BOUND`` = chance + 0.15 = 0.40 is the target (0.30) plus
a little more than one standard error, and far below the base model's 1.0; chance + 0.10 (0.35)
fails on SRMU's 12/32 by one question.

Base accuracy on every question file is 1.0 by construction (``assets/real-knowledge/README.md``:
a question is kept only when the base model answers it with a margin; measured there with
lm-eval on the full files, and checked on the val files by ``test_real_model.py``); each run
re-measures it on the val files; it is not re-measured on the test files here (20 s). Test
retain is held to the controller's own limit, 0.95 x base: of 36 questions one may be lost
(0.972), two may not (0.944).
Entangled accuracy (the method's collateral damage on the same countries) is reported (printed,
and in the junit properties) and checked on ``val_entangled`` only, where the controller guards
it; on the test split it is the number to watch, not a pass/fail line.

Cost: RMU's run took 198 s in the fresh-clone CI run of 2026-12-07 (2 cores, no other job at
that point), after the evaluator's shared-context check became once per model instead of once
per evaluation (one evaluation of the 69 val questions: 20 s -> 10 s). SRMU and NPO (about 6
more minutes) are in the ``slow`` tier: ``bash scripts/test.sh --slow``. One
evaluation of the 69 val questions costs about 10 s, as much as 40 RMU steps, hence
``val_every=50``: the adaptive schedule (evaluations <= 15 % of the time) would measure far less
often.
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ASSETS = Path(__file__).resolve().parents[1] / "unlearn_kernels" / "assets" / "real-knowledge"
NAMES = ("forget", "retain", "entangled")
BASE = 1.0                     # the base model's accuracy on every question file (module docstring)
CHANCE = 0.25                  # every question has 4 choices
FORGET_BOUND = CHANCE + 0.15  # test forget (see module docstring)
RETAIN_FLOOR = 0.95            # test retain, as a share of base: the controller's keep
# The length each method may run (RunConfig.budget x its own steps/epochs, or a length set here).
# RMU and SRMU: the default budget (4 x 150 steps); they stop at the target well before it.
# NPO: 5 epochs over forget.txt are 200 optimizer steps (x 4: 800) of the whole model, each
# about 6 RMU steps (1.6 s of CPU); it gets one epoch (NPO_EPOCHS) and ends with exit 3.
NPO_EPOCHS = 1               # 40 steps: 159 forget texts, batch 4
VAL_EVERY = 50               # one evaluation of the val_* files (69 questions) costs about 120 RMU steps
RUNS = {"RMU": {"val_every": VAL_EVERY}, "SRMU": {"val_every": VAL_EVERY},
        "NPO": {"val_every": VAL_EVERY, "settings": {"epochs": NPO_EPOCHS}}}
REACHES = {"RMU": True, "SRMU": True, "NPO": False}
# RMU runs in the default tier; SRMU and NPO (about 6 more minutes on 2 cores) in the slow one.
SLOW = {"SRMU", "NPO"}


@pytest.fixture(scope="module")
def folder():
    """The converted SmolLM2 folder (converted once into the cache, reused after)."""
    from unlearn_kernels.models import gguf

    if importlib.util.find_spec("gguf") is None:
        pytest.skip(f"the gguf package is not installed ({gguf.INSTALL_HINT})")
    pytest.importorskip("lm_eval")
    try:
        gguf.find_smollm2()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return gguf.cached_smollm2()


@pytest.fixture(scope="module")
def test_questions():
    from unlearn_kernels.data.loaders import read_multiple_choice

    return {name: read_multiple_choice(ASSETS / f"test_{name}.jsonl") for name in NAMES}


def lm_eval_accuracy(path, questions) -> dict:
    """acc of each test file by lm-eval itself on the folder as plain transformers loads it."""
    import transformers

    from unlearn_kernels.eval import harness

    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    results = harness.run(model.eval(), questions, format="cloze", tokenizer=tokenizer, batch_size=64)
    return {name: results[name]["acc"] for name in NAMES}


@pytest.mark.real_model
@pytest.mark.parametrize("method", [pytest.param(m, marks=[pytest.mark.slow] if m in SLOW else []) for m in RUNS])
def test_unlearns_target_driven_checked_by_lm_eval(method, folder, test_questions, tmp_path,
                                                   record_property):
    from unlearn_kernels.pipeline import RunConfig, run

    result = run(RunConfig(model=str(folder), method=method, forget=[str(ASSETS / "forget.txt")],
                           retain=[str(ASSETS / "retain.txt")], out=str(tmp_path / "out"), device="cpu",
                           val_forget=str(ASSETS / "val_forget.jsonl"), val_retain=str(ASSETS / "val_retain.jsonl"),
                           val_entangled=str(ASSETS / "val_entangled.jsonl"), **RUNS[method]))
    summary = result.report["target"]
    best, val_base = summary["best"], summary["base"]
    after = lm_eval_accuracy(result.out, test_questions)
    line = {"method": method, "reached": result.reached, "reason": summary["reason"], "best_step": best["step"],
            "val": {name: round(best[name], 3) for name in NAMES}, "test_lm_eval": after,
            "run_s": round(summary["run_time_s"], 1), "eval_share": round(summary["eval_share"], 3)}
    print(json.dumps(line))
    for key, value in line.items():
        record_property(key, value)
    assert val_base == {name: 1.0 for name in NAMES}
    # the saved point keeps the retain limit on the validation split, whatever happened
    assert best["retain"] >= 0.95 * val_base["retain"] and best["entangled"] >= 0.95 * val_base["entangled"]
    if REACHES[method]:
        assert result.reached and summary["reason"] == "target reached", result.message
        assert result.message.startswith(f"target reached at step {best['step']}")
        assert best["forget"] <= CHANCE + 0.05
        assert after["forget"] <= FORGET_BOUND, after
        assert after["retain"] >= RETAIN_FLOOR * BASE, after
    else:        # exit 3: the CLI prints this message and exits 3 (tests/test_target.py)
        assert result.reached is False and summary["reason"] == "budget exhausted", result.message
        assert result.message.startswith("target not reached (budget exhausted): best forget accuracy")
        assert summary["budget"] == {"setting": "epochs", "value": NPO_EPOCHS, "set_by": "user"}
        assert best["forget"] > CHANCE + 0.05
        assert after["retain"] >= RETAIN_FLOOR * BASE, after


def test_readme_worked_example_is_this_tier():
    """The README's "A real pretrained model" commands are the runs above: same method, data,
    validation files and settings; the evaluation is lm-eval on the test files."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## A real pretrained model: SmolLM2-135M", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    commands = [shlex.split(line.split("#", 1)[0]) for line in code.replace("\\\n", " ").splitlines()]
    unlearn = [c for c in commands if c[:2] == ["unlearn-kernels", "unlearn"]]
    evals = [c for c in commands if c[:2] == ["unlearn-kernels", "eval"]]
    assert sorted(c[c.index("--method") + 1] for c in unlearn) == sorted(RUNS)
    for command in unlearn:
        method = command[command.index("--method") + 1]
        flags = {command[i]: command[i + 1] for i in range(2, len(command) - 1) if command[i].startswith("--")}
        assert [flags[f"--{name}"].rsplit("/", 1)[-1] for name in ("forget", "retain")] == ["forget.txt", "retain.txt"]
        for name in NAMES:
            assert flags[f"--val-{name}"].endswith(f"val_{name}.jsonl")
        sets = {k: int(v) for k, v in (s.split("=") for s in (command[i + 1] for i, a in enumerate(command)
                                                             if a == "--set"))}
        assert sets == RUNS[method].get("settings", {}), method
        assert int(flags["--val-every"]) == RUNS[method]["val_every"], method
    assert evals and all("--engine" in c and c[c.index("--engine") + 1] == "lm-eval" for c in evals)
    for command in evals:
        files = [a.rsplit("/", 1)[-1] for a in command if a.endswith(".jsonl")]
        assert files == [f"test_{name}.jsonl" for name in NAMES]
