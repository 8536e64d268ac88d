"""rmsprop.torch.RMSprop under torch.distributed: DDP, ZeroRedundancyOptimizer, FSDP2 (DTensor
params, every path) and torch.distributed.checkpoint, on CPU with gloo and 2 processes started
with torch.multiprocessing, as users launch them.

The oracle is ``torch.optim.RMSprop`` run in this (single) process on the full batch, with the
options torch has (momentum, centered, weight decay): data parallelism must not change the
trajectory. Quantized state (``state_dtype="8bit"``/``"4bit"``) is checked against the NumPy
spec run on each rank's own shard (FSDP2) or param (ZeRO). All 2-rank scenarios run in ONE pair
of worker processes (a module fixture), then the 3-rank ones (loading the 2-rank checkpoints at
another sharding) in one trio, so the file stays under a minute; each scenario records its
result or its traceback separately, and a scenario that kills a worker (a segfault in a
kernel) is reported by name.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from conftest import ALL_PATHS  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

pytestmark = pytest.mark.slow

WORLD = 2
STEPS = 4
BATCH = 8  # full batch; each rank takes BATCH // WORLD rows
# options torch.optim.RMSprop also has, so that it can be the oracle
OPTS = dict(lr=0.01, alpha=0.9, momentum=0.9, centered=True, weight_decay=0.01)
# for the checkpoint: the step count matters (bias correction), momentum must be restored
DCP_OPTS = dict(lr=0.01, alpha=0.9, momentum=0.9, bias_correction=True, eps_in_sqrt=True)
FSDP_PATHS = ALL_PATHS  # the shared table (tests/conftest.py)
# quantized state (state_dtype="8bit"/"4bit"): every option that changes what is stored
Q_OPTS = dict(lr=0.01, alpha=0.9, momentum=0.9, centered=True, weight_decay=0.01)
Q_FORMATS = ("8bit", "4bit")
Q_BATCH = 12  # divides among 2 and 3 ranks
SCENARIOS = ["ddp", "zero", "fsdp_nonfinite", "dcp", "dcp_from_torch"] + [
    f"fsdpq_{fmt}_{k}" for fmt in Q_FORMATS for k in FSDP_PATHS] + [
    "fsdpq_float32", "fsdpq_nonfinite", "zeroq", "dcpq_from_torch"] + [
    f"dcpq_{fmt}" for fmt in Q_FORMATS] + [f"sr_{k}" for k in ("forloop", "foreach")] + [
    f"fsdp_{k}" for k in FSDP_PATHS]
# then, in 3 processes, the checkpoints the 2-rank dcpq scenarios wrote
SCENARIOS_3 = [f"reshardq_{fmt}" for fmt in Q_FORMATS]
WORKER_TIMEOUT_S = 240


# ------------------------------------------------------------------- shared by both sides

def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3)).double()


def batch(t: int, rank: int | None = None):
    g = torch.Generator().manual_seed(100 + t)
    x = torch.randn(BATCH, 6, generator=g, dtype=torch.float64)
    y = torch.randn(BATCH, 3, generator=g, dtype=torch.float64)
    if rank is None:
        return x, y
    n = BATCH // WORLD
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def train(model, opt, steps, rank=None, start=0):
    for t in range(start, start + steps):
        x, y = batch(t, rank)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def reference(opts, steps=STEPS):
    """The oracle: torch.optim.RMSprop, one process, full batch."""
    model = make_model()
    opt = torch.optim.RMSprop(model.parameters(), **opts)
    train(model, opt, steps)
    return model, opt


# ------------------------------------------------------------------- worker side

def _full(p):
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _sharded(model, mesh):
    from torch.distributed.fsdp import fully_shard
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def scenario_ddp(rank, mesh, out):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from rmsprop.torch import RMSprop
    model = make_model()
    ddp = DDP(model)
    train(ddp, RMSprop(ddp.parameters(), **OPTS), STEPS, rank)
    return {"params": [p.detach().clone() for p in model.parameters()]}


def scenario_zero(rank, mesh, out):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from rmsprop.torch import RMSprop
    model = make_model()
    ddp = DDP(model)
    opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=RMSprop, **OPTS)
    train(ddp, opt, STEPS, rank)
    local = sum(st["square_avg"].numel() for st in opt.optim.state.values())
    opt.consolidate_state_dict(to=0)
    sd = opt.state_dict() if rank == 0 else None
    return {"params": [p.detach().clone() for p in model.parameters()],
            "local_state_numel": local, "state_dict": sd}


def _fsdp_run(rank, mesh, path):
    from rmsprop.torch import RMSprop
    model = _sharded(make_model(), mesh)
    opt = RMSprop(model.parameters(), **OPTS, **FSDP_PATHS[path])
    train(model, opt, STEPS, rank)
    shard_info = []
    for p in model.parameters():
        st = opt.state[p]
        shard_info.append({k: (type(v).__name__, tuple(v.to_local().shape)
                               if hasattr(v, "to_local") else tuple(v.shape))
                           for k, v in st.items() if k != "step"}
                          | {"param_local": tuple(p.to_local().shape)})
    return {"params": [_full(p).detach().clone() for p in model.parameters()],
            "shards": shard_info}


SR_SHAPE = (64, 130)  # rows split unevenly across ranks: not a multiple of any block


def _sr_inputs():
    gen = torch.Generator().manual_seed(5)
    return (torch.full(SR_SHAPE, 1.5, dtype=torch.bfloat16),
            torch.randn(SR_SHAPE, generator=gen).to(torch.bfloat16))


def _sr_step(path, p, g):
    from rmsprop.torch import RMSprop
    p.grad = g
    RMSprop([p], lr=1e-3, stochastic_rounding=True, seed=3, **FSDP_PATHS[path]).step()


def _scenario_sr(path):
    def run(rank, mesh, out):
        from torch.distributed.tensor import Shard, distribute_tensor
        full, g = _sr_inputs()
        p = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        _sr_step(path, p, distribute_tensor(g, mesh, [Shard(0)]))
        return {"full": p.full_tensor().detach().clone()}
    return run


scenario_sr_forloop = _scenario_sr("forloop")
scenario_sr_foreach = _scenario_sr("foreach")


def scenario_fsdp_nonfinite(rank, mesh, out):
    """An inf in ONE rank's gradient shard: every rank must raise (no rank may step alone,
    which would desynchronise the replicas or hang the next collective), nothing changes."""
    from rmsprop.torch import NonFiniteGradientError, RMSprop
    model = _sharded(make_model(), mesh)
    opt = RMSprop(model.parameters(), **OPTS, foreach=True, fused=False)
    train(model, opt, 1, rank)
    before = [_full(p).detach().clone() for p in model.parameters()]
    x, y = batch(1, rank)
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x), y).backward()
    if rank == 0:
        next(model.parameters()).grad.to_local().view(-1)[0] = float("inf")
    try:
        opt.step()
        raised = None
    except NonFiniteGradientError as e:
        raised = str(e)
    after = [_full(p).detach().clone() for p in model.parameters()]
    return {"raised": raised, "unchanged": all(torch.equal(a, b) for a, b in zip(before, after))}


def scenario_dcp(rank, mesh, out):
    """Save sharded model + optimizer state with DCP after 2 steps, train 2 more (A); restore
    into fresh sharded objects, train the same 2 steps (B): B must equal A exactly."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from rmsprop.torch import RMSprop
    ckpt = os.path.join(out, "dcp_ckpt")
    model = _sharded(make_model(), mesh)
    opt = RMSprop(model.parameters(), **DCP_OPTS, foreach=True, fused=False)
    train(model, opt, 2, rank)
    dcp.save({"model": get_model_state_dict(model),
              "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt)
    train(model, opt, 2, rank, start=2)
    a = [_full(p).detach().clone() for p in model.parameters()]

    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    model2 = _sharded(torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                          torch.nn.Linear(16, 3)).double(), mesh)
    opt2 = RMSprop(model2.parameters(), **DCP_OPTS, foreach=True, fused=False)
    state = {"model": get_model_state_dict(model2),
             "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(model2, state["model"])
    set_optimizer_state_dict(model2, opt2, state["optim"])
    steps = [int(opt2.state[p]["step"]) for p in model2.parameters()]
    train(model2, opt2, 2, rank, start=2)
    b = [_full(p).detach().clone() for p in model2.parameters()]
    return {"resumed": a, "restored": b, "steps_after_load": steps}


def scenario_dcp_from_torch(rank, mesh, out):
    """A DCP checkpoint of torch.optim.RMSprop (sharded by FSDP2) after 2 steps, loaded into
    ours on every path through DCP's own template (built from our optimizer), 2 more steps;
    the oracle: torch's optimizer continuing its own run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from rmsprop.torch import RMSprop
    ckpt = os.path.join(out, "dcp_torch_ckpt")
    model = _sharded(make_model(), mesh)
    opt = torch.optim.RMSprop(model.parameters(), **OPTS)
    train(model, opt, 2, rank)
    dcp.save({"model": get_model_state_dict(model),
              "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt)
    train(model, opt, 2, rank, start=2)
    result = {"torch": [_full(p).detach().clone() for p in model.parameters()]}
    for path, kwargs in FSDP_PATHS.items():
        torch.manual_seed(123)  # a different init: everything must come from the checkpoint
        model2 = _sharded(torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                              torch.nn.Linear(16, 3)).double(), mesh)
        opt2 = RMSprop(model2.parameters(), **OPTS, **kwargs)
        state = {"model": get_model_state_dict(model2),
                 "optim": get_optimizer_state_dict(model2, opt2)}
        dcp.load(state, checkpoint_id=ckpt)
        set_model_state_dict(model2, state["model"])
        set_optimizer_state_dict(model2, opt2, state["optim"])
        for group in opt2.param_groups:  # the file's foreach=None: keep the path asked for
            group.update(kwargs)
        train(model2, opt2, 2, rank, start=2)
        result[path] = [_full(p).detach().clone() for p in model2.parameters()]
    return result


# ------------------------------------------------------------------- quantized state, worker side
#
# The model's weights are sized so that, under FSDP2, 2 ranks hold shards of
#   (127, 64): 4096 and 4032 elements -> one rank's shard is below codecs.MIN_QUANTIZED
#   (128, 127): 8128 each             -> quantized, equal shards
#   (67, 128): 4352 and 4224          -> quantized, unequal shards (padded rows in a checkpoint)
# and, on 3 ranks, (128, 127) as 5461, 5461, 5334 (4-bit: odd) and (67, 128) below the minimum.

def make_qmodel() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 127), torch.nn.Tanh(),
                               torch.nn.Linear(127, 128), torch.nn.Tanh(),
                               torch.nn.Linear(128, 67), torch.nn.Tanh(),
                               torch.nn.Linear(67, 3))


def qbatch(t: int, rank: int | None = None, world: int = WORLD):
    g = torch.Generator().manual_seed(200 + t)
    x = torch.randn(Q_BATCH, 64, generator=g)
    y = torch.randn(Q_BATCH, 3, generator=g)
    if rank is None:
        return x, y
    n = Q_BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def _qsharded(model, mesh):
    from torch.distributed.fsdp import fully_shard
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _local(t):
    return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()


def _local_state(opt, params):
    """Each param's state as this rank holds it (plain local tensors, ``step`` as a float)."""
    return [{k: float(v) if k == "step" else _local(v) for k, v in opt.state[p].items()}
            for p in params]


def _qtrain(model, opt, steps, rank, start=0, world=WORLD):
    """Train, recording per step each param's local shard before the step and its local
    gradient (what the spec run on the shard takes)."""
    params = list(model.parameters())
    trace = []
    for t in range(start, start + steps):
        x, y = qbatch(t, rank, world)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        trace.append({"before": [_local(p) for p in params],
                      "grads": [_local(p.grad) for p in params]})
        opt.step()
    return trace


def _fsdpq_run(rank, mesh, fmt, path):
    from rmsprop.torch import RMSprop
    model = _qsharded(make_qmodel(), mesh)
    opt = RMSprop(model.parameters(), **Q_OPTS, state_dtype=fmt, track_stats=True,
                  **FSDP_PATHS[path])
    trace = _qtrain(model, opt, STEPS, rank)
    params = list(model.parameters())
    return {"trace": trace, "after": [_local(p) for p in params],
            "state": _local_state(opt, params), "stats": opt.stats()["groups"][0],
            "full": [_full(p).detach().clone() for p in params]}


def scenario_fsdpq_float32(rank, mesh, out):
    """The full-precision run the 8-bit one is compared with."""
    from rmsprop.torch import RMSprop
    model = _qsharded(make_qmodel(), mesh)
    _qtrain(model, RMSprop(model.parameters(), **Q_OPTS, foreach=True, fused=False), STEPS,
            rank)
    return {"full": [_full(p).detach().clone() for p in model.parameters()]}


def scenario_fsdpq_nonfinite(rank, mesh, out):
    """8-bit state, the default path: an inf in one rank's gradient shard raises on every
    rank, and no param, code or scale changes."""
    from rmsprop.torch import NonFiniteGradientError, RMSprop
    model = _qsharded(make_qmodel(), mesh)
    opt = RMSprop(model.parameters(), **Q_OPTS, state_dtype="8bit")
    _qtrain(model, opt, 1, rank)
    params = list(model.parameters())
    before = [_local(p) for p in params], _local_state(opt, params)
    x, y = qbatch(1, rank)
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x), y).backward()
    if rank == 0:
        params[2].grad.to_local().view(-1)[5] = float("inf")  # a quantized weight's shard
    try:
        opt.step()
        raised = None
    except NonFiniteGradientError as e:
        raised = str(e)
    after = [_local(p) for p in params], _local_state(opt, params)
    return {"raised": raised, "before": before, "after": after}


