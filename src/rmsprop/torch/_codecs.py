"""State storage formats of the torch optimizer: the one seam through which every path reads
and writes ``square_avg``, ``grad_avg`` and ``momentum_buffer``.

A :class:`Codec` says how one state tensor of one parameter is stored and how it becomes a
tensor the rule can compute on (its *math dtype*: float64 for float64 params, float32
otherwise). The for-loop and foreach paths, the statistics, the fused kernels' plans and the
state-dict load and validation all go through it, so a new storage format is one codec here
(plus one per kernel, if a kernel is to take it) and one row in the test table.

Interface (``key`` is one of :data:`STATE_KEYS`; ``state`` is a parameter's state dict, or a
*slice* of it from :meth:`Codec.slice`)::

    codec.name                           e.g. "float32"; "8bit" for a quantized codec
    codec.block                          slice alignment in elements (1 for floats): the
                                         foreach path cuts long tensors only at multiples
    codec.dtype                          the storage dtype of a float codec, None otherwise
                                         (the fused kernels take float codecs only)
    codec.init(key, p, fill)             -> {name: tensor}: the entries of a new state tensor
                                         for param ``p`` (complex params: complex storage),
                                         every element ``fill``
    codec.decode(key, state, dtype)      -> the real tensor the rule computes on, in ``dtype``;
                                         may be the stored tensor itself (then in-place math
                                         writes the state)
    codec.encode_(key, state, value)     store ``value`` (a no-op when it is the stored tensor)
    codec.slice(key, state, lo, hi)      -> the entries for elements [lo, hi) of the flat real
                                         view (lo a multiple of ``block``); views, not copies;
                                         None when the storage cannot be cut (the foreach
                                         path then takes the tensor whole)
    codec.check(key, entry, p)           -> why a saved state entry cannot be loaded for ``p``
                                         (a phrase completing "state 'key' of parameter X"),
                                         or None; None also when the entry lacks the key
    codec.load(key, entry, p)            -> {name: tensor} this codec stores for a saved entry
                                         (another codec's or ``torch.optim.RMSprop``'s, full
                                         precision: a quantized codec quantizes it), or {}
                                         when the entry has no such state
    codec.names(key)                     -> the state-dict names this codec uses for ``key``
    codec.layout(key, state, p)          -> why the live ``state`` cannot be ``p``'s in this
                                         format: shapes, dtypes and devices only, no value
                                         read (cheap enough for every step of the general
                                         route, which checks it before anything is written),
                                         or None; None also when ``state`` lacks the key

Optional, for formats whose keys are stored together (a quantized ``square_avg`` kept as
``v - m^2`` needs ``grad_avg`` to decode): ``codec.decode_all(state, keys, dtype) -> {key:
tensor}`` and ``codec.encode_all_(state, {key: tensor})``; the paths call them instead of
the per-key methods when a codec has them. A decoded tensor may be flat: the paths view it
as the param's (real) shape. ``codec.export(entry, p) -> dict`` (optional) is a param's state
entry as a state dict holds it, when that differs from what the live state holds (a quantized
codec's sharded codes become DTensors, one row per shard); ``check`` and ``load`` accept both.

:func:`resolve` maps the optimizer's ``state_dtype`` option and a param's real dtype to a
codec; :func:`register` adds a named format (``register("8bit", factory)``), after which
``RMSprop(..., state_dtype="8bit")`` is accepted with no change to the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, Union

import torch
from torch import Tensor

__all__ = ["Codec", "FloatCodec", "STATE_KEYS", "resolve", "register", "registered",
           "check_state_dtype", "real"]

#: The state tensors a codec stores (``step`` is a count, kept as torch keeps it).
STATE_KEYS = ("square_avg", "grad_avg", "momentum_buffer")

StateDtype = Union[torch.dtype, str, None]  # noqa: UP007 (a runtime alias)

_HALF = (torch.float16, torch.bfloat16)
_COMPLEX = {torch.float64: torch.complex128, torch.float32: torch.complex64,
            torch.float16: torch.complex32}


def real(t: Tensor) -> Tensor:
    """The plain real tensor the math runs on: a DTensor's local shard (FSDP2 steps on
    shards, never gathers), complex as (re, im) pairs."""
    to_local = getattr(t, "to_local", None)
    if to_local is not None:
        t = to_local()
    return torch.view_as_real(t) if t.is_complex() else t


class Codec(Protocol):
    """A state storage format (see the module docstring for each member's contract)."""

    name: str
    block: int
    dtype: torch.dtype | None

    def names(self, key: str) -> tuple[str, ...]: ...

    def init(self, key: str, p: Tensor, fill: float) -> dict[str, Tensor]: ...

    def decode(self, key: str, state: dict, dtype: torch.dtype) -> Tensor: ...

    def encode_(self, key: str, state: dict, value: Tensor) -> None: ...

    def slice(self, key: str, state: dict, lo: int, hi: int
              ) -> dict[str, Tensor] | None: ...

    def check(self, key: str, entry: dict, p: Tensor) -> str | None: ...

    def layout(self, key: str, state: dict, p: Tensor) -> str | None: ...

    def load(self, key: str, entry: dict, p: Tensor) -> dict[str, Tensor]: ...


class FloatCodec:
    """State stored as a plain tensor of one floating dtype, shaped like the param (complex
    storage for complex params): what ``torch.optim.RMSprop`` saves, so state dicts load
    both ways. Decoding to the storage dtype returns the stored tensor's real view."""

    block = 1

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype: torch.dtype | None = dtype
        self._dtype = dtype
        self.name = str(dtype).replace("torch.", "")

    def __repr__(self) -> str:
        return f"FloatCodec({self.name})"

    def names(self, key: str) -> tuple[str, ...]:
        return (key,)

    def _stored_dtype(self, p: Tensor) -> torch.dtype:
        if not p.is_complex():
            return self._dtype
        if self._dtype not in _COMPLEX:
            raise ValueError(f"state dtype {self._dtype} cannot store the state of complex "
                             "params (torch has no complex type of it)")
        return _COMPLEX[self._dtype]

    def layout(self, key: str, state: dict, p: Tensor) -> str | None:
        t = state.get(key)
        if t is None:
            return None
        if not isinstance(t, Tensor):
            return "is not a tensor"
        want = self._stored_dtype(p)
        if t.shape != p.shape or t.dtype != want or t.device != p.device:
            return (f"is a {tuple(t.shape)} {t.dtype} tensor on {t.device}; the parameter "
                    f"needs a {tuple(p.shape)} {want} one on {p.device}")
        return None

    def init(self, key: str, p: Tensor, fill: float) -> dict[str, Tensor]:
        # complex state holds fill in both components: the rule treats them independently
        value: complex | float = complex(fill, fill) if p.is_complex() else fill
        return {key: torch.full_like(p, value, dtype=self._stored_dtype(p),
                                     memory_format=torch.preserve_format)}

    def decode(self, key: str, state: dict, dtype: torch.dtype) -> Tensor:
        t = real(state[key])
        return t if t.dtype == dtype else t.to(dtype)

    def encode_(self, key: str, state: dict, value: Tensor) -> None:
        t = real(state[key])
        if value is not t:
            t.copy_(value)

    def slice(self, key: str, state: dict, lo: int, hi: int) -> dict[str, Tensor] | None:
        t = real(state[key])
        return {key: t.view(-1)[lo:hi]} if t.is_contiguous() else None

    def check(self, key: str, entry: dict, p: Tensor) -> str | None:
        t = entry.get(key)
        if t is None:
            return None
        if not isinstance(t, Tensor):
            return "is not a tensor"
        if t.dtype == torch.uint8 and f"{key}_scale" in entry:
            return ("holds quantized codes (state_dtype='8bit' or '4bit'): load it into an "
                    "optimizer with that state_dtype, or convert it with "
                    "full_precision_state_dict()")
        if t.shape != p.shape:
            return f"has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}"
        if t.is_complex() != p.is_complex() or not (t.is_floating_point() or t.is_complex()):
            return f"has dtype {t.dtype}, incompatible with the parameter's {p.dtype}"
        if not bool(torch.isfinite(t).all()):
            return "holds inf or NaN"
        if key == "square_avg" and bool((real(t) < 0).any()):
            return "holds negative values (a mean of squares is >= 0)"
        return None

    def load(self, key: str, entry: dict, p: Tensor) -> dict[str, Tensor]:
        t = entry.get(key)
        if t is None:
            return {}
        return {key: t.to(device=p.device, dtype=self._stored_dtype(p), copy=True)}


#: Named formats beyond the float dtypes: name -> factory(param real dtype) -> Codec.
_REGISTRY: dict[str, Callable[[torch.dtype], Codec]] = {}


def register(name: str, factory: Callable[[torch.dtype], Codec]) -> None:
    """Make ``state_dtype=name`` resolve to ``factory(param_real_dtype)``. The factory raises
    ``ValueError`` naming the problem for a param dtype the format cannot store."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"codec name must be a non-empty string, got {name!r}")
    _REGISTRY[name] = factory
    _RESOLVED.clear()


def registered() -> tuple[str, ...]:
    """The names :func:`register` has added."""
    return tuple(_REGISTRY)


def check_state_dtype(state_dtype: Any) -> None:
    """Raise ``ValueError`` naming ``state_dtype`` unless it is ``None``, a floating
    ``torch.dtype`` or a registered name (the constructor's check: no param needed)."""
    if state_dtype is None:
        return
    if isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point:
        return
    if isinstance(state_dtype, str) and state_dtype in _REGISTRY:
        return
    names = ", ".join(map(repr, _REGISTRY))
    raise ValueError(f"Invalid state_dtype: {state_dtype!r} (a floating torch.dtype"
                     + (f" or one of {names})" if names else ")"))


#: resolve()'s results: a plain dict (torch.compile traces a lookup in it, and would trace
#: through a functools cache wrapper with a warning).
_RESOLVED: dict[tuple[Any, torch.dtype], Codec] = {}


def resolve(state_dtype: StateDtype, param_dtype: torch.dtype) -> Codec:
    """The codec of a param whose real dtype is ``param_dtype`` under the ``state_dtype``
    option: ``None`` means float32 for float16/bfloat16 params (the math runs in float32
    anyway, and 16-bit averages lose ``g^2`` to underflow) and the param dtype otherwise.
    Raises ``ValueError`` naming a bad value."""
    codec = _RESOLVED.get((state_dtype, param_dtype))
    if codec is None:
        codec = _RESOLVED[(state_dtype, param_dtype)] = _resolve(state_dtype, param_dtype)
    return codec


def _resolve(state_dtype: StateDtype, param_dtype: torch.dtype) -> Codec:
    check_state_dtype(state_dtype)
    if isinstance(state_dtype, str):
        return _REGISTRY[state_dtype](param_dtype)
    if state_dtype is None:
        state_dtype = torch.float32 if param_dtype in _HALF else param_dtype
    return FloatCodec(state_dtype)


def math_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the rule computes in for a param of this real dtype."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32
