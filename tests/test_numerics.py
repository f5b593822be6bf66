"""Numerics of the statistics: merging many batches keeps the variance (fp64 merges, checked
against numpy in float64), and hand-built Moments are validated the same way on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unlearn_kernels.ops import Moments, feature_importance, masked_moments


def test_merging_1000_batches_at_mean_over_sigma_1e6_keeps_the_variance():
    """Batch moments computed exactly (numpy, float64) and merged 1,000 times: the merged mean
    and variance equal numpy's over all rows (the merge itself adds no fp32 rounding)."""
    rng = np.random.default_rng(0)
    total, rows = None, []
    for _ in range(1000):
        x = 1e6 + rng.standard_normal((16, 8))
        rows.append(x)
        part = Moments(torch.tensor(16), torch.from_numpy(x.mean(0)), torch.from_numpy(((x - x.mean(0)) ** 2).sum(0)))
        total = part if total is None else total.merge(part)
    data = np.concatenate(rows)
    assert total.mean.dtype == torch.float64 and int(total.count) == 16000
    np.testing.assert_allclose(total.mean.numpy(), data.mean(0), rtol=1e-13)
    np.testing.assert_allclose(total.variance().numpy(), data.var(0), rtol=1e-7)


def test_fp32_batches_merge_in_fp64():
    gen = torch.Generator().manual_seed(1)
    parts = [masked_moments((100.0 + torch.randn(32, 4, generator=gen)).float(), backend="torch") for _ in range(50)]
    total = parts[0]
    for p in parts[1:]:
        total = total.merge(p)
    assert total.mean.dtype == torch.float64 and total.m2.dtype == torch.float64
    # the importance map reads merged (fp64) moments
    other = masked_moments(torch.randn(64, 4, generator=gen), backend="torch")
    assert feature_importance(total, other, 0.5, backend="torch").dtype == torch.float32


@pytest.mark.parametrize("fields, message", [
    ((torch.tensor(3), torch.zeros(4), torch.zeros(5)), "mean and m2 must be \\[d\\] vectors of one length"),
    ((torch.tensor(3.0), torch.zeros(4), torch.zeros(4)), "count must be an int64 scalar"),
    ((torch.tensor(3), torch.zeros(4, dtype=torch.int32), torch.zeros(4)), "mean must be float32 or float64"),
    ((torch.tensor(3), torch.zeros(2, 2), torch.zeros(2, 2)), "must be \\[d\\] vectors"),
])
def test_hand_built_moments_are_checked(fields, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Moments(*fields)


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_misdirection_loss_scales_before_summing(backend):
    """Every term of h = 1e19 is 1e38 (fp32 holds up to 3.4e38): the mean fits, the sum would not."""
    from unlearn_kernels.ops import _backend, misdirection_loss

    dtype = torch.bfloat16 if backend != "triton" else torch.float32
    if not _backend.available(backend, torch.device("cpu"), dtype):
        pytest.skip(f"{backend} unavailable here")
    h = torch.full((8, 64), 1e19, dtype=dtype)
    loss = misdirection_loss(h, torch.zeros(64), backend=backend)
    expected = float(h[0, 0].double()) ** 2
    assert torch.isfinite(loss) and float(loss) == pytest.approx(expected, rel=1e-5)
    small = torch.randn(5, 7, 16)
    assert float(misdirection_loss(small.to(dtype), torch.full((16,), 0.5), backend=backend)) == pytest.approx(
        float(((small.to(dtype).float() - 0.5) ** 2).mean()), rel=1e-5)
