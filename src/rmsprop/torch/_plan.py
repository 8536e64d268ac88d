"""Plans: the only way to a fused kernel. What can be decided once is decided once.

A plan holds the pointer tables of a list of real tensors (params and their state) of one
device, one param dtype and one state codec (a float one, or a block-quantized one,
``"8bit"`` or ``"4bit"``: codes and block scales as the codec stores them, small tensors in
float32 in the same plan), and runs the kernel over them with the step's gradients.
:class:`CpuPlan` calls the C kernel (:mod:`rmsprop.kernels.cpu`, imported
when the first CPU plan is built: a CUDA user never loads the ctypes module) and
:class:`CudaPlan` the Triton kernel; both are siblings of :class:`Plan`.

The optimizer keeps one plan per param group (:meth:`Plan.bind`): a step over a model of a
thousand small tensors is dominated by Python, not arithmetic, so the cached plan also holds
one tensor with every param's ``step`` (each ``state["step"]`` is a 0-d view into it: the
state dict keeps torch's layout while one ``add_`` advances them all), and per step only the
gradients' pointers are read. ``kernels.cpu.fused_step`` and ``kernels.triton.fused_step``
build a one-shot plan and run it.

Kernel flags and hyperparameters are packed from a :class:`~rmsprop.torch._paths.Hyper` by
one function, :func:`pack`.
"""

from __future__ import annotations

import array
import operator
from collections.abc import Sequence
from itertools import repeat
from typing import Any

import torch
from torch import Tensor

from ._codecs import Codec, real
from ._paths import Hyper

#: Quantized state formats the C kernel stores, by state_dtype name: the format codes of the
#: ``u`` (square_avg) and ``s`` (grad_avg, momentum_buffer) tables, by name of the loader's
#: constant (resolved when a plan is built, so a CUDA user never loads the ctypes module).
QUANTIZED_FORMATS = {"8bit": ("_QF_U8", "_QF_S8", "_QF_S8"),
                     "4bit": ("_QF_U4", "_QF_S4", "_QF_S4")}

__all__ = ["Plan", "CpuPlan", "CudaPlan", "DeviceGate", "plan_for", "pack", "hyper_of",
           "FLAGS", "QUANTIZED_FORMATS", "scale_table"]

#: The kernels' option flags, by name (the C kernel's bit values are in its loader).
FLAGS = ("CENTERED", "MOMENTUM", "WD_COUPLED", "NESTEROV", "EPS_IN_SQRT", "LR_IN_MOMENTUM",
         "DECOUPLED", "MAXIMIZE")


def pack(h: Hyper) -> tuple[frozenset[str], tuple[float, ...]]:
    """The kernels' view of a step's options: the set of :data:`FLAGS` that are on and the
    seven float64 hyperparameters ``(lr, alpha, eps, weight_decay, momentum, c, inv_scale)``
    (``c = 1 - alpha^t`` or 1.0; ``inv_scale`` multiplies each gradient first)."""
    mom = h.momentum > 0
    on = {"CENTERED": h.centered, "MOMENTUM": mom,
          "WD_COUPLED": h.weight_decay != 0 and not h.decoupled_weight_decay,
          "NESTEROV": h.nesterov and mom, "EPS_IN_SQRT": h.eps_in_sqrt,
          "LR_IN_MOMENTUM": h.lr_in_momentum,
          "DECOUPLED": h.decoupled_weight_decay and h.weight_decay != 0,
          "MAXIMIZE": h.maximize}
    return (frozenset(k for k, v in on.items() if v),
            (float(h.lr), float(h.alpha), float(h.eps), float(h.weight_decay),
             float(h.momentum), float(h.c), float(h.inv_scale)))


