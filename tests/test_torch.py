"""rmsprop.torch.RMSprop: parity with torch.optim.RMSprop and the NumPy spec, and the
torch.optim.Optimizer contract. Oracles: torch's own optimizer, rmsprop.spec, closed forms."""

import contextlib
import copy
import io
import pickle

import numpy as np
import pytest
import torch

from conftest import FUSED, GRID, PATH_NAMES, TORCH_GRID, expected_warnings
from conftest import PATHS as PATHS_BY_NAME
from rmsprop import Options, spec
from rmsprop.torch import NonFiniteGradientError, RMSprop

# the shared table (tests/conftest.py), as lists for parametrize
PATH_IDS = PATH_NAMES
PATHS = [PATHS_BY_NAME[n] for n in PATH_NAMES]


def _grads(shapes, steps, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(steps)]


def _run(opt_cls, params, grads, sched_every=25, none_every=7, **kw):
    with expected_warnings(kw) if opt_cls is RMSprop else contextlib.nullcontext():
        opt = opt_cls(params, **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=sched_every, gamma=0.5)
    for t, gs in enumerate(grads):
        for i, (p, g) in enumerate(zip(params, gs)):
            p.grad = None if (t + i) % none_every == 0 and i == 1 else g.clone()
        opt.step()
        sched.step()
    return opt


