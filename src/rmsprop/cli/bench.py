"""``rmsprop bench``: CPU step time of the fused RMSProp step against torch, and the floor.

Protocol: every candidate of a row steps its own optimizer over the same parameters and
gradients. Candidates are timed interleaved, in round-robin blocks (one warm-up call, then
``k`` timed calls each) for ``--repeats`` rounds, and the median call is reported; the ratios
(``%floor``, ``x foreach``, ``x Adam``) are medians over rounds of the ratio within each
round, so a machine whose speed drifts between rounds moves them less. Each row also times,
in the same rounds, the bandwidth floor: a plain threaded, vectorised C loop that reads and
writes exactly the arrays of our fused step in place (read p, g, v[, m, b]; write p, v[, m,
b]) with trivial arithmetic. Columns:

* ``rmsprop fused`` is the default step, which first scans the gradients for inf/NaN (so a
  bad gradient changes nothing); ``rmsprop fused graph`` (``--device cuda`` only) is that
  step replayed as one CUDA graph (``cuda_graph=True``); ``rmsprop fused unchecked`` is
  ``nonfinite="ignore"``; ``rmsprop fused +stats`` also collects ``opt.stats()``
  (``track_stats=True``);
* ``ms``: median step time; ``GB/s``: bytes the update must move (2x params + grads + 2x
  state, in their own dtypes) / time; ``%floor``: that rate over the floor's rate;
  ``x foreach``: torch ``RMSprop(foreach=True)``'s time over this one (speed-up); ``x Adam``:
  the same against ``torch.optim.Adam(fused=True)`` (which moves 28 bytes per float32 element
  to our 20);
* ``host µs``: CPU time of the calling thread per call (``time.thread_time`` around each
  timed call, median over the calls): on CUDA the Python, the launches and any wait for the
  GPU, what bounds a small model's step; on the CPU it also includes the calling thread's
  share of the kernel's own work. After the rows the default step's host time is printed
  by tensor count (1, 147 and 1000 tensors by default);
* ``extra MB``: peak memory a step allocates beyond what exists before it: torch's CPU
  allocator (profiler allocation events, ``total_allocated`` peak) plus Python objects
  (``tracemalloc``); the C kernel's own allocation is one int64 per tensor.

Rows ``8bit-*`` (``4bit-*``) time our optimizer's fused step with 8-bit (4-bit)
state (``rmsprop.codecs``' codes and block scales; ``fused=True, nonfinite="ignore"``, as the
floors read each gradient once; the C kernel, or the Triton one with ``--device cuda``),
against the same step with float32 state in the same rounds,
each with its own floor: ``floor 8bit`` moves one code byte per state
element (not the block scales, 1.6 % of the 8-bit state), ``floor fp32`` four bytes;
``%floor`` pairs each step with its own floor (GB/s over the floor's GB/s; the 4-bit step
against the 1-byte-code floor, as the floor loop has no half-byte elements) and the note gives
bytes moved per element and the quantized step's speed-up over the float32 one. It also gives
each kernel's arithmetic alone: the fastest of a few one-thread calls over a slice small enough
to stay in a core's L2 cache (``in cache`` ns per element per thread), and the %floor that this
bounds the kernel to (floor time over that cost spread over every thread without loss): a
kernel whose bound is under 100 % is limited by its arithmetic, not by memory, on this machine
(CPU rows only).

Beside the floor, each row prints STREAM-style copy (8 B/element) and triad (12 B/element)
bandwidth over float32 arrays with the row's element count. ``torch.compile`` rows report the
first call (trace + compile) separately; compiling a thousand tensors takes minutes, so rows of
more than 200 tensors skip it unless ``--compile-all``.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import CLIError

#: row name -> (kind, size or None, dtype, options)
ROW_KINDS = ("single", "model", "tiny", "momentum", "centered", "bf16", "fp16")
DEFAULT_SIZES = ("1M", "10M", "50M")
DEFAULT_MODEL_SIZES = ("10M", "50M")
CANDIDATES = ("rmsprop fused", "rmsprop fused graph", "rmsprop fused unchecked",
              "rmsprop fused +stats",
              "rmsprop foreach",
              "torch foreach=True", "torch foreach=False",
              "torch.compile", "torch Adam fused", "floor")
CUDA_ONLY = ("rmsprop fused graph",)
BASELINE = "torch foreach=True"
ADAM = "torch Adam fused"  # torch.optim.Adam(fused=True): 28 B/element to our 20
LR = 1e-3


def register(subparsers: Any) -> None:
    """Add the ``bench`` parser."""
    p = subparsers.add_parser(
        "bench", help="CPU speed of the fused RMSProp step vs torch, against the bandwidth floor",
        description=(__doc__ or "").split("\n\n")[0] + " Prints, per row, the median step time, "
        "effective GB/s, the fraction of the memory-bandwidth floor measured in the same run, "
        "the speed-up over torch.optim.RMSprop(foreach=True) and over "
        "torch.optim.Adam(fused=True), the host CPU time per call (the calling thread's; on "
        "the CPU it includes its share of the kernel's work) and the peak extra memory; then "
        "the default step's host CPU time by tensor count.")
    p.add_argument("--rows", default=None, metavar="NAME[,NAME]",
                   help="rows to run, names or shell patterns (default: all); see --list")
    p.add_argument("--sizes", default=None, metavar="N[,N]",
                   help="sizes of the single-tensor and model-like rows, e.g. 1M,10M,50M "
                        "(default: single 1M,10M,50M; model 10M,50M)")
    p.add_argument("--variant-size", default="10M", metavar="N",
                   help="size of the momentum, centered, bf16 and fp16 rows (default 10M)")
    p.add_argument("--tiny", default="1000x64", metavar="COUNTxNUMEL",
                   help="the per-tensor-overhead row (default 1000x64)")
    p.add_argument("--candidates", default=None, metavar="NAME[,NAME]",
                   help="subset of: " + ", ".join(CANDIDATES) + " (floor and "
                   f"'{BASELINE}' are always timed)")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved rounds (default 5; --quick: 1)")
    p.add_argument("--calls", type=int, default=None,
                   help="timed calls per block (default: about 0.15 s worth, 3..30)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (the C kernel, default) or cuda (the Triton kernel; times with "
                        "CUDA events, floor = a Triton loop with the step's reads and writes, "
                        "STREAM = torch copy/triad on the GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--json", default=None, metavar="FILE", help="write all rows as JSON")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: small sizes, 1 round, no torch.compile")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--compile-all", action="store_true",
                   help="also compile rows of more than 200 tensors (minutes each)")
    p.add_argument("--no-first-step", action="store_true",
                   help="skip timing the first fused step in a fresh process")
    p.add_argument("--list", action="store_true", help="list the rows and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------------------
# rows
# ----------------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """'10M' -> 10_000_000, '100K' -> 100_000, '2500' -> 2500."""
    t = text.strip().upper().replace("_", "")
    mult = {"K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in "KMG" else t
    try:
        value = float(num) * mult
    except ValueError:
        raise CLIError(f"bench: bad size {text!r} (use e.g. 1M, 250K, 4096)") from None
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise CLIError(f"bench: bad size {text!r} (a positive whole number of elements)")
    return int(value)


def fmt_size(n: int) -> str:
    for unit, m in (("G", 10 ** 9), ("M", 10 ** 6), ("K", 10 ** 3)):
        if n >= m and n % (m // 10) == 0:
            v = n / m
            return f"{v:g}{unit}"
    return str(n)


def model_shapes(total: int) -> list[tuple[int, ...]]:
    """About 150 tensors shaped like a 9-block transformer (attention and MLP matrices with
    their biases, two layer norms per block, an embedding and a final norm), scaled so the
    element count is close to ``total``."""
    d = max(4, int(round(math.sqrt(total / 112))))
    shapes: list[tuple[int, ...]] = [(4 * d, d)]
    for _ in range(9):
        for _ in range(4):
            shapes += [(d, d), (d,)]
        shapes += [(4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,), (d,), (d,)]
    shapes += [(d,), (d,)]
    # top up the embedding so the total is exact
    have = sum(math.prod(s) for s in shapes)
    rows = max(1, 4 * d + (total - have) // d)
    shapes[0] = (rows, d)
    return shapes


def _listed(flag: str, text: str) -> list[str]:
    """The comma-separated names of ``flag``; an empty list is an error, not the default."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise CLIError(f"bench: {flag} names nothing (give comma-separated names, or leave "
                       "the option out for the default)")
    return names


