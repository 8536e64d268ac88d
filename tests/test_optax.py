"""rmsprop.optax against its two oracles: optax.rmsprop (the options optax has) and the NumPy
reference rmsprop.spec.step (every option), over 100-step trajectories on a noisy quadratic
whose gradient depends on the parameters, plus the optax integration contracts (jit without
retracing, dtype kept, inject_hyperparams, MultiSteps, schedules)."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402  (ships with jax; gives NumPy a bfloat16 for the spec)

from rmsprop import spec  # noqa: E402
from rmsprop.optax import OPTAX_DEFAULTS, rmsprop, scale_by_rmsprop  # noqa: E402
from rmsprop.options import Options  # noqa: E402
from rmsprop.presets import PRESETS, resolve_preset  # noqa: E402

STEPS = 100
SHAPES = {"w": (3, 4), "b": (5,)}


def _problem(dtype, steps=STEPS, seed=0, complex_=False):
    """Initial params, per-leaf curvature h and per-step noise (NumPy, in ``dtype``)."""
    rng = np.random.default_rng(seed)

    def draw(*shape):
        x = rng.standard_normal(shape)
        if complex_:
            x = x + 1j * rng.standard_normal(shape)
        return x.astype(dtype)

    p0 = {k: draw(*s) for k, s in SHAPES.items()}
    h = {k: np.linspace(0.5, 2.0, int(np.prod(s))).reshape(s).astype(np.float32)
         for k, s in SHAPES.items()}
    noise = {k: (0.3 * draw(steps, *s)).astype(dtype) for k, s in SHAPES.items()}
    return p0, h, noise


def _grad_np(p, h, noise_t, sign):
    return (sign * (h * p.astype(np.complex128 if np.iscomplexobj(p) else np.float64))
            + noise_t).astype(p.dtype)


def _grad_jax(p, h, noise_t, sign):
    return (sign * (h * p.astype(jnp.promote_types(p.dtype, jnp.float32)))
            + noise_t).astype(p.dtype)


def run_many(txs, dtype, *, signs=None, steps=STEPS, complex_=False):
    """Trajectories of several optax transformations, all in ONE jitted program (``lax.scan``
    over steps): compiling once instead of per transformation keeps the file fast."""
    signs = signs or [1.0] * len(txs)
    p0, h, noise = _problem(dtype, steps, complex_=complex_)
    params = {k: jnp.asarray(v) for k, v in p0.items()}
    hj = {k: jnp.asarray(v) for k, v in h.items()}

    @jax.jit
    def trajectories(params, noise):
        finals = []
        for tx, sign in zip(txs, signs):
            def body(carry, noise_t, tx=tx, sign=sign):
                p, s = carry
                g = jax.tree.map(lambda p_, h_, n_: _grad_jax(p_, h_, n_, sign), p, hj, noise_t)
                u, s = tx.update(g, s, p)
                return (optax.apply_updates(p, u), s), None
            (p, _), _ = jax.lax.scan(body, (params, tx.init(params)), noise)
            finals.append(p)
        return finals

    out = trajectories(params, {k: jnp.asarray(v) for k, v in noise.items()})
    return [{k: np.asarray(v) for k, v in p.items()} for p in out]



def _expecting(kw, build):
    """``build()``, asserting the warning its options give on purpose: centered with bias
    correction from a zero square average (the first step is lr*g/eps)."""
    init = kw.get("initial_scale", kw.get("initial_square_avg", 0.0))
    if kw.get("centered") and kw.get("bias_correction") and not init:
        with pytest.warns(RuntimeWarning, match="centered=True with bias_correction=True"):
            return build()
    return build()

def run_optax(tx, dtype, **kw):
    return run_many([tx], dtype, **kw)[0]


def run_spec(options, dtype, *, sign=1.0, steps=STEPS, lr_at=None, complex_=False,
             state_dtype=None):
    """The same trajectory with the NumPy reference; ``lr_at(t)`` overrides lr per step."""
    p0, h, noise = _problem(dtype, steps, complex_=complex_)
    out = {}
    for k, p in p0.items():
        state = spec.init_state(p, options, state_dtype=state_dtype)
        for t in range(steps):
            o = options if lr_at is None else Options.quiet(**{**options.as_dict(), "lr": lr_at(t)})
            p, state = spec.step(p, _grad_np(p, h[k], noise[k][t], sign), state, o)
        out[k] = p
    return out


def assert_close(a, b, rtol, atol):
    for k in a:
        assert a[k].dtype == b[k].dtype, (k, a[k].dtype, b[k].dtype)
        np.testing.assert_allclose(np.asarray(a[k], np.complex128 if np.iscomplexobj(a[k])
                                              else np.float64),
                                   np.asarray(b[k], np.complex128 if np.iscomplexobj(b[k])
                                              else np.float64),
                                   rtol=rtol, atol=atol, err_msg=k)


def _moved(p, dtype):
    """Guard against a vacuous comparison: the trajectory really left its start."""
    p0, _, _ = _problem(dtype)
    assert max(float(np.max(np.abs(p[k].astype(np.float64) - p0[k].astype(np.float64))))
               for k in p) > 0.05


# ----------------------------------------------------------------- against optax.rmsprop

OPTAX_TABLE = [
    # decay, eps, eps_in_sqrt, initial_scale, centered, momentum, nesterov, bias_correction
    (0.9, 1e-8, True, 0.0, False, None, False, False),  # optax's defaults
    (0.99, 1e-8, False, 0.0, False, None, False, False),  # PyTorch's denominator
    (0.9, 1e-3, True, 1.0, False, 0.9, False, False),  # TF1-like
    (0.9, 1e-6, True, 0.0, False, 0.9, True, False),
    (0.95, 1e-4, True, 0.0, True, 0.9, False, False),  # Graves 2013
    # centered + bias correction: at t=1, v/c - (m/c)^2 = g^2 - g^2 is a rounding residue
    # (the rule, not an implementation, is degenerate there); eps inside the sqrt and not tiny
    # keeps the comparison about the implementations
    (0.9, 1e-2, True, 0.0, True, 0.5, True, True),
    (0.9, 1e-8, True, 0.0, False, None, False, True),
    (0.8, 1e-8, False, 1.0, False, 0.9, False, True),
    (0.8, 1e-2, True, 1.0, True, None, False, True),
]


def _optax_kw(row):
    decay, eps, eps_in_sqrt, init, centered, momentum, nesterov, bc = row
    return dict(decay=decay, eps=eps, eps_in_sqrt=eps_in_sqrt, initial_scale=init,
                centered=centered, momentum=momentum, nesterov=nesterov, bias_correction=bc)


def _row_id(row):
    return "-".join(map(str, row))


F64_ROWS = [OPTAX_TABLE[0], OPTAX_TABLE[3], OPTAX_TABLE[5]]
_SCHEDULE = optax.exponential_decay(0.05, transition_steps=10, decay_rate=0.7)
_BLOCK_KW = dict(decay=0.9, eps=1e-8, eps_in_sqrt=False, initial_scale=0.5, bias_correction=True)


def _peer_pairs():
    """case id -> (ours, optax's) transformation, float32."""
    pairs = {_row_id(r): (_expecting(_optax_kw(r), lambda r=r: rmsprop(0.01, **_optax_kw(r))),
                           optax.rmsprop(0.01, **_optax_kw(r)))
             for r in OPTAX_TABLE}
    # a schedule is evaluated at count = t - 1; with lr_in_momentum (the default) the buffer
    # holds lr-scaled steps as optax's trace does
    pairs["schedule"] = (rmsprop(_SCHEDULE, momentum=0.9), optax.rmsprop(_SCHEDULE, momentum=0.9))
    for centered, peer in ((False, optax.scale_by_rms), (True, optax.scale_by_stddev)):
        pairs[f"block-centered={centered}"] = (
            optax.chain(scale_by_rmsprop(centered=centered, **_BLOCK_KW),
                        optax.scale_by_learning_rate(0.02)),
            optax.chain(peer(**_BLOCK_KW), optax.scale_by_learning_rate(0.02)))
    return pairs


@pytest.fixture(scope="module")
def peer_f32():
    pairs = _peer_pairs()
    finals = run_many([t for pair in pairs.values() for t in pair], np.float32)
    return {k: (finals[2 * i], finals[2 * i + 1]) for i, k in enumerate(pairs)}


@pytest.fixture(scope="module")
def peer_f64():
    with jax.enable_x64(True):
        finals = run_many([t for r in F64_ROWS for t in (_expecting(
                                _optax_kw(r), lambda r=r: rmsprop(0.01, **_optax_kw(r))),
                                                         optax.rmsprop(0.01, **_optax_kw(r)))],
                          np.float64)
    return {_row_id(r): (finals[2 * i], finals[2 * i + 1]) for i, r in enumerate(F64_ROWS)}


@pytest.mark.slow  # the fixture compiles all cases at once: ~5 s on 2 cores
@pytest.mark.peer
@pytest.mark.parametrize("case", list(_peer_pairs()))
def test_matches_optax_float32(peer_f32, case):
    ours, theirs = peer_f32[case]
    _moved(ours, np.float32)
    assert_close(ours, theirs, rtol=2e-5, atol=2e-6)


@pytest.mark.slow
@pytest.mark.peer
@pytest.mark.parametrize("case", [_row_id(r) for r in F64_ROWS])
def test_matches_optax_float64(peer_f64, case):
    ours, theirs = peer_f64[case]
    assert ours["w"].dtype == np.float64
    assert_close(ours, theirs, rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------- against the NumPy spec

def _pairwise(factors: dict, allowed=lambda row: True) -> list[dict]:
    """A small table in which every pair of values of every two factors occurs (greedy
    all-pairs covering over the ``allowed`` rows, deterministic)."""
    names = list(factors)
    uncovered = {(a, va, b, vb) for a, b in itertools.combinations(names, 2)
                 for va in factors[a] for vb in factors[b]}
    rows = []
    candidates = [c for c in itertools.product(*factors.values())
                  if allowed(dict(zip(names, c)))]
    while uncovered:
        def gain(values, uncovered=uncovered):
            row = dict(zip(names, values))
            return sum((a, row[a], b, row[b]) in uncovered
                       for a, b in itertools.combinations(names, 2))
        best = dict(zip(names, max(candidates, key=gain)))
        uncovered -= {(a, best[a], b, best[b]) for a, b in itertools.combinations(names, 2)}
        rows.append(best)
    return rows


SPEC_FACTORS = {
    "centered": [False, True],
    "eps_in_sqrt": [False, True],
    "momentum": ["none", "heavy", "nesterov"],
    "lr_in_momentum": [False, True],
    "bias_correction": [False, True],
    "weight_decay": ["none", "coupled", "decoupled"],
    "maximize": [False, True],
    "initial_scale": [0.0, 1.0],
    "schedule": [False, True],
}
# centered + bias correction makes t=1 degenerate (s = g^2 - g^2, a rounding residue): only
# with eps inside the sqrt is that step well-conditioned enough to compare implementations
SPEC_TABLE = _pairwise(SPEC_FACTORS, lambda r: not (r["centered"] and r["bias_correction"])
                       or r["eps_in_sqrt"])


def _lr_at(t):  # a schedule as a plain function of the step count (t = 0 at the first step)
    return 0.02 * 0.97 ** t


def _both(row):
    """(our transformation, the spec Options, lr_at) for one table row."""
    opts = dict(alpha=0.9, eps=1e-3 if row["centered"] and row["bias_correction"] else 1e-6,
                centered=row["centered"], eps_in_sqrt=row["eps_in_sqrt"],
                momentum=0.0 if row["momentum"] == "none" else 0.8,
                nesterov=row["momentum"] == "nesterov", lr_in_momentum=row["lr_in_momentum"],
                bias_correction=row["bias_correction"],
                weight_decay=0.0 if row["weight_decay"] == "none" else 0.1,
                decoupled_weight_decay=row["weight_decay"] == "decoupled",
                maximize=row["maximize"], initial_square_avg=row["initial_scale"], lr=0.02)
    lr = (lambda count: 0.02 * 0.97 ** count) if row["schedule"] else 0.02
    tx = _expecting(opts, lambda: rmsprop(
        lr, decay=opts["alpha"], eps=opts["eps"], eps_in_sqrt=opts["eps_in_sqrt"],
        initial_scale=opts["initial_square_avg"], centered=opts["centered"],
        momentum=opts["momentum"], nesterov=opts["nesterov"],
        bias_correction=opts["bias_correction"], lr_in_momentum=opts["lr_in_momentum"],
        weight_decay=opts["weight_decay"], decoupled_weight_decay=opts["decoupled_weight_decay"],
        maximize=opts["maximize"]))
    return tx, _expecting(opts, lambda: Options(**opts)), (_lr_at if row["schedule"] else None)


def test_spec_table_covers_every_pair():
    assert len(SPEC_TABLE) <= 14
    for a, b in itertools.combinations(SPEC_FACTORS, 2):
        seen = {(r[a], r[b]) for r in SPEC_TABLE}
        assert seen == set(itertools.product(SPEC_FACTORS[a], SPEC_FACTORS[b])), (a, b)


_ABBREV = {"centered": "cent", "eps_in_sqrt": "sqrt", "lr_in_momentum": "lrmom",
           "bias_correction": "bc", "maximize": "max", "initial_scale": "v0",
           "schedule": "sched", "momentum": "mom", "weight_decay": "wd"}


def _short_id(row):
    return "-".join(f"{_ABBREV[k]}:{int(v) if isinstance(v, (bool, float)) else v}"
                    for k, v in row.items())


def _preset_case(name):
    """(our transformation from the preset, the spec Options it must equal)."""
    lr = 0.01 if PRESETS[name].lr_required else None
    merged = resolve_preset(name, {"lr": lr} if lr else {})
    eps = {"eps": 1e-8} if merged["eps"] == 0 else {}  # hinton2012: eps=0 gives 0/0 at g=0
    return rmsprop(lr, preset=name, **eps), Options(**{**merged, **eps})


def _spec_cases():
    """case id -> (our transformation, spec Options, lr_at, gradient sign)."""
    cases = {}
    for row in SPEC_TABLE:
        tx, opts, lr_at = _both(row)
        # maximize runs on a concave objective so that ascent stays bounded
        cases[_short_id(row)] = (
            tx, opts, lr_at, -1.0 if row["maximize"] else 1.0)
    for name in PRESETS:
        cases[f"preset={name}"] = (*_preset_case(name), None, 1.0)
    # an explicit argument beats the preset's value
    cases["preset=pytorch,decay=0.5,momentum=0.3"] = (
        rmsprop(preset="pytorch", decay=0.5, momentum=0.3),
        Options(**resolve_preset("pytorch", {"alpha": 0.5, "momentum": 0.3})), None, 1.0)
    return cases


@pytest.fixture(scope="module")
def spec_f32():
    cases = _spec_cases()
    finals = run_many([c[0] for c in cases.values()], np.float32,
                      signs=[c[3] for c in cases.values()])
    return {k: (f, cases[k]) for k, f in zip(cases, finals)}


@pytest.mark.slow  # the fixture compiles all cases at once: ~5 s on 2 cores
@pytest.mark.parametrize("case", list(_spec_cases()))
def test_matches_spec(spec_f32, case):
    ours, (_, opts, lr_at, sign) = spec_f32[case]
    ref = run_spec(opts, np.float32, sign=sign, lr_at=lr_at)
    _moved(ours, np.float32)
    assert_close(ours, ref, rtol=1e-4, atol=2e-5)


def test_matches_spec_float64():
    row = dict(SPEC_TABLE[0], centered=True, eps_in_sqrt=True, momentum="nesterov",
               bias_correction=True, weight_decay="decoupled", schedule=True)
    tx, opts, lr_at = _both(row)
    with jax.enable_x64(True):
        ours = run_optax(tx, np.float64)
    ref = run_spec(opts, np.float64, lr_at=lr_at)
    _moved(ours, np.float64)
    assert_close(ours, ref, rtol=1e-11, atol=1e-12)


def test_complex_params_are_pairs_of_reals():
    row = dict(SPEC_TABLE[0], centered=True, bias_correction=False, momentum="heavy",
               weight_decay="coupled", maximize=False, schedule=False)
    tx, opts, _ = _both(row)
    ours = run_optax(tx, np.complex64, complex_=True)
    ref = run_spec(opts, np.complex64, complex_=True)
    assert_close(ours, ref, rtol=1e-4, atol=2e-5)


def test_defaults_are_the_optax_preset():
    merged = resolve_preset("optax", {"lr": 0.1})
    assert OPTAX_DEFAULTS["decay"] == merged["alpha"]
    assert OPTAX_DEFAULTS["initial_scale"] == merged["initial_square_avg"]
    for k in ("eps", "eps_in_sqrt", "centered", "momentum", "nesterov", "bias_correction",
              "lr_in_momentum", "decoupled_weight_decay"):
        assert OPTAX_DEFAULTS[k] == merged[k], k


# ----------------------------------------------------------------- optax contracts

def test_jit_does_not_retrace_on_the_second_update():
    traces = []
    with pytest.warns(RuntimeWarning, match="centered=True with bias_correction=True"):
        tx = rmsprop(optax.linear_schedule(0.1, 0.01, 50), momentum=0.9, centered=True,
                     bias_correction=True, weight_decay=0.01)
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3, jnp.bfloat16)}

    @jax.jit
    def step(params, state, grads):
        traces.append(1)
        u, state = tx.update(grads, state, params)
        return optax.apply_updates(params, u), state

    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    for _ in range(3):
        params, state = step(params, state, grads)
    assert len(traces) == 1
    assert int(state.count) == 3


