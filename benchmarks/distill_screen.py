"""Screen UNDO settings (``distill_noise`` ...) without attacks: each run is a method's demo run
(``demo.DEMO_SETTINGS``, the default split) with the given settings added, fitted back to back in
one process; prints forget / retain / held-out accuracy, the fit's wall time and the distillation
record. The plain method runs first and last, to time it against the same load.

    .venv/bin/python benchmarks/distill_screen.py RMU distill_noise=0.6,distill_steps=300 \\
        distill_noise=0.6,distill_steps=300,distill_weights=update
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unlearn_kernels.data import entangled  # noqa: E402
from unlearn_kernels.demo import DEFAULT_OVERLAP, DEMO_SETTINGS  # noqa: E402
from unlearn_kernels.eval.multiple_choice import evaluate_multiple_choice  # noqa: E402
from unlearn_kernels.eval.suite import Split  # noqa: E402
from unlearn_kernels.methods import registry  # noqa: E402
from unlearn_kernels.methods.settings import make_config  # noqa: E402
from unlearn_kernels.models import tiny  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=list(DEMO_SETTINGS))
    parser.add_argument("settings", nargs="*", help="KEY=VALUE[,KEY=VALUE...] per run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    split = Split.from_benchmark(entangled.generate(DEFAULT_OVERLAP))
    runs = [""] + args.settings + [""]
    for spec in runs:
        extra = dict(pair.split("=", 1) for pair in spec.split(",") if pair)
        model, tokenizer = tiny.load()
        cls = registry[args.method]
        config = make_config(cls.config_class, **{**DEMO_SETTINGS[args.method], "progress": False,
                                                  "seed": args.seed, **extra})
        method = cls(model, tokenizer, config=config)
        start = time.perf_counter()
        method.fit(split.forget_texts, split.retain_texts)
        seconds = time.perf_counter() - start
        acc = {k: evaluate_multiple_choice(model, tokenizer, q)["acc"] for k, q in
               (("forget", split.forget_questions), ("retain", split.retain_questions),
                ("heldout", split.heldout_questions))}
        record = method.distillation or {}
        print(f"{args.method} {spec or 'plain'} ({seconds:.1f} s): forget {acc['forget']:.3f} retain "
              f"{acc['retain']:.3f} heldout {acc['heldout']:.3f}"
              + (f"; distillation {record['steps']} steps {record['seconds']:.1f} s, KL {record['kl_first']:.3f}"
                 f" -> {record['kl_last']:.3f}" if record else ""), flush=True)


if __name__ == "__main__":
    main()
