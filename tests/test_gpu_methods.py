"""Every LLM method for a few steps on CUDA in bf16 with fp32 masters: it runs there, its fused
ops ran on the CUDA or Triton backend (not the torch fallback), and the weights stay bf16.
Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from unlearn_kernels.data import entangled
from unlearn_kernels.methods import registry
from unlearn_kernels.models import tiny
from unlearn_kernels.ops import _backend

pytestmark = pytest.mark.gpu

# each method's fused ops: RMU-family misdirection (+ moments/importance), MRP Gram + projection,
# SIMU Hessian EMA + neuron scores + masked Sophia, SO-GradDiff masked Sophia
FUSED = ["RMU", "AdaptiveRMU", "SRMU", "MRP", "SIMU", "SO-GradDiff"]


@pytest.mark.parametrize("name", sorted(registry))
def test_method_runs_on_cuda_in_bf16(name, monkeypatch):
    used = []
    resolve = _backend.resolve

    def recording(backend, device, dtype):
        chosen = resolve(backend, device, dtype)
        used.append((chosen, device.type))
        return chosen

    monkeypatch.setattr(_backend, "resolve", recording)
    model, tokenizer = tiny.load(dtype=torch.bfloat16)
    model.to("cuda")
    bench = entangled.generate(0.25)
    settings = {"stats_batches": 2, "train_steps": 2} if name == "MRP" else {"steps": 3, "master_dtype": "float32"}
    if name == "SIMU":
        settings["score_batches"] = 2
    method = registry[name](model, tokenizer, batch_size=4, progress=False, **settings)
    method.fit(bench.corpus(bench.forget_facts()), bench.corpus(bench.retain_facts()))
    report = method.report()
    assert report["device"].startswith("cuda") and report["dtype"] == "bfloat16"
    assert all(p.dtype == torch.bfloat16 and p.is_cuda for p in model.parameters())
    if name in FUSED:
        assert used and all(device == "cuda" for _, device in used)
        assert {backend for backend, _ in used} <= {"cuda", "triton"}, used
    if name != "MRP":
        assert report["updated_parameters"]
        assert all(m.dtype == torch.float32 for m in method.optimized.values())
