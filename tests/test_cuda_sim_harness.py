"""The CUDA CPU harness itself (tests/cuda_sim): its CUDA semantics (bf16/fp16 rounding,
shuffles with masks and widths, votes, the block barrier, launches CUDA refuses, undefined
behaviour it reports), and that it fails on deliberately broken copies of the real kernels:
a removed __syncthreads(), a tail guard off by one, shuffles with a wrong width or mask, and
bf16 rounding by truncation."""

import ctypes
import re
from pathlib import Path

import pytest
import torch

from unlearn_kernels.ops.hessian import _hessian_ema_torch
from unlearn_kernels.ops.misdirection import _masked_edit_torch, _misdirection_torch
from unlearn_kernels.ops.neuron_scores import _neuron_scores_torch

from conftest import assert_close
from cuda_sim.fixtures import both_schedules, require_toolchain, sim  # noqa: F401  (fixture)
from cuda_sim.ops import Sim, SimError, guarded_input

pytestmark = pytest.mark.cuda_sim

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def ptr(t):
    return ctypes.c_void_p(t.data_ptr())


# ---- bf16 / fp16 conversions ---------------------------------------------------------------

def conversion_inputs() -> torch.Tensor:
    """Every exponent and sign with mantissas at and around each rounding boundary of bf16 and
    fp16 (ties, one below and above), subnormals, the overflow edges, inf and NaN, plus random
    bit patterns."""
    sign_exp = torch.arange(512, dtype=torch.int64) << 23
    low = torch.tensor([0, 1, 2, 0x7fff, 0x8000, 0x8001, 0xffff, 0x10000, 0x17fff, 0x18000, 0x18001,
                        0xfff, 0x1000, 0x1001, 0x1fff, 0x2000, 0x2001, 0x3000, 0x7fffff, 0x7f8000,
                        0x7fe000, 0x400000, 0x3fffff], dtype=torch.int64)
    structured = (sign_exp[:, None] | low[None, :]).reshape(-1)
    random = torch.randint(0, 2**32, (1 << 18,), generator=torch.Generator().manual_seed(0))
    edges = torch.tensor([0x477fefff, 0x477ff000, 0x477ff001, 0x33000000, 0x33000001, 0x387fffff,
                          0x38800000, 0x7f7fffff, 0x7f7f8000, 0x7f800000, 0x7fc00000], dtype=torch.int64)
    bits = torch.cat([structured, random, edges]) & 0xffffffff
    return ((bits + 2**31) % 2**32 - 2**31).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("kind", ["bf16", "fp16"])
def test_float_to_16_bits_rounds_to_nearest_even(sim, kind):  # noqa: F811
    x = conversion_inputs().contiguous()
    out = torch.empty(x.numel(), dtype=torch.int16)
    fn = sim.lib.uk_sim_float_to_bf16 if kind == "bf16" else sim.lib.uk_sim_float_to_half
    fn(ptr(x), ptr(out), x.numel())
    ref = x.to(torch.bfloat16 if kind == "bf16" else torch.float16)
    got = out.view(ref.dtype)
    nan = torch.isnan(x)
    assert torch.isnan(got[nan]).all()
    assert torch.equal(got[~nan].view(torch.int16), ref[~nan].view(torch.int16))
    back = torch.empty(x.numel(), dtype=torch.float32)
    (sim.lib.uk_sim_bf16_to_float if kind == "bf16" else sim.lib.uk_sim_half_to_float)(ptr(out), ptr(back), x.numel())
    assert torch.equal(back[~nan], ref[~nan].float())


# ---- warp collectives ----------------------------------------------------------------------

def shuffle(sim, mode, mask, b, width, threads=32):  # noqa: F811
    src = guarded_input(torch.arange(threads, dtype=torch.float32))
    out = guarded_input(torch.full((threads,), -7.0))
    sim.lib.uks_probe_shuffle(threads, {"idx": 0, "up": 1, "down": 2, "xor": 3}[mode], mask, b, width,
                              ptr(src), ptr(out))
    error = sim.take_error()
    if error:
        raise SimError(error)
    return out.tolist()


NAN = float("nan")
FULL = 0xFFFFFFFF


