"""`rmsprop compare` and its Python API end to end on tiny configurations: outputs, the verdict
report, resume safety, Ctrl-C, user problems and their errors, bad input."""

import csv
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

import torch  # noqa: E402

import rmsprop.cli as cli  # noqa: E402
from rmsprop.tools import (
    compare,  # noqa: E402
    user_problem,  # noqa: E402
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["compare", "--problem", "saddle,logreg-cancer", "--optimizer", "rmsprop,sgd-momentum",
        "--trials", "2", "--seeds", "2", "--steps", "20", "--jobs", "1"]
# per problem: 2 optimizers x (2 trials + 2 default + 2 tuned seeds) + 1 torch-rmsprop cross-check
N_RUNS = 2 * (2 * (2 + 2 + 2) + 1)
REAL_RUN_JOB = compare.run_job


@pytest.fixture(autouse=True)
def _only_compare(monkeypatch):
    # the other tools are other modules' business; parse with `compare` alone
    monkeypatch.setattr(cli, "TOOLS", ("compare",))
    monkeypatch.setattr(user_problem, "_LOADED", {})
    monkeypatch.setattr(user_problem, "_LIVE", {})


def _json_files(out):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(out / "runs") for f in fs
                  if f.endswith(".json"))


def _counting(monkeypatch, fail_after=None, error=KeyboardInterrupt):
    calls = []

    def fake(job):
        if fail_after is not None and len(calls) >= fail_after:
            raise error
        calls.append(job["path"])
        return REAL_RUN_JOB(job)

    monkeypatch.setattr(compare, "run_job", fake)
    return calls


def _one_line_error(capsys, code, needle):
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert needle in err, err
    assert err.count("\n") == 1 and "Traceback" not in err and not out, (out, err)
    return err


