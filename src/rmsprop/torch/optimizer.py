"""``rmsprop.torch.RMSprop``: a drop-in for ``torch.optim.RMSprop`` with every published variant.

The math is :func:`rmsprop.spec.step`; this module owns what torch users expect around it: param
groups, lazy state with torch's state names, the ``state_dict`` contract, hooks, schedulers, and
the choice among three paths (for-loop, foreach, fused kernel) that compute the same thing.
"""

from __future__ import annotations

import functools
import math
import operator
import warnings
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

from ..options import RULE_OPTIONS, Options, validate
from ..presets import resolve_preset
from . import _paths
from ._paths import Hyper

__all__ = ["RMSprop", "NonFiniteGradientError"]

_NONFINITE = ("raise", "skip", "ignore")
_HALF = (torch.float16, torch.bfloat16)
_STATE_KEYS = ("square_avg", "grad_avg", "momentum_buffer")
_GRAD = operator.attrgetter("grad")
# Elements per batch of the foreach path (see RMSprop._apply_unfused): on the CPU a batch's
# arrays fit the last-level cache; on a GPU a batch is large enough that launches stay few.
_FOREACH_BATCH = {"cpu": 1 << 20, "cuda": 1 << 26}


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds inf or NaN and ``nonfinite="raise"``: no parameter or state changed."""


def _all_finite(grads: list[Tensor]) -> Tensor:
    """A 0-d bool tensor: every element of every gradient is finite (for a compiled step).
    max |g| is inf or NaN exactly when an element is (sum(g * 0) would be folded to 0 by
    inductor). On CUDA as one _foreach_norm: per-tensor amax reductions crashed torch 2.11's
    inductor while fusing them with the update (measured on an H200); on the CPU per-tensor
    amax, which inductor compiles to a step 3-4x cheaper than _foreach_norm's."""
    if grads[0].is_cuda:
        return torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite().all()
    return torch.stack([g.abs().amax() for g in grads]).isfinite().all()


def _fused_kernel(device_type: str):
    """The fused kernel module for a device type, or ``None`` if there is none here."""
    try:
        if device_type == "cpu":
            from ..kernels import cpu as kernel
        elif device_type == "cuda":
            from ..kernels import triton as kernel
        else:
            return None
    except ImportError:
        return None
    available = getattr(kernel, "available", None)
    return kernel if available is None or available() else None


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (raw pointers of a DTensor are not its data), else ``t``."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


