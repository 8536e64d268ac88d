"""Hyperparameter search for an optimizer on a problem (``rmsprop tune``), on Optuna.

The pieces, one module each:

* :mod:`rmsprop.tools.search_space`: what is searched (lr log-uniform, decays as ``1 - rho``),
  grids and the deterministic random/Sobol sequences (shared with ``rmsprop compare``);
* :mod:`rmsprop.tools.storage`: where the study lives (SQLite, journal file, PostgreSQL),
  secrets redacted;
* :mod:`rmsprop.tools.study`: the configuration that defines a study and its sampler;
* :mod:`rmsprop.tools.objective`: what a trial measures;
* :mod:`rmsprop.tools.worker`: workers that end the study with exactly N completed trials,
  whatever dies on the way;
* :mod:`rmsprop.tools.tune_report`: what the study found, and the report folder.

This module runs them in order: :func:`prepare` (every check that can fail, before any work),
:func:`run_tune` (workers, fresh-seed confirmation of the best, report) and :func:`tune` (the
same from Python, in memory by default).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rmsprop.tools import user_problem
from rmsprop.tools.objective import (
    evaluate,
    finite_or_none,
    make_factory,
    resolve_optimizer,
    resolve_problem,
    score,
)
from rmsprop.tools.search_space import (
    SAMPLERS,
    Param,
    SearchSpaceError,
    build_space,
    parse_range,
    suggest,
)
from rmsprop.tools.storage import DEFAULT_STORAGE, StorageError, in_memory, open_storage, redact
from rmsprop.tools.study import PENALTY, TuneConfig, TuneError, check_out, counts, open_study
from rmsprop.tools.tune_report import (
    edge_flags,
    expected_best_of_k,
    good_band,
    trial_rows,
    trial_tally,
    write_report,
)
from rmsprop.tools.worker import limit_threads, reap_stale, run_processes, run_worker

__all__ = [
    "DEFAULT_STORAGE",
    "PENALTY",
    "SAMPLERS",
    "USER_ERRORS",
    "Param",
    "Prepared",
    "TuneConfig",
    "TuneError",
    "TuneResult",
    "build_space",
    "evaluate",
    "expected_best_of_k",
    "parse_range",
    "prepare",
    "run_tune",
    "suggest",
    "tune",
]

#: Errors a user can fix: the CLI prints them as one line.
USER_ERRORS = (TuneError, SearchSpaceError, StorageError)


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


@dataclasses.dataclass
class Prepared:
    """A checked configuration: its problem, optimizer, open storage and study."""

    problem: Any
    spec: Any
    storage: Any
    study: Any


def prepare(cfg: TuneConfig) -> Prepared:
    """Every check that can fail, in the order a user fixes them, before any trial runs:
    report folder, problem, optimizer, storage (driver, server), study (same options)."""
    check_out(cfg.out, cfg)
    if cfg.jobs > 1 and in_memory(cfg.storage):
        raise TuneError("--jobs > 1 needs a shared --storage (an sqlite file, journal or "
                        "postgresql)" + (f", not {cfg.storage}, which lives in one process"
                                         if cfg.storage else ""))
    problem = resolve_problem(cfg.problem)
    spec = resolve_optimizer(cfg.optimizer)
    storage = open_storage(cfg.storage, heartbeat=cfg.heartbeat, grace=cfg.grace)
    study = open_study(cfg, storage)
    done = counts(study)["COMPLETE"]
    if done > cfg.target_trials:  # the study would end with more than --trials
        raise TuneError(f"study {cfg.study!r} already holds {done} complete trials, more than "
                        f"--trials {cfg.target_trials}: give --trials {done} or more, or "
                        "another --study")
    return Prepared(problem, spec, storage, study)


def tune(problem: Any, optimizer: str, *, sampler: str = "random", trials: int | None = 16,
         seed: int = 0, extra: Sequence[str] = (), ranges: Sequence[tuple[str, float, float]] = (),
         storage: str | None = None, study: str | None = None, confirm_seeds: int = 0,
         train_seed: int = 0, steps: int | None = None, out: str | None = None,
         progress: bool = False) -> TuneResult:
    """Tune from Python: in memory unless ``storage`` is given; a report only with ``out``.

    ``problem``: a suite name, ``"pkg.module:make_problem"`` or a ``Problem`` object (as
    ``rmsprop.tools.compare.run`` takes); ``extra`` and ``ranges`` as :func:`build_space`."""
    from rmsprop.tools.problems.base import Problem

    if isinstance(problem, Problem):
        try:
            problem = user_problem.register(problem)
        except user_problem.ProblemError as e:
            raise TuneError(str(e)) from None
    elif not isinstance(problem, str):
        raise TuneError("problem must be a suite name, 'pkg.module:make_problem' or a Problem, "
                        f"got {problem!r:.60}")
    spec = resolve_optimizer(optimizer)
    cfg = TuneConfig(problem=problem, optimizer=optimizer, space=build_space(spec, extra, ranges),
                     sampler=sampler, trials=trials, seed=seed, study=study, storage=storage,
                     confirm_seeds=confirm_seeds, train_seed=train_seed, steps=steps, out=out,
                     progress=progress)
    return run_tune(cfg)


def run_tune(cfg: TuneConfig, log: Callable[[str], None] | None = None,
             prepared: Prepared | None = None) -> TuneResult:
    """Run (or resume) the study with ``cfg.jobs`` workers, confirm the best on fresh seeds and
    write the report (when ``cfg.out`` is set)."""
    log = log or (lambda s: None)
    ready = prepared or prepare(cfg)
    limit_threads(cfg.jobs)
    n = cfg.target_trials
    reap_stale(ready.study, ready.storage, cfg.grace)
    start = counts(ready.study)["COMPLETE"]
    if start:
        log(f"resuming study {cfg.study!r}: {start} of {n} trials already complete")
    bar = _progress(cfg, n, start)
    try:
        if cfg.jobs == 1:
            run_worker(cfg, storage=ready.storage, on_trial=lambda _n: bar.update(1))
        else:
            run_processes(cfg, ready.study, bar)
    finally:
        bar.close()
    done = counts(ready.study)["COMPLETE"]
    if done < n:
        raise TuneError(f"study {cfg.study!r} holds {done} of {n} complete trials: a worker "
                        "stopped early (see the worker logs)")
    result = summarize(cfg, ready)
    if cfg.out:
        write_report(cfg, ready.study, result)
    return result


def _progress(cfg: TuneConfig, total: int, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"tune {cfg.study}", unit="trial",
                disable=not cfg.progress, dynamic_ncols=True, file=sys.stderr,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, "
                           "{rate_fmt}]")


def confirm_best(cfg: TuneConfig, ready: Prepared, best_hp: dict[str, float],
                 runner_up: float | None) -> dict[str, Any]:
    """Re-run ``best_hp`` on ``cfg.confirm_seeds`` fresh seeds (after the training seed)."""
    from tqdm.auto import tqdm

    confirm: dict[str, Any] = {"seeds": [], "values": [], "test_loss": [], "diverged": 0}
    if not cfg.confirm_seeds:
        return confirm
    seeds = [cfg.train_seed + 1 + i for i in range(cfg.confirm_seeds)]
    for s in tqdm(seeds, desc="confirm best on fresh seeds", unit="seed",
                  disable=not cfg.progress, file=sys.stderr):
        res = ready.problem.run(make_factory(ready.spec, best_hp), seed=s, steps=cfg.steps,
                                split="valid")
        ev = score(res, objective=cfg.objective, target=cfg.target)
        confirm["seeds"].append(s)
        confirm["values"].append(ev.value)
        confirm["diverged"] += int(ev.diverged)
        confirm["test_loss"].append(finite_or_none(getattr(res, "test_loss", None)))
    vals = confirm["values"]
    confirm["median"] = statistics.median(vals)
    confirm["mean"] = statistics.fmean(vals)
    confirm["std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    tests = [x for x in confirm["test_loss"] if x is not None]
    confirm["test_loss_median"] = statistics.median(tests) if tests else None
    if runner_up is not None:
        # Selection picks the luckiest draw; if fresh seeds land behind the runner-up's tuning
        # value, the top configurations are not distinguishable at this budget.
        confirm["beats_runner_up"] = confirm["median"] <= runner_up
    return confirm


def summarize(cfg: TuneConfig, ready: Prepared) -> TuneResult:
    """The best trial, its confirmation, edge warnings, the good lr band and the trial tally."""
    rows = trial_rows(ready.study, cfg.space)
    done = [r for r in rows if r["state"] == "COMPLETE"]
    ok = [r for r in done if not r["diverged"]]
    if not ok:
        raise TuneError(f"all {len(done)} completed trials diverged: lower the lr range "
                        "(--range lr=LOW:HIGH)")
    best_row = min(ok, key=lambda r: (r["value"], r["number"]))
    best_hp = {p.name: best_row[p.name] for p in cfg.space}
    runner_up = sorted(r["value"] for r in ok)[1] if len(ok) > 1 else None
    tally = trial_tally(rows)
    summary = {
        "complete": tally.complete, "diverged": tally.diverged, "failed": tally.failed,
        "surplus": tally.surplus, "tally": tally.describe(),
        "good_band": good_band(rows, cfg.objective), "runner_up_value": runner_up,
        "storage": redact(str(cfg.storage)) if cfg.storage else None,
    }
    return TuneResult(study_name=str(cfg.study), best_hp=best_hp, best_value=best_row["value"],
                      best_trial=best_row["number"],
                      confirm=confirm_best(cfg, ready, best_hp, runner_up),
                      edges=edge_flags(cfg, best_hp), trials=rows, space=list(cfg.space),
                      summary=summary)
