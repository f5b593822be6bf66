"""The public fused ops of unlearn_kernels (definitions in each function's docstring).

Every op takes ``backend="auto" | "cuda" | "triton" | "cpu" | "torch"``.
"""

from ._backend import backends
from .class_means import class_means
from .disruption_mask import disruption_mask, disruption_mask_
from .hessian import gauss_newton_pairs, hessian_ema_, hutchinson_pairs
from .low_rank import low_rank_project, masked_gram, projection_hook
from .low_rank_basis import forget_basis, grow_basis, retain_subspace
from .misdirection import masked_edit, misdirection_loss
from .moments import Moments, feature_importance, feature_scores, masked_moments
from .neuron_scores import neuron_scores, select_neurons, select_neurons_per_layer
from .sophia import masked_sophia_step_

__all__ = [
    "Moments",
    "backends",
    "class_means",
    "disruption_mask",
    "disruption_mask_",
    "feature_importance",
    "feature_scores",
    "forget_basis",
    "gauss_newton_pairs",
    "grow_basis",
    "hessian_ema_",
    "hutchinson_pairs",
    "low_rank_project",
    "masked_edit",
    "masked_gram",
    "masked_moments",
    "masked_sophia_step_",
    "misdirection_loss",
    "neuron_scores",
    "projection_hook",
    "retain_subspace",
    "select_neurons",
    "select_neurons_per_layer",
]
