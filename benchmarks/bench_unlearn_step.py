"""One unlearning step, ours vs the reference loops: median step time and peak memory (issue 12, item 5).

Every configuration runs in its own process (this script calls itself with ``--child``); the
parent saves each random-initialised Llama once as sharded safetensors, collects one JSON
record per child and prints a markdown table with the ratios ``reference / ours``.

What runs (``l`` = ``--layer``, default 7 at every depth: WMDP's ``layer_id``, RMU's default on
32 layers; the update band is the MLPs of layers ``l−2 … l``):

- ``reference`` RMU — a faithful re-implementation of WMDP's ``rmu/unlearn.py``: two full models
  (``from_pretrained`` twice: the frozen one and the live one), every forward the whole model
  (layers above ``l`` and the LM head included, ``use_cache`` at its default) with a forward hook
  on layer ``l`` recording its output (``forward_with_cache``), the loss::

      L = mean_{t,j} (h_f − c·u)²  +  α · mean_{t,j} (h_r − h₀_r)²        (F.mse_loss)

  with ``u = rand(d) / ‖rand(d)‖``, ``h₀`` from the frozen model under ``no_grad``, and AdamW
  (torch's default weight decay 0.01) on ``layers[i].parameters()[6]`` (the MLP down-projection)
  for ``i ∈ {l−2, l−1, l}``. As in the script, nothing turns ``requires_grad`` off on the other
  weights, so backward computes the gradients of every weight below ``l`` (and the embedding).
- ``reference`` SRMU — the same loop and style for selective RMU: ``c = β · mean_t ‖h₀_f‖`` and the
  importance map ``m = feature_importance(M_f, M_r)`` from the frozen model's activations (the
  package's plain-PyTorch ops, once, untimed); step loss
  ``mean_{t,j} m_j (h_f − c·u)_j² + α · mse(h_r, h₀_r)``.
- ``reference`` SIMU — the same style for SIMU: one full model; neuron masks from the Fisher
  diagonal ``(1 − β) g²`` of one forget and one retain batch and the OBD saliency
  ``s = ½ Σ h w²`` (top ``fraction`` by ``s_f / (s_r + ε)``, untimed); step loss GradDiff
  ``−NLL_f + γ NLL_r`` through ``model(**inputs, labels=input_ids).loss``, Sophia-G per tensor in a
  Python loop with the update multiplied by the neuron mask (``h ← β₂h + (1−β₂)g²`` every
  ``hessian_interval`` steps).
- ``ours`` — ``unlearn_kernels.methods`` RMU / SRMU / SIMU with default settings
  (``share_prefix=True``; ``steering``, ``alpha``, ``lr``, band and, for SRMU/SIMU, one statistics
  batch set equal to the reference's), the whole model loaded by ``models.io.load_local``.
- ``ours-prefix`` (RMU, SRMU) — only the embeddings and layers ``0 … l`` in memory, loaded by
  ``models.prefix.load_prefix`` (what ``unlearn --prefix-only`` runs); the record's ``loading``
  says so.

Measured per child: the time of every optimisation step (tokenisation, forwards, backward,
optimizer; ``cuda.synchronize`` on GPUs), the median after ``--warmup`` steps; the peak memory:
the child's ``VmHWM`` (peak resident set of its own address space: interpreter, weights,
activations; ``ru_maxrss`` would carry the parent's peak across ``fork``/``exec``) on the CPU and
``torch.cuda.max_memory_allocated`` on CUDA; the losses of every step (the first one from
identical weights must agree between ``reference`` and ``ours``, ``tests/test_bench_unlearn_step.py``).
The texts are random words of a word-level tokenizer, every one exactly ``--seq`` tokens (no
padding, so masked and unmasked means coincide), forget and retain one batch each.

    python benchmarks/bench_unlearn_step.py                      # CPU: 8/16/32 layers, hidden 1024, fp32 + bf16
    python benchmarks/bench_unlearn_step.py --device cuda        # Mistral-7B shape, bf16, 4 x 512 tokens
    python benchmarks/bench_unlearn_step.py --quick              # tiny smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {   # hidden, intermediate, heads, kv heads, vocab
    "cpu": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16,
                vocab_size=32000),
    "cuda": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=32000),      # Mistral-7B
    "quick": dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=4,
                  vocab_size=512),
}
PRESETS = {
    "cpu": dict(depths=[8, 16, 32], dtypes=["float32", "bfloat16"], layer=7, batch=4, seq=64, warmup=1, steps=2),
    "cuda": dict(depths=[32], dtypes=["bfloat16"], layer=7, batch=4, seq=512, warmup=2, steps=5),
    "quick": dict(depths=[4], dtypes=["float32"], layer=2, batch=2, seq=16, warmup=1, steps=2),
}
IMPLS = {"RMU": ("reference", "ours", "ours-prefix"), "SRMU": ("reference", "ours", "ours-prefix"),
         "SIMU": ("reference", "ours")}
STEERING, ALPHA = 6.5, 1200.0       # WMDP's published Zephyr-7B setting (c, α)
BETA, SPARSITY, TEMPERATURE = 5.0, 0.4, 0.1   # SRMU's defaults
SEED = 0


# --- the data and the models ----------------------------------------------------------------
def words(vocab_size: int) -> list[str]:
    return [f"w{i}" for i in range(min(vocab_size - 4, 2000))]


def texts(vocab_size: int, batch: int, seq: int, seed: int) -> list[str]:
    """``batch`` texts of ``seq`` random words (``seq`` tokens each with the word-level tokenizer)."""
    rng = random.Random(seed)
    vocab = words(vocab_size)
    return [" ".join(rng.choice(vocab) for _ in range(seq)) for _ in range(batch)]


def build_model(out: Path, depth: int, shape: dict, shard: str, device: str = "cpu") -> None:
    """A random Llama of ``depth`` layers saved (shards of ``shard``) with its tokenizer: fp32 when
    built on the CPU, bf16 when built on a GPU (the 7B shape: initialised there, in seconds)."""
    import torch
    import transformers as tf

    from unlearn_kernels.models import tiny

    torch.manual_seed(SEED)
    config = tf.LlamaConfig(num_hidden_layers=depth, max_position_embeddings=4096, tie_word_embeddings=False,
                            pad_token_id=0, bos_token_id=2, eos_token_id=3, **shape)
    with torch.device(device):
        model = tf.LlamaForCausalLM(config)
    (model if device == "cpu" else model.to(torch.bfloat16)).save_pretrained(out, max_shard_size=shard)
    tiny.build_tokenizer(words(shape["vocab_size"])).save_pretrained(out)


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_reference(path: str, dtype, device: str):
    """WMDP's ``load_model``: ``AutoModelForCausalLM.from_pretrained`` (+ tokenizer) on the device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unlearn_kernels.models.io import quiet_transformers

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                     **({"device_map": device} if device != "cpu" else {}))
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_prefix(path: str, dtype, layers: int):
    """Embeddings + decoder layers ``0 … layers−1`` (``models.prefix.load_prefix``, what
    ``--prefix-only`` runs): ``(model, tokenizer, how)``."""
    from unlearn_kernels.models import prefix

    model, tokenizer = prefix.load_prefix(path, layers, dtype)
    return model, tokenizer, "models.prefix.load_prefix"


