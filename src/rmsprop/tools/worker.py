"""Tuning workers: run trials of one study until it holds exactly N completed trials.

Any number of workers (threads of one command, local processes, other machines) can run on one
study at once. Built on Optuna's public protocol:

* ``study.optimize`` with :class:`optuna.study.MaxTrialsCallback` ``(n, states=(COMPLETE,))``
  stops a worker once the study holds ``n`` completed trials, and a second one counting
  ``(COMPLETE, RUNNING)`` stops it from asking for a trial the study does not need while other
  workers hold the last ones (it waits instead, in case one of them dies);
* trials are ranked by number: a trial that two workers started at once for the last slot is
  *surplus*; it is pruned before it samples or trains anything (user attribute ``surplus``) and
  never counted;
* a worker that dies leaves a RUNNING trial. It is failed at once when its process is known
  dead on this host (user attribute ``worker`` = ``[host/boot, pid]``), else when its heartbeat
  is older than the grace period: Optuna's own for an RDB storage
  (:func:`optuna.storages.fail_stale_trials`), the user attribute ``heartbeat`` refreshed by
  the worker for a journal file; one that died before either beat, by its start time. The
  failed trial's parameters are re-queued by Optuna's retry callback (same parameters,
  ``failed_trial`` pointing back), so no grid point is lost;
* Ctrl-C re-queues the trial being run the same way and exits without a traceback.

Worker processes receive their configuration on stdin, never on the command line, so a storage
password does not show in ``ps``: ``python -m rmsprop.tools.worker < config.json``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rmsprop.tools.objective import evaluate, resolve_optimizer, resolve_problem
from rmsprop.tools.search_space import grid_points
from rmsprop.tools.storage import has_heartbeat, open_storage, retry_callback
from rmsprop.tools.study import TuneConfig, TuneError, counts, open_study

__all__ = ["reap_stale", "run_processes", "run_worker", "worker_main"]

#: user attributes a worker writes on its trials
WORKER_ATTR, BEAT_ATTR = "worker", "heartbeat"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


#: This host and boot: a pid recorded under another host (or before a reboot) says nothing.
HOST = f"{socket.gethostname()}/{_boot_id()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reaper(study: Any, storage: Any) -> Any:
    """A second handle on ``study`` whose sampler does nothing after a trial: failing another
    worker's trial must not run the grid sampler's bookkeeping (it may stop an optimize loop
    this process is not in)."""
    import optuna

    return optuna.load_study(study_name=study.study_name, storage=storage,
                             sampler=optuna.samplers.RandomSampler(seed=0))


def _fail_and_requeue(study: Any, reaper: Any, number: int) -> bool:
    """Mark trial ``number`` FAIL and re-queue its parameters; False when another process
    finished it first (then that process re-queues it, or it completed)."""
    from optuna.trial import TrialState

    try:
        frozen = reaper.tell(number, state=TrialState.FAIL)
    except Exception:  # noqa: BLE001 - finished meanwhile (ValueError, UpdateFinishedTrialError)
        return False  # or a lost write race (SQLite busy snapshot): the winner re-queues it
    retry_callback()(study, frozen)
    return True


def reap_stale(study: Any, storage: Any, grace: float, *, reaper: Any = None) -> list[int]:
    """Fail the RUNNING trials whose worker is gone and re-queue them; return their numbers.

    Gone: its process no longer exists on this host (at once), or its heartbeat is older than
    ``grace`` seconds (Optuna's for an RDB storage, which also re-queues; the ``heartbeat``
    user attribute, else the start time, for a journal file).
    """
    import optuna
    from optuna.trial import TrialState

    if has_heartbeat(storage):
        optuna.storages.fail_stale_trials(study)  # runs the storage's retry callback itself
    reaper = reaper or _reaper(study, storage)
    now = time.time()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(WORKER_ATTR)
        host, pid = (list(owner or []) + [None, None])[:2]
        dead = host == HOST and isinstance(pid, int) and not _pid_alive(pid)
        if not dead and (owner is None or not has_heartbeat(storage)):
            # A journal trial: the worker's own beat. A trial whose worker never wrote its
            # name died between Optuna's ask and training, maybe before Optuna's first
            # heartbeat (fail_stale_trials skips trials that never beat): its start time.
            beat = t.user_attrs.get(BEAT_ATTR)
            if beat is None and t.datetime_start is not None:
                beat = t.datetime_start.timestamp()
            dead = beat is not None and now - float(beat) > grace
        if dead and _fail_and_requeue(study, reaper, t.number):
            failed.append(t.number)
    return failed


class _TrialError(Exception):
    """A training run raised: the trial is FAIL, its parameters are re-queued, the run stops."""

    def __init__(self, number: int, error: BaseException) -> None:
        first = (str(error).strip().splitlines() or [""])[0]
        super().__init__(f"{type(error).__name__}: {first}")
        self.number = number


def _beat(trial: Any, every: float, stop: threading.Event) -> None:
    """Refresh the trial's ``heartbeat`` attribute until ``stop`` is set (journal storages)."""
    while True:
        try:
            trial.set_user_attr(BEAT_ATTR, time.time())
        except Exception:  # noqa: BLE001 - the trial was finished meanwhile
            return
        if stop.wait(every):
            return


