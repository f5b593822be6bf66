"""The public fused ops of unlearn_kernels (definitions in each function's docstring).

Every op takes ``backend="auto" | "cuda" | "triton" | "cpu" | "torch"``.
"""

from ._backend import backends
from .low_rank import low_rank_project, masked_gram, projection_hook
from .low_rank_basis import forget_basis, grow_basis, retain_subspace
from .misdirection import masked_edit, misdirection_loss
from .moments import Moments, feature_importance, feature_scores, masked_moments
from .sophia import masked_sophia_step_

__all__ = [
    "Moments",
    "backends",
    "feature_importance",
    "feature_scores",
    "forget_basis",
    "grow_basis",
    "low_rank_project",
    "masked_edit",
    "masked_gram",
    "masked_moments",
    "masked_sophia_step_",
    "misdirection_loss",
    "projection_hook",
    "retain_subspace",
]
