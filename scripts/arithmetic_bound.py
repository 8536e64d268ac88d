#!/usr/bin/env python3
"""What an exact quantized-state step must compute, against the time its memory floor allows.

``rmsprop bench`` shows the fused 8-bit/4-bit step arithmetic-bound on small CPUs (its ``in
cache`` note). This asks whether *any* kernel of the same rule could do better, from the two
pieces of work the rule fixes per element and that no kernel can skip:

* the exact update: one correctly rounded ``sqrt`` and one correctly rounded division (the
  spec's ``g / (sqrt(v) + eps)``), here the vector instructions alone in a loop, so a lower
  bound on the divider's time per element;
* the state codecs: the fused kernel's own decode and encode (``rms_quant_codec``) of each
  quantized format. The unsigned encode there takes the root of each value itself; the
  default step's encoder reuses the root its update divides by, so for the step the ``u8``
  encode figure is an upper bound.

Both are timed on one thread over ``--elements`` values that stay in L1 (best of
``--rounds``), in ns per element. The time allowed is the bandwidth floor of the 8-bit
``square_avg`` step (the kernel's floor loop, every thread, ``--numel`` elements) over the
target fraction (``--target``, the issue's 85 %), per element and thread. The last lines
compare what the step needs with that allowance: the sum (no overlap at all), and the
codecs alone (the divider's work hidden completely behind them).

Usage::

    python scripts/arithmetic_bound.py
    python scripts/arithmetic_bound.py --numel 50M --target 0.85
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from rmsprop.kernels import cpu

HARNESS = r"""
#include <immintrin.h>
#include <stdint.h>
#include <time.h>
static double now(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9;
}
/* o = g / (sqrt(v) + eps), each operation correctly rounded (IEEE vsqrtps, vaddps, vdivps) */
static void sqrtdiv(int64_t n, const float *v, const float *g, float *o, float eps) {
    const __m256 e = _mm256_set1_ps(eps);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 d = _mm256_add_ps(_mm256_sqrt_ps(_mm256_loadu_ps(v + i)), e);
        _mm256_storeu_ps(o + i, _mm256_div_ps(_mm256_loadu_ps(g + i), d));
    }
    for (; i < n; i++) {
        __m128 s = _mm_sqrt_ss(_mm_set_ss(v[i]));
        o[i] = _mm_cvtss_f32(_mm_div_ss(_mm_set_ss(g[i]), _mm_add_ss(s, _mm_set_ss(eps))));
    }
}
double rms_ab_sqrtdiv(int64_t n, const float *v, const float *g, float *o, float eps,
                      int rounds, int calls) {
    double best = 1e30;
    for (int r = 0; r < rounds; r++) {
        double t = now();
        for (int k = 0; k < calls; k++) sqrtdiv(n, v, g, o, eps);
        t = now() - t;
        if (t < best) best = t;
    }
    return best / calls / n * 1e9;
}
typedef int (*codec_fn)(int, int, int64_t, float *, uint8_t *, float *);
double rms_ab_codec(void *fn, int fmt, int enc, int64_t n, float *x, uint8_t *codes,
                    float *scales, int rounds, int calls) {
    codec_fn f = (codec_fn)fn;
    double best = 1e30;
    for (int r = 0; r < rounds; r++) {
        double t = now();
        for (int k = 0; k < calls; k++)
            if (f(fmt, enc, n, x, codes, scales)) return -1.0;
        t = now() - t;
        if (t < best) best = t;
    }
    return best / calls / n * 1e9;
}
"""

FORMATS = ("u8", "s8", "u4", "s4")


class Harness:
    """The timing loops above, compiled for x86-64-v3 (AVX2, FMA) beside the kernel."""

    def __init__(self, folder: Path) -> None:
        cc = cpu._compiler()
        if cc is None:
            raise RuntimeError("no C compiler found (set $CC or install gcc/clang)")
        src, lib = folder / "harness.c", folder / "harness.so"
        src.write_text(HARNESS)
        r = subprocess.run([*cc.split(), "-O2", "-march=x86-64-v3", "-ffp-contract=off",
                            "-fPIC", "-shared", str(src), "-o", str(lib)],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"compiling the timing harness failed: {r.stderr.strip()}")
        self.lib = ctypes.CDLL(str(lib))
        vp, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self.lib.rms_ab_sqrtdiv.argtypes = [i64, vp, vp, vp, ctypes.c_float, i32, i32]
        self.lib.rms_ab_sqrtdiv.restype = ctypes.c_double
        self.lib.rms_ab_codec.argtypes = [vp, i32, i32, i64, vp, vp, vp, i32, i32]
        self.lib.rms_ab_codec.restype = ctypes.c_double
        kernel = ctypes.CDLL(str(cpu.library_path()))
        self.codec = ctypes.cast(kernel.rms_quant_codec, ctypes.c_void_p).value

    def sqrtdiv(self, v: torch.Tensor, g: torch.Tensor, out: torch.Tensor, eps: float,
                rounds: int, calls: int) -> float:
        return self.lib.rms_ab_sqrtdiv(v.numel(), v.data_ptr(), g.data_ptr(), out.data_ptr(),
                                       eps, rounds, calls)

    def codec_ns(self, fmt: str, enc: bool, x: torch.Tensor, rounds: int,
                 calls: int) -> tuple[float, torch.Tensor, torch.Tensor]:
        """ns/element of the kernel's decode (``enc`` False) or encode of ``x`` in ``fmt``,
        with the codes and scales of ``x`` (the decode's input)."""
        code, block, per_byte = cpu._qformat(fmt, x.numel())
        codes = torch.empty(x.numel() // per_byte, dtype=torch.uint8)
        scales = torch.empty(-(-x.numel() // block), dtype=torch.float32)
        if self.lib.rms_ab_codec(self.codec, code, 1, x.numel(), x.data_ptr(),
                                 codes.data_ptr(), scales.data_ptr(), 1, 1) < 0:
            raise RuntimeError(f"the kernel's {fmt} codec refused {x.numel()} elements")
        ns = self.lib.rms_ab_codec(self.codec, code, int(enc), x.numel(), x.data_ptr(),
                                   codes.data_ptr(), scales.data_ptr(), rounds, calls)
        if ns < 0:
            raise RuntimeError(f"the kernel's {fmt} codec failed")
        return float(ns), codes, scales


def floor_ms(numel: int, repeats: int) -> float:
    """Median time of the kernel's floor loop over the 8-bit square_avg step's bytes."""
    p, g = torch.randn(numel), torch.randn(numel)
    v = torch.zeros(numel, dtype=torch.uint8)
    call = cpu.floor_call([p], [g], [v])
    call()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--elements", type=int, default=4096,
                    help="values per timed call, kept in L1 (default 4096, a multiple of 256)")
    ap.add_argument("--rounds", type=int, default=200, help="rounds, best taken (default 200)")
    ap.add_argument("--calls", type=int, default=50, help="calls per round (default 50)")
    ap.add_argument("--numel", type=float, default=10e6,
                    help="elements of the floor's tensor (default 10M)")
    ap.add_argument("--repeats", type=int, default=15, help="floor calls, median (default 15)")
    ap.add_argument("--target", type=float, default=0.85,
                    help="fraction of the floor asked for (default 0.85)")
    args = ap.parse_args(argv)
    if args.elements <= 0 or args.elements % 256:
        ap.error("--elements must be a positive multiple of 256")
    if min(args.rounds, args.calls, args.repeats) <= 0 or args.numel < 1:
        ap.error("--rounds, --calls, --repeats and --numel must be positive")
    if not 0 < args.target <= 1:
        ap.error("--target must be in (0, 1]")
    if not cpu.available() or cpu.isa() != "x86-64-v3":
        print("arithmetic_bound: needs the CPU kernel's x86-64-v3 build "
              f"({cpu.unavailable_reason() or 'this CPU lacks AVX2/FMA'})", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(0)
    n = args.elements
    v = torch.rand(n, generator=gen)
    g = torch.randn(n, generator=gen)
    out = torch.empty(n)
    with tempfile.TemporaryDirectory() as folder:
        h = Harness(Path(folder))
        sd = h.sqrtdiv(v, g, out, 1e-8, args.rounds, args.calls)
        codec = {}
        for fmt in FORMATS:
            x = v if fmt.startswith("u") else g
            codec[fmt] = (h.codec_ns(fmt, False, x.clone(), args.rounds, args.calls)[0],
                          h.codec_ns(fmt, True, x.clone(), args.rounds, args.calls)[0])
    numel = int(args.numel)
    threads = torch.get_num_threads()
    fl = floor_ms(numel, args.repeats)
    allowed = fl * 1e6 * threads / numel / args.target
    print(f"one thread, {n} values in L1, best of {args.rounds} rounds of {args.calls} calls "
          "(ns/element):")
    print(f"  exact sqrt + division (the update's divider work)  {sd:.3f}")
    for fmt in FORMATS:
        dec, enc = codec[fmt]
        print(f"  {fmt} codec: decode {dec:.3f}  encode {enc:.3f}")
    dec, enc = codec["u8"]
    need = sd + dec + enc
    print(f"8-bit square_avg step, {numel:,} elements, {threads} threads: floor {fl:.4g} ms; "
          f"{args.target:.0%} of it allows {allowed:.4g} ns/element/thread")
    print(f"  sqrt + division + u8 decode + u8 encode: {need:.3f} "
          f"({need / allowed:.2f}x the allowance, nothing overlapped)")
    print(f"  u8 decode + encode alone: {dec + enc:.3f} ({(dec + enc) / allowed:.2f}x the "
          "allowance, the divider's work hidden completely)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
