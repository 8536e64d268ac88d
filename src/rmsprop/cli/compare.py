"""``rmsprop compare``: RMSProp vs Adam vs SGD on an offline problem suite, with a report.

Protocol (issue 4; benchmarks.md section 9): every optimizer runs once at its library defaults
("one-shot") and is tuned with the same trial budget on the validation split (seed 0; trial 0
is the defaults, the rest a Latin-hypercube sample of its search space; or an lr grid); the best
trial's configuration and the defaults are then re-run on fresh seeds 1..n with common random
numbers (seed k gives every optimizer the same initial point, data order and noise). Results:
one JSON per run, an aggregated CSV and ``report.md`` with PNG plots (see :mod:`rmsprop.tools.report`).

Ctrl-C keeps every finished run (each JSON is written atomically); running again with the same
``--out`` skips them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from typing import Any

from . import CLIError

SUITE_DEFAULTS = {  # seeds, trials per optimizer
    "quick": (3, 8),
    "standard": (5, 10),
    "extended": (10, 25),
}
OPTIMIZER_DEFAULTS = {
    "quick": ["rmsprop", "adam", "sgd", "sgd-momentum"],
    "standard": ["rmsprop", "rmsprop-centered", "rmsprop-momentum", "adam", "sgd",
                 "sgd-momentum"],
    "extended": ["rmsprop", "rmsprop-centered", "rmsprop-momentum", "adam", "sgd",
                 "sgd-momentum"],
}
CROSS_CHECK = "torch-rmsprop"


def register(subparsers: Any) -> None:
    """Add the ``compare`` parser."""
    p = subparsers.add_parser(
        "compare",
        help="RMSProp vs Adam vs SGD on an offline problem suite (report + plots)",
        description="RMSProp vs Adam vs SGD on an offline problem suite. Every optimizer runs at "
        "its library defaults and tuned with the same trial budget on the validation split; both "
        "are re-run on fresh seeds with common random numbers. Writes one JSON per run, "
        "results.csv, report.md and PNG plots; re-running with the same --out resumes.",
    )
    p.add_argument("--suite", default="quick", choices=list(SUITE_DEFAULTS),
                   help="problem suite (default: quick, a few minutes on 2 cores)")
    p.add_argument("--problem", action="append", default=None, metavar="NAME[,NAME]",
                   help="problems to run instead of the suite's (repeatable or comma-separated)")
    p.add_argument("--optimizer", action="append", default=None, metavar="NAME[,NAME]",
                   help="optimizers: registered names or 'pkg.module:Class' import paths")
    p.add_argument("--seeds", type=int, default=None,
                   help="fresh seeds for the re-runs (default: quick 3, standard 5, extended 10)")
    p.add_argument("--trials", type=int, default=None,
                   help="tuning trials per optimizer and problem (default: quick 8, standard 10, "
                        "extended 25; 0 = defaults only)")
    p.add_argument("--search", default="sobol", choices=["sobol", "random", "lhs", "grid"],
                   help="tuning sampler: the scrambled Sobol (default) or random sequence of "
                        "`rmsprop tune` (its search space, the same points), a Latin hypercube "
                        "over the declared space, or a log grid over the learning rate only; "
                        "except with grid, trial 0 is the library defaults")
    p.add_argument("--schedule", default=None, choices=["constant", "cosine"],
                   help="learning-rate schedule (default: constant; cosine for --suite extended)")
    p.add_argument("--steps", type=int, default=None,
                   help="override every problem's step budget (for smoke runs)")
    p.add_argument("--jobs", type=int, default=None,
                   help="parallel worker processes (default: number of cores, at most 2)")
    p.add_argument("--out", default=None,
                   help="output folder (default: a new compare-YYYYmmdd-HHMMSS under the working "
                        "directory); an existing one is resumed")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=run)


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    out: list[str] = []
    for v in values:
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return out


def config_hash(hp: dict[str, Any]) -> str:
    """Short stable id of a hyperparameter dict (file names, resume)."""
    text = json.dumps(hp, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


def _versions() -> dict[str, str]:
    import numpy
    import torch

    import rmsprop

    v = {"python": platform.python_version(), "torch": torch.__version__,
         "numpy": numpy.__version__, "rmsprop": rmsprop.__version__,
         "platform": platform.platform(), "cpus": str(os.cpu_count())}
    from importlib import metadata

    for dist in ("scikit-learn", "matplotlib"):
        try:  # metadata, not import: importing scikit-learn costs seconds
            v[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # pragma: no cover
            pass
    return v


def _job_path(out: str, job: dict[str, Any]) -> str:
    key = dict(job["hp"])
    if job.get("schedule", "constant") != "constant":
        key["_schedule"] = job["schedule"]
    return os.path.join(out, "runs", job["problem"], job["optimizer"].replace(":", "_"),
                        f"{job['phase']}-{config_hash(key)}-s{job['seed']}.json")


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run one (problem, optimizer, hyperparameters, seed) and write its JSON atomically.

    Module-level so that worker processes can import it.
    """
    import torch

    from rmsprop.tools import problems
    from rmsprop.tools.problems.optimizers import ours_available, resolve, with_schedule

    torch.set_num_threads(1)  # tiny models: one thread per run, runs in parallel instead
    prob = problems.get(job["problem"])
    spec = resolve(job["optimizer"])
    hp = dict(job["hp"])
    schedule = job.get("schedule", "constant")
    n_steps = job.get("steps") or prob.steps
    t0 = time.perf_counter()
    make = with_schedule(lambda ps: spec.make(ps, **hp), schedule, n_steps)
    res = prob.run(make, seed=job["seed"], steps=job.get("steps"))
    extra: dict[str, Any] = {}
    if job["phase"] == "crosscheck":
        extra["cross_check"] = _cross_check(prob, res, job)
    record = {
        "problem": prob.name, "problem_description": prob.description,
        "optimizer": spec.name, "optimizer_description": spec.description,
        "ours": ours_available() if spec.name.startswith("rmsprop") else None,
        "phase": job["phase"], "trial": job.get("trial"),
        "hyperparameters": {**spec.defaults, **hp}, "tuned_hyperparameters": hp,
        "schedule": schedule,
        "search_space": {k: list(v) for k, v in spec.search_space.items()},
        "seed": job["seed"],
        "seed_streams": {s: problems.stream_seed(job["seed"], s)
                         for s in ("init", "order", "noise")},
        "batch_size": prob.batch_size, "steps": job.get("steps") or prob.steps,
        "eval_every": prob.eval_every, "known_min": prob.known_min,
        "metric_name": prob.metric_name,
        "wall_seconds": time.perf_counter() - t0,
        "versions": job["versions"],
        "result": res.to_dict(),
        **extra,
    }
    path = job["path"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)
    return record


