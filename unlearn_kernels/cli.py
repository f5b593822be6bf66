"""The ``unlearn-kernels`` command.

    unlearn-kernels demo                  unlearn the embedded model with each method, print the table
    unlearn-kernels demo --full           the whole sweep: every overlap, longer trade-off curves
    unlearn-kernels demo --track classifier   class-wise unlearning of the embedded digits CNN
    unlearn-kernels unlearn --model DIR --method SRMU --forget F --retain R --out DIR [--config run.yaml]
    torchrun --nproc-per-node N -m unlearn_kernels.cli unlearn ... [--parallel ddp]   data-parallel run
    unlearn-kernels eval --model DIR --questions wmdp.jsonl [--questions more.jsonl] [--format mmlu] [--json out.json]
    unlearn-kernels eval --model DIR --mia-forget forget.jsonl --mia-holdout holdout.jsonl
    unlearn-kernels relearn --model DIR --train attack.txt --questions heldout.jsonl [--plot curves.png]
    unlearn-kernels plan --config llama-70b.json --gpus 8   memory and communication per GPU of each method
    unlearn-kernels bench [--device cuda]  throughput table of the fused ops
    unlearn-kernels selfcheck             every kernel backend against the reference
    unlearn-kernels info                  which backends run here

A YAML config for ``unlearn`` holds the same keys as the flags (model, method, forget,
retain, out) plus ``settings:``, the method's config fields (e.g. layer, steering, lr);
``--set key=value`` overrides one setting (values parsed as YAML).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from . import parallel

# Errors in what the user gave (files, settings, devices): one line on stderr and exit code 2;
# --debug (or UNLEARN_KERNELS_TRACEBACK=1) shows the traceback instead.
USER_ERRORS = (ValueError, OSError, ImportError)


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

    benchmark.run(_parse_shapes(args.shapes), getattr(torch, args.dtype), torch.device(args.device),
                  args.repeats, compile_baseline=not args.no_compile)
    return 0


def _demo(args) -> int:
    from . import selfcheck

    if args.full and args.track == "classifier":
        raise ValueError("--full sweeps the LLM demo; the classifier demo has no sweep")
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
        demo.run(args.out, methods=args.methods, relearn_steps=args.relearn_steps, full=args.full,
                 progress=not args.quiet)
    return 0 if ok else 1


def _load_run_config(args) -> dict:
    import yaml

    config = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ValueError(f"--config {path} does not exist")
        config = yaml.safe_load(path.read_text()) or {}
        if not isinstance(config, dict):
            raise ValueError(f"--config {path} must hold a mapping")
    for key in ("model", "method", "forget", "retain", "out"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    settings = dict(config.get("settings") or {})
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes key=value, got {item!r}")
        settings[key] = yaml.safe_load(value)
    config["settings"] = settings
    from .methods import registry

    needed = ("model", "method", "forget", "out")
    if config.get("method") not in registry or registry[config["method"]].needs_retain:
        needed += ("retain",)
    missing = [k for k in needed if not config.get(k)]
    if missing:
        raise ValueError(f"unlearn needs {', '.join(missing)} (flags or --config)")
    return config


def _unlearn(args) -> int:
    from .data.loaders import read_multiple_choice, read_texts
    from .methods import registry
    from .models.io import save_figure_atomic, save_pretrained_atomic
    from .models.output_dir import check_output_path, weights_size

    config = _load_run_config(args)
    if config["method"] not in registry:
        raise ValueError(f"unknown method {config['method']!r}; choose from {sorted(registry)}")
    inputs = [config["model"], *_as_list(config["forget"]), *_as_list(config.get("retain") or [])]
    inputs += [args.config] if args.config else []
    inputs += [p for p in (args.eval_forget, args.eval_retain, args.relearn) if p]
    if args.relearn and not args.eval_forget:
        raise ValueError("--relearn scores the held-out facts of --eval-forget: give --eval-forget too")
    out = check_output_path(config["out"], inputs, overwrite=args.overwrite or args.resume,
                            needed_bytes=weights_size(config["model"]))
    mode = parallel.resolve_mode(args.parallel)
    if mode == "fsdp" and args.relearn:
        raise ValueError("--parallel fsdp: --relearn fine-tunes a copy of the whole model, which a sharded run does "
                         "not hold; attack the output folder afterwards (unlearn-kernels eval --relearn), or use "
                         "--parallel ddp")
    if mode == "fsdp":
        from .models.prefix import unfit_source

        problem = unfit_source(config["model"])
        if problem:   # the sharded run's output is the source's shards, rewritten
            raise ValueError(f"--parallel fsdp: {problem}; use --parallel ddp")
    checkpointer = _checkpointer(out, args)
    forget = [t for f in _as_list(config["forget"]) for t in _training_data(f, args)]
    retain = [t for f in _as_list(config.get("retain") or []) for t in _training_data(f, args)]
    method_config = _method_config(registry[config["method"]], config["settings"])
    evals = {name: read_multiple_choice(path) for name, path in (("forget", args.eval_forget),
                                                                  ("retain", args.eval_retain)) if path}
    attack = read_texts(args.relearn, args.text_field) if args.relearn else None
    from .eval import files

    device, dtype = _device_and_dtype(args.device, args.dtype)
    from .models.prefix import check_shards

    check_shards(config["model"])
    method_config, prefix = _prefix_plan(args, config["model"], registry[config["method"]], method_config,
                                         wants_full=bool(evals or attack))
    with parallel.process_group(mode, device) as device:
        if prefix:
            from .models.prefix import load_prefix

            model, tokenizer = load_prefix(config["model"], prefix["layers_loaded"], _torch_dtype(dtype))
            model = model.to(device)
        else:
            model, tokenizer = files.load_model(config["model"], device, dtype)
        carried = sorted(getattr(model, "unlearn_projections", None) or {})
        if carried:     # the saver would refuse the output after the whole run (models.io)
            raise ValueError(f"{config['model']} carries MRP projections (after layer {', '.join(map(str, carried))}) "
                             f"that an output of {config['method']} cannot keep: unlearn the model they were "
                             "computed for instead (source_model in its report.json)")
        evaluates = parallel.is_main() or mode == "fsdp"   # a sharded forward needs every rank
        before = _accuracies(model, tokenizer, evals) if evaluates else {}
        method = registry[config["method"]](parallel.wrap(model, mode), tokenizer, config=method_config)
        method.fit(forget, retain, checkpoint=checkpointer, resume=args.resume)
        after = _accuracies(method.model, tokenizer, evals) if evaluates else {}
        if mode == "fsdp":    # every rank takes part in gathering the updated weights
            from .methods.distributed import full

            updated = {name: full(p).detach().cpu() for name, p in method.params.items()}
    if not parallel.is_main():
        return 0
    report = {**method.report(), "source_model": str(config["model"])}
    if prefix:
        report["prefix_only"] = prefix
        if prefix["layer_chosen_by_structure"]:   # fixed from the full depth before loading
            report["chosen_by_structure"] = {"layer": prefix["layer"], **report.get("chosen_by_structure", {})}
    if mode != "none":
        report["parallel"] = {"mode": mode, "world_size": int(os.environ["WORLD_SIZE"])}
    if evals:
        report["evaluation"] = {"before": before, "after": after,
                                "protocol": "lm-eval 0.4.13 multiple choice, cloze format"}
    if attack is not None:
        from .eval.relearn import relearn_attack

        result = relearn_attack(method.model, tokenizer, attack, evals["forget"])
        report["relearning"] = {**result, "curves": {str(k): v for k, v in result["curves"].items()}}
    if prefix or mode == "fsdp":   # the source's shards, rewritten where a tensor changed
        from .models.prefix import save_prefix_output

        out = save_prefix_output(config["model"], config["out"], updated if mode == "fsdp" else method.params,
                                 tokenizer, report, model=method.model, projections=method.projections(),
                                 masks=method.saved_masks())
    else:
        out = save_pretrained_atomic(method.model, tokenizer, config["out"], report, method.projections(),
                                     method.saved_masks())
    save_figure_atomic(_report_figure(report), Path(out) / "report.png")
    if checkpointer is not None:
        checkpointer.remove()      # ours, and the run it served is saved
    print(f"saved the unlearned model, report.json and report.png to {config['out']}")
    for split, values in report.get("evaluation", {}).get("before", {}).items():
        print(f"{split} accuracy: {values['acc']:.3f} -> {report['evaluation']['after'][split]['acc']:.3f}")
    return 0


def _torch_dtype(dtype: str | None):
    return getattr(torch, dtype) if dtype else None


def _prefix_plan(args, model_dir, method_class, method_config, wants_full: bool):
    """(config, plan): with prefix-only loading (``models.prefix``) the loss layer is fixed from
    the full depth here and the plan records it; plan is None for a full load. Auto (no flag):
    on for the methods that run only layers 0…l (``runs_prefix``) when l is below the top, the
    folder can be rewritten shard by shard (``models.prefix.unfit_source``) and no evaluation
    needs the whole model."""
    import dataclasses

    from .models.prefix import depth_of, unfit_source
    from .models.roles import default_layer

    asked = args.prefix_only
    if asked is False:
        return method_config, None
    runs_prefix = getattr(method_class, "runs_prefix", False)
    if asked and not runs_prefix:
        raise ValueError(f"--prefix-only: {method_class.name} runs the whole model; only RMU, AdaptiveRMU and SRMU "
                         "run layers 0..l alone")
    if asked and wants_full:
        raise ValueError("--prefix-only loads layers 0..l only; --eval-forget/--eval-retain/--relearn need the whole "
                         "model: drop them or pass --no-prefix-only")
    problem = unfit_source(model_dir)
    if asked and problem:
        raise ValueError(f"--prefix-only: {problem}")
    if not runs_prefix or wants_full or problem:
        return method_config, None
    depth = depth_of(model_dir)
    given = method_config.layer
    layer = default_layer(depth) if given is None else given
    if not -depth <= layer < depth:
        raise ValueError(f"layer {layer} does not exist: the model has {depth} decoder layers (0..{depth - 1})")
    layer %= depth
    if layer == depth - 1 and not asked:
        return method_config, None
    plan = {"layers_loaded": layer + 1, "depth": depth, "layer": layer, "layer_chosen_by_structure": given is None}
    return dataclasses.replace(method_config, layer=layer), plan


def _checkpointer(out: Path, args):
    """``{out}.checkpoint`` for ``--checkpoint-every``/``--resume`` (refusing a folder that is
    not one of our checkpoints, or starting over one without ``--overwrite``)."""
    from .methods.checkpoint import Checkpointer, NotACheckpointError, is_checkpoint

    if not args.checkpoint_every and not args.resume:
        return None
    if args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    path = out.with_name(out.name + ".checkpoint")
    if (path.exists() or path.is_symlink()) and not is_checkpoint(path):   # --overwrite or not
        raise NotACheckpointError(path)
    if path.exists() and not args.resume and not args.overwrite:
        raise ValueError(f"a checkpoint exists at {path}: pass --resume to continue it or --overwrite to start over")
    if args.resume and not path.exists():
        raise ValueError(f"--resume: no checkpoint at {path}")
    return Checkpointer(path, args.checkpoint_every)


def _accuracies(model, tokenizer, evals: dict) -> dict:
    from .eval.multiple_choice import evaluate_multiple_choice

    return {name: evaluate_multiple_choice(model, tokenizer, qs, progress=False) for name, qs in evals.items()}


def _report_figure(report: dict):
    """Loss curves, and before/after accuracy bars when there was an evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluation = report.get("evaluation")
    fig, axes = plt.subplots(1, 2 if evaluation else 1, figsize=(11 if evaluation else 6, 4), squeeze=False)
    ax = axes[0, 0]
    history = report.get("history") or []
    for term in sorted({k for h in history for k in h if k != "step"}):
        ax.plot([h["step"] for h in history if term in h], [h[term] for h in history if term in h], label=term)
    ax.set(xlabel="step", ylabel="loss", title=f"{report['method']}: loss terms")
    if history:
        ax.legend()
    if evaluation:
        bars = axes[0, 1]
        names = list(evaluation["before"])
        x = range(len(names))
        bars.bar([i - 0.2 for i in x], [evaluation["before"][n]["acc"] for n in names], 0.4, label="before")
        bars.bar([i + 0.2 for i in x], [evaluation["after"][n]["acc"] for n in names], 0.4, label="after")
        bars.set(xticks=list(x), xticklabels=names, ylim=(0, 1.05), ylabel="accuracy", title="multiple choice")
        bars.legend()
    fig.tight_layout()
    return fig


