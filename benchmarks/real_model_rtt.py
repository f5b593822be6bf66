"""Relearning (RTT) on a real pretrained model: how much of what RMU forgets on SmolLM2-135M comes back?

Protocol, per seed s (``--seeds``, default 0 1 2) and method (``--methods``, default RMU):

1. Unlearn SmolLM2-135M-Instruct (``models.gguf.cached_smollm2()``) exactly as the real-model tier
   does (``tests/test_real_model_unlearning.py``): ``pipeline.run`` target-driven on
   ``assets/real-knowledge`` (``forget.txt``/``retain.txt`` as data, the ``val_*`` questions steering
   the run, ``val_every=50``, the package's defaults) with the method's ``seed`` setting = s; fp32, CPU.
2. Score the saved folder on the ``test_*`` questions with the package's evaluator (cloze, ``acc``;
   it agrees with lm-eval 0.4.13 on these files, ``assets/real-knowledge/README.md``).
3. Attack it with RTT (``eval.relearn.relearn_attack``: full fine-tuning, AdamW, lrs 1e-5 / 1e-4 /
   1e-3, 30 steps, held-out accuracy every 10 steps, batch 8, attack seed s). The attacker knows
   the capitals of the ``val_forget`` countries: the attack texts are the ``forget.txt`` lines
   about those countries (3 phrasings each, 63 texts). The held-out questions are
   ``test_forget.jsonl``: 32 capitals the attack never shows. :func:`attack_split` raises when a
   held-out country or capital appears in an attack text.
4. Attack the base model the same way with the same seed: the reference for what the attack does
   to a model that never forgot.

"Relearned" is the attacker's best: the highest held-out accuracy along the curve of every rate
(step 0 included). Recovery is the share of what was forgotten that comes back,
``(relearned − unlearned) / (base − unlearned)``, with ``unlearned`` the held-out accuracy after
unlearning and ``base`` what the same attack reaches on the base model (its best, which is its
step-0 accuracy, 1.0, unless the attack teaches it something). There is no retrained oracle for
SmolLM2, so the "never knew" reference is chance (4 choices: 0.25), and
``(relearned − chance) / (base − chance)`` is reported too (how far above knowing nothing the
attacked model is). Each number is given per seed, then as mean ± sd (ddof 1) over the seeds
with the worst seed (the highest recovery).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/real_model_rtt.py --seeds 0 1 2 \\
        --out benchmarks/results/real-model-rtt-2026-12-07.json

``--resume`` keeps the base attacks and the (method, seed) rows already in ``--out`` and runs the
rest (add ``--methods RMU SRMU`` to a finished RMU file to add SRMU); the JSON is rewritten after
each row. ``--table`` prints the table of ``--out``.

Cost, measured 2026-12-07 on one thread of a 2-core CPU shared with other jobs (load 4-6): an RMU
run 130-160 s (SRMU about 90 s), each attack 205-245 s (the first, 400 s, under more load), the
test evaluation about 20 s; per seed about 10 min for RMU with the base attack, 7 min for SRMU.
The 3 RMU seeds took 36 min of wall time, the 3 SRMU seeds about 21 more.

Measured (``benchmarks/results/real-model-rtt-2026-12-07.json``): the forgotten capitals mostly come
back. RMU: recovery 68 ± 10 % (worst seed 76 %), relearned 0.81 ± 0.03 from 0.40 ± 0.09; SRMU:
84 ± 8 % (worst 91 %), 0.90 ± 0.05 from 0.34 ± 0.05; the best rate is 1e-4 for every run, and
1e-3 damages the base model itself (1.0 -> 0.28-0.50 in 30 steps). Only seed 0 of RMU and seeds 0
and 2 of SRMU reach the run's target; the others stop at "retain limit hit" and keep their best
measured point, as the real-model tier's runs would (the ``run`` field of each row).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from unlearn_kernels.data.loaders import read_multiple_choice  # noqa: E402
from unlearn_kernels.models.output_file import write_json_atomic  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "unlearn_kernels" / "assets" / "real-knowledge"
NAMES = ("forget", "retain", "entangled")
CHANCE = 0.25                   # every question has 4 choices
VAL_EVERY = 50                  # as the real-model tier (tests/test_real_model_unlearning.py)
ATTACK = {"lrs": (1e-5, 1e-4, 1e-3), "steps": 30, "every": 10, "batch_size": 8}
MIN_GAP = 0.05                  # below this a denominator measures nothing (eval.oracle.MIN_GAP)

# forget.txt states each capital in three phrasings (assets README).
_PHRASINGS = (re.compile(r"^The capital of (?P<country>.+) is (?P<capital>.+)\.$"),
              re.compile(r"^(?P<capital>.+) is the capital city of (?P<country>.+)\.$"),
              re.compile(r"^(?P<country>.+)'s capital is (?P<capital>.+)\.$"))
_QUESTION = re.compile(r"^What is the capital of (?P<country>.+)\?$")


def _country(name: str) -> str:
    """``the United Kingdom`` / ``The United Kingdom`` → ``United Kingdom``."""
    return re.sub(r"^[Tt]he ", "", name.strip())


def text_fact(line: str) -> tuple[str, str]:
    """``(country, capital)`` stated by one ``forget.txt`` line; ValueError for any other line."""
    for pattern in _PHRASINGS:
        match = pattern.match(line.strip())
        if match:
            return _country(match["country"]), match["capital"]
    raise ValueError(f"not a capital fact in one of the three phrasings: {line!r}")


def question_fact(question) -> tuple[str, str]:
    """``(country, capital)`` asked by a ``*_forget.jsonl`` question (``MCQuestion``; its right answer)."""
    match = _QUESTION.match(question.question)
    if match is None:
        raise ValueError(f"not a capital question: {question.question!r}")
    return _country(match["country"]), question.choices[question.answer]


def check_disjoint(attack_texts: list[str], heldout: list) -> None:
    """ValueError when any held-out country or capital appears (as a whole word) in an attack text."""
    for question in heldout:
        for name in question_fact(question):
            pattern = re.compile(rf"\b{re.escape(name)}\b", re.IGNORECASE)
            leaks = [t for t in attack_texts if pattern.search(t)]
            if leaks:
                raise ValueError(f"held-out {name!r} ({question.question}) appears in the attack texts: {leaks[:3]}")


def attack_split(assets: Path = ASSETS) -> tuple[list[str], list]:
    """``(attack texts, held-out questions)``: the ``forget.txt`` lines about the ``val_forget``
    countries (3 each) and the ``test_forget`` questions; raises when they share a country or capital."""
    lines = [line for line in (assets / "forget.txt").read_text().splitlines() if line.strip()]
    known = {question_fact(q)[0]: question_fact(q)[1] for q in read_multiple_choice(assets / "val_forget.jsonl")}
    heldout = read_multiple_choice(assets / "test_forget.jsonl")
    texts = [line for line in lines if text_fact(line)[0] in known]
    for country, capital in known.items():
        stated = [t for t in texts if text_fact(t) == (country, capital)]
        if len(stated) != 3:
            raise ValueError(f"forget.txt states the capital of {country} ({capital}) {len(stated)} times, not 3")
    if len(texts) != 3 * len(known):
        raise ValueError(f"{len(texts)} attack texts for {len(known)} countries")
    check_disjoint(texts, heldout)
    return texts, heldout


def attack(model, tokenizer, texts: list[str], heldout: list, seed: int) -> dict:
    from unlearn_kernels.eval.relearn import relearn_attack

    start = time.perf_counter()
    result = relearn_attack(model, tokenizer, texts, heldout, seed=seed, **ATTACK)
    return {"initial": result["initial_acc"], "relearned": result["max_acc"], "best_lr": result["best_lr"],
            "curves": {f"{lr:g}": curve for lr, curve in result["curves"].items()},
            "time_s": round(time.perf_counter() - start, 1)}


def accuracies(model, tokenizer, questions: dict) -> dict:
    from unlearn_kernels.eval.multiple_choice import evaluate_multiple_choice

    return {name: evaluate_multiple_choice(model, tokenizer, qs, progress=False)["acc"]
            for name, qs in questions.items()}


def share(value: float, low: float, high: float) -> float | None:
    """``(value − low) / (high − low)``; None when ``high − low < MIN_GAP``."""
    return (value - low) / (high - low) if high - low >= MIN_GAP else None


def unlearn(folder: Path, method: str, seed: int, out: Path) -> dict:
    from unlearn_kernels.pipeline import RunConfig, run

    start = time.perf_counter()
    result = run(RunConfig(model=str(folder), method=method, forget=[str(ASSETS / "forget.txt")],
                           retain=[str(ASSETS / "retain.txt")], out=str(out), device="cpu",
                           val_forget=str(ASSETS / "val_forget.jsonl"), val_retain=str(ASSETS / "val_retain.jsonl"),
                           val_entangled=str(ASSETS / "val_entangled.jsonl"), val_every=VAL_EVERY,
                           settings={"seed": seed}))
    summary = result.report["target"]
    return {"reached": result.reached, "reason": summary["reason"], "best_step": summary["best"]["step"],
            "val": {name: summary["best"][name] for name in NAMES}, "run_s": round(summary["run_time_s"], 1),
            "wall_s": round(time.perf_counter() - start, 1)}


def spread(values: list[float], form: str = ".3f") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) < 2:
        return f"{values[0]:{form}}"
    return f"{statistics.fmean(values):{form}} ± {statistics.stdev(values):{form}}"


def summarize(rows: list[dict]) -> dict:
    """Per method: mean, sd and the worst seed of every reported number."""
    keys = ("test_forget", "relearned", "recovery", "recovery_vs_chance", "test_retain", "test_entangled", "run_s")
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == method]
        stats = {}
        for key in keys:
            values = [r[key] for r in group if r[key] is not None]
            stats[key] = {"mean": statistics.fmean(values) if values else None,
                          "sd": statistics.stdev(values) if len(values) > 1 else None}
        worst = max(group, key=lambda r: (r["recovery"] if r["recovery"] is not None else -math.inf))
        out[method] = {"seeds": [r["seed"] for r in group], **stats,
                       "worst": {"seed": worst["seed"], "recovery": worst["recovery"],
                                 "relearned": worst["relearned"]}}
    return out


def table(rows: list[dict]) -> str:
    lines = ["| method | seed | run stopped | test forget | relearned (best lr) | recovery | recovery vs chance "
             "| test retain | test entangled | run (s) |", "|---|---|---|---|---|---|---|---|---|---|"]

    def pct(v):
        return "n/a" if v is None else f"{v:.0%}"

    for method in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == method]
        for r in group:
            lines.append(f"| {method} | {r['seed']} | {r['run']['reason']} (step {r['run']['best_step']}) | "
                         f"{r['test_forget']:.3f} | {r['relearned']:.3f} "
                         f"({r['attack']['best_lr']:g}) | {pct(r['recovery'])} | {pct(r['recovery_vs_chance'])} | "
                         f"{r['test_retain']:.3f} | {r['test_entangled']:.3f} | {r['run_s']:.0f} |")
        worst = max(group, key=lambda r: (r["recovery"] if r["recovery"] is not None else -math.inf))
        reached = sum(bool(r["run"]["reached"]) for r in group)
        lines.append(f"| {method} | mean ± sd | target reached {reached}/{len(group)} | "
                     f"{spread([r['test_forget'] for r in group])} | {spread([r['relearned'] for r in group])} | "
                     f"{spread([r['recovery'] and 100 * r['recovery'] for r in group], '.0f')} % | "
                     f"{spread([r['recovery_vs_chance'] and 100 * r['recovery_vs_chance'] for r in group], '.0f')} % | "
                     f"{spread([r['test_retain'] for r in group])} | {spread([r['test_entangled'] for r in group])} "
                     f"| {spread([r['run_s'] for r in group], '.0f')} |")
        lines.append(f"| {method} | worst (seed {worst['seed']}) | {worst['run']['reason']} | "
                     f"{worst['test_forget']:.3f} | {worst['relearned']:.3f} | {pct(worst['recovery'])} | "
                     f"{pct(worst['recovery_vs_chance'])} | "
                     f"{worst['test_retain']:.3f} | {worst['test_entangled']:.3f} | {worst['run_s']:.0f} |")
    return "\n".join(lines)


def print_table(path: Path) -> None:
    """The table of a results file (``--table``)."""
    payload = json.loads(Path(path).read_text())
    print(table(payload["rows"]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["RMU"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="real-model-rtt.json")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out, run the others")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = parser.parse_args(argv)
    if args.table:
        return print_table(Path(args.out))
    torch.set_num_threads(args.threads)

    from unlearn_kernels.models import gguf
    from unlearn_kernels.models.io import load_local

    texts, heldout = attack_split()
    questions = {name: read_multiple_choice(ASSETS / f"test_{name}.jsonl") for name in NAMES}
    folder = gguf.cached_smollm2()
    out = Path(args.out)
    if out.exists() and not (args.resume or args.overwrite):
        parser.error(f"{out} exists: --resume continues it, --overwrite replaces it")
    done = json.loads(out.read_text()) if args.resume and out.exists() else {}
    base_attacks = {int(k): v for k, v in done.get("base_attacks", {}).items()}
    rows = list(done.get("rows", []))
    base_test = done.get("base_test")
    protocol = {"model": folder.name, "assets": "unlearn_kernels/assets/real-knowledge", "val_every": VAL_EVERY,
                "attack": {**ATTACK, "texts": len(texts), "heldout": len(heldout),
                           "attack_countries": sorted({text_fact(t)[0] for t in texts}),
                           "heldout_countries": [question_fact(q)[0] for q in heldout]},
                "chance": CHANCE, "threads": args.threads, "device": "cpu", "dtype": "float32"}

    def save():
        payload = {"protocol": protocol, "base_test": base_test, "base_attacks": base_attacks, "rows": rows,
                   "summary": summarize(rows) if rows else {}}
        write_json_atomic(out, payload, overwrite=out.exists())     # refused over a file not ours

    base, tokenizer = load_local(folder, torch.float32)
    if base_test is None:
        base_test = accuracies(base, tokenizer, questions)
        print(f"base test accuracy: {base_test}", flush=True)
    with tempfile.TemporaryDirectory(prefix="real-model-rtt-") as scratch:
        for seed in args.seeds:
            if seed not in base_attacks:
                base_attacks[seed] = attack(base, tokenizer, texts, heldout, seed)
                print(f"seed {seed} base: held-out {base_attacks[seed]['initial']:.3f} -> best "
                      f"{base_attacks[seed]['relearned']:.3f} ({base_attacks[seed]['time_s']:.0f} s)", flush=True)
                save()
            reference = base_attacks[seed]["relearned"]
            for method in args.methods:
                if any(r["method"] == method and r["seed"] == seed for r in rows):
                    continue
                target = Path(scratch) / f"{method}-{seed}"
                run = unlearn(folder, method, seed, target)
                model, tok = load_local(target, torch.float32)
                test = accuracies(model, tok, questions)
                hit = attack(model, tok, texts, heldout, seed)
                del model
                shutil.rmtree(target)
                unlearned = hit["initial"]
                rows.append({"method": method, "seed": seed, "test_forget": test["forget"],
                             "test_retain": test["retain"], "test_entangled": test["entangled"],
                             "unlearned_heldout": unlearned, "relearned": hit["relearned"],
                             "base_relearned": reference,
                             "recovery": share(hit["relearned"], unlearned, reference),
                             "recovery_vs_chance": share(hit["relearned"], CHANCE, reference),
                             "run_s": run["run_s"], "run": run, "attack": hit})
                r = rows[-1]
                print(f"seed {seed} {method}: {run['reason']} at step {run['best_step']} ({run['run_s']:.0f} s); test "
                      f"forget {r['test_forget']:.3f} retain {r['test_retain']:.3f} entangled "
                      f"{r['test_entangled']:.3f}; attack best {r['relearned']:.3f} at lr {hit['best_lr']:g} "
                      f"({hit['time_s']:.0f} s); recovery {r['recovery']}", flush=True)
                save()
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