@functools.lru_cache(maxsize=None)
def _fused_unsupported(device_type: str, dtype: torch.dtype) -> Optional[str]:
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
    real = {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)
    if real not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return f"dtype {dtype} is not supported by the fused kernel"
    return None


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
            tensors, or CUDA with Triton); ``True`` requires it; ``False`` never uses it.
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
        state_dtype: dtype of ``square_avg``/``grad_avg``/``momentum_buffer``. ``None``
            (default) means float32 for float16/bfloat16 params (the math then runs in float32
            with one rounding to the param: fp16's eps underflow and ``g^2`` overflow above
            ~256 cannot happen; it costs 4 bytes per element per state tensor instead of 2)
            and the param dtype otherwise.
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
                 foreach: Optional[bool] = None, maximize: bool = False,
                 differentiable: bool = False, *, fused: Optional[bool] = None,
                 eps_in_sqrt: bool = False, initial_square_avg: float = 0.0,
                 lr_in_momentum: bool = False, nesterov: bool = False,
                 bias_correction: bool = False, decoupled_weight_decay: bool = False,
                 nonfinite: str = "raise", state_dtype: Optional[torch.dtype] = None,
                 track_stats: bool | str = False) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if nonfinite not in _NONFINITE:
            raise ValueError(f"Invalid nonfinite value: {nonfinite!r} "
                             f"(choose one of {', '.join(map(repr, _NONFINITE))})")
        if state_dtype is not None and not (isinstance(state_dtype, torch.dtype)
                                            and state_dtype.is_floating_point):
            raise ValueError(f"Invalid state_dtype: {state_dtype!r} (a floating torch.dtype)")
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
                        nonfinite=nonfinite, state_dtype=state_dtype)
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
                    reason = _fused_unsupported(p.device.type, p.dtype)
                    if reason:
                        raise RuntimeError(f"fused=True cannot apply: {reason}")

    @classmethod
    def from_preset(cls, name: str, params: Iterable[Any], **overrides: Any) -> "RMSprop":
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
        defaults = RMSprop.__init__.__kwdefaults__
        for group in self.param_groups:
            group.setdefault("momentum", 0)
            group.setdefault("centered", False)
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("capturable", False)
            for key, value in defaults.items():
                if key != "track_stats":
                    group.setdefault(key, self.defaults.get(key, value)
                                     if hasattr(self, "defaults") else value)
        self.__dict__.setdefault("track_stats", False)
        self.__dict__.setdefault("skipped_steps", 0)
        self.__dict__.setdefault("_stats", {})
        self._plans = {}
        self._version = self.__dict__.get("_version", 0) + 1
        self._find_mesh()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from this class or from ``torch.optim.RMSprop`` (missing options
        take this optimizer's defaults). Raises ``ValueError`` naming the first entry that does
        not fit the current params (group count, sizes, state shapes, dtypes); nothing is
        changed then."""
        self._check_state_dict(state_dict)
        self._plans = {}
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        # torch casts floating state to the param dtype; restore float32 state of half params.
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            if pid not in saved_state:
                continue
            group = self._group_of(p)
            dtype = self._state_dtype(p, group)
            st = self.state[p]
            for key in _STATE_KEYS:
                if key in saved_state[pid]:
                    st[key] = saved_state[pid][key].to(device=p.device, dtype=dtype, copy=True)

    def _check_state_dict(self, state_dict: Any) -> None:
        if not isinstance(state_dict, dict) or "state" not in state_dict \
                or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state dict: expected keys 'state' and "
                             "'param_groups'")
        groups, saved = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved):
            raise ValueError(f"loaded state dict has {len(saved)} parameter groups, the "
                             f"optimizer has {len(groups)}")
        for gi, (g, sg) in enumerate(zip(groups, saved)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(f"parameter group {gi} has {len(g['params'])} params, the "
                                 f"loaded one has {len(sg['params'])}")
            rule = {k: sg[k] for k in RULE_OPTIONS if k in sg}
            try:
                validate(rule, warn=False)  # warnings were given when the options were chosen
            except ValueError as e:
                raise ValueError(f"parameter group {gi} of the state dict: {e}") from None
            names = g.get("param_names") or [None] * len(g["params"])
            for p, pid, name in zip(g["params"], sg["params"], names):
                entry = state_dict["state"].get(pid)
                if entry is None:
                    continue
                label = repr(name) if name else f"group {gi} index {sg['params'].index(pid)}"
                if not isinstance(entry, dict):
                    raise ValueError(f"state of parameter {label} is not a dict")
                for key in _STATE_KEYS:
                    t = entry.get(key)
                    if t is None:
                        continue
                    if not isinstance(t, Tensor):
                        raise ValueError(f"state {key!r} of parameter {label} is not a tensor")
                    if t.shape != p.shape:
                        raise ValueError(f"state {key!r} of parameter {label} has shape "
                                         f"{tuple(t.shape)}, the parameter {tuple(p.shape)}")
                    if t.is_complex() != p.is_complex() or not (t.is_floating_point()
                                                                  or t.is_complex()):
                        raise ValueError(f"state {key!r} of parameter {label} has dtype "
                                         f"{t.dtype}, incompatible with the parameter's "
                                         f"{p.dtype}")
                    if not bool(torch.isfinite(t).all()):
                        raise ValueError(f"state {key!r} of parameter {label} holds inf or "
                                         "NaN")
                if "step" in entry and not isinstance(entry["step"], (Tensor, int, float)):
                    raise ValueError(f"state 'step' of parameter {label} is not a number")

    # -- the step -----------------------------------------------------------------------------

    @torch.no_grad()
    def _check_finite(self, work: list[tuple[dict, list[Tensor]]]) -> Optional[str]:
        """The name of the first parameter whose gradient is not finite, or ``None``."""
        for group, params in work:
            if not params:
                continue
            grads = [_local(p.grad) for p in params]
            kernel = _fused_kernel("cpu") if all(g.device.type == "cpu" and g.is_contiguous()
                                                 and not g.is_complex() for g in grads) else None
            if kernel is not None and hasattr(kernel, "first_nonfinite"):
                bad = kernel.first_nonfinite(grads)
            else:
                nonempty = [i for i, g in enumerate(grads) if g.numel()]
                real = [torch.view_as_real(grads[i]) if grads[i].is_complex() else grads[i]
                        for i in nonempty]
                # max |g| never overflows, so it is finite exactly when every element is.
                maxes = torch._foreach_norm(real, float("inf")) if real else []
                flags = torch.stack([torch.isfinite(x) for x in maxes]).cpu() if real else None
                bad = -1 if flags is None or bool(flags.all()) else \
                    nonempty[int((~flags).nonzero()[0])]
            if bad >= 0:
                return self._param_label(group, params[bad])
        return None

    def _param_label(self, group: dict, p: Tensor) -> str:
        index = next(i for i, q in enumerate(group["params"]) if q is p)
        names = group.get("param_names")
        if names:
            return repr(names[index])
        gi = next(i for i, g in enumerate(self.param_groups) if g is group)  # not ==: tensors
        return f"group {gi} index {index} (shape {tuple(p.shape)})"

    def _group_of(self, p: Tensor) -> dict:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    def _state_dtype(self, p: Tensor, group: dict) -> torch.dtype:
        real = p.real.dtype if p.is_complex() else p.dtype
        if group.get("state_dtype") is not None:
            return group["state_dtype"]
        return torch.float32 if real in _HALF else real

    def _init_state(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        dtype = self._state_dtype(p, group)
        if not state:
            device = p.device if group["capturable"] or group["fused"] else "cpu"
            state["step"] = torch.zeros((), dtype=torch.float32, device=device)
            state["square_avg"] = self._filled(p, dtype, float(group["initial_square_avg"]))
        # Created lazily so that turning momentum/centered on mid-run (OneCycleLR writes
        # group["momentum"]) starts the new buffer from zero instead of raising KeyError.
        if group["momentum"] > 0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = self._filled(p, dtype, 0.0)
        if group["centered"] and "grad_avg" not in state:
            state["grad_avg"] = self._filled(p, dtype, 0.0)
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

    @staticmethod
    def _filled(p: Tensor, dtype: torch.dtype, value: float) -> Tensor:
        if p.is_complex():
            dtype = torch.complex128 if dtype == torch.float64 else (
                torch.complex64 if dtype == torch.float32 else torch.complex32)
            return torch.full_like(p, complex(value, value), dtype=dtype,
                                   memory_format=torch.preserve_format)
        return torch.full_like(p, value, dtype=dtype, memory_format=torch.preserve_format)

    def _path(self, group: dict, params: list[Tensor]) -> str:
        if group["differentiable"]:
            return "forloop"
        if torch.compiler.is_compiling() and not group["fused"] and group["foreach"] is not False:
            return "foreach"  # the ctypes kernel is opaque to dynamo
        if group["fused"] is not False and not group["foreach"]:
            reasons = {_fused_unsupported(p.device.type, p.dtype) for p in params}
            if reasons == {None}:
                return "fused"
            if group["fused"]:
                raise RuntimeError("fused=True cannot apply: " + next(r for r in reasons if r))
        if group["foreach"] or (group["foreach"] is None
                                and all(p.device.type == "cuda" for p in params)):
            return "foreach"
        return "forloop"

    def _hyper(self, group: dict, t: int, inv_scale: Optional[float] = None) -> Hyper:
        lr = group["lr"]
        if isinstance(lr, Tensor):
            lr = float(lr.detach().reshape(()))  # one sync: the paths take a Python scalar
        alpha = float(group["alpha"])
        return Hyper(lr=float(lr), alpha=alpha, eps=float(group["eps"]),
                     weight_decay=float(group["weight_decay"]),
                     momentum=float(group["momentum"]), centered=bool(group["centered"]),
                     maximize=bool(group["maximize"]), eps_in_sqrt=bool(group["eps_in_sqrt"]),
                     lr_in_momentum=bool(group["lr_in_momentum"]),
                     nesterov=bool(group["nesterov"]) and group["momentum"] > 0,
                     decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
                     c=(1.0 - alpha ** t) if group["bias_correction"] else 1.0,
                     inv_scale=getattr(self, "_inv_scale", 1.0) if inv_scale is None
                     else inv_scale)

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
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

    def _fast_step(self, scaler_checked: bool) -> bool:
        """The whole step through cached fused-kernel plans, or False (nothing done) when any
        group needs the general path: a missing or non-contiguous gradient, a non-finite one
        (the general path names it), changed options, no plan yet."""
        jobs = []
        for group in self.param_groups:
            if not group["params"]:
                continue
            plan = self._plans.get(id(group))
            if (plan is None or not plan.valid_for(group, self._version)
                    or group["fused"] is False or group["foreach"] or group["differentiable"]):
                return False
            tables = plan.tables(list(map(_GRAD, group["params"])))
            if tables is None:
                return False
            jobs.append((group, plan, tables))
        hypers = []
        gates: dict = {}
        for group, plan, (_, G) in jobs:
            # Options are validated when they change (schedulers write lr between steps),
            # not at every step: validation costs more than a small model's whole update.
            opts = tuple(map(group.__getitem__, RULE_OPTIONS))
            if plan.validated is None or opts != plan.validated:
                validate(dict(zip(RULE_OPTIONS, opts)), warn=False)
                plan.validated = None if any(isinstance(x, Tensor) for x in opts) else opts
            if group["nonfinite"] != "ignore" and not scaler_checked:
                if plan.gated:  # checked on the device; the step kernels read the verdict
                    gates.setdefault(plan.device, plan.new_gate())
                    plan.check(G, gates[plan.device])
                elif plan.first_nonfinite(G) >= 0:
                    return False
            t = int(plan.steps[0]) + 1 if group["bias_correction"] else 0
            hypers.append(self._hyper(group, t))
        rows = ([plan.new_stats() for _, plan, _ in jobs]
                if self.track_stats else [None] * len(jobs))
        todo = list(zip(jobs, hypers, rows))
        # Device plans step first, each kernel doing nothing if any check found inf or NaN;
        # one host sync then reads the verdict before any CPU plan changes anything.
        todo.sort(key=lambda job: not job[0][1].gated)
        for (group, plan, (P, G)), h, r in todo:
            if not plan.gated and gates:
                if any(int(g.item()) for g in gates.values()):
                    return self._undo_gated(todo)
                gates = {}
            plan.step(P, G, h, stats=r, gate=gates.get(getattr(plan, "device", None)))
        if gates and any(int(g.item()) for g in gates.values()):
            return self._undo_gated(todo)
        if self.track_stats:
            self._record_stats([(g, g["params"]) for g, _, _ in jobs], None, rows)
        return True

    @staticmethod
    def _undo_gated(todo: list) -> bool:
        """A device check found inf or NaN: the gated kernels changed nothing, so only their
        step counters go back; the general path then names the parameter (False)."""
        for (_, plan, _), _, _ in todo:
            if plan.gated:
                plan.steps.sub_(1)
        return False

    def _build_plans(self, work: list[tuple[dict, list[Tensor]]], paths: list[str]) -> None:
        from ._plan import plan_for

        for (group, params), path in zip(work, paths):
            self._plans.pop(id(group), None)
            if path != "fused" or not params or len(params) != len(group["params"]):
                continue
            devices = {p.device for p in params}
            plan_cls = plan_for(params[0].device.type)
            if len(devices) != 1 or plan_cls is None:
                continue
            states = [self.state[p] for p in params]
            kinds = {(p.dtype, st["square_avg"].dtype) for p, st in zip(params, states)}
            if len(kinds) != 1 or (group["bias_correction"]
                                   and len({float(st["step"]) for st in states}) != 1):
                continue
            if not all(p.is_contiguous() and all(v.is_contiguous() for k, v in st.items()
                                                  if k != "step")
                       for p, st in zip(params, states)):
                continue
            self._plans[id(group)] = plan_cls(group["params"], states,
                                             centered=bool(group["centered"]),
                                             momentum=group["momentum"] > 0,
                                             version=self._version)

    def _step(self, inv_scale: float = 1.0, scaler_checked: bool = False) -> None:
        compiling = torch.compiler.is_compiling()
        if not compiling:  # dynamo (torch 2.11 on CUDA) refuses attribute writes here
            self._inv_scale = inv_scale
        checked = scaler_checked
        if self._mesh_groups() and not checked:
            # Sharded params: every rank must agree (and run the same collectives) before
            # any path is chosen, or one rank would raise while the others step.
            found = self._find_nonfinite([(g, [p for p in g["params"] if p.grad is not None])
                                          for g in self.param_groups])
            if found:
                return self._reject(*found)
            checked = True
        if self._plans and not compiling and self._fast_step(checked):
            return
        if compiling:
            for group in self.param_groups:
                self._init_group(group, [])
        work: list[tuple[dict, list[Tensor]]] = []
        for group in self.param_groups:
            validate({k: group[k] for k in RULE_OPTIONS}, warn=False)
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("RMSprop does not support sparse gradients")
                if p.grad.shape != p.shape:
                    raise RuntimeError(f"gradient of parameter {self._param_label(group, p)} "
                                       f"has shape {tuple(p.grad.shape)}, the parameter "
                                       f"{tuple(p.shape)}")
            work.append((group, params))
        paths = [self._path(group, params) for group, params in work]
        if compiling:  # the ctypes kernel is opaque to dynamo: foreach compiles into one graph
            paths = ["foreach" if path == "fused" else path for path in paths]
        if not checked:
            found = self._find_nonfinite(work)
            if found:
                return self._reject(*found)

        before = ([[p.detach().clone() for p in ps] for _, ps in work]
                  if self.track_stats else None)
        for (group, params), path in zip(work, paths):
            if params:
                self._apply(group, params, path, inv_scale)
        if self.track_stats:
            self._record_stats(work, before)
        if not compiling:
            self._build_plans(work, paths)

    def _find_nonfinite(self, work: list[tuple[dict, list[Tensor]]]
                        ) -> Optional[tuple[str, str]]:
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
            grads = [self._real(p.grad) for _, ps in checked for p in ps if p.grad.numel()]
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

    def _reject(self, label: str, mode: str) -> None:
        if mode == "raise":
            raise NonFiniteGradientError(
                f"non-finite gradient (inf or NaN) in parameter {label}; nothing was "
                "changed. Pass nonfinite='skip' to skip such steps, or 'ignore' to "
                "apply them as torch.optim.RMSprop does.")
        self.skipped_steps += 1
        if self.skipped_steps == 1:
            warnings.warn(f"rmsprop: skipped a step: non-finite gradient in parameter "
                          f"{label} (counted in optimizer.skipped_steps)", RuntimeWarning,
                          stacklevel=4)
        if self.track_stats and self._stats:
            for gs in self._stats.get("groups", []):
                gs["skipped_steps"] = self.skipped_steps

    def _apply(self, group: dict, params: list[Tensor], path: str,
               inv_scale: float = 1.0) -> None:
        states = [self._init_state(p, group) for p in params]
        torch._foreach_add_([st["step"] for st in states], 1)
        # Tensors that share dtype, state dtype and step count go to the paths together.
        buckets: dict[tuple, list[int]] = {}
        for i, (p, st) in enumerate(zip(params, states)):
            key = (p.device, p.dtype, self._real(st["square_avg"]).dtype,
                   int(st["step"].item()) if group["bias_correction"] else 0)
            buckets.setdefault(key, []).append(i)
        for (device, dtype, sdtype, t), idx in buckets.items():
            h = self._hyper(group, t, inv_scale)
            ps = [params[i] for i in idx]
            sts = [states[i] for i in idx]
            if path == "fused":
                self._apply_fused(ps, sts, h, device)
            else:
                self._apply_unfused(ps, sts, h, path)

    @staticmethod
    def _real(t: Optional[Tensor]) -> Optional[Tensor]:
        """The plain real tensor the math runs on: a DTensor's local shard (FSDP2 steps on
        shards, never gathers), complex as (re, im) pairs."""
        if t is None:
            return None
        t = _local(t)
        return torch.view_as_real(t) if t.is_complex() else t

    def _apply_unfused(self, ps: list[Tensor], sts: list[dict], h: Hyper, path: str) -> None:
        """The for-loop or foreach path. The math runs in the spec's dtype (float64 for float64
        params, float32 otherwise): params, gradients and state in another dtype are
        computed on as float copies and rounded back once.

        The foreach path runs over batches of at most ``_FOREACH_BATCH[device]`` elements
        (long tensors cut into flat slices): its temporaries (the denominator, and the float
        copies of 16-bit params and gradients) then stay bounded instead of model-sized, and
        on the CPU a batch's passes run in cache. Every operation is elementwise, so the
        result does not depend on the batching."""
        r = self._real
        keys = [key for key, on in (("square_avg", True), ("grad_avg", h.centered),
                                    ("momentum_buffer", h.momentum > 0)) if on]
        columns = [[r(p) for p in ps], [r(p.grad) for p in ps]] + [
            [r(st[key]) for st in sts] for key in keys]
        if path != "foreach" or torch.compiler.is_compiling():
            return self._unfused(columns, keys, h, path)
        limit = _FOREACH_BATCH.get(columns[0][0].device.type, _FOREACH_BATCH["cuda"])
        batch: list[list[Tensor]] = [[] for _ in columns]
        size = 0
        for row in zip(*columns):
            n = row[0].numel()
            parts = [row]
            if n > limit and all(t.is_contiguous() for t in row):
                parts = [tuple(t.view(-1)[lo:lo + limit] for t in row)
                         for lo in range(0, n, limit)]
            for part in parts:
                if size and size + part[0].numel() > limit:
                    self._unfused(batch, keys, h, path)
                    batch, size = [[] for _ in columns], 0
                for col, t in zip(batch, part):
                    col.append(t)
                size += part[0].numel()
        if batch[0]:
            self._unfused(batch, keys, h, path)

    @staticmethod
    def _unfused(columns: list[list[Tensor]], keys: list[str], h: Hyper, path: str) -> None:
        """The rule over ``columns`` = [params, grads, *states named by keys] (real tensors)."""
        math_dtype = torch.float64 if columns[0][0].dtype == torch.float64 else torch.float32
        work = [ts if ts[0].dtype == math_dtype else [t.to(math_dtype) for t in ts]
                for ts in columns]
        pw, gw = work[0], work[1]
        sw = dict(zip(keys, work[2:]))
        vs, ms, bs = sw["square_avg"], sw.get("grad_avg"), sw.get("momentum_buffer")
        if path == "foreach":
            _paths.foreach_step(pw, gw, vs, ms, bs, h)
        else:
            for i in range(len(pw)):
                _paths.single_tensor_step(pw[i], gw[i], vs[i], ms[i] if ms else None,
                                          bs[i] if bs else None, h)
        for i, (originals, copies) in enumerate(zip(columns, work)):
            if i != 1 and copies is not originals:  # the gradients are only read
                for t, w in zip(originals, copies):
                    t.copy_(w)

    def _apply_fused(self, ps: list[Tensor], sts: list[dict], h: Hyper,
                     device: torch.device) -> None:
        kernel = _fused_kernel(device.type)
        r = self._real
        contiguous = [i for i, p in enumerate(ps) if p.is_contiguous() and p.grad.is_contiguous()
                      and all(v.is_contiguous() for k, v in sts[i].items() if k != "step")]
        fast = set(contiguous)
        rest = [i for i in range(len(ps)) if i not in fast]
        if contiguous:
            kernel.fused_step(
                [r(ps[i]) for i in contiguous], [r(ps[i].grad) for i in contiguous],
                [r(sts[i]["square_avg"]) for i in contiguous],
                [r(sts[i]["grad_avg"]) for i in contiguous] if h.centered else None,
                [r(sts[i]["momentum_buffer"]) for i in contiguous] if h.momentum > 0 else None,
                lr=h.lr, alpha=h.alpha, eps=h.eps, weight_decay=h.weight_decay,
                momentum=h.momentum, centered=h.centered, maximize=h.maximize,
                eps_in_sqrt=h.eps_in_sqrt, lr_in_momentum=h.lr_in_momentum,
                nesterov=h.nesterov, decoupled_weight_decay=h.decoupled_weight_decay,
                bias_correction=h.c, grad_scale=None if h.inv_scale == 1.0 else 1.0 / h.inv_scale)
        if rest:  # non-contiguous views: the for-loop path computes the same rule
            self._apply_unfused([ps[i] for i in rest], [sts[i] for i in rest], h, "forloop")

    # -- health statistics --------------------------------------------------------------------

    # Eager even inside a compiled step: traced, its per-parameter bookkeeping breaks the
    # graph at every .item() and recompiles on each new value (past dynamo's limit of 8).
    @torch.compiler.disable
    @torch.no_grad()
    def _record_stats(self, work: list[tuple[dict, list[Tensor]]],
                      before: Optional[list[list[Tensor]]],
                      rows: Optional[list[Tensor]] = None) -> None:
        """Record the step's statistics. ``rows[g]`` is a float64 ``[n, 6]`` tensor per group,
        as the fused kernel fills it in its pass (sum g^2, sum u^2, sum p^2, min lr/d,
        max lr/d, count of eps-dominated elements); without it the rows are computed here from
        ``before``, the params as they were before the step."""
        if rows is None:
            rows = [torch.stack([self._stats_row(group, p, old)
                                 for p, old in zip(params, before[gi])]) if params else
                    torch.zeros(0, 6, dtype=torch.float64)
                    for gi, (group, params) in enumerate(work)]
        # Summarised when stats() is called: until the next step the state it reads (for the
        # median step size) is the state this step left, and a training loop that reads the
        # statistics every k steps pays for the summary every k steps, not at each one.
        self._stats = {}
        self._pending = (work, rows)

    @torch.no_grad()
    def _summarize_pending(self) -> None:
        work, rows = self.__dict__.pop("_pending")
        groups_out, params_out = [], {}
        for gi, (group, params) in enumerate(work):
            r = rows[gi].cpu()
            numels = [self._real(p).numel() for p in params]
            per_param = self.track_stats == "params"
            # The group's median step size comes from a sample of at most 64 tensors: on a
            # model of a thousand small tensors per-tensor work would cost more than the step.
            every = 1 if per_param else max(1, len(params) // 64)
            samples = [self._step_sizes(group, p) for p in params[::every]]
            steps = [int(self.state[p]["step"]) for p in params[::every]]
            out = self._summarize(r, numels, samples, max(steps, default=0))
            out["skipped_steps"] = self.skipped_steps
            groups_out.append(out)
            if per_param:
                for i, p in enumerate(params):
                    name = self._param_label(group, p).strip("'")
                    params_out[name] = self._summarize(r[i:i + 1], numels[i:i + 1],
                                                       samples[i:i + 1], steps[i])
        self._stats = {"groups": groups_out}
        if self.track_stats == "params":
            self._stats["params"] = params_out

    def _stats_row(self, group: dict, p: Tensor, old: Tensor) -> Tensor:
        """One parameter's row of this step's statistics (sum g^2, sum u^2, sum p^2, min lr/d,
        max lr/d, count of eps-dominated elements) as a float64 tensor on its device: no
        host sync per value. Computed in the param's math dtype (float64 for float64 params,
        float32 otherwise, as the fused kernels do): float64 copies of float32 tensors cost
        more than the step itself on the CPU."""
        st, r = self.state[p], self._real
        h = self._hyper(group, int(st["step"]))
        f = torch.float64 if r(p).dtype == torch.float64 else torch.float32
        s = r(st["square_avg"]).to(f)
        s = s / h.c if h.c != 1.0 else s
        if h.centered:
            m = r(st["grad_avg"]).to(f)
            s = (s - (m / h.c if h.c != 1.0 else m).square()).clamp(min=0)
        sq = (s + h.eps).sqrt() if h.eps_in_sqrt else s.sqrt()
        d = sq if h.eps_in_sqrt else sq + h.eps
        new, old = r(p.detach()).to(f), r(old).to(f)
        g = r(p.grad).to(f)
        g = g * h.inv_scale if h.inv_scale != 1.0 else g  # the sign does not change g^2
        if h.weight_decay and not h.decoupled_weight_decay:
            g = (-g if h.maximize else g) + h.weight_decay * old
        dom = (h.eps > s) if h.eps_in_sqrt else (h.eps > sq)
        row = [x.square().sum().to(torch.float64) for x in (g, old - new, new)]
        if new.numel():
            # lr/d is monotone in d and correctly rounded: its extremes are lr over d's
            dmin, dmax = torch.aminmax(d)
            row += [(h.lr / dmax).to(torch.float64), (h.lr / dmin).to(torch.float64)]
        else:
            row += [torch.tensor(v, dtype=torch.float64, device=new.device)
                    for v in (math.inf, -math.inf)]
        return torch.stack(row + [dom.sum().to(torch.float64)])

    def _step_sizes(self, group: dict, p: Tensor, limit: int = 4096) -> np.ndarray:
        """``lr/d`` on a strided sample of at most ``limit`` elements (for the median)."""
        st = self.state[p]
        sub = {k: st[k] for k in ("square_avg", "grad_avg") if k in st}
        flat = {k: self._real(v).reshape(-1) for k, v in sub.items()}
        n = flat["square_avg"].numel()
        stride = max(1, n // limit + (n % limit > 0))
        h = self._hyper(group, int(st["step"]))
        # in NumPy, on the host: a few thousand float64 elements through torch's threaded
        # kernels can wait milliseconds for a busy second core

        def host(key: str) -> np.ndarray:
            return flat[key][::stride].detach().to("cpu", torch.float64).numpy() / h.c

        v = host("square_avg")
        with np.errstate(divide="ignore", invalid="ignore"):
            if h.centered:
                m = host("grad_avg")
                v = np.where(v - m * m < 0, 0.0, v - m * m)  # NaN is kept, as in the rule
            d = np.sqrt(v + h.eps) if h.eps_in_sqrt else np.sqrt(v) + h.eps
            return h.lr / d

    @staticmethod
    def _summarize(rows: Tensor, numels: list[int], samples: list[np.ndarray],
                   step: int) -> dict[str, float]:
        n = sum(numels)
        if n == 0:
            nan = float("nan")
            return dict(step=step, grad_rms=nan, update_rms=nan, update_to_param_rms=nan,
                        step_min=nan, step_median=nan, step_max=nan,
                        eps_dominated_fraction=nan)
        sums = rows.sum(dim=0)
        g2, u2, p2 = (float(x) for x in sums[:3])
        sample = np.concatenate([x.reshape(-1) for x in samples]) if samples else np.empty(0)
        return dict(step=step, grad_rms=math.sqrt(g2 / n), update_rms=math.sqrt(u2 / n),
                    update_to_param_rms=math.sqrt(u2 / p2) if p2 > 0 else math.inf,
                    step_min=float(rows[:, 3].min()),
                    step_median=float(np.median(sample)) if sample.size else math.nan,
                    step_max=float(rows[:, 4].max()),
                    eps_dominated_fraction=float(sums[5]) / n)

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
            self._summarize_pending()
        return self._stats
