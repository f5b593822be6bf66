"""The demo: unlearn the embedded model with each method, swept over its strength knob, and
measure every run against the retrained oracle.

For each split (the default: 30 % overlap, the split the shipped oracle was retrained for;
``full=True``: 0, 10, 20 and 30 %) it evaluates the base model, the oracle (where it is valid)
and each method at each value of its main strength knob (``SWEEPS``) with
:func:`~unlearn_kernels.eval.suite.evaluate`: forget / retain accuracy, accuracy on the retain
facts of the forget entities, the held-out forget accuracy after the RTT relearning attack at
three learning rates, *recovery* — the share of the removed knowledge that comes back,
``(relearned − oracle relearned) / (base − oracle)`` at each rate, the worst one reported —
forget quality (the KS p-value between the method's and the oracle's per-question truth
ratios), probe accuracy and MIA AUC, with the oracle's values beside them. It prints one table
and the verdicts (the tamper-resistance goal, SRMU vs RMU at equal forget accuracy), and writes
``results.json`` and ``tradeoff.png``: per split, the forget–retain and forget–recovery curves
of every method through its sweep, with the base model and the oracle as reference points.
With further seeds (``full=True``: 1 and 2) the quick demo's runs are repeated at the default
overlap with the method's and the attack's seed, and :func:`seed_table` prints each as mean ±
sd over the seeds: a verdict holds only when it holds on every seed.

Every run goes through :func:`unlearn_kernels.pipeline.run`, as ``unlearn-kernels unlearn``
does: the split's texts are written to ``{out}/data/``, each unlearned model is saved to
``{out}/models/{method}-{knob}={value}/`` (with its ``report.json`` and ``report.png``) and
the table scores that folder as loaded back — the model a user would hand on, not the one
still in memory. The runs keep the fixed lengths of ``DEMO_SETTINGS`` (``stop="fixed"``): the
demo draws each method's trade-off curve through its knob; ``unlearn-kernels unlearn`` with
``--val-*`` is the target-driven run.
"""

from __future__ import annotations

from pathlib import Path

from .data import entangled
from .errors import UserError
from .eval.suite import Split, compare, evaluate, measure
from .models import tiny
from .models.output_dir import check_output_path
from .models.output_file import check_output_file
from .models.io import load_local, save_figure_atomic, write_json_atomic, write_jsonl_atomic
from .pipeline import RunConfig
from .pipeline import run as unlearn

LAYER = 3          # representation losses read here (of 6 decoder layers), updating layers 1-3
PROBE_LAYER = 4    # linear probes: the base model decodes 53 % of the forget answers here, the oracle 16 %
DEFAULT_OVERLAP = 0.3
FULL_OVERLAPS = (0.0, 0.1, 0.2, 0.3)
FULL_SEEDS = (1, 2)   # --full: the quick demo's runs at the default overlap again with these seeds
_MLPS = ["layers.{1,2,3}.mlp.*"]
# Base settings per method for the shipped 6-layer model, tuned on the default split (30 %
# overlap) for forget accuracy near the oracle's at the highest retain accuracy found (the
# published 7B defaults live in the config classes); the swept knob overrides its entry.
DEMO_SETTINGS = {
    "RMU": dict(layer=LAYER, update=_MLPS, steering=300.0, alpha=10.0, lr=5e-3, batch_size=16, steps=200),
    "SRMU": dict(layer=LAYER, update=_MLPS, beta=10.0, alpha=100.0, lr=5e-3, batch_size=16, steps=200,
                 sparsity=0.4, temperature=0.1, anchor_forget=False),
    "MRP": dict(layer=2, rank=32, retain_energy=0.95, batch_size=16, train_steps=80, lr=3e-2),
    "SIMU": dict(update=["layers.*.mlp.{gate_proj,up_proj,down_proj}"], lr=1e-3, batch_size=16, steps=120,
                 fraction=0.2, score_batches=4, retain_weight=5.0),
    "GradDiff": dict(update=["layers.*"], lr=1e-3, batch_size=16, steps=60, retain_weight=5.0),
    "NPO": dict(update=["layers.*"], lr=1e-3, batch_size=16, steps=60, retain_weight=8.0),
    "TAR": dict(update=["layers.*"], lr=7e-4, batch_size=16, steps=120, adversary_steps=4,
                adversary_lrs=(3e-3, 3e-3), retain_weight=3.0),
}
# The main strength knob of each method: (setting, values of the default demo, values of --full).
SWEEPS = {
    "RMU": ("steering", (100.0, 300.0), (30.0, 100.0, 300.0, 1000.0)),
    "SRMU": ("beta", (10.0, 20.0), (5.0, 10.0, 20.0, 40.0)),
    "MRP": ("rank", (32,), (8, 16, 32, 64)),
    "SIMU": ("lr", (1e-3,), (3e-4, 1e-3, 3e-3)),
    "GradDiff": ("steps", (60,), (30, 60, 120)),
    "NPO": ("steps", (60,), (30, 60, 120)),
    "TAR": ("steps", (60, 120), (60, 100, 120, 140)),
}


