"""MaskedSophia: the official Sophia-G without masks, masked neurons frozen in a training
loop, the Hessian EMA, state_dict round trips and argument errors."""

import copy
import io

import pytest
import torch

from unlearn_kernels.ops import _backend
from unlearn_kernels.ops.sophia import _sophia_reference_loop
from unlearn_kernels.optim import MaskedSophia



def backends():
    return [b for b in ("torch", "cpu") if _backend.available(b, torch.device("cpu"), torch.float32)]


def tiny_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).to(dtype)


def batch(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g)
    return x.to(dtype), (x @ torch.randn(8, 4, generator=g)).to(dtype)


def train_step(model, opt, seed, hessian=True):
    x, y = batch(seed, next(model.parameters()).dtype)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    if hessian:
        opt.update_hessian()
    opt.step()
    return float(loss.detach())


@pytest.mark.parametrize("backend", backends())
def test_without_masks_is_official_sophia_g(backend):
    model = tiny_model()
    params = list(model.parameters())
    shadow = [p.detach().clone() for p in params]
    exp_avgs = [torch.zeros_like(p) for p in params]
    hessians = [torch.zeros_like(p) for p in params]
    kw = dict(lr=0.01, betas=(0.9, 0.95), rho=0.05, weight_decay=0.2, bs=4)
    opt = MaskedSophia(params, **kw, backend=backend)
    for seed in range(4):
        train_step(model, opt, seed)
        grads = [p.grad for p in params]
        for h, g in zip(hessians, grads):  # the official SophiaG.update_hessian
            h.mul_(0.95).addcmul_(g, g, value=1 - 0.95)
        _sophia_reference_loop(shadow, grads, exp_avgs, hessians, lr=0.01, beta1=0.9, rho=0.05, weight_decay=0.2, bs=4)
        for p, s in zip(params, shadow):
            torch.testing.assert_close(p.detach(), s, rtol=1e-5, atol=1e-6)
    assert all(int(opt.state[p]["step"]) == 4 for p in params)


@pytest.mark.parametrize("backend", backends())
def test_training_loop_moves_only_masked_neurons(backend):
    model = tiny_model()
    fc1, fc2 = model[0], model[2]
    neurons = torch.arange(32) % 3 == 0  # hidden neurons to update
    before = copy.deepcopy(model)
    opt = MaskedSophia(model.parameters(), lr=0.02, weight_decay=0.0, backend=backend,
                       masks={fc1.weight: neurons, fc1.bias: neurons, fc2.weight: (neurons, -1)})
    losses = [train_step(model, opt, seed=step % 4) for step in range(40)]
    assert losses[-1] < 0.8 * losses[0]
    frozen = ~neurons
    assert torch.equal(fc1.weight[frozen], before[0].weight[frozen])
    assert torch.equal(fc1.bias[frozen], before[0].bias[frozen])
    assert torch.equal(fc2.weight[:, frozen], before[2].weight[:, frozen])
    assert not torch.equal(fc1.weight[neurons], before[0].weight[neurons])
    assert not torch.equal(fc2.bias, before[2].bias)  # no mask: every element moves


def test_set_masks_clears_and_checks():
    model = tiny_model()
    opt = MaskedSophia(model.parameters(), lr=0.02)
    opt.set_masks({model[0].weight: torch.zeros(32, dtype=torch.bool)})
    snapshot = model[0].weight.detach().clone()
    train_step(model, opt, 0)
    assert torch.equal(model[0].weight, snapshot)
    opt.set_masks({model[0].weight: None})
    train_step(model, opt, 1)
    assert not torch.equal(model[0].weight, snapshot)
    with pytest.raises(ValueError, match="masks key 0 is not a parameter of this optimizer"):
        opt.set_masks({torch.nn.Parameter(torch.zeros(3)): None})
    with pytest.raises(ValueError, match=r"masks\[0\] must have shape \[8\]"):
        opt.set_masks({model[0].weight: (torch.ones(32, dtype=torch.bool), -1)})
    with pytest.raises(TypeError, match="masks must be a mapping"):
        opt.set_masks([model[0].weight])


def test_update_hessian_from_pairs_and_grads():
    w = torch.nn.Parameter(torch.randn(5, 3))
    opt = MaskedSophia([w], betas=(0.9, 0.8))
    z, hz = torch.randn(5, 3), torch.randn(5, 3)
    opt.update_hessian({w: (z, hz)})
    torch.testing.assert_close(opt.state[w]["hessian"], 0.2 * z * hz)
    opt.update_hessian({w: z})
    torch.testing.assert_close(opt.state[w]["hessian"], 0.8 * 0.2 * z * hz + 0.2 * z * z)
    w.grad = torch.randn(5, 3)
    h = opt.state[w]["hessian"].clone()
    opt.update_hessian()
    torch.testing.assert_close(opt.state[w]["hessian"], 0.8 * h + 0.2 * w.grad * w.grad)
    with pytest.raises(ValueError, match=r"must have the parameter's shape \(5, 3\)"):
        opt.update_hessian({w: torch.randn(3, 5)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip(dtype):
    model = tiny_model(dtype=dtype)
    neurons = torch.arange(32) % 2 == 0
    opt = MaskedSophia(model.parameters(), lr=0.02, masks={model[0].weight: neurons, model[2].weight: (neurons, -1)})
    for seed in range(3):
        train_step(model, opt, seed)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    twin = copy.deepcopy(model)
    twin_opt = MaskedSophia(twin.parameters(), lr=0.5)
    buffer.seek(0)
    twin_opt.load_state_dict(torch.load(buffer))
    assert twin_opt.param_groups[0]["lr"] == 0.02
    state = twin_opt.state[twin[0].weight]
    assert state["exp_avg"].dtype == torch.float32 and state["hessian"].dtype == torch.float32
    assert state["neuron_mask"].dtype == torch.bool and state["mask_dim"] == 0
    for seed in range(3, 6):
        train_step(model, opt, seed)
        train_step(twin, twin_opt, seed)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_loading_an_unserialised_state_dict_shares_nothing():
    model = tiny_model()
    opt = MaskedSophia(model.parameters(), lr=0.02)
    train_step(model, opt, 0)
    twin = copy.deepcopy(model)
    twin_opt = MaskedSophia(twin.parameters(), lr=0.02)
    twin_opt.load_state_dict(opt.state_dict())
    train_step(twin, twin_opt, 1)
    train_step(model, opt, 1)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert int(opt.state[model[0].weight]["step"]) == 2


def test_step_with_closure_returns_the_loss():
    model = tiny_model()
    opt = MaskedSophia(model.parameters(), lr=0.01)
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0


def test_param_groups_keep_their_own_hyperparameters():
    model = tiny_model()
    before = copy.deepcopy(model)
    opt = MaskedSophia([{"params": model[0].parameters(), "lr": 0.0, "weight_decay": 0.0},
                        {"params": model[2].parameters()}], lr=0.05)
    train_step(model, opt, 0)
    assert torch.equal(model[0].weight, before[0].weight)
    assert not torch.equal(model[2].weight, before[2].weight)


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(lr=-0.1), ValueError, "lr must be >= 0"),
    (dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\] must be in \[0, 1\)"),
    (dict(rho=float("nan")), ValueError, "rho must be finite"),
    (dict(bs=0), ValueError, "bs must be > 0"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
])
def test_constructor_errors_named(kwargs, error, words):
    with pytest.raises(error, match=words):
        MaskedSophia(tiny_model().parameters(), **kwargs)