def hyper_of(*, lr: float, alpha: float, eps: float, weight_decay: float, momentum: float,
             centered: bool, maximize: bool, eps_in_sqrt: bool, lr_in_momentum: bool,
             nesterov: bool, decoupled_weight_decay: bool, bias_correction: float,
             grad_scale: float | None = None) -> Hyper:
    """The :class:`Hyper` of a ``fused_step`` call's keyword arguments."""
    return Hyper(lr=float(lr), alpha=float(alpha), eps=float(eps),
                 weight_decay=float(weight_decay), momentum=float(momentum),
                 centered=bool(centered), maximize=bool(maximize),
                 eps_in_sqrt=bool(eps_in_sqrt), lr_in_momentum=bool(lr_in_momentum),
                 nesterov=bool(nesterov) and momentum > 0,
                 decoupled_weight_decay=bool(decoupled_weight_decay), c=float(bias_correction),
                 inv_scale=1.0 if grad_scale is None else 1.0 / float(grad_scale))


_DTYPE = operator.attrgetter("dtype")


def _ptrs(tensors: Sequence[Tensor]) -> array.array:
    # map() is a C-level loop (~2x a comprehension); an array from a list of known length
    # is cheaper than one grown from an iterator
    return array.array("Q", list(map(Tensor.data_ptr, tensors)))


def _addr(a: array.array) -> int:
    return a.buffer_info()[0]


def scale_table(scales: Sequence[Tensor | None]) -> array.array:
    """The block scales' pointer table of quantized state: 0 where a tensor keeps
    full-precision (float32) state, which the kernel reads as "not quantized"."""
    return array.array("Q", [0 if s is None else s.data_ptr() for s in scales])


