"""The fused CPU kernel (rmsprop.kernels.cpu) against the NumPy reference rmsprop.spec.step.

Every option combination of the rule, float64 (to 1e-12) and float32 (a few ulp), float16 and
bfloat16 params with float32 math, both instruction-set variants, several tensors per call
(including empty and 0-d ones), several steps, the threaded path, AMP unscaling, the in-pass
statistics and the non-finite scan.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rmsprop import spec  # noqa: E402
from rmsprop.kernels import cpu  # noqa: E402
from rmsprop.options import Options  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu.available(),
                                reason=f"CPU kernel unavailable: {cpu.unavailable_reason()}")

SHAPES = [(5, 7), (0,), (), (2, 0, 3), (37,)]


def _isas():
    out = ["base"]
    if cpu.available() and cpu.set_isa("v3"):
        out.append("v3")
    if cpu.available():
        cpu.set_isa("best")
    return out


@pytest.fixture(params=_isas())
def isa(request):
    assert cpu.set_isa(request.param)
    yield request.param
    cpu.set_isa("best")


def option_grid():
    """Every distinct combination of the rule's options (flags that have no effect in a
    combination, e.g. nesterov without momentum, are not repeated). alpha = 0.875 makes
    1 - alpha exact in float32, so the spec's float32 ``1 - alpha`` and the kernel's
    once-rounded float64 one agree and the tolerances below measure the order of operations
    alone (the rounding of 1 - alpha is tested against torch, which rounds it once too)."""
    for eis, init, cen, mom, wd, bc, mx in itertools.product(
            (False, True), (0.0, 1.0), (False, True), ("off", "torch", "tf", "nesterov"),
            ("off", "l2", "decoupled"), (False, True), (False, True)):
        yield dict(lr=0.01, alpha=0.875, eps=1e-3, eps_in_sqrt=eis, initial_square_avg=init,
                   centered=cen, momentum=0.0 if mom == "off" else 0.9,
                   lr_in_momentum=mom in ("tf", "nesterov"), nesterov=mom == "nesterov",
                   weight_decay=0.0 if wd == "off" else 0.1,
                   decoupled_weight_decay=wd == "decoupled", bias_correction=bc, maximize=mx)


def _options(opts: dict) -> Options:
    """Options(**opts), asserting the warning that centered + bias correction from a zero
    square average provokes (the grid includes that combination on purpose)."""
    if opts["centered"] and opts["bias_correction"] and opts["initial_square_avg"] == 0:
        with pytest.warns(RuntimeWarning, match="centered=True with bias_correction=True"):
            return Options(**opts)
    return Options(**opts)


def _c(o: Options, t: int, f) -> float:
    """The bias-correction divisor the way spec.step computes it (in the math precision)."""
    return float(f(1) - f(o.alpha) ** t) if o.bias_correction else 1.0


def _kw(o: Options, t: int, f) -> dict:
    return dict(lr=o.lr, alpha=o.alpha, eps=o.eps, weight_decay=o.weight_decay,
                momentum=o.momentum, centered=o.centered, maximize=o.maximize,
                eps_in_sqrt=o.eps_in_sqrt, lr_in_momentum=o.lr_in_momentum,
                nesterov=o.nesterov, decoupled_weight_decay=o.decoupled_weight_decay,
                bias_correction=_c(o, t, f))


def _start_state(rng, p: np.ndarray, o: Options, t0: int, sdtype) -> spec.State:
    """A mid-run state (v > m^2 by a margin), so centered + bias correction is well
    conditioned: at t = 1 its s = v/c - (m/c)^2 is exactly 0 in real arithmetic and any
    backend's result is rounding noise."""
    st = spec.init_state(p, o, state_dtype=sdtype)
    st["step"] = t0
    m = rng.standard_normal(p.shape) * 0.1
    st["square_avg"] = (m * m + rng.uniform(0.5, 2.0, p.shape)).astype(sdtype)
    if o.centered:
        st["grad_avg"] = m.astype(sdtype)
    if o.momentum > 0:
        st["momentum_buffer"] = (rng.standard_normal(p.shape) * 0.1).astype(sdtype)
    return st