def _device_and_dtype(device: str, dtype: str) -> tuple[str, str | None]:
    """``auto``: CUDA when present; bf16 on GPUs that support it, else the checkpoint's dtype."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else None
    return device, dtype


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
        raise ValueError(f"unknown method {args.name!r}; choose from {', '.join(registry)}")
    print(describe(registry[args.name]))
    return 0


def _method_config(method_class, settings: dict):
    """The method's config with ``settings`` applied, typed and checked before the model is loaded."""
    from .methods.base import check_finite_config
    from .methods.settings import make_config

    config = make_config(method_class.config_class, **settings)
    check_finite_config(config)
    return config


def _training_data(path, args) -> list:
    """Texts (``--text-field``), or question/answer pairs with ``--qa`` (the loss-based methods
    then put their loss on the answer tokens only)."""
    from .data.loaders import read_qa_pairs, read_texts

    if args.qa:
        return read_qa_pairs(path, args.question_field, args.answer_field)
    return read_texts(path, args.text_field)


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _eval(args) -> int:
    import json

    from .data.loaders import read_multiple_choice, read_texts
    from .eval import files
    from .eval.multiple_choice import evaluate_multiple_choice
    from .models.io import write_json_atomic, write_jsonl_atomic

    if not args.questions and not args.mia_forget:
        raise ValueError("eval needs --questions FILE (or --mia-forget/--mia-holdout)")
    if bool(args.mia_forget) != bool(args.mia_holdout):
        raise ValueError("--mia-forget and --mia-holdout go together: members and never-trained-on texts")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise ValueError("--batch-size and --limit must be positive integers")
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
                    raise ValueError(f"{path}: question {i + 1}: --format mmlu labels choices A-Z, "
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
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from None
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
            raise ValueError("--oracle compares answers to --questions: give the forget questions")
        payload["oracle"] = _against_oracle(model, tokenizer, *others[args.oracle], args, question_sets)
    if args.log_samples:
        write_jsonl_atomic(args.log_samples, samples)
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
        write_json_atomic(args.json, payload)
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
        raise ValueError(f"--oracle {args.oracle}: its tokenizer differs from the model's; the oracle must be the "
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
        write_json_atomic(args.json, payload)
        print(f"wrote {args.json}")
    if args.plot:
        save_figure_atomic(_relearn_figure(result), args.plot)
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
    demo.set_defaults(func=_demo)
    methods = sub.add_parser("methods", help="list the methods, or one method's settings")
    methods.add_argument("name", nargs="?")
    methods.set_defaults(func=_methods)
    unlearn = sub.add_parser("unlearn", help="unlearn a local HF model and save it with a report")
    unlearn.add_argument("--config", help="YAML file with the keys below and settings:")
    unlearn.add_argument("--model", help="local model directory (save_pretrained format)")
    from .methods import registry

    unlearn.add_argument("--method", help=f"one of {', '.join(registry)} (unlearn-kernels methods NAME: its settings)")
    unlearn.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                         help="auto: CUDA when present")
    unlearn.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                         help="auto: bfloat16 on GPUs that support it, else the checkpoint's dtype")
    unlearn.add_argument("--forget", nargs="+", help=".txt (a text per line) or .jsonl ('text') files")
    unlearn.add_argument("--retain", nargs="+", help="same formats as --forget (not needed by GradAscent)")
    unlearn.add_argument("--out", help="output directory (written atomically)")
    unlearn.add_argument("--eval-forget", help="questions file: accuracy before/after goes into the report")
    unlearn.add_argument("--eval-retain", help="questions file: accuracy before/after goes into the report")
    unlearn.add_argument("--relearn", help="attack texts: relearning attack on --eval-forget after unlearning")
    unlearn.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                         help="write a resumable checkpoint to OUT.checkpoint every N steps (and on Ctrl-C)")
    unlearn.add_argument("--resume", action="store_true", help="continue from OUT.checkpoint")
    unlearn.add_argument("--overwrite", action="store_true",
                         help="replace --out when it holds a previous output of unlearn_kernels")
    unlearn.add_argument("--text-field", default="text", help="column holding the text in data files")
    unlearn.add_argument("--qa", action="store_true",
                         help="data files hold question/answer pairs (TOFU style): loss on the answer tokens")
    unlearn.add_argument("--question-field", default="question")
    unlearn.add_argument("--answer-field", default="answer")
    unlearn.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a method setting")
    unlearn.add_argument("--prefix-only", action=argparse.BooleanOptionalAction, default=None,
                         help="load embeddings and layers 0..l only, write the full checkpoint shard by shard "
                              "(RMU, AdaptiveRMU, SRMU; default: on when l is below the top and no --eval-* is asked)")
    unlearn.add_argument("--parallel", choices=["none", "ddp", "fsdp"], default=None,
                         help="under torchrun: ddp (the default there) splits each global batch over the ranks")
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
    relearn.set_defaults(func=_relearn)
    args = parser.parse_args(argv)
    debug = args.debug or bool(os.environ.get("UNLEARN_KERNELS_TRACEBACK"))
    from .methods.checkpoint import RunInterrupted

    try:
        return args.func(args)
    except RunInterrupted as error:
        print(f"unlearn-kernels {args.command}: {error}", file=sys.stderr)
        return 130
    except FloatingPointError as error:   # a run that diverged: nothing was written
        if debug:
            raise
        if parallel.is_main():
            print(f"unlearn-kernels {args.command}: error: {str(error).splitlines()[0]}", file=sys.stderr)
        parallel.let_rank0_speak()
        return 1
    except USER_ERRORS as error:
        if debug:
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if parallel.is_main():
            print(f"unlearn-kernels {args.command}: error: {message}", file=sys.stderr)
        parallel.let_rank0_speak()
        return 2


if __name__ == "__main__":
    sys.exit(main())
