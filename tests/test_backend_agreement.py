"""Backends agree on the valid corner cases that used to split them: zero-row inputs whose
last dim is not unit-stride, and fp64 activations with an fp32 basis."""

from __future__ import annotations

import pytest
import torch

from unlearn_kernels.ops import (_backend, class_means, disruption_mask, disruption_mask_, low_rank_project,
                                 masked_edit, masked_gram, masked_moments)

CPU_BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not _backend.available(b, torch.device("cpu"), torch.float32),
                                                         reason=f"{b} unavailable here"))
                for b in ("cpu", "torch", "triton")]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_rows_with_a_strided_last_dim(backend):
    x = torch.randn(0, 12)[:, ::2]                       # [0, 6], last-dim stride 2
    assert x.stride(-1) == 2
    u, _ = torch.linalg.qr(torch.randn(6, 2))
    stats = masked_moments(x, backend=backend)
    assert int(stats.count) == 0 and torch.equal(stats.mean, torch.zeros(6))
    assert torch.equal(masked_gram(x, backend=backend), torch.zeros(6, 6))
    assert masked_edit(x, torch.rand(6), torch.rand(6), backend=backend).shape == (0, 6)
    assert low_rank_project(x, u, backend=backend).shape == (0, 6)
    means, counts = class_means(x, torch.zeros(0, dtype=torch.long), 3, backend=backend)
    assert means.shape == (3, 6) and int(counts.sum()) == 0
    out, kept = disruption_mask(x, x, 2.0, return_kept=True, backend=backend)
    assert out.shape == (0, 6) and int(kept) == 0
    assert int(disruption_mask_(x, x, 2.0, return_kept=True, backend=backend)[1]) == 0


@pytest.mark.parametrize("backend", [b for b in ("cpu", "torch") if _backend.available(b, torch.device("cpu"),
                                                                                         torch.float64)])
def test_fp64_activations_with_an_fp32_basis(backend):
    x = torch.randn(5, 8, dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(8, 3))
    y = low_rank_project(x, u, backend=backend)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, x - (x @ u.double()) @ u.double().T)