def scenario_zeroq(rank, mesh, out):
    """ZeroRedundancyOptimizer over our 8-bit RMSprop: 2 steps (traced), consolidate to rank
    0, 2 more (A); a fresh model and optimizer load the consolidated state dict through
    torch.load(weights_only=True) and the model's state, 2 more (B)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from rmsprop.torch import RMSprop
    model = make_qmodel()
    ddp = DDP(model)
    opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=RMSprop, state_dtype="8bit",
                                  **Q_OPTS)
    trace = _qtrain(ddp, opt, 2, rank)
    local = {n: _local_state(opt.optim, [p])[0] for n, p in model.named_parameters()
             if p in opt.optim.state}
    opt.consolidate_state_dict(to=0)
    sd_path = os.path.join(out, "zeroq_sd.pt")
    if rank == 0:
        torch.save({"optim": opt.state_dict(), "model": model.state_dict()}, sd_path)
    dist.barrier()
    after2 = [_local(p) for p in model.parameters()]
    _qtrain(ddp, opt, 2, rank, start=2)
    a = [_local(p) for p in model.parameters()]

    saved = torch.load(sd_path, weights_only=True)
    torch.manual_seed(123)
    model2 = make_qmodel()
    model2.load_state_dict(saved["model"])
    ddp2 = DDP(model2)
    opt2 = ZeroRedundancyOptimizer(ddp2.parameters(), optimizer_class=RMSprop,
                                   state_dtype="8bit", **Q_OPTS)
    opt2.load_state_dict(saved["optim"])
    loaded = {n: _local_state(opt2.optim, [p])[0] for n, p in model2.named_parameters()
              if p in opt2.optim.state}
    _qtrain(ddp2, opt2, 2, rank, start=2)
    b = [_local(p) for p in model2.parameters()]
    return {"trace": trace, "after2": after2, "local": local, "loaded": loaded,
            "resumed": a, "restored": b,
            # as saved: ZeroRedundancyOptimizer.load_state_dict clears other ranks' entries
            "state_dict": torch.load(sd_path, weights_only=True)["optim"] if rank == 0 else None}


def _dcp_objects(model, opt):
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def _dcp_set(model, opt, state):
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


def _full_precision(model, opt):
    """The supported route to another sharding: the quantized state decoded to float32
    DTensors sharded like the params (DCP reshards those)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return opt.full_precision_state_dict(get_optimizer_state_dict(model, opt))


