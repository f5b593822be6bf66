"""Model plumbing on tiny random HF models of several architectures (no downloads)."""

import pytest
import torch

from unlearn_kernels.models.layers import (FrozenCopy, check_layer, decoder_layers, expand_braces,
                                           layer_output, parameters_matching)

transformers = pytest.importorskip("transformers")


def tiny_models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=3, n_head=4, n_positions=32))
    return {"llama": llama.eval(), "qwen2": qwen.eval(), "gpt2": gpt2.eval()}


@pytest.fixture(scope="module")
def models():
    return tiny_models()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_layers_found_by_structure(models, arch):
    assert len(decoder_layers(models[arch])) == 3


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("layer", [0, 1])
def test_truncated_forward_equals_full_forward(models, arch, layer):
    model = models[arch]
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer + 1]
    torch.testing.assert_close(layer_output(model, layer, ids, mask), full)


def test_truncated_forward_stops_early(models):
    model = models["llama"]
    calls = []
    handle = decoder_layers(model)[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        layer_output(model, 1, torch.randint(0, 50, (1, 5)))
    finally:
        handle.remove()
    assert not calls


def test_frozen_copy_keeps_the_old_model(models):
    model = tiny_models()["llama"]
    params = parameters_matching(model, "layers.{0,1}.mlp.down_proj")
    ids = torch.randint(0, 50, (2, 7))
    before = layer_output(model, 1, ids).detach().clone()
    frozen = FrozenCopy(model, params)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p))
    assert not torch.allclose(layer_output(model, 1, ids), before)
    torch.testing.assert_close(frozen.layer_output(1, ids), before)
    assert len(frozen.frozen) == 2  # only the updated weights were copied


def test_parameter_patterns(models):
    model = models["llama"]
    chosen = parameters_matching(model, ["layers.{1,2}.mlp.down_proj"])
    assert sorted(chosen) == ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]
    assert len(parameters_matching(model, "layers.*.self_attn.q_proj")) == 3
    assert expand_braces("a.{1,2}.b.{x,y}") == ["a.1.b.x", "a.1.b.y", "a.2.b.x", "a.2.b.y"]
    with pytest.raises(ValueError, match="no parameter matches"):
        parameters_matching(model, "layers.9.mlp.down_proj")


def test_unknown_layer_is_named(models):
    with pytest.raises(ValueError, match="layer 7 does not exist: the model has 3"):
        check_layer(models["gpt2"], 7)
