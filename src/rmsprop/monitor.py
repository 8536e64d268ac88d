"""Training-health warnings from :meth:`rmsprop.torch.RMSprop.stats`.

RMSProp exists because gradients "disappear or expand" as they flow through deep networks; the
optimizer divides by their running RMS, which hides the symptom until the gradient is smaller
than ``eps`` (the step then collapses to ``lr*g/eps``) or the numbers stop being finite.
:class:`Monitor` reads the statistics the optimizer records (``track_stats=True``, or
``"params"`` for one series per named parameter) and says when that happens.

Checks (each series is one param group, or one named parameter with ``track_stats="params"``;
all thresholds are constructor arguments):

========================  ========================================================================
kind                      fires when
========================  ========================================================================
``"vanishing"``           the gradient RMS fell to ``<= vanishing_drop`` (default 1e-3: three
                          orders of magnitude) times its maximum over the last ``window`` updates;
                          or, per parameter, a parameter's gradient RMS is ``<= vanishing_spread``
                          (default 1e-4) times the largest one for ``patience`` updates in a row
                          (the depth signature of vanishing gradients: early layers starve)
``"exploding"``           the gradient RMS is not finite, or grew to ``>= exploding_growth``
                          (default 1e3) times its minimum over the last ``window`` updates
                          (from the ``patience``-th update on; the minimum is raised to
                          ``exploding_floor``, default the optimizer's smallest ``eps``: growth
                          from below eps is recovery from vanishing, not an explosion), or
                          exceeds ``exploding_rms`` (default off)
``"stalled"``             RMS(update) / RMS(param) ``< stall_ratio`` (default 1e-7, below
                          float32's resolution 2^-23 ~ 1.2e-7: such updates are mostly rounded
                          away) for ``patience`` updates in a row (default 5)
``"eps_dominated"``       more than ``eps_fraction`` (default 0.5) of the elements have
                          ``sqrt(v) < eps`` (``v < eps`` with ``eps_in_sqrt``) for ``patience``
                          updates in a row: the optimizer has degenerated to SGD with step
                          ``lr/eps`` there, usually because the gradients vanished
``"skipped"``             the optimizer skipped steps (``nonfinite="skip"``) since the last update
========================  ========================================================================

A warning for the same kind and series is repeated at most once per ``cooldown`` updates
(default ``window``). Each warning is returned by :meth:`Monitor.update`, emitted with
``warnings.warn(..., RmspropHealthWarning)`` (unless ``emit=False``), sent to the logger and
written to TensorBoard as text.

Sinks: ``logger(scalars: dict[str, float], step: int)`` (e.g. ``wandb.log``) receives every
statistic flattened as ``"<prefix>/group<i>/<stat>"`` and ``"<prefix>/param/<name>/<stat>"``;
``tensorboard`` takes a ``torch.utils.tensorboard.SummaryWriter`` (or a log directory, for which
one is created; needs ``pip install tensorboard``).

Usage::

    opt = RMSprop(model.named_parameters(), lr=1e-3, track_stats="params")
    mon = Monitor(opt, window=50, tensorboard="runs/exp1").attach()  # after every step()
    ...
    for w in mon.warnings: print(w)

This module is pure Python; torch is imported only to create a ``SummaryWriter``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Monitor", "HealthWarning", "RmspropHealthWarning", "KINDS"]

KINDS = ("vanishing", "exploding", "stalled", "eps_dominated", "skipped")
_STATS = ("grad_rms", "update_rms", "update_to_param_rms", "step_min", "step_median",
          "step_max", "eps_dominated_fraction")


class RmspropHealthWarning(UserWarning):
    """Category of the warnings :class:`Monitor` emits (filter it with :mod:`warnings`)."""


@dataclass(frozen=True)
class HealthWarning:
    """One finding: ``kind`` (see :data:`KINDS`), the update ``step``, the series it concerns
    (``"group 0"`` or a parameter name), the observed ``value`` and the ``threshold`` it
    crossed, and a one-line ``message``."""

    kind: str
    step: int
    series: str
    value: float
    threshold: float
    message: str = field(compare=False)

    def __str__(self) -> str:
        return self.message


class _Series:
    """The recent history of one group or parameter."""

    def __init__(self, window: int) -> None:
        self.grad: deque[float] = deque(maxlen=window)
        self.stalled = 0
        self.eps = 0
        self.spread = 0


class Monitor:
    """Turn an optimizer's ``stats()`` into health warnings and log them.

    Args:
        optimizer: anything with ``stats()`` returning ``{"groups": [...], "params": {...}}`` as
            :meth:`rmsprop.torch.RMSprop.stats` does (built with ``track_stats=True`` or
            ``"params"``).
        window: number of updates the vanishing/exploding checks look back over.
        vanishing_drop: fire ``"vanishing"`` when grad RMS ``<= vanishing_drop * max`` of the
            window (needs a full window).
        vanishing_spread: fire ``"vanishing"`` when a parameter's grad RMS ``<= vanishing_spread
            * max`` over parameters, ``patience`` times in a row (per-parameter stats only).
        exploding_growth: fire ``"exploding"`` when grad RMS ``>= exploding_growth * min`` of the
            window (from the ``patience``-th update on).
        exploding_floor: the smallest window minimum the growth is measured from (default:
            the smallest ``eps`` of the optimizer's param groups, else 0).
        exploding_rms: optional absolute grad-RMS ceiling for ``"exploding"``.
        stall_ratio: fire ``"stalled"`` when update RMS / param RMS ``< stall_ratio``.
        eps_fraction: fire ``"eps_dominated"`` when the eps-dominated fraction ``> eps_fraction``.
        patience: consecutive updates the stalled / eps / spread conditions must hold.
        cooldown: updates before the same kind fires again for the same series (``window``).
        logger: ``logger(scalars, step)`` called at every update.
        tensorboard: a ``SummaryWriter`` or a log directory.
        prefix: first component of every logged name.
        emit: also ``warnings.warn`` each finding (category :class:`RmspropHealthWarning`).
    """

    def __init__(self, optimizer: Any, *, window: int = 50, vanishing_drop: float = 1e-3,
                 vanishing_spread: float = 1e-4, exploding_growth: float = 1e3,
                 exploding_floor: float | None = None,
                 exploding_rms: float | None = None, stall_ratio: float = 1e-7,
                 eps_fraction: float = 0.5, patience: int = 5, cooldown: int | None = None,
                 logger: Callable[[dict[str, float], int], Any] | None = None,
                 tensorboard: Any = None, prefix: str = "rmsprop", emit: bool = True) -> None:
        if not callable(getattr(optimizer, "stats", None)):
            raise TypeError(f"Monitor needs an optimizer with stats() (rmsprop.torch.RMSprop "
                            f"built with track_stats=True), got {type(optimizer).__name__}")
        if getattr(optimizer, "track_stats", True) is False:
            raise ValueError("the optimizer was built without track_stats: pass "
                             "track_stats=True (or 'params') to RMSprop")
        def whole(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def number(x: Any) -> bool:  # a finite real number, not a bool
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
        if not (whole(window) and window >= 2):
            raise ValueError(f"Invalid window: {window!r} (an int >= 2)")
        if not (whole(patience) and patience >= 1):
            raise ValueError(f"Invalid patience: {patience!r} (an int >= 1)")
        if cooldown is not None and not (whole(cooldown) and cooldown >= 0):
            raise ValueError(f"Invalid cooldown: {cooldown!r} (an int >= 0, or None)")
        for name, value, lo, hi in (("vanishing_drop", vanishing_drop, 0, 1),
                                    ("vanishing_spread", vanishing_spread, 0, 1),
                                    ("eps_fraction", eps_fraction, 0, 1)):
            if not (number(value) and lo < value < hi):
                raise ValueError(f"Invalid {name}: {value!r} (must be in ({lo}, {hi}))")
        if not (number(exploding_growth) and exploding_growth > 1):
            raise ValueError(f"Invalid exploding_growth: {exploding_growth!r} (must be > 1)")
        if not (number(stall_ratio) and stall_ratio >= 0):
            raise ValueError(f"Invalid stall_ratio: {stall_ratio!r} (must be >= 0)")
        if exploding_rms is not None and not (number(exploding_rms) and exploding_rms > 0):
            raise ValueError(f"Invalid exploding_rms: {exploding_rms!r} (must be > 0)")
        if exploding_floor is not None and not (number(exploding_floor)
                                                and exploding_floor >= 0):
            raise ValueError(f"Invalid exploding_floor: {exploding_floor!r} (must be >= 0)")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if not isinstance(emit, bool):
            raise TypeError(f"emit must be True or False, got {emit!r}")
        if logger is not None and not callable(logger):
            raise TypeError("logger must be a callable logger(scalars: dict, step: int)")
        self.optimizer = optimizer
        self.window = window
        self.vanishing_drop = float(vanishing_drop)
        self.vanishing_spread = float(vanishing_spread)
        self.exploding_growth = float(exploding_growth)
        self.exploding_rms = exploding_rms
        if exploding_floor is None:
            eps = [float(g["eps"]) for g in getattr(optimizer, "param_groups", []) if "eps" in g]
            exploding_floor = min(eps, default=0.0)
        self.exploding_floor = float(exploding_floor)
        self.stall_ratio = float(stall_ratio)
        self.eps_fraction = float(eps_fraction)
        self.patience = patience
        self.cooldown = window if cooldown is None else int(cooldown)
        self.logger = logger
        self.prefix = prefix
        self.emit = emit
        self.writer = self._writer(tensorboard)
        self.warnings: list[HealthWarning] = []
        self.updates = 0
        self._series: dict[str, _Series] = {}
        self._last_fired: dict[tuple[str, str], int] = {}
        self._skipped = 0
        self._hook: Any = None

    @staticmethod
    def _writer(tensorboard: Any) -> Any:
        if tensorboard is None or hasattr(tensorboard, "add_scalar"):
            return tensorboard
        if isinstance(tensorboard, (str, os.PathLike)):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("TensorBoard logging needs the tensorboard package: "
                                  f"pip install tensorboard ({e})") from None
            return SummaryWriter(os.fspath(tensorboard))
        raise TypeError("tensorboard must be a SummaryWriter (anything with add_scalar) or a "
                        f"log directory, got {type(tensorboard).__name__}")

    # -- hooking into the optimizer -----------------------------------------------------------

    def attach(self, every: int = 1) -> Monitor:
        """Call :meth:`update` after every ``every``-th ``optimizer.step()`` (a step post-hook;
        a step skipped by ``GradScaler`` or raising never reaches it). Returns ``self``."""
        if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
            raise ValueError(f"Invalid every: {every!r} (an int >= 1)")
        self.detach()
        calls = [0]

        def hook(_opt: Any, _args: Any, _kwargs: Any) -> None:
            calls[0] += 1
            if calls[0] % every == 0:
                self.update()

        self._hook = self.optimizer.register_step_post_hook(hook)
        return self

    def detach(self) -> None:
        """Remove the hook installed by :meth:`attach` (no-op if none)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def close(self) -> None:
        """Detach and flush the TensorBoard writer."""
        self.detach()
        if self.writer is not None and hasattr(self.writer, "flush"):
            self.writer.flush()

    # -- the checks ---------------------------------------------------------------------------

    def update(self, step: int | None = None) -> list[HealthWarning]:
        """Read ``optimizer.stats()``, log it, run the checks; return the new warnings.

        ``step`` labels the logs and warnings; by default the number of :meth:`update` calls.
        Stats of a skipped step are stale (the optimizer changed nothing), so they are logged
        but not added to the history.
        """
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            try:
                if isinstance(step, bool) or int(step) != step:
                    raise ValueError
                step = int(step)
            except (TypeError, ValueError):
                raise ValueError(f"Invalid step: {step!r} (an int, or None)") from None
        stats = self.optimizer.stats() or {}
        self.updates += 1
        step = self.updates if step is None else step
        groups = list(stats.get("groups") or [])
        per_param: Mapping[str, Mapping[str, float]] = stats.get("params") or {}
        if not groups and not per_param:
            return []
        found: list[HealthWarning] = []

        skipped = max((int(g.get("skipped_steps", 0)) for g in groups), default=self._skipped)
        new_skips = skipped - self._skipped
        self._skipped = skipped
        if new_skips > 0:
            found += self._fire("skipped", "optimizer", step, float(skipped), 0.0,
                                f"step {step}: the optimizer skipped {new_skips} step(s) with "
                                f"non-finite gradients ({skipped} in total)")
        else:
            series = {f"group {i}": g for i, g in enumerate(groups)}
            series.update({repr(name): s for name, s in per_param.items()})
            for key, s in series.items():
                found += self._check_series(key, s, step)
            if len(per_param) > 1:
                found += self._check_spread(per_param, step)

        self._log(groups, per_param, step, found)
        for w in found:
            if self.emit:
                warnings.warn(w.message, RmspropHealthWarning, stacklevel=2)
        self.warnings += found
        return found

    def _check_series(self, key: str, s: Mapping[str, float], step: int) -> list[HealthWarning]:
        hist = self._series.setdefault(key, _Series(self.window))
        out: list[HealthWarning] = []
        g = float(s.get("grad_rms", math.nan))
        if all(math.isnan(float(s.get(k, math.nan))) for k in _STATS):
            return out  # no parameter of this series had a gradient: nothing to judge
        if not math.isfinite(g):
            out += self._fire("exploding", key, step, g, math.inf,
                              f"step {step}: exploding gradients in {key}: gradient RMS is {g}")
        else:
            if len(hist.grad) >= self.patience:
                # Below the floor (eps) the step is lr*g/eps and ignores the gradient's size:
                # growth from down there is recovery, not an explosion.
                lo = max(min(hist.grad), self.exploding_floor)
                if g >= self.exploding_growth * lo and g > 0:
                    out += self._fire(
                        "exploding", key, step, g, self.exploding_growth * lo,
                        f"step {step}: exploding gradients in {key}: gradient RMS {g:.3g} is "
                        f"{_ratio(g, lo)} its minimum {lo:.3g} over the last {len(hist.grad)} "
                        f"updates (threshold x{self.exploding_growth:g})")
            if self.exploding_rms is not None and g > self.exploding_rms:
                out += self._fire("exploding", key, step, g, self.exploding_rms,
                                  f"step {step}: exploding gradients in {key}: gradient RMS "
                                  f"{g:.3g} > {self.exploding_rms:g}")
            if len(hist.grad) >= self.window - 1:
                hi = max(hist.grad)
                if hi > 0 and g <= self.vanishing_drop * hi:
                    out += self._fire(
                        "vanishing", key, step, g, self.vanishing_drop * hi,
                        f"step {step}: vanishing gradients in {key}: gradient RMS {g:.3g} fell "
                        f"to {_ratio(g, hi)} its maximum {hi:.3g} within {len(hist.grad) + 1} "
                        f"updates (threshold x{self.vanishing_drop:g})")
            hist.grad.append(g)

        r = float(s.get("update_to_param_rms", math.nan))
        hist.stalled = hist.stalled + 1 if r < self.stall_ratio else 0
        if hist.stalled >= self.patience:
            out += self._fire("stalled", key, step, r, self.stall_ratio,
                              f"step {step}: {key} has stalled: update RMS / param RMS = {r:.3g} "
                              f"< {self.stall_ratio:g} for {hist.stalled} updates")
        e = float(s.get("eps_dominated_fraction", math.nan))
        hist.eps = hist.eps + 1 if e > self.eps_fraction else 0
        if hist.eps >= self.patience:
            out += self._fire("eps_dominated", key, step, e, self.eps_fraction,
                              f"step {step}: eps dominates the denominator of {e:.0%} of the "
                              f"elements of {key} for {hist.eps} updates (threshold "
                              f"{self.eps_fraction:.0%}): the step there is lr*g/eps, as in SGD")
        return out

    def _check_spread(self, per_param: Mapping[str, Mapping[str, float]],
                      step: int) -> list[HealthWarning]:
        rms = {n: float(s["grad_rms"]) for n, s in per_param.items()
               if math.isfinite(float(s.get("grad_rms", math.nan)))}
        if not rms:
            return []
        top_name = max(rms, key=rms.__getitem__)
        top = rms[top_name]
        out: list[HealthWarning] = []
        for name, g in rms.items():
            hist = self._series.setdefault(repr(name), _Series(self.window))
            hist.spread = hist.spread + 1 if top > 0 and g <= self.vanishing_spread * top else 0
            if hist.spread >= self.patience:
                out += self._fire(
                    "vanishing", repr(name), step, g, self.vanishing_spread * top,
                    f"step {step}: vanishing gradients in {name!r}: gradient RMS {g:.3g} is "
                    f"{_ratio(g, top)} that of {top_name!r} ({top:.3g}) for {hist.spread} "
                    f"updates (threshold x{self.vanishing_spread:g})")
        return out

    def _fire(self, kind: str, series: str, step: int, value: float, threshold: float,
              message: str) -> list[HealthWarning]:
        last = self._last_fired.get((kind, series))
        if last is not None and self.updates - last < self.cooldown:
            return []
        self._last_fired[(kind, series)] = self.updates
        return [HealthWarning(kind, step, series, value, threshold, message)]

    # -- sinks --------------------------------------------------------------------------------

    def scalars(self, stats: Mapping[str, Any] | None = None) -> dict[str, float]:
        """The statistics flattened to ``{"<prefix>/group<i>/<stat>": value, ...}`` (and
        ``"<prefix>/param/<name>/<stat>"``), as the logger receives them."""
        stats = self.optimizer.stats() if stats is None else stats
        out: dict[str, float] = {}
        for i, g in enumerate(stats.get("groups") or []):
            for k in (*_STATS, "skipped_steps"):
                if k in g:
                    out[f"{self.prefix}/group{i}/{k}"] = float(g[k])
        for name, s in (stats.get("params") or {}).items():
            for k in _STATS:
                if k in s:
                    out[f"{self.prefix}/param/{name}/{k}"] = float(s[k])
        return out

    def _log(self, groups: list, per_param: Mapping, step: int,
             found: list[HealthWarning]) -> None:
        if self.logger is None and self.writer is None:
            return
        scalars = self.scalars({"groups": groups, "params": per_param})
        scalars[f"{self.prefix}/warnings"] = float(len(found))
        if self.logger is not None:
            self.logger(scalars, step)
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            if found and hasattr(self.writer, "add_text"):
                self.writer.add_text(f"{self.prefix}/health",
                                     "\n\n".join(w.message for w in found), step)


def _ratio(a: float, b: float) -> str:
    """``a/b`` as ``"1e-05x"`` style text."""
    if b == 0:
        return "inf x"
    return f"{a / b:.1e}x"
