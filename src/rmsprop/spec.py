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
otherwise (one rounding to a ``float16``/``bfloat16`` param at the end). State is kept in the
dtype it was created with (:func:`init_state`'s ``state_dtype``). Complex params are treated
as pairs of reals (``v`` per component), as ``torch.optim`` does.
"""

from __future__ import annotations

from typing import Any, Mapping, TypedDict

import numpy as np

from .options import Options

__all__ = ["State", "init_state", "step", "math_dtype"]


class State(TypedDict, total=False):
    step: int
    square_avg: np.ndarray
    grad_avg: np.ndarray
    momentum_buffer: np.ndarray


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
               state_dtype: Any = None) -> State:
    """The state before the first step: ``v`` filled with ``initial_square_avg``, ``m`` and
    ``b`` with zeros (only when centered / momentum > 0), ``step = 0``."""
    o = options if isinstance(options, Options) else Options(**options)
    shape = _real(np.asarray(param)).shape
    dtype = np.dtype(state_dtype) if state_dtype is not None else _real(np.asarray(param)).dtype
    state: State = {"step": 0,
                    "square_avg": np.full(shape, o.initial_square_avg, dtype=dtype)}
    if o.centered:
        state["grad_avg"] = np.zeros(shape, dtype=dtype)
    if o.momentum > 0:
        state["momentum_buffer"] = np.zeros(shape, dtype=dtype)
    return state


def step(param: np.ndarray, grad: np.ndarray, state: State,
         options: Options | Mapping[str, Any]) -> tuple[np.ndarray, State]:
    """One RMSProp step (the formula in the module docstring). Pure: returns the new param and a
    new state; the inputs are not modified. Missing ``grad_avg`` / ``momentum_buffer`` entries
    (an option switched on mid-run) start from zeros."""
    o = options if isinstance(options, Options) else Options(**options)
    param = np.asarray(param)
    p_real = _real(param)
    f = math_dtype(p_real.dtype)
    p = p_real.astype(f)
    g = _real(np.asarray(grad)).astype(f)
    if g.shape != p.shape:
        raise ValueError(f"grad shape {g.shape} does not match param shape {p.shape}")
    v = state["square_avg"].astype(f)
    t = int(state.get("step", 0)) + 1
    lr, alpha, eps, wd, mu = (f.type(o.lr), f.type(o.alpha), f.type(o.eps),
                              f.type(o.weight_decay), f.type(o.momentum))
    one = f.type(1)

    if o.maximize:
        g = -g
    if wd != 0:
        if o.decoupled_weight_decay:
            p = p * (one - lr * wd)
        else:
            g = g + wd * p
    v = alpha * v + (one - alpha) * g * g
    new: State = {"step": t}
    c = (one - alpha ** t) if o.bias_correction else one
    if o.centered:
        m = state.get("grad_avg")
        m = np.zeros_like(p) if m is None else m.astype(f)
        m = alpha * m + (one - alpha) * g
        s = np.maximum(v / c - (m / c) * (m / c), f.type(0))
        new["grad_avg"] = m.astype(_dtype_of(state, "grad_avg", state["square_avg"]))
    else:
        s = v / c
    d = np.sqrt(s + eps) if o.eps_in_sqrt else np.sqrt(s) + eps
    n = g / d
    if mu > 0:
        b = state.get("momentum_buffer")
        b = np.zeros_like(p) if b is None else b.astype(f)
        k = lr if o.lr_in_momentum else one
        b = mu * b + k * n
        u = mu * b + k * n if o.nesterov else b
        if not o.lr_in_momentum:
            u = lr * u
        new["momentum_buffer"] = b.astype(_dtype_of(state, "momentum_buffer",
                                                    state["square_avg"]))
    else:
        u = lr * n
    p = p - u
    new["square_avg"] = v.astype(state["square_avg"].dtype)
    out = p.astype(p_real.dtype)
    if np.iscomplexobj(param):
        out = out.view(param.dtype).reshape(param.shape)
    return out, new


def _dtype_of(state: State, key: str, fallback: np.ndarray) -> np.dtype:
    x = state.get(key)
    return (x if x is not None else fallback).dtype