def build_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    quick = args.quick
    if args.sizes is not None:
        singles = models = [parse_size(s) for s in _listed("--sizes", args.sizes)]
    elif quick:
        singles, models = [20_000], [50_000]
    else:
        singles = [parse_size(s) for s in DEFAULT_SIZES]
        models = [parse_size(s) for s in DEFAULT_MODEL_SIZES]
    vsize = 20_000 if quick and args.variant_size == "10M" else parse_size(args.variant_size)
    tiny = args.tiny if not (quick and args.tiny == "1000x64") else "50x64"
    try:
        count, numel = (int(x) for x in tiny.lower().split("x"))
        if count < 1 or numel < 1:
            raise ValueError
    except ValueError:
        raise CLIError(f"bench: bad --tiny {tiny!r} (use COUNTxNUMEL, e.g. 1000x64)") from None
    rows: list[dict[str, Any]] = []
    for n in singles:
        rows.append(dict(name=fmt_size(n), shapes=[(n,)], dtype="float32", opts={}))
    for n in models:
        shapes = model_shapes(n)
        rows.append(dict(name=f"model{fmt_size(n)}", shapes=shapes, dtype="float32", opts={}))
    rows.append(dict(name=f"tiny{count}x{numel}", shapes=[(numel,)] * count, dtype="float32",
                     opts={}))
    vs = fmt_size(vsize)
    rows.append(dict(name=f"momentum{vs}", shapes=[(vsize,)], dtype="float32",
                     opts={"momentum": 0.9}))
    rows.append(dict(name=f"centered{vs}", shapes=[(vsize,)], dtype="float32",
                     opts={"centered": True}))
    rows.append(dict(name=f"bf16-{vs}", shapes=[(vsize,)], dtype="bfloat16", opts={}))
    rows.append(dict(name=f"fp16-{vs}", shapes=[(vsize,)], dtype="float16", opts={}))
    # 8-bit and 4-bit state against our float32-state step, both through the optimizer's
    # fused route (the C kernel, or the Triton one on CUDA): single tensors of the variant
    # size and of every larger single size, and each model
    qsizes = [vsize] + sorted({n for n in singles if n > vsize})
    for q in ("8bit", "4bit"):
        for n in qsizes:
            rows.append(dict(name=f"{q}-{fmt_size(n)}", shapes=[(n,)], dtype="float32",
                             opts={}, quant=q))
        for n in models:
            rows.append(dict(name=f"{q}-model{fmt_size(n)}", shapes=model_shapes(n),
                             dtype="float32", opts={}, quant=q))
    rows.append(dict(name=f"8bit-momentum{vs}", shapes=[(vsize,)], dtype="float32",
                     opts={"momentum": 0.9}, quant="8bit"))
    if args.rows is not None:
        pats = _listed("--rows", args.rows)
        bad = [p for p in pats if not any(fnmatch.fnmatch(r["name"], p) for r in rows)]
        if bad:
            raise CLIError(f"bench: no row matches {', '.join(bad)} (rows: "
                           f"{', '.join(r['name'] for r in rows)})")
        rows = [r for r in rows if any(fnmatch.fnmatch(r["name"], p) for p in pats)]
    return rows


# ----------------------------------------------------------------------------------------
# candidates
# ----------------------------------------------------------------------------------------

def _state_bytes(opt: Any) -> int:
    total = 0
    for st in opt.state.values():
        for k, v in st.items():
            if k != "step" and hasattr(v, "nbytes"):
                total += v.nbytes
    return total


