"""unlearn_kernels: fused CUDA/Triton/C++ kernels and methods for machine unlearning.

>>> import unlearn_kernels as uk
>>> sorted(name for name, ok in uk.backends("cpu").items() if ok)  # doctest: +SKIP
['cpu', 'torch']
"""

from . import ops
from ._extension import compiled, compiled_with_cuda
from .ops import backends
from .optim import MaskedSophia

__version__ = "0.1.0"
__all__ = ["MaskedSophia", "backends", "compiled", "compiled_with_cuda", "ops", "__version__"]
