"""The model zoo (``unlearn_kernels.models.zoo``): every spec builds the architecture it names,
the two sets are disjoint and cover the ranges, building is deterministic, cached folders are
ours or refused, and the data files split val and test on disjoint entities."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers as tf

from unlearn_kernels.data.loaders import read_multiple_choice, read_texts
from unlearn_kernels.models import zoo
from unlearn_kernels.models.layers import decoder_layers
from unlearn_kernels.models.output_dir import OutputPathError
from unlearn_kernels.models.roles import find_roles

CLASSES = {"llama": tf.LlamaForCausalLM, "gpt2": tf.GPT2LMHeadModel, "neox": tf.GPTNeoXForCausalLM,
           "qwen2": tf.Qwen2ForCausalLM}
ALL = zoo.TRAINING + zoo.HELD_OUT


def small(family: str, tokenizer: str = "word", **extra) -> zoo.ZooSpec:
    """A spec of ``family`` small enough to train for a few steps in a test."""
    return zoo.ZooSpec(f"test-{family}", family, 2, 32, 2, 4, tokenizer, 300, 7, 0, 3, 3e-3, batch_size=8, **extra)


@pytest.fixture(scope="module")
def tokenizers():
    return {kind: zoo.build_tokenizer(small("llama", kind)) for kind in zoo.TOKENIZERS}


def _structure(model) -> tuple[int, int, int]:
    """(depth, hidden, MLP width) read from the weights, not from the config."""
    roles = find_roles(model)
    hidden = model.get_input_embeddings().weight.shape[1]
    down = next(p for p in roles.projections[0] if p.role == "down")
    width = model.get_parameter(down.parameter).shape[down.neuron_axis]
    return len(decoder_layers(model)), hidden, width


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.name)
def test_every_spec_builds_its_family_with_its_shape(spec, tokenizers):
    config = zoo.build_config(spec, tokenizers["bpe" if spec.tokenizer == "bpe-bos" else spec.tokenizer])
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    assert type(model) is CLASSES[spec.family]
    depth, hidden, width = _structure(model)
    assert (depth, hidden) == (spec.layers, spec.hidden)
    assert width / hidden == pytest.approx(spec.mlp_ratio)


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_a_built_model_runs_and_rmu_updates_its_mlp(family):
    from unlearn_kernels.methods import registry

    spec = small(family)
    model, tokenizer = zoo.build(spec)
    assert type(model) is CLASSES[family]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bench = zoo.benchmark(spec)
    texts = bench.corpus(bench.forget_facts())[:16], bench.corpus(bench.retain_facts())[:16]
    runner = registry["RMU"](model, tokenizer, batch_size=4, steps=2, progress=False)
    runner.fit(*texts)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed == set(runner.report()["updated_parameters"])
    roles = find_roles(model)
    mlp_modules = {p.parameter.rsplit(".", 1)[0] for ps in roles.projections.values() for p in ps}
    assert {name.rsplit(".", 1)[0] for name in changed} <= mlp_modules      # MLP weights (and biases) only


def test_tokenizer_kinds(tokenizers):
    text = "the toxin of kalo is vorazine ."
    with_bos, plain, word = (tokenizers[k](text)["input_ids"] for k in ("bpe-bos", "bpe", "word"))
    assert with_bos[0] == tokenizers["bpe-bos"].bos_token_id and with_bos[1:] == plain
    assert tokenizers["bpe"].bos_token_id not in plain
    assert word[0] != tokenizers["word"].bos_token_id and len(word) == len(text.split())
    corpus = zoo.benchmark(small("llama")).corpus()
    unk = tokenizers["word"].unk_token_id
    assert all(unk not in ids for ids in tokenizers["word"](corpus[:500])["input_ids"])
    assert len(tokenizers["bpe"]) == 300


def test_sets_are_disjoint_and_cover_the_ranges():
    names = [s.name for s in ALL]
    assert len(set(names)) == len(names)
    assert not {s.world_seed for s in zoo.TRAINING} & {s.world_seed for s in zoo.HELD_OUT}
    for specs in (zoo.TRAINING, zoo.HELD_OUT):
        assert {s.family for s in specs} == set(zoo.FAMILIES)
    assert min(s.layers for s in ALL) == 4 and max(s.layers for s in ALL) == 32
    assert min(s.hidden for s in ALL) == 64 and max(s.hidden for s in ALL) == 1024
    assert {min(s.mlp_ratio for s in ALL), max(s.mlp_ratio for s in ALL)} == {2, 4}
    assert {s.tokenizer for s in ALL} == set(zoo.TOKENIZERS)
    assert len({s.world_seed for s in ALL}) >= 5


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="family"):
        small("bert")
    with pytest.raises(ValueError, match="kv_heads"):
        small("gpt2", kv_heads=2)
    with pytest.raises(ValueError, match="multiple of heads"):
        dataclasses.replace(small("llama"), hidden=30)


def test_training_is_deterministic_and_depends_on_the_seed():
    spec = small("neox", "bpe")
    first, _, losses_a, _ = zoo.train_model(spec)
    second, _, losses_b, _ = zoo.train_model(spec)
    other, _, _, _ = zoo.train_model(dataclasses.replace(spec, init_seed=1))
    a, b, c = first.state_dict(), second.state_dict(), other.state_dict()
    assert losses_a == losses_b and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    start = zoo.build(spec)[0].state_dict()
    assert not all(torch.equal(a[k], start[k]) for k in a)     # it trained


def test_ensure_caches_and_refuses_a_folder_not_ours(tmp_path, monkeypatch):
    spec = small("gpt2")
    folder = zoo.model_dir(spec, tmp_path)
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="not an output of unlearn_kernels"):
        zoo.ensure(spec, tmp_path)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    (folder / "notes.txt").unlink()
    folder.rmdir()
    out = zoo.ensure(spec, tmp_path)
    report = json.loads((out / "report.json").read_text())
    assert report["zoo"]["spec"] == spec.as_dict()
    assert set(report["zoo"]["base_accuracy"]) == {"forget", "retain", "entangled"}

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model was trained again")

    monkeypatch.setattr(zoo, "train_model", no_training)
    assert zoo.ensure(spec, tmp_path) == out
    with pytest.raises(AssertionError, match="trained again"):   # another spec is not the cached one
        zoo.ensure(dataclasses.replace(spec, lr=1e-3), tmp_path)


def test_oracle_trains_on_the_world_without_its_forget_facts(tmp_path, monkeypatch):
    spec = small("llama")
    corpora = []

    def record(model, tokenizer, corpus, *args, **kwargs):
        corpora.append(list(corpus))
        return [0.0]

    monkeypatch.setattr(zoo.tiny, "fit", record)
    zoo.train_model(spec)
    zoo.train_model(spec, oracle=True)
    world = zoo.benchmark(spec)
    forget = world.corpus(world.forget_facts())
    assert corpora[0] == world.corpus()
    assert corpora[1] == [s for s in world.corpus() if s not in set(forget)]
    assert forget and not set(forget) & set(corpora[1]) and len(corpora[1]) == len(corpora[0]) - len(forget)
    model_folder, oracle_folder = zoo.ensure(spec, tmp_path), zoo.ensure(spec, tmp_path, oracle=True)
    assert oracle_folder == zoo.model_dir(spec, tmp_path, oracle=True).resolve() != model_folder
    assert json.loads((oracle_folder / "report.json").read_text())["zoo"]["oracle"] is True
    assert zoo.cached_report(model_folder, spec, oracle=True) is None      # one is not taken for the other
    assert zoo.cached_report(oracle_folder, spec) is None


def test_data_files_split_val_and_test_on_disjoint_entities(tmp_path):
    spec = zoo.HELD_OUT[0]
    paths = zoo.write_data(spec, tmp_path)
    assert set(paths) == {name.removesuffix(".jsonl") for name in zoo.DATA_FILES}
    bench = zoo.benchmark(spec)
    forget = read_texts(paths["forget"])
    assert forget == bench.corpus(bench.forget_facts()) and any("\n" in t for t in forget)
    qs = {name: read_multiple_choice(paths[name]) for name in paths if name not in ("forget", "retain")}
    split = zoo.data_split(spec)
    for kind in ("forget", "retain", "entangled"):
        val, test = split[f"val_{kind}"], split[f"test_{kind}"]
        assert val and test and len(qs[f"val_{kind}"]) == len(val)
        assert not {q.fact.entity for q in val} & {q.fact.entity for q in test}
        assert not {q.question for q in val} & {q.question for q in test}
    assert len(split["val_forget"]) + len(split["test_forget"]) == len(bench.forget_facts())
    forget_entities = set(bench.forget_entities)
    for part in ("val", "test"):
        assert all(q.fact.entity in forget_entities and q.fact.domain == "retain" for q in split[f"{part}_entangled"])
        assert {q.question for q in split[f"{part}_entangled"]} <= {q.question for q in split[f"{part}_retain"]}
    folder = zoo.data_dir(spec, tmp_path)
    (folder / "report.json").unlink()      # no longer marked ours: never written over
    with pytest.raises(OutputPathError):
        zoo.write_data(spec, tmp_path)
