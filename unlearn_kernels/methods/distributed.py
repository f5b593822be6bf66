"""Data parallelism for the methods over ``torch.distributed`` (launched by ``torchrun``).

A run on ``W`` ranks equals the single-process run on the same global batches. Every rank
draws the same global batch (same seed, same order), tokenises it as one batch (so its padding
is the single process's) and keeps rows ``r·b/W … (r+1)·b/W − 1`` (``b`` = ``batch_size``,
which ``W`` must divide). Then, with ``n_r`` the tokens (or rows) a loss term averages over on
rank ``r`` and ``N = Σ_r n_r``:

- each loss term is ``mean_r · n_r / N`` (:func:`global_mean`), so the terms of all ranks sum
  to the single-process mean over the global batch;
- gradients of the updated weights are summed across ranks (:func:`sum_gradients`), which
  gives the single-process gradient (an FSDP2 model's own reduce-scatter averages them, and the
  average is scaled by ``W``);
- statistics that choose what to change are sums over tokens reduced before use (:func:`total`
  on Gram matrices, activation norms, Fisher diagonals; ``Moments.all_reduce`` for SRMU's
  moments), so the selection is computed from the same numbers on every rank.

Reduction order: each reduction is one ``all_reduce`` (sum) of fp64 copies (fp32 and bf16
values are exact in fp64, and sums of two to eight fp64 values of one sign are order-free to
~1e-16), then rounded once to the original dtype; the per-rank parts themselves are the
single process's sums split at the rank boundaries. Results therefore agree with one process
to float rounding (1e-6 relative in fp32), and discrete selections (SIMU's neuron masks,
MRP's rank) exactly unless two candidates tie within that rounding.

Dropout draws differ between a split and an unsplit batch: runs with dropout active are not
world-size invariant (the models here are trained without dropout).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError


def active() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` (the methods sum gradients themselves, so
    they call the inner module; DDP's own hooks do nothing when its ``forward`` is not used).
    An FSDP2 model (``fully_shard``) is used as it is: its layers gather their weights in
    forward and reduce-scatter (average) the gradients in backward."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    """True for a model with FSDP2-sharded (DTensor) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (DTensor) one (a collective: every rank must call it); the
    tensor itself otherwise."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole tensor of ``value``, a parameter's or optimizer-state tensor of ``param``: a
    DTensor's full tensor; a plain tensor holding this rank's shard of a sharded ``param``
    (MaskedSophia keeps its state so) gathered along ``param``'s placement; anything else (a
    step counter, an unsharded tensor) itself. A collective when ``param`` is sharded."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return full(value)
    if isinstance(param, DTensor) and value.dim() and value.shape == param.to_local().shape:
        return DTensor.from_local(value, param.device_mesh, param.placements, shape=param.shape,
                                  stride=param.stride()).full_tensor()
    return value


def shard_like(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The inverse for a checkpoint: a floating tensor of ``param``'s global shape becomes a
    DTensor laid out as ``param`` (scattered from rank 0; every rank must call it); anything else
    (counters, masks) is returned as it is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if (isinstance(param, DTensor) and whole.is_floating_point() and whole.dim()
            and tuple(whole.shape) == tuple(param.shape)):
        return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements)
    return whole


def check_batch_size(method: str, batch_size: int) -> None:
    """UserError when the world size does not divide the global batch."""
    w = world_size()
    if batch_size % w:
        raise UserError(f"{method}: batch_size={batch_size} is not divisible by the world size {w}; "
                        f"choose a multiple of {w} (each rank takes batch_size / world_size rows)")


def local_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's rows of a tokenised global batch."""
    w = world_size()
    if w == 1:
        return batch
    n = next(iter(batch.values())).shape[0]
    start, stop = rank() * n // w, (rank() + 1) * n // w
    return {k: v[start:stop] for k, v in batch.items()}


def total(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (fp64 all_reduce, rounded once to ``t``'s dtype); ``t`` itself
    in one process. Not differentiable: for statistics and counts."""
    if not active():
        return t
    wide = t.detach().to(torch.float64 if t.is_floating_point() else torch.int64).clone()
    dist.all_reduce(wide)
    return wide.to(t.dtype)


def global_mean(local_mean: torch.Tensor, local_count) -> torch.Tensor:
    """This rank's share ``mean_r · n_r / N`` of a mean over the global batch (``N = Σ n_r``);
    the mean itself in one process. Differentiable in ``local_mean``."""
    if not active():
        return local_mean
    count = torch.as_tensor(local_count, dtype=torch.float64, device=local_mean.device)
    n = total(count)
    return local_mean * (count / n.clamp(min=1)).to(local_mean.dtype)


def sum_gradients(params) -> None:
    """Sum the ``.grad`` of ``params`` over the ranks (a missing gradient counts as zero on that
    rank; one that is missing on every rank stays None)."""
    if not active():
        return
    from torch.distributed.tensor import DTensor

    params = list(params)
    if not params:
        return
    for p in params:     # FSDP2 reduce-scattered these already, averaging: the sum is W times that
        if isinstance(p, DTensor) and p.grad is not None:
            p.grad.mul_(world_size())
    params = [p for p in params if not isinstance(p, DTensor)]
    if not params:
        return
    present = total(torch.tensor([p.grad is not None for p in params], dtype=torch.int64, device=params[0].device))
    for p, n in zip(params, present.tolist()):
        if n == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grad = p.grad.to(torch.float64)
        dist.all_reduce(grad)
        p.grad.copy_(grad)


def summed_values(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """The loss terms summed over the ranks as floats (each rank holds its share of the global
    mean, so the sum is the global value; NaN anywhere is NaN everywhere)."""
    if not values:
        return {}
    packed = total(torch.stack([v.detach().double().reshape(()) for v in values.values()]))
    return dict(zip(values, packed.tolist()))
