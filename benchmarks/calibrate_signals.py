"""Where do the validation-free stopping signals stand when the validation questions say "done"?

Runs one method (no settings) on one model with a target controller that never stops (target 0,
keep ~0) and evaluates the validation questions every ``--every`` steps, recording the method's
stopping signal (``UnlearningMethod.stopping_signal``) beside the accuracies. Prints one JSON
line per point, so thresholds can be read off trajectories of the *training* models
(``models.zoo.TRAINING``) and checked on the held-out ones.

    python benchmarks/calibrate_signals.py --data DIR --model MODEL --method RMU --steps 600 --every 25

``DIR`` holds forget.txt, retain.txt, val_forget.jsonl, val_retain.jsonl (val_entangled.jsonl
optional); ``--data shipped`` writes them for the embedded model's benchmark (30 % overlap).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def shipped_data(folder: Path) -> Path:
    from unlearn_kernels.data import entangled
    from unlearn_kernels.eval.suite import Split

    split = Split.from_benchmark(entangled.generate(0.3))
    (folder / "forget.txt").write_text("\n".join(split.forget_texts))
    (folder / "retain.txt").write_text("\n".join(split.retain_texts))
    for name, qs in (("val_forget", split.forget_questions[::2]), ("val_retain", split.retain_questions[::4]),
                     ("val_entangled", split.shared_retain_questions)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(q.to_json()) + "\n" for q in qs))
    return folder


def main() -> None:
    from unlearn_kernels.data.loaders import read_multiple_choice, read_texts
    from unlearn_kernels.methods import registry
    from unlearn_kernels.models import tiny
    from unlearn_kernels.models.io import load_local
    from unlearn_kernels.target import TargetController, ValidationSets

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="shipped")
    parser.add_argument("--model", default=str(tiny.ASSET_DIR))
    parser.add_argument("--method", default="RMU")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--set", nargs="*", default=[], help="NAME=VALUE settings (JSON values)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = shipped_data(Path(tempfile.mkdtemp())) if args.data == "shipped" else Path(args.data)
    entangled = data / "val_entangled.jsonl"
    sets = ValidationSets(read_multiple_choice(data / "val_forget.jsonl"), read_multiple_choice(data / "val_retain.jsonl"),
                          read_multiple_choice(entangled) if entangled.exists() else ())
    model, tokenizer = load_local(args.model)
    method_class = registry[args.method]
    settings = {"progress": False, **{k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}}
    length = method_class.spec.length
    settings["steps" if length == "epochs" else length] = args.steps   # a length in steps
    method = method_class(model, tokenizer, **settings)
    monitor = TargetController(sets, target=0.0, keep=1e-9, every=args.every, backtracks=0)
    started = time.perf_counter()
    method.fit(read_texts(data / "forget.txt"), read_texts(data / "retain.txt"), monitor=monitor)
    for point in monitor.trajectory:
        print(json.dumps({k: v for k, v in point.items() if k != "eval_s"}), flush=True)
    print(json.dumps({"chance": sets.chance, "time_s": time.perf_counter() - started, "lr": method.config.lr,
                      "method": args.method, "model": args.model}))


if __name__ == "__main__":
    main()