SHAPES = [(4, 3), (5,), (), (2, 1, 3)]


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("config", TORCH_GRID, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_rmsprop(path, config, dtype):
    grads = _grads(SHAPES, 110, dtype)
    init = [torch.randn(s, dtype=dtype, generator=torch.Generator().manual_seed(1))
            for s in SHAPES]
    ours = [p.clone() for p in init]
    theirs = [p.clone() for p in init]
    _run(RMSprop, ours, grads, lr=0.01, **config, **path)
    _run(torch.optim.RMSprop, theirs, grads, lr=0.01, **config)
    for a, b in zip(ours, theirs):
        if path.get("fused"):  # one pass with its own rounding: the issue allows a few ulp
            torch.testing.assert_close(a, b, rtol=1e-12 if dtype == torch.float64 else 2e-5,
                                       atol=1e-12 if dtype == torch.float64 else 2e-6)
        else:  # same op sequence as torch: bit-identical
            assert torch.equal(a, b)


def _spec_trajectory(init, grads, lrs, config):
    params = [p.numpy().copy() for p in init]
    states = [None] * len(params)
    for t, gs in enumerate(grads):
        with expected_warnings(config):
            o = Options(lr=lrs[t], **config)
        for i, g in enumerate(gs):
            if (t + i) % 7 == 0 and i == 1:
                continue
            if states[i] is None:
                states[i] = spec.init_state(params[i], o)
            params[i], states[i] = spec.step(params[i], g.numpy(), states[i], o)
    return params


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("config", GRID, ids=str)
def test_matches_numpy_spec_float64(path, config):
    grads = _grads(SHAPES, 100, torch.float64, seed=3)
    init = [torch.randn(s, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
            for s in SHAPES]
    ours = [p.clone() for p in init]
    _run(RMSprop, ours, grads, lr=0.01, **config, **path)
    lrs = [0.01 * 0.5 ** (t // 25) for t in range(100)]
    expected = _spec_trajectory(init, grads, lrs, config)
    for a, b in zip(ours, expected):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", GRID, ids=str)
def test_forloop_and_foreach_bit_identical(config):
    grads = _grads(SHAPES, 60, torch.float32, seed=5)
    a = [torch.ones(s) for s in SHAPES]
    b = [torch.ones(s) for s in SHAPES]
    oa = _run(RMSprop, a, grads, lr=0.02, foreach=False, fused=False, **config)
    ob = _run(RMSprop, b, grads, lr=0.02, foreach=True, fused=False, **config)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for x, y in zip(a, b):
        for key, value in oa.state[x].items():
            assert torch.equal(value, ob.state[y][key])


@pytest.mark.parametrize("config", GRID, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_foreach_batches_change_no_bit(config, dtype, monkeypatch):
    """The foreach path cut into batches of 5 elements (tensors split across batches, a
    non-contiguous param kept whole) against the for-loop path: bit-identical params and
    state. (16-bit params: float copies per batch, rounded back once, as unbatched.)"""
    import rmsprop.torch.optimizer as impl

    monkeypatch.setitem(impl._FOREACH_BATCH, "cpu", 5)
    shapes = SHAPES + [(3, 7)]
    grads = _grads(shapes, 30, dtype, seed=6)

    def params():
        ps = [torch.ones(s, dtype=dtype) for s in shapes[:-1]]
        return ps + [torch.ones(7, 3, dtype=dtype).t()]  # non-contiguous (3, 7)

    a, b = params(), params()
    oa = _run(RMSprop, a, grads, lr=0.02, foreach=False, fused=False, **config)
    ob = _run(RMSprop, b, grads, lr=0.02, foreach=True, fused=False, **config)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        for key, value in oa.state[x].items():
            assert torch.equal(value, ob.state[y][key]), key


def test_foreach_batches_bound_the_temporaries(monkeypatch):
    """bfloat16 params on the foreach path: float32 copies of params and gradients and the
    denominator are made per batch, so the step's peak extra memory follows the batch, not
    the model (unbatched: ~12 bytes per element)."""
    import rmsprop.torch.optimizer as impl
    from rmsprop.cli.bench import peak_extra_bytes

    n, batch = 1 << 18, 1 << 12
    p = torch.zeros(n, dtype=torch.bfloat16, requires_grad=True)
    p.grad = torch.randn(n, dtype=torch.bfloat16)
    opt = RMSprop([p], foreach=True, fused=False)
    opt.step()
    monkeypatch.setitem(impl._FOREACH_BATCH, "cpu", 1 << 40)
    whole, _ = peak_extra_bytes(opt.step)
    monkeypatch.setitem(impl._FOREACH_BATCH, "cpu", batch)
    batched, _ = peak_extra_bytes(opt.step)
    assert whole >= 12 * n
    assert batched <= 16 * batch + 256 * 1024, (batched, whole)


def test_first_step_closed_form():
    g = torch.tensor([2.0, -0.5, 1e-3], dtype=torch.float64)
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    p.grad = g.clone()
    RMSprop([p], lr=0.1, alpha=0.9, eps=1e-6).step()
    expected = -0.1 * g / (0.9 ** 0 * (1 - 0.9) ** 0.5 * g.abs() + 1e-6)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-14, atol=0)


def _train(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("config", TORCH_GRID, ids=str)
def test_state_dict_both_ways_with_torch(config):
    grads = _grads(SHAPES, 40, torch.float64, seed=7)
    ps = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    ours = RMSprop(ps, lr=0.01, fused=False, **config)  # torch's op order: bit-identical
    _train(ours, ps, grads[:20])
    # ours -> torch: torch continues exactly where we would have.
    qs = [p.clone() for p in ps]
    theirs = torch.optim.RMSprop(qs, lr=0.01, **config)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    _train(theirs, qs, grads[20:])
    # torch -> ours
    rs = [q.clone() for q in qs]
    back = RMSprop(rs, lr=0.5, fused=False)  # different defaults: the loaded groups win
    back.load_state_dict(copy.deepcopy(theirs.state_dict()))
    _train(ours, ps, grads[20:])
    for a, b in zip(ps, qs):
        assert torch.equal(a, b)
    assert back.param_groups[0]["lr"] == 0.01 and back.param_groups[0]["eps_in_sqrt"] is False
    _train(back, rs, grads[:5])
    _train(theirs, qs, grads[:5])
    for a, b in zip(rs, qs):
        assert torch.equal(a, b)


def test_checkpoint_roundtrip_weights_only_is_exact():
    grads = _grads(SHAPES, 60, torch.float32, seed=8)
    ps = [torch.zeros(s) for s in SHAPES]
    opt = RMSprop.from_preset("timm", ps, momentum=0.9)
    _train(opt, ps, grads[:30])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    qs = [p.clone() for p in ps]
    opt2 = RMSprop.from_preset("timm", qs, momentum=0.9)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    _train(opt, ps, grads[30:])
    _train(opt2, qs, grads[30:])
    for a, b in zip(ps, qs):
        assert torch.equal(a, b)


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params})


def _assert_unchanged(opt, params, snap):
    for p, q in zip(params, snap[0]):
        assert torch.equal(p.detach(), q)
    for p in params:
        for k, v in snap[1][id(p)].items():
            assert torch.equal(opt.state[p][k], v), k
        assert set(opt.state[p]) == set(snap[1][id(p)])


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-0.1), "Invalid learning rate"), (dict(lr=float("nan")), "Invalid learning rate"),
    (dict(alpha=1.2), "Invalid alpha"), (dict(eps=-1.0), "Invalid epsilon"),
    (dict(momentum=1.0), "Invalid momentum"), (dict(weight_decay=-0.1), "Invalid weight_decay"),
    (dict(nesterov=True), "Nesterov"), (dict(nonfinite="explode"), "nonfinite"),
    (dict(state_dtype=torch.int32), "state_dtype"), (dict(lr=torch.ones(2)), "1-element"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RMSprop([torch.zeros(2)], **kwargs)
    opt = RMSprop([torch.zeros(2)])
    if "lr" in kwargs and isinstance(kwargs["lr"], torch.Tensor) or "nonfinite" in kwargs \
            or "state_dtype" in kwargs:
        return
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [torch.zeros(3)], **kwargs})
    assert len(opt.param_groups) == 1


def test_unknown_preset_and_required_lr():
    with pytest.raises(ValueError, match="Unknown preset"):
        RMSprop.from_preset("nadam", [torch.zeros(1)])
    for name in ("tf1", "optax", "hinton2012"):
        with pytest.raises(ValueError, match="no default learning rate"):
            RMSprop.from_preset(name, [torch.zeros(1)])


