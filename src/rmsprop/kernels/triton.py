"""The fused RMSProp step as a Triton kernel, for CUDA tensors.

Same semantics and signature as :func:`rmsprop.kernels.cpu.fused_step` (the rule is
:func:`rmsprop.spec.step`): one pass per tensor that reads each input once and writes each
output once, float32 math for float32/float16/bfloat16 params (16-bit values rounded once,
to nearest even, when stored) and float64 math for float64; IEEE-rounded ``sqrt`` and division
(``sqrt_rn``/``div_rn``), so results agree with the CPU kernel to a few ulp. Every option of the
rule is a compile-time constant, so each combination is its own specialised kernel.

Hyperparameters travel in a small float64 tensor on the device (not as kernel arguments, which
Triton would narrow to float32) and are rounded to the math precision inside the kernel, as
``spec.step`` does. With ``TRITON_INTERPRET=1`` the kernel also runs on CPU tensors (tests).
"""

from __future__ import annotations

from . import state_flags

import os
from typing import Any, Sequence

__all__ = ["available", "unavailable_reason", "fused_step", "first_nonfinite"]

_reason: str | None = None
try:
    import triton
    import triton.language as tl
except Exception as e:  # noqa: BLE001 - any import failure means "no Triton here"
    triton = None
    tl = None
    _reason = f"triton is not importable: {type(e).__name__}: {e}"

