"""The NumPy state formats (rmsprop.codecs) against closed forms of their own definitions,
computed independently here: code counts, no zero code, error bounds, exact fills, bytes from
shapes, block locality, nibble layout, and the rounding functions bit for bit."""

import math

import ml_dtypes
import numpy as np
import pytest

from rmsprop import codecs

BF16 = ml_dtypes.bfloat16


def _blocks(n, b):
    return -(-n // b)


@pytest.mark.parametrize("fmt", ["u8", "u4"])
def test_unsigned_map_has_L_codes_and_no_zero(fmt):
    f = codecs.FORMATS[fmt]
    L = 1 << f.bits
    # one block: a dense ramp from 0 to 1 hits every code, and none decodes to 0
    x = np.resize(((np.arange(L) + 1.0) / L) ** 2, f.block).astype(np.float32)  # each code
    q = codecs.encode(x, fmt)
    d = codecs.decode(q)
    assert len(np.unique(d)) == L
    assert d.min() == np.float32(1.0 / L ** 2)  # the smallest code: s / L^2, not 0
    assert d.max() == 1.0


@pytest.mark.parametrize("fmt", ["s8", "s4"])
def test_signed_map_has_2K_plus_1_codes_and_exact_zero(fmt):
    f = codecs.FORMATS[fmt]
    K = (1 << (f.bits - 1)) - 1
    x = np.linspace(-1.0, 1.0, f.block).astype(np.float32)
    d = codecs.decode(codecs.encode(x, fmt))
    assert len(np.unique(d)) == 2 * K + 1
    assert codecs.decode(codecs.encode(np.zeros(f.block), fmt)).tolist() == [0.0] * f.block
    assert d.min() == -1.0 and d.max() == 1.0


def _brute_force_unsigned(x, L):
    """Nearest code in the sqrt domain by exhaustive search, from the formula U = ((q+1)/L)^2
    (ties: the even candidate of rint(L*u), i.e. the q with q+1 even)."""
    s = x.max()
    u = np.sqrt(x / s)
    cand = (np.arange(L) + 1) / L
    dist = np.abs(u[:, None] - cand[None, :])
    return np.argmin(dist, axis=1), s


@pytest.mark.parametrize("fmt", ["u8", "u4"])
def test_unsigned_codes_are_nearest_in_sqrt_domain_and_bounded(fmt):
    f = codecs.FORMATS[fmt]
    L = 1 << f.bits
    rng = np.random.default_rng(1)
    x = (rng.random(f.block) ** 4).astype(np.float32)
    q = codecs.encode(x, fmt)
    d = codecs.decode(q).astype(np.float64)
    want, s = _brute_force_unsigned(x.astype(np.float64), L)
    np.testing.assert_array_equal(d, (s * ((want + 1) / L) ** 2).astype(np.float32))
    # error bound: within half a code in the sqrt domain, or rounded up to the smallest code
    u, ud = np.sqrt(x / s), np.sqrt(d / s)
    small = u < 1 / L
    assert np.all(np.abs(ud - u)[~small] <= 0.5 / L + 1e-6)
    assert np.all(ud[small] == 1 / L)
    # the decoded sqrt is at least 2/3 of the true one: a step grows at most 1.5x through v
    assert np.all(ud >= (2 / 3) * u - 1e-7)


@pytest.mark.parametrize("fmt", ["s8", "s4"])
def test_signed_error_bound(fmt):
    f = codecs.FORMATS[fmt]
    K = (1 << (f.bits - 1)) - 1
    x = np.random.default_rng(2).standard_normal(3 * f.block + 5).astype(np.float32)
    d = codecs.decode(codecs.encode(x, fmt))
    for b in range(_blocks(x.size, f.block)):
        sl = slice(b * f.block, (b + 1) * f.block)
        s = np.abs(x[sl]).max()
        assert np.all(np.abs(d[sl] - x[sl]) <= s / (2 * K) * (1 + 1e-6))
        assert np.all(np.sign(d[sl]) * np.sign(x[sl]) >= 0)  # never flips a sign


@pytest.mark.parametrize("fmt", list(codecs.FORMATS))
@pytest.mark.parametrize("fill", [0.0, 1.0, 0.3, 1e-30])
def test_a_filled_tensor_decodes_exactly(fmt, fill):
    # v0 = 1 (TF1/timm) and v0 = 0 must be exact: a block of one value decodes to that value.
    x = np.full(1000, fill, dtype=np.float32)
    np.testing.assert_array_equal(codecs.decode(codecs.encode(x, fmt)), x)


@pytest.mark.parametrize("fmt", list(codecs.FORMATS))
@pytest.mark.parametrize("n", [1, 127, 128, 4097, 10_000])
def test_bytes_from_shapes(fmt, n):
    f = codecs.FORMATS[fmt]
    q = codecs.encode(np.ones(n), fmt)
    assert q.codes.dtype == np.uint8 and q.scales.dtype == np.float32
    assert q.nbytes == math.ceil(n * f.bits / 8) + 4 * _blocks(n, f.block)


@pytest.mark.parametrize("fmt", list(codecs.FORMATS))
def test_blocks_never_straddle_tensors(fmt):
    # Two tensors quantized apart equal their concatenation quantized at a block boundary,
    # and each block's scale is its own largest magnitude.
    f = codecs.FORMATS[fmt]
    rng = np.random.default_rng(3)
    a = np.abs(rng.standard_normal(2 * f.block)) * 1e3
    b = np.abs(rng.standard_normal(f.block + 7)) * 1e-3
    if f.signed:
        a, b = a * np.sign(rng.standard_normal(a.size)), -b
    qa, qb, qab = codecs.encode(a, fmt), codecs.encode(b, fmt), codecs.encode(
        np.concatenate([a, b]), fmt)
    np.testing.assert_array_equal(np.concatenate([qa.scales, qb.scales]), qab.scales)
    np.testing.assert_array_equal(np.concatenate([codecs.decode(qa), codecs.decode(qb)]),
                                  codecs.decode(qab))
    b32 = np.abs(b.astype(np.float32))
    np.testing.assert_array_equal(qb.scales, [b32[: f.block].max(), b32[f.block:].max()])


def test_four_bit_nibble_layout():
    # element 2j in the low nibble, 2j+1 in the high one; a final odd element leaves 0 on top
    x = np.array([1.0, 0.0, -1.0, 0.5, 1.0], dtype=np.float32)
    q = codecs.encode(x, "s4")
    k = [7, 0, -7 & 0xF, 4, 7]  # rint(7 * 0.5) = rint(3.5) = 4 (ties to even)
    assert q.codes.tolist() == [k[0] | k[1] << 4, k[2] | k[3] << 4, k[4]]


def test_ties_round_to_even():
    # 8-bit signed: x/s = 0.5 -> 127 * 0.5 = 63.5 -> 64 (even); 4-bit unsigned: sqrt(x/s) =
    # 1/2 -> 16 * 0.5 = 8 exactly, q = 7; sqrt = 0.53125 -> 8.5 -> 8 (even), q = 7
    q = codecs.encode(np.array([1.0, 0.5], np.float32), "s8")
    assert q.codes.tolist() == [127, 64]
    q = codecs.encode(np.array([1.0, 0.53125 ** 2], np.float32), "u4")
    assert (q.codes[0] >> 4) == 7


def test_round_bfloat16_matches_ml_dtypes():
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.standard_normal(10_000).astype(np.float32) * 1e3,
                        np.array([0.0, -0.0, 1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1e-40, 3e38,
                                  np.inf, -np.inf], np.float32)])
    np.testing.assert_array_equal(codecs.round_bfloat16(x), x.astype(BF16).astype(np.float32))
    assert np.isnan(codecs.round_bfloat16(np.array([np.nan], np.float32)))[0]


