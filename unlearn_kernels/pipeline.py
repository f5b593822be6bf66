"""One unlearning run, start to finish: ``pipeline.run(RunConfig(...)) -> RunResult``.

The command line (``unlearn-kernels unlearn``), the Python API and the demo all call this with
one type, :class:`RunConfig`, whose fields are checked when it is made. Then, in order, before
any model is loaded: the output path (new or a previous output of ours, not an
input), the data files, the method's settings (typed, finite), the checkpoint folder (ours
only), the model folder's names (inside it) and shards. Then the model is loaded — whole, or
only layers ``0…l`` when the method runs no further (``models.prefix``) — and checked
(``models.integrity``), the method runs (under ``torch.distributed`` when launched by
torchrun), and the output is saved atomically with ``report.json`` and ``report.png``.

With validation questions (``val_forget``, ``val_retain``, optional ``val_entangled``) the run is
**target-driven** (``unlearn_kernels.target``): it measures forget/retain/entangled accuracy as
it goes, stops at the target or the retain limit, and saves the best point of its trajectory;
``RunResult.reached`` says whether the target was measured to be reached (the CLI exits 3 when
it was not). Without them (``stop="auto"``) the run holds out an eighth of its texts, cuts
cloze probes from them (``data.probes``) and is target-driven on those; ``stop="rule"`` stops
on the method's training signal instead (``unlearn_kernels.stopping``), ``stop="fixed"`` runs
the method's own length.

Example::

    from unlearn_kernels.pipeline import RunConfig, run

    result = run(RunConfig(model="path/to/hf-model", method="RMU", forget=["forget.txt"],
                           retain=["retain.txt"], out="unlearned/",
                           val_forget="val_forget.jsonl", val_retain="val_retain.jsonl"))
    print(result.reached, result.message, result.out)
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import BeforeValidator, Field

from . import parallel
from .config_types import (Auto, Count, File, Files, Fraction, NonNegativeInt, Number, SettingError, Share,
                           config_dataclass, flag_label)
from .errors import UserError
from .methods import registry
from .methods.settings import make_config


def _method_name(value):
    """A registered method's name (``unlearn_kernels.methods.registry``)."""
    if not isinstance(value, str) or not value:
        raise ValueError("must be a method name")
    if value not in registry:
        raise ValueError(f"must be a method name: unknown method; choose from {', '.join(registry)}")
    return value


