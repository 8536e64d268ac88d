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

Block-quantized state (``state_dtype="8bit"``/``"4bit"``, :mod:`rmsprop.codecs`) has its own
kernel, :func:`fused_step_quantized` (the signature of
:func:`rmsprop.kernels.cpu.fused_step_quantized`; :func:`launch_quantized` over a
:class:`Table` built with ``scales`` for a plan): a program owns whole blocks of one tensor
and takes them a tile of several blocks at a time, decodes them with their scales, runs the
same per-element update (one ``@triton.jit`` helper, ``_update``, serves both kernels), and
encodes them with each block's new maximum as scale. The codes are
:func:`rmsprop.codecs.encode`'s bit for bit: the unsigned code is ``rint(sqrt(x) * (L /
sqrt(s)))`` with ``sqrt_rn`` and ``div_rn``, the signed one ``rint(K * (x / s))`` with the
quotient ``div_rn``, both rounding half to even.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from . import quantized_pointers, state_flags

__all__ = ["available", "unavailable_reason", "fused_step", "fused_step_quantized",
           "first_nonfinite", "floor_call", "Table", "launch", "launch_quantized",
           "kernel_flags", "check_into", "advance", "quant_encode", "quant_decode",
           "HYPER_SLOTS", "QFORMATS", "QTILE"]

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