@pytest.mark.slow
def test_end_to_end_outputs_verdict_first_and_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    assert cli.main(TINY + ["--out", str(out)]) == 0
    files = _json_files(out)
    assert len(files) == N_RUNS
    rec = json.load(open(files[0]))
    for key in ("problem", "optimizer", "hyperparameters", "seed", "seed_streams", "versions",
                "search_space", "result", "optimizer_class"):
        assert key in rec
    assert {"train_loss", "eval_loss", "diverged", "seconds_per_step"} <= set(rec["result"])
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 * 2 * 2  # problems x optimizers x {default, tuned}
    report = (out / "report.md").read_text()
    sections = re.findall(r"^## (.+)$", report, re.M)
    assert sections[0] == "Verdict on the four claims", sections
    verdict = report.split("## Verdict on the four claims")[1].split("\n## ")[0]
    for claim in ("Fast convergence", "Stable learning", "Few hyperparameters",
                  "Non-convex problems"):
        row = next(line for line in verdict.splitlines() if line.startswith(f"| {claim} |"))
        assert re.search(r"\*\*(yes|partly|no|not shown)\*\*", row), row
        assert ".png](" in row  # each verdict names the plot it rests on
    assert "How far to trust a winner" in report and "2 seeds" in report
    assert "tau = 0.001" in report and "tau = 0.1" in report  # saddle, logreg-cancer
    for section in ("## Per problem", "## Search spaces", "## Cross-check"):
        assert section in report
    # every dimension the tuned configs vary is in the search-space table
    spaces = report.split("## Search spaces")[1].split("\n## ")[0]
    space_row = next(line for line in spaces.splitlines() if line.startswith("| sgd-momentum |"))
    assert "momentum: 1-momentum log-uniform" in space_row and "lr: log-uniform" in space_row
    tune = [json.load(open(f)) for f in files if "/sgd-momentum/tune-" in f]
    assert len({t["hyperparameters"]["momentum"] for t in tune}) > 1
    for png in ("convergence.png", "lr_sensitivity.png", "performance_profile.png",
                "trajectories.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({png})" in report
    assert "| saddle | rmsprop |" in capsys.readouterr().out
    # the cross-check: our for-loop path against torch.optim.RMSprop, bit for bit (same process)
    cc = [json.load(open(f)) for f in files if "crosscheck" in f]
    assert len(cc) == 2 and all(r["cross_check"]["forloop"]["identical"] for r in cc)
    ours = [json.load(open(f)) for f in files if "/rmsprop/" in f]
    assert {r["optimizer_class"] for r in ours} == {"rmsprop.torch.optimizer.RMSprop"}

    # resume: nothing re-runs, it says so, and the report is rebuilt from the stored runs
    calls = _counting(monkeypatch)
    assert cli.main(TINY + ["--out", str(out), "--no-plots"]) == 0
    assert calls == []
    err = capsys.readouterr().err
    assert f"resuming {out}: 18 of the first 18 runs are done" in err
    assert "0 runs made, 26 reused" in err
    # a missing run is the only one that runs again
    os.remove(files[3])
    assert cli.main(TINY + ["--out", str(out), "--no-plots"]) == 0
    assert calls == [files[3]]


def _snapshot(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_a_mismatched_resume_is_refused_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "cmp"
    base = ["compare", "--problem", "saddle", "--optimizer", "rmsprop", "--trials", "1",
            "--seeds", "1", "--jobs", "1", "--no-plots", "--out", str(out)]
    assert cli.main(base + ["--steps", "6"]) == 0
    capsys.readouterr()
    before = _snapshot(out)
    code = cli.main(base + ["--steps", "5", "--seeds", "2"])
    err = _one_line_error(capsys, code, "holds a compare run with other options")
    assert "seeds 1 there, 2 here" in err and "steps 6 there, 5 here" in err
    assert _snapshot(out) == before
    code = cli.main(base[:2] + ["rosenbrock"] + base[3:] + ["--steps", "6"])
    _one_line_error(capsys, code, "problems saddle there, rosenbrock here")
    assert _snapshot(out) == before


def test_out_that_is_not_a_compare_folder_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code = cli.main(["compare", "--problem", "saddle", "--out", str(tmp_path)])
    _one_line_error(capsys, code, "is not empty and holds no compare.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    code = cli.main(["compare", "--problem", "saddle", "--out", str(tmp_path / "notes.txt")])
    _one_line_error(capsys, code, "exists and is not a folder")


def test_out_under_a_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code = cli.main(["compare", "--problem", "saddle", "--out", str(tmp_path / "file" / "sub")])
    _one_line_error(capsys, code, "cannot create --out")


def test_read_only_out_is_a_one_line_error(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        undo = [lambda: ro.chmod(0o755)]
    else:  # root writes through permission bits: make the folder immutable instead
        proc = subprocess.run(["chattr", "+i", str(ro)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot make a read-only folder here: {proc.stderr!r}")
        undo = [lambda: subprocess.run(["chattr", "-i", str(ro)], check=True)]
    try:
        code = cli.main(["compare", "--problem", "saddle", "--out", str(ro)])
        _one_line_error(capsys, code, "is not writable")
        assert list(ro.iterdir()) == []
    finally:
        undo[0]()


def test_ctrl_c_keeps_finished_runs_and_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--problem", "saddle", "--optimizer", "rmsprop", "--trials", "1",
            "--seeds", "1", "--steps", "5", "--jobs", "1", "--no-plots", "--out", str(out)]
    calls = _counting(monkeypatch, fail_after=2)
    assert cli.main(args) == 130
    assert "resume" in capsys.readouterr().err
    assert len(_json_files(out)) == 2 == len(calls)
    calls = _counting(monkeypatch)
    assert cli.main(args) == 0
    # 1 trial + 1 default + 1 cross-check + 1 tuned = 4 runs, 2 of them kept from before
    assert len(calls) == 2 and len(_json_files(out)) == 4


def test_a_run_that_raises_is_one_line_naming_it_and_keeps_only_finished_runs(tmp_path,
                                                                             monkeypatch,
                                                                             capsys):
    """A model or loss that raises mid-training: a one-line error naming the run; with
    nothing finished the folder is gone, with finished runs they are kept to resume."""
    out = tmp_path / "cmp"
    args = ["compare", "--problem", "saddle", "--optimizer", "rmsprop", "--trials", "1",
            "--seeds", "1", "--steps", "5", "--jobs", "1", "--no-plots", "--out", str(out)]
    def failed(code, needle):  # after the banner and the progress bar: the last line
        out_, err = capsys.readouterr()
        last = err.strip().splitlines()[-1]
        assert code == 2 and "Traceback" not in err and not out_, (out_, err)
        assert last.startswith("rmsprop: error: the run saddle with ") and needle in last
    _counting(monkeypatch, fail_after=0, error=RuntimeError("loss boom"))
    failed(cli.main(args), "tune trial 0, seed 0) failed: RuntimeError: loss boom; nothing was "
                           "kept")
    assert not out.exists()
    calls = _counting(monkeypatch, fail_after=2, error=RuntimeError("loss boom"))
    failed(cli.main(args), "2 finished runs kept in")
    assert len(_json_files(out)) == 2 == len(calls)
    calls = _counting(monkeypatch)
    assert cli.main(args) == 0
    assert len(calls) == 2 and len(_json_files(out)) == 4


@pytest.mark.parametrize("bad, needle", [
    (["--problem", "rosenbrok"], "unknown problem 'rosenbrok'; valid problems: rosenbrock"),
    (["--optimizer", "adamw"], "unknown optimizer 'adamw'; valid optimizers: rmsprop"),
    (["--optimizer", "torch.nn:Linear"], "not a torch.optim.Optimizer"),
    (["--seeds", "0"], "--seeds must be an integer >= 1"),
    (["--trials", "-1"], "--trials must be an integer >= 0"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--suite", "huge"], "invalid choice"),
    (["--problem", ""], "--problem names nothing"),
    (["--problem", ","], "--problem names nothing"),
    (["--optimizer", ""], "--optimizer names nothing"),
])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(tmp_path, capsys, bad, needle):
    out = tmp_path / "never"
    _one_line_error(capsys, cli.main(["compare", "--out", str(out)] + bad), needle)
    assert not out.exists()


def test_ours_failing_to_import_is_an_error_not_a_stand_in(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rmsprop.torch", None)  # `import rmsprop.torch` fails
    out = tmp_path / "never"
    code = cli.main(["compare", "--problem", "saddle", "--optimizer", "rmsprop,adam", "--out",
                     str(out)])
    _one_line_error(capsys, code, "torch.optim.RMSprop is never run in its place")
    assert not out.exists()


def test_missing_optional_package_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from rmsprop.tools import problems

    prob = problems.get("mlp-mnist1d")
    monkeypatch.setattr(type(prob), "missing", lambda self: list(self.requires))
    out = tmp_path / "never"
    code = cli.main(["compare", "--problem", "mlp-mnist1d", "--out", str(out)])
    _one_line_error(capsys, code, "needs mnist1d: pip install mnist1d")
    assert not out.exists()


# -- user problems -------------------------------------------------------------------------------

TINY_PROBLEM = '''
import torch
import torch.nn.functional as F
from rmsprop.tools.problems.base import ModelProblem

g = torch.Generator().manual_seed(0)
X = torch.randn(160, 4, generator=g)
Y = X @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.1 * torch.randn(160, generator=g)


def batches(gen):
    while True:
        for idx in torch.randperm(96, generator=gen).split(16):
            yield X[idx], Y[idx]


def split(name):
    return [(X[96:128], Y[96:128])] if name == "valid" else [(X[128:], Y[128:])]


def make_problem():
    return ModelProblem("tiny-regression", steps=30, eval_every=2,
                        model=lambda: torch.nn.Sequential(torch.nn.Linear(4, 8),
                                                          torch.nn.Tanh(),
                                                          torch.nn.Linear(8, 1)),
                        loss=lambda m, b: F.mse_loss(m(b[0]).squeeze(-1), b[1]),
                        train_batches=batches, eval_batches=split)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's module `mine_<n>` in the working directory (not on sys.path beforehand)."""
    def write(source, name="mine_tiny"):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.delitem(sys.modules, name, raising=False)
        return name

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    return write


def _masked(report):
    """The report without what legitimately differs between two runs: wall time, ms per step
    (the last column of the per-problem tables), the command's own name of the problem."""
    report = re.sub(r" Wall time \d+ s with \d+ jobs\.", "", report)
    out = []
    for line in report.splitlines():
        if line.startswith("| ") and line.count("|") == 12:  # per-problem table
            line = line.rsplit("|", 2)[0]
        out.append(line)
    return "\n".join(out)


@pytest.mark.slow
def test_cli_and_python_api_write_the_same_report_on_a_user_problem(user_module, tmp_path,
                                                                    capsys):
    mod = user_module(TINY_PROBLEM)
    spec = f"{mod}:make_problem"
    small = dict(trials=2, seeds=2, jobs=1)
    code = cli.main(["compare", "--problem", spec, "--optimizer", "rmsprop,adam", "--trials", "2",
                     "--seeds", "2", "--jobs", "1", "--out", str(tmp_path / "cli")])
    assert code == 0, capsys.readouterr().err
    res = compare.run(spec, "rmsprop,adam", out=tmp_path / "api", progress=False, log=None,
                      **small)
    a = (tmp_path / "cli" / "report.md").read_text()
    b = Path(res.report_path).read_text()
    assert _masked(a) == _masked(b)
    assert a.startswith("# rmsprop compare: your problem `tiny-regression`")
    assert f"From `{spec}`." in a
    assert set(res.verdicts) == {"Fast convergence", "Stable learning", "Few hyperparameters",
                                 "Non-convex problems"}
    # and the verdict is about that problem only
    verdict = a.split("## Verdict on the four claims")[1].split("\n## ")[0]
    assert "on `tiny-regression`" in verdict and "saddle" not in verdict
    rows = list(csv.DictReader(open(tmp_path / "api" / "results.csv")))
    assert {r["problem"] for r in rows} == {"tiny-regression"} and len(rows) == 4


def test_a_problem_object_runs_through_the_python_api(tmp_path):
    import importlib

    sys.path.insert(0, str(ROOT))
    try:
        mod = importlib.import_module("examples.my_problem")
    finally:
        sys.path.remove(str(ROOT))
    res = compare.run([mod.make_problem()], "rmsprop,sgd", trials=1, seeds=1, steps=10, jobs=1,
                      out=tmp_path / "obj", plots=False, progress=False, log=None)
    assert res.made == 1 + 1 + 1 + 1 + 1 + 1 + 1  # 2 x (trial, default, tuned) + cross-check
    assert "From a Problem object (Python API)." in Path(res.report_path).read_text()


@pytest.mark.slow
def test_readme_example_problem_runs_from_the_repository_root(tmp_path):
    """`rmsprop compare --problem examples.my_problem:make_problem` as a user types it: a
    console script, whose sys.path does not start with the working directory."""
    exe = Path(sys.executable).with_name("rmsprop")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "rmsprop.cli"]
    proc = subprocess.run(cmd + ["compare", "--problem", "examples.my_problem:make_problem",
                                 "--trials", "1", "--seeds", "1", "--steps", "5", "--jobs", "1",
                                 "--no-plots", "--out", str(tmp_path / "ex")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| spirals-mlp | rmsprop |" in proc.stdout


BAD_FACTORIES = [
    ("", "mine_bad:nope", "module 'mine_bad' has no attribute 'nope'"),
    ("import not_a_module_anywhere\n", "mine_bad:make", "importing 'mine_bad' failed: "
     "ModuleNotFoundError"),
    ("def make():\n    return 42\n", "mine_bad:make", "make() returned a int, not a "
     "rmsprop.tools.problems.Problem"),
    ("def make():\n    raise RuntimeError('no data here')\n", "mine_bad:make",
     "make() raised RuntimeError: no data here"),
    (TINY_PROBLEM.replace("torch.nn.Sequential(torch.nn.Linear(4, 8),",
                          "torch.nn.Sequential(torch.nn.Identity(),")
     .replace("torch.nn.Tanh(),\n", "").replace("torch.nn.Linear(8, 1)),", "),"),
     "mine_bad:make_problem", "the model has no parameters to train"),
    (TINY_PROBLEM.replace("F.mse_loss(m(b[0]).squeeze(-1), b[1])",
                          "(m(b[0]).squeeze(-1) - b[1]) ** 2"),
     "mine_bad:make_problem", "the loss is not a scalar: shape (16,)"),
    (TINY_PROBLEM.replace("F.mse_loss(m(b[0]).squeeze(-1), b[1])", "float(b[1].mean())"),
     "mine_bad:make_problem", "the loss must be a scalar tensor, got a float"),
    (TINY_PROBLEM.replace('"tiny-regression"', '"a/b"'), "mine_bad:make_problem",
     "name must be a non-empty string without '/'"),
]


@pytest.mark.parametrize("source, spec, needle", BAD_FACTORIES,
                         ids=["no-attr", "import-error", "wrong-type", "raises", "no-params",
                              "non-scalar-loss", "float-loss", "bad-name"])
def test_bad_factories_are_one_line_errors_naming_the_problem(user_module, tmp_path, capsys,
                                                              source, spec, needle):
    user_module(source, "mine_bad")
    out = tmp_path / "never"
    code = cli.main(["compare", "--problem", spec, "--out", str(out)])
    err = _one_line_error(capsys, code, needle)
    assert spec in err or "tiny-regression" in err
    assert not out.exists()


def test_a_module_that_is_not_there_names_the_problem(user_module, tmp_path, capsys):
    code = cli.main(["compare", "--problem", "nowhere.mod:make", "--out", str(tmp_path / "x")])
    _one_line_error(capsys, code, "problem 'nowhere.mod:make': no module named 'nowhere'")


def test_model_problem_gives_common_random_numbers(user_module):
    mod = user_module(TINY_PROBLEM)
    prob = user_problem.load_problem(f"{mod}:make_problem")
    a, b, c = prob.build(3), prob.build(3), prob.build(4)
    assert all(torch.equal(x, y) for x, y in zip(a.params, b.params))
    assert not all(torch.equal(x, y) for x, y in zip(a.params, c.params))
    la, lb, lc = (t.train_loss().item() for t in (a, b, c))
    assert la == lb != lc
    before = torch.get_rng_state()
    prob.build(5).train_loss()
    assert torch.equal(before, torch.get_rng_state())  # the global RNG is left alone
    # evaluation = the loss over the split's batches, by the model's own parameters
    import importlib

    m = importlib.import_module(mod)
    w1, b1, w2, b2 = (p.detach() for p in a.params)
    x, y = m.X[96:128], m.Y[96:128]
    by_hand = float(((torch.tanh(x @ w1.T + b1) @ w2.T + b2).squeeze(-1) - y).pow(2).mean())
    loss, metric = a.evaluate("valid")
    assert metric is None and loss == pytest.approx(by_hand, rel=1e-6)


def test_good_accuracy_is_not_divergence():
    """mlp-digits at lr 0.1: the validation cross-entropy ends 10x above its start while the
    accuracy is > 90 % (over-confidence), and the training loss spiked early and recovered."""
    from rmsprop.tools import problems
    from rmsprop.torch import RMSprop

    p = problems.get("mlp-digits")
    r = p.run(lambda ps: RMSprop(ps, lr=0.1, alpha=0.99), seed=0)
    assert not r.diverged and r.final_eval_metric > 0.9
    assert r.final_eval_loss > 10 * r.eval_loss[0]
    blown = p.run(lambda ps: torch.optim.SGD(ps, lr=50.0), seed=0, steps=100)
    assert blown.diverged and not math.isfinite(blown.final_eval_loss)


# -- the search space and the report's pieces ---------------------------------------------------

def test_tuned_configs_vary_exactly_the_dimensions_the_table_lists():
    p = compare.plan("saddle", "rmsprop,adam,sgd,sgd-momentum", trials=6)
    cfg = p.report_cfg()
    for o in p.optimizers:
        configs = compare.tuning_configs(p.specs[o], p.spaces[o], 6, "sobol")
        varied = {k for k in configs[0] if len({c[k] for c in configs}) > 1}
        listed = {d.split(":")[0] for d in cfg["search_spaces"][o]}
        assert varied == listed, (o, varied, listed)
    assert {d.split(":")[0] for d in cfg["search_spaces"]["sgd-momentum"]} == {"lr", "momentum"}


def _rec(opt, phase, seed, losses, diverged=False, lr=0.01, trial=None, problem="saddle",
         alpha=None):
    steps = [0, 10, 20][:len(losses)]
    final = float("inf") if diverged else losses[-1]
    hp = {"lr": lr} if alpha is None else {"lr": lr, "alpha": alpha}
    return {"problem": problem, "optimizer": opt, "phase": phase, "seed": seed, "trial": trial,
            "steps": 20, "hyperparameters": hp, "tuned_hyperparameters": hp,
            "result": {"steps": steps, "train_loss": losses, "eval_steps": steps,
                       "eval_loss": losses, "eval_metric": None, "final_eval_loss": final,
                       "final_eval_metric": None, "test_loss": None, "test_metric": None,
                       "diverged": diverged, "seconds_per_step": 1e-3}}


def _saddle_records():
    # saddle: f* = -1, tau = 1e-3, l0 = 1 -> target -1 + 1e-3 * 2 = -0.998
    recs = [_rec("rmsprop", "tune", 0, [1.0, -1.0, -1.0], lr=0.01, trial=0),
            _rec("rmsprop", "tune", 0, [1.0, 50.0], diverged=True, lr=0.1, trial=1),
            _rec("adam", "tune", 0, [1.0, 0.0, -0.9985], lr=0.01, trial=0)]
    for s in (1, 2, 3):
        recs.append(_rec("rmsprop", "tuned", s, [1.0, -0.999, -1.0]))
        recs.append(_rec("adam", "tuned", s, [1.0, 50.0], diverged=True) if s == 3 else
                    _rec("adam", "tuned", s, [1.0, 0.0, -0.9985]))
    return recs


def test_aggregate_against_hand_computed_values():
    from rmsprop.tools.report import aggregate, select_best

    recs = _saddle_records()
    assert select_best([r for r in recs if r["optimizer"] == "rmsprop" and r["phase"] == "tune"]
                       )["hyperparameters"]["lr"] == 0.01
    agg = aggregate(recs, {"problems": ["saddle"], "optimizers": ["rmsprop", "adam"]})
    rms, adam = agg.entry("saddle", "rmsprop"), agg.entry("saddle", "adam")
    assert rms.tuning.diverged == 0.5 and adam.tuning.diverged == 0.0
    assert rms.tuned.stt == (10, 10, 10) and rms.tuned.success == 1.0
    assert adam.tuned.stt == (20, 20, math.inf)
    assert adam.tuned.success == pytest.approx(2 / 3)
    assert adam.tuned.median_steps == 20 and adam.tuned.div == pytest.approx(1 / 3)
    # profile: ratios 1 and 2 -> scores 1 and (4 - 2) / 3
    assert agg.profiles["tuned"].score == pytest.approx({"rmsprop": 1.0, "adam": 2 / 3})
    # paired finals, a diverged seed scored at the threshold -1 + 10 * 2 = 19; analytic problem:
    # compared as log10(f - f* + 1e-12 * 2): rmsprop log10(2e-12) on every seed, adam
    # log10(0.0015) twice and log10(20): every difference < -1 decade -> rmsprop wins
    assert adam.tuned.clipped[2] == 19.0
    h = agg.h2h["saddle"]["adam"]["tuned"]
    expect = math.log10(2e-12) - math.log10(0.0015 + 2e-12)
    assert h.verdict == "rmsprop" and h.ci[0] == pytest.approx(expect)
    assert h.ci[2] < 0 and h.margin == 1.0


def test_claims_from_hand_made_runs():
    from rmsprop.tools.report import aggregate, claims

    agg = aggregate(_saddle_records(), {"problems": ["saddle"], "optimizers": ["rmsprop", "adam"],
                                        "seeds": 3})
    verdicts = {c.title: c for c in claims(agg)}
    # rmsprop reached the target first (10 vs 20 steps): the best profile score
    assert verdicts["Fast convergence"].verdict == "yes"
    assert "rmsprop's profile score 1" in verdicts["Fast convergence"].summary
    # no rmsprop re-run diverged, the deterministic saddle shows no limit cycle
    assert verdicts["Stable learning"].verdict == "yes"
    # the saddle is non-convex and rmsprop won the paired comparison
    assert verdicts["Non-convex problems"].verdict == "yes"
    assert "vs adam 1 won, 0 tied, 0 lost" in verdicts["Non-convex problems"].summary
    # adam wins instead when its runs are rmsprop's and vice versa
    swapped = [dict(r, optimizer={"rmsprop": "adam", "adam": "rmsprop"}[r["optimizer"]])
               for r in _saddle_records()]
    agg = aggregate(swapped, {"problems": ["saddle"], "optimizers": ["rmsprop", "adam"]})
    verdicts = {c.title: c.verdict for c in claims(agg)}
    assert verdicts["Fast convergence"] == "no" and verdicts["Stable learning"] == "no"
    assert verdicts["Non-convex problems"] == "no"


@pytest.mark.parametrize("adam_final, verdict", [(0.305, "tie"), (0.32, "rmsprop")])
def test_data_problem_margin_is_one_percent_of_initial_loss(adam_final, verdict):
    from rmsprop.tools.report import aggregate

    recs = []
    for s in (1, 2, 3):
        recs.append(_rec("rmsprop", "tuned", s, [1.0, 0.5, 0.30], problem="logreg-cancer"))
        recs.append(_rec("adam", "tuned", s, [1.0, 0.5, adam_final], problem="logreg-cancer"))
    agg = aggregate(recs, {"problems": ["logreg-cancer"], "optimizers": ["rmsprop", "adam"]})
    h = agg.h2h["logreg-cancer"]["adam"]["tuned"]
    # l0 = 1, f* unknown -> margin 0.01; differences 0.30 - adam_final on every seed
    assert h.margin == pytest.approx(0.01)
    assert h.ci[0] == pytest.approx(0.30 - adam_final)
    assert h.verdict == verdict


def test_lr_sensitivity_never_joins_trials_with_different_decays():
    from rmsprop.tools.report import aggregate, lr_sensitivity_series

    recs = [_rec("rmsprop", "tune", 0, [1.0, 0.5, 0.2], lr=lr, alpha=a, trial=i)
            for i, (lr, a) in enumerate([(1e-3, 0.9), (1e-2, 0.99), (1e-1, 0.9), (3e-2, 0.999),
                                         (3e-3, 0.99)])]
    agg = aggregate(recs, {"problems": ["saddle"], "optimizers": ["rmsprop"]})
    series = lr_sensitivity_series(agg)
    assert sorted((dict(s.fixed)["alpha"], s.lrs) for s in series) == [
        (0.9, (1e-3, 1e-1)), (0.99, (3e-3, 1e-2)), (0.999, (3e-2,))]


def test_performance_profile_legend_covers_no_curve():
    from rmsprop.tools.report import _pyplot, aggregate, profile_figure

    agg = aggregate(_saddle_records(), {"problems": ["saddle"], "optimizers": ["rmsprop", "adam"]})
    fig = profile_figure(agg)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    try:
        for ax in fig.axes:
            legend = ax.get_legend()
            assert legend is not None
            box, area = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
            assert not box.overlaps(area), (box, area)
    finally:
        _pyplot().close(fig)


def test_power_note_says_how_thin_three_seeds_are():
    from rmsprop.tools.report import power_note

    note = power_note(3)
    rate = int(re.search(r"excludes 0 in (\d+) %", note).group(1))
    assert abs(rate - 25) <= 6  # 2 / 2**3: all three paired differences share a sign
    assert "every paired difference has the same sign" in note


def test_grid_and_lhs_searches():
    p = compare.plan("saddle", "rmsprop,sgd-momentum", trials=5, search="grid")
    for o in p.optimizers:
        configs = compare.tuning_configs(p.specs[o], p.spaces[o], 5, "grid")
        lr = next(d for d in p.spaces[o] if d.name == "lr")
        # 5 points evenly spaced in log lr, ends included, nothing else varied
        assert [c["lr"] for c in configs] == pytest.approx(
            [lr.low * (lr.high / lr.low) ** (i / 4) for i in range(5)])
        assert all(set(c) == {"lr"} for c in configs)
        assert p.report_cfg()["search_spaces"][o][0].startswith("lr: 5 points log-spaced")
    p = compare.plan("saddle", "sgd-momentum", trials=5, search="lhs")
    configs = compare.tuning_configs(p.specs["sgd-momentum"], p.spaces["sgd-momentum"], 5, "lhs")
    assert configs[0] == {"lr": 1e-3, "momentum": 0.9}  # trial 0: the library defaults
    # Latin hypercube: the 4 other points fall in distinct quarters of each dimension's scale
    for d in p.spaces["sgd-momentum"]:
        assert sorted(int(4 * d.position(c[d.name])) for c in configs[1:]) == [0, 1, 2, 3]


def test_a_problem_target_loss_replaces_the_relative_target():
    import dataclasses

    from rmsprop.tools import problems
    from rmsprop.tools.report import aggregate

    saddle = dataclasses.replace(problems.get("saddle"), target_loss=0.0)
    agg = aggregate(_saddle_records(), {"problems": ["saddle"], "optimizers": ["rmsprop", "adam"]},
                    {"saddle": saddle})
    # the first evaluation <= 0: step 10 for both (rmsprop -0.999, adam 0.0); adam's seed 3
    # diverged at step 10 with 50.0
    assert agg.entry("saddle", "rmsprop").tuned.stt == (10, 10, 10)
    assert agg.entry("saddle", "adam").tuned.stt == (10, 10, math.inf)


def test_claims_without_tuning_compare_the_defaults():
    from rmsprop.tools.report import aggregate, claims

    recs = [dict(r, phase="default") for r in _saddle_records() if r["phase"] == "tuned"]
    agg = aggregate(recs, {"problems": ["saddle"], "optimizers": ["rmsprop", "adam"]})
    verdicts = {c.title: c for c in claims(agg)}
    assert verdicts["Fast convergence"].verdict == "yes"
    assert verdicts["Fast convergence"].summary.startswith("defaults, on `saddle`")
    assert verdicts["Non-convex problems"].verdict == "yes"


def test_a_compare_json_without_options_is_refused(tmp_path, capsys):
    (tmp_path / "compare.json").write_text("{}")
    code = cli.main(["compare", "--problem", "saddle", "--out", str(tmp_path)])
    _one_line_error(capsys, code, "holds a compare run without recorded options")


def test_a_changed_problem_definition_is_a_mismatch(user_module, tmp_path, capsys):
    mod = user_module(TINY_PROBLEM)
    args = ["compare", "--problem", f"{mod}:make_problem", "--optimizer", "sgd", "--trials", "1",
            "--seeds", "1", "--jobs", "1", "--no-plots", "--out", str(tmp_path / "o")]
    assert cli.main(args) == 0
    capsys.readouterr()
    user_module(TINY_PROBLEM.replace("steps=30, eval_every=2", "steps=30, eval_every=3"))
    user_problem._LOADED.clear()
    _one_line_error(capsys, cli.main(args), "problems' definitions (eval_every, source_hash)")


def test_claims_are_about_the_first_rmsprop_variant_without_plain_rmsprop():
    from rmsprop.tools.report import aggregate, claims

    recs = [dict(r, optimizer={"rmsprop": "rmsprop-momentum"}.get(r["optimizer"],
                                                                  r["optimizer"]))
            for r in _saddle_records()]
    agg = aggregate(recs, {"problems": ["saddle"], "optimizers": ["rmsprop-momentum", "adam"]})
    cl = {c.title: c for c in claims(agg)}
    assert agg.base == "rmsprop-momentum" and cl["Fast convergence"].verdict == "yes"
    assert "rmsprop-momentum's profile score 1" in cl["Fast convergence"].summary
    assert claims(aggregate([r for r in recs if r["optimizer"] == "adam"],
                            {"problems": ["saddle"], "optimizers": ["adam"]})) == []


def test_a_resume_of_an_edited_user_problem_is_refused(user_module, tmp_path, capsys):
    mod = user_module(TINY_PROBLEM)
    out = tmp_path / "o"
    args = ["compare", "--problem", f"{mod}:make_problem", "--optimizer", "sgd", "--trials", "1",
            "--seeds", "1", "--jobs", "1", "--no-plots", "--out", str(out)]
    assert cli.main(args) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # the same name and fields, another model: 4-6-1 instead of 4-8-1
    user_module(TINY_PROBLEM.replace("Linear(4, 8)", "Linear(4, 6)")
                .replace("Linear(8, 1)", "Linear(6, 1)"))
    user_problem._LOADED.clear()
    _one_line_error(capsys, cli.main(args), "problems' definitions (parameter_shapes, "
                                            "source_hash)")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_an_optimizer_class_imports_from_the_working_directory(user_module, tmp_path, capsys):
    user_module("import torch\n\n\nclass MyAdam(torch.optim.Adam):\n    pass\n", "myopt_cwd")
    code = cli.main(["compare", "--problem", "saddle", "--optimizer", "myopt_cwd:MyAdam",
                     "--trials", "0", "--seeds", "1", "--steps", "1", "--jobs", "1",
                     "--no-plots", "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "| saddle | myopt_cwd:MyAdam |" in out


def test_an_optimizer_named_like_ours_is_not_taken_for_ours(user_module, tmp_path, capsys):
    # the registry's `ours` flag decides, not the name: this is torch's Adam
    user_module("import torch\n\n\nclass Adam(torch.optim.Adam):\n    pass\n", "rmsprop_fork")
    code = cli.main(["compare", "--problem", "saddle", "--optimizer", "rmsprop_fork:Adam,adam",
                     "--trials", "0", "--seeds", "1", "--steps", "5", "--jobs", "1",
                     "--no-plots", "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "verdict:" not in out
    report = (tmp_path / "o" / "report.md").read_text()
    assert "(ours)" not in report and "the claims are assessed only when an RMSProp" in report


def test_few_hyperparameters_is_not_shown_without_tuning_or_a_rival():
    from rmsprop.tools.report import aggregate, claims

    def few(recs, opts):
        agg = aggregate(recs, {"problems": ["saddle"], "optimizers": opts})
        return next(c for c in claims(agg) if c.title == "Few hyperparameters")

    recs = _saddle_records()  # rmsprop: 2 tuning trials, adam: 1
    both = recs + [_rec("adam", "tune", 0, [1.0, 0.5, -0.5], lr=0.1, trial=1)]
    assert few(both, ["rmsprop", "adam"]).verdict != "not shown"
    # one trial (the defaults) tunes nothing: its gap is 0 by construction
    defaults_only = [r for r in both if r["trial"] in (None, 0)]
    for case, opts in ((defaults_only, ["rmsprop", "adam"]),
                       ([r for r in both if r["optimizer"] == "rmsprop"], ["rmsprop"]),
                       (recs, ["rmsprop", "adam"])):
        c = few(case, opts)
        assert c.verdict == "not shown", (opts, c)
        assert "needs at least 2 tuning trials of rmsprop and of a rival" in c.summary


@pytest.mark.parametrize("kwargs, needle", [
    (dict(optimizers=[torch.optim.Adam]), "an optimizer must be a registered name or an import "
                                          "path 'pkg.module:Class', got a type"),
    (dict(optimizers=[None]), "got a NoneType"),
    (dict(problems=123), "a problem must be a name, an import path 'pkg.module:attr' or a "
                         "Problem, got a int"),
], ids=["class", "none", "int-problems"])
def test_the_python_api_names_a_bad_argument(tmp_path, kwargs, needle):
    args = {"problems": "saddle", "optimizers": "adam", **kwargs}
    with pytest.raises(compare.CompareError, match=re.escape(needle)):
        compare.run(**args, trials=0, seeds=1, steps=1, jobs=1, out=tmp_path / "o",
                    progress=False, log=None)
    assert not (tmp_path / "o").exists()


def test_a_failed_compare_leaves_no_folder_it_made(tmp_path, monkeypatch, capsys):
    _counting(monkeypatch, fail_after=0, error=RuntimeError("boom"))
    code = cli.main(["compare", "--problem", "saddle", "--optimizer", "sgd", "--trials", "0",
                     "--seeds", "1", "--steps", "2", "--jobs", "1", "--no-plots", "--out",
                     str(tmp_path / "deep" / "x" / "y")])
    assert code == 2
    assert "RuntimeError: boom; nothing was kept" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_test_split_that_raises_is_one_line_before_any_run(user_module, tmp_path, capsys):
    """The problem check evaluated the 'valid' split only: one whose 'test' split raises
    failed in its first run, after the header and the bar."""
    name = user_module(TINY_PROBLEM.replace(
        'return [(X[96:128], Y[96:128])] if name == "valid" else [(X[128:], Y[128:])]',
        'return {"valid": [(X[96:128], Y[96:128])]}[name]'), "mine_no_test")
    out = tmp_path / "o"
    code = cli.main(["compare", "--problem", f"{name}:make_problem", "--optimizer", "adam",
                     "--trials", "0", "--seeds", "1", "--jobs", "1", "--no-plots",
                     "--out", str(out)])
    _one_line_error(capsys, code, "evaluating the 'test' split raised KeyError")
    assert not out.exists()


def test_an_optimizer_class_that_cannot_be_built_is_one_line_before_any_run(tmp_path, capsys):
    """torch.optim.Optimizer itself takes no lr: it failed in every run, mid-way."""
    out = tmp_path / "o"
    code = cli.main(["compare", "--problem", "saddle", "--optimizer", "torch.optim:Optimizer",
                     "--trials", "0", "--seeds", "1", "--jobs", "1", "--no-plots",
                     "--out", str(out)])
    _one_line_error(capsys, code, "optimizer 'torch.optim:Optimizer' cannot be built with "
                                  "lr=0.001: TypeError")
    assert not out.exists()


def test_an_unknown_problem_names_the_import_path_form(capsys):
    code = cli.main(["compare", "--problem", "examples.my_problem", "--no-plots"])
    _one_line_error(capsys, code, "or your own as pkg.module:make_problem")