@config_dataclass
class RunConfig:
    """Everything one run needs. Its fields are the flags of ``unlearn-kernels unlearn`` (``--eval-forget``
    for ``eval_forget``; ``--set`` fills ``settings``, ``--config`` names ``config_file``) and the keys of
    its YAML config; typed and checked when it is made (``methods.settings``)."""

    model: Annotated[File, Field(description="local model directory (save_pretrained format)")]
    method: Annotated[str, BeforeValidator(_method_name), Field(description=(
        "the method (unlearn-kernels methods lists them; methods NAME: a method's settings)"))]
    forget: Annotated[Files, Field(description=".txt (a text per line) or .jsonl ('text') files")]
    out: Annotated[File, Field(description="output directory (written atomically)")]
    retain: Annotated[Files, Field(description="same formats as --forget (not needed by GradAscent)")] = \
        dataclasses.field(default_factory=list)
    settings: Annotated[dict[str, Any], Field(description=(
        "the method's settings (--set KEY=VALUE, values as YAML; unlearn-kernels methods NAME lists them)"))] = \
        dataclasses.field(default_factory=dict)
    device: Annotated[Literal["auto", "cpu", "cuda"], Field(description="auto: CUDA when present")] = "auto"
    dtype: Annotated[Literal["auto", "float32", "bfloat16", "float16"], Field(description=(
        "auto: bfloat16 on GPUs that support it, else the checkpoint's dtype"))] = "auto"
    eval_forget: Annotated[File | None, Field(description=(
        "questions file: accuracy before/after goes into the report"))] = None
    eval_retain: Annotated[File | None, Field(description=(
        "questions file: accuracy before/after goes into the report"))] = None
    relearn: Annotated[File | None, Field(description=(
        "attack texts: relearning attack on --eval-forget after unlearning"))] = None
    val_forget: Annotated[File | None, Field(description=(
        "validation questions on the forget facts (kept apart from --eval-*): a target-driven run"))] = None
    val_retain: Annotated[File | None, Field(description="validation questions the model must keep answering")] = None
    val_entangled: Annotated[File | None, Field(description=(
        "validation questions on facts entangled with the forget facts (same entities), to keep too"))] = None
    target: Annotated[Auto[Share], Field(description=(
        "forget accuracy that means done (default: chance + 0.05)"))] = None
    keep: Annotated[Fraction, Field(description=(
        "retain and entangled accuracy must stay >= KEEP x their starting value (default 0.95)"))] = 0.95
    val_every: Annotated[Auto[Count], Field(description=(
        "evaluate every N steps (default: adaptive, at most 15 % of the run's time)"))] = None
    budget: Annotated[Number, Field(ge=1, description=(
        "at most BUDGET x the method's own length (steps, epochs, MRP's train_steps) unless --set gives it "
        "(default 4; the run stops at the target or when the stopping rule is met)"))] = 4.0
    stop: Annotated[Literal["auto", "probe", "rule", "fixed"], Field(description=(
        "without --val-*: probe = target-driven on cloze questions cut from held-out training texts, rule = "
        "stop on the method's validation-free stopping rule, fixed = run the method's length (probe and rule "
        "exit 3 when not reached); auto (default) = probe, unless --set gives the length, the run checkpoints, "
        "resumes or is distributed (fixed), or the texts are too few or --qa pairs (the rule)"))] = "auto"
    checkpoint_every: Annotated[NonNegativeInt, Field(description=(
        "write a resumable checkpoint to OUT.checkpoint every N steps (and on Ctrl-C); 0: none"))] = 0
    resume: Annotated[bool, Field(description="continue from OUT.checkpoint")] = False
    overwrite: Annotated[bool, Field(description=(
        "replace --out when it holds a previous output of unlearn_kernels"))] = False
    text_field: Annotated[str, Field(description="column holding the text in data files")] = "text"
    qa: Annotated[bool, Field(description=(
        "data files hold question/answer pairs (TOFU style): loss on the answer tokens"))] = False
    question_field: Annotated[str, Field(description="column holding the question (--qa)")] = "question"
    answer_field: Annotated[str, Field(description="column holding the answer (--qa)")] = "answer"
    prefix_only: Annotated[bool | None, Field(description=(
        "load embeddings and layers 0..l only, write the full checkpoint shard by shard (methods that run "
        "layers 0..l alone; default: on when l is below the top and no --eval-*/--val-* is asked)"))] = None
    parallel: Annotated[Literal["none", "ddp", "fsdp"] | None, Field(description=(
        "under torchrun: ddp (the default there) splits each global batch over the ranks"))] = None
    config_file: Annotated[File | None, Field(description=(
        "the YAML config it came from (--config; an input: never a target)"))] = None

    title: ClassVar[str] = "unlearn"

    @staticmethod
    def label(name: str) -> str:
        """How an error names a field: by its flag."""
        return {"settings": "--set", "config_file": "--config"}.get(name) or flag_label(name)

    @property
    def validation(self) -> bool:
        return bool(self.val_forget or self.val_retain or self.val_entangled)

    def inputs(self) -> list:
        """Every path the run reads (the output may be none of them)."""
        paths = [self.model, *self.forget, *self.retain, self.config_file, self.eval_forget, self.eval_retain,
                 self.relearn, self.val_forget, self.val_retain, self.val_entangled]
        return [p for p in paths if p]


def read_run_file(path: str | os.PathLike) -> dict:
    """The mapping in a YAML run config (its keys are :class:`RunConfig`'s fields, typed when the run
    config is made); a UserError naming the file otherwise."""
    import yaml

    from .errors import MissingFileError, path_error

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"--config {path} does not exist")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as error:
        raise path_error(path, error, "--config") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or error
        raise UserError(f"--config {path} is not valid YAML ({where}{problem})") from None
    if not isinstance(config, dict):
        raise UserError(f"--config {path} must hold a mapping of the unlearn options (model, method, forget, retain, "
                        f"out, settings, ...), got a {type(config).__name__}")
    return config


