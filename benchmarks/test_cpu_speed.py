"""pytest-benchmark group: compiled C++ backend vs eager PyTorch on the CPU.

    .venv/bin/python -m pytest benchmarks/ --benchmark-enable --benchmark-group-by=group
"""

import pytest
import torch

from unlearn_kernels import benchmark
from unlearn_kernels.ops import masked_moments, misdirection_loss

ROWS, D = 4096, 1024


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(ROWS, D, generator=g).requires_grad_(True)
    return h, torch.randn(ROWS, D, generator=g), torch.randn(D, generator=g), torch.rand(D, generator=g)


def _fused(h, control, importance, anchor, backend):
    h.grad = None
    misdirection_loss(h, control, importance, anchor, backend=backend).backward()


@pytest.mark.benchmark(group="misdirection SRMU fwd+bwd, 4096x1024 fp32")
@pytest.mark.parametrize("impl", ["cpu", "eager"])
def test_misdirection(benchmark_fixture_alias, impl, inputs):
    h, anchor, control, importance = inputs
    if impl == "eager":
        benchmark_fixture_alias(benchmark._misdirection_eager, h, control, importance, anchor)
    else:
        benchmark_fixture_alias(_fused, h, control, importance, anchor, "cpu")


@pytest.mark.benchmark(group="masked_moments, 4096x1024 fp32")
@pytest.mark.parametrize("impl", ["cpu", "eager"])
def test_moments(benchmark_fixture_alias, impl, inputs):
    x = inputs[0].detach()
    if impl == "eager":
        benchmark_fixture_alias(benchmark._moments_eager, x)
    else:
        benchmark_fixture_alias(masked_moments, x, backend="cpu")


@pytest.fixture
def benchmark_fixture_alias(benchmark):
    """pytest-benchmark's fixture, renamed so it does not hide the unlearn_kernels.benchmark module."""
    return benchmark