# --- the reference loops ----------------------------------------------------------------------
def forward_with_cache(model, inputs, module, no_grad=True):
    """WMDP's ``forward_with_cache``: the whole model runs; a hook records ``module``'s output."""
    import torch

    cache = []

    def hook(_module, _input, output):
        cache.append(output[0] if isinstance(output, tuple) else output)

    handle = module.register_forward_hook(hook)
    if no_grad:
        with torch.no_grad():
            model(**inputs)
    else:
        model(**inputs)
    handle.remove()
    return cache[0]


def get_params(model, layer_ids, param_ids=(6,)):
    """WMDP's ``get_params``: parameter number 6 of each layer (Llama: ``mlp.down_proj.weight``)."""
    return [p for layer_id in layer_ids for i, p in enumerate(model.model.layers[layer_id].parameters())
            if i in param_ids]


def _tokens(tokenizer, batch, seq, device):
    return tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=seq).to(device)


def _control(d: int, scale: float, dtype, device):
    """``c · u``, ``u = rand(d)/‖rand(d)‖`` drawn as our RMU draws it (same seed, same numbers)."""
    import torch

    u = torch.rand(1, 1, d, generator=torch.Generator().manual_seed(SEED))
    return (u / u.norm() * scale).to(dtype=dtype, device=device)