def load_run_config(config_file: str | None = None, given: dict | None = None, sets: list[str] = ()) -> RunConfig:
    """The :class:`RunConfig` of the YAML file ``config_file`` with the values ``given`` (the flags)
    over it and ``sets`` (``KEY=VALUE``, values as YAML) over its ``settings``; an error in a value of
    the file names the file."""
    import yaml

    given = dict(given or {})
    from_file = read_run_file(config_file) if config_file else {}
    values = {**from_file, **given, "config_file": config_file}
    overrides = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set takes key=value, got {item!r}")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {item}: the value is not valid YAML") from None
    settings = values.get("settings") or {}
    values["settings"] = {**settings, **overrides} if isinstance(settings, dict) else settings
    method = registry.get(values.get("method")) if isinstance(values.get("method"), str) else None
    needed = ("model", "method", "forget", "out") + (("retain",) if method is None or method.spec.needs_retain else ())
    missing = [k for k in needed if not values.get(k)]
    if missing:
        raise UserError(f"unlearn needs {', '.join(missing)} (flags or --config)")
    try:
        return RunConfig(**values)
    except SettingError as error:
        if error.field not in from_file or error.field in given:
            raise
        label = "unknown key" if error.unknown else error.field
        raise SettingError(f"--config {config_file}: {label}", error.field, error.problem) from None



@dataclass
class RunResult:
    out: Path | None                    # None on the ranks other than 0
    report: dict
    reached: bool | None = None         # target-driven runs: was the target measured to be reached
    message: str = ""                   # one line for the user


