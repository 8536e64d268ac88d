"""What a tuning study found, and the report folder of ``rmsprop tune``.

* :func:`trial_rows`: one row per trial (every state), hyperparameters in the optimizer's units;
* :func:`trial_tally`: how many trials completed, diverged, failed (and why), were re-queued or
  were surplus, so the report says what happened to each;
* :func:`expected_best_of_k`: Dodge et al. (2019)'s expected best of k random trials;
* :func:`good_band`: the good learning-rate band, by :func:`rmsprop.tools.metrics.lr_band` (the
  one definition shared with ``rmsprop compare``);
* :func:`edge_flags`: best values at the edge of their range, with a wider ``--range`` to try;
* :func:`write_report`: ``trials.csv``, ``best_of_k.csv``, ``best.json``, one PNG per figure
  (:func:`plot_heatmap`, :func:`plot_lr_sensitivity`, :func:`plot_best_of_k`), ``README.md``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rmsprop.tools.search_space import Param
from rmsprop.tools.storage import display_url, is_journal, redact
from rmsprop.tools.study import PENALTY, TuneConfig

__all__ = [
    "TrialTally",
    "edge_flags",
    "expected_best_of_k",
    "good_band",
    "trial_rows",
    "trial_tally",
    "write_report",
]

#: The looser good-band tolerance the heat map outlines (beside ``metrics.BAND_DELTA``).
HEATMAP_DELTA = 0.1


def _retry_cls() -> Any:
    import optuna.storages as st

    return getattr(st, "RetryHeartbeatStaleTrialCallback", None) or st.RetryFailedTrialCallback


def trial_rows(study: Any, space: Sequence[Param]) -> list[dict[str, Any]]:
    """One dict per trial (all states), hyperparameters in the optimizer's units."""
    import warnings

    retry = _retry_cls()
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the retry helpers are 'experimental' in Optuna
        for t in study.get_trials(deepcopy=False):
            row: dict[str, Any] = {"number": t.number, "state": t.state.name,
                                   "value": t.value if t.values else None}
            for p in space:
                row[p.name] = p.value(t.params[p.key]) if p.key in t.params else None
            run = t.user_attrs.get("run") or {}
            row["diverged"] = t.user_attrs.get("diverged")
            for k in ("final_eval_loss", "final_eval_metric", "initial_eval_loss",
                      "steps_to_target", "reached", "seconds_per_step"):
                row[k] = run.get(k)
            row["retry_of"] = retry.retried_trial_number(t)
            row["retries"] = list(retry.retry_history(t))
            row["surplus"] = bool(t.user_attrs.get("surplus", False))
            row["interrupted"] = bool(t.user_attrs.get("interrupted", False))
            row["error"] = t.user_attrs.get("error")
            row["duration_s"] = (t.duration.total_seconds() if t.duration is not None else None)
            rows.append(row)
    return rows


@dataclasses.dataclass(frozen=True)
class TrialTally:
    """What happened to the trials of a study."""

    complete: int
    diverged: int
    failed_killed: int
    failed_interrupted: int
    failed_error: int
    requeued: int
    rerun: int
    surplus: int
    waiting: int
    running: int

    @property
    def failed(self) -> int:
        return self.failed_killed + self.failed_interrupted + self.failed_error

    def describe(self) -> str:
        """One sentence for the terminal and the report."""
        parts = [f"{self.complete} complete ({self.diverged} diverged, scored {PENALTY:g})"]
        causes = [(self.failed_killed, "worker killed"),
                  (self.failed_interrupted, "interrupted"), (self.failed_error, "run raised")]
        if self.failed:
            why = ", ".join(f"{n} {c}" for n, c in causes if n)
            if self.requeued and self.rerun == self.requeued:
                why += f"; {self.requeued} re-queued and re-run"
            elif self.requeued:
                why += f"; {self.requeued} re-queued, {self.rerun} re-run so far"
            parts.append(f"{self.failed} failed ({why})")
        if self.surplus:
            parts.append(f"{self.surplus} surplus (two workers started the last trial at once; "
                         "pruned before training, not counted)")
        if self.waiting:
            parts.append(f"{self.waiting} waiting")
        if self.running:
            parts.append(f"{self.running} running")
        return ", ".join(parts)


