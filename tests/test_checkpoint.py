"""Checkpoints: exact resume, atomic writes, and all-or-nothing loads.

Oracles: an uninterrupted run (resuming must reproduce it bit for bit), the bytes of the previous
checkpoint (a killed writer must leave them intact) and snapshots of every tensor taken before a
failed load (nothing may change).
"""

from __future__ import annotations

import copy
import io
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

torch = pytest.importorskip("torch")

from conftest import ALL_PATHS, FUSED_UNAVAILABLE, expected_warnings  # noqa: E402
from rmsprop import PRESETS  # noqa: E402
from rmsprop.torch import RMSprop  # noqa: E402
from rmsprop.torch.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402

# ------------------------------------------------------------------------------------------
# helpers

_PATHS = ALL_PATHS  # the shared table (tests/conftest.py)

# every preset, plus combinations that switch on every state buffer and option
_CONFIGS = {f"preset-{name}": ("preset", name) for name in PRESETS}
_CONFIGS.update({
    "momentum-centered-nesterov-bc": ("kw", dict(lr=3e-3, alpha=0.9, momentum=0.9, centered=True,
                                                 nesterov=True, bias_correction=True,
                                                 weight_decay=1e-2)),
    "decoupled-maximize-eps_in_sqrt": ("kw", dict(lr=1e-2, maximize=True, eps_in_sqrt=True,
                                                  weight_decay=0.1, decoupled_weight_decay=True,
                                                  initial_square_avg=1.0, momentum=0.5,
                                                  lr_in_momentum=True)),
})


def _make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (5,), (), (6, 4)]
    ps = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    ps[-1] = ps[-1].t()  # a non-contiguous parameter
    return [torch.nn.Parameter(p) for p in ps]


def _build(kind_arg, params, path: str, **extra) -> RMSprop:
    kind, arg = kind_arg
    if kind == "preset":
        lr = {} if not PRESETS[arg].lr_required else {"lr": 1e-3}
        eps = {"eps": 1e-8} if PRESETS[arg].options.get("eps") == 0 else {}
        return RMSprop.from_preset(arg, params, **lr, **eps, **_PATHS[path], **extra)
    with expected_warnings(arg):
        return RMSprop(params, **arg, **_PATHS[path], **extra)


def _fused_skip_reason() -> str | None:
    return FUSED_UNAVAILABLE


def _set_grads(params, t: int) -> None:
    # The gradient depends on the parameter, so any divergence in the resumed run is amplified.
    gen = torch.Generator().manual_seed(10_000 + t)
    for p in params:
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        p.grad = (0.5 * p.detach() + noise).to(p.dtype)


def _state_tensors(opt: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    out = []
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            for k, v in sorted(opt.state.get(p, {}).items()):
                if isinstance(v, torch.Tensor):
                    out.append((f"g{gi}p{pi}.{k}", v))
    return out


def _assert_same(params_a, params_b, opt_a, opt_b, where: str) -> None:
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert torch.equal(a, b), f"{where}: parameter {i} differs"
    sa, sb = _state_tensors(opt_a), _state_tensors(opt_b)
    assert [k for k, _ in sa] == [k for k, _ in sb], where
    for (k, a), (_, b) in zip(sa, sb):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where}: state {k} differs"


# ------------------------------------------------------------------------------------------
# exact resume through state_dict -> torch.save -> torch.load(weights_only=True)


@pytest.mark.parametrize("path", list(_PATHS))
@pytest.mark.parametrize("config", list(_CONFIGS))
def test_state_dict_round_trip_resumes_bit_identically(config: str, path: str) -> None:
    if path == "fused" and (reason := _fused_skip_reason()):
        pytest.skip(reason)
    dtype = torch.float64 if config.endswith("-bc") else torch.float32
    params = _make_params(dtype)
    opt = _build(_CONFIGS[config], params, path)
    for t in range(10):
        _set_grads(params, t)
        opt.step()

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    # a fresh optimizer with a different lr: load_state_dict must restore the saved one
    opt2 = _build(_CONFIGS[config], params2, path)
    opt2.param_groups[0]["lr"] = 0.5
    opt2.load_state_dict(loaded)
    _assert_same(params, params2, opt, opt2, "after load")
    for t in range(10, 110):
        _set_grads(params, t)
        _set_grads(params2, t)
        opt.step()
        opt2.step()
        for i, (a, b) in enumerate(zip(params, params2)):
            assert torch.equal(a, b), f"step {t + 1}: parameter {i} differs after resume"
    _assert_same(params, params2, opt, opt2, "after 100 resumed steps")


