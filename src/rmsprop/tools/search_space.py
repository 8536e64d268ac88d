"""The search space of an optimizer, shared by ``rmsprop tune`` and ``rmsprop compare``.

A space is a list of :class:`Param`, each one hyperparameter in the optimizer's own units:

* the learning rate is searched log-uniformly; its grid is the DeepOBS lattice ``10**(k/5)``
  (5 points per decade);
* a decay rate ``rho`` (RMSProp's ``alpha``, Adam's ``beta2``, SGD's ``momentum``) is searched as
  ``1 - rho`` on a log scale (AlgoPerf's ``one_minus_beta1`` convention), grid
  {0.9, 0.95, 0.99, 0.995, 0.999};
* ``eps``, ``weight_decay`` and further decays can be added (:data:`EXTRA_RANGES`).

Random and Sobol points are deterministic functions of ``(seed, point index)`` (:func:`unit_point`),
so ``tune`` and ``compare`` try the same configurations for the same seed, whatever the number of
workers or the order in which they finish.

Nothing here imports Optuna, torch or matplotlib; NumPy / SciPy are imported by the samplers.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "DECAY_NAMES",
    "EXTRA_RANGES",
    "SAMPLERS",
    "Param",
    "SearchSpaceError",
    "build_space",
    "grid_points",
    "parse_range",
    "suggest",
    "unit_point",
]

#: Grid values of ``1 - rho`` for a decay parameter: rho in {0.9, 0.95, 0.99, 0.995, 0.999}
#: (covers Hinton/Keras 0.9 and PyTorch 0.99), intersected with the range.
ONE_MINUS_GRID = (0.1, 0.05, 0.01, 0.005, 0.001)
#: The wider ladder used once a user sets a decay range with ``--range`` (or the standard five
#: would leave fewer than two points).
ONE_MINUS_LADDER = (1.0, 0.5, 0.2, 0.1, 0.05, 0.01, 0.005, 0.001, 0.0005, 0.0001, 0.00001)

#: Parameters searched as ``1 - value`` on a log scale.
DECAY_NAMES = ("alpha", "rho", "decay", "beta2", "beta1", "momentum")

#: Default ranges for parameters added with ``--tune`` when the optimizer's own search space does
#: not list them: ``(scale, low, high)`` in the optimizer's units.
EXTRA_RANGES: dict[str, tuple[str, float, float]] = {
    "momentum": ("log1m", 0.0, 0.99),
    "eps": ("log", 1e-10, 1.0),
    "beta1": ("log1m", 0.5, 0.99),
    "weight_decay": ("log", 1e-6, 1e-1),
}

#: The learning-rate range when an optimizer declares none (log-uniform).
DEFAULT_LR_RANGE = (1e-5, 1.0)

SAMPLERS = ("grid", "random", "sobol")


class SearchSpaceError(ValueError):
    """A search-space input the user can fix (unknown parameter, empty or inverted range...)."""


def sig(x: float, digits: int = 10) -> float:
    """``x`` rounded to ``digits`` significant digits, so grid values print and compare cleanly."""
    return float(f"{x:.{digits}g}")


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched hyperparameter, in the optimizer's own units.

    ``scale``: ``"log"`` (log-uniform in ``[low, high]``), ``"log1m"`` (``1 - value``
    log-uniform in ``[1 - high, 1 - low]``) or ``"linear"`` (uniform). ``per_decade`` sets the
    grid density of a log scale; ``wide_grid`` uses the long ladder of decay values (a range
    the user set). Optuna sees a decay as ``one_minus_<name>`` (:attr:`key`, :meth:`bounds`).
    """

    name: str
    scale: str
    low: float
    high: float
    per_decade: int = 1
    wide_grid: bool = False

    def __post_init__(self) -> None:
        if self.scale not in ("log", "log1m", "linear"):
            raise SearchSpaceError(f"{self.name}: unknown scale {self.scale!r} "
                                   "(log, log1m or linear)")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise SearchSpaceError(f"{self.name}: range bounds must be finite numbers")
        if not self.low < self.high:
            kind = "empty" if self.low == self.high else "inverted"
            raise SearchSpaceError(f"{self.name}: {kind} range [{self.low:g}, {self.high:g}]; "
                                   "need LOW < HIGH")
        if self.scale == "log" and self.low <= 0:
            raise SearchSpaceError(f"{self.name}: a log-scale range needs LOW > 0, "
                                   f"got {self.low:g}")
        if self.scale == "log1m" and not (0 <= self.low and self.high < 1):
            raise SearchSpaceError(f"{self.name}: a decay range must lie in [0, 1), "
                                   f"got [{self.low:g}, {self.high:g}]")

    # -- Optuna units ------------------------------------------------------------------------------
    @property
    def key(self) -> str:
        """The Optuna parameter name (``one_minus_alpha`` for a decay)."""
        return f"one_minus_{self.name}" if self.scale == "log1m" else self.name

    @property
    def log(self) -> bool:
        """Whether Optuna samples :meth:`bounds` on a log scale."""
        return self.scale != "linear"

    def bounds(self) -> tuple[float, float]:
        """The range in Optuna units (``1 - value`` for a decay, ascending)."""
        if self.scale == "log1m":
            return sig(1 - self.high, 12), sig(1 - self.low, 12)
        return self.low, self.high

    def from_unit(self, u: float) -> float:
        """Map ``u`` in [0, 1] to Optuna units (log-uniform or uniform in :meth:`bounds`)."""
        lo, hi = self.bounds()
        if self.scale == "linear":
            return lo + u * (hi - lo)
        return sig(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))), 12)

    def value(self, x: float) -> float:
        """Optuna units -> the hyperparameter's value."""
        return sig(1 - x, 12) if self.scale == "log1m" else float(x)

    def grid(self) -> list[float]:
        """Grid values in Optuna units, ascending."""
        lo, hi = self.bounds()
        if self.scale == "log1m":
            def inside(ladder: Sequence[float]) -> list[float]:
                return [min(max(v, lo), hi) for v in ladder
                        if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)]

            vals = inside(ONE_MINUS_GRID)
            if self.wide_grid or len(vals) < 2:
                vals = inside(ONE_MINUS_LADDER)
        elif self.scale == "log":
            n = self.per_decade
            k0 = math.ceil(math.log10(lo) * n - 1e-9)
            k1 = math.floor(math.log10(hi) * n + 1e-9)
            vals = [min(max(sig(10 ** (k / n)), lo), hi) for k in range(k0, k1 + 1)]
        else:
            vals = [sig(lo + i * (hi - lo) / 4) for i in range(5)]
        if len(vals) < 2:  # a range narrower than one grid step: search its two ends
            vals = [lo, hi]
        return sorted(set(vals))

    def grid_values(self) -> list[float]:
        """Grid values in the optimizer's units, ascending."""
        return sorted(self.value(x) for x in self.grid())

    # -- the optimizer's units -------------------------------------------------------------------
    def at(self, u: float) -> float:
        """The value at position ``u`` in [0, 1] on the parameter's scale (``u=0`` -> ``low``)."""
        if self.scale == "log":
            return math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        if self.scale == "log1m":
            a, b = math.log(1 - self.low), math.log(1 - self.high)
            return 1 - math.exp(a + u * (b - a))
        return self.low + u * (self.high - self.low)

    def position(self, value: float) -> float:
        """Inverse of :meth:`at`: where ``value`` lies in the range, on its scale (0 .. 1)."""
        if self.scale == "log":
            return ((math.log(value) - math.log(self.low))
                    / (math.log(self.high) - math.log(self.low)))
        if self.scale == "log1m":
            a, b = math.log(1 - self.low), math.log(1 - self.high)
            return (math.log(1 - value) - a) / (b - a)
        return (value - self.low) / (self.high - self.low)

    def spaced(self, n: int) -> list[float]:
        """``n`` values evenly spaced on the scale, ``low`` .. ``high`` inclusive (1: middle)."""
        if n < 1:
            raise SearchSpaceError(f"{self.name}: need at least one value, got n={n}")
        if n == 1:
            return [self.at(0.5)]
        return [self.at(i / (n - 1)) for i in range(n)]

    def on_edge(self, value: float, n_trials: int) -> str | None:
        """``"low"`` / ``"high"`` when ``value`` lies in the outermost ``min(1/n_trials, 0.1)``
        of the range on its scale (the best value at the edge: widen the range), else None."""
        u = self.position(value)
        w = min(1.0 / max(n_trials, 1), 0.1)
        if u <= w:
            return "low"
        if u >= 1 - w:
            return "high"
        return None

    def widened(self, side: str) -> tuple[float, float]:
        """The range one step wider on ``side`` (``"low"``/``"high"``), rounded to 3 significant
        digits and kept inside the valid domain (a decay stays in [0, 1), a log scale > 0)."""
        lo, hi = self.low, self.high
        if self.scale == "log":
            return (sig(lo / 10, 3), hi) if side == "low" else (lo, sig(hi * 10, 3))
        if self.scale == "log1m":
            if side == "low":  # ten times more 1 - value; at most 1 (value 0)
                return max(0.0, sig(1 - min(1.0, sig((1 - lo) * 10, 3)), 3)), hi
            return lo, sig(1 - sig((1 - hi) / 10, 3), 12)
        width = hi - lo
        return (sig(lo - width, 6), hi) if side == "low" else (lo, sig(hi + width, 6))

    def describe(self) -> str:
        """One line: name, scale and range."""
        if self.scale == "log1m":
            return (f"{self.name}: 1-{self.name} log-uniform in [{1 - self.high:.3g}, "
                    f"{1 - self.low:.3g}] ({self.name} in [{self.low:g}, {self.high:g}])")
        kind = "log-uniform" if self.scale == "log" else "uniform"
        return f"{self.name}: {kind} in [{self.low:g}, {self.high:g}]"

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict; ``Param(**d)`` rebuilds it."""
        return dataclasses.asdict(self)


def parse_range(text: str) -> tuple[str, float, float]:
    """Parse ``NAME=LOW:HIGH`` (``--range lr=1e-5:1``) into ``(name, low, high)``."""
    name, sep, rest = text.partition("=")
    lo_s, sep2, hi_s = rest.partition(":")
    if not sep or not sep2 or not name.strip():
        hint = " (LOW:HIGH with a colon)" if "," in rest else ""
        raise SearchSpaceError(f"bad --range {text!r}: expected NAME=LOW:HIGH{hint}, "
                               "e.g. lr=1e-5:1")
    try:
        lo, hi = float(lo_s), float(hi_s)
    except ValueError:
        raise SearchSpaceError(f"bad --range {text!r}: LOW and HIGH must be numbers") from None
    return name.strip(), lo, hi


def _scale_for(name: str, declared: str | None) -> str:
    if name in DECAY_NAMES:
        return "log1m"
    if declared in ("log", "log1m", "linear"):
        return declared
    return "log" if declared is None or "log" in str(declared) else "linear"


def _decay_of(spec: Any, declared: dict[str, tuple]) -> str | None:
    """The decay searched beside lr: the first of alpha/rho/decay/beta2/momentum the spec
    declares; else SGD's momentum when it has one (its momentum plays the decay's part)."""
    for cand in ("alpha", "rho", "decay", "beta2", "momentum"):
        if cand in declared:
            return cand
    if "momentum" in (getattr(spec, "defaults", {}) or {}):
        return "momentum"
    return None


def _spec_of(spec: Any) -> Any:
    """``spec`` itself, or the registered optimizer it names; an error for anything else (a
    space built from no spec would silently miss the optimizer's own ranges)."""
    if isinstance(spec, str):
        from rmsprop.tools.problems import optimizers

        try:
            return optimizers.resolve(spec)
        except ValueError as e:
            raise SearchSpaceError(str(e)) from None
    if not (isinstance(getattr(spec, "name", None), str) and hasattr(spec, "search_space")):
        raise SearchSpaceError("spec must be an OptimizerSpec (name, defaults, search_space) or "
                               f"a registered optimizer name, got {spec!r:.60}")
    return spec


def _tunable(spec: Any, declared: dict[str, tuple]) -> list[str]:
    """The names ``--tune`` accepts for ``spec``: those with a range (declared or
    :data:`EXTRA_RANGES`) that the optimizer takes (its defaults, its declared space or
    ``spec.accepts``); any with a range when the spec declares no defaults."""
    defaults = getattr(spec, "defaults", {}) or {}
    takes = {"lr", *declared, *defaults, *(getattr(spec, "accepts", ()) or ())}
    return sorted(n for n in {"lr", *declared, *EXTRA_RANGES} if n in takes or not defaults)


def _names_of(values: str | Sequence[str], what: str) -> list[str]:
    """Comma-separated names from a string or a sequence of strings (as ``--tune`` gives)."""
    items = [values] if isinstance(values, str) else values
    if not isinstance(items, Sequence) or not all(isinstance(v, str) for v in items):
        raise SearchSpaceError(f"{what}: expected names (strings), got {values!r:.60}")
    return [n.strip() for v in items for n in v.split(",") if n.strip()]


def _range_of(r: Any) -> tuple[str, float, float]:
    """``(name, low, high)`` from a tuple or a ``'NAME=LOW:HIGH'`` string."""
    if isinstance(r, str):
        return parse_range(r)
    try:
        name, lo, hi = r
        if isinstance(name, str) and not isinstance(lo, (bool, str)) \
                and not isinstance(hi, (bool, str)):
            return name.strip(), float(lo), float(hi)
    except (TypeError, ValueError):
        pass
    raise SearchSpaceError("ranges: expected (name, low, high) or 'NAME=LOW:HIGH', got "
                           f"{r!r:.60}")


def build_space(spec: Any, extra: str | Sequence[str] = (),
                ranges: str | Sequence[Any] = ()) -> list[Param]:
    """The searched parameters for optimizer ``spec`` (an ``OptimizerSpec``-like object with
    ``name``, ``defaults`` and ``search_space`` entries ``(scale, low, high)``, or a registered
    name).

    Default: ``lr`` and the optimizer's decay (:func:`_decay_of`), so RMSProp, Adam and SGD with
    momentum get the same two-dimensional budget. ``extra`` adds parameters (``momentum``,
    ``eps``..., a list or a comma-separated string); ``ranges`` override ``(name, low, high)``
    (or ``'NAME=LOW:HIGH'``) of searched ones, at most once per name.
    """
    spec = _spec_of(spec)
    declared: dict[str, tuple] = dict(getattr(spec, "search_space", {}) or {})
    names = ["lr"]
    decay = _decay_of(spec, declared)
    if decay is not None:
        names.append(decay)
    tunable = _tunable(spec, declared)
    for name in _names_of(extra, "extra"):
        if name not in tunable:
            raise SearchSpaceError(f"cannot tune {name!r} for optimizer {spec.name!r}; "
                                   f"known: {', '.join(tunable)}")
        if name not in names:
            names.append(name)
    if isinstance(ranges, str):
        ranges = [ranges]
    if not isinstance(ranges, Sequence):
        raise SearchSpaceError(f"ranges: expected a list of (name, low, high), got {ranges!r:.60}")
    overrides: dict[str, tuple[float, float]] = {}
    for n, lo, hi in map(_range_of, ranges):
        if n in overrides:
            raise SearchSpaceError(f"--range {n} is given twice; give one range per name")
        if n not in names:
            raise SearchSpaceError(f"--range {n}: {n!r} is not searched (searched: "
                                   f"{', '.join(names)}; add it with --tune)")
        overrides[n] = (lo, hi)
    space = []
    for name in names:
        if name in declared:
            entry = declared[name]
            declared_scale, lo, hi = entry[0], float(entry[1]), float(entry[2])
        elif name in EXTRA_RANGES:
            declared_scale, lo, hi = EXTRA_RANGES[name]
        else:  # lr with no declared range
            declared_scale, (lo, hi) = "log", DEFAULT_LR_RANGE
        lo, hi = overrides.get(name, (lo, hi))
        space.append(Param(name, _scale_for(name, declared_scale), lo, hi,
                           per_decade=5 if name == "lr" else 1, wide_grid=name in overrides))
    return space


def grid_points(space: Sequence[Param]) -> list[dict[str, float]]:
    """All grid configurations in Optuna units (the first parameter varies slowest)."""
    keys = [p.key for p in space]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(p.grid() for p in space))]


