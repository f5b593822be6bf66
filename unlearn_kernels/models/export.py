"""Exporting projection-edited models (MRP) so that no loader can mistake them for the original.

MRP changes no weight: it projects the residual stream after decoder layer ``l``,
``h ← h − (h U) Uᵀ``. A folder holding the unchanged base weights, a base ``config.json`` and
the bases beside them would load, in any standard loader (``AutoModelForCausalLM``,
lm-eval, vLLM), as the *original* model, silently. So a folder with projections is written as
a model type of its own:

``config.json``
    the base config's fields, plus

    - ``"model_type": "unlearn_kernels_projected"`` and
      ``"architectures": ["UnlearnProjectedForCausalLM"]``;
    - ``"base_model_type"`` and ``"base_architectures"``: the base architecture;
    - ``"unlearning"``: ``method`` (from the report), ``layers_module`` (the decoder-layer
      list, e.g. ``model.layers``), ``projections`` (``"<l>": {"file", "key", "rank",
      "scale"}``), ``edit``, ``produced_by``, ``loading`` (how to load it);
    - ``"auto_map"``: ``AutoConfig`` / ``AutoModelForCausalLM`` →
      ``modeling_unlearn.UnlearnProjected{Config,ForCausalLM}``.
``modeling_unlearn.py``
    the modeling code (the package's ``models/modeling_unlearn.py`` with the base
    architecture filled in): plain torch + transformers + safetensors, subclasses the base
    class and registers the projection hooks on load (its docstring explains why the bases
    stay in their own fp32 file rather than in the state dict).
``unlearn_projections.safetensors``
    ``"layer.<l>"`` → ``U`` (fp32), as before.
``model*.safetensors``, tokenizer files, ``generation_config.json``
    unchanged, in the base layout.

``report.json`` (when a report is given) gets ``"loading"`` (:func:`loading_info`):
``trust_remote_code: true`` and how to load the folder.

Loading: ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` (and lm-eval's
``HFLM(pretrained=dir, trust_remote_code=True)``) gives the unlearned model; without
``trust_remote_code`` transformers raises (unknown ``model_type``, custom code: "Please pass
the argument `trust_remote_code=True`"; on a terminal it first asks "Do you wish to run the
custom code? [y/N]" for 15 s, and only a "y" loads it); ``unlearn_kernels.models.io.load_local`` builds the
base architecture from the recorded base config and attaches the hooks itself, without
running the folder's code.

Why the projection is never folded into the weights
    Folding would mean finding standard weights W' with ``f_{W'} = f_W ∘ (hook)``, exactly.
    In a residual network the output of layer ``l`` is the stream
    ``x_l = x_{l−1} + attn_l(·) + mlp_l(·)``, and ``P = I − UUᵀ`` must act on all of it.

    - Before the stream: ``P x_l = P x_{l−1} + P attn_l + P mlp_l``. The last two terms fold
      into ``o_proj``/``down_proj`` of layer ``l`` (``W ← P W``, biases too), but ``P x_{l−1}``
      would need ``P`` on every earlier write to the stream (embeddings, all earlier
      ``o_proj``/``down_proj``), which changes the inputs of layers ``0..l`` themselves. Not
      exact.
    - After the stream: ``x_l`` reaches every later layer twice, through a normalisation
      (``RMSNorm(P x) = P x / rms(P x) · g``: ``rms(P x) ≠ rms(x)``, so ``P`` does not commute
      with it and cannot move into the next ``q/k/v``/``gate``/``up`` weights) and through the
      identity skip connection, which has no weight to absorb ``P``; later layers then add
      new components along ``U`` that must survive, so no change of basis of the stream
      helps either (``P`` is singular). The last layer is no exception (final norm, then the
      head); post-norm blocks are not either (``P(γ ⊙ n + β)`` is not a norm's affine map,
      and the next block's skip path again carries ``P`` with no weight).

    So for the pre-norm and post-norm causal LMs transformers ships, an exact folding does
    not exist, and an approximate one would silently change the model: this module never
    folds; the edit is always carried by the modeling code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MissingFileError, UserError

MODEL_TYPE = "unlearn_kernels_projected"
ARCHITECTURE = "UnlearnProjectedForCausalLM"
CONFIG_CLASS = "UnlearnProjectedConfig"
MODELING_FILE = "modeling_unlearn.py"
PROJECTIONS = "unlearn_projections.safetensors"
TEMPLATE = Path(__file__).resolve().with_name(MODELING_FILE)
_OUR_KEYS = ("base_model_type", "base_architectures", "unlearning", "auto_map")
LOAD_HINT = ("AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True), "
             "lm_eval HFLM(pretrained=dir, trust_remote_code=True), or unlearn_kernels.models.io.load_local(dir)")


def loading_info(projected: bool) -> dict:
    """The ``"loading"`` entry of report.json."""
    if not projected:
        return {"format": "transformers", "trust_remote_code": False,
                "how": "AutoModelForCausalLM.from_pretrained(dir)"}
    return {"format": MODEL_TYPE, "trust_remote_code": True, "how": LOAD_HINT,
            "without_trust_remote_code": "standard loaders refuse the folder (unknown model_type "
                                         f"{MODEL_TYPE!r}); they never load the base model in its place",
            "modeling_file": MODELING_FILE, "projections_file": PROJECTIONS}


def render_modeling_file(base_model_type: str, base_architecture: str) -> str:
    """The template with this folder's base architecture filled in."""
    text = TEMPLATE.read_text(encoding="utf-8")
    for name, value in (("BASE_MODEL_TYPE", base_model_type), ("BASE_ARCHITECTURE", base_architecture)):
        text, n = re.subn(rf"^{name} = .*$", f"{name} = {json.dumps(value)}", text, count=1, flags=re.M)
        if n != 1:
            raise RuntimeError(f"{TEMPLATE} has no line '{name} = ...' to fill in")
    return text


