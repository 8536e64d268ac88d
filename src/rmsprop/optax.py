"""RMSProp as optax ``GradientTransformation``s: every option of the rule, optax's names.

Two transformations, both composing with :func:`optax.chain`:

* :func:`scale_by_rmsprop` -- the building block (like ``optax.scale_by_rms`` /
  ``optax.scale_by_stddev``): turns a gradient ``g`` into ``g / d`` with ``d`` the rule's
  denominator, keeping the moving averages in its state.
* :func:`rmsprop` -- the whole rule of :func:`rmsprop.spec.step` (weight decay, maximize,
  centered, bias correction, momentum in both conventions, Nesterov) as one transformation that
  returns the update to add with :func:`optax.apply_updates`. With its defaults it is
  ``optax.rmsprop``; ``preset=`` selects any of :data:`rmsprop.presets.PRESETS`.

Argument names follow optax where optax has the option (``learning_rate``, ``decay``,
``eps_in_sqrt``, ``initial_scale``, ``nesterov``, ``bias_correction``); the others keep the
names of :class:`rmsprop.options.Options` (``weight_decay``, ``decoupled_weight_decay``,
``lr_in_momentum``, ``maximize``). The state names are optax's: ``nu`` (the square average
``v``), ``mu`` (the gradient average ``m``, centered only), ``trace`` (the momentum buffer
``b``), ``count`` (steps taken).

Differences from ``optax.rmsprop`` (all deliberate, all from :mod:`rmsprop.spec`):

* the arithmetic runs in float32 for narrower parameters (bfloat16/float16) and in float64 for
  float64 ones, with one rounding of the update to the gradient dtype, while optax rounds every
  intermediate to the parameter dtype; the state keeps the parameter dtype (as in optax) unless
  ``state_dtype`` says otherwise (a dtype, or ``"8bit"``/``"4bit"``: quantized state with the
  codes :mod:`rmsprop.codecs` defines, each leaf a :class:`QuantizedLeaf`);
* centered: ``v - m^2`` is clamped at 0 before ``eps`` is added (optax takes ``rsqrt`` of a
  tiny negative number under a constant gradient and returns NaN);
* complex parameters are treated as pairs of reals (one ``v`` per component, as ``torch.optim``
  and the spec do; optax keeps one ``v = |g|^2`` per complex entry).

JAX and optax are an optional extra (``pip install 'rmsprop[jax]'``); only this module imports
them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, TypeAlias

try:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("rmsprop.optax needs JAX and optax: pip install 'rmsprop[jax]'") from exc

from . import codecs as _codecs
from .options import validate
from .presets import PRESETS, resolve_preset

__all__ = [
    "OPTAX_DEFAULTS",
    "QuantizedLeaf",
    "RMSPropState",
    "ScaleByRmsPropState",
    "rmsprop",
    "scale_by_rmsprop",
]

Schedule: TypeAlias = Callable[[jax.Array], Any]
ScalarOrSchedule: TypeAlias = float | jax.Array | Schedule

#: The defaults of :func:`rmsprop` without a preset: ``optax.rmsprop``'s (optax 0.2.8), which
#: is also the ``"optax"`` preset. Keys are this module's argument names.
OPTAX_DEFAULTS: Mapping[str, Any] = MappingProxyType(dict(
    decay=0.9, eps=1e-8, eps_in_sqrt=True, initial_scale=0.0, centered=False, momentum=0.0,
    nesterov=False, bias_correction=False, lr_in_momentum=True, weight_decay=0.0,
    decoupled_weight_decay=False, maximize=False))

# argument name here -> field of rmsprop.options.Options
_TO_OPTIONS = {"learning_rate": "lr", "decay": "alpha", "initial_scale": "initial_square_avg"}
_FROM_OPTIONS = {v: k for k, v in _TO_OPTIONS.items()}

_INT32_MAX = np.iinfo(np.int32).max


class ScaleByRmsPropState(NamedTuple):
    """State of :func:`scale_by_rmsprop`."""

    count: jax.Array  #: int32, steps taken (saturates at 2**31 - 1 instead of wrapping)
    nu: optax.Updates  #: square average ``v``
    mu: optax.Updates | None  #: gradient average ``m`` (centered only, else ``None``)


class RMSPropState(NamedTuple):
    """State of :func:`rmsprop`."""

    count: jax.Array  #: int32, steps taken (saturating); the schedule is evaluated at it
    nu: optax.Updates  #: square average ``v``
    mu: optax.Updates | None  #: gradient average ``m`` (centered only, else ``None``)
    #: momentum buffer ``b`` (``None`` without momentum): holds ``lr * g / d`` sums when
    #: ``lr_in_momentum`` (optax's ``trace``, up to its sign), ``g / d`` sums otherwise (torch)
    trace: optax.Updates | None


# --------------------------------------------------------------------------- helpers

def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, np.generic)


def _maybe_nonzero(x: Any) -> bool:
    """Static decision whether an option is on. An array (what ``inject_hyperparams`` passes)
    counts as on whatever its value, so that changing it later in the injected state takes
    effect: with value 0 the extra work is an exact no-op."""
    if _is_array(x):
        return True
    return float(x) != 0.0


def _check(hp: Mapping[str, Any]) -> None:
    """:func:`rmsprop.options.validate` on the values known now (traced values are skipped:
    they were validated when the state was built)."""
    known = {}
    for name, value in hp.items():
        if value is None or callable(value) or _is_tracer(value):
            continue
        key = _TO_OPTIONS.get(name, name)
        if _is_array(value) and np.ndim(value) == 0:
            value = float(value)
        known[key] = value
    if "nesterov" in known and "momentum" not in known:
        del known["nesterov"]  # momentum is traced: cannot check it now
    try:
        validate(known)
    except ValueError as exc:  # speak optax's names in the message
        message = str(exc)
        for ours, theirs in (("alpha", "decay"), ("initial_square_avg", "initial_scale")):
            message = message.replace(ours, theirs)
        raise ValueError(message) from None


def _safe_increment(count: jax.Array) -> jax.Array:
    return jnp.where(count < _INT32_MAX, count + 1, count).astype(jnp.int32)


def _math_dtype(dtype: Any) -> Any:
    """float64 math for float64/complex128, float32 for everything narrower (the spec)."""
    real = jnp.finfo(dtype).dtype if jnp.issubdtype(dtype, jnp.inexact) else jnp.float32
    return jnp.float64 if real == jnp.float64 else jnp.float32


def _real(x: jax.Array) -> jax.Array:
    """Complex arrays as (..., 2) reals: the rule treats the components independently."""
    if jnp.iscomplexobj(x):
        return jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    return x


def _unreal(y: jax.Array, like_dtype: Any) -> jax.Array:
    """Inverse of :func:`_real`, cast to ``like_dtype``."""
    if jnp.issubdtype(like_dtype, jnp.complexfloating):
        real = jnp.finfo(like_dtype).dtype
        return jax.lax.complex(y[..., 0].astype(real), y[..., 1].astype(real))
    return y.astype(like_dtype)


class QuantizedLeaf(NamedTuple):
    """A quantized state leaf (``state_dtype="8bit"``/``"4bit"``): the codes and per-block
    scales of :mod:`rmsprop.codecs`, flat over the parameter's real view."""

    codes: jax.Array  #: uint8 (two 4-bit codes per byte)
    scales: jax.Array  #: float32, one per block