def _dcpq(rank, mesh, out, fmt):
    """DCP of 2-rank FSDP2 with quantized state after 2 steps, 2 more (A); fresh objects
    (another init) load it, 2 more (B). Also writes the full-precision export and records
    what the 3-rank scenarios check against; then corrupt loads are refused."""
    import torch.distributed.checkpoint as dcp

    from rmsprop.torch import RMSprop
    ckpt = os.path.join(out, f"dcpq_{fmt}")
    model = _qsharded(make_qmodel(), mesh)
    opt = RMSprop(model.parameters(), **Q_OPTS, state_dtype=fmt)
    _qtrain(model, opt, 2, rank)
    params = list(model.parameters())
    saved_state = _local_state(opt, params)
    dcp.save(_dcp_objects(model, opt), checkpoint_id=ckpt)
    fp = _full_precision(model, opt)
    dcp.save({"optim": fp}, checkpoint_id=ckpt + "_fp")
    fp_full = {fqn: {k: v.full_tensor() if hasattr(v, "full_tensor") else v
                     for k, v in st.items()} for fqn, st in fp["state"].items()}
    _qtrain(model, opt, 2, rank, start=2)
    a = [_full(p).detach().clone() for p in params]

    torch.manual_seed(123)  # another init: everything must come from the checkpoint
    model2 = _qsharded(make_qmodel(), mesh)
    for p in model2.parameters():
        torch.nn.init.normal_(p)
    opt2 = RMSprop(model2.parameters(), **Q_OPTS, state_dtype=fmt)
    state = _dcp_objects(model2, opt2)
    dcp.load(state, checkpoint_id=ckpt)
    _dcp_set(model2, opt2, state)
    params2 = list(model2.parameters())
    loaded_state = _local_state(opt2, params2)
    _qtrain(model2, opt2, 2, rank, start=2)
    b = [_full(p).detach().clone() for p in params2]
    return {"saved_state": saved_state, "loaded_state": loaded_state, "resumed": a,
            "restored": b, "fp_full": fp_full if rank == 0 else None,
            "corrupt": _corrupt_loads(model2, opt2, rank)}


