"""Shared test setup.

Without a GPU the Triton kernels run under the interpreter, which must be switched on
before triton is imported; it handles fp32 only, so Triton is tested in fp32 on the CPU.

Tiers (markers declared in pyproject.toml): ``gpu`` tests skip without CUDA; ``slow`` tests run
only with ``--slow`` (``bash scripts/test.sh --slow``) or ``UNLEARN_KERNELS_SLOW=1``, so the
default run (CI) stays within its time; ``distributed``, ``cuda_sim`` and ``real_model`` run by
default and can be picked or left out with ``-m``.
"""

import copy
import functools
import os
import typing

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from unlearn_kernels.ops import _backend  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow")


def pytest_collection_modifyitems(config, items):
    slow = config.getoption("--slow") or os.environ.get("UNLEARN_KERNELS_SLOW") == "1"
    skip_slow = pytest.mark.skip(reason="slow tier: run with --slow (bash scripts/test.sh --slow)")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)

# Tolerances (atol, rtol) against the fp32 reference, per dtype of the inputs.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float64: (1e-12, 1e-12),
}


def backend_cases():
    """(backend, device, dtype) triples to compare against the reference."""
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        cases.append(("cpu", torch.device("cpu"), dtype))
    triton_dtypes = (torch.float32, torch.bfloat16, torch.float16) if DEVICE.type == "cuda" else (torch.float32,)
    for dtype in triton_dtypes:
        cases.append(("triton", DEVICE, dtype))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        cases.append(("cuda", torch.device("cuda"), dtype))
    return [
        pytest.param(b, dev, dt, id=f"{b}-{str(dt).split('.')[-1]}",
                     marks=([pytest.mark.gpu] if dev.type == "cuda" else []) + [pytest.mark.skipif(
                         not (dev.type != "cuda" or torch.cuda.is_available())
                         or not _backend.available(b, dev, dt),
                         reason=f"backend {b} unavailable on {dev.type} here")])
        for b, dev, dt in cases
    ]


def assert_close(actual, expected, dtype, scale=1.0):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol)


def device_of(backend: str) -> torch.device:
    """Where a backend runs in these tests: cuda/triton on the GPU (triton on the CPU under the
    interpreter when there is none), cpu/torch on the CPU."""
    return DEVICE if backend in ("cuda", "triton") else torch.device("cpu")


# Every backend in fp32 (the dtype Triton's interpreter handles), skipped where it cannot run.
FP32_BACKENDS = [pytest.param(b, marks=([pytest.mark.gpu] if b == "cuda" else []) + [
                     pytest.mark.skipif(not _backend.available(b, device_of(b), torch.float32),
                                        reason=f"{b} unavailable here")])
                 for b in ("cpu", "torch", "triton", "cuda")]


def wait_for_checkpoint_step(run, state, step: int, timeout: float = 300.0) -> None:
    """Poll the checkpoint ``state`` (state.json) of the running process ``run`` until it records
    ``step`` or later, ``run`` exits, or ``timeout`` seconds pass."""
    import json
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and run.poll() is None:
        try:
            if json.loads(state.read_text())["step"] >= step:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)




def benchmark_script(name: str):
    """The module of ``benchmarks/NAME.py`` (benchmarks is not a package), loaded from its file."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def our_png_size(path) -> tuple[int, int]:
    """``(width, height)`` of the plot at ``path``, after checking that it is a PNG carrying our
    ``Software: unlearn_kernels <version>`` marker (read by PIL, not by the code under test)."""
    from PIL import Image

    import unlearn_kernels

    with Image.open(path) as image:
        assert image.format == "PNG", image.format
        assert image.info.get("Software") == f"unlearn_kernels {unlearn_kernels.__version__}", image.info
        image.load()                 # the whole image decodes: the file is complete
        return image.size

@pytest.fixture(scope="session")
def shipped():
    """The shipped tiny model, read once per session: ``shipped()`` gives a fresh copy of
    ``(model, tokenizer)`` on every call (a test or a module may train it), ``shipped("oracle")``
    the oracle retrained without the default split's forget facts."""
    from unlearn_kernels.models import tiny

    @functools.cache
    def read(which: str):
        return tiny.load({"model": tiny.ASSET_DIR, "oracle": tiny.ORACLE_DIR}[which])

    def load(which: str = "model"):
        model, tokenizer = read(which)
        return copy.deepcopy(model), tokenizer
    return load


@pytest.fixture(scope="session")
def entangled_bench():
    """``entangled_bench(overlap)``: the embedded entangled-knowledge benchmark at ``overlap`` (default:
    the generator's), made once per overlap and session; tests only read it."""
    from unlearn_kernels.data import entangled

    @functools.cache
    def generate(overlap: float | None = None):
        return entangled.generate() if overlap is None else entangled.generate(overlap)
    return generate


@pytest.fixture()
def no_loading(monkeypatch):
    """Any model load fails the test: refusals must come before it (``models.io._load_local`` is
    what every loader ends in)."""
    import unlearn_kernels.models.io as io

    def fail(*a, **k):
        raise AssertionError("a model was loaded before the outputs were checked")

    monkeypatch.setattr(io, "_load_local", fail)


def _bounds(node) -> dict:
    """The bounds (ge, gt, le, lt) a field's type declares, looked for through Optional and Annotated."""
    found = {}
    for extra in getattr(node, "__metadata__", ()):
        for item in getattr(extra, "metadata", None) or [extra]:
            found.update({k: getattr(item, k) for k in ("ge", "gt", "le", "lt") if getattr(item, k, None) is not None})
    for arg in typing.get_args(node):
        found = found or _bounds(arg)
    return found


def bad_values(config_class, name: str) -> list:
    """Values the field ``name`` of a config class (``config_types.config_dataclass``) must refuse,
    read from its type and its declared range."""
    info = config_class.__pydantic_fields__[name]
    kind, text = info.annotation, str(info.annotation)
    if "Literal" in text:
        bad = ["nope", 3]
    elif kind is bool:
        bad = ["maybe", 2, [True]]
    elif "list" in text:
        bad = [[1], [""], 5] if "str" in text else [["fast"], [True], 5]
    elif "tuple" in text:
        bad = ["0.9", (0.1, 0.2, 0.3), ("a", "b")]
    elif "int" in text:
        bad = [1.5, True, "x", "1.5"]
    elif "float" in text:
        bad = ["fast", True, float("nan"), float("inf")]
    else:
        bad = []
    bounds = _bounds(typing.Annotated[kind, *info.metadata]) if info.metadata else _bounds(kind)
    outside = {"ge": lambda b: b - 1, "gt": lambda b: b, "le": lambda b: b + 1, "lt": lambda b: b}
    bad += [outside[k](b) for k, b in bounds.items()]
    if "tuple" in text and bounds:
        bad = [*bad[:3], *((v, v) for v in bad[3:])]
    return bad
