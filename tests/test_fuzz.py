"""Property-based tests (hypothesis) of rmsprop.torch.RMSprop against the NumPy reference.

Over the option space, the three paths (for-loop, foreach, fused), dtypes (float32, float64,
complex64, float16/bfloat16 with float32 or explicit state), shapes (0-d, empty, non-contiguous
views) and gradient values (zeros, subnormals, huge, inf, NaN):

* with finite gradients every path matches :func:`rmsprop.spec.step` step by step (both
  continue from the optimizer's state), within a tolerance derived from the dtype's resolution,
  the size of the values involved and, for the centered variant, the conditioning of
  ``v - m^2``; non-finite results (``eps=0`` with a zero gradient) appear at the same elements;
* with a non-finite gradient, ``nonfinite="raise"`` raises ``NonFiniteGradientError`` naming the
  first offending parameter, ``"skip"`` skips and counts; both leave every parameter and state
  tensor bit-identical (step counts included); ``"ignore"`` runs without raising;
* invalid options are refused with a ``ValueError`` naming the option.

The default profile ("ci": 150 + 75 + 40 derandomized examples) is lean for CI;
``HYPOTHESIS_PROFILE=thorough`` runs 2500 + 1250 + 40 random ones.
"""

from __future__ import annotations

import os
import warnings
from math import sqrt as math_sqrt

import numpy as np
import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import PATHS  # noqa: E402
from rmsprop import spec  # noqa: E402
from rmsprop.options import RULE_OPTIONS, Options  # noqa: E402
from rmsprop.torch import NonFiniteGradientError, RMSprop  # noqa: E402

settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=2500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")

try:
    import ml_dtypes  # numpy bfloat16 (comes with jax)

    _NP_BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    _NP_BF16 = None

_DTYPES = [torch.float32, torch.float64, torch.complex64, torch.float16]
if _NP_BF16 is not None:
    _DTYPES.append(torch.bfloat16)

# resolution of the arithmetic (the spec computes in float64 for float64, else float32) and of
# the stored param
_MATH_RTOL = {torch.float64: 1e-12, torch.float32: 4e-7}
_ULP = {torch.float64: 2.0 ** -52, torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10,
        torch.bfloat16: 2.0 ** -7}
_TINY = {torch.float64: 5e-324, torch.float32: 1.4e-45, torch.float16: 6e-8,
         torch.bfloat16: 9.2e-41}


_PATHS = PATHS  # the shared table (tests/conftest.py): the paths that run here


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(_NP_BF16)
    return t.numpy().copy()


def _from_numpy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def _real64(a) -> np.ndarray:
    """float64 view of a param/state (complex as interleaved pairs, as the rule treats it)."""
    if isinstance(a, torch.Tensor):
        a = _to_numpy(a)
    a = np.asarray(a)
    if np.iscomplexobj(a):
        a = np.ascontiguousarray(a).view(a.real.dtype)
    return a.astype(np.float64)


# ------------------------------------------------------------------------------------------
# strategies


@st.composite
def options(draw) -> dict:
    centered = draw(st.booleans())
    bias_correction = draw(st.booleans())
    alphas = [0.5, 0.9, 0.99] + ([] if centered else [0.0]) + ([] if bias_correction else [1.0])
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
    # eps=0 with centered divides by sqrt(v - m^2), which is exactly 0 in exact arithmetic at
    # the first bias-corrected step (one sample has no variance) and for constant gradients;
    # the computed value is then rounding noise (0 in the spec, an FMA residual elsewhere).
    epss = [1e-8, 1e-3, 0.1] + ([] if centered else [0.0])
    return dict(
        lr=draw(st.sampled_from([0.0, 1e-3, 1e-2, 0.3])),
        alpha=draw(st.sampled_from(alphas)),
        eps=draw(st.sampled_from(epss)),
        weight_decay=draw(st.sampled_from([0.0, 1e-2, 0.5])),
        momentum=momentum,
        centered=centered,
        maximize=draw(st.booleans()),
        eps_in_sqrt=draw(st.booleans()),
        initial_square_avg=draw(st.sampled_from([0.0, 1.0])),
        lr_in_momentum=draw(st.booleans()),
        nesterov=momentum > 0 and draw(st.booleans()),
        bias_correction=bias_correction,
        decoupled_weight_decay=draw(st.booleans()),
    )


