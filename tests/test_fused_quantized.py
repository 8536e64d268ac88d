"""The torch optimizer's quantized state on the fused C kernel: the default CPU path with
``state_dtype="8bit"`` (or ``"4bit"``) is one call of the kernel's quantized entry per step,
and it writes the NumPy spec's codes and scales (:func:`rmsprop.spec.step`); the foreach path
is proved against the same spec in tests/test_quantized.py."""

import io
import warnings

import numpy as np
import pytest
import torch

from conftest import QUANTIZED_EXACT, QUANTIZED_NEAR  # noqa: E402
from rmsprop import Options, spec
from rmsprop.torch import NonFiniteGradientError, RMSprop, _paths
from rmsprop.torch import _codecs as tc

cpu = pytest.importorskip("rmsprop.kernels.cpu")
if not cpu.available():
    pytest.skip("the C kernel is not built here", allow_module_level=True)

KEYS = ("square_avg", "grad_avg", "momentum_buffer")
EXACT, NEAR = QUANTIZED_EXACT, QUANTIZED_NEAR  # the shared table (conftest.py)
# whole blocks (2-d), 18 blocks, small (float32 state), one element past a block, a tail of 136
SHAPES = [(32, 256), (4608,), (7, 9), (4097,), (5000,)]


def _ids(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items()) or "default"


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts of the quantized kernel entry's calls and of the unfused paths' calls."""
    lib = cpu._need()
    real_q = lib.rms_fused_step_q
    calls = {"q": 0, "unfused": 0}

    def spy_q(*args):
        calls["q"] += 1
        return real_q(*args)

    real_unfused = _paths.apply_unfused

    def spy_unfused(*args, **kwargs):
        calls["unfused"] += 1
        return real_unfused(*args, **kwargs)

    monkeypatch.setattr(lib, "rms_fused_step_q", spy_q)
    monkeypatch.setattr(_paths, "apply_unfused", spy_unfused)
    return calls


def _vs_spec(kw, shapes, steps, fmt="8bit"):
    """The default optimizer and the spec side by side on the same gradients, each step
    starting from the spec's params (so a param an ulp off does not carry); yields the
    optimizer, its params, the spec's params and states."""
    o = Options(lr=1e-2, **kw)
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt = RMSprop(ps, state_dtype=fmt, **o.as_dict())
    ref = [p.detach().numpy().copy() for p in ps]
    sts = [spec.init_state(r, o, state_dtype=fmt) for r in ref]
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, g in zip(ps, grads):
            p.grad = g
        opt.step()
        for i, g in enumerate(grads):
            ref[i], sts[i] = spec.step(ref[i], g.numpy(), sts[i], o)
        yield opt, ps, ref, sts
        with torch.no_grad():
            for p, r in zip(ps, ref):
                p.copy_(torch.from_numpy(r))


def _assert_state(opt, ps, sts, exact):
    for p, st in zip(ps, sts):
        got = opt.state[p]
        for key in KEYS:
            if key not in st:
                continue
            want = st[key]
            if isinstance(want, np.ndarray):  # a small tensor: full precision
                tol = 0 if exact else 4 * float(np.finfo(np.float32).eps)
                np.testing.assert_allclose(got[key].numpy().reshape(-1), want.reshape(-1),
                                           rtol=tol, atol=tol, err_msg=key)
                continue
            assert got[key].dtype == torch.uint8
            if exact:
                np.testing.assert_array_equal(got[key].numpy(), want.codes, err_msg=key)
                np.testing.assert_array_equal(got[key + "_scale"].numpy(), want.scales,
                                              err_msg=key)
            else:
                np.testing.assert_allclose(got[key + "_scale"].numpy(), want.scales,
                                           rtol=1e-6, err_msg=key)
                assert np.mean(got[key].numpy() != want.codes) <= 1e-3, key


@pytest.mark.parametrize("fmt", ["8bit", "4bit"])
@pytest.mark.parametrize("kw", EXACT, ids=_ids)
def test_default_path_is_the_kernel_and_writes_the_spec_codes(kw, fmt, kernel_calls):
    for t, (opt, ps, ref, sts) in enumerate(_vs_spec(kw, SHAPES, steps=4, fmt=fmt), 1):
        assert kernel_calls == {"q": t, "unfused": 0}
        assert len(opt._plans) == 1  # the group's cached plan
        for p, r in zip(ps, ref):
            np.testing.assert_array_equal(p.detach().numpy(), r)
        _assert_state(opt, ps, sts, exact=True)


@pytest.mark.parametrize("fmt", ["8bit", "4bit"])
@pytest.mark.parametrize("kw", NEAR, ids=_ids)
def test_options_rounded_differently_stay_within_ulps_of_the_spec(kw, fmt, kernel_calls):
    for opt, ps, ref, sts in _vs_spec(kw, SHAPES, steps=4, fmt=fmt):
        for p, r in zip(ps, ref):
            np.testing.assert_allclose(p.detach().numpy(), r, rtol=1e-5, atol=1e-6)
        _assert_state(opt, ps, sts, exact=False)
    assert kernel_calls["q"] == 4 and kernel_calls["unfused"] == 0