def make_candidates(names: list[str], params: list, opts: dict, compile_ok: bool,
                    compile_note: str, log: Callable[[str], None]) -> dict[str, dict]:
    """name -> {step, bytes, first_call_s, note, opt}. Each optimizer gets its own state; all
    share ``params`` (and their ``.grad``)."""
    import torch

    out: dict[str, dict] = {}
    pbytes = sum(p.nbytes for p in params)

    def add(name: str, opt: Any, step: Callable[[], Any] | None = None, note: str = "") -> None:
        step = step or opt.step
        t0 = time.perf_counter()
        step()
        first = time.perf_counter() - t0
        out[name] = dict(step=step, bytes=3 * pbytes + 2 * _state_bytes(opt), first_call_s=first,
                         note=note, opt=opt)

    Ours: Any = None
    try:
        from ..torch import RMSprop
        Ours = RMSprop
    except ImportError as e:  # the optimizer is optional for the bench
        log(f"rmsprop.torch unavailable ({e}); 'rmsprop fused' calls the kernel directly")
    for name in names:
        try:
            if name == "rmsprop fused":
                if Ours is not None:
                    add(name, Ours(params, lr=LR, fused=True, **opts))
                else:
                    add(name, *_direct_kernel(params, opts))
            elif name == "rmsprop fused graph" and Ours is not None:
                # the default step replayed as one CUDA graph (cuda_graph=True)
                add(name, Ours(params, lr=LR, fused=True, cuda_graph=True, **opts))
            elif name == "rmsprop fused unchecked" and Ours is not None:
                # no non-finite gradient pre-check: that pass reads the gradients once more
                add(name, Ours(params, lr=LR, fused=True, nonfinite="ignore", **opts))
            elif name == "rmsprop fused +stats" and Ours is not None:
                # health statistics (opt.stats()) collected in the kernel's own pass
                add(name, Ours(params, lr=LR, fused=True, track_stats=True, **opts))
            elif name == "rmsprop foreach" and Ours is not None:
                add(name, Ours(params, lr=LR, fused=False, foreach=True, **opts))
            elif name == "torch foreach=True":
                add(name, torch.optim.RMSprop(params, lr=LR, foreach=True, **opts))
            elif name == "torch foreach=False":
                add(name, torch.optim.RMSprop(params, lr=LR, foreach=False, **opts))
            elif name == "torch.compile":
                if not compile_ok:
                    out[name] = dict(skip=compile_note)
                    continue
                # a fresh dynamo state per row: each row's new optimizer recompiles the same
                # code object, and past the recompile limit dynamo silently runs it eagerly
                torch._dynamo.reset()
                opt = torch.optim.RMSprop(params, lr=LR, foreach=True, **opts)
                compiled = torch.compile(opt.step)
                add(name, opt, compiled)
                t0 = time.perf_counter()
                compiled()  # a second call may still recompile (guards on step count)
                out[name]["second_call_s"] = time.perf_counter() - t0
            elif name == "torch Adam fused":
                add(name, torch.optim.Adam(params, lr=LR, fused=True))
        except Exception as e:  # report, keep benchmarking the others
            out[name] = dict(skip=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    return out


def _direct_kernel(params: list, opts: dict) -> tuple[Any, Callable[[], None]]:
    import torch

    from ..kernels import cpu

    class _Holder:  # something with .state for the byte count
        state: dict = {}

    sd = torch.float32 if params[0].dtype in (torch.float16, torch.bfloat16) else params[0].dtype
    vs = [torch.zeros(p.shape, dtype=sd) for p in params]
    ms = [torch.zeros_like(v) for v in vs] if opts.get("centered") else None
    bs = [torch.zeros_like(v) for v in vs] if opts.get("momentum", 0) > 0 else None
    holder = _Holder()
    holder.state = {i: {"square_avg": v} for i, v in enumerate(vs)}
    for i, x in enumerate(ms or []):
        holder.state[i]["grad_avg"] = x
    for i, x in enumerate(bs or []):
        holder.state[i]["momentum_buffer"] = x
    grads = [p.grad for p in params]
    kw = dict(lr=LR, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=opts.get("momentum", 0.0),
              centered=bool(opts.get("centered")), maximize=False, eps_in_sqrt=False,
              lr_in_momentum=False, nesterov=False, decoupled_weight_decay=False,
              bias_correction=1.0)

    def step() -> None:
        with torch.no_grad():
            cpu.fused_step(params, grads, vs, ms, bs, **kw)
    return holder, step


@contextlib.contextmanager
def _native_stderr_silenced() -> Any:
    """File descriptor 2 sent to /dev/null: the profiler's C++ side prints a start and a stop
    line per use that no environment variable turns off (Python exceptions still propagate)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_bytes(fn: Callable[[], Any]) -> tuple[int | None, str]:
    """Peak bytes allocated during one call beyond those live before it: torch's CPU
    allocator (profiler allocation events) + Python objects (tracemalloc)."""
    import tracemalloc

    import torch
    c10_peak = None
    method = "torch allocator (profiler) + tracemalloc"
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
        with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU],
                                                 profile_memory=True) as prof:
            fn()
        events = []

        def walk(nodes: Any) -> None:
            for e in nodes:
                if e.tag == _EventType.Allocation and str(e.extra_fields.device) == "cpu":
                    events.append((e.start_time_ns, e.extra_fields.alloc_size,
                                   e.extra_fields.total_allocated))
                walk(e.children)
        walk(prof.profiler.kineto_results.experimental_event_tree())
        events.sort()
        if events:
            base = events[0][2] - events[0][1]
            c10_peak = max(0, max(t for _, _, t in events) - base)
        else:
            c10_peak = 0
    except Exception as e:  # private profiler API: degrade to Python objects only
        method = f"tracemalloc only ({type(e).__name__})"
    tracemalloc.start()
    try:
        fn()
        _, py_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del torch
    return (c10_peak or 0) + py_peak, method


# ----------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------

def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def stream_bandwidth(n: int, rounds: int) -> dict[str, float]:
    """STREAM copy / triad GB/s (median) over float32 arrays of n elements, our C loops."""
    import torch

    from ..kernels import cpu
    a, b, c = torch.ones(n), torch.full((n,), 2.0), torch.zeros(n)
    res = {}
    for name, fn, nbytes in (("copy", lambda: cpu.stream_copy(c, a), 8 * n),
                             ("triad", lambda: cpu.stream_triad(a, b, c, 3.0), 12 * n)):
        fn()
        k = max(3, min(30, int(0.05 / max(_time_once(fn), 1e-6))))
        ts = [_time_once(fn) for _ in range(k * rounds)]
        res[name] = nbytes / _median(ts) / 1e9
    return res


def _time_once(fn: Callable[[], Any], cuda: bool = False) -> float:
    if cuda:
        import torch
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _time_block(fn: Callable[[], Any], calls: int, cuda: bool,
                host: list[float] | None = None) -> list[float]:
    """Per-call times of ``calls`` back-to-back calls: each timed on the host clock (CPU), or
    the block's mean between two CUDA events, so that the GPU queue stays full as in
    training (one value per block).

    ``host``, when given, receives each call's host CPU time: ``time.thread_time()`` of the
    calling thread around the call (Python, launches, and any wait for the GPU that spins;
    on the CPU also the calling thread's share of the kernel's own work). Reading that clock
    costs well under a microsecond, so the block's wall time is unaffected."""
    clock = time.thread_time
    if not cuda:
        out = []
        for _ in range(calls):
            h0, t0 = clock(), time.perf_counter()
            fn()
            t1, h1 = time.perf_counter(), clock()
            out.append(t1 - t0)
            if host is not None:
                host.append(h1 - h0)
        return out
    import torch
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        h0 = clock()
        fn()
        if host is not None:
            host.append(clock() - h0)
    end.record()
    end.synchronize()
    return [start.elapsed_time(end) / 1e3 / calls]


def stream_bandwidth_cuda(n: int, rounds: int) -> dict[str, float]:
    """STREAM copy / triad GB/s on the GPU (torch's copy_ and add), float32, n elements."""
    import torch
    a = torch.ones(n, device="cuda")
    b, c = torch.full_like(a, 2.0), torch.zeros_like(a)
    res = {}
    for name, fn, nbytes in (("copy", lambda: c.copy_(a), 8 * n),
                             ("triad", lambda: torch.add(b, c, alpha=3.0, out=a), 12 * n)):
        fn()
        ts = [t for _ in range(3 * rounds) for t in _time_block(fn, 20, True)]
        res[name] = nbytes / _median(ts) / 1e9
    return res


def peak_extra_bytes_cuda(fn: Callable[[], Any]) -> tuple[int | None, str]:
    """Peak device bytes allocated during one call beyond those live before it."""
    import torch
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - before), "torch.cuda max_memory_allocated"


