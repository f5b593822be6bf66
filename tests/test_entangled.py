"""The entangled benchmark generator, the tiny-model recipe and the two shipped models.

Generator: determinism, split sizes, the overlap fraction, paraphrases, cross-domain shared
words, questions, the oracle's facts; each counted from the facts directly, not from the
generator's own bookkeeping. Recipe: a few training steps of a tiny config run twice give
identical weights. Shipped models: the default model knows >= 95 % of both domains; the
oracle is near chance on the default split's forget questions and >= 95 % elsewhere.
"""

import json
import re
from collections import Counter

import pytest
import torch

from unlearn_kernels.data import entangled
from unlearn_kernels.eval.multiple_choice import accuracy
from unlearn_kernels.data.prompts import cloze_context
from unlearn_kernels.eval.suite import Split
from unlearn_kernels.models import tiny

OVERLAPS = (0.0, 0.1, 0.2, 0.3)


def domains_by_entity(facts):
    out = {}
    for f in facts:
        out.setdefault(f.entity, set()).add(f.domain)
    return out


def test_generation_is_deterministic_and_depends_on_the_seed():
    a, b, c = entangled.generate(seed=0), entangled.generate(seed=0), entangled.generate(seed=1)
    assert a.facts == b.facts and a.forget_entities == b.forget_entities and a.corpus() == b.corpus()
    assert [q.to_json() for q in a.questions(a.facts)] == [q.to_json() for q in b.questions(b.facts)]
    assert a.facts != c.facts


def test_default_split_is_thirty_percent_overlap():
    bench = entangled.generate()
    assert bench.overlap == 0.3 and bench.seed == 0


@pytest.mark.parametrize("overlap", OVERLAPS)
def test_every_split_has_enough_questions_and_its_overlap(overlap):
    bench = entangled.generate(overlap)
    split = Split.from_benchmark(bench)
    assert len(split.forget_questions) >= 150 and len(split.retain_questions) >= 300
    assert split.heldout_questions and split.attack_texts and split.probe_train_questions
    domains = domains_by_entity(bench.facts)
    forget = bench.forget_facts()
    shared = [f for f in forget if domains[f.entity] == {"forget", "retain"}]
    assert len(shared) / len(forget) == pytest.approx(overlap, abs=0.5 / len(bench.forget_entities))
    assert all(f.entangled == (domains[f.entity] == {"forget", "retain"}) for f in forget)
    assert bool(split.shared_retain_questions) == (overlap > 0)
    assert {q.fact.entity for q in split.shared_retain_questions} == {f.entity for f in shared}


def test_entities_and_domains_are_consistent():
    facts = entangled.generate().facts
    per_entity = Counter((f.entity, f.domain) for f in facts)
    assert set(per_entity.values()) == {len(entangled.FORGET_ATTRIBUTES)} == {len(entangled.RETAIN_ATTRIBUTES)}
    assert len({(f.entity, f.attribute) for f in facts}) == len(facts)
    assert all(f.value in entangled.ATTRIBUTES[f.attribute] for f in facts)
    kinds = Counter(frozenset(d) for d in domains_by_entity(facts).values())
    assert kinds[frozenset({"forget", "retain"})] >= round(0.3 * 30)   # enough shared entities for 30 %


def test_each_fact_has_several_paraphrases_and_its_cloze_answer():
    bench = entangled.generate()
    for fact, q in zip(bench.facts, bench.questions(bench.facts)):
        sentences = entangled.sentences(fact)
        statements = sentences[:-1]
        assert len(set(statements)) >= 4
        assert all(re.search(rf"\b{fact.entity}\b", s) and re.search(rf"\b{fact.value}\b", s) for s in statements)
        assert sentences[-1] == cloze_context(q.question) + " " + fact.value
    for attr, templates in entangled.PARAPHRASES.items():
        order = {t.index("{name}") < t.index("{value}") for t in templates}
        assert order == {True, False}, f"{attr}: paraphrases must differ in word order"
        words = [set(re.sub(r"\{\w+\}", "", t).split()) for t in templates]
        assert words[0] != words[1], f"{attr}: paraphrases must differ in vocabulary"


def test_words_are_shared_across_domains():
    bench = entangled.generate()
    vocab = {d: Counter(w for f in bench.facts if f.domain == d for s in entangled.statements(f) for w in s.split())
             for d in ("forget", "retain")}
    values = {d: {f.value for f in bench.facts if f.domain == d} for d in ("forget", "retain")}
    common_values = values["forget"] & values["retain"]
    assert len(common_values) >= 12
    assert common_values <= set(vocab["forget"]) & set(vocab["retain"])
    pooled = [a for a, vs in entangled.FORGET_ATTRIBUTES.items()
              if set(vs) in [set(r) for r in entangled.RETAIN_ATTRIBUTES.values()]]
    assert len(pooled) >= 3


def test_entangled_forget_facts_use_the_retain_register():
    bench = entangled.generate()
    frames = {d: {re.sub(r"\{\w+\}", "", t) for t in ts}
              for d, ts in (("forget", entangled.FORGET_FRAMES), ("retain", entangled.RETAIN_FRAMES))}
    for fact in bench.forget_facts():
        skeletons = {s.replace(fact.entity, "").replace(fact.value, "").replace(fact.attribute, "")
                     for s in entangled.statements(fact)}
        assert frames["retain" if fact.entangled else "forget"] <= skeletons


