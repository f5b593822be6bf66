"""The ``unlearn-kernels`` command.

    unlearn-kernels demo                  unlearn the embedded model with each method, print the table
    unlearn-kernels demo --full           the whole sweep: every overlap, longer trade-off curves
    unlearn-kernels demo --track classifier   class-wise unlearning of the embedded digits CNN
    unlearn-kernels unlearn --model DIR --method SRMU --forget F --retain R --out DIR [--config run.yaml]
    unlearn-kernels unlearn ... --val-forget VF.jsonl --val-retain VR.jsonl   target-driven (exit 3: not reached)
    torchrun --nproc-per-node N -m unlearn_kernels.cli unlearn ... [--parallel ddp]   data-parallel run
    unlearn-kernels eval --model DIR --questions wmdp.jsonl [--questions more.jsonl] [--format mmlu] [--json out.json]
    unlearn-kernels eval --model DIR --mia-forget forget.jsonl --mia-holdout holdout.jsonl
    unlearn-kernels relearn --model DIR --train attack.txt --questions heldout.jsonl [--plot curves.png]
    unlearn-kernels plan --config llama-70b.json --gpus 8   memory and communication per GPU of each method
    unlearn-kernels bench [--device cuda]  throughput table of the fused ops
    unlearn-kernels selfcheck             every kernel backend against the reference
    unlearn-kernels info                  which backends run here

The ``unlearn`` flags are the fields of ``pipeline.RunConfig`` (one type for the flags, the YAML
config, the Python API and the demo): a YAML config for ``unlearn`` holds the same keys (model,
method, forget, retain, out, eval_forget, ...) plus ``settings:``, the method's config fields
(e.g. layer, steering, lr); flags given override the file, ``--set key=value`` overrides one
setting (values parsed as YAML).
"""

from __future__ import annotations

import argparse
import os
import sys
import types
from pathlib import Path

import torch

from . import parallel
from .errors import UserError


def _info(_args) -> int:
    import unlearn_kernels as uk

    print(f"unlearn_kernels {uk.__version__}, torch {torch.__version__}")
    print(f"compiled C++: {uk.compiled()}, compiled CUDA: {uk.compiled_with_cuda()}")
    if uk.compiled():
        from ._extension import cpu_capability

        print(f"CPU kernels: {cpu_capability()} (UNLEARN_KERNELS_CPU_CAPABILITY=default|avx2|avx512 to cap)")
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
    from .eval.files import check_device

    check_device(args.device)
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")

    benchmark.run(_parse_shapes(args.shapes), getattr(torch, args.dtype), torch.device(args.device),
                  args.repeats, compile_baseline=not args.no_compile)
    return 0


def _demo(args) -> int:
    from . import selfcheck

    if args.full and args.track == "classifier":
        raise UserError("--full sweeps the LLM demo; the classifier demo has no sweep")
    if args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    # The embedded models are far too small to gain from intra-op threads, and spinning
    # OpenMP threads slow down badly when anything else shares the cores.
    torch.set_num_threads(args.threads)
    if args.track == "classifier":     # every output, before any work
        from .classifier.demo import check_outputs

        check_outputs(Path(args.out) / "classifier", args.overwrite)
    else:
        from .demo import check_outputs

        check_outputs(args.out, args.methods, args.full, overwrite=args.overwrite)
    _info(args)
    print("\nSelf-check of the kernels against the plain-PyTorch reference:")
    ok = selfcheck.run()
    if args.track == "classifier":
        from .classifier import demo

        print("\nClass-wise unlearning of the embedded digits CNN:")
        demo.run(Path(args.out) / "classifier", methods=args.methods, progress=not args.quiet,
                 overwrite=args.overwrite)
    else:
        from . import demo

        print("\nUnlearning the embedded model (entangled-knowledge benchmark, chance = 0.25):")
        demo.run(args.out, methods=args.methods, relearn_steps=args.relearn_steps, full=args.full,
                 progress=not args.quiet, overwrite=args.overwrite)
    return 0 if ok else 1


def _read_run_config(path: Path) -> dict:
    """The mapping in the YAML config of ``unlearn`` (its keys are :class:`~unlearn_kernels.pipeline.RunConfig`'s
    fields, typed when the run config is made); UserError naming the file otherwise."""
    import yaml

    from .errors import MissingFileError, path_error

    if not path.is_file():
        raise MissingFileError(f"--config {path} does not exist")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as error:
        raise path_error(path, error, "--config") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or error
        raise UserError(f"--config {path} is not valid YAML ({where}{problem})") from None
    if not isinstance(config, dict):
        raise UserError(f"--config {path} must hold a mapping of the unlearn options (model, method, forget, retain, "
                        f"out, settings, ...), got a {type(config).__name__}")
    return config