def bench_row(row: dict, args: argparse.Namespace, names: list[str], bar: Any,
              log: Callable[[str], None]) -> dict:
    import torch

    cuda = args.device == "cuda"
    # the Triton module (and triton itself) is imported only for --device cuda
    kernel: Any = importlib.import_module(
        "..kernels.triton" if cuda else "..kernels.cpu", __package__)
    dtype = getattr(torch, row["dtype"])
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in row["shapes"]:
        p = torch.randn(shape, generator=gen).to(device=args.device, dtype=dtype)
        p.requires_grad_()
        p.grad = torch.randn(shape, generator=gen).to(device=args.device, dtype=dtype)
        params.append(p)
    ntensors = len(params)
    nelem = sum(p.numel() for p in params)
    compile_ok, note = True, ""
    if args.no_compile or args.quick:
        compile_ok, note = False, "skipped (--no-compile)" if args.no_compile else \
            "skipped (--quick)"
    elif ntensors > 200 and not args.compile_all:
        compile_ok, note = False, (f"skipped: compiling {ntensors} tensors takes minutes; "
                                   "--compile-all")
    if "torch.compile" in names and compile_ok:
        log(f"[{row['name']}] compiling torch's step with torch.compile ...")
    cands = make_candidates(names, params, row["opts"], compile_ok, note, log)
    live = {k: c for k, c in cands.items() if "skip" not in c}

    # the floor runs over the arrays of our fused step (its state)
    fused = live.get("rmsprop fused")
    if fused is not None:
        st = fused["opt"].state
        order = [st[p] if p in st else st[i] for i, p in enumerate(params)]
        vs = [s["square_avg"] for s in order]
        ms = [s["grad_avg"] for s in order] if "grad_avg" in order[0] else None
        bs = [s["momentum_buffer"] for s in order] if "momentum_buffer" in order[0] else None
        vs_r = [torch.view_as_real(v) if v.is_complex() else v for v in vs]
        floor_bytes = fused["bytes"]
    else:  # fall back to a state of the params' dtype
        vs_r = [torch.zeros_like(p) for p in params]
        ms = bs = None
        floor_bytes = 5 * sum(p.nbytes for p in params)
    grads = [p.grad for p in params]
    pdata = [p.detach() for p in params]

    floor_step = kernel.floor_call(pdata, grads, vs_r, ms, bs)
    floor_step()
    live["floor"] = dict(step=floor_step, bytes=floor_bytes, first_call_s=None, note="", opt=None)

    order_names = [n for n in CANDIDATES if n in live]
    # calls per block: about 0.15 s of work, at least 3
    calls = {}
    for n in order_names:
        t = min(_time_once(live[n]["step"], cuda) for _ in range(2))
        calls[n] = args.calls or max(3, min(30, int(0.15 / max(t, 1e-6))))
    times: dict[str, list[float]] = {n: [] for n in order_names}
    rounds: dict[str, list[float]] = {n: [] for n in order_names}  # per-round medians
    host: dict[str, list[float]] = {n: [] for n in order_names}  # per-call thread CPU time
    with torch.no_grad():
        for _ in range(args.repeats):
            for n in order_names:
                fn = live[n]["step"]
                fn()  # warm-up: caches and the other candidates' effects
                block = _time_block(fn, calls[n], cuda, host[n])
                times[n] += block
                rounds[n].append(_median(block))
                if bar is not None:
                    bar.update(1)
    stream = (stream_bandwidth_cuda if cuda else stream_bandwidth)(
        nelem, max(1, min(args.repeats, 3)))

    med = {n: _median(times[n]) for n in order_names}
    floor_gbps = live["floor"]["bytes"] / med["floor"] / 1e9
    base = med.get(BASELINE)
    results = []
    for n in CANDIDATES:
        if n not in cands and n != "floor":
            continue
        c = live.get(n) or cands.get(n, {})
        if "skip" in c:
            results.append(dict(candidate=n, skipped=c["skip"]))
            continue
        if n not in live:
            continue
        gbps = c["bytes"] / med[n] / 1e9
        # The ratios pair the candidate with the floor and the baseline timed in the same
        # round, then take the median over rounds: on a shared machine whose speed drifts
        # between rounds (2x within a minute here) this is far steadier than a ratio of
        # medians taken over different rounds.
        to_floor = _median([f / t for f, t in zip(rounds["floor"], rounds[n])])
        to_base = (_median([b / t for b, t in zip(rounds[BASELINE], rounds[n])])
                   if base else None)
        to_adam = (_median([a / t for a, t in zip(rounds[ADAM], rounds[n])])
                   if ADAM in rounds else None)
        extra, method = (None, "")
        if n != "floor":
            extra, method = (peak_extra_bytes_cuda if cuda else peak_extra_bytes)(c["step"])
        r = dict(candidate=n, median_ms=med[n] * 1e3, min_ms=min(times[n]) * 1e3,
                 calls=len(times[n]), bytes=c["bytes"], gbps=gbps,
                 frac_floor=to_floor * c["bytes"] / live["floor"]["bytes"], vs_foreach=to_base,
                 vs_adam_fused=to_adam, host_us=_median(host[n]) * 1e6,
                 peak_extra_bytes=extra, memory_method=method)
        if c.get("first_call_s") is not None and (n == "torch.compile"
                                                  or (cuda and n.startswith("rmsprop fused"))):
            r["first_call_s"] = c["first_call_s"]
            if n == "torch.compile":
                r["second_call_s"] = c.get("second_call_s")
        results.append(r)
    if bar is not None:  # blocks of skipped candidates
        bar.update(args.repeats * (len(names) + 1 - len(order_names)))
    return dict(row=row["name"], dtype=row["dtype"], tensors=ntensors, elements=nelem,
                options=row["opts"], floor_gbps=floor_gbps, stream_copy_gbps=stream["copy"],
                stream_triad_gbps=stream["triad"], results=results)


