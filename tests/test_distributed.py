"""World-size invariance: 1 and 2 CPU processes (gloo, launched by ``torchrun``, the model plain,
DDP-wrapped or FSDP2-sharded) on the shipped model, same global batch and seed, give the same
run: weights within 1e-5 relative (fp32),
SIMU's masks exactly, MRP's basis (as a projector), SRMU's importance map and the loss
histories within 1e-5. The CLI under ``torchrun`` writes one output, from rank 0, equal to
the single-process one; bad parallel input fails on every rank with one line from rank 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unlearn_kernels.data.entangled import generate
from unlearn_kernels.models import tiny
from conftest import wait_for_checkpoint_step

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
METHODS = ["RMU", "SRMU", "MRP", "SIMU", "GradDiff", "NPO"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
pytestmark = pytest.mark.distributed


# --standalone: torchrun binds a free port for its rendezvous itself (no pick-then-bind race)
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]


def torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCH, str(n), *args],
                          capture_output=True, text=True, env=ENV, timeout=600)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / a.double().norm().clamp(min=1e-30))


FSDP_METHODS = ["RMU", "AdaptiveRMU", "SRMU", "MRP", "SIMU", "GradDiff", "NPO", "SO-GradDiff"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process; 2 ranks with DDP; 2 ranks with FSDP2."""
    one, two, sharded = (tmp_path_factory.mktemp(n) for n in ("world1", "world2", "fsdp2"))
    single = subprocess.run([sys.executable, str(WORKER), str(one), *METHODS, "AdaptiveRMU", "SO-GradDiff"],
                            capture_output=True,
                            text=True, env=ENV, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    double = torchrun(2, str(WORKER), str(two), *METHODS)
    assert double.returncode == 0, double.stderr[-3000:]
    ENV["UK_PARALLEL"] = "fsdp"
    try:
        fsdp = torchrun(2, str(WORKER), str(sharded), *FSDP_METHODS)
    finally:
        del ENV["UK_PARALLEL"]
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    return one, two, sharded


def _same_run(one: Path, two: Path, name: str, world: int = 2) -> None:
    a, b = load_file(str(one / f"{name}.safetensors")), load_file(str(two / f"{name}.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("param.") or k.startswith("basis.") for k in a)
    for key in a:
        if key.startswith("mask."):
            assert torch.equal(a[key], b[key]), key
        elif key.startswith("basis."):
            assert relative(a[key] @ a[key].T, b[key] @ b[key].T) < 1e-5, key
        else:
            assert relative(a[key], b[key]) < 1e-5, (key, relative(a[key], b[key]))
    ha, hb = (json.loads((d / f"{name}.json").read_text()) for d in (one, two))
    assert (ha["world_size"], hb["world_size"]) == (1, world)
    assert len(ha["history"]) == len(hb["history"]) > 0
    for x, y in zip(ha["history"], hb["history"]):
        assert x.keys() == y.keys()
        for k in x:
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), (k, x[k], y[k])


@pytest.mark.parametrize("name", METHODS)
def test_two_ranks_equal_one(runs, name):
    one, two, _ = runs
    _same_run(one, two, name)


@pytest.mark.parametrize("name", FSDP_METHODS)
def test_fsdp2_equals_one_process_and_ddp(runs, name):
    one, two, sharded = runs
    _same_run(one, sharded, name)
    if name in METHODS:
        a, b = load_file(str(two / f"{name}.safetensors")), load_file(str(sharded / f"{name}.safetensors"))
        assert all(relative(a[k], b[k]) < 1e-5 for k in a)


def test_the_runs_did_something(runs):
    """The weights moved from the shipped model's (so agreement is not two no-ops)."""
    one, _, _ = runs
    model, _ = tiny.load()
    params = dict(model.named_parameters())
    for name in ("RMU", "SIMU", "NPO"):
        tensors = load_file(str(one / f"{name}.safetensors"))
        moved = [k for k in tensors if k.startswith("param.") and not torch.equal(tensors[k], params[k[6:]].float())]
        assert moved, name


def _data(tmp_path: Path) -> list[str]:
    bench = generate(0.25)
    (tmp_path / "forget.txt").write_text("\n".join(bench.corpus(bench.forget_facts())) + "\n")
    (tmp_path / "retain.txt").write_text("\n".join(bench.corpus(bench.retain_facts())) + "\n")
    return ["--model", str(tiny.ASSET_DIR), "--forget", str(tmp_path / "forget.txt"),
            "--retain", str(tmp_path / "retain.txt"), "--device", "cpu"]


def one_and_two_ranks(tmp_path: Path, args: list[str], mode: str) -> subprocess.CompletedProcess:
    """``unlearn ARGS`` in one process into ``one/`` and on 2 ranks with ``--parallel MODE`` into
    ``two/``; both must succeed; returns the torchrun result."""
    single = subprocess.run([sys.executable, "-m", "unlearn_kernels.cli", "unlearn", *args,
                             "--out", str(tmp_path / "one")], capture_output=True, text=True, env=ENV, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    double = torchrun(2, "-m", "unlearn_kernels.cli", "unlearn", *args, "--out", str(tmp_path / "two"),
                      "--parallel", mode)
    assert double.returncode == 0, double.stderr[-3000:]
    return double


def test_cli_under_torchrun_writes_once_and_equals_one_process(tmp_path):
    common = [*_data(tmp_path), "--method", "SRMU", "--set", "steps=3", "--set", "stats_batches=2",
              "--set", "batch_size=4"]
    double = one_and_two_ranks(tmp_path, common, "ddp")
    assert double.stdout.count("saved the unlearned model") == 1
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys()
    for key in a:
        assert relative(a[key], b[key]) < 1e-5, key
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["parallel"] == {"mode": "ddp", "world_size": 2}
    assert "parallel" not in json.loads((tmp_path / "one" / "report.json").read_text())


def test_batch_not_divisible_fails_on_every_rank_with_one_line(tmp_path):
    result = torchrun(2, "-m", "unlearn_kernels.cli", "unlearn", *_data(tmp_path), "--method", "RMU",
                      "--set", "batch_size=3", "--out", str(tmp_path / "out"))
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("unlearn-kernels unlearn: error")]
    assert len(ours) == 1 and "batch_size=3 is not divisible by the world size 2" in ours[0], result.stderr[-2000:]
    assert f'File "{ROOT / "unlearn_kernels"}' not in result.stderr   # torchrun's own summary only
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, message", [
    ("ddp", "--parallel ddp needs several processes: launch with torchrun"),
    ("fsdp", "--parallel fsdp needs several processes"),
])
def test_parallel_flag_outside_torchrun_is_refused(tmp_path, flag, message, capsys):
    from unlearn_kernels.cli import main

    assert main(["unlearn", *_data(tmp_path), "--method", "RMU", "--out", str(tmp_path / "o"),
                 "--parallel", flag]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("method, files", [("SIMU", ["model.safetensors", "unlearn_masks.safetensors"]),
                                           ("MRP", ["model.safetensors", "unlearn_projections.safetensors"])])
def test_cli_fsdp_equals_one_process(tmp_path, method, files):
    """The sharded run's folder (the source's shards rewritten, SIMU's masks, MRP's projected
    model) equals the one-process folder."""
    bench = generate(0.25)
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(q.to_json()) + "\n"
                                                 for q in bench.questions(bench.forget_facts())[:24]))
    common = [*_data(tmp_path), "--method", method, "--set", "batch_size=4", "--eval-forget",
              str(tmp_path / "eval.jsonl")]
    common += ["--set", "steps=3", "--set", "score_batches=2"] if method == "SIMU" else \
              ["--set", "stats_batches=2", "--set", "train_steps=2"]
    one_and_two_ranks(tmp_path, common, "fsdp")
    for name in files:
        a, b = (load_file(str(tmp_path / d / name)) for d in ("one", "two"))
        assert a.keys() == b.keys()
        for k in a:
            if a[k].dtype == torch.bool:
                assert torch.equal(a[k], b[k]), (name, k)
            elif name.startswith("unlearn_projections"):
                assert relative(a[k] @ a[k].T, b[k] @ b[k].T) < 1e-5, (name, k)
            else:
                assert relative(a[k], b[k]) < 1e-5, (name, k)
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two")]
    assert reports[1]["parallel"] == {"mode": "fsdp", "world_size": 2}
    assert reports[0]["loading"] == reports[1]["loading"]
    for when in ("before", "after"):     # the sharded forward ran on every rank, rank 0 reported it
        x, y = (r["evaluation"][when]["forget"] for r in reports)
        assert abs(x["acc"] - y["acc"]) < 1e-9 and abs(x["acc_norm"] - y["acc_norm"]) < 1e-9, (when, x, y)
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("one", "two")]
    assert configs[0].get("model_type") == configs[1].get("model_type")