class Plan:
    """Pointer tables over real, contiguous tensors of one device and dtype: ``params`` and
    their state (``square_avgs``; ``grad_avgs`` if centered, ``momentum_buffers`` if momentum),
    the state in one float dtype (the params' or float32)."""

    gated = False  # see CudaPlan
    steps_device: torch.device | None = None  # where bind() keeps the step counts (None:
    # where the states keep them)

    def __init__(self, params: Sequence[Tensor], square_avgs: Sequence[Tensor],
                 grad_avgs: Sequence[Tensor] | None,
                 momentum_buffers: Sequence[Tensor] | None) -> None:
        self.n = len(params)
        self.centered, self.momentum = grad_avgs is not None, momentum_buffers is not None
        self.p_dtype = params[0].dtype if self.n else torch.float32
        self.s_dtype = square_avgs[0].dtype if self.n else self.p_dtype
        self.numel = array.array("q", [p.numel() for p in params])
        self.P = _ptrs(params)
        self.P_list = self.P.tolist()  # compared as a list: no array to build per step
        self.V = _ptrs(square_avgs)
        self.M = _ptrs(grad_avgs) if grad_avgs is not None else None
        self.B = _ptrs(momentum_buffers) if momentum_buffers is not None else None
        self.keep: tuple = (list(params), list(square_avgs), grad_avgs, momentum_buffers)
        # set by bind() when the optimizer caches the plan for a group
        self.steps: Tensor | None = None
        self.group_params: list | None = None
        self.version = -1
        self.convert = False  # gradients need real() (complex or sharded params)
        self.validated: tuple | None = None  # the group's options when last validated
        self.hyper_memo: tuple | None = None  # (key, Hyper) of the optimizer's last step
        self._numels = self.numel.tolist()  # what a gradient must hold, checked when one moves
        self._dtypes = [self.p_dtype] * self.n
        self.state_of: tuple[dict, int] | None = None  # bind(): the optimizer's state map
        self.run_options: tuple | None = None  # the group's run options it was built under
        self._g_list: list[int] = []  # the last gradients' pointers, and their table
        self._g_table: array.array | None = None
        self.last_rows: Tensor | None = None  # the last statistics of a GradScaler step

    @staticmethod
    def accepts(codec: Codec, p_dtype: torch.dtype, device_type: str = "cpu") -> str | None:
        """Why the kernels cannot store state with ``codec`` for params of real dtype
        ``p_dtype`` on ``device_type`` (None if they can): they take float state of the
        params' dtype or float32, and both kernels also the ``"8bit"`` and ``"4bit"``
        block-quantized state of float32, float16 or bfloat16 params
        (:func:`rmsprop.kernels.cpu.fused_step_quantized`,
        :func:`rmsprop.kernels.triton.launch_quantized`)."""
        name = getattr(codec, "name", None)
        if codec.dtype is None and name in QUANTIZED_FORMATS and device_type in ("cpu", "cuda"):
            if p_dtype in (torch.float32, torch.float16, torch.bfloat16):
                return None
            return (f"state_dtype {name!r} of {p_dtype} params has no fused kernel "
                    "(float32, float16 or bfloat16 params)")
        if codec.dtype is None:
            return f"state_dtype {name!r} has no fused kernel on {device_type!r}"
        if codec.dtype not in (p_dtype, torch.float32):
            return (f"state dtype {codec.dtype} of {p_dtype} params has no fused kernel "
                    "(the params' dtype or float32)")
        return None

    # -- the cached plan of a param group ------------------------------------------------------

    def bind(self, group_params: list, states: list[dict], version: int,
             state_map: dict | None = None) -> None:
        """Cache this plan for a group whose params (all with state, in order) it covers:
        every ``state["step"]`` becomes a view into one tensor that :meth:`step` advances.
        ``state_map`` (the optimizer's ``state``): the plan stops holding when that map is
        replaced, cleared or loses or gains an entry."""
        self.group_params = group_params
        self.version = version
        if state_map is not None:
            self.state_of = (state_map, len(state_map))
        self.convert = any(p.is_complex() or hasattr(p, "to_local") for p in group_params)
        steps = torch.stack([st["step"].reshape(()).to(torch.float32) for st in states])
        if self.steps_device is not None:
            steps = steps.to(self.steps_device)
        for i, st in enumerate(states):  # views: one add_ advances every param's step
            st["step"] = steps[i]
        self.steps = steps

    def valid_for(self, group: dict, version: int, state_map: dict | None = None) -> bool:
        """The cached plan still describes ``group`` (same params, same state map of the
        same size)."""
        held = self.state_of
        return (version == self.version and group["params"] is self.group_params
                and (held is None or (held[0] is state_map and held[1] == len(held[0])))
                and len(self.group_params) == self.n
                and (group["momentum"] > 0) == self.momentum
                and bool(group["centered"]) == self.centered)

    def gradients(self, grads: list) -> array.array | None:
        """The gradients' pointer table, or None when the general route must run: a
        gradient that is missing, sparse or not contiguous, or a param whose storage moved
        (``p.data = ...``, ``model.half()``: the plan's dtypes may no longer hold).

        What is checked here, per tensor, at every step, and why nothing cheaper holds:
        the gradients' pointers (``zero_grad()`` frees the gradients, so backward makes new
        ones each step; the table row is rewritten only when one moved), their contiguity
        (a same tensor object can be restrided in place, ``g.data = g.t()``, without moving)
        and the params' pointers (``p.data = x`` keeps the object and moves its storage).
        Each is one C-level ``map`` over the list (~50 ns a tensor). When a gradient has
        moved, its dtype and element count are checked too (the kernel reads as many bytes
        as the param holds: a gradient of another dtype, ``p.grad_dtype = None``, or swapped
        through ``.data`` must never be read as the param's); a gradient that stays put is
        the one checked when it arrived. The params' identities are :meth:`valid_for`'s."""
        params = self.group_params or []
        try:
            if self.convert:
                if any(map(operator.is_, grads, repeat(None))):
                    return None
                grads = [real(g) for g in grads]
                params = [real(p) for p in params]
            if not all(map(Tensor.is_contiguous, grads)):
                return None
            if list(map(Tensor.data_ptr, params)) != self.P_list:
                return None
            ptrs = list(map(Tensor.data_ptr, grads))
        except (RuntimeError, TypeError, AttributeError):  # sparse gradients have no data
            return None                                  # pointer; a missing one is None
        if ptrs != self._g_list or self._g_table is None:
            if (list(map(_DTYPE, grads)) != self._dtypes
                    or list(map(Tensor.numel, grads)) != self._numels):
                return None
            self._g_list, self._g_table = ptrs, array.array("Q", ptrs)
        return self._g_table

    # -- the kernel ----------------------------------------------------------------------------

    def new_stats(self) -> Tensor:
        """An uninitialised ``[n, 6]`` float64 tensor for the kernel's statistics."""
        raise NotImplementedError

    def first_nonfinite(self, G: array.array) -> int:
        """Index of the first gradient holding inf or NaN, -1 if none."""
        raise NotImplementedError

    def run(self, G: array.array, h: Hyper, stats: Tensor | None = None,
            gate: Tensor | None = None) -> None:
        """The kernel over every tensor with the gradients ``G``."""
        raise NotImplementedError

    def step(self, G: array.array, h: Hyper, stats: Tensor | None = None,
             gate: Tensor | None = None) -> None:
        """:meth:`run`, then advance the bound group's step counts."""
        self.run(G, h, stats, gate)
        if self.steps is not None:
            self.steps.add_(1)


