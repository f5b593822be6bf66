"""The evaluator on its own: prompts, metrics, shared-context scoring, batching, dtypes, errors.

Agreement with lm-evaluation-harness itself is tests/test_lm_eval_agreement.py; here the
shared-context path is checked against plain full forwards on several architectures, and the
metrics against their definitions.
"""

import math
import statistics

import pytest
import torch

from unlearn_kernels.data import entangled
from unlearn_kernels.data.loaders import MCQuestion
from unlearn_kernels.data import prompts
from unlearn_kernels.eval.multiple_choice import (build_requests, evaluate_multiple_choice, mean_stderr,
                                                  score_requests)
from unlearn_kernels.eval.relearn import relearn_attack


@pytest.fixture(scope="module")
def shipped(shipped):
    """This module's copy of the shipped model (conftest's ``shipped``)."""
    return shipped()


def bench_questions(n=None):
    bench = entangled.generate(0.25)
    qs = bench.questions(bench.forget_facts()) + bench.questions(bench.retain_facts())
    return qs[:n] if n else qs


def multi_token_questions():
    """Choices of one to four words (several tokens each), none of them a toxin the model knows."""
    words = ["harp", "in hiding", "the secret lab", "is known for the", "otter"]
    return [MCQuestion(f"what is the toxin of {name} ?", words[i % 5:] + words[:i % 5], i % 5)
            for i, name in enumerate(entangled.generate(0.25).names()[:10])]


def test_prompts_are_lm_evals_templates():
    assert prompts.cloze_context("what ?") == "Question: what ?\nAnswer:"
    assert prompts.mmlu_context("  what ?\n", ["x", "y", "z"], "biology") == (
        "The following are multiple choice questions (with answers) about biology.\n\n"
        "what ?\nA. x\nB. y\nC. z\nAnswer:")
    ctx, conts, norms = prompts.request("q", ["a", "bb"], "cloze")
    assert (conts, norms) == ([" a", " bb"], ["a", "bb"])
    assert prompts.request("q", ["a", "bb"], "mmlu")[1:] == ([" A", " B"], ["A", "B"])
    with pytest.raises(ValueError, match="at most 26 choices"):
        prompts.mmlu_context("q", ["c"] * 27)
    with pytest.raises(ValueError, match="format"):
        prompts.request("q", ["a", "b"], "mc")


def random_model(family: str, vocab: int):
    import transformers as tf

    torch.manual_seed(0)
    configs = {
        "llama": tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
        "gpt2": tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64),
        "qwen2": tf.Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
        "opt": tf.OPTConfig(vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=64, word_embed_proj_dim=32),
    }
    return tf.AutoModelForCausalLM.from_config(configs[family]).eval()


@pytest.mark.parametrize("family", ["shipped", "llama", "gpt2", "qwen2", "opt"])
@pytest.mark.parametrize("format", ["cloze", "mmlu"])
def test_shared_context_equals_full_forwards(shipped, family, format):
    model, tokenizer = shipped
    if family != "shipped":
        model = random_model(family, len(tokenizer))
    qs = multi_token_questions() + bench_questions(12)
    requests = build_requests(tokenizer, qs, format)
    assert any(len(c) > 1 for r in requests for c in r.continuation_ids) or format == "mmlu"
    stats, none = {}, {}
    shared = score_requests(model, tokenizer, requests, batch_size=7, share_context=True, stats=stats)
    full = score_requests(model, tokenizer, requests, batch_size=7, share_context=False, stats=none)
    assert stats["shared_batches"] == stats["batches"] > 1 and none["shared_batches"] == 0
    for a, b in zip(shared, full):
        assert a == pytest.approx(b, abs=2e-5)


def test_the_sharing_check_runs_once_per_model_and_its_verdict_sticks(shipped, monkeypatch):
    """The first shared batch of a model is checked against full forwards once; later evaluations
    of the same model object (its weights changed in between, as in a run) trust the verdict, a
    new model object is checked again, and a failed check keeps that model on full forwards."""
    from unlearn_kernels.eval import multiple_choice as mc

    tokenizer = shipped[1]
    qs = multi_token_questions() + bench_questions(12)
    requests = build_requests(tokenizer, qs, "cloze")
    calls = []
    full = mc._Scorer.full
    monkeypatch.setattr(mc._Scorer, "full", lambda self, pairs: calls.append(len(pairs)) or full(self, pairs))

    model = random_model("llama", len(tokenizer))
    first = score_requests(model, tokenizer, requests, batch_size=7)
    assert len(calls) == 1                              # the check: one batch of full forwards
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    stats = {}
    again = score_requests(model, tokenizer, requests, batch_size=7, stats=stats)
    assert len(calls) == 1 and stats["shared_batches"] == stats["batches"] > 1   # trusted, still shared
    assert again != first                                # the new weights were scored
    score_requests(random_model("llama", len(tokenizer)), tokenizer, requests, batch_size=7)
    assert len(calls) == 2                               # another model object: checked again

    other = random_model("gpt2", len(tokenizer))
    mc._SHARING_VERDICTS[other] = {(torch.float32, "cpu"): False}
    stats = {}
    score_requests(other, tokenizer, requests, batch_size=7, stats=stats)
    assert stats["shared_batches"] == 0 and len(calls) == 2 + stats["batches"]


