"""``report.png`` of an unlearning run: what the run did, at a glance.

Panels: the loss terms per step; with a target-driven run, the validation accuracies along the
trajectory (forget, retain, entangled) with the target and the retain limits as dashed lines and
the saved best point marked (with a validation-free run, the stopping rule's signals); with a final evaluation, before/after accuracy bars.
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
    if target and "rule" in target:
        _rule_panel(axes.pop(0), target)
    elif target:
        _validation_panel(axes.pop(0), target)
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


def _validation_panel(ax, target: dict) -> None:
    """Validation accuracies along the trajectory, the target and retain limits, the saved point."""
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


def _rule_panel(ax, target: dict) -> None:
    """The stopping rule's progress (remaining) and damage (drift) along the trajectory."""
    points = target["trajectory"]
    steps = [p["step"] for p in points]
    ax.plot(steps, [p["remaining"] for p in points], marker="o", ms=3, label="remaining", color="C0")
    ax.plot(steps, [p["drift"] for p in points], marker="o", ms=3, label="drift", color="C1")
    best = target["best"]
    ax.plot([best["step"]], [best["remaining"]], marker="*", ms=14, color="k", ls="none", label="saved")
    ax.set(xlabel="step", ylabel="signal", title=f"rule {'met' if target['reached'] else 'not met'}: "
                                                  f"{target['reason']}\n{target['rule']}")
    ax.title.set_fontsize(8)
    ax.legend(fontsize=8)
