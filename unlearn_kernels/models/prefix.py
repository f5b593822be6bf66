"""Load only what a method runs, and write the full checkpoint back shard by shard.

RMU, Adaptive RMU and SRMU read the residual stream after decoder layer ``l`` and change only
weights at or below it: layers ``l+1 …`` never run. :func:`load_prefix` builds the model with
``k = l + 1`` decoder layers (the config's layer count set to ``k``, per-layer lists cut to
``k``) and loads those tensors from the checkpoint's safetensors shards; the tensors of the
layers above are never read, so the peak memory depends on ``l``, not on depth (a 70B-class
model with ``l = 7`` holds about 8/80 of its layer weights, plus embeddings).

:func:`save_prefix_output` then writes the *full* model: every shard without an updated tensor
is copied byte for byte, and each shard holding one is rewritten with the new values (one shard
in memory at a time), in a staging folder swapped in atomically like every output. The config,
index and tokenizer are the source's, so plain ``transformers`` loads the folder as the
unlearned full model, tensor for tensor what a full-model run saves.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import MissingFileError, UserError
from .integrity import check_depth_stored, check_finite, check_loading_info, check_stored_finite, group_by_shard

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
OURS = {"report.json", "report.png", "unlearn_masks.safetensors"}   # a previous output's own files, not copied


def checkpoint_keys(path: Path | str) -> dict[str, str] | None:
    """``{tensor name: shard file}`` of a safetensors checkpoint folder (None when it has none);
    UnsafePathError when the index names a shard outside the folder (``models.folder_paths``)."""
    from .folder_paths import check_model_folder

    path = Path(path)
    if (path / INDEX).is_file():
        check_model_folder(path)
        return dict(json.loads((path / INDEX).read_text())["weight_map"])
    if (path / SINGLE).is_file():
        from safetensors import safe_open

        with safe_open(str(path / SINGLE), "pt") as f:
            return {key: SINGLE for key in f.keys()}
    return None


def check_shards(path: Path | str) -> None:
    """FileNotFoundError naming the first shard a checkpoint index lists that the folder lacks
    (before any work, instead of part-way through loading)."""
    keys = checkpoint_keys(path) or {}
    missing = sorted({shard for shard in keys.values() if not (Path(path) / shard).is_file()})
    if missing:
        raise MissingFileError(f"{path}: the checkpoint index lists {len(missing)} shard(s) the folder lacks, "
                               f"first {missing[0]}")


def unfit_source(path: Path | str) -> str | None:
    """Why the folder cannot be loaded in part and written back shard by shard (None when it
    can): it has no safetensors weights, keeps shards in subfolders, or carries MRP projections,
    which a partial load and a shard rewrite would drop."""
    from . import export
    from .io import PROJECTIONS

    path = Path(path)
    keys = checkpoint_keys(path)
    if keys is None:
        return f"{path} has no safetensors weights (model.safetensors or an index)"
    nested = sorted({shard for shard in keys.values() if "/" in shard})
    if nested:   # the rewrite copies the folder's own files, not its subfolders
        return f"{path} keeps shards in subfolders ({nested[0]}), which the shard rewrite does not copy"
    if export.read_projected(path) is not None or (path / PROJECTIONS).is_file():
        return f"{path} carries MRP projections, which the shard rewrite would drop"
    return None


def depth_of(path: Path | str) -> int:
    """The decoder-layer count in a model folder's config."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(path, local_files_only=True).num_hidden_layers)