_SHAPES = [(), (0,), (1,), (5,), (3, 4), (2, 0, 3), (4, 1, 2), (37,), (3, 21)]  # 37, 63: past
# the kernels' 8- and 16-wide vector loops, with tails
_LAYOUTS = ["contiguous", "transposed", "strided"]


@st.composite
def params_spec(draw) -> list[dict]:
    """1-3 parameters: dtype, shape, memory layout, state_dtype."""
    out = []
    mixed = draw(st.booleans())
    base = draw(st.sampled_from(_DTYPES))
    for _ in range(draw(st.integers(1, 3))):
        dtype = draw(st.sampled_from(_DTYPES)) if mixed else base
        out.append(dict(dtype=dtype, shape=draw(st.sampled_from(_SHAPES)),
                        layout=draw(st.sampled_from(_LAYOUTS))))
    return out


_GRAD_KINDS = ["normal", "small", "large", "zeros", "subnormal", "huge", "mixed"]


def _make_param(ps: dict, rng: np.random.Generator) -> torch.nn.Parameter:
    shape, dtype, layout = ps["shape"], ps["dtype"], ps["layout"]
    if layout == "transposed" and len(shape) >= 2:
        storage, view = shape[::-1], lambda t: t.transpose(0, -1)
    elif layout == "strided" and len(shape) >= 1:
        storage, view = (shape[0] * 2,) + tuple(shape[1:]), lambda t: t[::2]
    else:
        storage, view = shape, lambda t: t
    full = torch.from_numpy(rng.standard_normal(storage)).to(_real_dtype(dtype))
    if dtype.is_complex:
        full = torch.complex(full, 0.5 - full)
    # A Parameter made from a view keeps the view's strides: the non-contiguous case.
    return torch.nn.Parameter(view(full))


def _grad_values(kind: str, shape, dtype: torch.dtype, rng: np.random.Generator) -> torch.Tensor:
    real = _real_dtype(dtype)
    tiny = _TINY[real]
    # "huge" stays where g*g is finite in the math dtype (float32 for everything but float64),
    # and representable in the param dtype; beyond that the rule itself overflows.
    huge = {torch.float64: 1e150, torch.float32: 1e18, torch.float16: 3e4,
            torch.bfloat16: 1e18}[real]
    n = rng.standard_normal(shape)
    if kind == "normal":
        g = n
    elif kind == "small":
        g = n * 1e-6
    elif kind == "large":
        g = n * 1e3
    elif kind == "zeros":
        g = np.zeros(shape)
    elif kind == "subnormal":
        g = np.sign(n) * tiny * rng.integers(1, 50, size=shape)
    elif kind == "huge":
        g = np.sign(n) * huge * rng.uniform(0.1, 1.0, size=shape)
    else:  # elementwise mixture
        choice = rng.integers(0, 4, size=shape)
        g = np.select([choice == 0, choice == 1, choice == 2],
                      [n, np.zeros(shape), np.sign(n) * tiny * 3], np.sign(n) * huge * 0.5)
    t = torch.from_numpy(np.asarray(g, dtype=np.float64)).to(real)
    if dtype.is_complex:
        t = torch.complex(t, t.flip(-1) if t.dim() else t)
    return t


def _attach_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    # grads with the param's layout (as autograd produces them) and, for non-contiguous params,
    # sometimes not: both must work
    p.grad = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype).copy_(g) \
        if p.dim() else g.clone()


def _build(params, names, opts, path, nonfinite, state_dtype) -> RMSprop:
    kw = dict(opts, **_PATHS[path], nonfinite=nonfinite, state_dtype=state_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # eps=0 warning
        if names:
            return RMSprop(list(zip(names, params)), **kw)
        return RMSprop(params, **kw)


def _state_snapshot(opt: RMSprop, params) -> list:
    out = []
    for p in params:
        st_ = opt.state.get(p, {})
        out.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st_.items()})
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN included (a step that was refused must not even touch a NaN)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        torch.isnan(a), torch.isnan(b)) and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


