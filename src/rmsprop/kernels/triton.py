"""The fused RMSProp step as a Triton kernel, for CUDA tensors.

Same semantics and signature as :func:`rmsprop.kernels.cpu.fused_step` (the rule is
:func:`rmsprop.spec.step`): one launch per step over a :class:`Table` of every tensor, one
pass that reads each input once and writes each output once; float32 math for float32,
float16 and bfloat16 params (16-bit values rounded once, to nearest even, when stored) and
float64 math for float64; IEEE-rounded ``sqrt`` and division (``sqrt_rn``/``div_rn``), so
results agree with the CPU kernel to a few ulp. Every option of the rule is a compile-time
constant, so each combination is its own specialised kernel.

Hyperparameters travel in a small float64 tensor on the device (not as kernel arguments, which
Triton would narrow to float32); every per-step constant (``1 - alpha``, ``1/c``,
``1 - lr*wd``) is computed from them in float64 inside the kernel and rounded once to the
math precision, and the update follows torch.optim.RMSprop's operations (fused multiply-adds
where ATen uses them), as the CPU kernel does. With ``TRITON_INTERPRET=1`` the kernel also runs
on CPU tensors (tests).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from . import state_flags

__all__ = ["available", "unavailable_reason", "fused_step", "first_nonfinite", "floor_call",
           "Table", "launch", "check_into", "advance", "HYPER_SLOTS"]

_reason: str | None = None
try:
    import triton
    import triton.language as tl
except Exception as e:  # noqa: BLE001 - any import failure means "no Triton here"
    triton = None
    tl = None
    _reason = f"triton is not importable: {type(e).__name__}: {e}"

BLOCK = 1024
CHUNK = 4 * BLOCK  # elements per program: enough to amortise its setup, small enough
# that a 10M-element tensor keeps every SM of a large GPU busy


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    """True when Triton imports and either CUDA is available or TRITON_INTERPRET=1."""
    return not unavailable_reason()


def unavailable_reason() -> str:
    """Why :func:`available` is False ('' when it is True)."""
    if _reason:
        return _reason
    if _interpret():
        return ""
    try:
        import torch
        if not torch.cuda.is_available():
            return "no CUDA device (set TRITON_INTERPRET=1 to run on CPU tensors)"
    except Exception as e:  # noqa: BLE001
        return f"torch is not importable: {e}"
    return ""


if triton is not None:

    @triton.jit
    def _div(a, b, MATH64: tl.constexpr):
        # float64 division and sqrt are IEEE-rounded by default; float32 ones may be approximate
        if MATH64:
            return a / b
        else:
            return tl.div_rn(a, b)

    @triton.jit
    def _sqrt(x, MATH64: tl.constexpr):
        if MATH64:
            return tl.sqrt(x)
        else:
            return tl.sqrt_rn(x)

    # Reductions through tl.reduce rather than tl.sum/min/max: those are @jit functions of
    # triton.language, decorated when triton is imported, so a process that imported triton
    # before setting TRITON_INTERPRET=1 could not interpret them (see _SUM below).
    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _min(a, b):
        return tl.where(a < b, a, b)

    @triton.jit
    def _max(a, b):
        return tl.where(a > b, a, b)

    # The standard library's own combine functions where it has them: the interpreter
    # recognises those and reduces with NumPy, and calls any other one element by element.
    _SUM = getattr(tl.standard, "_sum_combine", _add)
    _MIN = getattr(tl.standard, "_elementwise_min", _min)
    _MAX = getattr(tl.standard, "_elementwise_max", _max)

    # The state codecs: every value of a stream (params, gradients, square_avg, grad_avg,
    # momentum_buffer) is read through _load (decode: stored format -> math type T) and
    # written through _store (encode: T -> the stored format, rounded once). The format is
    # the pointer's element type; a block-scaled format would add its scale pointer here,
    # and the kernel's arithmetic would not change.
    @triton.jit
    def _load(ptr, offs, mask, T: tl.constexpr):
        return tl.load(ptr + offs, mask=mask, other=0.0).to(T)

    @triton.jit
    def _store(ptr, x, mask):
        # bfloat16 rounded to nearest even by hand: the interpreter's conversion truncates,
        # and this keeps compiled and interpreted results bit-identical
        if ptr.dtype.element_ty == tl.bfloat16:
            u = x.to(tl.float32).to(tl.uint32, bitcast=True)
            r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, r)
            tl.store(ptr, r.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _chunk(tab_ptr, n, nchunks, CHUNK: tl.constexpr):
        # this program's chunk (see Table): tensor index, first element, end
        pid = tl.program_id(0)
        t = tl.load(tab_ptr + 5 * n + pid)
        start = tl.load(tab_ptr + 5 * n + nchunks + pid)
        return t, start, tl.minimum(start + CHUNK, tl.load(tab_ptr + 4 * n + t))

    @triton.jit
    def _pointer(column_ptr, t, like):
        # tensor t's data pointer from a table column, typed like the tensor `like`
        return tl.load(column_ptr + t).to(tl.pointer_type(like.dtype.element_ty))

    @triton.jit
    def _rmsprop_kernel(tab_ptr, grad_ptrs, hyper_ptr, lr_ptr, c_ptr, scale_ptr, stats_ptr,
                        stats_bits_ptr, gate_ptr, n, nchunks, p_like, s_like,
                        GATED: tl.constexpr,
                        CENTERED: tl.constexpr, MOMENTUM: tl.constexpr,
                        WD_COUPLED: tl.constexpr, DECOUPLED: tl.constexpr,
                        NESTEROV: tl.constexpr, EPS_IN_SQRT: tl.constexpr,
                        LR_IN_MOMENTUM: tl.constexpr, STATS: tl.constexpr,
                        MATH64: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        # One program updates one chunk of one tensor; the table (see Table) says which.
        t, start, end = _chunk(tab_ptr, n, nchunks, CHUNK)
        p_ptr, g_ptr = _pointer(tab_ptr, t, p_like), _pointer(grad_ptrs, t, p_like)
        v_ptr, m_ptr = _pointer(tab_ptr + n, t, s_like), _pointer(tab_ptr + 2 * n, t, s_like)
        b_ptr = _pointer(tab_ptr + 3 * n, t, s_like)
        if MATH64:
            T = tl.float64
        else:
            T = tl.float32
        # hyper (see HYPER_SLOTS): lr, alpha, eps, wd, mu, c, gmul, 1.0, float64. lr, c and
        # the grad scale are read through their own pointers: a hyper slot, or a device
        # tensor (a scheduler's tensor lr, the device-side bias correction, GradScaler's
        # scale), so nothing is read on the host. Every per-step constant is its expression
        # evaluated in float64 and rounded once to T, as torch rounds the Python float it is
        # given (1 - alpha above all: 0.99 -> 0.0099999998, where 1 - float32(0.99) would be
        # 0.0099999905).
        lr64 = tl.load(lr_ptr).to(tl.float64)
        alpha64 = tl.load(hyper_ptr + 1)
        wd64 = tl.load(hyper_ptr + 3)
        lr = lr64.to(T)
        alpha = alpha64.to(T)
        eps = tl.load(hyper_ptr + 2).to(T)
        wd = wd64.to(T)
        mu = tl.load(hyper_ptr + 4).to(T)
        invc = (1.0 / tl.load(c_ptr).to(tl.float64)).to(T)
        # sign / grad_scale in float64 (IEEE division): 1/scale as the host computes it, or
        # the host's +-1/scale over the 1.0 of slot 7, unchanged
        gmul = (tl.load(hyper_ptr + 6) / tl.load(scale_ptr).to(tl.float64)).to(T)
        pdecay = (1.0 - lr64 * wd64).to(T)
        oma = (1.0 - alpha64).to(T)
        one = tl.full((), 1.0, T)
        # the centered average as torch's lerp(m, g, w): m + w*(g - m) for |w| < 0.5, else
        # g + (w - 1)*(g - m), each one fused multiply-add
        lerp_small = (oma < 0.5) & (oma > -0.5)
        lerp_w = tl.where(lerp_small, oma, oma - one)
        if STATS:
            acc_g = tl.full((BLOCK,), 0.0, T)
            acc_u = tl.full((BLOCK,), 0.0, T)
            acc_p = tl.full((BLOCK,), 0.0, T)
            acc_lo = tl.full((BLOCK,), float("inf"), T)
            acc_hi = tl.full((BLOCK,), float("-inf"), T)
            acc_dom = tl.full((BLOCK,), 0.0, T)
        if GATED:  # a check found inf or NaN: an empty range, nothing is written
            end = tl.where(tl.load(gate_ptr) != 0, start, end)
        for lo in range(start, end, BLOCK):
            offs = lo + tl.arange(0, BLOCK)
            mask = offs < end
            g = _load(g_ptr, offs, mask, T) * gmul
            p = _load(p_ptr, offs, mask, T)
            # torch.optim.RMSprop's operations and roundings (see cpu_step.h for the table)
            if WD_COUPLED:
                g = tl.fma(wd, p, g)
            if DECOUPLED:
                p = p * pdecay
            v = tl.fma(oma * g, g, alpha * _load(v_ptr, offs, mask, T))
            _store(v_ptr + offs, v, mask)
            if CENTERED:
                mo = _load(m_ptr, offs, mask, T)
                mm = tl.fma(lerp_w, g - mo, tl.where(lerp_small, mo, g))
                _store(m_ptr + offs, mm, mask)
                mc = mm * invc
                s = tl.fma(-mc, mc, v * invc)
                s = tl.where(s < 0, 0.0, s)  # NaN < 0 is false: NaN is kept
            else:
                s = v * invc
            if EPS_IN_SQRT:
                sq = _sqrt(s + eps, MATH64)
                d = sq
            else:
                sq = _sqrt(s, MATH64)
                d = sq + eps
            if MOMENTUM:
                nrm = _div(g, d, MATH64)
                if LR_IN_MOMENTUM:
                    k = lr
                else:
                    k = one
                b = mu * _load(b_ptr, offs, mask, T) + k * nrm
                _store(b_ptr + offs, b, mask)
                if NESTEROV:
                    u = mu * b + k * nrm
                else:
                    u = b
                if LR_IN_MOMENTUM:
                    p = p - u
                else:
                    p = tl.fma(-lr, u, p)
                    u = lr * u  # the update, for the statistics
            else:
                u = _div(lr * g, d, MATH64)
                p = p - u
            _store(p_ptr + offs, p, mask)
            if STATS:
                acc_g += tl.where(mask, g * g, 0.0)
                acc_u += tl.where(mask, u * u, 0.0)
                acc_p += tl.where(mask, p * p, 0.0)
                r = _div(lr + 0.0 * d, d, MATH64)
                acc_lo = tl.where(mask & (r < acc_lo), r, acc_lo)
                acc_hi = tl.where(mask & (r > acc_hi), r, acc_hi)
                if EPS_IN_SQRT:
                    dom = eps > s
                else:
                    dom = eps > sq
                acc_dom += tl.where(mask & dom, 1.0, 0.0)
        if STATS:
            base = stats_ptr + t * 6
            tl.atomic_add(base + 0, tl.reduce(acc_g, 0, _SUM).to(tl.float64))
            tl.atomic_add(base + 1, tl.reduce(acc_u, 0, _SUM).to(tl.float64))
            tl.atomic_add(base + 2, tl.reduce(acc_p, 0, _SUM).to(tl.float64))
            # lr/d >= 0, and non-negative IEEE floats order like their bit patterns
            bits = stats_bits_ptr + t * 6
            tl.atomic_min(bits + 3, tl.reduce(acc_lo, 0, _MIN).to(tl.float64)
                          .to(tl.int64, bitcast=True))
            tl.atomic_max(bits + 4, tl.reduce(acc_hi, 0, _MAX).to(tl.float64)
                          .to(tl.int64, bitcast=True))
            tl.atomic_add(base + 5, tl.reduce(acc_dom, 0, _SUM).to(tl.float64))

    @triton.jit
    def _nonfinite_kernel(tab_ptr, grad_ptrs, flag_ptr, gate_ptr, n, nchunks, base, g_like,
                          CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        t, start, end = _chunk(tab_ptr, n, nchunks, CHUNK)
        g_ptr = _pointer(grad_ptrs, t, g_like)
        bad = tl.full((BLOCK,), 0, tl.int32)
        for lo in range(start, end, BLOCK):
            offs = lo + tl.arange(0, BLOCK)
            mask = offs < end
            x = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            bad = bad | (mask & ((x != x) | (tl.abs(x) == float("inf")))).to(tl.int32)
        hit = tl.reduce(bad, 0, _MAX)
        if hit > 0:  # the flag ends as the lowest (base + index) of a tensor with a bad
            tl.atomic_min(flag_ptr, (base + t).to(tl.int32))  # element; the gate as 1
            tl.atomic_max(gate_ptr, 1)

    @triton.jit
    def _advance_kernel(steps_ptr, gate_ptr, count_ptr, n, COUNT: tl.constexpr,
                        BLOCK: tl.constexpr):
        # The gated step counts: +1 each unless the gate is set (then the count of skipped
        # steps, with COUNT, goes up instead). After the step kernel, which reads them.
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tripped = tl.load(gate_ptr) != 0
        s = tl.load(steps_ptr + offs, mask=mask, other=0.0)
        tl.store(steps_ptr + offs, s + tl.where(tripped, 0.0, 1.0), mask=mask)
        if COUNT:
            if tl.program_id(0) == 0:
                tl.store(count_ptr, tl.load(count_ptr) + tl.where(tripped, 1, 0).to(tl.int64))

    @triton.jit
    def _floor_kernel(tab_ptr, grad_ptrs, n, nchunks, p_like, s_like, HAS_M: tl.constexpr,
                      HAS_B: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        # The bandwidth floor: the step's reads and writes with trivial arithmetic (x + 0*g
        # keeps every value; the compiler cannot drop the loads of g it multiplies).
        t, start, end = _chunk(tab_ptr, n, nchunks, CHUNK)
        p_ptr, g_ptr = _pointer(tab_ptr, t, p_like), _pointer(grad_ptrs, t, p_like)
        v_ptr, m_ptr = _pointer(tab_ptr + n, t, s_like), _pointer(tab_ptr + 2 * n, t, s_like)
        b_ptr = _pointer(tab_ptr + 3 * n, t, s_like)
        for lo in range(start, end, BLOCK):
            offs = lo + tl.arange(0, BLOCK)
            mask = offs < end
            z = tl.load(g_ptr + offs, mask=mask, other=0.0) * 0
            tl.store(p_ptr + offs, tl.load(p_ptr + offs, mask=mask) + z, mask=mask)
            tl.store(v_ptr + offs, tl.load(v_ptr + offs, mask=mask) + z, mask=mask)
            if HAS_M:
                tl.store(m_ptr + offs, tl.load(m_ptr + offs, mask=mask) + z, mask=mask)
            if HAS_B:
                tl.store(b_ptr + offs, tl.load(b_ptr + offs, mask=mask) + z, mask=mask)


_SUPPORTED = ("float32", "float64", "float16", "bfloat16")


#: The per-step float64 values the step kernel reads, in order, after the gradient pointers:
#: ``lr, alpha, eps, weight_decay, momentum, c`` (``1 - alpha^t``), ``gmul`` (the gradient
#: multiplier: +-1/grad_scale, or +-1 when the scale is read from the device) and ``1.0``
#: (the divisor of ``gmul`` when no device scale is given).
HYPER_SLOTS = 8


class Table:
    """Where one launch finds its tensors. A static int64 device tensor laid out as
    ``[P | V | M | B | numel]`` (``n`` entries each: data pointers and element counts), then
    the chunk list ``[tensor index | first element]`` (``nchunks`` each), copied to the device
    once; and a persistent per-step one, ``dyn = [G | hyperparameters as float64 bits]``
    (:data:`HYPER_SLOTS`), the only part that changes between steps. One program updates one
    chunk of ``CHUNK`` elements, so a thousand small tensors and one huge one both take a
    single launch.

    ``dyn`` keeps its address for the table's life (a captured CUDA graph replays with it)
    and is rewritten only when the gradients' pointers or the hyperparameters changed: from
    a host mirror, through a fresh pinned staging buffer and an asynchronous copy on CUDA
    (never a pageable one, which waits for the device)."""

    def __init__(self, ptrs: Sequence[Sequence[int]], numels: Sequence[int],
                 device: Any) -> None:
        import numpy as np
        import torch
        n = len(numels)
        ne = np.asarray(numels, dtype=np.int64)
        per = -(-ne // CHUNK)
        tensor_of = np.repeat(np.arange(n, dtype=np.int64), per)
        first = np.arange(len(tensor_of), dtype=np.int64) - np.repeat(np.cumsum(per) - per, per)
        self.n, self.nchunks, self.device = n, len(tensor_of), device
        host = np.empty(5 * n + 2 * self.nchunks, dtype=np.int64)
        for k, col in enumerate(ptrs):  # P, V, M, B
            host[k * n:(k + 1) * n] = np.asarray(col, dtype=np.uint64).view(np.int64)
        host[4 * n:5 * n] = ne
        host[5 * n:5 * n + self.nchunks] = tensor_of
        host[5 * n + self.nchunks:] = first * CHUNK
        self.static = torch.from_numpy(host).to(device)
        self._pin = torch.device(device).type == "cuda"
        self._mirror = np.zeros(n + HYPER_SLOTS, dtype=np.int64)
        self._mirror_t = torch.from_numpy(self._mirror)  # the mirror's memory, as a tensor
        self.dyn = torch.zeros(n + HYPER_SLOTS, dtype=torch.int64, device=device)
        self.hyper = self.dyn[n:].view(torch.float64)
        self._grads: bytes | None = None
        self._values: tuple | None = None
        self._kept: list = []  # staging buffers a captured graph copies from
        self._first_bad: Any = None

    def upload(self, grads: Any, hyper: Sequence[float] | None = None) -> tuple[Any, Any]:
        """The per-step part on the device, ``(dyn, hyper)``, holding these gradient
        pointers (an ``array.array("Q")`` or a sequence of ints) and, if given, these
        :data:`HYPER_SLOTS` values. Nothing is copied when neither changed since the last
        call (a training loop whose gradients stay where they are and whose learning rate
        is constant, or lives in a device tensor, copies nothing)."""
        import numpy as np
        import torch
        key = (np.asarray(grads, dtype=np.uint64).tobytes() if isinstance(grads, (list, tuple))
               else bytes(grads))
        values = None if hyper is None else tuple(hyper)
        if key == self._grads and (values is None or values == self._values):
            return self.dyn, self.hyper
        self._mirror[:self.n] = np.frombuffer(key, dtype=np.int64)
        if values is not None:
            self._mirror[self.n:] = np.asarray(values, dtype=np.float64).view(np.int64)
        staging = torch.empty(self.n + HYPER_SLOTS, dtype=torch.int64, pin_memory=self._pin)
        staging.copy_(self._mirror_t)
        self.dyn.copy_(staging, non_blocking=True)
        if self._pin and torch.cuda.is_current_stream_capturing():
            self._kept.append(staging)  # replays copy from it: it must never be reused
        self._grads = key
        if values is not None:
            self._values = values
        return self.dyn, self.hyper

    def first_nonfinite(self, grads: Any, g_like: Any) -> int:
        """Index of the first tensor whose gradient holds inf or NaN, -1 if none: one launch
        into a persistent ``[gate, first bad]`` pair, and one host sync to read it."""
        import torch
        if self.nchunks == 0:
            return -1
        if self._first_bad is None:
            self._first_bad = torch.empty(2, dtype=torch.int32, device=self.device)
        flags = self._first_bad
        flags[0] = 0
        flags[1] = self.n
        check_into(self, grads, g_like, flags)
        bad = int(flags[1].item())
        return -1 if bad >= self.n else bad


def launch(table: Table, grads: Any, hyper: Any, p_like: Any, s_like: Any, flags: dict,
           stats: Any = None, gate: Any = None, lr: Any = None, c: Any = None,
           scale: Any = None) -> None:
    """One launch of the step over every chunk of ``table``, with the step's part of it
    (``grads``, ``hyper``) from :meth:`Table.upload`; ``stats`` as in :func:`fused_step`.
    With ``gate`` (a one-element device tensor of any dtype: the check's flag, see
    :func:`check_into`, or GradScaler's ``found_inf``) the kernel writes nothing when it is
    nonzero. ``lr`` (one element), ``c`` (``1 - alpha^t``, one element) and ``scale`` (the
    gradients' scale, one element) are device tensors read in the kernel instead of their
    slots of ``hyper``; with ``scale``, ``hyper``'s ``gmul`` slot holds just the sign."""
    if table.nchunks == 0:
        if stats is not None:
            _reset_stats(stats)
        return
    if stats is not None:
        _reset_stats(stats)
        st, sb = stats, stats.view(__import__("torch").int64)
    else:
        st = sb = hyper
    # no contraction of the kernel's separate multiplies and adds into fused multiply-adds:
    # the rounding of each operation is part of the rule (the interpreter never contracts)
    exact = {} if _interpret() else {"enable_fp_fusion": False}
    _rmsprop_kernel[(table.nchunks,)](
        table.static, grads, hyper, hyper if lr is None else lr,
        hyper[5:] if c is None else c, hyper[7:] if scale is None else scale, st, sb,
        hyper if gate is None else gate, table.n, table.nchunks, p_like, s_like,
        GATED=gate is not None, **flags, CHUNK=CHUNK, BLOCK=BLOCK, **exact)


def check_into(table: Table, grads: Any, g_like: Any, flags: Any, base: int = 0) -> None:
    """Queue the inf/NaN check of the gradients in ``table`` into ``flags``, a two-element
    int32 device tensor ``[gate, first bad]``: a tensor holding an inf or NaN sets the gate
    to 1 and lowers ``first bad`` to ``base`` + its index. No host sync, nothing cleared:
    the tables of one step share one pair, each with its own ``base``."""
    if table.nchunks:
        _nonfinite_kernel[(table.nchunks,)](table.static, grads, flags[1:], flags, table.n,
                                            table.nchunks, base, g_like, CHUNK=CHUNK,
                                            BLOCK=BLOCK)


def advance(steps: Any, gate: Any, skipped: Any = None) -> None:
    """Add 1 to each element of the float32 device tensor ``steps`` unless ``gate`` (one
    element, any dtype) is nonzero, when ``skipped`` (one int64 element), if given, counts
    the step instead. One launch, no host read."""
    n = steps.numel()
    if n:
        _advance_kernel[(-(-n // BLOCK),)](steps, gate, steps if skipped is None else skipped,
                                           n, COUNT=skipped is not None, BLOCK=BLOCK)
    elif skipped is not None:
        skipped.add_((gate.reshape(-1)[:1] != 0).to(skipped.dtype))


def _reset_stats(stats: Any) -> None:
    stats.zero_()
    stats[:, 3] = float("inf")
    stats[:, 4] = float("-inf")


def _check(tensors: Sequence[Any], name: str, n: int, dtype: Any, numels: list[int],
           device: Any) -> list[int]:
    if len(tensors) != n:
        raise ValueError(f"fused Triton step: {name} has {len(tensors)} tensors, params has {n}")
    for i, t in enumerate(tensors):
        if t.dtype != dtype:
            raise TypeError(f"fused Triton step: {name}[{i}] has dtype {t.dtype}, "
                            f"expected {dtype}")
        if t.numel() != numels[i]:
            raise ValueError(f"fused Triton step: {name}[{i}] has {t.numel()} elements, "
                             f"params[{i}] has {numels[i]}")
        if not t.is_contiguous():
            raise ValueError(f"fused Triton step: {name}[{i}] is not contiguous")
        if t.device != device:
            raise ValueError(f"fused Triton step: {name}[{i}] is on {t.device}, params on "
                             f"{device}")
    return [t.data_ptr() for t in tensors]


def fused_step(params: Sequence[Any], grads: Sequence[Any], square_avgs: Sequence[Any],
               grad_avgs: Sequence[Any] | None, momentum_buffers: Sequence[Any] | None, *,
               lr: float, alpha: float, eps: float, weight_decay: float, momentum: float,
               centered: bool, maximize: bool, eps_in_sqrt: bool, lr_in_momentum: bool,
               nesterov: bool, decoupled_weight_decay: bool, bias_correction: float,
               grad_scale: float | None = None, stats: Any = None) -> None:
    """One RMSProp step over CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``) in a
    single kernel launch over a :class:`Table` of the tensors; arguments, state dtypes,
    ``grad_scale`` and ``stats`` exactly as :func:`rmsprop.kernels.cpu.fused_step`."""
    if triton is None:
        raise RuntimeError(f"the fused Triton kernel is unavailable: {_reason}")
    import torch
    n = len(params)
    centered, use_mom = state_flags("Triton", centered, grad_avgs, momentum, momentum_buffers)
    if n == 0:
        if stats is not None and tuple(stats.shape) != (0, 6):
            raise ValueError("fused Triton step: stats must have shape (0, 6)")
        return
    device = params[0].device
    pdtype = params[0].dtype
    if str(pdtype).replace("torch.", "") not in _SUPPORTED:
        raise TypeError(f"fused Triton step: unsupported dtype {pdtype} "
                        "(float32, float64, float16, bfloat16; complex as view_as_real)")
    sdtype = square_avgs[0].dtype
    if sdtype != pdtype and sdtype != torch.float32:
        raise TypeError(f"fused Triton step: state dtype {sdtype} must be the params' dtype "
                        f"({pdtype}) or torch.float32")
    if stats is not None and (stats.dtype != torch.float64 or tuple(stats.shape) != (n, 6)
                              or not stats.is_contiguous() or stats.device != device):
        raise ValueError(f"fused Triton step: stats must be a contiguous float64 tensor of "
                         f"shape ({n}, 6) on {device}")
    if grad_scale is not None and not (grad_scale > 0):
        raise ValueError(f"fused Triton step: grad_scale must be > 0, got {grad_scale}")
    # checked here, before any pointer is taken: a wrong list would corrupt memory
    numels = [t.numel() for t in params]
    _check(params, "params", n, pdtype, numels, device)
    import array
    G = array.array("Q", _check(grads, "grads", n, pdtype, numels, device))
    _check(square_avgs, "square_avgs", n, sdtype, numels, device)
    if centered:
        _check(grad_avgs, "grad_avgs", n, sdtype, numels, device)  # type: ignore[arg-type]
    if use_mom:
        _check(momentum_buffers, "momentum_buffers", n, sdtype, numels, device)  # type: ignore[arg-type]
    # the one way to the kernel: a one-shot plan over these tensors
    from ..torch._plan import CudaPlan, hyper_of
    plan = CudaPlan(params, square_avgs, grad_avgs if centered else None,
                    momentum_buffers if use_mom else None)
    plan.run(G, hyper_of(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                         momentum=momentum, centered=centered, maximize=maximize,
                         eps_in_sqrt=eps_in_sqrt, lr_in_momentum=lr_in_momentum,
                         nesterov=nesterov, decoupled_weight_decay=decoupled_weight_decay,
                         bias_correction=bias_correction, grad_scale=grad_scale), stats)


def first_nonfinite(grads: Sequence[Any]) -> int:
    """Index of the first tensor holding an inf or NaN, -1 if none (``None`` entries are
    skipped; complex tensors are checked component-wise). One launch and one device sync
    per dtype."""
    if triton is None:
        raise RuntimeError(f"the fused Triton kernel is unavailable: {_reason}")
    import torch
    by_dtype: dict[Any, list[tuple[int, Any]]] = {}
    for i, g in enumerate(grads):
        if g is None or g.numel() == 0:
            continue
        if g.is_complex():
            g = torch.view_as_real(g)
        if not g.is_contiguous():
            raise ValueError(f"first_nonfinite: grads[{i}] is not contiguous")
        by_dtype.setdefault(g.dtype, []).append((i, g))
    hits = []
    for live in by_dtype.values():
        zeros = [0] * len(live)
        table = Table((zeros, zeros, zeros, zeros), [g.numel() for _, g in live],
                      live[0][1].device)
        gdev, _ = table.upload([g.data_ptr() for _, g in live])
        bad = table.first_nonfinite(gdev, live[0][1])
        if bad >= 0:
            hits.append(live[bad][0])
    return min(hits, default=-1)


def floor_call(params: Sequence[Any], grads: Sequence[Any], square_avgs: Sequence[Any],
               grad_avgs: Sequence[Any] | None = None,
               momentum_buffers: Sequence[Any] | None = None) -> Any:
    """The GPU bandwidth floor for benchmarks as a ready-to-time call: one launch over the
    same tensors and chunks as :func:`fused_step`, reading p, g, v[, m, b] and writing p,
    v[, m, b] back unchanged."""
    if triton is None:
        raise RuntimeError(f"the fused Triton kernel is unavailable: {_reason}")
    numels = [t.numel() for t in params]
    P, G, V = ([t.data_ptr() for t in ts] for ts in (params, grads, square_avgs))
    M = [t.data_ptr() for t in grad_avgs] if grad_avgs is not None else V
    B = [t.data_ptr() for t in momentum_buffers] if momentum_buffers is not None else V
    table = Table((P, V, M, B), numels, params[0].device)
    gdev, _ = table.upload(G)
    keep = (params, grads, square_avgs, grad_avgs, momentum_buffers)

    def call() -> None:
        _floor_kernel[(table.nchunks,)](table.static, gdev, table.n, table.nchunks, params[0],
                                        square_avgs[0], HAS_M=grad_avgs is not None,
                                        HAS_B=momentum_buffers is not None, CHUNK=CHUNK,
                                        BLOCK=BLOCK)
    call.keep = keep  # type: ignore[attr-defined]
    return call