@pytest.mark.parametrize("path", ["forloop", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_params_keep_float32_state_across_resume(dtype: torch.dtype, path: str) -> None:
    params = _make_params(dtype)
    opt = RMSprop(params, lr=1e-3, momentum=0.9, centered=True, **_PATHS[path])
    for t in range(5):
        _set_grads(params, t)
        opt.step()
    assert all(v.dtype == torch.float32 for _, v in _state_tensors(opt) if v.dim() > 0)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = RMSprop(params2, lr=1e-3, momentum=0.9, centered=True, **_PATHS[path])
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    # torch.optim casts floating state to the param dtype on load; that would round the
    # float32 state to half precision and the trajectories would part.
    _assert_same(params, params2, opt, opt2, "after load")
    for t in range(5, 105):
        _set_grads(params, t)
        _set_grads(params2, t)
        opt.step()
        opt2.step()
    _assert_same(params, params2, opt, opt2, "after 100 resumed steps")


# ------------------------------------------------------------------------------------------
# save_checkpoint / load_checkpoint with a model, scheduler and GradScaler


class _Net(torch.nn.Module):
    def __init__(self, width: int = 8, depth: int = 2) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])
        self.head = torch.nn.Linear(width, 1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(torch.tanh(self.layers(x)))


def _training(seed: int = 0, *, width: int = 8, depth: int = 2, **opt_kw):
    torch.manual_seed(seed)
    model = _Net(width, depth)
    opt = RMSprop(model.named_parameters(), **{"lr": 1e-2, "momentum": 0.9, **opt_kw})
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=5)
    return model, opt, sched, scaler


def _train(model, opt, sched, scaler, steps: range, width: int = 8) -> None:
    for t in steps:
        gen = torch.Generator().manual_seed(t)
        x = torch.randn(16, width, generator=gen)
        y = torch.randn(16, 1, generator=gen)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()


def _snapshot(model, opt, sched=None, scaler=None):
    return {"model": copy.deepcopy(model.state_dict()),
            "optimizer": copy.deepcopy(opt.state_dict()),
            "opt_state": [(k, v.clone()) for k, v in _state_tensors(opt)],
            "sched": copy.deepcopy(sched.state_dict()) if sched is not None else None,
            "scaler": copy.deepcopy(scaler.state_dict()) if scaler is not None else None}


def _assert_unchanged(before, model, opt, sched=None, scaler=None) -> None:
    after = _snapshot(model, opt, sched, scaler)
    assert before["model"].keys() == after["model"].keys()
    for k in before["model"]:
        assert torch.equal(before["model"][k], after["model"][k]), f"model {k!r} changed"
    assert [k for k, _ in before["opt_state"]] == [k for k, _ in after["opt_state"]]
    for (k, a), (_, b) in zip(before["opt_state"], after["opt_state"]):
        assert a.dtype == b.dtype and torch.equal(a, b), f"optimizer state {k} changed"
    strip = lambda sd: [{k: v for k, v in g.items() if k != "params"}  # noqa: E731
                        for g in sd["param_groups"]]
    assert strip(before["optimizer"]) == strip(after["optimizer"]), "param groups changed"
    assert before["sched"] == after["sched"], "scheduler changed"
    assert before["scaler"] == after["scaler"], "scaler changed"


def test_checkpoint_resumes_model_optimizer_scheduler_scaler_exactly(tmp_path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    model, opt, sched, scaler = _training()
    _train(model, opt, sched, scaler, range(13))
    rng = torch.get_rng_state()
    save_checkpoint(ckpt, model, opt, scheduler=sched, scaler=scaler,
                    extra={"epoch": 13, "rng": rng, "tags": ["a", 1.5, None]})
    _train(model, opt, sched, scaler, range(13, 113))

    model2, opt2, sched2, scaler2 = _training(seed=1)  # different init: all must be restored
    extra = load_checkpoint(ckpt, model2, opt2, scheduler=sched2, scaler=scaler2)
    assert extra["epoch"] == 13 and extra["tags"] == ["a", 1.5, None]
    assert torch.equal(extra["rng"], rng)
    _train(model2, opt2, sched2, scaler2, range(13, 113))

    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), f"{k} differs after resuming for 100 steps"
    _assert_same([], [], opt, opt2, "optimizer state after 100 resumed steps")
    assert sched.state_dict() == sched2.state_dict()
    assert scaler.state_dict() == scaler2.state_dict()