def _quant_calls(params: list, opts: dict, fmt: str = "8bit",
                 cuda: bool = False) -> dict[str, dict]:
    """A quantized state row's calls, each on its own state over the same params and grads:
    our optimizer's fused step with ``fmt`` state (``rmsprop.codecs``' codes and block scales;
    tensors below ``MIN_QUANTIZED`` elements keep float32 state) and with float32 state, both
    ``nonfinite="ignore"`` as the floors read no gradient twice, and a floor for each (8-bit:
    every tensor's state as one code byte per element, scales not moved). On CUDA the floors
    are the Triton floor loop and there is no in-cache call (that bound is the CPU's)."""
    import torch

    from .. import codecs
    from ..torch import RMSprop
    floors: Any = importlib.import_module("..kernels.triton" if cuda else "..kernels.cpu",
                                          __package__)
    dev = params[0].device

    momentum = opts.get("momentum", 0.0)
    mom = momentum > 0
    grads = [p.grad for p in params]
    pdata = [p.detach() for p in params]
    block = codecs.FORMATS[codecs.QUANTIZED[fmt]["square_avg"]].block
    per_byte = 2 if fmt == "4bit" else 1
    sizes = [p.numel() for p in params]
    streams = 2 if mom else 1
    # the state the quantized step keeps: codes and a float32 scale per block, or float32
    qstate = streams * sum(n // per_byte + 4 * -(-n // block) if codecs.quantizes(n, fmt)
                           else 4 * n for n in sizes)
    quant = RMSprop(params, lr=LR, momentum=momentum, state_dtype=fmt, fused=True,
                    nonfinite="ignore")
    full = RMSprop(params, lr=LR, momentum=momentum, fused=True, nonfinite="ignore")
    step_q, step_f = quant.step, full.step
    kw = dict(lr=LR, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=momentum,
              centered=False, maximize=False, eps_in_sqrt=False, lr_in_momentum=False,
              nesterov=False, decoupled_weight_decay=False, bias_correction=1.0)
    flat = [p.view(-1) for p in pdata]
    gflat = [g.view(-1) for g in grads]
    vf = [torch.zeros(n, device=dev) for n in sizes]
    bf = [torch.zeros(n, device=dev) for n in sizes] if mom else None

    def nbytes(ts: list | None) -> int:
        return sum(t.nbytes for t in ts or [] if t is not None)
    pbytes = sum(p.nbytes for p in params)
    n = sum(sizes)
    def codes() -> list:
        return [torch.zeros(k, dtype=torch.uint8, device=dev) for k in sizes]
    floor_q = floors.floor_call(flat, gflat, codes(), None, codes() if mom else None)
    fbytes = 3 * pbytes + 2 * (nbytes(vf) + nbytes(bf))
    cache = {} if cuda else {fmt: dict(cache=_in_cache_call(fmt, kw, mom)),
                             "fp32": dict(cache=_in_cache_call("fp32", kw, mom))}
    return {f"rmsprop fused {fmt}": dict(step=step_q, bytes=3 * pbytes + 2 * qstate,
                                         **cache.get(fmt, {})),
            "rmsprop fused fp32": dict(step=step_f, bytes=fbytes, **cache.get("fp32", {})),
            "floor 8bit": dict(step=floor_q, bytes=3 * pbytes + 2 * streams * n),
            "floor fp32": dict(step=floors.floor_call(flat, gflat, vf, None, bf),
                               bytes=fbytes)}


