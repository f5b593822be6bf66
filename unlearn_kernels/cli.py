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

Every command is a function of the library and its flags are the fields of that function's
typed config (``config_types.add_flags``): ``unlearn`` -> ``pipeline.RunConfig`` (one type for
the flags, the YAML config, the Python API and the demo), ``eval`` -> ``eval.evaluate_files``,
``relearn`` -> ``eval.relearn_files``, ``plan`` -> ``plan.PlanConfig``, ``demo`` ->
``demo_command.DemoConfig``, ``bench`` -> ``benchmark.BenchConfig``. A YAML config for
``unlearn`` holds the same keys (model, method, forget, retain, out, eval_forget, ...) plus
``settings:``, the method's config fields (e.g. layer, steering, lr); flags given override the
file, ``--set key=value`` overrides one setting (values parsed as YAML). This module only
builds the parser and applies the error model (:func:`_run`).
"""

from __future__ import annotations

import argparse
import os
import sys

from . import parallel
from .config_types import add_flags, flag_values
from .errors import UserError

TARGET_OPTIONS = ("val_forget", "val_retain", "val_entangled", "target", "keep", "val_every", "budget", "stop")


def _info(_args) -> int:
    from .selfcheck import info

    info()
    return 0


def _selfcheck(_args) -> int:
    from . import selfcheck

    return 0 if selfcheck.run() else 1


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


def _run_options(parser) -> None:
    """The ``unlearn`` flags: one per :class:`~unlearn_kernels.pipeline.RunConfig` field (``add_flags``),
    ``--config`` for the YAML file and ``--set`` for the method's settings."""
    from .pipeline import RunConfig

    parser.add_argument("--config", help="YAML file with the options below as keys (model, method, forget, ...) "
                                         "and settings: (the method's settings)")
    target = parser.add_argument_group(
        "target-driven runs", "with validation questions the run measures as it goes, stops at the target, saves the "
                              "best point of its trajectory and exits 3 when the target was not reached")
    add_flags(parser, RunConfig, skip=("settings", "config_file"),
              group_of=lambda name: target if name in TARGET_OPTIONS else None)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a method setting (unlearn-kernels methods NAME lists them)")


def _load_run_config(args):
    """The run config of ``--config`` with the flags over it and ``--set`` over its settings."""
    from .pipeline import RunConfig, load_run_config

    return load_run_config(args.config, flag_values(args, RunConfig), args.set or [])


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


def _command(config_class, function, returns_status: bool):
    """A subcommand's function: its config from the flags (``flag_values``), then ``function(config)``;
    exit status 0, or what ``function`` returns when ``returns_status``."""
    def call(args) -> int:
        result = function(config_class(**flag_values(args, config_class)))
        return result if returns_status else 0
    return call


def _commands() -> dict:
    """``{name: (help, config class, function of the config, whether it returns the exit status)}`` of the
    commands whose flags are a config class's fields."""
    from . import benchmark, demo_command, plan
    from .eval.evaluate_files import EvalConfig, evaluate_files
    from .eval.relearn_files import RelearnConfig, relearn_files

    return {
        "bench": ("throughput table of the fused ops", benchmark.BenchConfig, benchmark.run_command, False),
        "demo": ("unlearn the embedded model with each method and print the table", demo_command.DemoConfig,
                 demo_command.run, True),
        "plan": ("memory per GPU and communication of each method for a model config", plan.PlanConfig, plan.run,
                 False),
        "eval": ("multiple-choice accuracy (lm-eval's protocol) and membership inference", EvalConfig,
                 evaluate_files, False),
        "relearn": ("relearning attack (RTT): fine-tune on some facts, score held-out ones", RelearnConfig,
                    relearn_files, False),
    }


def build_parser() -> argparse.ArgumentParser:
    """The ``unlearn-kernels`` command line (module docstring)."""
    top = argparse.ArgumentParser(prog="unlearn-kernels", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = top.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which backends run here").set_defaults(func=_info)
    sub.add_parser("selfcheck", help="every backend against the reference").set_defaults(func=_selfcheck)
    methods = sub.add_parser("methods", help="list the methods, or one method's settings")
    methods.add_argument("name", nargs="?")
    methods.set_defaults(func=_methods)
    unlearn = sub.add_parser("unlearn", help="unlearn a local HF model and save it with a report")
    _run_options(unlearn)
    unlearn.set_defaults(func=_unlearn)
    for name, (help, config_class, function, returns_status) in _commands().items():
        command = sub.add_parser(name, help=help)
        add_flags(command, config_class)
        command.set_defaults(func=_command(config_class, function, returns_status))
    return top


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _run(args, debug=args.debug or bool(os.environ.get("UNLEARN_KERNELS_TRACEBACK")))


def _run(args, debug: bool) -> int:
    """``args.func(args)`` under the error model (``unlearn_kernels.errors``): a UserError or a
    diverged run (FloatingPointError) is one line on stderr, exit 2 or 1 (``debug``: the
    traceback); any other exception is a bug of ours: its traceback and a line asking for a
    report, exit 1. Output piped into a reader that stops early (``| head``) ends quietly."""
    from .methods.checkpoint import RunInterrupted

    try:
        return args.func(args)
    except BrokenPipeError:             # the reader left: no traceback, and none at exit's flush either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
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