def runs(methods, full: bool) -> list[tuple[str, str, object]]:
    """``[(method, knob, value)]`` of a demo, in order."""
    return [(name, SWEEPS[name][0], value) for name in methods for value in SWEEPS[name][2 if full else 1]]


def run(out_dir: Path | str = "demo_out", overlaps=None, methods=None, relearn_steps: int = 30, full: bool = False,
        model_path: Path | str = tiny.ASSET_DIR, oracle_path: Path | str | None = tiny.ORACLE_DIR,
        progress: bool = True, out=print, overwrite: bool = False, seeds=None) -> list[dict]:
    """Every run of the module docstring; returns the table rows (also in ``results.json``).
    ``seeds``: further seeds (default: ``FULL_SEEDS`` with ``full``, else none) with which the
    quick demo's runs are repeated at the default overlap — the method's ``seed`` setting and the
    attack's seed both, for the base model and the oracle too; their spread is printed by
    :func:`seed_table`. The outputs are checked first (:func:`check_outputs`)."""
    methods = list(DEMO_SETTINGS) if methods is None else list(methods)
    seeds = _seeds(full, seeds)
    out_dir = Path(out_dir)
    check_outputs(out_dir, methods, full, overlaps, overwrite, inputs=[model_path, oracle_path], seeds=seeds)
    base, tokenizer = tiny.load(model_path)
    oracle_model = tiny.load(oracle_path)[0] if oracle_path is not None else None
    rows = []
    for overlap, planned in _plan(methods, full, overlaps, seeds).items():
        split = Split.from_benchmark(entangled.generate(overlap))
        data = _write_split(split, _data_folder(out_dir, overlap), overwrite)
        for seed, seed_runs in planned:
            # the oracle never saw the forget facts of the default split only
            oracle = (measure(oracle_model, tokenizer, split, PROBE_LAYER, relearn_steps, seed)
                      if oracle_model is not None and overlap == DEFAULT_OVERLAP else None)
            base_result = evaluate(base, tokenizer, split, PROBE_LAYER, relearn_steps, seed, oracle=oracle, base=base)
            fixed = {"overlap": overlap, "seed": seed, "knob": None, "value": None, "time_s": 0.0}
            rows.append({**fixed, "method": "base", **base_result})
            if oracle is not None:
                rows.append({**fixed, "method": "oracle", **compare(oracle, oracle, base_result)})
            for name, knob, value in seed_runs:
                folder = _run_folder(out_dir, overlap, name, knob, value, seed)
                result = unlearn(RunConfig(model=str(model_path), method=name, out=str(folder),
                                           settings={**DEMO_SETTINGS[name], knob: value, "seed": seed,
                                                     "progress": progress},
                                           stop="fixed", device="cpu", overwrite=overwrite, **data))
                model = load_local(result.out)[0]
                rows.append({"overlap": overlap, "seed": seed, "method": name, "knob": knob, "value": value,
                             "time_s": result.report["wall_time_s"], "folder": str(result.out),
                             **evaluate(model, tokenizer, split, PROBE_LAYER, relearn_steps, seed, oracle=oracle,
                                        base=base_result)})
    first = [r for r in rows if r["seed"] == 0]
    out(table(first))
    out(verdict(first))
    if seeds:
        out(seed_table(rows))
    write_json_atomic(out_dir / "results.json", {"rows": rows, "chance": 0.25}, overwrite=overwrite)
    plot(first, out_dir / "tradeoff.png", overwrite)
    out(f"\nwrote {out_dir / 'results.json'} and {out_dir / 'tradeoff.png'}")
    return rows