def _torch_state(st: spec.State, p: np.ndarray, sdtype) -> tuple:
    v = torch.from_numpy(np.array(st["square_avg"], dtype=sdtype))
    m = torch.from_numpy(np.array(st.get("grad_avg", np.zeros(p.shape)), dtype=sdtype))
    b = torch.from_numpy(np.array(st.get("momentum_buffer", np.zeros(p.shape)), dtype=sdtype))
    return v, m, b


def _check_grid(dtype, rtol, atol, isa, steps=2, fresh_every=4):
    """The whole grid on the best instruction set; every 4th combination on the baseline."""
    rng = np.random.default_rng(1)
    f = np.dtype(dtype).type
    every = 1 if isa == _isas()[-1] else 4
    for k, opts in enumerate(option_grid()):
        if k % every:
            continue
        o = _options(opts)
        t0 = 0 if (k % fresh_every == 0 and not (o.centered and o.bias_correction)) else 5
        ps = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
        sts = [_start_state(rng, p, o, t0, dtype) if t0 else spec.init_state(p, o)
               for p in ps]
        tp = [torch.from_numpy(p.copy()) for p in ps]
        tv, tm, tb = zip(*[_torch_state(s, p, dtype) for s, p in zip(sts, ps)])
        for t in range(t0 + 1, t0 + steps + 1):
            gs = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
            ref = [spec.step(p, g, s, o) for p, g, s in zip(ps, gs, sts)]
            ps, sts = [r[0] for r in ref], [r[1] for r in ref]
            cpu.fused_step(tp, [torch.from_numpy(g) for g in gs], list(tv),
                           list(tm) if o.centered else None,
                           list(tb) if o.momentum else None, **_kw(o, t, f))
        for i in range(len(SHAPES)):
            msg = f"{np.dtype(dtype).name} {opts} tensor {i}"
            np.testing.assert_allclose(tp[i].numpy(), ps[i], rtol=rtol, atol=atol, err_msg=msg)
            np.testing.assert_allclose(tv[i].numpy(), sts[i]["square_avg"], rtol=rtol,
                                       atol=atol, err_msg=msg)
            if o.centered:
                np.testing.assert_allclose(tm[i].numpy(), sts[i]["grad_avg"], rtol=rtol,
                                           atol=atol, err_msg=msg)
            if o.momentum:
                np.testing.assert_allclose(tb[i].numpy(), sts[i]["momentum_buffer"],
                                           rtol=rtol, atol=atol, err_msg=msg)


def test_option_grid_has_every_variant():
    grid = list(option_grid())
    assert len(grid) == 2 * 2 * 2 * 4 * 3 * 2 * 2
    assert len({tuple(sorted(g.items())) for g in grid}) == len(grid)


def test_float64_matches_spec_over_option_grid(isa):
    _check_grid(np.float64, rtol=1e-12, atol=1e-14, isa=isa)


def test_float32_matches_spec_over_option_grid(isa):
    # a few float32 ulp: FMA contraction and 1/c-multiplication differ from NumPy's rounding
    _check_grid(np.float32, rtol=4 * 2.0 ** -23, atol=4 * 2.0 ** -23, isa=isa)


# ------------------------------ torch.optim.RMSprop, bit for bit ------------------------------
TORCH_OPTIONS = [dict(weight_decay=wd, momentum=mu, centered=cen, maximize=mx)
                 for wd, mu, cen, mx in itertools.product((0.0, 0.1), (0.0, 0.9), (False, True),
                                                          (False, True))]
TORCH_OPTIONS.append(dict(alpha=0.3, centered=True))  # lerp's other branch (weight >= 0.5)


def _ieee_sqrt(monkeypatch) -> None:
    """torch's sqrt replaced by NumPy's, which is correctly rounded (IEEE 754): on builds
    where ATen computes sqrt through MKL's vector library, torch's result is sometimes one
    ulp below the correctly rounded root, and that is the one operation in which the kernel
    (correctly rounded) and torch differ."""
    monkeypatch.setattr(torch.Tensor, "sqrt", lambda t: torch.from_numpy(np.sqrt(t.numpy())))
    monkeypatch.setattr(torch.Tensor, "sqrt_",
                        lambda t: t.copy_(torch.from_numpy(np.sqrt(t.numpy()))))


