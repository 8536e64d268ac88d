#!/usr/bin/env python3
"""Host CPU time of one cached ``step()`` on the fused device route, by number of tensors.

The step of a model of many small tensors is bound by what the host does per call (Python,
the pointer table, the launches), not by the kernel. This measures that part: for each model
size (``--counts``, default 1, 147 and 1000 tensors of ``--numel`` elements) it builds an
``RMSprop`` with default options, runs warm-up steps (the first builds the cached plan, the
second the device gate) and then times each ``opt.step()`` alone with ``time.thread_time``
(the CPU time of this thread: time spent descheduled, or waiting for the device without
spinning, is not counted), printing the median over ``--calls`` calls in µs per step, the
ratio of the largest model's to the smallest's, the cost per extra tensor, and the floor of that
cost for any step that reads each gradient from Python (reading ``p.grad`` alone).

Two gradient regimes, both ordinary in training:

* ``stable``: the gradients stay the same tensors (``zero_grad(set_to_none=False)``, or a
  gradient buffer filled in place), so their pointers never change;
* ``new``: every step sees new gradient tensors (``zero_grad()``'s default
  ``set_to_none=True`` lets backward allocate them), here two prepared sets used in turn, so
  the pointers change at every step and the device pointer table is rewritten each time.

``--device cuda`` (the default when CUDA is available) runs on the GPU with the real
launches. ``--device cpu`` exercises the same host path without a GPU: CPU tensors are
routed to :class:`rmsprop.torch._plan.CudaPlan` and the Triton launches are replaced by
no-ops (the interpreter would run the kernel's arithmetic element by element, which is not
host overhead), so the figure is the optimizer's own Python and torch calls, without the
cost of the launches themselves.

Usage::

    python scripts/host_overhead.py                      # CUDA if available, else CPU
    python scripts/host_overhead.py --device cpu --calls 2000 --repeats 3
    python scripts/host_overhead.py --device cuda --cuda-graph   # the step as one CUDA graph

``--cuda-graph`` builds the optimizer with ``cuda_graph=True`` (on CUDA: after the capture,
each step's launches are one graph replay; on the CPU it changes nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator, Sequence

import torch

from rmsprop.torch import RMSprop, _plan

REGIMES = ("stable", "new")


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](*args)`` does nothing."""

    def __getitem__(self, grid: object) -> _NoLaunch:
        return self

    def __call__(self, *args: object, **kwargs: object) -> None:
        return None


@contextlib.contextmanager
def stubbed_device_route() -> Iterator[None]:
    """CPU tensors take :class:`CudaPlan`, whose Triton launches do nothing."""
    from rmsprop.kernels import triton as tk
    names = ("_rmsprop_kernel", "_nonfinite_kernel", "_advance_kernel")
    saved = {name: getattr(tk, name) for name in names}
    saved_plan_for = _plan.plan_for
    try:
        for name in names:
            setattr(tk, name, _NoLaunch())
        _plan.plan_for = lambda device_type: _plan.CudaPlan  # type: ignore[assignment]
        yield
    finally:
        for name, kernel in saved.items():
            setattr(tk, name, kernel)
        _plan.plan_for = saved_plan_for  # type: ignore[assignment]


def measure(n: int, numel: int, device: str, regime: str, calls: int,
            warmup: int = 5, cuda_graph: bool = False) -> float:
    """Median host CPU seconds of one cached ``step()`` over ``n`` tensors."""
    gen = torch.Generator().manual_seed(n)
    params = [torch.randn(numel, generator=gen).to(device).requires_grad_() for _ in range(n)]
    sets = [[torch.randn(numel, generator=gen).mul_(1e-3).to(device) for _ in params]
            for _ in range(2 if regime == "new" else 1)]
    opt = RMSprop(params, lr=1e-3, cuda_graph=cuda_graph)
    clock = time.thread_time
    times = []
    for k in range(warmup + calls):
        grads = sets[k % len(sets)]
        for p, g in zip(params, grads):
            p.grad = g
        t0 = clock()
        opt.step()
        t1 = clock()
        if k >= warmup:
            times.append(t1 - t0)
    plans = list(opt._plans.values())
    if not (len(plans) == 1 and isinstance(plans[0], _plan.CudaPlan)):
        raise RuntimeError(f"the step did not take the cached device plan: {plans}")
    opt.check()
    if device == "cuda":
        torch.cuda.synchronize()
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--counts", default="1,147,1000",
                    help="comma-separated numbers of tensors (default 1,147,1000)")
    ap.add_argument("--numel", type=int, default=64, help="elements per tensor")
    ap.add_argument("--calls", type=int, default=1000, help="timed steps per measurement")
    ap.add_argument("--repeats", type=int, default=3,
                    help="measurements per size and regime (the median of their medians)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="RMSprop(cuda_graph=True): the cached step replayed as one CUDA graph")
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    if not counts or min(counts) < 1 or args.calls < 1 or args.repeats < 1:
        ap.error("--counts, --calls and --repeats need positive values")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("host_overhead.py --device cuda needs a CUDA device", file=sys.stderr)
        return 2
    how = ("CUDA tensors, real launches" if device == "cuda" else
           "CPU tensors through CudaPlan, Triton launches stubbed out")
    if args.cuda_graph:
        how += "; cuda_graph=True"
    print(f"host CPU time of one cached step() (fused device route; {how}): "
          f"time.thread_time, median of {args.calls} calls, median of {args.repeats} runs; "
          f"{args.numel} elements per tensor")
    stub = stubbed_device_route() if device == "cpu" else contextlib.nullcontext()
    us: dict[tuple[str, int], float] = {}
    with stub:
        for regime in REGIMES:
            for n in counts:
                runs = [measure(n, args.numel, device, regime, args.calls,
                                cuda_graph=args.cuda_graph) for _ in range(args.repeats)]
                us[regime, n] = statistics.median(runs) * 1e6
    print(f"{'tensors':>8}  " + "  ".join(f"{r + ' grads µs':>16}" for r in REGIMES))
    for n in counts:
        print(f"{n:>8}  " + "  ".join(f"{us[r, n]:>16.1f}" for r in REGIMES))
    lo, hi = min(counts), max(counts)
    if hi > lo:
        for r in REGIMES:
            per = (us[r, hi] - us[r, lo]) * 1e3 / (hi - lo)
            print(f"{r} grads: ratio {hi}/{lo} = {us[r, hi] / us[r, lo]:.2f}, "
                  f"{per:.0f} ns per extra tensor")
    print(f"per-tensor floor of any step that reads every gradient from Python: "
          f"{grad_read_ns(hi):.0f} ns per tensor for list(map(attrgetter('grad'), params)) "
          f"alone ({hi} tensors)")
    return 0


def grad_read_ns(n: int, rounds: int = 200) -> float:
    """Nanoseconds per tensor of reading ``p.grad`` for ``n`` params (best of 5 x
    ``rounds``): what a step that must see each gradient pays per tensor at least, however
    little else it does, and why its host time cannot be flat in the tensor count."""
    import operator
    import timeit
    params = [torch.zeros(1, requires_grad=True) for _ in range(n)]
    for p in params:
        p.grad = torch.zeros(1)
    read = operator.attrgetter("grad")
    best = min(timeit.repeat(lambda: list(map(read, params)), number=rounds, repeat=5))
    return best / rounds / n * 1e9


if __name__ == "__main__":
    sys.exit(main())
