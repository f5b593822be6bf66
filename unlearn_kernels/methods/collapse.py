"""Collapse of irrelevant representations (CIR; Sondej & Yang, 2025): the unlearning gradient of
each updated ``nn.Linear`` weight is taken from its inputs with the directions that the general
(retain) data use most removed, so the update touches only what is specific to the forget data.

For a linear layer ``y = x Wᵀ + b`` the weight gradient of a loss is ``∂L/∂W = Σ_t g_tᵀ x_t``
(``g_t = ∂L/∂y_t``). With ``G = Σ_{retain tokens} x_tᵀ x_t`` the layer's input Gram on
``collapse_batches`` retain batches of the unmodified model (``ops.masked_gram``, padding
excluded) and ``V`` ``[d, k]`` its top-``k`` eigenvectors (orthonormal columns,
``ops.forget_basis`` with no retain constraint, which is exactly that; ``k = collapse_rank``,
at most ``d``), the collapsed inputs are ``x̃_t = x_t − (x_t V) Vᵀ`` (``ops.low_rank_project``) and
the unlearning terms' weight gradient is ``Σ_t g_tᵀ x̃_t``. The forward, the input gradient
``g W`` and the bias gradient ``Σ_t g_t`` are exact, so the layers below still receive the true
gradient; the retain term's weight gradient is the plain ``Σ_t g_tᵀ x_t``.

Why uncentred (the second moment, not the covariance): after an update ``ΔW = −η Σ g x̃ᵀ`` a retain
input ``x_r`` moves its output by ``ΔW x_r = −η Σ g (x̃ · x_r)``; over the retain inputs
``E‖ΔW x_r‖²`` is governed by ``E[x_r x_rᵀ]``, whose top eigenvectors — the mean direction first,
the largest shared component of activations — are what a fixed rank must remove to keep
retain outputs in place. The paper's output-side projection (of ``g`` onto the complement of the
retain output-gradient principal directions) is not done: for the RMU family the retain loss and
its gradient are 0 at the start, so those directions are undefined there.

``collapse_step``: the package's optimizers scale each weight element by its own running
gradient statistics (AdamW, Sophia), which does not preserve the row space of a gradient
``Σ g x̃ᵀ``: on the demo's RMU run (rank 4) the first AdamW step of each collapsed MLP weight had
6–11 % of its norm in ``span(V)`` although its gradient had none (a random direction: 12–18 %),
and since the retain inputs are largest along ``V`` that is enough to move them. With
``collapse_step`` each collapsed weight's whole step ``Δ`` (retain term included) becomes
``Δ − (Δ V) Vᵀ`` after the optimizer, which with SGD would be what the collapsed gradient gives;
the retain term then repairs only outside ``V`` (where the unlearning acts). SIMU refuses it: on a
down projection, whose neuron axis is its input, it would move unselected neurons.

Measured on the shipped benchmark (``benchmarks/RESULTS.md``, 2026-12-07, the attack suite): the
gradient collapse alone wrecks RMU's retain accuracy (0.36-0.63 at k = 4-64) and raises GradDiff's
recovery; with ``collapse_step`` RMU at k = 16 keeps its forget and retain accuracy and its worst
recovery falls from 81 ± 2 to 69 ± 1 % over three seeds, NPO at k = 4 gains retain (+0.03) at an
unchanged recovery; no setting met the robustness goal, which TAR meets on 2 of 3 seeds.

Mechanics: within :meth:`Collapse.installed` (the whole run) the selected Linear modules compute ``F.linear``
through :class:`_CollapsedLinear` (an instance ``forward``, so module hooks — the frozen copy's
weight swap — still run around it; without a graph it is plain ``F.linear``). Its backward
reads ``Collapse.active``: set only around the unlearning terms' ``autograd.grad`` in
``UnlearningMethod._backward_apart`` (and in sharpness-aware's second pass). So the
projection follows the loss term, not the batch: any forward the unlearning loss reads is
collapsed, the retain term's never is.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..ops import forget_basis, low_rank_project, masked_gram
from ..ops.low_rank import MAX_RANK


class _CollapsedLinear(torch.autograd.Function):
    """``F.linear(x, W, b)``; backward ``dx = g W``, ``db = Σ g`` and ``dW = gᵀ x̃`` while the
    collapse is active (``x̃ = x − (xV)Vᵀ``), else ``gᵀ x``."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.save_for_backward(x, weight)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        layer = ctx.layer
        dx = dw = db = None
        rows = g.reshape(-1, g.shape[-1])
        if ctx.needs_input_grad[0]:
            dx = g.matmul(weight.to(g.dtype))
        if ctx.needs_input_grad[1]:
            inputs = x
            if layer.owner.active:
                inputs = low_rank_project(x, layer.basis.to(x.device), assume_orthonormal=True,
                                          backend=layer.owner.backend)
            dw = rows.t().matmul(inputs.reshape(-1, x.shape[-1]).to(g.dtype)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = rows.sum(0)
        return dx, dw, db, None


class _Layer:
    """One collapsed Linear: its module, its basis ``V`` ``[d, k]`` (fp32) and the owner's flag."""

    def __init__(self, owner: "Collapse", name: str, module: nn.Linear):
        self.owner, self.name, self.module = owner, name, module
        self.basis: torch.Tensor | None = None

    def forward(self, x):
        m = self.module
        if not torch.is_grad_enabled() or not (m.weight.requires_grad or x.requires_grad):
            return F.linear(x, m.weight, m.bias)
        return _CollapsedLinear.apply(x, m.weight, m.bias, self)


class Collapse:
    """The collapse of one run: the Linear modules owning the selected weights, their retain
    bases (:meth:`fit_bases`), and ``active`` (the flag the backward reads)."""

    def __init__(self, method_name: str, model: nn.Module, params: dict[str, nn.Parameter], rank: int,
                 backend: str = "auto", project_steps: bool = False):
        self.rank, self.backend, self.active, self.project_steps = rank, backend, False, project_steps
        owners = {}
        for module_name, module in model.named_modules():
            for attr, p in module._parameters.items():
                if p is not None:
                    owners.setdefault(id(p), (module_name, module, attr))
        self.layers: dict[str, _Layer] = {}
        others = []
        for name, p in params.items():
            module_name, module, attr = owners.get(id(p), (None, None, None))
            if not isinstance(module, nn.Linear) or attr not in ("weight", "bias"):
                others.append(name)
            elif attr == "weight":
                self.layers.setdefault(module_name, _Layer(self, module_name, module))
        if others:
            raise UserError(f"{method_name}: collapse_rank projects the inputs of nn.Linear weights; "
                            f"{len(others)} selected parameter(s) are not: {', '.join(sorted(others)[:4])}"
                            f"{' ...' if len(others) > 4 else ''}; select Linear weights with update=[...] or "
                            "set collapse_rank=0")
        if not self.layers:
            raise UserError(f"{method_name}: collapse_rank needs at least one selected nn.Linear weight")

    @torch.no_grad()
    def fit_bases(self, run_forward, batches) -> None:
        """``V`` of every layer: the top-``rank`` eigenvectors of its retain input Gram, summed over
        ``batches`` run through ``run_forward(batch)`` (no graph; the model as it is now)."""
        grams: dict[str, torch.Tensor] = {}

        def collect(name):
            def hook(_module, args):
                x = args[0]
                mask = current["mask"]
                if mask is not None and tuple(x.shape[:-1]) != tuple(mask.shape):
                    mask = None
                g = masked_gram(x, mask, backend=self.backend)
                grams[name] = g if name not in grams else grams[name] + g
            return hook

        current = {"mask": None}
        handles = [layer.module.register_forward_pre_hook(collect(name)) for name, layer in self.layers.items()]
        try:
            for batch in batches:
                current["mask"] = batch.get("attention_mask")
                run_forward(batch)
        finally:
            for h in handles:
                h.remove()
        for name, layer in self.layers.items():
            if name not in grams:
                raise UserError(f"collapse_rank: the retain forward never reached {name}; it cannot be collapsed")
            d = grams[name].shape[0]
            layer.basis = forget_basis(grams[name], None, min(self.rank, d, MAX_RANK))

    def ranks(self) -> dict[str, int]:
        """The basis rank per collapsed layer (for the report)."""
        return {name: int(layer.basis.shape[1]) for name, layer in self.layers.items() if layer.basis is not None}

    def before_step(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """With ``collapse_step``: copies of the collapsed weights (among ``weights``, the tensors
        the optimizer updates) before its step; None without."""
        if not self.project_steps:
            return None
        return {n: weights[n].detach().clone() for n in (name + ".weight" for name in self.layers) if n in weights}

    @torch.no_grad()
    def project_step(self, weights: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> None:
        """``W ← W₀ + Δ − (Δ V) Vᵀ`` with ``Δ = W − W₀`` the optimizer's step (fp32)."""
        for name, layer in self.layers.items():
            n = name + ".weight"
            if n not in before:
                continue
            w, v = weights[n], layer.basis.to(weights[n].device)
            delta = w.float() - before[n].float()
            w.copy_((before[n].float() + delta - (delta @ v) @ v.T).to(w.dtype))

    @contextmanager
    def installed(self):
        """Within the block the layers compute through :class:`_CollapsedLinear`."""
        saved = {}
        for name, layer in self.layers.items():
            saved[name] = vars(layer.module).get("forward")
            layer.module.forward = layer.forward
        try:
            yield
        finally:
            for name, layer in self.layers.items():
                if saved[name] is None:
                    del layer.module.forward
                else:
                    layer.module.forward = saved[name]

    @contextmanager
    def unlearning(self):
        """Within the block the weight gradients taken are collapsed ones."""
        previous, self.active = self.active, True
        try:
            yield
        finally:
            self.active = previous


def build(method, retain: list) -> Collapse:
    """The collapse of ``method``'s run: its selected Linear layers and their bases from
    ``method.config.collapse_batches`` retain batches (their own shuffled stream) on the model as
    it is before the first step. The forward stops after the deepest collapsed decoder layer
    when every collapsed layer sits in one."""
    from ..models.layers import layer_index_of, layer_output

    config = method.config
    if not retain:
        raise UserError(f"{method.name}: collapse_rank needs retain data (its basis is the retain inputs' "
                        "principal directions)")
    collapse = Collapse(method.name, method.model, method.params, config.collapse_rank, config.backend,
                        config.collapse_step)
    indices = [layer_index_of(method.model, name + ".weight") for name in collapse.layers]
    if all(i is not None for i in indices):
        top = max(indices)

        def run(batch):
            return layer_output(method.model, top, batch["input_ids"], batch["attention_mask"])
    else:
        def run(batch):
            return method.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                use_cache=False)
    stream = method.batches(retain, 31)
    count = min(config.collapse_batches, -(-len(retain) // config.batch_size))
    training = method.model.training
    method.model.eval()            # no dropout in the statistics
    try:
        collapse.fit_bases(run, (next(stream) for _ in range(count)))
    finally:
        method.model.train(training)
    return collapse