def run(config: RunConfig) -> RunResult:
    """Run ``config`` (module docstring); a UserError (``unlearn_kernels.errors``) for what the user gave."""
    from .data.loaders import read_multiple_choice, read_texts
    from .eval import files
    from .models.io import save_figure_atomic, save_pretrained_atomic
    from .models.output_dir import check_output_path, weights_size
    from .models.prefix import check_shards, unfit_source

    method_class = registry[config.method]     # a registered name (RunConfig checks it)
    if config.retain == [] and method_class.spec.needs_retain:
        raise UserError(f"{config.method} needs retain data")
    if config.relearn and not config.eval_forget:
        raise UserError("--relearn scores the held-out facts of --eval-forget: give --eval-forget too")
    defaults = RunConfig.__dataclass_fields__
    stray = [RunConfig.label(name) for name in ("target", "keep", "val_every")
             if getattr(config, name) != defaults[name].default]
    if config.validation and not (config.val_forget and config.val_retain):
        raise UserError("a target-driven run needs both --val-forget and --val-retain (--val-entangled is optional)")
    stopping = _stopping(config, method_class)
    if stray and stopping not in ("validation", "probe"):   # they steer target-driven runs: never ignore them
        raise UserError(f"{', '.join(stray)} steer target-driven runs: give --val-forget and --val-retain, or "
                        f"--stop probe (this run: {stopping})")
    if config.budget != defaults["budget"].default and stopping == "fixed":
        why = "--stop fixed" if config.stop == "fixed" else (_length_reason(config, method_class)
                                                             or _rule_reason(method_class))
        raise UserError(f"--budget steers target- and rule-driven runs, and this run has a fixed length ({why}): "
                        "give --val-forget and --val-retain, or drop --budget")
    out = check_output_path(config.out, config.inputs(), overwrite=config.overwrite or config.resume,
                            needed_bytes=weights_size(config.model))
    mode = parallel.resolve_mode(config.parallel)
    if mode == "fsdp" and config.relearn:
        raise UserError("--parallel fsdp: --relearn fine-tunes a copy of the whole model, which a sharded run does "
                        "not hold; attack the output folder afterwards (unlearn-kernels eval --relearn), or use "
                        "--parallel ddp")
    if mode != "none" and config.validation:
        raise UserError(f"--parallel {mode}: target-driven runs (--val-*) run in one process for now")
    if mode == "fsdp":
        problem = unfit_source(config.model)
        if problem:   # the sharded run's output is the source's shards, rewritten
            raise UserError(f"--parallel fsdp: {problem}; use --parallel ddp")
    checkpointer = _checkpointer(out, config)
    forget = [t for f in config.forget for t in _training_data(f, config)]
    retain = [t for f in config.retain for t in _training_data(f, config)]
    points = None
    if stopping == "probe":
        points = _probe_points(forget, retain)
        if config.stop == "auto" and min(len(points["forget"]), len(points["retain"])) < PROBES_MINIMUM:
            stopping, points = ("fixed" if _rule_reason(method_class) else "rule"), None   # too little text
            if stray:
                raise UserError(f"{', '.join(stray)}: too few texts to cut cloze probes from (at least "
                                f"{PROBES_MINIMUM} per set); give --val-forget and --val-retain")
        else:
            forget, retain = points.pop("train_forget"), points.pop("train_retain")
    settings, budget = _budget(method_class, config.settings,
                               config.budget if stopping in ("validation", "rule", "probe") else None)
    method_config = make_config(method_class.config_class, **settings)   # typed, ranges checked
    method_class.spec.refuse_unused(method_config, method_class.name)    # before any model is loaded
    evals = {name: read_multiple_choice(path) for name, path in (("forget", config.eval_forget),
                                                                  ("retain", config.eval_retain)) if path}
    controller = _controller(config, method_class, stopping, points)
    attack = read_texts(config.relearn, config.text_field) if config.relearn else None
    device, dtype = device_and_dtype(config.device, config.dtype)
    check_shards(config.model)
    method_config, prefix = _prefix_plan(config, method_class, method_config,
                                         wants_full=bool(evals or attack or config.validation or stopping == "probe"))
    with parallel.process_group(mode, device) as device:
        if prefix:
            from .models.prefix import load_prefix

            model, tokenizer = load_prefix(config.model, prefix["layers_loaded"], _torch_dtype(dtype))
            model = model.to(device)
        else:
            model, tokenizer = files.load_model(config.model, device, dtype)
        carried = sorted(getattr(model, "unlearn_projections", None) or {})
        if carried:     # the saver would refuse the output after the whole run (models.io)
            raise UserError(f"{config.model} carries MRP projections (after layer {', '.join(map(str, carried))}) "
                            f"that an output of {config.method} cannot keep: unlearn the model they were "
                            "computed for instead (source_model in its report.json)")
        evaluates = parallel.is_main() or mode == "fsdp"   # a sharded forward needs every rank
        before = _accuracies(model, tokenizer, evals) if evaluates else {}
        method = method_class(parallel.wrap(model, mode), tokenizer, config=method_config)
        method.fit(forget, retain, checkpoint=checkpointer, resume=config.resume,
                   **({"monitor": controller} if controller else {}))
        after = _accuracies(method.model, tokenizer, evals) if evaluates else {}
        if mode == "fsdp":    # every rank takes part in gathering the updated weights
            from .methods.distributed import full

            updated = {name: full(p).detach().cpu() for name, p in method.params.items()}
    if not parallel.is_main():
        return RunResult(None, {})
    report = {**method.report(), "source_model": str(config.model)}
    if budget:
        report["target"]["budget"] = budget
    if prefix:
        report["prefix_only"] = prefix
        if prefix["layer_chosen_by_structure"]:   # fixed from the full depth before loading
            report["chosen_by_structure"] = {"layer": prefix["layer"], **report.get("chosen_by_structure", {})}
    if mode != "none":
        report["parallel"] = {"mode": mode, "world_size": int(os.environ["WORLD_SIZE"])}
    if evals:
        report["evaluation"] = {"before": before, "after": after,
                                "protocol": "lm-eval 0.4.13 multiple choice, cloze format"}
    if attack is not None:
        from .eval.relearn import relearn_attack

        result = relearn_attack(method.model, tokenizer, attack, evals["forget"])
        report["relearning"] = {**result, "curves": {str(k): v for k, v in result["curves"].items()}}
    if prefix or mode == "fsdp":   # the source's shards, rewritten where a tensor changed
        from .models.prefix import save_prefix_output

        out = save_prefix_output(config.model, config.out, updated if mode == "fsdp" else method.params,
                                 tokenizer, report, model=method.model, projections=method.projections(),
                                 masks=method.saved_masks())
    else:
        out = save_pretrained_atomic(method.model, tokenizer, config.out, report, method.projections(),
                                     method.saved_masks())
    from .report_figure import report_figure

    save_figure_atomic(report_figure(report), Path(out) / "report.png")
    if checkpointer is not None:
        checkpointer.remove()      # ours, and the run it served is saved
    if controller is None:
        return RunResult(Path(out), report)
    return RunResult(Path(out), report, reached=bool(report["target"]["reached"]), message=controller.message())


