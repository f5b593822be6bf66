"""eval/suite.py's evaluate() with an oracle, and the relearning attack it runs, on the shipped
tiny model (a few attack steps, so each evaluation takes about a second).

The stand-in oracle is a randomly initialised model of the same architecture and tokenizer:
it knows no fact, as a model never trained on the forget set knows none of the forget facts."""

import copy
import json
import random

import pytest
import torch
from scipy.stats import ks_2samp

from unlearn_kernels.data import entangled
from unlearn_kernels.eval import oracle as oracle_metrics
from unlearn_kernels.eval.multiple_choice import accuracy, evaluate_multiple_choice
from unlearn_kernels.eval.relearn import DEFAULT_LRS, relearn_curve, relearn_curves
from unlearn_kernels.eval.suite import Split, compare, evaluate, measure
from unlearn_kernels.models import tiny

LAYER, STEPS = 2, 3
KEYS = {"forget_acc", "retain_acc", "shared_retain_acc", "heldout_acc", "relearn_acc", "relearn_best_lr",
        "relearn_curve", "relearn_accs", "relearn_curves", "probe_acc", "mia_auc", "mia_aucs",
        "forget_log_truth_ratios", "settings",
        "oracle_forget_acc", "oracle_retain_acc", "oracle_heldout_acc", "oracle_relearn_acc", "oracle_relearn_accs",
        "oracle_probe_acc", "oracle_mia_auc", "forget_quality", "forget_quality_ks", "base_heldout_acc",
        "recovery", "recovery_max", "recovery_note"}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, tokenizer = tiny.load()
    split = Split.from_benchmark(entangled.generate(0.25))
    stand_in = tiny.build_model(tokenizer, seed=1).eval()
    return model, tokenizer, split, stand_in, measure(stand_in, tokenizer, split, LAYER, STEPS)


def test_holdout_texts_are_the_forget_sentences_with_a_wrong_value():
    bench = entangled.generate(0.25)
    split = Split.from_benchmark(bench)
    corpus = set(bench.corpus())
    assert len(split.holdout_texts) == len(split.forget_texts)
    assert not corpus & set(split.holdout_texts)
    for member, nonmember in zip(split.forget_texts, split.holdout_texts):
        changed = [(a, b) for a, b in zip(member.split(" "), nonmember.split(" ")) if a != b]
        assert len(member.split(" ")) == len(nonmember.split(" ")) and len(changed) == 1