def test_mismatched_state_dict_changes_nothing():
    ps = [torch.zeros(3), torch.zeros(2, 2)]
    opt = RMSprop(ps, momentum=0.9)
    _train(opt, ps, _grads([(3,), (2, 2)], 3, torch.float32))
    snap = _snapshot(opt, ps)
    good = opt.state_dict()
    bad_shape = copy.deepcopy(good)
    bad_shape["state"][1]["square_avg"] = torch.zeros(4)
    bad_groups = copy.deepcopy(good)
    bad_groups["param_groups"].append(copy.deepcopy(bad_groups["param_groups"][0]))
    bad_len = copy.deepcopy(good)
    bad_len["param_groups"][0]["params"] = [0]
    bad_dtype = copy.deepcopy(good)
    bad_dtype["state"][0]["momentum_buffer"] = torch.zeros(3, dtype=torch.int64)
    bad_value = copy.deepcopy(good)
    bad_value["param_groups"][0]["alpha"] = 3.0
    def edited(edit):
        sd = copy.deepcopy(good)
        edit(sd)
        return sd
    cases = [(bad_shape, "shape"), (bad_groups, "parameter groups"),
             (bad_len, "params"), (bad_dtype, "dtype"), (bad_value, "alpha"),
             ({"foo": 1}, "not an optimizer state dict"),
             # what every step reads, and what a step count and a mean of squares can be
             (edited(lambda sd: sd["state"][0].pop("square_avg")), "lacks 'square_avg'"),
             (edited(lambda sd: sd["state"][0].pop("step")), "lacks 'step'"),
             (edited(lambda sd: sd["state"][0].update(step=torch.tensor(float("nan")))),
              "'step' .* is nan: a count of steps taken must be finite and >= 0"),
             (edited(lambda sd: sd["state"][0].update(step=-5)), "'step' .* is -5.0"),
             (edited(lambda sd: sd["state"][1]["square_avg"].fill_(-1.0)),
              "'square_avg' .* holds negative values"),
             (edited(lambda sd: sd["state"][1].update(
                 square_avg=torch.empty(2, 2, device="meta"))), "is a meta tensor"),
             # the structure itself
             (edited(lambda sd: sd["param_groups"][0].update(params=[0, 0])),
              "parameter id 0 appears more than once"),
             (edited(lambda sd: sd.update(state=[1])), "'state' is not a dict"),
             (edited(lambda sd: sd["param_groups"][0].pop("params")), "no 'params' list"),
             # torch's own run options, which a load takes from the file
             (edited(lambda sd: sd["param_groups"][0].update(foreach="x")),
              "foreach must be None or True or False, got 'x'"),
             (edited(lambda sd: sd["param_groups"][0].update(capturable=1)),
              "capturable must be True or False, got 1")]
    for sd, match in cases:
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(sd)
        _assert_unchanged(opt, ps, snap)
        assert opt.param_groups[0]["alpha"] == 0.99


def test_load_keeps_each_live_groups_run_options_whatever_the_file_holds():
    """fused, nonfinite, state_dtype, stochastic_rounding and seed are how a group runs:
    a load keeps the live group's (per group, not the constructor's), and values the file
    holds for them, valid or not, change nothing. Oracle: the state before the round trip."""
    a, b = torch.nn.Parameter(torch.randn(8192)), torch.nn.Parameter(torch.randn(8192))
    opt = RMSprop([{"params": [a]}, {"params": [b], "state_dtype": None, "nonfinite": "skip",
                                     "seed": 7}], state_dtype="8bit")
    a.grad, b.grad = torch.randn(8192), torch.randn(8192)
    opt.step()
    run = [{k: g[k] for k in ("fused", "nonfinite", "state_dtype", "stochastic_rounding",
                              "seed")} for g in opt.param_groups]
    state = copy.deepcopy({k: v for k, v in opt.state[b].items()})
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert [{k: g[k] for k in r} for g, r in zip(opt.param_groups, run)] == run
    assert opt.state[b]["square_avg"].dtype == torch.float32
    assert all(torch.equal(opt.state[b][k], v) for k, v in state.items())
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0].update(state_dtype="3bit", nonfinite="bogus", fused="yes", seed=-1)
    sd["param_groups"][1].update(state_dtype="4bit", stochastic_rounding=7)
    opt.load_state_dict(sd)
    assert [{k: g[k] for k in r} for g, r in zip(opt.param_groups, run)] == run
    assert opt.state[a]["square_avg"].dtype == torch.uint8
    assert opt.state[a]["square_avg"].numel() == 8192  # 8-bit codes, not 4-bit
    a.grad, b.grad = torch.randn(8192), torch.randn(8192)
    opt.step()


