"""`rmsprop compare` end to end on a tiny configuration: outputs, resume, Ctrl-C, bad input."""

import csv
import json
import math
import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

import rmsprop.cli as cli  # noqa: E402
from rmsprop.cli import compare  # noqa: E402

TINY = ["compare", "--problem", "saddle,logreg-cancer", "--optimizer", "rmsprop,sgd",
        "--trials", "2", "--seeds", "2", "--steps", "20", "--jobs", "1"]
# per problem: 2 optimizers x (2 trials + 2 default + 2 tuned seeds) + 1 torch-rmsprop cross-check
N_RUNS = 2 * (2 * (2 + 2 + 2) + 1)
REAL_RUN_JOB = compare.run_job


@pytest.fixture(autouse=True)
def _only_compare(monkeypatch):
    # the other tools are other modules' business; parse with `compare` alone
    monkeypatch.setattr(cli, "TOOLS", ("compare",))


def _json_files(out):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(out / "runs") for f in fs
                  if f.endswith(".json"))


def _counting(monkeypatch, fail_after=None):
    calls = []
    real = REAL_RUN_JOB

    def fake(job):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt
        calls.append(job["path"])
        return real(job)

    monkeypatch.setattr(compare, "run_job", fake)
    return calls


@pytest.mark.slow
def test_end_to_end_outputs_and_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    assert cli.main(TINY + ["--out", str(out)]) == 0
    files = _json_files(out)
    assert len(files) == N_RUNS
    rec = json.load(open(files[0]))
    for key in ("problem", "optimizer", "hyperparameters", "seed", "seed_streams", "versions",
                "search_space", "result"):
        assert key in rec
    assert {"train_loss", "eval_loss", "diverged", "seconds_per_step"} <= set(rec["result"])
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 * 2 * 2  # problems x optimizers x {default, tuned}
    assert {r["config"] for r in rows} == {"default", "tuned"}
    report = (out / "report.md").read_text()
    for section in ("## Summary", "## Head to head", "## Search spaces", "## Cross-check",
                    "log [0.0001, 1]"):
        assert section in report
    for png in ("convergence.png", "lr_sensitivity.png", "performance_profile.png",
                "trajectories.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({png})" in report
    assert "| saddle | rmsprop |" in capsys.readouterr().out
    # the cross-check: our for-loop path against torch.optim.RMSprop, bit for bit (same process)
    cc = [json.load(open(f)) for f in files if "crosscheck" in f]
    assert len(cc) == 2
    for rec in cc:
        if rec["cross_check"]["ours_available"]:
            assert rec["cross_check"]["forloop"]["identical"], rec["cross_check"]

    # resume: nothing re-runs, and the report is rebuilt from the stored runs
    calls = _counting(monkeypatch)
    assert cli.main(TINY + ["--out", str(out), "--no-plots"]) == 0
    assert calls == []
    # a missing run is the only one that runs again
    os.remove(files[3])
    assert cli.main(TINY + ["--out", str(out), "--no-plots"]) == 0
    assert calls == [files[3]]


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


@pytest.mark.parametrize("bad, needle", [
    (["--problem", "rosenbrok"], "unknown problem 'rosenbrok'; valid problems: rosenbrock"),
    (["--optimizer", "adamw"], "unknown optimizer 'adamw'; valid optimizers: rmsprop"),
    (["--optimizer", "torch.nn:Linear"], "not a torch.optim.Optimizer"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--suite", "huge"], "invalid choice"),
])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(tmp_path, capsys, bad, needle):
    out = tmp_path / "never"
    assert cli.main(["compare", "--out", str(out)] + bad) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def _rec(opt, phase, seed, losses, diverged=False, lr=0.01, trial=None, problem="saddle"):
    steps = [0, 10, 20][:len(losses)]
    final = float("inf") if diverged else losses[-1]
    return {"problem": problem, "optimizer": opt, "phase": phase, "seed": seed, "trial": trial,
            "hyperparameters": {"lr": lr}, "tuned_hyperparameters": {"lr": lr},
            "result": {"steps": steps, "train_loss": losses, "eval_steps": steps,
                       "eval_loss": losses, "eval_metric": None, "final_eval_loss": final,
                       "final_eval_metric": None, "test_loss": None, "test_metric": None,
                       "diverged": diverged, "seconds_per_step": 1e-3}}


def test_aggregate_against_hand_computed_values():
    from rmsprop.tools.report import aggregate, select_best

    # saddle: f* = -1, tau = 1e-3, l0 = 1 -> target -1 + 1e-3 * 2 = -0.998
    recs = [_rec("rmsprop", "tune", 0, [1.0, -1.0, -1.0], lr=0.01, trial=0),
            _rec("rmsprop", "tune", 0, [1.0, 50.0], diverged=True, lr=0.1, trial=1),
            _rec("adam", "tune", 0, [1.0, 0.0, -0.9985], lr=0.01, trial=0)]
    for s in (1, 2, 3):
        recs.append(_rec("rmsprop", "tuned", s, [1.0, -0.999, -1.0]))
        recs.append(_rec("adam", "tuned", s, [1.0, 50.0], diverged=True) if s == 3 else
                    _rec("adam", "tuned", s, [1.0, 0.0, -0.9985]))
    assert select_best([r for r in recs if r["optimizer"] == "rmsprop" and r["phase"] == "tune"]
                       )["hyperparameters"]["lr"] == 0.01
    agg = aggregate(recs, {"problems": ["saddle"], "optimizers": ["rmsprop", "adam"]})
    rms = agg["problems"]["saddle"]["opts"]["rmsprop"]
    adam = agg["problems"]["saddle"]["opts"]["adam"]
    assert rms["grid_div"] == 0.5 and adam["grid_div"] == 0.0
    assert rms["tuned"]["stt"] == [10, 10, 10] and rms["tuned"]["success"] == 1.0
    assert adam["tuned"]["stt"] == [20, 20, float("inf")]
    assert adam["tuned"]["success"] == pytest.approx(2 / 3)
    assert adam["tuned"]["median_steps"] == 20 and adam["tuned"]["div"] == pytest.approx(1 / 3)
    # profile: ratios 1 and 2 -> scores 1 and (4 - 2) / 3
    assert agg["profiles"]["tuned"]["score"] == pytest.approx({"rmsprop": 1.0, "adam": 2 / 3})
    # paired finals, a diverged seed scored at the threshold -1 + 10 * 2 = 19; analytic problem:
    # compared as log10(f - f* + 1e-12 * 2): rmsprop log10(2e-12) on every seed, adam
    # log10(0.0015) twice and log10(20): every difference < -1 decade -> rmsprop wins
    assert agg["problems"]["saddle"]["opts"]["adam"]["tuned"]["clipped"][2] == 19.0
    h = agg["h2h"]["saddle"]["adam"]["tuned"]
    expect = math.log10(2e-12) - math.log10(0.0015 + 2e-12)
    assert h["verdict"] == "rmsprop" and h["ci"][0] == pytest.approx(expect)
    assert h["ci"][2] < 0 and h["margin"] == 1.0


@pytest.mark.parametrize("adam_final, verdict", [(0.305, "tie"), (0.32, "rmsprop")])
def test_data_problem_margin_is_one_percent_of_initial_loss(adam_final, verdict):
    from rmsprop.tools.report import aggregate

    recs = []
    for s in (1, 2, 3):
        recs.append(_rec("rmsprop", "tuned", s, [1.0, 0.5, 0.30], problem="logreg-cancer"))
        recs.append(_rec("adam", "tuned", s, [1.0, 0.5, adam_final], problem="logreg-cancer"))
    agg = aggregate(recs, {"problems": ["logreg-cancer"], "optimizers": ["rmsprop", "adam"]})
    h = agg["h2h"]["logreg-cancer"]["adam"]["tuned"]
    # l0 = 1, f* unknown -> margin 0.01; differences 0.30 - adam_final on every seed
    assert h["margin"] == pytest.approx(0.01)
    assert h["ci"][0] == pytest.approx(0.30 - adam_final)
    assert h["verdict"] == verdict


def test_missing_optional_package_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from rmsprop.tools import problems

    prob = problems.get("mlp-mnist1d")
    monkeypatch.setattr(type(prob), "missing", lambda self: list(self.requires))
    out = tmp_path / "never"
    assert cli.main(["compare", "--problem", "mlp-mnist1d", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs mnist1d: pip install mnist1d" in err and err.count("\n") == 1
    assert not out.exists()
