"""An unlearned causal LM: its base architecture plus orthogonal projections of the residual stream.

This file was written into the model folder by ``unlearn_kernels`` (MRP, Metamorphosis
Representation Projection). It is self-contained: plain ``torch``, ``transformers`` and
``safetensors``; nothing here imports ``unlearn_kernels``.

What the folder holds
    The weights (``model*.safetensors``) are the base model's, unchanged and in the base
    layout. The unlearning is an edit of the forward pass: after each listed decoder layer
    ``l`` the residual stream is projected off a forget subspace::

        h ← h − (h U_l) U_lᵀ,      U_l ∈ R^{d×r_l},  U_lᵀ U_l = I

    ``config.json`` lists the projections under ``"unlearning" → "projections"`` (layer
    index → file, key, rank); the bases are stored in fp32 in
    ``unlearn_projections.safetensors`` (key ``"layer.<l>"``). ``"base_model_type"`` and
    ``"base_architectures"`` name the base architecture; the other config fields are the
    base config's.

How it loads
    ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` returns an
    :class:`UnlearnProjectedForCausalLM`: a subclass of the base class named below
    (``BASE_ARCHITECTURE``), so it has the same modules, parameter names, forward and
    ``generate``. Its ``from_pretrained`` then reads the bases and registers one forward
    hook per projected layer. Without ``trust_remote_code`` transformers refuses the folder
    (its ``model_type`` is not one transformers knows): it never loads the base model
    silently in place of the unlearned one.

Why the bases live in their own file and not as buffers of the state dict
    The weight files stay exactly the base model's (a loader of the base architecture, such
    as ``unlearn_kernels.models.io.load_local``, reads them without unexpected keys), and the
    bases stay fp32 whatever dtype the model is loaded or cast in (a basis rounded to bf16
    is no longer orthonormal). ``save_pretrained`` writes the file back, so a model loaded
    from here and saved again keeps its projections. The projection itself runs in fp32
    (fp64 for fp64 activations) and returns the activations' dtype.

A model built with ``from_config`` (random weights) has no bases attached; its
``save_pretrained`` refuses to write a folder whose config lists projections it lacks.
"""

from __future__ import annotations

import os

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# The base architecture of this folder (written by the exporter).
BASE_MODEL_TYPE = "llama"
BASE_ARCHITECTURE = "LlamaForCausalLM"

MODEL_TYPE = "unlearn_kernels_projected"
PROJECTIONS_FILE = "unlearn_projections.safetensors"
ORTHONORMAL_TOL = 1e-4   # max |UᵀU − I| accepted for an fp32 basis

BaseConfig = CONFIG_MAPPING[BASE_MODEL_TYPE]
BaseForCausalLM = getattr(transformers, BASE_ARCHITECTURE)


class UnlearnProjectedConfig(BaseConfig):
    """The base config plus ``base_model_type``, ``base_architectures`` and ``unlearning``."""

    model_type = MODEL_TYPE


