"""The CUDA ops run on the CPU execution harness: each function takes the arguments of the
compiled op of the same name (csrc/ops/*.cpp, the signature of the ``_*_torch`` references in
unlearn_kernels/ops) and prepares the launcher call as csrc/ops does, with CPU tensors as the
"device" memory.

Memory is laid out so that the kernels' mistakes show: every buffer a launcher receives sits
between guard zones of NaN (or 0xff bytes), outputs and workspaces start as NaN, and after the
call the guards must be intact (an out-of-bounds write fails the call; an out-of-bounds read
brings a NaN into the result). Errors the harness detects (races it can see, barrier
divergence, deadlocks, bad launches) are raised as :class:`SimError`.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import build

DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
GUARD = 64  # elements of guard zone on each side of a buffer (a multiple of 16 bytes)
SCHEDULES = {"lowest_first": 0, "highest_first": 1, "random": 2}
DEVICES = {"sm90_3sm": 0, "h100": 1, "sm75": 2}


class SimError(RuntimeError):
    """A launch the harness refused or found undefined."""


@dataclass
class _Guarded:
    buffer: Tensor
    view: Tensor

    def intact(self) -> bool:
        raw = self.buffer.view(torch.uint8)
        edge = GUARD * self.buffer.element_size()
        return bool((raw[:edge] == 0xff).all() and (raw[-edge:] == 0xff).all())


def _guarded(shape, dtype: torch.dtype, values: Optional[Tensor] = None, row_pad: int = 0,
             offset: int = 0) -> _Guarded:
    """A tensor of ``shape`` inside a buffer of 0xff bytes (NaN for floating types), optionally
    with ``row_pad`` extra (poisoned) columns per row and shifted by ``offset`` elements."""
    shape = tuple(shape)
    strides, span = [], 1
    for size in reversed(shape):
        strides.insert(0, span)
        span *= size + (row_pad if len(strides) == 1 else 0)
    buffer = torch.empty(2 * GUARD + offset + max(span, 1), dtype=dtype)
    buffer.view(torch.uint8).fill_(0xff)
    view = buffer[GUARD + offset:].as_strided(shape, strides)
    if values is not None:
        view.copy_(values)
    return _Guarded(buffer, view)


def _ptr(t: Optional[Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


I64, F32, F64, INT, P = ctypes.c_int64, ctypes.c_float, ctypes.c_double, ctypes.c_int, ctypes.c_void_p

_SIGNATURES = {
    "uks_misdirection_workspace_floats": (I64, [I64, I64]),
    "uks_misdirection_fwd_bwd": (None, [INT, P, I64, P, P, P, I64, P, I64, I64, F32, P, P, P]),
    "uks_masked_edit": (None, [INT, P, I64, P, P, F32, P, I64, I64, P]),
    "uks_masked_moments_workspace_floats": (I64, [I64, I64]),
    "uks_masked_moments": (None, [INT, P, I64, P, P, I64, I64, P, P, P, P]),
    "uks_feature_scores": (None, [P, P, P, P, F32, I64, P]),
    "uks_low_rank_tensor_core_ok": (INT, [INT, P, I64, I64, I64, I64]),
    "uks_low_rank_project_tensor_core": (None, [INT, P, I64, P, I64, I64, I64, I64, F32, P, P]),
    "uks_low_rank_project_generic": (None, [INT, P, I64, P, I64, I64, I64, F32, P, P]),
    "uks_hessian_ema": (None, [INT, P, INT, P, P, I64, F32, F32]),
    "uks_disruption_mask": (None, [INT, P, P, F32, P, I64, P]),
    "uks_neuron_scores_workspace_floats": (I64, [I64, I64, INT]),
    "uks_neuron_scores": (None, [INT, P, I64, INT, P, I64, P, I64, I64, I64, INT, P, P, P]),
    "uks_class_means_workspace_bytes": (I64, [I64, I64, I64]),
    "uks_class_means": (None, [INT, P, I64, P, I64, I64, I64, P, P, P]),
    "uks_masked_sophia_step": (None, [I64, P, P, P, P, P, P, P, P, P, P, F64, F64, F64, F64, F64, F64]),
    "uks_probe_shuffle": (None, [INT, INT, ctypes.c_uint, INT, INT, P, P]),
    "uks_probe_vote": (None, [ctypes.c_uint, P, P, P]),
    "uks_probe_reverse": (None, [INT, INT, P, P]),
    "uks_probe_hazard": (None, [INT, P]),
    "uks_probe_launch": (None, [ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_size_t, P]),
    "uk_sim_set_schedule": (None, [INT, ctypes.c_ulonglong]),
    "uk_sim_set_device": (INT, [INT]),
    "uk_sim_take_error": (INT, [ctypes.c_char_p, ctypes.c_size_t]),
    "uk_sim_launch_log": (ctypes.c_size_t, [ctypes.c_char_p, ctypes.c_size_t]),
    "uk_sim_float_to_bf16": (None, [P, P, ctypes.c_size_t]),
    "uk_sim_float_to_half": (None, [P, P, ctypes.c_size_t]),
    "uk_sim_bf16_to_float": (None, [P, P, ctypes.c_size_t]),
    "uk_sim_half_to_float": (None, [P, P, ctypes.c_size_t]),
}


class Sim:
    """The harness library with the ops on top. ``overrides``: see build.build."""

    def __init__(self, overrides: dict[str, str] | None = None):
        self.lib = build.load(overrides)
        for name, (res, args) in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.restype, fn.argtypes = res, args
        self.configure()

    # ---- control ------------------------------------------------------------------------

    def configure(self, schedule: str = "lowest_first", device: str = "sm90_3sm", seed: int = 0):
        self.lib.uk_sim_set_schedule(SCHEDULES[schedule], seed)
        assert self.lib.uk_sim_set_device(DEVICES[device]) == 0
        return self

    def take_error(self) -> str:
        buf = ctypes.create_string_buffer(8192)
        code = self.lib.uk_sim_take_error(buf, len(buf))
        return buf.value.decode() if code else ""

    def _done(self, *guarded: _Guarded) -> None:
        error = self.take_error()
        if error:
            raise SimError(error)
        for g in guarded:
            if g is not None and not g.intact():
                raise SimError("a kernel wrote outside its output buffer (guard zone changed)")

    def launch_log(self) -> dict[str, int]:
        size = self.lib.uk_sim_launch_log(None, 0)
        buf = ctypes.create_string_buffer(size)
        self.lib.uk_sim_launch_log(buf, size)
        out = {}
        for line in buf.value.decode().splitlines():
            count, name = line.split("\t", 1)
            name = name.split("Kernel = ", 1)[-1].rstrip("]")  # from __PRETTY_FUNCTION__
            out[name.replace("{anonymous}::", "")] = int(count)
        return out

    # ---- misdirection.cu ----------------------------------------------------------------

    def misdirection_fwd_bwd(self, h: Tensor, control, importance, anchor, token_mask,
                             scale: float, need_grad: bool) -> tuple[Tensor, Tensor]:
        n, d = h.shape
        ws = _guarded((max(1, self.lib.uks_misdirection_workspace_floats(n, d)),), torch.float32)
        loss = _guarded((), torch.float32)
        grad = _guarded((n, d), h.dtype) if need_grad else None
        self.lib.uks_misdirection_fwd_bwd(
            DTYPES[h.dtype], _ptr(h), h.stride(0), _ptr(control), _ptr(importance), _ptr(anchor),
            anchor.stride(0) if anchor is not None else 0, _ptr(token_mask), n, d, scale,
            _ptr(loss.view), _ptr(grad.view) if grad is not None else None, _ptr(ws.view))
        self._done(ws, loss, grad)
        return loss.view.clone(), grad.view.clone() if grad is not None else h.new_empty(0)

    def masked_edit(self, h: Tensor, importance: Tensor, control: Tensor, alpha: float,
                    token_mask) -> Tensor:
        n, d = h.shape
        out = _guarded((n, d), h.dtype)
        self.lib.uks_masked_edit(DTYPES[h.dtype], _ptr(h), h.stride(0), _ptr(importance),
                                 _ptr(control), alpha, _ptr(token_mask), n, d, _ptr(out.view))
        self._done(out)
        return out.view.clone()

    # ---- moments.cu ---------------------------------------------------------------------

    def masked_moments(self, x: Tensor, token_mask) -> tuple[Tensor, Tensor, Tensor]:
        n, d = x.shape
        ws = _guarded((max(1, self.lib.uks_masked_moments_workspace_floats(n, d)),), torch.float32)
        count = _guarded((), torch.int64)
        mean, m2 = _guarded((d,), torch.float32), _guarded((d,), torch.float32)
        pivot = None
        if token_mask is not None and n > 0:
            pivot = torch.argmax(token_mask.to(torch.uint8)).reshape(())
        self.lib.uks_masked_moments(DTYPES[x.dtype], _ptr(x), x.stride(0), _ptr(token_mask),
                                    _ptr(pivot), n, d, _ptr(count.view), _ptr(mean.view),
                                    _ptr(m2.view), _ptr(ws.view))
        self._done(ws, count, mean, m2)
        return count.view.clone(), mean.view.clone(), m2.view.clone()

    def feature_scores(self, mean_f, var_f, mean_r, var_r, eps: float) -> Tensor:
        d = mean_f.shape[0]
        scores = _guarded((d,), torch.float32)
        self.lib.uks_feature_scores(_ptr(mean_f), _ptr(var_f), _ptr(mean_r), _ptr(var_r), eps, d,
                                    _ptr(scores.view))
        self._done(scores)
        return scores.view.clone()

    # ---- low_rank.cu --------------------------------------------------------------------

    def tensor_core_ok(self, x: Tensor, r: int) -> bool:
        n, d = x.shape
        return bool(self.lib.uks_low_rank_tensor_core_ok(DTYPES[x.dtype], _ptr(x), x.stride(0), n, d, r))

    def low_rank_project(self, x: Tensor, basis: Tensor, scale: float, need_coeffs: bool,
                         path: str = "auto") -> tuple[Tensor, Tensor]:
        """``path``: "auto" (as csrc/ops/low_rank.cpp decides), "tensor_core" or "generic"."""
        n, d = x.shape
        r = basis.shape[1]
        y = _guarded((n, d), x.dtype)
        coeffs = _guarded((n, r), torch.float32) if need_coeffs else None
        cptr = _ptr(coeffs.view) if coeffs is not None else None
        use_tc = path == "tensor_core" or (path == "auto" and n > 0 and self.tensor_core_ok(x, r))
        if use_tc:
            u = basis.to(x.dtype)
            if r % 8:
                u = torch.nn.functional.pad(u, (0, 8 - r % 8))
            u = _guarded(u.shape, x.dtype, u)
            self.lib.uks_low_rank_project_tensor_core(DTYPES[x.dtype], _ptr(x), x.stride(0),
                                                      _ptr(u.view), u.view.shape[1], n, d, r,
                                                      scale, _ptr(y.view), cptr)
        else:
            u = _guarded(basis.shape, torch.float32, basis.float())
            self.lib.uks_low_rank_project_generic(DTYPES[x.dtype], _ptr(x), x.stride(0),
                                                  _ptr(u.view), n, d, r, scale, _ptr(y.view), cptr)
        self._done(y, coeffs)
        return y.view.clone(), coeffs.view.clone() if coeffs is not None else torch.empty(0)

    # ---- hessian.cu ---------------------------------------------------------------------

    def hessian_ema_(self, hess: Tensor, a: Tensor, b: Optional[Tensor], beta: float) -> None:
        h = _guarded(hess.shape, hess.dtype, hess)
        self.lib.uks_hessian_ema(DTYPES[hess.dtype], _ptr(h.view), DTYPES[a.dtype], _ptr(a),
                                 _ptr(b), a.numel(), beta, 1.0 - beta)
        self._done(h)
        hess.copy_(h.view)

    # ---- disruption_mask.cu --------------------------------------------------------------

    def disruption_mask(self, grad: Tensor, retain: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        """Out of place: a NaN-guarded output; ``kept`` starts as garbage (0xff bytes)."""
        out = _guarded(grad.shape, grad.dtype)
        kept = _guarded((), torch.int64)
        self.lib.uks_disruption_mask(DTYPES[grad.dtype], _ptr(grad), _ptr(retain), scale,
                                     _ptr(out.view), grad.numel(), _ptr(kept.view))
        self._done(out, kept)
        return out.view.clone(), kept.view.clone()

    def disruption_mask_(self, grad: Tensor, retain: Optional[Tensor], scale: float,
                         offset: int = 0) -> Tensor:
        """In place into ``grad`` (a guarded copy shifted by ``offset`` elements, copied back);
        ``retain`` None: grad itself."""
        g = _guarded(grad.shape, grad.dtype, grad, offset=offset)
        kept = _guarded((), torch.int64)
        r = g.view if retain is None else retain
        self.lib.uks_disruption_mask(DTYPES[grad.dtype], _ptr(g.view), _ptr(r), scale,
                                     _ptr(g.view), grad.numel(), _ptr(kept.view))
        self._done(g, kept)
        grad.copy_(g.view)
        return kept.view.clone()

    # ---- neuron_scores.cu ---------------------------------------------------------------

    def neuron_scores(self, weight: Tensor, hess_forget: Tensor, hess_retain, dim: int):
        rows, cols = weight.shape
        count = rows if dim == 0 else cols
        ws = _guarded((max(1, self.lib.uks_neuron_scores_workspace_floats(rows, cols, dim)),),
                      torch.float32)
        s_f = _guarded((count,), torch.float32)
        s_r = _guarded((count,), torch.float32) if hess_retain is not None else None
        hr = hess_retain
        self.lib.uks_neuron_scores(DTYPES[weight.dtype], _ptr(weight), weight.stride(0),
                                   DTYPES[hess_forget.dtype], _ptr(hess_forget),
                                   hess_forget.stride(0), _ptr(hr), hr.stride(0) if hr is not None else 0,
                                   rows, cols, dim, _ptr(s_f.view), _ptr(s_r.view) if s_r is not None else None,
                                   _ptr(ws.view))
        self._done(ws, s_f, s_r)
        return s_f.view.clone(), s_r.view.clone() if s_r is not None else torch.empty(0)

    # ---- class_means.cu -----------------------------------------------------------------

    def class_means(self, features: Tensor, labels: Tensor, num_classes: int):
        n, d = features.shape
        ws = _guarded((max(1, self.lib.uks_class_means_workspace_bytes(n, d, num_classes)),), torch.uint8)
        means = _guarded((num_classes, d), torch.float32)
        counts = _guarded((num_classes,), torch.int64)
        self.lib.uks_class_means(DTYPES[features.dtype], _ptr(features), features.stride(0),
                                 _ptr(labels), n, d, num_classes, _ptr(means.view),
                                 _ptr(counts.view), _ptr(ws.view))
        self._done(ws, means, counts)
        return means.view.clone(), counts.view.clone()

    # ---- sophia.cu ----------------------------------------------------------------------

    def masked_sophia_step_(self, params, grads, exp_avgs, hessians, masks, mask_dims, lr, beta1,
                            rho, weight_decay, eps, bs) -> None:
        """In place on params and exp_avgs; the tensor descriptions as csrc/ops/sophia.cpp."""
        entries, keep = [], []
        for p, g, m, h, mask, dim in zip(params, grads, exp_avgs, hessians, masks, mask_dims):
            if p.numel() == 0:
                continue
            gp, gm = _guarded(p.shape, p.dtype, p), _guarded(m.shape, m.dtype, m)
            mode, inner = 0, 1
            if mask is not None:
                mode = 1 if dim == 0 else 2
                inner = p.numel() // p.shape[0] if dim == 0 else p.shape[-1]
                if mode == 1 and inner == 1:
                    mode, inner = 2, p.numel()
            entries.append((gp, g, gm, h, mask, p.numel(), inner, DTYPES[p.dtype], DTYPES[m.dtype], mode))
            keep.append((p, gp, m, gm))
        if not entries:
            return
        count = len(entries)
        ptrs = lambda k: (ctypes.c_void_p * count)(*[  # noqa: E731
            None if e[k] is None else (e[k].view if isinstance(e[k], _Guarded) else e[k]).data_ptr()
            for e in entries])
        i64 = lambda k: (ctypes.c_int64 * count)(*[e[k] for e in entries])  # noqa: E731
        i32 = lambda k: (ctypes.c_int * count)(*[e[k] for e in entries])  # noqa: E731
        self.lib.uks_masked_sophia_step(count, ptrs(0), ptrs(1), ptrs(2), ptrs(3), ptrs(4), i64(5),
                                        i64(6), i32(7), i32(8), i32(9), lr, beta1, rho,
                                        weight_decay, eps, bs)
        self._done(*[k[1] for k in keep], *[k[3] for k in keep])
        for p, gp, m, gm in keep:
            p.copy_(gp.view)
            m.copy_(gm.view)


def strided_rows(x: Tensor, pad: int = 3) -> Tensor:
    """x [n, d] as a view with row stride d + pad inside a poisoned buffer (the padding and the
    guard zones are NaN), like the strided views of the backend tests. Keeps its buffer alive."""
    g = _guarded(x.shape, x.dtype, x, row_pad=pad)
    g.view._uk_buffer = g.buffer  # noqa: SLF001
    return g.view


def guarded_input(x: Tensor, offset: int = 0) -> Tensor:
    """x copied into a buffer whose guard zones are NaN (offset: elements of misalignment)."""
    g = _guarded(x.shape, x.dtype, x, offset=offset)
    g.view._uk_buffer = g.buffer  # noqa: SLF001
    return g.view
