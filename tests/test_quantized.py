"""Quantized state (8-bit, 4-bit) and stochastic rounding: the NumPy spec against the float
spec and closed forms, then the torch codecs against the NumPy spec (same codes)."""

import copy
import io
import itertools
import math
import warnings

import ml_dtypes
import numpy as np
import pytest

from rmsprop import Options, codecs, spec
from rmsprop.numpy import RMSprop as NumpyRMSprop

BF16 = ml_dtypes.bfloat16

GRID = [dict(), dict(centered=True), dict(momentum=0.9), dict(momentum=0.9, lr_in_momentum=True),
        dict(momentum=0.9, nesterov=True), dict(bias_correction=True),
        dict(weight_decay=0.1), dict(weight_decay=0.1, decoupled_weight_decay=True),
        dict(maximize=True), dict(initial_square_avg=1.0, eps_in_sqrt=True, eps=1e-6),
        dict(centered=True, momentum=0.9, bias_correction=True, initial_square_avg=0.1)]
# relative distance of the quantized trajectory's displacement to the float one's (stated
# tolerance of the formats: 8 bits ~1 %, 4 bits ~20 % on this noisy quadratic)
TOL = {"8bit": 0.03, "4bit": 0.3}


def _quadratic(shape, steps, o, state_dtype, dtype=np.float32):
    """Noisy quadratic: g = 0.05 p + 0.1 noise (seeded), float32 params."""
    p0 = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    p, st = p0.copy(), spec.init_state(p0, o, state_dtype=state_dtype)
    for t in range(steps):
        noise = np.random.default_rng(100 + t).standard_normal(p.shape).astype(p.real.dtype)
        g = (0.05 * p + 0.1 * (noise + 1j * noise if np.iscomplexobj(p) else noise))
        p, st = spec.step(p, g.astype(dtype), st, o)
    return p0, p, st