def test_batch_size_and_order_do_not_change_scores(shipped):
    model, tokenizer = shipped
    qs = multi_token_questions() + bench_questions(20)
    one = evaluate_multiple_choice(model, tokenizer, qs, batch_size=1, return_details=True)
    many = evaluate_multiple_choice(model, tokenizer, qs[::-1], batch_size=64, return_details=True)
    for a, b in zip(one["samples"], many["samples"][::-1]):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], rel=1e-6, abs=1e-5)   # fp32 rounding


def test_metrics_follow_their_definitions(shipped):
    model, tokenizer = shipped
    qs = multi_token_questions() + bench_questions(30)
    r = evaluate_multiple_choice(model, tokenizer, qs, return_details=True)
    acc, acc_norm = [], []
    for q, s in zip(qs, r["samples"]):
        ll = s["loglikelihoods"]
        best = max(range(len(ll)), key=lambda i: (ll[i], -i))
        norm = [v / len(c) for v, c in zip(ll, q.choices)]
        best_norm = max(range(len(ll)), key=lambda i: (norm[i], -i))
        acc.append(float(best == q.answer))
        acc_norm.append(float(best_norm == q.answer))
    assert r["acc"] == sum(acc) / len(qs) and r["acc_norm"] == sum(acc_norm) / len(qs)
    assert r["acc"] != r["acc_norm"]  # the multi-word choices make the normalisation matter
    assert r["acc_stderr"] == pytest.approx(statistics.stdev(acc) / math.sqrt(len(qs)), rel=1e-12)
    assert r["acc_norm_stderr"] == pytest.approx(statistics.stdev(acc_norm) / math.sqrt(len(qs)), rel=1e-12)
    assert math.isnan(mean_stderr([1.0]))


def test_ties_go_to_the_lowest_index(shipped):
    model, tokenizer = shipped
    same = [MCQuestion("what is the pet of kalo ?", ["otter", "otter", "otter"], answer) for answer in range(3)]
    r = evaluate_multiple_choice(model, tokenizer, same, return_details=True)
    assert [s["pred"] for s in r["samples"]] == [0, 0, 0]
    assert r["acc"] == pytest.approx(1 / 3)


def test_the_shipped_model_knows_its_facts_in_the_cloze_format(shipped):
    model, tokenizer = shipped
    r = evaluate_multiple_choice(model, tokenizer, bench_questions(), format="cloze")
    assert r["acc"] >= 0.95 and r["n"] == 30 * 6 + 52 * 6   # forget + retain entities x 6 attributes


def test_low_precision_runs_and_agrees(shipped):
    model, tokenizer = shipped
    qs = bench_questions(40)
    fp32 = evaluate_multiple_choice(model, tokenizer, qs, return_details=True)
    bf16 = evaluate_multiple_choice(model.to(torch.bfloat16), tokenizer, qs, return_details=True)
    model.to(torch.float32)
    assert abs(bf16["acc"] - fp32["acc"]) <= 0.05
    worst = max(abs(a - b) for s, t in zip(fp32["samples"], bf16["samples"])
                for a, b in zip(s["loglikelihoods"], t["loglikelihoods"]))
    assert worst < 1.0


@pytest.mark.parametrize("bad, message", [
    ([], "empty"),
    ([MCQuestion("q", ["a", "b"], True)], "answer"),
    ([MCQuestion("q", ["a", "b"], 2)], "answer"),
    ([MCQuestion("q", ["a", ""], 0)], "non-empty"),
    ([MCQuestion("q", ["a"], 0)], "at least two"),
])
def test_bad_questions_raise(shipped, bad, message):
    with pytest.raises(ValueError, match=message):
        evaluate_multiple_choice(*shipped, bad)


def test_relearn_attack_reports_every_rate_and_leaves_the_model(shipped):
    model, tokenizer = shipped
    bench = entangled.generate(0.25)
    facts = bench.forget_facts()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = relearn_attack(model, tokenizer, bench.corpus(facts[::2]), bench.questions(facts[1::2]),
                            lrs=(1e-4, 1e-3), steps=4, every=2, batch_size=4)
    assert set(result["curves"]) == {1e-4, 1e-3}
    assert all([s for s, _ in c] == [0, 2, 4] for c in result["curves"].values())
    base = evaluate_multiple_choice(model, tokenizer, bench.questions(facts[1::2]))["acc"]
    assert result["initial_acc"] == base
    assert result["max_acc"] == max(a for c in result["curves"].values() for _, a in c)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="lrs"):
        relearn_attack(model, tokenizer, ["a"], bench.questions(facts[:1]), lrs=())
