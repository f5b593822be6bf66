"""A method's spec: what the rest of the package may know about a method without naming it.

Each method class declares ``spec = MethodSpec(...)`` in its own file. The registry, the run
pipeline and its controllers (``pipeline``, ``target``, ``stopping``), the memory planner
(``plan``), the command line and the demo read these fields and never compare a method's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import UserError


@dataclass(frozen=True)
class Memory:
    """What the memory planner (``unlearn_kernels.plan``) models of a method's run.

    ``loss``: ``"layer"`` a representation loss read at layer l (the layers above never run),
    ``"projection"`` a projection basis after layer l trained through an NLL at the head,
    ``"head"`` an NLL at the head. ``updates``: the band's MLP down projections (``"down"``), its
    gate/up/down (``"mlp"``) or no weight (None). ``frozen_copy``: a frozen copy of the updated
    weights; ``reference_pass``: a no-grad reference forward per step (logits and log-probs);
    ``graphs``: live passes with a graph per step (forget and retain: 2); ``optimizer``: whose state is kept per updated weight.
    ``adversary``: a simulated attack inside each step (TAR) fine-tunes a functional copy of every
    weight with a fresh Adam, one graph at a time next to the first live graph (an entropy at the
    head); it runs in one process."""

    loss: Literal["layer", "projection", "head"]
    updates: Literal["down", "mlp"] | None
    frozen_copy: bool = False
    reference_pass: bool = False
    graphs: int = 2
    optimizer: Literal["AdamW", "Sophia"] = "AdamW"
    adversary: bool = False


@dataclass(frozen=True)
class MethodSpec:
    """``config``: the config class (``methods.settings``). ``length``: the setting that sets the
    run's length, which a target- or rule-driven run multiplies by its budget. ``knobs``: the
    settings a controller may move (the length; ``lr``, which the target controller raises and
    halves). ``prefix``: ``"auto"`` runs layers 0..l only (prefix-only loading on by default),
    ``"statistics"`` only its statistics could (planned on request, never run that way),
    ``"never"``. ``saves``: what its output holds besides the config (``weights``,
    ``projections``, ``masks``). ``memory``: its memory model (None: ``plan`` has none).
    ``refuses``: inherited settings it does not use, with why (setting one is refused).
    ``needs_retain``: it needs retain data. ``tamper_resistant``: trained against the relearning
    attack (the demo checks the tamper-resistance goal on it). ``selective_of``: the method it is
    a feature-selective variant of (the demo compares the two at equal forget accuracy)."""

    config: type
    length: str
    knobs: tuple[str, ...] = ()
    prefix: Literal["auto", "statistics", "never"] = "never"
    saves: tuple[str, ...] = ("weights",)
    memory: Memory | None = None
    refuses: dict[str, str] = field(default_factory=dict)
    needs_retain: bool = True
    tamper_resistant: bool = False
    selective_of: str | None = None

    def refuse_unused(self, config, method: str) -> None:
        """UserError when ``config`` sets a setting this method refuses (one not at its default)."""
        defaults = self.config()
        for name, why in self.refuses.items():
            if getattr(config, name) != getattr(defaults, name):
                raise UserError(f"{method} does not use the setting {name} ({why}); leave it out")

    def __post_init__(self):
        if self.length not in self.knobs:
            object.__setattr__(self, "knobs", (self.length, *self.knobs))