def test_bfloat16_params_keep_their_dtype_and_follow_the_spec():
    tx = rmsprop(0.01, momentum=0.9, centered=True)
    bf16 = ml_dtypes.bfloat16
    params = {"w": jnp.ones((8,), jnp.bfloat16)}
    state = tx.init(params)
    assert state.nu["w"].dtype == jnp.bfloat16 and state.trace["w"].dtype == jnp.bfloat16
    rng = np.random.default_rng(1)
    p_ref = np.ones(8, bf16)
    s_ref = spec.init_state(p_ref, Options(lr=0.01, alpha=0.9, eps=1e-8, momentum=0.9,
                                           centered=True, eps_in_sqrt=True,
                                           lr_in_momentum=True))
    o = Options(lr=0.01, alpha=0.9, eps=1e-8, momentum=0.9, centered=True, eps_in_sqrt=True,
                lr_in_momentum=True)
    update = jax.jit(tx.update)
    for _ in range(20):
        g = rng.standard_normal(8).astype(bf16)
        u, state = update({"w": jnp.asarray(g)}, state, params)
        assert u["w"].dtype == jnp.bfloat16
        params = optax.apply_updates(params, u)
        p_ref, s_ref = spec.step(p_ref, g, s_ref, o)
    assert params["w"].dtype == jnp.bfloat16 and state.nu["w"].dtype == jnp.bfloat16
    # bf16 has 8 significant bits; optax rounds the update and then p + u (two roundings)
    # where the spec rounds once, so allow a few bf16 ulps around |p| ~ 1
    np.testing.assert_allclose(np.asarray(params["w"], np.float32), p_ref.astype(np.float32),
                               atol=3e-2)
    assert float(np.max(np.abs(p_ref.astype(np.float32) - 1))) > 0.1