_KEY = {"nu": "square_avg", "mu": "grad_avg", "trace": "momentum_buffer"}


def _q_encode(x: jax.Array, fmt: str) -> QuantizedLeaf:
    """:func:`rmsprop.codecs.encode` in jax.numpy, the same float32 operations."""
    f = _codecs.FORMATS[fmt]
    flat = x.reshape(-1).astype(jnp.float32)
    n = flat.size
    nb = -(-n // f.block)
    rows = jnp.pad(flat, (0, nb * f.block - n)).reshape(nb, f.block)
    mag = jnp.abs(rows) if f.signed else jnp.maximum(rows, jnp.float32(0))
    scales = jnp.max(mag, axis=1)
    safe = jnp.where(scales > 0, scales, jnp.float32(1))[:, None]
    if f.signed:
        u = mag / safe
        k = jnp.round(u * jnp.float32(f.levels))
        k = jnp.where(rows < 0, -k, k)
        codes = jnp.where(k < 0, k + (1 << f.bits), k).astype(jnp.uint8)
    else:
        c = jnp.float32(f.levels) / jnp.sqrt(safe)
        q = jnp.clip(jnp.round(jnp.sqrt(mag) * c) - 1, 0, f.levels - 1)
        codes = jnp.where(scales[:, None] > 0, q, 0).astype(jnp.uint8)
    codes = codes.reshape(-1)
    if f.bits == 4:
        codes = codes[: n + n % 2]
        if n % 2:
            codes = codes.at[-1].set(0)
        codes = codes[0::2] | (codes[1::2] << 4)
    else:
        codes = codes[:n]
    return QuantizedLeaf(codes, scales)


def _q_decode(leaf: QuantizedLeaf, fmt: str, n: int) -> jax.Array:
    """The flat float32 values of a quantized leaf with ``n`` elements."""
    f = _codecs.FORMATS[fmt]
    codes = leaf.codes
    if f.bits == 4:
        codes = jnp.stack([codes & 0x0F, codes >> 4], axis=1).reshape(-1)[:n]
    table = jnp.asarray(_codecs.signed_table(f.bits) if f.signed
                        else _codecs.unsigned_table(f.levels))
    s = jnp.repeat(leaf.scales.astype(jnp.float32), f.block)[:n]
    return s * table[codes.astype(jnp.int32)]


def _quantized(state_dtype: Any) -> str | None:
    """The quantized format name of ``state_dtype``, or None for a dtype (refused unless
    floating or complex: an integer ``v`` would truncate to 0 at every step)."""
    if isinstance(state_dtype, str):
        if state_dtype not in _codecs.QUANTIZED:
            raise ValueError(f"Invalid state_dtype: {state_dtype!r} (a dtype or one of "
                             f"{', '.join(map(repr, _codecs.QUANTIZED))})")
        return state_dtype
    if state_dtype is not None:
        try:
            ok = jnp.issubdtype(state_dtype, jnp.inexact)
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"Invalid state_dtype: {state_dtype!r} (a floating or complex "
                             f"dtype, or one of {', '.join(map(repr, _codecs.QUANTIZED))})")
    return None