@pytest.mark.parametrize("mode,mask,b,width,expected", [
    ("xor", FULL, 1, 32, [l ^ 1 for l in range(32)]),
    ("xor", FULL, 16, 16, [l if l < 16 else l - 16 for l in range(32)]),  # later group: own value
    ("up", FULL, 3, 32, [l if l < 3 else l - 3 for l in range(32)]),
    ("up", FULL, 2, 8, [l if l % 8 < 2 else l - 2 for l in range(32)]),
    ("down", FULL, 3, 16, [l if l % 16 > 12 else l + 3 for l in range(32)]),
    ("idx", FULL, 3, 8, [(l & ~7) | 3 for l in range(32)]),
    ("idx", FULL, 35, 32, [3] * 32),  # the source lane is taken mod 32
    ("xor", 0x0000FFFF, 1, 32, [l ^ 1 if l < 16 else -1 for l in range(32)]),
    ("xor", 0x0000FFFF, 16, 32, [NAN if l < 16 else -1 for l in range(32)]),  # source outside the mask
    ("down", 0x0F0F0F0F, 4, 32, [(NAN if (l + 4) % 32 // 4 % 2 else l + 4) if l % 8 < 4 else -1
                                 for l in range(32)][:28] + [l if l % 8 < 4 else -1 for l in range(28, 32)]),
])
def test_shuffle_semantics(sim, mode, mask, b, width, expected):  # noqa: F811
    got = shuffle(sim, mode, mask, b, width)
    assert [("nan" if g != g else g) for g in got] == [("nan" if e != e else e) for e in expected]


def test_shuffles_stay_within_their_warp(sim):  # noqa: F811
    assert shuffle(sim, "xor", FULL, 1, 32, threads=64) == [t ^ 1 for t in range(64)]
    assert shuffle(sim, "down", FULL, 1, 32, threads=64) == [t if t % 32 == 31 else t + 1 for t in range(64)]


def test_shuffle_width_must_be_a_power_of_two(sim):  # noqa: F811
    with pytest.raises(SimError, match="power of two"):
        shuffle(sim, "xor", FULL, 1, 12)


def test_ballot_and_match_any(sim):  # noqa: F811
    pred = guarded_input(torch.tensor([int(l % 3 == 0) for l in range(32)], dtype=torch.int32))
    key = guarded_input(torch.tensor([l // 5 for l in range(32)], dtype=torch.int64))
    out = guarded_input(torch.zeros(64, dtype=torch.int32))
    mask = 0x7FFFFFFF  # lane 31 sits out
    sim.lib.uks_probe_vote(mask, ptr(pred), ptr(key), ptr(out))
    assert not sim.take_error()
    got = [v & 0xFFFFFFFF for v in out.tolist()]
    ballot = sum(1 << l for l in range(31) if l % 3 == 0)
    for l in range(31):
        assert got[2 * l] == ballot
        assert got[2 * l + 1] == sum(1 << m for m in range(31) if m // 5 == l // 5)


# ---- the block barrier and undefined behaviour ---------------------------------------------

@pytest.mark.parametrize("schedule", ["lowest_first", "highest_first", "random"])
def test_barrier_orders_shared_memory(sim, schedule):  # noqa: F811
    x = guarded_input(torch.arange(256, dtype=torch.float32))
    out = guarded_input(torch.zeros(256))
    sim.configure(schedule, seed=7)
    try:
        sim.lib.uks_probe_reverse(256, 1, ptr(x), ptr(out))
        assert not sim.take_error()
        assert out.tolist() == list(range(255, -1, -1))
        sim.lib.uks_probe_reverse(256, 0, ptr(x), ptr(out))  # without the barrier
        assert not sim.take_error()
        assert out.tolist() != list(range(255, -1, -1))  # a read before its write shows
    finally:
        sim.configure()


@pytest.mark.parametrize("kind,message", [
    (0, "exited"),                     # __syncthreads() in divergent code
    (1, "deadlock"),                   # __syncwarp() waiting for lanes held at __syncthreads()
    (2, "does not contain the calling lane"),
    (3, "__trap"),
])
def test_undefined_behaviour_is_reported(sim, kind, message):  # noqa: F811
    out = guarded_input(torch.zeros(64))
    sim.lib.uks_probe_hazard(kind, ptr(out))
    assert message in sim.take_error()
    back = guarded_input(torch.zeros(64))
    sim.lib.uks_probe_reverse(64, 1, ptr(out), ptr(back))  # the next launch runs
    assert not sim.take_error()


@pytest.mark.parametrize("grid,block,smem,message", [
    (0, (32, 1), 0, "invalid configuration"),
    (1, (33, 33), 0, "invalid configuration"),
    (1, (64, 1), 64 << 10, "dynamic shared memory"),
])
def test_launches_cuda_refuses(sim, grid, block, smem, message):  # noqa: F811
    out = guarded_input(torch.zeros(64))
    sim.lib.uks_probe_launch(grid, *block, smem, ptr(out))
    assert message in sim.take_error()


# ---- mutation checks: broken copies of the real kernels must fail ---------------------------

def mutate(path: str, old: str, new: str, count: int = 1) -> dict[str, str]:
    text = (CSRC / path).read_text()
    assert text.count(old) >= count, f"{old!r} not in {path}: update the mutation"
    return {path: text.replace(old, new, count)}


@pytest.fixture(scope="module")
def mutants():
    require_toolchain()
    return {}


def mutant(mutants, name, overrides) -> Sim:
    if name not in mutants:
        mutants[name] = Sim(overrides)
    return mutants[name]


def misdirection_case(dtype=torch.float32, n=140, d=1029):
    g = torch.Generator().manual_seed(0)
    h = guarded_input(torch.randn(n, d, generator=g).to(dtype))
    control = guarded_input(torch.rand(d, generator=g) * 0.2)
    importance = guarded_input(torch.rand(d, generator=g))
    mask = guarded_input(torch.rand(n, generator=g) > 0.3)
    scale = 1.0 / (int(mask.sum()) * d)
    return (h, control, importance, None, mask, scale, True)


def test_mutation_removed_syncthreads_in_block_reduction(sim, mutants):  # noqa: F811
    """block_sum without the barrier between the warp sums and their reduction. With the lowest
    warps first, warp 0 reads the other warps' slots before they are written (NaN-poisoned
    shared memory); with the highest first the race stays hidden, so the result depends on the
    schedule, which the two-schedule comparison of every kernel test catches as well."""
    broken = mutant(mutants, "no_sync", mutate(
        "cuda/misdirection.cu", "  if (tid % 32 == 0) warp_sums[tid / 32] = v;\n  __syncthreads();\n",
        "  if (tid % 32 == 0) warp_sums[tid / 32] = v;\n"))
    args = misdirection_case()
    ref_loss, _ = _misdirection_torch(*args)
    loss, _ = sim.misdirection_fwd_bwd(*args)
    assert_close(loss, ref_loss, torch.float32)
    with pytest.raises(AssertionError):
        assert_close(broken.misdirection_fwd_bwd(*args)[0], ref_loss, torch.float32)
    with pytest.raises(AssertionError, match="depends on the thread schedule"):
        both_schedules(broken, lambda: broken.misdirection_fwd_bwd(*args))


def test_mutation_tail_guard_off_by_one(sim, mutants):  # noqa: F811
    """hessian_ema_kernel updating one element past the end: the guard zone behind hess changes."""
    broken = mutant(mutants, "tail", mutate("cuda/hessian.cu", "if (i >= args.end) continue;",
                                            "if (i > args.end) continue;"))
    g = torch.Generator().manual_seed(1)
    for numel in (1029, 7):
        hess0 = torch.rand(numel, generator=g)
        a = guarded_input(torch.randn(numel, generator=g))
        hess, ref = hess0.clone(), hess0.clone()
        sim.hessian_ema_(hess, a, None, 0.9)
        _hessian_ema_torch(ref, a, None, 0.9)
        assert_close(hess, ref, torch.float32)
        with pytest.raises(SimError, match="outside its output buffer"):
            broken.hessian_ema_(hess0.clone(), a, None, 0.9)


def test_mutation_shuffle_wrong_width(sim, mutants):  # noqa: F811
    """group_sum of the row scores with width 16: the offset-16 step gives each lane its own
    value back (PTX: a source lane in a later segment), so the halves are never combined."""
    broken = mutant(mutants, "width", mutate("cuda/neuron_scores.cu",
                                             "v += __shfl_xor_sync(0xffffffffu, v, offset);",
                                             "v += __shfl_xor_sync(0xffffffffu, v, offset, 16);"))
    g = torch.Generator().manual_seed(2)
    w, hf = torch.randn(12, 1029, generator=g), torch.rand(12, 1029, generator=g)
    ref, _ = _neuron_scores_torch(w, hf, None, 0)
    got, _ = sim.neuron_scores(w, hf, None, 0)
    assert_close(got, ref, torch.float32)
    bad, _ = broken.neuron_scores(w, hf, None, 0)
    assert not torch.allclose(bad, ref, rtol=1e-3)


def test_mutation_shuffle_wrong_mask(sim, mutants):  # noqa: F811
    """block_sum's first shuffle with a half-warp mask: lanes 16-31 call a shuffle whose mask
    leaves them out, which CUDA leaves undefined; the harness stops the launch."""
    broken = mutant(mutants, "mask", mutate(
        "cuda/misdirection.cu",
        "  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);\n  const int tid",
        "  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0x0000ffffu, v, o);\n  const int tid"))
    with pytest.raises(SimError, match="does not contain the calling lane"):
        broken.misdirection_fwd_bwd(*misdirection_case())


def test_mutation_bf16_rounding_by_truncation(sim, mutants):  # noqa: F811
    """from_float<bf16> truncating instead of rounding to nearest even: about half of the bf16
    outputs of masked_edit move by one ulp. That is within the bf16 tolerance, so the check is
    bitwise: the real kernel matches the reference (same fp32 operations, one rounding) on
    practically every element, the truncating one on about half."""
    broken = mutant(mutants, "truncate", mutate(
        "include/cuda_dtype.cuh", "__nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }",
        "__nv_bfloat16 from_float(float v) { return __float2bfloat16_rz(v); }"))
    g = torch.Generator().manual_seed(3)
    n, d = 96, 264
    h = guarded_input(torch.randn(n, d, generator=g).to(torch.bfloat16))
    importance, control = guarded_input(torch.rand(d, generator=g)), guarded_input(torch.randn(d, generator=g))
    ref = _masked_edit_torch(h, importance, control, 0.7, None)

    def agreement(s):
        out = s.masked_edit(h, importance, control, 0.7, None)
        assert_close(out, ref, torch.bfloat16)  # both within tolerance...
        return (out.view(torch.int16) == ref.view(torch.int16)).double().mean().item()

    assert agreement(sim) > 0.999
    assert agreement(broken) < 0.8  # ...but only the real one rounds as CUDA does
