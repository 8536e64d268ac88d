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

_NONFINITE = ("raise", "skip", "ignore")
_GRAD = operator.attrgetter("grad")
_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64,
         torch.complex32: torch.float16}
_FOREACH_BATCH = _paths.FOREACH_BATCH  # the same dict (tests set it)


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds inf or NaN and ``nonfinite="raise"``: no parameter or state changed."""


def _all_finite(grads: list[Tensor]) -> Tensor:
    """A 0-d bool tensor: every element of every gradient is finite (for a compiled step).
    max |g| is inf or NaN exactly when an element is (sum(g * 0) would be folded to 0 by
    inductor). On CUDA as one _foreach_norm: inductor has crashed fusing per-tensor amax
    reductions with the update there; on the CPU per-tensor amax, which inductor compiles
    to a cheaper step than _foreach_norm's."""
    if grads[0].is_cuda:
        return torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite().all()
    return torch.stack([g.abs().amax() for g in grads]).isfinite().all()


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
    """A plan over these tensors; quantized state (``scales`` given) goes to the C kernel's
    quantized entry, which :meth:`_plan.Plan.accepts` admits on the CPU only."""
    if scales is None:
        return plan_cls(params, sq, ga, mb)
    return _plan.CpuPlan(params, sq, ga, mb, scales=scales, quantized=codec.name)


def _check_rounding(stochastic_rounding: Any, seed: Any) -> None:
    if not isinstance(stochastic_rounding, bool):
        raise ValueError(f"Invalid stochastic_rounding value: {stochastic_rounding!r} "
                         "(expected True or False)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"Invalid seed value: {seed!r} (expected an integer)")
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"Invalid seed value: {seed!r} (an integer in [0, 2**32))")