def check_outputs(out_dir: Path | str, methods=None, full: bool = False, overlaps=None, overwrite: bool = False,
                  inputs=(tiny.ASSET_DIR, tiny.ORACLE_DIR), seeds=None) -> None:
    """UserError for an unknown method, or an output in ``out_dir`` that is not new and not,
    with ``overwrite``, a previous output of ours (``models.output_dir``, ``models.output_file``);
    the CLI calls it before any work."""
    methods = list(DEMO_SETTINGS) if methods is None else list(methods)
    unknown = [m for m in methods if m not in DEMO_SETTINGS]
    if unknown:
        raise UserError(f"unknown demo methods {unknown}; choose from {list(DEMO_SETTINGS)}")
    out_dir, inputs = Path(out_dir), [p for p in inputs if p is not None]
    for overlap, planned in _plan(methods, full, overlaps, _seeds(full, seeds)).items():
        for seed, seed_runs in planned:
            for name, knob, value in seed_runs:
                check_output_path(_run_folder(out_dir, overlap, name, knob, value, seed), inputs, overwrite=overwrite)
        for name in ("forget", "retain"):
            check_output_file(_data_folder(out_dir, overlap) / f"{name}.jsonl", inputs, overwrite=overwrite)
    for name in ("results.json", "tradeoff.png"):
        check_output_file(out_dir / name, inputs, overwrite=overwrite)


def _plan(methods, full: bool, overlaps, seeds: tuple) -> dict:
    """``{overlap: [(seed, runs)]}``: what a demo runs, in order. Seed 0 at every overlap (with
    ``full`` the whole sweep); the further ``seeds`` at the default overlap only (the oracle was
    retrained for its split), repeating the quick demo's runs."""
    return {overlap: [(seed, runs(methods, full and seed == 0))
                      for seed in (0, *(seeds if overlap == DEFAULT_OVERLAP else ()))]
            for overlap in _splits(full, overlaps)}


def _splits(full: bool, overlaps=None) -> tuple:
    """The overlaps a demo runs: those given, else every one with ``full``, else the default."""
    return tuple(FULL_OVERLAPS if full else (DEFAULT_OVERLAP,)) if overlaps is None else tuple(overlaps)


def _seeds(full: bool, seeds=None) -> tuple:
    """The further seeds a demo runs: those given, else ``FULL_SEEDS`` with ``full``, else none."""
    return tuple(FULL_SEEDS if full else ()) if seeds is None else tuple(seeds)


def _data_folder(out_dir: Path, overlap: float) -> Path:
    return out_dir / "data" / f"overlap-{overlap:g}"


def _write_split(split: Split, folder: Path, overwrite: bool = False) -> dict:
    """The split's forget and retain texts as JSON-lines files (the ``text`` field) in
    ``folder``: the pipeline's ``forget`` and ``retain`` arguments."""
    files = {}
    for name, texts in (("forget", split.forget_texts), ("retain", split.retain_texts)):
        rows = [{"text": t} for t in texts]
        files[name] = [str(write_jsonl_atomic(folder / f"{name}.jsonl", rows, overwrite=overwrite))]
    return files


def _run_folder(out_dir: Path, overlap: float, name: str, knob: str, value, seed: int = 0) -> Path:
    """Where one run's model goes; overlaps other than the default and seeds other than 0 get their
    own folder level."""
    run = f"{name}-{knob}={value:g}"
    level = f"seed-{seed}/" if seed else "" if overlap == DEFAULT_OVERLAP else f"overlap-{overlap:g}/"
    return out_dir / "models" / f"{level}{run}"


def _num(value, fmt: str = ".3f") -> str:
    return "n/a" if value is None else format(value, fmt)


def table(rows: list[dict]) -> str:
    """Markdown table; "shared retain" is the accuracy on retain facts about the forget entities,
    "relearned" the held-out forget accuracy after the attacker's best rate, "recovery" the worst
    rate's share of the removed knowledge that came back, "FQ p" the forget-quality p-value."""
    lines = ["| overlap | method | setting | forget acc | retain acc | shared retain | relearned | recovery | FQ p | "
             "probe acc | MIA AUC | time s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        setting = "" if r["knob"] is None else f"{r['knob']}={r['value']:g}"
        lines.append(f"| {r['overlap']:.0%} | {r['method']} | {setting} | {r['forget_acc']:.3f} | {r['retain_acc']:.3f} | "
                     f"{_num(r['shared_retain_acc'])} | {r['relearn_acc']:.3f} | {_num(r.get('recovery_max'), '.0%')} | "
                     f"{_num(r.get('forget_quality'), '.2g')} | {r['probe_acc']:.3f} | {_num(r.get('mia_auc'))} | "
                     f"{r['time_s']:.1f} |")
    return "\n".join(lines)


def frontier(points: list[tuple[float, float]], x: float) -> float | None:
    """The best retain accuracy among ``(forget, retain)`` points whose forget accuracy is at
    most ``x`` (None when there is none): a method's forget–retain trade-off as a monotone curve,
    however its knob moves the two."""
    kept = [retain for forget, retain in points if forget <= x + 1e-12]
    return max(kept) if kept else None


def goal_misses(row: dict, base: dict, oracle: dict) -> list[str]:
    """The parts of the tamper-resistance goal ``row`` misses against the ``base`` and ``oracle`` rows
    of its split and seed: recovery <= 20 % at every attack rate, forget within 5 points of the
    oracle, retain >= 95 % of the base model."""
    rec = row.get("recovery")
    checks = {"recovery <= 20 % at every rate": rec is not None and max(rec.values()) <= 0.20,
              "forget within 5 points of the oracle": abs(row["forget_acc"] - oracle["forget_acc"]) <= 0.05,
              "retain >= 95 % of base": row["retain_acc"] >= 0.95 * base["retain_acc"]}
    return [k for k, ok in checks.items() if not ok]


def _spread(values: list[float], fmt: str = ".3f") -> str:
    """``mean ± sd`` (sample standard deviation) of ``values``."""
    import statistics

    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format(statistics.fmean(values), fmt)} ± {format(sd, fmt)}"