def _load_run_config(args):
    """The :class:`~unlearn_kernels.pipeline.RunConfig` of the YAML file (``--config``) with the flags given
    over it and ``--set KEY=VALUE`` over its ``settings``; an error in a value of the file names the file."""
    import yaml

    from .methods import registry
    from .methods.settings import SettingError
    from .pipeline import RunConfig

    given = {name: getattr(args, name) for name in _run_fields() if hasattr(args, name)}
    from_file = _read_run_config(Path(args.config)) if args.config else {}
    values = {**from_file, **given, "config_file": args.config}
    sets = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set takes key=value, got {item!r}")
        try:
            sets[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {item}: the value is not valid YAML") from None
    settings = values.get("settings") or {}
    values["settings"] = {**settings, **sets} if isinstance(settings, dict) else settings
    method = registry.get(values.get("method")) if isinstance(values.get("method"), str) else None
    needed = ("model", "method", "forget", "out") + (("retain",) if method is None or method.spec.needs_retain else ())
    missing = [k for k in needed if not values.get(k)]
    if missing:
        raise UserError(f"unlearn needs {', '.join(missing)} (flags or --config)")
    try:
        return RunConfig(**values)
    except SettingError as error:
        if error.field not in from_file or error.field in given:
            raise
        label = "unknown key" if error.unknown else error.field
        raise SettingError(f"--config {args.config}: {label}", error.field, error.problem) from None


def _unlearn(args) -> int:
    """``pipeline.run`` on the flags and YAML; exit 3 when a target- or rule-driven run missed its target."""
    from .pipeline import run

    config = _load_run_config(args)
    result = run(config)
    if result.out is None:      # a rank other than 0
        return 0
    print(f"saved the unlearned model, report.json and report.png to {config.out}")
    evaluation = result.report.get("evaluation", {})
    for split, values in evaluation.get("before", {}).items():
        print(f"{split} accuracy: {values['acc']:.3f} -> {evaluation['after'][split]['acc']:.3f}")
    if result.reached is None:
        return 0
    print(result.message, file=sys.stdout if result.reached else sys.stderr)
    return 0 if result.reached else 3


def _methods(args) -> int:
    """The methods, one line each; with a name, every setting with its type, default and meaning."""
    from .methods import registry
    from .methods.settings import describe

    if not args.name:
        for name, cls in registry.items():
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            print(f"{name:12s} {doc}")
        print("\nunlearn-kernels methods NAME lists a method's settings (unlearn --set KEY=VALUE)")
        return 0
    if args.name not in registry:
        raise UserError(f"unknown method {args.name!r}; choose from {', '.join(registry)}")
    print(describe(registry[args.name]))
    return 0


def _eval(args) -> int:
    import json

    from .data.loaders import read_multiple_choice, read_texts
    from .eval import files
    from .eval.multiple_choice import evaluate_multiple_choice
    from .models.io import write_json_atomic, write_jsonl_atomic
    from .models.output_file import check_output_files

    files.check_device(args.device)
    check_output_files({"--json": args.json, "--log-samples": args.log_samples},
                       [args.model, *args.questions, args.mia_forget, args.mia_holdout, args.mia_reference, args.oracle],
                       overwrite=args.overwrite)
    if not args.questions and not args.mia_forget:
        raise UserError("eval needs --questions FILE (or --mia-forget/--mia-holdout)")
    if bool(args.mia_forget) != bool(args.mia_holdout):
        raise UserError("--mia-forget and --mia-holdout go together: members and never-trained-on texts")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise UserError("--batch-size and --limit must be positive integers")
    others = {}     # loaded (and so checked) before any evaluation of the model itself
    for other in (args.oracle, args.mia_reference):
        if other and other not in others:
            others[other] = files.load_model(other, args.device, args.dtype, args.trust_remote_code)
    names = files.task_names(args.questions or [])
    question_sets = {n: read_multiple_choice(p, limit=args.limit) for n, p in zip(names, args.questions or [])}
    if args.format == "mmlu":
        for path, questions in zip(args.questions, question_sets.values()):
            for i, q in enumerate(questions):
                if len(q.choices) > 26:
                    raise UserError(f"{path}: question {i + 1}: --format mmlu labels choices A-Z, "
                                    f"this one has {len(q.choices)}")
    quiet = args.json == "-"
    results = {}
    model, tokenizer = files.load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    if question_sets and args.engine == "lm-eval":
        from .eval import harness

        harness.require_lm_eval()
        results = harness.run(model, question_sets, tokenizer=tokenizer, format=args.format, subject=args.subject,
                              batch_size=args.batch_size, log_samples=bool(args.log_samples))
    else:
        for (name, questions), path in zip(question_sets.items(), args.questions):
            try:
                results[name] = evaluate_multiple_choice(model, tokenizer, questions, format=args.format,
                                                         subject=args.subject, batch_size=args.batch_size,
                                                         progress=None if not quiet else False,
                                                         return_details=bool(args.log_samples))
            except UserError as error:
                raise UserError(f"{path}: {error}") from None
    samples = [{"questions": name, **s} for name, r in results.items() for s in r.pop("samples", [])]
    payload = {"results": results,
               "config": {"model": str(args.model), "engine": args.engine, "device": args.device,
                          "dtype": args.dtype or "checkpoint", "format": args.format, "subject": args.subject,
                          "batch_size": args.batch_size, "limit": args.limit, "versions": files.versions()}}
    if args.mia_forget:
        from .eval.privacy import privacy_report

        reference = others[args.mia_reference][0] if args.mia_reference else None
        payload["privacy"] = privacy_report(model, tokenizer, read_texts(args.mia_forget, args.text_field),
                                            read_texts(args.mia_holdout, args.text_field),
                                            reference_model=reference, batch_size=args.batch_size)
    if args.oracle:
        if not question_sets:
            raise UserError("--oracle compares answers to --questions: give the forget questions")
        payload["oracle"] = _against_oracle(model, tokenizer, *others[args.oracle], args, question_sets)
    if args.log_samples:
        write_jsonl_atomic(args.log_samples, samples, overwrite=args.overwrite)
    if quiet:
        print(json.dumps(payload, indent=2, default=str))
        return 0
    if results:
        print(files.table(results))
    if "privacy" in payload:
        print(files.privacy_table(payload["privacy"]))
    for name, r in payload.get("oracle", {}).items():
        print(f"{name}: acc {r['acc']:.3f} vs oracle {r['oracle_acc']:.3f}; forget quality (KS p of the truth "
              f"ratios against the oracle's) {r['forget_quality']:.3g}")
    if args.json:
        write_json_atomic(args.json, payload, overwrite=args.overwrite)
        print(f"wrote {args.json}")
    if args.log_samples:
        print(f"wrote {len(samples)} samples to {args.log_samples}")
    return 0


def _against_oracle(model, tokenizer, oracle, oracle_tokenizer, args, question_sets: dict) -> dict:
    """Per question file: the model's and the oracle's accuracy and the forget quality
    (``eval.oracle.forget_quality`` of their per-question log truth ratios)."""
    from .eval import scores
    from .eval.oracle import forget_quality

    if oracle_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"--oracle {args.oracle}: its tokenizer differs from the model's; the oracle must be the "
                        "same recipe retrained without the forget data")
    out = {}
    for name, questions in question_sets.items():
        prepared = scores.prepare(tokenizer, questions, args.format, args.subject)
        own, theirs = (scores.score(m, tokenizer, prepared, args.batch_size) for m in (model, oracle))
        quality = forget_quality(own["log_truth_ratio"], theirs["log_truth_ratio"])
        out[name] = {"acc": float(own["acc"].mean()), "oracle_acc": float(theirs["acc"].mean()),
                     "forget_quality": quality["p_value"], "forget_quality_ks": quality["ks_statistic"],
                     "n": quality["n"], "oracle": str(args.oracle)}
    return out


