"""Validation-free stopping (``unlearn_kernels.stopping``): the controller on scripted signals,
the methods' signals against the math, and rule-driven runs of the pipeline end to end."""

import json
import math
from pathlib import Path

import pytest
import torch

from unlearn_kernels.stopping import SignalController, StoppingRule

from conftest import our_png_size

RULE = StoppingRule(remaining="residual", done_at=0.5, drift="drift", drift_limit=0.2)


class Scripted:
    """A stand-in for an UnlearningMethod: one scripted signal per measurement, a one-number
    'model' (the step it was left at) that snapshot/restore move, and an optimizer's lr."""

    name = "Scripted"

    def __init__(self, signals, planned_steps=600):
        self.signals = list(signals)
        self.planned_steps = planned_steps
        self.state = -1
        self.optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)

    def probe_signal(self):
        return self.signals.pop(0)

    def snapshot(self):
        return {"state": self.state}

    def restore(self, snapshot):
        self.state = -1 if snapshot is None else snapshot["state"]


def drive(controller, method, steps):
    """The loop of ``UnlearningMethod.fit`` around the monitor."""
    controller.start(method)
    last = -1
    for step in range(steps):
        method.state = step
        last = step
        if controller.after_step(method, step):
            break
    return controller.finish(method, last)


def sig(residual, drift=0.0):
    return {"residual": residual, "drift": drift}


def test_stops_at_the_first_point_that_meets_the_rule_and_keeps_it():
    method = Scripted([sig(1.0), sig(0.8), sig(0.6, 0.1), sig(0.45, 0.1), sig(0.3)])
    summary = drive(SignalController(rule=RULE, every=10), method, 100)
    assert summary["reached"] and summary["reason"] == "target reached"
    assert summary["best"]["step"] == 29 and method.state == 29
    assert [p["step"] for p in summary["trajectory"]] == [-1, 9, 19, 29]
    assert summary["rule"] == "residual <= 0.5 with drift <= 0.2"


def test_a_drifting_point_backtracks_with_half_the_rate_and_never_counts_as_best():
    method = Scripted([sig(1.0), sig(0.7), sig(0.4, 0.5), sig(0.65), sig(0.55), sig(0.52)], planned_steps=50)
    controller = SignalController(rule=RULE, every=10, backtracks=3)
    summary = drive(controller, method, 50)
    assert not summary["reached"] and summary["reason"] == "budget exhausted"
    assert summary["trajectory"][2]["backtrack"] == {"to_step": 9, "lr": 0.5}
    assert summary["best"]["remaining"] == 0.52 and method.state == 49
    assert "stopping rule not met (budget exhausted): best residual 0.520" in controller.message()


def test_only_drifting_points_leave_the_starting_model():
    method = Scripted([sig(1.0)] + [sig(0.3, 0.9)] * 5)
    summary = drive(SignalController(rule=RULE, every=1, backtracks=2), method, 10)
    assert summary["reason"] == "retain limit hit" and summary["best_is_start"] and method.state == -1
    assert not summary["reached"]


def test_a_stall_doubles_the_rate_at_most_raises_times():
    flat = [sig(1.0 - 0.001 * i) for i in range(40)]
    method = Scripted(flat, planned_steps=400)
    controller = SignalController(rule=RULE, every=10, window=50, raises=2)
    summary = drive(controller, method, 300)
    raised = [p["lr_raised"] for p in summary["trajectory"] if "lr_raised" in p]
    assert raised == [2.0, 4.0] and summary["lr_raises"] == 2
    assert method.optimizer.param_groups[0]["lr"] == 4.0


def test_progress_is_not_a_stall():
    method = Scripted([sig(1.0 - 0.01 * i) for i in range(40)], planned_steps=400)
    summary = drive(SignalController(rule=RULE, every=10, window=50), method, 300)
    assert summary["lr_raises"] == 0 and method.optimizer.param_groups[0]["lr"] == 1.0


def test_every_and_window_follow_the_planned_steps():
    method = Scripted([sig(1.0)] * 100, planned_steps=600)
    controller = SignalController(rule=RULE)
    controller.start(method)
    assert controller.every == 10 and controller.window == 150


def test_relative_rising_rules_read_changes_from_the_start():
    rule = StoppingRule(remaining="forget_nll", done_at=-1.0, drift="retain_nll", drift_limit=0.5,
                        relative=True, rises=True)
    assert rule.scores({"forget_nll": 2.5, "retain_nll": 3.2}, {"forget_nll": 1.0, "retain_nll": 3.0}) \
        == pytest.approx((-1.5, 0.2))
    assert rule.scores({"forget_nll": 1.0, "retain_nll": 3.0}, None) == (0.0, 0.0)
    method = Scripted([{"forget_nll": 0.5, "retain_nll": 1.0}, {"forget_nll": 1.0, "retain_nll": 1.1},
                       {"forget_nll": 1.6, "retain_nll": 1.2}])
    summary = drive(SignalController(rule=rule, every=5), method, 50)
    assert summary["reached"] and summary["best"]["step"] == 9
    assert summary["best"]["remaining"] == pytest.approx(-1.1) and summary["best"]["drift"] == pytest.approx(0.2)
    assert rule.describe() == "rise of forget_nll >= 1 with change of retain_nll <= 0.5"
    share = StoppingRule(remaining="forget_nll", done_at=-1.0, drift="retain_nll", drift_limit=0.25,
                         relative=True, rises=True, drift_share=True)
    assert share.scores({"forget_nll": 2.5, "retain_nll": 3.6}, {"forget_nll": 1.0, "retain_nll": 3.0}) \
        == pytest.approx((-1.5, 0.2))
    assert share.describe() == "rise of forget_nll >= 1 with relative change of retain_nll <= 0.25"


