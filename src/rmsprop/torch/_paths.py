"""The rule on torch tensors, written once: :func:`rule` and :func:`denominator`.

Each is a translation of :func:`rmsprop.spec.step` (see its docstring for the formula)::

    g = g * inv_scale;  g = -g if maximize;  g += wd*p  (or p *= 1 - lr*wd, decoupled)
    v = alpha*v + (1 - alpha)*g^2;  m = lerp(m, g, 1 - alpha)                 (centered)
    s = max(v/c - (m/c)^2, 0) (centered) or v/c;  d = sqrt(s) + eps  (or sqrt(s + eps))
    b = mu*b + k*g/d;  p -= lr*b (or b with lr_in_momentum; nesterov: mu*b + k*g/d)
    else p -= lr*g/d

The same function runs over one tensor (the for-loop path, the ground truth, and the
statistics' denominator) or over lists with ``torch._foreach_*`` (the foreach path): an
``ops`` object supplies each operation for one or the other. The op sequence is
``torch.optim.RMSprop``'s for the options torch has, so the ``pytorch`` preset is
bit-identical to torch on both paths. :func:`rule` takes real (``view_as_real``) tensors in
the math dtype; :func:`apply_unfused` runs either path over params and their state, decoding
and encoding the state through its codec (see :mod:`rmsprop.torch._codecs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union, cast

import torch
from torch import Tensor

from ._codecs import math_dtype, real

__all__ = ["Hyper", "rule", "denominator", "single_tensor_step", "foreach_step", "TENSOR",
           "LISTS", "apply_unfused", "FOREACH_BATCH"]

Tensors = Union[Tensor, list[Tensor]]  # noqa: UP007 (a runtime alias)


@dataclass(frozen=True)
class Hyper:
    """The per-group option values a path needs, with ``lr`` already a float (or a Tensor when
    ``differentiable``) and ``c`` the bias-correction divisor ``1 - alpha^t`` (1.0 when off)."""

    lr: float
    alpha: float
    eps: float
    weight_decay: float
    momentum: float
    centered: bool
    maximize: bool
    eps_in_sqrt: bool
    lr_in_momentum: bool
    nesterov: bool
    decoupled_weight_decay: bool
    c: float
    inv_scale: float = 1.0  # GradScaler's 1/scale, applied to g first (unscaling in the step)


class _TensorOps:
    """The rule's operations on one tensor."""

    @staticmethod
    def mul(x: Tensor, k: float) -> Tensor:
        return x * k

    @staticmethod
    def neg(x: Tensor) -> Tensor:
        return -x

    @staticmethod
    def mul_(x: Tensor, k: float) -> None:
        x.mul_(k)

    @staticmethod
    def add(x: Tensor, y: Tensor, alpha: float) -> Tensor:
        return x.add(y, alpha=alpha)

    @staticmethod
    def add_(x: Tensor, y: Tensor, alpha: float) -> None:
        x.add_(y, alpha=alpha)

    @staticmethod
    def addcmul_(x: Tensor, a: Tensor, b: Tensor, value: float) -> None:
        x.addcmul_(a, b, value=value)

    @staticmethod
    def addcmul(x: Tensor, a: Tensor, b: Tensor, value: float) -> Tensor:
        return x.addcmul(a, b, value=value)

    @staticmethod
    def addcdiv_(x: Tensor, a: Tensor, b: Tensor, value: float) -> None:
        x.addcdiv_(a, b, value=value)

    @staticmethod
    def lerp_(x: Tensor, y: Tensor, w: float) -> None:
        x.lerp_(y, w)

    @staticmethod
    def div(x: Tensor, k: float) -> Tensor:
        return x / k

    @staticmethod
    def clamp0(x: Tensor, inplace: bool) -> Tensor:
        return x.clamp_(min=0) if inplace else x.clamp(min=0)

    @staticmethod
    def sqrt(x: Tensor, inplace: bool) -> Tensor:
        return x.sqrt_() if inplace else x.sqrt()

    @staticmethod
    def add_scalar(x: Tensor, k: float, inplace: bool) -> Tensor:
        return x.add_(k) if inplace else x.add(k)


