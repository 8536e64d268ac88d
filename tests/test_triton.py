"""The Triton kernel (rmsprop.kernels.triton) against the NumPy reference rmsprop.spec.step,
run on CPU tensors by Triton's interpreter (TRITON_INTERPRET=1), so it runs in CI without a
GPU, and compiled on CUDA tensors as well where a CUDA device is present (the same tests,
parametrized by backend). Skipped when triton is not installed. The interpreter is slow
(~0.1 s per launch), so the option grid is covered by a few combinations that switch every
option on at least once."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from rmsprop import spec  # noqa: E402
from rmsprop.options import Options  # noqa: E402


@pytest.fixture
def dev(tk) -> str:
    """Where the tensors of a test live: CPU for the interpreter, else CUDA."""
    from triton.runtime.interpreter import InterpretedFunction
    return "cpu" if isinstance(tk._rmsprop_kernel, InterpretedFunction) else "cuda"


def _on(dev: str, a) -> torch.Tensor:
    return torch.from_numpy(np.array(a)).to(dev)


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
def test_matches_spec(tk, dev, dtype, opts):
    rng = np.random.default_rng(7)
    if opts.get("centered") and opts.get("bias_correction"):
        with pytest.warns(RuntimeWarning, match="centered=True with bias_correction=True"):
            o = Options(lr=0.01, alpha=0.9, eps=1e-3, **opts)
    else:
        o = Options(lr=0.01, alpha=0.9, eps=1e-3, **opts)
    ps = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    gs = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    sts = [_state(rng, p, o, dtype) for p in ps]
    ref = [spec.step(p, g, s, o) for p, g, s in zip(ps, gs, sts)]
    tp = [_on(dev, p) for p in ps]
    tv, tm, tb = ([_on(dev, s[k]) for s in sts]
                  for k in ("square_avg", "grad_avg", "momentum_buffer"))
    tk.fused_step(tp, [_on(dev, g) for g in gs], tv, tm if o.centered else None,
                  tb if o.momentum else None, **_kw(o, 5, np.dtype(dtype).type))
    tol = 1e-12 if dtype == np.float64 else 4 * 2.0 ** -23
    for i, (p_ref, st_ref) in enumerate(ref):
        np.testing.assert_allclose(tp[i].cpu().numpy(), p_ref, rtol=tol, atol=tol)
        np.testing.assert_allclose(tv[i].cpu().numpy(), st_ref["square_avg"], rtol=tol,
                                   atol=tol)
        if o.centered:
            np.testing.assert_allclose(tm[i].cpu().numpy(), st_ref["grad_avg"], rtol=tol,
                                       atol=tol)
        if o.momentum:
            np.testing.assert_allclose(tb[i].cpu().numpy(), st_ref["momentum_buffer"], rtol=tol,
                                       atol=tol)


TORCH_COMBOS = [{}, dict(weight_decay=0.1, momentum=0.9), dict(centered=True, maximize=True),
                dict(centered=True, momentum=0.9, weight_decay=0.1), dict(alpha=0.3, centered=True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opts", TORCH_COMBOS)
def test_torch_options_same_bits_as_the_cpu_kernel(tk, dev, dtype, opts):
    """With torch's options both kernels perform torch.optim.RMSprop's operations with the
    same roundings (the CPU kernel is tested bit for bit against torch itself in
    test_kernels.py), so the Triton step gives the CPU kernel's bits, sizes ending in every
    tail included."""
    from rmsprop.kernels import cpu
    if not cpu.available():
        pytest.skip(cpu.unavailable_reason())
    gen = torch.Generator().manual_seed(3)
    sizes = (37, 63, 1000)
    o = dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
             maximize=False, eps_in_sqrt=False, lr_in_momentum=False, nesterov=False,
             decoupled_weight_decay=False, bias_correction=1.0)
    o.update(opts)
    p0 = [torch.randn(n, generator=gen, dtype=dtype) for n in sizes]
    state0 = [[torch.rand(n, generator=gen, dtype=dtype) for n in sizes],
              [torch.randn(n, generator=gen, dtype=dtype) * 0.1 for n in sizes],
              [torch.randn(n, generator=gen, dtype=dtype) * 0.1 for n in sizes]]
    grads = [[torch.randn(n, generator=gen, dtype=dtype) for n in sizes] for _ in range(2)]
    want = [t.clone() for t in p0]
    wv, wm, wb = ([t.clone() for t in ts] for ts in state0)
    got = [t.to(dev) for t in p0]
    gv, gm, gb = ([t.to(dev) for t in ts] for ts in state0)
    for gs in grads:
        cpu.fused_step(want, gs, wv, wm, wb, **o)
        tk.fused_step(got, [g.to(dev) for g in gs], gv, gm, gb, **o)
    for a, b in zip(want + wv + wm + wb, got + gv + gm + gb):
        assert torch.equal(a, b.cpu()), opts


def test_one_minus_alpha_rounded_once(tk, dev):
    """v after one step from 0 with g = 1 is 1 - alpha: the float64 1 - 0.99 rounded once to
    float32 (0.0099999998), not 1 - float32(0.99) (0.0099999905)."""
    p, g, v = (_on(dev, np.zeros(8, np.float32)), _on(dev, np.ones(8, np.float32)),
               _on(dev, np.zeros(8, np.float32)))
    tk.fused_step([p], [g], [v], None, None, **_kw(Options(alpha=0.99), 1, np.float32))
    assert (v.cpu().numpy() == np.float32(1 - 0.99)).all()
    assert np.float32(1 - 0.99) != np.float32(1) - np.float32(0.99)


@pytest.mark.parametrize("pdtype,state", [("bfloat16", torch.float32),
                                          ("float16", torch.float32),
                                          ("bfloat16", torch.bfloat16)])
def test_16bit_params_float32_math(tk, dev, pdtype, state):
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
    v, m, b = (torch.from_numpy(st[k]).to(dev, state)
               for k in ("square_avg", "grad_avg", "momentum_buffer"))
    p = p16.to(dev)
    tk.fused_step([p], [g16.to(dev)], [v], [m], [b], **_kw(o, 5, np.float32))
    p = p.cpu()
    exact = torch.from_numpy(p_ref).to(tdt).float().numpy()
    ulp = 2.0 ** -7 if pdtype == "bfloat16" else 2.0 ** -10
    np.testing.assert_allclose(p.float().numpy(), exact, rtol=ulp, atol=1e-6)
    assert np.mean(p.float().numpy() == exact) > 0.97


def test_stats_grad_scale_and_first_nonfinite(tk, dev):
    rng = np.random.default_rng(9)
    o = Options(lr=0.01, alpha=0.9, eps=0.3)
    shapes = [(300,), (0,), (7,)]
    ps = [rng.standard_normal(s) for s in shapes]
    gs = [rng.standard_normal(s) * 4.0 for s in shapes]
    vs = [rng.uniform(0.0, 0.5, s) for s in shapes]
    tp = [_on(dev, p) for p in ps]
    tv = [_on(dev, v) for v in vs]
    stats = torch.full((3, 6), 5.0, dtype=torch.float64, device=dev)
    tk.fused_step(tp, [_on(dev, g) for g in gs], tv, None, None, grad_scale=4.0,
                  stats=stats, **_kw(o, 1, np.float64))
    for i, (p, g, v) in enumerate(zip(ps, gs, vs)):
        ref, _ = spec.step(p, g / 4.0, {"step": 0, "square_avg": v}, o)
        np.testing.assert_allclose(tp[i].cpu().numpy(), ref, rtol=1e-12, atol=1e-14)
        if p.size == 0:
            assert stats[i].tolist() == [0.0, 0.0, 0.0, math.inf, -math.inf, 0.0]
            continue
        gg = g / 4.0  # closed form of the six statistics
        vv = o.alpha * v + (1 - o.alpha) * gg * gg
        d = np.sqrt(vv) + o.eps
        u = o.lr * gg / d
        want = [np.sum(gg * gg), np.sum(u * u), np.sum((p - u) ** 2), np.min(o.lr / d),
                np.max(o.lr / d), np.sum(o.eps > np.sqrt(vv))]
        np.testing.assert_allclose(stats[i].cpu().numpy(), want, rtol=1e-10)
    xs = [torch.zeros(5, device=dev), None, torch.zeros(0, device=dev),
          torch.ones(1500, device=dev), torch.zeros(2, device=dev)]
    assert tk.first_nonfinite(xs) == -1
    xs[3][1200] = math.nan
    xs[4][0] = math.inf
    assert tk.first_nonfinite(xs) == 3


def test_one_launch_over_chunks_of_many_tensors(tk, dev, monkeypatch):
    """Tensors longer than one program's chunk, single elements and empty ones in one launch:
    every element still gets exactly the reference update, and the per-tensor statistics add
    up across the chunks of a tensor. (Chunks of two blocks keep the interpreter quick.)"""
    monkeypatch.setattr(tk, "CHUNK", 2 * tk.BLOCK)
    rng = np.random.default_rng(10)
    o = Options(lr=0.01, alpha=0.9, eps=1e-3, momentum=0.9)
    sizes = [2 * tk.CHUNK + 3, 1, 0, 70, tk.CHUNK]
    ps = [rng.standard_normal(k).astype(np.float32) for k in sizes]
    gs = [rng.standard_normal(k).astype(np.float32) for k in sizes]
    sts = [_state(rng, p, o, np.float32) for p in ps]
    ref = [spec.step(p, g, s, o) for p, g, s in zip(ps, gs, sts)]
    tp = [_on(dev, p) for p in ps]
    tv, tb = ([_on(dev, s[k]) for s in sts] for k in ("square_avg", "momentum_buffer"))
    stats = torch.empty(len(sizes), 6, dtype=torch.float64, device=dev)
    tk.fused_step(tp, [_on(dev, g) for g in gs], tv, None, tb, stats=stats,
                  **_kw(o, 5, np.float32))
    for i, (p_ref, st_ref) in enumerate(ref):
        np.testing.assert_allclose(tp[i].cpu().numpy(), p_ref, rtol=4 * 2.0 ** -23, atol=1e-7)
        np.testing.assert_allclose(tb[i].cpu().numpy(), st_ref["momentum_buffer"], rtol=1e-6,
                                   atol=1e-7)
        g64 = gs[i].astype(np.float64)
        if sizes[i]:
            np.testing.assert_allclose(stats[i, 0].item(), np.sum(g64 * g64), rtol=1e-5)
            np.testing.assert_allclose(stats[i, 2].item(),
                                       np.sum(p_ref.astype(np.float64) ** 2), rtol=1e-5)
    assert stats[2].tolist() == [0.0, 0.0, 0.0, math.inf, -math.inf, 0.0]


def test_floor_reads_and_writes_without_changing(tk, dev):
    rng = np.random.default_rng(11)
    ts = [[_on(dev, rng.standard_normal(k).astype(np.float32)) for k in (5, 3000)]
          for _ in range(4)]
    before = [[t.clone() for t in group] for group in ts]
    tk.floor_call(ts[0], ts[1], ts[2], None, ts[3])()
    for group, old in zip(ts, before):
        for t, o in zip(group, old):
            assert torch.equal(t, o)


def test_cuda_plan_steps_like_torch(tk, dev, monkeypatch):
    """The optimizer's cached-table path for CUDA params (CudaPlan), driven on CPU tensors
    by the interpreter: three steps equal torch.optim.RMSprop's, a NaN gradient is refused
    with nothing changed (the error deferred to check(): the gated route does not wait
    for the verdict), and the kernel's statistics give the closed-form gradient RMS."""
    from rmsprop.torch import NonFiniteGradientError, RMSprop, _plan

    if dev == "cpu":
        monkeypatch.setattr(_plan, "plan_for", lambda device_type: _plan.CudaPlan)
        monkeypatch.setattr(tk, "CHUNK", 2 * tk.BLOCK)
    torch.manual_seed(0)
    shapes = [(300, 7), (7,), (tk.CHUNK + 9,)]
    ours = [torch.randn(s, device=dev, requires_grad=True) for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = RMSprop(ours, lr=0.01, momentum=0.9, centered=True, track_stats=True)
    ref = torch.optim.RMSprop(theirs, lr=0.01, momentum=0.9, centered=True, foreach=False)
    for step in range(3):
        grads = [torch.randn(s, device=dev) for s in shapes]
        for a, b, g in zip(ours, theirs, grads):
            # in place: the gradients' pointers stay, so only the learning rate is new
            a.grad = g.clone() if a.grad is None else a.grad.copy_(g)
            b.grad = g.clone()
        for o in (opt, ref):  # a scheduler's change reaches the kernel
            o.param_groups[0]["lr"] = 0.01 / (1 + step)
        opt.step()
        ref.step()
        if step > 0:  # the first step built the plan; the later ones ran through it
            assert opt._plans and isinstance(next(iter(opt._plans.values())), _plan.CudaPlan)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        want = math.sqrt(sum(float(g.double().square().sum()) for g in grads)
                         / sum(g.numel() for g in grads))
        assert opt.stats()["groups"][0]["grad_rms"] == pytest.approx(want, rel=1e-6)
    before = [p.detach().clone() for p in ours]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in ours]
    ours[2].grad[tk.CHUNK + 3] = math.nan
    opt.step()
    with pytest.raises(NonFiniteGradientError, match="index 2 .* at step 4"):
        opt.check()
    for p, old, st in zip(ours, before, state):
        assert torch.equal(p, old)
        assert all(torch.equal(opt.state[p][k], v) for k, v in st.items())


