"""Evaluating a model on questions files, as ``unlearn-kernels eval`` and ``relearn`` do.

The results follow lm-eval's schema (``{"results": {task: {metric: value}}, "config": …}``)
with the file stem as the task name; :func:`table` prints them for people.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field

from ..config_types import File, config_dataclass, flag_label
from ..errors import UserError
from ..models.output_dir import versions  # noqa: F401  (the config of every results file)


@config_dataclass(kw_only=True)
class ModelOptions:
    """The options of a command that loads one model folder (``eval``, ``relearn``); a subclass adds
    its own. Errors name the flag (``--batch-size must be >= 1, got 0``)."""

    model: Annotated[File, Field(description="local model directory (save_pretrained format)")]
    device: Annotated[Literal["auto", "cpu", "cuda"], Field(description="auto: CUDA when present")] = "auto"
    dtype: Annotated[Literal["checkpoint", "float32", "bfloat16", "float16"], Field(description=(
        "the dtype to run in (default: the checkpoint's)"))] = "checkpoint"
    format: Annotated[Literal["cloze", "mmlu"], Field(description=(
        "cloze: 'Question: q\\nAnswer:' + ' choice'; mmlu: lettered choices (lm-eval's wmdp/mmlu)"))] = "cloze"
    text_field: Annotated[str, Field(description="column holding the text in data files")] = "text"
    trust_remote_code: Annotated[bool, Field(description=(
        "let the model folder's own code files (config.json auto_map) run; never done without"))] = False
    overwrite: Annotated[bool, Field(description=(
        "replace output files that hold a previous output of unlearn_kernels"))] = False

    label: ClassVar = staticmethod(flag_label)

    def load(self, path: str | None = None):
        """``(model, tokenizer)`` of ``path`` (default: ``model``) on this device, in this dtype."""
        return load_model(path or self.model, self.device, self.dtype, self.trust_remote_code)


def task_names(paths: list[str]) -> list[str]:
    """The file stems (``wmdp_bio.jsonl`` → ``wmdp_bio``), which must be distinct."""
    names = []
    for p in paths:
        name = Path(p).name
        for suffix in (".gz", ".jsonl", ".json", ".csv", ".parquet"):
            name = name.removesuffix(suffix)
        if name in names:
            raise UserError(f"two questions files are named {name!r}: rename one, results are keyed by file name")
        names.append(name)
    return names


def check_device(device: str) -> str:
    """The device ``device`` names (``auto``: CUDA when present); UserError for ``--device cuda``
    on a machine without CUDA."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here (use --device cpu)")
    return device


def load_model(path: str, device: str, dtype: str | None, trust_remote_code: bool = False):
    """``load_local`` on ``device`` (``auto``: CUDA when present) in ``dtype`` (None or
    ``"checkpoint"``: the checkpoint's); with
    ``trust_remote_code`` (``--trust-remote-code``) the folder's own modeling code may run, and
    a line on stderr says so."""
    import sys

    import torch

    from ..models.io import load_local

    device = check_device(device)
    if trust_remote_code:
        print(f"--trust-remote-code: the code files of {path} (config.json auto_map) may run in this process",
              file=sys.stderr)
    model, tokenizer = load_local(path, getattr(torch, dtype) if dtype not in (None, "checkpoint") else None,
                                  trust_remote_code)
    return model.to(device), tokenizer


def table(results: dict) -> str:
    """Markdown table of ``{name: result}``."""
    lines = ["| questions | n | format | acc | ± | acc_norm | ± |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['n']} | {r['format']} | {r['acc']:.4f} | {r['acc_stderr']:.4f} | "
                     f"{r['acc_norm']:.4f} | {r['acc_norm_stderr']:.4f} |")
    return "\n".join(lines)


def privacy_table(report: dict) -> str:
    lines = ["| score | MIA AUC (forget vs holdout) | PrivLeak |", "|---|---|---|"]
    for score, auc in report["auc"].items():
        leak = report["privleak"][score] if report.get("privleak") else None
        lines.append(f"| {score} | {auc:.4f} | {'n/a' if leak is None else f'{leak:.1f}'} |")
    return "\n".join(lines)