def test_state_dtype_float32_for_bfloat16_params():
    tx = rmsprop(0.01, momentum=0.9, state_dtype=jnp.float32)
    params = {"w": jnp.ones((3,), jnp.bfloat16)}
    state = tx.init(params)
    u, state = tx.update({"w": jnp.ones((3,), jnp.bfloat16)}, state, params)
    assert state.nu["w"].dtype == jnp.float32 and state.trace["w"].dtype == jnp.float32
    assert u["w"].dtype == jnp.bfloat16
    # first step, eps inside the sqrt: v = 0.1, u = lr * 1/sqrt(0.1 + 1e-8)
    assert float(state.nu["w"][0]) == pytest.approx(0.1, rel=1e-6)


def test_inject_hyperparams_runs_jitted_and_changes_take_effect():
    """Trajectory with the lr changed mid-run through the injected state equals the spec with
    the same per-step lr (lr_in_momentum=True, so the buffer keeps lr-scaled steps)."""
    tx = optax.inject_hyperparams(rmsprop)(learning_rate=0.02, momentum=0.8, decay=0.9,
                                           weight_decay=0.05)
    p0, h, noise = _problem(np.float32)
    params = {k: jnp.asarray(v) for k, v in p0.items()}
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(params, state, noise_t):
        traces.append(1)
        g = jax.tree.map(lambda p_, h_, n_: _grad_jax(p_, h_, n_, 1.0), params,
                         {k: jnp.asarray(v) for k, v in h.items()}, noise_t)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    for t in range(STEPS):
        if t == 50:
            state.hyperparams["learning_rate"] = jnp.asarray(0.005, jnp.float32)
        params, state = step(params, state, {k: jnp.asarray(v[t]) for k, v in noise.items()})
    assert len(traces) == 1
    opts = Options(lr=0.02, alpha=0.9, eps=1e-8, momentum=0.8, eps_in_sqrt=True,
                   lr_in_momentum=True, weight_decay=0.05)
    ref = run_spec(opts, np.float32, lr_at=lambda t: 0.02 if t < 50 else 0.005)
    assert_close({k: np.asarray(v) for k, v in params.items()}, ref, rtol=1e-4, atol=2e-5)


