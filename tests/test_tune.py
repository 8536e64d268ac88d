"""Tests of ``rmsprop tune`` (src/rmsprop/tuning.py, src/rmsprop/cli/tune.py).

The searches run on a toy problem written to a temporary module: a 2-D quadratic trained by a
few lines of NumPy RMSProp, so each trial costs microseconds and its outcome is known
independently of the tuning code (the oracle below recomputes it).
Oracles: the grid is rebuilt from its definition (10**(k/5) lattice x {0.9, 0.95, 0.99, 0.995,
0.999}); the best configuration is the argmin of the toy evaluated directly; resume/parallel
tests count trial states straight from the Optuna storage.
"""

from __future__ import annotations

import itertools
import json
import math
import os
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
    """A toy problem and optimizer for the tune tests (NumPy only)."""
    import math, os, time
    from types import SimpleNamespace
    import numpy as np

    H = np.array([1.0, 10.0])

    class RMS:
        def __init__(self, params, lr=0.01, alpha=0.99, eps=1e-8):
            self.p, self.lr, self.alpha, self.eps = params[0], lr, alpha, eps
            self.v = np.zeros_like(self.p)
        def step(self, g):
            self.v = self.alpha * self.v + (1 - self.alpha) * g * g
            self.p -= self.lr * g / (np.sqrt(self.v) + self.eps)

    def _make(params, **hp):
        return RMS(params, **hp)

    SPEC = SimpleNamespace(name="toy-rms", factory=_make, defaults={"lr": 0.01, "alpha": 0.99},
                           search_space={"lr": ("log", 1e-4, 1.0),
                                         "alpha": ("log1m", 0.9, 0.9999)},
                           make=lambda params, **hp: _make(params, **hp))

    def loss(x):
        return float(0.5 * np.sum(H * x * x))

    class Toy:
        name = "toy"
        def run(self, factory, *, seed, steps=None, split="valid"):
            time.sleep(float(os.environ.get("TOY_SLEEP", "0")))
            x = np.array([1.0, 1.0]) + 0.01 * seed
            opt = factory([x])
            l0, ev_s, ev_l, diverged = loss(x), [0], [loss(x)], False
            for t in range(1, (steps or 40) + 1):
                opt.step(H * x)
                if t % 10 == 0:
                    ev_s.append(t); ev_l.append(loss(x))
                    if not math.isfinite(ev_l[-1]) or ev_l[-1] > 10 * l0:
                        diverged = True
                        break
            return SimpleNamespace(final_eval_loss=ev_l[-1], final_eval_metric=None,
                                   eval_steps=ev_s, eval_loss=ev_l, diverged=diverged,
                                   seconds_per_step=1e-6, test_loss=ev_l[-1], test_metric=None)

    PROBLEM = Toy()

    class Broken(Toy):
        def run(self, factory, *, seed, steps=None, split="valid"):
            raise RuntimeError("boom\\nsecond line")

    BROKEN = Broken()
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
    import tune_toy_mod as m

    r = m.PROBLEM.run(lambda ps: m.RMS(ps, lr=lr, alpha=alpha), seed=0)
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
    assert tuning.resolve_problem("digits-mlp") is problems.get("mlp-digits")


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
    # `rmsprop compare --search random` tunes with exactly these points (tuning.suggest).
    import importlib

    from rmsprop.tools.tuning import suggest
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


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_heartbeat_fails_and_requeues_a_stale_trial(toy):
    tmp, _ = toy
    from rmsprop.tools import tuning
    import tune_toy_mod as m

    made = []
    for url in (f"sqlite:///{tmp / 'h.db'}", f"journal:{tmp / 'h.log'}"):
        cfg = tuning.TuneConfig(problem="tune_toy_mod:PROBLEM", optimizer="tune_toy_mod:SPEC",
                                space=tuning.build_space(m.SPEC), sampler="random", trials=3,
                                storage=url, heartbeat=1, grace=2, progress=False)
        storage = tuning.make_storage(url, heartbeat=1, grace=2)
        study = tuning.open_study(cfg, storage)
        trial = study.ask()  # a worker on another machine starts a trial...
        lr = trial.suggest_float("lr", 1e-4, 1.0, log=True)
        if url.startswith("sqlite"):
            storage.record_heartbeat(trial._trial_id)
        else:
            storage.set_trial_system_attr(trial._trial_id, "rmsprop:heartbeat", time.time())
        made.append((study, trial.number, lr))
    time.sleep(3.3)  # ...and dies: no heartbeat for longer than the grace period (SQLite's
    # clock has 1 s resolution)
    for study, number, lr in made:
        tuning.reap_stale(study, 2)
        st = {t.number: t for t in study.get_trials()}
        assert st[number].state == TrialState.FAIL
        waiting = [t for t in st.values() if t.state == TrialState.WAITING]
        assert len(waiting) == 1 and waiting[0].params["lr"] == lr


