"""LLM unlearning methods: one small class each over the fused ops, one shared interface
(``Method(model, tokenizer, config, **overrides).fit(forget_texts, retain_texts)``).

Each class declares its :class:`~unlearn_kernels.methods.spec.MethodSpec` (``cls.spec``: its typed
config, length and knobs, prefix-only running, what it saves, its memory model); ``registry``
maps the names to the classes, and the rest of the package reads the specs through it."""

from .base import MethodConfig, UnlearningMethod
from .loss_based import NPO, GradAscent, GradDiff, LossConfig, NPOConfig
from .mrp import MRP, MRPConfig
from .simu import SIMU, SIMUConfig, SOGradDiff, SOGradDiffConfig
from .rmu import RMU, SRMU, AdaptiveRMU, AdaptiveRMUConfig, RMUConfig, SRMUConfig
from .tar import TAR, TARConfig

registry: dict[str, type[UnlearningMethod]] = {
    cls.name: cls for cls in (RMU, AdaptiveRMU, SRMU, MRP, SIMU, SOGradDiff, GradAscent, GradDiff, NPO, TAR)
}

__all__ = ["AdaptiveRMU", "AdaptiveRMUConfig", "GradAscent", "GradDiff", "LossConfig", "MRP", "MRPConfig", "MethodConfig", "NPO",
           "NPOConfig", "RMU", "RMUConfig", "SIMU", "SIMUConfig", "SOGradDiff", "SOGradDiffConfig", "SRMU", "SRMUConfig", "TAR", "TARConfig", "UnlearningMethod", "registry"]