def test_questions_draw_distractors_from_the_same_attribute():
    bench = entangled.generate()
    for q in bench.questions(bench.facts):
        assert len(set(q.choices)) == 4 and q.choices[q.answer] == q.fact.value
        assert set(q.choices) <= set(entangled.ATTRIBUTES[q.fact.attribute])
        assert q.to_json() == {"question": q.question, "choices": q.choices, "answer": q.answer}
    answers = Counter(q.answer for q in bench.questions(bench.facts))
    assert min(answers.values()) > 0.15 * len(bench.facts)   # the right answer is not always in one place


def test_the_oracle_learns_everything_but_the_default_forget_facts():
    bench = entangled.generate()
    kept = entangled.oracle_facts()
    assert Counter(bench.facts) - Counter(kept) == Counter(bench.forget_facts())
    assert not Counter(kept) - Counter(bench.facts)
    oracle_text, forget_text = set(bench.corpus(kept)), set(bench.corpus(bench.forget_facts()))
    assert not oracle_text & forget_text
    assert Counter(bench.corpus()) == Counter(bench.corpus(kept)) + Counter(bench.corpus(bench.forget_facts()))


@pytest.mark.parametrize("kwargs, message", [
    (dict(overlap=0.6), "overlap"),
    (dict(overlap=-0.1), "overlap"),
    (dict(n_forget=0), "n_forget"),
    (dict(n_forget=37, overlap=0.0), "n_forget"),
    (dict(n_forget=36, overlap=0.5), "n_forget"),
])
def test_impossible_splits_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        entangled.generate(**kwargs)


def test_the_recipe_is_bit_for_bit_reproducible():
    corpus = entangled.generate().corpus()[:60]
    tokenizer = tiny.build_bpe_tokenizer(corpus, vocab_size=300)
    assert tiny.build_bpe_tokenizer(corpus, vocab_size=300).get_vocab() == tokenizer.get_vocab()

    def run(seed):
        model = tiny.build_model(tokenizer, hidden=16, layers=2, seed=seed)
        losses = tiny.fit(model, tokenizer, corpus, steps=3, batch_size=4, lr=1e-2, seed=seed)
        return model.state_dict(), losses

    threads = torch.get_num_threads()
    (first, loss1), (second, loss2), (other, _) = run(0), run(0), run(1)
    assert loss1 == loss2 and loss1[-1] < loss1[0] + 1.0
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    assert torch.get_num_threads() == threads   # fit restores the thread count
    with pytest.raises(ValueError, match="batch_size"):
        tiny.fit(tiny.build_model(tokenizer, hidden=16, layers=1), tokenizer, corpus, steps=1, batch_size=61, lr=1e-3)


def test_bad_recipe_settings_raise(capsys):
    tokenizer = tiny.build_bpe_tokenizer(["a b c"], vocab_size=260)
    with pytest.raises(ValueError, match="multiple of 4"):
        tiny.build_model(tokenizer, hidden=10)
    with pytest.raises(ValueError, match="steps"):
        tiny.fit(tiny.build_model(tokenizer, hidden=8, layers=1), tokenizer, ["a b c"], steps=0, batch_size=1, lr=1e-3)
    with pytest.raises(SystemExit) as exit_:
        tiny.main(["--both", "--out", "somewhere"])
    assert exit_.value.code == 2
    assert "error: --out names one folder: train the model and the oracle one at a time" in capsys.readouterr().err


def test_the_shipped_tokenizer_is_the_recipes_bpe_and_shared_by_the_oracle():
    shipped = json.loads((tiny.ASSET_DIR / "tokenizer.json").read_text())
    assert shipped["model"]["type"] == "BPE" and shipped["pre_tokenizer"]["type"] == "ByteLevel"
    assert shipped == json.loads((tiny.ORACLE_DIR / "tokenizer.json").read_text())
    rebuilt = json.loads(tiny.benchmark_tokenizer().backend_tokenizer.to_str())["model"]
    assert (shipped["model"]["vocab"], shipped["model"]["merges"]) == (rebuilt["vocab"], rebuilt["merges"])
    for folder in (tiny.ASSET_DIR, tiny.ORACLE_DIR):
        config = json.loads((folder / "config.json").read_text())
        assert config["num_hidden_layers"] >= 6 and config["model_type"] == "llama"
        assert (folder / "model.safetensors").stat().st_size < 15e6


@pytest.fixture(scope="module")
def bench(entangled_bench):
    return entangled_bench()


def test_the_shipped_model_knows_both_domains(bench):
    model, tokenizer = tiny.load()
    forget_domain = [f for f in bench.facts if f.domain == "forget"]
    assert accuracy(model, tokenizer, bench.questions(forget_domain)) >= 0.95
    assert accuracy(model, tokenizer, bench.questions(bench.retain_facts())) >= 0.95


def test_the_oracle_never_learned_the_default_forget_facts(bench):
    model, tokenizer = tiny.load(tiny.ORACLE_DIR)
    forget = bench.forget_facts()
    removed = set(forget)
    kept_forget = [f for f in bench.facts if f.domain == "forget" and f not in removed]
    assert accuracy(model, tokenizer, bench.questions(forget)) <= 0.25 + 0.1
    assert accuracy(model, tokenizer, bench.questions(kept_forget)) >= 0.95
    assert accuracy(model, tokenizer, bench.questions(bench.retain_facts())) >= 0.95
