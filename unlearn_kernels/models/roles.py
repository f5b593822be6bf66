"""The roles the unlearning methods need, found in any decoder: its layer list, its MLP
projections and their neuron axes, its attention output projection, and the default layers,
relative to depth.

The layer list (:func:`decoder_layers`) is found by structure: the longest ``nn.ModuleList``
whose members all share one class (Llama/Mistral/Qwen2 ``model.layers``, GPT-2
``transformer.h``, GPT-NeoX ``gpt_neox.layers`` ...). For every decoder layer the methods need
the MLP block and its projections by *role*:

- ``gate``, ``up``: hidden → width (Llama ``gate_proj``/``up_proj``, GPT-2 ``c_fc``, OPT
  ``fc1``, NeoX/Falcon ``dense_h_to_4h``);
- ``gate_up``: the fused hidden → 2·width projection (Phi-3, Mixtral's experts);
- ``down``: width → hidden (``down_proj``, ``c_proj``, ``fc2``, ``dense_4h_to_h``);

with, for each, the *neuron axis*: the axis of its weight that indexes the MLP's ``width``
hidden units (rows of a Linear up-projection ``[w, d]``, columns of a Linear down-projection
``[d, w]``; the other way round for GPT-2's ``Conv1D``, whose weight is ``[in, out]``; axis
1 or 2 of a stacked MoE expert tensor ``[experts, ·, ·]``).

``FAMILIES`` names them for known ``model_type`` s (as PEFT keeps its target-module table);
:func:`structural_roles` finds them from shapes alone: the projection leaves of layer 0
(``nn.Linear``, ``Conv1D``, 3-D expert parameters) grouped by the module that holds them; the
MLP is the group with a width → hidden projection and at least one hidden → width (or 2·width)
projection, where the width is the config's MLP size (``intermediate_size``, ``ffn_dim``,
``n_inner``, ``ffn_hidden_size``; 4·hidden when unset) — so an attention block, whose output
projection reads the heads, never qualifies. :func:`find_roles` uses the table when the
family is known and its names check out against the shapes, the structure otherwise; the
test suite checks that both agree on every family in the table.

**Default layers.** RMU's published setting reads layer 7 of Zephyr-7B's 32 and updates the
MLP output projections of layers 5, 6, 7. As a fraction of depth that is
``l = round(7/32 · depth)``, taken at least 2 so that the band of three updated layers
``l−2 … l`` exists (and never past the last layer). On the shipped 4-layer model this gives
layer 2 — the layer where its linear probe reads the facts best — on 6 layers 2, on 12
layers 3, on 32 layers 7 (the published value). Loss-based methods and SIMU update the MLPs
of the same band.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError

IN_ROLES = ("gate", "up", "gate_up")
ROLES = IN_ROLES + ("down",)

# model_type -> where a decoder layer keeps its MLP (relative to the layer; "" = the layer
# itself), the MLP's projections by role (relative to the MLP), and the attention output.
_LLAMA = {"mlp": "mlp", "gate": "gate_proj", "up": "up_proj", "down": "down_proj", "attention_out": "self_attn.o_proj"}
FAMILIES: dict[str, dict[str, str]] = {
    **{name: _LLAMA for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                                 "olmo", "olmo2", "granite", "smollm3", "cohere", "starcoder2_llama")},
    "phi3": {"mlp": "mlp", "gate_up": "gate_up_proj", "down": "down_proj", "attention_out": "self_attn.o_proj"},
    "gpt2": {"mlp": "mlp", "up": "c_fc", "down": "c_proj", "attention_out": "attn.c_proj"},
    "gpt_neox": {"mlp": "mlp", "up": "dense_h_to_4h", "down": "dense_4h_to_h", "attention_out": "attention.dense"},
    "falcon": {"mlp": "mlp", "up": "dense_h_to_4h", "down": "dense_4h_to_h", "attention_out": "self_attention.dense"},
    "opt": {"mlp": "", "up": "fc1", "down": "fc2", "attention_out": "self_attn.out_proj"},
    "mixtral": {"mlp": "mlp.experts", "gate_up": "gate_up_proj", "down": "down_proj", "attention_out": "self_attn.o_proj"},
    "qwen2_moe": {"mlp": "mlp.experts", "gate_up": "gate_up_proj", "down": "down_proj", "attention_out": "self_attn.o_proj"},
}

_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff", "ffn_size")


@dataclass(frozen=True)
class Projection:
    """One MLP weight of one layer: its parameter name, role and MLP-neuron axis."""

    parameter: str      # full parameter name, e.g. model.layers.0.mlp.down_proj.weight
    role: str           # gate, up, gate_up or down
    neuron_axis: int    # axis of the weight indexing the MLP's width (or 2·width for gate_up)


@dataclass
class ModelRoles:
    """The roles of every decoder layer (see the module docstring)."""

    source: str                         # "table (<model_type>)" or "structure"
    layers_path: str                    # module path of the decoder-layer list
    mlp: str                            # the MLP's path relative to a layer ("" = the layer)
    names: dict[str, str]               # role -> path relative to the MLP
    attention_out: str | None           # relative to a layer
    hidden: int
    width: int
    depth: int
    projections: dict[int, list[Projection]] = field(default_factory=dict)   # layer -> projections

    def neuron_axis(self, parameter: str) -> int | None:
        """The MLP-neuron axis of ``parameter`` (None if it is not an MLP projection weight)."""
        for projections in self.projections.values():
            for p in projections:
                if p.parameter == parameter:
                    return p.neuron_axis
        return None

    def default_layer(self) -> int:
        """``max(2, round(7/32 · depth))``, within the model (module docstring)."""
        return default_layer(self.depth)

    def band(self, layer: int) -> list[int]:
        """The loss layer and the two below it (fewer near the bottom)."""
        return list(range(max(0, layer - 2), layer + 1))

    def patterns(self, layers: list[int], roles=ROLES) -> list[str]:
        """``update`` patterns selecting the MLP weights of ``roles`` in ``layers``
        (e.g. ``model.layers.{0,1,2}.mlp.down_proj``)."""
        chosen = [r for r in roles if r in self.names]
        if not chosen:
            raise UserError(f"the model's MLP has no {'/'.join(roles)} projection (it has {sorted(self.names)})")
        index = "{" + ",".join(map(str, layers)) + "}" if len(layers) > 1 else str(layers[0])
        mlp = f".{self.mlp}" if self.mlp else ""
        leaves = [self.names[r] for r in chosen]
        leaf = leaves[0] if len(leaves) == 1 else "{" + ",".join(leaves) + "}"
        return [f"{self.layers_path}.{index}{mlp}.{leaf}"]

    def describe(self) -> str:
        roles = ", ".join(f"{r}={self.names[r]}" for r in ROLES if r in self.names)
        mlp = self.mlp or "(in the layer)"
        return f"{self.source}: {self.depth} layers at {self.layers_path}, MLP {mlp} [{roles}], width {self.width}"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of ``model`` (found by structure, not by model name)."""
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise UserError(f"found no decoder-layer list in {type(model).__name__}")
    return best