def _fmix32_py(h):
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_random_bits_follow_their_integer_definition():
    seed, step, n = 123456789, 77, 50
    key = _fmix32_py(seed ^ ((step * 0x85EBCA77) & 0xFFFFFFFF))
    want = [_fmix32_py((key + i * 0x9E3779B9) & 0xFFFFFFFF) for i in range(n)]
    assert codecs.random_bits(seed, step, n).tolist() == want
    assert codecs.param_seed(5, 2) == _fmix32_py((5 + 0x9E3779B9 * 3) & 0xFFFFFFFF)
    r = codecs.random_bits(1, 1, 1 << 16)
    assert abs(float(np.mean(r & 1)) - 0.5) < 0.01  # balanced low bit (what rounding reads)


def test_stochastic_bfloat16_rounds_up_with_probability_of_the_distance():
    # Exhaustive over the 2^16 values of the low bits: exactly `remainder` of them round up.
    x = np.float32(1.0 + 0x1234 * 2 ** -23)  # 0x1234 / 2^16 of a bfloat16 ulp above 1
    r = np.arange(1 << 16, dtype=np.uint32)
    y = codecs.stochastic_round(np.full(r.size, x), BF16, r).astype(np.float32)
    lo, hi = np.float32(1.0), np.float32(1.0 + 2 ** -7)
    assert set(np.unique(y).tolist()) == {lo, hi}
    assert int((y == hi).sum()) == 0x1234
    neg = codecs.stochastic_round(np.full(r.size, -x), BF16, r).astype(np.float32)
    np.testing.assert_array_equal(neg, -y)  # symmetric: magnitude rounded


