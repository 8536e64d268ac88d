"""The three ways to apply the rule to torch tensors: for-loop (ground truth), foreach, fused.

Each is a translation of :func:`rmsprop.spec.step` (see its docstring for the formula). The
for-loop path uses the same op sequence as ``torch.optim.RMSprop`` for the options torch has, so
the ``pytorch`` preset is bit-identical to torch; the foreach path is the same ops over lists
(bit-identical to the for-loop on CPU). Callers pass real (``view_as_real``) tensors in the math
dtype; see :mod:`rmsprop.torch.optimizer` for dtype handling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["Hyper", "single_tensor_step", "foreach_step"]


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


def _denominator(v: Tensor, m: Optional[Tensor], h: Hyper) -> Tensor:
    """``d`` of the rule, as a new tensor (``v`` and ``m`` are not modified). Out-of-place ops
    when autograd records the step (``differentiable=True``): in-place ones would overwrite
    values its backward needs."""
    if h.c != 1.0:
        v = v / h.c
        m = m / h.c if m is not None else None
    s = v.addcmul(m, m, value=-1).clamp(min=0) if m is not None else v
    if h.eps_in_sqrt:
        return s.add(h.eps).sqrt()
    r = s.sqrt() if (s is v or torch.is_grad_enabled()) else s.sqrt_()
    return r.add(h.eps) if torch.is_grad_enabled() else r.add_(h.eps)


def single_tensor_step(p: Tensor, g: Tensor, v: Tensor, m: Optional[Tensor],
                       b: Optional[Tensor], h: Hyper) -> None:
    """One step for one tensor, in place on ``p``, ``v``, ``m`` (centered), ``b`` (momentum)."""
    if h.inv_scale != 1.0:
        g = g * h.inv_scale
    if h.maximize:
        g = -g
    if h.weight_decay != 0:
        if h.decoupled_weight_decay:
            p.mul_(1 - h.lr * h.weight_decay)
        else:
            g = g.add(p, alpha=h.weight_decay)
    v.mul_(h.alpha).addcmul_(g, g, value=1 - h.alpha)
    if m is not None:
        m.lerp_(g, 1 - h.alpha)
    d = _denominator(v, m, h)
    if b is not None:
        k = h.lr if h.lr_in_momentum else 1.0
        b.mul_(h.momentum).addcdiv_(g, d, value=k)
        scale = 1.0 if h.lr_in_momentum else h.lr
        if h.nesterov:
            p.add_(b, alpha=-scale * h.momentum).addcdiv_(g, d, value=-scale * k)
        else:
            p.add_(b, alpha=-scale)
    else:
        p.addcdiv_(g, d, value=-h.lr)


def foreach_step(ps: list[Tensor], gs: list[Tensor], vs: list[Tensor],
                 ms: Optional[list[Tensor]], bs: Optional[list[Tensor]], h: Hyper) -> None:
    """The same op sequence as :func:`single_tensor_step`, over lists with ``torch._foreach_*``."""
    if h.inv_scale != 1.0:
        gs = torch._foreach_mul(gs, h.inv_scale)
    if h.maximize:
        gs = torch._foreach_neg(gs)
    if h.weight_decay != 0:
        if h.decoupled_weight_decay:
            torch._foreach_mul_(ps, 1 - h.lr * h.weight_decay)
        else:
            gs = torch._foreach_add(gs, ps, alpha=h.weight_decay)
    torch._foreach_mul_(vs, h.alpha)
    torch._foreach_addcmul_(vs, gs, gs, value=1 - h.alpha)
    if ms is not None:
        torch._foreach_lerp_(ms, gs, 1 - h.alpha)
    vv, mm = vs, ms
    if h.c != 1.0:
        vv = torch._foreach_div(vs, h.c)
        mm = torch._foreach_div(ms, h.c) if ms is not None else None
    if mm is not None:
        s = torch._foreach_addcmul(vv, mm, mm, value=-1)
        torch._foreach_clamp_min_(s, 0)
    else:
        s = vv
    if h.eps_in_sqrt:
        d = torch._foreach_add(s, h.eps)
        torch._foreach_sqrt_(d)
    else:
        if s is vs:
            d = torch._foreach_sqrt(s)
        else:
            d = s
            torch._foreach_sqrt_(d)
        torch._foreach_add_(d, h.eps)
    if bs is not None:
        k = h.lr if h.lr_in_momentum else 1.0
        torch._foreach_mul_(bs, h.momentum)
        torch._foreach_addcdiv_(bs, gs, d, value=k)
        scale = 1.0 if h.lr_in_momentum else h.lr
        if h.nesterov:
            torch._foreach_add_(ps, bs, alpha=-scale * h.momentum)
            torch._foreach_addcdiv_(ps, gs, d, value=-scale * k)
        else:
            torch._foreach_add_(ps, bs, alpha=-scale)
    else:
        torch._foreach_addcdiv_(ps, gs, d, value=-h.lr)
