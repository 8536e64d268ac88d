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