class _ListOps:
    """The same operations over lists of tensors, one ``torch._foreach_*`` call each."""

    @staticmethod
    def mul(x: list[Tensor], k: float) -> list[Tensor]:
        return list(torch._foreach_mul(x, k))

    @staticmethod
    def neg(x: list[Tensor]) -> list[Tensor]:
        return list(torch._foreach_neg(x))

    @staticmethod
    def mul_(x: list[Tensor], k: float) -> None:
        torch._foreach_mul_(x, k)

    @staticmethod
    def add(x: list[Tensor], y: list[Tensor], alpha: float) -> list[Tensor]:
        return list(torch._foreach_add(x, y, alpha=alpha))

    @staticmethod
    def add_(x: list[Tensor], y: list[Tensor], alpha: float) -> None:
        torch._foreach_add_(x, y, alpha=alpha)

    @staticmethod
    def addcmul_(x: list[Tensor], a: list[Tensor], b: list[Tensor], value: float) -> None:
        torch._foreach_addcmul_(x, a, b, value=value)

    @staticmethod
    def addcmul(x: list[Tensor], a: list[Tensor], b: list[Tensor], value: float
                ) -> list[Tensor]:
        return list(torch._foreach_addcmul(x, a, b, value=value))

    @staticmethod
    def addcdiv_(x: list[Tensor], a: list[Tensor], b: list[Tensor], value: float) -> None:
        torch._foreach_addcdiv_(x, a, b, value=value)

    @staticmethod
    def lerp_(x: list[Tensor], y: list[Tensor], w: float) -> None:
        torch._foreach_lerp_(x, y, w)

    @staticmethod
    def div(x: list[Tensor], k: float) -> list[Tensor]:
        return list(torch._foreach_div(x, k))

    @staticmethod
    def clamp0(x: list[Tensor], inplace: bool) -> list[Tensor]:
        if not inplace:
            return list(torch._foreach_clamp_min(x, 0))
        torch._foreach_clamp_min_(x, 0)
        return x

    @staticmethod
    def sqrt(x: list[Tensor], inplace: bool) -> list[Tensor]:
        if not inplace:
            return list(torch._foreach_sqrt(x))
        torch._foreach_sqrt_(x)
        return x

    @staticmethod
    def add_scalar(x: list[Tensor], k: float, inplace: bool) -> list[Tensor]:
        if not inplace:
            return list(torch._foreach_add(x, k))
        torch._foreach_add_(x, k)
        return x


TENSOR: Any = _TensorOps
LISTS: Any = _ListOps


def denominator(ops: Any, v: Tensors, m: Tensors | None, h: Hyper, *,
                parts: bool = False) -> Any:
    """``d`` of the rule (``v``, ``m`` are not modified): ``sqrt(s) + eps`` or
    ``sqrt(s + eps)`` with ``s = max(v/c - (m/c)^2, 0)`` (centered) or ``v/c``.
    With ``parts`` returns ``(s, sqrt-term, d)`` (what the statistics need), else ``d``.

    Temporaries are updated in place unless autograd records the step (``differentiable``:
    in-place ops would overwrite values its backward needs) or ``parts`` keeps them."""
    grad = torch.is_grad_enabled()
    if h.c != 1.0:
        v = ops.div(v, h.c)
        m = ops.div(m, h.c) if m is not None else None
    s = ops.clamp0(ops.addcmul(v, m, m, -1), inplace=not grad) if m is not None else v
    # whether s is a temporary of this function, and whether sqrt overwrites it; told from
    # the options, not by comparing the lists (torch 2.11's dynamo cannot trace `is` on two
    # lists, and a graph break here made it run the whole step half eager)
    fresh = m is not None or h.c != 1.0
    if h.eps_in_sqrt:
        d = ops.sqrt(ops.add_scalar(s, h.eps, inplace=False), inplace=not grad)
        return (s, d, d) if parts else d
    sqrt_in_place = fresh and not grad and not parts
    sq = ops.sqrt(s, inplace=sqrt_in_place)
    d = ops.add_scalar(sq, h.eps, inplace=not grad and not parts and not sqrt_in_place)
    return (s, sq, d) if parts else d


