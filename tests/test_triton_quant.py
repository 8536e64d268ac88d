"""The Triton kernel with 8-bit and 4-bit block-quantized state against the NumPy spec.

The oracle is :func:`rmsprop.spec.step` driven with :class:`rmsprop.codecs.Quantized` state,
and, as a second check, the fused CPU kernel (:func:`rmsprop.kernels.cpu.fused_step_quantized`),
whose arithmetic the Triton kernel's is operation for operation: with every option its
params, codes and scales are the CPU kernel's bits. Against the spec the codes and scales are
equal bit for bit over a whole trajectory where the float kernels equal the spec
(``conftest.QUANTIZED_EXACT``); where they are a few ulp from it (``QUANTIZED_NEAR``) each step
starts from the spec's state and only a code on a rounding boundary may move. Runs on CPU
tensors under Triton's interpreter, and compiled on CUDA where a device is present (the
``tk`` fixture of conftest.py). Sizes are small (the interpreter runs each program in
Python): a tensor of three chunks whose last block is partial, one just past
MIN_QUANTIZED, one below it (float32 state in the same launch) and, at 4 bits, an odd size
(float32 state too).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from conftest import (  # noqa: E402
    CODEC_FORMATS,
    QUANTIZED_EXACT,
    QUANTIZED_NEAR,
    assert_quantized_state,
    boundary_blocks,
    spec_step_all,
    state_lists,
)
from conftest import (  # noqa: E402
    quantized_kernel_step as _step,
)
from rmsprop import Options, codecs, spec  # noqa: E402
from rmsprop.kernels import cpu  # noqa: E402

SIZES = {"8bit": (2 * 4096 + 256 * 2 + 17, 4096 + 5, 1000),
         "4bit": (2 * 4096 + 128 * 3 + 18, 4096 + 6, 4097, 1000)}
FORMATS = ("8bit", "4bit")
KEYS = ("square_avg", "grad_avg", "momentum_buffer")
EPS32 = float(np.finfo(np.float32).eps)
CPU = cpu.available()

# the default run: rows that between them switch every option on; the rest of the shared
# tables is marked slow
FAST_EXACT = (dict(centered=True, momentum=0.9, weight_decay=0.05),
              dict(weight_decay=0.1, decoupled_weight_decay=True),
              dict(initial_square_avg=1.0, eps_in_sqrt=True, eps=1e-6), dict(maximize=True))
FAST_NEAR = (dict(centered=True, momentum=0.9, bias_correction=True, initial_square_avg=0.1),
             dict(momentum=0.9, nesterov=True), dict(momentum=0.9, lr_in_momentum=True))


def _ids(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items()) or "default"


def _rows(table, fast):
    return [pytest.param(kw, id=_ids(kw), marks=() if kw in fast else pytest.mark.slow)
            for kw in table]


@pytest.fixture
def dev(tk) -> str:
    """Where the tensors of a test live: CPU for the interpreter, else CUDA."""
    from triton.runtime.interpreter import InterpretedFunction
    return "cpu" if isinstance(tk._rmsprop_q_kernel, InterpretedFunction) else "cuda"


def _grads(step, sizes, dtype=np.float32):
    """Gradients whose magnitudes span five orders between blocks and inside them."""
    out = []
    for i, n in enumerate(sizes):
        rng = np.random.default_rng(1000 * step + i)
        out.append((rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 1, n)).astype(dtype))
    return out


def _assert_same(a_params, a_lists, b_params, b_lists):
    """Two kernels' params, codes and scales, bit for bit."""
    for x, y in zip(a_params, b_params):
        assert torch.equal(x.cpu(), y.cpu())
    for k in KEYS:
        for x, y in zip(a_lists[k][0] + [s for s in a_lists[k][1] if s is not None],
                        b_lists[k][0] + [s for s in b_lists[k][1] if s is not None]):
            assert torch.equal(x.cpu(), y.cpu()), k


def _setup(o, fmt, dtype=np.float32):
    sizes = SIZES[fmt]
    p_np = [np.random.default_rng(i).standard_normal(n).astype(dtype)
            for i, n in enumerate(sizes)]
    states = [spec.init_state(p, o, state_dtype=fmt) for p in p_np]
    assert [isinstance(st["square_avg"], codecs.Quantized) for st in states] == [
        codecs.quantizes(n, fmt) for n in sizes]
    return sizes, p_np, states


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kw", _rows(QUANTIZED_EXACT, FAST_EXACT))
def test_codes_and_params_equal_the_spec(tk, dev, kw, fmt):
    o = Options(lr=1e-2, **kw)
    sizes, p_np, states = _setup(o, fmt)
    params = [torch.from_numpy(p.copy()).to(dev) for p in p_np]
    lists = state_lists(states, dev)
    c_params = [torch.from_numpy(p.copy()) for p in p_np]
    c_lists = state_lists(states, "cpu")
    for t in range(1, 4):
        g = _grads(t, sizes)
        _step(tk.fused_step_quantized, o, t, params, [torch.from_numpy(x).to(dev) for x in g],
              lists, fmt)
        p_np, states = spec_step_all(o, p_np, g, states)
        for i in range(len(sizes)):
            np.testing.assert_array_equal(params[i].cpu().numpy(), p_np[i],
                                          err_msg=f"step {t}, {i}")
        assert_quantized_state(lists, states, exact=True)
        if CPU:
            _step(cpu.fused_step_quantized, o, t, c_params, [torch.from_numpy(x) for x in g],
                  c_lists, fmt)
            _assert_same(params, lists, c_params, c_lists)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kw", _rows(QUANTIZED_NEAR, FAST_NEAR))
