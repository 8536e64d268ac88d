#!/usr/bin/env python3
"""Builds of the CPU kernel from different commits, timed against each other in one process.

On a shared machine two runs of ``rmsprop bench`` minutes apart can differ by more than a
kernel change is worth. This builds the kernel's sources (``rmsprop.kernels.cpu.SOURCES``) as
they are at each git revision given (``WORKTREE``: as they are on disk), loads every build
at once, and times them in interleaved rounds on the same tensors. Each build steps its own
optimizer (``rmsprop.torch.RMSprop(fused=True, nonfinite="ignore")``, the cached plan the
bench times) and is paired in each round with the bandwidth floor (the kernel's floor loop
moving the bytes of 8-bit state; one floor for every build, the last revision's); the figure
is the median over rounds of its % of the floor, by the bench's definition (GB/s over the
floor's GB/s), beside the median step and floor times. With ``--in-cache`` it times instead
one thread's kernel call over a slice that stays in L2 (the bench's ``in cache`` note), in ns
per element: the arithmetic alone.

Usage::

    python scripts/kernel_ab.py f2ccb1b HEAD --state 4bit --numel 10M
    python scripts/kernel_ab.py HEAD WORKTREE --state 8bit --in-cache
    python scripts/kernel_ab.py HEAD WORKTREE --state 4bit --momentum 0.9
"""

from __future__ import annotations

import argparse
import ctypes
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = "src/rmsprop/kernels"


def _numel(text: str) -> int:
    mult = {"K": 10**3, "M": 10**6}
    return int(float(text[:-1]) * mult[text[-1]]) if text[-1] in mult else int(text)


def build(rev: str, out_dir: Path) -> ctypes.CDLL:
    """The kernel library built from ``rev``'s sources (``WORKTREE``: the files on disk)."""
    from rmsprop.kernels import cpu
    src = out_dir / rev
    src.mkdir(parents=True, exist_ok=True)
    for name in cpu.SOURCES:
        if rev == "WORKTREE":
            text = (ROOT / KERNELS / name).read_bytes()
        else:
            text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{KERNELS}/{name}"],
                                  check=True, capture_output=True).stdout
        (src / name).write_bytes(text)
    lib_path = src / "kernel.so"
    cc = cpu._compiler()
    if cc is None:
        raise SystemExit("kernel_ab: no C compiler found")
    cmd = [*shlex.split(cc), *cpu.CFLAGS, f'-DRMS_SOURCE_HASH="{rev}"', str(src / "cpu.c"),
           "-o", str(lib_path), "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"kernel_ab: building {rev} failed: {r.stderr.strip()[-500:]}")
    lib = ctypes.CDLL(str(lib_path))
    lib.rms_abi_version.restype = ctypes.c_int
    if lib.rms_abi_version() != cpu._ABI_VERSION:
        raise SystemExit(f"kernel_ab: {rev}'s kernel has another ABI version than this tree's")
    cpu._setup(lib)
    return lib


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("revs", nargs="+", help="git revisions, or WORKTREE")
    ap.add_argument("--state", choices=["8bit", "4bit", "fp32"], default="8bit")
    ap.add_argument("--numel", type=_numel, default=10_000_000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--in-cache", action="store_true")
    ap.add_argument("--momentum", type=float, default=0.0,
                    help="the step's momentum (the bench's momentum rows: 0.9)")
    args = ap.parse_args(argv)

    import torch

    from rmsprop.cli import bench
    from rmsprop.kernels import cpu
    from rmsprop.torch import RMSprop
    if not cpu.available():
        raise SystemExit(f"kernel_ab: {cpu.unavailable_reason()}")
    tmp = tempfile.TemporaryDirectory(prefix="kernel_ab-")
    libs = {rev: build(rev, Path(tmp.name)) for rev in args.revs}

    def use(rev: str) -> None:
        cpu._lib = libs[rev]

    kw = dict(lr=bench.LR, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=args.momentum,
              centered=False, maximize=False, eps_in_sqrt=False, lr_in_momentum=False,
              nesterov=False, decoupled_weight_decay=False, bias_correction=1.0)
    calls: dict = {}
    floor = None
    per: float
    if args.in_cache:
        for rev in args.revs:
            use(rev)
            calls[rev] = bench._in_cache_call(args.state, kw, args.momentum > 0)
        per = float(bench.CACHE_SLICE * bench.CACHE_REPEATS)
    else:
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(args.numel, generator=gen))
        p.grad = torch.randn(args.numel, generator=gen) * 1e-2
        opts = {} if args.state == "fp32" else {"state_dtype": args.state}
        for rev in args.revs:
            use(rev)
            opt = RMSprop([p], lr=bench.LR, momentum=args.momentum, fused=True,
                          nonfinite="ignore", **opts)
            opt.step()
            calls[rev] = opt.step
        floor = cpu.floor_call([p.detach()], [p.grad],
                               [torch.zeros(args.numel, dtype=torch.uint8)])
        # bytes per element: the step's (the bench's count) over the 8-bit floor's 14
        state = {"8bit": 1 + 4 / 256, "4bit": 0.5 + 4 / 128, "fp32": 4.0}[args.state]
        state *= 2 if args.momentum > 0 else 1
        per = (12 + 2 * state) / 14

    def best(f, k: int = 3) -> float:
        b = float("inf")
        for _ in range(k):
            t = time.perf_counter()
            f()
            b = min(b, time.perf_counter() - t)
        return b

    figures: dict[str, list[float]] = {rev: [] for rev in args.revs}
    times: dict[str, list[tuple[float, float]]] = {rev: [] for rev in args.revs}
    for _ in range(args.rounds):
        for rev in args.revs:
            use(rev)
            if args.in_cache:
                figures[rev].append(best(calls[rev], 5) / per * 1e9)
            else:
                assert floor is not None
                f = best(floor)
                s = best(calls[rev])
                f = min(f, best(floor))
                figures[rev].append(100 * f / s * per)
                times[rev].append((s, f))
    unit = "ns/element (one thread, in L2)" if args.in_cache else "% of the floor"
    print(f"kernel_ab: {args.state} state, "
          f"{'in cache' if args.in_cache else f'{args.numel:,} elements'}, "
          f"{args.rounds} interleaved rounds; median [quartiles] {unit}")
    for rev in args.revs:
        x = sorted(figures[rev])
        q1, q3 = x[(len(x) - 1) // 4], x[3 * (len(x) - 1) // 4]
        ms = ("" if args.in_cache else
              f"   step {statistics.median(t[0] for t in times[rev]) * 1e3:.3f} ms, floor "
              f"{statistics.median(t[1] for t in times[rev]) * 1e3:.3f} ms")
        print(f"  {rev:>12s}  {statistics.median(x):7.3f}  [{q1:.3f}, {q3:.3f}]{ms}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