def test_cli_fsdp_refuses_relearn(tmp_path):
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "q ?", "choices": ["a", "b"], "answer": 0}) + "\n")
    result = torchrun(2, "-m", "unlearn_kernels.cli", "unlearn", *_data(tmp_path), "--method", "RMU",
                      "--eval-forget", str(tmp_path / "q.jsonl"), "--relearn", str(tmp_path / "forget.txt"),
                      "--out", str(tmp_path / "x"), "--parallel", "fsdp")
    assert result.returncode != 0
    assert result.stderr.count("--parallel fsdp: --relearn fine-tunes a copy of the whole model") == 1, \
        result.stderr[-2000:]


# GradDiff steps AdamW (DTensor state under fsdp); SO-GradDiff steps MaskedSophia, whose state
# holds each rank's shard as a plain tensor: both are gathered into the checkpoint.
@pytest.mark.parametrize("mode, method", [("ddp", "GradDiff"), ("fsdp", "SO-GradDiff")])
def test_torchrun_checkpoint_sigterm_resume_equals_uninterrupted(tmp_path, mode, method):
    """SIGTERM to torchrun: both ranks agree to stop after the same step, rank 0 writes the
    (gathered) checkpoint, all exit; resuming on 2 ranks ends bit for bit where the uninterrupted
    2-rank run does. Under fsdp the same checkpoint also resumes in one process, ending where the
    sharded run does to float rounding. (200 steps: torchrun forwards the signal only at its next
    monitor tick, and a shorter run can finish before that.)"""
    import shutil
    import signal
    common = ["-m", "unlearn_kernels.cli", "unlearn", *_data(tmp_path), "--method", method, "--set", "steps=200",
              "--set", "batch_size=4", "--set", "update=['layers.1.mlp.*']", "--set", "lr=1e-3",
              "--set", "progress=false", "--parallel", mode]
    whole = torchrun(2, *common, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    run = subprocess.Popen([*LAUNCH, "2", *common, "--out", str(tmp_path / "cut"),
                            "--checkpoint-every", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=ENV)
    state = tmp_path / "cut.checkpoint" / "state.json"
    wait_for_checkpoint_step(run, state, 3, timeout=300)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=300)
    assert run.returncode != 0 and not (tmp_path / "cut").exists(), err[-2000:]
    stopped_at = json.loads(state.read_text())["step"]
    assert 3 <= stopped_at < 199
    shutil.copytree(tmp_path / "cut.checkpoint", tmp_path / "alone.checkpoint")
    done = torchrun(2, *common, "--out", str(tmp_path / "cut"), "--checkpoint-every", "1", "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "cut.checkpoint").exists()
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if mode == "fsdp":
        alone = subprocess.run([sys.executable, *common[:-2], "--out", str(tmp_path / "alone"),
                                "--checkpoint-every", "1", "--resume"], capture_output=True, text=True, env=ENV,
                               timeout=600)
        assert alone.returncode == 0, alone.stderr[-2000:]
        # Sophia's clipped steps turn rounding into sign flips, so over ~190 steps the two runs
        # part (by 1-20 % of the update); the untouched weights stay equal, and ...
        c = load_file(str(tmp_path / "alone" / "model.safetensors"))
        changed = [k for k in a if "layers.1.mlp" in k]
        assert changed and all(torch.equal(a[k], c[k]) for k in a if k not in changed)
        # ... the first steps after the resume, which use the restored Sophia moments and
        # Hessian, give the sharded run's losses to rounding
        ha, hc = (json.loads((tmp_path / d / "report.json").read_text())["history"] for d in ("whole", "alone"))
        after = [(x, y) for x, y in zip(ha, hc) if stopped_at < x["step"] <= stopped_at + 5]
        assert len(after) == 5 and all(x["step"] == y["step"] for x, y in after)
        for x, y in after:
            assert all(abs(x[k] - y[k]) <= 1e-5 * max(1.0, abs(x[k])) for k in x if k != "step"), (x, y)


def test_missing_shard_fails_on_every_rank_with_one_line(tmp_path):
    from test_prefix_only import _sharded_model
    from unlearn_kernels.models.prefix import checkpoint_keys

    src = _sharded_model(tmp_path / "src")
    shard = sorted(set(checkpoint_keys(src).values()))[0]
    (src / shard).unlink()
    data = _data(tmp_path)
    data[data.index("--model") + 1] = str(src)
    result = torchrun(2, "-m", "unlearn_kernels.cli", "unlearn", *data, "--method", "RMU", "--out", str(tmp_path / "o"))
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("unlearn-kernels unlearn: error")]
    assert len(ours) == 1 and f"the folder lacks, first {shard}" in ours[0], result.stderr[-2000:]