def _corrupt_loads(model, opt, rank):
    """Load state dicts with one quantized entry corrupted (on one rank, or laid out for
    another sharding) into ``opt``: each must raise on every rank and change nothing."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.tensor import DTensor
    params = list(model.parameters())
    fqn = [n for n, _ in model.named_parameters()][2]  # the (128, 127) weight: quantized

    def nan_scale(st):
        if rank == 0:
            st["square_avg_scale"].to_local()[0, 0] = float("nan")

    def other_sharding(st):  # rows as 3 shards would have them
        for key in ("grad_avg", "grad_avg_scale"):
            t = st[key]
            length = t.shape[1] + 8
            st[key] = DTensor.from_local(t.to_local().new_zeros(1 if rank < 2 else 0, length),
                                         t.device_mesh, t.placements, run_check=False,
                                         shape=torch.Size((3, length)), stride=(length, 1))

    result = {}
    for name, corrupt in [("nan_scale", nan_scale), ("other_sharding", other_sharding)]:
        osd = get_optimizer_state_dict(model, opt)
        osd = {"state": {k: dict(v) for k, v in osd["state"].items()},
               "param_groups": osd["param_groups"]}
        entry = osd["state"][fqn]
        for k in list(entry):  # copies: the corruption must not reach the live state
            if isinstance(entry[k], torch.Tensor) and k != "step":
                entry[k] = entry[k].clone()
        corrupt(entry)
        before = _local_state(opt, params)
        try:
            set_optimizer_state_dict(model, opt, osd)
            raised = None
        except ValueError as e:
            raised = str(e)
        after = _local_state(opt, params)
        result[name] = {"raised": raised, "unchanged": _same_state(before, after)}
    return result


def _same_state(a, b):
    return all(sa.keys() == sb.keys() and all(
        (sa[k] == sb[k]) if k == "step" else torch.equal(sa[k], sb[k]) for k in sa)
        for sa, sb in zip(a, b))


def scenario_dcpq_from_torch(rank, mesh, out):
    """A DCP checkpoint of torch.optim.RMSprop (FSDP2) loaded into our 8-bit optimizer through
    a full-precision template: each rank quantizes torch's state of its shard."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    from rmsprop.torch import RMSprop
    ckpt = os.path.join(out, "dcpq_torch_ckpt")
    model = _qsharded(make_qmodel(), mesh)
    opt = torch.optim.RMSprop(model.parameters(), **Q_OPTS)
    _qtrain(model, opt, 2, rank)
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt)
    theirs = _local_state(opt, list(model.parameters()))
    # as in a fresh process: DCP's template creates the state only where no grad is set
    opt.zero_grad(set_to_none=True)
    opt2 = RMSprop(model.parameters(), **Q_OPTS, state_dtype="8bit")
    template = _full_precision(model, opt2)
    dcp.load({"optim": template}, checkpoint_id=ckpt)
    set_optimizer_state_dict(model, opt2, template)
    return {"torch": theirs, "ours": _local_state(opt2, list(model.parameters()))}


def scenario_dcpq_8bit(rank, mesh, out):
    return _dcpq(rank, mesh, out, "8bit")