class ResidualProjection:
    """Forward hook ``h ← h − scale · (h U) Uᵀ`` on a decoder layer's output (its first element
    when the layer returns a tuple), computed in fp32 (fp64 for fp64 activations)."""

    def __init__(self, basis: torch.Tensor, scale: float = 1.0):
        self.basis = basis.detach().to(torch.float32).contiguous()
        self.scale = float(scale)
        self._copies = {}

    def _basis_like(self, h: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
        key = (h.device, dtype)
        if key not in self._copies:
            self._copies[key] = self.basis.to(device=h.device, dtype=dtype)
        return self._copies[key]

    def project(self, h: torch.Tensor) -> torch.Tensor:
        u = self._basis_like(h)
        hf = h.to(u.dtype)
        return (hf - self.scale * ((hf @ u) @ u.T)).to(h.dtype)

    def __call__(self, module, inputs, output):
        if isinstance(output, torch.Tensor):
            return self.project(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (self.project(output[0]),) + tuple(output[1:])
        raise TypeError(f"cannot project the output of {type(module).__name__} ({type(output).__name__})")


def read_bases(path: str, config) -> dict[int, torch.Tensor]:
    """The bases listed in ``config.unlearning["projections"]`` from the file at ``path``,
    checked: shape ``[hidden_size, rank]``, orthonormal columns, nothing missing or extra."""
    spec = config.unlearning["projections"]
    tensors = load_file(path)
    keys = {entry["key"] for entry in spec.values()}
    if set(tensors) != keys:
        raise ValueError(f"{path} holds {sorted(tensors)}, config.json lists {sorted(keys)}")
    bases = {}
    for layer, entry in spec.items():
        u = tensors[entry["key"]]
        if u.dim() != 2 or u.shape != (config.hidden_size, entry["rank"]):
            raise ValueError(f"{entry['key']}: shape {tuple(u.shape)}, "
                             f"expected ({config.hidden_size}, {entry['rank']})")
        u64 = u.to(torch.float64)
        error = float((u64.T @ u64 - torch.eye(u.shape[1], dtype=torch.float64)).abs().max())
        if not error <= ORTHONORMAL_TOL:
            raise ValueError(f"{entry['key']}: the basis is not orthonormal (max |UᵀU − I| = {error:.3g})")
        bases[int(layer)] = u.to(torch.float32)
    return bases


def _take_base_weight_renamings() -> None:
    """transformers 5 renames some checkpoint keys on load and back on save, looked up by class
    name or ``model_type`` (GPT-NeoX's ``embed_out`` -> ``lm_head``). This class reads the base
    architecture's checkpoints, so it takes the base's renamings (registered again before every
    load and save: each projected folder's file defines a class of this name)."""
    try:
        from transformers import conversion_mapping
    except ImportError:        # transformers 4: no renamings
        return
    renamings = (conversion_mapping.get_checkpoint_conversion_mapping(BASE_ARCHITECTURE)
                 or conversion_mapping.get_checkpoint_conversion_mapping(BASE_MODEL_TYPE))
    if renamings:
        conversion_mapping.register_checkpoint_conversion_mapping("UnlearnProjectedForCausalLM", renamings,
                                                                  overwrite=True)


class UnlearnProjectedForCausalLM(BaseForCausalLM):
    """The base causal LM with ``h ← h − (h U_l) U_lᵀ`` after the listed decoder layers."""

    config_class = UnlearnProjectedConfig

    def __init__(self, config):
        super().__init__(config)
        self.unlearn_projections = {}   # layer index -> fp32 basis (not in the state dict)
        self._projection_handles = {}

    def attach_projections(self, bases: dict[int, torch.Tensor]) -> None:
        """Register (or replace) the projection hooks, one per layer index in ``bases``."""
        layers = self.get_submodule(self.config.unlearning["layers_module"])
        spec = self.config.unlearning["projections"]
        for layer, basis in bases.items():
            if self._projection_handles.get(layer) is not None:
                self._projection_handles.pop(layer).remove()
            hook = ResidualProjection(basis, spec[str(layer)].get("scale", 1.0))
            self._projection_handles[layer] = layers[layer].register_forward_hook(hook)
            self.unlearn_projections[layer] = hook.basis

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        from transformers.utils import cached_file

        hub = {k: kwargs[k] for k in ("cache_dir", "force_download", "local_files_only", "token", "revision",
                                      "subfolder", "proxies") if kwargs.get(k) is not None}
        _take_base_weight_renamings()
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        path = cached_file(pretrained_model_name_or_path, PROJECTIONS_FILE, **hub)
        model.attach_projections(read_bases(path, model.config))
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        if kwargs.get("push_to_hub"):
            raise ValueError("save_pretrained(push_to_hub=True) would upload the folder before "
                             f"{PROJECTIONS_FILE} is written: save locally, then upload the whole folder")
        listed = {int(k) for k in self.config.unlearning["projections"]}
        if set(self.unlearn_projections) != listed:
            raise ValueError(f"config.json lists projections after layers {sorted(listed)}, the model has "
                             f"{sorted(self.unlearn_projections)}: refusing to save a folder that would "
                             "load differently from this model")
        _take_base_weight_renamings()
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            spec = self.config.unlearning["projections"]
            save_file({spec[str(layer)]["key"]: u.cpu().contiguous() for layer, u in self.unlearn_projections.items()},
                      os.path.join(save_directory, PROJECTIONS_FILE))