def rule(ops: Any, p: Tensors, g: Tensors, v: Tensors, m: Tensors | None,
         b: Tensors | None, h: Hyper) -> None:
    """One step, in place on ``p``, ``v``, ``m`` (centered), ``b`` (momentum); ``g`` is read.
    ``ops`` is :data:`TENSOR` (one tensor each) or :data:`LISTS` (lists of tensors)."""
    if h.inv_scale != 1.0:
        g = ops.mul(g, h.inv_scale)
    if h.maximize:
        g = ops.neg(g)
    if h.weight_decay != 0:
        if h.decoupled_weight_decay:
            ops.mul_(p, 1 - h.lr * h.weight_decay)
        else:
            g = ops.add(g, p, h.weight_decay)
    ops.mul_(v, h.alpha)
    ops.addcmul_(v, g, g, 1 - h.alpha)
    if m is not None:
        ops.lerp_(m, g, 1 - h.alpha)
    d = denominator(ops, v, m, h)
    if b is not None:
        k = h.lr if h.lr_in_momentum else 1.0
        ops.mul_(b, h.momentum)
        ops.addcdiv_(b, g, d, k)
        scale = 1.0 if h.lr_in_momentum else h.lr
        if h.nesterov:
            ops.add_(p, b, -scale * h.momentum)
            ops.addcdiv_(p, g, d, -scale * k)
        else:
            ops.add_(p, b, -scale)
    else:
        ops.addcdiv_(p, g, d, -h.lr)


def single_tensor_step(p: Tensor, g: Tensor, v: Tensor, m: Tensor | None,
                       b: Tensor | None, h: Hyper) -> None:
    """:func:`rule` on one tensor (the for-loop path)."""
    rule(TENSOR, p, g, v, m, b, h)


def foreach_step(ps: list[Tensor], gs: list[Tensor], vs: list[Tensor],
                 ms: list[Tensor] | None, bs: list[Tensor] | None, h: Hyper) -> None:
    """:func:`rule` over lists with ``torch._foreach_*`` (the foreach path)."""
    rule(LISTS, ps, gs, vs, ms, bs, h)


# -- the for-loop and foreach paths over state read through codecs ----------------------------

#: Elements per batch of the foreach path: on the CPU a batch's arrays fit the last-level
#: cache; on a GPU a batch is large enough that launches stay few.
FOREACH_BATCH = {"cpu": 1 << 20, "cuda": 1 << 26}


