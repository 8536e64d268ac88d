"""The torch.optim contract breaks a new user hit, each a regression test on every path.

Oracles: ``torch.optim.RMSprop`` (its own trajectory, its own error types), the NumPy
reference :func:`rmsprop.spec.step`, and closed forms ("nothing changed").
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch

from conftest import FUSED, FUSED_UNAVAILABLE, STATE_FORMATS
from rmsprop import spec
from rmsprop.torch import RMSprop, _paths

SHAPES = [(4, 3), (5,)]


def _params(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]


def _grads(t, dtype=torch.float64):
    gen = torch.Generator().manual_seed(100 + t)
    return [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]


def _step(opt, params, t):
    for p, g in zip(params, _grads(t, params[0].dtype)):
        p.grad = g.clone()
    opt.step()


def _assert_same(path, ours, theirs):
    """Bit-identical on the for-loop and foreach paths (torch's op sequence); the fused
    kernel's single pass rounds differently, within a few ulp per step."""
    for a, b in zip(ours, theirs):
        if path == "fused":
            torch.testing.assert_close(a, b, rtol=1e-12 if a.dtype == torch.float64 else 2e-5,
                                       atol=1e-12 if a.dtype == torch.float64 else 2e-6)
        else:
            assert torch.equal(a, b)


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params})


def _assert_unchanged(opt, params, snap):
    for p, old in zip(params, snap[0]):
        assert torch.equal(p, old)
    for p in params:
        assert set(opt.state[p]) == set(snap[1][id(p)])
        for k, v in opt.state[p].items():
            assert torch.equal(v, snap[1][id(p)][k]), k


# ---------------------------------------------------------------- a step saved as a number

@pytest.mark.parametrize("kind", [int, float])
def test_step_saved_as_a_python_number_is_converted_on_load(path, path_kwargs, kind):
    # bias correction makes the step count part of the arithmetic: the spec is the oracle
    opts = dict(lr=0.01, momentum=0.9, bias_correction=True)
    init = _params()
    ps = [p.clone() for p in init]
    opt = RMSprop(ps, **opts, **path_kwargs)
    for t in range(3):
        _step(opt, ps, t)
    sd = copy.deepcopy(opt.state_dict())
    for entry in sd["state"].values():
        entry["step"] = kind(entry["step"].item())  # what older torch versions saved
    saved = copy.deepcopy(sd)
    qs = [p.detach().clone() for p in ps]
    opt2 = RMSprop(qs, **opts, **path_kwargs)
    opt2.load_state_dict(sd)
    for k, entry in sd["state"].items():  # the caller's dict is not changed
        assert type(entry["step"]) is kind and entry["step"] == saved["state"][k]["step"]
    for q in qs:
        assert isinstance(opt2.state[q]["step"], torch.Tensor)
    for t in range(3, 6):
        _step(opt2, qs, t)
    for i, p0 in enumerate(init):
        x, st = p0.numpy().copy(), spec.init_state(p0.numpy(), opts)
        for t in range(6):
            x, st = spec.step(x, _grads(t)[i].numpy(), st, opts)
        np.testing.assert_allclose(qs[i].numpy(), x, rtol=1e-12, atol=1e-12)
        assert int(opt2.state[qs[i]]["step"]) == 6


# ---------------------------------------------------------------- a group without gradients

def test_group_without_gradients_does_nothing_and_resumes(path, path_kwargs, tmp_path):
    live, frozen = _params(seed=1)
    ref_live = live.clone()
    opt = RMSprop([{"params": [live]}, {"params": [frozen]}], lr=0.01, **path_kwargs)
    ref = torch.optim.RMSprop([ref_live], lr=0.01, foreach=False)
    before = frozen.clone()
    for t in range(2):
        g = _grads(t)[0]
        live.grad, ref_live.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert torch.equal(frozen, before) and frozen not in opt.state
    _assert_same(path, [live], [ref_live])
    # resumed through torch.save / torch.load(weights_only=True): still nothing to do there
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    live2, frozen2 = live.detach().clone(), frozen.detach().clone()
    opt2 = RMSprop([{"params": [live2]}, {"params": [frozen2]}], lr=0.01, **path_kwargs)
    opt2.load_state_dict(sd)
    g = _grads(5)[0]
    live2.grad, ref_live.grad = g.clone(), g.clone()
    opt2.step()
    ref.step()
    assert torch.equal(frozen2, before)
    _assert_same(path, [live2], [ref_live])


# ---------------------------------------------------------------- torch's path choice