def test_inject_hyperparams_momentum_can_be_switched_on_later():
    """An injected momentum starts at 0 (so the buffer must exist anyway): switching it on
    mid-run must take effect, as in the spec with momentum changed at that step."""
    tx = optax.inject_hyperparams(rmsprop)(learning_rate=0.02, momentum=0.0)
    params = {"w": jnp.asarray(np.linspace(-1, 1, 6), jnp.float32)}
    state = tx.init(params)
    p_ref = np.linspace(-1, 1, 6).astype(np.float32)
    base = dict(lr=0.02, alpha=0.9, eps=1e-8, eps_in_sqrt=True, lr_in_momentum=True)
    s_ref = spec.init_state(p_ref, Options(**base, momentum=0.5))
    for t in range(10):
        if t == 5:
            state.hyperparams["momentum"] = jnp.asarray(0.5, jnp.float32)
        g = 2 * np.asarray(params["w"])
        u, state = tx.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, u)
        p_ref, s_ref = spec.step(p_ref, 2 * p_ref, s_ref, Options(**base,
                                                                  momentum=0.5 * (t >= 5)))
    np.testing.assert_allclose(np.asarray(params["w"]), p_ref, rtol=1e-5, atol=1e-6)


def test_multisteps_accumulates_then_applies_one_step():
    """MultiSteps(every_k=2) over micro-batches g1, g2 takes one rule step on (g1 + g2) / 2."""
    tx = optax.MultiSteps(rmsprop(0.05, momentum=0.9, centered=True), every_k_schedule=2)
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.standard_normal(7), jnp.float32)}
    p_ref = np.asarray(params["w"])
    o = Options(lr=0.05, alpha=0.9, eps=1e-8, momentum=0.9, centered=True, eps_in_sqrt=True,
                lr_in_momentum=True)
    s_ref = spec.init_state(p_ref, o)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(6):
        g1, g2 = (rng.standard_normal(7).astype(np.float32) for _ in range(2))
        u, state = update({"w": jnp.asarray(g1)}, state, params)
        params = optax.apply_updates(params, u)
        assert float(jnp.max(jnp.abs(u["w"]))) == 0.0  # accumulating: no step yet
        u, state = update({"w": jnp.asarray(g2)}, state, params)
        params = optax.apply_updates(params, u)
        p_ref, s_ref = spec.step(p_ref, (g1 + g2) / np.float32(2), s_ref, o)
    np.testing.assert_allclose(np.asarray(params["w"]), p_ref, rtol=1e-5, atol=1e-6)


