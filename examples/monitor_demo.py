"""Health warnings on a badly initialised deep network, and none on a healthy one.

Two 20-layer tanh MLPs learn the same regression with the same optimizer. One is initialised
with tiny weights (std 0.05): the backward signal shrinks by about ``0.05*sqrt(width) = 0.28`` per
layer, so the first layers get gradients some 20 orders of magnitude smaller than the last and,
below ``eps``, RMSProp's normalisation cannot rescue them. The other uses Xavier initialisation
with tanh's gain. :class:`rmsprop.monitor.Monitor` watches both.

Run: ``python examples/monitor_demo.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import collections
import warnings

import torch

from rmsprop.monitor import Monitor, RmspropHealthWarning
from rmsprop.torch import RMSprop

DEPTH, WIDTH, STEPS = 20, 32, 100


def make_net(init: str) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for i in range(DEPTH):
        lin = torch.nn.Linear(WIDTH, WIDTH if i < DEPTH - 1 else 1)
        if init == "tiny":
            torch.nn.init.normal_(lin.weight, std=0.05)
        else:
            torch.nn.init.xavier_normal_(lin.weight, gain=torch.nn.init.calculate_gain("tanh"))
        torch.nn.init.zeros_(lin.bias)
        layers += [lin, torch.nn.Tanh()] if i < DEPTH - 1 else [lin]
    return torch.nn.Sequential(*layers)


def train(init: str) -> tuple[Monitor, float, float]:
    torch.manual_seed(0)
    x = torch.randn(256, WIDTH)
    y = torch.sin(x[:, :1] * 2) + 0.5 * x[:, 1:2]
    net = make_net(init)
    opt = RMSprop(net.named_parameters(), lr=1e-3, track_stats="params")
    mon = Monitor(opt, window=50, emit=False).attach()
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return mon, losses[0], losses[-1]


def main() -> None:
    # Tensors this small gain nothing from intra-op threads: waking and joining the threads
    # costs more than the arithmetic of a 32-wide layer.
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", RmspropHealthWarning)
    for init in ("tiny", "xavier"):
        mon, first, last = train(init)
        kinds = collections.Counter(w.kind for w in mon.warnings)
        series = {k: len({w.series for w in mon.warnings if w.kind == k}) for k in kinds}
        print(f"{DEPTH}-layer tanh MLP, {init} init: loss {first:.3f} -> {last:.3f} in {STEPS} "
              f"steps; {len(mon.warnings)} warnings "
              + (", ".join(f"{k}: {n} ({series[k]} series)" for k, n in sorted(kinds.items()))
                 if kinds else "(healthy)"))
        shown = set()
        for w in mon.warnings:
            if w.kind not in shown:
                shown.add(w.kind)
                print("   ", w.message)


if __name__ == "__main__":
    main()
