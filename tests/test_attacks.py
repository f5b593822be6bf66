"""The attack suite (``eval.attacks``): RTT equals a plain fine-tuning loop written from its
definition, the cosine schedule follows its formula, LoRA trains only its adapters, the retain
attack trains on the retain texts, the worst attack is the highest curve, and the model attacked
is never changed."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from unlearn_kernels.data import entangled
from unlearn_kernels.errors import UserError
from unlearn_kernels.eval import attacks
from unlearn_kernels.eval.attacks import Attack, attack_curve, attack_suite, rtt
from unlearn_kernels.eval.multiple_choice import evaluate_multiple_choice
from unlearn_kernels.models import tiny


@pytest.fixture(scope="module")
def setup():
    """The oracle (never trained on the forget facts): what an attack teaches it shows."""
    model, tokenizer = tiny.load(tiny.ORACLE_DIR)
    bench = entangled.generate(0.25)
    facts = bench.forget_facts()
    return model, tokenizer, bench.corpus(facts[::2]), bench.corpus(bench.retain_facts()), bench.questions(facts[1::2])


def plain_rtt(model, tokenizer, texts, questions, lr, steps, every, batch_size, seed):
    """RTT from its definition: AdamW on every weight, the causal-LM loss of ``batch_size``
    texts drawn by random.Random(seed) per step, padded on the right (labels -100 on padding)."""
    torch.manual_seed(seed)
    m = copy.deepcopy(model)
    m.requires_grad_(True)
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    rng = random.Random(seed)
    rows = tokenizer(list(texts))["input_ids"]
    acc = lambda: evaluate_multiple_choice(m, tokenizer, questions)["acc"]   # noqa: E731
    curve = [(0, acc())]
    for step in range(1, steps + 1):
        m.train()
        picked = [rows[i] for i in rng.sample(range(len(rows)), min(batch_size, len(rows)))]
        width = max(map(len, picked))
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in picked])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in picked])
        loss = m(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            curve.append((step, acc()))
    return curve


def test_rtt_is_plain_fine_tuning_and_leaves_the_model(setup):
    model, tokenizer, texts, _, questions = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ours = attack_curve(model, tokenizer, rtt(1e-3, steps=8), texts, questions, every=3, batch_size=4, seed=3)
    assert [s for s, _ in ours] == [0, 3, 6, 8]
    assert ours == plain_rtt(model, tokenizer, texts, questions, 1e-3, 8, 3, 4, 3)
    assert len({a for _, a in ours}) > 2             # the attack moved the accuracy, step by step
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_cosine_schedule_follows_its_formula():
    attack = Attack("long", 1e-3, 40, schedule="cosine", warmup=0.1)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=attack.lr)
    scheduler = attacks._scheduler(optimizer, attack)
    seen = []
    for _ in range(attack.steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warm = 4
    want = [attack.lr * t / warm if t < warm else
            attack.lr * 0.5 * (1 + math.cos(math.pi * (t - warm) / (attack.steps - warm))) for t in range(attack.steps)]
    assert seen == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert seen[0] == 0 and max(seen) == pytest.approx(attack.lr)


def test_lora_trains_only_its_adapters(setup, monkeypatch):
    pytest.importorskip("peft")
    model, tokenizer, texts, _, questions = setup
    trained = {}
    real = attacks._with_lora

    def spy(m, rank):
        wrapped = real(m, rank)
        trained["names"] = [n for n, p in wrapped.named_parameters() if p.requires_grad]
        trained["base"] = {n: p.detach().clone() for n, p in wrapped.named_parameters() if not p.requires_grad}
        trained["model"] = wrapped
        return wrapped

    monkeypatch.setattr(attacks, "_with_lora", spy)
    curve = attack_curve(model, tokenizer, Attack("lora", 1e-2, 4, lora_rank=4), texts, questions, every=4)
    assert trained["names"] and all("lora_" in n for n in trained["names"])
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(trained["names"]) == 2 * (len(linear) - 1)         # A and B on every linear layer but the head
    after = dict(trained["model"].named_parameters())
    assert all(torch.equal(after[n], v) for n, v in trained["base"].items())   # frozen weights stay
    assert [s for s, _ in curve] == [0, 4]


def test_the_suite_reports_every_attack_and_the_worst(setup, monkeypatch):
    model, tokenizer, texts, retain, questions = setup
    seen = {}
    real = attacks.attack_curve

    def spy(m, tok, attack, train, heldout, **kw):
        seen[attack.name] = train
        return real(m, tok, attack, train, heldout, **kw)

    monkeypatch.setattr(attacks, "attack_curve", spy)
    suite = (rtt(1e-5, 2), rtt(1e-3, 2), Attack("long", 1e-3, 4, schedule="cosine", warmup=0.25),
             Attack("retain", 1e-3, 2, data="retain"))
    result = attack_suite(model, tokenizer, texts, retain, questions, attacks=suite, every=2, batch_size=4)
    assert list(result["attacks"]) == [a.name for a in suite]
    assert seen["retain"] is retain and seen["rtt@0.001"] is texts
    best = max(r["max_acc"] for r in result["attacks"].values())
    assert result["attacks"][result["worst"]]["max_acc"] == best
    assert result["initial_acc"] == evaluate_multiple_choice(model, tokenizer, questions)["acc"]
    assert all(r["curve"][0] == (0, result["initial_acc"]) for r in result["attacks"].values())


@pytest.mark.parametrize("attack, message", [
    (Attack("x", 0.0, 3), "lr > 0"),
    (Attack("x", 1e-3, -1), "steps >= 0"),
    (Attack("x", 1e-3, 3, warmup=1.0), "warmup"),
    (Attack("x", 1e-3, 3, lora_rank=0), "lora_rank"),
])
def test_bad_attacks_are_refused(setup, attack, message):
    model, tokenizer, texts, _, questions = setup
    with pytest.raises(UserError, match=message):
        attack_curve(model, tokenizer, attack, texts, questions)


def test_bad_suites_are_refused(setup):
    model, tokenizer, texts, retain, questions = setup
    with pytest.raises(UserError, match="repeat"):
        attack_suite(model, tokenizer, texts, retain, questions, attacks=(rtt(1e-3), rtt(1e-3)))
    with pytest.raises(UserError, match="list of texts"):
        attack_curve(model, tokenizer, rtt(1e-3), "one string", questions)