def load_prefix(path: Path | str, layers: int, dtype=None):
    """The causal LM of ``path`` with its first ``layers`` decoder layers only (and the
    embeddings, final norm and head), and its tokenizer; ``model.unlearn_prefix`` records the
    source folder and its full depth. UserError when the folder has no safetensors weights or
    ``layers`` is not in ``1 … depth``; BrokenModelError when its weights do not make the model
    its config describes, the layers above the prefix included (``models.integrity``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .export import layers_module_name
    from .io import check_causal_lm, quiet_transformers

    path = Path(path)
    problem = unfit_source(path)
    if problem:
        raise UserError(f"prefix-only loading: {problem}; run without --prefix-only")
    check_causal_lm(path)
    with quiet_transformers():
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        depth = int(config.num_hidden_layers)
        if not 1 <= layers <= depth:
            raise UserError(f"prefix of {layers} layers: the model has {depth} decoder layers")
        config.num_hidden_layers = layers
        for name in ("layer_types",):   # per-layer lists (attention kind) follow the layer count
            if isinstance(getattr(config, name, None), list):
                setattr(config, name, getattr(config, name)[:layers])
        # transformers maps a checkpoint it does not convert (pages read lazily, an embedding's
        # unused rows never); a conversion it does through temporary copies, so we convert
        # tensor by tensor instead, unless the names need its renaming (fused MoE experts, ...)
        converts = dtype is not None and dtype != _stored_dtype(path)
        model = _read_prefix(path, config, dtype) if converts else None
        if model is None:
            model, info = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, local_files_only=True,
                                                               output_loading_info=True)
            check_loading_info(path, info, ignore_unexpected=True)    # the layers above are left out on purpose
        stored = checkpoint_keys(path) or {}
        check_depth_stored(path, layers_module_name(model), depth, stored)
        check_finite(model, path)
        check_stored_finite(path, stored, skip=model.state_dict())    # the tensors the output copies unread
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.unlearn_prefix = {"source": str(path), "layers": layers, "depth": depth}
    return model.eval(), tokenizer


def _read_prefix(path: Path, config, dtype: torch.dtype):
    """The prefix model built empty in ``dtype`` and filled tensor by tensor from the shards
    (each read, converted and copied in place, so the peak is the prefix plus one tensor, not the
    fp32 copies transformers' converting loader keeps); None when the checkpoint does not store
    every parameter and buffer under the model's own name."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    try:                        # transformers 5 (4.x kept it in modeling_utils)
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights

    keys = checkpoint_keys(path) or {}
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    state = model.state_dict()
    targets, read = {}, set()       # a tied tensor appears under each name: read it once
    for name, tensor in state.items():
        storage = (tensor.data_ptr(), tuple(tensor.shape))
        if name in keys and storage not in read:
            read.add(storage)
            targets[name] = tensor
    if any((t.data_ptr(), tuple(t.shape)) not in read for t in state.values()):
        return None
    with torch.no_grad():
        for shard, names in group_by_shard(keys, targets).items():
            with safe_open(str(path / shard), "pt") as f:
                for name in names:
                    stored = f.get_tensor(name)
                    if tuple(stored.shape) != tuple(targets[name].shape):
                        raise UserError(f"{path}: {name} is stored with shape {tuple(stored.shape)}, the config "
                                        f"gives {tuple(targets[name].shape)}")
                    targets[name].copy_(stored)
                    del stored
    return model


def _stored_dtype(path: Path):
    """The dtype of the first floating tensor of the checkpoint (read from its header)."""
    from safetensors import safe_open

    names = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    for name, shard in sorted((checkpoint_keys(path) or {}).items()):
        with safe_open(str(Path(path) / shard), "pt") as f:
            stored = f.get_slice(name).get_dtype()
        if stored in names:
            return names[stored]
    return torch.float32


def check_updated_names(source: Path | str, updated: dict[str, torch.Tensor]) -> None:
    """UserError unless every updated tensor is stored in the source checkpoint under its
    parameter name (so the rewrite puts each value where a full load reads it)."""
    keys = checkpoint_keys(source) or {}
    missing = sorted(name for name in updated if name not in keys)
    if missing:
        raise UserError(f"{source}: the checkpoint stores no tensor named {missing[0]} (of {len(missing)} updated); "
                        "prefix-only output cannot place it: run without --prefix-only")


def save_prefix_output(source: Path | str, out_dir: Path | str, updated: dict[str, torch.Tensor],
                       tokenizer=None, report: dict | None = None, *, model=None,
                       projections: dict | None = None, masks: dict | None = None) -> Path:
    """The full unlearned checkpoint in ``out_dir`` (new or a previous output of ours): the
    source folder's files, with the shards that hold ``updated`` tensors rewritten, the
    tokenizer saved as ``save_pretrained_atomic`` does, and ``report.json``; with
    ``projections`` (MRP, ``model`` given) the folder becomes a projected model as
    ``save_pretrained_atomic`` makes it, and ``masks`` (SIMU) are saved beside the weights."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from . import export
    from .export import loading_info
    from .io import MASKS, save_tokenizer, staged_output, write_report

    from .folder_paths import inside

    source = Path(source)
    if projections:
        export.check_projections(model, projections)
    check_updated_names(source, updated)   # reads the index: every shard name stays in the folder
    keys = checkpoint_keys(source)
    by_shard = group_by_shard(keys, updated)
    with staged_output(out_dir) as tmp:
        for item in source.iterdir():
            if item.is_file() and item.name not in OURS and item.name not in by_shard:
                shutil.copyfile(item, tmp / item.name)
        for shard, names in by_shard.items():
            target = inside(tmp, shard, source=str(source / INDEX), entry="a shard")   # never outside --out
            with safe_open(str(inside(source, shard, source=str(source / INDEX), entry="a shard")), "pt") as f:
                metadata = f.metadata() or {"format": "pt"}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
            for name in names:
                if updated[name].shape != tensors[name].shape:
                    raise ValueError(f"{name}: updated shape {list(updated[name].shape)} differs from the "
                                     f"checkpoint's {list(tensors[name].shape)}")
                tensors[name] = updated[name].detach().to("cpu", tensors[name].dtype).contiguous()
            save_file(tensors, str(target), metadata=metadata)
            del tensors
        save_tokenizer(tokenizer, tmp)
        if projections:
            export.write_projected(tmp, model, projections, (report or {}).get("method"))
        if masks:
            save_file({k: v.detach().cpu().contiguous() for k, v in masks.items()}, str(tmp / MASKS))
        write_report(tmp, {**(report or {}), "loading": loading_info(projected=bool(projections))})
    return Path(out_dir).expanduser().resolve()