def unit_point(kind: str, seed: int, index: int, dim: int) -> list[float]:
    """Point ``index`` of a ``dim``-dimensional sequence in [0, 1)^dim that depends only on
    ``(kind, seed, index)``: ``"random"`` (NumPy's PCG64 seeded by ``[seed, index]``) or
    ``"sobol"`` (SciPy's scrambled Sobol sequence of ``seed``, point ``index``)."""
    if kind == "sobol":
        from scipy.stats import qmc

        eng = qmc.Sobol(dim, scramble=True, seed=seed)
        if index:
            eng.fast_forward(index)
        return [float(x) for x in eng.random(1)[0]]
    if kind == "random":
        import numpy as np

        return [float(x) for x in np.random.default_rng([seed, index]).random(dim)]
    raise SearchSpaceError(f"unknown point sequence {kind!r}; use 'random' or 'sobol'")


def suggest(spec: Any, n: int, *, sampler: str = "random", seed: int = 0,
            space: Sequence[Param] | None = None) -> list[dict[str, float]]:
    """The first ``n`` configurations (optimizer units) that ``rmsprop tune --sampler SAMPLER
    --seed SEED`` tries for ``spec``: the same space, the same deterministic sequence."""
    if sampler not in ("random", "sobol"):
        raise SearchSpaceError(f"suggest: sampler must be 'random' or 'sobol', got {sampler!r}")
    for arg, v in (("n", n), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise SearchSpaceError(f"suggest: {arg} must be an integer >= 0, got {v!r}")
    params = list(space) if space is not None else build_space(spec)
    return [{p.name: p.value(p.from_unit(u))
             for p, u in zip(params, unit_point(sampler, seed, i, len(params)))}
            for i in range(n)]