def _ahead(study: Any, number: int) -> int:
    """Trials that rank before trial ``number``: every COMPLETE one and every RUNNING one
    started under a smaller number."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False,
                                           states=(TrialState.COMPLETE, TrialState.RUNNING))
               if t.state == TrialState.COMPLETE or t.number < number)


def _unvisited_grid(study: Any, cfg: TuneConfig) -> bool:
    from optuna.trial import TrialState

    done = {tuple(sorted(t.params.items()))
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    return any(tuple(sorted(p.items())) not in done for p in grid_points(cfg.space))


class _Interrupts:
    """Ctrl-C (SIGINT) while this worker runs: a ``KeyboardInterrupt`` at once inside training
    (a run can be abandoned anywhere), held until the next :meth:`check` elsewhere: torn out of
    an Optuna storage write, it could leave a journal file's lock behind or a trial half-made.
    Installed only in the main thread (where Python runs signal handlers)."""

    def __init__(self) -> None:
        self.pending = False
        self.training = False
        self._old: Any = None

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)

    def _handle(self, _signum: int, _frame: Any) -> None:
        if self.training:
            raise KeyboardInterrupt
        self.pending = True

    def check(self) -> None:
        """Raise the held interrupt, if any."""
        if self.pending:
            raise KeyboardInterrupt

    def train(self, run: Callable[[], Any]) -> Any:
        """``run()`` with Ctrl-C raising at once."""
        self.check()
        self.training = True
        try:
            return run()
        finally:
            self.training = False


def limit_threads(jobs: int) -> None:
    """Small models train fastest on one thread per worker; extra threads only contend."""
    n = max(1, (os.cpu_count() or 1) // max(jobs, 1) // 2)
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(max(1, min(torch.get_num_threads(), n)))
    else:  # read by torch when a problem first imports it
        os.environ.setdefault("OMP_NUM_THREADS", str(n))


def run_worker(cfg: TuneConfig, *, storage: Any = None,
               on_trial: Callable[[int], None] | None = None) -> int:
    """Run trials of ``cfg.study`` until it holds ``cfg.trials`` COMPLETE trials; return how
    many this worker completed. Safe in several processes or machines at once."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    problem = resolve_problem(cfg.problem)
    spec = resolve_optimizer(cfg.optimizer)
    limit_threads(cfg.jobs)
    if storage is None:
        storage = open_storage(cfg.storage, heartbeat=cfg.heartbeat, grace=cfg.grace)
    study = open_study(cfg, storage)
    reaper = _reaper(study, storage)
    own_beat = not has_heartbeat(storage)
    n = cfg.target_trials
    done_here = 0
    current: list[int] = []  # the trial this worker is running (for Ctrl-C)
    poll = min(1.0, cfg.heartbeat / 2)

    def objective(trial: Any) -> float:
        current[:] = [trial.number]
        try:
            interrupts.check()
            return measure(trial)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise

    def measure(trial: Any) -> float:
        if _ahead(study, trial.number) >= n:
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned("surplus: the study already holds its last trials")
        hp = {p.name: p.value(trial.suggest_float(p.key, *p.bounds(), log=p.log))
              for p in cfg.space}
        # Written last before training: by then Optuna's heartbeat (RDB) beats for the trial.
        trial.set_user_attr(WORKER_ATTR, [HOST, os.getpid()])
        stop_beat = threading.Event()
        beater = None
        if own_beat:
            beater = threading.Thread(target=_beat, args=(trial, cfg.heartbeat, stop_beat),
                                      daemon=True)
            beater.start()
        try:
            ev = interrupts.train(lambda: evaluate(
                problem, spec, hp, seed=cfg.train_seed, objective=cfg.objective,
                target=cfg.target, steps=cfg.steps))
        except Exception as e:
            msg = (str(e).strip().splitlines() or [""])[0]
            trial.set_user_attr("error", f"{type(e).__name__}: {msg}")
            raise _TrialError(trial.number, e) from e
        finally:
            stop_beat.set()
            if beater is not None:
                beater.join()
        # Each attribute is one storage write (one SQLite commit): keep the count small.
        trial.set_user_attr("diverged", ev.diverged)
        trial.set_user_attr("run", {k: v for k, v in ev.attrs.items() if k != "diverged"})
        return ev.value

    def after(_study: Any, frozen: Any) -> None:
        nonlocal done_here
        current.clear()
        if frozen.state == TrialState.COMPLETE:
            done_here += 1
            if on_trial is not None:
                on_trial(frozen.number)

    callbacks = [
        after,
        MaxTrialsCallback(n, states=(TrialState.COMPLETE,)),  # the study is done
        MaxTrialsCallback(n, states=(TrialState.COMPLETE, TrialState.RUNNING)),  # full for now
    ]
    with _Interrupts() as interrupts:
        while True:
            interrupts.check()
            reap_stale(study, storage, cfg.grace, reaper=reaper)
            c = counts(study)
            if c["COMPLETE"] >= n:
                break
            if c["COMPLETE"] + c["RUNNING"] >= n:
                interrupts.train(lambda: time.sleep(poll))  # others hold the last trials
                continue
            if cfg.sampler == "grid" and c["WAITING"] == 0 and not _unvisited_grid(study, cfg):
                break  # every grid point is complete
            try:
                study.optimize(objective, callbacks=callbacks, gc_after_trial=False)
            except _TrialError as e:
                # Re-queue the point so a resumed run retries it (a grid keeps no hole), then
                # stop: an error that is not divergence needs a look, not a thousand failures.
                _requeue_own(study, e.number)
                raise TuneError(f"trial {e.number} failed: {e} (parameters re-queued; fix "
                                "the cause and re-run the same command to resume)") from None
            except KeyboardInterrupt:
                if current:
                    _requeue_own(study, current[0])
                raise
        interrupts.check()
    return done_here