#: Elements of the slice the in-cache calls step: one thread's params, grads and float32 state
#: (768 KiB) stay in a core's L2 cache, and 64 of them make one call long enough to time.
CACHE_SLICE, CACHE_REPEATS = 1 << 16, 64


def _in_cache_call(fmt: str, kw: dict, mom: bool) -> Callable[[], None]:
    """One thread's kernel call over one cache-resident slice listed ``CACHE_REPEATS`` times
    (``fmt``: "8bit", "4bit" or "fp32" state): the step's arithmetic without its memory
    traffic, per element a lower bound on what the kernel costs a core."""
    import torch

    from .. import codecs
    from ..kernels import cpu
    gen = torch.Generator().manual_seed(1)
    n, k = CACHE_SLICE, CACHE_REPEATS
    p = torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen) * 1e-2
    if fmt == "fp32":
        v, b = torch.rand(n, generator=gen), torch.zeros(n)

        def one_thread() -> None:  # the float32 kernel takes torch's thread count
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                cpu.fused_step([p] * k, [g] * k, [v] * k, None, [b] * k if mom else None, **kw)
            finally:
                torch.set_num_threads(threads)
        return one_thread
    fmts = codecs.QUANTIZED[fmt]
    vq, vs = cpu.quant_encode(torch.rand(n, generator=gen), fmts["square_avg"])
    bq, bs = cpu.quant_encode(torch.zeros(n), fmts["momentum_buffer"])
    return lambda: cpu.fused_step_quantized(
        [p] * k, [g] * k, [vq] * k, None, [bq] * k if mom else None,
        square_avg_scales=[vs] * k, momentum_buffer_scales=[bs] * k if mom else None,
        state_dtype=fmt, nthreads=1, **kw)


def bench_quant_row(row: dict, args: argparse.Namespace, slots: int, bar: Any) -> dict:
    """One 8-bit state row: the calls of :func:`_quant_calls` timed interleaved in rounds as
    :func:`bench_row` times its candidates. ``%floor`` pairs each step with its own floor
    (8-bit with the 8-bit floor, fp32 with the fp32 one); the note gives the 8-bit step's
    speed-up over the fp32-state step in the same rounds. ``slots``: progress-bar blocks a
    row owns per round."""
    import torch
    cuda = args.device == "cuda"
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in row["shapes"]:
        p = torch.randn(shape, generator=gen).to(args.device)
        p.grad = (torch.randn(shape, generator=gen) * 1e-2).to(args.device)
        params.append(p)
    live = _quant_calls(params, row["opts"], row["quant"], cuda)
    qname = f"rmsprop fused {row['quant']}"
    nelem = sum(p.numel() for p in params)
    calls = {}
    for name, c in live.items():
        c["step"]()
        t = min(_time_once(c["step"], cuda) for _ in range(2))
        calls[name] = args.calls or max(3, min(30, int(0.15 / max(t, 1e-6))))
    times: dict[str, list[float]] = {n: [] for n in live}
    rounds: dict[str, list[float]] = {n: [] for n in live}
    host: dict[str, list[float]] = {n: [] for n in live}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, c in live.items():
                c["step"]()
                block = _time_block(c["step"], calls[name], cuda, host[name])
                times[name] += block
                rounds[name].append(_median(block))
            if bar is not None:
                bar.update(slots)
    stream = (stream_bandwidth_cuda if cuda else stream_bandwidth)(
        nelem, max(1, min(args.repeats, 3)))
    threads = torch.get_num_threads()
    cache_s: dict[str, float] = {}
    with torch.no_grad():
        for name, c in live.items():
            if "cache" in c:
                c["cache"]()
                cache_s[name] = min(_time_once(c["cache"])
                                    for _ in range(max(3, min(args.repeats, 7))))
    own = {qname: "floor 8bit", "rmsprop fused fp32": "floor fp32",
           "floor 8bit": "floor 8bit", "floor fp32": "floor fp32"}
    results = []
    for name, c in live.items():
        fl = own[name]
        to_floor = _median([f / t for f, t in zip(rounds[fl], rounds[name])])
        med = _median(times[name])
        r = dict(candidate=name, median_ms=med * 1e3, min_ms=min(times[name]) * 1e3,
                 calls=len(times[name]), bytes=c["bytes"], gbps=c["bytes"] / med / 1e9,
                 bytes_per_element=c["bytes"] / nelem,
                 frac_floor=to_floor * c["bytes"] / live[fl]["bytes"], vs_foreach=None,
                 vs_adam_fused=None, host_us=_median(host[name]) * 1e6,
                 peak_extra_bytes=None, memory_method="")
        if name == qname:
            r["vs_fp32"] = _median([f / t for f, t in zip(rounds["rmsprop fused fp32"],
                                                          rounds[name])])
        if name in cache_s:
            # the arithmetic alone, spread over every thread without loss: the least time
            # this kernel can take on this row, so floor time over it bounds its %floor
            r["cache_ns"] = cache_s[name] / (CACHE_SLICE * CACHE_REPEATS) * 1e9
            r["threads"] = threads
            best_ms = r["cache_ns"] * nelem / threads / 1e6
            r["compute_bound_frac_floor"] = _median(times[fl]) * 1e3 / best_ms
        results.append(r)
    floor_gbps = live["floor fp32"]["bytes"] / _median(times["floor fp32"]) / 1e9
    return dict(row=row["name"], dtype=row["dtype"], tensors=len(params), elements=nelem,
                options={**row["opts"], "state_dtype": row["quant"]}, floor_gbps=floor_gbps,
                stream_copy_gbps=stream["copy"], stream_triad_gbps=stream["triad"],
                results=results)


