"""The fused CPU kernel with 8-bit and 4-bit block-quantized state against the NumPy spec.

The oracle is :func:`rmsprop.spec.step` driven with :class:`rmsprop.codecs.Quantized` state
(``u8`` square_avg, ``s8`` grad_avg / momentum_buffer, blocks of 256; ``u4`` / ``s4``, packed
two per byte, blocks of 128). The kernel's float32
arithmetic is the float32-state kernel's: where that one equals the spec bit for bit, so do
the quantized kernel's params, codes and scales over a whole trajectory (its ``sqrt`` and
``/`` are correctly rounded like NumPy's). ``bias_correction`` (``v * (1/c)`` for ``v / c``),
``nesterov`` and ``lr_in_momentum`` (a different association) are a few ulp from the spec in
the float32 kernel too; there each step starts from the spec's state, params agree to a few
ulp and only a code sitting on a rounding boundary may move.
"""

import numpy as np
import pytest
import torch

from conftest import (  # noqa: E402
    CODEC_FORMATS,
    QUANTIZED_EXACT,
    QUANTIZED_NEAR,
    assert_quantized_state,
    boundary_blocks,
    quantized_kernel_step,
    spec_step_all,
    state_lists,
)
from rmsprop import Options, codecs, spec
from rmsprop.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason=cpu.unavailable_reason())

# element counts: block tails (3 blocks + 17; one block + 5 past MIN_QUANTIZED; 100000 =
# 390 blocks + 160), a tensor below MIN_QUANTIZED (float32 state in the same call) and
# enough in total (> the kernel's serial threshold) for two threads to share the work; 4-bit
# quantizes even sizes only, in blocks of 128
SIZES = {"8bit": (256 * 3 + 17, 4096 + 5, 1000, 100000, 70001),
         "4bit": (128 * 3 + 18, 4096 + 6, 1000, 100000, 70002)}
FLOAT_SIZE = 1000
FORMATS = ("8bit", "4bit")

EXACT, NEAR = QUANTIZED_EXACT, QUANTIZED_NEAR  # the shared table (conftest.py)
KEYS = ("square_avg", "grad_avg", "momentum_buffer")
EPS32 = float(np.finfo(np.float32).eps)


def _ids(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items()) or "default"


@pytest.fixture(params=[("best", 2), ("best", 1), ("base", 2)], ids=lambda x: f"{x[0]}-{x[1]}t")
def isa_threads(request):
    which, nthreads = request.param
    if not cpu.set_isa(which):
        pytest.skip(f"no {which} build")
    yield nthreads
    cpu.set_isa("best")


def _init(n, o, fmt="8bit", dtype=np.float32):
    """The spec's state for a param of n elements: quantized (built with the codecs directly,
    so that tensors below MIN_QUANTIZED quantize too) except the FLOAT_SIZE one."""
    if n == FLOAT_SIZE:
        return spec.init_state(np.zeros(n, dtype), o, state_dtype=fmt)
    f = codecs.QUANTIZED[fmt]
    st = {"step": 0, "square_avg": codecs.encode(np.full(n, o.initial_square_avg,
                                                         np.float32), f["square_avg"])}
    if o.centered:
        st["grad_avg"] = codecs.encode(np.zeros(n, np.float32), f["grad_avg"])
    if o.momentum > 0:
        st["momentum_buffer"] = codecs.encode(np.zeros(n, np.float32), f["momentum_buffer"])
    return st


def _grads(step, fmt="8bit", dtype=np.float32):
    """Gradients whose magnitudes span five orders between blocks and inside them."""
    out = []
    for i, n in enumerate(SIZES[fmt]):
        rng = np.random.default_rng(1000 * step + i)
        out.append((rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 1, n)).astype(dtype))
    return out


def _kernel_step(o, t, params, grads, lists, nthreads, stats=None, fmt="8bit"):
    quantized_kernel_step(cpu.fused_step_quantized, o, t, params, grads, lists, fmt,
                          stats=stats, nthreads=nthreads)


