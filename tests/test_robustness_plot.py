"""benchmarks/robustness_plot.py on made-up results: which runs a pick names, the mean and the
min-max band over seeds, and a figure with one panel per attack and one line per run plus the
oracle's."""

from __future__ import annotations

import pytest
from conftest import benchmark_script


@pytest.fixture(scope="module")
def plot():
    return benchmark_script("robustness_plot")


def row(method, setting, seed, level):
    curves = {a: [[0, level], [10, level + 0.1 * (seed + 1)], [20, level + 0.2]] for a in ("rtt@0.001", "long")}
    return {"method": method, "setting": setting, "seed": seed, "curves": curves}


RESULTS = {"rows": [row("oracle", None, s, 0.2) for s in (0, 1)]
           + [row("RMU", "steering=300", s, 0.3) for s in (0, 1)]
           + [row("RMU", "steering=300 distill_noise=0.5", s, 0.25) for s in (0, 1)]
           + [row("TAR", "steps=120", s, 0.28) for s in (0, 1, 2)]}


def test_a_bare_method_is_its_plain_run_and_a_text_picks_a_variant(plot):
    groups = plot.runs_of([RESULTS], ["RMU", "RMU:distill_noise", "TAR"])
    assert list(groups) == ["RMU steering=300", "RMU steering=300 distill_noise=0.5", "TAR steps=120"]
    assert [len(g) for g in groups.values()] == [2, 2, 3]
    assert len(plot.runs_of([RESULTS], None)) == 3
    with pytest.raises(SystemExit, match="matches 0 runs"):
        plot.runs_of([RESULTS], ["NPO"])


def test_band_is_the_mean_lowest_and_highest_seed(plot):
    steps, mean, low, high = plot.band(RESULTS["rows"][2:4], "long")
    assert steps == [0, 10, 20]
    assert mean == pytest.approx([0.3, 0.45, 0.5]) and low == pytest.approx([0.3, 0.4, 0.5])
    assert high == pytest.approx([0.3, 0.5, 0.5])


def test_the_figure_has_a_panel_per_attack_in_suite_order(plot):
    fig = plot.figure([RESULTS], ["RMU", "TAR"], "t")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["rtt@0.001", "long"]
    assert all(len(ax.get_lines()) == 3 for ax in fig.axes if ax.get_title())      # two runs + the oracle