def first_step_cost() -> dict | None:
    """First use in a fresh interpreter (1M float32 params): the kernel's first call (load the
    library, checking it matches cpu.c, and step), then the optimizer's import, construction
    and first fused step. torch.optim.Optimizer imports torch._dynamo lazily on first use
    (any torch optimizer, torch.optim.RMSprop included, pays it), so that is timed apart."""
    code = (
        "import time, torch\n"
        "n = 1_000_000\n"
        "p = torch.nn.Parameter(torch.randn(n)); p.grad = torch.randn(n)\n"
        "t0 = time.perf_counter()\n"
        "from rmsprop.kernels import cpu\n"
        "v = torch.zeros(n)\n"
        "cpu.fused_step([p.detach()], [p.grad], [v], None, None, lr=1e-3, alpha=0.99, "
        "eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False, "
        "eps_in_sqrt=False, lr_in_momentum=False, nesterov=False, "
        "decoupled_weight_decay=False, bias_correction=1.0)\n"
        "t1 = time.perf_counter()\n"
        "import torch._dynamo\n"
        "t2 = time.perf_counter()\n"
        "from rmsprop.torch import RMSprop\n"
        "opt = RMSprop([p], fused=True)\n"
        "opt.step()\n"
        "t3 = time.perf_counter()\n"
        "opt.step()\n"
        "t4 = time.perf_counter()\n"
        "print(t1 - t0, t2 - t1, t3 - t2, t4 - t3)\n")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=600)
        k, dyn, first, second = (float(x) for x in out.stdout.strip().splitlines()[-1].split())
        return dict(kernel_first_call_s=k, torch_dynamo_import_s=dyn, first_step_s=first,
                    second_step_s=second)
    except Exception:  # noqa: BLE001 - optional information
        return None


# ----------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------

def format_row(r: dict) -> str:
    head = (f"\n== {r['row']}: {r['tensors']} tensor{'s' if r['tensors'] != 1 else ''}, "
            f"{r['elements']:,} {r['dtype']} elements"
            + (f", {r['options']}" if r["options"] else "")
            + f" | floor {r['floor_gbps']:.1f} GB/s, STREAM copy {r['stream_copy_gbps']:.1f}"
            f" / triad {r['stream_triad_gbps']:.1f} GB/s")
    lines = [head,
             f"{'candidate':<22}{'median ms':>11}{'GB/s':>8}{'%floor':>8}{'x foreach':>10}"
             f"{'x Adam':>8}{'host µs':>9}{'extra MB':>10}  note"]
    for x in r["results"]:
        if "skipped" in x:
            lines.append(f"{x['candidate']:<22}{'-':>11}{'':>8}{'':>8}{'':>10}{'':>8}{'':>9}"
                         f"{'':>10}  {x['skipped']}")
            continue
        vs = f"{x['vs_foreach']:.2f}x" if x.get("vs_foreach") else "-"
        adam = f"{x['vs_adam_fused']:.2f}x" if x.get("vs_adam_fused") else "-"
        hus = "-" if x.get("host_us") is None else f"{x['host_us']:.1f}"
        extra = "-" if x.get("peak_extra_bytes") is None else f"{x['peak_extra_bytes'] / 1e6:.2f}"
        note = ""
        if "second_call_s" in x:
            note = f"first call {x['first_call_s']:.1f} s (compile), second " \
                   f"{x['second_call_s']:.2f} s"
        elif "first_call_s" in x:
            note = f"first call {x['first_call_s']:.2f} s (Triton compile)"
        if "vs_fp32" in x:
            note = f"{x['vs_fp32']:.2f}x the fp32-state step"
        if "bytes_per_element" in x:
            note = f"{x['bytes_per_element']:.3f} B/element; {note}".rstrip("; ")
        if "cache_ns" in x:
            note += (f"; in cache {x['cache_ns']:.2f} ns/element/thread: at most "
                     f"{100 * x['compute_bound_frac_floor']:.0f}%floor")
        ms = x["median_ms"]
        lines.append(f"{x['candidate']:<22}{ms:>11.3f}{x['gbps']:>8.1f}"
                     f"{100 * x['frac_floor']:>7.0f}%{vs:>10}{adam:>8}{hus:>9}{extra:>10}"
                     f"  {note}")
    return "\n".join(lines)


def host_overhead(rows: list[dict]) -> list[dict]:
    """Host CPU time per ``step()`` of the default step (``rmsprop fused``) by tensor count:
    for each count, the first row of float32 params with torch's default options (1M, the
    147-tensor model, 1000 x 64 by default)."""
    out: list[dict] = []
    seen: set[int] = set()
    for r in rows:
        if r["options"] or r["dtype"] != "float32" or r["tensors"] in seen:
            continue
        x = next((x for x in r["results"] if x["candidate"] == "rmsprop fused"
                  and "host_us" in x), None)
        if x is not None:
            seen.add(r["tensors"])
            gx = next((x for x in r["results"] if x["candidate"] == "rmsprop fused graph"
                       and "host_us" in x), None)
            out.append(dict(tensors=r["tensors"], row=r["row"], elements=r["elements"],
                            host_us=x["host_us"],
                            graph_host_us=None if gx is None else gx["host_us"]))
    return sorted(out, key=lambda h: h["tensors"])


def format_host_overhead(hosts: list[dict], cuda: bool) -> str:
    what = ("Python, launches and any wait for the GPU" if cuda else
            "on the CPU this includes the calling thread's share of the kernel's own work")
    lines = [f"\n== host CPU time per step() of rmsprop fused (the default step; "
             f"time.thread_time of the calling thread, median over calls; {what})"]
    for h in hosts:
        graph = ("" if h.get("graph_host_us") is None else
                 f"; as one CUDA graph (cuda_graph=True) {h['graph_host_us']:.1f} µs")
        lines.append(f"{h['tensors']:>6} tensor{'s' if h['tensors'] != 1 else ' '}  "
                     f"{h['host_us']:9.1f} µs  ({h['row']}, {h['elements']:,} elements"
                     f"{graph})")
    return "\n".join(lines)


