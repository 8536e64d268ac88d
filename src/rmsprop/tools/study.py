"""A tuning study: its configuration, its Optuna study and its sampler.

:class:`TuneConfig` holds everything that defines a search; :meth:`TuneConfig.identity` is what
a resumed study must match (stored as a study user attribute, so a second command with other
options is refused instead of mixing two searches). Samplers are deterministic functions of
``(seed, trial number)``: the grid is Optuna's :class:`~optuna.samplers.GridSampler`, random and
Sobol points come from :func:`rmsprop.tools.search_space.unit_point`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rmsprop.tools.search_space import SAMPLERS, Param, grid_points, unit_point
from rmsprop.tools.storage import DEFAULT_STORAGE, open_storage, quiet_optuna, redact, scrub

__all__ = [
    "OBJECTIVES",
    "PENALTY",
    "TuneConfig",
    "TuneError",
    "check_out",
    "counts",
    "make_sampler",
    "open_study",
]

#: Objective value recorded for a diverged trial: large and finite, so that samplers, importances
#: and CSV readers see a number, while the ``diverged`` user attribute says what happened.
PENALTY = 1e9

OBJECTIVES = ("loss", "steps")
#: Study user attribute holding the configuration that defines the study.
_ATTR = "rmsprop_tune"


class TuneError(ValueError):
    """An input the user can fix (bad option, mismatched resume, a trial that crashed...)."""


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
    #: what a user problem is (:func:`~rmsprop.tools.user_problem.fingerprint`; ``{}`` for a
    #: suite problem), so that one edited since the study began is not resumed
    problem_fingerprint: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise TuneError(f"unknown sampler {self.sampler!r}; choose {', '.join(SAMPLERS)}")
        if self.objective not in OBJECTIVES:
            raise TuneError(f"unknown objective {self.objective!r}; choose loss or steps")
        if self.objective == "steps" and self.target is None:
            raise TuneError("--objective steps needs --target (a validation loss to reach)")
        if self.target is not None and self.objective != "steps":
            raise TuneError("--target is used only with --objective steps")
        if self.target is not None and not math.isfinite(self.target):
            raise TuneError(f"--target must be a finite loss, got {self.target}")
        for flag, name in (("--problem", "problem"), ("--optimizer", "optimizer")):
            if not isinstance(getattr(self, name), str):
                raise TuneError(f"{flag} must be a string, got {getattr(self, name)!r:.60}")
        if self.study is not None and not isinstance(self.study, str):
            raise TuneError(f"--study must be a string, got {self.study!r:.60}")
        if self.study is not None and not self.study.strip():
            raise TuneError("--study must not be empty")
        for flag, value, low in (("--seed", self.seed, 0), ("--train-seed", self.train_seed, 0),
                                 ("--trials", self.trials, 1), ("--steps", self.steps, 1),
                                 ("--jobs", self.jobs, 1),
                                 ("--confirm-seeds", self.confirm_seeds, 0)):
            if value is None and flag in ("--trials", "--steps"):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TuneError(f"{flag} must be an integer, got {value!r:.60}")
            if value < low:
                raise TuneError(f"{flag} must be >= {low}, got {value}")
        if self.heartbeat < 1 or self.grace <= self.heartbeat:
            raise TuneError("need --heartbeat >= 1 s and --grace > --heartbeat")
        if self.study is None:
            self.study = (f"{_slug(self.problem.lstrip('@'))}-{_slug(self.optimizer)}-"
                          f"{self.sampler}")
        self.space = [p if isinstance(p, Param) else Param(**p) for p in self.space]
        if self.sampler == "grid":
            n = len(grid_points(self.space))
            self.trials = n if self.trials is None else min(self.trials, n)
        elif self.trials is None:
            self.trials = 16

    @property
    def target_trials(self) -> int:
        """The number of COMPLETE trials the study must end with."""
        return int(self.trials or 0)

    def identity(self) -> dict[str, Any]:
        """The options a resumed study must share (JSON-able)."""
        if self.problem_fingerprint is None:  # computed once, then carried to the workers
            from rmsprop.tools.user_problem import fingerprint

            self.problem_fingerprint = fingerprint(self.problem) or {}
        return {
            "problem": self.problem, "optimizer": self.optimizer, "sampler": self.sampler,
            "seed": self.seed, "objective": self.objective, "target": self.target,
            "steps": self.steps, "train_seed": self.train_seed,
            "space": [p.to_json() for p in self.space],
            **{f"problem_{k}": v for k, v in (self.problem_fingerprint or {}).items()},
        }

    def to_json(self) -> str:
        """The whole configuration as JSON (:meth:`from_json` reads it back)."""
        d = dataclasses.asdict(self)
        d["space"] = [p.to_json() for p in self.space]
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> TuneConfig:
        """Inverse of :meth:`to_json`."""
        return cls(**json.loads(text))


def _slug(name: str) -> str:
    """A study-name part for a problem or optimizer name (``pkg.mod:attr`` -> ``pkg.mod-attr``)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def _holds_report_of(path: Path, cfg: TuneConfig) -> bool:
    """Whether ``path`` holds a report of ``cfg``'s study (its ``best.json`` says so; whether
    the study's options match is :func:`open_study`'s to say)."""
    try:
        best = json.loads((path / "best.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(best, dict) and best.get("study") == cfg.study


def check_out(out: str | os.PathLike[str] | None, cfg: TuneConfig | None = None) -> None:
    """Refuse a report folder that cannot be one: an existing file, an unwritable folder, or
    (given ``cfg``) a non-empty folder that holds no report of the same study, whose files
    the report would overwrite."""
    if out is None:
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise TuneError(f"--out {str(path)!r} exists and is not a folder")
    if cfg is not None and path.is_dir() and not _holds_report_of(path, cfg):
        # dot files and the worker logs of an earlier attempt are not the user's
        if any(not n.startswith(".") and n != "worker-logs" for n in os.listdir(path)):
            raise TuneError(f"--out {str(path)!r} is not empty and holds no report of study "
                            f"{cfg.study!r}: give a new or empty folder")
    # tried, not predicted (permission bits do not bind root, nor tell a read-only or
    # pseudo file system), and undone: the folder is made when the report is written
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    made: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            made.append(d)
        probe = path / f".write-test-{os.getpid()}"
        probe.open("w").close()
        probe.unlink()
    except OSError as e:
        raise TuneError(f"--out {str(path)!r} cannot be written: {e.strerror or e}") from None
    finally:
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()


class _DeterministicSampler:
    """Random or scrambled-Sobol points that depend only on ``(seed, point index)``.

    Optuna's RandomSampler/QMCSampler draw from per-process state, so K workers started with
    the same seed would propose the same points, and a resumed study would not replay the same
    sequence; indexing by the trial's place fixes both. The index is the trial number less
    the retries numbered before it: a retry (a failed or interrupted trial re-queued with its
    parameters, Optuna's ``failed_trial`` attribute) re-runs its point and draws none, so
    after a Ctrl-C and resume the study still tries points 0, 1, 2, ... as an uninterrupted
    run and :func:`rmsprop.tools.search_space.suggest` do.
    """

    def __init__(self, kind: str, seed: int, space: Sequence[Param]) -> None:
        self.kind, self.seed, self.space = kind, int(seed), list(space)
        self._cache: dict[int, list[float]] = {}

    def unit_point(self, study: Any, number: int) -> list[float]:
        if number not in self._cache:  # one trial at a time per process
            trials = {t.number: t for t in study.get_trials(deepcopy=False)}
            index = self._index(trials, number)
            self._cache = {number: unit_point(self.kind, self.seed, index, len(self.space))}
        return self._cache[number]

    @staticmethod
    def _index(trials: dict[int, Any], number: int) -> int:
        """The point of trial ``number``: a retry's is its failed trial's (it draws only the
        coordinates that trial had not drawn when it stopped), a fresh trial's its number
        less the retries numbered before it."""
        t = trials.get(number)
        original = t.system_attrs.get("failed_trial") if t is not None else None
        if original is not None and original != number:
            return _DeterministicSampler._index(trials, int(original))
        return number - sum(1 for k, u in trials.items()
                            if k < number and "failed_trial" in u.system_attrs)

    def make(self) -> Any:
        import optuna

        outer = self

        class Sampler(optuna.samplers.BaseSampler):
            def infer_relative_search_space(self, study, trial):  # noqa: ANN001, ANN202
                return {}

            def sample_relative(self, study, trial, search_space):  # noqa: ANN001, ANN202
                return {}

            def sample_independent(self, study, trial, name, dist):  # noqa: ANN001, ANN202
                keys = [p.key for p in outer.space]
                if name not in keys:
                    raise RuntimeError(f"parameter {name!r} is not in the search space")
                i = keys.index(name)
                return outer.space[i].from_unit(outer.unit_point(study, trial.number)[i])

        return Sampler()


def make_sampler(cfg: TuneConfig) -> Any:
    """The Optuna sampler of ``cfg``: the grid, or the deterministic random/Sobol sequence."""
    import optuna

    if cfg.sampler == "grid":
        return optuna.samplers.GridSampler({p.key: p.grid() for p in cfg.space}, seed=cfg.seed)
    return _DeterministicSampler(cfg.sampler, cfg.seed, cfg.space).make()


def open_study(cfg: TuneConfig, storage: Any = None, *, create: bool = True) -> Any:
    """Create or load ``cfg.study`` in ``storage`` (opened from ``cfg.storage`` when None);
    refuse a study created with a different configuration. Nothing is written on refusal."""
    import optuna

    quiet_optuna()
    if storage is None:
        storage = open_storage(cfg.storage, heartbeat=cfg.heartbeat, grace=cfg.grace)
    sampler = make_sampler(cfg)
    try:
        try:
            study = optuna.load_study(study_name=cfg.study, storage=storage, sampler=sampler)
        except KeyError:
            if not create:
                raise TuneError(f"no study {cfg.study!r} in "
                                f"{redact(str(cfg.storage))}") from None
            study = optuna.create_study(study_name=cfg.study, storage=storage, sampler=sampler,
                                        direction="minimize", load_if_exists=True)
        existing = study.user_attrs.get(_ATTR)
    except TuneError:
        raise
    except Exception as e:  # storage-specific errors (locked, dropped connection...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TuneError(f"cannot open study {cfg.study!r}: {scrub(msg, cfg.storage)}") from None
    want = json.loads(json.dumps(cfg.identity()))
    if existing is None:
        study.set_user_attr(_ATTR, want)
    elif existing != want:
        diff = [k for k in [*want, *(k for k in existing if k not in want)]
                if existing.get(k) != want.get(k)]
        raise TuneError(f"study {cfg.study!r} exists with a different {', '.join(diff)}; "
                        "resume it with the same options or pick another --study")
    return study


def counts(study: Any) -> dict[str, int]:
    """Trials of ``study`` by state name (every state present, zeros included)."""
    from optuna.trial import TrialState

    out = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] += 1
    return out
