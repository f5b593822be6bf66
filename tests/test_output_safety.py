"""What ``unlearn-kernels unlearn`` may write, and that a crash or a diverged run never costs a model."""

import json
import os
import stat
from pathlib import Path

import pytest

from unlearn_kernels import cli
from unlearn_kernels.data import entangled
from unlearn_kernels.models import output_dir, tiny
from unlearn_kernels.models.output_dir import OutputPathError, check_output_path

MODEL = tiny.ASSET_DIR


@pytest.fixture()
def data(tmp_path):
    bench = entangled.generate(0.25)
    (tmp_path / "forget.txt").write_text("\n".join(bench.corpus(bench.forget_facts())))
    (tmp_path / "retain.txt").write_text("\n".join(bench.corpus(bench.retain_facts())))
    return tmp_path


def unlearn(capsys, data, out, *extra, model=MODEL, method="GradAscent"):
    code = cli.main(["unlearn", "--model", str(model), "--method", method, "--forget", str(data / "forget.txt"),
                     "--retain", str(data / "retain.txt"), "--out", str(out), "--set", "steps=2",
                     "--set", "progress=false", "--set", "update=['layers.1.mlp.*']", *extra])
    captured = capsys.readouterr()
    return code, captured.err


def test_a_folder_of_user_files_is_refused_before_any_work(capsys, data, no_loading):
    out = data / "notes"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    code, err = unlearn(capsys, data, out)
    assert code == 2 and "not an output of unlearn_kernels" in err and len(err.strip().splitlines()) == 1
    assert (out / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("where", ["model", "inside-model", "contains-model", "forget-file", "a-file"])
def test_inputs_and_files_are_never_targets(capsys, data, tmp_path, where, no_loading):
    model = tmp_path / "models" / "base"
    model.mkdir(parents=True)
    for f in Path(MODEL).iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    out = {"model": model, "inside-model": model / "out", "contains-model": tmp_path / "models",
           "forget-file": data / "forget.txt", "a-file": data / "retain.txt"}[where]
    before = sorted(p.name for p in model.iterdir())
    code, err = unlearn(capsys, data, out, model=model)
    assert code == 2 and str(out.resolve()) in err, err
    assert sorted(p.name for p in model.iterdir()) == before
    assert (data / "forget.txt").stat().st_size > 0


def test_a_previous_output_is_replaced_only_with_overwrite(capsys, data):
    out = data / "out"
    assert unlearn(capsys, data, out)[0] == 0
    report = json.loads((out / "report.json").read_text())
    assert report["unlearn_kernels"]["report_schema"] == 1
    code, err = unlearn(capsys, data, out)
    assert code == 2 and "--overwrite" in err
    (out / "report.json").write_text(json.dumps({**report, "marker_check": True}))
    assert unlearn(capsys, data, out, "--overwrite")[0] == 0
    assert "marker_check" not in json.loads((out / "report.json").read_text())   # really replaced
    assert not list(data.glob(".out.unlearn-tmp-*"))                            # nothing left beside it


def test_saved_files_follow_the_umask(capsys, data):
    out = data / "out"
    old = os.umask(0o022)
    try:
        assert unlearn(capsys, data, out)[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {0o644}


def test_unwritable_or_full_targets_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(output_dir.os, "access", lambda *a: False)
    with pytest.raises(OutputPathError, match="not a writable folder"):
        check_output_path(tmp_path / "out")
    monkeypatch.undo()
    monkeypatch.setattr(output_dir.shutil, "disk_usage", lambda p: type("U", (), {"free": 10})())
    with pytest.raises(OutputPathError, match="GiB free"):
        check_output_path(tmp_path / "out", needed_bytes=1000)


def test_stale_staging_of_dead_runs_is_removed_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    dead = tmp_path / ".out.unlearn-tmp-1-abcd"
    dead.mkdir()
    (dead / output_dir.STAGING_FILE).write_text("999999999")
    foreign = tmp_path / ".out.unlearn-tmp-someone-elses"
    foreign.mkdir()
    aside = tmp_path / ".out.unlearn-tmp-2-old-ef01"          # an old output set aside, new one never came
    aside.mkdir()
    (aside / "report.json").write_text("{}")
    (aside / output_dir.STAGING_FILE).write_text("999999999")
    removed = output_dir.remove_stale_staging(out)
    assert removed == [dead] and foreign.exists() and (out / "report.json").exists()


def test_swap_is_atomic_exchange_on_linux(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("new")
    (b / "x").write_text("old")
    assert output_dir._exchange(a, b)
    assert (b / "x").read_text() == "new" and (a / "x").read_text() == "old"


@pytest.mark.parametrize("method, setting", [("GradAscent", "lr=.inf"), ("GradAscent", "lr=nan"),
                                             ("GradDiff", "retain_weight=-.inf"), ("RMU", "steering=.inf")])
def test_non_finite_settings_are_refused_up_front(capsys, data, method, setting, no_loading):
    code, err = unlearn(capsys, data, data / "out", "--set", setting, method=method)
    assert code == 2 and "not a finite number" in err and setting.split("=")[0] in err, err
    assert not (data / "out").exists()


def test_unknown_settings_list_the_valid_ones(capsys, data, no_loading):
    code, err = unlearn(capsys, data, data / "out", "--set", "stepz=3")
    assert code == 2 and "stepz" in err and "steps" in err and len(err.strip().splitlines()) == 1


def test_a_diverging_run_exits_1_and_writes_nothing(capsys, data):
    out = data / "out"
    code, err = unlearn(capsys, data, out, "--set", "lr=1e30", "--set", "steps=6")
    assert code == 1 and "step" in err and ("loss term" in err or "non-finite" in err), err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(data.glob(".out.unlearn-tmp-*"))
