"""The loss methods' log-likelihoods (``methods.loss_based.target_logprobs``) equal the plain
formula ``log_softmax(logits).gather(target)`` on the loss tokens, with its gradients: the
per-row op on random logits (odd sizes, fp64/fp32/bf16, no rows, second derivatives), and the
head-on-selected-positions forward on tiny models of every supported family with padding on
either side, rows without a loss token and QA loss masks; models whose head is not a module
called on ``[b, T, d]`` fall back to their full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unlearn_kernels.methods.loss_based import _TargetLogProb, nll, target_logprobs

TOL = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=2e-5, rtol=1e-5),
       torch.bfloat16: dict(atol=1e-5, rtol=1e-5)}      # bf16: the op reduces in fp32 as the reference does


def plain(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``log softmax(z)_y`` straight from the math, in fp32 (fp64 for fp64 inputs)."""
    z = logits.double() if logits.dtype == torch.float64 else logits.float()
    return F.log_softmax(z, dim=-1).gather(-1, target[:, None])[:, 0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, vocab", [(0, 7), (1, 1), (5, 3), (13, 101), (37, 1031)])
def test_target_logprob_equals_log_softmax_gather(dtype, n, vocab):
    g = torch.Generator().manual_seed(n * 1000 + vocab)
    logits = (torch.randn(n, vocab, generator=g, dtype=torch.float64) * 4).to(dtype).requires_grad_(True)
    target = torch.randint(0, vocab, (n,), generator=g)
    weight = torch.randn(n, generator=g, dtype=torch.float64)
    got = _TargetLogProb.apply(logits, target)
    want = plain(logits, target)
    assert got.dtype == want.dtype and got.shape == (n,)
    torch.testing.assert_close(got, want, **TOL[dtype])
    (g_got,) = torch.autograd.grad((got * weight.to(got.dtype)).sum(), logits)
    (g_want,) = torch.autograd.grad((want * weight.to(want.dtype)).sum(), logits)
    assert g_got.dtype == dtype
    grad_tol = TOL[dtype] if dtype != torch.bfloat16 else dict(atol=2e-2, rtol=1e-2)   # one bf16 rounding
    torch.testing.assert_close(g_got, g_want, **grad_tol)


def test_target_logprob_second_derivatives():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 9, (4,), generator=g)
    assert torch.autograd.gradcheck(lambda z: _TargetLogProb.apply(z, target), (logits,))
    assert torch.autograd.gradgradcheck(lambda z: _TargetLogProb.apply(z, target), (logits,))


# --- through models ---------------------------------------------------------------------------
def _families(vocab: int) -> dict:
    from test_architectures import _configs

    return _configs(vocab)


VOCAB = 97
FAMILIES = list(_families(VOCAB))


def _batch(rows: list[int], width: int, side: str, qa: bool, seed: int) -> dict:
    """Token rows of the given lengths padded to ``width`` on ``side``; with ``qa`` a loss mask
    on a random suffix of each row (empty for some)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    loss = torch.zeros_like(ids)
    for i, length in enumerate(rows):
        cols = slice(width - length, width) if side == "left" else slice(0, length)
        ids[i, cols] = torch.randint(4, VOCAB, (length,), generator=g)
        attention[i, cols] = 1
        answer = torch.zeros(length, dtype=torch.long)
        start = int(torch.randint(1, length + 2, (), generator=g)) if length else 0   # > length: no answer
        answer[start:] = 1
        loss[i, cols] = answer
    batch = {"input_ids": ids, "attention_mask": attention}
    return {**batch, "loss_mask": loss} if qa else batch


def _plain_rows(model, batch):
    """Plain per-token log-likelihoods and their mask from the model's full logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    mask = batch["attention_mask"][:, 1:].bool()
    if "loss_mask" in batch:
        mask = mask & batch["loss_mask"][:, 1:].bool()
    lp = F.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return lp, mask


@pytest.fixture(scope="module")
def models():
    import transformers as tf

    torch.manual_seed(0)
    return {name: tf.AutoModelForCausalLM.from_config(config).eval() for name, config in _families(VOCAB).items()}


CASES = [([5, 3, 7], 7, "right", False), ([1, 6, 4, 6], 9, "left", False), ([6, 2, 5], 6, "right", True),
         ([4, 7, 1], 8, "left", True), ([1, 1], 3, "right", False)]   # the last: no loss token at all


@pytest.mark.parametrize("family", FAMILIES)
def test_selected_positions_equal_the_full_logits(models, family):
    model = models[family]
    weight = next(p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2
                  and ".1." in n)            # a matrix of layer 1: below the head, above the embedding
    weight.requires_grad_(True)
    head_inputs = []
    try:
        for k, (rows, width, side, qa) in enumerate(CASES):
            batch = _batch(rows, width, side, qa, seed=k)
            hook = model.get_output_embeddings().register_forward_hook(
                lambda _m, args, _out: head_inputs.append(tuple(args[0].shape)))
            lp, mask = target_logprobs(model, batch)
            hook.remove()
            assert head_inputs[-1] == (1, int(mask.sum()), model.config.hidden_size)   # the head saw only those rows
            want, want_mask = _plain_rows(model, batch)
            assert torch.equal(mask, want_mask)
            assert lp.shape == (int(mask.sum()),)
            torch.testing.assert_close(lp, want[mask], atol=2e-5, rtol=1e-5)
            (g_got,) = torch.autograd.grad(nll(model, batch), weight)
            plain_nll = -(want * want_mask).sum() / want_mask.sum().clamp(min=1)
            (g_want,) = torch.autograd.grad(plain_nll, weight, allow_unused=True)
            g_want = torch.zeros_like(weight) if g_want is None else g_want
            torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=1e-4)
    finally:
        weight.requires_grad_(False)