def test_composes_with_chain_and_masked_params():
    """Inside optax.chain after clipping, on a tree with a frozen (masked) leaf."""
    tx = optax.chain(optax.clip_by_global_norm(0.5),
                     optax.masked(rmsprop(0.1, momentum=0.5), {"a": True, "b": False}))
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    state = tx.init(params)
    g = {"a": jnp.asarray([3.0, 0.0, 4.0]), "b": jnp.ones(2)}
    u, state = tx.update(g, state, params)
    # clipped: g * 0.5/5 = [0.3, 0, 0.4]; first step with v0=0: g/sqrt(0.1 g^2 + eps)
    expected = -0.1 * np.array([0.3, 0.0, 0.4]) / np.sqrt(0.1 * np.array([0.09, 0, 0.16]) + 1e-8)
    np.testing.assert_allclose(np.asarray(u["a"]), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(u["b"]), np.asarray(g["b"]) * 0.5 / np.sqrt(27))


# ----------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, message", [
    (dict(learning_rate=-1.0), "Invalid learning rate: -1.0"),
    (dict(learning_rate=0.1, decay=1.5), "Invalid decay value: 1.5"),
    (dict(learning_rate=0.1, initial_scale=-1.0), "Invalid initial_scale value"),
    (dict(learning_rate=0.1, momentum=1.0), "Invalid momentum value"),
    (dict(learning_rate=0.1, nesterov=True), "Nesterov momentum requires a momentum > 0"),
    (dict(learning_rate=0.1, eps=float("nan")), "Invalid epsilon value: nan"),
    (dict(learning_rate=0.1, centered="yes"), "Invalid centered value: 'yes'"),
    (dict(learning_rate=0.1, preset="adam"), "Unknown preset 'adam'"),
    (dict(preset="optax"), "Preset 'optax' has no default learning rate"),
    (dict(), "needs a learning_rate"),
])
def test_bad_options_raise_naming_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        rmsprop(**kwargs)