@pytest.mark.parametrize("fused,foreach,expected", [
    (None, None, "fused"),     # both None: the default (ours: the fused kernel on the CPU)
    (None, False, "forloop"),  # an explicit foreach=False is the for-loop, as in torch
    (None, True, "foreach"),
    (False, None, "forloop"),  # torch's CPU default without the fused kernel
    (False, False, "forloop"),
    (False, True, "foreach"),
    (True, None, "fused"),
    (True, False, "fused"),
])
def test_fused_and_foreach_choose_the_path_as_torch_does(fused, foreach, expected, monkeypatch):
    if expected == "fused" and not FUSED:
        pytest.skip(FUSED_UNAVAILABLE or "")
    calls = {"forloop": 0, "foreach": 0}
    single, lists = _paths.single_tensor_step, _paths.foreach_step

    def count_single(*a, **k):
        calls["forloop"] += 1
        return single(*a, **k)

    def count_lists(*a, **k):
        calls["foreach"] += 1
        return lists(*a, **k)

    monkeypatch.setattr(_paths, "single_tensor_step", count_single)
    monkeypatch.setattr(_paths, "foreach_step", count_lists)
    ps = _params(torch.float32)
    opt = RMSprop(ps, lr=0.01, fused=fused, foreach=foreach)
    for t in range(2):
        _step(opt, ps, t)
    ran = [k for k, n in calls.items() if n] or ["fused"]
    assert ran == [expected]
    assert bool(opt._plans) == (expected == "fused")  # the kernel's cached plan


# ---------------------------------------------------------------- hyperparameter values

_NONFINITE = {"lr": "learning rate", "eps": "epsilon", "weight_decay": "weight_decay",
              "initial_square_avg": "initial_square_avg", "alpha": "alpha",
              "momentum": "momentum"}


@pytest.mark.parametrize("name", sorted(_NONFINITE))
@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_infinite_hyperparameters_are_refused_naming_them(path, path_kwargs, name, value):
    match = _NONFINITE[name]
    with pytest.raises(ValueError, match=match):
        RMSprop(_params(), **{name: value}, **path_kwargs)
    ps = _params()
    opt = RMSprop(ps[:1], **path_kwargs)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": ps[1:], name: value})
    assert len(opt.param_groups) == 1
    # written between steps (after the fused path has cached its plan): the step refuses
    for t in range(2):
        _step(opt, ps[:1], t)
    snap = _snapshot(opt, ps[:1])
    opt.param_groups[0][name] = value
    for p, g in zip(ps[:1], _grads(3)):
        p.grad = g
    with pytest.raises(ValueError, match=match):
        opt.step()
    _assert_unchanged(opt, ps[:1], snap)


@pytest.mark.parametrize("name,value", [("lr", "0.01"), ("alpha", "0.9"), ("eps", None),
                                        ("momentum", "0"), ("weight_decay", [0.1])])
def test_hyperparameters_that_are_not_numbers_raise_type_error(path, path_kwargs, name, value):
    with pytest.raises(TypeError):  # the oracle: torch's own type of error
        torch.optim.RMSprop(_params(), **{name: value})
    with pytest.raises(TypeError, match=name):
        RMSprop(_params(), **{name: value}, **path_kwargs)
    ps = _params()
    opt = RMSprop(ps[:1], **path_kwargs)
    with pytest.raises(TypeError, match=name):
        opt.add_param_group({"params": ps[1:], name: value})
    assert len(opt.param_groups) == 1
    for t in range(2):
        _step(opt, ps[:1], t)
    snap = _snapshot(opt, ps[:1])
    opt.param_groups[0][name] = value  # a scheduler or a user writes it between steps
    for p, g in zip(ps[:1], _grads(3)):
        p.grad = g
    with pytest.raises(TypeError, match=name):
        opt.step()
    _assert_unchanged(opt, ps[:1], snap)


# ---------------------------------------------------------------- options come from the file

def test_load_state_dict_takes_the_options_from_the_file_as_torch_does(path, path_kwargs):
    torch_ps, our_ps = _params(seed=2), _params(seed=2)
    ref = torch.optim.RMSprop(torch_ps, lr=0.00025, alpha=0.95, momentum=0.9, centered=True,
                              foreach=False)
    for t in range(3):
        _step(ref, torch_ps, t)
    for p, q in zip(our_ps, torch_ps):
        p.copy_(q)
    opt = RMSprop(our_ps, lr=0.05, momentum=0.0, centered=False, **path_kwargs)
    opt.load_state_dict(ref.state_dict())
    group = opt.param_groups[0]
    assert (group["lr"], group["alpha"], group["momentum"], group["centered"]) == (
        0.00025, 0.95, 0.9, True)
    assert "options come from the state dict" in " ".join(RMSprop.load_state_dict.__doc__.split())
    # the path stays the one asked for: the file's foreach=False must not pick another
    group.update(path_kwargs)
    for t in range(3, 6):
        _step(ref, torch_ps, t)
        _step(opt, our_ps, t)
    _assert_same(path, our_ps, torch_ps)