def reference_rmu(spec: dict, forget: list[str], retain: list[str], timer, selective: bool = False,
                  weight_decay: float = 0.01) -> list[dict]:
    """WMDP's ``run_rmu`` loop (module docstring); ``selective`` gives the naive SRMU loop."""
    import torch
    import torch.nn.functional as F

    from unlearn_kernels.ops import feature_importance, masked_moments

    dtype, device, l = _dtype(spec["dtype"]), spec["device"], spec["layer"]
    frozen_model, tokenizer = load_reference(spec["model"], dtype, device)
    updated_model, tokenizer = load_reference(spec["model"], dtype, device)
    updated_model = updated_model.train()
    params = get_params(updated_model, range(max(0, l - 2), l + 1))
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=weight_decay)
    frozen_module, updated_module = frozen_model.model.layers[l], updated_model.model.layers[l]
    forget_inputs = _tokens(tokenizer, forget, spec["seq"], device)
    retain_inputs = _tokens(tokenizer, retain, spec["seq"], device)
    d = updated_model.config.hidden_size
    importance, scale = None, STEERING
    if selective:   # the map and c from the frozen model, once (not timed)
        h_f = forward_with_cache(frozen_model, forget_inputs, frozen_module)
        h_r = forward_with_cache(frozen_model, retain_inputs, frozen_module)
        scale = BETA * float(h_f.float().norm(dim=-1).mean())
        importance = feature_importance(masked_moments(h_f, backend="torch"), masked_moments(h_r, backend="torch"),
                                        SPARSITY, temperature=TEMPERATURE, backend="torch").to(dtype)
    control_vec = _control(d, scale, dtype, device)
    history = []
    for step in range(spec["warmup"] + spec["steps"]):
        with timer():
            unlearn_inputs = _tokens(tokenizer, forget, spec["seq"], device)
            updated_forget_activations = forward_with_cache(updated_model, unlearn_inputs, module=updated_module,
                                                            no_grad=False)
            if importance is None:
                unlearn_loss = F.mse_loss(updated_forget_activations, control_vec)
            else:
                unlearn_loss = (importance * (updated_forget_activations - control_vec) ** 2).mean()
            retain_inputs = _tokens(tokenizer, retain, spec["seq"], device)
            updated_retain_activations = forward_with_cache(updated_model, retain_inputs, module=updated_module,
                                                            no_grad=False)
            frozen_retain_activations = forward_with_cache(frozen_model, retain_inputs, module=frozen_module,
                                                           no_grad=True)
            retain_loss = F.mse_loss(updated_retain_activations, frozen_retain_activations) * ALPHA
            loss = unlearn_loss + retain_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append({"step": step, "forget": unlearn_loss.item(), "retain": retain_loss.item()})
    return history


def _nll(model, inputs):
    return model(**inputs, labels=inputs["input_ids"]).loss


