"""Membership-inference scores and PrivLeak (unlearn_kernels.eval.privacy).

The exact values come from a bigram "LM" whose next-token distribution is a fixed table, so
every log-prob, μ, σ and score of a short text is written out here by hand.
"""

import math
import random
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from unlearn_kernels.eval import privacy

# Next-token probabilities of the bigram model over the vocabulary (a, b, c), by previous token.
P = [[0.10, 0.20, 0.70],   # after a
     [0.25, 0.25, 0.50],   # after b
     [0.60, 0.30, 0.10]]   # after c
VOCAB = {"a": 0, "b": 1, "c": 2}


class BigramLM(nn.Module):
    """logits[t] = log P[x_t]: a causal LM whose prediction depends on the previous token only."""

    def __init__(self, probs=P):
        super().__init__()
        self.table = nn.Embedding.from_pretrained(torch.tensor(probs, dtype=torch.float32).log())

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.table(input_ids))


class WordTokenizer:
    """Whitespace tokenizer over VOCAB, optionally prepending a BOS id (as Llama's does)."""

    pad_token_id = 1  # a real id, so scoring a padded position would show

    def __init__(self, bos=None):
        self.bos = bos

    def __call__(self, texts):
        prefix = [] if self.bos is None else [self.bos]
        return {"input_ids": [prefix + [VOCAB[w] for w in t.split()] for t in texts]}


def mu_sigma(row):
    mu = sum(p * math.log(p) for p in row)
    return mu, math.sqrt(sum(p * math.log(p) ** 2 for p in row) - mu * mu)


# "a b c a": token 1 is context; scored: b after a, c after b, a after c.
TEXT = "a b c a"
LP = [math.log(0.2), math.log(0.5), math.log(0.6)]
(MU0, S0), (MU1, S1), (MU2, S2) = mu_sigma(P[0]), mu_sigma(P[1]), mu_sigma(P[2])
Z = [(math.log(0.2) - MU0) / S0, (math.log(0.5) - MU1) / S1, (math.log(0.6) - MU2) / S2]
# by value: LP[0] < LP[1] < LP[2] and Z[0] (≈ −1.149) < Z[2] (≈ 0.689) < Z[1] (= 1.0)


def test_token_stats_by_hand():
    (stats,) = privacy.token_logprob_stats(BigramLM(), WordTokenizer(), [TEXT])
    np.testing.assert_allclose(stats["logprobs"], LP, rtol=1e-6)
    np.testing.assert_allclose(stats["mu"], [MU0, MU1, MU2], rtol=1e-6)
    np.testing.assert_allclose(stats["sigma"], [S0, S1, S2], rtol=1e-5)
    assert abs(Z[1] - 1.0) < 1e-12  # (log .5 − μ)/σ for (¼, ¼, ½) is exactly 1


@pytest.mark.parametrize("k, m", [(0.4, 1), (0.5, 1), (0.7, 2), (0.9, 2), (1.0, 3), (0.01, 1)])  # m = max(1, ⌊3k⌋)
def test_scores_by_hand(k, m):
    scores = privacy.membership_scores(BigramLM(), WordTokenizer(), [TEXT], k=k)
    loss = (LP[0] + LP[1] + LP[2]) / 3                      # −(mean NLL): higher = member-like
    zlib_len = len(zlib.compress(TEXT.encode("utf-8")))
    min_k = {1: LP[0], 2: (LP[0] + LP[1]) / 2, 3: loss}[m]
    min_kpp = {1: Z[0], 2: (Z[0] + Z[2]) / 2, 3: (Z[0] + Z[1] + Z[2]) / 3}[m]
    assert set(scores) == {"loss", "zlib", "min_k", "min_k_plus_plus"}
    assert scores["loss"][0] == pytest.approx(loss, rel=1e-6)
    assert scores["zlib"][0] == pytest.approx(loss / zlib_len, rel=1e-6)
    assert scores["min_k"][0] == pytest.approx(min_k, rel=1e-6)
    assert scores["min_k_plus_plus"][0] == pytest.approx(min_kpp, rel=1e-5)