def seed_table(rows: list[dict]) -> str:
    """At the default overlap, each run repeated over seeds: forget, retain and the worst rate's
    recovery as mean ± sd over the seeds, the worst seed's recovery, and on how many seeds the
    tamper-resistance goal (:func:`goal_misses`) holds — a verdict holds only when it holds for all."""
    at = [r for r in rows if r["overlap"] == DEFAULT_OVERLAP]
    seeds = sorted({r["seed"] for r in at})
    refs = {(r["seed"], r["method"]): r for r in at if r["method"] in ("base", "oracle")}
    lines = [f"\nOver seeds {', '.join(map(str, seeds))} (method and attack), {DEFAULT_OVERLAP:.0%} overlap: "
             "mean ± sd; the goal holds only if it holds on every seed",
             "| method | setting | forget acc | retain acc | recovery | worst recovery | goal met |",
             "|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["method"], r["knob"], r["value"]) for r in at if r["method"] not in ("base",
                                                                                                  "oracle")):
        repeats = [r for r in at if (r["method"], r["knob"], r["value"]) == key]
        if len(repeats) < 2:
            continue
        recovery = [r["recovery_max"] for r in repeats if r.get("recovery_max") is not None]
        met = [not goal_misses(r, refs[r["seed"], "base"], refs[r["seed"], "oracle"]) for r in repeats
               if (r["seed"], "oracle") in refs]
        lines.append(f"| {key[0]} | {key[1]}={key[2]:g} | {_spread([r['forget_acc'] for r in repeats])} | "
                     f"{_spread([r['retain_acc'] for r in repeats])} | "
                     f"{_spread(recovery, '.0%') if recovery else 'n/a'} | "
                     f"{format(max(recovery), '.0%') if recovery else 'n/a'} | "
                     f"{f'{sum(met)}/{len(met)}' if met else 'n/a'} |")
    return "\n".join(lines)


def verdict(rows: list[dict], chance: float = 0.25) -> str:
    """At the largest overlap, whether each setting of a tamper-resistant method
    (``MethodSpec.tamper_resistant``) meets the goal (recovery <= 20 % at every attack rate, forget
    within 5 points of the oracle, retain >= 95 % of the base model); at every overlap, each
    feature-selective method against the one it refines (``MethodSpec.selective_of``) at equal
    forget accuracy (:func:`_selective_vs_plain`)."""
    from .methods import registry

    overlap = max(r["overlap"] for r in rows)
    at = [r for r in rows if r["overlap"] == overlap]
    base = next((r for r in at if r["method"] == "base"), None)
    oracle = next((r for r in at if r["method"] == "oracle"), None)
    lines = []
    if base is not None and oracle is not None:
        for r in (r for r in at if r["method"] in registry and registry[r["method"]].spec.tamper_resistant):
            missed = goal_misses(r, base, oracle)
            lines.append(f"{r['method']} {r['knob']}={r['value']:g} at {overlap:.0%} overlap "
                         f"{'meets the goal' if not missed else 'MISSES ' + '; '.join(missed)}: recovery "
                         f"{_num(r.get('recovery_max'), '.0%')} (worst rate), forget {r['forget_acc']:.3f} "
                         f"(oracle {oracle['forget_acc']:.3f}), retain {r['retain_acc']:.3f} "
                         f"(limit {0.95 * base['retain_acc']:.3f}).")
    pairs = [(name, cls.spec.selective_of) for name, cls in registry.items() if cls.spec.selective_of]
    for level in sorted({r["overlap"] for r in rows}):
        for selective, plain in pairs:
            lines += _selective_vs_plain([r for r in rows if r["overlap"] == level], level, selective, plain)
    return ("\n" + "\n".join(lines)) if lines else ""