def _assert_trajectory_equals_the_spec(o, fmt, nthreads, steps, grad_scale=None):
    """``steps`` kernel steps over SIZES[fmt] against the spec's, params, codes and scales
    bit for bit after each; with ``grad_scale`` the kernel gets the gradients times it (a
    power of two, so the spec's unscaled gradients are exactly what the kernel divides)."""
    sizes = SIZES[fmt]
    p_np = [np.random.default_rng(i).standard_normal(n).astype(np.float32)
            for i, n in enumerate(sizes)]
    states = [_init(n, o, fmt) for n in sizes]
    params = [torch.from_numpy(p.copy()) for p in p_np]
    lists = state_lists(states)
    for t in range(1, steps + 1):
        g = _grads(t, fmt)
        if grad_scale is None:
            _kernel_step(o, t, params, [torch.from_numpy(x) for x in g], lists, nthreads,
                         fmt=fmt)
        else:
            quantized_kernel_step(cpu.fused_step_quantized, o, t, params,
                                  [torch.from_numpy(x * np.float32(grad_scale)) for x in g],
                                  lists, fmt, grad_scale=grad_scale, nthreads=nthreads)
        p_np, states = spec_step_all(o, p_np, g, states)
        for i in range(len(sizes)):
            np.testing.assert_array_equal(params[i].numpy(), p_np[i], err_msg=f"step {t}, {i}")
        assert_quantized_state(lists, states, exact=True)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kw", EXACT, ids=_ids)
def test_codes_and_params_equal_the_spec(kw, fmt, isa_threads):
    _assert_trajectory_equals_the_spec(Options(lr=1e-2, **kw), fmt, isa_threads, steps=3)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kw", [{}, {"momentum": 0.9, "maximize": True, "weight_decay": 0.1},
                                {"weight_decay": 0.1, "decoupled_weight_decay": True}],
                         ids=_ids)
def test_grad_scale_equals_the_spec_on_unscaled_gradients(kw, fmt, isa_threads):
    """grad_scale divides each gradient first, with and without the options that scale the
    gradient or the param before the update."""
    _assert_trajectory_equals_the_spec(Options(lr=1e-2, **kw), fmt, isa_threads, steps=2,
                                       grad_scale=4.0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kw", [{}, {"momentum": 0.9}],
                         ids=_ids)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the spec's overflowing block
