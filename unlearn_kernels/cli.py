"""The ``unlearn-kernels`` command.

    unlearn-kernels demo                  unlearn the embedded model with each method, print the table
    unlearn-kernels demo --track classifier   class-wise unlearning of the embedded digits CNN
    unlearn-kernels unlearn --model DIR --method SRMU --forget F --retain R --out DIR [--config run.yaml]
    unlearn-kernels eval --model DIR --questions wmdp.jsonl [--questions more.jsonl]
    unlearn-kernels bench [--device cuda]  throughput table of the fused ops
    unlearn-kernels selfcheck             every kernel backend against the reference
    unlearn-kernels info                  which backends run here

A YAML config for ``unlearn`` holds the same keys as the flags (model, method, forget,
retain, out) plus ``settings:``, the method's config fields (e.g. layer, steering, lr);
``--set key=value`` overrides one setting (values parsed as YAML).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def _info(_args) -> int:
    import unlearn_kernels as uk

    print(f"unlearn_kernels {uk.__version__}, torch {torch.__version__}")
    print(f"compiled C++: {uk.compiled()}, compiled CUDA: {uk.compiled_with_cuda()}")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        usable = [name for name, ok in uk.backends(device).items() if ok]
        print(f"backends on {device}: {', '.join(usable)}")
    return 0


def _selfcheck(_args) -> int:
    from . import selfcheck

    return 0 if selfcheck.run() else 1


def _parse_shapes(shapes: list[str]) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in s.lower().split("x")) for s in shapes]
    except ValueError:
        raise SystemExit(f"--shapes takes ROWSxFEATURES such as 16384x4096, got {shapes}") from None


def _bench(args) -> int:
    from . import benchmark

    benchmark.run(_parse_shapes(args.shapes), getattr(torch, args.dtype), torch.device(args.device),
                  args.repeats, compile_baseline=not args.no_compile)
    return 0


def _demo(args) -> int:
    from . import selfcheck

    # The embedded models are far too small to gain from intra-op threads, and spinning
    # OpenMP threads slow down badly when anything else shares the cores.
    torch.set_num_threads(args.threads)
    _info(args)
    print("\nSelf-check of the kernels against the plain-PyTorch reference:")
    ok = selfcheck.run()
    if args.track == "classifier":
        from .classifier import demo

        print("\nClass-wise unlearning of the embedded digits CNN:")
        demo.run(Path(args.out) / "classifier", methods=args.methods, progress=not args.quiet)
    else:
        from . import demo

        print("\nUnlearning the embedded model (entangled-knowledge benchmark, chance = 0.25):")
        demo.run(args.out, methods=args.methods, relearn_steps=args.relearn_steps, progress=not args.quiet)
    return 0 if ok else 1


def _load_run_config(args) -> dict:
    import yaml

    config = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise SystemExit(f"--config {path} does not exist")
        config = yaml.safe_load(path.read_text()) or {}
        if not isinstance(config, dict):
            raise SystemExit(f"--config {path} must hold a mapping")
    for key in ("model", "method", "forget", "retain", "out"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    settings = dict(config.get("settings") or {})
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes key=value, got {item!r}")
        settings[key] = yaml.safe_load(value)
    config["settings"] = settings
    missing = [k for k in ("model", "method", "forget", "retain", "out") if not config.get(k)]
    if missing:
        raise SystemExit(f"unlearn needs {', '.join(missing)} (flags or --config)")
    return config


def _unlearn(args) -> int:
    from .data.loaders import read_texts
    from .methods import registry
    from .models.io import load_local, save_pretrained_atomic

    config = _load_run_config(args)
    if config["method"] not in registry:
        raise SystemExit(f"unknown method {config['method']!r}; choose from {sorted(registry)}")
    forget = [t for f in _as_list(config["forget"]) for t in read_texts(f)]
    retain = [t for f in _as_list(config["retain"]) for t in read_texts(f)]
    model, tokenizer = load_local(config["model"])
    method = registry[config["method"]](model, tokenizer, **config["settings"])
    method.fit(forget, retain)
    report = {**method.report(), "source_model": str(config["model"])}
    save_pretrained_atomic(method.model, tokenizer, config["out"], report, method.projections(),
                           method.saved_masks())
    print(f"saved the unlearned model and report.json to {config['out']}")
    return 0


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _eval(args) -> int:
    from .data.loaders import read_multiple_choice
    from .eval.multiple_choice import accuracy
    from .models.io import load_local

    model, tokenizer = load_local(args.model)
    for path in args.questions:
        questions = read_multiple_choice(path)
        print(f"{path}: acc {accuracy(model, tokenizer, questions):.4f}, "
              f"acc_norm {accuracy(model, tokenizer, questions, normalize=True):.4f} ({len(questions)} questions)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unlearn-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which backends run here").set_defaults(func=_info)
    sub.add_parser("selfcheck", help="every backend against the reference").set_defaults(func=_selfcheck)
    bench = sub.add_parser("bench", help="throughput table of the fused ops")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    bench.add_argument("--shapes", nargs="+", default=["4096x4096", "16384x4096", "65536x4096"],
                       help="ROWSxFEATURES, several allowed")
    bench.add_argument("--repeats", type=int, default=50, help="timed runs per figure (median)")
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    bench.set_defaults(func=_bench)
    demo = sub.add_parser("demo", help="unlearn the embedded model with each method and print the table")
    demo.add_argument("--track", choices=["llm", "classifier"], default="llm",
                      help="llm: the tiny LM on the entangled benchmark; classifier: the digits CNN")
    demo.add_argument("--out", default="demo_out", help="directory for results.json and tradeoff.png")
    demo.add_argument("--methods", nargs="+", default=None, help="subset of the demo methods")
    demo.add_argument("--relearn-steps", type=int, default=30)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    demo.set_defaults(func=_demo)
    unlearn = sub.add_parser("unlearn", help="unlearn a local HF model and save it with a report")
    unlearn.add_argument("--config", help="YAML file with the keys below and settings:")
    unlearn.add_argument("--model", help="local model directory (save_pretrained format)")
    unlearn.add_argument("--method", help="RMU, AdaptiveRMU, SRMU, GradAscent, GradDiff, NPO, ...")
    unlearn.add_argument("--forget", nargs="+", help=".txt (a text per line) or .jsonl ('text') files")
    unlearn.add_argument("--retain", nargs="+", help="same formats as --forget")
    unlearn.add_argument("--out", help="output directory (written atomically)")
    unlearn.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a method setting")
    unlearn.set_defaults(func=_unlearn)
    evaluate = sub.add_parser("eval", help="multiple-choice accuracy of a local model on WMDP-style jsonl")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--questions", nargs="+", required=True)
    evaluate.set_defaults(func=_eval)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