def _stopping(config: RunConfig, method_class) -> str:
    """How the run stops: "validation" (target-driven on the user's questions), "probe"
    (target-driven on cloze probes cut from held-out training texts, ``data.probes``), "rule"
    (the method's validation-free stopping rule, ``unlearn_kernels.stopping``) or "fixed" (the
    method's own length). ``auto`` without validation questions: probe, unless the length is set,
    the run checkpoints, resumes or is distributed (fixed), or the data are question/answer pairs
    (the method's rule when it has one, else fixed)."""
    if config.validation:
        if config.stop != "auto":
            raise UserError(f"--stop {config.stop}: a run with validation questions stops at its target; drop --stop")
        return "validation"
    if config.stop == "fixed":
        return "fixed"
    length = _length_reason(config, method_class)
    if config.stop in ("probe", "rule") and length:
        raise UserError(f"--stop {config.stop}: {length}")
    if config.stop == "probe" or (config.stop == "auto" and not length and not config.qa):
        return "probe"
    reason = length or _rule_reason(method_class)
    if config.stop == "rule" and reason:
        raise UserError(f"--stop rule: {reason}")
    return "fixed" if reason else "rule"


def _length_reason(config: RunConfig, method_class) -> str | None:
    """Why a run without validation questions keeps its fixed length (None: it may stop on its own)."""
    for name in dict.fromkeys(("steps", "epochs", method_class.spec.length)):
        if name in config.settings:
            return f"the run's length is set ({name}={config.settings[name]})"
    if config.resume or config.checkpoint_every:
        return "checkpointed and resumed runs keep a fixed length"
    if parallel.resolve_mode(config.parallel) != "none":
        return "distributed runs keep a fixed length"
    return None


def _rule_reason(method_class) -> str | None:
    if method_class.stopping_rule is None:
        return f"{method_class.name} has no validation-free stopping rule; give validation questions"
    return None


PROBES_MINIMUM = 8     # cut points per set below which an auto run does not probe


def _probe_points(forget: list, retain: list) -> dict:
    """The texts to train on (``train_forget``, ``train_retain``) and the cloze points cut from
    the held-out ones (``forget``, ``retain``; ``data.probes``)."""
    from .data import probes

    if any(not isinstance(t, str) for t in forget + retain):
        raise UserError("--stop probe cuts its questions from plain texts; question/answer data (--qa) need "
                        "validation questions or --stop fixed")
    frequency = probes.document_frequency(forget + retain)
    (train_forget, held_forget), (train_retain, held_retain) = probes.hold_out(forget), probes.hold_out(retain)
    return {"train_forget": train_forget, "train_retain": train_retain,
            "forget": probes.cloze_points(held_forget, frequency), "retain": probes.cloze_points(held_retain, frequency)}


def _controller(config: RunConfig, method_class, stopping: str, points: dict | None = None):
    """The controller of a target-driven (validation questions or probes) or rule-driven run;
    None for a run of fixed length."""
    if stopping == "probe":
        from .target import ProbeController

        return ProbeController(points=points, target=config.target, keep=config.keep, every=config.val_every,
                               minimum=PROBES_MINIMUM)
    if stopping == "rule":
        from .stopping import SignalController

        return SignalController(rule=method_class.stopping_rule)
    if stopping != "validation":
        return None
    from .data.loaders import read_multiple_choice
    from .target import TargetController, ValidationSets

    sets = ValidationSets(read_multiple_choice(config.val_forget), read_multiple_choice(config.val_retain),
                          read_multiple_choice(config.val_entangled) if config.val_entangled else ())
    return TargetController(sets, target=config.target, keep=config.keep, every=config.val_every)


def _budget(method_class, settings: dict, factor: float | None) -> tuple[dict, dict | None]:
    """(settings, budget): a target-driven run may go ``factor`` times the method's own length
    (``MethodSpec.length``) — it stops at the target, so the extra length is spent only when
    needed — unless the user set that length."""
    if not factor:
        return settings, None
    defaults = method_class.config_class()
    name = method_class.spec.length
    if name in settings:
        return settings, {"setting": name, "value": settings[name], "set_by": "user"}
    value = max(1, round(getattr(defaults, name) * factor))
    return {**settings, name: value}, {"setting": name, "value": value, "default": getattr(defaults, name),
                                       "factor": factor}