def test_checkpoint_file_is_weights_only_loadable_and_overwrites(tmp_path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    model, opt, sched, scaler = _training()
    save_checkpoint(ckpt, model, opt, extra={"n": 1})
    _train(model, opt, sched, scaler, range(3))
    save_checkpoint(ckpt, model, opt, extra={"n": 2})
    assert [f for f in os.listdir(tmp_path)] == ["ckpt.pt"], "temporary file left behind"
    model2, opt2, _, _ = _training(seed=5)
    assert load_checkpoint(ckpt, model2, opt2) == {"n": 2}
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k])


def test_unloadable_extra_is_refused_before_writing(tmp_path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    model, opt, _, _ = _training()
    save_checkpoint(ckpt, model, opt, extra={"n": 1})
    before = ckpt.read_bytes()
    with pytest.raises(TypeError, match=r"extra\['bad'\] is a .*weights_only"):
        save_checkpoint(ckpt, model, opt, extra={"bad": object()})
    assert ckpt.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]


# ------------------------------------------------------------------------------------------
# atomic writes: SIGKILL a writer at random points

# One process imports torch once (seconds on a loaded CI box) and forks a fresh writer per kill.
_WRITER = textwrap.dedent("""
    import os, sys, torch
    torch.set_num_threads(1)  # no OpenMP pool to inherit across fork
    from rmsprop.torch import RMSprop
    from rmsprop.torch.checkpoint import save_checkpoint
    path = sys.argv[1]
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])  # ~2 MB
    opt = RMSprop(model.parameters(), momentum=0.9, centered=True)
    print("ready", flush=True)
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            print("child", os.getpid(), flush=True)
            i = 1
            while True:
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(i)
                save_checkpoint(path, model, opt, extra={"i": i})
                print("saved", i, flush=True)
                i += 1
        _, status = os.waitpid(pid, 0)
        print("dead", os.waitstatus_to_exitcode(status), flush=True)
""")


@pytest.mark.slow  # one torch import in a subprocess: seconds, not milliseconds
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX fork and SIGKILL")
def test_unwritable_target_is_named_not_its_temporary_file(tmp_path) -> None:
    model, opt, sched, scaler = _training(seed=0)
    with pytest.raises(FileNotFoundError, match=r"cannot write checkpoint .*no-such.*its "
                                                r"folder does not exist"):
        save_checkpoint(tmp_path / "no-such" / "c.pt", model, opt)
    with pytest.raises(IsADirectoryError, match=r"cannot write checkpoint .*it is a folder"):
        save_checkpoint(tmp_path, model, opt)
    assert list(tmp_path.iterdir()) == []


def test_killed_writer_leaves_a_complete_checkpoint(tmp_path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
    opt = RMSprop(model.parameters(), momentum=0.9, centered=True)

    def reset() -> None:  # each writer counts from 1: start every round from checkpoint 0
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(0)
        save_checkpoint(ckpt, model, opt, extra={"i": 0})
        for f in os.listdir(tmp_path):
            if f.endswith(".tmp"):
                os.unlink(tmp_path / f)

    reset()
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    rnd = random.Random(1234)
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        for kill in range(4):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            kind, pid = proc.stdout.readline().split()
            assert kind == "child"
            time.sleep(rnd.uniform(0.0, 0.4))  # a random point inside the save loop
            os.kill(int(pid), signal.SIGKILL)
            completed = [0]
            while (line := proc.stdout.readline().split())[0] != "dead":
                completed.append(int(line[1]))
            assert int(line[1]) == -signal.SIGKILL
            extra = load_checkpoint(ckpt, model, opt)  # complete and verified, or it raises
            i = extra["i"]
            # the newest reported save, or one renamed into place before its report
            assert completed[-1] <= i <= completed[-1] + 1, (kill, i, completed[-1])
            for p in model.parameters():
                assert bool((p == i).all()), f"kill {kill}: checkpoint {i} holds mixed data"
            reset()
    finally:
        proc.kill()
        proc.communicate()


# ------------------------------------------------------------------------------------------
# corrupt, truncated, foreign and mismatched checkpoints


@pytest.fixture
def saved(tmp_path):
    """A checkpoint of one run, and live objects in a different (further trained) state."""
    ckpt = tmp_path / "ckpt.pt"
    model, opt, sched, scaler = _training(seed=0)
    _train(model, opt, sched, scaler, range(4))
    save_checkpoint(ckpt, model, opt, scheduler=sched, scaler=scaler, extra={"epoch": 4})
    live = _training(seed=3)
    _train(*live, range(9))
    return ckpt, live


def _expect_refused(path, live, match: str) -> None:
    model, opt, sched, scaler = live
    before = _snapshot(model, opt, sched, scaler)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path, model, opt, scheduler=sched, scaler=scaler)
    _assert_unchanged(before, model, opt, sched, scaler)