def trial_tally(rows: Sequence[dict[str, Any]]) -> TrialTally:
    """Count ``rows`` (from :func:`trial_rows`) by outcome; a failed trial is *re-queued* when
    a later trial retries it, and *re-run* when one of its retries completed."""
    retried = {n for r in rows for n in r["retries"]}
    rerun = {n for r in rows if r["state"] == "COMPLETE" for n in r["retries"]}
    failed = [r for r in rows if r["state"] == "FAIL"]
    done = [r for r in rows if r["state"] == "COMPLETE"]
    return TrialTally(
        complete=len(done), diverged=sum(bool(r["diverged"]) for r in done),
        failed_killed=sum(not r["interrupted"] and not r["error"] for r in failed),
        failed_interrupted=sum(bool(r["interrupted"]) for r in failed),
        failed_error=sum(bool(r["error"]) and not r["interrupted"] for r in failed),
        requeued=sum(r["number"] in retried for r in failed),
        rerun=sum(r["number"] in rerun for r in failed),
        surplus=sum(r["state"] == "PRUNED" and r["surplus"] for r in rows),
        waiting=sum(r["state"] == "WAITING" for r in rows),
        running=sum(r["state"] == "RUNNING" for r in rows))


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
        cdf, acc = [], 0.0
        for p in probs:
            acc += p
            cdf.append(acc)
        q = {name: next(x for x, c in zip(v, cdf) if c >= level - 1e-12)
             for name, level in (("q10", 0.1), ("median", 0.5), ("q90", 0.9))}
        out.append({"k": k, "mean": mean, **q})
    return out


def _initial_loss(rows: Sequence[dict[str, Any]]) -> float | None:
    """The step-0 validation loss (the same for every trial: one training seed)."""
    return next((r["initial_eval_loss"] for r in rows if r.get("initial_eval_loss") is not None),
                None)


def good_band(rows: Sequence[dict[str, Any]], objective: str) -> dict[str, Any]:
    """The good learning-rate band of the completed trials (tolerances ``metrics.BAND_DELTA``
    and :data:`HEATMAP_DELTA`), by :func:`rmsprop.tools.metrics.lr_band` (a trial is good when its
    final validation loss made at least ``1 - delta`` of the best trial's progress from the
    initial loss). Only defined for the loss objective with ``lr`` searched."""
    from rmsprop.tools import metrics

    done = [r for r in rows if r["state"] == "COMPLETE"]
    l0 = _initial_loss(done)
    if objective != "loss" or not done or l0 is None or done[0].get("lr") is None:
        return {}
    lrs = [r["lr"] for r in done]
    finals = [math.inf if r["diverged"] else float(r["value"]) for r in done]
    out: dict[str, Any] = {}
    for delta in (metrics.BAND_DELTA, HEATMAP_DELTA):
        band = metrics.lr_band(lrs, finals, l0, delta=delta)
        out[f"{delta:g}"] = {"delta": delta, "lr_min": band.lo, "lr_max": band.hi,
                             "lr_decades": band.decades, "count": band.n_good,
                             "total": band.n_total, "fraction": band.n_good / band.n_total,
                             "l0": l0}
    return out


def edge_flags(cfg: TuneConfig, best_hp: dict[str, float]) -> list[str]:
    """A warning per best value at the edge of its range, with a wider ``--range`` to try
    (rounded, inside the valid domain: a decay stays in [0, 1))."""
    flags = []
    for p in cfg.space:
        v = best_hp[p.name]
        if cfg.sampler == "grid":
            g = p.grid_values()
            lo_edge, hi_edge = v <= min(g), v >= max(g)
        else:  # within the outer 5 % of the range on its scale
            f = p.position(v)
            lo_edge, hi_edge = f <= 0.05, f >= 0.95
        if not (lo_edge or hi_edge):
            continue
        side = "low" if lo_edge else "high"
        wide = dataclasses.replace(p, wide_grid=True).grid_values()
        extra = ""
        if cfg.sampler == "grid" and ((lo_edge and min(wide) < v) or (hi_edge and max(wide) > v)):
            lo, hi = p.low, p.high  # the range already goes further than the standard grid
            more = [x for x in wide if (x < v if lo_edge else x > v)]
            extra = " (adds grid values " + ", ".join(f"{x:g}" for x in more) + ")"
        else:
            lo, hi = p.widened(side)
            if (lo, hi) == (p.low, p.high):
                continue  # already at the edge of the valid domain: nothing wider to try
        word = "lower" if lo_edge else "upper"
        flags.append(f"best {p.name}={v:g} is at the {word} edge of [{p.low:g}, {p.high:g}]: "
                     f"widen the range, e.g. --range {p.name}={lo:g}:{hi:g}{extra}")
    return flags


