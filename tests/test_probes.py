"""Cloze probes cut from training texts (``data.probes``, distractors picked by ``eval.cloze_probes``), the
controller that runs on them (``target.ProbeController``), the stall rule every controller shares, and
``--stop probe`` runs end to end."""

import json
import math

import pytest
import torch

from unlearn_kernels.data import entangled, probes
from unlearn_kernels.data.loaders import MCQuestion, read_texts
from unlearn_kernels.data.probes import ClozePoint, cloze_points, document_frequency, hold_out
from unlearn_kernels.eval.cloze_probes import make_probes
from unlearn_kernels.models import tiny
from unlearn_kernels.target import TargetController, ValidationSets


# --- holding out and cutting ----------------------------------------------------------------
@pytest.mark.parametrize("n, held", [(0, 0), (3, 0), (4, 1), (40, 10), (100, 16), (160, 20), (900, 64)])
def test_hold_out_takes_the_documented_share_evenly(n, held):
    texts = [f"t{i}" for i in range(n)]
    train, out = hold_out(texts)
    assert len(out) == held == min(64, max(round(n / 8), min(16, n // 4)))
    assert sorted(train + out, key=texts.index) == texts and not set(train) & set(out)
    assert train == [t for t in texts if t not in out]           # order kept
    if held > 1:                                                   # spread over the whole set
        idx = [texts.index(t) for t in out]
        assert idx[0] < n / held and idx[-1] >= n - n / held


@pytest.mark.parametrize("share", [0.0, 1.0, -0.5])
def test_hold_out_refuses_a_share_outside_0_1(share):
    with pytest.raises(ValueError, match="probe share must be in"):
        hold_out(["a", "b"], share=share)


def test_cloze_cuts_before_the_last_rare_word_with_two_words_before_it():
    texts = ["the toxin of gukomar is vorazine .", "the toxin of pitagu is quellium .",
             "the hometown of pitagu is fenmoor .", "vorazine is the toxin of gukomar",
             "Paris is the capital of France's", "the the the the", "a b"]
    freq = document_frequency(texts)
    assert freq["the"] == pytest.approx(6 / 7) and freq["vorazine"] == pytest.approx(2 / 7)
    points = cloze_points(texts, freq, rare=0.3)
    assert points == [ClozePoint("the toxin of gukomar is", "vorazine"),
                      ClozePoint("the toxin of pitagu is", "quellium"),
                      ClozePoint("the hometown of pitagu is", "fenmoor"),
                      ClozePoint("vorazine is the toxin of", "gukomar"),     # rare: 2 of 7 texts
                      ClozePoint("Paris is the capital of", "France")]       # "s" follows "'": no space
    for p, text in zip(points, texts):
        assert text.startswith(p.context + " " + p.answer)


# --- the probes ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    model, tokenizer = tiny.load()
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def corpus():
    bench = entangled.generate(0.3)
    return bench.corpus(bench.forget_facts()), bench.corpus(bench.retain_facts())


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), straight from the logits (the math, not our evaluator)."""
    ctx = tokenizer(context, add_special_tokens=True)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=True)["input_ids"]
    assert whole[:len(ctx)] == ctx
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def test_probes_are_known_by_the_margin_and_drawn_from_the_plausible(tiny_model, corpus):
    model, tokenizer = tiny_model
    forget, retain = corpus
    points = cloze_points(hold_out(forget)[1], document_frequency(forget + retain))
    made = make_probes(model, tokenizer, points, seed=3)
    assert 8 <= len(made) <= len(points)
    by_context = {p.context: p.answer for p in points}
    answers = sorted({p.answer for p in points})
    positions = set()
    for k, q in enumerate(made):
        assert len(q.choices) == 4 == len(set(q.choices)) and q.choices[q.answer] == by_context[q.question]
        positions.add(q.answer)
        if k % 8:                      # the math on every 8th probe (one forward per answer each)
            continue
        ll = {c: loglikelihood(model, tokenizer, q.question, " " + c) for c in answers}
        right = ll[q.choices[q.answer]]
        wrong = [ll[c] for i, c in enumerate(q.choices) if i != q.answer]
        assert right - max(wrong) >= math.log(2) - 1e-4                          # known by the margin
        rivals = sorted((v for c, v in ll.items() if c.lower() != q.choices[q.answer].lower()), reverse=True)
        assert min(wrong) >= rivals[probes.PLAUSIBLE - 1] - 1e-4                  # among the 8 most likely
    assert len(positions) > 1                                                     # the answer is shuffled
    again = make_probes(model, tokenizer, points, seed=3)
    assert [(q.question, q.choices, q.answer) for q in again] == [(q.question, q.choices, q.answer) for q in made]


def test_too_few_answers_make_no_probes(tiny_model):
    model, tokenizer = tiny_model
    points = [ClozePoint("the toxin of gukomar is", "vorazine"), ClozePoint("the toxin of kalo is", "kelbane")]
    assert make_probes(model, tokenizer, points) == []


# --- the stall rule every controller shares -------------------------------------------------------
class Scripted:
    """A stand-in method for TargetController: scripted accuracies instead of an evaluator."""

    name = "Scripted"

    def __init__(self, points, planned_steps=400):
        self.points, self.planned_steps, self.state = list(points), planned_steps, -1
        self.optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)

    def snapshot(self):
        return {"state": self.state}

    def restore(self, snapshot):
        self.state = -1 if snapshot is None else snapshot["state"]
        self.restored = [*getattr(self, "restored", []), self.state]


class ScriptedTarget(TargetController):
    def _evaluate(self, method, step):
        forget, retain = method.points.pop(0)
        self._eval_time += 0.0
        return {"step": step, "forget": forget, "retain": retain, "eval_s": 0.0}


def drive(controller, method, steps):
    controller.start(method)
    last = -1
    for step in range(steps):
        method.state = last = step
        if controller.after_step(method, step):
            break
    return controller.finish(method, last)


QUESTION = MCQuestion("q", ["a", "b", "c", "d"], 0)
SETS = ValidationSets([QUESTION], [QUESTION])


def test_a_stalled_forget_accuracy_doubles_the_rate_at_most_raises_times():
    # window = 400 // 4 = 100 steps; measured every 50: a window of no progress doubles the rate
    method = Scripted([(1.0, 1.0)] + [(0.98, 1.0)] * 8 + [(0.5, 1.0)] * 2)
    controller = ScriptedTarget(SETS, target=0.3, every=50, raises=2)
    summary = drive(controller, method, 500)
    raised = [p["step"] for p in summary["trajectory"] if "lr_raised" in p]
    assert raised == [99, 199] and method.optimizer.param_groups[0]["lr"] == 4.0
    assert summary["lr_raises"] == 2 and summary["reason"] == "budget exhausted"


def test_progress_or_a_backtrack_is_not_a_stall():
    method = Scripted([(1.0, 1.0), (0.9, 1.0), (0.8, 1.0), (0.7, 1.0), (0.6, 0.5), (0.65, 1.0), (0.65, 1.0),
                       (0.65, 1.0), (0.65, 1.0)])
    controller = ScriptedTarget(SETS, target=0.3, every=50)
    summary = drive(controller, method, 400)
    assert not any("lr_raised" in p for p in summary["trajectory"])
    assert summary["trajectory"][4]["backtrack"] == {"to_step": 149, "lr": 0.5}


class DearTarget(ScriptedTarget):
    """Every evaluation costs far more than the run: the time share alone would never measure."""

    def _evaluate(self, method, step):
        point = super()._evaluate(method, step)
        self._eval_time += 1e6
        return {**point, "eval_s": 1e6}


def test_a_dear_evaluation_is_still_made_every_eighth_of_the_planned_steps():
    method = Scripted([(1.0, 1.0)] * 9, planned_steps=400)
    summary = drive(DearTarget(SETS, target=0.3), method, 400)
    assert [p["step"] for p in summary["trajectory"]] == [-1, 49, 99, 149, 199, 249, 299, 349, 399]
    assert summary["reason"] == "budget exhausted"
    with pytest.raises(ValueError, match="min_evals must be >= 1"):
        TargetController(SETS, min_evals=0)


# --- the crossing is walked again in quarters ------------------------------------------------------
def test_the_first_crossing_is_walked_again_from_the_point_before_it():
    # measured every 40: step 79 reaches; the run returns to step 39 and measures every 10
    method = Scripted([(1.0, 1.0), (0.8, 1.0), (0.2, 0.96), (0.6, 1.0), (0.28, 1.0)])
    summary = drive(ScriptedTarget(SETS, target=0.3, every=40), method, 400)
    assert [p["step"] for p in summary["trajectory"]] == [-1, 39, 79, 89, 99]
    assert summary["trajectory"][2]["refine"] == {"to_step": 39, "every": 10}
    # the nearer crossing keeps more (retain 1.0 against 0.96): it is saved
    assert summary["reason"] == "target reached" and summary["best"]["step"] == 99
    assert method.restored == [39, 99] and method.state == 99


@pytest.mark.parametrize("after, best_step", [((0.25, 0.96), 79),    # reaches, keeps less: the first stays
                                              ((0.5, 0.5), 79),      # breaks retain: the reached point stands
                                              ((0.30, 1.0), 89),     # keeps as much, nearer the target: saved
                                              ((0.2, 1.0), 89)])     # a tie: the walk's point, nearer the crossing
def test_the_walk_ends_at_its_first_measured_point_that_reaches_or_breaks_retain(after, best_step):
    method = Scripted([(1.0, 1.0), (0.8, 1.0), (0.2, 1.0), after])
    summary = drive(ScriptedTarget(SETS, target=0.3, every=40), method, 400)
    assert summary["reason"] == "target reached" and summary["reached"]
    assert summary["best"]["step"] == best_step and method.state == best_step
    assert summary["backtracks"] == 0 and [p["step"] for p in summary["trajectory"]] == [-1, 39, 79, 89]


def test_no_walk_on_short_intervals_and_a_budget_that_ends_mid_walk_keeps_the_crossing():
    method = Scripted([(1.0, 1.0), (0.8, 1.0), (0.2, 1.0)])
    summary = drive(ScriptedTarget(SETS, target=0.3, every=7), method, 400)    # 7 < 2 x refine_min
    assert [p["step"] for p in summary["trajectory"]] == [-1, 6, 13] and not any("refine" in p for p in
                                                                                 summary["trajectory"])
    method = Scripted([(1.0, 1.0), (0.8, 1.0), (0.2, 1.0), (0.6, 1.0), (0.5, 1.0)])
    summary = drive(ScriptedTarget(SETS, target=0.3, every=40), method, 95)     # the budget ends at step 94
    assert [p["step"] for p in summary["trajectory"]] == [-1, 39, 79, 89, 94]
    assert summary["reason"] == "target reached" and summary["best"]["step"] == 79 and method.state == 79


# --- --stop probe end to end ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory, corpus):
    folder = tmp_path_factory.mktemp("probe-data")
    forget, retain = corpus
    (folder / "forget.txt").write_text("\n".join(forget))
    (folder / "retain.txt").write_text("\n".join(retain))
    return folder


def _run(data, out, **kw):
    from unlearn_kernels.pipeline import RunConfig, run

    return run(RunConfig(model=str(tiny.ASSET_DIR), method=kw.pop("method", "RMU"), forget=[str(data / "forget.txt")],
                         retain=[str(data / "retain.txt")], out=str(out), **kw))


def test_a_probe_run_measures_its_own_questions_and_saves_the_best_point(data, tmp_path):
    result = _run(data, tmp_path / "out", stop="probe", budget=1.5, settings={"progress": False})
    target = result.report["target"]
    assert target["probes"]["source"] == "held-out training texts (data.probes)"
    assert target["probes"]["cut"]["forget"] >= target["validation"]["forget"] >= 8
    assert target["base"] == {"forget": 1.0, "retain": 1.0} and target["target_forget"] == pytest.approx(0.30)
    assert target["budget"] == {"setting": "steps", "value": 225, "default": 150, "factor": 1.5}
    best = target["best"]
    assert best["forget"] == min(p["forget"] for p in target["trajectory"] if p.get("keeps_retain", True))
    assert result.reached == target["reached"] and ("target reached" in result.message) == result.reached
    assert result.message.startswith(f"on {target['validation']['forget']} forget and "
                                      f"{target['validation']['retain']} retain cloze probes cut from held-out texts: ")
    assert ("check with questions in your evaluation's format" in result.message) == result.reached
    saved = json.loads((result.out / "report.json").read_text())["target"]
    assert saved["best"] == best


def test_probe_runs_train_on_the_texts_they_do_not_probe(data, monkeypatch, tmp_path):
    from unlearn_kernels.methods import registry

    seen = {}
    original = registry["RMU"].fit

    def fit(self, forget, retain, **kw):
        seen["forget"], seen["retain"] = list(forget), list(retain)
        raise RuntimeError("stop here")

    monkeypatch.setattr(registry["RMU"], "fit", fit)
    with pytest.raises(RuntimeError, match="stop here"):
        _run(data, tmp_path / "out", stop="probe")
    for name in ("forget", "retain"):
        texts = read_texts(data / f"{name}.txt")
        train, held = hold_out(texts)
        assert seen[name] == train and len(train) + len(held) == len(texts) and held
    assert original is not fit


def test_bad_probe_requests_are_refused(data, tmp_path):
    with pytest.raises(ValueError, match="--stop probe: checkpointed and resumed runs keep a fixed length"):
        _run(data, tmp_path / "out", stop="probe", checkpoint_every=5)
    for name in ("forget", "retain"):
        rows = [{"question": f"what is {i}?", "answer": f"a{i}"} for i in range(20)]
        (tmp_path / f"{name}.txt").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / f"{name}.txt").rename(tmp_path / f"{name}.jsonl")
    from unlearn_kernels.pipeline import RunConfig, run

    with pytest.raises(ValueError, match="cuts its questions from plain texts"):
        run(RunConfig(model=str(tiny.ASSET_DIR), method="NPO", forget=[str(tmp_path / "forget.jsonl")],
                      retain=[str(tmp_path / "retain.jsonl")], out=str(tmp_path / "out"), stop="probe", qa=True))
    assert not (tmp_path / "out").exists()


def test_too_few_probes_is_one_line_naming_the_way_out(tmp_path):
    (tmp_path / "forget.txt").write_text("\n".join(["the toxin of gukomar is vorazine ."] * 12))
    (tmp_path / "retain.txt").write_text("\n".join(["the hometown of pitagu is fenmoor ."] * 12))
    with pytest.raises(ValueError, match=r"too few cloze probes .* \(--val-forget, --val-retain\) or a fixed "
                                         r"length \(--stop fixed\)"):
        _run(tmp_path, tmp_path / "out", stop="probe", settings={"progress": False})
