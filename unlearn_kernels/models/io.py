"""Atomic saving: a crash never leaves a half-written model or report behind."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from .export import PROJECTIONS  # noqa: F401  (MRP: "layer.<l>" -> U [d, r])
from .output_file import save_figure_atomic, write_json_atomic, write_jsonl_atomic, write_text_atomic  # noqa: F401

MASKS = "unlearn_masks.safetensors"               # SIMU: parameter name -> neuron mask


def save_pretrained_atomic(model, tokenizer, out_dir: Path | str, report: dict | None = None,
                           projections: dict | None = None, masks: dict | None = None) -> Path:
    """``save_pretrained`` (safetensors) of model and tokenizer, plus ``report.json`` (always,
    carrying the package's marker) and the method's projections and neuron masks
    (safetensors), into a staging folder beside ``out_dir`` that is fsynced and swapped in
    atomically (``models.output_dir``); ``out_dir`` must be new or a previous output of ours.
    The tokenizer files are made loadable by transformers 4.x too (``models.portable``).

    With non-empty ``projections`` (MRP: ``"layer.<l>"`` → U) the folder is a model type of its
    own (``models.export``): standard loaders need ``trust_remote_code=True`` and refuse it
    without, so they never load the unedited base model in its place; ``load_local`` reads it
    as is. The ``report.json`` of a transformers model says how to load its folder
    (``"loading"``). A model that carries projections (``model.unlearn_projections``, set by
    ``load_local`` and by the exported modeling code) must be saved with them: dropping them
    is refused. Bad projections are refused before anything is written, and so are a model
    with a non-finite weight (named) and an ``out_dir`` that is, contains or sits inside the
    folder the model was loaded from (:func:`source_folders`)."""
    from safetensors.torch import save_file

    from . import export
    from .integrity import check_finite
    from .output_dir import check_output_path

    check_output_path(out_dir, source_folders(model), overwrite=True)
    check_finite(model, f"refusing to save to {out_dir}")
    _check_carried_projections(model, projections)
    if projections:
        export.check_projections(model, projections)
    with staged_output(out_dir) as tmp:
        with quiet_transformers():
            model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        if projections:
            export.write_projected(tmp, model, projections, report.get("method") if isinstance(report, dict) else None)
        if report is not None and (projections or _is_transformers_model(model)):
            report = {**report, "loading": export.loading_info(projected=bool(projections))}
        write_report(tmp, report)
        if masks:
            save_file({k: v.detach().cpu().contiguous() for k, v in masks.items()}, str(tmp / MASKS))
    return Path(out_dir).expanduser().resolve()


@contextmanager
def staged_output(out_dir: Path | str):
    """A staging folder for ``out_dir`` (new or a previous output of ours): filled in the block,
    then fsynced and swapped into place; removed, leaving ``out_dir`` as it was, on any error."""
    from .output_dir import check_output_path, fix_permissions, make_staging, swap_into_place

    out_dir = check_output_path(out_dir, overwrite=True)
    tmp = make_staging(out_dir)
    try:
        yield tmp
        fix_permissions(tmp)
        swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_tokenizer(tokenizer, folder: Path) -> None:
    """The tokenizer's files, made loadable by transformers 4.x too (``models.portable``)."""
    from .portable import make_tokenizer_portable

    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        make_tokenizer_portable(folder)


def write_report(folder: Path, report: dict | None) -> None:
    """``report.json``, always carrying the package's marker (every output is marked as ours)."""
    write_json_atomic(folder / "report.json", report or {})


def source_folders(model) -> list[Path]:
    """The local folders ``model`` was loaded from: transformers records the path it was given
    (``name_or_path``, ``config._name_or_path``)."""
    names = {getattr(model, "name_or_path", None), getattr(getattr(model, "config", None), "_name_or_path", None)}
    return [Path(n) for n in names if isinstance(n, (str, Path)) and str(n) and Path(n).expanduser().is_dir()]


def _is_transformers_model(model) -> bool:
    import sys

    transformers = sys.modules.get("transformers")   # a transformers model has imported it
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _check_carried_projections(model, projections: dict | None) -> None:
    """UserError if ``model`` has projection hooks from a loaded folder that ``projections``
    does not include (saving would silently drop them)."""
    import torch

    carried = getattr(model, "unlearn_projections", None) or {}
    given = projections or {}
    for layer, basis in carried.items():
        key = f"layer.{layer}"
        if key not in given or not torch.equal(given[key].detach().cpu().float(), basis.detach().cpu().float()):
            raise UserError(f"the model carries a projection after layer {layer} (loaded with it) that the "
                            f"projections to save do not include: pass it as projections[{key!r}], or the "
                            "saved folder would lose it")


def check_causal_lm(path: Path, trust_remote_code: bool = False) -> None:
    """UserError unless ``path`` holds a decoder-only causal LM that transformers knows, whose
    files name no file outside the folder (``models.folder_paths``)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from . import export
    from .folder_paths import check_model_folder, read_config

    raw = read_config(path)
    check_model_folder(path)   # every file the folder names stays inside it
    if raw.get("model_type") == export.MODEL_TYPE:   # ours: check its base
        base = export.base_config_dict(raw).get("model_type")
        if base not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise UserError(f"{path} is a projected model over {base!r}, which transformers does not know")
        return
    if trust_remote_code and "AutoModelForCausalLM" in (raw.get("auto_map") or {}):
        return      # the user consented to the folder's own causal LM code
    try:
        # never run (or ask to run) a folder's own code just to check what it is
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{path}/config.json cannot be read as a transformers config "
                        f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False):
        raise UserError(f"{path} holds a {config.model_type!r} model, not a decoder-only causal LM "
                        "(AutoModelForCausalLM would load only part of it)")


@contextmanager
def quiet_transformers():
    """No "Loading weights" / "Writing model shards" progress bars from transformers, and no
    loading report (our own checks, ``models.integrity``, turn its findings into errors)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if was:
            hf_logging.enable_progress_bar()


def load_local(path: Path | str, dtype=None, trust_remote_code: bool = False):
    """A causal LM and its tokenizer from a local folder (no network, no progress bars); see
    :func:`_load_local`. What transformers or safetensors cannot read in the folder (a missing
    weight or tokenizer file, a truncated shard) is a UserError naming the folder."""
    from safetensors import SafetensorError

    with quiet_transformers():
        try:
            return _load_local(path, dtype, trust_remote_code)
        except UserError:
            raise
        except (OSError, SafetensorError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UserError(f"{path}: the model cannot be loaded ({reason})") from error


def _load_local(path: Path | str, dtype=None, trust_remote_code: bool = False):
    """A causal LM and its tokenizer from a local directory (no network), in eval mode.

    Saved MRP projections are re-attached as forward hooks (and kept, ``{layer: U}``, on
    ``model.unlearn_projections``); saved SIMU neuron masks are put on
    ``model.unlearn_masks``. A projected-model folder (``models.export``) is loaded without
    running its modeling code: the base architecture is built from the base config recorded
    in ``config.json`` and the weights are the folder's. Tokenizers without a padding token
    get their end-of-text token as padding. No code from the folder runs unless
    ``trust_remote_code`` (the user's explicit consent). A folder whose weights do not make the model its
    config describes (missing, unexpected or mismatched keys, non-finite values) is refused
    (``models.integrity``)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from ..ops import projection_hook
    from . import export
    from .folder_paths import check_model_folder
    from .integrity import check_finite, check_loading_info
    from .layers import decoder_layers

    path = Path(path)
    projected = export.read_projected(path)   # reads config.json (models.folder_paths.read_config)
    check_model_folder(path)
    if projected is None:
        check_causal_lm(path, trust_remote_code)
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                           output_loading_info=True,
                                                           trust_remote_code=trust_remote_code)
        scales = {}
        bases = ({int(k.split(".")[1]): u for k, u in load_file(str(path / PROJECTIONS)).items()}
                 if (path / PROJECTIONS).is_file() else {})   # folders written before models.export
        layers = decoder_layers(model) if bases else None
    else:
        config = projected.base_config()
        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False):
            raise UserError(f"{path}: the base model is a {config.model_type!r} model, not a decoder-only causal LM")
        model, info = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, local_files_only=True,
                                                           output_loading_info=True)
        bases = projected.bases()
        scales = {int(k): float(v.get("scale", 1.0)) for k, v in projected.unlearning["projections"].items()}
        layers = model.get_submodule(projected.unlearning["layers_module"])
        if layers is not decoder_layers(model):
            raise UserError(f"{path}: config.json's layers_module {projected.unlearning['layers_module']!r} "
                            "is not the model's decoder-layer list")
    check_loading_info(path, info)    # no weight initialised at random, none dropped
    check_finite(model, path)
    # a projected folder's config.json needs trust_remote_code: hand the tokenizer the base config
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code,
                                              **({} if projected is None else {"config": model.config}))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for layer, basis in sorted(bases.items()):
        layers[layer].register_forward_hook(projection_hook(basis, scale=scales.get(layer, 1.0)))
    if bases:
        model.unlearn_projections = dict(sorted(bases.items()))
    if (path / MASKS).is_file():
        model.unlearn_masks = load_file(str(path / MASKS))
    return model.eval(), tokenizer