def reference_simu(spec: dict, forget: list[str], retain: list[str], timer) -> list[dict]:
    """The naive SIMU loop (module docstring), with SIMU's default hyperparameters."""
    import torch

    from unlearn_kernels.methods import SIMUConfig

    c = SIMUConfig()
    dtype, device, l = _dtype(spec["dtype"]), spec["device"], spec["layer"]
    model, tokenizer = load_reference(spec["model"], dtype, device)
    model = model.train()
    band = range(max(0, l - 2), l + 1)
    mlps = [model.model.layers[i].mlp for i in band]
    params = [w for mlp in mlps for w in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)]
    axes = [0, 0, 1] * len(mlps)            # neuron axis: rows of gate/up, columns of down
    f_in, r_in = _tokens(tokenizer, forget, spec["seq"], device), _tokens(tokenizer, retain, spec["seq"], device)
    hess_f = [(1 - c.score_beta) * g.float() ** 2 for g in torch.autograd.grad(_nll(model, f_in), params)]
    hess_r = [(1 - c.score_beta) * g.float() ** 2 for g in torch.autograd.grad(_nll(model, r_in), params)]
    masks = []
    for w, hf, hr, axis in zip(params, hess_f, hess_r, axes):
        s_f, s_r = (0.5 * (hf * w.float() ** 2).sum(1 - axis), 0.5 * (hr * w.float() ** 2).sum(1 - axis))
        keep = torch.zeros(s_f.numel(), dtype=torch.bool, device=device)
        keep[torch.topk(s_f / (s_r.clamp(min=0) + 1e-8), max(1, round(c.fraction * s_f.numel()))).indices] = True
        masks.append(keep[:, None] if axis == 0 else keep[None, :])
    exp_avgs = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    hessians = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    (beta1, beta2), lr = c.betas, spec["lr"]
    history = []
    for step in range(spec["warmup"] + spec["steps"]):
        with timer():
            forget_loss = -_nll(model, _tokens(tokenizer, forget, spec["seq"], device))
            retain_loss = c.retain_weight * _nll(model, _tokens(tokenizer, retain, spec["seq"], device))
            for p in params:
                p.grad = None
            (forget_loss + retain_loss).backward()
            with torch.no_grad():
                for p, m, h, mask in zip(params, exp_avgs, hessians, masks):
                    g = p.grad.float()
                    if step % c.hessian_interval == 0:
                        h.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    m.copy_(torch.where(mask, beta1 * m + (1 - beta1) * g, m))
                    ratio = (m.abs() / (c.rho * h + 1e-15)).clamp(max=1)
                    update = p.float() * (1 - lr * c.weight_decay) - lr * m.sign() * ratio
                    p.copy_(torch.where(mask, update, p.float()))
            history.append({"step": step, "forget": forget_loss.item(), "retain": retain_loss.item()})
    return history


# --- ours -------------------------------------------------------------------------------------
def ours(spec: dict, forget: list[str], retain: list[str], timer) -> tuple[list[dict], str | None, int]:
    """Our method on the whole model (``ours``) or the prefix (``ours-prefix``): history, how it
    was loaded, and the number of decoder layers in memory."""
    from unlearn_kernels.methods import registry
    from unlearn_kernels.models.io import load_local

    dtype, l = _dtype(spec["dtype"]), spec["layer"]
    how = None
    if spec["impl"] == "ours-prefix":
        model, tokenizer, how = load_prefix(spec["model"], dtype, l + 1)
    else:
        model, tokenizer = load_local(spec["model"], dtype=dtype)
    model.to(spec["device"])
    band = "{" + ",".join(str(i) for i in range(max(0, l - 2), l + 1)) + "}"
    common = dict(steps=spec["warmup"] + spec["steps"], batch_size=spec["batch"], max_length=spec["seq"],
                  lr=spec["lr"], seed=SEED, progress=False)
    settings = {
        "RMU": dict(layer=l, steering=STEERING, alpha=ALPHA),
        "SRMU": dict(layer=l, alpha=ALPHA, beta=BETA, sparsity=SPARSITY, temperature=TEMPERATURE, stats_batches=1),
        "SIMU": dict(update=[f"model.layers.{band}.mlp.{{gate_proj,up_proj,down_proj}}"], score_batches=1),
    }[spec["method"]]
    method = registry[spec["method"]](model, tokenizer, **common, **settings)
    step = method._step

    def timed(*args, **kwargs):
        with timer():
            step(*args, **kwargs)

    method._step = timed
    method.fit(forget, retain)
    from unlearn_kernels.models.layers import decoder_layers

    return method.history, how, len(decoder_layers(model))


def default_lr(method: str, hidden: int) -> float:
    """Our default lr for ``method`` (the 7B rate × 4096 / hidden), given to both loops."""
    from unlearn_kernels.methods import registry

    return float(f"{registry[method].reference_lr * 4096 / hidden:.3g}")