def test_building_block_validates():
    with pytest.raises(ValueError, match="Invalid decay value: -0.1"):
        scale_by_rmsprop(decay=-0.1)


def test_weight_decay_without_params_is_an_error():
    tx = rmsprop(0.1, weight_decay=0.01)
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="needs the params"):
        tx.update(params, tx.init(params))


def test_updates_and_state_that_do_not_fit_are_refused_naming_the_leaf():
    """Shapes and dtypes are static, so the checks hold under jit; broadcasting would
    otherwise give the update (and the state) another shape without a word."""
    p = {"w": jnp.ones(3)}
    tx = rmsprop(0.1)
    st = tx.init(p)
    jax.jit(tx.update)({"w": jnp.ones(3)}, st, p)  # the control
    cases = [
        (lambda: tx.update({"w": jnp.ones((4, 3))}, st, p), ValueError,
         "update leaf 0: gradient \\(4, 3\\) float32 does not fit param \\(3,\\)"),
        (lambda: tx.update({"w": jnp.ones((1,))}, st), ValueError,
         "nu \\(3,\\) float32 is not the state of a \\(1,\\) parameter"),
        (lambda: jax.jit(tx.update)({"w": jnp.ones((1,))}, st), ValueError,
         "is not the state of a"),
        (lambda: tx.update({"w": jnp.ones(3, jnp.int32)}, st, p), TypeError,
         "gradients must be floating point or complex, got int32"),
        (lambda: rmsprop(0.1, centered=True).update({"w": jnp.ones(3)}, st, p), ValueError,
         "grad average missing"),
        (lambda: scale_by_rmsprop(centered=True).update({"w": jnp.ones(3)},
                                                        scale_by_rmsprop().init(p)),
         ValueError, "grad average missing"),
    ]
    for fmt_a, fmt_b in (("8bit", "8bit"), ("4bit", "8bit")):
        big = {"w": jnp.ones(8192)}
        sq = rmsprop(0.1, state_dtype=fmt_a).init(big)
        cases.append((lambda sq=sq, fmt_b=fmt_b: rmsprop(0.1, state_dtype=fmt_b).update(
            {"w": jnp.ones(4096)}, sq, {"w": jnp.ones(4096)}), ValueError,
            "is not the state of 4096 elements"))
    sq4 = rmsprop(0.1, state_dtype="4bit").init({"w": jnp.ones(8192)})
    cases.append((lambda: rmsprop(0.1, state_dtype="8bit").update(
        {"w": jnp.ones(8192)}, sq4, {"w": jnp.ones(8192)}), ValueError,
        "holds 4bit codes, this transformation uses state_dtype='8bit'"))
    for f, error, match in cases:
        with pytest.raises(error, match=match):
            f()
    for make in (lambda: rmsprop(0.1, state_dtype=jnp.int8),
                 lambda: scale_by_rmsprop(state_dtype=jnp.int32)):
        with pytest.raises(ValueError, match="a floating or complex dtype"):
            make()


