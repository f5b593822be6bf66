"""``unlearn-kernels demo``: the kernels' self-check, then the LLM demo (:mod:`unlearn_kernels.demo`) or
the classifier demo (:mod:`unlearn_kernels.classifier.demo`) on the embedded models.

:class:`DemoConfig` holds the command's options (its fields are the flags); :func:`run` runs it
and returns the exit status (1 when the self-check failed)::

    run(DemoConfig(out="demo_out", methods=["RMU", "TAR"]))
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field

from .config_types import Count, File, NonNegativeInt, Patterns, config_dataclass, flag_label
from .errors import UserError


@config_dataclass(kw_only=True)
class DemoConfig:
    """The options of ``unlearn-kernels demo``."""

    track: Annotated[Literal["llm", "classifier"], Field(description=(
        "llm: the tiny LM on the entangled benchmark; classifier: the digits CNN"))] = "llm"
    out: Annotated[File, Field(description="directory for results.json and the plots")] = "demo_out"
    methods: Annotated[Patterns | None, Field(description="subset of the demo methods (default: all)")] = None
    relearn_steps: Annotated[NonNegativeInt, Field(description="steps of the relearning attack on each model")] = 30
    full: Annotated[bool, Field(description=(
        "the whole sweep: every overlap (0-30 %), more values of each method's knob and seeds 1 2 (about 65 min on "
        "2 cores)"))] \
        = False
    seeds: Annotated[list[Count] | None, Field(description=(
        "further seeds (method and attack) for the quick demo's runs at the default overlap, printed as mean ± sd "
        "(default: 1 2 with --full, none otherwise)"))] = None
    quiet: Annotated[bool, Field(description="no progress bars")] = False
    threads: Annotated[Count, Field(description="torch intra-op threads")] = 1
    overwrite: Annotated[bool, Field(description="replace a previous demo's outputs in --out")] = False

    label: ClassVar = staticmethod(flag_label)


def run(config: DemoConfig, out=print) -> int:
    """The self-check and the chosen demo; every output is checked before any work."""
    from . import selfcheck

    if config.track == "classifier" and (config.full or config.seeds):
        raise UserError("--full and --seeds are options of the LLM demo; the classifier demo has neither")
    # The embedded models are far too small to gain from intra-op threads, and spinning
    # OpenMP threads slow down badly when anything else shares the cores.
    torch.set_num_threads(config.threads)
    if config.track == "classifier":
        from .classifier import demo

        folder = Path(config.out) / "classifier"
        demo.check_outputs(folder, config.overwrite)
    else:
        from . import demo

        demo.check_outputs(config.out, config.methods, config.full, overwrite=config.overwrite, seeds=config.seeds)
    selfcheck.info(out)
    out("\nSelf-check of the kernels against the plain-PyTorch reference:")
    ok = selfcheck.run(out)
    if config.track == "classifier":
        out("\nClass-wise unlearning of the embedded digits CNN:")
        demo.run(folder, methods=config.methods, progress=not config.quiet, out=out, overwrite=config.overwrite)
    else:
        out("\nUnlearning the embedded model (entangled-knowledge benchmark, chance = 0.25):")
        demo.run(config.out, methods=config.methods, relearn_steps=config.relearn_steps, full=config.full,
                 progress=not config.quiet, out=out, overwrite=config.overwrite, seeds=config.seeds)
    return 0 if ok else 1
