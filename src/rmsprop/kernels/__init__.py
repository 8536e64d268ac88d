"""Fused single-pass RMSProp kernels.

* :mod:`rmsprop.kernels.cpu`: a C kernel (``cpu.c``) called through ctypes over a table of
  tensors per step; OpenMP-threaded, vectorised, float32/float64/float16/bfloat16.
* :mod:`rmsprop.kernels.triton`: a Triton kernel with the same semantics for CUDA tensors
  (and CPU tensors under ``TRITON_INTERPRET=1``).

Both implement :func:`rmsprop.spec.step` for many tensors at once, reading every input once
and writing every output once. Import the submodule you need; this package imports nothing.
"""
