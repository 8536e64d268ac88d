"""Fused single-pass RMSProp kernels.

* :mod:`rmsprop.kernels.cpu`: a C kernel (``cpu.c``, generated per instruction set and math
  type from the template headers ``cpu_isa.h`` and ``cpu_step.h``) called through ctypes over
  a table of tensors per step; threaded by a small built-in pool, vectorised, float32/float64/
  float16/bfloat16.
* :mod:`rmsprop.kernels.triton`: a Triton kernel with the same semantics for CUDA tensors
  (and CPU tensors under ``TRITON_INTERPRET=1``).

Both implement :func:`rmsprop.spec.step` for many tensors at once, reading every input once
and writing every output once, with torch.optim.RMSprop's operations and roundings where the
options are torch's. Import the submodule you need; this package imports nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def state_flags(kernel: str, centered: bool, grad_avgs: Any, momentum: float,
                momentum_buffers: Any) -> tuple[bool, bool]:
    """``(centered, momentum on)`` after checking that the state lists they need are given
    (shared by both kernels' ``fused_step``)."""
    use_mom = momentum > 0
    if centered and grad_avgs is None:
        raise ValueError(f"fused {kernel} step: centered=True needs grad_avgs")
    if use_mom and momentum_buffers is None:
        raise ValueError(f"fused {kernel} step: momentum > 0 needs momentum_buffers")
    return bool(centered), use_mom


def quantized_pointers(kernel: str, codes: Sequence[Any], scales: Sequence[Any | None],
                       name: str, numels: list[int], block: int, per_byte: int, device: Any,
                       place: str) -> tuple[list[int], list[int]]:
    """Pointers of one quantized state list and of its scales (shared by both kernels'
    ``fused_step_quantized``): ``codes[i]`` uint8 (``numels[i] / per_byte`` bytes) with
    ``scales[i]`` float32 (one per ``block`` elements), or, where ``scales[i]`` is None, a
    float32 tensor of ``numels[i]`` values (scale pointer 0). Everything that could corrupt
    memory is checked first; ``place`` names the tensors wanted (``"CPU tensor"``,
    ``"tensor on cuda:0"``) for the errors."""
    import torch
    n = len(numels)
    if len(codes) != n or len(scales) != n:
        raise ValueError(f"fused {kernel} step: {name} has {len(codes)} tensors and "
                         f"{len(scales)} scale tensors, params has {n}")
    cp, sp = [], []
    for i, (c, sc, ne) in enumerate(zip(codes, scales, numels)):
        want = torch.float32 if sc is None else torch.uint8
        if not isinstance(c, torch.Tensor) or c.dtype != want or c.device != device:
            raise TypeError(f"fused {kernel} step: {name}[{i}] must be a {want} {place}"
                            + ("" if sc is None else " of codes"))
        if sc is not None and ne % per_byte:
            raise ValueError(f"fused {kernel} step: params[{i}] has an odd element count "
                             f"({ne}), which 4-bit state does not quantize")
        want_n = ne if sc is None else ne // per_byte
        if c.numel() != want_n or not c.is_contiguous():
            raise ValueError(f"fused {kernel} step: {name}[{i}] must be contiguous with "
                             f"{want_n} elements (has {c.numel()})")
        cp.append(c.data_ptr())
        if sc is None:
            sp.append(0)
            continue
        nb = -(-ne // block)
        if (not isinstance(sc, torch.Tensor) or sc.dtype != torch.float32
                or sc.numel() != nb or not sc.is_contiguous() or sc.device != device):
            raise ValueError(f"fused {kernel} step: {name} scales[{i}] must be a contiguous "
                             f"float32 {place} of {nb} blocks")
        sp.append(sc.data_ptr())
    return cp, sp
