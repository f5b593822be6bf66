"""``report.png`` of an unlearning run: what the run did, at a glance.

Panels: the loss terms per step; with a target-driven run, the validation accuracies along the
trajectory (forget, retain, entangled) with the target and the retain limits as dashed lines and
the saved best point marked; with a final evaluation, before/after accuracy bars.
"""

from __future__ import annotations


def report_figure(report: dict):
    """The matplotlib figure of ``report`` (``report.json``'s content)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluation, target = report.get("evaluation"), report.get("target")
    panels = 1 + bool(target) + bool(evaluation)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    axes = list(axes[0])
    ax = axes.pop(0)
    history = report.get("history") or []
    for term in sorted({k for h in history for k in h if k != "step"}):
        ax.plot([h["step"] for h in history if term in h], [h[term] for h in history if term in h], label=term)
    ax.set(xlabel="step", ylabel="loss", title=f"{report['method']}: loss terms")
    if history:
        ax.legend()
    if target:
        ax = axes.pop(0)
        points = target["trajectory"]
        for i, name in enumerate(("forget", "retain", "entangled")):
            if name in target["base"]:
                line, = ax.plot([p["step"] for p in points], [p[name] for p in points], marker="o", ms=3,
                                label=name, color=f"C{i}")
                if name != "forget":
                    ax.axhline(target["keep"] * target["base"][name], ls="--", lw=0.8, color=line.get_color())
        ax.axhline(target["target_forget"], ls="--", lw=0.8, color="C0", label="target")
        best = target["best"]
        ax.plot([best["step"]], [best["forget"]], marker="*", ms=14, color="k", ls="none", label="saved")
        ax.set(xlabel="step", ylabel="validation accuracy", ylim=(0, 1.05),
               title=f"{'reached' if target['reached'] else 'not reached'}: {target['reason']}")
        ax.legend(fontsize=8)
    if evaluation:
        bars = axes.pop(0)
        names = list(evaluation["before"])
        x = range(len(names))
        bars.bar([i - 0.2 for i in x], [evaluation["before"][n]["acc"] for n in names], 0.4, label="before")
        bars.bar([i + 0.2 for i in x], [evaluation["after"][n]["acc"] for n in names], 0.4, label="after")
        bars.set(xticks=list(x), xticklabels=names, ylim=(0, 1.05), ylabel="accuracy", title="multiple choice")
        bars.legend()
    fig.tight_layout()
    return fig
