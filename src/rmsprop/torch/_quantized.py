"""Quantized state for the torch optimizer: ``state_dtype="8bit"`` and ``"4bit"``, and
stochastic rounding of 16-bit params.

The formats are :mod:`rmsprop.codecs`' (the NumPy definition, with every formula); this module
is their torch translation, operation for operation, so that the codes a torch path writes are
the spec's bit for bit. A quantized state tensor is stored as two plain tensors in the param's
state: ``key`` (``uint8`` codes, flat over the real view) and ``key + "_scale"`` (``float32``,
one per block), so ``torch.save``/``torch.load(weights_only=True)`` carry them. Tensors below
:data:`rmsprop.codecs.MIN_QUANTIZED` elements keep one full-precision tensor, as
``torch.optim.RMSprop`` does.

Importing this module registers both names with :mod:`rmsprop.torch._codecs`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import codecs as spec_codecs
from ._codecs import STATE_KEYS, FloatCodec, real, register

__all__ = ["QuantizedCodec", "encode", "decode", "full_precision_state_dict",
           "random_bits", "stochastic_round_", "sr_init", "sr_write_"]

def _blocked(x: Tensor, block: int) -> Tensor:
    """Flat ``x`` as ``(blocks, block)`` rows, the last one padded with zeros (a view when
    ``x`` fills whole blocks)."""
    n = x.numel()
    nb = -(-n // block)
    if n != nb * block:
        x = torch.cat([x, x.new_zeros(nb * block - n)])
    return x.view(nb, block)


def encode(x: Tensor, fmt: str) -> tuple[Tensor, Tensor]:
    """``(codes, scales)`` of a real tensor in format ``fmt``: the spec's
    :func:`rmsprop.codecs.encode`, the same float32 operations."""
    f = spec_codecs.FORMATS[fmt]
    flat = x.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    rows = _blocked(flat, f.block)
    mag = rows.abs() if f.signed else rows.clamp_min(0)
    scales = mag.amax(dim=1) if rows.shape[0] else mag.new_zeros(0)
    # s = 0 only where the whole block is 0: dividing by 1 there gives the spec's u = 0
    safe = torch.where(scales > 0, scales, 1.0).unsqueeze(1)
    if f.signed:
        u = mag / safe
        k = torch.copysign(torch.round(u.mul_(f.levels)), rows)
        codes = torch.where(k < 0, k + (1 << f.bits), k).to(torch.uint8)
    else:
        c = torch.full_like(safe, float(f.levels)).div_(_sqrt_rn(safe))
        root = _sqrt_rn(torch.where(rows > 0, rows, 0.0))
        q = torch.round(root.mul_(c)).sub_(1).clamp_(0, f.levels - 1)
        codes = torch.where(scales.unsqueeze(1) > 0, q, 0.0).to(torch.uint8)
    if f.bits == 4:  # pairs; an odd last element leaves the high nibble 0
        codes = codes.view(-1)[: n + n % 2]
        if n % 2:
            codes[-1] = 0
        return codes[0::2] | (codes[1::2] << 4), scales
    return codes.view(-1)[:n], scales


def _sqrt_rn(x: Tensor) -> Tensor:
    """The correctly rounded float32 ``sqrt`` of float32 ``x`` (the spec's), whatever this
    device's float32 ``sqrt`` (torch's CPU one may be an ulp off): the float64 root is within
    an ulp of its own precision, and the root of a float32 lies farther than that from any
    float32 rounding midpoint, so rounding it once to float32 is exact."""
    return x.double().sqrt_().float()


def decode(codes: Tensor, scales: Tensor, fmt: str) -> Tensor:
    """The float32 values of ``codes`` and ``scales`` (flat): ``s * table[code]``, the table
    entry computed in place of looked up (``(q + 1)^2 * 2^-2b`` and ``k / K`` are the
    table's float32 values exactly: one exact product, one correctly rounded division)."""
    f = spec_codecs.FORMATS[fmt]
    if f.bits == 4:
        codes = torch.stack([codes & 0x0F, codes >> 4], dim=1).reshape(-1)
    n = codes.numel()
    if f.signed:
        k = codes.to(torch.int16)
        k = torch.where(k > f.levels, k - (1 << f.bits), k).clamp_(-f.levels, f.levels)
        t = k.to(torch.float32).div_(f.levels)
    else:
        t = codes.to(torch.float32).add_(1)
        t = t.mul_(t).mul_(1.0 / (f.levels * f.levels))
    rows = _blocked(t, f.block)
    return rows.mul_(scales.to(torch.float32).unsqueeze(1)).view(-1)[:n]


def _size(p: Tensor) -> int:
    return real(p).numel()


# -- sharded params (FSDP2's DTensors) ---------------------------------------------------------
#
# Each rank quantizes its own shard: blocks start at the shard's start, so a block never spans
# two ranks and no step needs a collective. In memory the codes and scales are plain tensors of
# the local shard. In a state dict (:func:`export`) they become DTensors of shape ``(S, L)``, one
# row per shard (``S`` shards, each row padded with zeros to the longest shard's ``L``), so that
# ``torch.distributed.checkpoint`` saves every rank's row: a plain tensor there counts as
# replicated and only one rank's copy would be saved. The block layout follows the shard
# boundaries, so such a state loads at the same sharding only; another sharding is refused with
# the route that works (a full-precision state dict, quantized again on load).


def _is_dtensor(t: Any) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")


def _shards(p: Tensor) -> tuple[list[int], int]:
    """For a DTensor param: the real element count of each of its distinct shards (row-major
    over the sharded mesh dimensions) and the index of this rank's shard. Placements other
    than ``Replicate`` and ``Shard`` raise ``ValueError``: their local pieces are not a
    contiguous range of rows."""
    from torch.distributed.tensor.placement_types import Shard

    mesh, placements = p.device_mesh, p.placements  # type: ignore[attr-defined]
    dims = []
    for i, pl in enumerate(placements):
        if pl.is_replicate():
            continue
        if type(pl) is not Shard:
            raise ValueError(f"quantized state of a DTensor placed as {tuple(placements)}: "
                             "only Replicate and Shard placements are supported")
        dims.append((i, pl.dim))
    sizes = [mesh.size(i) for i, _ in dims]
    coord = mesh.get_coordinate()
    mine = 0
    for (i, _), size in zip(dims, sizes):
        mine = mine * size + (coord[i] if coord is not None else 0)
    counts = []
    for flat in range(int(np.prod(sizes, dtype=np.int64)) if sizes else 1):
        at, rest = [], flat
        for size in reversed(sizes):
            at.append(rest % size)
            rest //= size
        shape = list(p.shape)
        for (_, d), size, c in zip(dims, sizes, reversed(at)):
            shape[d] = Shard.local_shard_size_and_offset(shape[d], size, c)[0]
        counts.append(int(np.prod(shape, dtype=np.int64)) * (2 if p.is_complex() else 1))
    return counts, mine


def shard_offset(p: Tensor) -> int:
    """Where a DTensor param's local shard starts among its shards' real elements, in the
    row-major order of :func:`_shards` (0 for a plain tensor). For shards that are ranges of
    rows (FSDP2's ``Shard(0)``) that is the flat index of the shard's first element, so a
    sharded run draws the rounding bits of the whole param; other shardings get disjoint
    index ranges, so that no two ranks draw the same bits."""
    if not _is_dtensor(p):
        return 0
    counts, mine = _shards(p)
    return sum(counts[:mine])


def _quantizes(p: Tensor, name: str) -> bool:
    """Whether format ``name`` quantizes ``p``'s state. A sharded param's is quantized only
    if every shard's is, so that all ranks store one kind of state (a checkpoint holds one
    kind per key)."""
    if _is_dtensor(p):
        return all(spec_codecs.quantizes(n, name) for n in _shards(p)[0])
    return spec_codecs.quantizes(_size(p), name)


def _row_lengths(p: Tensor, fmt: str) -> tuple[int, int, int, int]:
    """``(S, codes, scales, shard)`` of a sharded param in format ``fmt``: the shard count,
    the longest shard's code bytes and block count (a state dict's row lengths), and this
    rank's shard index."""
    f = spec_codecs.FORMATS[fmt]
    counts, mine = _shards(p)
    return (len(counts), max(n * f.bits // 8 for n in counts),
            max(-(-n // f.block) for n in counts), mine)


def _as_row(x: Tensor, p: Tensor, length: int, shards: int) -> Tensor:
    """Flat local ``x`` as this rank's row of an ``(shards, length)`` DTensor on ``p``'s mesh
    (zero padded; a copy, so the state dict never aliases the padding into the live state)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    row = x.new_zeros(1, length)
    row[0, : x.numel()] = x
    placements = [Replicate() if pl.is_replicate() else Shard(0)
                  for pl in p.placements]  # type: ignore[attr-defined]
    return DTensor.from_local(row, p.device_mesh,  # type: ignore[attr-defined]
                              placements, run_check=False,
                              shape=torch.Size((shards, length)), stride=(length, 1))


def _local_param(p: Tensor) -> Tensor:
    """``p``'s local shard (``p`` itself when it is not a DTensor), complex kept."""
    return p.to_local() if _is_dtensor(p) else p  # type: ignore[attr-defined]


def _local(t: Any) -> Any:
    return t.to_local() if _is_dtensor(t) else t


def _wrap_like(t: Tensor, p: Tensor) -> Tensor:
    """Local ``t`` (shaped like ``p``'s local shard) as a DTensor sharded like ``p``."""
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(t, p.device_mesh, p.placements,  # type: ignore[attr-defined]
                              run_check=False, shape=p.shape, stride=p.stride())


def _like_param(x: Tensor, p: Tensor) -> Tensor:
    """Flat real ``x`` of ``p``'s local shard shaped like ``p`` (complex for complex params),
    as a DTensor sharded like ``p`` when ``p`` is one."""
    x = x.view(real(p).shape)
    if p.is_complex():
        x = torch.view_as_complex(x.contiguous())
    return _wrap_like(x, p) if _is_dtensor(p) else x


class QuantizedCodec:
    """The ``"8bit"`` / ``"4bit"`` storage of :mod:`rmsprop.codecs` behind the codec seam
    (its contract: :mod:`rmsprop.torch._codecs`). Small tensors (and, in 4 bits, odd ones)
    are stored by a :class:`FloatCodec` of the param's math dtype; every method first looks
    at what is stored. With ``grad_avg`` present, ``square_avg`` holds ``w = max(v - m'^2,
    0)`` (see :mod:`rmsprop.codecs`), so :meth:`decode_all`/:meth:`encode_all_` handle the
    keys together."""

    dtype = None

    def __init__(self, name: str, param_dtype: torch.dtype) -> None:
        if param_dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise ValueError(f"state_dtype={name!r} cannot store the state of {param_dtype} "
                             "params")
        self.name = name
        self.formats = spec_codecs.QUANTIZED[name]
        self.block = spec_codecs.FORMATS[self.formats["square_avg"]].block
        full = torch.float64 if param_dtype == torch.float64 else torch.float32
        self.full = FloatCodec(full)
        # v of a square_avg stored before its grad_avg in the same step, by codes address
        self._pending: dict[int, Tensor] = {}

    def __repr__(self) -> str:
        return f"QuantizedCodec({self.name})"

    def names(self, key: str) -> tuple[str, ...]:
        return (key, key + "_scale")

    def quantizes(self, p: Tensor) -> bool:
        return _quantizes(p, self.name)

    @staticmethod
    def _is_codes(state: dict, key: str) -> bool:
        t = state.get(key)
        return t is not None and t.dtype == torch.uint8

    def init(self, key: str, p: Tensor, fill: float) -> dict[str, Tensor]:
        if not self.quantizes(p):  # a sharded param's local shard: see export()
            return self.full.init(key, _local_param(p), fill)
        r = real(p)
        codes, scales = encode(torch.full((r.numel(),), fill, dtype=torch.float32,
                                          device=r.device), self.formats[key])
        return {key: codes, key + "_scale": scales}

    # -- decode / encode ----------------------------------------------------------------------

    def _decode_one(self, key: str, state: dict) -> Tensor:
        return decode(state[key], state[key + "_scale"], self.formats[key])

    def decode(self, key: str, state: dict, dtype: torch.dtype) -> Tensor:
        """A flat tensor of the real view (the caller views it as the param's shape); for
        ``square_avg`` beside ``grad_avg``, ``v = w + m'^2``."""
        if not self._is_codes(state, key):
            return self.full.decode(key, state, dtype)
        x = self._decode_one(key, state)
        if key == "square_avg" and self._is_codes(state, "grad_avg"):
            m = self._decode_one("grad_avg", state)
            x = x + m * m
        return x if x.dtype == dtype else x.to(dtype)

    def decode_all(self, state: dict, keys: list[str], dtype: torch.dtype) -> dict[str, Tensor]:
        return {key: self.decode(key, state, dtype) for key in keys}

    def _write(self, key: str, state: dict, value: Tensor) -> None:
        codes, scales = encode(value, self.formats[key])
        state[key].copy_(codes)
        state[key + "_scale"].copy_(scales)

    def _write_w(self, state: dict, v: Tensor) -> None:
        """``square_avg`` as ``w = max(v - m'^2, 0)`` against the stored ``grad_avg``."""
        m = self._decode_one("grad_avg", state).to(v.dtype).view_as(v)
        self._write("square_avg", state, (v - m * m).clamp_min(0))

    def _joint(self, state: dict) -> bool:
        return self._is_codes(state, "grad_avg") and self._is_codes(state, "square_avg")

    def encode_(self, key: str, state: dict, value: Tensor) -> None:
        """Store ``value``. ``square_avg`` beside ``grad_avg`` is stored as ``w`` against the
        ``grad_avg`` stored now, and its ``v`` kept until ``grad_avg`` is stored in the same
        step, when ``w`` is written again against the new ``m'`` (the spec's order; a step
        that leaves ``grad_avg`` unchanged needs nothing more). :meth:`encode_all_` stores
        both in one pass and keeps nothing."""
        if not self._is_codes(state, key):
            return self.full.encode_(key, state, value)
        if key == "square_avg" and self._joint(state):
            self._pending[state["square_avg"].data_ptr()] = value
            return self._write_w(state, value)
        self._write(key, state, value)
        if key == "grad_avg" and self._joint(state):
            v = self._pending.pop(state["square_avg"].data_ptr(), None)
            if v is not None:
                self._write_w(state, v)

    def encode_all_(self, state: dict, values: dict[str, Tensor]) -> None:
        """Store one step's new values: ``grad_avg`` first, then ``square_avg`` (as ``w``
        against the ``m'`` just stored, the spec's order)."""
        for key in ("grad_avg", "momentum_buffer"):
            if key in values:
                self.encode_(key, state, values[key])
        v = values.get("square_avg")
        if v is None:
            return
        if self._is_codes(state, "square_avg") and self._joint(state):
            self._write_w(state, v)
        else:
            self.encode_("square_avg", state, v)

    def slice(self, key: str, state: dict, lo: int, hi: int) -> Any:
        """Views of elements ``[lo, hi)``; for ``square_avg`` and ``grad_avg`` stored together
        the slice holds both (each is read with the other)."""
        if not self._is_codes(state, key):
            return self.full.slice(key, state, lo, hi)
        b = self.block
        per_byte = 2 if spec_codecs.FORMATS[self.formats[key]].bits == 4 else 1
        keys = [key]
        if key in ("square_avg", "grad_avg") and self._is_codes(state, "grad_avg") \
                and self._is_codes(state, "square_avg"):
            keys = ["square_avg", "grad_avg"]
        out = {}
        for k in keys:
            out[k] = state[k][lo // per_byte: -(-hi // per_byte)]
            out[k + "_scale"] = state[k + "_scale"][lo // b: -(-hi // b)]
        return out

    # -- state dicts --------------------------------------------------------------------------

    def export(self, entry: dict, p: Tensor) -> dict:
        """``entry`` as a state dict holds it: for a sharded param, each quantized key's codes
        and scales as this rank's row of ``(S, L)`` DTensors (see :func:`_as_row`) and each
        full-precision one as a DTensor sharded like the param; else ``entry`` itself. The
        live state (plain tensors of the local shard) is not changed."""
        if not _is_dtensor(p):
            return entry
        out = dict(entry)
        for key in STATE_KEYS:
            t = entry.get(key)
            if not isinstance(t, Tensor) or _is_dtensor(t):
                continue
            if t.dtype == torch.uint8:
                shards, codes, blocks, _ = _row_lengths(p, self.formats[key])
                out[key] = _as_row(t, p, codes, shards)
                out[key + "_scale"] = _as_row(entry[key + "_scale"], p, blocks, shards)
            else:  # kept in full precision: sharded like the param, as a float codec's
                out[key] = _wrap_like(t, p)
        return out

    def _rows(self, key: str, entry: dict, p: Tensor) -> tuple[str | None, str | None]:
        """For ``key``'s codes saved as DTensor rows (:meth:`export`): (the quantized format
        whose row lengths they have at ``p``'s sharding, or None; why they do not fit)."""
        t: Any = entry[key]
        scale: Any = entry.get(key + "_scale")
        if not _is_dtensor(scale) or scale.dtype != torch.float32 or t.dim() != 2 \
                or scale.dim() != 2 or scale.shape[0] != t.shape[0]:
            return None, (f"holds sharded codes without a matching {key + '_scale'!r} "
                          "(a float32 DTensor with one row per shard)")
        saved = f"codes {tuple(t.shape)}, scales {tuple(scale.shape)}"
        if not _is_dtensor(p):
            return None, (f"was quantized in {t.shape[0]} shards ({saved}) and the parameter "
                          f"is not sharded: {_RESHARD}")
        for name, fmts in spec_codecs.QUANTIZED.items():
            if _quantizes(p, name):
                shards, codes, blocks, _ = _row_lengths(p, fmts[key])
                if tuple(t.shape) == (shards, codes) and tuple(scale.shape) == (shards, blocks):
                    return name, None
        if not self.quantizes(p):
            return None, (f"was quantized in {t.shape[0]} shards ({saved}); this optimizer "
                          f"keeps the parameter's {key!r} in full precision: {_RESHARD}")
        shards, codes, blocks, _ = _row_lengths(p, self.formats[key])
        return None, (f"was quantized in {t.shape[0]} shards ({saved}); the parameter's "
                      f"{shards} shards now take codes {(shards, codes)}, scales "
                      f"{(shards, blocks)}: {_RESHARD}")

    def _local(self, entry: dict, p: Tensor) -> dict:
        """``entry`` with codes saved as DTensor rows cut to this rank's shard: plain flat
        tensors, as the live state holds them (the entry has passed :meth:`check`)."""
        if not any(_is_dtensor(entry.get(k)) and entry[k].dtype == torch.uint8
                   for k in STATE_KEYS):
            return entry
        out = dict(entry)
        n = _size(p)
        for key in STATE_KEYS:
            t: Any = entry.get(key)
            if not (_is_dtensor(t) and t.dtype == torch.uint8):
                continue
            name, why = self._rows(key, entry, p)
            if name is None:  # check() refuses it first; a direct call says the same
                raise ValueError(f"state {key!r} {why}")
            f = spec_codecs.FORMATS[spec_codecs.QUANTIZED[name][key]]
            out[key] = t.to_local().reshape(-1)[: n * f.bits // 8]
            out[key + "_scale"] = entry[key + "_scale"].to_local().reshape(-1)[
                : -(-n // f.block)]
        return out

    def _saved_format(self, key: str, entry: dict, p: Tensor) -> tuple[str | None, str | None]:
        """(the quantized format of a saved entry, or None for full precision; why not)."""
        t: Any = entry.get(key)
        if not isinstance(t, Tensor) or t.dtype != torch.uint8:
            return None, None
        if _is_dtensor(t):
            name, why = self._rows(key, entry, p)
            if why:
                return None, why
            entry = self._local({key: t, key + "_scale": entry[key + "_scale"]}, p)
            t = entry[key]
        n = _size(p)
        scale: Any = entry.get(key + "_scale")
        if scale is None:
            return None, f"holds codes but no {key + '_scale'!r}"
        if not isinstance(scale, Tensor) or scale.dtype != torch.float32 or scale.dim() != 1:
            return None, f"has a {key + '_scale'!r} that is not a 1-d float32 tensor"
        for name, fmts in spec_codecs.QUANTIZED.items():
            f = spec_codecs.FORMATS[fmts[key]]
            if _quantizes(p, name) and t.dim() == 1 \
                    and t.numel() * (8 // f.bits) == n \
                    and scale.numel() == -(-n // f.block):
                if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
                    return None, "has scales that are negative, inf or NaN"
                return name, None
        return None, (f"holds {t.numel()} codes and {scale.numel()} scales, which fit no "
                      f"quantized format of the parameter's {n} elements")

    def check(self, key: str, entry: dict, p: Tensor) -> str | None:
        t = entry.get(key)
        if t is None:
            return None
        if not isinstance(t, Tensor):
            return "is not a tensor"
        if t.dtype == torch.uint8:
            return self._saved_format(key, entry, p)[1]
        if _is_dtensor(t) != _is_dtensor(p):
            return ("is sharded, the parameter is not" if _is_dtensor(t)
                    else "is not sharded, the parameter is")
        # the local shard: a rank checks its own (no collective), the shapes check the layout
        why = self.full.check(key, {key: _local(t)}, _local_param(p))
        placed = (getattr(t, "placements", None), getattr(p, "placements", None))
        if why is None and (t.shape != p.shape or placed[0] != placed[1]):
            why = (f"has shape {tuple(t.shape)} placed {placed[0]}, the parameter "
                   f"{tuple(p.shape)} placed {placed[1]}")
        return why

    def layout(self, key: str, state: dict, p: Tensor) -> str | None:
        t = state.get(key)
        if not isinstance(t, Tensor) or t.dtype != torch.uint8:
            return self.full.layout(key, state, _local_param(p))
        if not self.quantizes(p):
            return f"holds codes, but {self.name} keeps this parameter's state in full precision"
        f = spec_codecs.FORMATS[self.formats[key]]
        n, dev = _size(p), real(p).device
        codes, blocks = n * f.bits // 8, -(-n // f.block)
        if t.dim() != 1 or t.numel() != codes or t.device != dev:
            return (f"holds {tuple(t.shape)} codes on {t.device}; the parameter's {n} "
                    f"elements need {codes} on {dev}")
        s = state.get(key + "_scale")
        if not (isinstance(s, Tensor) and s.dtype == torch.float32 and s.dim() == 1
                and s.numel() == blocks and s.device == dev):
            return f"needs a {key + '_scale'!r} of {blocks} float32 block scales on {dev}"
        return None

    def _saved_value(self, key: str, entry: dict, p: Tensor) -> Tensor:
        """A saved entry's values as a flat float tensor of this rank's shard (``v`` itself
        for square_avg)."""
        entry = self._local(entry, p)
        t = entry[key]
        name, _ = self._saved_format(key, entry, p)
        if name is None:
            return real(t.detach()).reshape(-1).to(device=real(p).device,
                                                   dtype=self.full.dtype)
        fmt = spec_codecs.QUANTIZED[name][key]
        x = decode(t.to(real(p).device), entry[key + "_scale"].to(real(p).device), fmt)
        if key == "square_avg" and isinstance(entry.get("grad_avg"), Tensor) \
                and entry["grad_avg"].dtype == torch.uint8:
            m = decode(entry["grad_avg"].to(x.device),
                       entry["grad_avg_scale"].to(x.device),
                       spec_codecs.QUANTIZED[name]["grad_avg"])
            x = x + m * m
        return x.to(self.full.dtype)

    def load(self, key: str, entry: dict, p: Tensor) -> dict[str, Tensor]:
        if entry.get(key) is None:
            return {}
        entry = self._local(entry, p)
        if not self.quantizes(p):  # the local shard, a plain tensor: see export()
            lp = _local_param(p)
            if entry[key].dtype == torch.uint8:
                value = self._saved_value(key, entry, p).view(real(lp).shape)
                if p.is_complex():
                    value = torch.view_as_complex(value.contiguous())
                return self.full.load(key, {key: value}, lp)
            return self.full.load(key, {key: _local(entry[key])}, lp)
        name, _ = self._saved_format(key, entry, p)
        if name == self.name:  # our own format: the codes as saved, bit for bit
            return {key: entry[key].to(real(p).device, copy=True),
                    key + "_scale": entry[key + "_scale"].to(real(p).device, copy=True)}
        value = self._saved_value(key, entry, p)
        if key == "square_avg" and entry.get("grad_avg") is not None:
            # stored beside grad_avg: w against m' as this codec stores it
            m = self._saved_value("grad_avg", entry, p)
            m = decode(*encode(m, self.formats["grad_avg"]), self.formats["grad_avg"])
            m = m.to(value.dtype)
            value = (value - m * m).clamp_min(0)
        codes, scales = encode(value, self.formats[key])
        return {key: codes, key + "_scale": scales}


_RESHARD = ("blocks start at each shard's start, so quantized state loads only at the "
            "sharding it was saved with; to change it, save the saving optimizer's "
            "full_precision_state_dict() (float32, sharded like the params) and load that, "
            "which quantizes it again")


def _factory(name: str):
    return lambda param_dtype: QuantizedCodec(name, param_dtype)


for _name in spec_codecs.QUANTIZED:
    register(_name, _factory(_name))


def full_precision_state_dict(optimizer: Any,
                              state_dict: dict[str, Any] | None = None) -> dict[str, Any]:
    """``state_dict`` (default ``optimizer.state_dict()``; any state dict of ``optimizer``
    with its entries in param-group order, such as ``get_optimizer_state_dict(model, opt)``'s,
    keyed by names) with every quantized state tensor decoded to a float32 tensor shaped like
    its param (complex params: complex64) and the ``*_scale`` entries dropped: what
    ``torch.optim.RMSprop.load_state_dict`` accepts. A sharded (FSDP2) param's tensors are
    DTensors sharded like it, which ``torch.distributed.checkpoint`` can load at another
    sharding (quantized state cannot be resharded: its blocks start at the shards' starts)."""
    sd = optimizer.state_dict() if state_dict is None else state_dict
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    if len(ids) != len(params):
        raise ValueError(f"the state dict lists {len(ids)} params, the optimizer has "
                         f"{len(params)}")
    helper = QuantizedCodec(next(iter(spec_codecs.QUANTIZED)), torch.float32)
    state = {}
    for pid, p in zip(ids, params):
        entry = sd["state"].get(pid)
        if entry is None:
            continue
        out = {k: v for k, v in entry.items() if not k.endswith("_scale")}
        coded = [k for k in STATE_KEYS
                 if isinstance(entry.get(k), Tensor) and entry[k].dtype == torch.uint8]
        for key in coded:  # all first: decoding square_avg of centered state reads grad_avg
            why = helper.check(key, entry, p)
            if why:
                raise ValueError(f"state {key!r} of parameter {pid!r} {why}")
        for key in coded:
            x = helper._saved_value(key, entry, p).to(torch.float32)
            out[key] = _like_param(x, p)
        state[pid] = out
    return {"state": state, "param_groups": sd["param_groups"]}


# -- stochastic rounding -----------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's finalizer on int64 tensors holding uint32 values (products wrap mod 2^64,
    whose low 32 bits are the uint32 product)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def random_bits(seed: int, step: int, n: int, device: Any = "cpu", offset: int = 0) -> Tensor:
    """``r[i]`` of :func:`rmsprop.codecs.random_bits` for ``i`` in ``[offset, offset + n)``
    (int64 tensor of uint32 values)."""
    key = int(spec_codecs.fmix32(np.uint64((int(seed) ^ ((int(step) * 0x85EBCA77) & _M32))
                                           & _M32)))
    i = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    return _fmix32((key + (i * 0x9E3779B9 & _M32)) & _M32)


def stochastic_round_(out: Tensor, x: Tensor, r: Tensor) -> None:
    """Write float32 ``x`` into the bfloat16/float16 tensor ``out`` rounded stochastically with
    the bits ``r`` (shaped like ``x``), exactly as :func:`rmsprop.codecs.stochastic_round`."""
    x = x.to(torch.float32)
    bits = x.view(torch.int32).to(torch.int64) & _M32
    if out.dtype == torch.bfloat16:
        y_bits = (((bits + (r & 0xFFFF)) >> 16) << 16) & _M32
        y = _as_float(y_bits)
    elif out.dtype == torch.float16:
        a = x.abs()
        ab = a.view(torch.int32).to(torch.int64) & _M32
        y_normal = _as_float((ab + (r & 0x1FFF)) & 0xFFFFE000)
        t = a * 2.0 ** 24
        n = torch.floor(t)
        up = ((r >> 8).to(torch.float32) < (t - n) * 2.0 ** 24).to(torch.float32)
        y = torch.where(a >= 2.0 ** -14, y_normal, (n + up) * 2.0 ** -24)
        y = torch.copysign(y, x)
    else:
        raise ValueError(f"stochastic rounding is defined for bfloat16 and float16, not "
                         f"{out.dtype}")
    y = torch.where(torch.isnan(x), x, y)
    out.copy_(y.view_as(out))


def _as_float(bits: Tensor) -> Tensor:
    """int64 tensor of uint32 bit patterns -> float32 values."""
    signed = torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits)
    return signed.to(torch.int32).view(torch.float32)


def sr_init(state: dict, p: Tensor, seed: int) -> None:
    """Give a 16-bit param's new state its rounding seed (a plain int: it survives
    ``load_state_dict``'s dtype casts and ``torch.load(weights_only=True)``)."""
    if not 0 <= int(seed) < 2 ** 32:
        raise ValueError(f"Invalid seed: {seed!r} (an integer in [0, 2**32))")
    state["sr_seed"] = int(seed)


def sr_write_(p_real: Tensor, value: Tensor, seed: int, step: int, offset: int = 0) -> None:
    """Write the float32 new param ``value`` into the 16-bit ``p_real`` (its real view, or a
    flat slice starting at element ``offset``) with stochastic rounding for ``step``."""
    r = random_bits(seed, step, value.numel(), value.device, offset).view(value.shape)
    stochastic_round_(p_real, value, r)
