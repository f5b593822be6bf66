"""The error model (``unlearn_kernels.errors``): what the user can fix is one line and exit 2,
naming the bad thing; anything else is a bug, shown with its traceback (exit 1)."""

import json
import shutil

import pytest
import torch

import unlearn_kernels
from unlearn_kernels import cli
from unlearn_kernels.models import tiny

MODEL = tiny.ASSET_DIR


@pytest.fixture()
def files(tmp_path, monkeypatch):
    """Small inputs; any attempt to load a model fails the test (every case fails before)."""
    import unlearn_kernels.models.io as io
    import unlearn_kernels.models.prefix as prefix

    def fail(*a, **k):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(io, "load_local", fail)
    monkeypatch.setattr(prefix, "load_prefix", fail)
    (tmp_path / "forget.txt").write_text("the forget text one\nthe forget text two\n")
    (tmp_path / "retain.txt").write_text("the retain text one\nthe retain text two\n")
    return tmp_path


def run_args(d, method="GradDiff", *settings, model=MODEL, extra=()):
    args = ["unlearn", "--model", str(model), "--method", method, "--forget", str(d / "forget.txt"),
            "--retain", str(d / "retain.txt"), "--out", str(d / "out"), "--set", "progress=false"]
    for setting in settings:
        args += ["--set", setting]
    return args + list(extra)


def yaml_config(d, text):
    (d / "run.yaml").write_text(text.format(d=d, model=MODEL))
    return ["unlearn", "--config", str(d / "run.yaml")]


RUN_YAML = "forget: {d}/forget.txt\nretain: {d}/retain.txt\nout: {d}/out\n"


def model_folder(d, config_text):
    folder = d / "model"
    shutil.copytree(MODEL, folder)
    (folder / "config.json").write_text(config_text)
    return run_args(d, model=folder)