def layers_module_name(model) -> str:
    """Dotted name of the decoder-layer list inside ``model`` (e.g. ``model.layers``)."""
    from .layers import decoder_layers

    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise ValueError(f"the decoder-layer list of {type(model).__name__} is not one of its submodules")


def parse_projections(projections: dict, num_layers: int, hidden_size: int) -> dict[int, torch.Tensor]:
    """``{"layer.<l>": U}`` → ``{l: U fp32}``, checked (layer index, shape)."""
    bases = {}
    for key, basis in projections.items():
        match = re.fullmatch(r"layer\.(\d+)", str(key))
        if match is None:
            raise UserError(f"projection key {key!r}: expected 'layer.<index>'")
        layer = int(match.group(1))
        if not 0 <= layer < num_layers:
            raise UserError(f"projection {key!r}: the model has {num_layers} decoder layers (0..{num_layers - 1})")
        if not isinstance(basis, torch.Tensor) or basis.dim() != 2 or basis.shape[0] != hidden_size \
                or not 1 <= basis.shape[1] <= hidden_size:
            shape = tuple(basis.shape) if isinstance(basis, torch.Tensor) else type(basis).__name__
            raise UserError(f"projection {key!r}: expected a [{hidden_size}, r] basis, got {shape}")
        bases[layer] = basis.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return dict(sorted(bases.items()))