def scenario_dcpq_4bit(rank, mesh, out):
    return _dcpq(rank, mesh, out, "4bit")


def _reshardq(rank, mesh, out, fmt):
    """3 ranks: the 2-rank quantized DCP checkpoint is refused and changes nothing; its
    full-precision export loads (and is quantized per shard again)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from rmsprop.torch import RMSprop
    world = mesh.size()
    model = _qsharded(make_qmodel(), mesh)
    opt = RMSprop(model.parameters(), **Q_OPTS, state_dtype=fmt)
    _qtrain(model, opt, 1, rank, world=world)
    params = list(model.parameters())
    before = _local_state(opt, params)
    state = _dcp_objects(model, opt)
    try:
        dcp.load(state, checkpoint_id=os.path.join(out, f"dcpq_{fmt}"))
        _dcp_set(model, opt, state)
        raised = None
    except CheckpointException as e:  # DCP's planner refuses before anything is read
        raised = str(e)
    unchanged = _same_state(before, _local_state(opt, params))

    fp = _full_precision(model, opt)
    dcp.load({"optim": fp}, checkpoint_id=os.path.join(out, f"dcpq_{fmt}_fp"))
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, fp)
    return {"raised": raised, "unchanged": unchanged, "state": _local_state(opt, params),
            "local_shapes": [tuple(p.to_local().shape) for p in params]}


def scenario_reshardq_8bit(rank, mesh, out):
    return _reshardq(rank, mesh, out, "8bit")


def scenario_reshardq_4bit(rank, mesh, out):
    return _reshardq(rank, mesh, out, "4bit")


def _worker(rank, world, initfile, out, names):
    faulthandler.enable()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{initfile}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    for name in names:
        Path(out, f"{name}.{rank}.started").touch()
        try:
            if name.startswith("fsdp_") and name[5:] in FSDP_PATHS:
                result = _fsdp_run(rank, mesh, name[5:])
            elif name.startswith("fsdpq_") and name.count("_") == 2:
                result = _fsdpq_run(rank, mesh, *name.split("_")[1:])
            else:
                result = globals()[f"scenario_{name}"](rank, mesh, out)
            torch.save(result, os.path.join(out, f"{name}.{rank}.pt"))
        except Exception:
            Path(out, f"{name}.{rank}.err").write_text(traceback.format_exc())
        dist.barrier()
    dist.destroy_process_group()


def _launch(names, out: Path, world: int = WORLD) -> None:
    ctx = mp.start_processes(_worker, args=(world, str(out / f"init{world}"), str(out), names),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError
    except (mp.ProcessExitedException, mp.ProcessRaisedException, TimeoutError) as e:
        (out / f"launch{world}.err").write_text(f"{type(e).__name__}: {e}")
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every scenario once, in one pair of worker processes (the fused path last: a crash
    in a native kernel loses only the scenarios after it, and they are reported by name)."""
    out = tmp_path_factory.mktemp("dist")
    t0 = time.monotonic()
    _launch(SCENARIOS, out)
    print(f"distributed scenarios: {time.monotonic() - t0:.1f} s")
    return out


@pytest.fixture(scope="module")
def runs3(runs):
    """The 3-process scenarios, on the checkpoints the 2-process ones wrote."""
    t0 = time.monotonic()
    _launch(SCENARIOS_3, runs, world=3)
    print(f"distributed scenarios, 3 ranks: {time.monotonic() - t0:.1f} s")
    return runs


def result(runs, name, world=WORLD):
    """Every rank's result of one scenario, or a failure that says what happened."""
    d = runs
    res = []
    for rank in range(world):
        err = d / f"{name}.{rank}.err"
        if err.exists():
            pytest.fail(f"{name} raised on rank {rank}:\n{err.read_text()}")
        pt = d / f"{name}.{rank}.pt"
        if not pt.exists():
            err = d / f"launch{world}.err"
            launch = err.read_text() if err.exists() else ""
            started = (d / f"{name}.{rank}.started").exists()
            pytest.fail(f"{name}: no result from rank {rank} "
                        f"({'crashed during it' if started else 'never started'}; {launch}); "
                        "the worker's stderr above has the native traceback")
        res.append(torch.load(pt, weights_only=False))
    return res


def assert_params_match_reference(params, opts=OPTS):
    model, _ = reference(opts)
    for got, want in zip(params, model.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
    start = make_model()
    assert max(float((a - b.detach()).abs().max())
               for a, b in zip(params, start.parameters())) > 1e-3


# ------------------------------------------------------------------- tests

def test_ddp_matches_single_process_full_batch(runs):
    r0, r1 = result(runs, "ddp")
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)  # DDP replicas stay bit-identical
    assert_params_match_reference(r0["params"])


def test_zero_redundancy_optimizer_shards_state_and_matches(runs):
    r0, r1 = result(runs, "zero")
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    assert_params_match_reference(r0["params"])
    model, ref_opt = reference(OPTS)
    total = sum(p.numel() for p in model.parameters())
    # each rank holds the state of its own params only, together all of them
    assert r0["local_state_numel"] + r1["local_state_numel"] == total
    assert 0 < r0["local_state_numel"] < total
    sd = r0["state_dict"]
    ref_state = ref_opt.state_dict()["state"]
    assert sorted(sd["state"]) == sorted(ref_state)
    for i, st in sd["state"].items():
        for key in ("square_avg", "grad_avg", "momentum_buffer"):
            torch.testing.assert_close(st[key], ref_state[i][key], rtol=1e-10, atol=1e-12)
        assert int(st["step"]) == STEPS


