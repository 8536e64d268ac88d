"""Tests of ``rmsprop tune`` (src/rmsprop/tools/{search_space,storage,study,objective,worker,
tune_report,tuning}.py, src/rmsprop/cli/tune.py).

The searches run on a toy problem written to a temporary module: a 2-D quadratic (a real
``Problem``, loaded through the user-problem loader as ``--problem tune_toy_mod:PROBLEM``) trained
by ``torch.optim.RMSprop``, so each trial costs milliseconds and its outcome is known
independently of the tuning code (the oracle below trains it directly).
Oracles: the grid is rebuilt from its definition (10**(k/5) lattice x {0.9, 0.95, 0.99, 0.995,
0.999}); the best configuration is the argmin of the toy evaluated directly; resume/parallel
tests count trial states straight from the Optuna storage; the workers' command lines are read
from /proc while they run.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

TOY = textwrap.dedent('''
    """A toy problem and optimizer for the tune tests."""
    import os, time
    from types import SimpleNamespace

    import torch

    from rmsprop.tools.problems.base import Problem, Task

    H = torch.tensor([1.0, 10.0], dtype=torch.float64)

    def make(params, lr=0.01, alpha=0.99):
        return torch.optim.RMSprop(params, lr=lr, alpha=alpha)

    SPEC = SimpleNamespace(name="toy-rms", factory=make, defaults={"lr": 0.01, "alpha": 0.99},
                           search_space={"lr": ("log", 1e-4, 1.0),
                                         "alpha": ("log1m", 0.9, 0.9999)},
                           make=make)

    class Toy(Problem):
        def build(self, seed):
            x = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64) + 0.01 * seed)
            f = lambda: 0.5 * (H * x * x).sum()
            def evaluate(split):
                with torch.no_grad():
                    return float(f()), None
            return Task(params=[x], train_loss=f, evaluate=evaluate)

        def run(self, factory, *, seed, steps=None, split="valid"):
            time.sleep(float(os.environ.get("TOY_SLEEP", "0")))
            return super().run(factory, seed=seed, steps=steps, split=split)

    PROBLEM = Toy(name="toy", description="2-D quadratic", steps=40, eval_every=10,
                  batch_size=None, known_min=0.0)

    class Broken(Toy):
        def run(self, factory, *, seed, steps=None, split="valid"):
            raise RuntimeError("boom\\nsecond line")

    BROKEN = Broken(name="broken", description="raises", steps=40, eval_every=10,
                    batch_size=None, known_min=0.0)

    def make_problem():
        """A factory, as a user writes one: a fresh problem per call."""
        return Toy(name="toy-made", description="2-D quadratic", steps=40, eval_every=10,
                   batch_size=None, known_min=0.0)

    NOT_A_PROBLEM = 42
''')

DECAYS = [0.9, 0.95, 0.99, 0.995, 0.999]


@pytest.fixture()
def toy(tmp_path, monkeypatch):
    """Write the toy module; return a runner of the real CLI (in-process or subprocess)."""
    mod = tmp_path / "tune_toy_mod.py"
    mod.write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO / "src"),
                                         env.get("PYTHONPATH", "")])
    return tmp_path, env


BASE = ["tune", "--problem", "tune_toy_mod:PROBLEM", "--optimizer", "tune_toy_mod:SPEC",
        "--no-progress", "--confirm-seeds", "2", "--no-plots"]

# Only the tune tool is loaded, so these tests do not depend on the other subcommands.
SHIM = "import sys, rmsprop.cli as c; c.TOOLS = ('tune',); sys.exit(c.main(sys.argv[1:]))"


def cli(args, capsys=None):
    import rmsprop.cli as c

    old = c.TOOLS
    c.TOOLS = ("tune",)
    try:
        rc = c.main(list(args))
    finally:
        c.TOOLS = old
    if capsys is not None:
        return rc, capsys.readouterr()
    return rc, None


def spawn(args, env, **kw):
    return subprocess.Popen([sys.executable, "-c", SHIM, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def load(storage, name):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if storage.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            storage = JournalStorage(JournalFileBackend(storage[len("journal:"):]))
        return optuna.load_study(study_name=name, storage=storage)


def states(study):
    out = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state] = out.get(t.state, 0) + 1
    return out


def complete_params(study):
    return [tuple(sorted(t.params.items()))
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


def toy_value(lr, alpha):
    """Independent oracle: evaluate the toy directly (no tuning code involved)."""
    import torch
    import tune_toy_mod as m

    r = m.PROBLEM.run(lambda ps: torch.optim.RMSprop(ps, lr=lr, alpha=alpha), seed=0)
    return math.inf if r.diverged else r.final_eval_loss


# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_grid_visits_exactly_the_grid_and_reports(toy, capsys):
    tmp, _ = toy
    db = f"sqlite:///{tmp / 'g.db'}"
    args = [a for a in BASE if a != "--no-plots"]
    rc, out = cli([*args, "--sampler", "grid", "--range", "lr=0.03:0.1", "--storage", db,
                   "--study", "g", "--out", str(tmp / "rep")], capsys)
    assert rc == 0, out.err
    lrs = [10 ** (k / 5) for k in range(-7, -4)]  # 5 points per decade within 0.03 .. 0.1
    expected = sorted(itertools.product(lrs, DECAYS))
    study = load(db, "g")
    got = sorted((t.params["lr"], 1 - t.params["one_minus_alpha"])
                 for t in study.get_trials(states=(TrialState.COMPLETE,)))
    assert len(got) == len(expected) == 15
    for (a, b), (c, d) in zip(got, expected):
        assert a == pytest.approx(c, rel=1e-9) and b == pytest.approx(d, abs=1e-12)
    assert states(study) == {TrialState.COMPLETE: 15}

    best = json.loads((tmp / "rep" / "best.json").read_text())
    oracle = min(expected, key=lambda p: toy_value(*p))
    assert best["best_hp"]["lr"] == pytest.approx(oracle[0], rel=1e-9)
    assert best["best_hp"]["alpha"] == pytest.approx(oracle[1], abs=1e-12)
    assert best["best_value"] == pytest.approx(toy_value(*oracle), rel=1e-12)
    assert best["confirm"]["seeds"] == [1, 2] and len(best["confirm"]["values"]) == 2
    for f in ("trials.csv", "heatmap.png", "lr_sensitivity.png", "best_of_k.png", "README.md"):
        assert (tmp / "rep" / f).stat().st_size > 0, f
    assert "optuna-dashboard " in (tmp / "rep" / "README.md").read_text()
    assert "lr: log-uniform in [0.03, 0.1]; grid: 0.0398107, 0.0630957, 0.1" in out.out
    assert "grid: 0.9, 0.95, 0.99, 0.995, 0.999" in out.out
    assert "best: lr=" in out.out


def test_default_spaces_follow_the_protocol():
    """RMSProp and Adam get the same 2-D space: lr 5 points per decade, decay grid of five."""
    problems = pytest.importorskip("rmsprop.tools.problems")
    from rmsprop.tools import tuning
    from rmsprop.tools.problems import optimizers

    for name, decay in (("rmsprop", "alpha"), ("adam", "beta2")):
        space = tuning.build_space(optimizers.resolve(name))
        assert [p.name for p in space] == ["lr", decay]
        lr, dec = space
        lo, hi = optimizers.resolve(name).search_space["lr"][1:]
        k0, k1 = round(5 * math.log10(lo)), round(5 * math.log10(hi))
        assert [lr.value(x) for x in lr.grid()] == pytest.approx(
            [10 ** (k / 5) for k in range(k0, k1 + 1)], rel=1e-9)
        assert sorted(dec.value(x) for x in dec.grid()) == pytest.approx(DECAYS, abs=1e-12)
    assert tuning.resolve_problem("mlp-digits") is problems.get("mlp-digits")
    # One name: the suite's. The dataset-model order is refused with the right name.
    with pytest.raises(tuning.TuneError, match=r"unknown problem 'digits-mlp' \(did you mean "
                                               r"mlp-digits\?\)"):
        tuning.resolve_problem("digits-mlp")


def test_edge_of_range_is_flagged(toy, capsys):
    tmp, _ = toy
    # On the toy the best lr lies near 0.1-0.3: a range ending at 1e-2 puts it at the upper edge.
    rc, out = cli([*BASE, "--sampler", "grid", "--range", "lr=3e-3:1e-2", "--range",
                   "alpha=0.99:0.999", "--storage", f"sqlite:///{tmp / 'e.db'}", "--out",
                   str(tmp / "e"), "--confirm-seeds", "0"], capsys)
    assert rc == 0, out.err
    assert "grid: 0.99, 0.995, 0.999" in out.out
    assert "warning: best lr=0.01 is at the upper edge" in out.out
    assert "--range lr=0.003:0.1" in out.out


def test_random_sampler_reproducible_from_seed(toy, capsys):
    tmp, _ = toy
    db = f"sqlite:///{tmp / 'r.db'}"
    runs = {}
    for study, seed in (("a", 3), ("b", 3), ("c", 4)):
        rc, out = cli([*BASE, "--sampler", "random", "--trials", "6", "--seed", str(seed),
                       "--storage", db, "--study", study, "--out", str(tmp / study),
                       "--confirm-seeds", "0"], capsys)
        assert rc == 0, out.err
        runs[study] = [t.params for t in load(db, study).get_trials()]
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]
    for p in runs["a"] + runs["c"]:
        assert 1e-4 <= p["lr"] <= 1.0 and 1e-4 <= p["one_minus_alpha"] <= 0.1
    assert len({p["lr"] for p in runs["a"]}) == 6
    # `rmsprop compare --search random` tunes with exactly these points (search_space.suggest).
    import importlib

    from rmsprop.tools.search_space import suggest
    spec = importlib.import_module("tune_toy_mod").SPEC
    got = suggest(spec, 6, sampler="random", seed=3)
    assert [(g["lr"], round(1 - g["alpha"], 12)) for g in got] == \
        [(p["lr"], round(p["one_minus_alpha"], 12)) for p in runs["a"]]


def test_sobol_sampler_covers_the_space(toy, capsys):
    tmp, _ = toy
    db = f"sqlite:///{tmp / 's.db'}"
    rc, out = cli([*BASE, "--sampler", "sobol", "--trials", "8", "--storage", db,
                   "--out", str(tmp / "s"), "--confirm-seeds", "0", "--study", "s"], capsys)
    assert rc == 0, out.err
    ps = [t.params for t in load(db, "s").get_trials()]
    # A scrambled Sobol net of 8 points puts exactly one point in each eighth of each axis.
    u = sorted(math.log(p["lr"] / 1e-4) / math.log(1e4) for p in ps)
    assert [int(x * 8) for x in u] == list(range(8))


def _wait_for(pred, timeout=60.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.1)
    return False


def _running(url, name):
    try:
        return load(url, name).get_trials(states=(TrialState.RUNNING,))
    except Exception:
        return []


@pytest.mark.slow
def test_heartbeat_fails_and_requeues_a_stale_trial(toy, monkeypatch):
    """A worker on 'another machine' dies mid-trial: its trial is failed once its heartbeat is
    older than the grace period (Optuna's for SQLite, the worker's own for a journal), and its
    parameters are re-queued."""
    tmp, env = toy
    import tune_toy_mod as m

    from rmsprop.tools import storage as storage_mod
    from rmsprop.tools import study as study_mod
    from rmsprop.tools import worker
    from rmsprop.tools.search_space import build_space

    urls = {"h-sql": f"sqlite:///{tmp / 'h.db'}", "h-jnl": f"journal:{tmp / 'h.log'}"}
    procs = {name: spawn([*BASE, "--sampler", "random", "--trials", "3", "--storage", url,
                          "--study", name, "--out", str(tmp / name), "--heartbeat", "1",
                          "--grace", "2"], {**env, "TOY_SLEEP": "60"})
             for name, url in urls.items()}
    def training(url, name):  # the worker wrote its name: it is past Optuna's first beat
        return [t for t in _running(url, name) if "worker" in t.user_attrs]

    for name, url in urls.items():
        assert _wait_for(lambda u=url, n=name: len(training(u, n)) == 1), \
            procs[name].communicate()
    for p in procs.values():
        p.send_signal(signal.SIGKILL)
        p.wait()
    # From here on the dead worker's host is not ours: only the heartbeat can tell it is gone.
    monkeypatch.setattr(worker, "HOST", "another-machine/boot")
    for name, url in urls.items():
        cfg = study_mod.TuneConfig(problem="tune_toy_mod:PROBLEM",
                                   optimizer="tune_toy_mod:SPEC",
                                   space=build_space(m.SPEC),
                                   sampler="random", trials=3, storage=url, study=name,
                                   heartbeat=1, grace=2, progress=False)
        storage = storage_mod.open_storage(url, heartbeat=1, grace=2)
        study = study_mod.open_study(cfg, storage)
        (killed,) = study.get_trials(states=(TrialState.RUNNING,))
        time.sleep(3.3)  # no heartbeat for longer than the grace period (SQLite: 1 s clock)
        worker.reap_stale(study, storage, 2)
        st = {t.number: t for t in study.get_trials()}
        assert st[killed.number].state == TrialState.FAIL, name
        waiting = [t for t in st.values() if t.state == TrialState.WAITING]
        assert len(waiting) == 1 and waiting[0].params == killed.params, name


@pytest.mark.slow
def test_resume_after_killed_worker_ends_with_exactly_n(toy):
    tmp, env = toy
    db = f"sqlite:///{tmp / 'k.db'}"
    args = [*BASE, "--sampler", "random", "--trials", "6", "--storage", db, "--study", "k",
            "--out", str(tmp / "k"), "--confirm-seeds", "0", "--heartbeat", "1", "--grace", "3"]
    env = {**env, "TOY_SLEEP": "0.4"}
    p = spawn(args, env)

    def two_done_one_running():
        try:
            s = states(load(db, "k"))
        except Exception:
            return False
        return s.get(TrialState.COMPLETE, 0) >= 2 and s.get(TrialState.RUNNING, 0) == 1

    assert _wait_for(two_done_one_running), p.communicate()[1]
    # killed with all its parameters drawn (a trial is RUNNING a moment before it has them)
    assert _wait_for(lambda: any({"lr", "one_minus_alpha"} <= set(t.params)
                                 for t in load(db, "k").get_trials(
                                     states=(TrialState.RUNNING,)))), p.communicate()[1]
    p.send_signal(signal.SIGKILL)
    p.wait()
    study = load(db, "k")
    killed = study.get_trials(states=(TrialState.RUNNING,))
    assert len(killed) == 1
    n_done_before = states(study)[TrialState.COMPLETE]

    p2 = spawn(args, {**env, "TOY_SLEEP": "0"})
    out, err = p2.communicate(timeout=120)
    assert p2.returncode == 0, err
    assert f"resuming study 'k': {n_done_before} of 6 trials already complete" in err
    assert "trials: 6 complete (0 diverged, scored 1e+09), 1 failed (1 worker killed; 1 " \
           "re-queued and re-run)\n" in out, out
    study = load(db, "k")
    st = states(study)
    assert st[TrialState.COMPLETE] == 6 and TrialState.RUNNING not in st
    assert n_done_before < 6
    params = complete_params(study)
    assert len(set(params)) == 6  # none duplicated
    fail = {t.number: t for t in study.get_trials(states=(TrialState.FAIL,))}
    assert killed[0].number in fail  # the interrupted trial is marked failed...
    assert tuple(sorted(fail[killed[0].number].params.items())) in params  # ...and re-run

    # Re-running the finished study adds nothing.
    assert cli(args)[0] == 0
    assert states(load(db, "k"))[TrialState.COMPLETE] == 6


@pytest.mark.slow
def test_two_processes_share_a_journal_file(toy, capsys, monkeypatch):
    """--jobs 2 on a journal file: exactly 8 trials, both workers busy; each worker gets its
    configuration on stdin (nothing on its command line); a re-run keeps the earlier logs."""
    tmp, env = toy
    from rmsprop.tools import worker

    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])
    monkeypatch.setenv("TOY_SLEEP", "0.3")
    argvs = []
    real_popen = subprocess.Popen

    def recording_popen(args, *a, **kw):
        argvs.append(list(args))
        return real_popen(args, *a, **kw)

    monkeypatch.setattr(worker.subprocess, "Popen", recording_popen)
    url = f"journal:{tmp / 'j.log'}"
    args = [*BASE, "--sampler", "random", "--trials", "8", "--jobs", "2", "--storage", url,
            "--study", "j", "--out", str(tmp / "j"), "--confirm-seeds", "0"]
    rc, out = cli(args, capsys)
    assert rc == 0, out.err
    study = load(url, "j")
    assert states(study) == {TrialState.COMPLETE: 8}
    assert len(set(complete_params(study))) == 8
    pids = {t.user_attrs["worker"][1] for t in study.get_trials() if "worker" in t.user_attrs}
    assert len(pids) == 2  # both workers ran trials
    assert argvs == [[sys.executable, "-m", "rmsprop.tools.worker"]] * 2
    first = {f.name: f.read_text() for f in (tmp / "j" / "worker-logs" / "run-1").iterdir()}
    assert sorted(first) == ["worker-0.log", "worker-1.log"]

    assert cli(args, capsys)[0] == 0  # the finished study: workers start and end at once
    logs = tmp / "j" / "worker-logs"
    assert sorted(d.name for d in logs.iterdir()) == ["run-1", "run-2"]
    assert {f.name: f.read_text() for f in (logs / "run-1").iterdir()} == first


def _pg_url(pgdir):
    script = REPO / ".ci" / "postgres.sh"
    # In CI the script installs Debian's postgresql when it is missing; elsewhere it never
    # installs anything and the test skips when there is no server binary.
    install = [] if os.environ.get("CI") else ["--no-install"]
    r = subprocess.run(["bash", str(script), *install, "--dir", pgdir],
                       capture_output=True, text=True, timeout=900)
    if r.returncode == 3 and not os.environ.get("CI"):
        pytest.skip("no PostgreSQL server binary (apt-get install postgresql); "
                    "this test always runs in CI")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1], script


def _descendants(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                kids = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                out += [int(k) for k in kids]
                todo += [int(k) for k in kids]
        except OSError:
            continue
    return out


def _command_lines_while(procs):
    """Every command line of the descendants of ``procs`` (the processes they start, not the
    commands the user typed), sampled until they end. A child between fork and exec still shows
    its parent's command line: those samples are the user's command, not a worker's."""
    def cmdline(pid):
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            return None

    typed = {cmdline(p.pid) for p in procs}
    seen = set()
    while any(p.poll() is None for p in procs):
        for p in procs:
            seen |= {cmdline(pid) for pid in _descendants(p.pid)}
        time.sleep(0.05)
    return seen - typed - {None}


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study(toy):
    tmp, env = toy
    import tempfile

    # Directly under the temp root: the server may run as `postgres`, which must reach it.
    pgdir = tempfile.mkdtemp(prefix="rmsprop-pg-")
    url, script = _pg_url(pgdir)
    # The test server trusts loopback connections, so any password is accepted: enough to see
    # where a password would travel.
    secret = "Zq8-not-shown"
    url_pw = url.replace("postgres@", f"postgres:{secret}@", 1)
    try:
        args = [*BASE, "--sampler", "grid", "--range", "lr=1e-2:1e-1", "--range",
                "alpha=0.9:0.99", "--storage", url_pw, "--study", "pg", "--confirm-seeds", "0"]
        # Two independent commands, as on two machines: they race to create the same study;
        # the second one runs its trials in two worker processes.
        procs = [spawn([*args, "--out", str(tmp / f"pg{i}"), "--jobs", str(i + 1)],
                       {**env, "TOY_SLEEP": "0.2"}) for i in range(2)]
        seen = _command_lines_while(procs)
        outputs = []
        for p in procs:
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, err
            outputs += [out, err]
        assert any("rmsprop.tools.worker" in c for c in seen), seen  # workers were seen
        assert not [c for c in seen if secret in c]
        assert not [o for o in outputs if secret in o]
        assert "postgres:***@" in outputs[0]
        for f in tmp.glob("pg*/**/*"):
            if f.is_file() and f.suffix in (".json", ".md", ".csv", ".log"):
                assert secret not in f.read_text(), f
        study = load(url, "pg")
        st = states(study)
        # lr lattice 1e-2..1e-1 (6 points) x alpha {0.9, 0.95, 0.99}
        assert st[TrialState.COMPLETE] == 18 and TrialState.RUNNING not in st
        assert len(set(complete_params(study))) == 18
        assert len({t.user_attrs["worker"][1] for t in study.get_trials()
                    if "worker" in t.user_attrs}) >= 2
    finally:
        subprocess.run(["bash", str(script), "--stop", "--dir", pgdir],
                       capture_output=True, timeout=60)
        shutil.rmtree(pgdir, ignore_errors=True)


