"""``unlearn-kernels unlearn`` under ``torchrun``: the process group, the model's wrapping, and
which rank talks.

    torchrun --nproc-per-node 2 -m unlearn_kernels.cli unlearn --model M --method RMU \\
        --forget f.txt --retain r.txt --out out/ --parallel ddp

``torchrun`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; each rank joins the default group
(NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``; gloo on the CPU), loads the model, wraps it
in ``DistributedDataParallel`` (which also broadcasts rank 0's weights) and runs the method on
its rows of every global batch (``methods.distributed``); ``--parallel fsdp`` shards the model
with FSDP2 instead. Rank 0 alone prints and
writes the output folder. An error raises on every rank that meets it; rank 0 prints it in one line, and
``torchrun`` stops the other ranks when one exits non-zero, so none is left waiting.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import UserError

MODES = ("none", "ddp", "fsdp")


def launched() -> bool:
    """True when this process is one of several started by ``torchrun``."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main() -> bool:
    """Rank 0 of a ``torchrun`` launch, or the only process (read from the environment, so it
    holds before the group is joined and after it is left)."""
    return int(os.environ.get("RANK", "0")) == 0


def let_rank0_speak(seconds: float = 10.0) -> None:
    """On a rank other than 0 that is about to exit with an error, wait a moment: ``torchrun``
    stops every rank as soon as one exits, and rank 0, which prints the error, may be a little
    behind (it exits first when it meets the error too, ending the wait)."""
    if launched() and not is_main():
        import time

        time.sleep(seconds)


def resolve_mode(mode: str | None) -> str:
    """``--parallel``: none outside ``torchrun``, ddp (the default) under it, or fsdp."""
    if mode is None:
        mode = "ddp" if launched() else "none"
    if mode not in MODES:
        raise UserError(f"--parallel must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "none" and not launched():
        raise UserError(f"--parallel {mode} needs several processes: launch with torchrun --nproc-per-node N")
    if mode == "none" and launched():
        raise UserError("--parallel none under torchrun would run the method once per rank: use ddp")
    return mode


@contextmanager
def process_group(mode: str, device: str):
    """Join the default group for the block (nothing for ``none``); yields this rank's device."""
    if mode == "none":
        yield device
        return
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(minutes=30))
    try:
        yield device
    finally:
        dist.destroy_process_group()


def wrap(model, mode: str):
    """The model as the methods receive it: DDP-wrapped under ``ddp`` (they call its module and
    sum the gradients of the few updated weights themselves); under ``fsdp`` every decoder
    layer and then the whole model ``fully_shard``-ed (FSDP2: each rank holds 1/W of every
    weight, a layer gathers its weights while it runs)."""
    if mode == "none":
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from .models.layers import decoder_layers

        for layer in decoder_layers(model):
            fully_shard(layer)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