def test_options_rounded_differently_stay_within_ulps_and_equal_the_cpu_kernel(tk, dev, kw,
                                                                               fmt):
    o = Options(lr=1e-2, **kw)
    sizes, p_np, states = _setup(o, fmt)
    # from step 6: at step 1 the bias-corrected centered variance cancels to a rounding
    # residue (as in the CPU kernel's test)
    for st in states:
        st["step"] = 5
    for t in range(6, 8):
        g = _grads(t, sizes)
        params = [torch.from_numpy(p.copy()).to(dev) for p in p_np]
        lists = state_lists(states, dev)  # each step from the spec's state
        _step(tk.fused_step_quantized, o, t, params, [torch.from_numpy(x).to(dev) for x in g],
              lists, fmt)
        if CPU:
            c_params = [torch.from_numpy(p.copy()) for p in p_np]
            c_lists = state_lists(states, "cpu")
            _step(cpu.fused_step_quantized, o, t, c_params, [torch.from_numpy(x) for x in g],
                  c_lists, fmt)
            _assert_same(params, lists, c_params, c_lists)
        p_np, states = spec_step_all(o, p_np, g, states)
        for i in range(len(sizes)):
            np.testing.assert_allclose(params[i].cpu().numpy(), p_np[i], rtol=4 * EPS32,
                                       atol=4 * EPS32, err_msg=f"step {t}, {i}")
        assert_quantized_state(lists, states, exact=False)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("pdtype", ["bfloat16", "float16"])
def test_16bit_params_round_to_nearest_like_the_spec(tk, dev, fmt, pdtype):
    import ml_dtypes
    npdt = ml_dtypes.bfloat16 if pdtype == "bfloat16" else np.float16
    tdt = getattr(torch, pdtype)
    o = Options(lr=1e-2, momentum=0.9, centered=True)
    sizes, p_np, states = _setup(o, fmt, npdt)
    params = [torch.from_numpy(p.astype(np.float32)).to(dev, tdt) for p in p_np]
    lists = state_lists(states, dev)
    for t in range(1, 3):
        g = [x.astype(npdt) for x in _grads(t, sizes)]
        _step(tk.fused_step_quantized, o, t, params,
              [torch.from_numpy(x.astype(np.float32)).to(dev, tdt) for x in g], lists, fmt)
        p_np, states = spec_step_all(o, p_np, g, states)
        for i in range(len(sizes)):
            np.testing.assert_array_equal(params[i].float().cpu().numpy(),
                                          p_np[i].astype(np.float32))
        assert_quantized_state(lists, states, exact=True)


def test_grad_scale_and_maximize_equal_the_spec_on_unscaled_gradients(tk, dev):
    """grad_scale divides each gradient first (a power of two: exactly g / 4 for the spec)."""
    o = Options(lr=1e-2, momentum=0.9, maximize=True, weight_decay=0.1)
    sizes, p_np, states = _setup(o, "8bit")
    params = [torch.from_numpy(p.copy()).to(dev) for p in p_np]
    lists = state_lists(states, dev)
    g = _grads(1, sizes)
    _step(tk.fused_step_quantized, o, 1, params, [torch.from_numpy(x * 4).to(dev) for x in g],
          lists, "8bit", grad_scale=4.0)
    p_np, states = spec_step_all(o, p_np, g, states)
    for i in range(len(sizes)):
        np.testing.assert_array_equal(params[i].cpu().numpy(), p_np[i])
    assert_quantized_state(lists, states, exact=True)


