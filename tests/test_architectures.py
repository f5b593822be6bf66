"""Every method with its default settings on tiny random models of ten decoder families.

Each family is built from its own ``transformers`` config (4 layers, hidden 32, MLP width
48): the roles found from the family table must equal those found from structure alone; a
default run (only ``steps``/``batch_size`` made small) must change exactly the weights it
reports, inside the band it chose; SIMU's masks must lie on the MLP-neuron axis; and the
saved folder must reload with plain ``transformers`` as the unlearned model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

from unlearn_kernels.methods import registry
from unlearn_kernels.models import tiny
from unlearn_kernels.models.io import save_pretrained_atomic
from unlearn_kernels.models.layers import layer_index_of
from unlearn_kernels.models.roles import FAMILIES, find_roles, structural_roles

DEPTH, HIDDEN, WIDTH = 4, 32, 48


def _configs(vocab: int) -> dict:
    common = dict(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=4,
                  pad_token_id=0, bos_token_id=2, eos_token_id=3)
    gqa = dict(intermediate_size=WIDTH, num_key_value_heads=2, **common)
    return {
        "llama": tf.LlamaConfig(**gqa),
        "mistral": tf.MistralConfig(**gqa),
        "qwen2": tf.Qwen2Config(**gqa),
        "gemma2": tf.Gemma2Config(head_dim=8, **gqa),
        "phi3": tf.Phi3Config(**gqa),
        "gpt2": tf.GPT2Config(vocab_size=vocab, n_embd=HIDDEN, n_layer=DEPTH, n_head=4, n_inner=WIDTH,
                              bos_token_id=2, eos_token_id=3, pad_token_id=0),
        "gpt_neox": tf.GPTNeoXConfig(intermediate_size=WIDTH, **common),
        "opt": tf.OPTConfig(ffn_dim=WIDTH, word_embed_proj_dim=HIDDEN, **common),
        "falcon": tf.FalconConfig(ffn_hidden_size=WIDTH, **common),
        "mixtral": tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **gqa),
    }


@pytest.fixture(scope="module")
def tokenizer(shipped):
    return shipped()[1]


@pytest.fixture(scope="module")
def models(tokenizer):
    torch.manual_seed(0)
    return {name: tf.AutoModelForCausalLM.from_config(config).eval() for name, config in
            _configs(len(tokenizer)).items()}


@pytest.fixture(scope="module")
def data():
    from unlearn_kernels.data import entangled

    bench = entangled.generate(0.25)
    return bench.corpus(bench.forget_facts())[:24], bench.corpus(bench.retain_facts())[:24]


FAMILY_NAMES = list(_configs(64))
METHODS = sorted(registry)   # all ten


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_table_agrees_with_structure(models, family):
    model = models[family]
    table, structure = find_roles(model), structural_roles(model)
    assert table.source == f"table ({family})" and family in FAMILIES
    assert (table.mlp, table.names, table.attention_out) == (structure.mlp, structure.names, structure.attention_out)
    assert table.width == WIDTH and table.depth == DEPTH
    for layer in range(DEPTH):
        assert table.projections[layer] == structure.projections[layer]
        for projection in table.projections[layer]:
            weight = model.get_parameter(projection.parameter)
            size = 2 * WIDTH if projection.role == "gate_up" else WIDTH
            assert weight.shape[projection.neuron_axis] == size


def test_default_layer_is_a_fraction_of_depth():
    from unlearn_kernels.models.roles import default_layer

    assert [default_layer(n) for n in (1, 2, 4, 6, 12, 32, 80)] == [0, 1, 2, 2, 3, 7, 18]


def test_an_unknown_family_is_found_by_structure(models):
    model = copy.deepcopy(models["llama"])
    model.config.model_type = "my_own_decoder"
    roles = find_roles(model)
    assert roles.source == "structure" and roles.names == find_roles(models["llama"]).names


def _band(report) -> set[int]:
    layer = report["chosen_by_structure"].get("layer", report["config"].get("layer")) or 2
    return set(range(max(0, layer - 2), layer + 1))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_method_runs_with_defaults(models, tokenizer, data, family, method, tmp_path):
    model = copy.deepcopy(models[family])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = {"stats_batches": 2} if method == "MRP" else {"steps": 2}
    if method == "SIMU":
        small["score_batches"] = 2
    runner = registry[method](model, tokenizer, batch_size=4, progress=False, **small)
    runner.fit(*data)
    report = runner.report()
    chosen = report["chosen_by_structure"]
    assert "roles" in chosen and f"table ({family})" in chosen["roles"]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    if method == "MRP":
        assert changed == set() and chosen["layer"] == 2 and runner.projections()
    else:
        assert changed and changed == set(report["updated_parameters"])
        assert {layer_index_of(model, name) for name in changed} <= _band(report)
        assert "update" in chosen and "lr" in chosen
    if method == "SIMU":
        roles = find_roles(model)
        for name, mask in runner.neuron_masks.items():
            projection = next(p for ps in roles.projections.values() for p in ps if p.parameter == name)
            size = 2 * WIDTH if projection.role == "gate_up" else WIDTH
            weight = model.get_parameter(name)
            assert mask.shape == ((weight.shape[0], size) if weight.dim() == 3 else (size,))
            delta = (model.state_dict()[name] - before[name]).abs()
            axis = projection.neuron_axis
            other = [a for a in range(delta.dim()) if a != axis and not (delta.dim() == 3 and a == 0)]
            per_neuron = delta.sum(other)
            assert (per_neuron[~mask] == 0).all()
    out = save_pretrained_atomic(model, tokenizer, tmp_path / "out", report, runner.projections(),
                                 runner.saved_masks())
    if method == "MRP":
        with pytest.raises(ValueError, match="trust_remote_code=True"):   # never the original, silently
            tf.AutoModelForCausalLM.from_pretrained(out)
        reloaded = tf.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    else:
        reloaded = tf.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 14, 20, 3]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)


def test_errors_say_what_to_type(models, tokenizer):
    with pytest.raises(ValueError, match=r"its MLP weights are transformer\.h\.\{0,1,2,3\}\.mlp\.\{c_fc,c_proj\}"):
        registry["GradDiff"](models["gpt2"], tokenizer, update=["layers.{5,6,7}.mlp.down_proj"])
    with pytest.raises(ValueError, match=r"layer 7 does not exist: the model has 4 decoder layers"):
        registry["RMU"](models["opt"], tokenizer, layer=7)


def test_encoder_decoders_are_refused(tokenizer):
    bart = tf.BartForConditionalGeneration(tf.BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=1,
                                                         decoder_layers=1, encoder_attention_heads=4,
                                                         decoder_attention_heads=4, encoder_ffn_dim=48,
                                                         decoder_ffn_dim=48))
    for name in ("RMU", "GradDiff", "MRP", "SIMU"):
        with pytest.raises(ValueError, match="is an encoder-decoder"):
            registry[name](bart, tokenizer)


@pytest.mark.parametrize("method", METHODS)
def test_cli_runs_every_method_without_a_setting_on_the_shipped_model(method, tmp_path, capsys, data):
    """``unlearn`` with no --set at all: the defaults run and the report names what changed."""
    import json

    from unlearn_kernels import cli

    forget, retain = data
    (tmp_path / "forget.txt").write_text("\n".join(forget[:16]) + "\n")
    (tmp_path / "retain.txt").write_text("\n".join(retain[:16]) + "\n")
    code = cli.main(["unlearn", "--model", str(tiny.ASSET_DIR), "--method", method, "--forget",
                     str(tmp_path / "forget.txt"), "--retain", str(tmp_path / "retain.txt"), "--out",
                     str(tmp_path / "out"), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    chosen = report["chosen_by_structure"]
    assert "table (llama)" in chosen["roles"]
    if method == "MRP":
        assert report["needs"] == ["unlearn_projections.safetensors"] and chosen["rank"] >= 1
    else:
        assert report["updated_parameters"] and all(
            layer_index_of(tiny.load()[0], name) in (0, 1, 2) for name in report["updated_parameters"])