def _torch_vs_fused(dtype, sizes, steps, opts, seed=0):
    """(torch's params, the kernel's params, torch's square_avgs, the kernel's) after
    ``steps`` steps of torch.optim.RMSprop(foreach=False) and of the fused kernel with the
    same options, from the same params and gradients."""
    gen = torch.Generator().manual_seed(seed)
    p0 = [torch.randn(n, generator=gen, dtype=dtype) for n in sizes]
    grads = [[torch.randn(n, generator=gen, dtype=dtype) for n in sizes] for _ in range(steps)]
    ref = [p.clone().requires_grad_() for p in p0]
    o = dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
             maximize=False)
    o.update(opts)
    opt = torch.optim.RMSprop(ref, foreach=False, **o)
    for gs in grads:
        for p, g in zip(ref, gs):
            p.grad = g
        opt.step()
    ps = [p.clone() for p in p0]
    zeros = lambda: [torch.zeros(n, dtype=dtype) for n in sizes]  # noqa: E731
    vs, ms, bs = zeros(), zeros(), zeros()
    kw = dict(lr=o["lr"], alpha=o["alpha"], eps=o["eps"], weight_decay=o["weight_decay"],
              momentum=o["momentum"], centered=o["centered"], maximize=o["maximize"],
              eps_in_sqrt=False, lr_in_momentum=False, nesterov=False,
              decoupled_weight_decay=False, bias_correction=1.0)
    for gs in grads:
        cpu.fused_step(ps, gs, vs, ms, bs, **kw)
    return ([p.detach() for p in ref], ps, [opt.state[p]["square_avg"] for p in ref], vs)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place (same-sign values)."""
    it = torch.int64 if a.dtype == torch.float64 else torch.int32
    return int((a.view(it).long() - b.view(it).long()).abs().max()) if a.numel() else 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opts", TORCH_OPTIONS, ids=lambda o: ",".join(
    f"{k}={v}" for k, v in o.items() if v) or "defaults")
def test_pytorch_options_bit_identical_to_torch_for_1000_steps(isa, dtype, opts, monkeypatch):
    """The fused step with torch's options is torch.optim.RMSprop's for-loop step bit for
    bit, over 1000 steps, on sizes that end in every vector tail (37, 63), with torch's sqrt
    correctly rounded (see _ieee_sqrt; the next test covers torch's own sqrt)."""
    _ieee_sqrt(monkeypatch)
    ref, got, ref_v, got_v = _torch_vs_fused(dtype, (37, 63), 1000, opts)
    for a, b in zip(ref + ref_v, got + got_v):
        assert torch.equal(a, b), (_ulps(a, b), opts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opts", [{}, dict(centered=True, momentum=0.9, weight_decay=0.1,
                                           maximize=True)])
