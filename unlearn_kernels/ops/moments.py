"""Statistics family: masked per-feature moments and SRMU's activation importance map.

``masked_moments(x, token_mask)`` returns :class:`Moments` ``(count, mean, M2)`` over the
valid tokens, where ``M2_j = Σ_t (x_tj − mean_j)²`` (fp32 results; merges are kept in fp64).
One batch keeps its accuracy at mean/σ = 1e6 and for rows near fp32's limit: the compiled CPU
kernel accumulates in fp64; the torch, Triton and CUDA kernels work in fp32 on rows shifted by
a pivot (the first valid row) and scaled by 1/8, ``c = x/8 − p/8``, with Welford/Chan updates
(or convex-combination sums) that never form a sum larger than the values. A mean that fits
in fp32 is returned finite; an M2 that does not fit is +inf, never NaN. Two sets merge exactly (Chan et al.)::

    n = n_a + n_b,   δ = mean_b − mean_a,
    mean = mean_a + δ · n_b / n,   M2 = M2_a + M2_b + δ² · n_a n_b / n

so moments can be gathered batch by batch and across ranks.

``feature_importance(stats_forget, stats_retain, sparsity)`` scores each feature by how
well it separates forget from retain activations (a Fisher ratio)::

    s_j = (μ_f,j − μ_r,j)² / (σ²_f,j + σ²_r,j + ε)

and turns the scores into a sparse soft mask keeping about ``k = round(sparsity · d)``
features: with ``τ`` the geometric mean of the k-th and (k+1)-th largest scores,
``m_j = sigmoid((log s_j − log τ) / temperature)``, so kept features sit above 1/2 and the
rest below; ``temperature = 0`` (or ``hard=True``) gives the exact top-k 0/1 mask. Working
in log-scores makes the mask independent of the activations' scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import _backend, _validation as check
from ._registration import register


@dataclass(frozen=True)
class Moments:
    """Per-feature ``count`` (int64 scalar tensor), ``mean`` and ``m2`` (``[d]``: fp32 from one
    batch, fp64 once merged). Checked when built: a hand-made one with a wrong-length ``m2``,
    a non-integer count or a non-floating mean is refused on every backend alike."""

    count: Tensor
    mean: Tensor
    m2: Tensor

    def __post_init__(self):
        for name in ("count", "mean", "m2"):
            if not isinstance(getattr(self, name), Tensor):
                raise TypeError(f"Moments.{name} must be a torch.Tensor, got {type(getattr(self, name)).__name__}")
        if self.count.dim() != 0 or self.count.dtype != torch.int64:
            raise ValueError(f"Moments.count must be an int64 scalar tensor, got {self.count.dtype} "
                             f"shape {tuple(self.count.shape)}")
        if self.mean.dim() != 1 or self.mean.shape != self.m2.shape:
            raise ValueError(f"Moments.mean and m2 must be [d] vectors of one length, got {tuple(self.mean.shape)} "
                             f"and {tuple(self.m2.shape)}")
        for name in ("mean", "m2"):
            if getattr(self, name).dtype not in (torch.float32, torch.float64):
                raise TypeError(f"Moments.{name} must be float32 or float64, got {getattr(self, name).dtype}")
        if not (self.count.device == self.mean.device == self.m2.device):
            raise ValueError("Moments.count, mean and m2 must be on one device")

    @classmethod
    def empty(cls, d: int, device: torch.device | str = "cpu") -> "Moments":
        zeros = torch.zeros(d, dtype=torch.float32, device=device)
        return cls(torch.zeros((), dtype=torch.int64, device=device), zeros, zeros.clone())

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def merge(self, other: "Moments") -> "Moments":
        """Moments of the union of both token sets (Chan's formula, no host sync), kept in
        fp64: merging many batches at a large mean/σ (1e6) would lose the variance to fp32
        rounding of the mean."""
        if not isinstance(other, Moments):
            raise TypeError(f"other must be Moments, got {type(other).__name__}")
        if other.dim != self.dim:
            raise ValueError(f"other has d={other.dim}, self has d={self.dim}")
        na = self.count.to(torch.float64)
        nb = other.count.to(torch.float64)
        n = na + nb
        safe_n = torch.clamp(n, min=1)
        mean_a, mean_b = self.mean.to(torch.float64), other.mean.to(torch.float64)
        delta = mean_b - mean_a
        mean = mean_a + delta * nb / safe_n
        m2 = self.m2.to(torch.float64) + other.m2.to(torch.float64) + delta * delta * na * nb / safe_n
        return Moments(self.count + other.count, mean, m2)

    def variance(self, unbiased: bool = False) -> Tensor:
        """``M2 / n`` (or ``/ (n − 1)``); ValueError when too few tokens were seen."""
        n = int(self.count)
        if n < 1 + int(unbiased):
            raise ValueError(f"variance needs at least {1 + int(unbiased)} tokens, these moments hold {n}")
        return self.m2 / (n - int(unbiased))

    def all_reduce(self, group=None) -> "Moments":
        """Merge the moments of every rank of ``group`` (same result, same order, on all ranks)."""
        import torch.distributed as dist

        world = dist.get_world_size(group)
        packed = torch.cat([self.count.to(torch.float64).view(1), self.mean.double(), self.m2.double()])
        gathered = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(gathered, packed, group=group)
        total = Moments.empty(self.dim, self.mean.device)
        for p in gathered:
            total = total.merge(Moments(p[0].round().to(torch.int64), p[1:1 + self.dim], p[1 + self.dim:]))
        return total


# Power-of-two scale of the shifted rows in the fp32 kernels (torch, triton, cuda): exact, and
# it keeps |(x - pivot) / 8| and every difference of two such values inside fp32's range.
_SHIFT_SCALE = 0.125


def _moments_torch(x: Tensor, token_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Reference kernel: two-pass mean and centred M2 in fp32 (fp64 for fp64 input), with the
    mask as 0/1 weights (no data-dependent shapes, so it traces under ``torch.compile``).

    The rows are shifted by a pivot ``p`` (the first valid row) and scaled by ``s = 1/8``,
    ``c = s x − s p``, and the mean of ``c`` is summed as ``Σ c · (w / n)`` (a convex
    combination, so no partial sum leaves the range of the values)::

        mean = (s p + mean_c) / s,      M2 = Σ_valid (c − mean_c)² / s²

    so the mean of rows near 3e38 stays finite, and at mean/σ = 1e6 the centred terms are
    exact differences. An M2 beyond fp32's range comes out as +inf (never NaN)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = x.to(acc)
    if token_mask is None:
        weights = torch.ones(rows.shape[0], 1, dtype=acc, device=x.device)
        count = torch.tensor(rows.shape[0], dtype=torch.int64, device=x.device)
    else:
        weights = token_mask.to(acc).view(-1, 1)
        count = token_mask.sum().to(torch.int64)
    if rows.shape[0] == 0:
        zeros = rows.new_zeros(rows.shape[1], dtype=torch.float32)
        return count, zeros, zeros.clone()
    if token_mask is None:
        first = torch.zeros(1, dtype=torch.int64, device=x.device)
    else:  # the first valid row (row 0 when there is none; the mean is zeroed then)
        first = torch.argmax(token_mask.to(torch.uint8)).view(1)
    s = _SHIFT_SCALE
    pivot = rows.index_select(0, first) * s
    c = rows * s - pivot
    valid = weights.sum()
    frac = weights / valid.clamp(min=1)
    mean_c = (c * frac).sum(dim=0)
    m2 = (((c - mean_c) * weights) ** 2).sum(dim=0) / (s * s)
    mean = torch.where(valid > 0, (pivot[0] + mean_c) / s, 0.0)  # no valid row: zeros
    return count, mean.float(), m2.float()


def _feature_scores_torch(mean_f: Tensor, var_f: Tensor, mean_r: Tensor, var_r: Tensor,
                          eps: float) -> Tensor:
    """Reference kernel: ``(μ_f − μ_r)² / (σ²_f + σ²_r + ε)``."""
    return (mean_f - mean_r) ** 2 / (var_f + var_r + eps)


@torch.library.custom_op("unlearn_kernels::triton_masked_moments", mutates_args=())
def _moments_triton(x: Tensor, token_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    from ..triton import masked_moments

    return masked_moments(x, token_mask)


@torch.library.custom_op("unlearn_kernels::triton_feature_scores", mutates_args=())
def _feature_scores_triton(mean_f: Tensor, var_f: Tensor, mean_r: Tensor, var_r: Tensor,
                           eps: float) -> Tensor:
    from ..triton import feature_scores

    return feature_scores(mean_f, var_f, mean_r, var_r, eps)


def _moments_fake(x, token_mask):
    d = x.shape[1]
    return (x.new_empty((), dtype=torch.int64), x.new_empty(d, dtype=torch.float32),
            x.new_empty(d, dtype=torch.float32))


def _feature_scores_fake(mean_f, var_f, mean_r, var_r, eps):
    return torch.empty_like(mean_f)


def _moments_setup(ctx, inputs, output):
    x, token_mask = inputs
    count, mean, _ = output
    ctx.save_for_backward(x, token_mask, count, mean)


def _moments_kernel_backward(ctx, _grad_count, grad_mean, grad_m2):
    """``mean = Σ_valid x / n`` and ``M2 = Σ_valid (x − mean)²``: ``∂/∂x_t = g_mean / n +
    2 g_M2 (x_t − mean)`` on valid rows (the ``mean`` inside ``M2`` contributes
    ``−2 g_M2 Σ(x − mean)/n = 0``)."""
    x, token_mask, count, mean = ctx.saved_tensors
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = count.to(acc).clamp(min=1)
    grad = grad_mean.to(acc) / n + 2 * grad_m2.to(acc) * (x.to(acc) - mean.to(acc))
    grad = grad.expand_as(x) if grad.shape != x.shape else grad
    if token_mask is not None:
        grad = torch.where(token_mask.view(-1, 1), grad, 0)
    return grad.to(x.dtype), None


def _feature_scores_setup(ctx, inputs, output):
    mean_f, var_f, mean_r, var_r, eps = inputs
    ctx.save_for_backward(mean_f, var_f, mean_r, var_r, output)
    ctx.eps = eps


def _feature_scores_kernel_backward(ctx, grad):
    """``s = δ² / D`` with ``δ = μ_f − μ_r``, ``D = σ²_f + σ²_r + ε``: ``∂s/∂μ_f = 2δ/D = −∂s/∂μ_r``,
    ``∂s/∂σ²_f = ∂s/∂σ²_r = −s / D``."""
    mean_f, var_f, mean_r, var_r, scores = ctx.saved_tensors
    denominator = var_f + var_r + ctx.eps
    d_mean = grad * 2 * (mean_f - mean_r) / denominator
    d_var = -grad * scores / denominator
    return d_mean, d_var, -d_mean, d_var, None


register("masked_moments", _moments_fake, _moments_kernel_backward, _moments_setup)
register("feature_scores", _feature_scores_fake, _feature_scores_kernel_backward, _feature_scores_setup)


def _kernels(backend: str):
    """(masked_moments, feature_scores) implementations of ``backend``."""
    if backend == "torch":
        return _moments_torch, _feature_scores_torch
    if backend == "triton":
        return _moments_triton, _feature_scores_triton
    return _backend.compiled_op("masked_moments"), _backend.compiled_op("feature_scores")


def masked_moments(x: Tensor, token_mask: Tensor | None = None, *, backend: str = "auto") -> Moments:
    """Per-feature count, mean and M2 of ``x`` ``[..., d]`` over the tokens ``token_mask`` keeps.

    One pass over ``x`` (fp32 accumulation). A mask that keeps nothing gives count 0 and
    zero mean/M2; :meth:`Moments.variance` then refuses. Merge batches with
    :meth:`Moments.merge` and ranks with :meth:`Moments.all_reduce`.

    Example:
        >>> stats = masked_moments(torch.randn(4, 10, 32))
        >>> stats = stats.merge(masked_moments(torch.randn(2, 10, 32)))
        >>> int(stats.count), stats.variance().shape
        (60, torch.Size([32]))
    """
    check.activations("x", x)
    mask = check.token_mask(token_mask, x, "x")
    name = _backend.resolve(backend, x.device, x.dtype)
    count, mean, m2 = _kernels(name)[0](check.rows_view(x.detach()), mask)
    return Moments(count, mean, m2)


def feature_scores(stats_forget: Moments, stats_retain: Moments, eps: float = 1e-6, *,
                   backend: str = "auto") -> Tensor:
    """Fisher separability ``(μ_f − μ_r)² / (σ²_f + σ²_r + ε)`` per feature (fp32 ``[d]``)."""
    for name, stats in (("stats_forget", stats_forget), ("stats_retain", stats_retain)):
        if not isinstance(stats, Moments):
            raise TypeError(f"{name} must be Moments (from masked_moments), got {type(stats).__name__}")
    if stats_forget.dim != stats_retain.dim:
        raise ValueError(f"stats_retain has d={stats_retain.dim} but stats_forget has d={stats_forget.dim}")
    check.same_device("stats_retain", stats_retain.mean, stats_forget.mean, "stats_forget")
    eps = check.finite_scalar("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    var_f = _nonempty_variance("stats_forget", stats_forget)
    var_r = _nonempty_variance("stats_retain", stats_retain)
    name = _backend.resolve(backend, stats_forget.mean.device, torch.float32)
    f32 = torch.float32   # merged moments are fp64; the score kernels read fp32
    return _kernels(name)[1](stats_forget.mean.to(f32).contiguous(), var_f, stats_retain.mean.to(f32).contiguous(),
                             var_r, eps)


def _nonempty_variance(name: str, stats: Moments) -> Tensor:
    if int(stats.count) == 0:
        raise ValueError(f"{name} holds no token: the importance map needs activations from both sets")
    return stats.variance().to(torch.float32).contiguous()


def feature_importance(stats_forget: Moments, stats_retain: Moments, sparsity: float = 0.1, *,
                       temperature: float = 0.25, hard: bool = False, eps: float = 1e-6,
                       backend: str = "auto") -> Tensor:
    """SRMU's activation importance map ``m ∈ [0, 1]^d`` (see the module docstring).

    Args:
        stats_forget, stats_retain: :class:`Moments` of the loss layer's activations on
            forget and retain tokens.
        sparsity: fraction of features to keep, in (0, 1].
        temperature: softness of the mask in log-score units (0 = hard top-k).
        hard: exact top-k 0/1 mask regardless of ``temperature``.
        eps: variance floor of the score's denominator.

    Example:
        >>> f = masked_moments(torch.randn(64, 16) + torch.arange(16) / 8)
        >>> r = masked_moments(torch.randn(64, 16))
        >>> m = feature_importance(f, r, sparsity=0.25, hard=True)
        >>> int(m.sum())
        4
    """
    sparsity = check.finite_scalar("sparsity", sparsity)
    if not 0 < sparsity <= 1:
        raise ValueError(f"sparsity must be in (0, 1], got {sparsity}")
    temperature = check.finite_scalar("temperature", temperature)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    scores = feature_scores(stats_forget, stats_retain, eps, backend=backend)
    d = scores.shape[0]
    k = min(d, max(1, round(sparsity * d)))
    top = torch.topk(scores, min(d, k + 1))
    if hard or temperature == 0 or k == d:
        mask = torch.zeros_like(scores)
        mask[top.indices[:k]] = 1.0
        return mask
    tiny = torch.finfo(torch.float32).tiny
    log_tau = 0.5 * (torch.log(top.values[k - 1] + tiny) + torch.log(top.values[k] + tiny))
    return torch.sigmoid((torch.log(scores + tiny) - log_tau) / temperature)
