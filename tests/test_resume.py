"""A run killed midway and resumed from its checkpoint ends bit for bit where an uninterrupted
run ends (CPU)."""

import signal

import pytest
import torch

from unlearn_kernels.data import entangled
from unlearn_kernels.methods import registry
from unlearn_kernels.methods.checkpoint import Checkpointer, RunInterrupted
from unlearn_kernels.models import tiny
from conftest import wait_for_checkpoint_step

SETTINGS = {
    "RMU": dict(layer=2, update=["layers.{1,2}.mlp.down_proj"], steering=10.0, lr=1e-3),
    "SRMU": dict(layer=2, update=["layers.{1,2}.mlp.down_proj"], lr=1e-3, stats_batches=2),
    "AdaptiveRMU": dict(layer=2, update=["layers.{1,2}.mlp.down_proj"], lr=1e-3),
    "NPO": dict(update=["layers.1.mlp.*"], lr=1e-3),
    "SIMU": dict(update=["layers.{1,2}.mlp.{up_proj,down_proj}"], lr=1e-3, fraction=0.25, score_batches=2,
                 hessian_interval=4, rho=1.0),
}
STEPS, KILL_AFTER = 6, 2


def data():
    bench = entangled.generate(0.25)
    return bench.corpus(bench.forget_facts()), bench.corpus(bench.retain_facts())


def run(name, **fit):
    model, tokenizer = tiny.load()
    method = registry[name](model, tokenizer, steps=STEPS, batch_size=4, progress=False, **SETTINGS[name])
    return method, method.fit(*data(), **fit)


class KilledAfter(Checkpointer):
    """SIGTERM arrives during step ``KILL_AFTER``."""

    def due(self, step):
        if step == KILL_AFTER:
            signal.raise_signal(signal.SIGTERM)
        return super().due(step)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_resumed_run_equals_uninterrupted(name, tmp_path):
    reference, _ = run(name)
    with pytest.raises(RunInterrupted, match=f"after step {KILL_AFTER}"):
        run(name, checkpoint=KilledAfter(tmp_path / "ckpt", every=0))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL     # handlers restored
    resumed, _ = run(name, checkpoint=Checkpointer(tmp_path / "ckpt", every=2), resume=True)
    for key, value in reference.params.items():
        assert torch.equal(value, resumed.params[key]), key
    assert [h["step"] for h in resumed.history] == list(range(STEPS))
    assert resumed.history == reference.history


def test_resume_refuses_other_settings_or_data(tmp_path):
    model, tokenizer = tiny.load()
    forget, retain = data()
    method = registry["NPO"](model, tokenizer, steps=2, batch_size=4, progress=False, **SETTINGS["NPO"])
    method.fit(forget, retain, checkpoint=Checkpointer(tmp_path / "c", every=1))
    other = registry["NPO"](tiny.load()[0], tokenizer, steps=2, batch_size=4, progress=False,
                            **{**SETTINGS["NPO"], "lr": 2e-3})
    with pytest.raises(ValueError, match="other settings"):
        other.fit(forget, retain, checkpoint=Checkpointer(tmp_path / "c"), resume=True)
    again = registry["NPO"](tiny.load()[0], tokenizer, steps=2, batch_size=4, progress=False, **SETTINGS["NPO"])
    with pytest.raises(ValueError, match="other forget/retain data"):
        again.fit(forget[1:], retain, checkpoint=Checkpointer(tmp_path / "c"), resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        again.fit(forget, retain, checkpoint=Checkpointer(tmp_path / "absent"), resume=True)


def test_cli_killed_with_sigterm_then_resumed_equals_uninterrupted(tmp_path):
    import json
    import subprocess
    import sys
    from safetensors.torch import load_file

    forget, retain = data()
    (tmp_path / "forget.txt").write_text("\n".join(forget))
    (tmp_path / "retain.txt").write_text("\n".join(retain))

    def command(out, *extra):
        return [sys.executable, "-m", "unlearn_kernels.cli", "unlearn", "--model", str(tiny.ASSET_DIR),
                "--method", "GradDiff", "--forget", str(tmp_path / "forget.txt"), "--retain",
                str(tmp_path / "retain.txt"), "--out", str(out), "--set", "steps=60", "--set", "batch_size=4",
                "--set", "update=['layers.1.mlp.*']", "--set", "lr=1e-3", "--set", "progress=false", *extra]

    assert subprocess.run(command(tmp_path / "whole"), capture_output=True).returncode == 0
    run = subprocess.Popen(command(tmp_path / "cut", "--checkpoint-every", "1"), stderr=subprocess.PIPE)
    state = tmp_path / "cut.checkpoint" / "state.json"
    wait_for_checkpoint_step(run, state, 3, timeout=120)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err.decode()
    assert b"resume to continue" in err and not (tmp_path / "cut").exists()
    stopped_at = json.loads(state.read_text())["step"]
    assert 3 <= stopped_at < 59
    done = subprocess.run(command(tmp_path / "cut", "--checkpoint-every", "1", "--resume"), capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    assert not (tmp_path / "cut.checkpoint").exists()
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)


def test_resume_with_fp32_masters_and_accumulation(tmp_path):
    """bf16 model, fp32 masters, two batches per step: the masters travel in the checkpoint."""
    def go(**fit):
        model, tokenizer = tiny.load(dtype=torch.bfloat16)
        method = registry["RMU"](model, tokenizer, steps=STEPS, batch_size=2, grad_accum=2, master_dtype="float32",
                                 progress=False, **SETTINGS["RMU"])
        return method.fit(*data(), **fit)

    reference = go()
    with pytest.raises(RunInterrupted):
        go(checkpoint=KilledAfter(tmp_path / "ckpt", every=0))
    resumed = go(checkpoint=Checkpointer(tmp_path / "ckpt", every=2), resume=True)
    assert all(m.dtype == torch.float32 for m in resumed.optimized.values())
    for key, value in reference.params.items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, resumed.params[key]), key
        assert torch.equal(reference.optimized[key], resumed.optimized[key]), key
    assert resumed.history == reference.history
