"""lm-evaluation-harness itself, on the same questions files: ``unlearn-kernels eval --engine lm-eval``.

Each questions file becomes a local lm-eval task (a YAML in a temporary folder, the data read
by ``datasets``' json builder from a copy of the rows), whose templates render exactly the
prompts of ``data.prompts``:

- ``cloze``: ``doc_to_text: "Question: {{question}}\\nAnswer:"``, ``doc_to_choice: "{{choices}}"``;
- ``mmlu``: lm-eval's own ``wmdp``/``mmlu`` template generalised to any number of choices
  (``A.`` … ``Z.``), with the ``description`` of the subject.

The model is lm-eval's ``HFLM`` wrapped around the model :func:`unlearn_kernels.models.io.load_local`
loaded from the folder (checked: no weight initialised at random, every weight finite; a
projected MRP folder gets its projections without running the folder's modeling file), zero-shot,
no chat template; no code from the folder runs unless the caller loaded the model with
``trust_remote_code=True`` itself. The result has the schema of
:func:`unlearn_kernels.eval.multiple_choice.evaluate_multiple_choice`.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path

from ..errors import MissingPackageError, UserError
from ..data.prompts import FORMATS, LETTERS, mmlu_description

CLOZE_TEXT = "Question: {{question}}\nAnswer:"
MMLU_TEXT = ("{{question.strip()}}{% for c in choices %}\n{{ '" + LETTERS + "'[loop.index0] }}. {{c}}"
             "{% endfor %}\nAnswer:")
MMLU_CHOICES = "{{ ('" + LETTERS + "'[:choices|length]) | list }}"


def require_lm_eval():
    """lm-eval's modules, or a one-line error saying how to install it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MissingPackageError("--engine lm-eval needs lm-evaluation-harness: pip install 'lm-eval[hf]==0.4.13'") from None
    return lm_eval, HFLM, TaskManager


def task_config(name: str, data_file: Path | str, format: str = "cloze", subject: str | None = None) -> dict:
    """The lm-eval task (a YAML mapping) scoring ``data_file`` (json lines) in ``format``."""
    if format not in FORMATS:
        raise UserError(f"format must be one of {FORMATS}, got {format!r}")
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
              "test_split": "test", "num_fewshot": 0, "output_type": "multiple_choice",
              "doc_to_target": "answer",
              "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                              {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
              "metadata": {"version": 1}}
    if format == "cloze":
        config.update(doc_to_text=CLOZE_TEXT, doc_to_choice="{{choices}}")
    elif format == "text":
        config.update(doc_to_text="{{question}}", doc_to_choice="{{choices}}")
    else:
        config.update(doc_to_text=MMLU_TEXT, doc_to_choice=MMLU_CHOICES, description=mmlu_description(subject))
    return config


def write_task(folder: Path, name: str, questions, format: str, subject: str | None = None) -> Path:
    """A task YAML and its data (``question``, ``choices``, ``answer`` rows) in ``folder``."""
    import yaml

    from ..data.loaders import write_jsonl

    data = folder / f"{name}.jsonl"
    write_jsonl(data, [{"question": q.question, "choices": list(q.choices), "answer": int(q.answer)} for q in questions])
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task_config(name, data, format, subject), sort_keys=False, allow_unicode=True))
    return path


def run(model, tasks: dict[str, list], *, format: str = "cloze", subject: str | None = None,
        device: str = "cpu", dtype: str = "float32", batch_size: int = 16, log_samples: bool = False,
        tokenizer=None) -> dict:
    """``{name: result}`` from ``lm_eval.simple_evaluate`` for every ``{name: questions}``;
    ``model`` is a model folder (loaded by ``load_local`` on ``device`` in ``dtype``, ``"auto"``:
    the checkpoint's), a loaded causal LM with its ``tokenizer``, or an ``HFLM``. With
    ``log_samples`` each result has ``"samples"``: per question, in file order, lm-eval's
    log-likelihoods. UserError when lm-eval gives a non-finite log-likelihood."""
    lm_eval, HFLM, TaskManager = require_lm_eval()
    if isinstance(model, (str, Path)):
        from .files import load_model

        model, tokenizer = load_model(str(model), device, None if dtype == "auto" else dtype)
    if not isinstance(model, HFLM):
        lm_logger = logging.getLogger("lm_eval")
        level = lm_logger.level
        lm_logger.setLevel(logging.ERROR)   # its warning that a loaded model ignores device/dtype arguments
        try:
            model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        finally:
            lm_logger.setLevel(level)
    with tempfile.TemporaryDirectory(prefix="unlearn-kernels-lm-eval-") as folder:
        names = {}
        for name, questions in tasks.items():
            task = "uk_" + "".join(ch if ch.isalnum() else "_" for ch in name)
            write_task(Path(folder), task, questions, format, subject)
            names[task] = name
        output = lm_eval.simple_evaluate(model=model, tasks=list(names), task_manager=TaskManager(include_path=folder),
                                         log_samples=True, verbosity="ERROR")
    results = {}
    for task, name in names.items():
        for sample in output["samples"][task]:
            if not all(math.isfinite(float(r[0][0])) for r in sample["resps"]):
                raise UserError(f"{name}: lm-eval gives a non-finite log-likelihood for question "
                                f"{sample['doc_id'] + 1}: the model's weights or config are broken")
        r = output["results"][task]
        results[name] = {"acc": r["acc,none"], "acc_stderr": r["acc_stderr,none"], "acc_norm": r["acc_norm,none"],
                         "acc_norm_stderr": r["acc_norm_stderr,none"], "n": len(tasks[name]), "format": format}
        if log_samples:
            samples = sorted(output["samples"][task], key=lambda s: s["doc_id"])
            results[name]["samples"] = [{"doc_id": s["doc_id"], "loglikelihoods": [float(x[0][0]) for x in s["resps"]],
                                         "acc": s["acc"], "acc_norm": s["acc_norm"]} for s in samples]
    return results
