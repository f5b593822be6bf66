"""A run killed midway and resumed from its checkpoint ends bit for bit where an uninterrupted
run ends (CPU)."""

import signal

import pytest
import torch

from unlearn_kernels.data import entangled
from unlearn_kernels.methods import registry
from unlearn_kernels.methods.checkpoint import Checkpointer, RunInterrupted
from unlearn_kernels.models import tiny

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
