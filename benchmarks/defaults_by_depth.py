"""Do the default settings forget on models of other depths and widths?

Trains Llama-style models of several (layers, hidden) shapes on the embedded entangled
benchmark with the shipped model's recipe (``python -m unlearn_kernels.models.tiny``; cached
in ``--work``), then runs every LLM method with *no settings at all* on the 25 %-overlap
split and prints forget / retain / shared-entity retain accuracy (lm-eval protocol, cloze)
beside what the defaults chose (loss layer, update band, learning rate).

    python benchmarks/defaults_by_depth.py --work /tmp/depths --shapes 4x128 6x96 12x64 32x64
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from unlearn_kernels.data import entangled
from unlearn_kernels.eval.multiple_choice import accuracy
from unlearn_kernels.eval.suite import Split
from unlearn_kernels.methods import registry
from unlearn_kernels.models import tiny

METHODS = ["RMU", "AdaptiveRMU", "SRMU", "MRP", "SIMU", "SO-GradDiff", "GradAscent", "GradDiff", "NPO"]


def model_for(shape: str, work: Path, steps: int, lr: float):
    layers, hidden = (int(v) for v in shape.split("x"))
    if (layers, hidden) == (4, 128):
        return tiny.load()
    path = work / shape
    if not (path / "config.json").exists():
        tiny.train(path, steps=steps, lr=lr, hidden=hidden, layers=layers)
    return tiny.load(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("defaults_by_depth"))
    parser.add_argument("--shapes", nargs="+", default=["4x128", "6x96", "12x64", "32x64"])
    parser.add_argument("--train-steps", type=int, default=3000)
    parser.add_argument("--train-lr", type=float, default=3e-3, help="peak lr of the training recipe")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--overlap", type=float, default=0.25)
    args = parser.parse_args()
    split = Split.from_benchmark(entangled.generate(args.overlap))
    print("| model | method | layer | update | lr | forget | retain | shared retain | time s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        base, tokenizer = model_for(shape, args.work, args.train_steps, args.train_lr)

        def scores(model):
            return [accuracy(model, tokenizer, q) for q in
                    (split.forget_questions, split.retain_questions, split.shared_retain_questions)]

        f, r, s = scores(base)
        print(f"| {shape} | base | | | | {f:.3f} | {r:.3f} | {s:.3f} | |", flush=True)
        for name in args.methods:
            model = copy.deepcopy(base)
            start = time.perf_counter()
            method = registry[name](model, tokenizer, progress=False)
            method.fit(split.forget_texts, split.retain_texts)
            seconds = time.perf_counter() - start
            chosen = method.chosen
            update = ", ".join(chosen.get("update", [])) or "(none: projection)"
            layer = method.config.layer if hasattr(method.config, "layer") else ""
            f, r, s = scores(model)
            print(f"| {shape} | {name} | {layer} | `{update}` | {method.config.lr:.3g} | {f:.3f} | {r:.3f} | "
                  f"{s:.3f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