@pytest.mark.parametrize("fmt", ["8bit", "4bit"])
@pytest.mark.parametrize("kw", GRID, ids=lambda kw: ",".join(kw) or "default")
def test_quantized_spec_tracks_the_float_spec(fmt, kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        o = Options(lr=1e-3, **kw)
    p0, ref, _ = _quadratic((64, 96), 60, o, None)
    _, q, st = _quadratic((64, 96), 60, o, fmt)
    assert isinstance(st["square_avg"], codecs.Quantized)
    assert np.linalg.norm(q - ref) <= TOL[fmt] * np.linalg.norm(ref - p0)


def test_complex_params_quantize_their_real_view():
    o = Options(lr=1e-3, momentum=0.9)
    z0, z, st = _quadratic((48, 64), 10, o, "8bit", np.complex64)
    r0, r, sr = _quadratic((48, 64), 10, o, "8bit", np.complex64)
    np.testing.assert_array_equal(z, r)
    assert st["square_avg"].shape == (48, 128)  # interleaved (re, im)
    p0, ref, _ = _quadratic((48, 64), 10, o, None, np.complex64)
    assert np.linalg.norm(z - ref) <= TOL["8bit"] * np.linalg.norm(ref - p0)


def test_small_tensors_stay_full_precision():
    o = Options(momentum=0.9, centered=True)
    st = spec.init_state(np.zeros(codecs.MIN_QUANTIZED - 1, np.float32), o, state_dtype="4bit")
    assert all(isinstance(st[k], np.ndarray) and st[k].dtype == np.float32
               for k in ("square_avg", "grad_avg", "momentum_buffer"))
    st = spec.init_state(np.zeros(codecs.MIN_QUANTIZED, np.float32), o, state_dtype="4bit")
    assert isinstance(st["square_avg"], codecs.Quantized)


@pytest.mark.parametrize("fmt", ["8bit", "4bit"])
def test_initial_square_avg_one_is_exact(fmt):
    o = Options(initial_square_avg=1.0)
    st = spec.init_state(np.zeros((100, 100), np.float32), o, state_dtype=fmt)
    np.testing.assert_array_equal(codecs.decode(st["square_avg"]), 1.0)


def _naive_zero_code(x, fmt):
    """The failure mode the maps avoid: absmax-linear v with a zero code (as a signed map)."""
    return codecs.decode(codecs.encode(x, "s" + fmt[0]))


def _encoded(state, fmt):
    """The full-precision state as the quantized format stores it."""
    out = dict(state)
    for key in ("square_avg", "grad_avg"):
        if key in state:
            out[key] = codecs.encode(state[key], codecs.QUANTIZED[fmt][key])
    if "grad_avg" in state:  # centered: square_avg holds w = v - m'^2
        m = codecs.decode(out["grad_avg"])
        out["square_avg"] = codecs.encode(np.maximum(state["square_avg"] - m * m, 0),
                                          codecs.QUANTIZED[fmt]["square_avg"])
    return out


@pytest.mark.parametrize("fmt", ["8bit", "4bit"])
@pytest.mark.parametrize("kw", [dict(), dict(centered=True)], ids=["plain", "centered"])
def test_zero_point_replay(fmt, kw):
    # One block whose gradient magnitudes span 1e6, replayed along the full-precision
    # trajectory: at every step the state is the full-precision one as this format stores it,
    # and no element's step from it may exceed twice its full-precision step. A zero code
    # (absmax-linear v, small v rounded to 0) fails the same replay by orders of magnitude.
    # (Momentum is left out: a step can cancel to nearly 0 in full precision, and b's bounded
    # absolute error, tested in test_codecs, is then no multiple of it.)
    block = codecs.FORMATS[codecs.QUANTIZED[fmt]["square_avg"]].block
    n = block * 40
    mags = np.tile(np.logspace(0, -6, block), 40).astype(np.float32)  # 1e6 inside each block
    o = Options(lr=1e-3, alpha=0.99, eps=1e-10, **kw)
    p = np.zeros(n, np.float32)
    sf = spec.init_state(p, o)
    worst = worst_naive = 0.0
    rng = np.random.default_rng(0)
    for t in range(200):
        g = (mags * np.where(rng.random(n) < 0.5, -1, 1) * (0.5 + rng.random(n))).astype(
            np.float32)
        if t >= 100:
            g[mags > 1e-3] = 0  # the large half goes quiet: its v decays, the block max too
        sq = _encoded(sf, fmt)
        new_q, _ = spec.step(p, g, sq, o)
        if not kw:
            v_naive = _naive_zero_code(sf["square_avg"], fmt)
            naive = 1e-3 * np.abs(g) / (np.sqrt(0.99 * v_naive + 0.01 * g * g) + 1e-10)
        new_f, sf = spec.step(p, g, sf, o)
        step_f, step_q = np.abs(new_f - p), np.abs(new_q - p)
        moved = step_f > 0
        assert np.all(step_q[~moved] == 0)
        worst = max(worst, float(np.max(step_q[moved] / step_f[moved])))
        if not kw:
            worst_naive = max(worst_naive, float(np.max(naive[moved] / step_f[moved])))
        p = new_f
    assert worst <= 2.0, worst
    if not kw:
        assert worst_naive > 2.0  # the zero code does break the bound


@pytest.mark.parametrize("fmt,per_param,momentum_centered", [
    ("8bit", 1.05, 3.2), ("4bit", 0.55, 1.65)])
def test_bytes_per_parameter_on_a_model_like_list(fmt, per_param, momentum_centered):
    # 10M params of transformer-like shapes (with small biases and norms in float32): bytes
    # counted from the stored arrays, scales included.
    layer = [(384, 384)] * 4 + [(1536, 384), (384, 1536)] + [(384,)] * 6 + [(1536,)]
    shapes = [(12_000, 384)] + layer * 3 + [(384,)]
    n = sum(math.prod(s) for s in shapes)
    assert 9.9e6 < n < 1.0e7
    for kw, limit in ((dict(), per_param), (dict(momentum=0.9, centered=True),
                                            momentum_centered)):
        total = 0
        for s in shapes:  # a step keeps every entry's size: counted at init
            st = spec.init_state(np.zeros(s, np.float32), Options(**kw), state_dtype=fmt)
            total += codecs.state_bytes(st)
        assert total / n <= limit


# -- stochastic rounding ---------------------------------------------------------------------

def test_update_below_half_an_ulp_moves_only_with_stochastic_rounding():
    # lr * sign(g) with bias correction is 2^-10 exactly, a quarter of bfloat16's ulp at 1
    # (2^-7 / 2^-10 = 8: an eighth of an ulp). Round-to-nearest never moves the param; with
    # stochastic rounding E[p_t] = 1 - t * 2^-10 (the float32 trajectory): the number of
    # elements that moved down one ulp is Binomial(n, t*2^-10/2^-7) for t <= 8.
    n, steps = 20_000, 4
    o = Options(lr=2.0 ** -10, eps=0.0 + 1e-30, bias_correction=True, alpha=0.5)
    g = np.ones(n, np.float32)
    for sr in (False, True):
        opt = NumpyRMSprop([np.ones(n, BF16)], stochastic_rounding=sr, seed=7,
                           **o.as_dict())
        w = opt.param_groups[0]["params"][0]
        for _ in range(steps):
            opt.step([g])
        if not sr:
            assert np.all(w.astype(np.float32) == 1.0)
            continue
        # each step is an independent draw from the param's current value
        mean = float(np.mean(w.astype(np.float64)))
        expect = 1.0 - steps * 2.0 ** -10
        sd = 2.0 ** -7 * math.sqrt(steps * (1 / 8) * (7 / 8) / n) * 2  # a generous bound
        assert abs(mean - expect) <= 4 * sd, (mean, expect)


def _train_bf16(sr, steps=300):
    """Linear regression in pure bfloat16 (no float32 master weights), lr small enough that
    most updates are below half an ulp."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((256, 32)).astype(np.float32)
    w_true = rng.standard_normal(32).astype(np.float32)
    y = X @ w_true
    w = np.full(32, 4.0, dtype=BF16 if sr is not None else np.float32)
    opt = NumpyRMSprop([w], lr=3e-4, stochastic_rounding=bool(sr), seed=3)
    losses = []
    for _ in range(steps):
        wf = w.astype(np.float32)
        r = X @ wf - y
        losses.append(float(np.mean(r * r)))
        opt.step([(X.T @ r / len(y)).astype(np.float32).astype(w.dtype)])
    return np.array(losses)


def test_bfloat16_training_with_stochastic_rounding_tracks_float32():
    ref, rne, sr = _train_bf16(None), _train_bf16(False), _train_bf16(True)
    gap_rne = np.abs(np.log(rne) - np.log(ref)).mean()
    gap_sr = np.abs(np.log(sr) - np.log(ref)).mean()
    assert gap_sr < 0.5 * gap_rne, (gap_sr, gap_rne)


def test_stochastic_rounding_is_reproducible_and_resumable():
    def run(steps, state=None):
        w = np.ones(5000, BF16) if state is None else state[0].copy()
        opt = NumpyRMSprop([w], lr=1e-4, stochastic_rounding=True, seed=11)
        if state is not None:
            opt.state = [[dict(state[1])]]
        for t in range(steps):
            g = np.random.default_rng(t if state is None else t + 3).standard_normal(5000)
            opt.step([g.astype(np.float32)])
        return w, opt.state[0][0]
    a, _ = run(6)
    b, st = run(3)
    c, _ = run(3, (b, st))
    np.testing.assert_array_equal(a.astype(np.float32), c.astype(np.float32))
    assert st["seed"] == codecs.param_seed(11, 0)


def test_bad_numpy_arguments_are_refused():
    with pytest.raises(ValueError, match="state_dtype"):
        NumpyRMSprop([np.zeros(3)], state_dtype="3bit")
    with pytest.raises(ValueError, match="seed"):
        NumpyRMSprop([np.zeros(3)], stochastic_rounding=True, seed=-1)
    with pytest.raises(ValueError, match="stochastic_rounding"):
        NumpyRMSprop([np.zeros(3)], stochastic_rounding="yes")


def _q(fmt, n=8192, seed=0):
    return codecs.encode(np.random.default_rng(seed).random(n, dtype=np.float32), fmt)


def _qlike(q, **change):
    return codecs.Quantized(**{"fmt": q.fmt, "codes": q.codes, "scales": q.scales,
                               "shape": q.shape, **change})


@pytest.mark.parametrize("fmt", ["u8", "u4"])
@pytest.mark.parametrize("edit, match", [
    (lambda q: _qlike(q, codes=q.codes[:-1]), "codes must be"),
    (lambda q: _qlike(q, codes=np.concatenate([q.codes, q.codes[:1]])), "codes must be"),
    (lambda q: _qlike(q, codes=q.codes.astype(np.int16)), "codes must be"),
    (lambda q: _qlike(q, scales=q.scales[:-1]), "scales must be"),
    (lambda q: _qlike(q, scales=np.concatenate([q.scales, q.scales[:1]])), "scales must be"),
    (lambda q: _qlike(q, scales=-q.scales), "scales hold NaN or negative"),
    (lambda q: _qlike(q, scales=q.scales * np.float32("nan")), "scales hold NaN or negative"),
    (lambda q: _qlike(q, shape=(4096,)), "codes must be"),
    (lambda q: _qlike(q, fmt=q.fmt.replace("u", "s")), "square_avg takes an unsigned map"),
])
def test_spec_step_refuses_corrupt_quantized_state_naming_it(fmt, edit, match):
    """The reference itself checks what it is given: codes, scales, shape and map of each
    entry against the param (the oracle: the entries init_state makes, which it accepts)."""
    o = Options(lr=1e-2)
    p = np.random.default_rng(1).standard_normal(8192).astype(np.float32)
    state = {"step": 3, "square_avg": _q(fmt)}
    spec.step(p, p, state, o)  # the control: the undamaged state steps
    bad = {**state, "square_avg": edit(state["square_avg"])}
    with pytest.raises(ValueError, match=match):
        spec.step(p, p, bad, o)
    if "map" not in match:  # the codes themselves are damaged: decoding refuses them too
        with pytest.raises(ValueError, match=match):
            codecs.decode(bad["square_avg"])


@pytest.mark.parametrize("make, error, match", [
    (lambda p, st: (p.astype(np.int64), p, st), TypeError, "param must be floating"),
    (lambda p, st: (p, p.astype(np.int64), st), TypeError, "grad dtype int64 does not fit"),
    (lambda p, st: (p, p.astype(bool), st), TypeError, "grad dtype bool does not fit"),
    (lambda p, st: (p, p[:4].astype(np.complex64), st), TypeError, "grad dtype complex64"),
    (lambda p, st: (p, p[:4], st), ValueError, "grad shape"),
    (lambda p, st: (p, p, {**st, "square_avg": st["square_avg"][:1]}), ValueError,
     "'square_avg' has shape"),
    (lambda p, st: (p, p, {**st, "square_avg": np.zeros((5, 8), np.float32)}), ValueError,
     "'square_avg' has shape"),
    (lambda p, st: (p, p, {**st, "square_avg": st["square_avg"].astype(np.int32)}),
     ValueError, "has dtype int32"),
    (lambda p, st: (p, p, {**st, "square_avg": -st["square_avg"] - 1}), ValueError,
     "negative values"),
    (lambda p, st: (p, p, {**st, "square_avg": list(st["square_avg"])}), ValueError,
     "is a list"),
    (lambda p, st: (p, p, {"step": 1}), ValueError, "holding 'square_avg'"),
    (lambda p, st: (p, p, {**st, "step": -1}), ValueError, "'step' must be an integer >= 0"),
    (lambda p, st: (p, p, {**st, "step": "x"}), ValueError, "'step' must be an integer"),
    (lambda p, st: (p, p, {**st, "seed": -5}), ValueError, "'seed' must be an integer"),
    (lambda p, st: (p, p, {**st, "seed": 2 ** 40}), ValueError, "'seed' must be an integer"),
    (lambda p, st: (p, p, {**st, "grad_avg": _q("s8", n=8)}), ValueError,
     "mixes quantized and full-precision"),
])
def test_spec_step_refuses_what_it_cannot_take(make, error, match):
    o = Options(lr=1e-2, centered=True)
    p = np.random.default_rng(2).standard_normal(8192).astype(np.float32)
    st = spec.init_state(np.zeros(8), o)
    st["square_avg"] = np.abs(np.random.default_rng(3).standard_normal(8)).astype(np.float32)
    small = p[:8].copy()
    spec.step(small, small, st, o)  # the control
    with pytest.raises(error, match=match):
        spec.step(*make(small, st), o)


def test_codecs_refuse_unknown_formats_and_inputs_they_cannot_encode():
    x = np.ones(300, np.float32)
    for name in ("u3", "8bit"):
        with pytest.raises(ValueError, match="unknown quantized format"):
            codecs.encode(x, name)
    with pytest.raises(ValueError, match="unknown quantized format"):
        codecs.Quantized("zz", np.zeros(1, np.uint8), np.zeros(1, np.float32), (1,))
    with pytest.raises(TypeError, match="real floating-point array"):
        codecs.encode(x.astype(np.complex64), "s8")
    with pytest.raises(TypeError, match="floating-point values, not int8"):
        codecs.decode(codecs.encode(x, "u8"), np.int8)
    with pytest.raises(ValueError, match="not a quantized state_dtype"):
        codecs.quantizes(8192, "3bit")


def test_numpy_optimizer_refuses_params_it_cannot_update_in_place_and_duplicates():
    a, ro = np.ones(3), np.ones(3)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="writable"):
        NumpyRMSprop([a, ro], lr=0.1)
    with pytest.raises(ValueError, match="more than one parameter group"):
        NumpyRMSprop([a, a], lr=0.1)
    with pytest.raises(ValueError, match="more than one parameter group"):
        NumpyRMSprop([{"params": [a]}, {"params": [a]}], lr=0.1)
    with pytest.raises(TypeError, match="all arrays or all param-group dicts"):
        NumpyRMSprop([{"params": [a]}, a], lr=0.1)
    with pytest.raises(ValueError, match="needs a 'params' list"):
        NumpyRMSprop([{"lr": 0.1}], lr=0.1)
    b = np.ones(3)
    opt = NumpyRMSprop([a, b], lr=0.1)
    opt.step([np.ones(3), np.ones(3)])
    before = (a.copy(), b.copy(), [dict(s) for s in opt.state[0]])
    opt.state[0][1]["square_avg"] = np.zeros((5, 3))  # the second param's state damaged
    with pytest.raises(ValueError, match="'square_avg' has shape"):
        opt.step([np.ones(3), np.ones(3)])
    assert np.array_equal(a, before[0]) and np.array_equal(b, before[1])
    assert opt.state[0][0] is not None and opt.state[0][0]["step"] == before[2][0]["step"]
    opt.state[0][1] = before[2][1]
    b.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        opt.step([np.ones(3), np.ones(3)])
    assert np.array_equal(a, before[0])


# -- torch: the same codes as the spec --------------------------------------------------------

torch = pytest.importorskip("torch")
from rmsprop.torch import RMSprop  # noqa: E402
from rmsprop.torch import _quantized as tq  # noqa: E402
from rmsprop.torch import optimizer as torch_optimizer  # noqa: E402

KEYS = ("square_avg", "grad_avg", "momentum_buffer")


def _torch_vs_spec(fmt, kw, path, shapes, steps=6, dtype=torch.float32, resync=True):
    """Run torch (path) and the spec side by side on the same gradients; yield per step the
    optimizer, its params, the spec's params and states. With ``resync`` each step starts
    from the spec's params: torch's float32 CPU sqrt is not correctly rounded, so ``d`` (and
    a param, and through coupled weight decay the next gradient) can be an ulp off; each
    step's params are compared first."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        o = Options(lr=1e-2, **kw)
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]
        opt = RMSprop(ps, state_dtype=fmt, foreach=path == "foreach", **o.as_dict())
    ref = [p.detach().numpy().copy() for p in ps]
    sts = [spec.init_state(r, o, state_dtype=fmt) for r in ref]
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
        for p, g in zip(ps, grads):
            p.grad = g
        opt.step()
        for i, g in enumerate(grads):
            ref[i], sts[i] = spec.step(ref[i], g.numpy(), sts[i], o)
        for p, r in zip(ps, ref):
            np.testing.assert_allclose(p.detach().numpy(), r, rtol=1e-5, atol=1e-6)
            if resync:
                with torch.no_grad():
                    p.copy_(torch.from_numpy(r))
        yield opt, ps, ref, sts