def test_a_mixed_size_model_takes_one_kernel_call_per_step(kernel_calls):
    # linear layers: weights quantize, biases and a small layer stay float32 in the same plan
    model = torch.nn.Sequential(torch.nn.Linear(96, 80), torch.nn.ReLU(),
                                torch.nn.Linear(80, 3), torch.nn.Linear(3, 300))
    shapes = [tuple(p.shape) for p in model.parameters()]
    for opt, ps, ref, sts in _vs_spec(dict(momentum=0.9, centered=True), shapes, steps=3):
        for p, r in zip(ps, ref):
            np.testing.assert_array_equal(p.detach().numpy(), r)
        _assert_state(opt, ps, sts, exact=True)
    assert kernel_calls == {"q": 3, "unfused": 0}
    kinds = {opt.state[p]["square_avg"].dtype for p in ps}
    assert kinds == {torch.uint8, torch.float32}


def _train(opt, ps, gen, steps):
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


def test_state_dict_resume_is_bit_identical(kernel_calls):
    kw = dict(lr=1e-2, momentum=0.9, centered=True, bias_correction=True,
              initial_square_avg=0.1)
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    a = [torch.nn.Parameter(x.clone()) for x in init]
    b = [torch.nn.Parameter(x.clone()) for x in init]
    opt_a = RMSprop(a, state_dtype="8bit", **kw)
    _train(opt_a, a, torch.Generator().manual_seed(2), 6)

    opt_b = RMSprop(b, state_dtype="8bit", **kw)
    gb = torch.Generator().manual_seed(2)
    _train(opt_b, b, gb, 3)
    buf = io.BytesIO()
    torch.save(opt_b.state_dict(), buf)
    buf.seek(0)
    opt_c = RMSprop(b, state_dtype="8bit", **kw)
    opt_c.load_state_dict(torch.load(buf, weights_only=True))
    _train(opt_c, b, gb, 3)
    assert kernel_calls == {"q": 12, "unfused": 0}
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
        for k, v in opt_a.state[pa].items():
            assert torch.equal(v, opt_c.state[pb][k]), k


def test_a_nonfinite_gradient_raises_and_changes_nothing(kernel_calls):
    gen = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = RMSprop(ps, lr=1e-2, momentum=0.9, centered=True, state_dtype="8bit")
    _train(opt, ps, gen, 2)
    before = [p.detach().clone() for p in ps]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    ps[3].grad[4096] = float("inf")  # in the last, one-element block
    with pytest.raises(NonFiniteGradientError, match="index 3"):
        opt.step()
    assert kernel_calls["q"] == 2
    for p, x, st in zip(ps, before, state):
        assert torch.equal(p, x)
        for k, v in st.items():
            assert torch.equal(opt.state[p][k], v), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.complex64])
def test_16_bit_and_complex_params_take_the_kernel(dtype, kernel_calls):
    gen = torch.Generator().manual_seed(4)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    opt = RMSprop(ps, lr=1e-2, momentum=0.9, state_dtype="8bit")
    _train(opt, ps, gen, 2)
    assert kernel_calls == {"q": 2, "unfused": 0}
    big = opt.state[ps[0]]
    assert big["square_avg"].dtype == torch.uint8
    assert big["square_avg"].numel() == tc.real(ps[0]).numel()


@pytest.mark.parametrize("case, match", [
    (dict(state_dtype="8bit", dtype=torch.float64), "float64"),
    (dict(state_dtype="8bit", dtype=torch.bfloat16, stochastic_rounding=True, seed=0),
     "stochastic_rounding"),
])
def test_what_the_kernel_cannot_take_runs_foreach_and_fused_true_names_it(case, match,
                                                                          kernel_calls):
    case = dict(case)
    dtype = case.pop("dtype", torch.float32)
    p = torch.nn.Parameter(torch.randn(8192, dtype=dtype))
    q = torch.nn.Parameter(p.detach().clone())
    with pytest.raises(RuntimeError, match=match):
        RMSprop([q], fused=True, **case)
    opt = RMSprop([p], **case)
    p.grad = torch.ones_like(p)
    opt.step()
    assert kernel_calls == {"q": 0, "unfused": 1}
    assert not opt._plans


def test_centered_switched_off_keeps_the_foreach_path_while_grad_avg_is_kept(kernel_calls):
    # square_avg then stores w against the kept grad_avg, which the kernel reads only when
    # centered: the spec's codes are those of the foreach path
    gen = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter(torch.randn(64, 128, generator=gen))
    opt = RMSprop([p], lr=1e-2, state_dtype="8bit", centered=True)
    ref, st = p.detach().numpy().copy(), None
    for on in (True, False, True):
        opt.param_groups[0]["centered"] = on
        o = Options(lr=1e-2, centered=on)
        st = st or spec.init_state(ref, o, state_dtype="8bit")
        g = torch.randn(p.shape, generator=gen)
        p.grad = g
        opt.step()
        ref, st = spec.step(ref, g.numpy(), st, o)
        _assert_state(opt, [p], [st], exact=True)
        with torch.no_grad():
            p.copy_(torch.from_numpy(ref))
    assert kernel_calls == {"q": 2, "unfused": 1}
    opt.param_groups[0]["centered"] = False
    opt.param_groups[0]["fused"] = True
    with pytest.raises(RuntimeError, match="fused=True cannot apply: .*centered"):
        opt.step()