def test_bos_is_context_not_scored():
    # With BOS = a prepended, "b c a" is the id sequence of "a b c a" and scores the same.
    with_bos = privacy.membership_scores(BigramLM(), WordTokenizer(bos=VOCAB["a"]), ["b c a"])
    plain = privacy.membership_scores(BigramLM(), WordTokenizer(), [TEXT])
    for name in ("loss", "min_k", "min_k_plus_plus"):
        assert with_bos[name][0] == pytest.approx(plain[name][0], rel=1e-6)
    (stats,) = privacy.token_logprob_stats(BigramLM(), WordTokenizer(bos=VOCAB["a"]), ["b c a"])
    assert len(stats["logprobs"]) == 3


def test_padding_not_scored_and_truncation():
    model, tok = BigramLM(), WordTokenizer()
    texts = ["a c", TEXT, "b a c a b c"]
    batched = privacy.token_logprob_stats(model, tok, texts, batch_size=3)
    assert [len(s["logprobs"]) for s in batched] == [1, 3, 5]
    np.testing.assert_allclose(batched[0]["logprobs"], [math.log(0.7)], rtol=1e-6)
    np.testing.assert_allclose(batched[1]["logprobs"], LP, rtol=1e-6)
    (cut,) = privacy.token_logprob_stats(model, tok, [TEXT], max_length=3)
    np.testing.assert_allclose(cut["logprobs"], LP[:2], rtol=1e-6)


def test_training_mode_restored():
    model = BigramLM().train()
    privacy.membership_scores(model, WordTokenizer(), [TEXT])
    assert model.training


def test_mia_auc_separated_and_swapped():
    high = {"loss": np.array([3.0, 4.0, 5.0]), "min_k": np.array([1.0, 2.0])}
    low = {"loss": np.array([0.0, 1.0]), "min_k": np.array([-1.0, 0.5, 0.0])}
    assert privacy.mia_auc(high, low) == {"loss": 1.0, "min_k": 1.0}
    assert privacy.mia_auc(low, high) == {"loss": 0.0, "min_k": 0.0}
    # one of the 2·2 member/non-member pairs is mis-ordered, one tied: (2 + 0.5) / 4
    assert privacy.mia_auc({"s": np.array([1.0, 3.0])}, {"s": np.array([1.0, 2.0])})["s"] == 0.625


def test_privleak_formula():
    # MUSE: AUC_MUSE = 1 − AUC (forget labelled 0); PrivLeak = (AUC_MUSE − ref_MUSE) / ref_MUSE · 100
    assert privacy.privleak(0.9, 0.5) == pytest.approx((0.1 - 0.5) / 0.5 * 100)   # −80: leaks
    assert privacy.privleak(0.25, 0.5) == pytest.approx((0.75 - 0.5) / 0.5 * 100)  # +50: over-unlearned
    assert privacy.privleak(0.6, 0.6) == 0.0
    assert privacy.privleak(1.0, 0.4) == pytest.approx(-100.0)
    assert math.isnan(privacy.privleak(0.7, 1.0))


