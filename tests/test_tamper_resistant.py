"""TAR (methods/tar.py): its Adam, its entropy, one outer step's gradient against a hand-written
torch computation, bad settings, what fit changes, and resuming."""

import copy
import signal

import pytest
import torch
from scipy.stats import entropy as scipy_entropy

from unlearn_kernels.data import entangled
from unlearn_kernels.methods import TAR, registry
from unlearn_kernels.methods.checkpoint import Checkpointer, RunInterrupted
from unlearn_kernels.methods.tar import adam_update, entropy

pytest.importorskip("transformers")
SMALL = dict(update=["layers.1.mlp.*"], lr=1e-3, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def base(shipped):
    return shipped()


@pytest.fixture(scope="module")
def texts():
    bench = entangled.generate(0.25)
    return bench.corpus(bench.forget_facts()), bench.corpus(bench.retain_facts())


def fresh(base):
    model, tokenizer = base
    return copy.deepcopy(model), tokenizer


def test_adam_update_is_torch_adam():
    torch.manual_seed(0)
    start = {"a": torch.randn(5, 3), "b": torch.randn(7)}
    grads = [{n: torch.randn_like(w) for n, w in start.items()} for _ in range(3)]
    reference = {n: w.clone().requires_grad_(True) for n, w in start.items()}
    optimizer = torch.optim.Adam(list(reference.values()), lr=3e-3)
    weights, state = dict(start), {}
    for step, g in enumerate(grads, 1):
        for n, p in reference.items():
            p.grad = g[n].clone()
        optimizer.step()
        weights = adam_update(weights, g, state, 3e-3, step)
    for n in start:
        torch.testing.assert_close(weights[n], reference[n].detach(), rtol=1e-6, atol=1e-7)


def test_entropy_is_the_masked_mean_of_scipy_entropies():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 11)
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
    probs = torch.softmax(logits[:, :-1].double(), -1).numpy()
    # targets 1..T-1 that are not padding: row 0 all four, row 1 the first two
    expected = [scipy_entropy(probs[0, t]) for t in range(4)] + [scipy_entropy(probs[1, t]) for t in range(2)]
    assert float(entropy(logits, batch)) == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def _plain_nll(model, batch):
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss


def _plain_entropy(model, batch):
    logp = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1], -1)
    mask = batch["attention_mask"][:, 1:].float()
    return (-(logp.exp() * logp).sum(-1) * mask).sum() / mask.sum()


@pytest.mark.parametrize("kind", ["nll", "entropy"])
def test_one_outer_step_gradient_by_hand(base, texts, kind):
    """∇L = ∇_S[−H(f)] + w_t · (1/K) Σ_k ∇_S T(f; θ_k) + γ ∇_S NLL(r), with θ_k from K steps of
    torch.optim.Adam on the attack batches, written out with plain torch and HF's own loss."""
    model, tokenizer = fresh(base)
    K, rate, w_t, gamma = 2, 2e-3, 0.7, 1.3
    method = TAR(model, tokenizer, adversary_steps=K, adversary_lrs=(rate, rate), tamper_loss=kind,
                 tamper_points=0, tamper_weight=w_t, retain_weight=gamma, **SMALL)
    forget, retain = texts
    f, r = next(method.batches(forget)), next(method.batches(retain, 1))
    attack = method.batches(forget, 3)
    attack_batches = [next(attack) for _ in range(K)]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in method.params.values():
        p.requires_grad_(True)
    method.setup(forget, retain)
    losses = method.loss(f, r, 0)
    sum(losses.values()).backward()
    got = {n: p.grad.clone() for n, p in method.params.items()}

    reference = copy.deepcopy(base[0])
    selected = {n: p for n, p in reference.named_parameters() if n in method.params}
    for p in reference.parameters():
        p.requires_grad_(False)
    for p in selected.values():
        p.requires_grad_(True)
    direct = -_plain_entropy(reference, f) + gamma * _plain_nll(reference, r)
    expected = dict(zip(selected, torch.autograd.grad(direct, list(selected.values()))))

    attacked = copy.deepcopy(base[0])
    for p in attacked.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(attacked.parameters(), lr=rate)
    post = []
    for batch in attack_batches:
        optimizer.zero_grad()
        _plain_nll(attacked, batch).backward()
        optimizer.step()
        tamper = -_plain_nll(attacked, f) if kind == "nll" else -_plain_entropy(attacked, f)
        post.append(float(tamper.detach()))
        grads = torch.autograd.grad(tamper, [attacked.get_parameter(n) for n in selected])
        for n, g in zip(selected, grads):
            expected[n] = expected[n] + w_t * g / K
    for n in selected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6)
    assert float(losses["tamper"].detach()) == pytest.approx(w_t * sum(post) / K, rel=1e-5)


