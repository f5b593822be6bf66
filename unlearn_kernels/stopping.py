"""Stopping on the method's own training signal (``--stop rule``).

A run without validation questions is target-driven on cloze probes cut from its held-out
texts by default (``data.probes``, ``target.ProbeController``); this module is the other way,
chosen with ``--stop rule`` or when there are too few texts to cut probes from (or the data are
question/answer pairs). Without questions to score, a run can still measure how far it got, on what it trains: each
method with a rule (:class:`StoppingRule`, a class attribute) reports scale-free signals on a
fixed forget and a fixed retain probe batch (``UnlearningMethod.stopping_signal``) — the RMU
family the residual of the forget activations from the control vector in units of its own
length and the retain activations' relative drift; the loss methods the rise of the forget NLL
and the drift of the retain NLL, in nats per token (each method's docstring says why its
signal transfers across models). With ``remaining`` the rule's progress measure (falls as the
method forgets) and ``drift`` its damage measure, a point after step ``t``

- *keeps the retain set* when ``drift(t) ≤ drift_limit``;
- *meets the rule* when it keeps the retain set and ``remaining(t) ≤ done_at``.

The controller (:class:`SignalController`, the monitor of ``UnlearningMethod.fit``) measures
every ``every`` steps (a probe costs two forward passes, a few % of a step's work), stops at
the first point that meets the rule, backtracks to the best point with the learning rate
halved when the drift limit is broken (as :class:`~unlearn_kernels.target.TargetController`
does), and raises the learning rate when ``remaining`` stalls (``TargetController``'s rule,
shared by every controller); it does not walk the crossing again (it measures often enough).
The best point (lowest ``remaining`` among those that keep the retain set) is what the run
leaves in the model; when the rule was not met the pipeline
exits 3 with a one-line reason, as for a missed validation target.

The thresholds are properties of the signals, not of a model; they were read off the shipped
model's trajectories (``benchmarks/calibrate_signals.py``) and checked on the zoo's held-out
models and SmolLM2-135M (``benchmarks/RESULTS.md``), where they transferred less well than the
probes: the RMU rule was conservative, the loss methods' NLL rule was met at test forget 0.63.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError
from .target import TargetController


@dataclass(frozen=True)
class StoppingRule:
    """A method's validation-free stopping rule (module docstring)."""

    remaining: str        # the signal that falls to done_at as the method forgets
    done_at: float
    drift: str            # the signal of damage to the retain set
    drift_limit: float
    relative: bool = False  # both read as changes from the starting model's values
    rises: bool = False     # the progress signal rises as the method forgets: remaining is its negative
    drift_share: bool = False  # the drift as a share of the starting value (relative rules)
    measures: int = 60      # measurements over the planned steps (the budget)

    def scores(self, signal: dict, base: dict | None) -> tuple[float, float]:
        """(remaining, drift) of a point whose signal is ``signal``; ``base``: the starting point's."""
        remaining, drift = signal[self.remaining], signal[self.drift]
        if self.relative and base is not None:
            remaining, drift = remaining - base[self.remaining], drift - base[self.drift]
            if self.drift_share:
                drift /= max(abs(base[self.drift]), 1e-12)
        elif self.relative:
            remaining, drift = 0.0, 0.0
        return (-remaining if self.rises else remaining), drift

    def describe(self) -> str:
        change = "rise of " if self.relative and self.rises else ("change of " if self.relative else "")
        done = f"{change}{self.remaining} >= {-self.done_at:g}" if self.rises else f"{change}{self.remaining} <= {self.done_at:g}"
        change = "relative change of " if self.drift_share else ("change of " if self.relative else "")
        return f"{done} with {change}{self.drift} <= {self.drift_limit:g}"


@dataclass
class SignalController(TargetController):
    """Stops a run on its method's :class:`StoppingRule` (module docstring)."""

    sets: object = None
    rule: StoppingRule | None = None
    every: int | None = None       # measure every N steps; None: the rule's share of the planned steps

    def __post_init__(self):
        if self.rule is None:
            raise ValueError("a SignalController needs the method's stopping rule")
        if self.every is not None and self.every < 1:
            raise UserError(f"signal every N steps needs N >= 1, got {self.every}")

    def start(self, method) -> None:
        """Fix ``every`` and ``window`` from the run's planned steps (the budget), then measure
        the starting point."""
        planned = getattr(method, "planned_steps", 60)
        if self.every is None:
            self.every = max(1, planned // self.rule.measures)
        if self.window is None:
            self.window = max(self.every, planned // 4)
        super().start(method)

    # --- measuring ------------------------------------------------------------------------
    def _evaluate(self, method, step: int) -> dict:
        import time

        started = time.perf_counter()
        signal = method.probe_signal()
        if signal is None:
            raise UserError(f"{method.name} has no validation-free stopping signal: give validation questions")
        base = self.trajectory[0]["signal"] if self.trajectory else None
        remaining, drift = self.rule.scores(signal, base)
        point = {"step": step, "signal": signal, "remaining": remaining, "drift": drift}
        point["eval_s"] = time.perf_counter() - started
        self._eval_time += point["eval_s"]
        return point

    def check_start(self, base: dict) -> None:
        """Nothing to check: a signal's starting point carries no accuracy (the target controller
        refuses a forget set already at its target)."""

    def keeps_retain(self, point: dict) -> bool:
        return point["drift"] <= self.rule.drift_limit + 1e-12

    @staticmethod
    def score(point: dict) -> float:
        return point["remaining"]

    def reaches(self, point: dict) -> bool:
        return self.keeps_retain(point) and point["remaining"] <= self.rule.done_at + 1e-12

    def goal(self) -> float:
        return self.rule.done_at

    def _refines(self, previous: dict, best: dict, point: dict) -> bool:
        """Never: the rule is measured every 1/``measures`` of the run, already near its crossing."""
        return False

    # --- the summary ------------------------------------------------------------------------
    def describe(self) -> dict:
        base = self.trajectory[0]
        return {"rule": self.rule.describe(), "validation": None, "lr_raises": self._raised,
                "base": {"remaining": base["remaining"], "drift": base["drift"], "signal": base["signal"]}}

    def message(self) -> str:
        s, rule = self.summary, self.rule
        best = s["best"]
        got = f"{rule.remaining} {best['remaining']:.3f}, {rule.drift} {best['drift']:.3f}"
        if s["reached"]:
            return (f"stopping rule met at step {best['step']} ({got}; rule {rule.describe()}); no validation "
                    "questions were given, so no accuracy was measured")
        where = "the starting model" if s["best_is_start"] else f"step {best['step']}"
        return (f"stopping rule not met ({s['reason']}): best {got} at {where} (rule {rule.describe()}); saved "
                "that point — give --val-forget/--val-retain to measure it")