def _torch_dtype(dtype: str | None):
    return getattr(torch, dtype) if dtype else None


def device_and_dtype(device: str, dtype: str) -> tuple[str, str | None]:
    """``auto``: CUDA when present; bf16 on GPUs that support it, else the checkpoint's dtype."""
    from .eval.files import check_device

    device = check_device(device)
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else None
    return device, dtype


def _training_data(path, config: RunConfig) -> list:
    """Texts (``text_field``), or question/answer pairs with ``qa`` (the loss-based methods then
    put their loss on the answer tokens only)."""
    from .data.loaders import read_qa_pairs, read_texts

    if config.qa:
        return read_qa_pairs(path, config.question_field, config.answer_field)
    return read_texts(path, config.text_field)


def _prefix_plan(config: RunConfig, method_class, method_config, wants_full: bool):
    """(config, plan): with prefix-only loading (``models.prefix``) the loss layer is fixed from
    the full depth here and the plan records it; plan is None for a full load. Auto (None):
    on for the methods that run only layers 0…l (``MethodSpec.prefix == "auto"``) when l is below the top, the
    folder can be rewritten shard by shard (``models.prefix.unfit_source``) and no evaluation
    needs the whole model."""
    from .models.prefix import depth_of, unfit_source
    from .models.roles import default_layer

    asked = config.prefix_only
    if asked is False:
        return method_config, None
    runs_prefix = method_class.spec.prefix == "auto"
    if asked and not runs_prefix:
        alone = [name for name, cls in registry.items() if cls.spec.prefix == "auto"]
        raise UserError(f"--prefix-only: {method_class.name} runs the whole model; only {', '.join(alone)} "
                        "run layers 0..l alone")
    distils = bool(getattr(method_config, "distill_noise", 0))
    if asked and distils:
        raise UserError("--prefix-only loads layers 0..l only; distill_noise distils the whole model: drop one")
    wants_full = wants_full or distils
    if asked and wants_full:
        raise UserError("--prefix-only loads layers 0..l only; --eval-forget/--eval-retain/--relearn/--val-* need "
                        "the whole model: drop them or pass --no-prefix-only")
    problem = unfit_source(config.model)
    if asked and problem:
        raise UserError(f"--prefix-only: {problem}")
    if not runs_prefix or wants_full or problem:
        return method_config, None
    depth = depth_of(config.model)
    given = method_config.layer
    layer = default_layer(depth) if given is None else given
    if not -depth <= layer < depth:
        raise UserError(f"layer {layer} does not exist: the model has {depth} decoder layers (0..{depth - 1})")
    layer %= depth
    if layer == depth - 1 and not asked:
        return method_config, None
    plan = {"layers_loaded": layer + 1, "depth": depth, "layer": layer, "layer_chosen_by_structure": given is None}
    return dataclasses.replace(method_config, layer=layer), plan


def _checkpointer(out: Path, config: RunConfig):
    """``{out}.checkpoint`` for ``checkpoint_every``/``resume`` (refusing a folder that is not
    one of our checkpoints, ``overwrite`` or not, or starting over one without ``overwrite``)."""
    from .methods.checkpoint import Checkpointer, NotACheckpointError, is_checkpoint, read_state

    if not config.checkpoint_every and not config.resume:
        return None
    path = out.with_name(out.name + ".checkpoint")
    if (path.exists() or path.is_symlink()) and not is_checkpoint(path):
        raise NotACheckpointError(path)
    if path.exists() and not config.resume and not config.overwrite:
        raise UserError(f"a checkpoint exists at {path}: pass --resume to continue it or --overwrite to start over")
    if config.resume:
        read_state(path)     # a checkpoint that cannot be resumed fails here, before the model is loaded
    return Checkpointer(path, config.checkpoint_every)


def _accuracies(model, tokenizer, evals: dict) -> dict:
    from .eval.multiple_choice import evaluate_multiple_choice

    return {name: evaluate_multiple_choice(model, tokenizer, qs, progress=False) for name, qs in evals.items()}