@pytest.mark.parametrize("path", list(FSDP_PATHS))
def test_fsdp2_steps_sharded_dtensors_and_matches(runs, path):
    r0, r1 = result(runs, f"fsdp_{path}")
    assert_params_match_reference(r0["params"])
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    for info in r0["shards"]:
        # the state is sharded like the param: never gathered to the full shape
        for key in ("square_avg", "grad_avg", "momentum_buffer"):
            kind, shape = info[key]
            assert kind == "DTensor" and shape == info["param_local"], (key, info)


@pytest.mark.parametrize("path", ["forloop", "foreach"])
def test_stochastic_rounding_of_row_shards_draws_the_whole_params_bits(runs, path):
    """``rmsprop.codecs`` draws each element's bits by its index in the param's flat view;
    a rank stepping its ``Shard(0)`` rows draws those of its rows, so the sharded step is the
    single-process one bit for bit (each rank drew the bits of indices 0.. before, so rank
    1's rows took rank 0's bits)."""
    full, g = _sr_inputs()
    want = torch.nn.Parameter(full.clone())
    _sr_step(path, want, g.clone())
    for r in result(runs, f"sr_{path}"):
        assert torch.equal(r["full"], want.detach())
    assert not torch.equal(want.detach(), full)


def test_fsdp2_nonfinite_gradient_on_one_rank_raises_on_every_rank(runs):
    r0, r1 = result(runs, "fsdp_nonfinite")
    assert r0["raised"] and r1["raised"], (r0["raised"], r1["raised"])
    assert r0["unchanged"] and r1["unchanged"]


def test_dcp_save_restore_resumes_on_the_same_trajectory(runs):
    r0, r1 = result(runs, "dcp")
    for r in (r0, r1):
        assert r["steps_after_load"] == [2] * len(r["steps_after_load"])
        for a, b in zip(r["resumed"], r["restored"]):
            assert torch.equal(a, b)
    # and the trajectory is the single-process one (torch has no bias correction: use the spec)
    from rmsprop import spec
    from rmsprop.options import Options
    model = make_model()
    params = [p.detach().numpy().copy() for p in model.parameters()]
    states = [spec.init_state(p, Options(**DCP_OPTS)) for p in params]
    for t in range(4):
        for p, w in zip(model.parameters(), params):
            p.data = torch.from_numpy(w.copy())
        x, y = batch(t)
        model.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        for i, p in enumerate(model.parameters()):
            params[i], states[i] = spec.step(params[i], p.grad.numpy(), states[i],
                                             Options(**DCP_OPTS))
    for got, want in zip(r0["restored"], params):
        torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", list(FSDP_PATHS))
def test_dcp_checkpoint_of_torch_rmsprop_loads_into_ours(runs, path):
    for r in result(runs, "dcp_from_torch"):
        for ours, theirs in zip(r[path], r["torch"]):
            if path == "fused":  # the kernel's single pass rounds on its own
                torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
            else:  # torch's op sequence: bit-identical
                assert torch.equal(ours, theirs)


