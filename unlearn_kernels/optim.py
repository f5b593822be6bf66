"""MaskedSophia: the Sophia-G optimizer restricted to selected neurons (SIMU's optimizer).

Per parameter it keeps ``exp_avg`` (m) and ``hessian`` (h, the Hessian-diagonal EMA) in
fp32, whatever the parameter's dtype, and an optional neuron mask. ``update_hessian()``
refreshes the EMA::

    h ← β₂ · h + (1 − β₂) · a ⊙ b

from the current gradients (``a = b = p.grad``: the Gauss-Newton-Bartlett / Fisher form of
the official Sophia-G, to be called after a backward pass on labels sampled from the model)
or from given pairs (Hutchinson: ``a = z``, ``b = Hz``). ``step()`` applies
:func:`unlearn_kernels.ops.sophia.masked_sophia_step_` — one fused call per device and param
group — so only the masked neurons move: ``p ← p(1 − lr·wd)``, ``m ← β₁m + (1 − β₁)g``,
``p ← p − lr·sign(m)·min(|m|/(ρ·bs·h + ε), 1)``. Without masks it is the official Sophia-G.

Masks (``masks=`` or :meth:`MaskedSophia.set_masks`, keyed by parameter) are None, a bool
row mask over the first dim, or ``(mask, dim)`` with dim 0 or −1; they live in the optimizer
state, so ``state_dict()`` / ``load_state_dict()`` carry them along with m and h.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import chain

import torch
from torch import Tensor

from .errors import UserError
from .ops import _backend
from .ops.sophia import masked_sophia_step_, neuron_mask, sophia_hyperparameters

# State tensors load_state_dict copies as saved: the base class would cast floating state to
# the parameter's dtype (fp32 moments of bf16 params, bool masks) and share the step counter.
_EXACT_STATE = ("step", "exp_avg", "hessian", "neuron_mask")


class MaskedSophia(torch.optim.Optimizer):
    """Sophia-G on masked neurons (see the module docstring).

    Args:
        params: parameters or param groups (groups may override every hyperparameter).
        lr, betas, rho, weight_decay, eps, bs: Sophia-G's hyperparameters; ``bs`` is the
            tokens per Hessian estimate the official code multiplies ``rho`` by.
        masks: ``{param: mask}`` with mask None, a bool ``[shape[0]]`` row mask, or
            ``(bool mask, dim)`` with dim 0 or −1; unmasked params update fully.
        backend: the kernel backend of the step (``"auto"`` picks the fastest).

    Example:
        >>> model = torch.nn.Linear(4, 6)
        >>> keep = torch.tensor([True, False, True, False, False, True])
        >>> opt = MaskedSophia(model.parameters(), lr=1e-2, masks={model.weight: keep, model.bias: keep})
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.update_hessian()
        >>> opt.step()
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, weight_decay: float = 0.1, *, eps: float = 1e-15,
                 bs: float = 1, masks: Mapping | None = None, backend: str = "auto"):
        sophia_hyperparameters(lr, betas, rho, weight_decay, eps, bs)
        if backend != "auto" and backend not in _backend.BACKENDS:
            raise UserError(f"backend must be one of {('auto',) + _backend.BACKENDS}, got {backend!r}")
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps, bs=bs)
        super().__init__(params, defaults)
        self.backend = backend
        if masks is not None:
            self.set_masks(masks)

    def set_masks(self, masks: Mapping) -> None:
        """Set (or with None clear) the neuron masks of some parameters: ``{param: mask}``."""
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks must be a mapping {{param: mask}}, got {type(masks).__name__}")
        owned = {id(p) for group in self.param_groups for p in group["params"]}
        for i, (param, mask) in enumerate(masks.items()):
            if not isinstance(param, Tensor) or id(param) not in owned:
                raise ValueError(f"masks key {i} is not a parameter of this optimizer")
            mask, dim = neuron_mask(f"masks[{i}]", mask, param)
            state = self.state[param]
            if mask is None:
                state.pop("neuron_mask", None)
                state.pop("mask_dim", None)
            else:
                state["neuron_mask"], state["mask_dim"] = mask, dim

    def _moments(self, p: Tensor) -> dict:
        state = self.state[p]
        if "exp_avg" not in state:
            shape = _local(p).shape          # a sharded parameter keeps the state of its shard
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            state["hessian"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        return state

    @torch.no_grad()
    def update_hessian(self, estimates: Mapping | None = None) -> None:
        """``h ← β₂ h + (1 − β₂) a ⊙ b`` for every parameter with an estimate.

        ``estimates``: None (``a = b = p.grad`` for each parameter that has a gradient), or
        ``{param: a}`` / ``{param: (a, b)}`` (Hutchinson: the probe ``z`` and ``Hz``).
        """
        if estimates is not None and not isinstance(estimates, Mapping):
            raise TypeError(f"estimates must be None or a mapping {{param: (a, b)}}, got {type(estimates).__name__}")
        for group in self.param_groups:
            beta2 = group["betas"][1]
            hess, left, right = [], [], []
            for p in group["params"]:
                pair = p.grad if estimates is None else estimates.get(p)
                if pair is None:
                    continue
                a, b = pair if isinstance(pair, (tuple, list)) else (pair, None)
                b = a if b is None else b
                if a.shape != p.shape or b.shape != p.shape:
                    raise ValueError(f"Hessian estimates must have the parameter's shape {tuple(p.shape)}, "
                                     f"got {tuple(a.shape)} and {tuple(b.shape)}")
                hess.append(self._moments(p)["hessian"])
                left.append(_local(a).float())
                right.append(_local(b).float())
            if hess:
                torch._foreach_mul_(hess, beta2)
                torch._foreach_addcmul_(hess, left, right, value=1 - beta2)

    @torch.no_grad()
    def step(self, closure=None):
        """One masked Sophia-G step for every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_device: dict[torch.device, list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise ValueError("MaskedSophia does not support sparse gradients")
                    by_device.setdefault(p.device, []).append(p)
            for params in by_device.values():
                states = [self._moments(p) for p in params]
                masks = [_local_mask(p, s["neuron_mask"], s["mask_dim"]) if "neuron_mask" in s else None
                         for p, s in zip(params, states)]
                masked_sophia_step_(
                    [_local(p) for p in params], [_local(p.grad) for p in params], [s["exp_avg"] for s in states],
                    [s["hessian"] for s in states], masks, lr=group["lr"], betas=group["betas"],
                    rho=group["rho"], weight_decay=group["weight_decay"], eps=group["eps"],
                    bs=group["bs"], backend=self.backend)
                torch._foreach_add_([s["step"] for s in states], 1.0)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Like :meth:`torch.optim.Optimizer.load_state_dict`, but ``exp_avg`` and ``hessian``
        keep their fp32 and the masks their bool dtype (the base class would cast them to
        each parameter's dtype); the loaded tensors are copies, the step counter stays on the CPU."""
        saved = state_dict["state"]
        exact = {k: {n: v for n, v in s.items() if n in _EXACT_STATE} for k, s in saved.items()}
        rest = {k: {n: v for n, v in s.items() if n not in _EXACT_STATE} for k, s in saved.items()}
        super().load_state_dict({**state_dict, "state": rest})
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for key, p in zip(ids, params):
            for name, value in exact.get(key, {}).items():
                self.state[p][name] = value.clone() if name == "step" else _local(value).to(p.device, copy=True)


def _local(t: Tensor) -> Tensor:
    """This rank's shard of an FSDP2 (DTensor) tensor, which the fused step updates in place;
    the tensor itself otherwise."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _local_mask(p: Tensor, mask: Tensor, dim: int):
    """``(mask, dim)`` for this rank's shard of ``p``: an FSDP2 parameter sharded on dim 0
    (``Shard(0)``, ``torch.chunk``'s split) keeps its rows ``r·c … (r+1)·c − 1``, so a row mask is
    cut the same way; a column mask applies to every row as it is."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        return mask, dim
    if tuple(p.placements) != (Shard(0),):
        raise ValueError(f"MaskedSophia: a sharded parameter must be split on dim 0 (Shard(0)), got {p.placements}")
    if dim != 0:
        return mask, dim
    rows = p.shape[0]
    chunk = -(-rows // p.device_mesh.size())
    start = min(p.device_mesh.get_local_rank() * chunk, rows)
    return mask[start:start + _local(p).shape[0]], dim
