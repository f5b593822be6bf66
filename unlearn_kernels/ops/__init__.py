"""The public fused ops of unlearn_kernels (definitions in each function's docstring).

Every op takes ``backend="auto" | "cuda" | "triton" | "cpu" | "torch"``.
"""

from ._backend import backends
from .misdirection import masked_edit, misdirection_loss
from .moments import Moments, feature_importance, feature_scores, masked_moments
from .sophia import masked_sophia_step_

__all__ = [
    "Moments",
    "backends",
    "feature_importance",
    "feature_scores",
    "masked_edit",
    "masked_moments",
    "masked_sophia_step_",
    "misdirection_loss",
]