def _selective_vs_plain(at: list[dict], overlap: float, selective: str, plain: str) -> list[str]:
    """The frontier of ``selective`` (SRMU) minus that of ``plain`` (RMU) (:func:`frontier`) at every
    forget accuracy either reaches and both can match, for retain and for the retain facts of the
    forget entities."""
    if not any(r["method"] == selective for r in at) or not any(r["method"] == plain for r in at):
        return []
    parts = []
    for key, label in (("retain_acc", "retain"), ("shared_retain_acc", "shared-entity retain")):
        curves = {m: [(r["forget_acc"], r[key]) for r in at if r["method"] == m and r[key] is not None]
                  for m in (selective, plain)}
        xs = sorted({x for x, _ in curves[selective] + curves[plain]})
        gaps = [s - r for x in xs if (s := frontier(curves[selective], x)) is not None
                and (r := frontier(curves[plain], x)) is not None]
        if gaps:
            parts.append(f"{label} {min(gaps):+.3f} to {max(gaps):+.3f}")
    return [f"{selective} vs {plain} ({overlap:.0%} overlap), best accuracy at equal or lower forget accuracy, "
            f"{selective} minus {plain}: {'; '.join(parts)}."]


def plot(rows: list[dict], path: Path, overwrite: bool = False) -> None:
    """Per split: forget vs retain accuracy and forget accuracy vs recovery (or relearned
    accuracy where there is no oracle), one curve per method through its sweep, the oracle as a
    star and the base model (forget 1.0, off to the right) as a dotted line (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overlaps = sorted({r["overlap"] for r in rows})
    names = [n for n in dict.fromkeys(r["method"] for r in rows) if n not in ("base", "oracle")]
    colors = {**{n: f"C{i}" for i, n in enumerate(names)}, "oracle": "gold"}
    markers = {**{n: "osD^vPXh"[i % 8] for i, n in enumerate(names)}, "oracle": "*"}
    fig, axes = plt.subplots(2, len(overlaps), figsize=(5.5 * len(overlaps), 9), squeeze=False)
    for col, overlap in enumerate(overlaps):
        at = [r for r in rows if r["overlap"] == overlap]
        base = next((r for r in at if r["method"] == "base"), None)
        with_oracle = any(r["method"] == "oracle" for r in at)
        second_key = "recovery_max" if with_oracle else "relearn_acc"
        top, bottom = axes[0, col], axes[1, col]
        for name in [n for n in ("oracle", *names) if any(r["method"] == n for r in at)]:
            points = sorted((r for r in at if r["method"] == name), key=lambda r: r["value"] or 0)  # knob order
            style = dict(color=colors[name], marker=markers[name], ms=13 if name == "oracle" else 6, label=name,
                         ls="-" if len(points) > 1 else "none")
            forget = [r["forget_acc"] for r in points]
            top.plot(forget, [r["retain_acc"] for r in points], **style)
            if all(r[second_key] is not None for r in points):
                bottom.plot(forget, [r[second_key] for r in points], **style)
        shown = [r["forget_acc"] for r in at if r["method"] != "base"] or [0.25]
        for ax, key in ((top, "retain_acc"), (bottom, second_key)):
            if base is not None and base[key] is not None:
                ax.axhline(base[key], ls=":", c="black", lw=1.2, label=f"base (forget {base['forget_acc']:.2f})")
            ax.axvline(0.25, ls="--", c="grey", lw=1)
            ax.set_xlim(max(0.0, min(*shown, 0.25) - 0.03), max(shown) + 0.05)
            ax.set_xlabel("forget accuracy (lower is better; chance 0.25 dashed)")
            ax.legend(fontsize=8)
        top.set(ylabel="retain accuracy", title=f"{overlap:.0%} overlap: forget vs retain")
        if with_oracle:
            bottom.axhline(0.2, ls=":", c="red", lw=1)
        bottom.set(ylabel="recovery, worst attack rate (lower is better; goal 0.2 red)" if with_oracle
                   else "relearned held-out forget accuracy",
                   title=f"{overlap:.0%} overlap: forget vs " + ("recovery" if with_oracle else "relearning"))
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=100, overwrite=overwrite)
