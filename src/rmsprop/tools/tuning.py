"""Hyperparameter search for an optimizer on a problem: grid, random or Sobol search on Optuna.

This is the machinery behind ``rmsprop tune`` (and the tuned runs of ``rmsprop compare``):

* **Search space** (benchmarks protocol §9.2, printed with every result): the learning rate is
  searched log-uniformly (grid: 5 points per decade, the DeepOBS lattice ``10**(k/5)``); a decay
  rate ``rho`` (RMSProp's ``alpha``, Adam's ``beta2``, SGD's ``momentum``) is searched as
  ``1 - rho`` on a log scale (AlgoPerf's ``one_minus_beta1`` convention; grid
  {0.9, 0.95, 0.99, 0.995, 0.999}); momentum and eps can be added.
* **Objective**: the final validation loss (default), or the number of steps until the validation
  loss first reaches ``target`` (censored at ``budget + eval interval`` when never reached). A
  diverged run is a *completed* trial with user attribute ``diverged=True`` and the finite value
  :data:`PENALTY`, so it is counted in every statistic and never dropped.
* **Samplers** are deterministic functions of ``(seed, trial number)``: the same ``--seed`` gives
  the same configurations whatever the number of workers or the order in which they finish.
* **Storage**: any Optuna storage URL; ``journal:PATH`` for a JournalFileBackend shared by local
  processes. Workers loop until the study holds exactly ``trials`` COMPLETE trials; a worker that
  dies mid-trial leaves a RUNNING trial which is marked FAIL (at once when its process is known
  dead on this host, else after the heartbeat grace period) and re-queued with the same
  parameters (:class:`optuna.storages.RetryFailedTrialCallback` semantics).
* **Report**: trial table (CSV), best config (JSON, re-run on fresh seeds), (lr, decay) heat map,
  lr-sensitivity curve, expected best-of-k curve, parameter importances, README.

Everything heavy (optuna, torch, matplotlib) is imported inside functions so that ``rmsprop
--help`` stays fast.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "PENALTY",
    "Param",
    "TuneConfig",
    "TuneError",
    "TuneResult",
    "build_space",
    "expected_best_of_k",
    "run_tune",
    "tune",
]

#: Objective value recorded for a diverged trial: large and finite, so that samplers, importances
#: and CSV readers see a number, while the ``diverged`` user attribute says what happened.
PENALTY = 1e9

#: Grid values of ``1 - rho`` for a decay parameter: rho in {0.9, 0.95, 0.99, 0.995, 0.999}
#: (covers Hinton/Keras 0.9 and PyTorch 0.99), intersected with the range.
ONE_MINUS_GRID = (0.1, 0.05, 0.01, 0.005, 0.001)
#: The wider ladder used once a user sets a decay range with ``--range`` (or the standard five
#: would leave fewer than two points).
ONE_MINUS_LADDER = (1.0, 0.5, 0.2, 0.1, 0.05, 0.01, 0.005, 0.001, 0.0005, 0.0001, 0.00001)

#: Parameters searched as ``1 - value`` on a log scale.
DECAY_NAMES = ("alpha", "rho", "decay", "beta2", "beta1", "momentum")

#: Default ranges for parameters a user may add with ``--tune`` when the optimizer's own search
#: space does not list them (benchmarks protocol §9.2).
EXTRA_RANGES: dict[str, tuple[str, float, float]] = {
    "momentum": ("log1m", 0.0, 0.99),
    "eps": ("log", 1e-10, 1.0),
    "beta1": ("log1m", 0.5, 0.99),
    "weight_decay": ("log", 1e-6, 1e-1),
}

DEFAULT_STORAGE = "sqlite:///rmsprop-tune.db"
SAMPLERS = ("grid", "random", "sobol")
OBJECTIVES = ("loss", "steps")
_ATTR = "rmsprop_tune"  # study user attribute holding the configuration that defines the study


class TuneError(ValueError):
    """An input the user can fix (unknown name, bad range, unreachable storage...)."""


def _sig(x: float, digits: int = 10) -> float:
    """Round to ``digits`` significant digits, so that grid values print and compare cleanly."""
    return float(f"{x:.{digits}g}")


# ----------------------------------------------------------------------------------------------
# Search space
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched hyperparameter, in the optimizer's own units.

    ``scale``: ``"log"`` (log-uniform in ``[low, high]``), ``"log1m"`` (``1 - value`` log-uniform
    in ``[1 - high, 1 - low]``) or ``"linear"`` (uniform). ``per_decade`` sets the grid density
    of a log scale.
    """

    name: str
    scale: str
    low: float
    high: float
    per_decade: int = 1
    wide_grid: bool = False

    def __post_init__(self) -> None:
        if self.scale not in ("log", "log1m", "linear"):
            raise TuneError(f"{self.name}: unknown scale {self.scale!r} (log, log1m or linear)")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise TuneError(f"{self.name}: range bounds must be finite numbers")
        if not self.low < self.high:
            kind = "empty" if self.low == self.high else "inverted"
            raise TuneError(f"{self.name}: {kind} range [{self.low:g}, {self.high:g}]; "
                            "need LOW < HIGH")
        if self.scale == "log" and self.low <= 0:
            raise TuneError(f"{self.name}: a log-scale range needs LOW > 0, got {self.low:g}")
        if self.scale == "log1m" and not (0 <= self.low and self.high < 1):
            raise TuneError(f"{self.name}: a decay range must lie in [0, 1), "
                            f"got [{self.low:g}, {self.high:g}]")

    @property
    def key(self) -> str:
        """The Optuna parameter name (``one_minus_alpha`` for a decay)."""
        return f"one_minus_{self.name}" if self.scale == "log1m" else self.name

    def bounds(self) -> tuple[float, float]:
        """The range in Optuna units."""
        if self.scale == "log1m":
            return _sig(1 - self.high, 12), _sig(1 - self.low, 12)
        return self.low, self.high

    def distribution(self) -> Any:
        import optuna

        lo, hi = self.bounds()
        return optuna.distributions.FloatDistribution(lo, hi, log=self.scale != "linear")

    def from_unit(self, u: float) -> float:
        """Map ``u`` in [0, 1] to Optuna units (log-uniform or uniform)."""
        lo, hi = self.bounds()
        if self.scale == "linear":
            return lo + u * (hi - lo)
        return _sig(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))), 12)

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
            vals = [min(max(_sig(10 ** (k / n)), lo), hi) for k in range(k0, k1 + 1)]
        else:
            vals = [_sig(lo + i * (hi - lo) / 4) for i in range(5)]
        if len(vals) < 2:  # a range narrower than one grid step: search its two ends
            vals = [lo, hi]
        return sorted(set(vals))

    def value(self, x: float) -> float:
        """Optuna units -> hyperparameter value."""
        return _sig(1 - x, 12) if self.scale == "log1m" else float(x)

    def describe(self) -> str:
        if self.scale == "log1m":
            return (f"{self.name}: 1-{self.name} log-uniform in [{1 - self.high:.3g}, "
                    f"{1 - self.low:.3g}] ({self.name} in [{self.low:g}, {self.high:g}])")
        kind = "log-uniform" if self.scale == "log" else "uniform"
        return f"{self.name}: {kind} in [{self.low:g}, {self.high:g}]"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_range(text: str) -> tuple[str, float, float]:
    """Parse ``NAME=LOW:HIGH`` (``--range lr=1e-5:1``)."""
    name, sep, rest = text.partition("=")
    lo_s, sep2, hi_s = rest.partition(":")
    if not sep or not sep2 or not name.strip():
        raise TuneError(f"bad --range {text!r}: expected NAME=LOW:HIGH, e.g. lr=1e-5:1")
    try:
        lo, hi = float(lo_s), float(hi_s)
    except ValueError:
        raise TuneError(f"bad --range {text!r}: LOW and HIGH must be numbers") from None
    return name.strip(), lo, hi


