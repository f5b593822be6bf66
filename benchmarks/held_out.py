"""Do the defaults reach their target on models they were never tuned on?

For every zoo model of a set (default: the held-out set, ``unlearn_kernels.models.zoo.HELD_OUT``,
built and cached on first use) and every LLM method (default: all of
``unlearn_kernels.methods.registry`` but TAR, whose meta-learning is not cheap), runs
``pipeline.run(RunConfig(...))`` with *no settings*: target-driven on the model's validation
files (``val_{forget,retain,entangled}.jsonl``), or, with ``--no-val``, without them (whatever
stopping rule the pipeline then applies). Each run is its own subprocess, so its time and peak
memory are its own. The saved output is then loaded as any user would (``load_local``) and
scored on the *test* questions (entities the stopping rule never saw) with the package's
lm-eval-equal evaluator. One markdown row per run, printed as it comes and appended to
``--append`` when given:

    model | method | base forget/retain/entangled | forget | retain | entangled | steps | why it
    stopped | exit code | time s | peak MiB

``steps`` is ``best/run`` for target-driven runs (the saved point / the steps run), else the
steps run. The exit code is the child's: 0 done, 3 target not reached (as the CLI), 1 error.

    OMP_NUM_THREADS=1 python benchmarks/held_out.py --only llama-6x96 --methods RMU NPO

Measured (2-core CPU shared with other jobs, load 7-12, 2026-12-06): one cell takes 1-5 minutes
wall on a small held-out model (llama-6x96: RMU 127 s, target reached at step 544, test forget
0.333, retain 1.000, entangled 1.000; NPO 320 s, retain limit hit, test forget 0.786; gpt2-4x128
with ``--no-val``: RMU 51 s); the command above took about 9 minutes with the base scoring.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_SKIP = ("TAR",)
NOT_REACHED = 3


def _child(cell: dict) -> int:
    """Run one cell (in its own process): the pipeline, then one JSON line on stdout."""
    import resource

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from unlearn_kernels.pipeline import RunConfig, run

    result = run(RunConfig(**cell))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("HELD_OUT_RESULT " + json.dumps({"reached": result.reached, "message": result.message,
                                           "out": str(result.out), "peak_mib": round(peak)}), flush=True)
    return NOT_REACHED if result.reached is False else 0


def _steps(report: dict) -> str:
    target = report.get("target")
    if isinstance(target, dict) and target.get("trajectory"):
        return f"{target['best']['step'] + 1}/{target['trajectory'][-1]['step'] + 1}"
    history = report.get("history") or []
    return str(history[-1].get("step", len(history) - 1) + 1) if history else "0"


def _why(report: dict) -> str:
    """The stopping reason the run reports: the target controller's, or any other rule's
    (a top-level section with a ``reason``), else that it ran its length."""
    target = report.get("target")
    if isinstance(target, dict) and target.get("reason"):
        return target["reason"] + ("" if target.get("reached") else " (not reached)")
    for key, value in sorted(report.items()):
        if isinstance(value, dict) and isinstance(value.get("reason"), str):
            return f"{key}: {value['reason']}"
    return "ran its length"


def _scores(folder: Path, paths: dict) -> dict:
    import torch

    from unlearn_kernels.data.loaders import read_multiple_choice
    from unlearn_kernels.eval.multiple_choice import evaluate_multiple_choice
    from unlearn_kernels.models.io import load_local

    model, tokenizer = load_local(folder)
    with torch.no_grad():
        return {kind: evaluate_multiple_choice(model, tokenizer, read_multiple_choice(paths[f"test_{kind}"]),
                                               progress=False)["acc"]
                for kind in ("forget", "retain", "entangled")}


def run_cell(spec, method: str, paths: dict, model_dir: Path, out: Path, validation: bool, timeout: float,
             stop: str = "auto") -> dict:
    cell = dict(model=str(model_dir), method=method, forget=[str(paths["forget"])], retain=[str(paths["retain"])],
                out=str(out), overwrite=True, **({} if validation else {"stop": stop}))
    if validation:
        cell.update(val_forget=str(paths["val_forget"]), val_retain=str(paths["val_retain"]),
                    val_entangled=str(paths["val_entangled"]))
    start = time.perf_counter()
    try:
        child = subprocess.run([sys.executable, __file__, "--cell", json.dumps(cell)], capture_output=True,
                               text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
        code, stdout, stderr = child.returncode, child.stdout, child.stderr
    except subprocess.TimeoutExpired:
        code, stdout, stderr = "timeout", "", f"no result within {timeout:.0f} s"
    seconds = time.perf_counter() - start
    lines = [line for line in stdout.splitlines() if line.startswith("HELD_OUT_RESULT ")]
    row = {"model": spec.name, "method": method, "code": code, "seconds": seconds}
    if not lines:
        row["error"] = (stderr.strip().splitlines() or ["no output"])[-1][:200]
        return row
    result = json.loads(lines[-1].removeprefix("HELD_OUT_RESULT "))
    report = json.loads((out / "report.json").read_text())
    row.update(peak_mib=result["peak_mib"], steps=_steps(report), why=_why(report),
               scores=_scores(out, paths))
    return row


def _fmt(scores: dict | None) -> list[str]:
    return [f"{scores[k]:.3f}" for k in ("forget", "retain", "entangled")] if scores else ["", "", ""]


def markdown(row: dict, base: dict) -> str:
    base_text = "/".join(_fmt(base))
    if "error" in row:
        return (f"| {row['model']} | {row['method']} | {base_text} | | | | | error: {row['error']} | {row['code']} | "
                f"{row['seconds']:.0f} | |")
    f, r, e = _fmt(row["scores"])
    return (f"| {row['model']} | {row['method']} | {base_text} | {f} | {r} | {e} | {row['steps']} | {row['why']} | "
            f"{row['code']} | {row['seconds']:.0f} | {row['peak_mib']} |")


HEADER = ("| model | method | base forget/retain/entangled (test) | forget | retain | entangled | steps | "
          "why it stopped | exit code | time s | peak MiB |\n|" + "---|" * 11)


def main(argv: list[str] | None = None) -> int:
    from unlearn_kernels.methods import registry
    from unlearn_kernels.models import zoo

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=sorted(zoo.SETS), default="held-out")
    parser.add_argument("--only", nargs="+", default=None, help="zoo model names")
    parser.add_argument("--methods", nargs="+", default=[m for m in registry if m not in DEFAULT_SKIP])
    parser.add_argument("--no-val", action="store_true", help="run without validation files")
    parser.add_argument("--stop", choices=["auto", "probe", "rule", "fixed"], default="auto",
                        help="how a --no-val run stops (the pipeline's --stop)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="zoo cache (default: default_cache_dir())")
    parser.add_argument("--work", type=Path, default=None, help="outputs (default: <zoo>/held-out-runs)")
    parser.add_argument("--append", type=Path, default=None, help="append the table to this markdown file")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell:
        return _child(json.loads(args.cell))
    unknown = sorted(set(args.methods) - set(registry))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {sorted(registry)}")
    specs = [s for s in zoo.SETS[args.set] if args.only is None or s.name in args.only]
    if not specs:
        parser.error(f"no model of the {args.set} set is named {args.only}")
    import torch

    torch.set_num_threads(1)
    work = args.work or zoo.zoo_dir(args.cache_dir) / "held-out-runs"
    mode = ("no-val" + ("" if args.stop == "auto" else f"-{args.stop}")) if args.no_val else "val"
    lines = [f"\n{args.set} set, {mode}, {time.strftime('%Y-%m-%d %H:%M')}\n", HEADER]
    print("\n".join(lines), flush=True)
    for spec in specs:
        model_dir = zoo.ensure(spec, args.cache_dir)
        paths = zoo.write_data(spec, args.cache_dir)
        base = _scores(model_dir, paths)
        for method in args.methods:
            row = run_cell(spec, method, paths, model_dir, work / mode / spec.name / method, not args.no_val,
                           args.timeout, args.stop)
            lines.append(markdown(row, base))
            print(lines[-1], flush=True)
    if args.append:
        with open(args.append, "a", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
