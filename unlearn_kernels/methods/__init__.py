"""LLM unlearning methods: one small class each over the fused ops, one shared interface
(``Method(model, tokenizer, config, **overrides).fit(forget_texts, retain_texts)``)."""

from .base import MethodConfig, UnlearningMethod
from .loss_based import NPO, GradAscent, GradDiff, LossConfig, NPOConfig
from .rmu import RMU, SRMU, AdaptiveRMU, AdaptiveRMUConfig, RMUConfig, SRMUConfig

registry: dict[str, type[UnlearningMethod]] = {
    cls.name: cls for cls in (RMU, AdaptiveRMU, SRMU, GradAscent, GradDiff, NPO)
}

__all__ = ["AdaptiveRMU", "AdaptiveRMUConfig", "GradAscent", "GradDiff", "LossConfig", "MethodConfig", "NPO",
           "NPOConfig", "RMU", "RMUConfig", "SRMU", "SRMUConfig", "UnlearningMethod", "registry"]
