"""The protocol behind ``rmsprop compare``, as a Python API.

>>> from rmsprop.tools import compare
>>> res = compare.run(problems="examples.my_problem:make_problem", trials=4, seeds=3,
...                   out="cmp-mine")                                      # doctest: +SKIP
>>> res.verdicts                                                           # doctest: +SKIP
{'Fast convergence': 'yes', 'Stable learning': 'yes', ...}

Every optimizer runs once at its library defaults ("one-shot") and is tuned with the same trial
budget on the validation split (seed 0; trial 0 is the defaults, the rest the scrambled Sobol
sequence of ``rmsprop tune`` over the shared search space, or random / Latin-hypercube points, or
an lr grid); the best trial's configuration and the defaults are then re-run on fresh seeds
1..n with common random numbers (seed k gives every optimizer the same initial point, data order
and noise). :func:`run` writes one JSON per run, ``results.csv``, ``report.md`` and PNG plots
(:mod:`rmsprop.tools.report`) into ``out`` and returns a :class:`Results`; the CLI is a thin
layer over it, so both write the same report.

``out`` records the options in ``compare.json``; running again with the same ``out`` and the
same options resumes (finished runs are reused, each JSON being written atomically), and any
other option is refused with an error naming the options that differ, so that a report never
mixes runs made with different settings.

Nothing heavy is imported at import time: torch, matplotlib and the problems load inside
:func:`run`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["run", "plan", "Plan", "Results", "CompareError", "SUITE_DEFAULTS",
           "OPTIMIZER_DEFAULTS", "SEARCHES"]

SUITE_DEFAULTS = {  # seeds, trials per optimizer
    "quick": (3, 8),
    "standard": (5, 10),
    "extended": (10, 25),
}
OPTIMIZER_DEFAULTS = {
    "quick": ("rmsprop", "adam", "sgd", "sgd-momentum"),
    "standard": ("rmsprop", "rmsprop-centered", "rmsprop-momentum", "adam", "sgd",
                 "sgd-momentum"),
    "extended": ("rmsprop", "rmsprop-centered", "rmsprop-momentum", "adam", "sgd",
                 "sgd-momentum"),
}
SEARCHES = ("sobol", "random", "lhs", "grid")
SCHEDULES = ("constant", "cosine")
CROSS_CHECK = "torch-rmsprop"
#: the options of compare.json that a resume must match (``jobs`` and plots do not change runs)
IDENTITY_KEYS = ("suite", "problems", "optimizers", "seeds", "trials", "search", "steps",
                 "schedule")


class CompareError(ValueError):
    """An option or folder the user can fix; the message is one line."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# -- the plan ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """The validated options of one comparison."""

    suite: str
    problems: tuple[str, ...]              # problem names, in order
    sources: Mapping[str, str]             # name -> key (suite name, import path or "@name")
    optimizers: tuple[str, ...]
    seeds: int
    trials: int
    search: str
    steps: int | None
    schedule: str
    jobs: int
    explicit_problems: bool
    skipped: tuple[str, ...] = ()
    objects: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    specs: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    spaces: Mapping[str, Sequence[Any]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def cross_check(self) -> bool:
        """Whether torch.optim.RMSprop is run beside ours (when ``rmsprop`` is compared)."""
        return "rmsprop" in self.optimizers

    def identity(self) -> dict[str, Any]:
        """Everything that changes a run's result: what a resumed ``out`` must match."""
        from rmsprop.tools.user_problem import fingerprint

        probs = []
        for name in self.problems:
            p = self.objects[name]
            probs.append({"name": name, "source": self.sources[name], "steps": p.steps,
                          "eval_every": p.eval_every, "batch_size": p.batch_size,
                          "target_tau": p.target_tau, "known_min": p.known_min,
                          "target_loss": getattr(p, "target_loss", None), "kind": p.kind,
                          **(fingerprint(self.sources[name], p) or {})})
        opts = [{"name": o, "defaults": dict(self.specs[o].defaults),
                 "search_space": [d.to_json() for d in self.spaces[o]]}
                for o in self.optimizers]
        ident = {"suite": self.suite, "problems": probs, "optimizers": opts,
                 "seeds": self.seeds, "trials": self.trials, "search": self.search,
                 "steps": self.steps, "schedule": self.schedule}
        return json.loads(json.dumps(ident, default=str))  # as it reads back from the file

    def report_cfg(self) -> dict[str, Any]:
        """What :mod:`rmsprop.tools.report` reads."""
        return {"suite": self.suite, "problems": list(self.problems),
                "problem_sources": dict(self.sources), "optimizers": list(self.optimizers),
                "seeds": self.seeds, "trials": self.trials, "search": self.search,
                "steps": self.steps, "schedule": self.schedule, "jobs": self.jobs,
                "explicit_problems": self.explicit_problems,
                "search_spaces": {o: _describe_space(self.spaces[o], self.search, self.trials)
                                  for o in self.optimizers},
                "defaults": {o: dict(self.specs[o].defaults) for o in self.optimizers}}


