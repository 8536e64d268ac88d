"""The Triton kernel (rmsprop.kernels.triton) against the NumPy reference rmsprop.spec.step,
run on CPU tensors by Triton's interpreter (TRITON_INTERPRET=1), so it runs in CI without a
GPU. Skipped when triton is not installed. The interpreter is slow (~0.1 s per launch), so the
option grid is covered by a few combinations that switch every option on at least once."""

from __future__ import annotations

import importlib
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from rmsprop import spec  # noqa: E402
from rmsprop.options import Options  # noqa: E402


@pytest.fixture(scope="module")
def tk():
    """The kernel module, (re)imported with the interpreter on: triton.jit decides between
    compiled and interpreted when the module is imported."""
    from triton.runtime.interpreter import InterpretedFunction

    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import rmsprop.kernels.triton as mod
    reloaded = not isinstance(mod._rmsprop_kernel, InterpretedFunction)
    if reloaded:  # imported earlier in compiled mode
        mod = importlib.reload(mod)
    assert mod.available(), mod.unavailable_reason()
    yield mod
    if old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = old
    if reloaded:
        importlib.reload(mod)


COMBOS = [
    {},
    dict(centered=True, bias_correction=True),
    dict(momentum=0.9, weight_decay=0.1),
    dict(momentum=0.9, nesterov=True, lr_in_momentum=True, eps_in_sqrt=True,
         initial_square_avg=1.0),
    dict(weight_decay=0.1, decoupled_weight_decay=True, maximize=True, centered=True,
         momentum=0.5),
    dict(eps_in_sqrt=True, bias_correction=True, maximize=True, momentum=0.9,
         lr_in_momentum=True),
]
SHAPES = [(40,), (0,), (), (3, 5)]


def _kw(o: Options, t: int, f) -> dict:
    c = float(f(1) - f(o.alpha) ** t) if o.bias_correction else 1.0
    return dict(lr=o.lr, alpha=o.alpha, eps=o.eps, weight_decay=o.weight_decay,
                momentum=o.momentum, centered=o.centered, maximize=o.maximize,
                eps_in_sqrt=o.eps_in_sqrt, lr_in_momentum=o.lr_in_momentum,
                nesterov=o.nesterov, decoupled_weight_decay=o.decoupled_weight_decay,
                bias_correction=c)


def _state(rng, p, o, dtype):
    """A mid-run state (v well above m^2, so centered + bias correction is well conditioned)."""
    st = spec.init_state(p, o, state_dtype=dtype)
    st["step"] = 4
    m = rng.standard_normal(p.shape) * 0.1
    st["square_avg"] = np.asarray(m * m + rng.uniform(0.5, 2.0, p.shape), dtype=dtype)
    st["grad_avg"] = np.asarray(m, dtype=dtype)
    st["momentum_buffer"] = np.asarray(rng.standard_normal(p.shape) * 0.1, dtype=dtype)
    return st


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("opts", COMBOS)
def test_matches_spec(tk, dtype, opts):
    rng = np.random.default_rng(7)
    o = Options(lr=0.01, alpha=0.9, eps=1e-3, **opts)
    ps = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    gs = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    sts = [_state(rng, p, o, dtype) for p in ps]
    ref = [spec.step(p, g, s, o) for p, g, s in zip(ps, gs, sts)]
    tp = [torch.from_numpy(p.copy()) for p in ps]
    tv, tm, tb = ([torch.from_numpy(np.array(s[k])) for s in sts]
                  for k in ("square_avg", "grad_avg", "momentum_buffer"))
    tk.fused_step(tp, [torch.from_numpy(g) for g in gs], tv, tm if o.centered else None,
                  tb if o.momentum else None, **_kw(o, 5, np.dtype(dtype).type))
    tol = 1e-12 if dtype == np.float64 else 4 * 2.0 ** -23
    for i, (p_ref, st_ref) in enumerate(ref):
        np.testing.assert_allclose(tp[i].numpy(), p_ref, rtol=tol, atol=tol)
        np.testing.assert_allclose(tv[i].numpy(), st_ref["square_avg"], rtol=tol, atol=tol)
        if o.centered:
            np.testing.assert_allclose(tm[i].numpy(), st_ref["grad_avg"], rtol=tol, atol=tol)
        if o.momentum:
            np.testing.assert_allclose(tb[i].numpy(), st_ref["momentum_buffer"], rtol=tol,
                                       atol=tol)