def apply_unfused(ps: list[Tensor], sts: list[dict], h: Hyper, path: str,
                  codec: Any) -> None:
    """The for-loop or foreach path. The math runs in the spec's dtype (float64 for float64
    params, float32 otherwise): params and gradients in another dtype are computed on as
    float copies and rounded back once; state is decoded and encoded by its codec.

    The foreach path runs over batches of at most ``FOREACH_BATCH[device]`` elements
    (long tensors cut into flat slices at multiples of the codec's block): its
    temporaries (the denominator, and the float copies) then stay bounded instead of
    model-sized, and on the CPU a batch's passes run in cache. Every operation is
    elementwise, so the result does not depend on the batching."""
    keys = [key for key, on in (("square_avg", True), ("grad_avg", h.centered),
                                ("momentum_buffer", h.momentum > 0)) if on]
    # rows of (param, grad, state or a slice of it, offset of the slice in the param)
    rows: list[tuple[Tensor, Tensor, Any, int]] = [
        (real(p), real(cast(Tensor, p.grad)), st, _first_index(p, st))
        for p, st in zip(ps, sts)]
    if path != "foreach" or torch.compiler.is_compiling():
        return _unfused(rows, keys, h, path, codec)
    limit = FOREACH_BATCH.get(rows[0][0].device.type, FOREACH_BATCH["cuda"])
    limit = max(codec.block, limit // codec.block * codec.block)
    batch: list[tuple] = []
    size = 0
    for row in rows:
        p, g, st, _ = row
        n = p.numel()
        parts = [row]
        if n > limit and p.is_contiguous() and g.is_contiguous():
            cut = [(lo, min(lo + limit, n)) for lo in range(0, n, limit)]
            subs = [_slice_state(codec, keys, st, lo, hi) for lo, hi in cut]
            if all(sub is not None for sub in subs):
                parts = [(p.view(-1)[lo:hi], g.view(-1)[lo:hi], sub, row[3] + lo)
                         for (lo, hi), sub in zip(cut, subs)]
        for part in parts:
            if size and size + part[0].numel() > limit:
                _unfused(batch, keys, h, path, codec)
                batch, size = [], 0
            batch.append(part)
            size += part[0].numel()
    if batch:
        _unfused(batch, keys, h, path, codec)

def _first_index(p: Tensor, st: dict) -> int:
    """The element index of ``p``'s first local element for its rounding bits: 0, or a
    sharded param's shard offset (:func:`_quantized.shard_offset`)."""
    if "sr_seed" not in st or not hasattr(p, "to_local"):
        return 0
    from . import _quantized
    return _quantized.shard_offset(p)


def _slice_state(codec: Any, keys: list[str], st: dict, lo: int, hi: int) -> dict | None:
    """One dict with every key's entries for elements [lo, hi), or None if one cannot be
    cut (the step count and a stochastic-rounding seed come along)."""
    sub = {k: st[k] for k in ("step", "sr_seed") if k in st}
    for key in keys:
        part = codec.slice(key, st, lo, hi)
        if part is None:
            return None
        sub.update(part)
    return sub

def _unfused(rows: list[tuple], keys: list[str], h: Hyper, path: str, codec: Any) -> None:
    """The rule over ``rows`` of (param, grad, state, offset): params and grads real
    tensors, the state (a slice of) a state dict read and written through ``codec``."""
    ps = [r[0] for r in rows]
    f = math_dtype(ps[0].dtype)
    pw = [t if t.dtype == f else t.to(f) for t in ps]
    gw = [r[1] if r[1].dtype == f else r[1].to(f) for r in rows]
    decode_all = getattr(codec, "decode_all", None)
    vals = []
    for p, (_, _, st, _) in zip(ps, rows):
        d = decode_all(st, keys, f) if decode_all is not None else {
            key: codec.decode(key, st, f) for key in keys}
        # a codec may decode to a flat tensor: viewed, in-place math still writes it
        vals.append({k: v if v.shape == p.shape else v.view(p.shape) for k, v in d.items()})
    vs = [v["square_avg"] for v in vals]
    ms = [v["grad_avg"] for v in vals] if h.centered else None
    bs = [v["momentum_buffer"] for v in vals] if h.momentum > 0 else None
    if path == "foreach":
        foreach_step(pw, gw, vs, ms, bs, h)
    else:
        for i in range(len(pw)):
            single_tensor_step(pw[i], gw[i], vs[i], ms[i] if ms else None,
                                      bs[i] if bs else None, h)
    for (t, _, st, offset), w in zip(rows, pw):
        if "sr_seed" in st and t.dtype in (torch.float16, torch.bfloat16):
            from . import _quantized  # the stochastic rounding of 16-bit params
            _quantized.sr_write_(t, w, int(st["sr_seed"]), int(st["step"]), offset)
        elif w is not t:
            t.copy_(w)
    encode_all = getattr(codec, "encode_all_", None)
    for (_, _, st, _), val in zip(rows, vals):
        if encode_all is not None:
            encode_all(st, val)
        else:
            for key in keys:
                codec.encode_(key, st, val[key])