def _assert_same_codes(opt, ps, sts):
    for p, st in zip(ps, sts):
        got = opt.state[p]
        for key in KEYS:
            if key not in st:
                continue
            want = st[key]
            if isinstance(want, np.ndarray):  # a small tensor: full precision
                if key == "momentum_buffer":  # divided by d: see below
                    np.testing.assert_allclose(tq.real(got[key]).numpy(), want, rtol=1e-5,
                                               atol=1e-5)
                else:
                    np.testing.assert_array_equal(tq.real(got[key]).numpy(), want)
                continue
            if key == "momentum_buffer":
                # b = g/d divides by d = sqrt(s) + eps, and torch's float32 sqrt on the CPU is
                # not correctly rounded on some ISAs (an ulp off on a fraction of elements):
                # b can then cross a rounding boundary of its code, and a block maximum may
                # differ by a few ulps. The spec then carries torch's b on (as the params are
                # resynced), so that one code apart does not compound into later steps.
                _assert_codes_within_one(got[key].numpy(), want.codes, want.fmt)
                np.testing.assert_allclose(got[key + "_scale"].numpy(), want.scales,
                                           rtol=5e-6, atol=0)
                st[key] = codecs.Quantized(want.fmt, got[key].numpy().copy(),
                                           got[key + "_scale"].numpy().copy(), want.shape)
                continue
            np.testing.assert_array_equal(got[key].numpy(), want.codes, err_msg=key)
            np.testing.assert_array_equal(got[key + "_scale"].numpy(), want.scales,
                                          err_msg=key)