def test_gated_check_skips_every_group(tk, dev, monkeypatch):
    """nonfinite="skip" on the device path: a NaN in the second group's gradient stops the
    first group's kernel too (the gate), the step is counted as skipped (on the device),
    and the next step matches torch.optim.RMSprop, which never saw the bad one."""
    from rmsprop.torch import RMSprop, _plan

    if dev == "cpu":
        monkeypatch.setattr(_plan, "plan_for", lambda device_type: _plan.CudaPlan)
    torch.manual_seed(1)
    ours = [torch.randn(50, device=dev, requires_grad=True) for _ in range(2)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = RMSprop([{"params": [ours[0]]}, {"params": [ours[1]], "lr": 0.02}], lr=0.01,
                  nonfinite="skip")
    ref = torch.optim.RMSprop([{"params": [theirs[0]]}, {"params": [theirs[1]], "lr": 0.02}],
                              lr=0.01, foreach=False)

    def step(bad: bool) -> None:
        grads = [torch.randn(50, device=dev) for _ in ours]
        for a, g in zip(ours, grads):
            a.grad = g.clone()
        if bad:
            ours[1].grad[7] = math.inf
            opt.step()  # the warning comes with the verdict, read by the next check()
            with pytest.warns(RuntimeWarning, match="skipped.*group 1 index 0"):
                opt.check()
            return
        for b, g in zip(theirs, grads):
            b.grad = g.clone()
        opt.step()
        ref.step()

    step(False)
    step(False)  # the plans exist from here on
    before = [p.detach().clone() for p in ours]
    step(True)
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(ours, before))
    assert [int(opt.state[p]["step"]) for p in ours] == [2, 2]
    step(False)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