# -- files -------------------------------------------------------------------------------------


def write_report(cfg: TuneConfig, study: Any, result: Any) -> Path:
    """Write the report files of ``result`` (a ``TuneResult``) into ``cfg.out``; return it."""
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
    importances, imp_note = (importances_of(study, cfg) if cfg.plots
                             else (None, "skipped (--no-plots)"))
    best = {
        "study": result.study_name, "problem": cfg.problem, "optimizer": cfg.optimizer,
        "sampler": cfg.sampler, "seed": cfg.seed, "objective": cfg.objective,
        "target": cfg.target, "train_seed": cfg.train_seed, "steps": cfg.steps,
        "search_space": [p.describe() for p in cfg.space],
        "best_trial": result.best_trial, "best_value": result.best_value,
        "best_hp": result.best_hp, "confirm": result.confirm, "edge_flags": result.edges,
        "summary": result.summary, "importances": importances, "importances_note": imp_note,
        "storage": redact(str(cfg.storage)) if cfg.storage else None,
    }
    (out / "best.json").write_text(json.dumps(best, indent=2) + "\n")
    if cfg.plots:
        _plot_all(cfg, result, bok, out)
    (out / "README.md").write_text(readme_text(cfg, result, importances, imp_note))
    return out


def importances_of(study: Any, cfg: TuneConfig) -> tuple[dict[str, float] | None, str]:
    """Optuna's parameter importances, or None and the reason they are not defined."""
    import warnings

    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(cfg.space) < 2:
        return None, "only one parameter searched: importances are not defined"
    if len(complete) < 8:
        return None, f"too few completed trials ({len(complete)} < 8) for importances"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(study)
        return {k: float(v) for k, v in imp.items()}, "Optuna PED-ANOVA (default evaluator)"
    except Exception as e:  # noqa: BLE001 - an evaluator may reject degenerate studies
        return None, f"importances unavailable: {type(e).__name__}: {e}"


def _label(cfg: TuneConfig) -> str:
    return "final validation loss" if cfg.objective == "loss" else "steps to target"


def _axes(cfg: TuneConfig) -> tuple[Param, Param | None]:
    lr_p = next((p for p in cfg.space if p.name == "lr"), cfg.space[0])
    dec_p = next((p for p in cfg.space if p.scale == "log1m" and p is not lr_p), None)
    return lr_p, dec_p


def _good_cut(result: Any) -> float:
    """The value under which a cell is outlined on the heat map: ``metrics.lr_band``'s rule
    (at least ``1 - HEATMAP_DELTA`` of the best trial's progress from the initial loss)."""
    band = result.summary.get("good_band", {}).get(f"{HEATMAP_DELTA:g}")
    best = result.best_value
    span = max(band["l0"] - best, 0.0) if band else abs(best)
    return best + HEATMAP_DELTA * span