def test_privacy_report_on_bigram():
    forget = ["a c a c", "c a c", "a c a"]          # likely under P
    holdout = ["b a b", "b b a b", "a b a"]         # unlikely under P
    uniform = BigramLM([[1 / 3] * 3] * 3)
    report = privacy.privacy_report(BigramLM(), WordTokenizer(), forget, holdout, reference_model=uniform)
    assert report["auc"]["loss"] == 1.0 and report["auc"]["min_k"] == 1.0
    assert report["reference_auc"]["loss"] == 0.5  # every text has the same loss under a uniform model
    assert report["privleak"]["loss"] == pytest.approx(-100.0)
    for name in privacy.SCORES:
        assert report["privleak"][name] == pytest.approx(privacy.privleak(report["auc"][name],
                                                                          report["reference_auc"][name]))
    assert (report["n_forget"], report["n_holdout"], report["k"]) == (3, 3, 0.4)
    assert "higher" in report["convention"]
    same = privacy.privacy_report(BigramLM(), WordTokenizer(), forget, holdout, reference_model=BigramLM())
    assert math.isnan(same["privleak"]["loss"])  # a reference with AUC 1 leaves PrivLeak undefined
    assert privacy.privacy_report(BigramLM(), WordTokenizer(), forget, holdout)["privleak"] is None


@pytest.mark.parametrize("call, match", [
    (lambda: privacy.membership_scores(BigramLM(), WordTokenizer(), []), "texts"),
    (lambda: privacy.membership_scores(BigramLM(), WordTokenizer(), TEXT), "texts"),
    (lambda: privacy.membership_scores(BigramLM(), WordTokenizer(), [TEXT, "a", "b c"]), r"texts\[1\]"),
    (lambda: privacy.membership_scores(BigramLM(), WordTokenizer(), [TEXT], k=0), "k must"),
    (lambda: privacy.membership_scores(BigramLM(), WordTokenizer(), [TEXT], k=1.5), "k must"),
    (lambda: privacy.membership_scores(BigramLM(), WordTokenizer(), [TEXT], batch_size=0), "batch_size"),
    (lambda: privacy.token_logprob_stats(BigramLM(), WordTokenizer(), [TEXT], max_length=1), "max_length"),
    (lambda: privacy.mia_auc({}, {}), "member"),
    (lambda: privacy.mia_auc({"loss": np.ones(2)}, {"zlib": np.ones(2)}), "member and nonmember"),
    (lambda: privacy.mia_auc({"loss": np.ones(2)}, {"loss": np.ones(0)}), r"nonmember\['loss'\]"),
    (lambda: privacy.mia_auc({"loss": np.array([1, np.nan])}, {"loss": np.ones(2)}), r"member\['loss'\]"),
    (lambda: privacy.privacy_report(BigramLM(), WordTokenizer(), [], [TEXT]), "forget_texts"),
    (lambda: privacy.privacy_report(BigramLM(), WordTokenizer(), [TEXT], []), "holdout_texts"),
    (lambda: privacy.privacy_report(BigramLM(), WordTokenizer(), [TEXT], [TEXT], k=-1), "k must"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- the shipped model -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    from unlearn_kernels.data import entangled
    from unlearn_kernels.models import tiny

    model, tok = tiny.load()
    bench = entangled.generate(0.25)
    return model, tok, bench


def test_batched_equals_one_at_a_time(shipped):
    model, tok, bench = shipped
    texts = bench.corpus(bench.forget_facts())[::11]   # mixed lengths (7 to 11 words)
    assert len({len(t.split()) for t in texts}) > 1
    one = privacy.membership_scores(model, tok, texts, batch_size=1)
    batched = privacy.membership_scores(model, tok, texts, batch_size=8)
    for name in privacy.SCORES:
        # fp32 noise only: lp − μ of near-certain tokens cancels, hence the absolute tolerance
        np.testing.assert_allclose(batched[name], one[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_training_sentences_are_members(shipped):
    model, tok, bench = shipped
    members = bench.corpus(bench.forget_facts())[::2]
    seen = set(bench.corpus())
    rng = random.Random(0)
    novel = []
    for text in members:   # the same words in a new order, never a training sentence
        words = text.split()
        while " ".join(words) in seen:
            rng.shuffle(words)
        novel.append(" ".join(words))
    auc = privacy.mia_auc(privacy.membership_scores(model, tok, members),
                          privacy.membership_scores(model, tok, novel))
    assert auc["loss"] > 0.9
    assert all(v > 0.5 for v in auc.values()), auc