def test_stochastic_float16_normal_and_subnormal_probabilities():
    r = np.arange(1 << 13, dtype=np.uint32)
    x = np.float32(1.5 + 1000 * 2 ** -23)  # 1000 / 2^13 of a float16 ulp (2^-10) above 1.5
    y = codecs.stochastic_round(np.full(r.size, x), np.float16, r).astype(np.float32)
    assert set(np.unique(y).tolist()) == {1.5, 1.5 + 2 ** -10}
    assert int((y == np.float32(1.5 + 2 ** -10)).sum()) == 1000
    # subnormal float16 range: x = m * 2^-48 (below the quantum 2^-24): up iff (r >> 8) < m
    m = 12345
    x = np.float32(m * 2.0 ** -48)
    r = (np.arange(0, 1 << 24, 97, dtype=np.uint64) << 8).astype(np.uint32)
    y = codecs.stochastic_round(np.full(r.size, x), np.float16, r).astype(np.float64)
    assert set(np.unique(y).tolist()) <= {0.0, 2.0 ** -24}
    assert int((y > 0).sum()) == len(range(0, m, 97))
    # overflow past float16's largest finite value becomes inf; NaN stays NaN
    big = codecs.stochastic_round(np.array([65519.0, np.nan], np.float32), np.float16,
                                  np.array([0xFFFFFFFF, 0], np.uint32))
    assert np.isinf(big[0]) and np.isnan(big[1])


def _neighbours(x, dt):
    """The two values of ``dt`` around float32 ``x``, toward and away from zero."""
    n = x.astype(dt)
    over = np.abs(n.astype(np.float64)) > np.abs(x.astype(np.float64))
    zero, away = np.zeros((), dt), (np.sign(x) * np.inf).astype(dt)
    lo = np.where(over, np.nextafter(n, zero), n)
    hi = np.where(over | (n.astype(np.float64) == x), n, np.nextafter(n, away))
    return lo.astype(np.float64), hi.astype(np.float64)


@pytest.mark.parametrize("dt", [BF16, np.float16])
def test_stochastic_result_is_a_neighbour(dt):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(5000) * 10.0 ** rng.integers(-9, 4, 5000)).astype(np.float32)
    r = rng.integers(0, 2 ** 32, 5000, dtype=np.uint64).astype(np.uint32)
    y = codecs.stochastic_round(x, dt, r).astype(np.float64)
    lo, hi = _neighbours(x, dt)
    assert np.all((y == lo) | (y == hi))
