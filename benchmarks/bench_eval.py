"""Multiple-choice evaluation speed: our evaluator against lm-evaluation-harness 0.4.13.

Same model, same questions, same batch size, one process. Start-up (loading the model,
building lm-eval's ``HFLM``) is outside the timings. Three figures per run, median of
``--repeats`` alternating runs:

- ``ours``: :func:`evaluate_multiple_choice` end to end (prompts, tokenisation, scoring, metrics);
- ``lm-eval loglikelihood``: ``HFLM.loglikelihood`` on the very (context, continuation) pairs of
  our prompts, handed over as ``Instance``s: only the harness's tokenisation and scoring;
- ``lm-eval simple_evaluate``: the harness's whole zero-shot run of a local task on the same
  file (task building, ``datasets`` loading, scoring, metrics), given the already-built ``HFLM``.

The log-likelihoods of ours and of ``HFLM.loglikelihood`` are compared too (max |Δ|).

    python benchmarks/bench_eval.py                       # shipped model, 450 questions, batch 16
    python benchmarks/bench_eval.py --model DIR --format mmlu --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def benchmark_questions(n: int, seed: int = 0):
    """``n`` questions of the entangled benchmark: every fact's question, then the same
    questions with their choices reshuffled, until there are ``n``."""
    from unlearn_kernels.data import entangled
    from unlearn_kernels.data.loaders import MCQuestion

    bench = entangled.generate(0.25)
    base = [MCQuestion(q.question, q.choices, q.answer) for q in bench.questions(bench.facts)]
    rng, out = random.Random(seed), list(base)
    while len(out) < n:
        q = base[len(out) % len(base)]
        order = rng.sample(range(len(q.choices)), len(q.choices))
        out.append(MCQuestion(q.question, [q.choices[i] for i in order], order.index(q.answer)))
    return out[:n]


def bpe_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from unlearn_kernels.data import entangled
    from unlearn_kernels.models import tiny

    bench = entangled.generate(0.25)
    tokenizer = tiny.build_bpe_tokenizer(bench.corpus() + [q.question for q in bench.questions(bench.facts)])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer


def main() -> None:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from unlearn_kernels.eval import harness
    from unlearn_kernels.eval.multiple_choice import build_requests, evaluate_multiple_choice
    from unlearn_kernels.models import tiny
    from unlearn_kernels.models.io import load_local

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(tiny.ASSET_DIR))
    parser.add_argument("--questions", type=int, default=450)
    parser.add_argument("--format", default="cloze", choices=["cloze", "mmlu"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bpe", action="store_true",
                        help="a random 4-layer Llama with a byte-level BPE tokenizer (multi-token choices) "
                             "instead of --model")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both engines)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    questions = benchmark_questions(args.questions)
    if args.bpe:
        model, tokenizer = bpe_model()
        args.model = "random Llama, byte-level BPE"
    else:
        model, tokenizer = load_local(args.model, getattr(torch, args.dtype))
    model.to(args.device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device=args.device, batch_size=args.batch_size)
    pairs = [(r.context, c) for r in build_requests(tokenizer, questions, args.format) for c in r.continuations]
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]

    def ours():
        return evaluate_multiple_choice(model, tokenizer, questions, format=args.format, batch_size=args.batch_size,
                                        progress=False, return_details=True)

    def theirs():
        return lm.loglikelihood(instances, disable_tqdm=True)

    def theirs_full():
        return harness.run(lm, {"bench": questions}, format=args.format)

    ours_out, theirs_out = ours(), theirs()  # warm-up, and the agreement check
    ours_lls = [v for s in ours_out["samples"] for v in s["loglikelihoods"]]
    worst = max(abs(a - b[0]) for a, b in zip(ours_lls, theirs_out))
    theirs_full()
    times = {"ours": [], "lm-eval loglikelihood": [], "lm-eval simple_evaluate": []}
    for _ in range(args.repeats):
        for name, fn in (("ours", ours), ("lm-eval loglikelihood", theirs), ("lm-eval simple_evaluate", theirs_full)):
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    print(f"model {args.model}, {len(questions)} questions ({len(pairs)} choices), format {args.format}, "
          f"batch {args.batch_size}, {args.device} {args.dtype}, torch {torch.__version__}, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print(f"max |ours - lm-eval| log-likelihood: {worst:.2e}; acc {ours_out['acc']:.4f}")
    print("| engine | time s | questions/s | ours ×faster |\n|---|---|---|---|")
    base = statistics.median(times["ours"])
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t:.3f} | {len(questions) / t:.0f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
