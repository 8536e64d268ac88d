"""``rmsprop.torch.RMSprop``: a drop-in for ``torch.optim.RMSprop`` with every published variant.

The math is :func:`rmsprop.spec.step`, translated once in :mod:`rmsprop.torch._paths`; this
module owns what torch users expect around it (param groups, lazy state with torch's state
names, the ``state_dict`` contract, hooks, schedulers) and the dispatch: one step route from
collecting the gradients to writing the params, which sends each param group to a cached
fused-kernel plan (:mod:`rmsprop.torch._plan`), or to the for-loop, foreach or one-shot fused
path. State is read and written through codecs (:mod:`rmsprop.torch._codecs`); statistics
live in :mod:`rmsprop.torch._stats`, state-dict validation in
:mod:`rmsprop.torch._state_dict`.
"""

from __future__ import annotations

import functools
import operator
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..options import RULE_OPTIONS, validate
from ..presets import resolve_preset
from . import _codecs, _paths, _plan, _state_dict, _stats
from ._codecs import Codec, real
from ._paths import Hyper

__all__ = ["RMSprop", "NonFiniteGradientError"]

_NONFINITE = ("raise", "raise_now", "skip", "ignore")
#: Device types where capturable=True promises a step with no host read (CUDA graphs); the
#: for-loop and foreach paths refuse the options that would read the host there.
_CAPTURE_DEVICES = ("cuda",)
_GRAD = operator.attrgetter("grad")
_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64,
         torch.complex32: torch.float16}
_FOREACH_BATCH = _paths.FOREACH_BATCH  # the same dict (tests set it)


class NonFiniteGradientError(FloatingPointError):
    """A gradient held inf or NaN and ``nonfinite="raise"`` (or ``"raise_now"``): the step
    that saw it changed no parameter, state or step count."""


def _all_finite(grads: list[Tensor]) -> Tensor:
    """A 0-d bool tensor: every element of every gradient is finite (for a compiled step).
    max |g| is inf or NaN exactly when an element is (sum(g * 0) would be folded to 0 by
    inductor). On CUDA as one _foreach_norm: inductor has crashed fusing per-tensor amax
    reductions with the update there; on the CPU per-tensor amax, which inductor compiles
    to a cheaper step than _foreach_norm's."""
    if grads[0].is_cuda:
        return torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite().all()
    return torch.stack([g.abs().amax() for g in grads]).isfinite().all()


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _fused_kernel(device_type: str) -> Any:
    """The fused kernel module for a device type, or ``None`` if there is none here."""
    try:
        if device_type == "cpu":
            from ..kernels import cpu as kernel_module
        elif device_type == "cuda":
            from ..kernels import triton as kernel_module  # type: ignore[no-redef]
        else:
            return None
    except ImportError:
        return None
    available = getattr(kernel_module, "available", None)
    return kernel_module if available is None or available() else None


def _g(p: Tensor) -> Tensor:
    """``p``'s gradient, where the caller selected params that have one."""
    return cast(Tensor, p.grad)


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return _REAL.get(dtype, dtype)


@functools.cache
def _fused_unsupported(device_type: str, dtype: torch.dtype) -> str | None:
    """Why the fused kernel cannot update a tensor of this device and dtype (None if it can)."""
    kernel = _fused_kernel(device_type)
    if kernel is None:
        why = ""
        if device_type == "cpu":
            try:
                from ..kernels import cpu
                why = ": " + cpu.unavailable_reason()
            except ImportError as e:
                why = f": {e}"
        return f"no fused kernel for device {device_type!r}{why}"
    if _real_dtype(dtype) not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return f"dtype {dtype} is not supported by the fused kernel"
    return None


def _kernel_state(codec: Codec, states: list[dict], centered: bool, momentum: bool
                  ) -> tuple[list[Tensor], list[Tensor] | None, list[Tensor] | None,
                             dict[str, list[Tensor | None]] | None]:
    """The state tensors a kernel updates in place, per key (``square_avg``, ``grad_avg`` if
    centered, ``momentum_buffer`` if momentum), and the block scales of quantized state (None
    for a float codec). A float codec's state is its decoded view (the stored tensor itself);
    a quantized codec's is what it stores: uint8 codes with ``key + "_scale"``, or float32
    where it keeps a small tensor in full precision (scale None), so one kernel call covers a
    group of mixed sizes."""
    keys = ["square_avg"] + (["grad_avg"] if centered else []) \
        + (["momentum_buffer"] if momentum else [])
    if codec.dtype is None:
        cols = {k: [st[k] for st in states] for k in keys}
        scales: dict[str, list[Tensor | None]] | None = {
            k: [st.get(k + "_scale") for st in states] for k in keys}
    else:
        stored = codec.dtype  # a float codec: the kernel's own storage
        cols = {k: [codec.decode(k, st, stored) for st in states] for k in keys}
        scales = None
    return cols["square_avg"], cols.get("grad_avg"), cols.get("momentum_buffer"), scales


def _new_plan(plan_cls: type[_plan.Plan], codec: Codec, params: list[Tensor],
              sq: list[Tensor], ga: list[Tensor] | None, mb: list[Tensor] | None,
              scales: dict[str, list[Tensor | None]] | None) -> _plan.Plan:
    """A plan over these tensors; quantized state (``scales`` given) goes to the kernels'
    quantized entries (the C kernel's, the Triton one's)."""
    if scales is None:
        return plan_cls(params, sq, ga, mb)
    return plan_cls(params, sq, ga, mb, scales=scales,  # type: ignore[call-arg]
                    quantized=codec.name)


def _check_rounding(stochastic_rounding: Any, seed: Any) -> None:
    if not isinstance(stochastic_rounding, bool):
        raise ValueError(f"Invalid stochastic_rounding value: {stochastic_rounding!r} "
                         "(expected True or False)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"Invalid seed value: {seed!r} (expected an integer)")
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"Invalid seed value: {seed!r} (an integer in [0, 2**32))")


#: The run options a cached plan was built under (see _plan_grads).
_RUN_KEYS = ("fused", "nonfinite", "state_dtype", "stochastic_rounding", "seed")


def _check_run_options(group: dict) -> None:
    """Raise for a group's run options (how it steps, beside the rule's): the constructor's
    checks, asked again wherever a group may have been edited since (``add_param_group``,
    and the general route before each step)."""
    if group.get("nonfinite", "raise") not in _NONFINITE:
        raise ValueError(f"Invalid nonfinite value: {group['nonfinite']!r} "
                         f"(choose one of {', '.join(map(repr, _NONFINITE))})")
    _codecs.check_state_dtype(group.get("state_dtype"))
    _check_rounding(group.get("stochastic_rounding", False), group.get("seed", 0))
    fused, foreach = group.get("fused"), group.get("foreach")
    differentiable = group.get("differentiable", False)
    for name, value in (("fused", fused), ("foreach", foreach)):
        if value not in (None, True, False):
            raise ValueError(f"Invalid {name} value: {value!r} (None, True or False)")
    if fused and differentiable:
        raise ValueError("fused=True does not support differentiable=True")
    if foreach and differentiable:
        raise RuntimeError("`foreach` and `differentiable` are mutually exclusive.")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    lr = group.get("lr")
    if differentiable and isinstance(lr, Tensor) and lr.requires_grad:
        # the paths take lr as a Python number: its gradient would silently be None
        raise TypeError("differentiable=True cannot differentiate through a tensor lr that "
                        "requires grad (torch.optim.RMSprop refuses it too); pass "
                        "lr.detach() or a float")
    if group.get("state_dtype") == torch.bfloat16 and any(
            isinstance(p, Tensor) and p.is_complex() for p in group.get("params", ())):
        raise ValueError("state_dtype=torch.bfloat16 cannot store the state of complex "
                         "params: torch has no complex bfloat16")


@dataclass
class _Job:
    """One param group's work in a step: its params with a gradient and the route they take
    (a cached plan with its gradient table, or a path). ``gate`` is the device flag its
    kernel obeys (a :class:`~rmsprop.torch._plan.DeviceGate`'s, or GradScaler's
    ``found_inf``: then ``amp``), ``base`` its first tensor's index in that gate's verdict,
    ``scale`` GradScaler's scale read on the device."""

    group: dict
    params: list
    path: str
    plan: Any = None
    G: Any = None
    gate: Any = None
    base: int = 0
    scale: Any = None
    amp: bool = False
    rows: Any = None
    before: list | None = field(default=None)


