"""A loaded model is the model its folder describes, or an error.

transformers loads a folder whose weights do not fit its config without failing: a weight the
config declares and the files lack is initialised at random (a BERT config over Llama weights,
a config with more layers than the shards hold), a stored weight the config has no place for is
dropped, and NaN or Inf weights load as they are. Such a model scores near chance on every
question, which reads as "perfectly unlearned". So every load of ours checks:

- the loading report of transformers (``output_loading_info``): no missing, unexpected or
  mismatched keys (:func:`check_loading_info`);
- every floating parameter and buffer is finite (:func:`check_finite`);
- a prefix load (``models.prefix``), which builds layers ``0…k−1`` only, still finds every
  decoder layer of the config in the checkpoint's index (:func:`check_depth_stored`), and the
  tensors it does not load, which the output copies, are finite too (:func:`check_stored_finite`,
  one tensor in memory at a time).

Each failure is a :class:`BrokenModelError`: one line naming the folder and the first bad key.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import UserError


class BrokenModelError(UserError):
    """The weights of a model folder do not make the model its config describes."""


def _first(keys) -> str:
    keys = sorted(map(str, keys))
    return f"{keys[0]}" + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")


def check_loading_info(path: Path | str, info: dict, *, ignore_unexpected: bool = False) -> None:
    """BrokenModelError when transformers' loading report lists a missing, mismatched or
    (unless ``ignore_unexpected``: a prefix load leaves the upper layers out on purpose)
    unexpected key."""
    missing = info.get("missing_keys") or ()
    if missing:
        raise BrokenModelError(f"{path}: the weight files lack {len(missing)} tensor(s) the config declares, first "
                               f"{_first(missing)}; transformers would initialise them at random "
                               "(config and weights of different models?)")
    mismatched = info.get("mismatched_keys") or ()
    if mismatched:
        first = sorted(mismatched, key=str)[0]
        name = first[0] if isinstance(first, (tuple, list)) else first
        raise BrokenModelError(f"{path}: {len(mismatched)} stored tensor(s) have another shape than the config "
                               f"gives, first {name}")
    unexpected = info.get("unexpected_keys") or ()
    if unexpected and not ignore_unexpected:
        raise BrokenModelError(f"{path}: the weight files hold {len(unexpected)} tensor(s) the config has no place "
                               f"for, first {_first(unexpected)} (config and weights of different models?)")


def check_finite(model: torch.nn.Module, path: Path | str) -> None:
    """BrokenModelError naming the first parameter or floating buffer holding NaN or Inf."""
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    for name, tensor in tensors:
        if tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise BrokenModelError(f"{path}: weight {name} holds {bad} non-finite value(s) (NaN or Inf); "
                                   "the model cannot be evaluated or unlearned")


def check_depth_stored(path: Path | str, layers_module: str, depth: int, stored: dict[str, str]) -> None:
    """BrokenModelError when the checkpoint index ``stored`` (tensor name → shard) holds no
    tensor of some decoder layer ``i < depth`` under ``{layers_module}.{i}.``. Checked only when
    layer 0 is stored under that name (a checkpoint naming layers otherwise is left to the load)."""
    pattern = re.compile(re.escape(layers_module) + r"\.(\d+)\.")
    found = {int(m.group(1)) for m in map(pattern.match, stored) if m}
    if 0 not in found:
        return
    absent = [i for i in range(depth) if i not in found]
    if absent:
        raise BrokenModelError(f"{path}: config.json declares {depth} decoder layers, the weight files hold no "
                               f"tensor of layer {absent[0]} ({len(absent)} layer(s) missing); transformers would "
                               "initialise them at random")


def group_by_shard(keys: dict[str, str], names) -> dict[str, list[str]]:
    """``{shard: [tensor names]}`` of ``names`` under the checkpoint index ``keys`` (name → shard),
    shards in sorted order: each shard is then opened once."""
    grouped: dict[str, list[str]] = {}
    for name in names:
        grouped.setdefault(keys[name], []).append(name)
    return dict(sorted(grouped.items()))


def check_stored_finite(path: Path | str, stored: dict[str, str], skip=()) -> None:
    """BrokenModelError naming the first tensor of the checkpoint (``stored``: tensor name →
    shard, names checked by ``models.folder_paths``) outside ``skip`` that holds NaN or Inf;
    read one tensor at a time."""
    from safetensors import safe_open

    skip = set(skip)
    for shard, names in group_by_shard(stored, [name for name in stored if name not in skip]).items():
        with safe_open(str(Path(path) / shard), "pt") as f:
            for name in sorted(names):
                tensor = f.get_tensor(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise BrokenModelError(f"{path}: weight {name} holds {int((~torch.isfinite(tensor)).sum())} "
                                           "non-finite value(s) (NaN or Inf); the model cannot be unlearned")