@pytest.mark.parametrize("pdtype,state", [("bfloat16", torch.float32),
                                          ("float16", torch.float32),
                                          ("bfloat16", torch.bfloat16)])
def test_16bit_params_float32_math(tk, pdtype, state):
    """Reference: spec.step in float32 on the same 16-bit inputs, rounded once to 16 bits;
    at most one 16-bit ulp apart (float32 results a few ulp apart straddle a boundary)."""
    rng = np.random.default_rng(8)
    tdt = getattr(torch, pdtype)
    o = Options(lr=0.01, alpha=0.9, eps=1e-3, momentum=0.9, centered=True)
    p16 = torch.from_numpy(rng.standard_normal(300).astype(np.float32)).to(tdt)
    g16 = torch.from_numpy(rng.standard_normal(300).astype(np.float32)).to(tdt)
    st = _state(rng, p16.float().numpy(), o, np.float32)
    for k in ("square_avg", "grad_avg", "momentum_buffer"):  # representable in the state dtype
        st[k] = torch.from_numpy(st[k]).to(state).float().numpy()
    p_ref, st_ref = spec.step(p16.float().numpy(), g16.float().numpy(), st, o)
    v, m, b = (torch.from_numpy(st[k]).to(state)
               for k in ("square_avg", "grad_avg", "momentum_buffer"))
    p = p16.clone()
    tk.fused_step([p], [g16], [v], [m], [b], **_kw(o, 5, np.float32))
    exact = torch.from_numpy(p_ref).to(tdt).float().numpy()
    ulp = 2.0 ** -7 if pdtype == "bfloat16" else 2.0 ** -10
    np.testing.assert_allclose(p.float().numpy(), exact, rtol=ulp, atol=1e-6)
    assert np.mean(p.float().numpy() == exact) > 0.97


def test_stats_grad_scale_and_first_nonfinite(tk):
    rng = np.random.default_rng(9)
    o = Options(lr=0.01, alpha=0.9, eps=0.3)
    shapes = [(300,), (0,), (7,)]
    ps = [rng.standard_normal(s) for s in shapes]
    gs = [rng.standard_normal(s) * 4.0 for s in shapes]
    vs = [rng.uniform(0.0, 0.5, s) for s in shapes]
    tp = [torch.from_numpy(p.copy()) for p in ps]
    tv = [torch.from_numpy(v.copy()) for v in vs]
    stats = torch.full((3, 6), 5.0, dtype=torch.float64)
    tk.fused_step(tp, [torch.from_numpy(g) for g in gs], tv, None, None, grad_scale=4.0,
                  stats=stats, **_kw(o, 1, np.float64))
    for i, (p, g, v) in enumerate(zip(ps, gs, vs)):
        ref, _ = spec.step(p, g / 4.0, {"step": 0, "square_avg": v}, o)
        np.testing.assert_allclose(tp[i].numpy(), ref, rtol=1e-12, atol=1e-14)
        if p.size == 0:
            assert stats[i].tolist() == [0.0, 0.0, 0.0, math.inf, -math.inf, 0.0]
            continue
        gg = g / 4.0  # closed form of the six statistics
        vv = o.alpha * v + (1 - o.alpha) * gg * gg
        d = np.sqrt(vv) + o.eps
        u = o.lr * gg / d
        want = [np.sum(gg * gg), np.sum(u * u), np.sum((p - u) ** 2), np.min(o.lr / d),
                np.max(o.lr / d), np.sum(o.eps > np.sqrt(vv))]
        np.testing.assert_allclose(stats[i].numpy(), want, rtol=1e-10)
    xs = [torch.zeros(5), None, torch.zeros(0), torch.ones(1500), torch.zeros(2)]
    assert tk.first_nonfinite(xs) == -1
    xs[3][1200] = math.nan
    xs[4][0] = math.inf
    assert tk.first_nonfinite(xs) == 3