class _DeviceValue:
    """An option held in a tensor on a gated plan's device, compared by identity (its
    value stays on the device)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor) -> None:
        if tensor.numel() != 1 or not tensor.is_floating_point():
            raise ValueError(f"a tensor option must be a 1-element floating tensor, got "
                             f"shape {tuple(tensor.shape)} and dtype {tensor.dtype}")
        self.tensor = tensor

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _DeviceValue) and other.tensor is self.tensor

    def __hash__(self) -> int:
        return id(self.tensor)


@dataclass
class _Verdict:
    """A deferred verdict: the gate of a step on one device and, per checked plan, where its
    tensors start in the gate's "first bad" index, so the host names the parameter when it
    reads the verdict later. ``counted``: the device's skip counter counted it;
    ``stats``: the statistics before the step (restored if it was refused) and ``pending``
    the step's own."""

    gate: Any
    checked: list  # (base, group, plan)
    counted: bool
    stats: tuple | None = None
    pending: Any = None
    slot: int = 0  # where the gate published it (DeviceGate.publish)


@dataclass
class _Route:
    """The decisions of a step on the gated device route, replayed by the next steps while
    they hold (:meth:`RMSprop._step_route`): every group has a cached gated plan on one
    device, in this order, with these ``nonfinite`` modes, no GradScaler, no statistics, no
    sharded params. Each step still validates each plan and reads its gradients
    (:meth:`RMSprop._plan_grads`); what it skips is choosing the route again. ``bases``:
    each group's first index in the gate's verdict (None: not checked, "ignore");
    ``checked`` and ``count`` as in :class:`_Verdict`."""

    groups: list
    plans: list
    modes: list
    bases: list
    gate: Any
    checked: list
    count: bool
    warmed: bool = False  # it ran one step with eager launches (cuda_graph captures after)
    graph: tuple | None = None  # cuda_graph: (key, the graph's replay, what the key names)
    captures: int = 0


#: cuda_graph: a route whose launches changed this many times runs them eagerly from then on,
#: and so does an optimizer that captured _MAX_CAPTURES_TOTAL graphs over all its routes (each
#: capture waits for the device and empties torch's cache: a loop whose route keeps being
#: rebuilt must not pay that every few steps).
_MAX_CAPTURES = 3
_MAX_CAPTURES_TOTAL = 8
#: Device types whose cached route cuda_graph replays as a graph.
_GRAPH_DEVICES = ("cuda",)