def _plot_all(cfg: TuneConfig, result: Any, bok: list[dict[str, float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.trials if r["state"] == "COMPLETE"]
    for name, draw in (("heatmap.png", plot_heatmap), ("lr_sensitivity.png", plot_lr_sensitivity),
                       ("best_of_k.png", plot_best_of_k)):
        fig = draw(cfg, result, rows, bok)
        if fig is not None:
            fig.savefig(out / name, dpi=110)
            plt.close(fig)


def plot_heatmap(cfg: TuneConfig, result: Any, rows: list[dict[str, Any]],
                 _bok: Any = None) -> Any:
    """The objective over (lr, decay): cells on a grid (best over other parameters), else a
    scatter; None when no decay is searched."""
    import matplotlib
    import matplotlib.pyplot as plt
    import numpy as np

    lr_p, dec_p = _axes(cfg)
    if dec_p is None:
        return None
    best_v = result.best_value
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    norm = matplotlib.colors.LogNorm() if best_v > 0 else None
    im: Any
    if cfg.sampler == "grid":
        lrs = sorted({r[lr_p.name] for r in rows})
        decs = sorted({r[dec_p.name] for r in rows})
        z = np.full((len(decs), len(lrs)), np.nan)
        div = np.zeros_like(z, dtype=bool)
        for r in rows:
            i, j = decs.index(r[dec_p.name]), lrs.index(r[lr_p.name])
            if r["diverged"]:
                div[i, j] = bool(np.isnan(z[i, j]))
            else:
                z[i, j] = r["value"] if np.isnan(z[i, j]) else min(z[i, j], r["value"])
                div[i, j] = False
        im = ax.imshow(z, aspect="auto", origin="lower", cmap="viridis_r", norm=norm)
        cut = _good_cut(result)
        for i in range(len(decs)):
            for j in range(len(lrs)):
                if div[i, j]:
                    ax.text(j, i, "×", ha="center", va="center", color="red", fontsize=9)
                elif np.isfinite(z[i, j]) and z[i, j] <= cut:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False,
                                               ec="white", lw=1.2))
        step = max(1, len(lrs) // 9)
        ax.set_xticks(range(0, len(lrs), step))
        ax.set_xticklabels([f"{x:.2g}" for x in lrs[::step]], rotation=45)
        ax.set_yticks(range(len(decs)))
        ax.set_yticklabels([f"{d:g}" for d in decs])
        ax.set_ylabel(dec_p.name)
        ax.set_title(f"{cfg.problem} / {cfg.optimizer}: {_label(cfg)}\nwhite box: at least "
                     f"{100 * (1 - HEATMAP_DELTA):g} % of the best trial's progress; red ×: "
                     "diverged", fontsize=9)
    else:
        good = [r for r in rows if not r["diverged"]]
        bad = [r for r in rows if r["diverged"]]
        im = ax.scatter([r[lr_p.name] for r in good], [1 - r[dec_p.name] for r in good],
                        c=[r["value"] for r in good], cmap="viridis_r", norm=norm, s=40)
        ax.scatter([r[lr_p.name] for r in bad], [1 - r[dec_p.name] for r in bad],
                   marker="x", c="red", s=30, label="diverged")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylabel(f"1 - {dec_p.name}")
        if bad:
            ax.legend(loc="best", fontsize=8)
        ax.set_title(f"{cfg.problem} / {cfg.optimizer}: {_label(cfg)}", fontsize=9)
    ax.set_xlabel(lr_p.name)
    fig.colorbar(im, ax=ax, label=_label(cfg))
    fig.tight_layout()
    return fig


def plot_lr_sensitivity(cfg: TuneConfig, result: Any, rows: list[dict[str, Any]],
                        _bok: Any = None) -> Any:
    """Best value at each lr relative to the best trial, log-log: one line per decay value on
    a grid, points otherwise (trials with different decays are never joined)."""
    import matplotlib.pyplot as plt

    lr_p, dec_p = _axes(cfg)
    best_v = result.best_value
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    finite = [r for r in rows if not r["diverged"]]
    if cfg.sampler == "grid" and dec_p is not None:
        for d in sorted({r[dec_p.name] for r in rows}):
            pts: dict[float, float] = {}
            for r in finite:
                if r[dec_p.name] == d:
                    pts[r[lr_p.name]] = min(pts.get(r[lr_p.name], math.inf), r["value"])
            xs = sorted(pts)
            ax.plot(xs, [pts[x] / best_v for x in xs], marker="o", ms=3,
                    label=f"{dec_p.name}={d:g}")
    else:
        xs_rows = sorted(finite, key=lambda r: r[lr_p.name])
        ax.plot([r[lr_p.name] for r in xs_rows], [r["value"] / best_v for r in xs_rows], "o",
                ms=4, label="trials")
    divs = [r[lr_p.name] for r in rows if r["diverged"]]
    if divs:
        top = max([r["value"] / best_v for r in finite] + [2])
        ax.plot(divs, [top * 1.5] * len(divs), "x", color="red", label="diverged")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(lr_p.name)
    ax.set_ylabel(f"{_label(cfg)} / best")
    ax.set_title("lr sensitivity (relative to the best trial)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def plot_best_of_k(cfg: TuneConfig, _result: Any, rows: list[dict[str, Any]],
                   bok: list[dict[str, float]]) -> Any:
    """Expected best of k trials (Dodge et al. 2019) with its 10-90 % band."""
    import matplotlib.pyplot as plt

    if not bok:
        return None
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
    ax.set_ylabel(_label(cfg))
    what = "random" if cfg.sampler != "grid" else "drawn from the grid"
    ax.set_title(f"best of k {what} trials", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def grid_line(p: Param, sampler: str) -> str:
    """``p.describe()``, plus its grid values (ascending) for the grid sampler."""
    line = p.describe()
    if sampler == "grid":
        line += "; grid: " + ", ".join(f"{v:g}" for v in p.grid_values())
    return line


def band_line(summary: dict[str, Any]) -> str | None:
    """The good-band sentence (``metrics.BAND_DELTA``), or None when it is not defined."""
    from rmsprop.tools import metrics

    g = summary.get("good_band", {}).get(f"{metrics.BAND_DELTA:g}")
    if not g or not math.isfinite(g.get("lr_decades", math.nan)):
        return None
    share = 100 * (1 - g["delta"])
    return (f"good lr band (trials that made >= {share:g} % of the best trial's progress from "
            f"the initial validation loss {g['l0']:.4g}): lr {g['lr_min']:g}..{g['lr_max']:g}, "
            f"{g['lr_decades']:.2f} decades, {g['count']} of {g['total']} completed trials")


def readme_text(cfg: TuneConfig, result: Any, importances: dict[str, float] | None,
                imp_note: str) -> str:
    """The report's README.md."""
    storage = str(cfg.storage)
    c = result.confirm
    objective = ("final validation loss" if cfg.objective == "loss"
                 else f"steps until validation loss <= {cfg.target:g}")
    lines = [
        f"# rmsprop tune: {result.study_name}", "",
        f"Problem `{cfg.problem}`, optimizer `{cfg.optimizer}`, sampler `{cfg.sampler}` "
        f"(seed {cfg.seed}), objective: {objective}.", "",
        "## Search space", "",
        *[f"- {grid_line(p, cfg.sampler)}" for p in cfg.space], "",
        "## Best", "",
        f"Trial {result.best_trial}: value {result.best_value:.6g} with "
        + ", ".join(f"{k}={v:g}" for k, v in result.best_hp.items()) + ".",
    ]
    if c.get("seeds"):
        lines.append(f"Re-run on fresh seeds {c['seeds']}: median {c['median']:.6g}, "
                     f"mean {c['mean']:.6g} ± {c['std']:.3g}, diverged {c['diverged']}.")
    band = band_line(result.summary)
    lines += [*(f"- **edge**: {e}" for e in result.edges),
              *([f"- {band}"] if band else []), "",
              f"Trials: {result.summary['tally']}.", "",
              "## Files", "",
              "- `trials.csv`: every trial (all states), hyperparameters in optimizer units",
              "- `best.json`: best configuration, fresh-seed confirmation, good lr band",
              "- `heatmap.png`: objective over (lr, decay); `lr_sensitivity.png`; "
              "`best_of_k.png` / `best_of_k.csv`: how many trials a user needs",
              "- `worker-logs/run-K/`: the worker processes' output of each `--jobs` run",
              f"- importances: {json.dumps(importances) if importances else imp_note}", "",
              "## Open the study in optuna-dashboard", "",
              "```sh",
              "pip install optuna-dashboard",
              f"optuna-dashboard {display_url(storage)}",
              "```", "",
              "then browse http://127.0.0.1:8080 and pick the study "
              f"`{result.study_name}` (history, slice, contour, importances). "
              + ("A journal file is opened by its path. " if is_journal(storage) else "")
              + ("The password is not written here: put it back in the URL. "
                 if redact(storage) != storage else "")
              + "Resume or extend the search by re-running the same command (a larger "
              "`--trials` adds trials; the study keeps everything already done).", ""]
    return "\n".join(lines)