class CpuPlan(Plan):
    """A plan over CPU tensors: one call of the C kernel per step."""

    _bits: dict[str, int] | None = None

    def __init__(self, params: Sequence[Tensor], square_avgs: Sequence[Tensor],
                 grad_avgs: Sequence[Tensor] | None,
                 momentum_buffers: Sequence[Tensor] | None,
                 scales: dict[str, list[Tensor | None]] | None = None,
                 quantized: str | None = None) -> None:
        """``scales`` and ``quantized`` (a :data:`QUANTIZED_FORMATS` name) describe
        block-quantized state: ``square_avgs`` etc. are then each tensor's stored state as the
        codec keeps it (uint8 codes, or float32 for a tensor it keeps in full precision) and
        ``scales[key]`` the matching ``key + "_scale"`` tensors (None for full precision)."""
        from ..kernels import cpu
        super().__init__(params, square_avgs, grad_avgs, momentum_buffers)
        self._cpu = cpu
        self.pdt = cpu._dt(self.p_dtype)
        self.VS = self.MS = self.BS = None
        self.qfmt = (0, 0, 0)
        if quantized is not None:
            if scales is None:
                raise ValueError("a quantized CPU plan needs the state's block scales")
            self.qfmt = tuple(getattr(cpu, c) for c in QUANTIZED_FORMATS[quantized])
            self.VS = scale_table(scales["square_avg"])
            self.MS = scale_table(scales["grad_avg"]) if self.centered else None
            self.BS = scale_table(scales["momentum_buffer"]) if self.momentum else None
            self.keep = (*self.keep, scales)
            self.sdt = cpu._DT_F32  # unused by the quantized entry: it reads the tables
        else:
            self.sdt = cpu._dt(self.s_dtype)
        self.dts = array.array("i", [self.pdt] * self.n)
        if CpuPlan._bits is None:
            CpuPlan._bits = {name: getattr(cpu, "_FL_" + name) for name in FLAGS}

    def new_stats(self) -> Tensor:
        return torch.empty(self.n, 6, dtype=torch.float64)

    def first_nonfinite(self, G: array.array) -> int:
        lib = self._cpu._need()
        return int(lib.rms_first_nonfinite(self.n, _addr(self.numel), _addr(G),
                                           _addr(self.dts), torch.get_num_threads()))

    def run(self, G: array.array, h: Hyper, stats: Tensor | None = None,
            gate: Tensor | None = None) -> None:
        if self.n == 0:
            return
        lib = self._cpu._need()
        on, values = pack(h)
        bits = self._bits or {}
        flags = sum(bits[name] for name in on)
        hyper = array.array("d", values)
        st = stats.data_ptr() if stats is not None else None
        if self.VS is not None:
            vf, mf, bf = self.qfmt
            rc = lib.rms_fused_step_q(
                self.n, _addr(self.numel), _addr(self.P), _addr(G), _addr(self.V),
                _addr(self.M) if self.M is not None else None,
                _addr(self.B) if self.B is not None else None, _addr(self.VS),
                _addr(self.MS) if self.MS is not None else None,
                _addr(self.BS) if self.BS is not None else None, self.pdt, vf, mf, bf,
                _addr(hyper), flags, st, torch.get_num_threads())
            if rc != 0:
                raise RuntimeError(f"fused CPU step (quantized state) failed with code {rc}")
            return
        rc = lib.rms_fused_step(self.n, _addr(self.numel), _addr(self.P), _addr(G),
                                _addr(self.V), _addr(self.M) if self.M is not None else None,
                                _addr(self.B) if self.B is not None else None, self.pdt,
                                self.sdt, _addr(hyper), flags,
                                stats.data_ptr() if stats is not None else None,
                                torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"fused CPU step failed with code {rc}")


