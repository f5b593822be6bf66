"""One rank of the world-size invariance test (``tests/test_distributed.py``), started by
``torchrun --nproc-per-node N`` or as a plain single process.

Runs each method given on the command line on the shipped model with the same global batch
and seed, the model plain (one process), DDP-wrapped or FSDP2-sharded (several;
``UK_PARALLEL=ddp|fsdp``), and rank 0 writes what each
run chose and changed: the updated weights, SIMU's masks, MRP's basis, SRMU's importance map,
the control vector and the loss history, to ``OUT/<method>.safetensors`` and ``.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from unlearn_kernels import parallel
from unlearn_kernels.data.entangled import generate
from unlearn_kernels.methods import registry
from unlearn_kernels.methods.distributed import full
from unlearn_kernels.models import tiny

SMALL = {"RMU": {"steps": 4}, "AdaptiveRMU": {"steps": 4}, "SRMU": {"steps": 4, "stats_batches": 3},
         "MRP": {"stats_batches": 3, "train_steps": 3}, "SIMU": {"steps": 4, "score_batches": 3},
         "GradDiff": {"steps": 4}, "NPO": {"steps": 4}, "SO-GradDiff": {"steps": 4}}


def run(name: str, out: Path) -> None:
    torch.manual_seed(0)
    model, tokenizer = tiny.load()
    bench = generate(0.25)
    forget, retain = bench.corpus(bench.forget_facts()), bench.corpus(bench.retain_facts())
    mode = os.environ.get("UK_PARALLEL", "ddp") if parallel.launched() else "none"
    method = registry[name](parallel.wrap(model, mode), tokenizer, batch_size=4, progress=False, **SMALL[name])
    method.fit(forget, retain)
    gathered = {n: full(p) for n, p in method.params.items()}      # a collective under FSDP2
    if not parallel.is_main():
        return
    tensors = {f"param.{n}": p.detach().float().contiguous() for n, p in gathered.items()}
    tensors.update({f"mask.{n}": m.to(torch.uint8).contiguous() for n, m in method.saved_masks().items()})
    tensors.update({f"basis.{n}": u.contiguous() for n, u in method.projections().items()})
    for attr in ("importance", "control"):
        if getattr(method, attr, None) is not None:
            tensors[attr] = getattr(method, attr).detach().float().cpu().contiguous()
    save_file(tensors, str(out / f"{name}.safetensors"))
    (out / f"{name}.json").write_text(json.dumps({"history": method.history,
                                                  "world_size": dist.get_world_size() if dist.is_initialized() else 1}))


def main() -> None:
    out, names = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    if parallel.launched():
        dist.init_process_group("gloo")
    try:
        for name in names:
            run(name, out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