def test_foreign_state_dict_without_our_flags_loads():
    # A torch state dict describes torch's rule: the rule options it lacks take their
    # torch-behaviour defaults (eps_in_sqrt off), how ours runs (nonfinite) stays the live
    # one's; the next step is then torch's own next step.
    p = torch.randn(3, generator=torch.Generator().manual_seed(0))
    q = p.clone()
    torch_opt = torch.optim.RMSprop([p], lr=0.02)
    p.grad = torch.ones(3)
    torch_opt.step()
    sd = torch_opt.state_dict()
    for key in ("eps_in_sqrt", "nonfinite", "state_dtype"):
        assert key not in sd["param_groups"][0]
    q.copy_(p)
    opt = RMSprop([q], nesterov=False, eps_in_sqrt=True, nonfinite="skip", foreach=False)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["eps_in_sqrt"] is False  # the file's rule: torch's
    assert opt.param_groups[0]["nonfinite"] == "skip"  # the live optimizer's machinery
    p.grad = torch.full((3,), 0.5)
    q.grad = p.grad.clone()
    torch_opt.step()
    opt.step()
    assert torch.equal(p, q)


def test_grad_none_skipped_state_untouched_and_closure():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = RMSprop([a, b], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (a - 1).square().sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 2.0
    assert len(opt.state[b]) == 0 and torch.equal(b, torch.zeros(2))
    assert opt.state[a]["step"].item() == 1


def test_tensor_lr_and_schedulers_incl_onecycle_turning_momentum_on():
    p = torch.zeros(3, requires_grad=True)
    opt = RMSprop([p], lr=torch.tensor(0.01))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    assert opt.param_groups[0]["momentum"] > 0  # OneCycleLR wrote it
    for _ in range(5):
        p.grad = torch.ones(3)
        opt.step()  # torch.optim.RMSprop raises KeyError('momentum_buffer') here
        sched.step()
    assert "momentum_buffer" in opt.state[p]
    opt.param_groups[0]["centered"] = True
    p.grad = torch.ones(3)
    opt.step()
    assert "grad_avg" in opt.state[p]


def test_hooks_deepcopy_pickle_keep_options():
    p = torch.zeros(2)
    opt = RMSprop([p], lr=0.3, eps_in_sqrt=True, nonfinite="skip", track_stats=True)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: sd.setdefault("extra", 1) and None)
    p.grad = torch.ones(2)
    opt.step()
    assert calls == ["pre", "post"]
    assert opt.state_dict()["extra"] == 1
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        g = clone.param_groups[0]
        assert g["lr"] == 0.3 and g["eps_in_sqrt"] and g["nonfinite"] == "skip"
        assert clone.track_stats is True


def test_complex_params_match_torch():
    z = torch.randn(4, 2, dtype=torch.complex128, generator=torch.Generator().manual_seed(2))
    ours, theirs = z.clone(), z.clone()
    o = RMSprop([ours], lr=0.05, momentum=0.9, centered=True)
    t = torch.optim.RMSprop([theirs], lr=0.05, momentum=0.9, centered=True)
    for g in _grads([(4, 2)], 30, torch.complex128):
        ours.grad, theirs.grad = g[0].clone(), g[0].clone()
        o.step()
        t.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