def _scale_for(name: str, declared: str | None) -> str:
    if name in DECAY_NAMES:
        return "log1m"
    if declared in ("log", "log1m", "linear"):
        return declared
    return "log" if declared is None or "log" in str(declared) else "linear"


def build_space(spec: Any, extra: Sequence[str] = (),
                ranges: Sequence[tuple[str, float, float]] = ()) -> list[Param]:
    """The searched parameters for optimizer ``spec`` (an ``OptimizerSpec``).

    Default: ``lr`` and the optimizer's decay (the first of alpha/rho/decay/beta2/momentum found
    in ``spec.search_space``), so RMSProp, Adam and SGD get the same two-dimensional budget.
    ``extra`` adds parameters (``momentum``, ``eps``...); ``ranges`` override ``(name, lo, hi)``.
    """
    declared: dict[str, tuple] = dict(getattr(spec, "search_space", {}) or {})
    names = ["lr"]
    for cand in ("alpha", "rho", "decay", "beta2", "momentum"):
        if cand in declared:
            names.append(cand)
            break
    else:
        # SGD with momentum: its momentum plays the decay's part (same 2-D budget as RMSProp).
        if "momentum" in (getattr(spec, "defaults", {}) or {}):
            names.append("momentum")
    for name in extra:
        name = name.strip()
        if not name:
            continue
        if name not in declared and name not in EXTRA_RANGES:
            known = sorted(set(declared) | set(EXTRA_RANGES))
            raise TuneError(f"cannot tune {name!r} for optimizer {spec.name!r}; "
                            f"known: {', '.join(known)}")
        defaults = getattr(spec, "defaults", {}) or {}
        if name not in declared and defaults and name not in defaults:
            raise TuneError(f"optimizer {spec.name!r} has no hyperparameter {name!r}")
        if name not in names:
            names.append(name)
    overrides = {n: (lo, hi) for n, lo, hi in ranges}
    for n in overrides:
        if n not in names:
            raise TuneError(f"--range {n}: {n!r} is not searched (searched: {', '.join(names)}; "
                            "add it with --tune)")
    space = []
    for name in names:
        if name in declared:
            entry = declared[name]
            declared_scale, lo, hi = entry[0], float(entry[1]), float(entry[2])
        elif name in EXTRA_RANGES:
            declared_scale, lo, hi = EXTRA_RANGES[name]
        else:  # lr with no declared range: the protocol's default
            declared_scale, lo, hi = "log", 1e-5, 1.0
        lo, hi = overrides.get(name, (lo, hi))
        space.append(Param(name, _scale_for(name, declared_scale), lo, hi,
                           per_decade=5 if name == "lr" else 1, wide_grid=name in overrides))
    return space


def grid_points(space: Sequence[Param]) -> list[dict[str, float]]:
    """All grid configurations, in Optuna units (first parameter varies slowest)."""
    import itertools

    keys = [p.key for p in space]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(p.grid() for p in space))]


# ----------------------------------------------------------------------------------------------
# Problems and optimizers
# ----------------------------------------------------------------------------------------------


def _import_path(path: str) -> Any:
    mod, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise TuneError(f"cannot import {path!r}: {e}") from None
    return obj


def resolve_problem(name: str) -> Any:
    """A problem by suite name (``digits-mlp``) or by ``module:attribute`` path."""
    if ":" in name:
        obj = _import_path(name)
        return obj() if isinstance(obj, type) else obj
    from rmsprop.tools import problems

    known = problems.names()
    if name not in known and "-" in name:
        # "digits-mlp" (dataset-model, as in the issue) and "mlp-digits" (the suite's name)
        head, _, tail = name.partition("-")
        if f"{tail}-{head}" in known:
            name = f"{tail}-{head}"
    try:
        return problems.get(name)
    except (KeyError, ValueError, LookupError):
        known = ", ".join(problems.names())
        raise TuneError(f"unknown problem {name!r}; known: {known}") from None


def resolve_optimizer(name: str) -> Any:
    """An ``OptimizerSpec`` by registry name (``rmsprop``, ``adam``...) or ``module:attr``."""
    if ":" in name:
        obj = _import_path(name)
        if hasattr(obj, "factory") and hasattr(obj, "search_space"):
            return obj  # an OptimizerSpec-like object
    from rmsprop.tools.problems import optimizers

    try:
        return optimizers.resolve(name)
    except (KeyError, ValueError, LookupError, ImportError) as e:
        if ":" in name:
            raise TuneError(str(e)) from None
        known = ", ".join(optimizers.OPTIMIZERS)
        raise TuneError(f"unknown optimizer {name!r}; known: {known}, or pkg.module:Class") \
            from None


def _factory(spec: Any, hp: dict[str, float]) -> Callable[[Any], Any]:
    """``params -> optimizer`` with the spec's defaults overridden by ``hp``."""
    if hasattr(spec, "make"):
        return functools.partial(spec.make, **hp)
    return functools.partial(spec.factory, **hp)


@dataclasses.dataclass
class Evaluation:
    """One training run scored for the search."""

    value: float
    diverged: bool
    final_eval_loss: float
    attrs: dict[str, Any]


def evaluate(problem: Any, spec: Any, hp: dict[str, float], *, seed: int, objective: str = "loss",
             target: float | None = None, steps: int | None = None) -> Evaluation:
    """Train with ``spec.factory(params, **hp)`` on ``problem`` and score it on validation.

    ``objective="loss"``: final validation loss. ``objective="steps"``: the first evaluation step
    whose validation loss is ``<= target``; never reached -> ``last step + eval interval``
    (censored, ``reached=False``). A diverged or non-finite run scores :data:`PENALTY`.
    """
    res = problem.run(_factory(spec, hp), seed=seed, steps=steps, split="valid")
    loss = float(res.final_eval_loss)
    diverged = bool(getattr(res, "diverged", False)) or not math.isfinite(loss)
    attrs: dict[str, Any] = {
        "diverged": diverged,
        "final_eval_loss": loss if math.isfinite(loss) else None,
        "seconds_per_step": _finite_or_none(getattr(res, "seconds_per_step", None)),
    }
    metric = _finite_or_none(getattr(res, "final_eval_metric", None))
    if metric is not None:
        attrs["final_eval_metric"] = metric
    if objective == "steps":
        if target is None:
            raise TuneError("--objective steps needs --target (a validation loss to reach)")
        steps_seen = list(getattr(res, "eval_steps", []) or [])
        losses = list(getattr(res, "eval_loss", []) or [])
        hit = next((s for s, v in zip(steps_seen, losses)
                    if math.isfinite(float(v)) and float(v) <= target), None)
        interval = steps_seen[-1] - steps_seen[-2] if len(steps_seen) > 1 else 1
        value = float(hit) if hit is not None else float((steps_seen[-1] if steps_seen else 0)
                                                          + interval)
        attrs["reached"] = hit is not None
        attrs["steps_to_target"] = hit
    else:
        value = loss
    if diverged:
        value = PENALTY
    return Evaluation(value=value, diverged=diverged, final_eval_loss=loss, attrs=attrs)


