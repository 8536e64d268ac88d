"""State storage formats and parameter rounding, defined exactly: every backend reproduces these
bit for bit.

A state tensor (``square_avg`` ``v``, ``grad_avg`` ``m``, ``momentum_buffer`` ``b``) is stored
in one *format*. The rule (:mod:`rmsprop.spec`) decodes it to its math dtype, computes the step
with the fresh full-precision values, and encodes the new values once: the step itself never
sees a quantized value of the current step, so the only error is in the state carried to the
next step.

Float formats
-------------
``float64``, ``float32``, ``float16``, ``bfloat16``: a plain array of that dtype, written by
IEEE round-to-nearest-even from the math dtype (:func:`round_bfloat16` spells bfloat16's out on
the float32 bits, since NumPy has no bfloat16 of its own; storage uses ``ml_dtypes.bfloat16``).

Quantized formats (``state_dtype="8bit"`` / ``"4bit"``)
-------------------------------------------------------
Per state key::

    state_dtype   square_avg (v >= 0)      grad_avg (m), momentum_buffer (b)   bytes/element
    "8bit"        "u8": 256 codes, B=256   "s8": 255 codes, B=256              1 + 4/256 = 1.016
    "4bit"        "u4": 16 codes,  B=128   "s4": 15 codes,  B=128              1/2 + 4/128 = 0.531

A tensor is flattened to its real view (complex params as interleaved (re, im), as the rule
treats them) and cut into blocks of ``B`` consecutive elements (the last one may be shorter);
a block never spans two tensors, so each shard of a sharded tensor is quantized on its own.
Each block stores one float32 scale ``s`` (its largest magnitude) and one code per element.
All arithmetic below is float32 with correctly rounded ``/``, ``sqrt`` and ``*``, and ``rint``
is round-half-to-even; values are first rounded to float32.

*Unsigned maps* (``v``), ``L = 256`` (8-bit) or ``16`` (4-bit) levels::

    s = max(x over the block)                                  (x >= 0; s = 0: every code 0)
    c = L / sqrt(s)                                            (once per block)
    q = clamp(k - 1, 0, L - 1),  k = rint(sqrt(x) * c)        (encode; x < 0 or NaN as 0)
    x' = s * U[q],   U[q] = ((q + 1) / L)^2                    (decode; U exact in float32)

``sqrt(x) * c`` is ``L * sqrt(x / s)`` to within two ulps, so ``k`` is the nearest level of
the root, the quantity the step divides by. The encoder takes the root of the new ``x``, the
same correctly rounded ``sqrt`` the update takes of it (``sqrt(v) + eps``): a kernel reuses the
update's root and encodes with one product per element (no division, no second root). The
maximum of the roots is ``sqrt(s)``, since a correctly rounded ``sqrt`` is monotone, so the
block's largest element gets ``k = L`` exactly and decodes to ``s``.

*Signed maps* (``m``, ``b``), ``K = 127`` (8-bit) or ``7`` (4-bit)::

    s = max(|x| over the block)                                (s = 0: every code 0)
    k = rint(K * (|x| / s)), negated where x < 0               (encode)
    x' = s * S[k],   S[k] = sign(k) * min(|k|, K) / K          (decode; S = float32(the ratio))

Codes are stored as ``uint8``: the unsigned ``q``, or the signed ``k`` in two's complement
(``k mod 256``; 4-bit: ``k mod 16``). 4-bit codes pack two per byte, element ``2j`` in the low
nibble, ``2j + 1`` in the high one (a final odd element leaves the high nibble 0). The code
``-K - 1`` is never written; it decodes like ``-K``.

Tensors of fewer than :data:`MIN_QUANTIZED` real elements stay in full precision (float32 for
16-bit params, the param's dtype otherwise), as bitsandbytes' ``min_8bit_size``: their scales
would cost more than they save, and biases and norms are where a model is most sensitive.
So do tensors of an odd element count under ``"4bit"`` (:func:`quantizes`).

Why these maps (evidence: bitsandbytes, torchao, Li et al. 2023 "Memory Efficient Optimizers
with 4-bit States"):

- ``v`` has no zero code. A small ``v`` rounded to 0 makes ``1/sqrt(v)`` explode (Li et al.'s
  zero-point problem: 33-66 % of their 4-bit runs with a zero code diverged, none without). The
  smallest code decodes to ``s/L^2`` (``s/65536`` in 8 bits), and anything smaller rounds *up*
  to it, so quantizing ``v`` can only shrink a step, never inflate it past what the rounding
  below allows.
- Quantizing in the ``sqrt`` domain (the quantity the step divides by) halves the dynamic range
  in octaves and bounds the ratio: a decoded ``sqrt(v)`` is at least 2/3 of the true one
  (``(q + 1) / (q + 1.5)``, worst at ``q = 0``), so a step taken from the stored ``v`` is at
  most 1.5x the step from the ``v`` it encodes (along a whole run the errors of successive
  encodings can compound beyond that while ``v`` grows from 0). The block's largest element is exact
  (``U[L-1] = 1``), as is every element of a block filled with one value (``v0 = 1`` or 0).
- The signed maps are linear with 0 exact. ``b`` sums terms ``g/d``, each normalised by its
  own RMS, and ``m`` averages zero-mean gradient noise: a block's values spread narrowly and
  near-symmetrically, where evenly spaced codes have the least mean error (a companded map,
  finer near 0, costs resolution where most of the block's mass is), and an error in ``m`` or
  ``b`` adds to the step instead of dividing it, so it has no zero-point problem. Encoding
  needs no table search: one division, one ``rint``.
- With ``centered``, a quantized ``square_avg`` stores the centered moment ``w = max(v - m'^2,
  0)`` (``m'`` the decoded new ``grad_avg``) and decodes as ``v = w + m'^2``: the variance
  ``v - m^2`` the step takes the square root of is then quantized with ``w``'s relative
  error, where quantizing ``v`` and ``m`` apart makes it cancel (a 12 % error in a 4-bit ``v``
  exceeds a small variance, which clamps to 0 and divides the next step by ``eps``). After the
  EMA updates, ``v - m^2 = alpha*w + alpha*(1 - alpha)*(g - m')^2 >= 0`` exactly.
- Block-wise absmax (block 256 for 8 bits as torchao and bitsandbytes >= 0.44; 128 for 4 bits
  as Li et al.'s first moment and torchao's 4-bit) rather than Li et al.'s rank-1 row/column
  scale: a block depends only on its own elements, so shards quantize independently (rank-1
  needs the column maxima of the whole matrix), and their Table 1 shows the zero-free map alone
  (B128/DE-0) removed the instability.

Stochastic rounding of 16-bit params
------------------------------------
With ``stochastic_rounding`` the new value of a ``bfloat16``/``float16`` param, computed in
float32, is rounded down or up to its two neighbours with probability proportional to the
distance, from a counter-based generator: the 32-bit integer :func:`random_bits` of ``(seed,
step, element index)`` (every operation mod ``2**32``)::

    fmix32(h): h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35; h ^= h >> 16
    key = fmix32(seed ^ (step * 0x85EBCA77))
    r[i] = fmix32(key + i * 0x9E3779B9)                     (i: index in the flat real view)

    bfloat16:  bits16 = (bits32(x) + (r & 0xFFFF)) >> 16
    float16, |x| >= 2^-14:  y = float(((bits32(|x|) + (r & 0x1FFF)) & ~0x1FFF)), then cast
                            (exact; 65536 and above become inf), sign of x
    float16, |x| <  2^-14:  t = |x| * 2^24; n = floor(t); y = (n + [float(r >> 8) < (t - n) *
                            2^24]) * 2^-24, sign of x                    (the subnormal range)
    NaN stays NaN.

Each param has its own seed (:func:`param_seed` of the optimizer's seed and the param's
position), kept in its state with the step count, so a resumed run draws the same bits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["QFormat", "Quantized", "FORMATS", "QUANTIZED", "MIN_QUANTIZED", "encode", "decode",
           "init_entry", "quantizes", "store", "load", "family", "state_bytes",
           "unsigned_table", "signed_table", "round_bfloat16", "fmix32", "random_bits",
           "param_seed", "stochastic_round", "is_float_dtype", "Entry"]

#: Tensors with fewer real elements than this keep full-precision state.
MIN_QUANTIZED = 4096

_M32 = np.uint64(0xFFFFFFFF)


@dataclass(frozen=True)
class QFormat:
    """One quantized map: ``bits`` per code, ``signed`` or not, ``block`` elements per scale."""

    name: str
    bits: int
    signed: bool
    block: int

    @property
    def levels(self) -> int:
        """``L`` of the unsigned map, ``K`` (largest code magnitude) of the signed one."""
        return (1 << (self.bits - 1)) - 1 if self.signed else 1 << self.bits


FORMATS: dict[str, QFormat] = {
    "u8": QFormat("u8", 8, False, 256), "s8": QFormat("s8", 8, True, 256),
    "u4": QFormat("u4", 4, False, 128), "s4": QFormat("s4", 4, True, 128),
}

#: ``state_dtype`` name -> the format of each state key.
QUANTIZED: dict[str, dict[str, str]] = {
    "8bit": {"square_avg": "u8", "grad_avg": "s8", "momentum_buffer": "s8"},
    "4bit": {"square_avg": "u4", "grad_avg": "s4", "momentum_buffer": "s4"},
}


def is_float_dtype(dtype: Any) -> bool:
    """Whether ``dtype`` is a real floating-point dtype, ml_dtypes' ``bfloat16`` included
    (which NumPy does not count as floating)."""
    dt = np.dtype(dtype)
    return bool(np.issubdtype(dt, np.floating) or dt.name == "bfloat16")


def _format(fmt: Any) -> QFormat:
    """The format named ``fmt``, or ``ValueError`` naming the known ones."""
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ValueError(f"unknown quantized format {fmt!r} (one of {', '.join(FORMATS)}; "
                         f"a state_dtype {', '.join(map(repr, QUANTIZED))} picks them per key)")
    return FORMATS[fmt]


@dataclass(frozen=True)
class Quantized:
    """A quantized state array: ``codes`` (uint8, flat; two per byte for 4 bits), ``scales``
    (float32, one per block) and the ``shape`` of the real array it stands for."""

    fmt: str
    codes: np.ndarray
    scales: np.ndarray
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        _format(self.fmt)

    def problem(self) -> str | None:
        """Why these codes and scales cannot stand for an array of ``shape`` (None when
        they can): uint8 codes, one per element (4 bits: one per two), float32 scales, one
        per block, none negative or NaN."""
        f = FORMATS[self.fmt]
        codes, scales = np.asarray(self.codes), np.asarray(self.scales)
        n = self.size
        want = -(-n // 2) if f.bits == 4 else n
        if codes.dtype != np.uint8 or codes.ndim != 1 or codes.size != want:
            return (f"{self.fmt} codes must be {want} uint8 values for {n} elements, got "
                    f"{codes.size} {codes.dtype}")
        if scales.dtype != np.float32 or scales.ndim != 1 or scales.size != _blocks(n, f.block):
            return (f"{self.fmt} scales must be {_blocks(n, f.block)} float32 values (one per "
                    f"{f.block} elements), got {scales.size} {scales.dtype}")
        if bool(np.any(np.isnan(scales) | (scales < 0))):
            return f"{self.fmt} scales hold NaN or negative values"
        return None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.scales.nbytes)


Entry = np.ndarray | Quantized


def unsigned_table(levels: int) -> np.ndarray:
    """``U[q] = ((q + 1) / L)^2`` as float32 (exact: a ratio of integers below 2^17 over a
    power of two)."""
    q = np.arange(levels, dtype=np.float64)
    return (((q + 1) / levels) ** 2).astype(np.float32)


def signed_table(bits: int) -> np.ndarray:
    """``S`` indexed by the stored code ``c`` (two's complement of ``k`` in ``bits`` bits):
    ``sign(k) * min(|k|, K) / K`` rounded once to float32."""
    k_max = (1 << (bits - 1)) - 1
    c = np.arange(1 << bits)
    k = np.where(c > k_max, c - (1 << bits), c)
    mag = np.minimum(np.abs(k), k_max).astype(np.float64)
    return (np.sign(k) * mag / k_max).astype(np.float32)


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def _block_max(a: np.ndarray, block: int) -> np.ndarray:
    """float32 maximum of each block of the flat non-negative ``a``."""
    n = a.size
    nb = _blocks(n, block)
    padded = np.zeros(nb * block, dtype=np.float32)
    padded[:n] = a
    return padded.reshape(nb, block).max(axis=1) if nb else np.zeros(0, np.float32)


def encode(x: np.ndarray, fmt: str) -> Quantized:
    """Quantize a real array in format ``fmt`` (formulas in the module docstring)."""
    f = _format(fmt)
    x = np.asarray(x)
    if not is_float_dtype(x.dtype):
        raise TypeError(f"encode needs a real floating-point array, got {x.dtype} (complex "
                        "state is encoded as its interleaved real view)")
    x32 = x.astype(np.float32)
    shape = x32.shape
    flat = x32.reshape(-1)
    n = flat.size
    mag = np.abs(flat) if f.signed else np.maximum(flat, np.float32(0))
    scales = _block_max(mag, f.block)
    s = np.repeat(scales, f.block)[:n]
    if f.signed:
        u = np.where(s > 0, mag / np.where(s > 0, s, np.float32(1)), np.float32(0))
        k = np.rint(np.float32(f.levels) * u.astype(np.float32)).astype(np.int64)
        k = np.where(flat < 0, -k, k)
        codes = (k & ((1 << f.bits) - 1)).astype(np.uint8)
    else:
        c = np.float32(f.levels) / np.sqrt(np.where(scales > 0, scales, np.float32(1)))
        root = np.sqrt(np.where(flat > 0, flat, np.float32(0)))
        k = np.rint(root * np.repeat(c.astype(np.float32), f.block)[:n]).astype(np.int64)
        codes = np.where(s > 0, np.clip(k - 1, 0, f.levels - 1), 0).astype(np.uint8)
    if f.bits == 4:
        codes = _pack4(codes)
    return Quantized(fmt, codes, scales, tuple(shape))


def decode(q: Quantized, dtype: Any = np.float32) -> np.ndarray:
    """The values a quantized array stands for, as float32 ``s * table[code]`` cast to
    ``dtype`` (exact for float64)."""
    f = FORMATS[q.fmt]
    why = q.problem()
    if why:
        raise ValueError(f"cannot decode: {why}")
    out = _float_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    if not is_float_dtype(out):
        raise TypeError(f"decode gives floating-point values, not {out}")
    n = q.size
    codes = _unpack4(q.codes, n) if f.bits == 4 else q.codes[:n]
    table = signed_table(f.bits) if f.signed else unsigned_table(f.levels)
    s = np.repeat(q.scales.astype(np.float32), f.block)[:n]
    return (s * table[codes]).astype(np.float32).reshape(q.shape).astype(dtype)


def _pack4(codes: np.ndarray) -> np.ndarray:
    c = codes.astype(np.uint8)
    if c.size % 2:
        c = np.concatenate([c, np.zeros(1, np.uint8)])
    return (c[0::2] | (c[1::2] << 4)).astype(np.uint8)


def _unpack4(packed: np.ndarray, n: int) -> np.ndarray:
    out = np.empty(packed.size * 2, dtype=np.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:n]


def _float_dtype(name: Any) -> np.dtype:
    if isinstance(name, str) and name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise ValueError("state_dtype 'bfloat16' needs the ml_dtypes package for NumPy "
                             "storage (pip install ml_dtypes)") from None
        return np.dtype(ml_dtypes.bfloat16)
    try:
        dt = np.dtype(name)
    except TypeError:
        raise ValueError(f"Invalid state_dtype: {name!r} (a float dtype, 'bfloat16', "
                         f"{', '.join(map(repr, QUANTIZED))})") from None
    if not is_float_dtype(dt):
        raise ValueError(f"Invalid state_dtype: {name!r} (a float dtype, 'bfloat16', "
                         f"{', '.join(map(repr, QUANTIZED))})")
    return dt


def _default_dtype(real_dtype: np.dtype) -> np.dtype:
    """Full precision for a param of this real dtype: its math dtype (float32 for 16-bit)."""
    return np.dtype(np.float64) if real_dtype == np.float64 else np.dtype(np.float32)


def init_entry(key: str, shape: tuple[int, ...], fill: float, state_dtype: Any,
               param_dtype: Any) -> Entry:
    """A new state array of the real ``shape`` filled with ``fill``, in the storage
    ``state_dtype`` selects for ``key`` (``None``: the param's real dtype; a quantized name:
    full precision below :data:`MIN_QUANTIZED` elements)."""
    real = np.dtype(param_dtype)
    if isinstance(state_dtype, str) and state_dtype in QUANTIZED:
        size = int(np.prod(shape, dtype=np.int64))
        if not quantizes(size, state_dtype):
            return np.full(shape, fill, dtype=_default_dtype(real))
        return encode(np.full(shape, fill, dtype=np.float32), QUANTIZED[state_dtype][key])
    dt = real if state_dtype is None else _float_dtype(state_dtype)
    return np.full(shape, fill, dtype=dt)


def quantizes(size: int, state_dtype: str) -> bool:
    """Whether a tensor of ``size`` real elements is quantized under ``state_dtype``: at least
    :data:`MIN_QUANTIZED` elements, and for 4 bits an even count (two codes per byte, so the
    codes' length gives the element count)."""
    if state_dtype not in QUANTIZED:
        raise ValueError(f"not a quantized state_dtype: {state_dtype!r} (one of "
                         f"{', '.join(map(repr, QUANTIZED))})")
    return size >= MIN_QUANTIZED and (state_dtype != "4bit" or size % 2 == 0)


def family(entry: Entry) -> Any:
    """The ``state_dtype`` that made ``entry``: a quantized name or the array's dtype."""
    if isinstance(entry, Quantized):
        bits = FORMATS[entry.fmt].bits
        return f"{bits}bit"
    return entry.dtype


def load(entry: Entry, dtype: Any) -> np.ndarray:
    """The entry as an array of the math ``dtype``."""
    return decode(entry, dtype) if isinstance(entry, Quantized) else entry.astype(dtype)


def store(value: np.ndarray, like: Entry, key: str | None = None) -> Entry:
    """``value`` stored in the format of ``like`` (a fresh entry, ``like`` is unchanged).
    ``key`` picks the map when ``like`` is another key's entry (a buffer created mid-run)."""
    if isinstance(like, Quantized):
        fmt = like.fmt if key is None else QUANTIZED[family(like)][key]
        return encode(value, fmt)
    if like.dtype.name == "bfloat16":
        return round_bfloat16(value.astype(np.float32)).astype(like.dtype)
    return value.astype(like.dtype)


def state_bytes(state: Mapping[str, Any]) -> int:
    """Bytes held by a state's arrays (codes and scales included)."""
    total = 0
    for v in state.values():
        if isinstance(v, (np.ndarray, Quantized)):
            total += int(v.nbytes)
    return total


# -- rounding ----------------------------------------------------------------------------------

def _bits32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def round_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 ``x`` rounded to the nearest bfloat16 (ties to even), as float32 values:
    ``bits = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000``; NaN stays NaN."""
    b = _bits32(x).astype(np.uint64)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    out = r.view(np.float32).reshape(np.shape(x))
    return np.where(np.isnan(x), np.float32(np.nan), out)


def fmix32(h: Any) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (a bijection of uint32 with full avalanche)."""
    h = np.asarray(h, dtype=np.uint64) & _M32
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & _M32
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & _M32
    h ^= h >> np.uint64(16)
    return h.astype(np.uint32)


def param_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th param (0-based, in optimizer order) of a run seeded
    ``seed``: ``fmix32(seed + 0x9E3779B9 * (index + 1))``."""
    return int(fmix32(np.uint64((int(seed) + 0x9E3779B9 * (int(index) + 1)) & 0xFFFFFFFF)))


def random_bits(seed: int, step: int, n: int) -> np.ndarray:
    """``r[i]`` for ``i < n`` (uint32): the generator of the module docstring."""
    key = int(fmix32(np.uint64((int(seed) ^ ((int(step) * 0x85EBCA77) & 0xFFFFFFFF))
                               & 0xFFFFFFFF)))
    i = np.arange(n, dtype=np.uint64)
    return fmix32((np.uint64(key) + i * np.uint64(0x9E3779B9)) & _M32)


def stochastic_round(x: np.ndarray, dtype: Any, r: np.ndarray) -> np.ndarray:
    """float32 ``x`` rounded stochastically to ``dtype`` (bfloat16 or float16) with the
    random bits ``r`` (one uint32 per element), as in the module docstring."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    r = np.asarray(r, dtype=np.uint64).reshape(x.shape)
    dt = np.dtype(dtype)
    b = _bits32(x).astype(np.uint64)
    if dt.name == "bfloat16":
        bits = (((b + (r & np.uint64(0xFFFF))) >> np.uint64(16)) << np.uint64(16)) & _M32
        y = bits.astype(np.uint32).view(np.float32).reshape(x.shape)
        y = np.where(np.isnan(x), x, y)
        return y.astype(dt)
    if dt != np.float16:
        raise ValueError(f"stochastic rounding is defined for bfloat16 and float16, not {dt}")
    a = np.abs(x)
    ab = _bits32(a).astype(np.uint64)
    normal = ((ab + (r & np.uint64(0x1FFF))) & np.uint64(0xFFFFE000)).astype(np.uint32)
    y_normal = normal.view(np.float32).reshape(x.shape)
    t = a * np.float32(2.0 ** 24)
    n = np.floor(t)
    frac = (t - n) * np.float32(2.0 ** 24)
    up = ((r >> np.uint64(8)).astype(np.float32) < frac).astype(np.float32)
    y_sub = (n + up) * np.float32(2.0 ** -24)
    y = np.where(a >= np.float32(2.0 ** -14), y_normal, y_sub)
    y = np.where(np.isnan(x), x, np.copysign(y, x))
    with np.errstate(over="ignore"):
        return y.astype(np.float16)