def naive_relearn_curve(model, tokenizer, texts, questions, steps, every, lr, batch_size=8, seed=0):
    """The attack as written down: tokenise every batch, full AdamW fine-tuning, evaluate."""
    attacked = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(attacked.parameters(), lr=lr)
    rng = random.Random(seed)
    curve = [(0, evaluate_multiple_choice(attacked, tokenizer, questions)["acc"])]
    for step in range(1, steps + 1):
        attacked.train()
        enc = tokenizer(rng.sample(texts, min(batch_size, len(texts))), return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = attacked(**enc, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == steps:
            curve.append((step, evaluate_multiple_choice(attacked, tokenizer, questions)["acc"]))
    return curve


def test_relearning_matches_the_attack_written_out(setup):
    model, tokenizer, split, _, _ = setup
    damaged = copy.deepcopy(model)
    with torch.no_grad():
        damaged.model.layers[1].mlp.down_proj.weight.zero_()   # so that the attack has something to do
    want = naive_relearn_curve(damaged, tokenizer, split.attack_texts, split.heldout_questions, 6, 3, 1e-3)
    assert relearn_curve(damaged, tokenizer, split.attack_texts, split.heldout_questions, steps=6, every=3,
                         lr=1e-3) == want
    curves = relearn_curves(damaged, tokenizer, split.attack_texts, split.heldout_questions, lrs=(1e-3, 1e-4),
                            steps=6, every=3)
    assert curves[1e-3] == want and curves[1e-4][0] == want[0]
    with pytest.raises(ValueError, match="repeated"):
        relearn_curves(model, tokenizer, split.attack_texts, split.heldout_questions, lrs=(1e-3, 1e-3))
    with pytest.raises(ValueError, match="list of attack texts"):
        relearn_curves(model, tokenizer, "one text", split.heldout_questions)


def test_evaluate_puts_the_oracle_next_to_the_model(setup):
    model, tokenizer, split, stand_in, oracle = setup
    result = evaluate(model, tokenizer, split, LAYER, STEPS, oracle=oracle, base=model)
    assert set(result) == KEYS
    json.dumps(result, sort_keys=True)          # results.json takes it as it is
    # the model's own numbers against the evaluator
    assert result["forget_acc"] == accuracy(model, tokenizer, split.forget_questions)
    assert result["heldout_acc"] == accuracy(model, tokenizer, split.heldout_questions)
    assert set(result["relearn_accs"]) == set(DEFAULT_LRS)
    assert result["relearn_accs"] == {lr: c[-1][1] for lr, c in result["relearn_curves"].items()}
    assert result["relearn_acc"] == max(result["relearn_accs"].values())
    assert result["relearn_curve"] == result["relearn_curves"][result["relearn_best_lr"]]
    assert result["mia_auc"] == result["mia_aucs"]["min_k"] and result["mia_auc"] > 0.8  # the shipped model: 0.88
    # the oracle's, the forget quality and the recovery from them
    for key in ("forget_acc", "retain_acc", "heldout_acc", "relearn_acc", "relearn_accs", "probe_acc", "mia_auc"):
        assert result[f"oracle_{key}"] == oracle[key]
    assert result["oracle_forget_acc"] < 0.5
    ks = ks_2samp(result["forget_log_truth_ratios"], oracle["forget_log_truth_ratios"])
    assert (result["forget_quality"], result["forget_quality_ks"]) == (ks.pvalue, ks.statistic)
    assert result["forget_quality"] < 1e-6      # the shipped model knows the facts; the stand-in does not
    gap = result["heldout_acc"] - oracle["heldout_acc"]
    assert result["base_heldout_acc"] == result["heldout_acc"]
    assert result["recovery"] == pytest.approx(
        {lr: (result["relearn_accs"][lr] - oracle["relearn_accs"][lr]) / gap for lr in DEFAULT_LRS}, abs=1e-12)
    assert result["recovery_max"] == max(result["recovery"].values()) and result["recovery_note"] is None


def test_the_oracle_against_itself_and_as_a_model(setup):
    model, tokenizer, split, stand_in, oracle = setup
    base = evaluate(model, tokenizer, split, LAYER, STEPS)     # no oracle: its keys are None
    assert base["recovery_note"] == "no oracle given" and base["forget_quality"] is None
    assert set(base) == KEYS and all(base[k] is None for k in KEYS if k.startswith(("oracle_", "forget_quality"))
                                     or k in ("base_heldout_acc", "recovery", "recovery_max"))
    itself = compare(oracle, oracle, base)
    assert itself["forget_quality"] == 1.0 and itself["forget_quality_ks"] == 0.0
    assert itself["recovery"] == {lr: 0.0 for lr in DEFAULT_LRS}
    # the oracle as a model is measured as its results were, and the base's held-out accuracy too
    assert evaluate(stand_in, tokenizer, split, LAYER, STEPS, oracle=stand_in, base=model) == itself
    no_base = compare(oracle, oracle)
    assert no_base["recovery"] is None and no_base["recovery_note"] == "no base model given"
    # a "base" that knows no more than the oracle: recovery is refused with its reason
    empty = compare(oracle, oracle, oracle)
    assert empty["recovery"] is None and "nothing measurable was removed" in empty["recovery_note"]


def test_evaluate_refuses_results_of_other_settings(setup):
    model, tokenizer, split, _, oracle = setup
    other = Split.from_benchmark(entangled.generate(0.0))
    with pytest.raises(ValueError, match="forget_questions, heldout_questions"):
        evaluate(model, tokenizer, other, LAYER, STEPS, oracle=oracle)
    with pytest.raises(ValueError, match="relearn_steps"):
        evaluate(model, tokenizer, split, LAYER, STEPS + 1, oracle=oracle)
    with pytest.raises(ValueError, match="lack"):
        evaluate(model, tokenizer, split, LAYER, STEPS, oracle={"forget_acc": 0.25})
    with pytest.raises(TypeError, match="a model or a dict"):
        evaluate(model, tokenizer, split, LAYER, STEPS, oracle=[0.25])
    empty = Split([], split.retain_questions, [], split.retain_texts, split.attack_texts,
                  split.heldout_questions, split.probe_train_questions, [])
    with pytest.raises(ValueError, match="no forget or no retain questions"):
        evaluate(model, tokenizer, empty, LAYER, STEPS)


def test_recovery_of_a_hidden_model_uses_the_base_and_the_oracle(setup):
    """An "unlearned" model whose held-out knowledge is only hidden (the shipped model with
    layer 1's MLP output zeroed): recovery is the direct formula from the four accuracies."""
    model, tokenizer, split, _, oracle = setup
    hidden = copy.deepcopy(model)
    with torch.no_grad():
        hidden.model.layers[1].mlp.down_proj.weight.zero_()
    result = evaluate(hidden, tokenizer, split, LAYER, STEPS, oracle=oracle, base=model)
    base = accuracy(model, tokenizer, split.heldout_questions)
    want, note = oracle_metrics.recovery_by_lr(result["relearn_accs"], oracle["relearn_accs"], base,
                                               oracle["heldout_acc"])
    assert result["base_heldout_acc"] == base and result["recovery"] == want and note is None