def test_state_dict_of_torch_options_holds_exactly_torch_keys():
    ours = RMSprop(_params(), lr=0.01, momentum=0.9)
    theirs = torch.optim.RMSprop(_params(), lr=0.01, momentum=0.9)
    assert set(ours.state_dict()["param_groups"][0]) == set(
        theirs.state_dict()["param_groups"][0])
    extra = RMSprop(_params(), lr=0.01, nesterov=True, momentum=0.9).state_dict()
    assert extra["param_groups"][0]["nesterov"] is True  # kept where it is not the default


# ---------------------------------------------------------------- fused=True on meta params

def test_fused_true_accepts_meta_params_and_raises_at_step():
    if not FUSED:
        pytest.skip(FUSED_UNAVAILABLE or "")
    with torch.device("meta"):
        model = torch.nn.Linear(4, 3)
    opt = RMSprop(model.parameters(), lr=0.01, fused=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="fused=True cannot apply: .*meta"):
        opt.step()
    assert not opt.state  # refused before anything was created
    with torch.device("meta"):  # torch's own fused optimizer refuses at step() too
        adam = torch.optim.Adam(torch.nn.Linear(4, 3).parameters(), fused=True)
    for group in adam.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="meta"):
        adam.step()


# ---------------------------------------------------------------- defaults written once

def _signature_defaults(fn):
    import inspect
    return {k: v.default for k, v in inspect.signature(fn).parameters.items()
            if v.default is not inspect.Parameter.empty}


def test_defaults_are_options_defaults_everywhere():
    """One table: for every option of the rule, Options' default is the constructor's, the
    ``pytorch`` preset's and, for the options torch has, torch.optim.RMSprop's."""
    from dataclasses import fields

    from rmsprop import PRESETS, Options

    ours = _signature_defaults(RMSprop.__init__)
    torch_sig = _signature_defaults(torch.optim.RMSprop.__init__)
    preset = dict(PRESETS["pytorch"].options)
    table = [(f.name, f.default, ours.get(f.name, "missing"), torch_sig.get(f.name, None),
              preset.get(f.name, f.default)) for f in fields(Options)]
    for name, default, constructor, in_torch, in_preset in table:
        assert constructor == default and type(constructor) in (type(default), int), name
        assert in_preset == default, name
        if in_torch is not None:
            assert in_torch == default, name
    # every option torch has is one of ours, with torch's default
    for name, value in torch_sig.items():
        assert ours[name] == value, name


# ---------------------------------------------------------------- every state format, every path

@pytest.mark.parametrize("fmt", list(STATE_FORMATS))
def test_every_state_format_on_every_path_tracks_the_spec(fmt, path, path_kwargs):
    """A storage format is one codec and one row of STATE_FORMATS: each runs on every path
    where it can (the fused kernel takes float state of the params' dtype or float32; a
    fused=True optimizer refuses the others, naming the format) and follows the NumPy
    reference with the same storage."""
    from rmsprop.torch import _codecs
    from rmsprop.torch._plan import Plan

    state_dtype = STATE_FORMATS[fmt]
    opts = dict(lr=0.01, momentum=0.9, centered=True)
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(4096, generator=gen)  # large enough for the block formats
    p = init.clone()
    codec = _codecs.resolve(state_dtype, torch.float32)
    why = Plan.accepts(codec, torch.float32)
    if path == "fused" and why:
        with pytest.raises(RuntimeError, match="fused=True cannot apply"):
            RMSprop([p], **opts, state_dtype=state_dtype, **path_kwargs)
        return
    opt = RMSprop([p], **opts, state_dtype=state_dtype, **path_kwargs)
    x, st = init.numpy().copy(), spec.init_state(init.numpy(), opts, state_dtype=fmt)
    for _ in range(5):
        g = torch.randn(4096, generator=gen)
        p.grad = g.clone()
        opt.step()
        x, st = spec.step(x, g.numpy(), st, opts)
    if codec.dtype is not None:  # stored as that float dtype, torch's layout
        assert opt.state[p]["square_avg"].dtype == codec.dtype
    tol = dict(rtol=1e-4, atol=1e-5) if codec.dtype is None else dict(rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(p.numpy(), x, **tol)


@pytest.mark.slow
def test_plans_never_load_the_ctypes_module_themselves():
    """A CUDA user never imports the C kernel's loader: importing the optimizer and its
    plans leaves ``rmsprop.kernels.cpu`` unloaded (a CPU plan imports it when built)."""
    import subprocess
    import sys

    code = ("import sys, rmsprop.torch, rmsprop.torch._plan; "
            "print('rmsprop.kernels.cpu' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == "False"