class CudaPlan(Plan):
    """A plan over CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``): the pointer
    tables live in a Triton :class:`~rmsprop.kernels.triton.Table` on the device, its
    per-step part rewritten only when the gradients' pointers or the hyperparameters change;
    the check and the step are one launch each, and the bound group's step counts live on
    the device.

    The plan is *gated*: the check raises a device flag (the gate, of a
    :class:`DeviceGate`) that the step kernel reads, doing nothing when it is set, and the
    step counts advance only when it is clear, so check and step are queued together and
    nothing on the host has to wait for the verdict. The learning rate (a tensor), the bias
    correction ``1 - alpha^t`` (from the device step count) and GradScaler's scale and
    ``found_inf`` (the gate) can all be read on the device: a step then reads nothing on the
    host, and ``torch.cuda.graph`` can capture it."""

    gated = True

    def __init__(self, params: Sequence[Tensor], square_avgs: Sequence[Tensor],
                 grad_avgs: Sequence[Tensor] | None,
                 momentum_buffers: Sequence[Tensor] | None,
                 scales: dict[str, list[Tensor | None]] | None = None,
                 quantized: str | None = None) -> None:
        """``scales`` and ``quantized`` as in :class:`CpuPlan` (block-quantized state, run
        by :func:`rmsprop.kernels.triton.launch_quantized`)."""
        from ..kernels import triton as tk
        super().__init__(params, square_avgs, grad_avgs, momentum_buffers)
        if quantized is not None and scales is None:
            raise ValueError("a quantized device plan needs the state's block scales")
        self.quantized = quantized
        qscales = None
        if scales is not None and quantized is not None:
            vs = scale_table(scales["square_avg"])
            qscales = (vs, scale_table(scales["grad_avg"]) if self.centered else vs,
                       scale_table(scales["momentum_buffer"]) if self.momentum else vs)
            self.keep = (*self.keep, scales)
        self._tk = tk
        self.p_like = params[0] if self.n else None
        self.s_like = square_avgs[0] if self.n else None
        self.device = params[0].device if self.n else torch.device("cpu")
        self.steps_device = self.device
        self.math64 = self.p_dtype == torch.float64
        self._launch_memo: tuple | None = None
        self.table = tk.Table((self.P, self.V, self.M if self.M is not None else self.V,
                               self.B if self.B is not None else self.V), self.numel,
                              self.device, scales=qscales)

    def first_nonfinite(self, G: array.array) -> int:
        gdev, _ = self.table.upload(G)
        return self.table.first_nonfinite(gdev, self.p_like)  # one sync

    def new_stats(self) -> Tensor:
        return torch.empty(self.n, 6, dtype=torch.float64, device=self.device)

    def check(self, G: array.array, gate: DeviceGate, base: int = 0) -> None:
        """Queue the inf/NaN check of the gradients into ``gate`` (a tensor holding one
        sets the gate and names itself as ``base`` + its index, if the lowest so far)."""
        gdev, _ = self.table.upload(G)
        self._tk.check_into(self.table, gdev, self.p_like, gate.flags, base)

    def run(self, G: array.array, h: Hyper, stats: Tensor | None = None,
            gate: Tensor | None = None, *, lr: Tensor | None = None,
            scale: Tensor | None = None, c: Tensor | None = None) -> None:
        """The kernel, reading ``lr``, ``scale`` (the gradients' scale: ``h.inv_scale`` is
        then ignored) and ``c`` (float64 ``1 - alpha^t``) from these one-element device
        tensors where given, else from ``h``; ``gate`` as in
        :func:`rmsprop.kernels.triton.launch`."""
        gdev, hyper, flags = self._upload(G, h, lr is not None, c is not None,
                                          scale is not None, stats is not None)
        if self.quantized is not None:
            self._tk.launch_quantized(self.table, gdev, hyper, self.p_like, flags,
                                      self.quantized, stats, gate, lr=lr, c=c, scale=scale)
            return
        self._tk.launch(self.table, gdev, hyper, self.p_like, self.s_like, flags, stats, gate,
                        lr=lr, c=c, scale=scale)

    def _upload(self, G: array.array, h: Hyper, lr: bool, c: bool, scale: bool, stats: bool
                ) -> tuple[Any, Any, dict[str, bool]]:
        """The device part of a step's launch (gradient pointers and hyperparameter slots,
        copied only when they changed) and its kernel flags; ``lr``, ``c``, ``scale``,
        ``stats``: whether those are read from the device."""
        key = (h, lr, c, scale, stats)
        if self._launch_memo is None or self._launch_memo[0] != key:
            self._launch_memo = (key, *self._launch_args(h, lr, c, scale, stats))
        _, values, flags = self._launch_memo
        gdev, hyper = self.table.upload(G, values)
        return gdev, hyper, flags

    def prepare(self, G: array.array, h: Hyper, *, lr: bool, bias: bool) -> dict[str, bool]:
        """What :meth:`step` does on the host before its launches, alone: upload the step's
        gradient pointers and hyperparameters to the device (``lr``: read from a device
        tensor; ``bias``: ``c`` from the device step count), returning the kernel flags. A
        replayed CUDA graph of :meth:`step` (captured with the same flags) then reads them."""
        return self._upload(G, h, lr, bias, False, False)[2]

    def _launch_args(self, h: Hyper, lr: bool, c: bool, scale: bool, stats: bool
                     ) -> tuple[tuple[float, ...], dict[str, bool]]:
        """The hyperparameter slots and kernel flags of a step with ``h`` (``lr``, ``c``,
        ``scale``: read from the device instead), kept by :meth:`run` while they hold."""
        on, values = pack(h)
        # the kernel folds maximize into the gradient multiplier (its sign is exact) and
        # divides it by the scale; a placeholder stands in a slot read from the device, so
        # a device value that changes never makes the host upload the table again
        sign = -1.0 if "MAXIMIZE" in on else 1.0
        gmul = sign if scale else sign * values[6]
        slots = (0.0 if lr else values[0], *values[1:5], 1.0 if c else values[5], gmul, 1.0)
        flags = dict(CENTERED="CENTERED" in on, MOMENTUM="MOMENTUM" in on,
                     WD_COUPLED="WD_COUPLED" in on, DECOUPLED="DECOUPLED" in on,
                     NESTEROV="NESTEROV" in on, EPS_IN_SQRT="EPS_IN_SQRT" in on,
                     LR_IN_MOMENTUM="LR_IN_MOMENTUM" in on, STATS=stats,
                     MATH64=self.math64)
        return slots, flags

    def step(self, G: array.array, h: Hyper, stats: Tensor | None = None,
             gate: Tensor | None = None, *, lr: Tensor | None = None,
             scale: Tensor | None = None, bias: bool = False,
             skipped: Tensor | None = None) -> None:
        """:meth:`run`, then advance the bound group's step counts unless ``gate`` is set
        (``skipped``, a one-element int64 device tensor, then counts the step). ``bias``:
        ``c = 1 - alpha^t`` from the device step count (``t`` = the first count + 1; the
        optimizer binds a bias-corrected group only when its counts agree), in float64 as
        the host computes it (``torch.pow``), instead of ``h.c``."""
        c = None
        if bias:
            if self.steps is None:
                raise ValueError("a bias-corrected device step needs a bound plan (bind())")
            c = torch.rsub(torch.pow(h.alpha, self.steps[:1].to(torch.float64) + 1), 1.0)
        self.run(G, h, stats, gate, lr=lr, scale=scale, c=c)
        if self.steps is None:
            return
        if gate is None:
            self.steps.add_(1)
        else:
            self._tk.advance(self.steps, gate, skipped)