def test_good_checkpoint_loads_into_live_objects(saved) -> None:
    # control for the tests below: the unmodified file does load and does change the objects
    ckpt, (model, opt, sched, scaler) = saved
    before = _snapshot(model, opt, sched, scaler)
    assert load_checkpoint(ckpt, model, opt, scheduler=sched, scaler=scaler) == {"epoch": 4}
    with pytest.raises(AssertionError):
        _assert_unchanged(before, model, opt, sched, scaler)


@pytest.mark.parametrize("where", ["empty", "magic", "length", "header", "payload", "last"])
def test_truncated_checkpoint_is_refused(saved, tmp_path, where: str) -> None:
    ckpt, live = saved
    data = ckpt.read_bytes()
    hlen = int.from_bytes(data[19:27], "big")
    cut = {"empty": 0, "magic": 7, "length": 22, "header": 27 + hlen // 2,
           "payload": 27 + hlen + 100, "last": len(data) - 1}[where]
    bad = tmp_path / "cut.pt"
    bad.write_bytes(data[:cut])
    _expect_refused(bad, live, r"truncated|not an rmsprop checkpoint")


def test_corrupt_payload_byte_is_refused(saved, tmp_path) -> None:
    ckpt, live = saved
    data = bytearray(ckpt.read_bytes())
    data[-500] ^= 0x01
    bad = tmp_path / "flip.pt"
    bad.write_bytes(bytes(data))
    _expect_refused(bad, live, r"corrupt: payload SHA-256 does not match")


def test_corrupt_header_and_trailing_garbage_are_refused(saved, tmp_path) -> None:
    ckpt, live = saved
    data = ckpt.read_bytes()
    bad = tmp_path / "hdr.pt"
    bad.write_bytes(data[:27] + b"!" + data[28:])
    _expect_refused(bad, live, r"corrupt: its header cannot be read")
    bad.write_bytes(data + b"\0")
    _expect_refused(bad, live, r"trailing bytes")


def _with_header(data: bytes, edit) -> bytes:
    """The checkpoint ``data`` with its JSON header edited by ``edit(header)`` (the payload and
    its hash unchanged: the header is not covered by the hash)."""
    hlen = int.from_bytes(data[19:27], "big")
    header = json.loads(data[27:27 + hlen])
    edit(header)
    raw = json.dumps(header).encode()
    return data[:19] + len(raw).to_bytes(8, "big") + raw + data[27 + hlen:]


@pytest.mark.parametrize("edit", [
    lambda h: h["description"].pop("optimizer_class"),
    lambda h: h["description"].pop("model"),
    lambda h: h["description"].pop("options"),
    lambda h: h["description"].update(groups=5),
    lambda h: h["description"]["groups"][0]["params"][0].pop("name"),
    lambda h: h["description"]["groups"][0]["params"][0].update(shape="big"),
    lambda h: h.update(description=[]),
    lambda h: h.update(payload_bytes=-5),
    lambda h: h.update(payload_bytes="abc"),
    lambda h: h.update(has=[]),
], ids=["no-class", "no-model", "no-options", "groups-int", "no-name", "shape-str",
        "description-list", "negative-length", "length-str", "has-list"])
def test_damaged_header_is_refused_as_corrupt(saved, tmp_path, edit) -> None:
    ckpt, live = saved
    bad = tmp_path / "hdr.pt"
    bad.write_bytes(_with_header(ckpt.read_bytes(), edit))
    _expect_refused(bad, live, r"corrupt: its header cannot be read")


def test_a_folder_is_refused(saved, tmp_path) -> None:
    _, live = saved
    _expect_refused(tmp_path, live, r"is a folder, not a checkpoint file")


def test_foreign_files_and_other_versions_are_refused(saved, tmp_path) -> None:
    ckpt, live = saved
    plain = tmp_path / "plain.pt"
    torch.save(live[0].state_dict(), plain)
    _expect_refused(plain, live, r"not an rmsprop checkpoint \(it looks like a plain torch.save")
    _expect_refused(tmp_path / "missing.pt", live, r"no checkpoint at")
    data = ckpt.read_bytes()
    hlen = int.from_bytes(data[19:27], "big")
    header = json.loads(data[27:27 + hlen])
    header["format_version"] = 2
    raw = json.dumps(header).encode()
    newer = tmp_path / "v2.pt"
    newer.write_bytes(data[:19] + len(raw).to_bytes(8, "big") + raw + data[27 + hlen:])
    _expect_refused(newer, live, r"format version 2; this version of rmsprop reads version 1")