def checkpoint(d, state=None, truncate=False):
    """A checkpoint of ours at OUT.checkpoint (state.json as given; tensors truncated or not)."""
    from safetensors.torch import save_file

    from unlearn_kernels.methods.checkpoint import FORMAT
    from unlearn_kernels.models.output_dir import marker

    folder = d / "out.checkpoint"
    folder.mkdir()
    if state is None:
        state = {"unlearn_kernels": marker(), "format": FORMAT, "method": "GradDiff", "step": 0, "optimizer": {},
                 "extra_state": {}, "history": [], "config_sha256": "", "data": {}}
    (folder / "state.json").write_text(json.dumps(state))
    save_file({"rng.cpu": torch.get_rng_state()}, str(folder / "tensors.safetensors"))
    if truncate:
        data = (folder / "tensors.safetensors").read_bytes()
        (folder / "tensors.safetensors").write_bytes(data[:len(data) // 2])
    return run_args(d, extra=["--resume"])


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def C(case, argv, words, marks=()):
    return pytest.param(argv, words, id=case, marks=marks)


# C(case, argv built in the data folder, words the one line must hold)
CASES = [
    C("yaml model: 5", lambda d: yaml_config(d, "model: 5\nmethod: GradDiff\n" + RUN_YAML), ["run.yaml", "model"]),
    C("yaml method: [RMU]", lambda d: yaml_config(d, "model: {model}\nmethod: [RMU]\n" + RUN_YAML),
      ["run.yaml", "method must be a method name"]),
    C("yaml settings: [..]",
      lambda d: yaml_config(d, "model: {model}\nmethod: GradDiff\nsettings: [lr, 1]\n" + RUN_YAML),
      ["run.yaml", "settings must be a mapping"]),
    C("yaml malformed", lambda d: yaml_config(d, "model: [unclosed\nmethod: GradDiff\n"),
      ["run.yaml", "YAML", "line 2"]),
    C("--device cuda", lambda d: run_args(d, extra=["--device", "cuda"]), ["--device cuda"], marks=no_cuda),
    C("eval --device cuda", lambda d: ["eval", "--model", str(MODEL), "--device", "cuda", "--questions",
                                       str(d / "forget.txt")], ["--device cuda"], marks=no_cuda),
    C("demo --threads 0", lambda d: ["demo", "--threads", "0", "--out", str(d / "demo")], ["--threads", ">= 1"]),
    C("SO-GradDiff hessian_interval=0", lambda d: run_args(d, "SO-GradDiff", "hessian_interval=0"),
      ["hessian_interval", ">= 1"]),
    C("NPO beta=0", lambda d: run_args(d, "NPO", "beta=0"), ["beta", "> 0"]),
    C("NPO beta<0", lambda d: run_args(d, "NPO", "beta=-1"), ["beta", "> 0"]),
    C("RMU alpha<0", lambda d: run_args(d, "RMU", "alpha=-1"), ["alpha", ">= 0"]),
    C("GradDiff retain_weight<0", lambda d: run_args(d, "GradDiff", "retain_weight=-0.5"), ["retain_weight", ">= 0"]),
    C("AdaptiveRMU beta<0", lambda d: run_args(d, "AdaptiveRMU", "beta=-5"), ["beta", "> 0"]),
    C("MRP stats_batches=0", lambda d: run_args(d, "MRP", "stats_batches=0"), ["stats_batches", ">= 1"]),
    C("SRMU stats_batches=0", lambda d: run_args(d, "SRMU", "stats_batches=0"), ["stats_batches", ">= 1"]),
    C("SIMU score_batches=0", lambda d: run_args(d, "SIMU", "score_batches=0"), ["score_batches", ">= 1"]),
    C("checkpoint state.json a list", lambda d: checkpoint(d, state=[1, 2]),
      ["out.checkpoint", "not an unlearn_kernels checkpoint"]),
    C("checkpoint state.json lacks keys", lambda d: checkpoint(d, state={"unlearn_kernels": {}, "format": 1}),
      ["state.json", "lacks", "step"]),
    C("checkpoint tensors truncated", lambda d: checkpoint(d, truncate=True), ["tensors.safetensors", "damaged"]),
    C("config.json a list", lambda d: model_folder(d, "[1, 2]"), ["config.json", "holds a list"]),
    C("config.json a string", lambda d: model_folder(d, '"llama"'), ["config.json", "holds a str"]),
]


@pytest.mark.parametrize("argv, words", CASES)
def test_user_errors_are_one_line_and_exit_2(files, capsys, argv, words):
    code = cli.main(argv(files))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("unlearn-kernels ") and ": error: " in err, err
    for word in words:
        assert word in err, err


def test_an_internal_error_shows_its_traceback_and_asks_for_a_report(files, capsys, monkeypatch):
    from unlearn_kernels import pipeline

    def broken(*a, **k):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(pipeline, "make_config", broken)
    assert cli.main(run_args(files)) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: an internal invariant broke" in err
    assert f"a bug in unlearn_kernels {unlearn_kernels.__version__}" in err.strip().splitlines()[-1]


def test_user_error_classes_are_one_family():
    from unlearn_kernels.data.loaders import DataError, DataFileNotFound
    from unlearn_kernels.errors import MissingFileError, MissingPackageError, UserError
    from unlearn_kernels.eval.multiple_choice import NonFiniteScoreError
    from unlearn_kernels.methods.checkpoint import NotACheckpointError
    from unlearn_kernels.models.folder_paths import UnsafePathError
    from unlearn_kernels.models.integrity import BrokenModelError
    from unlearn_kernels.models.output_dir import OutputPathError

    assert issubclass(UserError, ValueError)
    for cls in (DataError, DataFileNotFound, OutputPathError, UnsafePathError, BrokenModelError,
                NotACheckpointError, NonFiniteScoreError, MissingFileError, MissingPackageError):
        assert issubclass(cls, UserError), cls
    assert issubclass(MissingFileError, FileNotFoundError) and issubclass(MissingPackageError, ImportError)


def test_output_into_a_reader_that_stops_early_ends_without_a_traceback():
    """``unlearn-kernels methods RMU | head -1``: the reader is gone before the command writes."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)                      # every write now fails with EPIPE
    try:
        run = subprocess.run([sys.executable, "-m", "unlearn_kernels.cli", "methods", "RMU"], stdout=write,
                             stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert run.stderr == "" and run.returncode == 1, run.stderr
