"""A whole training step under torch.compile: our RMSprop against torch.optim.RMSprop.

    python examples/compile_step.py            # both, each in a fresh process and a cold
                                               # inductor cache: first call, second call
                                               # (a recompile would show here), median step

The model is a small MLP (64-256-256-10, batch 128) on the CPU; the step is forward,
backward, ``opt.step()`` and ``opt.zero_grad()`` in one compiled function.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

CANDIDATES = {
    "rmsprop (default: checked)": "RMSprop(model.parameters(), lr=1e-3)",
    "rmsprop nonfinite='ignore'": "RMSprop(model.parameters(), lr=1e-3, nonfinite='ignore')",
    "torch.optim.RMSprop foreach": "torch.optim.RMSprop(model.parameters(), lr=1e-3, "
                                   "foreach=True)",
}


def child(make: str, steps: int = 40) -> None:
    import torch

    from rmsprop.torch import RMSprop  # noqa: F401  (used by `make`)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(),
                                torch.nn.Linear(256, 256), torch.nn.Tanh(),
                                torch.nn.Linear(256, 10))
    opt = eval(make)
    x, y = torch.randn(128, 64), torch.randn(128, 10)

    @torch.compile
    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        train_step(x, y)
        times.append(time.perf_counter() - t0)
    later = sorted(times[5:])
    print(f"{times[0]:.2f} {times[1]:.3f} {later[len(later) // 2] * 1e3:.2f}")


def main() -> None:
    print(f"{'optimizer':30s} {'first call':>10s} {'second':>8s} {'median step':>12s}")
    for name, make in CANDIDATES.items():
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
            out = subprocess.run([sys.executable, __file__, "--child", make], env=env,
                                 capture_output=True, text=True, check=True).stdout
        first, second, step = out.split()[-3:]
        print(f"{name:30s} {first:>9s}s {second:>7s}s {step:>9s} ms")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