def test_jax_is_optional_and_optax_module_has_no_torch():
    code = ("import sys, rmsprop, rmsprop.spec, rmsprop.options, rmsprop.presets, rmsprop.numpy;"
            "assert 'jax' not in sys.modules, 'rmsprop imports jax';"
            "import rmsprop.optax;"
            "assert 'torch' not in sys.modules, 'rmsprop.optax imports torch'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- quantized state (8-bit, 4-bit): the codes of rmsprop.codecs --------------------------------

from rmsprop import codecs  # noqa: E402

_Q_GRID = [dict(), dict(centered=True), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
           dict(weight_decay=0.1), dict(centered=True, momentum=0.9, bias_correction=True,
                                        initial_scale=0.1)]


@pytest.mark.parametrize("fmt", ["8bit", "4bit"])
@pytest.mark.parametrize("kw", _Q_GRID, ids=lambda kw: ",".join(kw) or "default")
def test_quantized_state_has_the_spec_codes(fmt, kw):
    # Same gradients into optax and the spec; each step starts from the spec's params (XLA's
    # float32 arithmetic may round an intermediate differently, as the float tests allow), so
    # every stored code equals the spec's except where a value lies within an ulp of a
    # rounding boundary: at most one code apart, on at most 0.1 % of the elements.
    o = Options(**{_TO.get(k, k): v for k, v in dict(lr=1e-2, **kw).items()})
    tx = rmsprop(preset="pytorch", learning_rate=1e-2, state_dtype=fmt, **kw)
    rng = np.random.default_rng(0)
    p0 = {"w": rng.standard_normal((32, 256)).astype(np.float32),
          "b": rng.standard_normal(7).astype(np.float32)}  # small: full precision
    state = tx.init(jax.tree.map(jnp.asarray, p0))
    ref = {k: spec.init_state(v, o, state_dtype=fmt) for k, v in p0.items()}
    params = dict(p0)
    names = {"nu": "square_avg", "mu": "grad_avg", "trace": "momentum_buffer"}
    for _ in range(5):
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in p0.items()}
        upd, state = tx.update(jax.tree.map(jnp.asarray, grads), state,
                               jax.tree.map(jnp.asarray, params))
        new = {}
        for k in params:
            new[k], ref[k] = spec.step(params[k], grads[k], ref[k], o)
            np.testing.assert_allclose(params[k] + np.asarray(upd[k]), new[k], rtol=1e-5,
                                       atol=1e-6)
        params = new
        for field, key in names.items():
            tree = getattr(state, field)
            if tree is None:
                continue
            leaf, want = tree["w"], ref["w"][key]
            assert isinstance(want, codecs.Quantized)
            f = codecs.FORMATS[want.fmt]
            a, b = (np.asarray(c).astype(np.int16) for c in (leaf.codes, want.codes))
            if f.bits == 4:
                a, b = (np.stack([c & 15, c >> 4], 1).reshape(-1) for c in (a, b))
            if f.signed:  # two's complement: compare the signed code values
                a, b = (np.where(c >= 1 << (f.bits - 1), c - (1 << f.bits), c) for c in (a, b))
            diff = np.abs(a - b)
            assert np.mean(diff != 0) <= 1e-3 and diff.max() <= 1, (field, np.mean(diff != 0))
            np.testing.assert_allclose(np.asarray(leaf.scales), want.scales, rtol=1e-5)
            np.testing.assert_allclose(np.asarray(tree["b"]), ref["b"][key], rtol=1e-5,
                                       atol=1e-6)


_TO = {"decay": "alpha", "initial_scale": "initial_square_avg", "learning_rate": "lr"}


def test_quantized_state_jits_and_counts_its_bytes():
    tx = rmsprop(1e-2, momentum=0.9, state_dtype="8bit")
    params = {"w": jnp.zeros((128, 256)), "b": jnp.zeros(256)}
    state = tx.init(params)
    step = jax.jit(tx.update)
    upd, state = step(jax.tree.map(jnp.ones_like, params), state, params)
    leaves = jax.tree.leaves(state.nu) + jax.tree.leaves(state.trace)
    nbytes = sum(x.size * x.dtype.itemsize for x in leaves)
    n = 128 * 256
    assert nbytes == 2 * (n + 4 * n // 256) + 2 * 4 * 256  # codes + scales; "b" in float32
    with pytest.raises(ValueError, match="state_dtype"):
        rmsprop(1e-2, state_dtype="3bit").init(params)