@dataclass
class _Job:
    """One param group's work in a step: its params with a gradient and the route they take
    (a cached plan with its gradient table, or a path)."""

    group: dict
    params: list
    path: str
    plan: Any = None
    G: Any = None
    gate: Any = None
    rows: Any = None
    before: list | None = field(default=None)


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

    Example::

        opt = RMSprop(model.parameters(), lr=1e-2)
        opt = RMSprop.from_preset("keras", model.parameters())
    """

    _step_supports_amp_scaling = True  # GradScaler passes grad_scale/found_inf to step()

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
                 track_stats: bool | str = False) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if nonfinite not in _NONFINITE:
            raise ValueError(f"Invalid nonfinite value: {nonfinite!r} "
                             f"(choose one of {', '.join(map(repr, _NONFINITE))})")
        _codecs.check_state_dtype(state_dtype)
        _check_rounding(stochastic_rounding, seed)
        if track_stats not in (False, True, "params"):
            raise ValueError(f"Invalid track_stats value: {track_stats!r} "
                             "(False, True or 'params')")
        if fused and differentiable:
            raise ValueError("fused=True does not support differentiable=True")
        if foreach and differentiable:
            raise RuntimeError("`foreach` and `differentiable` are mutually exclusive.")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
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
        self.skipped_steps = 0
        self._stats: dict[str, Any] = {}
        self._plans: dict[int, Any] = {}
        self._version = 0
        super().__init__(params, defaults)
        if fused:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.device.type == "meta":
                        continue  # as torch's fused optimizers: checked when it steps
                    reason = self._fused_reason(group, p)
                    if reason:
                        raise RuntimeError(f"fused=True cannot apply: {reason}")

    @classmethod
    def from_preset(cls, name: str, params: Iterable[Any], **overrides: Any) -> RMSprop:
        """Build the optimizer of a published variant (``rmsprop.PRESETS[name]``), with
        ``overrides`` on top. Raises ``ValueError`` for an unknown name, or when the original
        has no default learning rate and ``lr`` is not given."""
        params = list(params)
        return cls(params, **resolve_preset(name, overrides, params))

    # -- torch.optim.Optimizer contract -------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        rule = {k: param_group[k] for k in RULE_OPTIONS if k in param_group}
        validate(rule)
        if param_group.get("nesterov", self.defaults.get("nesterov")) and not rule.get(
                "momentum", self.defaults.get("momentum", 0)):
            raise ValueError("Nesterov momentum requires a momentum > 0")
        if "nonfinite" in param_group and param_group["nonfinite"] not in _NONFINITE:
            raise ValueError(f"Invalid nonfinite value: {param_group['nonfinite']!r}")
        if "state_dtype" in param_group:
            _codecs.check_state_dtype(param_group["state_dtype"])
        _check_rounding(param_group.get("stochastic_rounding", False),
                        param_group.get("seed", 0))
        if not isinstance(param_group["params"], (Tensor, set)):
            # a generator (module.parameters()) is read once, here and for the base class
            param_group = {**param_group, "params": list(param_group["params"])}
        for p in ([param_group["params"]] if isinstance(param_group["params"], Tensor)
                  else param_group["params"]):
            if isinstance(p, Tensor) and not (p.is_floating_point() or p.is_complex()):
                raise ValueError(f"RMSprop needs floating-point or complex params, got {p.dtype}")
        super().add_param_group(param_group)
        self.__dict__["_version"] = self.__dict__.get("_version", 0) + 1
        self._find_mesh()

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "track_stats": self.track_stats,
                "skipped_steps": self.skipped_steps}  # plans are caches: rebuilt on demand

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
        self.__dict__.setdefault("skipped_steps", 0)
        self.__dict__.setdefault("_stats", {})
        self._plans = {}
        self._version = self.__dict__.get("_version", 0) + 1
        self._find_mesh()

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict. Of this class's extra options, those of the rule are written
        where they differ from their defaults, and ``fused``, ``nonfinite``,
        ``state_dtype``, ``stochastic_rounding`` and ``seed`` (how it runs, which a load
        keeps from the live optimizer) not at all: with the options torch has, it holds
        exactly torch's keys, so ``torch.distributed.checkpoint`` templates built from it
        load torch checkpoints."""
        return _state_dict.slim(super().state_dict(), RMSprop)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of ``torch.optim.RMSprop``. As in torch, the
        options come from the state dict (``lr``, ``momentum``, ``centered``... of the run
        that saved it replace the current ones). Options it lacks take their defaults: the
        rule's (``eps_in_sqrt``, ``nesterov``, ...) those of :class:`rmsprop.Options`
        (torch's rule), ``fused``, ``nonfinite`` and ``state_dtype`` this optimizer's
        constructor values. A ``step`` saved as a number becomes a tensor, as in torch.
        Raises ``ValueError`` naming the first entry that does not fit the current params
        (group count, sizes, state shapes, dtypes, options); nothing is changed then."""
        _state_dict.check(self.param_groups, state_dict, self._codec)
        self._plans = {}
        super().load_state_dict(_state_dict.with_tensor_steps(state_dict))
        _state_dict.restore(self.param_groups, self.state, state_dict, self._codec)

    def full_precision_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` with quantized state (``state_dtype="8bit"``/``"4bit"``)
        decoded to float32 tensors shaped like their params (complex64 for complex params)
        and the ``*_scale`` entries dropped: a state dict ``torch.optim.RMSprop`` loads. Float
        state is returned as :meth:`state_dict` returns it."""
        from . import _quantized
        return _quantized.full_precision_state_dict(self)

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
            if self._rounds(group, p):
                from ..codecs import param_seed
                from . import _quantized
                _quantized.sr_init(state, p, param_seed(group["seed"], self._param_index(p)))
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

    def _hyper(self, group: dict, t: int, inv_scale: float | None = None) -> Hyper:
        lr = group["lr"]
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
        option, an unsupported tensor), no parameter and no state has changed."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # torch.amp.GradScaler hands us its scale and inf flag (we set
        # _step_supports_amp_scaling): an overflowed step is skipped, and the gradients are
        # unscaled inside the step (inside the fused kernel's single pass) instead of before it.
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf) > 0:
            return loss
        grad_scale = getattr(self, "grad_scale", None)
        inv_scale = 1.0 if grad_scale is None else 1.0 / float(grad_scale)
        differentiable = any(g["differentiable"] for g in self.param_groups)
        with torch.set_grad_enabled(differentiable):
            self._step(inv_scale, scaler_checked=found_inf is not None)
        return loss

    def _step(self, inv_scale: float = 1.0, scaler_checked: bool = False) -> None:
        """Collect each group's work, check the gradients, apply: nothing is written before
        every check has passed."""
        compiling = torch.compiler.is_compiling()
        if not compiling:  # dynamo refuses attribute writes inside a compiled step
            self._inv_scale = inv_scale
        checked = scaler_checked
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
        if not checked and self._check(jobs, compiling):
            return
        if self.track_stats:
            for job in jobs:
                if job.plan is None:
                    job.before = [p.detach().clone() for p in job.params]
                else:
                    job.rows = job.plan.new_stats()
        # Device plans step first, each kernel doing nothing if any check found inf or NaN;
        # one host sync then reads the verdict before anything else changes.
        gates = {id(j.gate): j.gate for j in jobs if j.gate is not None}
        for job in sorted(jobs, key=lambda j: j.gate is None):
            if gates and job.gate is None:
                if self._gates_tripped(jobs, gates):
                    return
                gates = {}
            self._run(job, inv_scale)
        if gates and self._gates_tripped(jobs, gates):
            return
        if self.track_stats:
            self._record_stats(jobs)

    def _all_work(self) -> list[tuple[dict, list[Tensor]]]:
        return [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]

    def _collect(self, group: dict, compiling: bool) -> _Job:
        """A group's job: through its cached plan when the plan still holds (the same
        params, dense contiguous gradients, unchanged storage), else the general path."""
        plan = None if compiling else self._plans.get(id(group))
        if plan is not None and group["fused"] is not False and not group["foreach"] \
                and not group["differentiable"]:
            # Options are validated when they change (schedulers write lr between steps),
            # not at every step: validation costs more than a small model's whole update.
            opts = tuple(map(group.__getitem__, RULE_OPTIONS))
            if plan.validated is None or opts != plan.validated:
                validate(dict(zip(RULE_OPTIONS, opts)), warn=False)
                plan.validated = None if any(isinstance(x, Tensor) for x in opts) else opts
            if plan.valid_for(group, self._version):
                G = plan.gradients(list(map(_GRAD, group["params"])))
                if G is not None:
                    return _Job(group, group["params"], "plan", plan, G)
        self._plans.pop(id(group), None)
        validate({k: group[k] for k in RULE_OPTIONS}, warn=False)
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("RMSprop does not support sparse gradients")
            if p.grad.shape != p.shape:
                raise RuntimeError(f"gradient of parameter {self._param_label(group, p)} "
                                   f"has shape {tuple(p.grad.shape)}, the parameter "
                                   f"{tuple(p.shape)}")
        path = self._path(group, params) if params else "none"
        if compiling and path == "fused":  # the ctypes kernel is opaque to dynamo
            path = "foreach"
        return _Job(group, params, path)

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

    def _check(self, jobs: list[_Job], compiling: bool) -> bool:
        """Check every job's gradients for inf/NaN (groups with ``nonfinite="ignore"``
        excepted); True when the step was rejected. Device plans only queue their check
        (see CudaPlan)."""
        checked = [j for j in jobs if j.params and j.group["nonfinite"] != "ignore"]
        if not checked:
            return False
        if compiling:
            self._find_nonfinite([(j.group, j.params) for j in checked])  # asserts in-graph
            return False
        gates: dict = {}
        for job in checked:
            plan = job.plan
            if plan is not None and plan.gated:
                job.gate = gates.setdefault(plan.device, plan.new_gate())
                plan.check(job.G, job.gate)
                continue
            bad = (plan.first_nonfinite(job.G) >= 0 if plan is not None
                   else self._check_finite([(job.group, job.params)]) is not None)
            if bad:
                found = self._find_nonfinite(self._all_work())  # names the first one
                if found:
                    self._reject(*found)
                    return True
        return False

    def _gates_tripped(self, jobs: list[_Job], gates: dict) -> bool:
        """Read the device checks' verdict (the step's one host sync). If one found inf or
        NaN, the gated kernels changed nothing: only their step counts go back, and the
        step is rejected naming the parameter."""
        if not any(int(g.item()) for g in gates.values()):
            return False
        for job in jobs:
            if job.gate is not None:
                job.plan.steps.sub_(1)
        found = self._find_nonfinite(self._all_work())
        if found:
            self._reject(*found)
        return True

    def _run(self, job: _Job, inv_scale: float) -> None:
        """Apply one job: its cached plan, or its path (a fused group gets its plan here)."""
        group = job.group
        if job.plan is not None:
            t = int(job.plan.steps[0]) + 1 if group["bias_correction"] else 0
            job.plan.step(job.G, self._hyper(group, t, inv_scale), stats=job.rows, gate=job.gate)
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
        plan.bind(group["params"], states, self._version)
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
            labels = [x if x is not None else ("a gradient shard on another rank"
                                               if f > 0 else None)
                      for x, f in zip(labels, flags.tolist())]
        for (g, _), label in zip(checked, labels):
            if label is not None:
                return label, g["nonfinite"]
        return None

    def _mesh_groups(self) -> list:
        """The process groups of the device mesh of sharded (DTensor) params, if any."""
        mesh = self.__dict__.get("_mesh")
        return list(mesh.get_all_groups()) if mesh is not None else []

    def _find_mesh(self) -> None:
        self._mesh = next((p.device_mesh for g in self.param_groups for p in g["params"]
                           if getattr(p, "device_mesh", None) is not None), None)

    def _reject(self, label: str, mode: str, stacklevel: int = 5) -> None:
        """Raise, or count and skip, a step whose gradients are not finite (``stacklevel``
        points the warning at the caller of ``step()``)."""
        if mode == "raise":
            raise NonFiniteGradientError(
                f"non-finite gradient (inf or NaN) in parameter {label}; nothing was "
                "changed. Pass nonfinite='skip' to skip such steps, or 'ignore' to "
                "apply them as torch.optim.RMSprop does.")
        self.skipped_steps += 1
        if self.skipped_steps == 1:
            warnings.warn(f"rmsprop: skipped a step: non-finite gradient in parameter "
                          f"{label} (counted in optimizer.skipped_steps)", RuntimeWarning,
                          stacklevel=stacklevel)
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
        if "_pending" in self.__dict__:
            work, rows = self.__dict__.pop("_pending")
            with torch.no_grad():
                self._stats = _stats.summarize_groups(
                    work, rows, self.track_stats == "params",
                    lambda group, t: self._hyper(group, t), self._codec, self._param_label,
                    self.state, self.skipped_steps)
        return self._stats
