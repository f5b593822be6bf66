"""Numerics of the statistics: merging many batches keeps the variance (fp64 merges, checked
against numpy in float64), hand-built Moments are validated the same way on every backend, and
one batch keeps its accuracy at mean/σ = 1e6 and a finite mean near fp32's limit (moments and
class means) on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import FP32_BACKENDS, device_of
from unlearn_kernels.ops import Moments, class_means, feature_importance, masked_moments


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


# ---- one batch: accuracy at mean/σ = 1e6 and range near fp32's limit, on every backend ----


def _reference_moments(x: np.ndarray, keep: np.ndarray):
    rows = x[keep].astype(np.float64)
    mean = rows.mean(0)
    return rows.shape[0], mean, ((rows - mean) ** 2).sum(0)


@pytest.mark.parametrize("masked", [False, True], ids=["all-rows", "masked"])
@pytest.mark.parametrize("backend", FP32_BACKENDS)
def test_one_batch_keeps_the_variance_at_mean_over_sigma_1e6(backend, masked):
    """fp32 rows 1e6 + N(0, 1) (odd shape; with a mask that drops the first rows, so the
    first valid row is not row 0): mean and variance equal numpy's float64 moments of the
    same fp32 values. An fp32 sum (or Welford mean) at 1e6 loses 0.2-2 % of the variance."""
    rng = np.random.default_rng(11)
    x = (1e6 + rng.standard_normal((4099, 37))).astype(np.float32)
    keep = rng.random(4099) < 0.7 if masked else np.ones(4099, dtype=bool)
    keep[:5] = not masked
    dev = device_of(backend)
    mask = torch.from_numpy(keep).to(dev) if masked else None
    stats = masked_moments(torch.from_numpy(x).to(dev), mask, backend=backend)
    count, mean, m2 = _reference_moments(x, keep)
    assert int(stats.count) == count
    np.testing.assert_allclose(stats.mean.double().cpu().numpy(), mean, rtol=1e-7)
    np.testing.assert_allclose(stats.m2.double().cpu().numpy(), m2, rtol=1e-4)


def _near_fp32_limit():
    """(name, rows) with a mean that fits in fp32 though the column sums do not."""
    mixture = np.tile(np.array([[2e38], [-2e38], [2e38], [2e38]], dtype=np.float32), (17, 9))
    return [("all-3e38", np.full((67, 9), 3e38, dtype=np.float32)),
            ("mixture-2e38", mixture),
            ("mixed-sizes", np.concatenate([np.full((40, 9), 3.3e38, np.float32),
                                            np.full((23, 9), -1e30, np.float32),
                                            np.full((5, 9), 1.5, np.float32)]))]


@pytest.mark.parametrize("case", [c[0] for c in _near_fp32_limit()])
@pytest.mark.parametrize("backend", FP32_BACKENDS)
def test_moments_near_fp32_limit_give_a_finite_mean_and_never_nan(backend, case):
    """Rows near 3e38: the mean fits in fp32 and is returned finite (numpy float64 to 1e-6);
    M2 is numpy's where it fits and +inf where it does not (documented), never NaN."""
    x = dict(_near_fp32_limit())[case]
    stats = masked_moments(torch.from_numpy(x).to(device_of(backend)), backend=backend)
    _, mean, m2 = _reference_moments(x, np.ones(x.shape[0], dtype=bool))
    got_mean = stats.mean.double().cpu().numpy()
    got_m2 = stats.m2.double().cpu().numpy()
    assert np.isfinite(got_mean).all()
    np.testing.assert_allclose(got_mean, mean, rtol=1e-6)
    assert not np.isnan(got_m2).any()
    fits = m2 <= np.finfo(np.float32).max
    np.testing.assert_allclose(got_m2[fits], m2[fits], rtol=1e-5)
    assert np.isposinf(got_m2[~fits]).all()


@pytest.mark.parametrize("backend", FP32_BACKENDS)
def test_class_means_near_fp32_limit_are_finite(backend):
    """Per-class means of features near 3e38 (and of mixtures whose sums overflow fp32) fit in
    fp32 and are returned finite, equal to numpy's float64 means; an empty class stays 0."""
    rng = np.random.default_rng(5)
    n, d, classes = 203, 19, 5
    labels = rng.integers(0, classes - 1, n)  # the last class stays empty
    x = np.where(rng.random((n, d)) < 0.8, 3e38, -2e38).astype(np.float32)
    x[labels == 1] = 3.2e38
    dev = device_of(backend)
    means, counts = class_means(torch.from_numpy(x).to(dev), torch.from_numpy(labels).to(dev), classes,
                                backend=backend)
    expected = np.zeros((classes, d))
    for c in range(classes - 1):
        expected[c] = x[labels == c].astype(np.float64).mean(0)
    got = means.double().cpu().numpy()
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert counts.tolist() == np.bincount(labels, minlength=classes).tolist()