def test_bf16_model(models):
    import copy

    model = copy.deepcopy(models["llama"]).to(torch.bfloat16)
    batch = _batch([6, 3, 5], 6, "right", True, seed=9)
    lp, mask = target_logprobs(model, batch)
    want, _ = _plain_rows(model, batch)
    assert lp.dtype == torch.float32
    # the head's bf16 products round differently on fewer rows: a few bf16 ulps of the logits
    torch.testing.assert_close(lp, want[mask], atol=0.05, rtol=0.02)


class _ToyLM(nn.Module):
    """A causal LM of an embedding, one linear mixer and a head; ``how`` chooses how the head
    is applied: ``module`` (a module call on ``[b, T, d]``), ``functional`` (``F.linear`` with
    the tied embedding; ``get_output_embeddings`` is the head module, never called),
    ``flat`` (the module on ``[b·T, d]`` rows), ``none`` (no ``get_output_embeddings``),
    ``restored`` (the head's output padded back to the input's length)."""

    def __init__(self, how: str, vocab: int = 11, d: int = 6):
        super().__init__()
        self.how = how
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def get_output_embeddings(self):
        return None if self.how == "none" else self.head

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        from types import SimpleNamespace

        h = torch.tanh(self.mix(self.embed(input_ids).cumsum(1)))
        b, t, d = h.shape
        if self.how == "functional":
            logits = F.linear(h, self.embed.weight)
        elif self.how == "flat":
            logits = self.head(h.reshape(b * t, d)).reshape(b, t, -1)
        else:
            logits = self.head(h)
        if self.how == "restored":
            logits = F.pad(logits, (0, 0, 0, t - logits.shape[1]))[:, :t]
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("how", ["module", "functional", "flat", "none", "restored"])
def test_heads_not_called_on_rows_fall_back_to_full_logits(how):
    torch.manual_seed(1)
    model = _ToyLM(how)
    reference = _ToyLM("module")
    reference.load_state_dict(model.state_dict())
    batch = {"input_ids": torch.randint(0, 11, (3, 8)), "attention_mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3,
                                                                                          [1] + [0] * 7])}
    for _ in range(2):           # a fallback is remembered for the model
        lp, mask = target_logprobs(model, batch)
        want, _ = _plain_rows(reference, batch)
        torch.testing.assert_close(lp, want[mask], atol=1e-6, rtol=1e-6)


# --- the rest of a step: the finiteness check and the optimizer --------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_equals_isfinite_all(dtype):
    from unlearn_kernels.methods.base import all_finite

    g = torch.Generator().manual_seed(5)
    for n in (1, 7, 4099):
        for bad in (None, float("nan"), float("inf"), -float("inf")):
            for where in ((0, n // 2, n - 1) if bad is not None else (0,)):
                t = torch.randn(n, generator=g).to(dtype)
                if bad is not None:
                    t[where] = bad
                assert bool(all_finite(t)) == bool(torch.isfinite(t).all()), (n, bad, where)
    assert bool(all_finite(torch.empty(0, dtype=dtype)))


def test_check_finite_names_the_parameter():
    from unlearn_kernels.methods.base import NonFiniteError, check_finite

    params = {"a": torch.zeros(3, 4), "b": torch.ones(5)}
    check_finite("M", 0, {}, params)
    params["b"][2] = float("nan")
    with pytest.raises(NonFiniteError, match="parameter b has non-finite values after step 7"):
        check_finite("M", 7, {}, params)


def test_fused_adamw_equals_the_per_op_one():
    from unlearn_kernels.methods import GradDiff

    g = torch.Generator().manual_seed(2)
    params = [torch.randn(33, 17, generator=g, requires_grad=True), torch.randn(5, generator=g, requires_grad=True)]
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    method = GradDiff.__new__(GradDiff)
    method.config, method.optimized = GradDiff.config_class(lr=1e-2), dict(enumerate(params))
    fused = method.make_optimizer()
    assert fused.defaults["fused"]
    plain = torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.0)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, c, grad in zip(params, copies, grads):
            p.grad, c.grad = grad.clone(), grad.clone()
        fused.step()
        plain.step()
    for p, c in zip(params, copies):
        torch.testing.assert_close(p, c, atol=1e-6, rtol=1e-6)


def test_npo_with_the_shared_prefix_equals_two_full_passes():
    """NPO's loss and gradient equal the plain formula on two full forwards (live, and the
    frozen copy's) of ``log_softmax``-gathered token log-likelihoods."""
    from unlearn_kernels.methods import NPO
    from unlearn_kernels.models import tiny

    model, tokenizer = tiny.load()
    method = NPO(model, tokenizer, update=["layers.2.mlp.*"], batch_size=3, retain_weight=0.0, progress=False)
    texts = ["alice lives in paris", "bob", "carol works at the old mill by the river"]
    method.setup(texts, [])
    assert method._prefix == 2
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(method.params.values())
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    for p in params:
        p.requires_grad_(True)
    batch = next(method.batches(texts))
    got = method.loss(batch, None, 0)["forget"]
    g_got = torch.autograd.grad(got, params)
    lp, mask = _plain_rows(model, batch)
    with torch.no_grad():
        ref, _ = _plain_rows(lambda **kw: method.reference.forward(**kw), batch)
    ratio = ((lp - ref) * mask).sum(-1)
    want = -(2 / method.config.beta) * F.logsigmoid(-method.config.beta * ratio).mean()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for a, b in zip(g_got, torch.autograd.grad(want, params)):
        torch.testing.assert_close(a, b, atol=1e-4 * float(b.abs().max()), rtol=1e-4)   # fp32 sums in another order
