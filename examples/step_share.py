"""What the optimizer step costs inside a whole training iteration.

    python examples/step_share.py                 # ~10M-param MLP, batch 256, on the CPU
    python examples/step_share.py --width 2048 --depth 4 --batch 64
    python examples/step_share.py --device cuda --width 4096 --depth 8 --batch 1024

`rmsprop bench` times the step alone. Here each iteration is forward, backward, step and
zero_grad on one model; the optimizers are timed interleaved (blocks of iterations, median
per optimizer) and the step's share of the iteration is reported, with each step's speed-up
over torch's `foreach=True` one (`x foreach`). It shows what the default inf/NaN check
(`nonfinite="raise"`: one more read of the gradients) costs where it matters. On CUDA it also
times the default step replayed as one CUDA graph (`cuda_graph=True`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rmsprop.torch import RMSprop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1536)
    ap.add_argument("--depth", type=int, default=5, help="hidden layers")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5, help="timed iterations per block")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the host waits for the "
                    "GPU after backward and after the step, so each part is timed whole)")
    args = ap.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(256, args.width), torch.nn.ReLU()]
    for _ in range(args.depth - 1):
        layers += [torch.nn.Linear(args.width, args.width), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(args.width, 10))
    model = torch.nn.Sequential(*layers).to(device)
    n = sum(p.numel() for p in model.parameters())
    x = torch.randn(args.batch, 256, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    params = list(model.parameters())
    opts = {
        "rmsprop (default, checked)": RMSprop(params, lr=1e-4),
        "rmsprop nonfinite='ignore'": RMSprop(params, lr=1e-4, nonfinite="ignore"),
        "torch RMSprop foreach=True": torch.optim.RMSprop(params, lr=1e-4, foreach=True),
        "torch RMSprop (default)": torch.optim.RMSprop(params, lr=1e-4),
    }
    if device.type == "cuda":  # the default step replayed as one CUDA graph
        opts["rmsprop cuda_graph=True"] = RMSprop(params, lr=1e-4, cuda_graph=True)
    fb: dict[str, list[float]] = {k: [] for k in opts}
    st: dict[str, list[float]] = {k: [] for k in opts}

    def iteration(opt: torch.optim.Optimizer) -> tuple[float, float]:
        sync()
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        sync()
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1

    for _ in range(args.rounds):
        for name, opt in opts.items():
            iteration(opt)  # warm-up: this optimizer's state into the caches
            for _ in range(args.iters):
                a, b = iteration(opt)
                fb[name].append(a)
                st[name].append(b)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"MLP of {n / 1e6:.1f}M params, batch {args.batch}, {where}; medians of "
          f"{args.rounds * args.iters} iterations each")
    print(f"{'optimizer':28s} {'fwd+bwd ms':>10s} {'step ms':>8s} {'x foreach':>9s} "
          f"{'step share':>10s}")
    base = statistics.median(st["torch RMSprop foreach=True"])
    for name in opts:
        a, b = statistics.median(fb[name]), statistics.median(st[name])
        # x foreach: torch foreach=True's median step over this one's (> 1: this one faster)
        print(f"{name:28s} {a * 1e3:10.2f} {b * 1e3:8.2f} {base / b:8.2f}x "
              f"{100 * b / (a + b):9.1f}%")


if __name__ == "__main__":
    main()
