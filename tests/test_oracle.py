"""Forget quality, recovery and the truth ratio (eval/oracle.py, eval/scores.py) against direct
computations: the ratio by plain full forwards and math, the KS statistic from empirical
CDFs, its p-value from the closed form for fully separated samples."""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unlearn_kernels.data import entangled
from unlearn_kernels.eval import oracle, scores
from unlearn_kernels.eval.multiple_choice import accuracy
from unlearn_kernels.models import tiny


def direct_log_truth_ratio(ll, counts, answer):
    per_token = [v / n for v, n in zip(ll, counts)]
    others = [math.exp(v) for i, v in enumerate(per_token) if i != answer]
    return math.log(sum(others) / len(others)) - per_token[answer]


def test_log_truth_ratio_is_the_formula():
    rng = random.Random(0)
    lls, counts, answers = [], [], []
    for _ in range(20):
        k = rng.randint(2, 5)
        counts.append([rng.randint(1, 4) for _ in range(k)])
        lls.append([-rng.uniform(0.1, 30.0) for _ in range(k)])
        answers.append(rng.randrange(k))
    got = scores.log_truth_ratios(lls, counts, answers)
    want = [direct_log_truth_ratio(*row) for row in zip(lls, counts, answers)]
    assert np.allclose(got, want, rtol=1e-12, atol=1e-12)
    # per-token means equal on all choices: R = 1; the same shift on every choice cancels
    assert scores.log_truth_ratios([[-2.0, -4.0, -6.0]], [[1, 2, 3]], [0])[0] == pytest.approx(0.0, abs=1e-12)
    shifted = [[v - 7.0 * n for v, n in zip(ll, c)] for ll, c in zip(lls, counts)]
    assert np.allclose(scores.log_truth_ratios(shifted, counts, answers), got, atol=1e-9)


@pytest.mark.parametrize("args, message", [
    (([[-1.0, -2.0]], [[1, 1]], [0, 1]), "differ in length"),
    (([], [], []), "no questions"),
    (([[-1.0]], [[1]], [0]), ">= 2 choices"),
    (([[-1.0, -2.0]], [[1, 1]], [2]), "answer"),
    (([[-1.0, -2.0]], [[1, 0]], [0]), "token counts"),
    (([[-1.0, float("nan")]], [[1, 1]], [0]), "finite"),
])
def test_log_truth_ratio_refuses_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        scores.log_truth_ratios(*args)


def direct_choice_loglikelihoods(model, tokenizer, question):
    """Context and context + " " + choice encoded on their own, one full forward per choice."""
    context = f"Question: {question.question}\nAnswer:"
    ctx = tokenizer(context)["input_ids"]
    out, counts = [], []
    for choice in question.choices:
        whole = tokenizer(context + " " + choice)["input_ids"]
        cont = whole[len(ctx):]
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
        out.append(sum(float(logp[len(ctx) + t - 1, tok]) for t, tok in enumerate(cont)))
        counts.append(len(cont))
    return out, counts


@pytest.fixture(scope="module")
def bpe_model():
    """A random 2-layer Llama over a byte-level BPE vocabulary: choices of several tokens."""
    bench = entangled.generate(0.25)
    tokenizer = tiny.build_bpe_tokenizer(bench.corpus(), vocab_size=300, with_bos=True)
    model = tiny.build_model(tokenizer, hidden=32, layers=2, seed=3).eval()
    return model, tokenizer, bench.questions(bench.forget_facts())[:12]


def test_scores_match_full_forwards_with_multi_token_choices(bpe_model):
    model, tokenizer, questions = bpe_model
    got = scores.score(model, tokenizer, scores.prepare(tokenizer, questions))
    direct = [direct_choice_loglikelihoods(model, tokenizer, q) for q in questions]
    assert any(max(c) > 1 for _, c in direct), "the BPE choices should span several tokens"
    want = [direct_log_truth_ratio(ll, c, q.answer) for (ll, c), q in zip(direct, questions)]
    assert np.allclose(got["log_truth_ratio"], want, atol=1e-4)
    want_acc = [float(int(np.argmax(ll)) == q.answer) for (ll, _), q in zip(direct, questions)]
    assert got["acc"].tolist() == want_acc
    assert got["acc"].mean() == accuracy(model, tokenizer, questions)