def _assert_bit_identical(params, before_params, opt, before_state) -> None:
    for i, (p, b) in enumerate(zip(params, before_params)):
        assert p.dtype == b.dtype and p.shape == b.shape
        assert _same_bits(p.detach(), b), f"param {i} changed"
    after = _state_snapshot(opt, params)
    assert [sorted(s) for s in after] == [sorted(s) for s in before_state], "state keys changed"
    for i, (a, b) in enumerate(zip(after, before_state)):
        for k in b:
            assert _same_bits(a[k], b[k]), f"state {k!r} of param {i} changed"


# ------------------------------------------------------------------------------------------
# comparison with the spec


def _conditioning(o: Options, p_np, g_np, state: dict, t: int, ulp: float,
                  max_value: float) -> np.ndarray:
    """Relative change of each element's centered denominator ``d`` under a rounding noise of
    ``4 ulp * v/c`` in ``s = v/c - (m/c)^2``. The subtraction cancels when the gradient barely
    varies (and exactly, ``s = 0``, at the first bias-corrected step: one sample has no
    variance); rounding noise is then amplified by orders of magnitude and any correct
    implementation may differ from the spec by that much."""
    p, g = _real64(p_np), _real64(g_np)
    if o.maximize:
        g = -g
    if o.weight_decay and not o.decoupled_weight_decay:
        g = g + o.weight_decay * p
    # Where g^2 overflows the math dtype (a huge gradient, or weight decay of a param that an
    # earlier step sent far away) the rule itself is undefined: inf - inf in the spec, inf in
    # an FMA. Those elements are not compared either.
    with np.errstate(over="ignore", invalid="ignore"):
        overflow = ~(4 * g * g < max_value)
    if not o.centered:
        return np.where(overflow, np.inf, 0.0)
    m0 = state.get("grad_avg")
    c = 1 - o.alpha ** t if o.bias_correction else 1.0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        v = o.alpha * _real64(state["square_avg"]) + (1 - o.alpha) * g * g
        m = (o.alpha * _real64(m0) if m0 is not None else 0.0) + (1 - o.alpha) * g
        vc = v / c
        s = np.maximum(vc - (m / c) ** 2, 0)
        noise = 4 * ulp * vc
        if o.eps_in_sqrt:
            rel = noise / (s + o.eps)
        else:
            rel = (np.sqrt(s + noise) - np.sqrt(s)) / (np.sqrt(s) + o.eps)
    return np.where(overflow, np.inf, np.nan_to_num(rel, nan=np.inf))


def _close(got: np.ndarray, want: np.ndarray, tol: np.ndarray, what: str,
           skip: np.ndarray | None = None) -> None:
    assert got.shape == want.shape, what
    if skip is not None and skip.any():
        got, want = got[~skip], want[~skip]
        tol = np.broadcast_to(tol, skip.shape)[~skip]
    # Non-finite results (eps=0 with a vanishing denominator, overflow) must sit at the same
    # elements; whether one is NaN or inf may differ: addcdiv computes (lr*g)/d, where lr*g can
    # underflow to 0 and give 0/0 = NaN while the spec's lr*(g/d) gives inf.
    bad_g, bad_w = ~np.isfinite(got), ~np.isfinite(want)
    assert np.array_equal(bad_g, bad_w), f"{what}: non-finite at different elements\n{got}\n{want}"
    both_inf = np.isinf(got) & np.isinf(want)
    assert np.array_equal(got[both_inf], want[both_inf]), f"{what}: inf of opposite sign"
    fin = np.isfinite(want)
    err = np.abs(got[fin] - want[fin])
    bad = err > np.broadcast_to(tol, want.shape)[fin]
    assert not bad.any(), (f"{what}: max error {err.max():.3g} beyond tolerance; got "
                           f"{got[fin][bad][:4]} want {want[fin][bad][:4]}")