def test_pytorch_options_bit_identical_on_the_threaded_path(dtype, opts, monkeypatch):
    """1,000,003 elements: the kernel's threaded, chunked path and torch's own threading
    (each thread's range ends in its own vector tail) give the same bits."""
    _ieee_sqrt(monkeypatch)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref, got, ref_v, got_v = _torch_vs_fused(dtype, (1_000_003,), 3, opts)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(ref + ref_v, got + got_v):
        assert torch.equal(a, b), (_ulps(a, b), opts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_only_torchs_sqrt_differs(dtype):
    """Against torch as it is: one step from the same state differs only in elements where
    torch's sqrt of the new square_avg is not NumPy's correctly rounded one, and there by
    about one ulp of the update; over 1000 steps the params stay within 4 machine epsilons
    of the largest param (measured: up to 1.2 over three seeds; the one-ulp differences in d
    feed back through v and p). Where torch's sqrt is correctly rounded, both are exact."""
    gen = torch.Generator().manual_seed(7)
    n = 100_000
    p = torch.randn(n, generator=gen, dtype=dtype)
    g = torch.randn(n, generator=gen, dtype=dtype)
    v0 = torch.rand(n, generator=gen, dtype=dtype)
    ref = p.clone().requires_grad_()
    opt = torch.optim.RMSprop([ref], lr=0.01, foreach=False)
    ref.grad = g
    opt.step()
    opt.state[ref]["square_avg"].copy_(v0)
    ref.data.copy_(p)
    opt.step()  # from (p, v0): the step under test
    v = opt.state[ref]["square_avg"]
    differs = v.sqrt() != torch.from_numpy(np.sqrt(v.numpy()))
    got, got_v = p.clone(), v0.clone()
    cpu.fused_step([got], [g], [got_v], None, None, lr=0.01, alpha=0.99, eps=1e-8,
                   weight_decay=0.0, momentum=0.0, centered=False, maximize=False,
                   eps_in_sqrt=False, lr_in_momentum=False, nesterov=False,
                   decoupled_weight_decay=False, bias_correction=1.0)
    assert torch.equal(got_v, v)
    same = got == ref.detach()
    assert torch.equal(same, ~differs | same)  # every differing element has a differing sqrt
    # one ulp of sqrt moves u = lr*g/d by about one ulp of u, then p - u rounds once more
    u = 0.01 * g.double().abs() / v.double().sqrt()
    err = (got.double() - ref.detach().double()).abs()
    ulp = torch.finfo(dtype).eps
    assert bool((err <= ulp * (1.5 * u + got.double().abs())).all())
    assert 0 < int(differs.sum()) or torch.equal(got, ref.detach())
    ref_t, got_t, _, _ = _torch_vs_fused(dtype, (1000,), 1000, {})
    drift = (ref_t[0].double() - got_t[0].double()).abs().max()
    assert drift <= 4 * torch.finfo(dtype).eps * ref_t[0].double().abs().max()


def test_fused_multiply_add_rounds_once_on_every_instruction_set(isa, monkeypatch):
    """g + wd*p is one fused multiply-add in torch (ATen's fmadd) and in the kernel, whose
    baseline build computes it in double without the instruction. Inputs built so that
    wd*p + g often lies just off a point halfway between two floats, where rounding to double
    and then to float (two roundings) would be wrong: params 24-bit integers, wd a 12-bit
    integer, gradients +-2^-k. One torch step is the oracle (sqrt made IEEE, see _ieee_sqrt)."""
    _ieee_sqrt(monkeypatch)
    rng = np.random.default_rng(11)
    n = 200_000
    p = torch.from_numpy(rng.integers(1, 2 ** 24, n).astype(np.float32))
    g = torch.from_numpy((rng.choice([-1.0, 1.0, -3.0], n)
                          * 2.0 ** -rng.integers(0, 30, n)).astype(np.float32))
    wd = 3001.0
    two_roundings = (p.double() * wd + g.double()).float()
    assert (two_roundings != g.add(p, alpha=wd)).sum() > 10  # the trap is there (37 times)
    ref = p.clone().requires_grad_()
    ref.grad = g.clone()
    opt = torch.optim.RMSprop([ref], lr=1e-3, weight_decay=wd, foreach=False)
    opt.step()
    got, v = p.clone(), torch.zeros(n)
    cpu.fused_step([got], [g], [v], None, None, lr=1e-3, alpha=0.99, eps=1e-8,
                   weight_decay=wd, momentum=0.0, centered=False, maximize=False,
                   eps_in_sqrt=False, lr_in_momentum=False, nesterov=False,
                   decoupled_weight_decay=False, bias_correction=1.0)
    assert torch.equal(v, opt.state[ref]["square_avg"])
    assert torch.equal(got, ref.detach())


def test_one_minus_alpha_is_rounded_once():
    """v after one step from 0 with g = 1 is (1 - alpha) itself: the double 1 - 0.99 rounded
    once to float32 (0.0099999998), not 1 - float32(0.99) (0.0099999905)."""
    for dtype in (torch.float32, torch.float64):
        p, v = torch.zeros(5, dtype=dtype), torch.zeros(5, dtype=dtype)
        g = torch.ones(5, dtype=dtype)
        cpu.fused_step([p], [g], [v], None, None, **_kw(Options(alpha=0.99), 1, np.float64))
        want = torch.full((5,), 1 - 0.99, dtype=dtype)
        assert torch.equal(v, want), (v[0].item(), want[0].item())
    assert np.float32(1 - 0.99) != np.float32(1) - np.float32(0.99)  # the case is a real one


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (RNE) and back, via torch."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(
        torch.bfloat16).float().numpy()