def _check_output(path: str) -> None:
    """Refuse an output path the results could not be written to, before any timing: a
    folder, a missing folder, or one (or a file) without write permission."""
    if not path.strip():
        raise CLIError("bench: --json needs a file name, e.g. bench.json")
    out = Path(path)
    if out.is_dir():
        raise CLIError(f"bench: --json {path} is a folder; give a file name, e.g. "
                       f"{out / 'bench.json'}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"bench: --json {path}: the folder {parent} does not exist")
    if out.exists() and not os.access(out, os.W_OK):
        raise CLIError(f"bench: --json {path}: the file is not writable")
    if not out.exists() and not os.access(parent, os.W_OK):
        raise CLIError(f"bench: --json {path}: the folder {parent} is not writable")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print one table per row (and write --json)."""
    for flag, given in (("--repeats", args.repeats is not None),
                        ("--compile-all", args.compile_all)):
        if args.quick and given:  # the recorded command must be what ran
            raise CLIError(f"bench: --quick runs 1 round without torch.compile; drop {flag} "
                           "or --quick")
    if args.compile_all and args.no_compile:
        raise CLIError("bench: --compile-all and --no-compile contradict each other; give one")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.repeats < 1:
        raise CLIError("bench: --repeats must be >= 1")
    if args.calls is not None and args.calls < 1:
        raise CLIError("bench: --calls must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise CLIError("bench: --threads must be >= 1")
    if args.json is not None:
        _check_output(args.json)
    rows = build_rows(args)
    if args.list:
        for r in rows:
            print(f"{r['name']:<16} {len(r['shapes'])} tensors, "
                  f"{sum(math.prod(s) for s in r['shapes']):,} {r['dtype']} {r['opts'] or ''}")
        return 0
    # the CUDA graph of the cached step exists on CUDA only
    names = [n for n in CANDIDATES[:-1] if args.device == "cuda" or n not in CUDA_ONLY]
    if args.candidates is not None:
        want = _listed("--candidates", args.candidates)
        bad = [c for c in want if c not in CANDIDATES]
        if bad:
            raise CLIError(f"bench: unknown candidate {bad[0]!r} (one of: "
                           f"{', '.join(CANDIDATES)})")
        cuda_only = [c for c in want if c in CUDA_ONLY and args.device != "cuda"]
        if cuda_only:
            raise CLIError(f"bench: candidate {cuda_only[0]!r} needs --device cuda")
        names = [n for n in CANDIDATES[:-1] if n in want or n == BASELINE]
    if args.quick:
        args.calls = args.calls or 2

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's start/stop chatter
    import torch
    if args.device == "cuda":
        from ..kernels import triton as kernel
        if not torch.cuda.is_available():
            raise CLIError("bench: --device cuda needs a CUDA device (torch sees none)")
        if not kernel.available():
            raise CLIError(f"bench: the Triton kernel is unavailable: "
                           f"{kernel.unavailable_reason()}")
        args.no_first_step = True  # that figure is about the CPU kernel's library
    from ..kernels import cpu
    if args.device == "cpu" and not cpu.available():
        raise CLIError(f"bench: the fused CPU kernel is unavailable: {cpu.unavailable_reason()}")
    old_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, rows, names, torch, cpu)
    finally:
        torch.set_num_threads(old_threads)


def _run(args: argparse.Namespace, rows: list[dict], names: list[str], torch: Any,
         cpu: Any) -> int:

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    cpu_name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cuda = args.device == "cuda"
    gpu = torch.cuda.get_device_name() if cuda else None
    isa = cpu.isa() if cpu.available() else "unavailable"
    meta = dict(command="rmsprop bench " + " ".join(sys.argv[2:] if len(sys.argv) > 2 else []),
                cpu=cpu_name, cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(),
                kernel_isa=isa, kernel_library=str(cpu.library_path()), device=args.device,
                gpu=gpu,
                time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if cuda:
        import triton
        print(f"rmsprop bench --device cuda: {gpu}, torch {torch.__version__}, triton "
              f"{triton.__version__}; times from CUDA events around blocks of calls")
    else:
        print(f"rmsprop bench: {cpu_name}, {os.cpu_count()} cores, torch {torch.__version__} "
              f"with {torch.get_num_threads()} threads; kernel {isa} ({cpu.library_path()})")
    print(f"median of {args.repeats} interleaved rounds; bytes = 2x params + grads + 2x state; "
          f"%floor = GB/s over the in-run floor; x foreach = speed-up over {BASELINE}, "
          f"x Adam over {ADAM} (torch.optim.Adam(fused=True)); the ratios are medians over "
          "rounds of ratios within a round; host µs = CPU time of the calling thread per call "
          "(time.thread_time, median" + ("" if cuda else "; includes its share of the CPU "
                                        "kernel's work") + ")")
    if not args.no_first_step and not args.quick:
        fs = first_step_cost()
        meta["first_step"] = fs
        if fs:
            print(f"first use in a fresh process, 1M params: kernel's first call (load + step) "
                  f"{fs['kernel_first_call_s']:.3f} s; RMSprop import + construction + first "
                  f"fused step {fs['first_step_s']:.3f} s (after torch.optim's own lazy import "
                  f"of torch._dynamo, {fs['torch_dynamo_import_s']:.1f} s, which every torch "
                  f"optimizer pays); second step {fs['second_step_s'] * 1e3:.2f} ms")

    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(rows) * args.repeats * (len(names) + 1), desc="bench",
                       unit="block", file=sys.stderr, leave=False)
        except ImportError:
            bar = None
    out = []
    try:
        for row in rows:
            if bar is not None:
                bar.set_postfix_str(row["name"])
            r = (bench_quant_row(row, args, len(names) + 1, bar) if "quant" in row
                 else bench_row(row, args, names, bar, log))
            out.append(r)
            if bar is not None:
                bar.clear()
            print(format_row(r), flush=True)
    finally:
        if bar is not None:
            bar.close()
    hosts = host_overhead(out)
    if hosts:
        print(format_host_overhead(hosts, cuda), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=out, host_overhead=hosts), f, indent=1)
        print(f"\nwrote {args.json}")
    return 0