@settings(settings.get_profile(_PROFILE))
@given(opts=options(), pspecs=params_spec(), path=st.sampled_from(sorted(_PATHS)),
       explicit_state=st.sampled_from([None, "float32", "param"]),
       kinds=st.lists(st.sampled_from(_GRAD_KINDS), min_size=1, max_size=3),
       seed=st.integers(0, 2 ** 16), named=st.booleans())
def test_every_path_matches_the_spec_on_finite_gradients(opts, pspecs, path, explicit_state,
                                                         kinds, seed, named):
    rng = np.random.default_rng(seed)
    params = [_make_param(ps, rng) for ps in pspecs]
    if explicit_state == "float32":
        state_dtype = torch.float32
    elif explicit_state == "param":  # state in the param's own (real) dtype, half included
        real = {_real_dtype(p.dtype) for p in params}
        state_dtype = real.pop() if len(real) == 1 else None
    else:
        state_dtype = None
    # known bug, reproduced by test_explicit_state_dtype_keeps_the_spec_math_dtype: skip here
    names = [f"w{i}" for i in range(len(params))] if named else None
    opt = _build(params, names, opts, path, "raise", state_dtype)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # eps=0
        o = Options(**{k: opts[k] for k in RULE_OPTIONS})
    np_params = [_to_numpy(p) for p in params]
    np_states = []
    for p, a in zip(params, np_params):
        real = _real_dtype(p.dtype)
        sd = state_dtype if state_dtype is not None else (
            torch.float32 if real in (torch.float16, torch.bfloat16) else real)
        np_sd = _NP_BF16 if sd == torch.bfloat16 else np.dtype(str(sd).replace("torch.", ""))
        np_states.append(spec.init_state(a, o, state_dtype=np_sd))

    for t, kind in enumerate(kinds):
        grads = [_grad_values(kind, p.shape, p.dtype, rng) for p in params]
        for p, g in zip(params, grads):
            _attach_grad(p, g)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step()
            new = [spec.step(a, _to_numpy(g), s, o) for a, g, s in zip(np_params, grads,
                                                                         np_states)]
        for i, (p, (a_new, s_new)) in enumerate(zip(params, new)):
            real = _real_dtype(p.dtype)
            math = torch.float64 if real == torch.float64 else torch.float32
            sreal = _real_dtype(opt.state[p]["square_avg"].dtype)
            rel = _conditioning(o, np_params[i], _to_numpy(grads[i]), np_states[i], t + 1,
                                max(_ULP[math], _ULP[sreal]), float(torch.finfo(math).max))
            # where d is hopelessly ill-conditioned the elements are not compared at all
            skip = rel > 0.1
            rel = np.where(skip, 0.0, rel)
            # addcdiv rounds (lr*g)/d, the spec lr*(g/d): when lr*g is subnormal its absolute
            # error (up to the smallest normal) is divided by d >= eps (sqrt(eps) inside)
            d_min = (math_sqrt(o.eps) if o.eps_in_sqrt else o.eps) or 1.0
            floor = 4 * float(torch.finfo(math).tiny) / d_min
            # The averages m and b are sums of a decayed old value and a new term that may
            # cancel: their rounding is relative to the terms, not to the result.
            terms = {}
            for key, decay in (("grad_avg", o.alpha), ("momentum_buffer", o.momentum)):
                if key in s_new:
                    prev = np_states[i].get(key)
                    b0 = decay * _real64(prev) if prev is not None else 0.0
                    with np.errstate(invalid="ignore", over="ignore"):
                        terms[key] = np.nan_to_num(np.abs(b0) + np.abs(_real64(s_new[key]) - b0),
                                                   nan=0, posinf=0)
            old, want = _real64(np_params[i]), _real64(a_new)
            with np.errstate(invalid="ignore", over="ignore"):  # inf - inf where overflowed
                step_size = np.abs(np.nan_to_num(want - old, nan=0, posinf=0, neginf=0))
            size = np.nan_to_num(np.abs(old) + step_size, posinf=0)
            if "momentum_buffer" in terms:  # u = lr*b (+ nesterov's mu*b): b's rounding too
                size = size + (1 + o.momentum) * (1.0 if o.lr_in_momentum else o.lr) \
                    * terms["momentum_buffer"]
            # a few roundings in the math dtype, plus one of the stored param
            tol = (8 * _MATH_RTOL[math] * size + _ULP[real] * size + 2 * _TINY[real]
                   + 4 * rel * step_size + floor)
            where = f"step {t + 1} ({kind}), param {i} {p.dtype} {tuple(p.shape)} via {path}"
            _close(_real64(p), want, tol, where, skip)
            st_ = opt.state[p]
            assert int(st_["step"]) == t + 1, where
            for key in ("square_avg", "grad_avg", "momentum_buffer"):
                if key not in s_new:
                    continue
                assert key in st_, f"{where}: state {key} missing"
                sreal = _real_dtype(st_[key].dtype)
                assert sreal == _real_dtype(_torch_dtype(s_new[key].dtype)), \
                    f"{where}: state {key} is {st_[key].dtype}, spec {s_new[key].dtype}"
                got, want_s = _real64(st_[key]), _real64(s_new[key])
                mag = terms.get(key, np.nan_to_num(np.abs(want_s), posinf=0))
                stol = 16 * (_MATH_RTOL[math] + _ULP[sreal]) * mag + 2 * _TINY[sreal] + floor
                if key == "momentum_buffer":
                    stol = stol + 4 * rel * np.nan_to_num(np.abs(want_s), posinf=0)
                _close(got, want_s, np.asarray(stol), f"{where}: state {key}",
                       skip if key == "momentum_buffer" else None)
            # continue both from the same point: each step is compared from identical inputs
            np_params[i] = _to_numpy(p)
            np_states[i] = {"step": t + 1, **{k: _spec_layout(v) for k, v in st_.items()
                                              if k != "step"}}