def test_tamper_points_read_only_the_last_attack_steps(base, texts):
    """Same seed, same attack: the trajectory means over K = 3 and K = 2 steps give the read
    after step 3 alone (3·mean₃ − 2·mean₂), which is what tamper_points=1 returns."""
    model, tokenizer = base
    forget, retain = texts
    reads = {}
    for steps, points in ((3, 0), (3, 1), (2, 0)):
        method = TAR(copy.deepcopy(model), tokenizer, adversary_steps=steps, adversary_lrs=(1e-3, 1e-3),
                     tamper_points=points, **SMALL)
        method.setup(forget, retain)
        _, reads[steps, points] = method.post_attack_gradients(next(method.batches(forget)))
    assert reads[3, 1] == pytest.approx(3 * reads[3, 0] - 2 * reads[2, 0], rel=1e-4)


@pytest.mark.parametrize("settings, message", [
    (dict(adversary_steps=-1), "adversary_steps must be >= 0"),
    (dict(adversary_lrs=(1e-3, 1e-4)), "0 < low <= high"),
    (dict(adversary_lrs=(0.0, 1e-3)), r"adversary_lrs must be > 0, got \(0.0, 0.001\)"),
    (dict(tamper_loss="kl"), "tamper_loss must be nll or entropy, got 'kl'"),
    (dict(adversary_steps=2, tamper_points=3), "tamper_points must be in 0..adversary_steps=2"),
    (dict(tamper_weight=-1.0), "tamper_weight must be >= 0"),
    (dict(retain_weight=-1.0), "retain_weight must be >= 0"),
    (dict(adversary_update=["layers.9.mlp.*"]), "no parameter matches"),
    (dict(checkpointing=True), "TAR does not use the setting checkpointing"),   # it would fail mid-attack
])
def test_bad_settings_are_refused(base, settings, message):
    model, tokenizer = base
    with pytest.raises(ValueError, match=message):
        TAR(model, tokenizer, **{**SMALL, **settings})


def test_auto_attack_rate_is_three_times_the_unlearning_rate(base):
    model, tokenizer = base
    method = TAR(model, tokenizer, lr=2e-4, progress=False)
    assert method.config.adversary_lrs == (6e-4, 6e-4) and method.chosen["adversary_lrs"] == (6e-4, 6e-4)
    assert TAR(model, tokenizer, lr=2e-4, adversary_lrs="1e-4,1e-3").config.adversary_lrs == (1e-4, 1e-3)


def test_fit_changes_only_the_selected_weights(base, texts):
    model, tokenizer = fresh(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = registry["TAR"](model, tokenizer, steps=2, adversary_steps=2, **SMALL).fit(*texts)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= set(method.params)
    assert set(method.report()["updated_parameters"]) == changed
    assert [sorted(h) for h in method.history] == [["forget", "retain", "step", "tamper"]] * 2
    assert not any(p.requires_grad for p in model.parameters())


class _KilledAfter(Checkpointer):
    def due(self, step):
        if step == 1:
            signal.raise_signal(signal.SIGTERM)
        return super().due(step)


def test_a_resumed_run_equals_an_uninterrupted_one(base, texts, tmp_path):
    settings = dict(steps=4, adversary_steps=2, adversary_lrs=(1e-4, 1e-3), **SMALL)
    reference = TAR(*fresh(base), **settings).fit(*texts)
    with pytest.raises(RunInterrupted):
        TAR(*fresh(base), **settings).fit(*texts, checkpoint=_KilledAfter(tmp_path / "ckpt", every=0))
    resumed = TAR(*fresh(base), **settings).fit(*texts, checkpoint=Checkpointer(tmp_path / "ckpt", every=2),
                                                resume=True)
    for name, value in reference.params.items():
        assert torch.equal(value, resumed.params[name]), name
    assert resumed.history == reference.history
