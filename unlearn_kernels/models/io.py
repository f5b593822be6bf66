"""Atomic saving: a crash never leaves a half-written model or report behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


PROJECTIONS = "unlearn_projections.safetensors"   # MRP: "layer.<l>" -> U [d, r]
MASKS = "unlearn_masks.safetensors"               # SIMU: parameter name -> neuron mask


def save_pretrained_atomic(model, tokenizer, out_dir: Path | str, report: dict | None = None,
                           projections: dict | None = None, masks: dict | None = None) -> Path:
    """``save_pretrained`` (safetensors) of model and tokenizer, plus ``report.json`` and the
    method's projections and neuron masks (safetensors), into a temporary sibling directory
    that replaces ``out_dir`` only once everything is written."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the saved model is an ordinary directory
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
        for name, tensors in ((PROJECTIONS, projections), (MASKS, masks)):
            if tensors:
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / name))
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def write_text_atomic(path: Path | str, text: str) -> Path:
    """Write ``text`` through a temporary sibling file, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: Path | str, payload: dict) -> Path:
    """``payload`` as indented JSON, atomically (:func:`write_text_atomic`)."""
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl_atomic(path: Path | str, rows: list[dict]) -> Path:
    """One JSON object per line, atomically."""
    return write_text_atomic(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def save_figure_atomic(fig, path: Path | str, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG through a temporary file and a rename, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def check_causal_lm(path: Path) -> None:
    """ValueError unless ``path`` holds a decoder-only causal LM that transformers knows."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{path}/config.json cannot be read as a transformers config "
                         f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{path} holds a {config.model_type!r} model, not a decoder-only causal LM "
                         "(AutoModelForCausalLM would load only part of it)")


def load_local(path: Path | str, dtype=None):
    """A causal LM and its tokenizer from a local directory (no network), in eval mode.

    Saved MRP projections are re-attached as forward hooks, saved SIMU neuron masks are put
    on ``model.unlearn_masks``. Tokenizers without a padding token get their end-of-text
    token as padding."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..ops import projection_hook
    from .layers import decoder_layers

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    check_causal_lm(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if (path / PROJECTIONS).is_file():
        layers = decoder_layers(model)
        for key, basis in load_file(str(path / PROJECTIONS)).items():
            layers[int(key.split(".")[1])].register_forward_hook(projection_hook(basis))
    if (path / MASKS).is_file():
        model.unlearn_masks = load_file(str(path / MASKS))
    return model.eval(), tokenizer