BAD = [
    (["--problem", "no-such-problem"], "unknown problem 'no-such-problem'"),
    (["--optimizer", "nosuchopt"], "unknown optimizer 'nosuchopt'"),
    (["--sampler", "tpe"], "unknown sampler 'tpe'"),
    (["--range", "lr=1e-2:1e-2"], "lr: empty range"),
    (["--range", "lr=1:1e-3"], "lr: inverted range"),
    (["--range", "alpha=0.9:1.5"], "alpha: a decay range must lie in [0, 1)"),
    (["--range", "lr=abc"], "bad --range 'lr=abc'"),
    (["--range", "eps=1e-8:1e-6"], "'eps' is not searched"),
    (["--tune", "nesterov"], "cannot tune 'nesterov'"),
    (["--trials", "0"], "--trials must be >= 1"),
    (["--steps", "-3"], "--steps must be >= 1, got -3"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--out", "{tmp}/a-file"], "exists and is not a folder"),
    (["--range", "lr=1e-5,1"], "expected NAME=LOW:HIGH (LOW:HIGH with a colon)"),
    (["--problem", "digits-mlp"], "(did you mean mlp-digits?)"),
    (["--problem", "tune_toy_mod:NOT_A_PROBLEM"], "neither a Problem nor a function"),
    (["--problem", "tune_toy_mod:missing"], "has no attribute 'missing'"),
    (["--objective", "steps"], "needs --target"),
    (["--target", "0.1"], "--target is used only with --objective steps"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--train-seed", "-1"], "--train-seed must be >= 0, got -1"),
    (["--study", " "], "--study must not be empty"),
    (["--out", "/proc/no-such/x"], "cannot be written"),
    # a file of a few bytes, which SQLite would take for an empty database and overwrite
    (["--storage", "sqlite:///{tmp}/tiny"], "exists and is not an SQLite database"),
    (["--storage", "postgresql+psycopg2://nobody@127.0.0.1:1/none"], "cannot open storage"),
    (["--storage", "postgresql+psycopg2://nobody:Zq8-secret@127.0.0.1:1/none"],
     "cannot open storage postgresql+psycopg2://nobody:***@127.0.0.1:1/none"),
    (["--storage", "journal:/no/such/dir/x.log"], "does not exist"),
    (["--storage", "not-a-url"], "bad storage URL"),
    (["--sampler", "grid"], "exists with a different sampler"),
    (["--seed", "7"], "exists with a different seed"),
]


def test_bad_input_is_one_line_and_leaves_the_study_alone(toy, capsys):
    tmp, _ = toy
    db = f"sqlite:///{tmp / 'b.db'}"
    ok = [*BASE, "--sampler", "random", "--trials", "2", "--storage", db, "--study", "base",
          "--out", str(tmp / "b"), "--confirm-seeds", "0"]
    assert cli(ok, capsys)[0] == 0
    before = [(t.number, t.state, t.params) for t in load(db, "base").get_trials()]
    attrs = load(db, "base").user_attrs
    (tmp / "a-file").write_text("not a folder")
    (tmp / "tiny").write_bytes(b"x")
    for extra, needle in BAD:
        args = list(ok)
        flag, value = extra[0], extra[1].format(tmp=tmp)
        if flag in args and flag != "--range":
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
        rc, out = cli(args, capsys)
        assert rc == 2, extra
        lines = out.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rmsprop: error: "), (extra, out.err)
        assert needle in lines[0], (extra, lines[0])
        assert "Traceback" not in out.err and "Zq8-secret" not in out.err
        assert out.out == "", (extra, out.out)  # the error comes before any banner
        # no study corrupted: same trials, same configuration
        assert [(t.number, t.state, t.params) for t in load(db, "base").get_trials()] == before
        assert load(db, "base").user_attrs == attrs
    assert (tmp / "tiny").read_bytes() == b"x"


def test_programmatic_tune_in_memory_picks_the_oracle_best(toy):
    """``rmsprop.tools.tuning.tune`` (for ``rmsprop compare``): no storage, nothing written."""
    tmp, _ = toy
    from rmsprop.tools import tuning

    res = tuning.tune("tune_toy_mod:PROBLEM", "tune_toy_mod:SPEC", sampler="random", trials=6,
                      seed=1)
    assert len([r for r in res.trials if r["state"] == "COMPLETE"]) == 6
    oracle = min((toy_value(r["lr"], r["alpha"]), r["lr"], r["alpha"]) for r in res.trials)
    assert (res.best_hp["lr"], res.best_hp["alpha"]) == (oracle[1], oracle[2])
    assert res.best_value == pytest.approx(oracle[0], rel=1e-12)
    assert {p.name for p in tmp.iterdir()} <= {"tune_toy_mod.py", "__pycache__"}


def test_steps_to_target_objective_and_divergence_penalty(toy):
    import torch
    import tune_toy_mod as m

    from rmsprop.tools import tuning

    branches = set()
    for lr, alpha in ((0.05, 0.9), (0.001, 0.99), (100.0, 0.9)):
        r = m.PROBLEM.run(lambda ps, lr=lr, alpha=alpha: torch.optim.RMSprop(
            ps, lr=lr, alpha=alpha), seed=0)
        ev = tuning.evaluate(m.PROBLEM, m.SPEC, {"lr": lr, "alpha": alpha}, seed=0,
                             objective="steps", target=1e-3)
        hits = [s for s, v in zip(r.eval_steps, r.eval_loss) if v <= 1e-3]
        if r.diverged:
            assert ev.diverged and ev.value == tuning.PENALTY
        elif hits:
            assert ev.value == hits[0] and ev.attrs["reached"]
        else:  # censored at the budget plus one evaluation interval
            assert ev.value == r.eval_steps[-1] + 10 and not ev.attrs["reached"]
        branches.add("diverged" if r.diverged else "hit" if hits else "censored")
    assert branches == {"diverged", "hit", "censored"}


def test_a_crashing_run_is_one_line_and_requeued(toy, capsys):
    tmp, _ = toy
    db = f"sqlite:///{tmp / 'x.db'}"
    args = [*BASE, "--problem", "tune_toy_mod:BROKEN", "--sampler", "grid", "--range",
            "lr=0.03:0.1", "--storage", db, "--study", "x", "--out", str(tmp / "x")]
    rc, out = cli(args, capsys)
    assert rc == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and "trial 0 failed: RuntimeError: boom" in lines[0], out.err
    trials = load(db, "x").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].params == trials[0].params  # the grid point is not lost


def test_missing_postgresql_driver_is_named_before_any_banner(toy, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # `import psycopg2` raises ImportError
    rc, out = cli([*BASE, "--storage", "postgresql+psycopg2://u:Zq8-secret@127.0.0.1:1/db"],
                  capsys)
    assert rc == 2 and out.out == ""
    (line,) = out.err.strip().splitlines()
    assert "driver 'psycopg2'" in line and "pip install 'rmsprop[postgres]'" in line, line
    assert "Zq8-secret" not in line and "u:***@" in line


def test_edge_hints_round_and_stay_in_the_valid_domain():
    """The widened range a warning proposes: one decade further (10x lr, 10x more 1 - alpha),
    rounded, never outside the domain (a decay in [0, 1), a learning rate > 0)."""
    from rmsprop.tools.search_space import Param
    from rmsprop.tools.study import TuneConfig
    from rmsprop.tools.tune_report import edge_flags

    space = [Param("lr", "log", 1e-4, 1.0, per_decade=5), Param("alpha", "log1m", 0.9, 0.9999)]
    cfg = TuneConfig(problem="p", optimizer="o", space=space, sampler="random", storage=None)
    cases = [({"lr": 1e-4, "alpha": 0.9}, ["--range lr=1e-05:1", "--range alpha=0:0.9999"]),
             ({"lr": 1.0, "alpha": 0.9999}, ["--range lr=0.0001:10",
                                             "--range alpha=0.9:0.99999"])]
    for best, hints in cases:
        flags = edge_flags(cfg, best)
        assert len(flags) == 2, flags
        for flag, hint in zip(flags, hints):
            assert flag.endswith(hint), (flag, hint)
            name, _, rng = hint.split()[1].partition("=")
            lo, hi = (float(x) for x in rng.split(":"))
            Param(name, "log1m" if name == "alpha" else "log", lo, hi)  # a valid range
    # Already at the end of the domain: nothing wider to propose.
    whole = [Param("lr", "log", 1e-4, 1.0), Param("alpha", "log1m", 0.0, 0.9999)]
    cfg = TuneConfig(problem="p", optimizer="o", space=whole, sampler="random", storage=None)
    assert not [f for f in edge_flags(cfg, {"lr": 0.01, "alpha": 0.0}) if "alpha" in f]


def test_a_surplus_trial_is_pruned_and_reported_as_such(toy, monkeypatch):
    """Two workers start a trial for the last slot at once: the later one is pruned before it
    samples or trains, counted as surplus (not as a killed worker), and leaves nothing queued."""
    import threading

    import tune_toy_mod as m

    from rmsprop.tools import tuning, worker
    from rmsprop.tools.tune_report import trial_rows, trial_tally

    tmp, _ = toy
    url = f"journal:{tmp / 'sp.log'}"
    space = tuning.build_space(m.SPEC)
    cfg1 = tuning.TuneConfig(problem="tune_toy_mod:PROBLEM", optimizer="tune_toy_mod:SPEC",
                             space=space, trials=1, storage=url, study="sp", progress=False,
                             confirm_seeds=0)
    tuning.run_tune(cfg1)
    cfg = dataclasses.replace(cfg1, trials=2)
    ready = tuning.prepare(cfg)
    other = ready.study.ask()  # another worker's trial, alive (this process), still running
    other.set_user_attr("worker", [worker.HOST, os.getpid()])
    real_counts = worker.counts
    calls = []

    def stale_counts(study):  # the first look predates the other worker's ask
        c = real_counts(study)
        if not calls:
            c["RUNNING"] -= 1
        calls.append(1)
        return c

    monkeypatch.setattr(worker, "counts", stale_counts)
    finisher = threading.Timer(1.0, lambda: ready.study.tell(other.number, 0.5))
    finisher.start()
    try:
        worker.run_worker(cfg, storage=ready.storage)
    finally:
        finisher.join()
    st = states(load(url, "sp"))
    assert st == {TrialState.COMPLETE: 2, TrialState.PRUNED: 1}, st
    tally = trial_tally(trial_rows(ready.study, space))
    assert (tally.surplus, tally.failed, tally.waiting) == (1, 0, 0)
    text = tally.describe()
    assert "1 surplus" in text and "failed" not in text and "re-queued" not in text


@pytest.mark.slow
def test_ctrl_c_requeues_the_trial_without_a_traceback(toy, capsys, monkeypatch):
    tmp, env = toy
    for jobs, url in ((1, f"sqlite:///{tmp / 'c1.db'}"), (2, f"journal:{tmp / 'c2.log'}")):
        name = f"c{jobs}"
        args = [*BASE, "--sampler", "random", "--trials", "4", "--storage", url, "--study",
                name, "--out", str(tmp / name), "--jobs", str(jobs)]
        p = spawn(args, {**env, "TOY_SLEEP": "30"})
        # running with all their parameters drawn (a trial is RUNNING a moment before it
        # has them, and draws them one at a time)
        assert _wait_for(lambda u=url, n=name, k=jobs: len(
            [t for t in _running(u, n) if {"lr", "one_minus_alpha"} <= set(t.params)]) == k), \
            p.communicate()
        running = {t.number: t.params for t in _running(url, name)}
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 130, err
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
        assert err.strip().splitlines()[-1] == "rmsprop: interrupted", err
        for log in (tmp / name).glob("worker-logs/*/*.log"):
            assert "Traceback" not in log.read_text(), log
        study = load(url, name)
        st = {t.number: t for t in study.get_trials()}
        waiting = [t.params for t in st.values() if t.state == TrialState.WAITING]
        for number, params in running.items():
            assert st[number].state == TrialState.FAIL  # the interrupted trial...
            assert st[number].user_attrs.get("interrupted") is True
            assert params in waiting  # ...is queued again with the same parameters
        assert len(waiting) == jobs
    # The same command resumes and says what happened to the interrupted trial.
    monkeypatch.setenv("TOY_SLEEP", "0")
    rc, out = cli([*BASE, "--sampler", "random", "--trials", "4", "--storage",
                   f"sqlite:///{tmp / 'c1.db'}", "--study", "c1", "--out", str(tmp / "c1")],
                  capsys)
    assert rc == 0, out.err
    assert "trials: 4 complete (0 diverged, scored 1e+09), 1 failed (1 interrupted; 1 " \
           "re-queued and re-run)\n" in out.out, out.out


def test_an_accurate_classifier_is_not_labelled_diverged():
    """A tune trial at > 90 % validation accuracy was labelled diverged and scored 1e9: an
    over-confident classifier's validation cross-entropy ends above 10x its start (28.4 vs
    2.34 here) although training never blew up."""
    problems = pytest.importorskip("rmsprop.tools.problems")
    from rmsprop.tools import tuning
    from rmsprop.tools.problems import optimizers

    ev = tuning.evaluate(problems.get("mlp-digits"), optimizers.resolve("rmsprop"),
                         {"lr": 0.1, "alpha": 0.99}, seed=0)
    assert ev.attrs["final_eval_metric"] > 0.9
    assert not ev.diverged and ev.value == ev.final_eval_loss != tuning.PENALTY


def test_a_user_problem_factory_is_tuned(toy, capsys):
    """``--problem pkg.module:make_problem``: the factory's problem, found by the same loader as
    ``rmsprop compare``, is what the trials train (the best value is the oracle's)."""
    tmp, _ = toy
    db = f"sqlite:///{tmp / 'u.db'}"
    rc, out = cli([*BASE, "--problem", "tune_toy_mod:make_problem", "--sampler", "random",
                   "--trials", "3", "--storage", db, "--out", str(tmp / "u"),
                   "--confirm-seeds", "0"], capsys)
    assert rc == 0, out.err
    assert "study tune_toy_mod-make_problem-tune_toy_mod-SPEC-random in" in out.out
    best = json.loads((tmp / "u" / "best.json").read_text())
    assert best["best_value"] == pytest.approx(
        toy_value(best["best_hp"]["lr"], best["best_hp"]["alpha"]), rel=1e-12)


def test_search_space_positions_follow_their_scales():
    """``Param.at`` / ``position`` / ``spaced`` / ``on_edge`` (used by ``rmsprop compare``)
    against closed forms: the middle of a log range is the geometric mean, of a decay range
    ``1 - sqrt((1 - low)(1 - high))``."""
    from rmsprop.tools.search_space import Param, SearchSpaceError

    lr, alpha = Param("lr", "log", 1e-4, 1.0), Param("alpha", "log1m", 0.9, 0.9999)
    lin = Param("w", "linear", -1.0, 3.0)
    assert lr.at(0.5) == pytest.approx(1e-2, rel=1e-12)
    assert alpha.at(0.5) == pytest.approx(1 - math.sqrt(0.1 * 1e-4), rel=1e-12)
    assert lin.at(0.25) == pytest.approx(0.0, abs=1e-15)
    for p in (lr, alpha, lin):
        assert p.at(0) == pytest.approx(p.low, rel=1e-12)
        assert p.at(1) == pytest.approx(p.high, rel=1e-12)
        for u in (0.0, 0.3, 0.77, 1.0):
            assert p.position(p.at(u)) == pytest.approx(u, abs=1e-12)
        assert p.spaced(1) == [p.at(0.5)]
        assert p.spaced(3) == [p.at(0.0), p.at(0.5), p.at(1.0)]
    assert lr.on_edge(1.2e-4, 4) == "low" and lr.on_edge(0.9, 4) == "high"
    assert lr.on_edge(1e-2, 4) is None
    assert alpha.on_edge(0.9, 20) == "low"  # outermost 1/20 of the range on its scale
    with pytest.raises(SearchSpaceError, match="at least one value"):
        lr.spaced(0)


def test_a_url_without_a_driver_names_sqlalchemys_default_driver(monkeypatch):
    # SQLAlchemy's default PostgreSQL driver changed (psycopg2 -> psycopg in 2.1): the error
    # must name the module SQLAlchemy itself would import, and leave the password out
    import importlib

    from sqlalchemy.engine import make_url

    from rmsprop.tools import storage

    url = "postgresql://user:hunter2@127.0.0.1:1/db"
    default = make_url(url).get_dialect().driver
    real = importlib.import_module

    def missing(name, *args, **kwargs):
        if name == default:
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(storage.StorageError) as err:
        storage._check_driver(url)
    assert repr(default) in str(err.value) and "hunter2" not in str(err.value)


def _one_line_error(out, needle):
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rmsprop: error: "), out.err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in out.err and out.out == "", out
    return lines[0]


def _contents(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_an_out_folder_of_other_files_is_refused_and_left_as_it_was(toy, capsys):
    tmp, _ = toy
    ok = [*BASE, "--trials", "1", "--confirm-seeds", "0", "--storage", f"sqlite:///{tmp / 'o.db'}"]
    proj = tmp / "proj"
    proj.mkdir()
    (proj / "README.md").write_text("my precious notes\n")
    (proj / "trials.csv").write_text("a,b\n")
    before = _contents(proj)
    rc, out = cli([*ok, "--study", "s", "--out", str(proj)], capsys)
    assert rc == 2
    _one_line_error(out, f"--out {str(proj)!r} is not empty and holds no report of study 's'")
    assert _contents(proj) == before
    # the folder of the same study's report is its own: re-running writes it again
    rep = tmp / "rep"
    assert cli([*ok, "--study", "s", "--out", str(rep)], capsys)[0] == 0
    assert cli([*ok, "--study", "s", "--out", str(rep)], capsys)[0] == 0
    before = _contents(rep)
    rc, out = cli([*ok, "--study", "t", "--out", str(rep)], capsys)
    assert rc == 2
    _one_line_error(out, "holds no report of study 't'")
    assert _contents(rep) == before


def test_the_documented_extra_hyperparameters_are_tunable_where_the_optimizer_takes_them(
        tmp_path, capsys):
    """README: ``--tune momentum,eps``. Every name an error lists as known is accepted, and the
    optimizer it builds takes it; a name the optimizer does not take is never listed."""
    import torch

    from rmsprop.tools import tuning
    from rmsprop.tools.problems import optimizers

    rc, out = cli(["tune", "--problem", "saddle", "--tune", "momentum,eps", "--trials", "2",
                   "--steps", "5", "--confirm-seeds", "0", "--no-plots", "--no-progress",
                   "--storage", f"sqlite:///{tmp_path / 'm.db'}", "--out", str(tmp_path / "m")],
                  capsys)
    assert rc == 0, out.err
    assert "momentum: 1-momentum log-uniform in [0.01, 1]" in out.out
    assert "eps: log-uniform in [1e-10, 1]" in out.out
    for name, spec in optimizers.OPTIMIZERS.items():
        with pytest.raises(tuning.SearchSpaceError) as err:
            tuning.build_space(spec, ["nesterov"])
        known = str(err.value).split("known: ")[1].split(", ")
        assert "weight_decay" in known, (name, known)
        space = tuning.build_space(spec, known)
        hp = {p.name: p.at(0.5) for p in space}
        x = torch.nn.Parameter(torch.ones(4))
        opt = tuning.make_factory(spec, hp)([x])
        x.grad = torch.ones(4)
        opt.step()
        group = opt.param_groups[0]
        for k in ("momentum", "weight_decay"):
            if k in hp:
                assert group[k] == pytest.approx(hp[k]), (name, k)
    with pytest.raises(tuning.SearchSpaceError, match=r"cannot tune 'momentum' for optimizer "
                                                       r"'adam'; known: beta1, beta2, eps, lr, "
                                                       r"weight_decay$"):
        tuning.build_space(optimizers.resolve("adam"), ["momentum"])


def test_a_resumed_study_of_an_edited_user_problem_is_refused(toy, capsys, monkeypatch):
    import importlib

    from rmsprop.tools import user_problem

    tmp, _ = toy
    monkeypatch.setattr(user_problem, "_LOADED", {})
    (tmp / "tune_edit_mod.py").write_text(TOY)
    monkeypatch.delitem(sys.modules, "tune_edit_mod", raising=False)
    db = f"sqlite:///{tmp / 'ed.db'}"
    args = [*BASE, "--problem", "tune_edit_mod:make_problem", "--trials", "1", "--confirm-seeds",
            "0", "--storage", db, "--study", "ed", "--out", str(tmp / "ed")]
    assert cli(args, capsys)[0] == 0
    attrs = load(db, "ed").user_attrs
    # a 3-D quadratic instead of the 2-D one, same name, same fields
    (tmp / "tune_edit_mod.py").write_text(
        TOY.replace("[1.0, 1.0], dtype", "[1.0, 1.0, 1.0], dtype")
           .replace("[1.0, 10.0], dtype", "[1.0, 10.0, 5.0], dtype"))
    user_problem._LOADED.clear()
    del sys.modules["tune_edit_mod"]
    importlib.invalidate_caches()
    rc, out = cli(args, capsys)
    assert rc == 2
    _one_line_error(out, "study 'ed' exists with a different problem_source_hash, "
                         "problem_parameter_shapes")
    assert load(db, "ed").user_attrs == attrs and len(load(db, "ed").get_trials()) == 1


def test_an_optimizer_class_imports_from_the_working_directory(tmp_path, monkeypatch, capsys):
    (tmp_path / "myopt_cwd.py").write_text("import torch\n\n\nclass MyAdam(torch.optim.Adam):\n"
                                           "    pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "myopt_cwd", raising=False)
    rc, out = cli(["tune", "--problem", "saddle", "--optimizer", "myopt_cwd:MyAdam", "--trials",
                   "1", "--steps", "2", "--confirm-seeds", "0", "--no-plots", "--no-progress",
                   "--storage", f"sqlite:///{tmp_path / 'o.db'}", "--out", str(tmp_path / "o")],
                  capsys)
    assert rc == 0, out.err
    assert "study saddle-myopt_cwd-MyAdam-random" in out.out


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_storage_for_several_jobs_is_one_line(toy, capsys, url):
    tmp, _ = toy
    rc, out = cli([*BASE, "--trials", "2", "--jobs", "2", "--storage", url, "--out",
                   str(tmp / "mem")], capsys)
    assert rc == 2
    _one_line_error(out, f"--jobs > 1 needs a shared --storage (an sqlite file, journal or "
                         f"postgresql), not {url}")
    assert not (tmp / "mem").exists()


def test_a_range_given_twice_is_one_line(toy, capsys):
    tmp, _ = toy
    rc, out = cli([*BASE, "--range", "lr=1e-3:1e-1", "--range", "lr=1e-5:1e-4", "--storage",
                   f"sqlite:///{tmp / 'r.db'}", "--out", str(tmp / "r")], capsys)
    assert rc == 2
    _one_line_error(out, "--range lr is given twice")
    assert not (tmp / "r.db").exists() and not (tmp / "r").exists()


def test_a_short_password_is_redacted_in_its_field_not_in_every_word():
    from rmsprop.tools.storage import scrub

    url = "postgresql+psycopg2://u:on@127.0.0.1:1/db"
    msg = (f"(psycopg2.OperationalError) connection to {url} failed: Connection refused; dsn "
           "'user=u password=on host=127.0.0.1'; again postgresql://u:on@127.0.0.1:1/db")
    assert scrub(msg, url) == (
        "(psycopg2.OperationalError) connection to postgresql+psycopg2://u:***@127.0.0.1:1/db "
        "failed: Connection refused; dsn 'user=u password=*** host=127.0.0.1'; again "
        "postgresql://u:***@127.0.0.1:1/db")


API_BAD = [
    (dict(problem=42), "problem must be a suite name, 'pkg.module:make_problem' or a Problem, "
                       "got 42"),
    (dict(optimizer=None), "optimizer must be a name (rmsprop, adam...) or 'pkg.module:Class', "
                           "got None"),
    (dict(study=123), "--study must be a string, got 123"),
    (dict(trials="2"), "--trials must be an integer, got '2'"),
    (dict(trials=2.5), "--trials must be an integer, got 2.5"),
    (dict(seed=1.5), "--seed must be an integer, got 1.5"),
    (dict(extra=["alpha", 3]), "extra: expected names (strings)"),
    (dict(ranges=[("lr", 1e-3)]), "ranges: expected (name, low, high) or 'NAME=LOW:HIGH', got "
                                  "('lr', 0.001)"),
    (dict(ranges=["lr=1e-3"]), "bad --range 'lr=1e-3'"),
]


@pytest.mark.parametrize("kwargs, needle", API_BAD, ids=[next(iter(k)) + str(i)
                                                        for i, (k, _) in enumerate(API_BAD)])
def test_the_python_api_names_the_bad_argument(toy, kwargs, needle):
    from rmsprop.tools import tuning

    args = {"problem": "tune_toy_mod:PROBLEM", "optimizer": "tune_toy_mod:SPEC", "trials": 2,
            **kwargs}
    with pytest.raises(ValueError) as err:
        tuning.tune(**args)
    assert needle in str(err.value)


def test_the_python_api_takes_problem_objects_names_and_range_strings(toy):
    import tune_toy_mod as m

    from rmsprop.tools import search_space, tuning
    from rmsprop.tools.problems import optimizers

    res = tuning.tune(m.PROBLEM, "tune_toy_mod:SPEC", trials=2, extra="alpha",
                      ranges=["lr=1e-3:1e-1"])
    assert res.study_name == "toy-tune_toy_mod-SPEC-random"
    assert len([r for r in res.trials if r["state"] == "COMPLETE"]) == 2
    assert [p.describe() for p in res.space] == [
        "lr: log-uniform in [0.001, 0.1]",
        "alpha: 1-alpha log-uniform in [0.0001, 0.1] (alpha in [0.9, 0.9999])"]
    rms = optimizers.resolve("rmsprop")
    assert search_space.build_space("rmsprop") == search_space.build_space(rms)
    assert search_space.build_space(rms, "momentum, eps") == search_space.build_space(
        rms, ["momentum", "eps"])
    for bad, needle in (("nosuchopt", "unknown optimizer 'nosuchopt'"),
                        (None, "spec must be an OptimizerSpec")):
        with pytest.raises(search_space.SearchSpaceError, match=re.escape(needle)):
            search_space.build_space(bad)
    for kw, needle in ((dict(n=2, seed=-1), "suggest: seed must be an integer >= 0, got -1"),
                       (dict(n=-1), "suggest: n must be an integer >= 0, got -1"),
                       (dict(n=2.0), "suggest: n must be an integer >= 0, got 2.0")):
        with pytest.raises(search_space.SearchSpaceError, match=re.escape(needle)):
            search_space.suggest(rms, **kw)


def test_resuming_with_fewer_trials_than_the_study_holds_is_one_line(toy, capsys):
    tmp, _ = toy
    db = f"sqlite:///{tmp / 'f.db'}"
    args = [*BASE, "--confirm-seeds", "0", "--storage", db, "--study", "f", "--out",
            str(tmp / "f")]
    assert cli([*args, "--trials", "3"], capsys)[0] == 0
    before = _contents(tmp / "f")
    rc, out = cli([*args, "--trials", "1"], capsys)
    assert rc == 2
    _one_line_error(out, "study 'f' already holds 3 complete trials, more than --trials 1")
    assert _contents(tmp / "f") == before and len(load(db, "f").get_trials()) == 3


def test_a_retried_trial_draws_no_point_so_the_sequence_continues_unbroken():
    """A trial failed or interrupted (Ctrl-C) is re-queued with its parameters under a new
    number; the trials after it must go on with the next points. They were indexed by trial
    number, so after a retry point 2 was never tried and point 6 was. Oracle:
    ``search_space.suggest``, the sequence an uninterrupted run tries."""
    import optuna
    from optuna.trial import TrialState

    from rmsprop.tools import search_space, storage
    from rmsprop.tools import study as study_mod
    space = search_space.build_space("adam")
    want = [[p.from_unit(u) for p, u in zip(space, search_space.unit_point(
        "random", 3, i, len(space)))] for i in range(5)]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = optuna.create_study(sampler=study_mod._DeterministicSampler("random", 3, space).make())

    def draw():
        trial = st.ask()
        return trial, [trial.suggest_float(p.key, *p.bounds(), log=p.log) for p in space]

    tried = []
    for k in range(6):
        trial, values = draw()
        tried.append(values)
        if k == 1:  # interrupted: failed and re-queued, as the worker does on Ctrl-C
            storage.retry_callback()(st, st.tell(trial, state=TrialState.FAIL))
        else:
            st.tell(trial, 0.0)
    # trial 2 is the retry of point 1; the fresh ones are points 0, 1, 2, 3, 4
    assert tried[2] == tried[1]
    fresh = [tried[i] for i in (0, 1, 3, 4, 5)]
    assert all(a == pytest.approx(b, rel=1e-12) for a, b in zip(fresh, want, strict=True))
    # a trial stopped before it drew every coordinate: its retry draws the rest of its point
    trial = st.ask()
    first = trial.suggest_float(space[0].key, *space[0].bounds(), log=space[0].log)
    storage.retry_callback()(st, st.tell(trial, state=TrialState.FAIL))
    _, values = draw()
    point5 = [p.from_unit(u) for p, u in zip(space, search_space.unit_point(
        "random", 3, 5, len(space)))]
    assert values[0] == first and values == pytest.approx(point5, rel=1e-12)


def test_a_missing_mysql_driver_names_the_package_that_installs_it(monkeypatch):
    """The hint said `pip install mysqldb`; the package is mysqlclient."""
    import importlib

    from rmsprop.tools import storage
    real = importlib.import_module

    def missing(name, *args, **kwargs):
        if name == "MySQLdb":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(storage.StorageError, match="pip install mysqlclient"):
        storage._check_driver("mysql+mysqldb://user:pw@127.0.0.1:1/db")