def _verdict(pair: Any) -> int | None:
    """``[gate, first bad]`` as read on the host: the first bad index, or None if clean."""
    gate, bad = pair.tolist()
    return bad if gate else None


class DeviceGate:
    """One device's verdict on a step's gradients, on the device: ``flags`` is the int32
    pair ``[gate, first bad]`` (see :func:`rmsprop.kernels.triton.check_into`), ``skipped``
    an int64 count of the steps it skipped. :meth:`publish` copies the pair into the next of
    :attr:`DEPTH` slots of pinned host memory without waiting (``non_blocking``, with one
    CUDA event per slot; on CPU tensors a plain copy), so the host reads each step's verdict
    later, once its copy has arrived, while up to ``DEPTH`` steps' verdicts are on their way.
    Every tensor keeps its address: a captured graph resets, sets and counts the same ones."""

    NONE_BAD = 2 ** 31 - 1  # "first bad" when no tensor was
    #: Verdicts that can be on their way at once: the optimizer reads the oldest (waiting
    #: for it) before publishing into its slot again, so the host runs at most this many
    #: steps ahead of the device's checks.
    DEPTH = 8

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.flags = torch.zeros(2, dtype=torch.int32, device=self.device)
        # filled on the device: a host-to-device copy of a small tensor would wait for it
        self._clear = torch.full((2,), self.NONE_BAD, dtype=torch.int32, device=self.device)
        self._clear[0] = 0
        self.skipped = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.host = torch.zeros(self.DEPTH, 2, dtype=torch.int32, pin_memory=cuda)
        self._slots = list(self.host.unbind(0))  # views made once: indexing is a tensor op
        self._view = self.host.numpy()  # read through NumPy: host memory, no tensor op
        self._now = torch.zeros(2, dtype=torch.int32)
        self._now_view = self._now.numpy()
        self.events = [torch.cuda.Event() for _ in range(self.DEPTH)] if cuda else None
        self._next = 0

    def reset(self) -> None:
        """Clear the verdict (queued on the device, before the step's checks)."""
        self.flags.copy_(self._clear)

    def publish(self) -> int:
        """Queue the copy of the verdict to host memory (no wait) into the next slot, and
        return that slot (the caller has read the verdict it held before)."""
        k = self._next
        self._next = (k + 1) % self.DEPTH
        self._slots[k].copy_(self.flags, non_blocking=True)
        if self.events is not None:
            self.events[k].record()
        return k

    #: :meth:`poll`'s answer for a verdict still on its way.
    PENDING = -1

    def poll(self, slot: int) -> int | None:
        """:meth:`first_bad` of ``slot`` if its verdict has reached host memory, else
        :attr:`PENDING` (never waits)."""
        if self.events is not None and not self.events[slot].query():
            return self.PENDING
        return _verdict(self._view[slot])

    def first_bad(self, slot: int, wait: bool = True) -> int | None:
        """The verdict published into ``slot``: ``base`` + index of the first tensor that
        held inf or NaN, or None when the step was clean. ``wait`` waits for its copy (a
        wait on that slot's event only, not on the device's later work)."""
        if wait and self.events is not None:
            self.events[slot].synchronize()
        return _verdict(self._view[slot])

    def read_now(self) -> int | None:
        """:meth:`first_bad` of the verdict on the device now (waits for the device: for the
        immediate ``raise_now`` and for a step replayed in a captured graph)."""
        self._now.copy_(self.flags)
        return _verdict(self._now_view)


def plan_for(device_type: str) -> type[Plan] | None:
    """The plan class for tensors on this device type, or None."""
    return {"cpu": CpuPlan, "cuda": CudaPlan}.get(device_type)