def _exact() -> dict[str, bool]:
    """Launch options of the step and codec kernels: no contraction of their separate
    multiplies and adds into fused multiply-adds, since the rounding of each operation is
    part of the rule (``K * u + 2^23`` fused would move a code; the interpreter never
    contracts)."""
    return {} if _interpret() else {"enable_fp_fusion": False}


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
    # the pointer's element type. The block-scaled formats are decoded and encoded a tile
    # of whole blocks at a time (_qload/_qstore, below), around the same _update.
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
    def _consts(hyper_ptr, lr_ptr, c_ptr, scale_ptr, T: tl.constexpr):
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
        invc = (1.0 / tl.load(c_ptr).to(tl.float64)).to(T)
        # sign / grad_scale in float64 (IEEE division): 1/scale as the host computes it, or
        # the host's +-1/scale over the 1.0 of slot 7, unchanged
        gmul = (tl.load(hyper_ptr + 6) / tl.load(scale_ptr).to(tl.float64)).to(T)
        pdecay = (1.0 - lr64 * wd64).to(T)
        oma = (1.0 - alpha64).to(T)
        # the centered average as torch's lerp(m, g, w): m + w*(g - m) for |w| < 0.5, else
        # g + (w - 1)*(g - m), each one fused multiply-add
        lerp_small = (oma < 0.5) & (oma > -0.5)
        lerp_w = tl.where(lerp_small, oma, oma - tl.full((), 1.0, T))
        return (lr64.to(T), alpha64.to(T), tl.load(hyper_ptr + 2).to(T), wd64.to(T),
                tl.load(hyper_ptr + 4).to(T), invc, gmul, pdecay, oma, lerp_small, lerp_w)

    @triton.jit
    def _update(g, p, v, m, b, lr, alpha, eps, wd, mu, invc, gmul, pdecay, oma, lerp_small,
                lerp_w, CENTERED: tl.constexpr, MOMENTUM: tl.constexpr,
                WD_COUPLED: tl.constexpr, DECOUPLED: tl.constexpr, NESTEROV: tl.constexpr,
                EPS_IN_SQRT: tl.constexpr, LR_IN_MOMENTUM: tl.constexpr,
                MATH64: tl.constexpr):
        # The rule on decoded values (any shape), with torch.optim.RMSprop's operations and
        # roundings (see cpu_step.h for the table): the loaded gradient, param and state in,
        # the new param and state out (m, b unchanged when their option is off), and what
        # the statistics read: the rule's gradient g, s, sqrt and d.
        g = g * gmul
        if WD_COUPLED:
            g = tl.fma(wd, p, g)
        if DECOUPLED:
            p = p * pdecay
        v = tl.fma(oma * g, g, alpha * v)
        if CENTERED:
            m = tl.fma(lerp_w, g - m, tl.where(lerp_small, m, g))
            mc = m * invc
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
                k = tl.full((), 1.0, lr.dtype)
            b = mu * b + k * nrm
            if NESTEROV:
                u = mu * b + k * nrm
            else:
                u = b
            if LR_IN_MOMENTUM:
                p = p - u
            else:
                p = tl.fma(-lr, u, p)
        else:
            u = _div(lr * g, d, MATH64)
            p = p - u
        return g, p, v, m, b, s, sq, d

    @triton.jit
    def _stored(x, ptr):
        # x as _store leaves it in ptr's format, read back in x's type
        if ptr.dtype.element_ty == tl.bfloat16:
            u = x.to(tl.float32).to(tl.uint32, bitcast=True)
            r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, r)
            y = (r << 16).to(tl.float32, bitcast=True).to(x.dtype)
        else:
            y = x.to(ptr.dtype.element_ty).to(x.dtype)
        return y

    @triton.jit
    def _stats_add(acc_g, acc_u, acc_p, acc_lo, acc_hi, acc_dom, mask, g, p_old, p, p_ptr, s,
                   sq, d, lr, eps, EPS_IN_SQRT: tl.constexpr, MATH64: tl.constexpr):
        # this block's terms of the six statistics (see fused_step), masked lanes left out.
        # The update and the param are the change that happened and the value as stored
        # (rmsprop.torch._stats): rounding to 16 bits can erase an update or be most of it,
        # and decoupled weight decay is part of the change.
        p = _stored(p, p_ptr)
        u = p_old - p
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
        return acc_g, acc_u, acc_p, acc_lo, acc_hi, acc_dom

    @triton.jit
    def _stats_flush(stats_ptr, stats_bits_ptr, t, acc_g, acc_u, acc_p, acc_lo, acc_hi,
                     acc_dom):
        # one program's partial statistics into tensor t's row (accumulators of any shape)
        base = stats_ptr + t * 6
        tl.atomic_add(base + 0, tl.reduce(acc_g, None, _SUM).to(tl.float64))
        tl.atomic_add(base + 1, tl.reduce(acc_u, None, _SUM).to(tl.float64))
        tl.atomic_add(base + 2, tl.reduce(acc_p, None, _SUM).to(tl.float64))
        # lr/d >= 0, and non-negative IEEE floats order like their bit patterns
        bits = stats_bits_ptr + t * 6
        tl.atomic_min(bits + 3, tl.reduce(acc_lo, None, _MIN).to(tl.float64)
                      .to(tl.int64, bitcast=True))
        tl.atomic_max(bits + 4, tl.reduce(acc_hi, None, _MAX).to(tl.float64)
                      .to(tl.int64, bitcast=True))
        tl.atomic_add(base + 5, tl.reduce(acc_dom, None, _SUM).to(tl.float64))

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
        (lr, alpha, eps, wd, mu, invc, gmul, pdecay, oma, lerp_small,
         lerp_w) = _consts(hyper_ptr, lr_ptr, c_ptr, scale_ptr, T)
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
            v = _load(v_ptr, offs, mask, T)
            m = v
            b = v
            if CENTERED:
                m = _load(m_ptr, offs, mask, T)
            if MOMENTUM:
                b = _load(b_ptr, offs, mask, T)
            g = _load(g_ptr, offs, mask, T)
            p_old = _load(p_ptr, offs, mask, T)
            g, p, v, m, b, s, sq, d = _update(
                g, p_old, v, m, b, lr, alpha, eps, wd, mu, invc, gmul, pdecay, oma, lerp_small,
                lerp_w, CENTERED, MOMENTUM, WD_COUPLED, DECOUPLED, NESTEROV, EPS_IN_SQRT,
                LR_IN_MOMENTUM, MATH64)
            _store(v_ptr + offs, v, mask)
            if CENTERED:
                _store(m_ptr + offs, m, mask)
            if MOMENTUM:
                _store(b_ptr + offs, b, mask)
            _store(p_ptr + offs, p, mask)
            if STATS:
                acc_g, acc_u, acc_p, acc_lo, acc_hi, acc_dom = _stats_add(
                    acc_g, acc_u, acc_p, acc_lo, acc_hi, acc_dom, mask, g, p_old, p, p_ptr, s,
                    sq, d, lr, eps, EPS_IN_SQRT, MATH64)
        if STATS:
            _stats_flush(stats_ptr, stats_bits_ptr, t, acc_g, acc_u, acc_p, acc_lo, acc_hi,
                         acc_dom)

    # -- block-quantized state (rmsprop.codecs: u8/s8 in blocks of 256, u4/s4 of 128) -------
    # A tile is ROWS x QB: ROWS whole quantization blocks, one per row, so a block's scale is
    # a reduction along its row. Every operation is float32 with one rounding (division by
    # div_rn, sqrt by sqrt_rn, no contraction), as the spec states the codes.

    @triton.jit
    def _rint(x):
        # round half to even for 0 <= x < 2^22: adding 2^23 leaves no fraction bits, so the
        # float32 sum is the rounded value (IEEE round-to-nearest-even), and the difference
        # is exact
        return (x + 8388608.0) - 8388608.0

    @triton.jit
    def _codes_load(ptr, offs, boffs, mask, bmask, ROWS: tl.constexpr, QB: tl.constexpr,
                    BITS: tl.constexpr):
        # the tile's codes as int32: one byte each, or at 4 bits two per byte (element 2j in
        # the low nibble)
        if BITS == 8:
            c = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)
        else:
            # each element reads its own byte and picks its nibble: the codes arrive in the
            # tile's own layout (joining the two nibbles of a byte would reshape the tile)
            byte = tl.load(ptr + offs // 2, mask=mask, other=0).to(tl.int32)
            c = (byte >> ((offs & 1) * 4)) & 15
        return c

    @triton.jit
    def _codes_store(ptr, c, offs, boffs, mask, bmask, ROWS: tl.constexpr, QB: tl.constexpr,
                     BITS: tl.constexpr):
        if BITS == 8:
            tl.store(ptr + offs, c.to(tl.uint8), mask=mask)
        else:
            lo, hi = tl.split(tl.reshape(c, (ROWS, QB // 2, 2)))
            tl.store(ptr + boffs, (lo | (hi << 4)).to(tl.uint8), mask=bmask)

    @triton.jit
    def _decode(c, s, SIGNED: tl.constexpr, BITS: tl.constexpr):
        # x' = s * U[q], U[q] = ((q + 1) / L)^2 (exact), or s * S[k], S[k] = RN(k / K) with
        # the code -K - 1 read as -K; s: the rows' scales, (ROWS, 1)
        if SIGNED:
            if BITS == 8:
                k = tl.where(c > 127, c - 256, c)
                k = tl.where(k < -127, -127, k)
                ratio = tl.div_rn(k.to(tl.float32), tl.full(k.shape, 127.0, tl.float32))
            else:
                k = tl.where(c > 7, c - 16, c)
                k = tl.where(k < -7, -7, k)
                ratio = tl.div_rn(k.to(tl.float32), tl.full(k.shape, 7.0, tl.float32))
        else:
            q = c + 1
            if BITS == 8:
                ratio = (q * q).to(tl.float32) * 0.0000152587890625  # 2^-16
            else:
                ratio = (q * q).to(tl.float32) * 0.00390625  # 2^-8
        return s * ratio

    @triton.jit
    def _encode(x, mask, SIGNED: tl.constexpr, BITS: tl.constexpr):
        # The codes of the tile x and each row's new scale s = max |x| (signed map) or
        # max(x, 0) (unsigned), masked lanes left out (every code 0 where s = 0): signed
        # k = rint(K * u) with u = x / s correctly rounded, negated for x < 0, stored mod
        # 2^BITS; unsigned q = clamp(k - 1, 0, L - 1), k = rint(sqrt(x) * (L / sqrt(s))).
        if SIGNED:
            mag = tl.abs(x)
        else:
            mag = tl.where(x > 0, x, 0.0)
        mag = tl.where(mask, mag, 0.0)
        s = tl.reduce(mag, 1, _MAX)
        sb = tl.broadcast_to(s[:, None], mag.shape)
        pos = sb > 0
        if SIGNED:
            u = tl.where(pos, tl.div_rn(mag, tl.where(pos, sb, 1.0)), 0.0)
            if BITS == 8:
                k = _rint(u * 127.0).to(tl.int32)
            else:
                k = _rint(u * 7.0).to(tl.int32)
            k = tl.where(x < 0, -k, k)
            c = k & ((1 << BITS) - 1)
        else:
            # L / sqrt(s) once per row (block), then broadcast: the same bits as per element
            if BITS == 8:
                lv = tl.full(s.shape, 256.0, tl.float32)
            else:
                lv = tl.full(s.shape, 16.0, tl.float32)
            cs_row = tl.div_rn(lv, tl.sqrt_rn(tl.where(s > 0, s, 1.0)))
            cs = tl.broadcast_to(cs_row[:, None], mag.shape)
            k = _rint(tl.sqrt_rn(mag) * cs).to(tl.int32)
            c = tl.where(pos, k - 1, 0)
            c = tl.where(c < 0, 0, c)
            c = tl.where(c > (1 << BITS) - 1, (1 << BITS) - 1, c)
        return c, s

    @triton.jit
    def _qload(col, scol, t, quant, offs, boffs, mask, bmask, blk, rmask,
               SIGNED: tl.constexpr, ROWS: tl.constexpr, QB: tl.constexpr,
               BITS: tl.constexpr):
        # tensor t's state in this tile as float32: decoded from its codes and block scales
        # (scol's entry), or read as is from float32 state (a tensor the codecs keep in full
        # precision: scol's entry is 0)
        addr = tl.load(col + t)
        if quant:
            s = tl.load(tl.load(scol + t).to(tl.pointer_type(tl.float32)) + blk, mask=rmask,
                        other=0.0)
            x = _decode(_codes_load(addr.to(tl.pointer_type(tl.uint8)), offs, boffs, mask,
                                    bmask, ROWS, QB, BITS), s[:, None], SIGNED, BITS)
        else:
            x = tl.load(addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
        return x

    @triton.jit
    def _qstore(col, scol, t, quant, x, offs, boffs, mask, bmask, blk, rmask,
                SIGNED: tl.constexpr, ROWS: tl.constexpr, QB: tl.constexpr,
                BITS: tl.constexpr):
        # store x as _qload reads it; returns what the next step will read (the decoded
        # codes, or x itself)
        addr = tl.load(col + t)
        if quant:
            c, s = _encode(x, mask, SIGNED, BITS)
            _codes_store(addr.to(tl.pointer_type(tl.uint8)), c, offs, boffs, mask, bmask,
                         ROWS, QB, BITS)
            tl.store(tl.load(scol + t).to(tl.pointer_type(tl.float32)) + blk, s, mask=rmask)
            y = _decode(c, s[:, None], SIGNED, BITS)
        else:
            tl.store(addr.to(tl.pointer_type(tl.float32)) + offs, x, mask=mask)
            y = x
        return y

    @triton.jit
    def _rmsprop_q_kernel(tab_ptr, qtab_ptr, grad_ptrs, hyper_ptr, lr_ptr, c_ptr, scale_ptr,
                          stats_ptr, stats_bits_ptr, gate_ptr, n, nchunks, p_like,
                          GATED: tl.constexpr,
                          CENTERED: tl.constexpr, MOMENTUM: tl.constexpr,
                          WD_COUPLED: tl.constexpr, DECOUPLED: tl.constexpr,
                          NESTEROV: tl.constexpr, EPS_IN_SQRT: tl.constexpr,
                          LR_IN_MOMENTUM: tl.constexpr, STATS: tl.constexpr,
                          BITS: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr,
                          QB: tl.constexpr):
        # The step over block-quantized state (rmsprop.codecs): one program per chunk of one
        # tensor as _rmsprop_kernel, in tiles of ROWS whole blocks of QB elements (chunks
        # start on block boundaries, so a block is one program's). Each tile is decoded,
        # updated by _update, and encoded with its new block scales. With centered, v is
        # stored as w = max(v - m'^2, 0) (m' the new grad_avg as decoded) and read back as
        # w + m^2. Tensors whose scale entry (qtab column V) is 0 keep float32 state.
        t, start, end = _chunk(tab_ptr, n, nchunks, CHUNK)
        p_ptr, g_ptr = _pointer(tab_ptr, t, p_like), _pointer(grad_ptrs, t, p_like)
        quant = tl.load(qtab_ptr + t) != 0
        T = tl.float32
        (lr, alpha, eps, wd, mu, invc, gmul, pdecay, oma, lerp_small,
         lerp_w) = _consts(hyper_ptr, lr_ptr, c_ptr, scale_ptr, T)
        if STATS:
            acc_g = tl.full((ROWS, QB), 0.0, T)
            acc_u = tl.full((ROWS, QB), 0.0, T)
            acc_p = tl.full((ROWS, QB), 0.0, T)
            acc_lo = tl.full((ROWS, QB), float("inf"), T)
            acc_hi = tl.full((ROWS, QB), float("-inf"), T)
            acc_dom = tl.full((ROWS, QB), 0.0, T)
        if GATED:  # a check found inf or NaN: an empty range, nothing is written
            end = tl.where(tl.load(gate_ptr) != 0, start, end)
        rows = tl.arange(0, ROWS)
        for lo in range(start, end, ROWS * QB):
            offs = lo + rows[:, None] * QB + tl.arange(0, QB)[None, :]
            mask = offs < end
            boffs = lo // 2 + rows[:, None] * (QB // 2) + tl.arange(0, QB // 2)[None, :]
            bmask = boffs * 2 < end  # 4-bit tensors have even sizes
            blk = lo // QB + rows
            rmask = lo + rows * QB < end
            v = _qload(tab_ptr + n, qtab_ptr, t, quant, offs, boffs, mask, bmask, blk, rmask,
                       False, ROWS, QB, BITS)
            m = v
            b = v
            if CENTERED:
                m = _qload(tab_ptr + 2 * n, qtab_ptr + n, t, quant, offs, boffs, mask, bmask,
                           blk, rmask, True, ROWS, QB, BITS)
                v = tl.where(quant, v + m * m, v)
            if MOMENTUM:
                b = _qload(tab_ptr + 3 * n, qtab_ptr + 2 * n, t, quant, offs, boffs, mask,
                           bmask, blk, rmask, True, ROWS, QB, BITS)
            g = _load(g_ptr, offs, mask, T)
            p_old = _load(p_ptr, offs, mask, T)
            g, p, v, m, b, s, sq, d = _update(
                g, p_old, v, m, b, lr, alpha, eps, wd, mu, invc, gmul, pdecay, oma, lerp_small,
                lerp_w, CENTERED, MOMENTUM, WD_COUPLED, DECOUPLED, NESTEROV, EPS_IN_SQRT,
                LR_IN_MOMENTUM, False)
            _store(p_ptr + offs, p, mask)
            if CENTERED:
                md = _qstore(tab_ptr + 2 * n, qtab_ptr + n, t, quant, m, offs, boffs, mask,
                             bmask, blk, rmask, True, ROWS, QB, BITS)
                w = v - md * md
                v = tl.where(quant, tl.where(w < 0, 0.0, w), v)  # NaN is kept
            _qstore(tab_ptr + n, qtab_ptr, t, quant, v, offs, boffs, mask, bmask, blk, rmask,
                    False, ROWS, QB, BITS)
            if MOMENTUM:
                _qstore(tab_ptr + 3 * n, qtab_ptr + 2 * n, t, quant, b, offs, boffs, mask,
                        bmask, blk, rmask, True, ROWS, QB, BITS)
            if STATS:
                acc_g, acc_u, acc_p, acc_lo, acc_hi, acc_dom = _stats_add(
                    acc_g, acc_u, acc_p, acc_lo, acc_hi, acc_dom, mask, g, p_old, p, p_ptr, s,
                    sq, d, lr, eps, EPS_IN_SQRT, False)
        if STATS:
            _stats_flush(stats_ptr, stats_bits_ptr, t, acc_g, acc_u, acc_p, acc_lo, acc_hi,
                         acc_dom)

    @triton.jit
    def _codec_kernel(x_ptr, codes_ptr, scales_ptr, n, ENCODE: tl.constexpr,
                      SIGNED: tl.constexpr, BITS: tl.constexpr, ROWS: tl.constexpr,
                      QB: tl.constexpr):
        # The step's codecs alone over one flat float32 array (tests against
        # rmsprop.codecs): ROWS blocks per program, encoded into codes and scales, or decoded
        rows = tl.arange(0, ROWS)
        lo = tl.program_id(0) * ROWS * QB
        offs = lo + rows[:, None] * QB + tl.arange(0, QB)[None, :]
        mask = offs < n
        boffs = lo // 2 + rows[:, None] * (QB // 2) + tl.arange(0, QB // 2)[None, :]
        bmask = boffs * 2 < n
        blk = lo // QB + rows
        rmask = lo + rows * QB < n
        if ENCODE:
            c, s = _encode(tl.load(x_ptr + offs, mask=mask, other=0.0), mask, SIGNED, BITS)
            _codes_store(codes_ptr, c, offs, boffs, mask, bmask, ROWS, QB, BITS)
            tl.store(scales_ptr + blk, s, mask=rmask)
        else:
            s = tl.load(scales_ptr + blk, mask=rmask, other=0.0)
            c = _codes_load(codes_ptr, offs, boffs, mask, bmask, ROWS, QB, BITS)
            tl.store(x_ptr + offs, _decode(c, s[:, None], SIGNED, BITS), mask=mask)

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
    (never a pageable one, which waits for the device).

    ``scales`` (three columns ``VS, MS, BS`` of ``n`` data pointers) makes it a table of
    block-quantized state for :func:`launch_quantized`: ``V``, ``M``, ``B`` then point at
    uint8 codes and ``VS``, ``MS``, ``BS`` at their float32 block scales, or, where an entry
    of ``VS`` is 0, at the float32 state of a tensor the codecs keep in full precision."""

    def __init__(self, ptrs: Sequence[Sequence[int]], numels: Sequence[int],
                 device: Any, scales: Sequence[Sequence[int]] | None = None) -> None:
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
        self.chunk = CHUNK
        # block-quantized state (launch_quantized): the scales' pointers [VS | MS | BS], 0
        # for a tensor whose state is float32
        self.qstatic = None
        if scales is not None:
            qhost = np.zeros(3 * n, dtype=np.int64)
            for k, col in enumerate(scales):
                qhost[k * n:(k + 1) * n] = np.asarray(col, dtype=np.uint64).view(np.int64)
            self.qstatic = torch.from_numpy(qhost).to(device)
        self._pin = torch.device(device).type == "cuda"
        self._mirror = np.zeros(n + HYPER_SLOTS, dtype=np.int64)
        self._mirror_t = torch.from_numpy(self._mirror)  # the mirror's memory, as a tensor
        self.dyn = torch.zeros(n + HYPER_SLOTS, dtype=torch.int64, device=device)
        self.hyper = self.dyn[n:].view(torch.float64)
        # the c and scale slots as the kernels take them (a view made once, not per launch)
        self.hyper_c, self.hyper_scale = self.hyper[5:], self.hyper[7:]
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


def _slot(table: Table, hyper: Any, k: int, value: Any) -> Any:
    """What the kernel reads for slot ``k`` (5: ``c``, 7: the scale): ``value``, a device
    tensor, if given, else ``hyper[k:]`` (the table's own view when ``hyper`` is its own)."""
    if value is not None:
        return value
    if hyper is table.hyper:
        return table.hyper_c if k == 5 else table.hyper_scale
    return hyper[k:]


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
    _rmsprop_kernel[(table.nchunks,)](
        table.static, grads, hyper, hyper if lr is None else lr,
        _slot(table, hyper, 5, c), _slot(table, hyper, 7, scale), st, sb,
        hyper if gate is None else gate, table.n, table.nchunks, p_like, s_like,
        GATED=gate is not None, **flags, CHUNK=CHUNK, BLOCK=BLOCK, **_exact())


#: ``state_dtype`` -> (bits per code, elements per block scale): the formats of
#: :data:`rmsprop.codecs.QUANTIZED` (``u8``/``s8`` or ``u4``/``s4``).
QFORMATS = {"8bit": (8, 256), "4bit": (4, 128)}
#: Elements per tile of the quantized kernel (``QTILE // block`` whole blocks).
QTILE = 1024


def launch_quantized(table: Table, grads: Any, hyper: Any, p_like: Any, flags: dict,
                     state_dtype: str, stats: Any = None, gate: Any = None, lr: Any = None,
                     c: Any = None, scale: Any = None) -> None:
    """:func:`launch` over a table of block-quantized state (a :class:`Table` built with
    ``scales``) in the formats of ``state_dtype`` (``"8bit"``, ``"4bit"``): each block is
    decoded, updated by the float kernel's arithmetic (float32; ``p_like`` a float32,
    float16 or bfloat16 param) and encoded with its new scale, as
    :func:`rmsprop.spec.step` with quantized state. ``flags`` are :func:`launch`'s
    (``MATH64``, if present, must be False); ``stats``, ``gate``, ``lr``, ``c``, ``scale``
    as there."""
    if table.qstatic is None:
        raise ValueError("launch_quantized: the table has no block scales (Table(..., "
                         "scales=...))")
    if state_dtype not in QFORMATS:
        raise ValueError(f"launch_quantized: state_dtype must be one of "
                         f"{', '.join(QFORMATS)}, got {state_dtype!r}")
    flags = dict(flags)
    if flags.pop("MATH64", False):
        raise TypeError("launch_quantized: quantized state needs float32 math (float32, "
                        "float16 or bfloat16 params)")
    bits, block = QFORMATS[state_dtype]
    if table.chunk % QTILE or QTILE % block:  # chunks must start on block boundaries
        raise ValueError(f"launch_quantized: chunks of {table.chunk} elements are not whole "
                         f"tiles of {QTILE}")
    if stats is not None:
        _reset_stats(stats)
    if table.nchunks == 0:
        return
    if stats is not None:
        st, sb = stats, stats.view(__import__("torch").int64)
    else:
        st = sb = hyper
    _rmsprop_q_kernel[(table.nchunks,)](
        table.static, table.qstatic, grads, hyper, hyper if lr is None else lr,
        _slot(table, hyper, 5, c), _slot(table, hyper, 7, scale), st, sb,
        hyper if gate is None else gate, table.n, table.nchunks, p_like,
        GATED=gate is not None, **flags, BITS=bits, CHUNK=table.chunk, ROWS=QTILE // block,
        QB=block, **_exact())


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


def fused_step_quantized(params: Sequence[Any], grads: Sequence[Any],
                         square_avgs: Sequence[Any], grad_avgs: Sequence[Any] | None,
                         momentum_buffers: Sequence[Any] | None, *,
                         square_avg_scales: Sequence[Any | None],
                         grad_avg_scales: Sequence[Any | None] | None = None,
                         momentum_buffer_scales: Sequence[Any | None] | None = None,
                         lr: float, alpha: float, eps: float, weight_decay: float,
                         momentum: float, centered: bool, maximize: bool, eps_in_sqrt: bool,
                         lr_in_momentum: bool, nesterov: bool, decoupled_weight_decay: bool,
                         bias_correction: float, grad_scale: float | None = None,
                         stats: Any = None, state_dtype: str = "8bit") -> None:
    """One RMSProp step (:func:`rmsprop.spec.step` with ``state_dtype="8bit"`` or ``"4bit"``)
    over CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``) in one launch, with
    block-quantized state updated in place: arguments, layouts and checks exactly as
    :func:`rmsprop.kernels.cpu.fused_step_quantized` (without ``nthreads``); the codes are
    :func:`rmsprop.codecs.encode`'s bit for bit, the arithmetic that of :func:`fused_step`
    (float32; the same operations as the CPU kernel's)."""
    if triton is None:
        raise RuntimeError(f"the fused Triton kernel is unavailable: {_reason}")
    import torch
    if state_dtype not in QFORMATS:
        raise ValueError(f"fused Triton step: state_dtype must be one of "
                         f"{', '.join(QFORMATS)}, got {state_dtype!r}")
    bits, block = QFORMATS[state_dtype]
    per_byte = 8 // bits
    n = len(params)
    centered, use_mom = state_flags("Triton", centered, grad_avgs, momentum, momentum_buffers)
    if grad_scale is not None and not (grad_scale > 0):
        raise ValueError(f"fused Triton step: grad_scale must be > 0, got {grad_scale}")
    if n == 0:
        if stats is not None and tuple(stats.shape) != (0, 6):
            raise ValueError("fused Triton step: stats must have shape (0, 6)")
        return
    device = params[0].device
    pdtype = params[0].dtype
    if pdtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"fused Triton step: quantized state needs float32, float16 or "
                        f"bfloat16 params, not {pdtype} (float64 math keeps full-precision "
                        "state)")
    if stats is not None and (stats.dtype != torch.float64 or tuple(stats.shape) != (n, 6)
                              or not stats.is_contiguous() or stats.device != device):
        raise ValueError(f"fused Triton step: stats must be a contiguous float64 tensor of "
                         f"shape ({n}, 6) on {device}")
    # checked here, before any pointer is taken: a wrong list would corrupt memory
    numels = [t.numel() for t in params]
    P = _check(params, "params", n, pdtype, numels, device)
    G = _check(grads, "grads", n, pdtype, numels, device)
    place = f"tensor on {device}"
    V, VS = quantized_pointers("Triton", square_avgs, square_avg_scales, "square_avgs", numels,
                               block, per_byte, device, place)
    quant = [s is not None for s in square_avg_scales]
    cols = {}
    for needed, codes, scales, name in ((centered, grad_avgs, grad_avg_scales, "grad_avgs"),
                                        (use_mom, momentum_buffers, momentum_buffer_scales,
                                         "momentum_buffers")):
        if not needed:
            continue
        if scales is None or [s is not None for s in scales] != quant:
            raise ValueError(f"fused Triton step: {name} must be quantized exactly where "
                             "square_avgs is (give its scales, None for float32 state)")
        cols[name] = quantized_pointers("Triton", codes, scales,  # type: ignore[arg-type]
                                        name, numels, block, per_byte, device, place)
    M, MS = cols.get("grad_avgs", (V, VS))
    B, BS = cols.get("momentum_buffers", (V, VS))
    from ..torch._plan import hyper_of, pack
    on, values = pack(hyper_of(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                               momentum=momentum, centered=centered, maximize=maximize,
                               eps_in_sqrt=eps_in_sqrt, lr_in_momentum=lr_in_momentum,
                               nesterov=nesterov,
                               decoupled_weight_decay=decoupled_weight_decay,
                               bias_correction=bias_correction, grad_scale=grad_scale))
    table = Table((P, V, M, B), numels, device, scales=(VS, MS, BS))
    sign = -1.0 if "MAXIMIZE" in on else 1.0
    gdev, hyper = table.upload(G, [*values[:6], sign * values[6], 1.0])
    launch_quantized(table, gdev, hyper, params[0], kernel_flags(on, stats is not None),
                     state_dtype, stats)


def kernel_flags(on: Any, stats: bool, math64: bool = False) -> dict[str, bool]:
    """The step kernels' option constants from :func:`rmsprop.torch._plan.pack`'s set of
    flags that are on (``MAXIMIZE`` is the sign of the gradient multiplier, not a flag)."""
    return dict(CENTERED="CENTERED" in on, MOMENTUM="MOMENTUM" in on,
                WD_COUPLED="WD_COUPLED" in on, DECOUPLED="DECOUPLED" in on,
                NESTEROV="NESTEROV" in on, EPS_IN_SQRT="EPS_IN_SQRT" in on,
                LR_IN_MOMENTUM="LR_IN_MOMENTUM" in on, STATS=stats, MATH64=math64)


def _codec_args(fmt: str, n: int) -> tuple[int, int, bool]:
    from ..codecs import FORMATS
    if fmt not in FORMATS:
        raise ValueError(f"quantized codec: fmt must be one of {', '.join(FORMATS)}, "
                         f"got {fmt!r}")
    f = FORMATS[fmt]
    if f.bits == 4 and n % 2:
        raise ValueError(f"quantized codec: {fmt} needs an even element count, got {n}")
    return f.bits, f.block, f.signed


def quant_encode(x: Any, fmt: str) -> tuple[Any, Any]:
    """The step kernel's own block encoder on its own: the codes (uint8) and block scales
    (float32) of the flat float32 tensor ``x`` in the :mod:`rmsprop.codecs` format ``fmt``
    (``"u8"``, ``"s8"``, ``"u4"``, ``"s4"``), laid out as :class:`rmsprop.codecs.Quantized`'s.
    For tests against :func:`rmsprop.codecs.encode`."""
    if triton is None:
        raise RuntimeError(f"the fused Triton kernel is unavailable: {_reason}")
    import torch
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise TypeError("quant_encode: x must be a float32 tensor")
    x = x.reshape(-1).contiguous()
    n = x.numel()
    bits, block, signed = _codec_args(fmt, n)
    codes = torch.empty(n * bits // 8, dtype=torch.uint8, device=x.device)
    scales = torch.empty(-(-n // block), dtype=torch.float32, device=x.device)
    if n:
        _codec_kernel[(-(-n // QTILE),)](x, codes, scales, n, ENCODE=True, SIGNED=signed,
                                        BITS=bits, ROWS=QTILE // block, QB=block, **_exact())
    return codes, scales


def quant_decode(codes: Any, scales: Any, fmt: str, n: int) -> Any:
    """The step kernel's own block decoder on its own: the ``n`` float32 values that
    ``codes`` and ``scales`` (as :func:`quant_encode` returns them) stand for. For tests
    against :func:`rmsprop.codecs.decode`."""
    if triton is None:
        raise RuntimeError(f"the fused Triton kernel is unavailable: {_reason}")
    import torch
    bits, block, signed = _codec_args(fmt, n)
    if (not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8
            or not codes.is_contiguous() or codes.numel() != n * bits // 8):
        raise ValueError(f"quant_decode: codes must be a contiguous uint8 tensor of "
                         f"{n * bits // 8} bytes")
    if (not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32
            or not scales.is_contiguous() or scales.numel() != -(-n // block)
            or scales.device != codes.device):
        raise ValueError(f"quant_decode: scales must be a contiguous float32 tensor of "
                         f"{-(-n // block)} blocks on the codes' device")
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    if n:
        _codec_kernel[(-(-n // QTILE),)](out, codes, scales, n, ENCODE=False, SIGNED=signed,
                                        BITS=bits, ROWS=QTILE // block, QB=block, **_exact())
    return out


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