def _graph_capture(launches: Callable[[], None]) -> Callable[[], None]:
    """Capture the kernels ``launches`` queues as a CUDA graph (running nothing); returns
    its replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launches()
    return graph.replay


class RMSprop(Optimizer):
    r"""RMSProp (Tieleman & Hinton 2012) with the options of every published variant.

    The update, per element, at step ``t`` (:mod:`rmsprop.spec` is the reference)::

        v = alpha*v + (1 - alpha)*g^2
        d = sqrt(v) + eps                  (eps_in_sqrt: sqrt(v + eps))
        p = p - lr * g / d

    plus, each orthogonal: ``centered`` (Graves 2013: ``v - m^2``, clamped at 0 before ``eps``
    is added, so it never yields NaN), ``momentum`` (buffer of ``g/d``, or of ``lr*g/d`` with
    ``lr_in_momentum``), ``nesterov``, ``bias_correction`` (``v/(1-alpha^t)``), coupled
    (``g += wd*p``) or ``decoupled_weight_decay`` (``p *= 1 - lr*wd``), ``maximize`` and
    ``initial_square_avg`` (the value ``v`` starts from).

    The positional parameters and defaults are ``torch.optim.RMSprop``'s; with the defaults the
    trajectory is bit-identical to torch's (float32 and float64 params). State uses torch's
    names (``step``, ``square_avg``, ``momentum_buffer``, ``grad_avg``), so state dicts load both
    ways. Named presets: :meth:`from_preset` and :data:`rmsprop.PRESETS`.

    Args beyond torch's (keyword-only):
        fused: ``None`` (default) uses the fused single-pass kernel where it applies (CPU float
            tensors, or CUDA with Triton, state in a float codec the kernel takes; on the
            CPU also ``state_dtype="8bit"`` for float32/float16/bfloat16 params) when
            ``foreach`` is also ``None``, as torch chooses its default; ``True`` requires it
            (raising at ``step()`` where it cannot apply, as torch's fused optimizers do;
            meta-device params are accepted at construction); ``False`` never uses it. An
            explicit ``foreach=False`` means the for-loop path, ``foreach=True`` the
            foreach path.
        eps_in_sqrt, initial_square_avg, lr_in_momentum, nesterov, bias_correction,
            decoupled_weight_decay: see :class:`rmsprop.options.Options`.
        nonfinite: what a step does when a gradient holds inf or NaN. ``"raise"`` (default)
            raises :class:`NonFiniteGradientError` naming the parameter and changes nothing:
            a NaN in a parameter or in ``square_avg`` never heals, so silently continuing is
            never what a user wants, and a wrong step found at once is cheaper than a run
            found corrupted later. The check reads each gradient once more (a few % of a
            step on large models; see ``rmsprop bench``); ``torch.amp.GradScaler`` skips
            ``step()`` itself on overflow, so AMP never trips it. ``"skip"`` skips the whole
            step (no param, state or step count changes) and counts it in
            :attr:`skipped_steps`; ``"ignore"`` applies the step as torch does.
            ``"raise_now"`` is ``"raise"`` with the error always raised inside the
            ``step()`` that saw the gradient (see below: on CUDA one host sync per step).

            *When the error arrives.* On the CPU (and on every path but the fused CUDA
            one) the check runs on the host and ``step()`` raises at once. On the fused
            CUDA route the check is *gated* on the device: the step's kernels do nothing
            when it finds inf or NaN, and the verdict travels to host memory without the
            host waiting for it, so ``step()`` never syncs. The error (naming the parameter
            and the step number) is then raised by the first call that reads the verdict:
            ``step()`` or ``zero_grad()`` once it has arrived (neither waits for it; a
            ``step()`` that raises changes nothing), :meth:`stats`, :meth:`state_dict` or
            :meth:`check` (which wait for it). In a training loop it has arrived by the next
            ``step()`` unless the host runs a whole iteration ahead of the device; steps that
            run before it arrives apply their own (checked) gradients to params the bad step
            left unchanged. At most :attr:`~rmsprop.torch._plan.DeviceGate.DEPTH` (8)
            verdicts are on their way at once: a ``step()`` that far ahead of the device
            waits for the oldest. After it is raised it is cleared.
            With ``"skip"`` the count lives on the device (reading :attr:`skipped_steps`
            waits for it) and the one-time warning comes when the verdict is read. A step
            that mixes this route with another one (a group on the CPU, a plan being
            built) reads the verdict at once.
        capturable: as in torch, state ``step`` lives on the param's device and a step does
            no host read, so ``torch.cuda.graph`` can capture ``opt.step()`` after warm-up
            steps (lr and step counts as device tensors). The fused CUDA route does so with
            every option; inside a captured graph the verdict of ``nonfinite="raise"``
            stays on the device (the step is still gated): :meth:`check` after a replay
            reads it. The for-loop and foreach paths on CUDA do so only with
            ``nonfinite="ignore"``, no ``bias_correction``, a float ``lr`` and no
            GradScaler; ``step()`` raises ``RuntimeError`` naming the option otherwise. On
            the CPU it changes nothing (nothing there is a device sync).
        state_dtype: storage of ``square_avg``/``grad_avg``/``momentum_buffer`` (see
            :mod:`rmsprop.torch._codecs`): a floating ``torch.dtype`` or a registered format
            name. ``None`` (default) means float32 for float16/bfloat16 params (the math then
            runs in float32 with one rounding to the param: fp16's eps underflow and ``g^2``
            overflow above ~256 cannot happen; it costs 4 bytes per element per state tensor
            instead of 2) and the param dtype otherwise. A format without a fused kernel
            (``"4bit"``; ``"8bit"`` off the CPU, of float64 params, or with centered switched
            off while a quantized ``grad_avg`` is kept) runs on the foreach path when
            ``fused`` is ``None``; ``fused=True`` raises naming the reason.
        stochastic_rounding, seed: ``True`` rounds the new values of float16/bfloat16 params
            stochastically (up or down with probability given by the distance) from a
            counter-based generator seeded by ``seed`` (param ``k`` in optimizer order uses
            :func:`rmsprop.codecs.param_seed(seed, k) <rmsprop.codecs.param_seed>`):
            reproducible and resumable. Runs on the for-loop or foreach path.
        track_stats: ``True`` records per-group health statistics at each step (see
            :meth:`stats`); ``"params"`` also per parameter. Off by default.
        cuda_graph: ``True`` replays the cached fused CUDA step (its check, kernels and
            step counts) as one CUDA graph, captured at its second step along the cached
            route and captured again when its launches change (an option turned on or off,
            a new tensor ``lr``; after 3 captures of a route, or 8 in all, it stays eager).
            New gradient pointers and a changed float ``lr`` need no capture: the graph's
            kernels read them from the device tables the host still writes. The host then
            makes one graph launch per step instead of several kernel launches; the results
            are the eager step's, bit for bit. A capture waits for the device once (so a
            step that captures is seen by ``torch.cuda.set_sync_debug_mode``). Off by
            default; on an H200 it made the checked step 1.4-20x torch's foreach step where
            the eager one was 0.6-12x (README). Does nothing on the CPU or inside a graph
            being captured.

    Example::

        opt = RMSprop(model.parameters(), lr=1e-2)
        opt = RMSprop.from_preset("keras", model.parameters())
    """

    _step_supports_amp_scaling = True  # GradScaler passes grad_scale/found_inf to step()
    _skipped_host: int  # skipped_steps counted on the host (the device counts the rest)
    _route: _Route | None  # the cached device route of the last step, if it took one

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-2, alpha: float = 0.99,
                 eps: float = 1e-8, weight_decay: float = 0, momentum: float = 0,
                 centered: bool = False, capturable: bool = False,
                 foreach: bool | None = None, maximize: bool = False,
                 differentiable: bool = False, *, fused: bool | None = None,
                 eps_in_sqrt: bool = False, initial_square_avg: float = 0.0,
                 lr_in_momentum: bool = False, nesterov: bool = False,
                 bias_correction: bool = False, decoupled_weight_decay: bool = False,
                 nonfinite: str = "raise", state_dtype: torch.dtype | str | None = None,
                 stochastic_rounding: bool = False, seed: int = 0,
                 track_stats: bool | str = False, cuda_graph: bool = False) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        _check_run_options(dict(nonfinite=nonfinite, state_dtype=state_dtype,
                                stochastic_rounding=stochastic_rounding, seed=seed,
                                fused=fused, foreach=foreach, differentiable=differentiable))
        if track_stats not in (False, True, "params"):
            raise ValueError(f"Invalid track_stats value: {track_stats!r} "
                             "(False, True or 'params')")
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"Invalid cuda_graph value: {cuda_graph!r} (True or False)")
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                        momentum=momentum, centered=centered, capturable=capturable,
                        foreach=foreach, maximize=maximize, differentiable=differentiable,
                        fused=fused, eps_in_sqrt=eps_in_sqrt,
                        initial_square_avg=initial_square_avg, lr_in_momentum=lr_in_momentum,
                        nesterov=nesterov, bias_correction=bias_correction,
                        decoupled_weight_decay=decoupled_weight_decay,
                        nonfinite=nonfinite, state_dtype=state_dtype,
                        stochastic_rounding=stochastic_rounding, seed=seed)
        validate({k: defaults[k] for k in RULE_OPTIONS})
        self.track_stats = track_stats
        self.cuda_graph = cuda_graph
        self._reset_verdicts()
        self.skipped_steps = 0
        self._skip_warned = False
        self._stats: dict[str, Any] = {}
        self._pending: tuple | None = None  # the last step's statistics rows, until read
        self._plans: dict[int, Any] = {}
        self._version = 0
        super().__init__(params, defaults)

    @classmethod
    def from_preset(cls, name: str, params: Iterable[Any], **overrides: Any) -> RMSprop:
        """Build the optimizer of a published variant (``rmsprop.PRESETS[name]``), with
        ``overrides`` on top. Raises ``ValueError`` for an unknown name, or when the original
        has no default learning rate and ``lr`` is not given."""
        params = list(params)
        return cls(params, **resolve_preset(name, overrides, params))

    # -- torch.optim.Optimizer contract -------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        rule = {k: param_group[k] for k in RULE_OPTIONS if k in param_group}
        validate(rule)
        if param_group.get("nesterov", self.defaults.get("nesterov")) and not rule.get(
                "momentum", self.defaults.get("momentum", 0)):
            raise ValueError("Nesterov momentum requires a momentum > 0")
        if not isinstance(param_group["params"], (Tensor, set)):
            # a generator (module.parameters()) is read once, here and for the base class
            param_group = {**param_group, "params": list(param_group["params"])}
        params = ([param_group["params"]] if isinstance(param_group["params"], Tensor)
                  else param_group["params"])
        for p in params:
            if isinstance(p, Tensor) and not (p.is_floating_point() or p.is_complex()):
                raise ValueError(f"RMSprop needs floating-point or complex params, got {p.dtype}")
        # the group as it will step: its own options over the defaults
        group = {**self.defaults, **param_group, "params": params}
        _check_run_options(group)
        if group.get("fused"):
            for p in params:
                if not isinstance(p, Tensor) or p.device.type == "meta":
                    continue  # as torch's fused optimizers: checked when it steps
                reason = self._fused_reason(group, p)
                if reason:
                    raise RuntimeError(f"fused=True cannot apply: {reason}")
        super().add_param_group(param_group)
        self.__dict__["_version"] = self.__dict__.get("_version", 0) + 1
        self._find_mesh()

    def __getstate__(self) -> dict[str, Any]:
        # plans and device gates are caches: rebuilt on demand
        return {**super().__getstate__(), "track_stats": self.track_stats,
                "cuda_graph": self.cuda_graph, "skipped_steps": self.skipped_steps}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("momentum", 0)
            group.setdefault("centered", False)
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("capturable", False)
        _state_dict.fill(self.param_groups, getattr(self, "defaults", {}), RMSprop)
        _state_dict.coerce_steps(self.param_groups, self.state)
        self.__dict__.setdefault("track_stats", False)
        self.__dict__.setdefault("cuda_graph", False)
        self._reset_verdicts()
        self.skipped_steps = int(self.__dict__.pop("skipped_steps", 0))
        self._skip_warned = self.skipped_steps > 0
        self.__dict__.setdefault("_stats", {})
        self._pending = None  # the last step's statistics rows, until read (see stats())
        self._plans = {}
        self._version = self.__dict__.get("_version", 0) + 1
        self._find_mesh()

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict. Of this class's extra options, those of the rule are written
        where they differ from their defaults, and ``fused``, ``nonfinite``,
        ``state_dtype``, ``stochastic_rounding`` and ``seed`` (how it runs, which a load
        keeps from the live optimizer) not at all: with the options torch has, it holds
        exactly torch's keys, so ``torch.distributed.checkpoint`` templates built from it
        load torch checkpoints. A deferred :class:`NonFiniteGradientError` is raised first
        (see ``nonfinite``)."""
        self._read_verdicts(wait=True)
        return _state_dict.slim(_state_dict.export(self.param_groups, super().state_dict(),
                                                   self._codec), RMSprop)

    @staticmethod
    def profile_hook_step(func: Callable[..., Any]) -> Callable[..., Any]:
        """torch's ``step`` wrapper (step hooks, the profiler's ``Optimizer.step#`` label),
        entered only when it has something to do: a profiler is recording, a step hook is
        registered (on this optimizer or globally), or dynamo is tracing. Otherwise ``step``
        runs bare: the label's ``record_function`` alone costs about a third of a cached
        device step's host time, which a GPU step of a small model is bound by."""
        hooked = Optimizer.profile_hook_step(func)
        from torch.optim import optimizer as _torch_optimizer
        pre, post = (_torch_optimizer._global_optimizer_pre_hooks,
                     _torch_optimizer._global_optimizer_post_hooks)
        profiling = torch.autograd._profiler_enabled
        compiling = torch.compiler.is_compiling

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self = args[0]
            # compiling first: dynamo traces torch's wrapper, not the profiler query
            if (compiling() or pre or post or self._optimizer_step_pre_hooks
                    or self._optimizer_step_post_hooks or profiling()):
                return hooked(*args, **kwargs)
            return func(*args, **kwargs)
        return wrapper

    @torch.compiler.disable  # as torch's own zero_grad: a compiled loop runs it eagerly
    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``, after raising a deferred :class:`NonFiniteGradientError`
        whose verdict has reached the host (it never waits for one: see ``nonfinite``)."""
        self._read_verdicts(wait=False)
        super().zero_grad(set_to_none)

    def check(self) -> None:
        """Wait for the verdict of every gated step queued so far (see ``nonfinite``) and
        raise its :class:`NonFiniteGradientError` (naming the parameter and the step that
        changed nothing), then clear it; ``None`` when every step was clean. After replays
        of a captured ``step()`` it reads the last replay's verdict on the device. With
        ``"skip"`` it emits the skip warning instead, as the next ``step()`` would."""
        self._read_verdicts(wait=True)
        captured = self.__dict__.get("_captured") or {}
        for rec in list(captured.values()):
            bad = rec.gate.read_now()
            if bad is not None:
                rec.gate.reset()  # read once: cleared until a replay sets it again
            error = self._settle(rec, bad, [])
            if error is not None:
                raise error

    @property
    def skipped_steps(self) -> int:
        """How many steps ``nonfinite="skip"`` skipped. On the fused CUDA route the count is
        kept on the device, and reading it waits for the device (a host sync)."""
        gates = self.__dict__.get("_gates") or {}
        return self.__dict__.get("_skipped_host", 0) + sum(
            int(g.skipped.item()) for g in gates.values())

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        for g in (self.__dict__.get("_gates") or {}).values():
            g.skipped.zero_()
        self.__dict__["_skipped_host"] = int(value)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of ``torch.optim.RMSprop``. As in torch, the
        options come from the state dict (``lr``, ``momentum``, ``centered``... of the run
        that saved it replace the current ones). Options it lacks take their defaults: the
        rule's (``eps_in_sqrt``, ``nesterov``, ...) those of :class:`rmsprop.Options`
        (torch's rule). How each group runs (``fused``, ``nonfinite``, ``state_dtype``,
        ``stochastic_rounding``, ``seed``) keeps the live group's values, whatever the file
        holds. A ``step`` saved as a number becomes a tensor, as in torch. Raises
        ``ValueError`` naming the first entry that does not fit the current params (group
        count, duplicate ids, sizes, state shapes, dtypes, non-finite or negative state, a
        missing ``step`` or ``square_avg``, a step count that is not finite and >= 0,
        options); nothing is changed then."""
        _state_dict.check(self.param_groups, state_dict, self._codec)
        keys = _state_dict.run_keys(type(self))
        kept = [{k: g[k] for k in keys if k in g} for g in self.param_groups]
        self._plans = {}
        super().load_state_dict(_state_dict.with_tensor_steps(state_dict))
        for group, run in zip(self.param_groups, kept):
            group.update(run)
        _state_dict.restore(self.param_groups, self.state, state_dict, self._codec)

    def full_precision_state_dict(self, state_dict: dict[str, Any] | None = None
                                  ) -> dict[str, Any]:
        """:meth:`state_dict` with quantized state (``state_dtype="8bit"``/``"4bit"``)
        decoded to float32 tensors shaped like their params (complex64 for complex params)
        and the ``*_scale`` entries dropped: a state dict ``torch.optim.RMSprop`` loads. Float
        state is returned as :meth:`state_dict` returns it. ``state_dict``: one already taken
        (e.g. ``get_optimizer_state_dict(model, opt)``, keyed by parameter names), decoded
        instead of :meth:`state_dict`; under FSDP2 the float32 tensors are DTensors sharded
        like their params, so ``torch.distributed.checkpoint`` can reshard them."""
        from . import _quantized
        return _quantized.full_precision_state_dict(self, state_dict)

    # -- where each param's state lives --------------------------------------------------------

    @staticmethod
    def _codec(group: dict, p: Tensor) -> Codec:
        return _codecs.resolve(group.get("state_dtype"), _real_dtype(p.dtype))

    def _fused_reason(self, group: dict, p: Tensor) -> str | None:
        """Why the fused kernel cannot step ``p`` in ``group`` (None if it can)."""
        return (_fused_unsupported(p.device.type, p.dtype)
                or _plan.Plan.accepts(self._codec(group, p), _real_dtype(p.dtype),
                                      p.device.type)
                or ("stochastic_rounding needs the for-loop or foreach path"
                    if self._rounds(group, p) else None)
                or ("quantized square_avg stored against the grad_avg of a centered run "
                    "needs the for-loop or foreach path while centered is off"
                    if not group["centered"] and self._kept_grad_avg(p) else None))

    def _kept_grad_avg(self, p: Tensor) -> bool:
        """Whether ``p``'s quantized state keeps a ``grad_avg`` from centered steps: its
        ``square_avg`` then stores ``w = v - m'^2``, which the kernel reads only when
        centered (it would take the codes for ``v``)."""
        ga = self.state[p].get("grad_avg") if p in self.state else None
        return ga is not None and ga.dtype == torch.uint8

    @staticmethod
    def _rounds(group: dict, p: Tensor) -> bool:
        """Whether ``p``'s new values are rounded stochastically (16-bit params only)."""
        return bool(group.get("stochastic_rounding")) and _real_dtype(p.dtype) in (
            torch.float16, torch.bfloat16)

    def _param_index(self, p: Tensor) -> int:
        """``p``'s index in optimizer order over every group (its rounding seed's index)."""
        return next(i for i, q in enumerate(q for g in self.param_groups for q in g["params"])
                    if q is p)

    def _init_state(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        codec = self._codec(group, p)
        if not state:
            device = p.device if group["capturable"] or group["fused"] else "cpu"
            state["step"] = torch.zeros((), dtype=torch.float32, device=device)
            state.update(codec.init("square_avg", p, float(group["initial_square_avg"])))
        # The live group decides the rounding, whatever state it was given: a state loaded
        # from a run without it (or from torch) gets its seed, one from a run with it loses
        # it (the paths round stochastically exactly where a state holds a seed).
        rounds = self._rounds(group, p)
        if rounds and "sr_seed" not in state:
            from ..codecs import param_seed
            from . import _quantized
            _quantized.sr_init(state, p, param_seed(group["seed"], self._param_index(p)))
        elif not rounds and "sr_seed" in state:
            del state["sr_seed"]
        # Created lazily so that turning momentum/centered on mid-run (OneCycleLR writes
        # group["momentum"]) starts the new buffer from zero instead of raising KeyError.
        if group["momentum"] > 0 and codec.names("momentum_buffer")[0] not in state:
            state.update(codec.init("momentum_buffer", p, 0.0))
        if group["centered"] and codec.names("grad_avg")[0] not in state:
            state.update(codec.init("grad_avg", p, 0.0))
        return state

    def _init_group(self, group: dict, params_with_grad: list[Tensor]) -> bool:
        """Create the state of the group's params that have a gradient, listing them in
        ``params_with_grad``. torch.optim's name for this hook: under torch.compile, dynamo
        runs it eagerly instead of tracing it, so the graph is traced over state that
        already exists and is not compiled again once the first step has created it. Returns
        True (dynamo turns the result into a constant of the graph)."""
        for p in group["params"]:
            if p.grad is not None:
                self._init_state(p, group)
                params_with_grad.append(p)
        return True

    def _param_label(self, group: dict, p: Tensor) -> str:
        index = next(i for i, q in enumerate(group["params"]) if q is p)
        names = group.get("param_names")
        if names:
            return repr(names[index])
        gi = next(i for i, g in enumerate(self.param_groups) if g is group)  # not ==: tensors
        return f"group {gi} index {index} (shape {tuple(p.shape)})"

    def _hyper(self, group: dict, t: int, inv_scale: float | None = None,
               lr: float | None = None) -> Hyper:
        """The group's :class:`Hyper` at step ``t``; ``lr`` replaces the group's (a
        placeholder where the kernel reads a tensor lr on the device)."""
        lr = group["lr"] if lr is None else lr
        if isinstance(lr, Tensor):
            lr = float(lr.detach().reshape(()))  # one sync: the paths take a Python scalar
        alpha = float(group["alpha"])
        return Hyper(lr=float(lr), alpha=alpha,
                     eps=float(group["eps"]),
                     weight_decay=float(group["weight_decay"]),
                     momentum=float(group["momentum"]), centered=bool(group["centered"]),
                     maximize=bool(group["maximize"]), eps_in_sqrt=bool(group["eps_in_sqrt"]),
                     lr_in_momentum=bool(group["lr_in_momentum"]),
                     nesterov=bool(group["nesterov"]) and group["momentum"] > 0,
                     decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
                     c=(1.0 - alpha ** t) if group["bias_correction"] else 1.0,
                     inv_scale=getattr(self, "_inv_scale", 1.0) if inv_scale is None
                     else inv_scale)

    # -- the step: one route ------------------------------------------------------------------

    def step(  # type: ignore[override]  # torch's overloads say the same in two signatures
            self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the
        loss. If anything raises (a non-finite gradient with ``nonfinite="raise"``, a bad
        option, an unsupported tensor), no parameter and no state has changed; a deferred
        error of an earlier step (see ``nonfinite``) is raised first."""
        if self._verdicts:  # those that have arrived; the oldest waited for only to free a slot
            self._read_verdicts(wait=False, keep=_plan.DeviceGate.DEPTH - 1)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # torch.amp.GradScaler hands us its scale and inf flag (we set
        # _step_supports_amp_scaling): an overflowed step is skipped, and the gradients are
        # unscaled inside the step (inside the fused kernel's single pass) instead of before it.
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        differentiable = any(g["differentiable"] for g in self.param_groups)
        with torch.set_grad_enabled(differentiable):
            self._step(grad_scale, found_inf)
        return loss

    def _step(self, grad_scale: Tensor | float | None = None,
              found_inf: Tensor | None = None) -> None:
        """Collect each group's work, check the gradients, apply: nothing is written before
        every check has passed (on the device route: nothing is written if one fails)."""
        compiling = torch.compiler.is_compiling()
        if found_inf is None and grad_scale is None and not compiling:
            if self._route is not None and self._step_route(self._route):
                return
            self._route = None
        on_device = found_inf is not None and self._scaler_on_device(grad_scale, found_inf,
                                                                     compiling)
        if found_inf is not None and not on_device and float(found_inf) > 0:
            return
        inv_scale = 1.0 if grad_scale is None or on_device else 1.0 / float(grad_scale)
        if not compiling:  # dynamo refuses attribute writes inside a compiled step
            self._inv_scale = inv_scale
        checked = found_inf is not None
        if self._mesh_groups() and not checked:
            # Sharded params: every rank must agree (and run the same collectives) before
            # any path is chosen, or one rank would raise while the others step.
            found = self._find_nonfinite(self._all_work())
            if found:
                return self._reject(*found, stacklevel=4)
            checked = True
        if compiling:
            for group in self.param_groups:
                self._init_group(group, [])
        jobs = [self._collect(group, compiling) for group in self.param_groups]
        device = self._device_route(jobs)
        if on_device and device is None:  # a group left the cached plans: read on the host
            on_device = False
            if float(cast(Tensor, found_inf)) > 0:
                return
            inv_scale = 1.0 if grad_scale is None else 1.0 / float(grad_scale)
            self._inv_scale = inv_scale
        if not compiling:
            self._refuse_capturable(jobs, found_inf is not None)
        if on_device:
            for job in jobs:  # found_inf gates every kernel, silently (torch's semantics)
                if job.plan is not None:
                    job.gate, job.scale, job.amp = found_inf, grad_scale, True
        gate = None
        if not checked:
            rejected, gate = self._check(jobs, compiling, device)
            if rejected:
                return
        if self.track_stats:
            for job in jobs:
                if job.plan is None:
                    job.before = [p.detach().clone() for p in job.params]
                else:
                    job.rows = job.plan.new_stats()
        # Gated plans step first, each kernel doing nothing if the check found inf or NaN.
        gated = [j for j in jobs if j.gate is not None]
        rest = [j for j in jobs if j.gate is None and j.params]
        deferred = gate is not None and not rest and all(
            j.group["nonfinite"] != "raise_now" for j in gated)
        count = deferred and any(j.group["nonfinite"] == "skip" for j in gated)
        if gated and not deferred and self._verdicts:
            # this step reads its verdict at once: the earlier ones first, as every step
            # they precede must be counted when they are read (nothing is written yet)
            self._read_verdicts(wait=True)
        for i, job in enumerate(gated):
            self._run(job, inv_scale, skipped=gate.skipped if gate and count and i == 0
                      else None)
        verdict = None
        if gate is not None:
            if deferred:
                verdict = self._defer(gate, [(j.base, j.group, j.plan) for j in jobs
                                             if j.gate is gate.flags
                                             and j.group["nonfinite"] != "ignore"], count)
            elif gate.read_now() is not None:  # "raise_now": wait for the verdict
                found = self._find_nonfinite(self._all_work())
                if found:
                    self._reject(*found)
                return
        for job in rest:
            self._run(job, inv_scale)
        if (device is not None and found_inf is None and grad_scale is None and not compiling
                and not checked and not self.track_stats and (gate is None or verdict)
                and all(j.plan is not None for j in jobs)):
            self._route = _Route(list(self.param_groups), [j.plan for j in jobs],
                                 [j.group["nonfinite"] for j in jobs],
                                 [None if j.group["nonfinite"] == "ignore" else j.base
                                  for j in jobs],
                                 gate, verdict.checked if verdict else [], count)
        if self.track_stats:
            if verdict is not None:
                verdict.stats = (self._stats, self._pending)
            self._record_stats(jobs)
            if verdict is not None:
                verdict.pending = self._pending

    def _step_route(self, route: _Route) -> bool:
        """One step along the cached route (see :class:`_Route`): the general step's
        decisions replayed; False, with nothing done, when they no longer hold."""
        groups = self.param_groups
        if len(groups) != len(route.groups) or self.track_stats:
            return False
        plans = self._plans
        grads = []
        for group, kept, plan, mode in zip(groups, route.groups, route.plans, route.modes):
            if group is not kept or plans.get(id(group)) is not plan \
                    or group["nonfinite"] != mode:
                return False
            G = self._plan_grads(group, plan)
            if G is None:
                return False
            grads.append(G)
        if not (self.cuda_graph and route.warmed and self._replay(route, grads)):
            self._route_launches(route, grads)
            route.warmed = True
        self._inv_scale = 1.0
        if route.gate is not None:
            self._defer(route.gate, route.checked, route.count)
        return True

    def _route_launches(self, route: _Route, grads: list) -> None:
        """The device work of a step along the cached route: reset the gate, check, step
        (each kernel gated), advance the step counts. Nothing here reads the host."""
        gate = route.gate
        flags = skipped = None
        if gate is not None:
            gate.reset()
            for plan, G, base in zip(route.plans, grads, route.bases):
                if base is not None:
                    plan.check(G, gate, base)
            flags = gate.flags
            skipped = gate.skipped if route.count else None
        for group, plan, G in zip(self.param_groups, route.plans, grads):
            self._device_step(group, plan, G, 1.0, flags, None, skipped)
            skipped = None  # the first plan counts a refused step

    def _replay(self, route: _Route, grads: list) -> bool:
        """``cuda_graph``: the route's launches as one CUDA graph, captured again when what
        the launches bake in changed (kernel flags, ``alpha`` of the bias correction, the
        tensor ``lr``'s object); False (nothing done) where it does not apply: the CPU, a
        graph being captured, a route captured too often."""
        if route.plans[0].device.type not in _GRAPH_DEVICES or _capturing():
            return False
        key, keep = [], []
        for group, plan, G in zip(self.param_groups, route.plans, grads):
            h, lr_dev = self._hyper_of(group, plan, 1.0)
            bias = bool(group["bias_correction"])
            flags = plan.prepare(G, h, lr=lr_dev is not None, bias=bias)
            key.append((id(plan), tuple(flags.items()), h.alpha if bias else None,
                        None if lr_dev is None else id(lr_dev)))
            keep.append((plan, lr_dev))  # the ids above stay theirs while the graph lives
        held = route.graph
        if held is not None and held[0] == key:
            held[1]()
            return True
        total = getattr(self, "_captures", 0)
        if route.captures >= _MAX_CAPTURES or total >= _MAX_CAPTURES_TOTAL:
            return False
        route.captures += 1
        self._captures = total + 1
        route.graph = None
        try:  # the uploads were just done: the launches copy nothing, so none is captured
            replay = _graph_capture(lambda: self._route_launches(route, grads))
        except RuntimeError as e:  # nothing ran: capturing executes nothing
            route.captures = _MAX_CAPTURES
            raise RuntimeError(f"cuda_graph=True: capturing the step as a CUDA graph failed "
                               f"({e}); nothing was changed. Pass cuda_graph=False to step "
                               "with eager launches.") from e
        route.graph = (key, replay, keep)
        replay()  # capturing ran nothing
        return True

    def _scaler_on_device(self, grad_scale: Any, found_inf: Tensor, compiling: bool) -> bool:
        """Whether GradScaler's ``found_inf`` and scale can be read by the kernels: both on
        the device of the cached gated plans every group with params has."""
        if compiling or not isinstance(found_inf, Tensor) or found_inf.numel() != 1:
            return False
        dev = found_inf.device
        if grad_scale is not None and not (isinstance(grad_scale, Tensor)
                                           and grad_scale.numel() == 1
                                           and grad_scale.device == dev):
            return False
        for group in self.param_groups:
            plan = self._plans.get(id(group))
            if plan is None:
                if any(p.grad is not None for p in group["params"]):
                    return False
            elif not plan.gated or plan.device != dev:
                return False
        return True

    def _device_route(self, jobs: list[_Job]) -> torch.device | None:
        """The device of the gated route when every job with params takes a cached gated
        plan and they share one device (a gate is one device's flag), else None."""
        devices = {j.plan.device for j in jobs if j.plan is not None and j.plan.gated}
        if len(devices) != 1 or any(j.params and (j.plan is None or not j.plan.gated)
                                    for j in jobs):
            return None
        return next(iter(devices))

    def _refuse_capturable(self, jobs: list[_Job], scaled: bool) -> None:
        """capturable=True promises no host read: refuse, before anything changes, a
        for-loop or foreach job on a device of :data:`_CAPTURE_DEVICES` whose options would
        read the host."""
        for job in jobs:
            group = job.group
            if not (group["capturable"] and job.path in ("forloop", "foreach")
                    and any(p.device.type in _CAPTURE_DEVICES for p in job.params)):
                continue
            why = ("GradScaler's found_inf and scale, read on the host" if scaled else
                   f"nonfinite={group['nonfinite']!r}, whose check reads the host"
                   if group["nonfinite"] != "ignore" else
                   "bias_correction, whose step count is read on the host"
                   if group["bias_correction"] else
                   "a tensor lr, read on the host" if isinstance(group["lr"], Tensor)
                   else None)
            if why:
                raise RuntimeError(
                    f"capturable=True cannot run on the {job.path} path with {why}: use the "
                    "fused kernel (fused=None or True, foreach=None) or drop the option")

    def _gate(self, device: torch.device) -> _plan.DeviceGate:
        gates = self._gates
        if device not in gates:
            gates[device] = _plan.DeviceGate(device)
        return gates[device]

    def _defer(self, gate: _plan.DeviceGate, checked: list, counted: bool) -> _Verdict:
        """Queue the copy of the step's verdict to the host and remember how to read it
        (``checked``: see :class:`_Verdict`; inside a captured graph it stays on the device:
        :meth:`check` reads it)."""
        verdict = _Verdict(gate, checked, counted)
        if gate.device.type == "cuda" and _capturing():
            self._captured[gate.device] = verdict
        else:
            verdict.slot = gate.publish()
            self._verdicts.append(verdict)
        return verdict

    def _reset_verdicts(self) -> None:
        self._route = None  # it holds a gate of those below
        self._gates: dict[torch.device, _plan.DeviceGate] = {}
        self._verdicts: list[_Verdict] = []
        self._captured: dict[torch.device, _Verdict] = {}

    def _read_verdicts(self, wait: bool, keep: int | None = None) -> None:
        """Read the deferred verdicts (waiting for them with ``wait``, else only those that
        have arrived, and then, with ``keep``, the oldest ones until at most ``keep`` are
        left on their way) and raise the first refused step's error."""
        pending = getattr(self, "_verdicts", None)
        if not pending or _capturing():  # a graph being captured cannot wait for an event
            return
        left = []
        for i, rec in enumerate(pending):  # oldest first
            bad = rec.gate.poll(rec.slot)
            if bad == _plan.DeviceGate.PENDING:
                if not wait and (keep is None or len(pending) - i <= keep):
                    left.append(rec)
                    continue
                bad = rec.gate.first_bad(rec.slot, wait=True)
            error = None if bad is None else self._settle(rec, bad, pending[i + 1:])
            if error is not None:  # the later verdicts stay for the next reads
                self._verdicts = left + pending[i + 1:]
                raise error
        self._verdicts = left

    def _settle(self, rec: _Verdict, bad: int | None, later: list[_Verdict]
                ) -> NonFiniteGradientError | None:
        """Act on one verdict (``bad``: the first bad tensor's index, None if clean; ``later``:
        the verdicts of the steps queued after it, still unread): count and warn for "skip",
        or return the error for "raise"."""
        if bad is None:
            return None
        base, group, plan = next(c for c in reversed(rec.checked) if c[0] <= bad)
        p = plan.group_params[bad - base]
        label = self._param_label(group, p)
        if rec.stats is not None and self._pending is rec.pending:
            self._stats, self._pending = rec.stats  # the refused step's are not kept
        if group["nonfinite"] == "skip":
            if not rec.counted:
                self._skipped_host += 1
            self._warn_skipped(label, stacklevel=4)
            return None
        if rec.counted:  # a "skip" group's count, not this step's verdict
            self._skipped_host -= 1
        # The refused step did not advance p's count, but the clean steps queued after it
        # (stepping p's whole plan) did. Reading the count waits for the device: this is
        # the error's path only.
        step = int(self.state[p]["step"]) + 1 - sum(
            r.gate.first_bad(r.slot) is None
            and any(q is p for _, _, pl in r.checked for q in pl.group_params) for r in later)
        return NonFiniteGradientError(
            f"non-finite gradient (inf or NaN) in parameter {label} at step {step}; that "
            "step changed nothing (the error is read after it, see nonfinite). Pass "
            "nonfinite='skip' to skip such steps, or 'ignore' to apply them as "
            "torch.optim.RMSprop does.")

    def _warn_skipped(self, label: str, stacklevel: int) -> None:
        if not self._skip_warned:
            self._skip_warned = True
            warnings.warn(f"rmsprop: skipped a step: non-finite gradient in parameter "
                          f"{label} (counted in optimizer.skipped_steps)", RuntimeWarning,
                          stacklevel=stacklevel)

    def _all_work(self) -> list[tuple[dict, list[Tensor]]]:
        return [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]

    def _plan_grads(self, group: dict, plan: Any) -> Any:
        """The gradients' pointer table of a group through its cached plan, or None when the
        plan no longer holds (:meth:`_plan.Plan.valid_for`, :meth:`_plan.Plan.gradients`) or
        the group's options left the fused route; raises for an invalid option."""
        if group["fused"] is False or group["foreach"] or group["differentiable"]:
            return None
        if tuple(map(group.get, _RUN_KEYS)) != plan.run_options:
            return None  # edited since the plan was built: the general route checks them
        # Options are validated when they change (schedulers write lr between steps),
        # not at every step: validation costs more than a small model's whole update.
        opts = tuple(map(group.__getitem__, RULE_OPTIONS))
        if plan.gated and any(map(isinstance, opts, repeat(Tensor))):
            # a tensor on the plan's device (a scheduler's lr) is read by the kernel
            # only: its value is not validated per step, which would read the host
            # (as torch.optim does not); a new tensor object is validated as such
            opts = tuple(_DeviceValue(x) if isinstance(x, Tensor) and x.device == plan.device
                         else x for x in opts)
        if plan.validated is None or opts != plan.validated:
            validate({k: v for k, v in zip(RULE_OPTIONS, opts)
                      if not isinstance(v, _DeviceValue)}, warn=False)
            plan.validated = None if any(isinstance(x, Tensor) for x in opts) else opts
        if not plan.valid_for(group, self._version, self.state):
            return None
        return plan.gradients(list(map(_GRAD, group["params"])))

    def _collect(self, group: dict, compiling: bool) -> _Job:
        """A group's job: through its cached plan when the plan still holds (the same
        params, dense contiguous gradients, unchanged storage), else the general path."""
        plan = None if compiling else self._plans.get(id(group))
        if plan is not None:
            G = self._plan_grads(group, plan)
            if G is not None:
                return _Job(group, group["params"], "plan", plan, G)
        if not compiling:  # a compiled step keeps no plans (and older dynamo cannot trace pop)
            self._plans.pop(id(group), None)
        validate({k: group[k] for k in RULE_OPTIONS}, warn=False)
        _check_run_options(group)
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            why = self._grad_problem(group, p)
            if why:
                raise RuntimeError(why)
        path = self._path(group, params) if params else "none"
        for p in params:  # after the path: the fused kernel reads raw memory, so more is checked
            why = self._state_problem(group, p, fused=path == "fused")
            if why:
                raise RuntimeError(why)
        if compiling and path == "fused":  # the ctypes kernel is opaque to dynamo
            path = "foreach"
        return _Job(group, params, path)

    def _grad_problem(self, group: dict, p: Tensor) -> str | None:
        """Why ``p``'s gradient cannot step it: sparse, or of another shape or kind; None if
        it can. The general route asks before any group is written."""
        g = cast(Tensor, p.grad)
        if g.is_sparse:
            return "RMSprop does not support sparse gradients"
        if g.shape != p.shape:
            return (f"gradient of parameter {self._param_label(group, p)} has shape "
                    f"{tuple(g.shape)}, the parameter {tuple(p.shape)}")
        if g.dtype != p.dtype and (g.is_complex() != p.is_complex()
                                   or not (g.is_floating_point() or g.is_complex())):
            return (f"gradient of parameter {self._param_label(group, p)} has dtype "
                    f"{g.dtype}, the parameter {p.dtype}")
        return None

    def _state_problem(self, group: dict, p: Tensor, fused: bool) -> str | None:
        """Why ``p`` cannot step on its path: live state that is not ``p``'s in the group's
        format (a param resized or moved through ``p.data``, state replaced by hand); None
        if it can. Where the fused kernel will read the tensors' memory (``fused``) every
        state tensor's layout and the gradient's device are checked; the torch paths' own
        ops check those, and ``square_avg``'s shape is enough there to refuse a resized
        param before any group steps."""
        g = cast(Tensor, p.grad)
        if fused and g.device != p.device:
            return (f"gradient of parameter {self._param_label(group, p)} is on {g.device}, "
                    f"the parameter on {p.device}")
        state = self.state.get(p)
        if not state:
            return None
        keys: tuple[str, ...] = _codecs.STATE_KEYS
        if not fused:
            sq = state.get("square_avg")
            if not isinstance(sq, Tensor) or sq.shape == p.shape:
                return None  # (quantized codes are flat: their layout is checked below)
            keys = ("square_avg",)
        codec = self._codec(group, p)
        for key in keys:
            why = codec.layout(key, state, p)
            if why:
                return f"state {key!r} of parameter {self._param_label(group, p)} {why}"
        return None

    def _path(self, group: dict, params: list[Tensor]) -> str:
        """torch's rule: the fused (here) or foreach (torch) default applies only when both
        ``fused`` and ``foreach`` are None; an explicit choice is followed."""
        fused, foreach = group["fused"], group["foreach"]
        if group["differentiable"]:
            return "forloop"
        if torch.compiler.is_compiling() and not fused and foreach is not False:
            return "foreach"
        if fused or (fused is None and foreach is None):
            reasons = [self._fused_reason(group, p) for p in params]
            why = next((r for r in reasons if r), None)
            if why is None and len(set(map(id, params))) != len(params):
                # torch's for-loop updates a param listed twice twice, each with its step
                why = "a parameter is listed twice in its group"
            if why is None:
                why = next((f"the gradient of a {p.dtype} parameter is {g.dtype}"
                            for p, g in zip(params, map(_GRAD, params))
                            if g is not None and g.dtype != p.dtype), None)
            if why is None:
                return "fused"
            if fused:
                raise RuntimeError("fused=True cannot apply: " + why)
        if foreach or (foreach is None and all(p.device.type == "cuda" for p in params)):
            return "foreach"
        if foreach is None and fused is None and any(
                self._codec(group, p).dtype is None or self._rounds(group, p) for p in params):
            return "foreach"  # a state format or a rounding without a kernel: batched
        return "forloop"

    def _check(self, jobs: list[_Job], compiling: bool, device: torch.device | None
               ) -> tuple[bool, _plan.DeviceGate | None]:
        """Check every job's gradients for inf/NaN (groups with ``nonfinite="ignore"``
        excepted). Returns (rejected, gate): True when the step was rejected here; on the
        gated route (``device``) the plans only queue their check into the device's gate,
        which every plan job (those of "ignore" groups too) then obeys."""
        checked = [j for j in jobs if j.params and j.group["nonfinite"] != "ignore"]
        if not checked:
            return False, None
        if compiling:
            self._find_nonfinite([(j.group, j.params) for j in checked])  # asserts in-graph
            return False, None
        if device is not None:
            gate = self._gate(device)
            gate.reset()
            base = 0
            for job in checked:
                job.plan.check(job.G, gate, base)
                job.base, base = base, base + job.plan.n
            for job in jobs:
                if job.plan is not None:
                    job.gate = gate.flags
            return False, gate
        for job in checked:
            plan = job.plan
            bad = (plan.first_nonfinite(job.G) >= 0 if plan is not None
                   else self._check_finite([(job.group, job.params)]) is not None)
            if bad:
                found = self._find_nonfinite(self._all_work())  # names the first one
                if found:
                    self._reject(*found)
                    return True, None
        return False, None

    def _run(self, job: _Job, inv_scale: float, skipped: Tensor | None = None) -> None:
        """Apply one job: its cached plan, or its path (a fused group gets its plan here).
        A device plan reads a tensor ``lr`` and the bias correction on the device."""
        group = job.group
        plan = job.plan
        if plan is not None:
            if plan.gated:
                self._device_step(group, plan, job.G, inv_scale, job.gate, job.scale,
                                  skipped, job.rows)
                if job.amp and job.rows is not None:
                    # GradScaler's overflow gates the step silently: its statistics are the
                    # last step's, chosen on the device
                    if plan.last_rows is not None:
                        job.rows = torch.where(job.gate.reshape(()) != 0, plan.last_rows,
                                               job.rows)
                    plan.last_rows = job.rows
                return
            t = int(plan.steps[0]) + 1 if group["bias_correction"] else 0
            plan.step(job.G, self._hyper(group, t, inv_scale), stats=job.rows)
            return
        if not job.params:
            return
        if job.path == "fused":
            plan = self._build_plan(group, job.params)
            if plan is not None:
                job.plan, job.G = plan, plan.gradients(list(map(_GRAD, group["params"])))
                if job.G is not None:
                    if self.track_stats:
                        job.rows, job.before = plan.new_stats(), None
                    return self._run(job, inv_scale)
                self._plans.pop(id(group), None)
                job.plan = None
        self._apply(group, job.params, job.path, inv_scale)

    def _device_step(self, group: dict, plan: Any, G: Any, inv_scale: float, gate: Any,
                     scale: Any, skipped: Tensor | None, rows: Tensor | None = None) -> None:
        """A gated plan's step of ``group``: a tensor ``lr`` on the plan's device and the
        bias correction are read on the device. The :class:`Hyper` is built again only when
        the group's validated options, ``inv_scale`` or where ``lr`` is read change: the
        options tuple :meth:`_plan_grads` keeps is the same object while they hold."""
        h, lr_dev = self._hyper_of(group, plan, inv_scale)
        plan.step(G, h, stats=rows, gate=gate, lr=lr_dev, scale=scale,
                  bias=bool(group["bias_correction"]), skipped=skipped)

    def _hyper_of(self, group: dict, plan: Any, inv_scale: float) -> tuple[Hyper, Any]:
        """A gated plan's :class:`Hyper` for ``group``, and its tensor ``lr`` on the plan's
        device (None: the float in the Hyper), built again only when they change."""
        lr = group["lr"]
        lr_dev = lr if isinstance(lr, Tensor) and lr.device == plan.device else None
        key = (plan.validated, inv_scale, lr_dev is None)
        memo = plan.hyper_memo
        if memo is not None and key[0] is not None and memo[0] == key:
            return memo[1], lr_dev
        # validated None: a host tensor option, read (and validated) at every step
        h = self._hyper(group, 0, inv_scale, lr=0.0 if lr_dev is not None else None)
        plan.hyper_memo = (key, h)
        return h, lr_dev

    def _build_plan(self, group: dict, params: list[Tensor]) -> _plan.Plan | None:
        """The cached plan of a fused group whose params all have a gradient, share one
        device, dtype and codec, are contiguous and (with bias correction) share one step
        count; None when the group must take the general path."""
        if len(params) != len(group["params"]) or len({p.device for p in params}) != 1:
            return None
        plan_cls = _plan.plan_for(params[0].device.type)
        if plan_cls is None or len({(p.dtype, self._codec(group, p)) for p in params}) != 1:
            return None
        states = [self._init_state(p, group) for p in params]
        if group["bias_correction"] and len({float(st["step"]) for st in states}) != 1:
            return None
        centered, momentum = bool(group["centered"]), group["momentum"] > 0
        codec = self._codec(group, params[0])
        sq, ga, mb, scales = _kernel_state(codec, states, centered, momentum)
        reals = [real(p) for p in params]
        if not all(t.is_contiguous() for ts in (reals, sq, ga or [], mb or []) for t in ts):
            return None
        plan = _new_plan(plan_cls, codec, reals, sq, ga, mb, scales)
        plan.bind(group["params"], states, self._version, self.state)
        plan.run_options = tuple(map(group.get, _RUN_KEYS))
        self._plans[id(group)] = plan
        return plan

    # -- the general path ---------------------------------------------------------------------

    def _apply(self, group: dict, params: list[Tensor], path: str,
               inv_scale: float = 1.0) -> None:
        states = [self._init_state(p, group) for p in params]
        torch._foreach_add_([st["step"] for st in states], 1)
        # Tensors that share dtype, codec and step count go to the paths together.
        buckets: dict[tuple, list[int]] = {}
        for i, (p, st) in enumerate(zip(params, states)):
            key = (p.device, p.dtype, self._codec(group, p),
                   int(st["step"].item()) if group["bias_correction"] else 0)
            buckets.setdefault(key, []).append(i)
        for (device, _, codec, t), idx in buckets.items():
            h = self._hyper(group, t, inv_scale)
            ps = [params[i] for i in idx]
            sts = [states[i] for i in idx]
            if path == "fused":
                self._apply_fused(ps, sts, h, device, codec)
            else:
                _paths.apply_unfused(ps, sts, h, path, codec)

    def _apply_fused(self, ps: list[Tensor], sts: list[dict], h: Hyper,
                     device: torch.device, codec: Codec) -> None:
        """A one-shot plan over the contiguous tensors; non-contiguous views take the
        for-loop path, which computes the same rule."""
        contiguous = [i for i, p in enumerate(ps) if p.is_contiguous() and _g(p).is_contiguous()
                      and all(v.is_contiguous() for k, v in sts[i].items() if k != "step")]
        fast = set(contiguous)
        rest = [i for i in range(len(ps)) if i not in fast]
        if contiguous:
            plan_cls = _plan.plan_for(device.type)
            assert plan_cls is not None  # the path is fused only where a kernel is
            sq, ga, mb, scales = _kernel_state(codec, [sts[i] for i in contiguous],
                                               h.centered, h.momentum > 0)
            plan = _new_plan(plan_cls, codec, [real(ps[i]) for i in contiguous], sq, ga, mb,
                             scales)
            plan.run(_plan._ptrs([real(_g(ps[i])) for i in contiguous]), h)
        if rest:
            _paths.apply_unfused([ps[i] for i in rest], [sts[i] for i in rest], h, "forloop",
                                codec)

    # -- gradient checks ----------------------------------------------------------------------

    @torch.no_grad()
    def _check_finite(self, work: list[tuple[dict, list[Tensor]]]) -> str | None:
        """The name of the first parameter whose gradient is not finite, or ``None``."""
        for group, params in work:
            if not params:
                continue
            grads = [real(_g(p)) for p in params]
            kernel = _fused_kernel("cpu") if all(g.device.type == "cpu" and g.is_contiguous()
                                                 for g in grads) else None
            if kernel is not None and hasattr(kernel, "first_nonfinite"):
                bad = kernel.first_nonfinite(grads)
            else:
                nonempty = [i for i, g in enumerate(grads) if g.numel()]
                # max |g| never overflows, so it is finite exactly when every element is.
                maxes = torch._foreach_norm([grads[i] for i in nonempty], float("inf")) \
                    if nonempty else []
                flags = torch.stack([torch.isfinite(x) for x in maxes]).cpu() if nonempty \
                    else None
                bad = -1 if flags is None or bool(flags.all()) else \
                    nonempty[int((~flags).nonzero()[0])]
            if bad >= 0:
                return self._param_label(group, params[bad])
        return None

    def _find_nonfinite(self, work: list[tuple[dict, list[Tensor]]]
                        ) -> tuple[str, str] | None:
        """``(parameter label, nonfinite mode)`` of the first group (whose mode is not
        "ignore") holding a non-finite gradient, agreed across ranks for sharded params."""
        checked = [(g, ps) for g, ps in work if g["nonfinite"] != "ignore"]
        if not checked:
            return None
        if torch.compiler.is_compiling():
            # Inside a graph: no host sync, so an async assert fails the step before any
            # write; it cannot name the parameter, and "skip" raises too. (A check between two
            # graphs would guard the second on gradients that zero_grad frees: a recompile at
            # every step.)
            grads = [real(_g(p)) for _, ps in checked for p in ps if _g(p).numel()]
            if grads:
                ok = _all_finite(grads)
                torch._assert_async(ok, "rmsprop: non-finite gradient (inf or NaN)")
            return None
        labels = [self._check_finite([(g, ps)]) for g, ps in checked]
        groups = self._mesh_groups()
        if groups:
            import torch.distributed as dist

            flags = torch.tensor([0.0 if x is None else 1.0 for x in labels])
            for pg in groups:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=pg)
            labels = [x if x is not None else ("(a gradient shard on another rank)"
                                               if f > 0 else None)
                      for x, f in zip(labels, flags.tolist())]
        for (g, _), label in zip(checked, labels):
            if label is not None:
                return label, g["nonfinite"]
        return None

    def _mesh_groups(self) -> list:
        """The process groups of the device mesh of sharded (DTensor) params, if any."""
        mesh = getattr(self, "_mesh", None)
        return list(mesh.get_all_groups()) if mesh is not None else []

    def _find_mesh(self) -> None:
        self._mesh = next((p.device_mesh for g in self.param_groups for p in g["params"]
                           if getattr(p, "device_mesh", None) is not None), None)

    def _reject(self, label: str, mode: str, stacklevel: int = 5) -> None:
        """Raise, or count and skip, a step whose gradients are not finite (``stacklevel``
        points the warning at the caller of ``step()``)."""
        if mode in ("raise", "raise_now"):
            raise NonFiniteGradientError(
                f"non-finite gradient (inf or NaN) in parameter {label}; nothing was "
                "changed. Pass nonfinite='skip' to skip such steps, or 'ignore' to "
                "apply them as torch.optim.RMSprop does.")
        self._skipped_host += 1
        self._warn_skipped(label, stacklevel + 1)
        if self.track_stats and self._stats:
            for gs in self._stats.get("groups", []):
                gs["skipped_steps"] = self.skipped_steps

    # -- health statistics --------------------------------------------------------------------

    # Eager even inside a compiled step: traced, its per-parameter bookkeeping breaks the
    # graph at every .item() and recompiles on each new value (past dynamo's limit of 8).
    @torch.compiler.disable
    @torch.no_grad()
    def _record_stats(self, jobs: list[_Job]) -> None:
        """Record the step's statistics rows: the fused kernels' (filled in their pass), or
        computed here from the params as they were before the step."""
        rows = []
        for job in jobs:
            if job.rows is not None:
                rows.append(job.rows)
            elif job.params:
                hypers: dict[int, Hyper] = {}
                out = []
                for p, old in zip(job.params, job.before or []):
                    t = int(self.state[p]["step"]) if job.group["bias_correction"] else 0
                    h = hypers.get(t) or hypers.setdefault(t, self._hyper(job.group, t))
                    out.append(_stats.row(h, self._codec(job.group, p), p, old, self.state[p]))
                rows.append(torch.stack(out))
            else:
                rows.append(_stats.empty_rows())
        # Summarised when stats() is called: until the next step the state it reads (for the
        # median step size) is the state this step left, and a training loop that reads the
        # statistics every k steps pays for the summary every k steps, not at each one.
        self._stats = {}
        self._pending = ([(j.group, j.params) for j in jobs], rows)

    def stats(self) -> dict[str, Any]:
        """Health statistics of the last step (needs ``track_stats``).

        Returns ``{"groups": [per-group dict], "params": {name: dict}}`` (``"params"`` only
        with ``track_stats="params"``). Each dict holds ``step``, ``grad_rms`` (RMS of the
        gradients), ``update_rms`` (RMS of the applied change), ``update_to_param_rms`` (its
        ratio to the params' RMS), ``step_min``/``step_median``/``step_max`` (of the effective
        per-element step ``lr/d``; the median over a strided sample of at most 4096 elements
        of each of at most 64 evenly spaced tensors), ``eps_dominated_fraction`` (share of
        elements where ``eps`` is larger than the ``sqrt(v)`` — or ``v`` with
        ``eps_in_sqrt`` — it is added to) and, per group,
        ``skipped_steps``. On the fused path the sums, minimum and maximum come out of the
        kernel's own pass; elsewhere collecting them copies the params once per step. The
        summary (and the median's sample) is computed here, on the first call after a step.
        """
        if not self.track_stats:
            raise RuntimeError("stats() needs the optimizer built with track_stats=True")
        self._read_verdicts(wait=True)
        if self._pending is not None:
            work, rows = self._pending
            self._pending = None
            with torch.no_grad():
                self._stats = _stats.summarize_groups(
                    work, rows, self.track_stats == "params",
                    lambda group, t: self._hyper(group, t), self._codec, self._param_label,
                    self.state, self.skipped_steps)
        return self._stats