def test_blocks_outside_the_fast_encoders_range_between_ordinary_ones(kw, fmt, isa_threads):
    """Blocks whose new scale the divider-free encoder does not take (0: every code 0;
    subnormal or tiny; 2^126 and above: the portable encoder; infinite, from a finite
    gradient whose square overflows) lying between ordinary blocks of one tensor, with a
    short tail: codes, scales and params equal the spec's. The zero block starts from
    nonzero codes under a zero scale, so codes left unwritten would show."""
    o = Options(lr=1e-2, **kw)
    f = codecs.QUANTIZED[fmt]
    blk = codecs.FORMATS[f["square_avg"]].block
    n = 7 * blk + 40
    rng = np.random.default_rng(3)
    # per block: ordinary, tiny (subnormal momentum), zero, ordinary, >= 2^126, ordinary
    v0 = rng.uniform(0.5, 1.0, n).astype(np.float32)
    b0 = rng.standard_normal(n).astype(np.float32)
    for k, (vs, bs) in enumerate([(1, 1), (1e-37, 1e-39), (0, 0), (1, 1), (2e38, 1e38)]):
        v0[k * blk:(k + 1) * blk] *= np.float32(vs)
        b0[k * blk:(k + 1) * blk] *= np.float32(bs)
    st = {"step": 0, "square_avg": codecs.encode(v0, f["square_avg"])}
    if o.momentum > 0:
        st["momentum_buffer"] = codecs.encode(b0, f["momentum_buffer"])
    for q in (x for k, x in st.items() if k != "step"):
        assert q.scales[2] == 0
        q.codes[(2 * blk) // (2 if fmt == "4bit" else 1):(3 * blk) //
                (2 if fmt == "4bit" else 1)] = 0x77
    p_np = [rng.standard_normal(n).astype(np.float32)]
    states = [st]
    params = [torch.from_numpy(p_np[0].copy())]
    lists = state_lists(states)
    for t in range(1, 4):
        g = rng.standard_normal(n).astype(np.float32)
        g[blk:3 * blk] = 0  # the tiny and zero blocks stay so
        g[6 * blk + 3] = 1e21  # v overflows to inf in block 6, which the tail follows
        _kernel_step(o, t, params, [torch.from_numpy(g)], lists, isa_threads, fmt=fmt)
        p_np, states = spec_step_all(o, p_np, [g], states)
        np.testing.assert_array_equal(params[0].numpy(), p_np[0], err_msg=f"step {t}")
        assert_quantized_state(lists, states, exact=True)
    # the blocks did reach the ranges named above
    sc = states[0]["square_avg"].scales
    assert sc[1] < 2.0 ** -110 and sc[2] == 0 and sc[4] >= 2.0 ** 126 and sc[6] == np.inf


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kw", [{}, {"momentum": 0.9}], ids=_ids)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the spec's NaN quotients
def test_a_nan_or_inf_gradient_in_an_ordinary_block_steps_like_the_portable_build(kw, fmt):
    """A NaN gradient (of either sign) makes its v NaN, which the block's maximum leaves
    out (the spec's scale is NaN there, and the spec refuses to step from it, so the portable
    build is the oracle for that block); an infinite one makes the block's scale infinite.
    Over two steps both builds give the same params, codes and scales, and after the first
    the blocks without one hold the spec's."""
    if not cpu.set_isa("best"):
        pytest.skip("no best build")
    o = Options(lr=1e-2, **kw)
    f = codecs.QUANTIZED[fmt]
    blk = codecs.FORMATS[f["square_avg"]].block
    n = 6 * blk + 40
    rng = np.random.default_rng(5)
    p0 = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    g[blk + 9] = np.nan
    g[blk + 8] = 30.0  # the largest v of its block but for the NaN
    g[3 * blk + 71] = np.inf
    g[5 * blk + 17] = -np.nan  # a NaN with its sign bit set (-nan * -nan keeps it in v)
    runs = []
    for isa in ("best", "base"):
        cpu.set_isa(isa)
        params = [torch.from_numpy(p0.copy())]
        lists = state_lists([_init(n, o, fmt)])
        after = []
        for t in range(1, 3):
            _kernel_step(o, t, params, [torch.from_numpy(g)], lists, 1, fmt=fmt)
            after.append((params[0].numpy().copy(),
                          {k: (c[0].numpy().copy(), s[0].numpy().copy())
                           for k, (c, s) in lists.items() if c}))
        runs.append(after)
    cpu.set_isa("best")
    for (pa, sa), (pb, sb) in zip(*runs):
        np.testing.assert_array_equal(pa, pb)
        for k in sa:
            np.testing.assert_array_equal(sa[k][0], sb[k][0], err_msg=k)
            np.testing.assert_array_equal(sa[k][1], sb[k][1], err_msg=k)
    p1, s1 = runs[0][0]
    # the NaN left out: the block's maximum is that of 30's v, 30^2 (1 - alpha)
    assert s1["square_avg"][1][1] == pytest.approx(900.0 * (1 - o.alpha), rel=1e-6)
    assert s1["square_avg"][1][3] == np.inf
    p_np, states = spec_step_all(o, [p0.copy()], [g], [_init(n, o, fmt)])
    ok = np.r_[0:blk, 2 * blk:3 * blk, 4 * blk:5 * blk, 6 * blk:n]
    np.testing.assert_array_equal(p1[ok], p_np[0][ok])
    per = 2 if fmt == "4bit" else 1
    for k, (codes, scales) in s1.items():
        want = states[0][k]
        np.testing.assert_array_equal(codes[np.unique(ok // per)],
                                      want.codes[np.unique(ok // per)], err_msg=k)
        keep = [b for b in range(len(scales)) if b not in (1, 3, 5)]
        np.testing.assert_array_equal(scales[keep], want.scales[keep], err_msg=k)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kw", NEAR, ids=_ids)
def test_options_the_float_kernel_rounds_differently_stay_within_ulps(kw, fmt, isa_threads):
    o = Options(lr=1e-2, **kw)
    sizes = SIZES[fmt]
    p_np = [np.random.default_rng(i).standard_normal(n).astype(np.float32)
            for i, n in enumerate(sizes)]
    states = [_init(n, o, fmt) for n in sizes]
    # from step 6: at step 1 the bias-corrected centered variance v/c - (m/c)^2 cancels to
    # a rounding residue, which the float32 kernel's test leaves out too
    for st in states:
        st["step"] = 5
    for t in range(6, 9):
        g = _grads(t, fmt)
        params = [torch.from_numpy(p.copy()) for p in p_np]
        lists = state_lists(states)  # each step from the spec's state
        _kernel_step(o, t, params, [torch.from_numpy(x) for x in g], lists, isa_threads,
                     fmt=fmt)
        p_np, states = spec_step_all(o, p_np, g, states)
        for i in range(len(sizes)):
            # the float32-state kernel's tolerance against the spec (tests/test_kernels.py)
            np.testing.assert_allclose(params[i].numpy(), p_np[i], rtol=4 * EPS32,
                                       atol=4 * EPS32, err_msg=f"step {t}, {i}")
        assert_quantized_state(lists, states, exact=False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_bfloat16_params_round_to_nearest_like_the_spec(fmt):
    import ml_dtypes
    o = Options(lr=1e-2, momentum=0.9, centered=True)
    bf = ml_dtypes.bfloat16
    sizes = SIZES[fmt]
    p_np = [np.random.default_rng(i).standard_normal(n).astype(bf) for i, n in enumerate(sizes)]
    states = [_init(n, o, fmt) for n in sizes]
    params = [torch.from_numpy(p.astype(np.float32)).bfloat16() for p in p_np]
    lists = state_lists(states)
    for t in range(1, 3):
        g = [x.astype(bf) for x in _grads(t, fmt)]
        grads = [torch.from_numpy(x.astype(np.float32)).bfloat16() for x in g]
        _kernel_step(o, t, params, grads, lists, 2, fmt=fmt)
        p_np, states = spec_step_all(o, p_np, g, states)
        for i in range(len(sizes)):
            np.testing.assert_array_equal(params[i].float().numpy(), p_np[i].astype(np.float32))
        assert_quantized_state(lists, states, exact=True)


def test_statistics_equal_their_closed_form():
    """Health statistics come from the same loop as with float32 state: against the closed
    form of one step from v0 = 1 (exact in u8), b0 = 0 on a quantized tensor."""
    o = Options(lr=1e-2, momentum=0.9, initial_square_avg=1.0)
    n = 5000
    g64 = _grads(1)[3][:n].astype(np.float64)
    lists = state_lists([_init(n, o)])
    p = torch.ones(n)
    stats = torch.empty(1, 6, dtype=torch.float64)
    _kernel_step(o, 1, [p], [torch.from_numpy(g64.astype(np.float32))], lists, 1, stats=stats)
    d = np.sqrt(o.alpha + (1 - o.alpha) * g64 ** 2) + o.eps
    u = o.lr * g64 / d  # b = g / d, update lr * b
    want = [np.sum(g64 ** 2), np.sum(u ** 2), np.sum((1 - u) ** 2), np.min(o.lr / d),
            np.max(o.lr / d), 0.0]
    np.testing.assert_allclose(stats[0].numpy(), want, rtol=1e-5)


def _one(n=5000, momentum=0.0):
    codes, scales = torch.zeros(n, dtype=torch.uint8), torch.ones(-(-n // 256))
    kw = dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=momentum,
              centered=False, maximize=False, eps_in_sqrt=False, lr_in_momentum=False,
              nesterov=False, decoupled_weight_decay=False, bias_correction=1.0)
    return torch.ones(n), torch.ones(n), codes, scales, kw


def test_bad_input_raises_and_changes_nothing():
    p, g, codes, scales, kw = _one()
    before = (p.clone(), codes.clone(), scales.clone())
    with pytest.raises(ValueError, match="scales\\[0\\] must be a contiguous float32"):
        cpu.fused_step_quantized([p], [g], [codes], None, None, square_avg_scales=[scales[:-1]],
                                 **kw)
    with pytest.raises(TypeError, match="square_avgs\\[0\\] must be a torch.uint8"):
        cpu.fused_step_quantized([p], [g], [codes.float()], None, None,
                                 square_avg_scales=[scales], **kw)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16 params"):
        cpu.fused_step_quantized([p.double()], [g.double()], [codes], None, None,
                                 square_avg_scales=[scales], **kw)
    with pytest.raises(ValueError, match="momentum > 0 needs momentum_buffers"):
        cpu.fused_step_quantized([p], [g], [codes], None, None, square_avg_scales=[scales],
                                 **{**kw, "momentum": 0.9})
    with pytest.raises(ValueError, match="odd element count"):
        cpu.fused_step_quantized([p[:-1]], [g[:-1]], [codes[:2499]], None, None,
                                 square_avg_scales=[torch.ones(40)], state_dtype="4bit", **kw)
    with pytest.raises(ValueError, match="state_dtype must be one of 8bit, 4bit"):
        cpu.fused_step_quantized([p], [g], [codes], None, None, square_avg_scales=[scales],
                                 state_dtype="2bit", **kw)
    with pytest.raises(ValueError, match="quantized exactly where square_avgs is"):
        cpu.fused_step_quantized([p], [g], [codes], None, [codes.clone()],
                                 square_avg_scales=[scales], momentum_buffer_scales=[None],
                                 **{**kw, "momentum": 0.9})
    assert all(torch.equal(a, b) for a, b in zip(before, (p, codes, scales)))


# -- the codecs on their own: every code boundary, every code --------------------------------

def _scales():
    """Block scales over the float32 range: random mantissas at exponents -125..125, the
    ends of the range (subnormal, 2^126 and above) and round values."""
    rng = np.random.default_rng(7)
    e = rng.integers(-125, 126, 40)
    m = rng.uniform(1, 2, 40)
    edge = [1.0, 1.5, np.nextafter(np.float32(2), np.float32(0)), 0.1, 3.0e-39, 1.0e-45,
            2.0 ** -126, 2.0 ** -110, 2.0 ** 125, 2.0 ** 126, 3.0e38,
            float(np.finfo(np.float32).max)]
    return np.concatenate([(m * 2.0 ** e), edge]).astype(np.float32)


@pytest.fixture(params=["best", "base"])
def isa(request):
    if not cpu.set_isa(request.param):
        pytest.skip(f"no {request.param} build")
    yield request.param
    cpu.set_isa("best")


@pytest.mark.parametrize("fmt", CODEC_FORMATS)
def test_encoder_writes_the_spec_codes_at_every_code_boundary(fmt, isa):
    """The step's encoder (x86-64-v3: a division-free quotient for the signed maps, the
    root times L / sqrt(s) for the unsigned ones) against rmsprop.codecs.encode on the
    float32 values nearest every code boundary, at scales over the whole float32 range."""
    x = boundary_blocks(fmt, _scales(), ulps=8)
    want = codecs.encode(x, fmt)
    codes, scales = cpu.quant_encode(torch.from_numpy(x), fmt)
    np.testing.assert_array_equal(scales.numpy(), want.scales)
    np.testing.assert_array_equal(codes.numpy(), want.codes)


@pytest.mark.parametrize("fmt", CODEC_FORMATS)
def test_encoder_handles_zero_blocks_tails_and_nonfinite_like_the_portable_one(fmt, isa):
    """Blocks of zeros, of -0.0, a short last block, and (where the spec's NaN scale and the
    kernel's maximum part: the kernel's scale skips NaNs) the same codes on both builds."""
    f = codecs.FORMATS[fmt]
    rng = np.random.default_rng(3)
    x = rng.standard_normal(f.block * 5 + 38).astype(np.float32) ** 2
    if f.signed:
        x *= np.sign(rng.standard_normal(x.size)).astype(np.float32)
    x[:f.block] = 0.0
    x[f.block:2 * f.block] = -0.0
    want = codecs.encode(x, fmt)
    codes, scales = cpu.quant_encode(torch.from_numpy(x), fmt)
    np.testing.assert_array_equal(scales.numpy(), want.scales)
    np.testing.assert_array_equal(codes.numpy(), want.codes)
    y = x.copy()
    y[2 * f.block + 3] = np.nan
    y[3 * f.block + 1] = np.inf
    with np.errstate(invalid="ignore"):  # the spec casts its NaN quotients
        spec_codes = codecs.encode(y, fmt).codes
    got = [cpu.quant_encode(torch.from_numpy(y), fmt)]
    cpu.set_isa("base")
    got.append(cpu.quant_encode(torch.from_numpy(y), fmt))
    cpu.set_isa(isa)
    for a, b in zip(*got):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # outside the two non-finite blocks, the spec's codes
    keep = np.r_[0:2 * f.block, 4 * f.block:x.size] // (2 if f.bits == 4 else 1)
    np.testing.assert_array_equal(got[0][0].numpy()[np.unique(keep)],
                                  spec_codes[np.unique(keep)])


@pytest.mark.parametrize("fmt", CODEC_FORMATS)
def test_decoder_gives_the_spec_value_of_every_code(fmt, isa):
    f = codecs.FORMATS[fmt]
    per = 2 if f.bits == 4 else 1
    n_codes = 1 << f.bits
    scales = _scales()
    codes = np.tile(np.arange(n_codes, dtype=np.uint8), len(scales) * f.block // n_codes)
    n = codes.size
    packed = codes[0::2] | (codes[1::2] << 4) if per == 2 else codes
    q = codecs.Quantized(fmt, packed.astype(np.uint8), scales[:n // f.block].copy(), (n,))
    want = codecs.decode(q)
    got = cpu.quant_decode(torch.from_numpy(q.codes.copy()), torch.from_numpy(q.scales),
                           fmt, n)
    np.testing.assert_array_equal(got.numpy(), want)


def test_codec_entry_refuses_bad_input():
    with pytest.raises(ValueError, match="fmt must be one of u8, s8, u4, s4"):
        cpu.quant_encode(torch.ones(256), "u2")
    with pytest.raises(ValueError, match="even element count"):
        cpu.quant_encode(torch.ones(255), "u4")
    with pytest.raises(TypeError, match="float32 CPU tensor"):
        cpu.quant_encode(torch.ones(256, dtype=torch.float64), "u8")
    with pytest.raises(ValueError, match="scales must be a contiguous float32"):
        cpu.quant_decode(torch.zeros(256, dtype=torch.uint8), torch.ones(2), "u8", 256)