def test_example_runs_under_torchrun(tmp_path):
    """examples/ddp_torchrun.py, launched as the README says (torchrun, 2 processes), in every
    mode: ZeRO and FSDP2 hold about half of DDP's optimizer state per rank."""
    example = Path(__file__).resolve().parents[1] / "examples" / "ddp_torchrun.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(example), "--mode", "ddp,zero,fsdp", "--steps", "3", "--width", "16",
           "--checkpoint-dir", str(tmp_path / "ckpt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, env=env)
    if (proc.returncode != 0 and "terminate called without an active exception" in proc.stderr
            and all(f"[{mode}] 3 steps" in proc.stdout for mode in ("ddp", "zero", "fsdp"))):
        # A rank can abort in torch's own C++ teardown (gloo's threads) after the work is done
        # and printed, which is not what this test checks: run it once more, and fail if that
        # run fails too.
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S,
                              env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    held = {}
    for mode in ("ddp", "zero", "fsdp"):
        m = re.search(rf"\[{mode}\] 3 steps .* optimizer state per rank \(KiB\): ([\d.]+), "
                      rf"([\d.]+)", proc.stdout)
        assert m, (mode, proc.stdout[-2000:])
        held[mode] = [float(m.group(1)), float(m.group(2))]
    full = held["ddp"][0]
    assert held["ddp"][1] == full
    for mode in ("zero", "fsdp"):
        assert sum(held[mode]) == pytest.approx(full, rel=0.05)
        assert max(held[mode]) < 0.8 * full
    assert (tmp_path / "ckpt" / "fsdp" / ".metadata").exists()


# ------------------------------------------------------------------- quantized state, tests
#
# The oracle is the NumPy spec run on each rank's own shard with that rank's gradients (FSDP2:
# blocks start at the shard's start), or on each whole param (ZeRO): every step starts from
# the params the run had (torch's float32 sqrt on the CPU is not correctly rounded, so a param
# may be an ulp off) and carries the spec's own state, whose codes must be the run's.

Q_KEYS = ("square_avg", "grad_avg", "momentum_buffer")


def _qnames():
    return [n for n, _ in make_qmodel().named_parameters()]


def _formats(fmt, sizes_per_rank):
    """Per param, the spec's state_dtype: quantized only where every rank's shard is (all
    ranks hold one kind of state per param)."""
    from rmsprop import codecs
    return [fmt if all(codecs.quantizes(n, fmt) for n in sizes) else None
            for sizes in zip(*sizes_per_rank)]


def _spec_replay(trace, after, fmts):
    """The spec over a recorded run; asserts each step's params, returns the states."""
    import numpy as np

    from rmsprop import spec
    from rmsprop.options import Options
    o = Options(**Q_OPTS)
    sts = [spec.init_state(b.numpy(), o, state_dtype=f)
           for b, f in zip(trace[0]["before"], fmts)]
    for t, rec in enumerate(trace):
        nxt = trace[t + 1]["before"] if t + 1 < len(trace) else after
        for i, (b, g) in enumerate(zip(rec["before"], rec["grads"])):
            new, sts[i] = spec.step(b.numpy(), g.numpy(), sts[i], o)
            np.testing.assert_allclose(nxt[i].numpy(), new, rtol=1e-5, atol=1e-6)
    return sts


def _assert_spec_state(got, want):
    """``got`` (a param's state as the rank holds it) is the spec's ``want``: the same codes;
    the same scales (the momentum's within the ulp its float32 sqrt may differ by)."""
    import numpy as np

    from rmsprop import codecs
    for key in Q_KEYS:
        w = want[key]
        if isinstance(w, codecs.Quantized):
            np.testing.assert_array_equal(got[key].numpy(), w.codes, err_msg=key)
            rtol = 1e-6 if key == "momentum_buffer" else 0
            np.testing.assert_allclose(got[key + "_scale"].numpy(), w.scales, rtol=rtol,
                                       atol=0, err_msg=key)
        else:
            assert key + "_scale" not in got and got[key].dtype == torch.float32, key
            rtol = 1e-5 if key == "momentum_buffer" else 0
            np.testing.assert_allclose(got[key].numpy(), w, rtol=rtol, atol=rtol, err_msg=key)


@pytest.mark.parametrize("path", list(FSDP_PATHS))
@pytest.mark.parametrize("fmt", Q_FORMATS)
def test_fsdp2_quantized_state_is_the_spec_on_each_shard(runs, fmt, path):
    rs = result(runs, f"fsdpq_{fmt}_{path}")
    for a, b in zip(rs[0]["full"], rs[1]["full"]):
        assert torch.equal(a, b)
    fmts = _formats(fmt, [[b.numel() for b in r["trace"][0]["before"]] for r in rs])
    # the (127, 64) weight: rank 0's shard alone would be quantized, so neither is
    assert fmts[0] is None and fmts[2] == fmts[4] == fmt
    for r in rs:
        sts = _spec_replay(r["trace"], r["after"], fmts)
        for got, want in zip(r["state"], sts):
            _assert_spec_state(got, want)
        # statistics of the last step, over this rank's shards (g: with the weight decay)
        last = r["trace"][-1]
        n = sum(g.numel() for g in last["grads"])
        g2 = sum(float((g.double() + Q_OPTS["weight_decay"] * b.double()).square().sum())
                 for g, b in zip(last["grads"], last["before"]))
        u2 = sum(float((a.double() - b.double()).square().sum())
                 for a, b in zip(r["after"], last["before"]))
        assert r["stats"]["grad_rms"] == pytest.approx((g2 / n) ** 0.5, rel=1e-6)
        assert r["stats"]["update_rms"] == pytest.approx((u2 / n) ** 0.5, rel=1e-5)
        assert r["stats"]["step"] == STEPS


def test_fsdp2_8bit_state_stays_close_to_full_precision(runs):
    q8 = result(runs, "fsdpq_8bit_foreach")[0]["full"]
    fp = result(runs, "fsdpq_float32")[0]["full"]
    for a, b, start in zip(q8, fp, make_qmodel().parameters()):
        moved = float((b - start.detach()).norm())
        assert moved > 0
        assert float((a - b).norm()) < 0.02 * moved


def test_fsdp2_quantized_nonfinite_gradient_raises_on_every_rank_and_changes_nothing(runs):
    rs = result(runs, "fsdpq_nonfinite")
    assert all(r["raised"] for r in rs), [r["raised"] for r in rs]
    for r in rs:
        (p0, s0), (p1, s1) = r["before"], r["after"]
        assert all(torch.equal(a, b) for a, b in zip(p0, p1))
        assert _same_state(s0, s1)
        assert any(st["square_avg"].dtype == torch.uint8 for st in s0)


def test_zero_redundancy_optimizer_with_8bit_state(runs):
    rs = result(runs, "zeroq")
    for a, b in zip(rs[0]["resumed"], rs[1]["resumed"]):
        assert torch.equal(a, b)
    from rmsprop import codecs
    r0 = rs[0]
    fmts = ["8bit" if codecs.quantizes(b.numel(), "8bit") else None
            for b in r0["trace"][0]["before"]]
    sts = dict(zip(_qnames(), _spec_replay(r0["trace"], r0["after2"], fmts)))
    # each rank holds the state of its own params, quantized as the spec does
    owned = [set(r["local"]) for r in rs]
    assert owned[0] and owned[1] and not owned[0] & owned[1]
    assert owned[0] | owned[1] == set(sts)
    for r in rs:
        for name, st in r["local"].items():
            _assert_spec_state(st, sts[name])
        # consolidated, saved, torch.load(weights_only=True)-ed and loaded: the same state
        assert r["loaded"].keys() == r["local"].keys()
        for name in r["local"]:
            assert _same_state([r["local"][name]], [r["loaded"][name]])
        for a, b in zip(r["resumed"], r["restored"]):
            assert torch.equal(a, b)
    sd = r0["state_dict"]["state"]
    assert any(st["square_avg"].dtype == torch.uint8 for st in sd.values())
    for i, name in enumerate(_qnames()):
        local = next(r["local"][name] for r in rs if name in r["local"])
        assert _same_state([{k: float(v) if k == "step" else v for k, v in sd[i].items()}],
                           [local])


@pytest.mark.parametrize("fmt", Q_FORMATS)
def test_dcp_round_trips_quantized_state_bit_exactly(runs, fmt):
    for r in result(runs, f"dcpq_{fmt}"):
        assert any(st["square_avg"].dtype == torch.uint8 for st in r["saved_state"])
        assert _same_state(r["saved_state"], r["loaded_state"])
        for a, b in zip(r["resumed"], r["restored"]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("fmt", Q_FORMATS)
def test_distributed_load_of_corrupt_quantized_state_is_refused_on_every_rank(runs, fmt):
    rs = [r["corrupt"] for r in result(runs, f"dcpq_{fmt}")]
    nan0, nan1 = rs[0]["nan_scale"], rs[1]["nan_scale"]  # corrupt on rank 0 only
    assert "'square_avg' of parameter group 0 index 2 has scales that are negative, inf or " \
        "NaN" in nan0["raised"]
    assert nan1["raised"] == f"rank 0 refused the state dict: {nan0['raised']}"
    for r in rs:
        other = r["other_sharding"]["raised"]
        assert other and "'grad_avg' of parameter group 0 index 2 was quantized in 3 " \
            "shards" in other and "the parameter's 2 shards now take" in other
        assert "full_precision_state_dict()" in other
        assert r["nan_scale"]["unchanged"] and r["other_sharding"]["unchanged"]


@pytest.mark.parametrize("fmt", Q_FORMATS)
def test_quantized_dcp_checkpoint_refuses_another_sharding_and_full_precision_reshards(
        runs3, fmt):
    """2 -> 3 ranks: the blocks of the saved state start at 2-rank shard boundaries, so DCP
    refuses the load (the rows per shard differ) before anything is read; the full-precision
    export loads, and each of the 3 ranks quantizes its new shard (the spec's codes)."""
    import numpy as np

    rs = result(runs3, f"reshardq_{fmt}", world=3)
    full = result(runs3, f"dcpq_{fmt}")[0]["fp_full"]
    names = _qnames()
    sizes = [[int(np.prod(s)) for s in r["local_shapes"]] for r in rs]
    fmts = _formats(fmt, sizes)
    assert fmts[2] == ("8bit" if fmt == "8bit" else None)  # 4-bit: 5461 elements, odd
    for rank, r in enumerate(rs):
        assert "Size mismatch between saved" in r["raised"] and ".square_avg" in r["raised"]
        assert r["unchanged"]
        for i, (name, got) in enumerate(zip(names, r["state"])):
            assert got["step"] == 2
            lo = sum(rs[k]["local_shapes"][i][0] for k in range(rank))
            hi = lo + r["local_shapes"][i][0]
            want = {k: full[name][k][lo:hi].numpy() for k in Q_KEYS}
            _assert_quantized_from(got, want, fmts[i])


def _assert_quantized_from(got, want, fmt):
    """``got`` (a param's state as a rank holds it) is full-precision state ``want`` (float32
    arrays of the rank's shard) as format ``fmt`` stores it (None: kept as it is): ``m``,
    ``b`` and, centered, ``w = max(v - m'^2, 0)`` against the decoded ``m'`` encoded by the
    spec's codecs."""
    import numpy as np

    from rmsprop import codecs
    if fmt is None:
        for k in Q_KEYS:
            np.testing.assert_array_equal(got[k].numpy(), want[k])
        return
    fam = codecs.QUANTIZED[fmt]
    m = codecs.encode(want["grad_avg"], fam["grad_avg"])
    mq = codecs.decode(m).reshape(want["grad_avg"].shape)
    enc = {"grad_avg": m,
           "momentum_buffer": codecs.encode(want["momentum_buffer"], fam["momentum_buffer"]),
           "square_avg": codecs.encode(np.maximum(want["square_avg"] - mq * mq, 0),
                                       fam["square_avg"])}
    for k in Q_KEYS:
        np.testing.assert_array_equal(got[k].numpy(), enc[k].codes, err_msg=k)
        np.testing.assert_array_equal(got[k + "_scale"].numpy(), enc[k].scales, err_msg=k)


def test_dcp_checkpoint_of_torch_rmsprop_loads_into_8bit_state(runs):
    """Through a full-precision template (DCP's template must hold what the checkpoint holds):
    torch's float32 state of each shard, quantized by the rank that holds it."""
    rs = result(runs, "dcpq_from_torch")
    fmts = _formats("8bit", [[st["square_avg"].numel() for st in r["torch"]] for r in rs])
    assert "8bit" in fmts and None in fmts
    for r in rs:
        for got, theirs, fmt in zip(r["ours"], r["torch"], fmts):
            assert got["step"] == theirs["step"] == 2
            _assert_quantized_from(got, {k: theirs[k].numpy() for k in Q_KEYS}, fmt)
