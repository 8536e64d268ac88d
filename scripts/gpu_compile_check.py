"""torch.compile of a whole training step: ours (checked, unchecked, with statistics) against
torch.optim.RMSprop, in the default and "reduce-overhead" (CUDA graphs) modes, each against
its own eager run.

    python scripts/gpu_compile_check.py          # on CUDA (part of scripts/gpu-check.sh)
    python scripts/gpu_compile_check.py cpu      # the same on the CPU
    python scripts/gpu_compile_check.py -v       # only ours, with the traceback if it fails
    python scripts/gpu_compile_check.py cpu --steps 3 --backend eager  # dynamo's tracing only

Exit status 1 if a candidate failed to compile or run, or its result is not finite (the
printed ``max|compiled-eager|`` is the measure of agreement: the compiled forward and
backward round differently from the eager ones, so it is not 0).
"""
import argparse
import math
import sys
import time
import traceback

import torch

from rmsprop.torch import RMSprop

_ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
_ap.add_argument("device", nargs="?", default="cuda", help="cuda (default) or cpu")
_ap.add_argument("-v", action="store_true", help="only ours, default mode, with the traceback")
_ap.add_argument("--steps", type=int, default=30, help="training steps per run (default 30)")
_ap.add_argument("--only", default=None, metavar="NAME[,NAME]",
                 help="candidates: ours, ours-ignore, ours-stats, torch (default: all)")
_ap.add_argument("--modes", default="default,reduce-overhead", metavar="MODE[,MODE]",
                 help="torch.compile modes (default: default,reduce-overhead)")
_ap.add_argument("--backend", default="inductor",
                 help="torch.compile backend (default inductor; 'eager' traces with dynamo "
                      "without generating code, in seconds: a smoke test of the tracing)")
ARGV = _ap.parse_args()
VERBOSE = ARGV.v
DEV = torch.device(ARGV.device)
STEPS = ARGV.steps
CANDIDATES = {
    "ours": lambda ps: RMSprop(ps, lr=1e-3),
    "ours-ignore": lambda ps: RMSprop(ps, lr=1e-3, nonfinite="ignore"),
    "ours-stats": lambda ps: RMSprop(ps, lr=1e-3, track_stats=True),
    "torch": lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
}


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def batches() -> list:
    out = []
    for i in range(STEPS):
        gen = torch.Generator(device=DEV.type).manual_seed(i)
        out.append((torch.randn(64, 256, device=DEV, generator=gen),
                    torch.randint(0, 10, (64,), device=DEV, generator=gen)))
    return out


def run(make_opt, mode: str, data: list) -> tuple[list, list]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(),
                                torch.nn.Linear(1024, 1024), torch.nn.GELU(),
                                torch.nn.Linear(1024, 10)).to(DEV)
    opt = make_opt(model.parameters())

    def step(x, y):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if mode == "eager":
        fn = step
    elif ARGV.backend == "inductor":
        fn = torch.compile(step, mode=mode)
    else:  # modes are inductor's
        fn = torch.compile(step, backend=ARGV.backend)
    times = []
    for x, y in data:
        sync()
        t0 = time.perf_counter()
        fn(x, y)
        sync()
        times.append(time.perf_counter() - t0)
    return [p.detach().clone() for p in model.parameters()], times


def main() -> int:
    data = batches()
    names = ["ours"] if VERBOSE else list(CANDIDATES)
    modes = ["default"] if VERBOSE else [m.strip() for m in ARGV.modes.split(",") if m.strip()]
    if ARGV.only:
        names = [n.strip() for n in ARGV.only.split(",") if n.strip()]
        bad = [n for n in names if n not in CANDIDATES]
        if bad:
            print(f"gpu_compile_check: unknown candidate {bad[0]!r} (one of: "
                  f"{', '.join(CANDIDATES)})", file=sys.stderr)
            return 2
    failed = 0
    for mode in modes:
        for name in names:
            torch._dynamo.reset()
            try:
                ref, _ = run(CANDIDATES[name], "eager", data)
                got, times = run(CANDIDATES[name], mode, data)
                err = max(float((a - b).abs().max()) for a, b in zip(ref, got))
                if not math.isfinite(err):
                    failed += 1
                later = sorted(times[min(5, len(times) - 1):])
                print(f"{mode:16s} {name:12s} first {times[0]:.2f} s  later median "
                      f"{later[len(later) // 2] * 1e3:.3f} ms  max|compiled-eager| {err:.2e}",
                      flush=True)
            except Exception as e:  # report and go on to the next candidate
                failed += 1
                print(f"{mode:16s} {name:12s} FAILED: {type(e).__name__}: {str(e)[:300]}",
                      flush=True)
                if VERBOSE:
                    print("".join(traceback.format_exc().splitlines(True)[-45:]), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
