"""Data-parallel training with rmsprop.torch.RMSprop, launched by torchrun (one or many nodes).

Three ways to spread the work, chosen with ``--mode`` (several may be given, comma-separated):

* ``ddp``  -- DistributedDataParallel: every rank holds the whole model, its gradients and the
  whole optimizer state; gradients are averaged across ranks.
* ``zero`` -- DDP + ``torch.distributed.optim.ZeroRedundancyOptimizer(optimizer_class=RMSprop)``:
  the optimizer state is partitioned (each rank keeps the state of ~1/world of the params).
* ``fsdp`` -- FSDP2 (``torch.distributed.fsdp.fully_shard``): params, gradients and optimizer
  state are all sharded; RMSprop steps on the local shards of the DTensor params.

Each mode prints the optimizer-state bytes held by every rank, so the scaling is visible.
With ``--checkpoint-dir`` the sharded model and optimizer state are saved with
``torch.distributed.checkpoint`` at the end (and loaded first, if present, to resume).

One machine, two processes (CPU, gloo)::

    torchrun --standalone --nproc_per_node=2 examples/ddp_torchrun.py --mode ddp,zero,fsdp

Two nodes with 8 GPUs each (run on every node; NCCL is picked when CUDA is available)::

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=node0.example.com:29500 --rdzv_id=rmsprop-demo \\
        examples/ddp_torchrun.py --mode fsdp --steps 1000 --checkpoint-dir /shared/ckpt

The data is synthetic (a fixed random linear teacher plus noise), generated per rank from the
seed, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

from rmsprop.torch import RMSprop

MODES = ("ddp", "zero", "fsdp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", default="ddp",
                    help=f"comma-separated subset of {', '.join(MODES)} (default: ddp)")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per mode")
    ap.add_argument("--batch", type=int, default=64, help="per-rank batch size")
    ap.add_argument("--width", type=int, default=256, help="hidden width of the MLP")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--preset", default="pytorch", help="rmsprop preset (default: pytorch)")
    ap.add_argument("--checkpoint-dir", default=None,
                    help="save (and resume from) a torch.distributed.checkpoint here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        ap.error(f"unknown --mode {', '.join(bad) or args.mode!r}; choose from {', '.join(MODES)}")
    if args.steps < 1 or args.batch < 1 or args.width < 1:
        ap.error("--steps, --batch and --width must be positive")
    args.modes = modes
    return args


def setup() -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:
        sys.exit("run me with torchrun, e.g. "
                 "torchrun --standalone --nproc_per_node=2 examples/ddp_torchrun.py")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        device = torch.device("cuda", local)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def make_model(width: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return torch.nn.Sequential(torch.nn.Linear(32, width), torch.nn.GELU(),
                               torch.nn.Linear(width, width), torch.nn.GELU(),
                               torch.nn.Linear(width, 8)).to(device)


def batches(rank: int, batch: int, device: torch.device, seed: int):
    """An endless stream of (x, y) for this rank: a different slice of the data per rank."""
    teacher = torch.randn(32, 8, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1 + rank)
    while True:
        x = torch.randn(batch, 32, generator=g)
        y = x @ teacher + 0.1 * torch.randn(batch, 8, generator=g)
        yield x.to(device), y.to(device)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Optimizer-state bytes this rank holds (local shards only for DTensor state)."""
    inner = getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer wraps the local optimizer
    total = 0
    for st in inner.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                local = v.to_local() if hasattr(v, "to_local") else v
                total += local.numel() * local.element_size()
    return total


def build(mode: str, args, device):
    model = make_model(args.width, device)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        return model, RMSprop.from_preset(args.preset, model.parameters(), lr=args.lr)
    from torch.nn.parallel import DistributedDataParallel as DDP
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        from rmsprop.presets import resolve_preset
        opts = resolve_preset(args.preset, {"lr": args.lr})
        return ddp, ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=RMSprop, **opts)
    return ddp, RMSprop.from_preset(args.preset, ddp.parameters(), lr=args.lr)


def checkpoint(mode: str, model, opt, path: str, load: bool) -> bool:
    """Save or load model + optimizer with torch.distributed.checkpoint (each rank writes and
    reads only its shards). Returns whether a checkpoint was loaded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    if mode == "zero":  # ZeRO has its own consolidate_state_dict; DCP covers ddp and fsdp
        return False
    where = os.path.join(path, mode)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    if not load:
        dcp.save(state, checkpoint_id=where)
        return False
    if not os.path.exists(os.path.join(where, ".metadata")):
        return False
    dcp.load(state, checkpoint_id=where)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    return True


def train(mode: str, args, rank: int, world: int, device: torch.device) -> float:
    model, opt = build(mode, args, device)
    if args.checkpoint_dir and checkpoint(mode, model, opt, args.checkpoint_dir, load=True):
        if rank == 0:
            print(f"[{mode}] resumed from {args.checkpoint_dir}")
    data = batches(rank, args.batch, device, args.seed)
    bar = None
    if rank == 0:
        try:
            from tqdm import tqdm
            bar = tqdm(total=args.steps, desc=mode, unit="step")
        except ImportError:
            pass
    t0 = time.perf_counter()
    loss = torch.zeros((), device=device)
    for _ in range(args.steps):
        x, y = next(data)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    # the mean loss over ranks, and every rank's optimizer-state footprint
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    held = [None] * world
    dist.all_gather_object(held, state_bytes(opt))
    params = sum(p.numel() for p in make_model(args.width, torch.device("cpu")).parameters())
    if rank == 0:
        per_rank = ", ".join(f"{b / 1024:.1f}" for b in held)
        print(f"[{mode}] {args.steps} steps in {elapsed:.2f} s; final loss {mean_loss.item():.4f}; "
              f"{params} params; optimizer state per rank (KiB): {per_rank}")
    if args.checkpoint_dir:
        checkpoint(mode, model, opt, args.checkpoint_dir, load=False)
    return float(mean_loss)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world, device = setup()
    try:
        for mode in args.modes:
            train(mode, args, rank, world, device)
        # Leave together: a rank that tears down its gloo connections while a peer is still
        # finishing the last collective (the checkpoint's) can abort at exit.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