# --- one child --------------------------------------------------------------------------------
def peak_rss() -> int:
    """Peak resident bytes of this process's address space (``VmHWM``; ``ru_maxrss`` without /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(spec: dict) -> dict:
    """Run one configuration in this process; the JSON record."""
    import contextlib

    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cuda = spec["device"].startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []

    @contextlib.contextmanager
    def timer():
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)

    import transformers  # noqa: F401  (the interpreter's own footprint, before any model)

    import unlearn_kernels.methods  # noqa: F401

    rss_start = peak_rss()
    vocab = spec["vocab_size"]
    forget = texts(vocab, spec["batch"], spec["seq"], 1)
    retain = texts(vocab, spec["batch"], spec["seq"], 2)
    how, layers = None, spec["depth"]
    if spec["impl"] == "reference":
        run = reference_simu if spec["method"] == "SIMU" else reference_rmu
        history = run(spec, forget, retain, timer, **({"selective": True} if spec["method"] == "SRMU" else {}))
    else:
        history, how, layers = ours(spec, forget, retain, timer)
    measured = times[spec["warmup"]:]
    return {**{k: spec[k] for k in ("method", "impl", "depth", "dtype", "device", "layer", "batch", "seq", "lr")},
            "loading": how, "layers_in_memory": layers, "step_times_s": times,
            "median_step_s": statistics.median(measured) if measured else None,
            "peak_rss_bytes": peak_rss(),
            "rss_before_load_bytes": rss_start,
            "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "losses": history, "first_losses": history[0] if history else None,
            "torch": torch.__version__}


# --- the parent -------------------------------------------------------------------------------
def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                          os.environ.get("PYTHONPATH", "")])}


def run_child(spec: dict, timeout: float) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         env=_env(), timeout=timeout)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {**spec, "error": tail[0]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak(record: dict) -> float | None:
    """The record's peak memory in bytes (CUDA allocated on a GPU, RSS on the CPU)."""
    if record.get("error"):
        return None
    return record["cuda_max_allocated_bytes"] if record["cuda_max_allocated_bytes"] is not None \
        else record["peak_rss_bytes"]


def net(record: dict) -> float | None:
    """Peak memory above the interpreter's own (RSS after importing torch, transformers and the
    package, before any model); on CUDA the allocated peak, which has no such floor."""
    if record.get("error"):
        return None
    if record["cuda_max_allocated_bytes"] is not None:
        return record["cuda_max_allocated_bytes"]
    return record["peak_rss_bytes"] - record["rss_before_load_bytes"]


def table(records: list[dict]) -> str:
    """Markdown: one row per child, the ratios ``reference / this`` in the same method, depth, dtype."""
    gib = 2 ** 30
    rows = ["| method | layers | dtype | impl | loading | layers in memory | median s / step | peak GiB | net GiB | "
            "ref / this time | ref / this memory | ref / this net |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        ref = next((x for x in records if x["impl"] == "reference" and not x.get("error") and
                    (x["method"], x["depth"], x["dtype"]) == (r["method"], r["depth"], r["dtype"])), None)
        if r.get("error"):
            rows.append(f"| {r['method']} | {r['depth']} | {r['dtype']} | {r['impl']} | error: {r['error']} |"
                        " | | | | | | |")
            continue
        t = f"{ref['median_step_s'] / r['median_step_s']:.2f}×" if ref else ""
        m = f"{peak(ref) / peak(r):.2f}×" if ref else ""
        n = f"{net(ref) / net(r):.2f}×" if ref else ""
        loading = r["loading"] or "full"
        rows.append(f"| {r['method']} | {r['depth']} | {r['dtype']} | {r['impl']} | {loading} | "
                    f"{r['layers_in_memory']} | {r['median_step_s']:.3f} | {peak(r) / gib:.2f} | {net(r) / gib:.2f} | "
                    f"{t} | {m} | {n} |")
    return "\n".join(rows)


