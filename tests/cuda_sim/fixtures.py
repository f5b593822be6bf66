"""Shared pieces of the cuda_sim tests: the compiled harness (one per session), running a
launcher under two adversarial schedules, and the worst error per kernel for the report."""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict

import pytest
import torch

from . import build
from .ops import Sim

WORST: dict[str, float] = defaultdict(float)  # "op dtype" -> worst |got - ref| / (atol + rtol |ref|)


def require_toolchain() -> None:
    if build.compiler() is None or not shutil.which("objdump") or not shutil.which("objcopy"):
        pytest.skip("the CUDA CPU harness needs g++, objdump and objcopy (binutils); not found")


@pytest.fixture(scope="session")
def sim():
    require_toolchain()
    s = Sim()
    yield s
    report = os.environ.get("UK_CUDA_SIM_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump({"worst_error_over_tolerance": dict(sorted(WORST.items())),
                       "launches": s.launch_log()}, f, indent=1)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of t (NaN-safe equality)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def both_schedules(sim: Sim, run, device: str = "sm90_3sm"):
    """run() under the lowest-thread-first and the highest-thread-first schedules (blocks in
    opposite orders, cp.async copies late and early); the results must agree bit for bit, since
    every kernel promises a fixed summation order. Returns the first run's results."""
    sim.configure("lowest_first", device)
    first = run()
    sim.configure("highest_first", device)
    second = run()
    sim.configure()
    flat = lambda r: [r] if isinstance(r, torch.Tensor) else list(r)  # noqa: E731
    for a, b in zip(flat(first), flat(second)):
        assert torch.equal(bits(a), bits(b)), "the result depends on the thread schedule (a race)"
    return first