def _finite_or_none(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


# ----------------------------------------------------------------------------------------------
# Configuration, storage, sampler
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TuneConfig:
    """Everything that defines a tuning run. ``identity()`` is what a resumed study must match."""

    problem: str
    optimizer: str
    space: list[Param]
    sampler: str = "random"
    trials: int | None = None
    seed: int = 0
    study: str | None = None
    storage: str | None = DEFAULT_STORAGE
    jobs: int = 1
    out: str | None = None
    objective: str = "loss"
    target: float | None = None
    steps: int | None = None
    train_seed: int = 0
    confirm_seeds: int = 5
    plots: bool = True
    heartbeat: int = 10
    grace: int = 30
    progress: bool = True

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise TuneError(f"unknown sampler {self.sampler!r}; choose {', '.join(SAMPLERS)}")
        if self.objective not in OBJECTIVES:
            raise TuneError(f"unknown objective {self.objective!r}; choose loss or steps")
        if self.objective == "steps" and self.target is None:
            raise TuneError("--objective steps needs --target (a validation loss to reach)")
        if self.trials is not None and self.trials < 1:
            raise TuneError(f"--trials must be >= 1, got {self.trials}")
        if self.jobs < 1:
            raise TuneError(f"--jobs must be >= 1, got {self.jobs}")
        if self.confirm_seeds < 0:
            raise TuneError("--confirm-seeds must be >= 0")
        if self.heartbeat < 1 or self.grace <= self.heartbeat:
            raise TuneError("need heartbeat >= 1 s and grace > heartbeat")
        if self.study is None:
            self.study = f"{_slug(self.problem)}-{_slug(self.optimizer)}-{self.sampler}"
        self.space = [p if isinstance(p, Param) else Param(**p) for p in self.space]
        if self.sampler == "grid":
            n = len(grid_points(self.space))
            self.trials = n if self.trials is None else min(self.trials, n)
        elif self.trials is None:
            self.trials = 16

    def identity(self) -> dict[str, Any]:
        return {
            "problem": self.problem, "optimizer": self.optimizer, "sampler": self.sampler,
            "seed": self.seed, "objective": self.objective, "target": self.target,
            "steps": self.steps, "train_seed": self.train_seed,
            "space": [p.to_json() for p in self.space],
        }

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["space"] = [p.to_json() for p in self.space]
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "TuneConfig":
        return cls(**json.loads(text))


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.split(":")[-1])


def is_journal(url: str) -> bool:
    return url.startswith("journal:")


def _journal_path(url: str) -> str:
    path = url[len("journal:"):]
    if path.startswith("///"):
        path = path[2:]
    elif path.startswith("//"):
        path = path[2:]
    return path


def make_storage(url: str | None, *, heartbeat: int = 10, grace: int = 30) -> Any:
    """An Optuna storage for ``url``; raises :class:`TuneError` when it cannot be reached.

    ``None`` -> in memory (one process); ``journal:PATH`` -> JournalStorage on a
    JournalFileBackend; anything else -> RDBStorage (SQLite, PostgreSQL, MySQL...) with a
    heartbeat, so a killed worker's trial is failed after ``grace`` seconds and re-queued.
    """
    import optuna
    from optuna.storages import RDBStorage

    _quiet_optuna()
    if url is None:
        return optuna.storages.InMemoryStorage()
    if is_journal(url):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = _journal_path(url)
        if not path:
            raise TuneError("journal storage needs a path: journal:/path/to/study.log")
        parent = Path(path).resolve().parent
        if not parent.is_dir():
            raise TuneError(f"cannot open journal {path!r}: directory {parent} does not exist")
        try:
            return JournalStorage(JournalFileBackend(path))
        except OSError as e:
            raise TuneError(f"cannot open journal {path!r}: {e}") from None
    if "://" not in url:
        raise TuneError(f"bad storage URL {url!r}: expected e.g. sqlite:///tune.db, "
                        "postgresql+psycopg2://user@host/db or journal:/path/file.log")
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        try:
            db = make_url(url).database or ""
        except Exception as e:
            raise TuneError(f"bad storage URL {url!r}: {e}") from None
        if db and db != ":memory:":
            if not Path(db).resolve().parent.is_dir():
                raise TuneError(f"cannot open {url!r}: directory {Path(db).resolve().parent} "
                                "does not exist")
            engine_kwargs["creator"] = functools.partial(_sqlite_connect, db)
        else:
            engine_kwargs["connect_args"] = {"timeout": 60}
    elif url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
        engine_kwargs["pool_pre_ping"] = True
    callback_kw = "failed_trial_callback"
    import inspect

    if "heartbeat_stale_trial_callback" in inspect.signature(RDBStorage.__init__).parameters:
        callback_kw = "heartbeat_stale_trial_callback"  # the newer name (Optuna >= 4.9)
    for attempt in range(6):
        try:
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                              grace_period=grace, **{callback_kw: _retry_callback()})
        except Exception as e:  # sqlalchemy raises many types; all mean "cannot use this URL"
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            # Workers started together on a fresh database race to create Optuna's tables;
            # the loser sees a duplicate-key/already-exists error and only has to retry.
            if attempt < 5 and any(k in msg for k in ("duplicate key", "already exists",
                                                      "UniqueViolation", "database is locked")):
                time.sleep(0.2 + 0.3 * attempt)
                continue
            raise TuneError(f"cannot open storage {_redact(url)}: {msg}") from None
    raise AssertionError("unreachable")