def test_mismatched_model_is_refused_naming_the_entries(saved) -> None:
    ckpt, _ = saved
    wider = _training(seed=3, width=9)
    _expect_refused(ckpt, wider, r"model entry 'layers.0.weight': checkpoint has shape \(8, 8\) "
                                 r"float32, live model has \(9, 9\) float32")
    deeper = _training(seed=3, depth=3)
    _expect_refused(ckpt, deeper, r"model entries missing from the checkpoint: 'layers.2.weight'"
                                  r"(.|\n)*param group 0: checkpoint has 6 parameters, live "
                                  r"optimizer has 8")
    model, opt, sched, scaler = _training(seed=3)
    model.double()
    _expect_refused(ckpt, (model, opt, sched, scaler), r"float32, live model has \(8, 8\) float64")


def test_mismatched_optimizer_is_refused_naming_what_differs(saved) -> None:
    ckpt, (model, _, sched, scaler) = saved
    torch_opt = torch.optim.RMSprop(model.parameters(), lr=1e-2)
    _expect_refused(ckpt, (model, torch_opt, None, None),
                    r"optimizer class: checkpoint has rmsprop\.torch\.optimizer\.RMSprop, live "
                    r"optimizer is torch\.optim\.rmsprop\.RMSprop(.|\n)*option set differs")
    head = list(model.head.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("head")]
    two_groups = RMSprop([{"params": rest}, {"params": head, "lr": 1e-3}])
    _expect_refused(ckpt, (model, two_groups, None, None),
                    r"param groups: checkpoint has 1, live optimizer has 2")
    params = list(model.parameters())
    swapped = RMSprop([params[2], params[3], params[0], params[1]] + params[4:])
    _expect_refused(ckpt, (model, swapped, None, None),
                    r"param group 0, parameter 0 \('layers.1.weight'\): checkpoint holds model "
                    r"parameter 'layers.0.weight' here \(parameters reordered\?\)")


def test_checkpoint_of_an_older_option_set_loads(saved, tmp_path) -> None:
    """A checkpoint written before an option existed (its header lacks the option) loads:
    the option takes its default, as load_state_dict documents; only options the live
    optimizer does not know are refused."""
    import json
    import struct

    ckpt, (model, opt, sched, scaler) = saved
    raw = ckpt.read_bytes()
    magic_end = raw.index(b"\n") + 1
    (n,) = struct.unpack(">Q", raw[magic_end:magic_end + 8])
    header = json.loads(raw[magic_end + 8:magic_end + 8 + n])
    header["description"]["options"].remove("seed")
    body = json.dumps(header).encode()
    older = tmp_path / "older.pt"
    older.write_bytes(raw[:magic_end] + struct.pack(">Q", len(body)) + body
                      + raw[magic_end + 8 + n:])
    load_checkpoint(older, model, opt, scheduler=sched, scaler=scaler)
    assert opt.param_groups[0]["seed"] == 0


def test_scheduler_requested_but_not_saved_is_refused(saved, tmp_path) -> None:
    _, (model, opt, sched, scaler) = saved
    ckpt = tmp_path / "nosched.pt"
    save_checkpoint(ckpt, model, opt)
    _expect_refused(ckpt, (model, opt, sched, None), r"a scheduler was given but .* holds no "
                                                     r"scheduler state")


class _BrokenScheduler:
    """Validation cannot foresee this: load_state_dict raises after model and optimizer loaded."""

    def __init__(self) -> None:
        self.value = 1

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, sd: dict) -> None:
        if sd["value"] == 1:
            raise RuntimeError("scheduler refuses")
        self.value = sd["value"]


def test_failing_load_restores_everything(saved, tmp_path) -> None:
    _, (model, opt, sched, scaler) = saved
    src_model, src_opt, _, _ = _training(seed=7)
    _train(src_model, src_opt, torch.optim.lr_scheduler.StepLR(src_opt, 3),
           torch.amp.GradScaler("cpu", enabled=False), range(2))
    ckpt = tmp_path / "broken.pt"
    save_checkpoint(ckpt, src_model, src_opt, scheduler=_BrokenScheduler())
    broken = _BrokenScheduler()
    broken.value = 2
    before = _snapshot(model, opt)
    with pytest.raises(CheckpointError, match=r"loading the scheduler state .* failed \(scheduler "
                                              r"refuses\); everything was restored"):
        load_checkpoint(ckpt, model, opt, scheduler=broken)
    _assert_unchanged(before, model, opt)
    assert broken.value == 2