BLOCK = 1024


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

    # Reductions through tl.reduce with our own combine functions rather than tl.sum/min/max:
    # those are @jit functions of triton.language, decorated when triton is imported, so a
    # process that imported triton before setting TRITON_INTERPRET=1 could not interpret them.
    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _min(a, b):
        return tl.where(a < b, a, b)

    @triton.jit
    def _max(a, b):
        return tl.where(a > b, a, b)

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
    def _rmsprop_kernel(p_ptr, g_ptr, v_ptr, m_ptr, b_ptr, h_ptr, stats_ptr, stats_bits_ptr,
                        n, row,
                        CENTERED: tl.constexpr, MOMENTUM: tl.constexpr,
                        WD_COUPLED: tl.constexpr, DECOUPLED: tl.constexpr,
                        NESTEROV: tl.constexpr, EPS_IN_SQRT: tl.constexpr,
                        LR_IN_MOMENTUM: tl.constexpr, STATS: tl.constexpr,
                        MATH64: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        if MATH64:
            T = tl.float64
        else:
            T = tl.float32
        # hyper: lr, alpha, eps, wd, mu, c, gmul (sign / grad_scale), each rounded to T once
        lr = tl.load(h_ptr + 0).to(T)
        alpha = tl.load(h_ptr + 1).to(T)
        eps = tl.load(h_ptr + 2).to(T)
        wd = tl.load(h_ptr + 3).to(T)
        mu = tl.load(h_ptr + 4).to(T)
        c = tl.load(h_ptr + 5).to(T)
        gmul = tl.load(h_ptr + 6).to(T)
        one = tl.full((), 1.0, T)
        oma = one - alpha
        invc = _div(one, c, MATH64)

        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(T) * gmul
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(T)
        if WD_COUPLED:
            g = g + wd * p
        if DECOUPLED:
            p = p * (one - lr * wd)
        v = alpha * tl.load(v_ptr + offs, mask=mask, other=0.0).to(T) + oma * g * g
        _store(v_ptr + offs, v, mask)
        if CENTERED:
            mm = alpha * tl.load(m_ptr + offs, mask=mask, other=0.0).to(T) + oma * g
            _store(m_ptr + offs, mm, mask)
            mc = mm * invc
            s = v * invc - mc * mc
            s = tl.where(s < 0, 0.0, s)  # NaN < 0 is false: NaN is kept
        else:
            s = v * invc
        if EPS_IN_SQRT:
            sq = _sqrt(s + eps, MATH64)
            d = sq
        else:
            sq = _sqrt(s, MATH64)
            d = sq + eps
        nrm = _div(g, d, MATH64)
        if MOMENTUM:
            if LR_IN_MOMENTUM:
                k = lr
            else:
                k = one
            b = mu * tl.load(b_ptr + offs, mask=mask, other=0.0).to(T) + k * nrm
            _store(b_ptr + offs, b, mask)
            if NESTEROV:
                u = mu * b + k * nrm
            else:
                u = b
            if not LR_IN_MOMENTUM:
                u = lr * u
        else:
            u = lr * nrm
        p = p - u
        _store(p_ptr + offs, p, mask)
        if STATS:
            base = stats_ptr + row * 6
            tl.atomic_add(base + 0, tl.reduce(tl.where(mask, g * g, 0.0), 0, _add).to(tl.float64))
            tl.atomic_add(base + 1, tl.reduce(tl.where(mask, u * u, 0.0), 0, _add).to(tl.float64))
            tl.atomic_add(base + 2, tl.reduce(tl.where(mask, p * p, 0.0), 0, _add).to(tl.float64))
            r = _div(lr * one + 0.0 * d, d, MATH64)
            rmin = tl.reduce(tl.where(mask, r, float("inf")), 0, _min).to(tl.float64)
            rmax = tl.reduce(tl.where(mask, r, float("-inf")), 0, _max).to(tl.float64)
            # lr/d >= 0, and non-negative IEEE floats order like their bit patterns
            bits = stats_bits_ptr + row * 6
            tl.atomic_min(bits + 3, rmin.to(tl.int64, bitcast=True))
            tl.atomic_max(bits + 4, rmax.to(tl.int64, bitcast=True))
            if EPS_IN_SQRT:
                dom = eps > s
            else:
                dom = eps > sq
            cnt = tl.reduce(tl.where(mask & dom, 1.0, 0.0), 0, _add)
            tl.atomic_add(base + 5, cnt.to(tl.float64))

    @triton.jit
    def _nonfinite_kernel(x_ptr, n, flag_ptr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        bad = mask & ((x != x) | (x == float("inf")) | (x == float("-inf")))
        tl.atomic_max(flag_ptr, tl.reduce(bad.to(tl.int32), 0, _max))


_SUPPORTED = ("float32", "float64", "float16", "bfloat16")


def _check(tensors: Sequence[Any], name: str, n: int, dtype: Any, numels: list[int],
           device: Any) -> None:
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


def fused_step(params: Sequence[Any], grads: Sequence[Any], square_avgs: Sequence[Any],
               grad_avgs: Sequence[Any] | None, momentum_buffers: Sequence[Any] | None, *,
               lr: float, alpha: float, eps: float, weight_decay: float, momentum: float,
               centered: bool, maximize: bool, eps_in_sqrt: bool, lr_in_momentum: bool,
               nesterov: bool, decoupled_weight_decay: bool, bias_correction: float,
               grad_scale: float | None = None, stats: Any = None) -> None:
    """One RMSProp step over CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``), one
    kernel launch per non-empty tensor; arguments, state dtypes, ``grad_scale`` and ``stats``
    exactly as :func:`rmsprop.kernels.cpu.fused_step`."""
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
    numels = [t.numel() for t in params]
    _check(params, "params", n, pdtype, numels, device)
    _check(grads, "grads", n, pdtype, numels, device)
    _check(square_avgs, "square_avgs", n, sdtype, numels, device)
    if centered:
        _check(grad_avgs, "grad_avgs", n, sdtype, numels, device)
    if use_mom:
        _check(momentum_buffers, "momentum_buffers", n, sdtype, numels, device)
    inv = 1.0 if grad_scale is None else 1.0 / float(grad_scale)
    # AMP's inverse scale is a float32 number; the sign of maximize is exact either way
    gmul = (-inv if maximize else inv)
    hyper = torch.tensor([lr, alpha, eps, weight_decay, momentum, bias_correction, gmul],
                         dtype=torch.float64, device=device)
    if stats is not None:
        stats.zero_()
        stats[:, 3] = float("inf")
        stats[:, 4] = float("-inf")
        stats_bits = stats.view(torch.int64)
    else:
        stats_bits = None
    flags = dict(CENTERED=centered, MOMENTUM=use_mom,
                 WD_COUPLED=weight_decay != 0 and not decoupled_weight_decay,
                 DECOUPLED=weight_decay != 0 and bool(decoupled_weight_decay),
                 NESTEROV=bool(nesterov) and use_mom, EPS_IN_SQRT=bool(eps_in_sqrt),
                 LR_IN_MOMENTUM=bool(lr_in_momentum), STATS=stats is not None,
                 MATH64=pdtype == torch.float64, BLOCK=BLOCK)
    for i in range(n):
        if numels[i] == 0:
            continue
        v = square_avgs[i]
        m = grad_avgs[i] if centered else v
        b = momentum_buffers[i] if use_mom else v
        st = stats if stats is not None else hyper
        sb = stats_bits if stats_bits is not None else hyper
        grid = (triton.cdiv(numels[i], BLOCK),)
        _rmsprop_kernel[grid](params[i], grads[i], v, m, b, hyper, st, sb, numels[i], i,
                              **flags)


def first_nonfinite(grads: Sequence[Any]) -> int:
    """Index of the first tensor holding an inf or NaN, -1 if none (``None`` entries are
    skipped; complex tensors are checked component-wise). One device sync at the end."""
    if triton is None:
        raise RuntimeError(f"the fused Triton kernel is unavailable: {_reason}")
    import torch
    live = [(i, g) for i, g in enumerate(grads) if g is not None and g.numel() > 0]
    if not live:
        return -1
    flags = torch.zeros(len(live), dtype=torch.int32, device=live[0][1].device)
    for j, (_, g) in enumerate(live):
        if g.is_complex():
            g = torch.view_as_real(g)
        if not g.is_contiguous():
            raise ValueError(f"first_nonfinite: grads[{live[j][0]}] is not contiguous")
        _nonfinite_kernel[(triton.cdiv(g.numel(), BLOCK),)](g, g.numel(), flags[j:j + 1],
                                                             BLOCK=BLOCK)
    hit = torch.nonzero(flags).flatten()
    return -1 if hit.numel() == 0 else live[int(hit[0])][0]