def _requeue_own(study: Any, number: int) -> None:
    """Re-queue this worker's own trial ``number`` once Optuna has marked it FAIL."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if t.number == number:
            retry_callback()(study, t)
            return


def worker_main() -> int:
    """Entry point of a worker process: the configuration (JSON) arrives on stdin."""
    try:
        cfg = TuneConfig.from_json(sys.stdin.read())
        run_worker(cfg)
    except TuneError as e:
        print(f"rmsprop tune worker: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _log_dir(out: str | None) -> Path:
    """A fresh folder for this run's worker logs: ``OUT/worker-logs/run-K`` (never reused, so a
    re-run from the same folder keeps the previous runs' logs)."""
    base = (Path(out) if out else Path.cwd()) / "worker-logs"
    base.mkdir(parents=True, exist_ok=True)
    k = 1
    while True:
        d = base / f"run-{k}"
        try:
            d.mkdir()
            return d
        except FileExistsError:
            k += 1


def run_processes(cfg: TuneConfig, study: Any, bar: Any) -> Path:
    """Run ``cfg.jobs`` worker processes on ``study`` until they end; return their log folder.

    Each worker gets the configuration on stdin (no secret on a command line) and its own
    session, so Ctrl-C reaches only this process, which then interrupts the workers (each
    re-queues its trial) before re-raising.
    """
    logdir = _log_dir(cfg.out)
    wcfg = dataclasses.replace(cfg, jobs=1, progress=False).to_json()
    env = dict(os.environ)
    # Each worker is one process; keep torch from oversubscribing the cores between them.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.jobs // 2)))
    procs, logs = [], []
    try:
        for i in range(cfg.jobs):
            f = open(logdir / f"worker-{i}.log", "w")  # noqa: SIM115 - closed in finally
            logs.append(f)
            p = subprocess.Popen([sys.executable, "-m", "rmsprop.tools.worker"],
                                 stdin=subprocess.PIPE, stdout=f, stderr=subprocess.STDOUT,
                                 env=env, text=True, start_new_session=True)
            procs.append(p)
            assert p.stdin is not None
            p.stdin.write(wcfg)
            p.stdin.close()
        while any(p.poll() is None for p in procs):
            _sync_bar(bar, study)
            time.sleep(0.5)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        raise
    finally:
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    _sync_bar(bar, study)
    bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode]
    if bad and counts(study)["COMPLETE"] < cfg.target_trials:
        i, rc = bad[0]
        tail = (logdir / f"worker-{i}.log").read_text().strip().splitlines()[-1:] or [""]
        raise TuneError(f"worker {i} exited with status {rc}: {tail[0]}")
    return logdir


def _sync_bar(bar: Any, study: Any) -> None:
    n = counts(study)["COMPLETE"]
    if n > bar.n:
        bar.update(n - bar.n)


if __name__ == "__main__":
    sys.exit(worker_main())
