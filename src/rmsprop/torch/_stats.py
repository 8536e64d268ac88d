"""Health statistics of a step (``RMSprop(track_stats=...)``, read with ``stats()``).

Per parameter a *row* of six float64 numbers: ``sum g^2``, ``sum u^2`` (``u`` the applied
change), ``sum p_new^2``, ``min lr/d``, ``max lr/d`` and the count of elements where ``eps``
dominates the denominator (``eps > s`` with ``eps_in_sqrt``, else ``eps > sqrt(s)``). The
fused kernels fill the rows in their own pass; elsewhere :func:`row` computes them from the
params before and after the step, with the rule's own :func:`~rmsprop.torch._paths.denominator`
on the state as the step left it (decoded through its codec). :func:`summarize` turns rows
into the per-group (and per-parameter) dictionary users read.

With quantized state (``state_dtype="8bit"``/``"4bit"``) the two sources differ by design in
``min/max lr/d`` and the eps count: the fused kernel reports the denominator the step used
(from the fresh ``v``), the unfused paths the one decoded from the stored codes, which is what
the next step starts from. They differ by the quantization of ``v`` (a decoded ``sqrt(v)`` is
at least 2/3 of the fresh one and may be larger, :mod:`rmsprop.codecs`); the sums of
``g^2``, ``u^2`` and ``p^2`` are the same on every path. Recomputing the fresh ``v`` off the
fused path would cost a second update pass for a statistic; matching the unfused paths
inside the kernel would cost a decode there.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import _paths
from ._codecs import Codec, math_dtype, real
from ._paths import Hyper

__all__ = ["row", "step_sizes", "summarize", "empty_rows", "summarize_groups"]

#: Elements per tensor of the sample for the median step size.
SAMPLE = 4096
#: Tensors per group whose step sizes are sampled (evenly spaced).
SAMPLED_TENSORS = 64


def empty_rows() -> Tensor:
    """The rows of a group without params."""
    return torch.zeros(0, 6, dtype=torch.float64)


def _state(codec: Codec, st: dict, h: Hyper, f: torch.dtype, shape: torch.Size
           ) -> tuple[Tensor, Tensor | None]:
    """``v`` (and ``m`` when centered) decoded in ``f``, shaped like the param's real view."""
    keys = ["square_avg", "grad_avg"] if h.centered else ["square_avg"]
    decode_all = getattr(codec, "decode_all", None)
    vals = decode_all(st, keys, f) if decode_all is not None else {
        key: codec.decode(key, st, f) for key in keys}
    v = vals["square_avg"].reshape(shape)
    m = vals["grad_avg"].reshape(shape) if h.centered else None
    return v, m


def row(h: Hyper, codec: Codec, p: Tensor, old: Tensor, st: dict) -> Tensor:
    """One parameter's row as a float64 tensor on its device (no host sync per value),
    computed in the param's math dtype, as the fused kernels do (float64 copies of float32
    tensors would cost more than the step itself)."""
    new, old = real(p.detach()), real(old)
    f = math_dtype(new.dtype)
    v, m = _state(codec, st, h, f, new.shape)
    s, sq, d = _paths.denominator(_paths.TENSOR, v, m, h, parts=True)
    new, old = new.to(f), old.to(f)
    grad = p.grad
    assert grad is not None  # statistics are recorded for params that stepped
    g = real(grad).to(f)
    g = g * h.inv_scale if h.inv_scale != 1.0 else g  # the sign does not change g^2
    if h.weight_decay and not h.decoupled_weight_decay:
        g = (-g if h.maximize else g) + h.weight_decay * old
    dom = (h.eps > s) if h.eps_in_sqrt else (h.eps > sq)
    out = [x.square().sum().to(torch.float64) for x in (g, old - new, new)]
    if new.numel():
        # lr/d is monotone in d and correctly rounded: its extremes are lr over d's
        dmin, dmax = torch.aminmax(d)
        out += [(h.lr / dmax).to(torch.float64), (h.lr / dmin).to(torch.float64)]
    else:
        out += [torch.tensor(x, dtype=torch.float64, device=new.device)
                for x in (math.inf, -math.inf)]
    return torch.stack(out + [dom.sum().to(torch.float64)])


def step_sizes(h: Hyper, codec: Codec, st: dict, limit: int = SAMPLE) -> np.ndarray:
    """``lr/d`` on a strided sample of at most ``limit`` elements (for the median), computed
    by the rule's denominator in float64 on the host: a few thousand elements, where a
    device round trip per op would cost more than the arithmetic."""
    stored = codec.dtype if codec.dtype is not None else torch.float32
    v, m = _state(codec, st, h, stored, torch.Size([-1]))
    n = v.numel()
    stride = max(1, n // limit + (n % limit > 0))

    def host(t: Tensor) -> Tensor:
        return t[::stride].detach().to("cpu", torch.float64)

    vs = host(v)
    ms = host(m) if m is not None else None
    with torch.no_grad():
        d = _paths.denominator(_paths.TENSOR, vs, ms, h)
    return (h.lr / d).numpy()


def summarize(rows: Tensor, numels: list[int], samples: list[np.ndarray],
              step: int) -> dict[str, float]:
    """The user-facing dictionary of a set of rows (see ``RMSprop.stats``)."""
    n = sum(numels)
    if n == 0:
        nan = float("nan")
        return dict(step=step, grad_rms=nan, update_rms=nan, update_to_param_rms=nan,
                    step_min=nan, step_median=nan, step_max=nan, eps_dominated_fraction=nan)
    sums = rows.sum(dim=0)
    g2, u2, p2 = (float(x) for x in sums[:3])
    sample = np.concatenate([x.reshape(-1) for x in samples]) if samples else np.empty(0)
    return dict(step=step, grad_rms=math.sqrt(g2 / n), update_rms=math.sqrt(u2 / n),
                update_to_param_rms=math.sqrt(u2 / p2) if p2 > 0 else math.inf,
                step_min=float(rows[:, 3].min()),
                step_median=float(np.median(sample)) if sample.size else math.nan,
                step_max=float(rows[:, 4].max()),
                eps_dominated_fraction=float(sums[5]) / n)


def summarize_groups(work: list[tuple[dict, list[Tensor]]], rows: list[Tensor],
                     per_param: bool, hyper: Any, codec_of: Any, label: Any,
                     state: Any, skipped: int) -> dict[str, Any]:
    """``stats()``'s result from one step's rows: ``hyper(group, t)`` gives a group's
    :class:`Hyper`, ``codec_of(group, p)`` a param's codec, ``label(group, p)`` its name."""
    groups_out, params_out = [], {}
    for gi, (group, params) in enumerate(work):
        r = rows[gi].cpu()
        numels = [real(p).numel() for p in params]
        # The group's median step size comes from a sample of at most SAMPLED_TENSORS
        # tensors: on a model of a thousand small tensors per-tensor work would cost more
        # than the step.
        every = 1 if per_param else max(1, len(params) // SAMPLED_TENSORS)
        sampled = params[::every]
        steps = [int(state[p]["step"]) for p in sampled]
        samples = [step_sizes(hyper(group, t), codec_of(group, p), state[p])
                   for p, t in zip(sampled, steps)]
        out = summarize(r, numels, samples, max(steps, default=0))
        out["skipped_steps"] = skipped
        groups_out.append(out)
        if per_param:
            for i, p in enumerate(params):
                name = label(group, p).strip("'")
                params_out[name] = summarize(r[i:i + 1], numels[i:i + 1], samples[i:i + 1],
                                             steps[i])
    result: dict[str, Any] = {"groups": groups_out}
    if per_param:
        result["params"] = params_out
    return result
