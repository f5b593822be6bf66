"""Package plumbing: backends, the build, running without the extension, the CLI, opcheck of
the Triton-backed ops."""

import os
import subprocess
import sys

import pytest
import torch

import unlearn_kernels as uk
from unlearn_kernels.cli import main
from unlearn_kernels.ops import _backend


def test_backends_report():
    report = uk.backends("cpu")
    assert set(report) == {"cuda", "triton", "cpu", "torch"}
    assert report["torch"] and not report["cuda"]
    assert report["cpu"] == uk.compiled()


def test_auto_picks_the_fastest_available():
    expected_cpu = "cpu" if uk.compiled() else "torch"
    assert _backend.resolve("auto", torch.device("cpu"), torch.float32) == expected_cpu
    if torch.cuda.is_available():
        assert _backend.resolve("auto", torch.device("cuda"), torch.bfloat16) in ("cuda", "triton")
    assert _backend.resolve("auto", torch.device("cuda"), torch.float64) == "torch"


@pytest.mark.skipif(os.environ.get("UNLEARN_KERNELS_CUDA") != "1", reason="only when the CUDA build is demanded")
def test_cuda_sources_were_compiled():
    assert uk.compiled_with_cuda()


def test_works_without_the_extension():
    code = (
        "import sys; sys.modules['unlearn_kernels._C'] = None\n"
        "import torch, unlearn_kernels as uk\n"
        "assert not uk.compiled() and uk.backends('cpu')['torch'] and not uk.backends('cpu')['cpu']\n"
        "h = torch.randn(3, 5, requires_grad=True)\n"
        "uk.ops.misdirection_loss(h, torch.randn(5)).backward()\n"
        "print('ok', h.grad.shape)\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ok torch.Size([3, 5])" in result.stdout


@pytest.mark.skipif(not _backend.available("triton", torch.device("cpu"), torch.float32)
                    or torch.cuda.is_available(), reason="Triton interpreter unavailable")
def test_opcheck_triton_ops():
    from unlearn_kernels.ops.misdirection import _masked_edit_triton, _misdirection_triton
    from unlearn_kernels.ops.moments import _feature_scores_triton, _moments_triton

    h = torch.randn(9, 13)
    torch.library.opcheck(_misdirection_triton, (h, torch.randn(13), torch.rand(13), torch.randn(9, 13),
                                                 torch.rand(9) > 0.5, 0.1, True))
    torch.library.opcheck(_masked_edit_triton, (h, torch.rand(13), torch.randn(13), 0.5, None))
    torch.library.opcheck(_moments_triton, (h, torch.rand(9) > 0.5))
    torch.library.opcheck(_feature_scores_triton, tuple(torch.rand(13) for _ in range(4)) + (1e-6,))


def test_cli_info_and_selfcheck(capsys):
    assert main(["info"]) == 0
    assert "backends on cpu" in capsys.readouterr().out
    assert main(["selfcheck"]) == 0
    out = capsys.readouterr().out
    assert "| torch |" not in out and ("| cpu | cpu | float32 |" in out or not uk.compiled())
    assert "FAIL" not in out


def test_cli_bench_small(capsys):
    assert main(["bench", "--device", "cpu", "--dtype", "float32", "--shapes", "64x32", "--repeats", "2",
                 "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "misdirection SRMU fwd+bwd" in out and "floor ms" in out


def test_cli_rejects_bad_shape(capsys):
    assert main(["bench", "--shapes", "12by3"]) == 2
    assert capsys.readouterr().err == ("unlearn-kernels bench: error: --shapes takes ROWSxFEATURES such as 16384x4096, "
                                       "got ['12by3']\n")