def test_statistics_equal_their_closed_form_and_the_cpu_kernel(tk, dev):
    """From v0 = 1 (exact in u8) and b0 = 0 one step has a closed form; the per-tensor rows
    add up over the chunks of a tensor (the first one has three) and keep a float32-state
    tensor's row apart."""
    o = Options(lr=1e-2, momentum=0.9, initial_square_avg=1.0)
    sizes, p_np, states = _setup(o, "8bit")
    params = [torch.ones(n, device=dev) for n in sizes]
    g = _grads(1, sizes)
    lists = state_lists(states, dev)
    stats = torch.full((len(sizes), 6), 7.0, dtype=torch.float64, device=dev)
    _step(tk.fused_step_quantized, o, 1, params, [torch.from_numpy(x).to(dev) for x in g],
          lists, "8bit", stats=stats)
    for i, gi in enumerate(g):
        g64 = gi.astype(np.float64)
        d = np.sqrt(o.alpha + (1 - o.alpha) * g64 ** 2) + o.eps
        u = o.lr * g64 / d  # b = g / d, update lr * b
        want = [np.sum(g64 ** 2), np.sum(u ** 2), np.sum((1 - u) ** 2), np.min(o.lr / d),
                np.max(o.lr / d), 0.0]
        np.testing.assert_allclose(stats[i].cpu().numpy(), want, rtol=1e-5)
    if CPU:
        c_stats = torch.empty(len(sizes), 6, dtype=torch.float64)
        _step(cpu.fused_step_quantized, o, 1, [torch.ones(n) for n in sizes],
              [torch.from_numpy(x) for x in g], state_lists(states, "cpu"), "8bit", stats=c_stats)
        np.testing.assert_allclose(stats.cpu().numpy(), c_stats.numpy(), rtol=1e-6)


def _table(tk, dev, params, lists):
    P = [p.data_ptr() for p in params]
    V = [c.data_ptr() for c in lists["square_avg"][0]]
    VS = [0 if s is None else s.data_ptr() for s in lists["square_avg"][1]]
    return tk.Table((P, V, V, V), [p.numel() for p in params], dev, scales=(VS, VS, VS))


def test_gate_and_device_values_through_the_plan_api(tk, dev):
    """What a plan drives: a Table with scales and launch_quantized. A gradient holding a
    NaN sets the gate (check_into), and the gated launch writes nothing, scales included;
    with the gate clear, lr, c and the gradients' scale read from device tensors give the
    host values' bits."""
    o = Options(lr=1e-2, bias_correction=True)
    sizes, p_np, states = _setup(o, "4bit")
    g = _grads(1, sizes)
    hyper_vals = [o.lr, o.alpha, o.eps, 0.0, 0.0, float(np.float32(1 - o.alpha)), 1.0, 1.0]
    flags = tk.kernel_flags(frozenset(), stats=False)
    runs = []
    for device_values in (False, True):
        params = [torch.from_numpy(p.copy()).to(dev) for p in p_np]
        grads = [torch.from_numpy(x.copy()).to(dev) for x in g]  # written to below
        lists = state_lists(states, dev)
        table = _table(tk, dev, params, lists)
        gdev, hyper = table.upload([t.data_ptr() for t in grads], hyper_vals)
        bad = torch.tensor([0, 2 ** 31 - 1], dtype=torch.int32, device=dev)
        grads[0][5000] = math.nan
        tk.check_into(table, gdev, params[0], bad)
        assert bad.tolist() == [1, 0]
        before = [t.clone() for t in params + lists["square_avg"][0]
                  + [s for s in lists["square_avg"][1] if s is not None]]
        tk.launch_quantized(table, gdev, hyper, params[0], flags, "4bit", gate=bad)
        after = params + lists["square_avg"][0] + [s for s in lists["square_avg"][1]
                                                  if s is not None]
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        grads[0][5000] = float(g[0][5000])
        bad.zero_()
        extra = {}
        if device_values:  # host slots hold placeholders: the kernel must read the tensors
            extra = dict(lr=torch.tensor([o.lr], dtype=torch.float64, device=dev),
                         c=torch.tensor([hyper_vals[5]], dtype=torch.float64, device=dev),
                         scale=torch.tensor([0.5], dtype=torch.float32, device=dev))
            for x in grads:
                x.mul_(0.5)
            gdev, hyper = table.upload([t.data_ptr() for t in grads],
                                       [0.0, *hyper_vals[1:5], 1.0, 1.0, 1.0])
        tk.launch_quantized(table, gdev, hyper, params[0], flags, "4bit", gate=bad, **extra)
        runs.append((params, lists))
    _assert_same(*runs[0], *runs[1])
    p_np, states = spec_step_all(o, p_np, g, states)
    for i in range(len(sizes)):
        np.testing.assert_allclose(runs[0][0][i].cpu().numpy(), p_np[i], rtol=4 * EPS32,
                                   atol=4 * EPS32)
    assert_quantized_state(runs[0][1], states, exact=False)


