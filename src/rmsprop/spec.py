"""The RMSProp rule, written once: the NumPy reference every backend is tested against.

One step for one parameter array, with every option of :class:`rmsprop.options.Options`
(``t`` is the step number starting at 1; ``v``, ``m``, ``b`` are the state)::

    g = -grad if maximize else grad
    if weight_decay:
        if decoupled_weight_decay: p = p * (1 - lr*weight_decay)      # AdamW / Keras 3 / timm
        else:                      g = g + weight_decay * p            # L2, PyTorch
    v = alpha*v + (1 - alpha)*g^2                                      # the seed's moving average
    m = alpha*m + (1 - alpha)*g                        (centered)      # Graves 2013 eq. (39)
    c = 1 - alpha^t if bias_correction else 1                          # optax bias_correction
    s = max(v/c - (m/c)^2, 0) if centered else v/c     # clamped: cancellation can make it < 0
    d = sqrt(s + eps) if eps_in_sqrt else sqrt(s) + eps
    n = g / d
    if momentum:
        k = lr if lr_in_momentum else 1                # TF/Keras/optax/timm vs PyTorch
        b = momentum*b + k*n
        u = momentum*b + k*n if nesterov else b        # optax trace(nesterov=True)
        u = u if lr_in_momentum else lr*u
    else:
        u = lr*n
    p = p - u

With the defaults this is the seed's rule, ``v = decay*v + (1-decay)*g^2``,
``p -= lr*g/(sqrt(v)+eps)``, and ``torch.optim.RMSprop`` exactly.

The centered variant clamps ``v - m^2`` at 0 *before* ``eps`` is added: in exact arithmetic
``v >= m^2`` (a variance), but in floating point a (near-)constant gradient makes the difference
a tiny negative number, and ``sqrt`` of it is NaN (torch, optax, Keras and TF do not clamp).

Precision: the arithmetic runs in ``float64`` for ``float64`` params and in ``float32``
otherwise (one rounding to a ``float16``/``bfloat16`` param at the end: to nearest, or
stochastic when the state holds a ``seed``, see :mod:`rmsprop.codecs`). State is kept in the
format it was created with (:func:`init_state`'s ``state_dtype``: a float dtype, or
``"8bit"``/``"4bit"`` quantized state): each state array is decoded to the math dtype, the
step above runs on the decoded values and uses the fresh ``v``, ``m``, ``b`` it computes, and
only then are they encoded for the next step. Complex params are treated as pairs of reals
(``v`` per component), as ``torch.optim`` does.

Rounding order: each line above is evaluated as ``torch.optim.RMSprop`` evaluates it, so that
float32 results (and the quantized codes computed from them) are torch's bit for bit. Scalar
constants (``1 - alpha``, ``1 - lr*weight_decay``, ``1 - alpha^t``, ``lr*momentum``) are
computed in double and rounded once; ``fma(a, b, c)`` is ``a*b + c`` rounded once::

    g = fma(weight_decay, p, g)                     v = fma((1 - alpha)*g, g, alpha*v)
    m = fma(1 - alpha, g - m, m)     (alpha > 1/2; else fma(-(g - m), 1 - (1 - alpha), g))
    s = max(fma(-m/c, m/c, v/c), 0)                 b = momentum*b + (k*g)/d
    p = fma(-lr, b, p)   (nesterov: fma(-lr*momentum, b, p) + (-lr*g)/d; lr_in_momentum: 1
                          in place of lr)           no momentum: p = p + (-lr*g)/d

In float32 the fma is exact (its float64 product, an error-free sum and one rounding); in
float64 it is ``a*b + c`` with two roundings (within an ulp of torch's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

import numpy as np

from . import codecs
from .codecs import Entry
from .options import Options

__all__ = ["State", "init_state", "step", "math_dtype", "steppable"]


class State(TypedDict, total=False):
    step: int
    square_avg: Entry
    grad_avg: Entry
    momentum_buffer: Entry
    seed: int  # present: the 16-bit param is rounded stochastically with this seed


def _real(x: np.ndarray) -> np.ndarray:
    """Complex arrays as interleaved (re, im) reals: the rule treats components independently."""
    if np.iscomplexobj(x):
        x = np.ascontiguousarray(x)
        return x.view(x.real.dtype)
    return x


def math_dtype(dtype: Any) -> np.dtype:
    """float64 math for float64 params, float32 for everything narrower."""
    real = np.empty(0, dtype=dtype).real.dtype
    return np.dtype(np.float64) if real == np.float64 else np.dtype(np.float32)


def init_state(param: np.ndarray, options: Options | Mapping[str, Any], *,
               state_dtype: Any = None, seed: int | None = None) -> State:
    """The state before the first step: ``v`` filled with ``initial_square_avg``, ``m`` and
    ``b`` with zeros (only when centered / momentum > 0), ``step = 0``.

    ``state_dtype``: ``None`` (the param's real dtype), a float dtype (``"bfloat16"`` too), or
    ``"8bit"``/``"4bit"`` (:data:`rmsprop.codecs.QUANTIZED`). ``seed`` (a uint32) turns on
    stochastic rounding of a ``bfloat16``/``float16`` param; other params ignore it."""
    o = options if isinstance(options, Options) else Options(**options)
    real = _real(np.asarray(param))
    shape, dtype = real.shape, real.dtype
    state: State = {"step": 0, "square_avg": codecs.init_entry(
        "square_avg", shape, o.initial_square_avg, state_dtype, dtype)}
    if o.centered:
        state["grad_avg"] = codecs.init_entry("grad_avg", shape, 0.0, state_dtype, dtype)
    if o.momentum > 0:
        state["momentum_buffer"] = codecs.init_entry("momentum_buffer", shape, 0.0,
                                                     state_dtype, dtype)
    if seed is not None and _is_half(dtype):
        if not 0 <= int(seed) < 2 ** 32:
            raise ValueError(f"Invalid seed: {seed!r} (an integer in [0, 2**32))")
        state["seed"] = int(seed)
    return state


def _is_half(dtype: np.dtype) -> bool:
    return dtype == np.float16 or dtype.name == "bfloat16"


def step(param: np.ndarray, grad: np.ndarray, state: State,
         options: Options | Mapping[str, Any]) -> tuple[np.ndarray, State]:
    """One RMSProp step (the formula in the module docstring). Pure: returns the new param and a
    new state; the inputs are not modified. Missing ``grad_avg`` / ``momentum_buffer`` entries
    (an option switched on mid-run) start from zeros; entries of an option switched off are
    kept unchanged, as torch keeps them."""
    o = options if isinstance(options, Options) else Options(**options)
    param, grad = np.asarray(param), np.asarray(grad)
    _check(param, grad, state)
    p_real = _real(param)
    f = math_dtype(p_real.dtype)
    p = p_real.astype(f)
    g = _real(grad).astype(f)
    v = codecs.load(state["square_avg"], f)
    joint = _joint(state)
    if joint:  # square_avg holds w = v - m^2 (see rmsprop.codecs): v = w + m^2
        m_old = codecs.load(state["grad_avg"], f)
        v = v + m_old * m_old
    t = int(state.get("step", 0)) + 1
    lr, alpha, eps, wd, mu = (f.type(o.lr), f.type(o.alpha), f.type(o.eps),
                              f.type(o.weight_decay), f.type(o.momentum))
    one = f.type(1)
    # per-step constants in double, rounded once to the math dtype (as torch passes them)
    oma, decay = f.type(1.0 - o.alpha), f.type(1.0 - o.lr * o.weight_decay)

    fma = _fma32 if f == np.float32 else _fma64
    if o.maximize:
        g = -g
    if wd != 0:
        if o.decoupled_weight_decay:
            p = p * decay
        else:
            g = fma(wd, p, g)
    v = fma(oma * g, g, alpha * v)
    new: State = {"step": t}
    c = f.type(1.0 - o.alpha ** t) if o.bias_correction else one
    if o.centered:
        m = state.get("grad_avg")
        m = np.zeros_like(p) if m is None else codecs.load(m, f)
        if oma < f.type(0.5):
            m = fma(oma, g - m, m)
        else:
            m = fma(-(g - m), one - oma, g)
        vc, mc = (v / c, m / c) if c != one else (v, m)
        s = np.maximum(fma(-mc, mc, vc), f.type(0))
        new["grad_avg"] = _store(m, state, "grad_avg")
    else:
        s = v / c if c != one else v
    d = np.sqrt(s + eps) if o.eps_in_sqrt else np.sqrt(s) + eps
    neg_lr = f.type(-o.lr)
    if mu > 0:
        b = state.get("momentum_buffer")
        b = np.zeros_like(p) if b is None else codecs.load(b, f)
        k = lr if o.lr_in_momentum else one
        b = mu * b + (k * g) / d
        scale = 1.0 if o.lr_in_momentum else o.lr
        if o.nesterov:
            p = fma(f.type(-scale * o.momentum), b, p) + (neg_lr * g) / d
        else:
            p = fma(f.type(-scale), b, p)
        new["momentum_buffer"] = _store(b, state, "momentum_buffer")
    else:
        p = p + (neg_lr * g) / d
    for key in ("grad_avg", "momentum_buffer"):
        if key in state and key not in new:
            new[key] = state[key]
    if isinstance(state["square_avg"], codecs.Quantized) and "grad_avg" in new:
        m_new = codecs.load(new["grad_avg"], f)  # as the next step decodes it
        new["square_avg"] = codecs.store(np.maximum(v - m_new * m_new, f.type(0)),
                                         state["square_avg"])
    else:
        new["square_avg"] = codecs.store(v, state["square_avg"])
    if "seed" in state and _is_half(p_real.dtype):
        new["seed"] = state["seed"]
        r = codecs.random_bits(state["seed"], t, p.size).reshape(p.shape)
        out = codecs.stochastic_round(p.astype(np.float32), p_real.dtype, r)
    else:
        out = p.astype(p_real.dtype)
    if np.iscomplexobj(param):
        out = out.view(param.dtype).reshape(param.shape)
    return out, new


def steppable(dtype: Any) -> bool:
    """Whether :func:`step` takes params (and gradients) of ``dtype``: real floating point
    (``bfloat16`` too) or complex."""
    return codecs.is_float_dtype(dtype) or bool(np.issubdtype(dtype, np.complexfloating))


def _check(param: np.ndarray, grad: np.ndarray, state: Any) -> None:
    """Raise naming what :func:`step` cannot take: a param or grad that is not floating or
    complex, a grad of another shape or kind, or a state that does not fit the param (what
    :func:`init_state` and :func:`step` make: ``square_avg``, optional ``grad_avg`` and
    ``momentum_buffer`` of the param's real shape, all float arrays or all
    :class:`~rmsprop.codecs.Quantized` of one family, unsigned codes for ``square_avg``; a
    step count >= 0; a uint32 ``seed``)."""
    if not steppable(param.dtype):
        raise TypeError(f"param must be floating point or complex, got {param.dtype}")
    if not steppable(grad.dtype) or np.iscomplexobj(grad) != np.iscomplexobj(param):
        raise TypeError(f"grad dtype {grad.dtype} does not fit param dtype {param.dtype}")
    if grad.shape != param.shape:
        raise ValueError(f"grad shape {grad.shape} does not match param shape {param.shape}")
    if not isinstance(state, Mapping) or "square_avg" not in state:
        raise ValueError("state must be a dict holding 'square_avg' (see init_state)")
    shape = _real(param).shape
    families = set()
    for key in ("square_avg", "grad_avg", "momentum_buffer"):
        entry = state.get(key)
        if entry is None:
            continue
        if isinstance(entry, codecs.Quantized):
            why = entry.problem()
            if why is None and tuple(entry.shape) != tuple(shape):
                why = f"stands for shape {tuple(entry.shape)}, the param's is {shape}"
            if why is None and codecs.FORMATS[entry.fmt].signed == (key == "square_avg"):
                why = (f"has format {entry.fmt!r}: square_avg takes an unsigned map, "
                       "grad_avg and momentum_buffer signed ones")
        elif isinstance(entry, (np.ndarray, np.generic)):  # a 0-d param's math gives scalars
            entry = np.asarray(entry)
            why = None
            if not codecs.is_float_dtype(entry.dtype):
                why = f"has dtype {entry.dtype}, not a real floating-point one"
            elif entry.shape != shape:
                why = f"has shape {entry.shape}, the param's real shape is {shape}"
            elif key == "square_avg" and bool(np.any(entry < 0)):
                why = "holds negative values (a mean of squares is >= 0)"
        else:
            why = f"is a {type(entry).__name__}, not an array or codecs.Quantized"
        if why:
            raise ValueError(f"state {key!r} {why}")
        families.add(isinstance(entry, codecs.Quantized))
    if len(families) > 1:
        raise ValueError("state mixes quantized and full-precision entries")
    t = state.get("step", 0)
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0:
        raise ValueError(f"state 'step' must be an integer >= 0, got {t!r}")
    seed = state.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                             or not 0 <= int(seed) < 2 ** 32):
        raise ValueError(f"state 'seed' must be an integer in [0, 2**32), got {seed!r}")


def _fma64(a: Any, b: Any, c: Any) -> np.ndarray:
    return np.asarray(a * b + c)


def _fma32(a: Any, b: Any, c: Any) -> np.ndarray:
    """float32 ``a*b + c`` rounded once: the float64 product is exact (24 + 24 bits), the sum's
    rounding error is recovered exactly (Knuth's two-sum) and, where nonzero, moves the float64
    sum one ulp toward the exact value, so that rounding it to float32 rounds the exact sum."""
    a, b, c = (np.asarray(x, dtype=np.float64) for x in (a, b, c))
    prod = a * b
    total = prod + c
    bb = total - prod
    err = (prod - (total - bb)) + (c - bb)
    with np.errstate(invalid="ignore"):
        nudged = np.where(err != 0, np.nextafter(total, np.where(err > 0, np.inf, -np.inf)),
                          total)
    return nudged.astype(np.float32)


def _joint(state: State) -> bool:
    """Quantized ``square_avg`` beside a ``grad_avg``: it stores the centered moment."""
    return isinstance(state["square_avg"], codecs.Quantized) and "grad_avg" in state


def _store(value: np.ndarray, state: State, key: str) -> Entry:
    """``value`` in the format of ``state[key]``, or (a buffer switched on mid-run) in the
    format family of ``square_avg``."""
    entry: Any = state.get(key)
    if entry is not None:
        return codecs.store(value, entry)
    like = state["square_avg"]
    if isinstance(like, codecs.Quantized):
        return codecs.store(value, like, key)
    return codecs.store(value, like)
