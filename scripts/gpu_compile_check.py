"""torch.compile of a whole training step: ours (checked, unchecked, with statistics) against
torch.optim.RMSprop, in the default and "reduce-overhead" (CUDA graphs) modes, each against
its own eager run.

    python scripts/gpu_compile_check.py          # on CUDA (part of scripts/gpu-check.sh)
    python scripts/gpu_compile_check.py cpu      # the same on the CPU
    python scripts/gpu_compile_check.py -v       # only ours, with the traceback if it fails
"""
import sys
import time
import traceback

import torch

from rmsprop.torch import RMSprop

VERBOSE = "-v" in sys.argv
ARGS = [a for a in sys.argv[1:] if a != "-v"]
DEV = torch.device(ARGS[0] if ARGS else "cuda")
STEPS = 30
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

    fn = step if mode == "eager" else torch.compile(step, mode=mode)
    times = []
    for x, y in data:
        sync()
        t0 = time.perf_counter()
        fn(x, y)
        sync()
        times.append(time.perf_counter() - t0)
    return [p.detach().clone() for p in model.parameters()], times


def main() -> None:
    data = batches()
    names = ["ours"] if VERBOSE else list(CANDIDATES)
    for mode in ["default"] if VERBOSE else ["default", "reduce-overhead"]:
        for name in names:
            torch._dynamo.reset()
            try:
                ref, _ = run(CANDIDATES[name], "eager", data)
                got, times = run(CANDIDATES[name], mode, data)
                err = max(float((a - b).abs().max()) for a, b in zip(ref, got))
                later = sorted(times[5:])
                print(f"{mode:16s} {name:12s} first {times[0]:.2f} s  later median "
                      f"{later[len(later) // 2] * 1e3:.3f} ms  max|compiled-eager| {err:.2e}",
                      flush=True)
            except Exception as e:  # report and go on to the next candidate
                print(f"{mode:16s} {name:12s} FAILED: {type(e).__name__}: {str(e)[:300]}",
                      flush=True)
                if VERBOSE:
                    print("".join(traceback.format_exc().splitlines(True)[-45:]), flush=True)


if __name__ == "__main__":
    main()