def direct_ks_statistic(x, y):
    grid = np.concatenate([x, y])
    cdf = lambda s: (np.sort(s)[None, :] <= grid[:, None]).mean(1)  # noqa: E731
    return float(np.abs(cdf(x) - cdf(y)).max())


def test_forget_quality_is_the_ks_test():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=40), rng.normal(0.5, 1.0, size=40)
    result = oracle.forget_quality(x, y)
    assert result["ks_statistic"] == pytest.approx(direct_ks_statistic(x, y), abs=1e-12)
    assert result["n"] == 40 and 0 < result["p_value"] < 1
    # fully separated samples of n each: D = 1, exact two-sided p = 2 / C(2n, n)
    separated = oracle.forget_quality(np.arange(8.0), np.arange(8.0) + 100)
    assert separated["ks_statistic"] == 1.0
    assert separated["p_value"] == pytest.approx(2 / math.comb(16, 8), rel=1e-9)
    assert oracle.forget_quality(x, x)["p_value"] == 1.0
    # a monotone map of both samples keeps the p-value (R and log R agree)
    assert oracle.forget_quality(np.exp(x), np.exp(y))["p_value"] == pytest.approx(result["p_value"], rel=1e-12)


@pytest.mark.parametrize("x, y, message", [
    ([], [1.0], "statistics is empty"),
    ([1.0, 2.0], [1.0], "same forget questions"),
    ([1.0, float("inf")], [1.0, 2.0], "non-finite"),
    ("ab", [1.0, 2.0], "not a string"),
])
def test_forget_quality_refuses_bad_input(x, y, message):
    with pytest.raises(ValueError, match=message):
        oracle.forget_quality(x, y)


def test_recovery_is_the_share_of_removed_knowledge_that_comes_back():
    assert oracle.recovery(0.9, 0.3, 1.0, 0.25) == pytest.approx((0.9 - 0.3) / (1.0 - 0.25))
    assert oracle.recovery(0.3, 0.3, 1.0, 0.25) == 0.0
    assert oracle.recovery(0.2, 0.3, 1.0, 0.25) < 0          # not clipped
    assert oracle.recovery(1, 0, 1, 0) == 1.0
    by_lr, note = oracle.recovery_by_lr({1e-4: 0.5, 1e-3: 0.9}, {1e-4: 0.25, 1e-3: 0.4}, 0.95, 0.2)
    assert note is None and by_lr == pytest.approx({1e-4: 0.25 / 0.75, 1e-3: 0.5 / 0.75})


def test_recovery_guards_its_denominator_and_inputs():
    with pytest.raises(ValueError, match="no removed knowledge"):
        oracle.recovery(0.9, 0.3, 0.5, 0.48)
    with pytest.raises(ValueError, match="no removed knowledge"):
        oracle.recovery(0.9, 0.3, 0.3, 0.5)                   # the oracle knows more than the base
    for bad in (1.5, -0.1, float("nan"), True, "0.5", None):
        with pytest.raises(ValueError, match="accuracy in"):
            oracle.recovery(bad, 0.3, 1.0, 0.25)
    with pytest.raises(ValueError, match="min_gap"):
        oracle.recovery(0.9, 0.3, 1.0, 0.25, min_gap=0.0)
    by_lr, note = oracle.recovery_by_lr({1e-3: 0.9}, {1e-3: 0.3}, 0.5, 0.5)
    assert by_lr is None and "nothing measurable was removed" in note
    with pytest.raises(ValueError, match="same learning rates"):
        oracle.recovery_by_lr({1e-3: 0.9}, {1e-4: 0.3}, 1.0, 0.25)
    with pytest.raises(ValueError, match="empty"):
        oracle.recovery_by_lr({}, {}, 1.0, 0.25)


def test_prepare_refuses_an_empty_question_list(bpe_model):
    _, tokenizer, _ = bpe_model
    with pytest.raises(ValueError, match="questions is empty"):
        scores.prepare(tokenizer, [])
