"""RMU and SRMU run the layers below the lowest updated one once per batch, without a graph,
and branch there for the live and the frozen pass: the same losses, gradients and weights as
two full passes (``share_prefix=False``), on every test family, with less work."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

from test_architectures import _configs
from unlearn_kernels.data import entangled
from unlearn_kernels.methods import registry
from unlearn_kernels.models import tiny
from unlearn_kernels.models.layers import decoder_layers


@pytest.fixture(scope="module")
def data():
    bench = entangled.generate(0.25)
    return bench.corpus(bench.forget_facts())[:16], bench.corpus(bench.retain_facts())[:16]


def run(model, tokenizer, data, name, share, **settings):
    method = registry[name](model, tokenizer, steps=3, batch_size=4, progress=False, share_prefix=share,
                            **settings).fit(*data)
    return method, {k: v.detach().clone() for k, v in method.params.items()}


def layer0_runs(model, fit):
    """How often decoder layer 0's forward really runs during ``fit()`` (a replayed layer
    returns its cached output without reaching the class's forward)."""
    layer0, calls = decoder_layers(model)[0], []
    original = type(layer0).forward

    def counting(self, *args, **kwargs):
        if self is layer0:
            calls.append(1)
        return original(self, *args, **kwargs)

    type(layer0).forward = counting
    try:
        fit()
    finally:
        type(layer0).forward = original
    return len(calls)


BAND = dict(layer=3, update=["model.layers.{2,3}.mlp.down_proj"])     # layers 0, 1 are shared


@pytest.mark.parametrize("name, settings", [
    ("RMU", {}),
    ("SRMU", {"anchor_forget": True, "stats_batches": 2}),
    ("SRMU", {"anchor_forget": False, "stats_batches": 2}),
    ("AdaptiveRMU", {}),
])
def test_shared_prefix_equals_two_full_passes(data, name, settings):
    base, tokenizer = tiny.load()
    results = {}
    for share in (False, True):
        model = copy.deepcopy(base)
        method = registry[name](model, tokenizer, steps=3, batch_size=4, progress=False, share_prefix=share,
                                **BAND, **settings)
        runs = layer0_runs(model, lambda: method.fit(*data))
        assert method.shared_prefix() == (2 if share else 0)
        results[share] = (method.history, {k: v.detach().clone() for k, v in method.params.items()}, runs)
    (h0, w0, runs0), (h1, w1, runs1) = results[False], results[True]
    assert h0 == h1                                              # every loss term, every step
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    # each step: the frozen retain pass (and SRMU's frozen forget pass) no longer runs layer 0
    saved = 3 * (2 if settings.get("anchor_forget") else 1)
    assert runs0 - runs1 == saved


def test_an_updated_embedding_disables_sharing():
    model, tokenizer = tiny.load()
    method = registry["RMU"](model, tokenizer, layer=2, update=["model.embed_tokens", "model.layers.2.mlp.down_proj"])
    assert method.shared_prefix() == 0


@pytest.mark.parametrize("family", ["gpt2", "opt", "gpt_neox", "falcon", "mixtral", "phi3"])
def test_shared_prefix_on_other_families(data, family):
    _, tokenizer = tiny.load()
    torch.manual_seed(0)
    config = _configs(len(tokenizer))[family]
    for key, value in list(vars(config).items()):   # GPT-2/OPT train with dropout: with it the two
        if "drop" in key and isinstance(value, float):  # paths would draw different masks below
            setattr(config, key, 0.0)                   # the branch point
    base = tf.AutoModelForCausalLM.from_config(config).eval()
    results = []
    for share in (False, True):
        method, weights = run(copy.deepcopy(base), tokenizer, data, "SRMU", share, layer=3, anchor_forget=True,
                              stats_batches=2)
        assert method.shared_prefix() == (1 if share else 0)          # band 1..3 at layer 3
        results.append((method.history, weights))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])