def test_sparse_gradients_refused():
    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = RMSprop(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_half_params_float32_state_and_math(dtype, path):
    gen = torch.Generator().manual_seed(9)
    p = torch.randn(64, generator=gen).to(dtype)
    grads = [torch.randn(64, generator=gen).to(dtype) * 300 for _ in range(20)]
    grads[3].zero_()
    opt = RMSprop([p], lr=0.01, momentum=0.9, centered=True, **path)
    ref, st = p.float().numpy(), None
    o = Options(lr=0.01, momentum=0.9, centered=True)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        st = st or spec.init_state(ref, o)
        ref, st = spec.step(ref, g.float().numpy(), st, o)
        ref = torch.from_numpy(ref).to(dtype).float().numpy()  # one rounding per step, as ours
    assert opt.state[p]["square_avg"].dtype == torch.float32
    assert torch.isfinite(p).all()  # torch's fp16 step overflows g^2 here and goes inf/NaN
    np.testing.assert_allclose(p.float().numpy(), ref, rtol=1e-2, atol=1e-3)


def test_float16_zero_gradient_no_nan():
    p = torch.ones(8, dtype=torch.float16)
    opt = RMSprop([p])
    p.grad = torch.zeros(8, dtype=torch.float16)
    opt.step()
    assert torch.equal(p, torch.ones(8, dtype=torch.float16))


def test_differentiable_gradcheck():
    def f(p, g, v):
        p = p.clone()
        p.grad = g
        opt = RMSprop([p], lr=0.1, momentum=0.5, centered=True, differentiable=True)
        opt.state[p]["step"] = torch.tensor(0.0)
        opt.state[p]["square_avg"] = v.clone()
        opt.state[p]["grad_avg"] = torch.zeros_like(v)
        opt.state[p]["momentum_buffer"] = torch.zeros_like(v)
        opt.step()
        return p

    args = tuple(torch.rand(3, dtype=torch.float64, requires_grad=True) + 0.5 for _ in range(3))
    assert torch.autograd.gradcheck(f, args)  # numerical finite differences are the oracle


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_nonfinite_raise_names_param_and_changes_nothing(path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    opt = RMSprop(model.named_parameters(), momentum=0.9, **path)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    params = list(model.parameters())
    model(torch.randn(5, 3)).sum().backward()
    params[2].grad[0, 2] = float("nan")
    snap = _snapshot(opt, params)
    with pytest.raises(NonFiniteGradientError, match="'1.weight'"):
        opt.step()
    _assert_unchanged(opt, params, snap)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_nonfinite_raise_names_unnamed_param_by_group_and_index(path):
    a, b = torch.nn.Linear(3, 4), torch.nn.Linear(4, 1)
    opt = RMSprop([{"params": a.parameters()}, {"params": b.parameters(), "lr": 0.1}], **path)
    b(a(torch.randn(5, 3))).sum().backward()
    opt.step()
    b(a(torch.randn(5, 3))).sum().backward()
    b.bias.grad[0] = float("inf")
    params = [*a.parameters(), *b.parameters()]
    snap = _snapshot(opt, params)
    with pytest.raises(NonFiniteGradientError, match=r"group 1 index 1 \(shape \(1,\)\)"):
        opt.step()
    _assert_unchanged(opt, params, snap)


def test_nonfinite_skip_counts_and_ignore_propagates():
    p = torch.zeros(3)
    opt = RMSprop([p], nonfinite="skip")
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert opt.skipped_steps == 1 and torch.equal(p, torch.zeros(3)) and not opt.state[p]
    q = torch.zeros(3)
    opt2 = RMSprop([q], nonfinite="ignore")
    q.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt2.step()
    assert torch.isnan(q[1]) and q[0] != 0


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_gradscaler_unscales_in_step_and_skips_inf(path):
    # Oracle: torch.optim.RMSprop under the same GradScaler (which unscales before its step).
    torch.manual_seed(0)
    ours, theirs = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    theirs.load_state_dict(ours.state_dict())
    o = RMSprop(ours.parameters(), momentum=0.9, **path)
    t = torch.optim.RMSprop(theirs.parameters(), momentum=0.9)
    so, st = (torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
              for _ in range(2))
    gen = torch.Generator().manual_seed(1)
    for i in range(8):
        x = torch.randn(4, 3, generator=gen) * (1e36 if i == 2 else 1.0)  # step 2 overflows
        for model, opt, scaler in ((ours, o, so), (theirs, t, st)):
            opt.zero_grad()
            scaler.scale(model(x).square().mean()).backward()
            scaler.step(opt)  # ours: grad_scale/found_inf handed to step(); no raise on inf
            scaler.update()
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert so.get_scale() == st.get_scale()
    assert o.state[ours.weight]["step"].item() == t.state[theirs.weight]["step"].item() == 7


def test_stats_first_step_closed_form():
    p = torch.ones(4, dtype=torch.float64)
    opt = RMSprop([p], lr=0.1, alpha=0.75, eps=1e-3, track_stats=True)
    g = torch.tensor([1.0, -2.0, 1e-6, 0.5], dtype=torch.float64)
    p.grad = g.clone()
    opt.step()
    s = opt.stats()["groups"][0]
    d = 0.5 * g.abs() + 1e-3  # sqrt(1-alpha)|g| + eps
    u = 0.1 * g / d
    assert s["grad_rms"] == pytest.approx(g.square().mean().sqrt().item())
    assert s["update_rms"] == pytest.approx(u.square().mean().sqrt().item())
    assert s["step_max"] == pytest.approx((0.1 / d).max().item())
    assert s["step_min"] == pytest.approx((0.1 / d).min().item())
    assert s["eps_dominated_fraction"] == 0.25  # only the 1e-6 gradient
    assert s["skipped_steps"] == 0


def test_fused_true_where_it_cannot_apply():
    with pytest.raises((ValueError, RuntimeError), match="differentiable"):
        RMSprop([torch.zeros(2)], fused=True, differentiable=True)
    with pytest.raises(RuntimeError, match="fused"):
        RMSprop([torch.zeros(2, dtype=torch.float64).to(torch.float8_e4m3fn)], fused=True)


@pytest.mark.skipif(not FUSED, reason="fused CPU kernel unavailable")
def test_fused_plan_follows_moved_params_and_loaded_state():
    # The fused path caches pointer tables; moving a param's storage or loading a state dict
    # must not leave it writing to stale memory. Oracle: the for-loop path.
    grads = _grads([(8, 4), (16,)], 12, torch.float64, seed=11)
    a = [torch.ones(8, 4, dtype=torch.float64), torch.ones(16, dtype=torch.float64)]
    b = [x.clone() for x in a]
    fa = RMSprop(a, momentum=0.9, centered=True, fused=True)
    fb = RMSprop(b, momentum=0.9, centered=True, fused=False)
    for t, gs in enumerate(grads):
        if t == 4:
            a[0].data = a[0].data.clone()  # new storage under the same Parameter
        if t == 8:
            sd = copy.deepcopy(fb.state_dict())
            fa.load_state_dict(copy.deepcopy(sd))
            fb.load_state_dict(sd)
        for p, q, g in zip(a, b, gs):
            p.grad, q.grad = g.clone(), g.clone()
        fa.step()
        fb.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert fa.state[a[0]]["step"].item() == 12 == fb.state[b[0]]["step"].item()


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_stats_every_step_match_numpy_reference(path):
    # Oracle: the same quantities computed from rmsprop.spec's trajectory.
    o = Options(lr=0.05, alpha=0.9, eps=1e-4, momentum=0.5, weight_decay=0.01)
    gen = np.random.default_rng(0)
    shapes = [(6, 5), (7,)]
    params = [torch.from_numpy(gen.standard_normal(s)) for s in shapes]
    ref = [p.numpy().copy() for p in params]
    states = [spec.init_state(r, o) for r in ref]
    opt = RMSprop(params, track_stats=True, **{k: getattr(o, k) for k in
                                               ("lr", "alpha", "eps", "momentum",
                                                "weight_decay")}, **path)
    for _ in range(4):
        grads = [gen.standard_normal(s) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
        old = [r.copy() for r in ref]
        for i in range(2):
            ref[i], states[i] = spec.step(ref[i], grads[i], states[i], o)
        n = sum(r.size for r in ref)
        g_eff = np.concatenate([(g + 0.01 * x).ravel() for g, x in zip(grads, old)])
        u = np.concatenate([(a - b).ravel() for a, b in zip(old, ref)])
        steps = np.concatenate([(0.05 / (np.sqrt(st["square_avg"]) + 1e-4)).ravel()
                                for st in states])
        s = opt.stats()["groups"][0]
        assert s["grad_rms"] == pytest.approx(np.sqrt((g_eff ** 2).sum() / n), rel=1e-9)
        assert s["update_rms"] == pytest.approx(np.sqrt((u ** 2).sum() / n), rel=1e-6)
        assert s["step_min"] == pytest.approx(steps.min(), rel=1e-9)
        assert s["step_max"] == pytest.approx(steps.max(), rel=1e-9)
        assert s["step_median"] == pytest.approx(np.median(steps), rel=0.2)


def test_step_wrapper_behaves_as_torchs_hooks_profiler_label_args():
    """Our ``step`` skips torch's wrapper when it has nothing to do; whenever it does, the
    behaviour is torch's: oracle torch.optim.RMSprop under the same hooks and profiler. Pre-
    and post-hooks (per optimizer and global) run in torch's order with the same arguments, a
    pre-hook's returned ``(args, kwargs)`` replace the step's, and the profiler records the
    ``Optimizer.step#<class>.step`` label once per step."""
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    def run(cls):
        p = torch.zeros(3)
        opt = cls([p], lr=0.1)
        calls = []
        handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append("gpre")),
                   register_optimizer_step_post_hook(lambda o, a, k: calls.append("gpost")),
                   opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", len(a)))),
                   opt.register_step_post_hook(lambda o, a, k: calls.append("post"))]
        p.grad = torch.ones(3)
        opt.step()
        for h in handles:
            h.remove()
        swap = opt.register_step_pre_hook(lambda o, a, k: ((o, lambda: 7.0), {}))
        loss = opt.step()  # the hook's closure replaces the missing one
        swap.remove()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            opt.step()
            opt.step()
        label = f"Optimizer.step#{cls.__name__}.step"
        n_label = sum(e.name == label for e in prof.events())
        bare = opt.step()  # no hook, no profiler: the bare step
        return calls, loss, n_label, bare, p

    ours, theirs = run(RMSprop), run(torch.optim.RMSprop)
    assert ours[:4] == theirs[:4] == (["gpre", ("pre", 1), "post", "gpost"], 7.0, 2, None)
    torch.testing.assert_close(ours[4], theirs[4])


#: Each explicit path and the default choice (fused=None, foreach=None).
WITH_DEFAULT = [*PATHS, {}]
WITH_DEFAULT_IDS = [*PATH_IDS, "default"]


def _two_groups(path, n=(10, 1000), **kw):
    ps = [torch.nn.Parameter(torch.zeros(k)) for k in n]
    opt = RMSprop([{"params": [ps[0]]}, {"params": [ps[1]]}], **{**path, **kw})
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()  # state made, and the fused path's plans cached
    return ps, opt


@pytest.mark.parametrize("path", WITH_DEFAULT, ids=WITH_DEFAULT_IDS)
@pytest.mark.parametrize("state_dtype", [None, "8bit"])
@pytest.mark.parametrize("size", [500, 2000])
def test_a_param_resized_under_its_state_is_refused_and_changes_nothing(path, state_dtype,
                                                                         size):
    """``p.data = <another size>`` leaves state of the old size: torch's arithmetic raises a
    size mismatch. Here a clear error names the param and the state before any group is
    written (the fused kernel read and wrote past the state's end)."""
    ps, opt = _two_groups(path, n=(10, 5000), state_dtype=state_dtype)
    ps[1].data = torch.zeros(size)
    for p in ps:
        p.grad = torch.ones_like(p)
    snap = _snapshot(opt, ps[:1])
    with pytest.raises(RuntimeError, match=r"state 'square_avg' of parameter group 1 index 0 "
                                           rf"\(shape \({size},\)\)"):
        opt.step()
    _assert_unchanged(opt, ps[:1], snap)


@pytest.mark.skipif(not FUSED, reason="fused CPU kernel unavailable")
def test_a_gradient_swapped_under_a_cached_plan_is_checked_as_on_the_first_step():
    """The cached plan re-reads a gradient's pointer each step; one that moved is checked
    for its element count and dtype before the kernel reads it (it read the param's count
    of elements from a one-element buffer)."""
    ps, opt = _two_groups({})
    snap = _snapshot(opt, ps)
    ps[1].grad = torch.ones(1000)
    ps[1].grad.data = torch.ones(1)
    with pytest.raises(RuntimeError, match=r"gradient of parameter group 1 index 0 .* has "
                                           r"shape \(1,\), the parameter \(1000,\)"):
        opt.step()
    _assert_unchanged(opt, ps, snap)


@pytest.mark.parametrize("path", WITH_DEFAULT, ids=WITH_DEFAULT_IDS)
def test_a_gradient_of_another_dtype_steps_as_torchs(path):
    """torch 2.13 lets a param take a gradient of another dtype (``p.grad_dtype = None``);
    torch.optim.RMSprop then computes with it. Every path gives torch's result, to float32
    rounding (the fused kernel read the float64 bytes as float32: off by orders of
    magnitude), before and after a plan was cached."""
    ours, ref = torch.nn.Parameter(torch.ones(64)), torch.nn.Parameter(torch.ones(64))
    opt, topt = RMSprop([ours], lr=0.1, **path), torch.optim.RMSprop([ref], lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for t in range(4):
        g = torch.randn(64, generator=gen)
        if t >= 2:
            g = g.double()
            ours.grad_dtype = ref.grad_dtype = None
        ours.grad, ref.grad = g.clone(), g.clone()
        if t >= 2 and path.get("fused"):
            with pytest.raises(RuntimeError, match="fused=True cannot apply: the gradient of "
                                                   "a torch.float32 parameter is torch.float64"):
                opt.step()
            return
        opt.step()
        topt.step()
        torch.testing.assert_close(ours.detach(), ref.detach())


@pytest.mark.parametrize("path", WITH_DEFAULT, ids=WITH_DEFAULT_IDS)
def test_a_complex_gradient_on_a_real_param_is_refused_and_changes_nothing(path):
    ps, opt = _two_groups(path)
    ps[1].grad_dtype = None
    ps[0].grad = torch.ones(10)
    ps[1].grad = torch.ones(1000, dtype=torch.complex64)
    snap = _snapshot(opt, ps)
    with pytest.raises(RuntimeError, match=r"gradient of parameter group 1 index 0 .* has "
                                           r"dtype torch.complex64, the parameter torch.float32"):
        opt.step()
    _assert_unchanged(opt, ps, snap)


@pytest.mark.parametrize("path", WITH_DEFAULT, ids=WITH_DEFAULT_IDS)
@pytest.mark.parametrize("reset", ["replace", "clear", "delete"])
def test_state_reset_by_hand_restarts_as_torchs(path, reset):
    """``opt.state = defaultdict(dict)``, ``opt.state.clear()`` or ``del opt.state[p]``
    between steps: torch starts the state again; so does every path here (a cached plan
    kept stepping hidden tensors, and state_dict() saved none)."""
    from collections import defaultdict
    ours, ref = torch.nn.Parameter(torch.ones(16)), torch.nn.Parameter(torch.ones(16))
    opt = RMSprop([ours], lr=0.1, momentum=0.9, **path)
    topt = torch.optim.RMSprop([ref], lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for t in range(5):
        if t == 3:
            for o, p in ((opt, ours), (topt, ref)):
                if reset == "replace":
                    o.state = defaultdict(dict)
                elif reset == "clear":
                    o.state.clear()
                else:
                    del o.state[p]
        g = torch.randn(16, generator=gen)
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        topt.step()
        torch.testing.assert_close(ours.detach(), ref.detach())
    assert opt.state[ours]["step"].item() == topt.state[ref]["step"].item() == 2
    torch.testing.assert_close(opt.state_dict()["state"][0]["momentum_buffer"],
                               topt.state_dict()["state"][0]["momentum_buffer"])


@pytest.mark.parametrize("path", WITH_DEFAULT, ids=WITH_DEFAULT_IDS)
@pytest.mark.parametrize("key,value,match", [
    ("state_dtype", "3bit", "Invalid state_dtype"),
    ("state_dtype", torch.int8, "Invalid state_dtype"),
    ("nonfinite", "rasie", "Invalid nonfinite value"),
    ("stochastic_rounding", "yes", "Invalid stochastic_rounding"),
    ("seed", -1, "Invalid seed"),
    ("fused", "maybe", "Invalid fused value"),
])
def test_run_options_edited_between_steps_are_checked_before_anything_changes(path, key,
                                                                             value, match):
    """A group's run options written between steps (as a scheduler writes lr) are checked
    as the constructor checks them, on every path, before any group is written (the cached
    fused plan ignored them; the for-loop path raised after group 0 had stepped)."""
    ps, opt = _two_groups(path)
    opt.param_groups[1][key] = value
    for p in ps:
        p.grad = torch.ones_like(p)
    snap = _snapshot(opt, ps)
    with pytest.raises((ValueError, TypeError), match=match):
        opt.step()
    _assert_unchanged(opt, ps, snap)


@pytest.mark.skipif(not FUSED, reason="fused CPU kernel unavailable")
def test_a_state_dtype_edited_between_steps_takes_effect_on_the_cached_path():
    """The cached plan was built under the old format: it gives way to the general route,
    where existing float32 state carries on (as a load of it would keep it) and new state
    takes the format the group names now."""
    p = torch.nn.Parameter(torch.zeros(8192))
    opt = RMSprop([p])
    p.grad = torch.ones(8192)
    opt.step()
    opt.param_groups[0]["state_dtype"] = "8bit"
    p.grad = torch.full((8192,), 2.0)
    opt.step()  # the existing float32 state carries on
    assert opt.state[p]["square_avg"].dtype == torch.float32
    opt.state.clear()
    p.grad = torch.full((8192,), 2.0)
    opt.step()  # new state: the format the group names now
    assert opt.state[p]["square_avg"].dtype == torch.uint8


def test_add_param_group_checks_what_the_constructor_checks():
    def one():
        return torch.nn.Parameter(torch.zeros(3))
    for kw, exc, match in [({"fused": True, "foreach": True}, RuntimeError, "cannot be `True`"),
                           ({"fused": True, "differentiable": True}, ValueError,
                            "differentiable"),
                           ({"foreach": True, "differentiable": True}, RuntimeError,
                            "mutually exclusive"),
                           ({"fused": True, "stochastic_rounding": True, "params_dtype":
                             torch.bfloat16}, RuntimeError, "stochastic_rounding"),
                           ({"fused": True, "state_dtype": "8bit", "params_dtype":
                             torch.float64}, RuntimeError, "fused=True cannot apply")]:
        dtype = kw.pop("params_dtype", torch.float32)
        with pytest.raises(exc, match=match):
            RMSprop([one().to(dtype)], **kw)
        opt = RMSprop([one()])
        with pytest.raises(exc, match=match):
            opt.add_param_group({"params": [one().to(dtype)], **kw})
        assert len(opt.param_groups) == 1
    with pytest.raises(TypeError, match="param_group must be a dict"):
        RMSprop([one()]).add_param_group([one()])


def test_complex_params_with_bfloat16_state_are_refused_up_front():
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="no complex bfloat16"):
        RMSprop([p], state_dtype=torch.bfloat16)
    opt = RMSprop([torch.nn.Parameter(torch.zeros(4))], state_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="no complex bfloat16"):
        opt.add_param_group({"params": [p]})


@pytest.mark.parametrize("path", WITH_DEFAULT, ids=WITH_DEFAULT_IDS)
def test_a_param_listed_twice_in_a_group_steps_as_torchs(path):
    """torch.optim warns and updates such a param twice per step, counting both; so does
    every path here that may choose (the fused kernel updated it twice but counted one
    step); ``fused=True`` refuses it."""
    ours, ref = torch.nn.Parameter(torch.ones(8)), torch.nn.Parameter(torch.ones(8))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = RMSprop([ours, ours], lr=0.1, **path)
    if path.get("fused"):
        ours.grad = torch.ones(8)
        with pytest.raises(RuntimeError, match="fused=True cannot apply: a parameter is "
                                               "listed twice"):
            opt.step()
        assert not opt.state[ours]
        return
    with pytest.warns(UserWarning, match="duplicate parameters"):  # torch's path of the same
        topt = torch.optim.RMSprop([ref, ref], lr=0.1, foreach=bool(path.get("foreach")))
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        g = torch.randn(8, generator=gen)
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        topt.step()
    torch.testing.assert_close(ours.detach(), ref.detach())
    assert opt.state[ours]["step"].item() == topt.state[ref]["step"].item() == 6


def test_differentiable_refuses_a_tensor_lr_it_cannot_differentiate_through():
    """torch raises a TypeError for it; the lr's meta-gradient was silently None."""
    lr = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    p = w.clone()
    p.grad = torch.randn(5, dtype=torch.float64)
    with pytest.raises(TypeError, match="tensor lr that requires grad"):
        RMSprop([p], lr=lr, differentiable=True)
    opt = RMSprop([p], lr=0.01, differentiable=True)
    opt.param_groups[0]["lr"] = lr
    before = p.detach().clone()
    with pytest.raises(TypeError, match="tensor lr that requires grad"):
        opt.step()
    assert torch.equal(p.detach(), before)
    q = w.clone()
    q.grad = p.grad.clone()
    with pytest.raises(TypeError):
        torch.optim.RMSprop([q], lr=lr, differentiable=True).step()