def _signed_codes(codes, fmt):
    """The signed code values ``k`` of stored (two's complement, 4-bit: packed) codes."""
    f = codecs.FORMATS[fmt]
    c = codes.astype(np.int16)
    if f.bits == 4:
        c = np.stack([c & 0x0F, c >> 4], axis=1).reshape(-1)
    return np.where(c > f.levels, c - (1 << f.bits), c)


def _assert_codes_within_one(got, want, fmt):
    """Signed codes equal but for at most 0.1 % of elements, each at most one code apart."""
    diff = np.abs(_signed_codes(got, fmt) - _signed_codes(want, fmt))
    assert diff.max() <= 1, (fmt, int(diff.max()))
    assert np.count_nonzero(diff) <= 1e-3 * diff.size, (fmt, int(np.count_nonzero(diff)))


SHAPES = [(32, 256), (4608,), (7, 9), (4097,)]  # 2-d, 1-d, small (float32), odd (4-bit: fp32)


@pytest.mark.parametrize("path", ["forloop", "foreach"])
@pytest.mark.parametrize("fmt", ["8bit", "4bit"])
@pytest.mark.parametrize("kw", GRID, ids=lambda kw: ",".join(kw) or "default")
def test_torch_writes_the_spec_codes(fmt, kw, path):
    for opt, ps, _, sts in _torch_vs_spec(fmt, kw, path, SHAPES, steps=4):
        _assert_same_codes(opt, ps, sts)