def _cross_check(prob: Any, theirs: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Compare ``torch.optim.RMSprop``'s run (``theirs``) with our ``pytorch`` preset, in this
    process (BLAS rounding depends on memory alignment, so only same-process runs can be
    bit-identical): our for-loop path (``fused=False``) must match bit for bit; our default path
    (the fused kernel where it applies) may differ in the last bit, which chaotic problems grow.
    """
    from rmsprop.tools.problems.optimizers import ours_available, resolve, with_schedule

    out: dict[str, Any] = {"ours_available": ours_available()}
    if not ours_available():
        return out
    from rmsprop.torch import RMSprop  # type: ignore[attr-defined]

    def make(ps: Any, **kw: Any) -> Any:
        if hasattr(RMSprop, "from_preset"):
            return RMSprop.from_preset("pytorch", ps, **kw)
        return resolve("rmsprop").make(ps, **kw)

    n_steps = job.get("steps") or prob.steps
    for label, kw in (("forloop", {"fused": False}), ("default", {})):
        r = prob.run(with_schedule(lambda ps: make(ps, **kw), job.get("schedule"), n_steps),
                     seed=job["seed"], steps=job.get("steps"))
        a, b = r.train_loss, theirs.train_loss
        n = min(len(a), len(b))
        rel = [abs(x - y) / max(abs(x), abs(y), 1e-300) if x != y else 0.0
               for x, y in zip(a[:n], b[:n])]
        first = next((i for i, d in enumerate(rel) if d != 0), None)
        out[label] = {"identical": len(a) == len(b) and first is None,
                      "first_difference_step": first,
                      "max_rel_diff_first10": max(rel[:10] or [0.0]),
                      "max_rel_diff": max(rel or [0.0]),
                      "final_eval_loss": r.final_eval_loss}
    out["torch_final_eval_loss"] = theirs.final_eval_loss
    return out


def _worker_init() -> None:
    import signal

    import torch

    torch.set_num_threads(1)
    # Ctrl-C is handled by the parent, which cancels pending runs; workers just stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _load(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            rec = json.load(f)
        return rec if "result" in rec else None
    except (OSError, ValueError):
        return None  # a truncated file from a hard kill is simply re-run


class _Runner:
    """Runs jobs (in-process or in a spawn pool), skipping finished ones, with one progress bar."""

    def __init__(self, jobs: int, total: int) -> None:
        from tqdm import tqdm

        self.jobs = jobs
        self.bar = tqdm(total=total, unit="run", desc="compare", dynamic_ncols=True,
                        smoothing=0.05, file=sys.stderr)
        self.pool = None

    def run(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        results: list[dict[str, Any] | None] = [None] * len(batch)
        todo = []
        for i, job in enumerate(batch):
            rec = _load(job["path"])
            if rec is not None:
                results[i] = rec
                self.bar.update(1)
            else:
                todo.append(i)
        if self.jobs <= 1:
            for i in todo:
                results[i] = run_job(batch[i])
                self.bar.update(1)
        elif todo:
            import concurrent.futures as cf
            import multiprocessing as mp

            if self.pool is None:
                # fork, not spawn: spawn re-imports __main__, which breaks `python -m` entry points
                # without a main guard; workers pin torch to one thread before any torch op
                ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
                self.pool = cf.ProcessPoolExecutor(self.jobs, mp_context=ctx,
                                                   initializer=_worker_init)
            futs = {self.pool.submit(run_job, batch[i]): i for i in todo}
            for fut in cf.as_completed(futs):
                results[futs[fut]] = fut.result()
                self.bar.update(1)
        return [r for r in results if r is not None]

    def close(self, cancel: bool = False) -> None:
        self.bar.close()
        if self.pool is None:
            return
        if cancel:
            # Ctrl-C: stop now rather than wait for the runs in flight (their JSON is written
            # atomically, so a killed run leaves at most a stray .tmp file, removed next time)
            for proc in list(getattr(self.pool, "_processes", {}).values()):
                proc.terminate()
        self.pool.shutdown(wait=not cancel, cancel_futures=cancel)


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """Validate the arguments and fix problems, optimizers, seeds, trials and configurations."""
    from rmsprop.tools import problems
    from rmsprop.tools.problems.optimizers import resolve

    suite = args.suite
    explicit = _split(args.problem)
    probs = explicit or problems.names(suite)
    for name in probs:
        try:
            problems.get(name)
        except ValueError as e:
            raise CLIError(str(e)) from None
    skipped = []
    for name in list(probs):
        missing = problems.get(name).missing()
        if missing:
            if explicit:
                raise CLIError(f"problem {name!r} needs {', '.join(missing)}: pip install "
                               + " ".join("scikit-learn" if m == "sklearn" else m
                                          for m in missing))
            probs.remove(name)
            skipped.append(f"{name} (needs {', '.join(missing)})")
    if skipped:
        print("rmsprop compare: skipping " + "; ".join(skipped), file=sys.stderr)
    if not probs:
        raise CLIError("no problem left to run: " + "; ".join(skipped))
    opts = _split(args.optimizer) or OPTIMIZER_DEFAULTS[suite]
    specs = {}
    for name in opts:
        try:
            specs[name] = resolve(name)
        except ValueError as e:
            raise CLIError(str(e)) from None
    seeds_default, trials_default = SUITE_DEFAULTS[suite]
    n_seeds = seeds_default if args.seeds is None else args.seeds
    trials = trials_default if args.trials is None else args.trials
    if n_seeds < 1:
        raise CLIError(f"--seeds must be >= 1, got {n_seeds}")
    if trials < 0:
        raise CLIError(f"--trials must be >= 0, got {trials}")
    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps must be >= 1, got {args.steps}")
    schedule = args.schedule or ("cosine" if suite == "extended" else "constant")
    jobs = args.jobs if args.jobs is not None else max(1, min(2, os.cpu_count() or 1))
    if jobs < 1:
        raise CLIError(f"--jobs must be >= 1, got {jobs}")
    return {"suite": suite, "problems": probs, "optimizers": list(specs), "seeds": n_seeds,
            "trials": trials, "search": args.search, "steps": args.steps, "jobs": jobs,
            "schedule": schedule,
            "cross_check": "rmsprop" in specs}


def tuning_configs(spec: Any, trials: int, search: str) -> list[dict[str, Any]]:
    """The ``trials`` configurations tried for one optimizer (same sampler seed for all)."""
    from rmsprop.tools.problems.optimizers import grid, sample

    if trials == 0:
        return []
    if search == "grid":
        return [{"lr": lr} for lr in grid(spec.search_space["lr"], trials)]
    # trial 0 is the library default (as Optuna's enqueue_trial): tuning then never ends worse
    # than the defaults on the tuning seed, whatever the sampler draws
    first = {k: spec.defaults[k] for k in spec.search_space if k in spec.defaults}
    if search in ("random", "sobol"):
        from rmsprop.tools.tuning import suggest

        return [first] + suggest(spec, trials - 1, sampler=search, seed=0)
    return [first] + sample(spec.search_space, trials - 1, seed=0, method=search)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``rmsprop compare``."""
    cfg = plan(args)  # errors before anything is created
    out = args.out or os.path.join(os.getcwd(),
                                   datetime.now().strftime("compare-%Y%m%d-%H%M%S"))
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out {out!r} exists and is not a folder")
    from rmsprop.tools.problems.optimizers import ours_available, resolve

    os.makedirs(out, exist_ok=True)
    for d, _, files in os.walk(os.path.join(out, "runs")):
        for f in files:
            if ".json.tmp" in f:  # left by a run killed mid-write
                os.remove(os.path.join(d, f))
    versions = _versions()
    seeds = list(range(1, cfg["seeds"] + 1))
    specs = {o: resolve(o) for o in cfg["optimizers"]}
    common = {"versions": versions, "steps": cfg["steps"], "schedule": cfg["schedule"]}

    def job(problem: str, opt: str, phase: str, hp: dict, seed: int, trial: int | None = None):
        j = {"problem": problem, "optimizer": opt, "phase": phase, "hp": hp, "seed": seed,
             "trial": trial, **common}
        j["path"] = _job_path(out, j)
        return j

    phase1: list[dict[str, Any]] = []
    for p in cfg["problems"]:
        for o, spec in specs.items():
            for i, hp in enumerate(tuning_configs(spec, cfg["trials"], cfg["search"])):
                phase1.append(job(p, o, "tune", hp, 0, i))
            for s in seeds:
                phase1.append(job(p, o, "default", {}, s))
        if cfg["cross_check"]:
            phase1.append(job(p, CROSS_CHECK, "crosscheck", {}, seeds[0]))
    n_tuned = len(cfg["problems"]) * len(specs) * len(seeds) if cfg["trials"] else 0
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump({**cfg, "command": "rmsprop compare " + " ".join(sys.argv[2:]),
                   "versions": versions, "ours_available": ours_available(),
                   "search_spaces": {o: s.search_space for o, s in specs.items()},
                   "defaults": {o: s.defaults for o, s in specs.items()}}, f, indent=1,
                  default=str)
    print(f"rmsprop compare: {len(cfg['problems'])} problems x {len(specs)} optimizers, "
          f"{cfg['trials']} tuning trials ({cfg['search']}) + defaults, {len(seeds)} seeds, "
          f"{cfg['schedule']} lr, {cfg['jobs']} jobs -> {out}", file=sys.stderr)
    if not ours_available():
        print("rmsprop compare: note: rmsprop.torch.RMSprop does not import; 'rmsprop' runs "
              "torch.optim.RMSprop as a stand-in", file=sys.stderr)
    t_start = time.perf_counter()
    runner = _Runner(cfg["jobs"], len(phase1) + n_tuned)
    try:
        records = runner.run(phase1)
        tuned_jobs = []
        if cfg["trials"]:
            from rmsprop.tools.report import select_best

            for p in cfg["problems"]:
                for o in specs:
                    trials = [r for r in records if r["problem"] == p and r["optimizer"] == o
                              and r["phase"] == "tune"]
                    best = select_best(trials)
                    for s in seeds:
                        tuned_jobs.append(job(p, o, "tuned", best["tuned_hyperparameters"], s))
            records += runner.run(tuned_jobs)
    except KeyboardInterrupt:
        runner.close(cancel=True)
        print(f"\nrmsprop compare: interrupted; finished runs are kept in {out}; run the same "
              f"command with --out {out} to resume", file=sys.stderr)
        return 130
    runner.close()
    elapsed = time.perf_counter() - t_start

    from rmsprop.tools.report import write_report

    summary = write_report(out, records, cfg, versions=versions, elapsed=elapsed,
                           plots=not args.no_plots)
    print(summary)
    print(f"\nreport: {os.path.join(out, 'report.md')}  ({elapsed:.0f} s)")
    return 0