def _check_leaf(i: int, g: Any, p: Any, state: Mapping[str, Any], family: str | None) -> None:
    """Raise naming leaf ``i`` when its gradient, param or state cannot be stepped: a
    gradient that is not floating or complex, a param of another shape or kind, a state leaf
    shaped for another param, or quantized state of another size or format (shapes and
    dtypes are static, so this holds under ``jit``)."""
    if not jnp.issubdtype(g.dtype, jnp.inexact):
        raise TypeError(f"update leaf {i}: gradients must be floating point or complex, got "
                        f"{g.dtype}")
    if p is not None and (jnp.shape(p) != g.shape
                          or jnp.iscomplexobj(p) != jnp.iscomplexobj(g)):
        raise ValueError(f"update leaf {i}: gradient {g.shape} {g.dtype} does not fit param "
                         f"{jnp.shape(p)} {jnp.result_type(p)}")
    n = g.size * (2 if jnp.iscomplexobj(g) else 1)
    for which, leaf in state.items():
        if leaf is None:
            continue
        if isinstance(leaf, QuantizedLeaf):
            fam = "8bit" if leaf.codes.size == n else "4bit" if leaf.codes.size == -(-n // 2) \
                else None
            block = _codecs.FORMATS[_codecs.QUANTIZED[fam or "8bit"][_KEY[which]]].block
            if fam is None or leaf.scales.size != -(-n // block) \
                    or leaf.codes.dtype != jnp.uint8:
                raise ValueError(f"update leaf {i}: quantized {which} ({leaf.codes.size} codes, "
                                 f"{leaf.scales.size} scales) is not the state of {n} "
                                 "elements; build the state with init()")
            if family is not None and fam != family:
                raise ValueError(f"update leaf {i}: {which} holds {fam} codes, this "
                                 f"transformation uses state_dtype={family!r}")
        elif jnp.shape(leaf) != g.shape or not jnp.issubdtype(jnp.result_type(leaf),
                                                              jnp.inexact):
            raise ValueError(f"update leaf {i}: {which} {jnp.shape(leaf)} "
                             f"{jnp.result_type(leaf)} is not the state of a {g.shape} "
                             "parameter; build the state with init()")


def _fmt(leaf: QuantizedLeaf, which: str, n: int) -> str:
    """The format of a quantized leaf, from its code count (8 bits: one per element)."""
    family = "8bit" if leaf.codes.size == n else "4bit"
    return _codecs.QUANTIZED[family][_KEY[which]]


def _open(leaf: Any, which: str, like: jax.Array, f: Any, mu: Any = None) -> jax.Array:
    """A state leaf as the real array of ``like``'s shape in the math dtype ``f``; a quantized
    ``nu`` beside a quantized ``mu`` holds ``w`` and decodes as ``w + m'^2``."""
    if not isinstance(leaf, QuantizedLeaf):
        return _real(leaf).astype(f)
    n = like.size
    x = _q_decode(leaf, _fmt(leaf, which, n), n)
    if which == "nu" and isinstance(mu, QuantizedLeaf):
        m = _q_decode(mu, _fmt(mu, "mu", n), n)
        x = x + m * m
    return x.reshape(like.shape).astype(f)


def _save(value: jax.Array, leaf: Any, which: str, m_new: Any = None) -> Any:
    """``value`` (real, math dtype) stored like ``leaf``; a quantized ``nu`` with the new
    quantized ``mu`` stored as ``w = max(v - m'^2, 0)``."""
    if not isinstance(leaf, QuantizedLeaf):
        return _unreal(value, leaf.dtype)
    n = value.size
    fmt = _fmt(leaf, which, n)
    flat = value.reshape(-1).astype(jnp.float32)
    if which == "nu" and isinstance(m_new, QuantizedLeaf):
        m = _q_decode(m_new, _fmt(m_new, "mu", n), n)
        flat = jnp.maximum(flat - m * m, jnp.float32(0))
    return _q_encode(flat, fmt)


def _state_leaf(p: jax.Array, fill: Any, state_dtype: Any, which: str = "nu") -> Any:
    name = _quantized(state_dtype)
    if name is not None:
        n = p.size * (2 if jnp.iscomplexobj(p) else 1)
        if _codecs.quantizes(n, name):
            return _q_encode(jnp.full((n,), fill, jnp.float32),
                             _codecs.QUANTIZED[name][_KEY[which]])
        full = jnp.float64 if _math_dtype(p.dtype) == jnp.float64 else jnp.float32
        if jnp.iscomplexobj(p):
            full = jnp.complex128 if full == jnp.float64 else jnp.complex64
        return _state_leaf(p, fill, full)
    if jnp.iscomplexobj(p):
        if state_dtype is not None and not jnp.issubdtype(state_dtype, jnp.complexfloating):
            raise ValueError(f"state_dtype={jnp.dtype(state_dtype).name} cannot hold the state "
                             f"of a complex parameter ({p.dtype}); pass a complex dtype")
        dtype = state_dtype or p.dtype
        real = jnp.finfo(dtype).dtype
        fill = jnp.asarray(fill, real)
        return jax.lax.complex(jnp.full(p.shape, fill, real), jnp.full(p.shape, fill, real))
    dtype = p.dtype if state_dtype is None else state_dtype
    return jnp.full(p.shape, jnp.asarray(fill, dtype), dtype)


def _as(x: Any, f: Any) -> jax.Array:
    return jnp.asarray(x, dtype=f)


def _direction(g, nu, mu, *, decay, eps, eps_in_sqrt, centered, t):
    """``n = g / d`` and the new averages, everything real and in the math dtype ``g.dtype``.

    v = decay*v + (1-decay)*g^2 ; m = decay*m + (1-decay)*g ; c = 1 - decay^t (when ``t``)
    s = max(v/c - (m/c)^2, 0) if centered else v/c ; d = sqrt(s+eps) or sqrt(s)+eps
    """
    f = g.dtype
    one = _as(1, f)
    decay = _as(decay, f)
    nu = decay * nu + (one - decay) * g * g
    c = None if t is None else one - decay ** t.astype(f)
    if centered:
        mu = decay * mu + (one - decay) * g
        if c is None:
            s = jnp.maximum(nu - mu * mu, _as(0, f))
        else:
            s = jnp.maximum(nu / c - (mu / c) * (mu / c), _as(0, f))
    else:
        s = nu if c is None else nu / c
    eps = _as(eps, f)
    d = jnp.sqrt(s + eps) if eps_in_sqrt else jnp.sqrt(s) + eps
    return g / d, nu, mu


def _flatten_like(treedef, tree, n):
    return [None] * n if tree is None else treedef.flatten_up_to(tree)


# --------------------------------------------------------------------------- building block

def scale_by_rmsprop(
    decay: float | jax.Array = 0.9,
    eps: float | jax.Array = 1e-8,
    eps_in_sqrt: bool = True,
    initial_scale: float | jax.Array = 0.0,
    centered: bool = False,
    bias_correction: bool = False,
    *,
    state_dtype: Any = None,
) -> optax.GradientTransformation:
    """Scale updates by the rule's denominator: ``g -> g / d`` (no learning rate, no sign flip).

    With ``v = decay*v + (1-decay)*g^2`` (``v`` starts at ``initial_scale``),
    ``m = decay*m + (1-decay)*g`` (``centered``), ``c = 1 - decay^t`` (``bias_correction``,
    else 1), ``s = max(v/c - (m/c)^2, 0)`` if centered else ``v/c``, and
    ``d = sqrt(s + eps)`` (``eps_in_sqrt``, optax's default) or ``sqrt(s) + eps`` (PyTorch).
    ``scale_by_rmsprop(centered=False)`` is ``optax.scale_by_rms`` and ``centered=True`` is
    ``optax.scale_by_stddev`` (plus a clamp at 0), computed in float32 (float64 for float64
    inputs) with the state in the parameter dtype or ``state_dtype``.

    Example, PyTorch-style RMSProp with gradient clipping::

        tx = optax.chain(optax.clip_by_global_norm(1.0),
                         scale_by_rmsprop(decay=0.99, eps_in_sqrt=False),
                         optax.scale_by_learning_rate(1e-2))

    Raises:
        ValueError: an invalid option (the message of :func:`rmsprop.options.validate`).
    """
    _check(dict(decay=decay, eps=eps, initial_scale=initial_scale, eps_in_sqrt=eps_in_sqrt,
                centered=centered, bias_correction=bias_correction))
    family = _quantized(state_dtype)

    def init_fn(params: optax.Params) -> ScaleByRmsPropState:
        nu = jax.tree.map(lambda p: _state_leaf(p, initial_scale, state_dtype), params)
        mu = (jax.tree.map(lambda p: _state_leaf(p, 0.0, state_dtype, "mu"), params)
              if centered else None)
        return ScaleByRmsPropState(count=jnp.zeros([], jnp.int32), nu=nu, mu=mu)

    def update_fn(updates, state: ScaleByRmsPropState, params=None):
        del params
        if (state.mu is None) == centered:
            raise ValueError("the state does not match this transformation (grad average "
                             f"{'missing' if centered else 'present'}); build it with init()")
        count = _safe_increment(state.count)
        leaves, treedef = jax.tree.flatten(updates)
        nus = treedef.flatten_up_to(state.nu)
        mus = _flatten_like(treedef, state.mu, len(leaves))
        for i, (g, nu, mu) in enumerate(zip(leaves, nus, mus)):
            _check_leaf(i, g, None, {"nu": nu, "mu": mu}, family)
        out, new_nu, new_mu = [], [], []
        for g, nu, mu in zip(leaves, nus, mus):
            f = _math_dtype(g.dtype)
            gr = _real(g).astype(f)
            n, nu_f, mu_f = _direction(
                gr, _open(nu, "nu", gr, f, mu),
                None if mu is None else _open(mu, "mu", gr, f),
                decay=decay, eps=eps, eps_in_sqrt=eps_in_sqrt, centered=centered,
                t=count if bias_correction else None)
            out.append(_unreal(n, g.dtype))
            mu_new = None if mu is None else _save(mu_f, mu, "mu")
            new_nu.append(_save(nu_f, nu, "nu", mu_new))
            new_mu.append(mu_new)
        return treedef.unflatten(out), ScaleByRmsPropState(
            count=count, nu=treedef.unflatten(new_nu),
            mu=treedef.unflatten(new_mu) if centered else None)

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------- the whole rule

def _resolve(learning_rate: Any, preset: str | None, given: Mapping[str, Any]) -> dict:
    """Merge, in increasing priority: the defaults (``optax.rmsprop``'s without a preset,
    :class:`Options`' under one), the preset, the arguments that were given."""
    given = {k: v for k, v in given.items() if v is not None}
    if preset is None:
        if learning_rate is None:
            raise ValueError("rmsprop() needs a learning_rate (or a preset that has one, e.g. "
                             "preset='pytorch')")
        return {**OPTAX_DEFAULTS, **given, "learning_rate": learning_rate}
    if not isinstance(preset, str):
        raise ValueError(f"Invalid preset: {preset!r} (expected one of: {', '.join(PRESETS)})")
    overrides = {_TO_OPTIONS.get(k, k): v for k, v in given.items()}
    if learning_rate is not None:
        overrides["lr"] = learning_rate
    from .options import Options
    base = {k: v for k, v in Options().as_dict().items() if k != "lr"}
    merged = {**base, **resolve_preset(preset, overrides)}
    return {_FROM_OPTIONS.get(k, k): v for k, v in merged.items()}


def rmsprop(
    learning_rate: ScalarOrSchedule | None = None,
    decay: float | jax.Array | None = None,
    eps: float | jax.Array | None = None,
    eps_in_sqrt: bool | None = None,
    initial_scale: float | jax.Array | None = None,
    centered: bool | None = None,
    momentum: float | jax.Array | None = None,
    nesterov: bool | None = None,
    bias_correction: bool | None = None,
    lr_in_momentum: bool | None = None,
    weight_decay: float | jax.Array | None = None,
    decoupled_weight_decay: bool | None = None,
    maximize: bool | None = None,
    preset: str | None = None,
    *,
    state_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""RMSProp with every option of :func:`rmsprop.spec.step`; returns updates to *add*.

    Per parameter, at step ``t`` (from 1) with ``lr = learning_rate(count)`` for a schedule
    (``count = t - 1``, as ``optax.scale_by_learning_rate``)::

        g = -grad if maximize else grad
        if weight_decay: decoupled_weight_decay ? p *= 1 - lr*weight_decay
                                                : g += weight_decay*p
        v = decay*v + (1-decay)*g^2 ;  m = decay*m + (1-decay)*g           (centered)
        c = 1 - decay^t if bias_correction else 1
        s = max(v/c - (m/c)^2, 0) if centered else v/c
        d = sqrt(s + eps) if eps_in_sqrt else sqrt(s) + eps ;  n = g/d
        momentum > 0: k = lr if lr_in_momentum else 1 ; b = momentum*b + k*n
                      u = momentum*b + k*n if nesterov else b ; u *= 1 if lr_in_momentum else lr
        else:         u = lr*n
        p -= u

    An argument left at ``None`` takes the preset's value, or without a preset
    ``optax.rmsprop``'s default (:data:`OPTAX_DEFAULTS`: ``decay=0.9``, ``eps=1e-8``,
    ``eps_in_sqrt=True``, ``initial_scale=0``, ``momentum=0`` (``None`` in optax), Nesterov and
    bias correction off, ``lr_in_momentum=True`` -- optax's ``trace`` sits after the learning
    rate --, no weight decay, minimize). So ``rmsprop(lr)`` is ``optax.rmsprop(lr)`` and
    ``rmsprop(preset="pytorch")`` is ``torch.optim.RMSprop()``.

    Args:
        learning_rate: a float, a scalar array or an optax schedule ``count -> lr``. Optional
            only with a preset that has a default (``pytorch``, ``keras``, ``timm``,
            ``graves2013``).
        decay: decay of the square average (``alpha`` in PyTorch, ``rho`` in Keras).
        eps: the denominator's guard.
        eps_in_sqrt: ``sqrt(s + eps)`` (TF, Keras, optax) instead of ``sqrt(s) + eps``.
        initial_scale: the value ``v`` starts from (1 in TF1 and timm).
        centered: Graves 2013: divide by the standard deviation estimate.
        momentum: heavy-ball momentum in ``[0, 1)``; 0 or ``None`` keeps no buffer.
        nesterov: Nesterov momentum as ``optax.trace(nesterov=True)``.
        bias_correction: divide ``v`` and ``m`` by ``1 - decay^t``.
        lr_in_momentum: the buffer sums ``lr * g/d`` (optax, TF, Keras) instead of ``g/d`` with
            ``lr`` applied after (PyTorch); the two differ only when ``lr`` changes.
        weight_decay: L2 factor; coupled (added to the gradient) unless
            ``decoupled_weight_decay``, then ``p *= 1 - lr*weight_decay`` (AdamW-style).
            Needs ``params`` in ``update``.
        decoupled_weight_decay: see ``weight_decay``.
        maximize: ascend instead of descend.
        preset: a name from :data:`rmsprop.presets.PRESETS` (``pytorch``, ``keras``, ``tf1``,
            ``optax``, ``timm``, ``hinton2012``, ``graves2013``).
        state_dtype: dtype of ``nu``/``mu``/``trace`` (default: each parameter's dtype, as
            optax); e.g. ``jnp.float32`` for bfloat16 parameters; or ``"8bit"``/``"4bit"``:
            quantized state as :mod:`rmsprop.codecs` defines it (a leaf is then a
            :class:`QuantizedLeaf` of codes and scales; tensors under 4096 elements keep
            full precision).

    Numeric arguments may be arrays, so the transformation works under
    ``optax.inject_hyperparams`` (an array ``momentum`` or ``weight_decay`` always keeps its
    buffer / term, so it can be changed later in the injected state).

    Raises:
        ValueError: an invalid option, an unknown preset, or a missing learning rate.
    """
    o = _resolve(learning_rate, preset, dict(
        decay=decay, eps=eps, eps_in_sqrt=eps_in_sqrt, initial_scale=initial_scale,
        centered=centered, momentum=momentum, nesterov=nesterov,
        bias_correction=bias_correction, lr_in_momentum=lr_in_momentum,
        weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
        maximize=maximize))
    _check(o)
    family = _quantized(state_dtype)
    lr = o["learning_rate"]
    has_trace = _maybe_nonzero(o["momentum"])
    has_wd = _maybe_nonzero(o["weight_decay"])

    def init_fn(params: optax.Params) -> RMSPropState:
        def fill(value, which):
            return jax.tree.map(lambda p: _state_leaf(p, value, state_dtype, which), params)
        return RMSPropState(count=jnp.zeros([], jnp.int32), nu=fill(o["initial_scale"], "nu"),
                            mu=fill(0.0, "mu") if o["centered"] else None,
                            trace=fill(0.0, "trace") if has_trace else None)

    def update_fn(updates, state: RMSPropState, params=None):
        if has_wd and params is None:
            raise ValueError("rmsprop(weight_decay=...) needs the params: "
                             "call update(grads, state, params)")
        if (state.trace is None) == has_trace:
            raise ValueError("the state does not match this transformation (momentum buffer "
                             f"{'missing' if has_trace else 'present'}); build it with init()")
        if (state.mu is None) == bool(o["centered"]):
            raise ValueError("the state does not match this transformation (grad average "
                             f"{'present' if state.mu is not None else 'missing'}); build it "
                             "with init()")
        count = _safe_increment(state.count)
        lr_now = lr(state.count) if callable(lr) else lr
        leaves, treedef = jax.tree.flatten(updates)
        nus = treedef.flatten_up_to(state.nu)
        mus = _flatten_like(treedef, state.mu, len(leaves))
        trs = _flatten_like(treedef, state.trace, len(leaves))
        ps = _flatten_like(treedef, params, len(leaves))
        for i, (g, nu, mu, tr, p) in enumerate(zip(leaves, nus, mus, trs, ps)):
            _check_leaf(i, g, p, {"nu": nu, "mu": mu, "trace": tr}, family)
        out, new_nu, new_mu, new_tr = [], [], [], []
        for g, nu, mu, tr, p in zip(leaves, nus, mus, trs, ps):
            u, nu_f, mu_f, b_f = _rule_leaf(g, p, nu, mu, tr, lr_now, o, has_wd, count)
            out.append(_unreal(u, g.dtype))
            mu_new = None if mu is None else _save(mu_f, mu, "mu")
            new_nu.append(_save(nu_f, nu, "nu", mu_new))
            new_mu.append(mu_new)
            new_tr.append(None if tr is None else _save(b_f, tr, "trace"))
        return treedef.unflatten(out), RMSPropState(
            count=count, nu=treedef.unflatten(new_nu),
            mu=treedef.unflatten(new_mu) if state.mu is not None else None,
            trace=treedef.unflatten(new_tr) if state.trace is not None else None)

    return optax.GradientTransformation(init_fn, update_fn)


def _rule_leaf(g, p, nu, mu, tr, lr, o, has_wd, count):
    """One leaf of :func:`rmsprop`: the update ``-u`` (minus the decoupled decay) and the new
    state, real and in the math dtype."""
    f = _math_dtype(g.dtype)
    one = _as(1, f)
    lr = _as(lr, f)
    gf = _real(g).astype(f)
    if o["maximize"]:
        gf = -gf
    shrink = None
    if has_wd:
        wd = _as(o["weight_decay"], f)
        pf = _real(p).astype(f)
        if o["decoupled_weight_decay"]:
            shrink = lr * wd * pf  # p*(1 - lr*wd) = p - shrink
        else:
            gf = gf + wd * pf
    n, nu_f, mu_f = _direction(
        gf, _open(nu, "nu", gf, f, mu), None if mu is None else _open(mu, "mu", gf, f),
        decay=o["decay"], eps=o["eps"], eps_in_sqrt=o["eps_in_sqrt"], centered=o["centered"],
        t=count if o["bias_correction"] else None)
    b = None
    if tr is not None:
        mom = _as(o["momentum"], f)
        k = lr if o["lr_in_momentum"] else one
        b_old = _open(tr, "trace", gf, f)
        b = mom * b_old + k * n
        u = mom * b + k * n if o["nesterov"] else b
        if not o["lr_in_momentum"]:
            u = lr * u
        if _is_array(o["momentum"]) or _is_tracer(o["momentum"]):
            # an injected momentum may be 0 now: then the rule leaves the buffer untouched
            # (u = lr*n already holds exactly)
            b = jnp.where(mom > 0, b, b_old)
    else:
        u = lr * n
    update = -u if shrink is None else -shrink - u
    return update, nu_f, mu_f, b