def goals(records: list[dict]) -> str:
    """Issue 12's goals, each marked met / missed (RMU; time at the deepest model, memory of ours-prefix)."""
    def find(impl, depth, dtype):
        return next((r for r in records if (r["method"], r["impl"], r["depth"], r["dtype"]) == ("RMU", impl, depth, dtype)
                     and not r.get("error")), None)

    depths = sorted({r["depth"] for r in records})
    lines = []
    if not depths:
        return ""
    top, low = depths[-1], depths[0]
    for dtype in sorted({r["dtype"] for r in records}):
        ref = find("reference", top, dtype)
        for impl in ("ours", "ours-prefix"):
            mine = find(impl, top, dtype)
            if ref and mine:
                ratio = ref["median_step_s"] / mine["median_step_s"]
                lines.append(f"- RMU {dtype}, {top} layers, {impl}: {ratio:.2f}× faster than the reference "
                             f"(goal ≥ 6×): {'met' if ratio >= 6 else 'missed'}")
        small, big = find("ours-prefix", low, dtype), find("ours-prefix", top, dtype)
        for what, measure in (("peak", peak), ("net peak", net)):
            if small and big and top != low:
                grow = measure(big) / measure(small)
                lines.append(f"- RMU {dtype}, ours-prefix {what} {low} → {top} layers: {grow:.2f}× (goal ≤ 1.1×): "
                             f"{'met' if grow <= 1.1 else 'missed'}")
            if ref and big:
                below = measure(ref) / measure(big)
                lines.append(f"- RMU {dtype}, {top} layers: ours-prefix {what} {below:.2f}× below the reference "
                             f"(goal ≥ 8×): {'met' if below >= 8 else 'missed'}")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu (hidden 1024) or cuda (Mistral-7B shape, bf16)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (hidden 64, 4 layers, fp32)")
    p.add_argument("--depths", type=int, nargs="+")
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--methods", nargs="+", choices=list(IMPLS), default=list(IMPLS))
    p.add_argument("--impls", nargs="+", choices=["reference", "ours", "ours-prefix"])
    p.add_argument("--layer", type=int, help="loss layer l (default 7; 2 with --quick)")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--threads", type=int, help="intra-op threads of each child (default 1 on the CPU: on the shared 2-core machine two OpenMP threads ran 2x slower)")
    p.add_argument("--work", help="folder for the saved models (default: a temporary one, removed)")
    p.add_argument("--json", help="write every record here")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per child")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--build", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.build:
        spec = json.loads(args.build)
        build_model(Path(spec["out"]), spec["depth"], spec["shape"], spec["shard"], spec.get("device", "cpu"))
        return 0
    kind = "quick" if args.quick else ("cuda" if args.device.startswith("cuda") else "cpu")
    preset = {**PRESETS[kind], **{k: v for k, v in vars(args).items() if k in PRESETS[kind] and v is not None}}
    shape = SHAPES[kind]
    if any(d <= preset["layer"] for d in preset["depths"]):
        print(f"error: every depth must exceed the loss layer {preset['layer']}", file=sys.stderr)
        return 2
    threads = args.threads if args.threads is not None else (1 if kind != "cuda" else None)
    records = []
    with tempfile.TemporaryDirectory(prefix="bench_unlearn_step_") as tmp:
        work = Path(args.work or tmp)
        for depth in preset["depths"]:
            path = work / f"llama-{depth}x{shape['hidden_size']}"
            if not (path / "config.json").is_file():    # in a process of its own: the parent stays small
                subprocess.run([sys.executable, __file__, "--build", json.dumps(
                    {"out": str(path), "depth": depth, "shape": shape, "device": "cpu" if kind != "cuda" else args.device,
                     "shard": {"quick": "50MB", "cpu": "200MB", "cuda": "2GB"}[kind]})],
                    check=True, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for method in args.methods:
                for dtype in preset["dtypes"]:
                    for impl in IMPLS[method]:
                        if args.impls and impl not in args.impls:
                            continue
                        spec = {"model": str(path), "method": method, "impl": impl, "depth": depth, "dtype": dtype,
                                "device": args.device, "layer": preset["layer"], "batch": preset["batch"],
                                "seq": preset["seq"], "warmup": preset["warmup"], "steps": preset["steps"],
                                "threads": threads, "vocab_size": shape["vocab_size"],
                                "lr": default_lr(method, shape["hidden_size"])}
                        record = run_child(spec, args.timeout)
                        records.append(record)
                        if args.json:     # after every child: a crash later loses nothing
                            Path(args.json).write_text(json.dumps({"shape": shape, **preset, "records": records},
                                                                  indent=1))
                        done = record.get("error") or f"{record['median_step_s']:.3f} s/step"
                        print(f"# {method} {depth} {dtype} {impl}: {done}", file=sys.stderr)
    import torch

    print(f"device {args.device}, torch {torch.__version__}, shape {shape}, loss layer {preset['layer']}, "
          f"batch {preset['batch']} x {preset['seq']} tokens, {preset['warmup']} warm-up + {preset['steps']} steps, "
          f"threads {threads}\n")
    print(table(records))
    print("\n" + goals(records))
    return 1 if any(r.get("error") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
