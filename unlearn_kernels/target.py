"""Target-driven unlearning: the run measures what "done" means as it goes, and says whether it got there.

The user gives validation questions — forget ``F``, retain ``R`` and optionally entangled ``E``
(facts about the same entities as the forget set that must survive; kept apart from any final
evaluation files) — and the controller scores them with our lm-eval-equal evaluator on the
model being unlearned. With base accuracies ``a⁰`` measured before the first step, a point of
the trajectory (after step ``t``) *keeps the retain set* when

    a_R(t) ≥ keep · a⁰_R   and   a_E(t) ≥ keep · a⁰_E            (keep = 0.95 by default)

and *reaches the target* when it keeps the retain set and ``a_F(t) ≤ target``; the default
target is chance + 0.05, chance being the mean of ``1 / number of choices`` over ``F``. The run

- stops at the first point that reaches the target ("target reached") — but first **walks the
  last interval again in quarters**: at the first point that reaches, if the previous measured
  point is at least ``2 · refine_min`` steps back and was the best so far, the model returns to
  that point and runs on, measured every quarter of that interval, to the first point that
  reaches; so the run stops within a quarter interval of the crossing instead of up to a whole
  interval past it, where forgetting has gone on eating the retain and entangled facts (SRMU on
  SmolLM2-135M, test questions: forget 0.34 / entangled 0.94 at step 74, 0.38 / 0.89 at step
  99, 0.31 / 0.72 at step 174 — the later the stop, the fewer entangled facts survive);
- at a point that breaks the retain limit, **backtracks**: the model returns to the best point so
  far and the learning rate of every parameter group is halved (the step overshot the frontier
  between forgetting and keeping; a smaller step walks along it), at most ``backtracks`` times,
  then stops ("retain limit hit");
- otherwise runs its step budget ("budget exhausted"; the pipeline gives a target-driven run
  4 × the method's own length unless the user set it).

The learning rate is the strength knob the controller moves, the same for every method (RMU's
steering, SRMU's sparsity, NPO's β are left as set: their scale is the model's and the
literature's); the budget is the other. Besides halving it on a backtrack, the controller
**doubles** it when the run stalls: when over a window of ``window`` steps (a quarter of the
planned steps) the forget accuracy closed less than ``stall`` (10 %) of its gap to the target,
every parameter group's rate is doubled, at most ``raises`` (3) times and never after a
backtrack. The default rate was set on other models (RMU on a NeoX 8×64 model forgot nothing
in 600 steps at its default 3.2e-3 and reached 0.43 at 1e-2: the rate, not the steps or α, was
the limit), and a rate too small for this model shows as a stall long before the budget ends.

Without validation questions, :class:`ProbeController` runs the same loop on cloze probes the
run cuts from held-out training texts (``data.probes``).

At the end the model is set to the **best point** of the trajectory — among the points that
reach the target, the one that keeps the most (the lowest of its retain and entangled accuracy
as a share of base; then the forget accuracy nearest the target); before any point reaches, the
lowest forget accuracy among the points that keep the retain set (the starting model counts as
a point, so a run that never kept retain while forgetting returns the model it started from,
and says so) — never simply the last. :attr:`TargetController.summary` holds the trajectory,
the reason and the best point; ``reached`` is False unless the target was measured to be
reached.

Evaluation costs at most ``max_share`` (15 %) of the run's time, with a floor: with
``every=None`` the controller times every evaluation and evaluates again when one more, costing
what the last one did, keeps the time spent evaluating (the base evaluation included) within
``max_share`` of the time since the start — or when ``1 / min_evals`` (1/8) of the planned
steps has passed since the last one, whatever it costs. Without the floor a short run whose
evaluation is dear measured only its last step: SRMU on SmolLM2-135M (an evaluation of 69
questions cost as much as 130 steps) went 600 steps unmeasured, past the target and the
entangled limit, and kept the starting model. A fixed ``every`` evaluates every ``every`` steps. The last step is
always measured (the saved point must be a measured one), so a short run may exceed the share
by that one evaluation; the share actually spent is reported (``eval_share``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

from .errors import UserError

REACHED, RETAIN_LIMIT, BUDGET = "target reached", "retain limit hit", "budget exhausted"


def scale_lr(method, factor: float) -> float | None:
    """Multiply the learning rate of every parameter group of ``method.optimizer`` by ``factor``;
    the first group's new rate (None for a method without an optimizer, e.g. MRP's basis)."""
    groups = getattr(getattr(method, "optimizer", None), "param_groups", [])
    for group in groups:
        group["lr"] *= factor
    return groups[0]["lr"] if groups else None


@dataclass
class ValidationSets:
    """Validation questions (``data.loaders.MCQuestion``); ``entangled`` may be empty."""

    forget: Sequence
    retain: Sequence
    entangled: Sequence = ()
    format: str = "cloze"              # the prompt format (``data.prompts``); "text": cloze probes cut from texts

    def __post_init__(self):
        if not self.forget or not self.retain:
            raise UserError("target-driven runs need validation questions for both forget and retain "
                            "(--val-forget and --val-retain)")

    @property
    def chance(self) -> float:
        """Mean chance accuracy of the forget questions (1 / number of choices)."""
        return sum(1.0 / len(q.choices) for q in self.forget) / len(self.forget)


@dataclass
class TargetController:
    """Scores the validation sets during ``UnlearningMethod.fit`` (its ``monitor``), stops at the
    target or the retain limit, and restores the best point at the end (module docstring)."""

    sets: ValidationSets
    target: float | None = None        # forget accuracy that means done; None: chance + 0.05
    keep: float = 0.95                 # retain (and entangled) must stay >= keep x base
    every: int | None = None           # evaluate every N steps; None: adaptive, <= max_share of the time
    max_share: float = 0.15
    min_evals: int = 8                 # adaptive: measure at least every planned_steps / min_evals steps
    backtracks: int = 3                # returns to the best point (lr halved) before "retain limit hit"
    window: int | None = None          # steps over which a stall is judged; None: 1/4 of the planned steps
    stall: float = 0.1                 # a window that closes less than this share of the gap is a stall
    raises: int = 3                    # learning-rate doublings at most
    refine_min: int = 4                # refine the crossing when the interval is >= 2 x this many steps
    batch_size: int = 32
    trajectory: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.target is None:
            self.target = min(1.0, self.sets.chance + 0.05)
        if not 0.0 <= self.target <= 1.0:
            raise UserError(f"target forget accuracy must be in [0, 1], got {self.target}")
        if not 0.0 < self.keep <= 1.0:
            raise UserError(f"keep (the share of base retain accuracy to keep) must be in (0, 1], got {self.keep}")
        if self.every is not None and self.every < 1:
            raise UserError(f"validation every N steps needs N >= 1, got {self.every}")
        if self.min_evals < 1:
            raise UserError(f"min_evals must be >= 1, got {self.min_evals}")
        if not 0.0 < self.max_share < 1.0:
            raise UserError(f"max_share must be in (0, 1), got {self.max_share}")
        if self.window is not None and self.window < 1:
            raise UserError(f"the stall window needs >= 1 step, got {self.window}")

    # --- measuring ------------------------------------------------------------------------
    def _evaluate(self, method, step: int) -> dict:
        from .eval.multiple_choice import evaluate_multiple_choice

        started = time.perf_counter()
        point = {"step": step}
        for name in ("forget", "retain", "entangled"):
            questions = getattr(self.sets, name)
            if questions:
                point[name] = evaluate_multiple_choice(method.model, method.tokenizer, questions,
                                                       format=self.sets.format, batch_size=self.batch_size,
                                                       progress=False)["acc"]
        signal = method.probe_signal()
        if signal is not None:
            point["signal"] = signal
        point["eval_s"] = time.perf_counter() - started
        self._eval_time += point["eval_s"]
        return point

    def keeps_retain(self, point: dict) -> bool:
        base = self.trajectory[0]
        return all(point[name] >= self.keep * base[name] - 1e-12
                   for name in ("retain", "entangled") if name in base)

    @staticmethod
    def score(point: dict) -> float:
        """What the run drives down (forget accuracy); the best point has the lowest."""
        return point["forget"]

    def reaches(self, point: dict) -> bool:
        return self.keeps_retain(point) and self.score(point) <= self.target + 1e-12

    def kept(self, point: dict) -> float:
        """The lowest of retain and entangled accuracy as a share of base (1.0 with no base)."""
        base = self.trajectory[0]
        return min((point[name] / base[name] for name in ("retain", "entangled") if base.get(name)), default=1.0)

    def better(self, point: dict, best: dict) -> bool:
        """Whether ``point`` (which keeps retain) replaces ``best`` as the point to save: a point
        that reaches beats one that does not; of two that reach, the one that keeps more, then
        the one nearer the target, then the walk's (fewer steps past the crossing); of two that
        do not, the lower forget accuracy."""
        if self.reaches(point) != self.reaches(best):
            return self.reaches(point)
        if self.reaches(point):
            kept, kept_best = self.kept(point), self.kept(best)
            if abs(kept - kept_best) > 1e-12:
                return kept > kept_best
            if abs(self.score(point) - self.score(best)) > 1e-12:
                return self.score(point) > self.score(best)
            return self._refined      # a tie: the walk's point is the nearer the crossing
        return self.score(point) < self.score(best) - 1e-12

    # --- the monitor protocol of UnlearningMethod.fit ----------------------------------------
    def start(self, method) -> None:
        """Base accuracies of the model before the first step (the trajectory's first point)."""
        self._eval_time = 0.0
        self._started = time.perf_counter()
        self._backtracked = self._raised = 0
        self._best_params = None
        self._refined = False
        if self.window is None:
            self.window = max(1, getattr(method, "planned_steps", 60) // 4)
        self._floor_every = max(1, getattr(method, "planned_steps", 60) // self.min_evals)
        self.trajectory = [self._evaluate(method, -1)]
        base = self.trajectory[0]
        self.check_start(base)
        self._best = self._window_start = base
        self._last_eval_s = self.trajectory[0]["eval_s"]
        self.reason = None

    def check_start(self, base: dict) -> None:
        if base["forget"] <= self.target:
            raise UserError(f"the model answers the forget validation questions at {base['forget']:.3f}, already at "
                            f"or below the target {self.target:.3f}: nothing to unlearn (chance "
                            f"{self.sets.chance:.3f}); check the questions or the target")

    def _due(self, step: int) -> bool:
        if self._refined:
            return (step - self._refine_from) % self._refine_every == 0
        if self.every is not None:
            return (step + 1) % self.every == 0
        if step - self.trajectory[-1]["step"] >= self._floor_every:
            return True
        # one more evaluation, costing about the last one, keeps the total share <= max_share
        elapsed = time.perf_counter() - self._started
        return self._eval_time + self._last_eval_s <= self.max_share * (elapsed + self._last_eval_s)

    def after_step(self, method, step: int) -> bool:
        """Evaluate when due; True when the run should stop."""
        if not self._due(step):
            return False
        return self.measure(method, step)

    def measure(self, method, step: int) -> bool:
        """Evaluate after ``step``; keep the point if it is the best, backtrack if it breaks the
        retain limit; True when the run should stop."""
        point = self._evaluate(method, step)
        self._last_eval_s = point["eval_s"]
        point["keeps_retain"] = self.keeps_retain(point)
        previous = self.trajectory[-1]
        self.trajectory.append(point)
        before = (self._best, self._best_params)
        if point["keeps_retain"] and self.better(point, self._best):
            self._best, self._best_params = point, method.snapshot()
        if self.reaches(point):
            if self._refines(previous, before[0], point):
                self._refine(method, point, *before)
            else:
                self.reason = REACHED
        elif not point["keeps_retain"] and self.reaches(self._best):   # refining broke retain: the reached point stands
            self.reason = REACHED
        elif not point["keeps_retain"]:
            if self._backtracked >= self.backtracks:
                self.reason = RETAIN_LIMIT
            else:
                self._backtrack(method, point)
        if self.reason is None and not self._refined:
            self._check_stall(method, point)
        return self.reason is not None

    def _refines(self, previous: dict, best: dict, point: dict) -> bool:
        """Whether the first reaching ``point`` is worth walking to again (module docstring): once
        per run, when the previous measured point was the best one and far enough back."""
        return (not self._refined and previous is best and not self.reaches(best)
                and point["step"] - best["step"] >= 2 * self.refine_min)

    def _refine(self, method, point: dict, best: dict, best_params) -> None:
        """Return to ``best`` (the point before the crossing) and measure every quarter of the
        interval from there; ``point`` stays the best so far, saved if nothing nearer reaches."""
        self._refined = True
        method.restore(best_params)
        self._refine_from, self._refine_every = point["step"], max(1, (point["step"] - best["step"]) // 4)
        point["refine"] = {"to_step": best["step"], "every": self._refine_every}

    def goal(self) -> float:
        """The score that means done (the forget target)."""
        return self.target

    def _check_stall(self, method, point: dict) -> None:
        """Double the learning rate when the last ``window`` steps closed less than ``stall`` of
        the gap to the goal (never after a backtrack: the rate was too large there)."""
        if point["step"] - self._window_start["step"] < self.window:
            return
        start, self._window_start = self._window_start, point
        gap = self.score(start) - self.goal()
        if self._backtracked or self._raised >= self.raises or gap <= 0 or "backtrack" in point:
            return
        if self.score(start) - self.score(point) < self.stall * gap:
            self._raised += 1
            point["lr_raised"] = scale_lr(method, 2.0)

    def _backtrack(self, method, point: dict) -> None:
        """Return to the best point so far and halve the learning rate."""
        self._backtracked += 1
        method.restore(self._best_params)
        point["backtrack"] = {"to_step": self._best["step"], "lr": scale_lr(method, 0.5)}

    def finish(self, method, last_step: int) -> dict:
        """Measure the last step if it was not, restore the best point into the model, and
        return :attr:`summary`."""
        if last_step >= 0 and self.trajectory[-1]["step"] != last_step and self.reason is None:
            self.measure(method, last_step)
        if self.reason is None:
            self.reason = REACHED if self.reaches(self._best) else BUDGET
        best = self._best
        method.restore(self._best_params)     # None: the best point is the starting model
        total = time.perf_counter() - self._started
        self.summary = {
            "reached": self.reaches(best), "reason": self.reason, **self.describe(),
            "best": {k: v for k, v in best.items() if k != "eval_s"},
            "best_is_start": best["step"] < 0,
            "trajectory": [dict(p) for p in self.trajectory],
            "backtracks": self._backtracked, "lr_raises": self._raised, "eval_time_s": self._eval_time, "run_time_s": total,
            "eval_share": self._eval_time / total if total > 0 else 0.0,
        }
        return self.summary

    def describe(self) -> dict:
        """What "done" meant, for the summary."""
        base = self.trajectory[0]
        return {"target_forget": self.target, "chance": self.sets.chance, "keep": self.keep,
                "base": {k: base[k] for k in ("forget", "retain", "entangled") if k in base},
                "validation": {name: len(getattr(self.sets, name)) for name in ("forget", "retain", "entangled")}}

    def message(self) -> str:
        """One line for the user: what was reached, or why not."""
        s = self.summary
        best, base = s["best"], s["base"]
        kept = ", ".join(f"{k} {best[k]:.3f} (base {base[k]:.3f})" for k in ("retain", "entangled") if k in base)
        if s["reached"]:
            return (f"target reached at step {best['step']}: forget accuracy {best['forget']:.3f} <= "
                    f"{s['target_forget']:.3f}, {kept}")
        where = ("the starting model (no evaluated point forgot anything while keeping retain)"
                 if s["best_is_start"] else f"step {best['step']}")
        return (f"target not reached ({s['reason']}): best forget accuracy {best['forget']:.3f} > target "
                f"{s['target_forget']:.3f} at {where}, {kept}; saved that point")


@dataclass
class ProbeController(TargetController):
    """Target-driven without validation questions: the sets are cloze probes cut from held-out
    training texts (``data.probes``), written with the base model when the run starts. ``points``
    holds the cut texts, ``{"forget": [ClozePoint], "retain": [ClozePoint]}``."""

    sets: ValidationSets | None = None
    points: dict = field(default_factory=dict)
    minimum: int = 8                   # fewer probes than this per set measure nothing

    def __post_init__(self):
        from .data.probes import CHOICES

        if self.target is None:
            self.target = 1.0 / CHOICES + 0.05
        super().__post_init__()

    def start(self, method) -> None:
        from .eval.cloze_probes import make_probes

        started = time.perf_counter()
        made = {name: make_probes(method.model, method.tokenizer, self.points.get(name, ()), seed=i)
                for i, name in enumerate(("forget", "retain"))}
        few = [f"{name} {len(made[name])} of {len(self.points.get(name, ()))} cut from held-out texts" for name in made
               if len(made[name]) < self.minimum]
        if few:
            raise UserError(f"too few cloze probes the base model answers ({'; '.join(few)}; at least "
                            f"{self.minimum} each are needed): give validation questions (--val-forget, "
                            "--val-retain) or a fixed length (--stop fixed)")
        self.sets = ValidationSets(made["forget"], made["retain"], format="text")
        self.build_s = time.perf_counter() - started
        super().start(method)

    def message(self) -> str:
        """The target's line, saying what was measured: probes share the wording of the training
        texts, and a method that lowers the likelihood of that wording (NPO on SmolLM2-135M: probes
        0.33, test questions 0.88) can pass them while the fact survives in another form."""
        line = f"on {len(self.sets.forget)} forget and {len(self.sets.retain)} retain cloze probes cut from held-out texts: "
        line += super().message()
        if self.summary["reached"]:
            line += " (probes share your texts' wording: check with questions in your evaluation's format, --val-*)"
        return line

    def describe(self) -> dict:
        return {**super().describe(), "probes": {"source": "held-out training texts (data.probes)",
                                                 "cut": {k: len(v) for k, v in self.points.items()},
                                                 "build_s": self.build_s}}
