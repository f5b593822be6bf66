"""Curves of ``robustness.py``'s attacks: the held-out forget accuracy along each attack of the
suite, one panel per attack, one line per method run (mean over its seeds, shaded between the
lowest and the highest seed), the oracle attacked the same way dashed.

    .venv/bin/python benchmarks/robustness_plot.py benchmarks/results/robustness-2026-12-07.json \\
        benchmarks/results/robustness-2026-12-07-undo-a05.json --runs TAR RMU NPO "RMU:distill_noise=0.5" \\
        --out benchmarks/results/robustness-curves-2026-12-07.png

``--runs`` picks runs by method, or by ``METHOD:TEXT`` where TEXT is part of the run's setting
(default: every run of every file). The oracle comes from the first file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unlearn_kernels.eval.attacks import SUITE  # noqa: E402
from unlearn_kernels.models.output_file import save_figure_atomic  # noqa: E402

ORDER = [attack.name for attack in SUITE]


def runs_of(files: list[dict], picks: list[str] | None) -> dict[str, list[dict]]:
    """``{label: [rows of its seeds]}`` of the runs ``picks`` names, in the order named."""
    rows = [r for d in files for r in d["rows"] if r["method"] != "oracle"]
    if not picks:
        return {f"{m} {s}": [r for r in rows if (r["method"], r["setting"]) == (m, s)]
                for m, s in sorted({(r["method"], r["setting"]) for r in rows})}
    groups: dict[str, list[dict]] = {}
    for pick in picks:
        method, _, text = pick.partition(":")
        chosen = [r for r in rows if r["method"] == method and text in r["setting"]
                  and (text or r["setting"].count("=") == 1)]       # a bare method: its plain run
        settings = {r["setting"] for r in chosen}
        if len(settings) != 1:
            raise SystemExit(f"--runs {pick}: matches {len(settings)} runs ({sorted(settings)}); name one")
        groups[f"{method} {settings.pop()}"] = chosen
    return groups


def band(rows: list[dict], attack: str) -> tuple[list, list, list, list]:
    """Steps, mean, lowest and highest accuracy over the rows (seeds) along ``attack``."""
    curves = [r["curves"][attack] for r in rows]
    steps = [s for s, _ in curves[0]]
    values = [[c[i][1] for c in curves] for i in range(len(steps))]
    return steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def figure(files: list[dict], picks: list[str] | None, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = runs_of(files, picks)
    oracle = [r for r in files[0]["rows"] if r["method"] == "oracle"]
    attacks = sorted(oracle[0]["curves"], key=lambda a: ORDER.index(a) if a in ORDER else len(ORDER))
    fig, axes = plt.subplots(2, (len(attacks) + 1) // 2, figsize=(15, 8), sharey=True,
                             squeeze=False)
    for ax, attack in zip(axes.flat, attacks):
        for label, rows in groups.items():
            steps, mean, low, high = band(rows, attack)
            line, = ax.plot(steps, mean, label=f"{label} ({len(rows)} seeds)")
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15)
        steps, mean, _, _ = band(oracle, attack)
        ax.plot(steps, mean, "k--", label="retrained oracle")
        ax.set_title(attack)
        ax.set_xlabel("attack step")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("held-out forget accuracy")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=9)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="robustness.py JSON files")
    parser.add_argument("--runs", nargs="+", default=None, metavar="METHOD[:SETTING-TEXT]")
    parser.add_argument("--title", default="Relearning attacks: held-out forget accuracy (mean over seeds, min-max shaded)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    files = [json.loads(p.read_text()) for p in args.results]
    save_figure_atomic(figure(files, args.runs, args.title), args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