def test_foreach_batches_cut_at_blocks_and_complex_params(monkeypatch):
    # Batches smaller than a tensor cut it into flat slices at block multiples; a complex
    # param is quantized over its real view.
    monkeypatch.setitem(torch_optimizer._FOREACH_BATCH, "cpu", 4096)
    kw = dict(momentum=0.9, centered=True)
    for fmt in ("8bit", "4bit"):
        for opt, ps, _, sts in _torch_vs_spec(fmt, kw, "foreach", [(40, 300)], steps=4):
            _assert_same_codes(opt, ps, sts)
        for opt, ps, _, sts in _torch_vs_spec(fmt, kw, "forloop", [(50, 60)], steps=3,
                                             dtype=torch.complex64):
            _assert_same_codes(opt, ps, sts)


@pytest.mark.parametrize("fmt", ["8bit", "4bit"])
def test_options_switched_mid_run_keep_the_spec_codes(fmt):
    # centered and momentum on, then off (the buffers stay, unchanged, as torch keeps them:
    # square_avg then stores w against the unchanged grad_avg), then on again
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 128, generator=gen))
    opt = RMSprop([p], lr=1e-2, state_dtype=fmt, centered=True, momentum=0.9)
    ref, st = p.detach().numpy().copy(), None
    for on in (True, True, False, False, True):
        opt.param_groups[0].update(centered=on, momentum=0.9 if on else 0.0)
        o = Options(lr=1e-2, centered=on, momentum=0.9 if on else 0.0)
        st = st or spec.init_state(ref, o, state_dtype=fmt)
        g = torch.randn(p.shape, generator=gen)
        p.grad = g
        opt.step()
        ref, st = spec.step(ref, g.numpy(), st, o)
        _assert_same_codes(opt, [p], [st])
        with torch.no_grad():
            p.copy_(torch.from_numpy(ref))


def test_param_groups_with_different_formats():
    a, b, c = (torch.nn.Parameter(torch.randn(8192)) for _ in range(3))
    opt = RMSprop([{"params": [a], "state_dtype": "8bit"}, {"params": [b], "state_dtype": "4bit"},
                   {"params": [c]}], lr=1e-2, momentum=0.9)
    for p in (a, b, c):
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[a]["square_avg"].numel() == 8192 and opt.state[a]["square_avg"].dtype \
        == torch.uint8
    assert opt.state[b]["square_avg"].numel() == 4096
    assert opt.state[c]["square_avg"].dtype == torch.float32


def test_fused_refuses_quantized_state_of_float64_params_and_default_takes_foreach():
    # the C kernel takes quantized state of float32/16-bit params only
    # (tests/test_fused_quantized.py)
    p = torch.nn.Parameter(torch.randn(8192, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="float64"):
        opt = RMSprop([p], state_dtype="4bit", fused=True)
        p.grad = torch.ones_like(p)
        opt.step()
    opt = RMSprop([p], state_dtype="4bit")
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p]["square_avg"].dtype == torch.uint8


def _trained(fmt, steps, kw=None, opt_state=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = RMSprop(ps, lr=1e-2, state_dtype=fmt, **(kw or dict(momentum=0.9, centered=True)))
    return ps, opt, gen


def _run(opt, ps, gen, steps):
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


@pytest.mark.parametrize("fmt", ["8bit", "4bit"])
def test_state_dict_is_plain_tensors_and_resume_is_bit_identical(fmt):
    ps, opt, gen = _trained(fmt, 0)
    _run(opt, ps, gen, 3)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in ps],
                "gen": gen.get_state()}, buf)
    _run(opt, ps, gen, 3)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    ps2 = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt2 = RMSprop(ps2, lr=1e-2, state_dtype=fmt, momentum=0.9, centered=True)
    opt2.load_state_dict(saved["opt"])
    gen2 = torch.Generator()
    gen2.set_state(saved["gen"])
    _run(opt2, ps2, gen2, 3)
    for p, q in zip(ps, ps2):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt2.state[q][k])), k


def test_checkpoint_carries_quantized_state_and_sr_seeds(tmp_path):
    from rmsprop.torch import load_checkpoint, save_checkpoint

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 8))
        model[1].to(torch.bfloat16)
        return model, RMSprop(model.parameters(), lr=1e-3, momentum=0.9, centered=True,
                              state_dtype="4bit", stochastic_rounding=True, seed=3)

    def train(model, opt, steps, gen):
        for _ in range(steps):
            x = torch.randn(16, 64, generator=gen)
            loss = model[1](model[0](x).bfloat16()).float().square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    m1, o1 = make()
    gen = torch.Generator().manual_seed(1)
    train(m1, o1, 3, gen)
    save_checkpoint(tmp_path / "ckpt.pt", m1, o1)
    after = gen.get_state()
    train(m1, o1, 3, gen)
    m2, o2 = make()
    load_checkpoint(tmp_path / "ckpt.pt", m2, o2)
    gen.set_state(after)
    train(m2, o2, 3, gen)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    w = m1[0].weight
    assert o1.state[w]["square_avg"].dtype == torch.uint8  # 8192 elements: quantized
    assert "sr_seed" in o1.state[m1[1].weight]  # the bfloat16 layer


