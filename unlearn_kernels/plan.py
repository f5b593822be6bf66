"""Memory and communication plan of an unlearning run on N GPUs with FSDP2, from a config.json.

Shapes (Llama / Mistral / Qwen2 / Qwen3 configs): ``d`` hidden, ``w`` intermediate, ``L`` layers,
``H`` / ``K`` attention / key-value heads, ``hd = head_dim or d/H``, ``q = H·hd``, ``kv = K·hd``,
``V`` vocabulary, ``e`` bytes per element of the run's dtype, ``N`` GPUs, ``T = batch · seq`` tokens
per rank and pass (each rank takes ``batch`` texts: the global batch is ``batch · N``).

**Parameters** (exact; ``tests/test_plan.py`` checks them against transformers models)::

    layer = d·q + 2·d·kv + q·d  [+ q + 2kv (Qwen2 / attention_bias) + d (attention_bias)]
          + 3·d·w               [+ 2w + d (mlp_bias)]
          + 2d                  [+ 2hd (Qwen3's q/k norms)]
    total = V·d + L·layer + d + (0 if tie_word_embeddings else V·d)

**What each method runs** is its memory model (``MethodSpec.memory``, declared in the method's
own file). With ``l = min(L−1, max(2, round(7L/32)))``
(``models.roles.default_layer``) and the band ``k = l−2 … l``: a representation loss at layer l
(``loss="layer"``: RMU, AdaptiveRMU, SRMU) updates the band's down projections (``3·d·w``), keeps
a frozen copy of them and runs layers ``0 … l`` only (layers ``0 … k−1`` once per batch without a
graph, then the live and the frozen pass branch); a projection (``loss="projection"``: MRP) trains
a basis ``U`` (``d × 32``, fp32, replicated: a hook, not a sharded weight) through the whole model;
an NLL at the head (``loss="head"``: SIMU, SO-GradDiff, GradAscent, GradDiff, NPO) updates the
band's gate/up/down (``9·d·w``) with ``graphs`` live graphs (forget and retain; GradAscent's one);
``reference_pass`` (NPO) adds a no-grad reference pass, ``frozen_copy`` a frozen copy.
``adversary`` (TAR) updates the band's gate/up/down too and, inside each step, fine-tunes the
attacked weights ``θ_k``, a functional copy of every loaded weight (``A = P_loaded``), with a
fresh Adam. It runs in one process (the simulated attack refuses ``torch.distributed``): for
N > 1 it is planned on one GPU, unsharded and without communication, with a note. With
prefix-only loading (``prefix="auto"``; ``"statistics"``, MRP with ``train_steps=0``, on request)
a rank holds the embedding and layers ``0 … l``: ``V·d + (l+1)·layer``.

**Memory per GPU** (bytes; FSDP2 ``fully_shard`` per decoder layer, on the embedding and on the
head, each parameter sharded on dim 0 over the N ranks; N = 1 is plain single-GPU)::

    weights    = P_loaded · e / N
    frozen     = U · e / N                 (methods with a frozen copy)
    grads      = U · e / N                 (+ U · 4 / N with fp32 masters)
    masters    = U · 4 / N                 (fp32 masters of a bf16/fp16 run)
    optimizer  = 2 · U · s / N             (AdamW: s = e, or 4 with masters; Sophia: s = 4)
    adversary  = 2 · A · e + 4U (+ U·e when e ≠ 4)   (TAR: θ_k and its gradient, the fp32 meta-gradient
                                                      sum, and its cast the surrogate term keeps)
    adversary optimizer = 8 · A            (TAR: the attack's Adam moments, fp32 whatever the dtype)
    gather     = 2 · max unit · e          (the unit running and the one prefetched; 0 when N = 1)
    activations: saved tensors of the live graphs, per token (measured on HF Llama, see below):
      graph layer   G = 2(4d + 4) + (2q + 2kv)·e + 4H + 3w·e   (+ d·e if gate/up updated, + w·e if down)
      first band layer (input without grad): w·e (down only), d·e + 4w·e (gate/up/down)
      NLL head: final norm 4d + 4, log-softmax 4V + 9
      RMU-family loss: 5·d·e (the fused op keeps h and its precomputed ∂h in both passes + the retain anchor)
      checkpointing: each graph layer keeps its input d·e; one layer is recomputed at a time (+ G)
      TAR: its entropy graph (the band graph, entropy head 4d + 4 + 8V) waits while one attack pass
        or post-attack read runs, then the retain graph: entropy graph + max(attack pass, retain graph),
        the attack pass every weight's leaf: L·(G + (4d + w)·e) + NLL head + 2d·e (the norms' and the
        linears' inputs kept for their weights' gradients); a read with tamper_loss="entropy"
        (8V instead of 4V + 9 at the head) is not modelled
    transient  = the shared-prefix outputs k·d·e·T (RMU family), the logits V·e·T (+ 4V·T for the
                 fp32 copy of a bf16 run) of the NLL methods, one layer's workspace (2w + q + 2kv + 2d)·e·T;
                 TAR: at least θ_(k+1) while Adam writes it, A·e, + its per-tensor fp32 temporaries,
                 (3 + 2 if e ≠ 4) · 4 · the largest weight (an estimate, not measured)

(fp32 residual copies ``4d``: HF's RMSNorm upcasts before it squares; ``4H`` the fp32 log-sum-exp
of scaled-dot-product attention; the norms' and attention's terms are those of a Llama layer, a
Qwen3 layer's q/k norms add ``2(q + kv)·e``, not modelled.) Not counted: the CUDA context,
allocator fragmentation, NCCL buffers.

**Communication per step and rank** (ring collectives: a rank receives, and sends, ``(N−1)/N`` of
each buffer)::

    all-gather   = (N−1)/N · e · Σ_passes Σ_units-run P_unit   (forward) + the graph units again (backward)
    reduce-scatter = (N−1)/N · e · Σ_band-layers U_layer      (once per optimizer step)

(MRP all-reduces its basis gradient, ``2(N−1)/N · 4·d·r``; TAR communicates nothing.) Everything
is for one micro-batch (``grad_accum = 1``); TAR's figures are at its step's peak, its default
``adversary_update`` (every weight) and any K.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field

from .config_types import Count, File, config_dataclass, flag_label
from .errors import MissingFileError, UserError, path_error
from .methods import registry
from .models.roles import default_layer

# the methods with a memory model (``MethodSpec.memory``), in the registry's order
METHODS = tuple(name for name, cls in registry.items() if cls.spec.memory is not None)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MRP_RANK = 32
GIB = 2 ** 30


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only model, read from a Hugging Face ``config.json``."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    dtype: str
    attention_bias: bool = False   # q/k/v/o biases (Llama's attention_bias)
    qkv_bias: bool = False         # q/k/v biases only (Qwen2)
    mlp_bias: bool = False
    qk_norm: bool = False          # Qwen3's per-head q/k RMSNorms

    @classmethod
    def from_config(cls, config: dict) -> "Shape":
        """ValueError (one line) on a config that lacks a size or has a non-positive one."""
        if not isinstance(config, dict):
            raise UserError("the config must be a JSON object")
        need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [k for k in need if k not in config]
        if missing:
            raise UserError(f"config.json lacks {', '.join(missing)} (a Llama/Mistral/Qwen-style config is needed)")
        values = {k: config[k] for k in need}
        values["num_key_value_heads"] = config.get("num_key_value_heads") or config["num_attention_heads"]
        bad = [k for k, v in values.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
        if bad:
            raise UserError(f"config.json: {', '.join(bad)} must be positive integers")
        heads = values["num_attention_heads"]
        head_dim = config.get("head_dim") or values["hidden_size"] // heads
        model_type = str(config.get("model_type", "llama"))
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16").removeprefix("torch.")
        return cls(model_type, values["hidden_size"], values["intermediate_size"], values["num_hidden_layers"],
                   heads, values["num_key_value_heads"], int(head_dim), values["vocab_size"],
                   bool(config.get("tie_word_embeddings", False)), dtype,
                   attention_bias=bool(config.get("attention_bias", False)), qkv_bias=model_type == "qwen2",
                   mlp_bias=bool(config.get("mlp_bias", False)), qk_norm=model_type == "qwen3")

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim


def parameter_counts(shape: Shape) -> dict[str, int]:
    """Parameters by part (module docstring): embedding, one decoder layer, final norm, head, total."""
    d, w, q, kv = shape.hidden, shape.intermediate, shape.q, shape.kv
    attention = d * q + 2 * d * kv + q * d
    if shape.attention_bias or shape.qkv_bias:
        attention += q + 2 * kv
    if shape.attention_bias:
        attention += d
    mlp = 3 * d * w + (2 * w + d if shape.mlp_bias else 0)
    norms = 2 * d + (2 * shape.head_dim if shape.qk_norm else 0)
    layer = attention + mlp + norms
    embed, head = shape.vocab * d, 0 if shape.tied else shape.vocab * d
    return {"embedding": embed, "layer": layer, "attention": attention, "mlp": mlp, "norms": norms,
            "final_norm": d, "head": head, "down": d * w + (d if shape.mlp_bias else 0),
            "gate_up": 2 * (d * w + (w if shape.mlp_bias else 0)),
            "total": embed + shape.layers * layer + d + head}


def _graph_layer(shape: Shape, e: int, updated: str | None) -> float:
    """Saved bytes per token of a decoder layer whose input needs a gradient (module docstring)."""
    d, w = shape.hidden, shape.intermediate
    saved = 2 * (4 * d + 4) + (2 * shape.q + 2 * shape.kv) * e + 4 * shape.heads + 3 * w * e
    if updated == "down":
        saved += w * e
    elif updated == "mlp":
        saved += (d + w) * e
    return saved


def _first_band_layer(shape: Shape, e: int, updated: str) -> float:
    d, w = shape.hidden, shape.intermediate
    return w * e if updated == "down" else (d + 4 * w) * e


def _method_shape(mem, shape: Shape, counts: dict, prefix_only: bool) -> dict:
    """What a method of memory model ``mem`` updates, copies, runs and loads (module docstring)."""
    L = shape.layers
    l = default_layer(L)
    k = max(0, l - 2)
    band = list(range(k, l + 1))
    updated = mem.updates
    per_layer = {"down": counts["down"], "mlp": counts["down"] + counts["gate_up"], None: 0}[updated]
    loaded_layers = l + 1 if prefix_only else L
    loaded = counts["embedding"] + loaded_layers * counts["layer"] + (0 if prefix_only else
                                                                      counts["final_norm"] + counts["head"])
    return {"layer": l, "band": band, "shared_prefix": k if mem.loss == "layer" else 0, "updated_kind": updated,
            "updated_params": per_layer * len(band), "updated_per_layer": per_layer,
            "frozen_copy": mem.frozen_copy, "loaded_layers": loaded_layers,
            "loaded_params": loaded, "head_loaded": not prefix_only and not shape.tied}


def _activations(mem, shape: Shape, m: dict, e: int, tokens: int, seq: int, checkpointing: bool,
                 prefix_only: bool) -> tuple[float, float]:
    """(saved bytes of the live graphs at backward, transient bytes on top) for one rank."""
    d, w, V = shape.hidden, shape.intermediate, shape.vocab
    l, k, L = m["layer"], m["band"][0], shape.layers
    workspace = (2 * w + shape.q + 2 * shape.kv + 2 * d) * e * tokens
    rope = 2 * seq * shape.head_dim * e
    head = (4 * d + 4) + (4 * V + 9)
    passes, kind = mem.graphs, mem.updates
    if mem.loss == "projection" and prefix_only:   # statistics only: two Gram matrices, no graph
        return 0.0, workspace + 2 * 4 * d * d
    if mem.loss == "layer":
        first, graph_layers, top = k, list(range(k + 1, l + 1)), 0.0
        transient = k * d * e * tokens                           # the shared prefix's layer outputs
    elif mem.loss == "projection":
        first, graph_layers = None, list(range(l + 1, L))
        top = head + d * e + 4 * MRP_RANK
        transient = V * e * tokens + (4 * V * tokens if e != 4 else 0)
    else:
        first, graph_layers, top = k, list(range(k + 1, L)), head
        transient = V * e * tokens + (4 * V * tokens if e != 4 else 0)
        if mem.reference_pass:                     # the reference pass's logits and log-probs
            transient += V * e * tokens + 4 * V * tokens
    band = set(m["band"])
    if checkpointing:
        per_token = d * e * (len(graph_layers) + (first is not None)) + top
        recompute = max([_graph_layer(shape, e, kind if i in band else None) for i in graph_layers] or [0.0])
        transient += recompute * tokens
    else:
        per_token = top + (_first_band_layer(shape, e, kind) if first is not None else 0.0)
        per_token += sum(_graph_layer(shape, e, kind if i in band else None) for i in graph_layers)
    saved = passes * (per_token * tokens + (rope if graph_layers else 0))
    if mem.adversary:   # the entropy graph + the larger of an attack pass (every weight a leaf) and the retain graph
        attack = L * (_graph_layer(shape, e, None) + (4 * d + w) * e) + head + 2 * d * e
        saved = (per_token - (4 * V + 9) + 8 * V + max(attack, per_token)) * tokens + 2 * rope
    if mem.loss == "layer":   # the fused loss keeps h and its precomputed ∂h per pass, + the retain anchor
        saved += 5 * d * e * tokens
    return saved, transient + workspace


def _communication(mem, shape: Shape, counts: dict, m: dict, e: int, gpus: int, prefix_only: bool) -> dict:
    """All-gather and reduce-scatter bytes per rank and step (module docstring)."""
    share = (gpus - 1) / gpus
    L, l, k = shape.layers, m["layer"], m["band"][0]
    layer, embed, head = counts["layer"], counts["embedding"], counts["head"]
    projection = mem.loss == "projection"
    if mem.loss == "layer":
        prefix_passes = 2 if k else 0
        forward = (prefix_passes + 3) * embed + prefix_passes * k * layer + 3 * len(m["band"]) * layer
        backward = 2 * len(m["band"]) * layer
    elif projection and prefix_only:
        forward, backward = 2 * (embed + (l + 1) * layer), 0
    else:
        forward = (mem.graphs + mem.reference_pass) * (embed + L * layer + head)
        above = L - (l + 1) if projection else L - k
        backward = mem.graphs * (above * layer + head)
    gather = share * e * (forward + backward)
    reduce = share * e * m["updated_params"]
    extra = 2 * share * 4 * shape.hidden * MRP_RANK if projection and not prefix_only else 0.0
    return {"all_gather": gather, "reduce_scatter": reduce, "all_reduce": extra, "total": gather + reduce + extra}


def plan(config, gpus: int, method: str | None = None, batch: int = 4, seq: int = 512, dtype: str | None = None,
         prefix_only: bool | None = None, checkpointing: bool = False, master_fp32: bool = False) -> dict:
    """The plan of every method (or ``method``) for ``config`` (a dict or a config.json path) on
    ``gpus`` GPUs: parameters, which ranks hold what, memory per GPU and communication per step
    (module docstring). ``prefix_only`` None: each method's default (the prefix where the method
    can use it and the loss layer is below the top); ``batch`` is per rank."""
    if isinstance(config, (str, Path)):
        config = read_config(config)
    shape = Shape.from_config(config)
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise UserError(f"gpus must be an integer >= 1, got {gpus!r}")
    if batch < 1 or seq < 1:
        raise UserError(f"batch and seq must be >= 1, got batch={batch}, seq={seq}")
    dtype = dtype or shape.dtype
    if dtype not in DTYPE_BYTES:
        raise UserError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    names = METHODS if method is None else (method,)
    if method is not None and method not in METHODS:
        raise UserError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    e, tokens = DTYPE_BYTES[dtype], batch * seq
    counts = parameter_counts(shape)
    masters = master_fp32 and e != 4
    rows = {}
    for name in names:
        spec = registry[name].spec
        mem = spec.memory
        can_prefix = spec.prefix != "never" and default_layer(shape.layers) < shape.layers - 1
        use_prefix = (can_prefix and spec.prefix == "auto") if prefix_only is None else bool(prefix_only) and can_prefix
        m = _method_shape(mem, shape, counts, use_prefix)
        U = m["updated_params"]
        notes = []
        ranks = 1 if mem.adversary else gpus
        if ranks != gpus:
            notes.append("one process only (its simulated attack refuses torch.distributed): planned on 1 GPU, "
                         "unsharded, without communication")
        ckpt = checkpointing and "checkpointing" not in spec.refuses
        fp32 = masters and "master_dtype" not in spec.refuses
        refused = [s for s, asked, kept in (("checkpointing", checkpointing, ckpt), ("master_dtype", masters, fp32))
                   if asked and not kept]
        if refused:
            notes.append(f"{name} refuses {' and '.join(refused)}: planned without {'them' if len(refused) > 1 else 'it'}")
        if use_prefix and spec.prefix == "statistics":
            notes.append(f"prefix-only {name}: statistics only (train_steps=0); basis training runs the whole model")
        saved, transient = _activations(mem, shape, m, e, tokens, seq, ckpt, use_prefix)
        state_bytes = 4 if (mem.optimizer == "Sophia" or fp32) else e
        unit = max(counts["layer"], counts["embedding"], counts["head"] if m["head_loaded"] else 0)
        A = m["loaded_params"] if mem.adversary else 0
        if A:   # the attack's Adam writes θ_(k+1) next to θ_k, a tensor at a time through fp32 temporaries
            largest = max(counts["embedding"], counts["head"], shape.hidden * shape.intermediate)
            transient = max(transient, A * e + (3 + (2 if e != 4 else 0)) * 4 * largest)
        memory = {
            "weights": m["loaded_params"] * e / ranks,
            "frozen_copy": U * e / ranks if m["frozen_copy"] else 0.0,
            "grads": U * (e + (4 if fp32 else 0)) / ranks,
            "masters": U * 4 / ranks if fp32 else 0.0,
            "optimizer": 2 * U * state_bytes / ranks,
            "adversary": 2 * A * e + (4 + (e if e != 4 else 0)) * U if A else 0.0,
            "adversary_optimizer": 8.0 * A,
            "gather_buffers": 2 * unit * e if ranks > 1 else 0.0,
            "activations": saved,
            "transient": transient + (m["updated_per_layer"] * e if ranks > 1 else 0.0),
        }
        if mem.loss == "projection" and not use_prefix:
            memory["optimizer"] = 3 * 4 * shape.hidden * MRP_RANK     # U, Adam's two moments (fp32, replicated)
            memory["grads"] = 4 * shape.hidden * MRP_RANK
        memory["total"] = sum(memory.values())
        rows[name] = {**m, "gpus": ranks, "prefix_only": use_prefix, "memory": memory, "notes": notes,
                      "communication": _communication(mem, shape, counts, m, e, ranks, use_prefix),
                      "ranks": _ranks(mem, m, ranks, use_prefix)}
    return {"shape": shape.__dict__, "parameters": counts, "gpus": gpus, "batch_per_rank": batch, "seq": seq,
            "dtype": dtype, "checkpointing": checkpointing, "master_fp32": masters, "methods": rows}


def _ranks(mem, m: dict, gpus: int, prefix_only: bool) -> str:
    """Which ranks hold what, in one line."""
    what = f"embedding + layers 0..{m['loaded_layers'] - 1}" + ("" if prefix_only else " + norm + head")
    state = "basis U, its Adam state (replicated)" if mem.loss == "projection" else \
        f"1/{gpus} of the {mem.optimizer} state of layers {m['band'][0]}..{m['band'][-1]}"
    frozen = f", 1/{gpus} of the frozen copy" if m["frozen_copy"] else ""
    if mem.adversary:
        return (f"one GPU: {what}, the {mem.optimizer} state of layers {m['band'][0]}..{m['band'][-1]}, the "
                "attacked copy of every weight, its gradient and Adam state; it writes the output")
    return f"every rank: 1/{gpus} of {what}, {state}{frozen}; rank 0 also writes the output"


def read_config(path) -> dict:
    """The JSON in ``path``; a UserError (one line) when it is missing, unreadable or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no config file {path}")
    try:
        return json.loads(path.read_text())
    except OSError as error:
        raise path_error(path, error) from None
    except ValueError as error:
        raise UserError(f"{path} is not valid JSON ({error})") from None


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def markdown(result: dict) -> str:
    """The plan as markdown: the model, then one row per method (GiB per GPU, GiB per rank and step)."""
    s, p = result["shape"], result["parameters"]
    lines = [f"model: {s['model_type']}, {p['total'] / 1e9:.3f} B parameters ({p['total']:,}); {s['layers']} layers, "
             f"hidden {s['hidden']}, intermediate {s['intermediate']}, heads {s['heads']}/{s['kv_heads']}, "
             f"vocab {s['vocab']}; {result['gpus']} GPUs, {result['dtype']}, {result['batch_per_rank']} x "
             f"{result['seq']} tokens per rank, checkpointing {'on' if result['checkpointing'] else 'off'}, "
             f"fp32 masters {'on' if result['master_fp32'] else 'off'}", "",
             "| method | loaded layers | updated params | weights | frozen | grads+masters | optimizer | attacker | "
             "gather | activations | transient | **total GiB/GPU** | all-gather GiB | reduce-scatter GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["methods"].items():
        mem, com = r["memory"], r["communication"]
        layers = f"{r['loaded_layers']}{' (prefix)' if r['prefix_only'] else ''}"
        lines.append(f"| {name}{' *' if r['notes'] else ''} | {layers} | {r['updated_params'] / 1e6:.0f} M | {_gib(mem['weights'])} | "
                     f"{_gib(mem['frozen_copy'])} | {_gib(mem['grads'] + mem['masters'])} | {_gib(mem['optimizer'])} | "
                     f"{_gib(mem['adversary'] + mem['adversary_optimizer'])} | "
                     f"{_gib(mem['gather_buffers'])} | {_gib(mem['activations'])} | {_gib(mem['transient'])} | "
                     f"**{_gib(mem['total'])}** | {_gib(com['all_gather'])} | "
                     f"{_gib(com['reduce_scatter'] + com['all_reduce'])} |")
    notes = [f"* {name}: {'; '.join(r['notes'])}" for name, r in result["methods"].items() if r["notes"]]
    return "\n".join(lines + ([""] + notes if notes else []))


@config_dataclass(kw_only=True)
class PlanConfig:
    """The options of ``unlearn-kernels plan`` (its fields are the flags)."""

    config: Annotated[File, Field(description="a Hugging Face config.json (Llama/Mistral/Qwen-style)")]
    gpus: Annotated[Count, Field(description="number of GPUs (FSDP2 ranks)")]
    method: Annotated[Literal[METHODS] | None, Field(description="one method (default: all)")] = None
    batch: Annotated[Count, Field(description="texts per rank and pass")] = 4
    seq: Annotated[Count, Field(description="tokens per text")] = 512
    dtype: Annotated[Literal[tuple(DTYPE_BYTES)] | None, Field(description=(
        "run dtype (default: the config's, else bfloat16)"))] = None
    prefix_only: Annotated[Literal["auto", "on", "off"], Field(description=(
        "load only embeddings + layers 0..l where the method allows (auto: its default)"))] = "auto"
    checkpointing: Annotated[bool, Field(description="activation checkpointing of decoder layers")] = False
    master_fp32: Annotated[bool, Field(description="fp32 master copies of the updated weights")] = False
    json: Annotated[File | None, Field(description="also write the plan as JSON here")] = None
    overwrite: Annotated[bool, Field(description=(
        "replace --json when it holds a previous output of unlearn_kernels"))] = False

    label: ClassVar = staticmethod(flag_label)


def run(config: PlanConfig, out=print) -> dict:
    """Print the plan with ``out`` (and write it as JSON with ``json``); return it."""
    from .models.output_file import check_output_files, write_json_atomic

    check_output_files({"--json": config.json}, [config.config], overwrite=config.overwrite)
    prefix = {"auto": None, "on": True, "off": False}[config.prefix_only]
    result = plan(read_config(config.config), config.gpus, method=config.method, batch=config.batch,
                  seq=config.seq, dtype=config.dtype, prefix_only=prefix, checkpointing=config.checkpointing,
                  master_fp32=config.master_fp32)
    out(markdown(result))
    if config.json:
        write_json_atomic(config.json, result, overwrite=config.overwrite)
    return result
