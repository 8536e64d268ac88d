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
bit-identical to torch on both paths. Callers pass real (``view_as_real``) tensors in the
math dtype, decoded from the state's codec (see :mod:`rmsprop.torch._codecs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor

__all__ = ["Hyper", "rule", "denominator", "single_tensor_step", "foreach_step", "TENSOR",
           "LISTS"]

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
    fresh = s is not v or h.c != 1.0  # s is a temporary of this function
    if h.eps_in_sqrt:
        d = ops.sqrt(ops.add_scalar(s, h.eps, inplace=False), inplace=not grad)
        return (s, d, d) if parts else d
    sq = ops.sqrt(s, inplace=fresh and not grad and not parts)
    d = ops.add_scalar(sq, h.eps, inplace=not grad and not parts and sq is not s)
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