@pytest.mark.parametrize("fmt", ["8bit", "4bit"])
@pytest.mark.parametrize("source", ["ours", "torch"])
def test_loading_full_precision_state_quantizes_it(fmt, source):
    kw = dict(lr=1e-2, momentum=0.9, centered=True)
    gen = torch.Generator().manual_seed(1)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    full = (torch.optim.RMSprop(ps, **kw) if source == "torch" else RMSprop(ps, **kw))
    _run(full, ps, gen, 3)
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = RMSprop(qs, state_dtype=fmt, **kw)
    opt.load_state_dict(full.state_dict())
    o = Options(**kw)
    for p, q in zip(ps, qs):
        fp = {k: tq.real(v).numpy() for k, v in full.state[p].items() if k in KEYS}
        want = spec.init_state(p.detach().numpy(), o, state_dtype=fmt)
        if isinstance(want["square_avg"], codecs.Quantized):
            m = codecs.encode(fp["grad_avg"], codecs.QUANTIZED[fmt]["grad_avg"])
            w = np.maximum(fp["square_avg"] - codecs.decode(m) ** 2, 0)  # centered: w
            want = {"grad_avg": m, "momentum_buffer": codecs.encode(
                fp["momentum_buffer"], codecs.QUANTIZED[fmt]["momentum_buffer"]),
                "square_avg": codecs.encode(w, codecs.QUANTIZED[fmt]["square_avg"])}
        else:
            want = fp
        _assert_same_codes(opt, [q], [want])


@pytest.mark.parametrize("fmt", ["8bit", "4bit"])
def test_full_precision_export_loads_into_torch(fmt):
    kw = dict(lr=1e-2, momentum=0.9, centered=True)
    ps, opt, gen = _trained(fmt, 0, dict(momentum=0.9, centered=True))
    _run(opt, ps, gen, 3)
    exported = opt.full_precision_state_dict()
    theirs = torch.optim.RMSprop([torch.nn.Parameter(p.detach().clone()) for p in ps], **kw)
    theirs.load_state_dict(exported)
    for p, q in zip(ps, [q for g in theirs.param_groups for q in g["params"]]):
        st, tst = opt.state[p], theirs.state[q]
        for key in KEYS:
            if st[key].dtype != torch.uint8:
                assert torch.equal(tst[key], st[key])
                continue
            fmts = codecs.QUANTIZED[fmt]
            # the spec's decode of the stored codes: v = w + m'^2 for centered square_avg
            qz = {k: codecs.Quantized(fmts[k], st[k].numpy(), st[k + "_scale"].numpy(),
                                      (tq.real(p).numel(),)) for k in KEYS}
            want = codecs.decode(qz[key])
            if key == "square_avg":
                want = want + codecs.decode(qz["grad_avg"]) ** 2
            assert tst[key].dtype == torch.float32 and tst[key].shape == p.shape
            np.testing.assert_array_equal(tst[key].reshape(-1).numpy(), want)
    for q in (q for g in theirs.param_groups for q in g["params"]):
        q.grad = torch.ones_like(q)
    theirs.step()


@pytest.mark.parametrize("fmt", ["8bit", "4bit"])
def test_full_precision_export_refuses_a_damaged_state_dict_naming_it(fmt):
    """Codes without their scales, in whichever key the decoding of another needs first
    (centered square_avg decodes through grad_avg): refused naming the key, the live state
    unchanged."""
    ps, opt, gen = _trained(fmt, 0, dict(momentum=0.9, centered=True))
    _run(opt, ps, gen, 2)
    live = copy.deepcopy(opt.state_dict())
    for key in ("grad_avg_scale", "square_avg_scale", "momentum_buffer_scale"):
        sd = copy.deepcopy(live)
        pid = next(i for i, e in sd["state"].items() if key in e)
        del sd["state"][pid][key]
        with pytest.raises(ValueError, match=f"holds codes but no {key!r}"):
            opt.full_precision_state_dict(sd)
    now = opt.state_dict()
    for pid, e in live["state"].items():
        assert all(torch.equal(v, now["state"][pid][k]) for k, v in e.items())


def test_quantized_state_into_a_full_precision_optimizer_says_what_it_is():
    ps, opt, gen = _trained("8bit", 0, {})
    _run(opt, ps, gen, 1)
    sd = copy.deepcopy(opt.state_dict())
    full = RMSprop([torch.nn.Parameter(p.detach().clone()) for p in ps], lr=1e-2)
    with pytest.raises(ValueError, match=r"holds quantized codes .*full_precision_state_dict"):
        full.load_state_dict(sd)
    assert not full.state
    full.load_state_dict(opt.full_precision_state_dict())


def test_full_precision_export_of_a_given_state_dict_keyed_by_names():
    """The state dict ``get_optimizer_state_dict`` returns (entries keyed by parameter names,
    in param-group order) decodes as the optimizer's own; one that lists other params is
    refused."""
    ps, opt, gen = _trained("8bit", 0, dict(momentum=0.9, centered=True))
    _run(opt, ps, gen, 2)
    sd = opt.state_dict()
    names = [f"layer{i}.weight" for i in sd["state"]]
    by_name = {"state": {n: sd["state"][i] for n, i in zip(names, sd["state"])},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                for g in sd["param_groups"]]}
    want = opt.full_precision_state_dict()  # checked against the spec's decode above
    got = opt.full_precision_state_dict(by_name)
    assert got["param_groups"] == by_name["param_groups"]
    for n, i in zip(names, want["state"]):
        assert got["state"][n].keys() == want["state"][i].keys()
        for k, v in want["state"][i].items():
            assert torch.equal(got["state"][n][k], v), (n, k)
    short = {**by_name, "param_groups": [{**by_name["param_groups"][0],
                                          "params": names[:-1]}]}
    with pytest.raises(ValueError, match=f"lists {len(names) - 1} params, the optimizer has "
                                         f"{len(names)}"):
        opt.full_precision_state_dict(short)