def _wait_for(pred, timeout=60.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.1)
    return False


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
    p.send_signal(signal.SIGKILL)
    p.wait()
    study = load(db, "k")
    killed = study.get_trials(states=(TrialState.RUNNING,))
    assert len(killed) == 1
    n_done_before = states(study)[TrialState.COMPLETE]

    p2 = spawn(args, {**env, "TOY_SLEEP": "0"})
    out, err = p2.communicate(timeout=120)
    assert p2.returncode == 0, err
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
def test_two_processes_share_a_journal_file(toy):
    tmp, env = toy
    url = f"journal:{tmp / 'j.log'}"
    args = [*BASE, "--sampler", "random", "--trials", "8", "--jobs", "2", "--storage", url,
            "--study", "j", "--out", str(tmp / "j"), "--confirm-seeds", "0"]
    r = subprocess.run([sys.executable, "-c", SHIM, *args], env={**env, "TOY_SLEEP": "0.3"},
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    study = load(url, "j")
    assert states(study) == {TrialState.COMPLETE: 8}
    assert len(set(complete_params(study))) == 8
    pids = {t.system_attrs["rmsprop:worker"][1] for t in study.get_trials()}
    assert len(pids) == 2  # both workers ran trials


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


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study(toy):
    tmp, env = toy
    import tempfile

    # Directly under the temp root: the server may run as `postgres`, which must reach it.
    pgdir = tempfile.mkdtemp(prefix="rmsprop-pg-")
    url, script = _pg_url(pgdir)
    try:
        args = [*BASE, "--sampler", "grid", "--range", "lr=1e-2:1e-1", "--range",
                "alpha=0.9:0.99", "--storage", url, "--study", "pg", "--confirm-seeds", "0"]
        # Two independent commands, as on two machines: they race to create the same study.
        procs = [spawn([*args, "--out", str(tmp / f"pg{i}")], {**env, "TOY_SLEEP": "0.2"})
                 for i in range(2)]
        for p in procs:
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, err
        study = load(url, "pg")
        st = states(study)
        # lr lattice 1e-2..1e-1 (6 points) x alpha {0.9, 0.95, 0.99}
        assert st[TrialState.COMPLETE] == 18 and TrialState.RUNNING not in st
        assert len(set(complete_params(study))) == 18
        assert len({t.system_attrs["rmsprop:worker"][1] for t in study.get_trials()}) == 2
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
    (["--objective", "steps"], "needs --target"),
    (["--storage", "postgresql+psycopg2://nobody@127.0.0.1:1/none"], "cannot open storage"),
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
    for extra, needle in BAD:
        args = list(ok)
        flag, value = extra
        if flag in args and flag != "--range":
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
        rc, out = cli(args, capsys)
        assert rc == 2, extra
        lines = out.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rmsprop: error: "), (extra, out.err)
        assert needle in lines[0], (extra, lines[0])
        assert "Traceback" not in out.err
        # no study corrupted: same trials, same configuration
        assert [(t.number, t.state, t.params) for t in load(db, "base").get_trials()] == before
        assert load(db, "base").user_attrs == attrs


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
    from rmsprop.tools import tuning
    import tune_toy_mod as m

    branches = set()
    for lr, alpha in ((0.05, 0.9), (0.001, 0.99), (100.0, 0.9)):
        r = m.PROBLEM.run(lambda ps: m.RMS(ps, lr=lr, alpha=alpha), seed=0)
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