def _relearn(args) -> int:
    import json

    from .data.loaders import read_multiple_choice, read_texts
    from .eval import files
    from .eval.relearn import relearn_attack
    from .models.io import save_figure_atomic, write_json_atomic
    from .models.output_file import check_output_files

    files.check_device(args.device)
    check_output_files({"--json": args.json, "--plot": args.plot}, [args.model, args.train, args.questions],
                       overwrite=args.overwrite)
    texts = read_texts(args.train, args.text_field)
    questions = read_multiple_choice(args.questions, limit=args.limit)
    model, tokenizer = files.load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    result = relearn_attack(model, tokenizer, texts, questions, lrs=args.lrs, steps=args.steps, every=args.every,
                            batch_size=args.batch_size, seed=args.seed, format=args.format)
    payload = {**result, "curves": {str(lr): c for lr, c in result["curves"].items()},
               "config": {"model": str(args.model), "train": str(args.train), "questions": str(args.questions),
                          "device": args.device, "dtype": args.dtype or "checkpoint", "versions": files.versions()}}
    if args.json == "-":
        print(json.dumps(payload, indent=2, default=str))
        return 0
    steps = [s for s, _ in next(iter(result["curves"].values()))]
    print("| lr | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for lr, curve in result["curves"].items():
        print(f"| {lr:g} | " + " | ".join(f"{a:.3f}" for _, a in curve) + " |")
    print(f"held-out accuracy {result['initial_acc']:.3f} before the attack, at most {result['max_acc']:.3f} after "
          f"(lr {result['best_lr']:g}, {len(questions)} questions, {len(texts)} attack texts)")
    if args.json:
        write_json_atomic(args.json, payload, overwrite=args.overwrite)
        print(f"wrote {args.json}")
    if args.plot:
        save_figure_atomic(_relearn_figure(result), args.plot, overwrite=args.overwrite)
        print(f"wrote {args.plot}")
    return 0


def _relearn_figure(result: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for lr, curve in result["curves"].items():
        ax.plot(*zip(*curve), marker="o", label=f"lr {lr:g}")
    ax.set(xlabel="attack steps", ylabel=f"held-out {result['metric']}", ylim=(0, 1.05),
           title="relearning attack (RTT)")
    ax.legend()
    fig.tight_layout()
    return fig


TARGET_OPTIONS = ("val_forget", "val_retain", "val_entangled", "target", "keep", "val_every", "budget", "stop")


def _run_fields() -> dict:
    """``RunConfig``'s fields that are flags of their own (``settings`` is ``--set``, ``config_file`` ``--config``)."""
    from .pipeline import RunConfig

    return {name: info for name, info in RunConfig.__pydantic_fields__.items()
            if name not in ("settings", "config_file")}


def _run_options(parser) -> None:
    """The ``unlearn`` flags, one per :class:`~unlearn_kernels.pipeline.RunConfig` field: ``--kebab-name``, its
    description as help, a ``Literal``'s values as choices, a bool a switch (``--x/--no-x`` when it may be
    None), a list one or more values. A flag not given is left out, so the YAML file's value or the field's
    default holds; the values are typed by ``RunConfig``."""
    import typing

    parser.add_argument("--config", help="YAML file with the options below as keys (model, method, forget, ...) "
                                         "and settings: (the method's settings)")
    target = parser.add_argument_group(
        "target-driven runs", "with validation questions the run measures as it goes, stops at the target, saves the "
                              "best point of its trajectory and exits 3 when the target was not reached")
    for name, info in _run_fields().items():
        kind = info.annotation
        options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
        given = [option for option in options if option is not type(None)]
        literal = next((o for o in given if typing.get_origin(o) is typing.Literal), None)
        spec = {"help": info.description.replace("%", "%%"), "default": argparse.SUPPRESS}
        if given == [bool]:
            spec["action"] = argparse.BooleanOptionalAction if len(options) > 1 else "store_true"
        elif literal is not None:
            spec["choices"] = typing.get_args(literal)
        elif typing.get_origin(given[0]) is list:
            spec["nargs"] = "+"
        (target if name in TARGET_OPTIONS else parser).add_argument(f"--{name.replace('_', '-')}", **spec)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a method setting (unlearn-kernels methods NAME lists them)")


def _model_options(parser) -> None:
    parser.add_argument("--model", required=True, help="local model directory (save_pretrained format)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: the checkpoint's dtype")
    parser.add_argument("--format", default="cloze", choices=["cloze", "mmlu"],
                        help="cloze: 'Question: q\\nAnswer:' + ' choice'; mmlu: lettered choices (lm-eval's wmdp/mmlu)")
    parser.add_argument("--text-field", default="text", help="column holding the text in data files")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the model folder's own code files (config.json auto_map) run; never done without")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unlearn-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
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
    demo.add_argument("--full", action="store_true",
                      help="the whole sweep: every overlap (0-30 %%) and more values of each method's knob "
                           "(about 45 min on 2 cores)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    demo.add_argument("--overwrite", action="store_true", help="replace a previous demo's outputs in --out")
    demo.set_defaults(func=_demo)
    methods = sub.add_parser("methods", help="list the methods, or one method's settings")
    methods.add_argument("name", nargs="?")
    methods.set_defaults(func=_methods)
    unlearn = sub.add_parser("unlearn", help="unlearn a local HF model and save it with a report")
    _run_options(unlearn)
    unlearn.set_defaults(func=_unlearn)
    from . import plan

    planner = sub.add_parser("plan", help="memory per GPU and communication of each method for a model config")
    plan.add_arguments(planner)
    planner.set_defaults(func=plan.run)
    evaluate = sub.add_parser("eval", help="multiple-choice accuracy (lm-eval's protocol) and membership inference")
    _model_options(evaluate)
    evaluate.add_argument("--questions", action="extend", nargs="+", default=[],
                          help="question/choices/answer files (jsonl, json, csv, parquet, save_to_disk folder)")
    evaluate.add_argument("--subject", help="mmlu format: '... questions (with answers) about SUBJECT.'")
    evaluate.add_argument("--batch-size", type=int, default=16, help="questions per forward (their choices share it)")
    evaluate.add_argument("--limit", type=int, help="first N questions of each file")
    evaluate.add_argument("--json", help="write lm-eval-style results JSON here ('-': print only the JSON)")
    evaluate.add_argument("--log-samples", metavar="PATH", help="per-question log-likelihoods as jsonl")
    evaluate.add_argument("--engine", default="ours", choices=["ours", "lm-eval"],
                          help="lm-eval: run lm-evaluation-harness itself on the same files")
    evaluate.add_argument("--mia-forget", help="texts the model was trained on (membership AUC, PrivLeak)")
    evaluate.add_argument("--mia-holdout", help="texts it never saw, same distribution")
    evaluate.add_argument("--mia-reference", help="reference model directory (the retrained one) for PrivLeak")
    evaluate.add_argument("--oracle", help="the model retrained without the forget data: its accuracy beside the "
                                           "model's and the forget quality (KS p-value of their truth ratios)")
    evaluate.add_argument("--overwrite", action="store_true",
                          help="replace output files that hold a previous output of unlearn_kernels")
    evaluate.set_defaults(func=_eval)
    relearn = sub.add_parser("relearn", help="relearning attack (RTT): fine-tune on some facts, score held-out ones")
    _model_options(relearn)
    relearn.add_argument("--train", required=True, help="attack texts (the facts the attacker has)")
    relearn.add_argument("--questions", required=True, help="held-out questions (facts the attack never shows)")
    relearn.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3])
    relearn.add_argument("--steps", type=int, default=30)
    relearn.add_argument("--every", type=int, default=10, help="score every N steps")
    relearn.add_argument("--batch-size", type=int, default=8)
    relearn.add_argument("--seed", type=int, default=0)
    relearn.add_argument("--limit", type=int, help="first N questions")
    relearn.add_argument("--json", help="write the curves as JSON here ('-': print only the JSON)")
    relearn.add_argument("--plot", help="write the curves as a PNG here")
    relearn.add_argument("--overwrite", action="store_true",
                         help="replace output files that hold a previous output of unlearn_kernels")
    relearn.set_defaults(func=_relearn)
    args = parser.parse_args(argv)
    return _run(args, debug=args.debug or bool(os.environ.get("UNLEARN_KERNELS_TRACEBACK")))


def _run(args, debug: bool) -> int:
    """``args.func(args)`` under the error model (``unlearn_kernels.errors``): a UserError or a
    diverged run (FloatingPointError) is one line on stderr, exit 2 or 1 (``debug``: the
    traceback); any other exception is a bug of ours: its traceback and a line asking for a
    report, exit 1."""
    from .methods.checkpoint import RunInterrupted

    try:
        return args.func(args)
    except RunInterrupted as error:
        print(f"unlearn-kernels {args.command}: {error}", file=sys.stderr)
        return 130
    except (UserError, FloatingPointError) as error:   # FloatingPointError: a diverged run, nothing written
        if debug:
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if parallel.is_main():
            print(f"unlearn-kernels {args.command}: error: {message}", file=sys.stderr)
        parallel.let_rank0_speak()
        return 2 if isinstance(error, UserError) else 1
    except Exception:
        if debug:
            raise
        import traceback

        import unlearn_kernels

        traceback.print_exc()
        print(f"unlearn-kernels {args.command}: internal error: this is a bug in unlearn_kernels "
              f"{unlearn_kernels.__version__}; please report it with the traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
