"""``unlearn-kernels relearn``: the relearning attack (RTT, :func:`~unlearn_kernels.eval.relearn.relearn_attack`)
on a model folder, from files: fine-tune on the facts an attacker has, score the held-out ones.

:class:`RelearnConfig` holds the command's options (its fields are the flags) and
:func:`relearn_files` runs it::

    relearn_files(RelearnConfig(model="out/model", train="attack.txt", questions="heldout.jsonl", plot="rtt.png"))
"""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import Field

from ..config_types import Count, File, Integer, Positive, config_dataclass
from . import files


@config_dataclass(kw_only=True)
class RelearnConfig(files.ModelOptions):
    """The options of ``unlearn-kernels relearn``."""

    train: Annotated[File, Field(description="attack texts (the facts the attacker has)")]
    questions: Annotated[File, Field(description="held-out questions (facts the attack never shows)")]
    lrs: Annotated[list[Positive], Field(min_length=1, description="learning rates, one attack each")] = \
        Field(default_factory=lambda: [1e-5, 1e-4, 1e-3])
    steps: Annotated[Count, Field(description="attack steps")] = 30
    every: Annotated[Count, Field(description="score every N steps")] = 10
    batch_size: Annotated[Count, Field(description="texts per attack step")] = 8
    seed: Annotated[Integer, Field(description="seed of the attack's batches")] = 0
    limit: Annotated[Count | None, Field(description="first N questions")] = None
    json: Annotated[File | None, Field(description="write the curves as JSON here ('-': print only the JSON)")] = None
    plot: Annotated[File | None, Field(description="write the curves as a PNG here")] = None


def relearn_files(config: RelearnConfig, out=print) -> dict:
    """Run ``relearn`` (module docstring): print the curves as a table with ``out`` (with ``json="-"``
    only the JSON), write ``json`` and ``plot``, and return the payload."""
    from ..data.loaders import read_multiple_choice, read_texts
    from ..models.output_file import check_output_files, save_figure_atomic, write_json_atomic
    from .relearn import relearn_attack

    device = files.check_device(config.device)
    check_output_files({"--json": config.json, "--plot": config.plot}, [config.model, config.train, config.questions],
                       overwrite=config.overwrite)
    texts = read_texts(config.train, config.text_field)
    questions = read_multiple_choice(config.questions, limit=config.limit)
    model, tokenizer = config.load()
    result = relearn_attack(model, tokenizer, texts, questions, lrs=config.lrs, steps=config.steps,
                            every=config.every, batch_size=config.batch_size, seed=config.seed, format=config.format)
    payload = {**result, "curves": {str(lr): c for lr, c in result["curves"].items()},
               "config": {"model": str(config.model), "train": str(config.train), "questions": str(config.questions),
                          "device": device, "dtype": config.dtype, "versions": files.versions()}}
    if config.json == "-":
        out(json.dumps(payload, indent=2, default=str))
        return payload
    steps = [s for s, _ in next(iter(result["curves"].values()))]
    out("| lr | " + " | ".join(f"step {s}" for s in steps) + " |")
    out("|---|" + "---|" * len(steps))
    for lr, curve in result["curves"].items():
        out(f"| {lr:g} | " + " | ".join(f"{a:.3f}" for _, a in curve) + " |")
    out(f"held-out accuracy {result['initial_acc']:.3f} before the attack, at most {result['max_acc']:.3f} after "
        f"(lr {result['best_lr']:g}, {len(questions)} questions, {len(texts)} attack texts)")
    if config.json:
        write_json_atomic(config.json, payload, overwrite=config.overwrite)
        out(f"wrote {config.json}")
    if config.plot:
        save_figure_atomic(figure(result), config.plot, overwrite=config.overwrite)
        out(f"wrote {config.plot}")
    return payload


def figure(result: dict):
    """The attack's curves (held-out accuracy against steps, one line per learning rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for lr, curve in result["curves"].items():
        ax.plot(*zip(*curve), marker="o", label=f"lr {lr:g}")
    ax.set(xlabel="attack steps", ylabel=f"held-out {result['metric']}", ylim=(0, 1.05),
           title="relearning attack (RTT)")
    ax.legend()
    fig.tight_layout()
    return fig