@pytest.mark.parametrize("corrupt,match", [
    (lambda e: e.update(square_avg=e["square_avg"][:-1]), "codes"),
    (lambda e: e.pop("square_avg_scale"), "square_avg_scale"),
    (lambda e: e["momentum_buffer_scale"].__setitem__(0, -1.0), "negative"),
    (lambda e: e.update(grad_avg_scale=e["grad_avg_scale"].double()), "float32"),
])
def test_corrupt_quantized_state_is_refused_and_nothing_changes(corrupt, match):
    ps, opt, gen = _trained("8bit", 0)
    _run(opt, ps, gen, 2)
    sd = opt.state_dict()
    before = {k: v.clone() for k, v in opt.state[ps[0]].items() if isinstance(v, torch.Tensor)}
    bad = {**sd, "state": {**sd["state"], 0: {k: v.clone() if isinstance(v, torch.Tensor)
                                             else v for k, v in sd["state"][0].items()}}}
    corrupt(bad["state"][0])
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    for k, v in before.items():
        assert torch.equal(opt.state[ps[0]][k], v)


@pytest.mark.slow
def test_bytes_per_parameter_target_in_torch():
    # 10M params of model-like shapes, counted from opt.state after one step, scales included
    layer = [(384, 384)] * 4 + [(1536, 384), (384, 1536)] + [(384,)] * 6 + [(1536,)]
    shapes = [(12_000, 384)] + layer * 3 + [(384,)]
    n = sum(math.prod(s) for s in shapes)
    for fmt, kw, limit in [("8bit", {}, 1.05), ("4bit", {}, 0.55),
                           ("8bit", dict(momentum=0.9, centered=True), 3.2)]:
        ps = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        opt = RMSprop(ps, state_dtype=fmt, **kw)
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
        total = sum(v.numel() * v.element_size() for st in opt.state.values()
                    for k, v in st.items() if k != "step" and isinstance(v, torch.Tensor))
        assert total / n <= limit, (fmt, kw, total / n)