def _check_base(config: dict) -> tuple[str, list[str]]:
    """(base model_type, base architectures) of a base config dict that transformers ships."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if "auto_map" in config or model_type not in CONFIG_MAPPING:
        raise UserError(f"cannot export projections on a {model_type!r} model with custom code: the exported "
                        "modeling file subclasses a causal LM that transformers itself ships")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"cannot export projections on a {model_type!r} model: not a causal LM of transformers")
    architectures = list(config.get("architectures") or [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]])
    if not hasattr(transformers, architectures[0]):
        raise UserError(f"transformers has no class {architectures[0]!r} (base architecture of the model)")
    return model_type, architectures


def base_config_dict(config: dict) -> dict:
    """The base config dict inside a projected ``config.json`` dict (or the dict itself)."""
    if config.get("model_type") != MODEL_TYPE:
        return dict(config)
    base = {k: v for k, v in config.items() if k not in _OUR_KEYS}
    base["model_type"] = config["base_model_type"]
    base["architectures"] = list(config["base_architectures"])
    return base


def check_projections(model, projections: dict) -> dict[int, torch.Tensor]:
    """Validate ``projections`` for ``model`` (keys, layer indices, shapes, a base
    architecture the modeling file can subclass) before anything is written; ``{l: U}``."""
    from .layers import decoder_layers

    _check_base(base_config_dict(model.config.to_dict()))
    return parse_projections(projections, len(decoder_layers(model)), getattr(model.config, "hidden_size", None))


def write_projected(folder: Path, model, projections: dict, method: str | None = None) -> dict:
    """Turn ``folder`` (``model.save_pretrained`` output) into a projected-model folder.

    Rewrites ``config.json``, writes ``modeling_unlearn.py`` and the bases; returns the
    ``unlearning`` entry written into the config."""
    from safetensors.torch import save_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    base = base_config_dict(config)
    base_type, architectures = _check_base(base)
    bases = check_projections(model, projections)
    keys = {layer: f"layer.{layer}" for layer in bases}
    unlearning = {
        "method": method, "produced_by": "unlearn_kernels", "edit": "h <- h - (h U) U^T after decoder layer l",
        "layers_module": layers_module_name(model),
        "projections": {str(layer): {"file": PROJECTIONS, "key": keys[layer], "rank": int(u.shape[1]), "scale": 1.0}
                        for layer, u in bases.items()},
        "loading": LOAD_HINT,
    }
    config = {**base, "model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "base_model_type": base_type,
              "base_architectures": architectures, "unlearning": unlearning,
              "auto_map": {"AutoConfig": f"{MODELING_FILE[:-3]}.{CONFIG_CLASS}",
                           "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{ARCHITECTURE}"}}
    save_file({keys[layer]: u for layer, u in bases.items()}, str(folder / PROJECTIONS))
    (folder / MODELING_FILE).write_text(render_modeling_file(base_type, architectures[0]), encoding="utf-8")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return unlearning


@dataclass
class ProjectedFolder:
    """What :func:`read_projected` finds in a projected-model folder."""

    path: Path
    config: dict          # the whole config.json
    base: dict            # the base config dict (base model_type and architectures restored)

    @property
    def unlearning(self) -> dict:
        return self.config["unlearning"]

    def base_config(self):
        """The base ``PretrainedConfig`` (``CONFIG_MAPPING[base_model_type]``)."""
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        _check_base(self.base)
        fields = {k: v for k, v in self.base.items() if k != "transformers_version"}
        return CONFIG_MAPPING[self.base["model_type"]].from_dict(fields)

    def bases(self) -> dict[int, torch.Tensor]:
        """``{layer: U}`` as listed in the config, from the files it names (checked)."""
        from safetensors.torch import load_file

        files = {}
        bases = {}
        for layer, entry in self.unlearning["projections"].items():
            name = entry["file"]
            if Path(name).name != name:
                raise UserError(f"{self.path}/config.json: projection file {name!r} must be in the folder")
            if name not in files:
                if not (self.path / name).is_file():
                    raise MissingFileError(f"{self.path}: config.json lists projections in {name}, which is missing")
                files[name] = load_file(str(self.path / name))
            if entry["key"] not in files[name]:
                raise UserError(f"{self.path}/{name} has no tensor {entry['key']!r} (listed in config.json)")
            u = files[name][entry["key"]]
            if tuple(u.shape)[1:] != (entry["rank"],):
                raise UserError(f"{self.path}/{name}: {entry['key']!r} has shape {tuple(u.shape)}, "
                                f"config.json says rank {entry['rank']}")
            bases[int(layer)] = u
        return bases


def read_projected(path: Path | str) -> ProjectedFolder | None:
    """The projected-model description of the folder at ``path``, or None for any other folder."""
    from .folder_paths import read_config

    path = Path(path)
    config = read_config(path)
    if config.get("model_type") != MODEL_TYPE:
        return None
    missing = [k for k in ("base_model_type", "base_architectures", "unlearning") if k not in config]
    if missing:
        raise UserError(f"{path}/config.json has model_type {MODEL_TYPE!r} but no {', '.join(missing)}")
    return ProjectedFolder(path, config, base_config_dict(config))