def test_a_method_without_a_signal_is_refused():
    class Silent(Scripted):
        def probe_signal(self):
            return None

    with pytest.raises(ValueError, match="no validation-free stopping signal"):
        SignalController(rule=RULE, every=1).start(Silent([]))


# --- the methods' signals against the math -----------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from unlearn_kernels.models import tiny

    return tiny.load()


def _texts():
    from unlearn_kernels.data import entangled

    bench = entangled.generate(0.3)
    return bench.corpus(bench.forget_facts())[:40], bench.corpus(bench.retain_facts())[:40]


@pytest.mark.parametrize("name", ["RMU", "SRMU"])
def test_rmu_signal_is_the_math(tiny, name):
    import copy

    from unlearn_kernels.methods import registry
    from unlearn_kernels.models.layers import layer_output

    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    forget, retain = _texts()
    method = registry[name](model, tokenizer, steps=3, progress=False)
    method.fit(forget, retain)
    with torch.no_grad():
        for p in method.params.values():          # move the weights so drift is not zero
            p.add_(0.05 * torch.randn_like(p))
    fb, rb = next(method.batches(forget, 21)), next(method.batches(retain, 22))
    got = method.stopping_signal(fb, rb)
    target = method.control.double()
    w = torch.ones_like(target) if name == "RMU" else method.importance.double()
    with torch.no_grad():
        h = layer_output(model, method.config.layer, fb["input_ids"], fb["attention_mask"]).double()
        h = h[fb["attention_mask"].bool()]
        rows = [((hi - target) ** 2 * w).sum() / ((target ** 2) * w).sum() for hi in h]
        residual = math.sqrt(sum(rows) / len(rows))
        cosines = [float(hi @ target / (hi.norm() * target.norm())) for hi in h]
        live = layer_output(model, method.config.layer, rb["input_ids"], rb["attention_mask"]).double()
        frozen = method.frozen.layer_output(method.config.layer, rb["input_ids"], rb["attention_mask"]).double()
        keep = rb["attention_mask"].bool()
        drift = float((live[keep] - frozen[keep]).norm(dim=-1).sum() / frozen[keep].norm(dim=-1).sum())
    assert got["residual"] == pytest.approx(residual, rel=1e-4)
    assert got["alignment"] == pytest.approx(sum(cosines) / len(cosines), abs=1e-4)
    assert got["retain_drift"] == pytest.approx(drift, rel=1e-4) and drift > 0


def test_loss_signal_is_the_mean_token_nll(tiny):
    import copy

    import torch.nn.functional as F

    from unlearn_kernels.methods import NPO

    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    forget, retain = _texts()
    method = NPO(model, tokenizer, steps=1, progress=False)
    fb, rb = next(method.batches(forget, 21)), next(method.batches(retain, 22))
    got = method.stopping_signal(fb, rb)
    for batch, key in ((fb, "forget_nll"), (rb, "retain_nll")):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        total, count = 0.0, 0
        for row, ids, mask in zip(logits, batch["input_ids"], batch["attention_mask"]):
            for t in range(1, len(ids)):
                if mask[t]:
                    total -= float(F.log_softmax(row[t - 1], -1)[ids[t]])
                    count += 1
        assert got[key] == pytest.approx(total / count, rel=1e-4)


# --- rule-driven runs end to end -------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from unlearn_kernels.data import entangled

    folder = tmp_path_factory.mktemp("rule-data")
    bench = entangled.generate(0.3)
    (folder / "forget.txt").write_text("\n".join(bench.corpus(bench.forget_facts())))
    (folder / "retain.txt").write_text("\n".join(bench.corpus(bench.retain_facts())))
    return folder


def _run(data, out, **kw):
    from unlearn_kernels.models import tiny
    from unlearn_kernels.pipeline import RunConfig, run

    return run(RunConfig(model=str(tiny.ASSET_DIR), method=kw.pop("method", "RMU"), forget=[str(data / "forget.txt")],
                         retain=[str(data / "retain.txt")], out=str(out), **kw))


def test_a_run_without_validation_stops_on_the_rule(data, tmp_path):
    result = _run(data, tmp_path / "out", settings={"progress": False}, stop="rule")
    target = result.report["target"]
    assert target["rule"] == "residual <= 0.6 with retain_drift <= 0.25"
    assert result.reached == target["reached"] and result.message
    assert target["budget"] == {"setting": "steps", "value": 600, "default": 150, "factor": 4.0}
    best = target["best"]
    assert best["step"] == len(result.report["history"]) - 1 or not target["reached"]
    saved = json.loads((result.out / "report.json").read_text())["target"]
    assert saved["best"] == best and our_png_size(result.out / "report.png")[1] == 400


@pytest.mark.parametrize("settings, stop, fixed", [({"steps": 3}, "auto", True), ({}, "fixed", True),
                                                   ({"steps": 3}, "fixed", True)])
def test_a_set_length_or_stop_fixed_runs_the_length(data, tmp_path, settings, stop, fixed):
    result = _run(data, tmp_path / "out", settings={"progress": False, "steps": 3, **settings}, stop=stop)
    assert "target" not in result.report and result.reached is None and len(result.report["history"]) == 3


@pytest.mark.parametrize("kw, message", [
    ({"stop": "rule", "settings": {"steps": 3}}, "--stop rule: the run's length is set"),
    ({"stop": "rule", "method": "TAR"}, "TAR has no validation-free stopping rule"),
    ({"stop": "sometimes"}, "--stop must be auto, probe, rule or fixed"),
    ({"budget": 2.0, "stop": "fixed"}, "--budget steers target- and rule-driven runs"),
    ({"stop": "rule", "checkpoint_every": 5}, "checkpointed and resumed runs keep a fixed length")])
def test_bad_stop_requests_are_refused(data, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _run(data, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()