def test_statistics_and_nonfinite_guard_on_quantized_state():
    p = torch.nn.Parameter(torch.randn(8192))
    opt = RMSprop([p], state_dtype="8bit", track_stats=True)
    p.grad = torch.ones_like(p)
    opt.step()
    stats = opt.stats()["groups"][0]
    # first step from v0 = 0 with g = 1: d = sqrt(0.01) + eps, lr/d = 0.1 everywhere
    assert stats["step_median"] == pytest.approx(0.01 / (0.1 + 1e-8), rel=1e-6)
    before = {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(Exception, match="non-finite"):
        opt.step()
    for k, v in before.items():
        assert torch.equal(opt.state[p][k], v)


# -- torch: stochastic rounding ---------------------------------------------------------------

@pytest.mark.parametrize("dtype,np_dtype", [(torch.bfloat16, BF16), (torch.float16, np.float16)])
@pytest.mark.parametrize("path", ["forloop", "foreach"])
def test_torch_stochastic_rounding_is_the_spec_bit_for_bit(dtype, np_dtype, path, monkeypatch):
    monkeypatch.setitem(torch_optimizer._FOREACH_BATCH, "cpu", 4096)  # sliced: offsets
    gen = torch.Generator().manual_seed(0)
    shapes = [(100, 100), (300,)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    opt = RMSprop(ps, lr=1e-3, stochastic_rounding=True, seed=5, foreach=path == "foreach")
    ref = NumpyRMSprop([p.detach().float().numpy().astype(np_dtype) for p in ps], lr=1e-3,
                       stochastic_rounding=True, seed=5, state_dtype=np.float32)
    for _ in range(5):
        grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        for p, g in zip(ps, grads):
            p.grad = g
        opt.step()
        ref.step([g.float().numpy().astype(np_dtype) for g in grads])
    for p, r in zip(ps, ref.param_groups[0]["params"]):
        np.testing.assert_array_equal(p.detach().float().numpy(), r.astype(np.float32))


def test_torch_stochastic_rounding_resumes_from_a_state_dict():
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(5000, generator=gen).bfloat16()
    grads = [torch.randn(5000, generator=gen).bfloat16() for _ in range(6)]

    def run(w, opt, gs):
        for g in gs:
            w.grad = g
            opt.step()
    a = torch.nn.Parameter(w0.clone())
    run(a, RMSprop([a], lr=1e-4, stochastic_rounding=True, seed=9), grads)
    b = torch.nn.Parameter(w0.clone())
    ob = RMSprop([b], lr=1e-4, stochastic_rounding=True, seed=9)
    run(b, ob, grads[:3])
    buf = io.BytesIO()
    torch.save(ob.state_dict(), buf)
    buf.seek(0)
    c = torch.nn.Parameter(b.detach().clone())
    oc = RMSprop([c], lr=1e-4, stochastic_rounding=True, seed=9)
    oc.load_state_dict(torch.load(buf, weights_only=True))
    run(c, oc, grads[3:])
    assert torch.equal(a, c)


@pytest.mark.parametrize("path", ["forloop", "foreach"])
@pytest.mark.parametrize("source", ["ours, the other rounding", "torch.optim.RMSprop"])
@pytest.mark.parametrize("live_sr", [True, False])
def test_the_live_groups_rounding_decides_whatever_state_it_loads(path, source, live_sr):
    """A load keeps the live group's ``stochastic_rounding`` (README, load_state_dict): an
    optimizer that rounds stochastically gets its own seeds for a state saved without them
    (it rounded to nearest for ever), and one that does not drops the seeds a state brings
    (it rounded stochastically). Oracle: the NumPy spec stepping the same state."""
    if source == "torch.optim.RMSprop" and not live_sr:
        pytest.skip("torch's state holds no seeds to drop")
    gen = torch.Generator().manual_seed(4)
    w0 = torch.randn(3000, generator=gen).bfloat16()
    grads = [torch.randn(3000, generator=gen).bfloat16() for _ in range(5)]
    src = torch.nn.Parameter(w0.clone())
    other = (torch.optim.RMSprop([src], lr=1e-3) if source == "torch.optim.RMSprop" else
             RMSprop([src], lr=1e-3, stochastic_rounding=not live_sr, seed=1))
    for g in grads[:2]:
        src.grad = g.clone()
        other.step()
    sd = copy.deepcopy(other.state_dict())
    p = torch.nn.Parameter(src.detach().clone())
    opt = RMSprop([p], lr=1e-3, stochastic_rounding=live_sr, seed=9,
                  foreach=path == "foreach")
    opt.load_state_dict(sd)
    w = p.detach().float().numpy().astype(BF16)
    st = {"step": 2, "square_avg": sd["state"][0]["square_avg"].float().numpy()}
    if live_sr:
        st["seed"] = codecs.param_seed(9, 0)
    for g in grads[2:]:
        p.grad = g.clone()
        opt.step()
        w, st = spec.step(w, g.float().numpy().astype(BF16), st, Options(lr=1e-3))
    np.testing.assert_array_equal(p.detach().float().numpy(), w.astype(np.float32))
    assert ("sr_seed" in opt.state[p]) == live_sr


# -- peer evidence: bitsandbytes' 8-bit RMSprop drops momentum --------------------------------

@pytest.mark.peer
def test_bitsandbytes_rmsprop8bit_ignores_momentum_where_ours_keeps_it():
    bnb = pytest.importorskip("bitsandbytes")

    def trajectory(make, momentum, steps=20):
        p = torch.nn.Parameter(torch.randn(8192, generator=torch.Generator().manual_seed(0)))
        opt = make([p], momentum)
        gen = torch.Generator().manual_seed(1)
        for _ in range(steps):
            p.grad = torch.randn(8192, generator=gen)
            opt.step()
        return p.detach().clone()

    def theirs(ps, mu):
        return bnb.optim.RMSprop8bit(ps, lr=1e-2, momentum=mu)

    def ours(ps, mu, fmt="8bit"):
        return RMSprop(ps, lr=1e-2, momentum=mu, state_dtype=fmt)

    # bitsandbytes: momentum=0.9 gives the momentum-0 trajectory, bit for bit
    assert torch.equal(trajectory(theirs, 0.9), trajectory(theirs, 0.0))
    # ours: 8-bit momentum follows full-precision momentum (torch.optim.RMSprop as the oracle),
    # far from the momentum-0 trajectory
    start = torch.randn(8192, generator=torch.Generator().manual_seed(0))
    full = trajectory(lambda ps, mu: torch.optim.RMSprop(ps, lr=1e-2, momentum=mu), 0.9)
    q8, q0 = trajectory(ours, 0.9), trajectory(ours, 0.0)
    moved = (full - start).norm()
    assert (q8 - full).norm() <= 0.03 * moved
    assert (q0 - full).norm() >= 0.5 * moved


del itertools


@pytest.mark.parametrize("fmt", ["8bit", "4bit"])
@pytest.mark.parametrize("path", ["fused", "foreach"])
def test_step_size_statistics_come_from_the_denominator_each_path_documents(fmt, path):
    """One step from v0 = 0: the fresh v is (1 - alpha) g^2. The fused kernel reports the
    lr/d the step used (from the fresh v), the unfused paths the lr/d of the v decoded from
    the stored codes (rmsprop/torch/_stats.py); both are computed here in NumPy."""
    gen = torch.Generator().manual_seed(3)
    g = torch.exp(torch.randn(8192, generator=gen) * 3)  # magnitudes spread over decades
    p = torch.nn.Parameter(torch.zeros(8192))
    lr, eps = 1e-2, 1e-8
    opt = RMSprop([p], lr=lr, eps=eps, state_dtype=fmt, track_stats=True,
                  fused=True if path == "fused" else None, foreach=path == "foreach")
    p.grad = g.clone()
    opt.step()
    stats = opt.stats()["groups"][0]
    g32 = g.numpy()
    fresh = np.float32(0.01) * (g32 * g32)
    st = opt.state[p]
    fmt_v = codecs.QUANTIZED[fmt]["square_avg"]
    q = codecs.Quantized(fmt_v, st["square_avg"].numpy(), st["square_avg_scale"].numpy(),
                         (8192,))
    v = fresh if path == "fused" else codecs.decode(q)
    step = lr / (np.sqrt(v.astype(np.float64)) + eps)
    assert stats["step_max"] == pytest.approx(step.max(), rel=1e-5)
    assert stats["step_min"] == pytest.approx(step.min(), rel=1e-5)
    # and the data tells the two apart: the other source's extremes are elsewhere
    other = lr / (np.sqrt((codecs.decode(q) if path == "fused" else fresh).astype(np.float64))
                  + eps)
    assert max(abs(stats["step_max"] / other.max() - 1),
               abs(stats["step_min"] / other.min() - 1)) > 1e-3
