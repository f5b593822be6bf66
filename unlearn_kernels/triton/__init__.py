"""Triton kernels of unlearn_kernels: the fused misdirection loss and gradient, the masked
edit, masked per-feature moments and feature scores, the disruption mask. Plain launchers, no
autograd or input checks; they run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``."""

from .disruption_mask import disruption_mask
from .misdirection import masked_edit, misdirection_fwd_bwd
from .moments import feature_scores, masked_moments

__all__ = ["disruption_mask", "feature_scores", "masked_edit", "masked_moments", "misdirection_fwd_bwd"]