def test_bad_input_raises_and_changes_nothing(tk, dev):
    n = 5000
    p, g = torch.ones(n, device=dev), torch.ones(n, device=dev)
    codes = torch.zeros(n, dtype=torch.uint8, device=dev)
    scales = torch.ones(-(-n // 256), device=dev)
    kw = dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
              maximize=False, eps_in_sqrt=False, lr_in_momentum=False, nesterov=False,
              decoupled_weight_decay=False, bias_correction=1.0)
    before = (p.clone(), codes.clone(), scales.clone())
    step = tk.fused_step_quantized
    with pytest.raises(ValueError, match=r"scales\[0\] must be a contiguous float32"):
        step([p], [g], [codes], None, None, square_avg_scales=[scales[:-1]], **kw)
    with pytest.raises(TypeError, match=r"square_avgs\[0\] must be a torch.uint8"):
        step([p], [g], [codes.float()], None, None, square_avg_scales=[scales], **kw)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16 params"):
        step([p.double()], [g.double()], [codes], None, None, square_avg_scales=[scales], **kw)
    with pytest.raises(ValueError, match="momentum > 0 needs momentum_buffers"):
        step([p], [g], [codes], None, None, square_avg_scales=[scales],
             **{**kw, "momentum": 0.9})
    with pytest.raises(ValueError, match="odd element count"):
        step([p[:-1]], [g[:-1]], [codes[:2499]], None, None,
             square_avg_scales=[torch.ones(40, device=dev)], state_dtype="4bit", **kw)
    with pytest.raises(ValueError, match="state_dtype must be one of 8bit, 4bit"):
        step([p], [g], [codes], None, None, square_avg_scales=[scales], state_dtype="2bit",
             **kw)
    with pytest.raises(ValueError, match="quantized exactly where square_avgs is"):
        step([p], [g], [codes], None, [codes.clone()], square_avg_scales=[scales],
             momentum_buffer_scales=[None], **{**kw, "momentum": 0.9})
    with pytest.raises(ValueError, match=r"grads\[0\] has 4999 elements"):
        step([p], [g[:-1]], [codes], None, None, square_avg_scales=[scales], **kw)
    with pytest.raises(ValueError, match="grad_scale must be > 0"):
        step([p], [g], [codes], None, None, square_avg_scales=[scales], grad_scale=0.0, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, (p, codes, scales)))


# -- the codecs on their own: every code boundary, every code --------------------------------

# scales over the float32 range: subnormal, the smallest normal, round values, the largest
SCALES = np.array([1.0e-45, 3.0e-39, 2.0 ** -126, 2.0 ** -110, 0.1, 1.0, 1.5, 3.0, 2.0 ** 125,
                   3.0e38, float(np.finfo(np.float32).max)], dtype=np.float32)


@pytest.mark.parametrize("fmt", CODEC_FORMATS)
def test_encoder_writes_the_spec_codes_at_every_code_boundary(tk, dev, fmt):
    f = codecs.FORMATS[fmt]
    x = boundary_blocks(fmt, SCALES, ulps=3)[:-f.block // 2 - 2]  # the last block cut short
    x[:f.block] = 0.0  # a block of zeros: scale 0, every code 0
    want = codecs.encode(x, fmt)
    codes, scales = tk.quant_encode(torch.from_numpy(x).to(dev), fmt)
    np.testing.assert_array_equal(scales.cpu().numpy(), want.scales)
    np.testing.assert_array_equal(codes.cpu().numpy(), want.codes)


@pytest.mark.parametrize("fmt", CODEC_FORMATS)
def test_decoder_gives_the_spec_value_of_every_code(tk, dev, fmt):
    f = codecs.FORMATS[fmt]
    n_codes = 1 << f.bits
    codes = np.tile(np.arange(n_codes, dtype=np.uint8), len(SCALES) * f.block // n_codes)
    n = codes.size
    packed = codes[0::2] | (codes[1::2] << 4) if f.bits == 4 else codes
    q = codecs.Quantized(fmt, packed.astype(np.uint8), SCALES.copy(), (n,))
    got = tk.quant_decode(torch.from_numpy(q.codes.copy()).to(dev),
                          torch.from_numpy(q.scales).to(dev), fmt, n)
    np.testing.assert_array_equal(got.cpu().numpy(), codecs.decode(q))


def test_codec_entry_refuses_bad_input(tk, dev):
    with pytest.raises(ValueError, match="fmt must be one of u8, s8, u4, s4"):
        tk.quant_encode(torch.ones(256, device=dev), "u2")
    with pytest.raises(ValueError, match="even element count"):
        tk.quant_encode(torch.ones(255, device=dev), "u4")
    with pytest.raises(TypeError, match="float32 tensor"):
        tk.quant_encode(torch.ones(256, dtype=torch.float64, device=dev), "u8")
    with pytest.raises(ValueError, match="scales must be a contiguous float32"):
        tk.quant_decode(torch.zeros(256, dtype=torch.uint8, device=dev),
                        torch.ones(2, device=dev), "u8", 256)