def _describe_space(space: Sequence[Any], search: str, trials: int) -> list[str]:
    if trials == 0:
        return ["none (defaults only)"]
    if search == "grid":
        lr = next(p for p in space if p.name == "lr")
        return [f"lr: {trials} points log-spaced in [{lr.low:g}, {lr.high:g}]; the others at "
                "their defaults"]
    return [p.describe() for p in space]


def _split(values: str | Sequence[Any] | None, flag: str) -> list[Any] | None:
    """The names (or objects) in ``values``, comma-separated strings split; None when not
    given. Given but naming nothing (``""``, ``","``) is an error, not the default."""
    if values is None:
        return None
    out = _names(values)
    if not out:
        raise CompareError(f"{flag} names nothing (give comma-separated names, or leave the "
                           "option out for the suite's)")
    return out


def _names(values: str | Sequence[Any]) -> list[Any]:
    if isinstance(values, str) or not isinstance(values, Iterable):
        values = [values]  # one name or object; a wrong type is named by the caller
    out: list[Any] = []
    for v in values:
        if isinstance(v, str):
            out.extend(x.strip() for x in v.split(",") if x.strip())
        else:
            out.append(v)
    return out


def _resolve_problems(wanted: list[Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """``(name -> key, name -> Problem)`` for names, import paths and Problem objects."""
    from rmsprop.tools import user_problem
    from rmsprop.tools.problems.base import Problem

    sources: dict[str, str] = {}
    objects: dict[str, Any] = {}
    for item in wanted:
        try:
            if isinstance(item, Problem):
                key = user_problem.register(item)
            elif isinstance(item, str):
                key = item
            else:
                raise CompareError(f"a problem must be a name, an import path 'pkg.module:attr' "
                                   f"or a Problem, got a {type(item).__name__}")
            prob = user_problem.resolve(key)
        except ValueError as e:
            raise CompareError(str(e)) from None
        if prob.name in sources:
            if sources[prob.name] == key:
                continue
            raise CompareError(f"two problems are named {prob.name!r} ({sources[prob.name]} and "
                               f"{key}); give them different names")
        sources[prob.name] = key
        objects[prob.name] = prob
    return sources, objects


def _is_ours(spec: Any, registry: Any) -> bool:
    """Whether a spec names our optimizer (the registry marks it ``ours``)."""
    entry = registry.OPTIMIZERS.get(spec.name)
    return bool(getattr(spec, "ours", entry is not None and entry.ours))


def _check_ours(specs: Mapping[str, Any]) -> None:
    """Our optimizer must import wherever compare runs it: never torch's in its place."""
    from rmsprop.tools.problems import optimizers as registry

    ours = [o for o, spec in specs.items() if _is_ours(spec, registry)]
    if not ours:
        return
    try:
        from rmsprop.torch import RMSprop  # noqa: F401
    except Exception as e:  # noqa: BLE001 - whatever breaks the import is the message
        raise CompareError(f"optimizer {ours[0]!r} is rmsprop.torch.RMSprop, which does not "
                           f"import here ({_one_line(e)}); torch.optim.RMSprop is never run "
                           "in its place") from None


def plan(problems: str | Sequence[Any] | None = None,
         optimizers: str | Sequence[str] | None = None, *, suite: str = "quick",
         seeds: int | None = None, trials: int | None = None, search: str = "sobol",
         schedule: str | None = None, steps: int | None = None,
         jobs: int | None = None) -> Plan:
    """Validate the options and fix problems, optimizers, seeds, trials and search spaces.

    Raises :class:`CompareError` (one line) before anything is created."""
    from rmsprop.tools import search_space
    from rmsprop.tools.problems import optimizers as registry

    if suite not in SUITE_DEFAULTS:
        raise CompareError(f"unknown suite {suite!r}; valid suites: {', '.join(SUITE_DEFAULTS)}")
    if search not in SEARCHES:
        raise CompareError(f"unknown search {search!r}; valid: {', '.join(SEARCHES)}")
    for name, v, low in (("seeds", seeds, 1), ("trials", trials, 0), ("steps", steps, 1),
                         ("jobs", jobs, 1)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise CompareError(f"--{name} must be an integer >= {low}, got {v!r}")
    schedule = schedule or ("cosine" if suite == "extended" else "constant")
    if schedule not in SCHEDULES:
        raise CompareError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    explicit = _split(problems, "--problem")
    wanted: list[Any] = list(explicit) if explicit else _suite_problems(suite)
    skipped = []
    if not explicit:
        from rmsprop.tools import problems as suite_mod

        for name in list(wanted):
            missing = suite_mod.get(name).missing()
            if missing:
                wanted.remove(name)
                skipped.append(f"{name} (needs {', '.join(missing)})")
        if not wanted:
            raise CompareError("no problem left to run: " + "; ".join(skipped))
    sources, objects = _resolve_problems(wanted)
    for name in sources:
        missing = objects[name].missing()
        if missing:
            pip = " ".join("scikit-learn" if m == "sklearn" else m for m in missing)
            raise CompareError(f"problem {name!r} needs {', '.join(missing)}: pip install {pip}")
    names = _split(optimizers, "--optimizer") or list(OPTIMIZER_DEFAULTS[suite])
    specs: dict[str, Any] = {}
    for name in names:
        if not isinstance(name, str):
            raise CompareError("an optimizer must be a registered name or an import path "
                               f"'pkg.module:Class', got a {type(name).__name__} ({name!r:.40})")
        try:
            specs[name] = registry.resolve(name)
        except ValueError as e:
            raise CompareError(str(e)) from None
    _check_ours(specs)
    if "rmsprop" in specs:
        specs.setdefault(CROSS_CHECK, registry.resolve(CROSS_CHECK))
    spaces = {}
    for o, spec in specs.items():
        try:
            spaces[o] = search_space.build_space(spec)
        except ValueError as e:
            raise CompareError(f"optimizer {o!r}: {e}") from None
    seeds_default, trials_default = SUITE_DEFAULTS[suite]
    n_jobs = jobs if jobs is not None else max(1, min(2, os.cpu_count() or 1))
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods() and any(k.startswith("@")
                                                        for k in sources.values()):
        n_jobs = 1  # a Problem object reaches worker processes only by fork
    return Plan(suite=suite, problems=tuple(sources), sources=sources,
                optimizers=tuple(o for o in specs if o != CROSS_CHECK or o in names),
                seeds=seeds_default if seeds is None else seeds,
                trials=trials_default if trials is None else trials, search=search,
                steps=steps, schedule=schedule, jobs=n_jobs, explicit_problems=bool(explicit),
                skipped=tuple(skipped), objects=objects, specs=specs, spaces=spaces)


def _suite_problems(suite: str) -> list[str]:
    from rmsprop.tools import problems

    return problems.names(suite)


def tuning_configs(spec: Any, space: Sequence[Any], trials: int,
                   search: str) -> list[dict[str, Any]]:
    """The ``trials`` configurations tried for one optimizer (the same points for every
    problem). Except with ``grid``, trial 0 is the library defaults (as Optuna's
    ``enqueue_trial``): tuning then never ends worse than the defaults on the tuning seed."""
    from rmsprop.tools import search_space

    if trials == 0:
        return []
    if search == "grid":
        lr = next(p for p in space if p.name == "lr")
        return [{"lr": v} for v in lr.spaced(trials)]
    first = {p.name: spec.defaults[p.name] for p in space if p.name in spec.defaults}
    if search in ("random", "sobol"):
        return [first] + search_space.suggest(spec, trials - 1, sampler=search, seed=0,
                                               space=space)
    import numpy as np

    n = trials - 1
    rng = np.random.default_rng(0)
    u = np.stack([(rng.permutation(n) + rng.random(n)) / n for _ in space], axis=1) \
        if n else np.zeros((0, len(space)))
    return [first] + [{p.name: p.at(float(u[i, j])) for j, p in enumerate(space)}
                      for i in range(n)]


# -- the output folder ---------------------------------------------------------------------------

def _differences(stored: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """One short phrase per option that differs between two identities."""
    out = []
    for k in IDENTITY_KEYS:
        a, b = stored.get(k), now.get(k)
        if a == b:
            continue
        if k in ("problems", "optimizers") and isinstance(a, list) and isinstance(b, list):
            na = [str(x.get("name")) for x in a if isinstance(x, dict)]
            nb = [str(x.get("name")) for x in b if isinstance(x, dict)]
            if na != nb:
                out.append(f"{k} {','.join(na)} there, {','.join(nb)} here")
            else:
                changed = sorted({kk for x, y in zip(a, b) for kk in set(x) | set(y)
                                  if x.get(kk) != y.get(kk)})
                out.append(f"{k}' definitions ({', '.join(changed)})")
        else:
            out.append(f"{k} {a} there, {b} here")
    return out


def prepare_out(out: str, identity: Mapping[str, Any]) -> bool:
    """Create or check the output folder; True when it resumes a run with the same options.

    Raises :class:`CompareError` when ``out`` is a file, cannot be created or written, holds
    something else than a compare run, or a compare run made with different options."""
    label = f"--out {out!r}"
    if os.path.exists(out) and not os.path.isdir(out):
        raise CompareError(f"{label} exists and is not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise CompareError(f"cannot create {label}: {e.strerror or _one_line(e)}") from None
    probe = os.path.join(out, f".write-test-{os.getpid()}")
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise CompareError(f"{label} is not writable: {e.strerror or _one_line(e)}") from None
    meta = os.path.join(out, "compare.json")
    if not os.path.exists(meta):
        if any(not n.startswith(".") for n in os.listdir(out)):
            raise CompareError(f"{label} is not empty and holds no compare.json: give a new or "
                               "empty folder")
        return False
    try:
        with open(meta) as f:
            stored = json.load(f).get("identity")
    except (OSError, ValueError, AttributeError) as e:
        raise CompareError(f"{label}: cannot read its compare.json ({_one_line(e)}); give "
                           "another --out") from None
    if not isinstance(stored, dict):
        raise CompareError(f"{label} holds a compare run without recorded options; give "
                           "another --out")
    diff = _differences(stored, identity)
    if diff:
        raise CompareError(f"{label} holds a compare run with other options ({'; '.join(diff)}):"
                           " resume it with the same options, or give another --out")
    return True


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


# -- running -------------------------------------------------------------------------------------

def config_hash(hp: Mapping[str, Any]) -> str:
    """Short stable id of a hyperparameter dict (file names, resume)."""
    text = json.dumps(hp, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


def _versions() -> dict[str, str]:
    from importlib import metadata

    import numpy
    import torch

    import rmsprop

    v = {"python": platform.python_version(), "torch": torch.__version__,
         "numpy": numpy.__version__, "rmsprop": rmsprop.__version__,
         "platform": platform.platform(), "cpus": str(os.cpu_count())}
    for dist in ("scikit-learn", "matplotlib"):
        try:  # metadata, not import: importing scikit-learn costs seconds
            v[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # pragma: no cover
            pass
    return v


def _job_path(out: str, job: Mapping[str, Any]) -> str:
    key = dict(job["hp"])
    if job.get("schedule", "constant") != "constant":
        key["_schedule"] = job["schedule"]
    return os.path.join(out, "runs", job["problem"], job["optimizer"].replace(":", "_"),
                        f"{job['phase']}-{config_hash(key)}-s{job['seed']}.json")


def _ours_class() -> Any:
    from rmsprop.torch import RMSprop

    return RMSprop


class RunFailed(RuntimeError):
    """A run raised: the message names the run and the error."""


def run_named(job: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`run_job` (looked up at call time), its failure raised as :class:`RunFailed`
    naming the run: a user model or loss that raises mid-training is an input error."""
    try:
        return sys.modules[__name__].run_job(job)
    except (KeyboardInterrupt, RunFailed):
        raise
    except Exception as e:  # noqa: BLE001 - any error of the user's problem, named below
        what = (f"{job['problem']} with {job['optimizer']} ({job['phase']}"
                + (f" trial {job['trial']}" if job.get("trial") is not None else "")
                + f", seed {job['seed']})")
        raise RunFailed(f"the run {what} failed: {_one_line(e)}") from None


def _missing_dirs(out: str) -> list[str]:
    """The folders ``out`` and its parents that do not exist yet, ``out`` first."""
    missing, d = [], os.path.abspath(out)
    while not os.path.exists(d):
        missing.append(d)
        d = os.path.dirname(d)
    return missing


def _undo_out(out: str, made: Sequence[str], run_files: bool = False) -> None:
    """Remove what this call wrote to ``out``: the folders it made (``out`` and the parents
    in ``made``, see :func:`_missing_dirs`), else, with ``run_files``, its compare.json and
    runs/ (the folder was empty but for dot files)."""
    import shutil
    if made:
        shutil.rmtree(made[0], ignore_errors=True)
        for d in made[1:]:
            with contextlib.suppress(OSError):
                os.rmdir(d)
        return
    if run_files:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(out, "compare.json"))
        shutil.rmtree(os.path.join(out, "runs"), ignore_errors=True)


def run_job(job: Mapping[str, Any]) -> dict[str, Any]:
    """Run one (problem, optimizer, hyperparameters, seed) and write its JSON atomically.

    Module-level so that worker processes can import it."""
    import torch

    from rmsprop.tools import problems as suite
    from rmsprop.tools import user_problem
    from rmsprop.tools.problems import optimizers as registry

    torch.set_num_threads(1)  # tiny models: one thread per run, runs in parallel instead
    prob = user_problem.resolve(job["problem_key"])
    spec = registry.resolve(job["optimizer"])
    hp = dict(job["hp"])
    schedule = job.get("schedule", "constant")
    n_steps = job.get("steps") or prob.steps
    built: list[str] = []
    ours = _is_ours(spec, registry)

    def make(ps: Any) -> Any:
        opt = spec.make(ps, **hp)
        if ours and not isinstance(opt, _ours_class()):
            raise RuntimeError(f"optimizer {spec.name!r} built a {type(opt).__module__}."
                               f"{type(opt).__qualname__}, not rmsprop.torch.RMSprop")
        built.append(f"{type(opt).__module__}.{type(opt).__qualname__}")
        return opt

    t0 = time.perf_counter()
    res = prob.run(registry.with_schedule(make, schedule, n_steps), seed=job["seed"],
                   steps=job.get("steps"))
    extra: dict[str, Any] = {}
    if job["phase"] == "crosscheck":
        extra["cross_check"] = _cross_check(prob, res, job)
    record = {
        "problem": prob.name, "problem_key": job["problem_key"],
        "problem_description": prob.description,
        "optimizer": spec.name, "optimizer_description": spec.description,
        "optimizer_class": built[0] if built else None,
        "phase": job["phase"], "trial": job.get("trial"),
        "hyperparameters": {**spec.defaults, **hp}, "tuned_hyperparameters": hp,
        "schedule": schedule, "search_space": job.get("space"),
        "seed": job["seed"],
        "seed_streams": {s: suite.stream_seed(job["seed"], s) for s in ("init", "order", "noise")},
        "batch_size": prob.batch_size, "steps": n_steps, "eval_every": prob.eval_every,
        "known_min": prob.known_min, "metric_name": prob.metric_name,
        "wall_seconds": time.perf_counter() - t0, "versions": job["versions"],
        "result": res.to_dict(), **extra,
    }
    path = job["path"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write_json(path, record)
    return record


def _cross_check(prob: Any, theirs: Any, job: Mapping[str, Any]) -> dict[str, Any]:
    """Compare ``torch.optim.RMSprop``'s run (``theirs``) with our ``pytorch`` preset, in this
    process (BLAS rounding depends on memory alignment, so only same-process runs can be
    bit-identical): our for-loop path (``fused=False``) must match bit for bit; our default
    path (the fused kernel where it applies) may differ in the last bit, which chaotic
    problems grow."""
    from rmsprop.tools.problems.optimizers import with_schedule

    ours = _ours_class()
    out: dict[str, Any] = {}
    n_steps = job.get("steps") or prob.steps
    paths: tuple[tuple[str, dict[str, Any]], ...] = (("forloop", {"fused": False}),
                                                      ("default", {}))
    for label, kw in paths:
        def make(ps: Any, kw: dict[str, Any] = kw) -> Any:
            return ours.from_preset("pytorch", ps, **kw)

        r = prob.run(with_schedule(make, job.get("schedule"), n_steps), seed=job["seed"],
                     steps=job.get("steps"))
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
    """Runs jobs (in-process or in a pool), reusing finished ones, with one progress bar."""

    def __init__(self, jobs: int, total: int, progress: bool) -> None:
        from tqdm import tqdm

        self.jobs = jobs
        self.bar = tqdm(total=total, unit="run", desc="compare", dynamic_ncols=True,
                        smoothing=0.05, file=sys.stderr, disable=not progress)
        self.pool: Any = None
        self.made = self.reused = 0

    def run(self, batch: Sequence[Mapping[str, Any]],
            runner: Callable[[Mapping[str, Any]], dict[str, Any]]) -> list[dict[str, Any]]:
        results: list[dict[str, Any] | None] = [None] * len(batch)
        todo = []
        for i, job in enumerate(batch):
            rec = _load(job["path"])
            if rec is not None:
                results[i] = rec
                self.reused += 1
                self.bar.update(1)
            else:
                todo.append(i)
        if self.jobs <= 1:
            for i in todo:
                results[i] = runner(batch[i])
                self.made += 1
                self.bar.update(1)
        elif todo:
            import concurrent.futures as cf
            import multiprocessing as mp

            if self.pool is None:
                # fork: the workers inherit the problems loaded or registered in this process
                # (spawn would re-import __main__, which breaks `python -m` entry points)
                ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
                self.pool = cf.ProcessPoolExecutor(self.jobs, mp_context=ctx,
                                                   initializer=_worker_init)
            futs = {self.pool.submit(runner, batch[i]): i for i in todo}
            for fut in cf.as_completed(futs):
                results[futs[fut]] = fut.result()
                self.made += 1
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


@dataclass(frozen=True)
class Results:
    """What :func:`run` did: the folder, the records, the report and its verdicts."""

    out: str
    plan: Plan
    records: tuple[dict[str, Any], ...] = field(repr=False)
    report: Any = field(repr=False)
    elapsed: float
    made: int
    reused: int

    @property
    def verdicts(self) -> dict[str, str]:
        """``{claim: "yes" | "partly" | "no" | "not shown"}``."""
        return {c.title: c.verdict for c in self.report.claims}

    @property
    def table(self) -> str:
        """The summary table the command prints."""
        return self.report.table

    @property
    def report_path(self) -> str:
        return self.report.path


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def run(problems: str | Sequence[Any] | None = None,
        optimizers: str | Sequence[str] | None = None, *, suite: str = "quick",
        seeds: int | None = None, trials: int | None = None, search: str = "sobol",
        schedule: str | None = None, steps: int | None = None, jobs: int | None = None,
        out: str | os.PathLike | None = None, plots: bool = True, progress: bool = True,
        log: Callable[[str], None] | None = _log, command: str | None = None) -> Results:
    """Run the comparison and write the report; see the module docstring for the protocol.

    ``problems``: suite names, import paths ``"pkg.module:make_problem"`` (a function returning
    a :class:`~rmsprop.tools.problems.base.Problem`, e.g. a ``ModelProblem``) or Problem objects;
    a string may hold several, comma-separated; default: the suite's. ``optimizers``: registered
    names or ``"pkg.module:Class"`` (any ``torch.optim.Optimizer``). ``out``: the folder (default
    a new ``compare-YYYYmmdd-HHMMSS`` in the working directory); the same folder with the same
    options resumes. ``log`` gets the progress lines (``None``: silent).

    Raises :class:`CompareError` (a ``ValueError`` with a one-line message) for bad options
    before anything is written; ``KeyboardInterrupt`` after keeping the finished runs.
    """
    def say(msg: str) -> None:
        if log is not None:
            log(msg)

    p = plan(problems, optimizers, suite=suite, seeds=seeds, trials=trials, search=search,
             schedule=schedule, steps=steps, jobs=jobs)
    out = os.fspath(out) if out is not None else os.path.join(
        os.getcwd(), datetime.now().strftime("compare-%Y%m%d-%H%M%S"))
    identity = p.identity()
    made = _missing_dirs(out)
    try:
        resumed = prepare_out(out, identity)
    except CompareError:
        _undo_out(out, made)
        raise
    for d, _, files in os.walk(os.path.join(out, "runs")):
        for f in files:
            if ".json.tmp" in f:  # left by a run killed mid-write
                os.remove(os.path.join(d, f))
    versions = _versions()
    if p.skipped:
        say("rmsprop compare: skipping " + "; ".join(p.skipped))
    meta = {"identity": identity, **p.report_cfg(),
            "command": command or "rmsprop.tools.compare.run(...)", "versions": versions}
    if not resumed:
        _write_json(os.path.join(out, "compare.json"), meta)

    seed_list = list(range(1, p.seeds + 1))
    common = {"versions": versions, "steps": p.steps, "schedule": p.schedule}

    def job(prob: str, opt: str, phase: str, hp: Mapping[str, Any], seed: int,
            trial: int | None = None) -> dict[str, Any]:
        j = {"problem": prob, "problem_key": p.sources[prob], "optimizer": opt, "phase": phase,
             "hp": dict(hp), "seed": seed, "trial": trial,
             "space": [d.describe() for d in p.spaces[opt]], **common}
        j["path"] = _job_path(out, j)
        return j

    configs = {o: tuning_configs(p.specs[o], p.spaces[o], p.trials, p.search)
               for o in p.optimizers}
    first: list[dict[str, Any]] = []
    for prob in p.problems:
        for o in p.optimizers:
            first += [job(prob, o, "tune", hp, 0, i) for i, hp in enumerate(configs[o])]
            first += [job(prob, o, "default", {}, s) for s in seed_list]
        if p.cross_check:
            first.append(job(prob, CROSS_CHECK, "crosscheck", {}, seed_list[0]))
    n_tuned = len(p.problems) * len(p.optimizers) * len(seed_list) if p.trials else 0
    total = len(first) + n_tuned
    if resumed:
        done = sum(_load(j["path"]) is not None for j in first)
        say(f"rmsprop compare: resuming {out}: {done} of the first {len(first)} runs are done "
            "and will be reused")
    say(f"rmsprop compare: {len(p.problems)} problem(s) x {len(p.optimizers)} optimizers, "
        f"{p.trials} tuning trials ({p.search}) + defaults, {p.seeds} seeds, {p.schedule} lr, "
        f"{p.jobs} jobs -> {out}")
    t_start = time.perf_counter()
    runner = _Runner(p.jobs, total, progress)
    run_one = run_named
    try:
        records = runner.run(first, run_one)
        if p.trials:
            from rmsprop.tools.report import select_best

            tuned = []
            for prob in p.problems:
                for o in p.optimizers:
                    trials_ = [r for r in records if r["problem"] == prob
                               and r["optimizer"] == o and r["phase"] == "tune"]
                    best = select_best(trials_)
                    tuned += [job(prob, o, "tuned", best["tuned_hyperparameters"], s)
                              for s in seed_list]
            records += runner.run(tuned, run_one)
    except KeyboardInterrupt:
        runner.close(cancel=True)
        say(f"\nrmsprop compare: interrupted; {runner.made} new runs kept in {out}; run the "
            f"same command with --out {out} to resume")
        raise
    except RunFailed as e:
        runner.close(cancel=True)
        if runner.made == 0 and not resumed:  # nothing to resume: leave no trace
            _undo_out(out, made, run_files=True)
            raise CompareError(f"{e}; nothing was kept") from None
        raise CompareError(f"{e}; {runner.made} finished runs kept in {out}: fix it and run "
                           f"the same command with --out {out} to resume") from None
    runner.close()
    elapsed = time.perf_counter() - t_start
    if resumed:
        say(f"rmsprop compare: {runner.made} runs made, {runner.reused} reused from {out}")

    from rmsprop.tools.report import write_report

    spaces = {o: {d.name: d for d in p.spaces[o]} for o in p.optimizers}
    rep = write_report(out, records, p.report_cfg(), problems=p.objects, spaces=spaces,
                       versions=versions, elapsed=elapsed, plots=plots)
    return Results(out, p, tuple(records), rep, elapsed, runner.made, runner.reused)