def _spec_layout(t: torch.Tensor) -> np.ndarray:
    """A torch state tensor in the spec's layout: complex state as interleaved real pairs."""
    a = _to_numpy(t)
    if np.iscomplexobj(a):
        a = np.ascontiguousarray(a).view(a.real.dtype)
    return a


def _torch_dtype(np_dtype) -> torch.dtype:
    if _NP_BF16 is not None and np.dtype(np_dtype) == _NP_BF16:
        return torch.bfloat16
    return {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
            np.dtype(np.float64): torch.float64, np.dtype(np.complex64): torch.complex64,
            np.dtype(np.complex128): torch.complex128}[np.dtype(np_dtype)]


@settings(settings.get_profile(_PROFILE), max_examples=max(
    20, settings.get_profile(_PROFILE).max_examples // 2))
@given(opts=options(), pspecs=params_spec(), path=st.sampled_from(sorted(_PATHS)),
       mode=st.sampled_from(["raise", "skip", "ignore"]),
       bad=st.sampled_from([float("inf"), float("-inf"), float("nan")]),
       warmup=st.integers(0, 2), seed=st.integers(0, 2 ** 16), named=st.booleans(),
       data=st.data())
def test_nonfinite_gradients_change_nothing(opts, pspecs, path, mode, bad, warmup, seed, named,
                                           data):
    rng = np.random.default_rng(seed)
    params = [_make_param(ps, rng) for ps in pspecs]
    nonempty = [i for i, p in enumerate(params) if p.numel()]
    hypothesis.assume(nonempty)
    names = [f"w{i}" for i in range(len(params))] if named else None
    opt = _build(params, names, opts, path, mode, None)
    for _ in range(warmup):
        for p in params:
            _attach_grad(p, _grad_values("normal", p.shape, p.dtype, rng))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step()
    # poison one element of one or more parameters' gradients
    targets = data.draw(st.lists(st.sampled_from(nonempty), min_size=1, max_size=3,
                                 unique=True))
    for i, p in enumerate(params):
        g = _grad_values("normal", p.shape, p.dtype, rng)
        if i in targets:
            flat = g.reshape(-1)
            flat[int(rng.integers(0, flat.numel()))] = bad
        _attach_grad(p, g)
    before_params = [p.detach().clone() for p in params]
    before_state = _state_snapshot(opt, params)
    skipped = opt.skipped_steps
    first = min(targets)
    label = f"'w{first}'" if named else f"index {first}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if mode == "raise":
            with pytest.raises(NonFiniteGradientError, match=f"non-finite gradient .* {label}"):
                opt.step()
        else:
            opt.step()
    if mode == "ignore":
        return  # applied as torch.optim.RMSprop would: no promise about the values
    _assert_bit_identical(params, before_params, opt, before_state)
    assert opt.skipped_steps == skipped + (mode == "skip")
    # and the optimizer still works afterwards
    for p in params:
        _attach_grad(p, _grad_values("normal", p.shape, p.dtype, rng))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step()
    assert all(int(opt.state[p]["step"]) == warmup + 1 for p in params)


_INVALID = {"lr": [-1e-3, float("nan"), "fast"], "alpha": [-0.1, 1.5, float("nan")],
            "eps": [-1e-8, float("nan")], "weight_decay": [-0.1], "momentum": [-0.5, 1.0, 2.0],
            "initial_square_avg": [-1.0, float("inf")], "centered": [1, "yes"],
            "maximize": [0], "nesterov": [None]}
_MESSAGE = {"lr": r"learning rate|\blr\b"}


@settings(settings.get_profile(_PROFILE), max_examples=40)
@given(name=st.sampled_from(sorted(_INVALID)), data=st.data(), in_group=st.booleans())
def test_invalid_options_are_refused_naming_them(name, data, in_group):
    value = data.draw(st.sampled_from(_INVALID[name]))
    p = torch.nn.Parameter(torch.ones(3))
    kw = {name: value}
    match = _MESSAGE.get(name, name)
    if in_group:  # a bad value in a param group, added after construction
        opt = RMSprop([torch.nn.Parameter(torch.ones(2))])
        with pytest.raises(ValueError, match=match):
            opt.add_param_group({"params": [p], **kw})
        assert len(opt.param_groups) == 1
    else:
        with pytest.raises(ValueError, match=match):
            RMSprop([p], **kw)


@pytest.mark.parametrize("path", sorted(_PATHS))
def test_a_group_option_broken_mid_run_changes_nothing(path):
    p = torch.nn.Parameter(torch.arange(4.0))
    opt = RMSprop([p], momentum=0.9, **_PATHS[path])
    p.grad = torch.ones(4)
    opt.step()
    before_p, before_s = p.detach().clone(), _state_snapshot(opt, [p])
    opt.param_groups[0]["alpha"] = 1.5
    with pytest.raises(ValueError, match="alpha"):
        opt.step()
    _assert_bit_identical([p], [before_p], opt, before_s)


@pytest.mark.parametrize("path", sorted(_PATHS))
def test_explicit_state_dtype_keeps_the_spec_math_dtype(path):
    # float64 params, float32 state, lr=0: the params must not move at all
    p = torch.nn.Parameter(torch.tensor([0.1, 1 / 3], dtype=torch.float64))
    opt = RMSprop([p], lr=0.0, state_dtype=torch.float32, **_PATHS[path])
    p.grad = torch.ones(2, dtype=torch.float64)
    opt.step()
    ok64 = torch.equal(p.detach(), torch.tensor([0.1, 1 / 3], dtype=torch.float64))
    # float16 params and state: spec (float32 math) gives finite params
    h = torch.nn.Parameter(torch.tensor([1.0, 0.5], dtype=torch.float16))
    opt = RMSprop([h], lr=1e-3, state_dtype=torch.float16, **_PATHS[path])
    h.grad = torch.tensor([1e-6, 0.0], dtype=torch.float16)
    opt.step()
    o = Options(lr=1e-3)
    want, _ = spec.step(_to_numpy(torch.tensor([1.0, 0.5], dtype=torch.float16)),
                        _to_numpy(h.grad), spec.init_state(np.zeros(2, np.float16), o,
                                                           state_dtype=np.float16), o)
    assert ok64 and torch.equal(h.detach(), torch.from_numpy(want))
