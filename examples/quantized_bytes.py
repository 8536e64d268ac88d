"""State bytes per parameter of RMSprop with full-precision, 8-bit and 4-bit state.

Counts the bytes of every tensor in ``opt.state`` (codes and scales included; the 4-byte
``step`` counters left out) after one step on a model-like list of parameters: an embedding
and three transformer-like layers, with their biases and norms (small tensors keep float32
state). Prints one Markdown row per option set: torch.optim.RMSprop, then ours with
``state_dtype="8bit"`` and ``"4bit"``.

    python examples/quantized_bytes.py [--width 384]
"""

from __future__ import annotations

import argparse
import math

import torch

from rmsprop.torch import RMSprop


def shapes(width: int) -> list[tuple[int, ...]]:
    """An embedding (12000 x width) and three layers of 4 square matrices, a 4x MLP and
    their 1-d params; width 384 gives 9.93M params."""
    layer = [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)] \
        + [(width,)] * 6 + [(4 * width,)]
    return [(12_000, width)] + layer * 3 + [(width,)]


def bytes_per_param(make, sizes: list[tuple[int, ...]]) -> float:
    ps = [torch.nn.Parameter(torch.zeros(s)) for s in sizes]
    opt = make(ps)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    total = sum(v.numel() * v.element_size() for st in opt.state.values()
                for k, v in st.items() if k != "step" and torch.is_tensor(v))
    return total / sum(math.prod(s) for s in sizes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=384, help="model width (384: 9.93M params)")
    args = ap.parse_args()
    sizes = shapes(args.width)
    print(f"{sum(math.prod(s) for s in sizes):,} params in {len(sizes)} tensors")
    print("| state | torch.optim.RMSprop | state_dtype='8bit' | state_dtype='4bit' |")
    print("|---|---|---|---|")
    for name, kw in [("square_avg", {}), ("+ momentum_buffer", dict(momentum=0.9)),
                     ("+ momentum_buffer + grad_avg", dict(momentum=0.9, centered=True))]:
        row = [bytes_per_param(lambda ps, kw=kw: torch.optim.RMSprop(ps, **kw), sizes)]
        row += [bytes_per_param(lambda ps, f=f, kw=kw: RMSprop(ps, state_dtype=f, **kw), sizes)
                for f in ("8bit", "4bit")]
        print(f"| {name} | " + " | ".join(f"{x:.3f} B" for x in row) + " |")


if __name__ == "__main__":
    main()