def decoder_layers_path(model: nn.Module) -> str:
    """The module path of :func:`decoder_layers` (``model.layers``, ``transformer.h`` ...)."""
    layers = decoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers)


def default_layer(depth: int) -> int:
    """RMU's published layer 7 of 32 as a fraction of ``depth``, at least 2, at most the top."""
    if depth < 1:
        raise UserError("the model has no decoder layer")
    return min(depth - 1, max(2, round(7 * depth / 32)))


def hidden_size(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[1]) if hasattr(model, "get_input_embeddings") \
        else int(model.config.hidden_size)


def mlp_width(model: nn.Module, hidden: int) -> int:
    """The MLP's hidden width from the config (4·hidden for GPT-2-style configs that leave it unset)."""
    config = getattr(model, "config", None)
    for key in _WIDTH_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 4 * hidden


def _leaves(module: nn.Module):
    """``(owner path, leaf name, weight, layout)`` of every projection under ``module``:
    ``layout`` is ``"linear"`` ([out, in]), ``"conv1d"`` ([in, out]) or ``"experts"``
    ([E, out, in] parameters held directly by a module)."""
    for path, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            owner, _, leaf = path.rpartition(".")
            yield owner, leaf, sub.weight, "linear"
        elif type(sub).__name__ == "Conv1D" and getattr(sub, "weight", None) is not None and sub.weight.dim() == 2:
            owner, _, leaf = path.rpartition(".")
            yield owner, leaf, sub.weight, "conv1d"
        else:
            for name, p in sub.named_parameters(recurse=False):
                if p.dim() == 3:
                    yield path, name, p, "experts"


def _in_out(weight: torch.Tensor, layout: str) -> tuple[int, int]:
    if layout == "conv1d":
        return int(weight.shape[0]), int(weight.shape[1])
    return int(weight.shape[-1]), int(weight.shape[-2])


def _neuron_axis(layout: str, role: str) -> int:
    down = role == "down"
    if layout == "conv1d":
        return 0 if down else 1
    if layout == "experts":
        return 2 if down else 1
    return 1 if down else 0