def _sqlite_connect(path: str) -> Any:
    """A SQLite connection in WAL mode with ``synchronous=NORMAL``.

    Optuna commits several times per trial; with the default rollback journal every commit is
    an fsync, which costs seconds per trial on a busy disk. WAL keeps every committed trial
    through a killed process (only an OS crash may drop the last commits) and lets readers
    (progress bar, dashboard) work while a worker writes. Several local workers wait up to 60 s
    for the lock instead of failing.
    """
    import sqlite3

    conn = sqlite3.connect(path, timeout=60, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _quiet_optuna() -> None:
    """Heartbeats and retries are 'experimental' in Optuna: keep those notices off the terminal."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*RetryFailedTrial")


def _retry_callback() -> Any:
    """Re-queues a failed trial's parameters (unbounded retries: no point may be lost)."""
    import optuna.storages as st

    _quiet_optuna()
    cls = getattr(st, "RetryHeartbeatStaleTrialCallback", None) or st.RetryFailedTrialCallback
    return cls(max_retry=None)


def _redact(url: str) -> str:
    """Hide a password in a URL before printing it."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        if ":" in cred:
            return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}"
    return url


class _DeterministicSampler:
    """Random or scrambled-Sobol points that depend only on ``(seed, trial.number)``.

    Optuna's own RandomSampler/QMCSampler draw from per-process state, so K workers started
    with the same seed would propose the same points, and a resumed study would not replay the
    same sequence; indexing by trial number fixes both.
    """

    def __init__(self, kind: str, seed: int, space: Sequence[Param]) -> None:
        self.kind, self.seed, self.space = kind, int(seed), list(space)
        self._cache: dict[int, list[float]] = {}

    def unit_point(self, number: int) -> list[float]:
        if number not in self._cache:
            d = len(self.space)
            if self.kind == "sobol":
                from scipy.stats import qmc

                eng = qmc.Sobol(d, scramble=True, seed=self.seed)
                if number:
                    eng.fast_forward(number)
                u = [float(x) for x in eng.random(1)[0]]
            else:
                import numpy as np

                u = [float(x) for x in np.random.default_rng([self.seed, number]).random(d)]
            self._cache = {number: u}  # one trial at a time per process
        return self._cache[number]

    def make(self) -> Any:
        import optuna

        outer = self

        class Sampler(optuna.samplers.BaseSampler):
            def infer_relative_search_space(self, study, trial):  # noqa: ANN001, ANN201
                return {}

            def sample_relative(self, study, trial, search_space):  # noqa: ANN001, ANN201
                return {}

            def sample_independent(self, study, trial, name, dist):  # noqa: ANN001, ANN201
                keys = [p.key for p in outer.space]
                if name not in keys:
                    raise RuntimeError(f"parameter {name!r} is not in the search space")
                i = keys.index(name)
                return outer.space[i].from_unit(outer.unit_point(trial.number)[i])

        return Sampler()


def suggest(spec: Any, n: int, *, sampler: str = "random", seed: int = 0) -> list[dict[str, float]]:
    """The first ``n`` configurations (in the optimizer's units) that ``rmsprop tune
    --sampler SAMPLER --seed SEED`` tries for this optimizer: the same search space and the
    same deterministic random or Sobol sequence. ``rmsprop compare`` tunes with these."""
    if sampler not in ("random", "sobol"):
        raise TuneError(f"suggest: sampler must be 'random' or 'sobol', got {sampler!r}")
    space = build_space(spec)
    draw = _DeterministicSampler(sampler, seed, space)
    return [{p.name: p.value(p.from_unit(u)) for p, u in zip(space, draw.unit_point(i))}
            for i in range(n)]


def make_sampler(cfg: TuneConfig) -> Any:
    import optuna

    if cfg.sampler == "grid":
        return optuna.samplers.GridSampler({p.key: p.grid() for p in cfg.space}, seed=cfg.seed)
    return _DeterministicSampler(cfg.sampler, cfg.seed, cfg.space).make()


def open_study(cfg: TuneConfig, storage: Any = None, *, create: bool = True) -> Any:
    """Create or load ``cfg.study``; refuse a study created with a different configuration."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage is None:
        storage = make_storage(cfg.storage, heartbeat=cfg.heartbeat, grace=cfg.grace)
    sampler = make_sampler(cfg)
    try:
        study = optuna.load_study(study_name=cfg.study, storage=storage, sampler=sampler)
        existing = study.user_attrs.get(_ATTR)
    except KeyError:
        if not create:
            raise TuneError(f"no study {cfg.study!r} in {_redact(str(cfg.storage))}") from None
        study = optuna.create_study(study_name=cfg.study, storage=storage, sampler=sampler,
                                    direction="minimize", load_if_exists=True)
        existing = study.user_attrs.get(_ATTR)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TuneError(f"cannot open study {cfg.study!r}: {msg}") from None
    want = json.loads(json.dumps(cfg.identity()))
    if existing is None:
        study.set_user_attr(_ATTR, want)
    elif existing != want:
        diff = [k for k in want if existing.get(k) != want[k]]
        raise TuneError(f"study {cfg.study!r} exists with a different {', '.join(diff)}; "
                        "resume it with the same options or pick another --study")
    return study


# ----------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


_HOST = f"{socket.gethostname()}/{_boot_id()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _counts(study: Any) -> dict[str, int]:
    from optuna.trial import TrialState

    out = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] += 1
    return out


def reap_stale(study: Any, grace: float) -> list[int]:
    """Fail RUNNING trials whose worker is gone, re-queue their parameters; return numbers.

    A trial whose worker ran on this host (same boot) and whose process no longer exists is
    failed at once. Others rely on the heartbeat: Optuna's for RDB storages, ours (a system
    attribute refreshed every ``heartbeat`` seconds) for journal files.
    """
    import optuna
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
    from optuna.trial import TrialState

    storage = study._storage
    if isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(study)  # runs the retry callback itself
    now = time.time()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, pid = (t.system_attrs.get("rmsprop:worker") or [None, None])[:2]
        beat = t.system_attrs.get("rmsprop:heartbeat")
        dead = host == _HOST and isinstance(pid, int) and not _pid_alive(pid)
        if not dead and beat is not None and not isinstance(storage, BaseHeartbeat):
            dead = now - float(beat) > grace
        if not dead:
            continue
        try:
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            continue  # another worker got there first
        fresh = storage.get_trial(t._trial_id)
        if fresh.state == TrialState.FAIL:
            _retry_callback()(study, fresh)
            failed.append(t.number)
    return failed


class _Surplus(Exception):
    """Raised when racing workers started more trials than the study still needs."""


class _TrialError(Exception):
    """A training run raised: the trial is FAIL, its parameters are re-queued, the run stops."""

    def __init__(self, trial_id: int, number: int, error: BaseException) -> None:
        first = (str(error).strip().splitlines() or [""])[0]
        super().__init__(f"{type(error).__name__}: {first}")
        self.trial_id, self.number = trial_id, number


def run_worker(cfg: TuneConfig, *, storage: Any = None,
               on_trial: Callable[[int], None] | None = None,
               stop: threading.Event | None = None) -> int:
    """Run trials of ``cfg.study`` until it holds ``cfg.trials`` COMPLETE trials.

    Safe to run in several processes (or machines) at once. Returns the number of trials this
    worker completed.
    """
    import optuna
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.trial import TrialState

    problem = resolve_problem(cfg.problem)
    spec = resolve_optimizer(cfg.optimizer)
    _limit_threads(cfg.jobs)
    study = open_study(cfg, storage)
    own_beat = not isinstance(study._storage, BaseHeartbeat)
    target_n = int(cfg.trials or 0)
    done_here = 0
    poll = min(1.0, cfg.heartbeat / 2)

    def objective(trial: Any) -> float:
        st = study._storage
        st.set_trial_system_attr(trial._trial_id, "rmsprop:worker", [_HOST, os.getpid()])
        hp = {p.name: p.value(trial.suggest_float(p.key, *p.bounds(),
                                                  log=p.scale != "linear"))
              for p in cfg.space}
        # Trials are ranked by number: this one runs only if the study needs it after every
        # COMPLETE trial and every RUNNING trial that started before it.
        ahead = 0
        for t in study.get_trials(deepcopy=False,
                                  states=(TrialState.COMPLETE, TrialState.RUNNING)):
            if t.state == TrialState.COMPLETE or t.number < trial.number:
                ahead += 1
        if ahead >= target_n:
            trial.set_user_attr("surplus", True)
            raise _Surplus
        trial.set_user_attr("hp", hp)
        beat_stop = threading.Event()
        beater = None
        if own_beat:
            def beat() -> None:
                while True:
                    try:
                        st.set_trial_system_attr(trial._trial_id, "rmsprop:heartbeat",
                                                 time.time())
                    except Exception:  # the trial was finished meanwhile
                        return
                    if beat_stop.wait(cfg.heartbeat):
                        return

            beater = threading.Thread(target=beat, daemon=True)
            beater.start()
        try:
            ev = evaluate(problem, spec, hp, seed=cfg.train_seed, objective=cfg.objective,
                          target=cfg.target, steps=cfg.steps)
        except Exception as e:
            msg = (str(e).strip().splitlines() or [""])[0]
            trial.set_user_attr("error", f"{type(e).__name__}: {msg}")
            raise _TrialError(trial._trial_id, trial.number, e) from e
        finally:
            beat_stop.set()
            if beater is not None:
                beater.join()
        # Each attribute is one storage write (one SQLite commit): keep the count small.
        trial.set_user_attr("diverged", ev.diverged)
        trial.set_user_attr("run", {k: v for k, v in ev.attrs.items() if k != "diverged"})
        return ev.value

    def after(study_: Any, frozen: Any) -> None:
        nonlocal done_here
        if frozen.state == TrialState.FAIL and frozen.user_attrs.get("surplus"):
            # Give the point back to the queue: a grid point must not be lost.
            _retry_callback()(study_, frozen)
        elif frozen.state == TrialState.COMPLETE:
            done_here += 1
            if on_trial is not None:
                on_trial(frozen.number)

    while stop is None or not stop.is_set():
        reap_stale(study, cfg.grace)
        counts = _counts(study)
        if counts["COMPLETE"] >= target_n:
            break
        if counts["COMPLETE"] + counts["RUNNING"] >= target_n:
            time.sleep(poll)  # other workers hold the last trials: wait to see them end
            continue
        if cfg.sampler == "grid" and counts["WAITING"] == 0 and not _unvisited_grid(study, cfg):
            break  # every grid point is complete
        try:
            study.optimize(objective, n_trials=1, catch=(_Surplus,), callbacks=[after])
        except _TrialError as e:
            # Re-queue the point so a resumed run retries it (a grid keeps no hole), then stop:
            # an error that is not divergence needs a look, not thousands of failed trials.
            _retry_callback()(study, study._storage.get_trial(e.trial_id))
            raise TuneError(f"trial {e.number} failed: {e} (parameters re-queued; fix the "
                            "cause and re-run the same command to resume)") from None
    return done_here


def _limit_threads(jobs: int) -> None:
    """Small models train fastest on one thread per worker; extra threads only contend."""
    n = max(1, (os.cpu_count() or 1) // max(jobs, 1) // 2)
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(max(1, min(torch.get_num_threads(), n)))
    else:  # read by torch when a problem first imports it
        os.environ.setdefault("OMP_NUM_THREADS", str(n))


def _unvisited_grid(study: Any, cfg: TuneConfig) -> bool:
    from optuna.trial import TrialState

    done = set()
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        done.add(tuple(sorted(t.params.items())))
    return any(tuple(sorted(p.items())) not in done for p in grid_points(cfg.space))


def _worker_main(argv: Sequence[str]) -> int:
    """Entry point of a worker subprocess: ``python -m rmsprop.tools.tuning --worker CONFIG_JSON``."""
    cfg = TuneConfig.from_json(argv[1])
    try:
        run_worker(cfg)
    except TuneError as e:
        print(f"rmsprop tune worker: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


# ----------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TuneResult:
    """What a search found. ``best_hp`` is in the optimizer's units."""

    study_name: str
    best_hp: dict[str, float]
    best_value: float
    best_trial: int
    confirm: dict[str, Any]
    edges: list[str]
    trials: list[dict[str, Any]]
    space: list[Param]
    summary: dict[str, Any]


def tune(problem: str, optimizer: str, *, sampler: str = "random", trials: int | None = 16,
         seed: int = 0, extra: Sequence[str] = (), ranges: Sequence[tuple[str, float, float]] = (),
         storage: str | None = None, study: str | None = None, confirm_seeds: int = 0,
         train_seed: int = 0, steps: int | None = None, out: str | None = None,
         progress: bool = False) -> TuneResult:
    """Programmatic tuning (used by ``rmsprop compare``): in memory unless ``storage`` is given."""
    spec = resolve_optimizer(optimizer)
    cfg = TuneConfig(problem=problem, optimizer=optimizer, space=build_space(spec, extra, ranges),
                     sampler=sampler, trials=trials, seed=seed, study=study, storage=storage,
                     confirm_seeds=confirm_seeds, train_seed=train_seed, steps=steps, out=out,
                     progress=progress)
    return run_tune(cfg)


def run_tune(cfg: TuneConfig, log: Callable[[str], None] | None = None) -> TuneResult:
    """Run (or resume) the study with ``cfg.jobs`` workers, confirm the best, write the report."""
    log = log or (lambda s: None)
    problem = resolve_problem(cfg.problem)  # fail fast on bad names, before touching storage
    spec = resolve_optimizer(cfg.optimizer)
    _limit_threads(cfg.jobs)
    storage = make_storage(cfg.storage, heartbeat=cfg.heartbeat, grace=cfg.grace)
    if cfg.jobs > 1 and cfg.storage is None:
        raise TuneError("--jobs > 1 needs a shared --storage (sqlite, journal or postgresql)")
    study = open_study(cfg, storage)
    target_n = int(cfg.trials or 0)
    reap_stale(study, cfg.grace)
    start = _counts(study)["COMPLETE"]
    if start:
        log(f"resuming study {cfg.study!r}: {start} of {target_n} trials already complete")
    bar = _progress(cfg, target_n, start)
    try:
        if cfg.jobs == 1:
            run_worker(cfg, storage=storage, on_trial=lambda _n: bar.update(1))
        else:
            _run_processes(cfg, study, bar)
    finally:
        bar.close()
    counts = _counts(study)
    if counts["COMPLETE"] < target_n:
        raise TuneError(f"study {cfg.study!r} holds {counts['COMPLETE']} of {target_n} complete "
                        "trials: a worker stopped early (see the worker logs)")
    result = _summarize(cfg, study, problem, spec, log)
    if cfg.out:
        write_report(cfg, study, result)
    return result


def _progress(cfg: TuneConfig, total: int, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"tune {cfg.study}", unit="trial",
                disable=not cfg.progress, dynamic_ncols=True, file=sys.stderr,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, "
                           "{rate_fmt}]")


def _run_processes(cfg: TuneConfig, study: Any, bar: Any) -> None:
    logdir = Path(cfg.out) if cfg.out else Path.cwd()
    logdir.mkdir(parents=True, exist_ok=True)
    wcfg = dataclasses.replace(cfg, jobs=1, progress=False)
    procs, logs = [], []
    env = dict(os.environ)
    # Each worker is one process; keep torch from oversubscribing the cores between them.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.jobs // 2)))
    for i in range(cfg.jobs):
        f = open(logdir / f"worker-{i}.log", "w")
        logs.append(f)
        procs.append(subprocess.Popen([sys.executable, "-m", "rmsprop.tools.tuning", "--worker",
                                       wcfg.to_json()], stdout=f, stderr=subprocess.STDOUT,
                                      env=env))
    try:
        while any(p.poll() is None for p in procs):
            n = _counts(study)["COMPLETE"]
            if n > bar.n:
                bar.update(n - bar.n)
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()
    n = _counts(study)["COMPLETE"]
    if n > bar.n:
        bar.update(n - bar.n)
    bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode]
    if bad and n < (cfg.trials or 0):
        i, rc = bad[0]
        tail = (logdir / f"worker-{i}.log").read_text().strip().splitlines()[-1:] or [""]
        raise TuneError(f"worker {i} exited with status {rc}: {tail[0]}")


# ----------------------------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------------------------


def trial_rows(study: Any, space: Sequence[Param]) -> list[dict[str, Any]]:
    """One dict per trial (all states), hyperparameters in the optimizer's units."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"number": t.number, "state": t.state.name,
                               "value": t.value if t.values else None}
        for p in space:
            row[p.name] = p.value(t.params[p.key]) if p.key in t.params else None
        run = t.user_attrs.get("run") or {}
        row["diverged"] = t.user_attrs.get("diverged")
        for k in ("final_eval_loss", "final_eval_metric", "steps_to_target", "reached",
                  "seconds_per_step"):
            row[k] = run.get(k)
        row["retry_of"] = t.system_attrs.get("failed_trial")
        row["surplus"] = bool(t.user_attrs.get("surplus", False))
        row["duration_s"] = (t.duration.total_seconds() if t.duration is not None else None)
        rows.append(row)
    return rows


def expected_best_of_k(values: Sequence[float], ks: Iterable[int]) -> list[dict[str, float]]:
    """Distribution of the best (minimum) of ``k`` trials drawn with replacement from ``values``.

    Dodge et al. (2019), "Show your work": with sorted ``v_1 <= ... <= v_n``,
    ``P(min_k = v_i) = ((n - i + 1)/n)^k - ((n - i)/n)^k`` and ``E[min_k] = sum_i v_i P_i``.
    Also returns the median and the 10/90 % quantiles of ``min_k``
    (``P(min_k <= v_i) = 1 - ((n - i)/n)^k``), which stay meaningful when diverged trials carry
    the :data:`PENALTY`.
    """
    v = sorted(float(x) for x in values)
    n = len(v)
    out = []
    for k in ks:
        probs = [((n - i) / n) ** k - ((n - i - 1) / n) ** k for i in range(n)]
        mean = sum(p * x for p, x in zip(probs, v))
        cdf, acc, q = [], 0.0, {}
        for p in probs:
            acc += p
            cdf.append(acc)
        for name, level in (("q10", 0.1), ("median", 0.5), ("q90", 0.9)):
            q[name] = next(x for x, c in zip(v, cdf) if c >= level - 1e-12)
        out.append({"k": k, "mean": mean, **q})
    return out


def good_region(rows: Sequence[dict[str, Any]], space: Sequence[Param], best: float,
                deltas: Sequence[float] = (0.02, 0.1, 0.5)) -> dict[str, Any]:
    """How wide the good region is: configs within ``delta`` (relative) of the best value.

    ``fraction``: share of completed configs within ``best * (1 + delta)``; ``lr_decades``: the
    width ``log10(lr_max / lr_min)`` of the good learning rates (DeepOBS-style good band), per
    delta.
    """
    done = [r for r in rows if r["state"] == "COMPLETE"]
    res: dict[str, Any] = {}
    for d in deltas:
        good = [r for r in done if not r["diverged"] and r["value"] <= best * (1 + d)]
        entry: dict[str, Any] = {"fraction": len(good) / len(done) if done else 0.0,
                                 "count": len(good)}
        if good and "lr" in good[0]:
            lrs = [r["lr"] for r in good]
            entry["lr_min"], entry["lr_max"] = min(lrs), max(lrs)
            entry["lr_decades"] = math.log10(max(lrs) / min(lrs))
        decay = next((p for p in space if p.scale == "log1m"), None)
        if good and decay is not None:
            vals = [r[decay.name] for r in good]
            entry[f"{decay.name}_values"] = sorted(set(vals))
        res[f"{d:g}"] = entry
    return res


def _edge_flags(cfg: TuneConfig, best_hp: dict[str, float]) -> list[str]:
    flags = []
    for p in cfg.space:
        v = best_hp[p.name]
        if cfg.sampler == "grid":
            g = [p.value(x) for x in p.grid()]
            lo_edge, hi_edge = v <= min(g), v >= max(g)
        else:  # within the outer 5 % of the (log) range
            lo_b, hi_b = p.bounds()
            x = 1 - v if p.scale == "log1m" else v
            f = ((math.log(x) - math.log(lo_b)) / (math.log(hi_b) - math.log(lo_b))
                 if p.scale != "linear" else (x - lo_b) / (hi_b - lo_b))
            if p.scale == "log1m":
                f = 1 - f
            lo_edge, hi_edge = f <= 0.05, f >= 0.95
        if not (lo_edge or hi_edge):
            continue
        side = "lower" if lo_edge else "upper"
        wide = [p.value(x) for x in dataclasses.replace(p, wide_grid=True).grid()]
        extra = ""
        if cfg.sampler == "grid" and ((lo_edge and min(wide) < v) or (hi_edge and max(wide) > v)):
            lo, hi = p.low, p.high  # the range already goes further than the standard grid
            more = [x for x in wide if (x < v if lo_edge else x > v)]
            extra = " (adds grid values " + ", ".join(f"{x:g}" for x in more) + ")"
        elif p.scale == "log":
            lo, hi = (p.low / 10, p.high) if lo_edge else (p.low, p.high * 10)
        elif p.scale == "log1m":
            lo, hi = (max(0.0, 1 - (1 - p.low) * 10), p.high) if lo_edge else (
                p.low, 1 - (1 - p.high) / 10)
        else:
            width = p.high - p.low
            lo, hi = (p.low - width, p.high) if lo_edge else (p.low, p.high + width)
        flags.append(f"best {p.name}={v:g} is at the {side} edge of [{p.low:g}, {p.high:g}]: "
                     f"widen the range, e.g. --range {p.name}={lo:g}:{hi:g}{extra}")
    return flags


def _summarize(cfg: TuneConfig, study: Any, problem: Any, spec: Any,
               log: Callable[[str], None]) -> TuneResult:
    import statistics

    rows = trial_rows(study, cfg.space)
    done = [r for r in rows if r["state"] == "COMPLETE"]
    ok = [r for r in done if not r["diverged"]]
    if not ok:
        raise TuneError(f"all {len(done)} completed trials diverged: lower the lr range "
                        "(--range lr=LOW:HIGH)")
    best_row = min(ok, key=lambda r: (r["value"], r["number"]))
    best_hp = {p.name: best_row[p.name] for p in cfg.space}
    runner_up = sorted(r["value"] for r in ok)[1] if len(ok) > 1 else None
    confirm: dict[str, Any] = {"seeds": [], "values": [], "test_loss": [], "diverged": 0}
    if cfg.confirm_seeds:
        from tqdm.auto import tqdm

        seeds = [cfg.train_seed + 1 + i for i in range(cfg.confirm_seeds)]
        for s in tqdm(seeds, desc="confirm best on fresh seeds", unit="seed",
                      disable=not cfg.progress, file=sys.stderr):
            res = problem.run(_factory(spec, best_hp), seed=s, steps=cfg.steps, split="valid")
            ev = evaluate(_Replay(res), spec, best_hp, seed=s, objective=cfg.objective,
                          target=cfg.target)
            confirm["seeds"].append(s)
            confirm["values"].append(ev.value)
            confirm["diverged"] += int(ev.diverged)
            confirm["test_loss"].append(_finite_or_none(getattr(res, "test_loss", None)))
        vals = confirm["values"]
        confirm["median"] = statistics.median(vals)
        confirm["mean"] = statistics.fmean(vals)
        confirm["std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        tests = [x for x in confirm["test_loss"] if x is not None]
        confirm["test_loss_median"] = statistics.median(tests) if tests else None
        if runner_up is not None:
            # Selection picks the luckiest draw; if fresh seeds land behind the runner-up's
            # tuning value, the top configurations are not distinguishable at this budget.
            confirm["beats_runner_up"] = confirm["median"] <= runner_up
    summary = {
        "complete": len(done), "diverged": len(done) - len(ok),
        "failed": sum(r["state"] == "FAIL" for r in rows),
        "good_region": good_region(rows, cfg.space, best_row["value"]),
        "runner_up_value": runner_up,
    }
    return TuneResult(study_name=str(cfg.study), best_hp=best_hp, best_value=best_row["value"],
                      best_trial=best_row["number"], confirm=confirm,
                      edges=_edge_flags(cfg, best_hp), trials=rows, space=list(cfg.space),
                      summary=summary)


class _Replay:
    """Wraps an already computed RunResult so :func:`evaluate` can score it again."""

    def __init__(self, res: Any) -> None:
        self.res = res

    def run(self, *_a: Any, **_k: Any) -> Any:
        return self.res


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def write_report(cfg: TuneConfig, study: Any, result: TuneResult) -> Path:
    """Write the report files into ``cfg.out`` and return its path."""
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    rows = result.trials
    cols = list(rows[0]) if rows else []
    with open(out / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    values = [r["value"] for r in rows if r["state"] == "COMPLETE"]
    bok = expected_best_of_k(values, range(1, len(values) + 1)) if values else []
    with open(out / "best_of_k.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["k", "mean", "q10", "median", "q90"])
        w.writeheader()
        w.writerows(bok)
    importances, imp_note = (_importances(study, cfg) if cfg.plots
                             else (None, "skipped (--no-plots)"))
    best = {
        "study": result.study_name, "problem": cfg.problem, "optimizer": cfg.optimizer,
        "sampler": cfg.sampler, "seed": cfg.seed, "objective": cfg.objective,
        "target": cfg.target, "train_seed": cfg.train_seed,
        "search_space": [p.describe() for p in cfg.space],
        "best_trial": result.best_trial, "best_value": result.best_value,
        "best_hp": result.best_hp, "confirm": result.confirm, "edge_flags": result.edges,
        "summary": result.summary, "importances": importances, "importances_note": imp_note,
        "storage": _redact(str(cfg.storage)) if cfg.storage else None,
    }
    (out / "best.json").write_text(json.dumps(best, indent=2) + "\n")
    if cfg.plots:
        _plots(cfg, result, bok, out)
    (out / "README.md").write_text(_readme(cfg, result, importances, imp_note))
    return out


def _importances(study: Any, cfg: TuneConfig) -> tuple[dict[str, float] | None, str]:
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(cfg.space) < 2:
        return None, "only one parameter searched: importances are not defined"
    if len(complete) < 8:
        return None, f"too few completed trials ({len(complete)} < 8) for importances"
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(study)
        return {k: float(v) for k, v in imp.items()}, "Optuna PED-ANOVA (default evaluator)"
    except Exception as e:  # an evaluator may reject degenerate studies (all values equal...)
        return None, f"importances unavailable: {type(e).__name__}: {e}"


def _plots(cfg: TuneConfig, result: TuneResult, bok: list[dict[str, float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in result.trials if r["state"] == "COMPLETE"]
    lr_p = next((p for p in cfg.space if p.name == "lr"), cfg.space[0])
    dec_p = next((p for p in cfg.space if p.scale == "log1m" and p is not lr_p), None)
    label = "final validation loss" if cfg.objective == "loss" else "steps to target"
    best_v = result.best_value

    # (lr, decay) heat map: grid -> cells (min over other parameters); else a scatter.
    if dec_p is not None:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        lrs = sorted({r[lr_p.name] for r in rows})
        decs = sorted({r[dec_p.name] for r in rows})
        if cfg.sampler == "grid":
            z = np.full((len(decs), len(lrs)), np.nan)
            div = np.zeros_like(z, dtype=bool)
            for r in rows:
                i, j = decs.index(r[dec_p.name]), lrs.index(r[lr_p.name])
                if r["diverged"]:
                    div[i, j] = np.isnan(z[i, j])
                else:
                    z[i, j] = r["value"] if np.isnan(z[i, j]) else min(z[i, j], r["value"])
                    div[i, j] = False
            finite = z[np.isfinite(z)]
            vmax = min(np.nanmax(finite), best_v * 10) if finite.size else 1
            im = ax.imshow(z, aspect="auto", origin="lower", cmap="viridis_r",
                           norm=matplotlib.colors.LogNorm(vmin=max(best_v, 1e-12),
                                                          vmax=max(vmax, best_v * 1.01))
                           if best_v > 0 else None)
            for i in range(len(decs)):
                for j in range(len(lrs)):
                    if div[i, j]:
                        ax.text(j, i, "×", ha="center", va="center", color="red", fontsize=9)
                    elif np.isfinite(z[i, j]) and z[i, j] <= best_v * 1.1:
                        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False,
                                                   ec="white", lw=1.2))
            step = max(1, len(lrs) // 9)
            ax.set_xticks(range(0, len(lrs), step))
            ax.set_xticklabels([f"{x:.2g}" for x in lrs[::step]], rotation=45)
            ax.set_yticks(range(len(decs)))
            ax.set_yticklabels([f"{d:g}" for d in decs])
            ax.set_title(f"{cfg.problem} / {cfg.optimizer}: {label}\n"
                         "white box: within 10 % of best; red ×: diverged", fontsize=9)
        else:
            good = [r for r in rows if not r["diverged"]]
            bad = [r for r in rows if r["diverged"]]
            im = ax.scatter([r[lr_p.name] for r in good], [1 - r[dec_p.name] for r in good],
                            c=[r["value"] for r in good], cmap="viridis_r",
                            norm=matplotlib.colors.LogNorm() if best_v > 0 else None, s=40)
            ax.scatter([r[lr_p.name] for r in bad], [1 - r[dec_p.name] for r in bad],
                       marker="x", c="red", s=30, label="diverged")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_ylabel(f"1 - {dec_p.name}")
            if bad:
                ax.legend(loc="best", fontsize=8)
            ax.set_title(f"{cfg.problem} / {cfg.optimizer}: {label}", fontsize=9)
        ax.set_xlabel(lr_p.name)
        if cfg.sampler == "grid":
            ax.set_ylabel(dec_p.name)
        fig.colorbar(im, ax=ax, label=label)
        fig.tight_layout()
        fig.savefig(out / "heatmap.png", dpi=110)
        plt.close(fig)

    # lr sensitivity: best value at each lr (per decay value on a grid), log-log.
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    finite = [r for r in rows if not r["diverged"]]
    if cfg.sampler == "grid" and dec_p is not None:
        for d in sorted({r[dec_p.name] for r in rows}):
            pts = {}
            for r in finite:
                if r[dec_p.name] == d:
                    pts[r[lr_p.name]] = min(pts.get(r[lr_p.name], math.inf), r["value"])
            xs = sorted(pts)
            ax.plot(xs, [pts[x] / best_v for x in xs], marker="o", ms=3,
                    label=f"{dec_p.name}={d:g}")
    else:
        xs = sorted(finite, key=lambda r: r[lr_p.name])
        ax.plot([r[lr_p.name] for r in xs], [r["value"] / best_v for r in xs], "o", ms=4,
                label="trials")
    divs = [r[lr_p.name] for r in rows if r["diverged"]]
    if divs:
        top = max([r["value"] / best_v for r in finite] + [2])
        ax.plot(divs, [top * 1.5] * len(divs), "x", color="red", label="diverged")
    ax.axhline(1.1, color="gray", ls=":", lw=1, label="best + 10 %")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(lr_p.name)
    ax.set_ylabel(f"{label} / best")
    ax.set_title("lr sensitivity (relative to the best trial)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "lr_sensitivity.png", dpi=110)
    plt.close(fig)

    if bok:
        fig, ax = plt.subplots(figsize=(6, 4))
        ks = [b["k"] for b in bok]
        ax.fill_between(ks, [b["q10"] for b in bok], [b["q90"] for b in bok], alpha=0.25,
                        label="10-90 % of best-of-k")
        ax.plot(ks, [b["median"] for b in bok], label="median best-of-k")
        if all(b["mean"] < PENALTY / 10 for b in bok):
            ax.plot(ks, [b["mean"] for b in bok], "--", label="expected best-of-k (Dodge)")
        finite = [r["value"] for r in rows if not r["diverged"]]
        if finite:  # keep diverged draws (PENALTY) from flattening the interesting part
            ax.set_ylim(min(finite) / 1.2, max(finite) * 1.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("k (trials)")
        ax.set_ylabel(label)
        what = "random" if cfg.sampler != "grid" else "drawn from the grid"
        ax.set_title(f"best of k {what} trials", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "best_of_k.png", dpi=110)
        plt.close(fig)


def _readme(cfg: TuneConfig, result: TuneResult, importances: dict[str, float] | None,
            imp_note: str) -> str:
    storage = str(cfg.storage)
    dash = _redact(storage)
    if is_journal(storage):
        dash = str(Path(_journal_path(storage)).resolve())
    elif storage.startswith("sqlite:///") and not storage.startswith("sqlite:////"):
        dash = "sqlite:///" + str(Path(storage[len("sqlite:///"):]).resolve())
    c = result.confirm
    lines = [
        f"# rmsprop tune: {result.study_name}", "",
        f"Problem `{cfg.problem}`, optimizer `{cfg.optimizer}`, sampler `{cfg.sampler}` "
        f"(seed {cfg.seed}), objective: "
        + ("final validation loss" if cfg.objective == "loss"
           else f"steps until validation loss <= {cfg.target:g}") + ".", "",
        "## Search space", "",
        *[f"- {p.describe()}" + ("; grid: " + ", ".join(f"{p.value(x):g}" for x in sorted(
            p.grid(), reverse=p.scale == "log1m")) if cfg.sampler == "grid" else "")
          for p in cfg.space], "",
        "## Best", "",
        f"Trial {result.best_trial}: value {result.best_value:.6g} with "
        + ", ".join(f"{k}={v:g}" for k, v in result.best_hp.items()) + ".",
    ]
    if c.get("seeds"):
        lines.append(f"Re-run on fresh seeds {c['seeds']}: median {c['median']:.6g}, "
                     f"mean {c['mean']:.6g} ± {c['std']:.3g}, diverged {c['diverged']}.")
    lines += [*(f"- **edge**: {e}" for e in result.edges), "",
              f"Trials: {result.summary['complete']} complete "
              f"({result.summary['diverged']} diverged, scored {PENALTY:g}), "
              f"{result.summary['failed']} failed (killed workers; re-queued).", "",
              "## Files", "",
              "- `trials.csv`: every trial (all states), hyperparameters in optimizer units",
              "- `best.json`: best configuration, fresh-seed confirmation, good-region widths",
              "- `heatmap.png`: objective over (lr, decay); `lr_sensitivity.png`; "
              "`best_of_k.png` / `best_of_k.csv`: how many trials a user needs",
              f"- importances: {json.dumps(importances) if importances else imp_note}", "",
              "## Open the study in optuna-dashboard", "",
              "```sh",
              "pip install optuna-dashboard",
              f"optuna-dashboard {dash}",
              "```", "",
              "then browse http://127.0.0.1:8080 and pick the study "
              f"`{result.study_name}` (history, slice, contour, importances). "
              + ("A journal file is opened by its path. " if is_journal(storage) else "")
              + "Resume or extend the search by re-running the same command (a larger "
              "`--trials` adds trials; the study keeps everything already done).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[1:]))
    print("usage: python -m rmsprop.tools.tuning --worker CONFIG_JSON (internal)", file=sys.stderr)
    sys.exit(2)
