"""``unlearn-kernels eval``: a model folder's accuracy on questions files (lm-eval's protocol, our
scorer or lm-eval itself), its membership-inference scores and its distance from an oracle.

:class:`EvalConfig` holds the command's options (its fields are the flags) and
:func:`evaluate_files` runs it::

    evaluate_files(EvalConfig(model="out/model", questions=["forget.jsonl", "retain.jsonl"], json="acc.json"))

Every output path is checked before any model is loaded: it may be none of the inputs and may
replace only a previous output of ours (``overwrite``).
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import Field

from ..config_types import Count, File, Files, config_dataclass
from ..errors import UserError
from . import files


@config_dataclass(kw_only=True)
class EvalConfig(files.ModelOptions):
    """The options of ``unlearn-kernels eval``."""

    questions: Annotated[Files, Field(description=(
        "question/choices/answer files (jsonl, json, csv, parquet, save_to_disk folder)"))] = \
        Field(default_factory=list)
    subject: Annotated[str | None, Field(description="mmlu format: '... questions (with answers) about SUBJECT.'")] \
        = None
    batch_size: Annotated[Count, Field(description="questions per forward (their choices share it)")] = 16
    limit: Annotated[Count | None, Field(description="first N questions of each file")] = None
    json: Annotated[File | None, Field(description=(
        "write lm-eval-style results JSON here ('-': print only the JSON)"))] = None
    log_samples: Annotated[File | None, Field(description="per-question log-likelihoods as jsonl")] = None
    engine: Annotated[Literal["ours", "lm-eval"], Field(description=(
        "lm-eval: run lm-evaluation-harness itself on the same files"))] = "ours"
    mia_forget: Annotated[File | None, Field(description=(
        "texts the model was trained on (membership AUC, PrivLeak)"))] = None
    mia_holdout: Annotated[File | None, Field(description="texts it never saw, same distribution")] = None
    mia_reference: Annotated[File | None, Field(description=(
        "reference model directory (the retrained one) for PrivLeak"))] = None
    oracle: Annotated[File | None, Field(description=(
        "the model retrained without the forget data: its accuracy beside the model's and the forget quality "
        "(KS p-value of their truth ratios)"))] = None

    def inputs(self) -> list[str]:
        return [p for p in (self.model, *self.questions, self.mia_forget, self.mia_holdout, self.mia_reference,
                            self.oracle) if p]


def _check(config: EvalConfig) -> None:
    """What the options must satisfy together; raised before anything is read."""
    if not config.questions and not config.mia_forget:
        raise UserError("eval needs --questions FILE (or --mia-forget/--mia-holdout)")
    if bool(config.mia_forget) != bool(config.mia_holdout):
        raise UserError("--mia-forget and --mia-holdout go together: members and never-trained-on texts")
    if config.oracle and not config.questions:
        raise UserError("--oracle compares answers to --questions: give the forget questions")


def _questions(config: EvalConfig) -> dict:
    """``{file stem: questions}``; with ``--format mmlu`` at most 26 choices per question."""
    from ..data.loaders import read_multiple_choice

    sets = {name: read_multiple_choice(path, limit=config.limit)
            for name, path in zip(files.task_names(config.questions), config.questions)}
    if config.format == "mmlu":
        for path, questions in zip(config.questions, sets.values()):
            for i, q in enumerate(questions):
                if len(q.choices) > 26:
                    raise UserError(f"{path}: question {i + 1}: --format mmlu labels choices A-Z, "
                                    f"this one has {len(q.choices)}")
    return sets


def _accuracies(config: EvalConfig, model, tokenizer, question_sets: dict, quiet: bool) -> dict:
    from .multiple_choice import evaluate_multiple_choice

    if question_sets and config.engine == "lm-eval":
        from . import harness

        harness.require_lm_eval()
        return harness.run(model, question_sets, tokenizer=tokenizer, format=config.format, subject=config.subject,
                           batch_size=config.batch_size, log_samples=bool(config.log_samples))
    results = {}
    for (name, questions), path in zip(question_sets.items(), config.questions):
        try:
            results[name] = evaluate_multiple_choice(model, tokenizer, questions, format=config.format,
                                                     subject=config.subject, batch_size=config.batch_size,
                                                     progress=None if not quiet else False,
                                                     return_details=bool(config.log_samples))
        except UserError as error:
            raise UserError(f"{path}: {error}") from None
    return results


def against_oracle(model, tokenizer, oracle, oracle_tokenizer, config: EvalConfig, question_sets: dict) -> dict:
    """Per question file: the model's and the oracle's accuracy and the forget quality
    (``eval.oracle.forget_quality`` of their per-question log truth ratios)."""
    from . import scores
    from .oracle import forget_quality

    if oracle_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"--oracle {config.oracle}: its tokenizer differs from the model's; the oracle must be the "
                        "same recipe retrained without the forget data")
    out = {}
    for name, questions in question_sets.items():
        prepared = scores.prepare(tokenizer, questions, config.format, config.subject)
        own, theirs = (scores.score(m, tokenizer, prepared, config.batch_size) for m in (model, oracle))
        quality = forget_quality(own["log_truth_ratio"], theirs["log_truth_ratio"])
        out[name] = {"acc": float(own["acc"].mean()), "oracle_acc": float(theirs["acc"].mean()),
                     "forget_quality": quality["p_value"], "forget_quality_ks": quality["ks_statistic"],
                     "n": quality["n"], "oracle": str(config.oracle)}
    return out


def evaluate_files(config: EvalConfig, out=print) -> dict:
    """Run ``eval`` (module docstring): print its tables with ``out`` (with ``json="-"`` only the JSON),
    write ``json`` and ``log_samples``, and return the payload (lm-eval's schema plus ``privacy`` and
    ``oracle``)."""
    from ..data.loaders import read_texts
    from ..models.output_file import check_output_files, write_json_atomic, write_jsonl_atomic

    device = files.check_device(config.device)
    check_output_files({"--json": config.json, "--log-samples": config.log_samples}, config.inputs(),
                       overwrite=config.overwrite)
    _check(config)
    others = {}     # loaded (and so checked) before any evaluation of the model itself
    for other in (config.oracle, config.mia_reference):
        if other and other not in others:
            others[other] = config.load(other)
    question_sets = _questions(config)
    quiet = config.json == "-"
    model, tokenizer = config.load()
    results = _accuracies(config, model, tokenizer, question_sets, quiet)
    samples = [{"questions": name, **s} for name, r in results.items() for s in r.pop("samples", [])]
    payload = {"results": results,
               "config": {"model": str(config.model), "engine": config.engine, "device": device,
                          "dtype": config.dtype, "format": config.format, "subject": config.subject,
                          "batch_size": config.batch_size, "limit": config.limit, "versions": files.versions()}}
    if config.mia_forget:
        from .privacy import privacy_report

        reference = others[config.mia_reference][0] if config.mia_reference else None
        payload["privacy"] = privacy_report(model, tokenizer, read_texts(config.mia_forget, config.text_field),
                                            read_texts(config.mia_holdout, config.text_field),
                                            reference_model=reference, batch_size=config.batch_size)
    if config.oracle:
        payload["oracle"] = against_oracle(model, tokenizer, *others[config.oracle], config, question_sets)
    if config.log_samples:
        write_jsonl_atomic(config.log_samples, samples, overwrite=config.overwrite)
    if quiet:
        out(json.dumps(payload, indent=2, default=str))
        return payload
    if results:
        out(files.table(results))
    if "privacy" in payload:
        out(files.privacy_table(payload["privacy"]))
    for name, r in payload.get("oracle", {}).items():
        out(f"{name}: acc {r['acc']:.3f} vs oracle {r['oracle_acc']:.3f}; forget quality (KS p of the truth "
            f"ratios against the oracle's) {r['forget_quality']:.3g}")
    if config.json:
        write_json_atomic(config.json, payload, overwrite=config.overwrite)
        out(f"wrote {config.json}")
    if config.log_samples:
        out(f"wrote {len(samples)} samples to {config.log_samples}")
    return payload
