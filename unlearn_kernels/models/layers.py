"""Model plumbing for any Hugging Face causal LM: the decoder layers, parameters by pattern,
activations at layer l with the forward stopped there, and frozen copies of the few
updated layers.

The layer list is found by structure (``roles.decoder_layers``). ``layer_output(model, l, ...)``
registers a hook on layer l that records its output and raises, so layers above l never run.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from ..errors import UserError
from .roles import decoder_layers, decoder_layers_path, find_roles


class _Stop(Exception):
    pass


def check_layer(model: nn.Module, layer: int) -> int:
    n = len(decoder_layers(model))
    if not -n <= layer < n:
        raise UserError(f"layer {layer} does not exist: the model has {n} decoder layers (0..{n - 1})")
    return layer % n


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def layer_output(model: nn.Module, layer: int, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Residual-stream output of decoder layer ``layer`` ``[batch, seq, d]``; the forward stops there."""
    with _stop_at(model, check_layer(model, layer)) as captured:
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Stop:
            pass
    return captured["h"]


def expand_braces(pattern: str) -> list[str]:
    """``layers.{5,6,7}.mlp`` -> ``layers.5.mlp``, ``layers.6.mlp``, ``layers.7.mlp`` (nested ok)."""
    parts = re.split(r"(\{[^{}]*\})", pattern)
    options = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
    return ["".join(choice) for choice in itertools.product(*options)]


def parameters_matching(model: nn.Module, patterns: list[str] | str) -> dict[str, nn.Parameter]:
    """Parameters whose module path ends with one of ``patterns`` (braces and globs allowed):
    ``layers.{5,6,7}.mlp.down_proj`` selects those modules' weights (and biases)."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    expanded = [p for pattern in patterns for p in expand_braces(pattern)]
    chosen = {}
    for name, param in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        for p in expanded:
            if fnmatch.fnmatch("." + module, "*." + p) or fnmatch.fnmatch("." + name, "*." + p):
                chosen[name] = param
    if not chosen:
        raise UserError(f"no parameter matches {patterns}; {_what_to_type(model)}")
    return chosen


def _what_to_type(model: nn.Module) -> str:
    """The patterns that do exist: the decoder layers and their MLP projections by role."""
    try:
        roles = find_roles(model)
    except ValueError:
        return f"names look like {[n for n, _ in itertools.islice(model.named_parameters(), 3)]}"
    every = list(range(roles.depth))
    return (f"this model has {roles.depth} decoder layers (0..{roles.depth - 1}) at {roles.layers_path}; "
            f"its MLP weights are {roles.patterns(every)[0]}")


def layer_index_of(model: nn.Module, param_name: str) -> int | None:
    """Index of the decoder layer that holds ``param_name`` (None outside the layers)."""
    m = re.match(re.escape(decoder_layers_path(model)) + r"\.(\d+)\.", param_name)
    return int(m.group(1)) if m else None


class FrozenCopy:
    """The model *as it was* when this object was made, while the live model trains.

    Only the parameters that will be updated are copied; every other weight is shared with the
    live model, so one model plus a few layers fits where reference scripts hold two full
    models. A frozen forward puts the copies in place of the live tensors in the modules that
    hold them (every module, for a tied weight) from just before each such module runs until
    just after, by forward hooks, and always puts the live ones back. Swapping at the leaf
    module works on FSDP2 models too, whose layers gather their sharded weights on entry: a
    sharded (DTensor) weight is copied whole.
    """

    def __init__(self, model: nn.Module, updated: dict[str, nn.Parameter]):
        from torch.distributed.tensor import DTensor

        self.model = model
        self.frozen = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                       for name, p in updated.items()}
        ids = {id(p): name for name, p in updated.items()}
        self._slots = [(module, attr, ids[id(p)]) for module in model.modules()
                       for attr, p in module._parameters.items() if p is not None and id(p) in ids]

    @contextmanager
    def _swapped(self):
        stashed: list[tuple[nn.Module, str, object]] = []

        def before(module, _args, slots):
            for attr, name in slots:
                stashed.append((module, attr, module._parameters[attr]))
                module._parameters[attr] = self.frozen[name]

        def after(module, _args, _output):
            while stashed and stashed[-1][0] is module:
                _, attr, live = stashed.pop()
                module._parameters[attr] = live

        by_module: dict[nn.Module, list[tuple[str, str]]] = {}
        for module, attr, name in self._slots:
            by_module.setdefault(module, []).append((attr, name))
        handles = []
        for module, slots in by_module.items():
            handles.append(module.register_forward_pre_hook(lambda m, a, slots=slots: before(m, a, slots)))
            handles.append(module.register_forward_hook(after))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module, attr, live in reversed(stashed):   # a forward that raised inside a module
                module._parameters[attr] = live

    @torch.no_grad()
    def forward(self, **inputs):
        """The frozen model's full forward (``use_cache=False``)."""
        with self._swapped():
            return self.model(**{**inputs, "use_cache": False})

    @torch.no_grad()
    def layer_output(self, layer: int, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The frozen model's layer-``layer`` output; the forward stops there."""
        with self._swapped():
            return layer_output(self.model, layer, input_ids, attention_mask)


@contextmanager
def _stop_at(model: nn.Module, layer: int):
    captured: dict = {}

    def hook(_module, _args, output):
        captured["h"] = _first(output)
        raise _Stop

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _detached(output):
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, tuple):
        return tuple(_detached(o) for o in output)
    return output


@torch.no_grad()
def prefix_outputs(model: nn.Module, upto: int, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> dict[int, object]:
    """The outputs of decoder layers ``0 … upto−1`` for one batch, computed once without an
    autograd graph (the forward stops after layer ``upto−1``); replay them with
    :func:`replayed` so that several passes that share those layers branch above them."""
    if upto <= 0:
        return {}
    layers = decoder_layers(model)
    outputs: dict[int, object] = {}
    handles = [layers[i].register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, _detached(out)))
               for i in range(upto)]
    try:
        layer_output(model, upto - 1, input_ids, attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


@contextmanager
def overridden_forwards(model: nn.Module, replace: dict[int, Callable[[Callable], Callable]]):
    """Within the block decoder layer ``i``'s ``forward`` is ``replace[i](its forward)`` (an
    instance attribute, so ``Module.__call__`` and its hooks still run around it); the previous
    forward, itself possibly an override of an enclosing block, comes back on exit."""
    layers = decoder_layers(model)
    saved = {}
    for i, make in replace.items():
        saved[i] = vars(layers[i]).get("forward")
        layers[i].forward = make(layers[i].forward)
    try:
        yield
    finally:
        for i, previous in saved.items():
            if previous is None:
                del layers[i].forward
            else:
                layers[i].forward = previous


def replayed(model: nn.Module, outputs: dict[int, object]):
    """Within the block, decoder layer ``i`` returns ``outputs[i]`` without running (its hooks
    still run). Exact when the layers' weights and inputs are those the outputs came from:
    the layers below the lowest updated one, whose input is the (frozen) embedding."""
    return overridden_forwards(model, {i: (lambda _forward, _out=out: lambda *args, **kwargs: _out)
                                       for i, out in outputs.items()})
