"""Probe: does a short retain fine-tune after TAR fix the retain accuracy it misses by, and keep
its robustness?

TAR (demo settings, 120 steps) meets the robustness goal on 2 of 3 seeds of the shipped benchmark;
on seed 1 only its retain accuracy (0.926 < 0.95) misses. Here, after TAR, every weight takes
``--steps`` AdamW steps (``--lr``, no weight decay) of the plain language-model loss on 16 retain
texts drawn per step, then the model is scored and attacked by the whole suite as in
``robustness.py`` (same oracle, recovery and goal).

    .venv/bin/python benchmarks/retain_repair_probe.py --seed 1 --steps 30 --lr 1e-4
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import robustness as R  # noqa: E402

from unlearn_kernels.data import entangled  # noqa: E402
from unlearn_kernels.demo import DEFAULT_OVERLAP  # noqa: E402
from unlearn_kernels.eval.multiple_choice import evaluate_multiple_choice  # noqa: E402
from unlearn_kernels.eval.suite import Split  # noqa: E402
from unlearn_kernels.models import tiny  # noqa: E402


def retain_finetune(model, tokenizer, texts: list[str], steps: int, lr: float, seed: int, batch_size: int = 16):
    """``steps`` AdamW steps of the mean token NLL on random batches of ``texts``, every weight."""
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    for _ in range(steps):
        enc = tokenizer(rng.sample(texts, batch_size), return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    split = Split.from_benchmark(entangled.generate(DEFAULT_OVERLAP))
    base, tokenizer = tiny.load()
    oracle = tiny.load(tiny.ORACLE_DIR)[0]
    base_acc, oracle_acc = R.accuracies(base, tokenizer, split), R.accuracies(oracle, tokenizer, split)
    base_heldout = evaluate_multiple_choice(base, tokenizer, split.heldout_questions)["acc"]
    model, tokenizer, seconds = R.run_method("TAR", 120, args.seed, split, {})
    print(f"TAR ({seconds:.0f} s): {R.accuracies(model, tokenizer, split)}", flush=True)
    start = time.perf_counter()
    retain_finetune(model, tokenizer, split.retain_texts, args.steps, args.lr, args.seed)
    acc = R.accuracies(model, tokenizer, split)
    print(f"repaired ({time.perf_counter() - start:.1f} s): {acc}", flush=True)
    oracle_attack, attack = R.attacked(oracle, tokenizer, split, args.seed), R.attacked(model, tokenizer, split, args.seed)
    rec = R.recoveries(attack, oracle_attack, base_heldout)
    goal = R.goal_met(acc, rec, base_acc, oracle_acc)
    print("recovery " + " ".join(f"{a} {v:.0%}" for a, v in rec.items())
          + f"; worst {max(rec.values()):.0%}; goal {'met' if goal else 'missed'}")


if __name__ == "__main__":
    main()