@pytest.mark.parametrize("pdtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("state", ["float32", "same"])
@pytest.mark.parametrize("opts", [{}, dict(centered=True, momentum=0.9),
                                  dict(eps_in_sqrt=True, weight_decay=0.1, maximize=True),
                                  dict(momentum=0.9, nesterov=True, lr_in_momentum=True,
                                       weight_decay=0.1, decoupled_weight_decay=True)])
def test_16bit_params_float32_math_one_rounding(isa, pdtype, state, opts):
    """Reference: spec.step in float32 on the same 16-bit inputs, rounded once to 16 bits
    (and, for 16-bit state, the state rounded once per step). Allowed: one 16-bit ulp, where
    float32 results a few ulp apart straddle a rounding boundary."""
    rng = np.random.default_rng(2)
    o = Options(lr=0.01, alpha=0.9, eps=1e-3, **opts)
    tdt = getattr(torch, pdtype)
    rnd = _bf16 if pdtype == "bfloat16" else (lambda x: x.astype(np.float16).astype(np.float32))
    sdt_t = torch.float32 if state == "float32" else tdt
    shapes = [(300,), (0,), (), (1030,)]
    ps = [rnd(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    sts = [_start_state(rng, p, o, 3, np.float32) for p in ps]
    for st in sts:  # make the starting state representable in the state dtype
        for key in ("square_avg", "grad_avg", "momentum_buffer"):
            if key in st and state == "same":
                st[key] = rnd(st[key])
    tp = [torch.from_numpy(p).to(tdt) for p in ps]
    tv, tm, tb = zip(*[[x.to(sdt_t) for x in _torch_state(s, p, np.float32)]
                       for s, p in zip(sts, ps)])
    gs = [rnd(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    ref = [spec.step(p, g, s, o) for p, g, s in zip(ps, gs, sts)]
    cpu.fused_step(tp, [torch.from_numpy(g).to(tdt) for g in gs], list(tv), list(tm),
                   list(tb), **_kw(o, 4, np.float32))
    ulp = 2.0 ** -7 if pdtype == "bfloat16" else 2.0 ** -10
    for i, (p_ref, st_ref) in enumerate(ref):
        exact = rnd(p_ref)
        got = tp[i].float().numpy()
        np.testing.assert_allclose(got, exact, rtol=ulp, atol=1e-6, err_msg=f"param {i}")
        # most elements are bit-identical to the once-rounded reference
        if exact.size > 100:
            assert np.mean(got == exact) > 0.97
        v_ref = st_ref["square_avg"] if state == "float32" else rnd(st_ref["square_avg"])
        tol = 1e-6 if state == "float32" else ulp
        np.testing.assert_allclose(tv[i].float().numpy(), v_ref, rtol=tol, atol=1e-7)


def test_float16_stays_finite_where_torch_overflows(isa):
    """fp16 params, tiny gradients: in fp16 g^2 and eps underflow to 0 and torch divides by 0;
    with float32 state and math the step is finite and equals the float32 reference."""
    g = np.full(64, 1e-4, dtype=np.float16)
    p0 = np.linspace(-1, 1, 64).astype(np.float16)
    tp = torch.from_numpy(p0.copy()).requires_grad_()
    tp.grad = torch.from_numpy(g.copy())
    torch.optim.RMSprop([tp], lr=0.01, foreach=False).step()
    assert not torch.isfinite(tp).all()  # the failure this guards against

    o = Options(lr=0.01)
    ref, _ = spec.step(p0, g, spec.init_state(p0, o, state_dtype=np.float32), o)
    p = torch.from_numpy(p0.copy())
    v = torch.zeros(64, dtype=torch.float32)
    cpu.fused_step([p], [torch.from_numpy(g)], [v], None, None, **_kw(o, 1, np.float32))
    assert torch.isfinite(p).all()
    np.testing.assert_array_equal(p.numpy(), ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threaded_path_across_chunk_and_tensor_boundaries(isa, dtype):
    """Enough elements for the multi-threaded chunked path (chunks cross tensor boundaries
    and skip empty tensors); centered + Nesterov momentum + coupled weight decay + stats."""
    rng = np.random.default_rng(3)
    shapes = [(70001,), (3,), (0,), (100000,), (65536,), (), (9, 7)]
    o = Options(lr=0.01, alpha=0.95, eps=1e-6, centered=True, momentum=0.8, nesterov=True,
                lr_in_momentum=True, weight_decay=0.01)
    ps = [rng.standard_normal(s).astype(dtype) for s in shapes]
    sts = [_start_state(rng, p, o, 2, dtype) for p in ps]
    tp = [torch.from_numpy(p.copy()) for p in ps]
    tv, tm, tb = zip(*[_torch_state(s, p, dtype) for s, p in zip(sts, ps)])
    gs = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ref = [spec.step(p, g, s, o) for p, g, s in zip(ps, gs, sts)]
    stats = torch.zeros(len(shapes), 6, dtype=torch.float64)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cpu.fused_step(tp, [torch.from_numpy(g) for g in gs], list(tv), list(tm), list(tb),
                       stats=stats, **_kw(o, 3, np.dtype(dtype).type))
    finally:
        torch.set_num_threads(old)
    tol = 1e-12 if dtype == np.float64 else 4 * 2.0 ** -23
    for i in range(len(shapes)):
        np.testing.assert_allclose(tp[i].numpy(), ref[i][0], rtol=tol, atol=tol)
        np.testing.assert_allclose(tb[i].numpy(), ref[i][1]["momentum_buffer"], rtol=tol,
                                   atol=tol)
        n = ps[i].size
        assert stats[i, 0].item() >= 0 and (n > 0) == (stats[i, 0].item() > 0)
    assert stats[2].tolist() == [0.0, 0.0, 0.0, math.inf, -math.inf, 0.0]


def _stats_oracle(p, grad, v, m, b, o: Options, c: float, inv_scale: float):
    """The six statistics from the closed-form rule, in float64."""
    p, grad, v = (np.asarray(x, dtype=np.float64) for x in (p, grad, v))
    g = grad * inv_scale * (-1 if o.maximize else 1)
    if o.weight_decay and not o.decoupled_weight_decay:
        g = g + o.weight_decay * p
    if o.weight_decay and o.decoupled_weight_decay:
        p = p * (1 - o.lr * o.weight_decay)
    v = o.alpha * v + (1 - o.alpha) * g * g
    if o.centered:
        m = o.alpha * np.asarray(m, np.float64) + (1 - o.alpha) * g
        s = np.maximum(v / c - (m / c) ** 2, 0)
    else:
        s = v / c
    d = np.sqrt(s + o.eps) if o.eps_in_sqrt else np.sqrt(s) + o.eps
    n = g / d
    if o.momentum:
        k = o.lr if o.lr_in_momentum else 1.0
        b = o.momentum * np.asarray(b, np.float64) + k * n
        u = o.momentum * b + k * n if o.nesterov else b
        u = u if o.lr_in_momentum else o.lr * u
    else:
        u = o.lr * n
    p = p - u
    dom = (o.eps > s) if o.eps_in_sqrt else (o.eps > np.sqrt(s))
    return [np.sum(g * g), np.sum(u * u), np.sum(p * p), np.min(o.lr / d), np.max(o.lr / d),
            np.sum(dom)]


@pytest.mark.parametrize("opts", [dict(eps=0.3), dict(eps=0.3, eps_in_sqrt=True,
                                                     weight_decay=0.1, maximize=True),
                                  dict(eps=0.5, centered=True, momentum=0.9,
                                       bias_correction=True)])
@pytest.mark.parametrize("pdtype", [torch.float32, torch.float64, torch.bfloat16])
def test_stats_match_closed_form(isa, opts, pdtype):
    rng = np.random.default_rng(4)
    o = _options({"centered": False, "bias_correction": False, "initial_square_avg": 0.0,
                  "lr": 0.01, "alpha": 0.9, **opts})
    shapes = [(3000,), (17,), (4, 5)]
    mk = lambda s, scale=1.0: torch.from_numpy(rng.standard_normal(s) * scale).to(pdtype)  # noqa
    ps = [mk(s) for s in shapes]
    gs = [mk(s) for s in shapes]
    sdt = torch.float64 if pdtype == torch.float64 else torch.float32
    vs = [torch.from_numpy(rng.uniform(0.0, 0.5, s)).to(sdt) for s in shapes]
    ms = [torch.from_numpy(rng.standard_normal(s) * 0.1).to(sdt) for s in shapes]
    bs = [torch.from_numpy(rng.standard_normal(s) * 0.1).to(sdt) for s in shapes]
    c = 1 - 0.9 ** 3 if o.bias_correction else 1.0
    want = [_stats_oracle(p.double().numpy(), g.double().numpy(), v.double().numpy(),
                          m.double().numpy(), b.double().numpy(), o, c, 1 / 8)
            for p, g, v, m, b in zip(ps, gs, vs, ms, bs)]
    stats = torch.full((len(shapes), 6), 123.0, dtype=torch.float64)
    kw = _kw(o, 3, np.float64)
    kw["bias_correction"] = c
    old = [p.to(torch.float64, copy=True) for p in ps]
    cpu.fused_step(ps, gs, vs, ms if o.centered else None, bs if o.momentum else None,
                   grad_scale=8.0, stats=stats, **kw)
    rtol = 1e-12 if pdtype == torch.float64 else 1e-5
    for i in range(len(shapes)):
        # u and p_new are the applied change and the param as stored (rmsprop.torch._stats):
        # the closed form's unrounded update only up to the rounding of the stored params
        new = ps[i].double()
        want[i][1:3] = [float((old[i] - new).square().sum()), float(new.square().sum())]
        np.testing.assert_allclose(stats[i, :5].numpy(), want[i][:5], rtol=rtol)
        # the count can differ only where s sits within rounding of the threshold
        assert abs(stats[i, 5].item() - want[i][5]) <= max(1, 1e-3 * ps[i].numel())
        assert 0 < want[i][5] < ps[i].numel() or i == 2  # the threshold is exercised


@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16, torch.float64])
def test_same_step_with_or_without_stats_on_every_instruction_set(pdtype):
    """Collecting statistics must not perturb training, and the vectorised build must not
    differ from the baseline one: every multiply and add is rounded on its own (no fused
    multiply-add contraction), so over the whole option grid the updates are bit-identical
    with stats on or off, on every instruction set this machine runs."""
    rng = np.random.default_rng(12)
    shapes = [(1000,), (3, 7)]
    sdt = torch.float64 if pdtype == torch.float64 else torch.float32
    for opts in option_grid():
        o = _options(opts)
        p0 = [torch.from_numpy(rng.standard_normal(s)).to(pdtype) for s in shapes]
        g = [torch.from_numpy(rng.standard_normal(s)).to(pdtype) for s in shapes]
        st0 = [[torch.from_numpy(rng.uniform(0.5, 2.0, s)).to(sdt) for s in shapes],
               [torch.from_numpy(rng.standard_normal(s) * 0.1).to(sdt) for s in shapes],
               [torch.from_numpy(rng.standard_normal(s) * 0.1).to(sdt) for s in shapes]]
        results = []
        for which in _isas():
            for stats in (None, torch.empty(len(shapes), 6, dtype=torch.float64)):
                assert cpu.set_isa(which)
                p = [t.clone() for t in p0]
                v, m, b = ([t.clone() for t in ts] for ts in st0)
                cpu.fused_step(p, g, v, m if o.centered else None, b if o.momentum else None,
                               stats=stats, **_kw(o, 5, np.float32))
                results.append((which, stats is not None, p + v + m + b))
        cpu.set_isa("best")
        (_, _, first), rest = results[0], results[1:]
        for which, with_stats, ts in rest:
            assert all(torch.equal(x, y) for x, y in zip(first, ts)), (which, with_stats, opts)


@pytest.mark.parametrize("scale", [1024.0, 3.0])
def test_grad_scale_unscales_like_gradscaler(isa, scale):
    """grad_scale=s is the reference step on grad * float32(1/s) (GradScaler multiplies by
    the float32 reciprocal; for powers of two that is exactly grad / s)."""
    rng = np.random.default_rng(5)
    o = Options(lr=0.01, alpha=0.875, momentum=0.5, weight_decay=0.1)  # see option_grid
    p = rng.standard_normal(500).astype(np.float32)
    g = (rng.standard_normal(500) * scale).astype(np.float32)
    ref, st = spec.step(p, g * np.float32(1.0 / scale), spec.init_state(p, o), o)
    tp, v, b = torch.from_numpy(p.copy()), torch.zeros(500), torch.zeros(500)
    cpu.fused_step([tp], [torch.from_numpy(g)], [v], None, [b], grad_scale=scale,
                   **_kw(o, 1, np.float32))
    np.testing.assert_allclose(tp.numpy(), ref, rtol=4 * 2.0 ** -23, atol=1e-7)
    # v = (1-alpha) g^2 with g = grad/s + wd*p: the kernel adds wd*p with one rounding (as
    # torch does), the spec with two, so where the two terms cancel g differs by a few ulp
    # of the terms, not of g: the bound is relative to the terms' size.
    terms = (1 - o.alpha) * (np.abs(g * np.float32(1.0 / scale)) + o.weight_decay * np.abs(p)) ** 2
    err = np.abs(v.numpy().astype(np.float64) - st["square_avg"])
    assert np.all(err <= 4 * 2.0 ** -23 * (np.abs(st["square_avg"]) + terms))


def test_bad_input_is_rejected_and_nothing_changes():
    p = [torch.ones(4), torch.ones(3)]
    kw = _kw(Options(), 1, np.float32)
    cases = [
        (dict(grads=[torch.ones(4)]), ValueError, "grads has 1 tensors"),
        (dict(grads=[torch.ones(4), torch.ones(5)]), ValueError, "grads\\[1\\] has 5 elements"),
        (dict(grads=[torch.ones(4), torch.ones(3, dtype=torch.float64)]), TypeError, "dtype"),
        (dict(grads=[torch.ones(4), torch.ones(6)[::2]]), ValueError, "not contiguous"),
        (dict(sq=[torch.ones(4, dtype=torch.float16), torch.ones(3, dtype=torch.float16)]),
         TypeError, "state dtype"),
    ]
    for over, exc, match in cases:
        sq = over.get("sq", [torch.zeros(4), torch.zeros(3)])
        with pytest.raises(exc, match=match):
            cpu.fused_step(p, over.get("grads", [torch.ones(4), torch.ones(3)]), sq, None, None,
                           **kw)
        assert all((t == 1).all() for t in p) and all((s == 0).all() for s in sq[:1]
                                                       if s.dtype == torch.float32)
    with pytest.raises(ValueError, match="centered=True needs grad_avgs"):
        cpu.fused_step(p, p, p, None, None, **{**kw, "centered": True})
    with pytest.raises(TypeError, match="unsupported dtype"):
        cpu.fused_step([torch.ones(2, dtype=torch.int32)], [torch.ones(2, dtype=torch.int32)],
                       [torch.ones(2, dtype=torch.int32)], None, None, **kw)
    with pytest.raises(ValueError, match="stats must be"):
        cpu.fused_step(p, p, p, None, None, stats=torch.zeros(2, 5, dtype=torch.float64), **kw)
    cpu.fused_step([], [], [], None, None, **kw)  # an empty list is a no-op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16,
                                   torch.bfloat16, torch.complex64])
def test_first_nonfinite(isa, dtype):
    def batch():
        return [torch.zeros(10, dtype=dtype), torch.zeros(0, dtype=dtype),
                torch.zeros((), dtype=dtype), torch.zeros(300_000, dtype=dtype),
                torch.zeros(5, dtype=dtype)]
    assert cpu.first_nonfinite(batch()) == -1
    assert cpu.first_nonfinite([]) == -1
    for idx, pos, val in [(0, 3, math.inf), (2, (), math.nan), (3, 299_999, -math.inf),
                          (3, 70_000, math.nan), (4, 4, math.nan)]:
        for threads in (1, 2):
            xs = batch()
            xs[idx][pos] = val
            if idx < 4:  # a later tensor with a non-finite value must not win
                xs[4][0] = math.inf
            old = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                assert cpu.first_nonfinite(xs) == idx
            finally:
                torch.set_num_threads(old)
    xs = batch()
    xs[3][123] = 65504.0 if dtype == torch.float16 else 1e30  # large but finite
    assert cpu.first_nonfinite(xs) == -1
    assert cpu.first_nonfinite([None, torch.full((2,), math.nan, dtype=dtype)]) == 1


def test_kernel_is_built_and_loadable():
    """With a C compiler present (CI), the kernel must load; a reason is given otherwise."""
    assert cpu.available(), cpu.unavailable_reason()
    assert cpu.unavailable_reason() == ""
    assert cpu.isa() in ("x86-64", "x86-64-v3")