def _roles_of_layer0(model, hidden: int, width: int):
    """Structural search on layer 0: ``(mlp path, {role: leaf}, attention_out)``."""
    layer = decoder_layers(model)[0]
    groups: dict[str, list] = {}
    for owner, leaf, weight, layout in _leaves(layer):
        groups.setdefault(owner, []).append((leaf, weight, layout))
    candidates = []
    for owner, items in groups.items():
        downs = [leaf for leaf, w, lay in items if _in_out(w, lay) == (width, hidden)]
        ins = [(leaf, _in_out(w, lay)[1]) for leaf, w, lay in items
               if _in_out(w, lay)[0] == hidden and _in_out(w, lay)[1] in (width, 2 * width)]
        if len(downs) == 1 and ins:
            candidates.append((owner, downs[0], ins))
    if len(candidates) > 1:   # prefer a block that calls itself an MLP / feed-forward / experts
        named = [c for c in candidates if re.search(r"mlp|ffn|feed_?forward|expert|moe",
                                                    type(layer.get_submodule(c[0]) if c[0] else layer).__name__
                                                    + c[0], re.I)]
        candidates = named or candidates
    if len(candidates) != 1:
        found = "none" if not candidates else ", ".join(c[0] or "(layer)" for c in candidates)
        raise UserError(f"cannot find the MLP of {type(layer).__name__} by structure (hidden {hidden}, width "
                        f"{width}; candidates: {found}): pass update=[...] patterns explicitly")
    owner, down, ins = candidates[0]
    names = {"down": down}
    for leaf, out in ins:
        role = "gate_up" if out == 2 * width else ("gate" if "gate" in leaf.lower() else "up")
        if role == "up" and "up" in names:
            role = "gate"
        names.setdefault(role, leaf)
    attention_out = None   # the last-registered hidden-output projection of another block
    for other, items in groups.items():
        if other == owner or (owner and other.startswith(owner + ".")) or not other:
            continue
        outs = [leaf for leaf, w, lay in items if _in_out(w, lay)[1] == hidden]
        if outs and len(items) > 1:
            attention_out = f"{other}.{outs[-1]}"
            break
    return owner, names, attention_out


def _resolve(model, source: str, mlp: str, names: dict[str, str], attention_out: str | None,
             hidden: int, width: int) -> ModelRoles:
    """Every layer's projections for the given relative names; UserError if one is missing or
    its shape does not fit its role."""
    prefix = decoder_layers_path(model)
    layers = decoder_layers(model)
    found = {name: p for name, p in model.named_parameters()}
    roles = ModelRoles(source, prefix, mlp, dict(names), attention_out, hidden, width, len(layers))
    for index, layer in enumerate(layers):
        projections = []
        layouts = {f"{owner}.{leaf}" if owner else leaf: (w, lay) for owner, leaf, w, lay in _leaves(layer)}
        for role in (r for r in ROLES if r in names):
            leaf = names[role]
            rel = f"{mlp}.{leaf}" if mlp else leaf
            if rel not in layouts:
                raise UserError(f"layer {index} has no {role} projection {rel!r}")
            weight, layout = layouts[rel]
            expected = (width, hidden) if role == "down" else (hidden, 2 * width if role == "gate_up" else width)
            if _in_out(weight, layout) != expected:
                raise UserError(f"layer {index} {rel} is {list(weight.shape)}, not a {role} projection "
                                f"{expected[0]} -> {expected[1]}")
            full = f"{prefix}.{index}.{rel}" + ("" if layout == "experts" else ".weight")
            if full not in found:
                raise ValueError(f"parameter {full} not found")
            projections.append(Projection(full, role, _neuron_axis(layout, role)))
        roles.projections[index] = projections
    return roles


def structural_roles(model: nn.Module) -> ModelRoles:
    """The roles from shapes alone (module docstring); UserError when they are ambiguous."""
    hidden = hidden_size(model)
    width = mlp_width(model, hidden)
    mlp, names, attention_out = _roles_of_layer0(model, hidden, width)
    return _resolve(model, "structure", mlp, names, attention_out, hidden, width)


def find_roles(model: nn.Module) -> ModelRoles:
    """The roles of ``model``: from ``FAMILIES`` when its ``model_type`` is known and the names
    fit the shapes, else by structure (a known family that does not fit falls back too)."""
    hidden = hidden_size(model)
    width = mlp_width(model, hidden)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    entry = FAMILIES.get(model_type)
    if entry is not None:
        names = {r: entry[r] for r in ROLES if r in entry}
        try:
            return _resolve(model, f"table ({model_type})", entry["mlp"], names, entry.get("attention_out"),
                            hidden, width)
        except ValueError:
            pass
    return structural_roles(model)
