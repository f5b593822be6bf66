"""The one typed configuration (``methods.settings``, ``pipeline.RunConfig``) and the method specs
(``methods.spec``): every bad value is a one-line UserError naming its field, before any model
is loaded; the CLI, ``methods NAME`` and the planner are generated from the types and specs; no
module outside a method's own file decides anything by a method's name."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

import unlearn_kernels
from unlearn_kernels import cli, plan
from unlearn_kernels.errors import UserError
from unlearn_kernels.methods import registry
from unlearn_kernels.methods.settings import SettingError, field_description, make_config
from unlearn_kernels.pipeline import RunConfig

from conftest import bad_values

PACKAGE = Path(unlearn_kernels.__file__).parent
RUN = dict(model="m", method="GradDiff", forget=["f.txt"], retain=["r.txt"], out="o")


CASES = [(method, f.name, value) for method, cls in registry.items() for f in dataclasses.fields(cls.config_class)
         for value in bad_values(cls.config_class, f.name)]


@pytest.mark.parametrize("method, name, value", CASES, ids=[f"{m}.{n}={v!r}" for m, n, v in CASES])
def test_every_setting_refuses_bad_values_naming_itself(method, name, value):
    config_class = registry[method].config_class
    with pytest.raises(SettingError) as raised:
        make_config(config_class, **{name: value})
    message = str(raised.value)
    assert isinstance(raised.value, UserError) and len(message.splitlines()) == 1, message
    assert message.startswith(f"setting {name} ") and raised.value.field == name, message
    with pytest.raises(SettingError, match=f"setting {name} "):   # an assignment is checked the same way
        setattr(config_class(), name, value)


@pytest.mark.parametrize("method, settings, words", [
    ("RMU", dict(alpha=-1), "setting alpha must be >= 0, got -1"),
    ("GradDiff", dict(retain_weight=-0.5), "setting retain_weight must be >= 0, got -0.5"),
    ("NPO", dict(beta=0), "setting beta must be > 0, got 0"),
    ("AdaptiveRMU", dict(beta=-5), "setting beta must be > 0, got -5"),
    ("SO-GradDiff", dict(hessian_interval=0), "setting hessian_interval must be >= 1, got 0"),
    ("SIMU", dict(score_batches=0), "setting score_batches must be >= 1, got 0"),
    ("SIMU", dict(fraction=0), "setting fraction must be in (0, 1], got 0"),
    ("SIMU", dict(betas="0.9,1"), "setting betas must be in [0, 1), got '0.9,1'"),
    ("SIMU", dict(scorer="random"), "setting scorer must be obd or integrated_gradients, got 'random'"),
    ("SRMU", dict(stats_batches=0), "setting stats_batches must be >= 1, got 0"),
    ("MRP", dict(stats_batches=0), "setting stats_batches must be >= 1, got 0"),
    ("MRP", dict(retain_energy=1.5), "setting retain_energy must be in [0, 1], got 1.5"),
    ("TAR", dict(tamper_points=5), "setting tamper_points must be in 0..adversary_steps=4, got 5"),
    ("TAR", dict(adversary_lrs=(1e-3, 1e-4)), "setting adversary_lrs must be a range 0 < low <= high"),
    ("TAR", dict(tamper_loss="mse"), "setting tamper_loss must be nll or entropy, got 'mse'"),
    ("RMU", dict(update="layers.1.mlp.*", steps=True), "setting steps expects an integer, not true/false, got True"),
    ("RMU", dict(stats_batches=True), "RMU has no setting stats_batches"),
    ("RMU", dict(update=[""]), "setting update expects a list of non-empty strings"),
    ("RMU", dict(update=5), "setting update expects a list of non-empty strings"),
    ("RMU", dict(lr=float("inf")), "setting lr is not a finite number: inf"),
    ("RMU", dict(backend="gpu"), "setting backend must be auto, cuda, triton, cpu or torch, got 'gpu'"),
])
def test_the_table_of_bad_settings(method, settings, words):
    with pytest.raises(UserError) as raised:
        make_config(registry[method].config_class, **settings)
    assert words in str(raised.value) and len(str(raised.value).splitlines()) == 1


def test_settings_as_people_write_them():
    from unlearn_kernels.methods.tar import TARConfig

    config = make_config(TARConfig, lr="5e-5", steps="1e2", progress="off", update="layers.*",
                         adversary_lrs="1e-4,1e-3", adversary_update="none", tamper_points="0")
    assert (config.lr, config.steps, config.progress, config.update) == (5e-5, 100, False, ["layers.*"])
    assert config.adversary_lrs == (1e-4, 1e-3) and config.adversary_update is None and config.tamper_points == 0
    assert make_config(TARConfig, config, tamper_weight=2).tamper_weight == 2.0 and config.tamper_weight == 1.0
    assert dataclasses.asdict(config)["adversary_lrs"] == (1e-4, 1e-3)


def test_a_method_refuses_one_string_as_its_texts():
    from unlearn_kernels.models import tiny

    model, tokenizer = tiny.load()
    with pytest.raises(UserError, match="must be a list of texts or QA pairs, got one string"):
        registry["GradDiff"](model, tokenizer, steps=1, progress=False).fit("some text", ["other text"])


@pytest.mark.parametrize("values, words", [
    (dict(keep=1.5), "--keep must be in (0, 1], got 1.5"),
    (dict(budget=0.5), "--budget must be >= 1, got 0.5"),
    (dict(stop="sometimes"), "--stop must be auto, probe, rule or fixed, got 'sometimes'"),
    (dict(val_every=0), "--val-every must be >= 1, got 0"),
    (dict(checkpoint_every=-1), "--checkpoint-every must be >= 0, got -1"),
    (dict(method="Nope"), "--method must be a method name: unknown method"),
    (dict(method=["RMU"]), "--method must be a method name"),
    (dict(forget=[""]), "--forget expects a list of non-empty strings"),
    (dict(model=5), "--model expects a string, got 5"),
    (dict(settings=["lr", 1]), "--set must be a mapping (setting: value)"),
    (dict(device="tpu"), "--device must be auto, cpu or cuda, got 'tpu'"),
    (dict(steps=3), "unlearn has no setting steps"),
])
def test_run_config_errors_name_the_flag(values, words):
    with pytest.raises(UserError) as raised:
        RunConfig(**{**RUN, **values})
    assert words in str(raised.value) and len(str(raised.value).splitlines()) == 1


def test_run_config_converts_what_the_yaml_and_flags_give():
    config = RunConfig(**{**RUN, "forget": Path("f.txt"), "keep": "0.9", "val_every": "auto", "prefix_only": "false"})
    assert config.forget == ["f.txt"] and config.keep == 0.9 and config.val_every is None
    assert config.prefix_only is False and config.inputs() == ["m", "f.txt", "r.txt"]


def _unlearn_parser():
    parser = argparse.ArgumentParser()
    cli._run_options(parser)
    return parser


def test_every_run_config_field_has_a_flag_and_a_description():
    parser = _unlearn_parser()
    flags = {option: action for action in parser._actions for option in action.option_strings}
    for f in dataclasses.fields(RunConfig):
        assert field_description(RunConfig, f.name), f.name
        flag = RunConfig.label(f.name)
        assert flag in flags, flag
        if f.name not in ("settings", "config_file"):
            assert flags[flag].help.replace("%%", "%").startswith(field_description(RunConfig, f.name))
    args = parser.parse_args(["--model", "m", "--method", "RMU", "--forget", "a", "b", "--qa", "--no-prefix-only",
                              "--stop", "probe"])
    assert (args.forget, args.qa, args.prefix_only, args.stop) == (["a", "b"], True, False, "probe")
    assert not hasattr(args, "keep") and not hasattr(args, "retain")   # not given: the YAML's value or the default


def test_yaml_errors_name_the_file_and_flags_override_it(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\nmethod: GradDiff\nforget: f.txt\nretain: r.txt\nout: o\nkeep: 2\n")
    assert cli.main(["unlearn", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"--config {path}: keep must be in (0, 1], got 2" in err and len(err.strip().splitlines()) == 1
    path.write_text("model: m\nmethod: GradDiff\nforget: f.txt\nretain: r.txt\nout: o\nkep: 0.9\n")
    assert cli.main(["unlearn", "--config", str(path)]) == 2
    assert "unknown key kep (did you mean keep?)" in capsys.readouterr().err
    args = argparse.Namespace(config=str(path), set=["lr=1e-3"], keep="0.5", out="o2")
    path.write_text("model: m\nmethod: GradDiff\nforget: f.txt\nretain: r.txt\nout: o\nsettings: {steps: 3}\n")
    config = cli._load_run_config(args)
    assert (config.keep, config.out, config.config_file) == (0.5, "o2", str(path))
    assert config.settings == {"steps": 3, "lr": "1e-3"}     # as YAML reads it; the method's config types it
    assert make_config(registry["GradDiff"].config_class, **config.settings).lr == 1e-3


@pytest.mark.parametrize("name", list(registry))
def test_methods_name_lists_every_setting_with_its_description(name, capsys):
    assert cli.main(["methods", name]) == 0
    out = capsys.readouterr().out
    config_class = registry[name].config_class
    for f in dataclasses.fields(config_class):
        meaning = field_description(config_class, f.name)
        assert meaning, (name, f.name)
        assert any(line.startswith(f"| {f.name} | ") and line.endswith(f" | {meaning} |") for line in out.splitlines())


@pytest.mark.parametrize("name", list(registry))
def test_each_method_declares_a_consistent_spec(name):
    cls = registry[name]
    spec, fields = cls.spec, {f.name for f in dataclasses.fields(cls.config_class)}
    assert cls.config_class is spec.config and "spec" in vars(cls), name   # declared in the class itself
    assert spec.length in fields and set(spec.knobs) <= fields and set(spec.refuses) <= fields, name
    assert spec.length == spec.knobs[0] and set(spec.saves) <= {"weights", "projections", "masks"}
    assert spec.selective_of is None or spec.selective_of in registry
    assert (name in plan.METHODS) == (spec.memory is not None)
    if spec.memory is not None:
        row = plan.plan(PACKAGE / "assets" / "configs" / "llama-70b.json", 8, method=name)["methods"][name]
        assert row["memory"]["total"] > 0 and row["prefix_only"] == (spec.prefix == "auto")


def _own_file(name: str) -> Path:
    return Path(inspect.getsourcefile(registry[name])).resolve()


def _names_in(node) -> set[str]:
    values = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return {v.value for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)}


def test_no_module_decides_by_a_method_name():
    names = set(registry)
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            for side in [node.left, *node.comparators]:
                for name in _names_in(side) & names:
                    if path.resolve() != _own_file(name):
                        found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} compares with {name!r}")
    assert not found, found


def test_plan_does_not_import_the_command_line():
    source = (PACKAGE / "plan.py").read_text(encoding="utf-8")
    imported = {alias.name if isinstance(node, ast.Import) else (node.module or "")
                for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    assert not any(module == "cli" or module.endswith(".cli") for module in imported), imported


# --- the other commands: their flags are the fields of their configs -------------------------------
COMMANDS = cli._commands()
REQUIRED = {"eval": dict(model="m"), "relearn": dict(model="m", train="t.txt", questions="q.jsonl"),
            "plan": dict(config="c.json", gpus=1), "demo": {}, "bench": {}}
COMMAND_CASES = [(command, f.name, value) for command, (_, cls, _, _) in COMMANDS.items()
                 for f in dataclasses.fields(cls) for value in bad_values(cls, f.name)]


def test_every_command_has_its_required_values_listed():
    assert set(REQUIRED) == set(COMMANDS)
    for command, (_, cls, _, _) in COMMANDS.items():
        cls(**REQUIRED[command])
        for name in REQUIRED[command]:
            with pytest.raises(SettingError, match=f"^--{name.replace('_', '-')} is required$"):
                cls(**{k: v for k, v in REQUIRED[command].items() if k != name})


@pytest.mark.parametrize("command, name, value", COMMAND_CASES, ids=[f"{c}.{n}={v!r}" for c, n, v in COMMAND_CASES])
def test_every_command_option_refuses_bad_values_naming_its_flag(command, name, value):
    cls = COMMANDS[command][1]
    with pytest.raises(SettingError) as raised:
        cls(**{**REQUIRED[command], name: value})
    message = str(raised.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"--{name.replace('_', '-')} "), message


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_option_is_a_flag_with_its_description(command):
    cls = COMMANDS[command][1]
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    flags = {option: action for action in sub.choices[command]._actions for option in action.option_strings}
    for f in dataclasses.fields(cls):
        flag = f"--{f.name.replace('_', '-')}"
        assert field_description(cls, f.name) and flag in flags, (command, flag)
        assert flags[flag].help.replace("%%", "%").startswith(field_description(cls, f.name)), (command, flag)


def test_command_flags_are_typed_by_the_config():
    from unlearn_kernels.eval.relearn_files import RelearnConfig

    args = cli.build_parser().parse_args(["relearn", "--model", "m", "--train", "t", "--questions", "q",
                                          "--lrs", "1e-4", "3e-4", "--steps", "5", "--trust-remote-code"])
    config = RelearnConfig(**cli.flag_values(args, RelearnConfig))
    assert (config.lrs, config.steps, config.trust_remote_code, config.every) == ([1e-4, 3e-4], 5, True, 10)
    args = cli.build_parser().parse_args(["eval", "--model", "m", "--questions", "a", "b", "--questions", "c"])
    assert args.questions == ["a", "b", "c"] and not hasattr(args, "batch_size")


@pytest.mark.parametrize("argv, words", [
    (["eval", "--model", "m", "--questions", "q.jsonl", "--batch-size", "0"], "--batch-size must be >= 1, got '0'"),
    (["eval", "--questions", "q.jsonl"], "--model is required"),
    (["eval", "--model", "m", "--limit", "x"], "--limit expects an integer, got 'x'"),
    (["relearn", "--model", "m", "--train", "t", "--questions", "q", "--lrs", "-1"], "--lrs must be > 0, got ['-1']"),
    (["bench", "--shapes", "16x"], "--shapes takes ROWSxFEATURES such as 16384x4096, got ['16x']"),
    (["demo", "--threads", "0"], "--threads must be >= 1, got '0'"),
    (["demo", "--full", "--track", "classifier"], "--full and --seeds are options of the LLM demo; the classifier "
                                                  "demo has neither"),
    (["demo", "--seeds", "0"], "--seeds must be >= 1, got ['0']"),
])
def test_command_errors_are_one_line_before_any_work(argv, words, capsys, no_loading):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"unlearn-kernels {argv[0]}: error: {words}\n", err
