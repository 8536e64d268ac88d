"""rmsprop.torch.RMSprop under torch.distributed: DDP, ZeroRedundancyOptimizer, FSDP2 (DTensor
params, every path) and torch.distributed.checkpoint, on CPU with gloo and 2 processes started
with torch.multiprocessing, as users launch them.

The oracle is ``torch.optim.RMSprop`` run in this (single) process on the full batch, with the
options torch has (momentum, centered, weight decay): data parallelism must not change the
trajectory. All scenarios run in ONE pair of worker processes (a module fixture) so the file
stays well under a minute; each scenario records its result or its traceback separately, and a
scenario that kills a worker (a segfault in a kernel) is reported by name.
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
SCENARIOS = ["ddp", "zero", "fsdp_nonfinite", "dcp", "dcp_from_torch"] + [
    f"fsdp_{k}" for k in FSDP_PATHS]
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
            else:
                result = globals()[f"scenario_{name}"](rank, mesh, out)
            torch.save(result, os.path.join(out, f"{name}.{rank}.pt"))
        except Exception:
            Path(out, f"{name}.{rank}.err").write_text(traceback.format_exc())
        dist.barrier()
    dist.destroy_process_group()


def _launch(names, out: Path) -> None:
    ctx = mp.start_processes(_worker, args=(WORLD, str(out / "init"), str(out), names),
                             nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError
    except (mp.ProcessExitedException, mp.ProcessRaisedException, TimeoutError) as e:
        (out / "launch.err").write_text(f"{type(e).__name__}: {e}")
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


def result(runs, name):
    """Both ranks' results of one scenario, or a failure that says what happened."""
    d = runs
    res = []
    for rank in range(WORLD):
        err = d / f"{name}.{rank}.err"
        if err.exists():
            pytest.fail(f"{name} raised on rank {rank}:\n{err.read_text()}")
        pt = d / f"{name}.{rank}.pt"
        if not pt.exists():
            launch = (d / "launch.err").read_text() if (d / "launch.err").exists() else ""
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
