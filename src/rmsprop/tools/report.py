"""Aggregation, ``results.csv``, ``report.md`` and PNG plots for ``rmsprop compare``.

Input: the per-run records written by :mod:`rmsprop.cli.compare` (phases ``tune`` at seed 0,
``default`` and ``tuned`` at seeds 1..n). Every number in the report is defined in
:mod:`rmsprop.tools.metrics`; the conventions fixed here:

- losses are shown as the excess ``l - f*`` over the known minimum (analytic problems) or as is
  (data problems, ``f* = 0``); selection and comparison use the final *validation* loss;
- a diverged run scores the divergence threshold ``f* + 10 (l_0 - f*)`` in paired comparisons
  and ``inf`` in medians of final loss (so a majority of diverged seeds shows);
- target: ``l_L + tau (l_0 - l_L)`` per seed, ``l_L`` = known minimum, else the lowest validation
  loss any run of that problem reached; ``tau`` is the problem's ``target_tau``;
- lr band: tuning trials within 1% of the best trial's progress (``delta = 0.01``);
- winner: paired bootstrap CI of the median difference excludes 0 and the difference exceeds a
  margin: 1% of the median initial loss (data problems), or 1 decade of ``log10(f - f*)``
  (analytic problems, whose losses span many decades); otherwise "tie".
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from typing import Any, Iterable

from . import metrics as M

__all__ = ["select_best", "aggregate", "write_report"]

BAND_DELTA = 0.01
MARGIN = 0.01
LOG_MARGIN = 1.0
PHASES = ("default", "tuned")


def _final(rec: dict[str, Any]) -> float:
    r = rec["result"]
    v = r.get("final_eval_loss")
    if r.get("diverged") or v is None or not math.isfinite(v):
        return math.inf
    return float(v)


def select_best(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The tuning trial with the lowest final validation loss (diverged = ``inf``; ties go to
    the earlier trial). Raises ``ValueError`` on an empty list."""
    if not trials:
        raise ValueError("no tuning trials to select from")
    return min(sorted(trials, key=lambda r: r.get("trial") or 0), key=_final)


def _num(x: Any) -> float:
    return math.nan if x is None else float(x)


def aggregate(records: Iterable[dict[str, Any]], cfg: dict[str, Any]) -> dict[str, Any]:
    """All metrics per problem and optimizer. Returns ``{"rows": [...], "problems": {...},
    "profiles": {...}, "h2h": {...}, "cross_check": {...}}``."""
    from rmsprop.tools import problems
    from rmsprop.tools.problems.optimizers import on_edge, resolve

    recs = list(records)
    by: dict[tuple, list[dict]] = defaultdict(list)
    for r in recs:
        by[(r["problem"], r["optimizer"], r["phase"])].append(r)
    opts = list(cfg["optimizers"])
    rows: list[dict[str, Any]] = []
    per_problem: dict[str, Any] = {}
    steps_for_profile = {ph: {} for ph in PHASES}
    for pname in cfg["problems"]:
        prob = problems.get(pname)
        ref = prob.known_min if prob.known_min is not None else 0.0
        mine = [r for r in recs if r["problem"] == pname]
        if not mine:
            continue
        l0 = {}
        for r in mine:
            el = r["result"]["eval_loss"]
            if el and el[0] is not None:
                l0.setdefault(r["seed"], float(el[0]))
        if prob.known_min is not None:
            l_low = prob.known_min
        else:
            vals = [v for r in mine for v in r["result"]["eval_loss"] if v is not None
                    and math.isfinite(v)]
            l_low = min(vals) if vals else 0.0
        l0_med = M.median_iqr([l0[s] for s in l0 if s != 0] or list(l0.values()))[0]
        info: dict[str, Any] = {"ref": ref, "l_low": l_low, "l0": l0_med, "tau": prob.target_tau,
                                "has_fstar": prob.known_min is not None,
                                "deterministic": prob.deterministic, "opts": {}}
        for o in opts:
            spec = resolve(o)
            trials = by.get((pname, o, "tune"), [])
            grid_div = (sum(bool(t["result"]["diverged"]) for t in trials) / len(trials)
                        if trials else math.nan)
            band = (math.nan, math.nan, math.nan)
            edge = None
            best_hp = None
            if trials:
                t0 = float(trials[0]["result"]["eval_loss"][0])
                band = M.lr_band([t["hyperparameters"]["lr"] for t in trials],
                                 [_final(t) for t in trials], t0, BAND_DELTA)
                best = select_best(trials)
                best_hp = best["tuned_hyperparameters"]
                if "lr" in spec.search_space and "lr" in best_hp:
                    edge = on_edge(spec.search_space["lr"], best_hp["lr"], len(trials))
            oinfo: dict[str, Any] = {"trials": trials, "grid_div": grid_div, "band": band,
                                     "edge": edge, "best_hp": best_hp}
            for ph in PHASES:
                runs = sorted(by.get((pname, o, ph), []), key=lambda r: r["seed"])
                if not runs:
                    continue
                finals, clipped, tests, metrics_, tmetrics, stt, divs, oscs, dys, sps = (
                    [], [], [], [], [], [], [], [], [], [])
                for r in runs:
                    res = r["result"]
                    s0 = l0.get(r["seed"], l0_med)
                    f = _final(r)
                    finals.append(f)
                    thr = ref + 10.0 * max(s0 - ref, 0.0)
                    clipped.append(min(f, thr) if math.isfinite(f) else thr)
                    tests.append(math.inf if res["diverged"] and res.get("test_loss") is None
                                 else _num(res.get("test_loss")))
                    metrics_.append(_num(res.get("final_eval_metric")))
                    tmetrics.append(_num(res.get("test_metric")))
                    target = M.relative_target(s0, l_low, prob.target_tau) if s0 > l_low else l_low
                    stt.append(M.steps_to_target(res["eval_steps"], res["eval_loss"], target))
                    divs.append(bool(res["diverged"]))
                    curve = res["train_loss"] if prob.deterministic else res["eval_loss"]
                    if res["diverged"]:
                        osc = (math.nan, math.nan)
                    else:
                        osc = M.oscillation(curve, l_low, 1e-8 * max(s0 - l_low, 1e-12))
                    oscs.append(osc[0])
                    dys.append(osc[1])
                    sps.append(_num(res.get("seconds_per_step")))
                ms = M.median_iqr(sps)[0] * 1e3
                med_steps = M.median_steps(stt)
                oinfo[ph] = {
                    "runs": runs, "finals": finals, "clipped": clipped, "stt": stt,
                    "final": M.median_iqr(finals), "test": M.median_iqr(tests),
                    "metric": M.median_iqr(metrics_)[0], "test_metric": M.median_iqr(tmetrics)[0],
                    "success": M.success_rate(stt), "median_steps": med_steps,
                    "div": sum(divs) / len(divs), "osc": M.median_iqr(oscs)[0],
                    "osc_dy": M.median_iqr(dys)[0], "ms": ms,
                    "hp": runs[0]["hyperparameters"],
                }
                steps_for_profile[ph].setdefault(pname, {})[o] = med_steps
            if "default" in oinfo and "tuned" in oinfo:
                oinfo["gap"] = M.default_tuned_gap(oinfo["default"]["final"][0] - ref,
                                                   oinfo["tuned"]["final"][0] - ref, l0_med - ref)
            else:
                oinfo["gap"] = math.nan
            info["opts"][o] = oinfo
            for ph in PHASES:
                if ph not in oinfo:
                    continue
                d = oinfo[ph]
                rows.append({
                    "problem": pname, "optimizer": o, "config": ph,
                    "hyperparameters": json.dumps(d["hp"], sort_keys=True),
                    "n_seeds": len(d["runs"]),
                    "val_loss_median": d["final"][0], "val_loss_q25": d["final"][1],
                    "val_loss_q75": d["final"][2], "known_min": prob.known_min,
                    "val_metric_median": d["metric"],
                    "test_loss_median": d["test"][0], "test_loss_q25": d["test"][1],
                    "test_loss_q75": d["test"][2], "test_metric_median": d["test_metric"],
                    "target_tau": prob.target_tau, "success_rate": d["success"],
                    "median_steps_to_target": d["median_steps"],
                    "time_to_target_s": d["median_steps"] * d["ms"] / 1e3,
                    "divergence_rate_seeds": d["div"],
                    "divergence_rate_grid": oinfo["grid_div"] if ph == "tuned" else math.nan,
                    "osc_increase_fraction": d["osc"], "osc_mean_abs_dlog10": d["osc_dy"],
                    "lr_band_lo": oinfo["band"][0], "lr_band_hi": oinfo["band"][1],
                    "lr_band_decades": oinfo["band"][2] if ph == "tuned" else math.nan,
                    "best_lr_edge": (oinfo["edge"] or "") if ph == "tuned" else "",
                    "default_tuned_gap": oinfo["gap"] if ph == "tuned" else math.nan,
                    "ms_per_step": d["ms"],
                })
        per_problem[pname] = info

    profiles = {}
    for ph in PHASES:
        if steps_for_profile[ph]:
            ratios = M.performance_ratios(steps_for_profile[ph])
            profiles[ph] = {"ratios": ratios,
                            "score": {o: M.profile_score(r) for o, r in ratios.items()}}

    h2h: dict[str, dict[str, dict[str, Any]]] = {}
    base = "rmsprop" if "rmsprop" in opts else (opts[0] if opts else None)
    for pname, info in per_problem.items():
        span = max(info["l0"] - info["ref"], 0.0)
        margin = LOG_MARGIN if info["has_fstar"] else MARGIN * span

        def score(c: float, info: dict = info, span: float = span) -> float:
            # known f*: compare log10 excess, since 1e-2 vs 1e-6 is a real gap that an absolute
            # margin would call a tie; round-off (< 1e-12 of the initial excess) is a floor
            if not info["has_fstar"]:
                return c
            return math.log10(max(c - info["ref"], 0.0) + 1e-12 * max(span, 1e-300))

        for o in opts:
            if o == base:
                continue
            for ph in PHASES:
                a = info["opts"].get(base, {}).get(ph)
                b = info["opts"].get(o, {}).get(ph)
                if not a or not b:
                    continue
                sa = {r["seed"]: c for r, c in zip(a["runs"], a["clipped"])}
                sb = {r["seed"]: c for r, c in zip(b["runs"], b["clipped"])}
                common = sorted(set(sa) & set(sb))
                v, ci = M.verdict([score(sa[s]) for s in common],
                                  [score(sb[s]) for s in common], margin, (base, o))
                h2h.setdefault(pname, {}).setdefault(o, {})[ph] = {"verdict": v, "ci": ci,
                                                                   "margin": margin}

    cross = {r["problem"]: r["cross_check"] for r in recs
             if r["phase"] == "crosscheck" and "cross_check" in r}
    return {"rows": rows, "problems": per_problem, "profiles": profiles, "h2h": h2h,
            "cross_check": cross, "base": base}


# -- formatting ----------------------------------------------------------------------------------

def _g(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞" if x > 0 else "-∞"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def _miqr(t: tuple[float, float, float], ref: float, scale: float = 0.0) -> str:
    # excess below 1e-12 of the initial excess is round-off at the minimum: shown as 0
    m, lo, hi = ((0.0 if abs(v - ref) <= 1e-12 * scale else v - ref) if math.isfinite(v) else v
                 for v in t)
    return f"{_g(m)} [{_g(lo, 2)}, {_g(hi, 2)}]"


def _pct(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:.0f}%"


def summary_table(agg: dict[str, Any], cfg: dict[str, Any]) -> str:
    """The main Markdown table: one row per problem and optimizer."""
    head = ("| problem | optimizer | tuned: final val loss − f* median [IQR] | defaults: final "
            "val loss − f* | test (tuned) | success | steps to target | diverged grid / seeds | "
            "oscillation | lr band (decades) | default gap | ms/step |")
    lines = [head, "|" + "---|" * 12]
    for pname, info in agg["problems"].items():
        ref = info["ref"]
        sc = max(info["l0"] - ref, 0.0)
        for o, oi in info["opts"].items():
            t, d = oi.get("tuned"), oi.get("default")
            main = t or d
            if main is None:
                continue
            test = "–"
            if main["test_metric"] == main["test_metric"]:
                test = f"acc {100 * main['test_metric']:.1f}%"
            elif main["test"][0] == main["test"][0]:
                test = f"loss {_g(main['test'][0])}"
            edge = f" (edge: {oi['edge']})" if oi.get("edge") else ""
            lines.append(
                f"| {pname} | {o} | {_miqr(t['final'], ref, sc) if t else '–'} | "
                f"{_miqr(d['final'], ref, sc) if d else '–'} | {test} | "
                f"{_pct(main['success'])} | "
                f"{_g(main['median_steps'], 4)} | {_pct(oi['grid_div'])} / {_pct(main['div'])} | "
                f"{_g(main['osc'], 2)} | {_g(oi['band'][2], 2)}{edge} | {_g(oi['gap'], 2)} | "
                f"{_g(main['ms'], 2)} |")
    return "\n".join(lines)


def overall_table(agg: dict[str, Any], cfg: dict[str, Any]) -> str:
    """One row per optimizer: profile scores, head-to-head tally, stability and tuning."""
    base = agg["base"]
    lines = [f"| optimizer | profile score tuned | profile score defaults | vs {base} (tuned): "
             "won / tie / lost | diverged over grid | median lr band (decades) | median default "
             "gap |", "|" + "---|" * 7]
    for o in cfg["optimizers"]:
        sc_t = agg["profiles"].get("tuned", {}).get("score", {}).get(o, math.nan)
        sc_d = agg["profiles"].get("default", {}).get("score", {}).get(o, math.nan)
        won = tie = lost = 0
        for pname, per in agg["h2h"].items():
            v = per.get(o, {}).get("tuned")
            if v:
                if v["verdict"] == o:
                    won += 1
                elif v["verdict"] == "tie":
                    tie += 1
                else:
                    lost += 1
        tally = "–" if o == base else f"{won} / {tie} / {lost}"
        grids = [info["opts"][o]["grid_div"] for info in agg["problems"].values()
                 if o in info["opts"]]
        bands = [info["opts"][o]["band"][2] for info in agg["problems"].values()
                 if o in info["opts"]]
        gaps = [info["opts"][o]["gap"] for info in agg["problems"].values() if o in info["opts"]]
        gd = [g for g in grids if not math.isnan(g)]
        lines.append(f"| {o} | {_g(sc_t, 2)} | {_g(sc_d, 2)} | {tally} | "
                     f"{_pct(sum(gd) / len(gd)) if gd else '–'} | {_g(M.median_iqr(bands)[0], 2)}"
                     f" | {_g(M.median_iqr(gaps)[0], 2)} |")
    return "\n".join(lines)


def h2h_table(agg: dict[str, Any]) -> str:
    base = agg["base"]
    others = sorted({o for per in agg["h2h"].values() for o in per})
    if not others:
        return ""
    lines = ["| problem | config | " + " | ".join(f"{base} vs {o}" for o in others) + " |",
             "|" + "---|" * (2 + len(others))]
    for pname, per in agg["h2h"].items():
        for ph in PHASES:
            cells = []
            for o in others:
                v = per.get(o, {}).get(ph)
                if not v:
                    cells.append("–")
                    continue
                med, lo, hi = v["ci"]
                cells.append(f"**{v['verdict']}** ({_g(med, 2)} [{_g(lo, 2)}, {_g(hi, 2)}])")
            lines.append(f"| {pname} | {ph} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims_section(agg: dict[str, Any], cfg: dict[str, Any]) -> str:
    """Plain statements of what the numbers say about the seed's four claims."""
    from rmsprop.tools import problems

    base = agg["base"]
    if base != "rmsprop":
        return "_(claims are assessed only when `rmsprop` is among the optimizers)_"
    out = []
    sc = agg["profiles"].get("tuned", {}).get("score", {})
    if sc:
        rank = sorted(sc.items(), key=lambda kv: -kv[1])
        out.append("- **Fast convergence** (AlgoPerf profile score over steps-to-target, tuned; "
                   "1 = fastest everywhere): " + ", ".join(f"{o} {_g(s, 2)}" for o, s in rank)
                   + ".")
    divs = {o: [info["opts"][o]["grid_div"] for info in agg["problems"].values()
                if o in info["opts"] and not math.isnan(info["opts"][o]["grid_div"])]
            for o in cfg["optimizers"]}
    osc_rms = [(p, info["opts"]["rmsprop"]["tuned"]["osc"]) for p, info in agg["problems"].items()
               if "rmsprop" in info["opts"] and "tuned" in info["opts"]["rmsprop"]
               and info["deterministic"]]
    txt = "- **Stable learning**: share of tuning configurations that diverged: " + ", ".join(
        f"{o} {_pct(sum(v) / len(v))}" for o, v in divs.items() if v) + "."
    if osc_rms:
        txt += (" Oscillation index of tuned rmsprop on the deterministic problems (share of "
                "rising steps in the last 10%; ~0.5 = limit cycle): " + ", ".join(
                    f"{p} {_g(v, 2)}" for p, v in osc_rms) + ".")
    out.append(txt)
    bands = {o: M.median_iqr([info["opts"][o]["band"][2] for info in agg["problems"].values()
                              if o in info["opts"]])[0] for o in cfg["optimizers"]}
    gaps = {o: M.median_iqr([info["opts"][o]["gap"] for info in agg["problems"].values()
                             if o in info["opts"]])[0] for o in cfg["optimizers"]}
    out.append("- **Few hyperparameters** (median over problems of the good-lr band width in "
               "decades, and of the default-vs-tuned gap, 0 = defaults as good as tuned): "
               + ", ".join(f"{o} band {_g(bands[o], 2)} / gap {_g(gaps[o], 2)}"
                           for o in cfg["optimizers"]) + ".")
    nonconvex = [p for p in agg["problems"] if p not in ("quadratic-100d", "logreg-cancer")]
    tally = defaultdict(lambda: [0, 0, 0])
    for p in nonconvex:
        for o, v in agg["h2h"].get(p, {}).items():
            t = v.get("tuned")
            if t:
                k = 0 if t["verdict"] == "rmsprop" else 1 if t["verdict"] == "tie" else 2
                tally[o][k] += 1
    if tally:
        out.append("- **Non-convex problems** (" + ", ".join(nonconvex) + "; tuned, final "
                   "validation loss, paired bootstrap): rmsprop vs " + "; ".join(
                       f"{o}: {w} won, {t} tie, {lo} lost" for o, (w, t, lo) in tally.items())
                   + ".")
    del problems
    return "\n".join(out)


def search_space_table(cfg: dict[str, Any]) -> str:
    from rmsprop.tools.problems.optimizers import resolve

    lines = ["| optimizer | defaults (one-shot) | search space |", "|---|---|---|"]
    for o in cfg["optimizers"]:
        s = resolve(o)
        sp = ", ".join(f"{k}: {v[0]} [{_g(v[1], 5)}, {_g(v[2], 5)}]" if v[0] != "choice" else
                       f"{k}: {list(v[1:])}" for k, v in s.search_space.items())
        if cfg.get("search") == "grid":
            v = s.search_space["lr"]
            sp = f"lr: log grid [{_g(v[1])}, {_g(v[2])}], others at defaults"
        lines.append(f"| {o} | {', '.join(f'{k}={v}' for k, v in s.defaults.items())} | {sp} |")
    return "\n".join(lines)


# -- plots ---------------------------------------------------------------------------------------

_COLORS = {"rmsprop": "#d62728", "rmsprop-centered": "#ff7f0e", "rmsprop-momentum": "#8c564b",
           "torch-rmsprop": "#e377c2", "adam": "#1f77b4", "sgd": "#7f7f7f",
           "sgd-momentum": "#2ca02c"}


def _color(o: str, i: int) -> str:
    return _COLORS.get(o, f"C{(i + 4) % 10}")


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return (math.ceil(n / cols), cols)


def plot_all(out: str, agg: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """Write the PNGs; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files = []
    probs = list(agg["problems"])
    opts = cfg["optimizers"]
    if not probs:
        return files
    r, c = _grid(len(probs))

    # convergence: median and IQR band of the validation excess loss over seeds
    fig, axes = plt.subplots(r, c, figsize=(4.2 * c, 3.2 * r), squeeze=False)
    for ax, p in zip(axes.flat, probs):
        info = agg["problems"][p]
        floor = 1e-16 * max(info["l0"] - info["ref"], 1e-300)
        for i, o in enumerate(opts):
            oi = info["opts"].get(o, {})
            for ph, ls in (("tuned", "-"), ("default", ":")):
                d = oi.get(ph)
                if not d:
                    continue
                n = max(len(x["result"]["eval_steps"]) for x in d["runs"])
                steps = next(x["result"]["eval_steps"] for x in d["runs"]
                             if len(x["result"]["eval_steps"]) == n)
                mat = np.full((len(d["runs"]), n), np.nan)
                for k, x in enumerate(d["runs"]):
                    v = np.array([np.nan if y is None else y for y in x["result"]["eval_loss"]])
                    mat[k, :len(v)] = v - info["ref"]
                    if len(v) < n:  # diverged: hold the blow-up value
                        mat[k, len(v):] = np.inf
                top = 20 * max(info["l0"] - info["ref"], 1e-300)
                mat = np.clip(np.nan_to_num(mat, nan=np.inf, posinf=top), floor, top)
                q = np.percentile(mat, [25, 50, 75], axis=0)
                ax.plot(steps, q[1], ls, color=_color(o, i), lw=1.4,
                        label=f"{o} ({'tuned' if ph == 'tuned' else 'defaults'})")
                if ph == "tuned":
                    ax.fill_between(steps, q[0], q[2], color=_color(o, i), alpha=0.18, lw=0)
        top = (info["l0"] - info["ref"]) * 20
        ax.set_yscale("log")
        ax.set_ylim(top=top if top > 0 else None)
        ax.set_title(p, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("val loss − f*" if info["has_fstar"] else "val loss")
        ax.grid(alpha=0.3)
    _finish_grid(plt, fig, axes, len(probs), r, 4,
                 "Convergence: median over seeds, IQR band (tuned: solid, defaults: dotted)",
                 out, "convergence.png", files)

    # lr-sensitivity: final validation excess of every tuning trial against its lr
    if any(info["opts"].get(o, {}).get("trials") for info in agg["problems"].values()
           for o in opts):
        fig, axes = plt.subplots(r, c, figsize=(4.2 * c, 3.2 * r), squeeze=False)
        for ax, p in zip(axes.flat, probs):
            info = agg["problems"][p]
            cap = 10 * max(info["l0"] - info["ref"], 1e-12)
            floor = 1e-16 * cap
            for i, o in enumerate(opts):
                trials = info["opts"].get(o, {}).get("trials") or []
                if not trials:
                    continue
                pts = sorted((t["hyperparameters"]["lr"], _final(t)) for t in trials)
                lr = np.array([a for a, _ in pts])
                f = np.array([b for _, b in pts]) - info["ref"]
                bad = ~np.isfinite(f)
                f = np.clip(np.where(bad, cap, f), floor, cap)
                ax.plot(lr, f, "-o", ms=3, color=_color(o, i), lw=1, label=o)
                if bad.any():
                    ax.plot(lr[bad], f[bad], "x", ms=7, color=_color(o, i))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(p, fontsize=10)
            ax.set_xlabel("learning rate")
            ax.set_ylabel("final val loss − f*" if info["has_fstar"] else "final val loss")
            ax.grid(alpha=0.3)
        _finish_grid(plt, fig, axes, len(probs), r, 6,
                     "LR sensitivity: tuning trials (seed 0); x = diverged",
                     out, "lr_sensitivity.png", files)

    # performance profiles
    if agg["profiles"]:
        taus = np.linspace(1, M.TAU_MAX, 301)
        fig, axes = plt.subplots(1, len(agg["profiles"]), figsize=(5 * len(agg["profiles"]), 3.6),
                                 squeeze=False)
        for ax, (ph, prof) in zip(axes.flat, sorted(agg["profiles"].items(), reverse=True)):
            for i, o in enumerate(opts):
                if o not in prof["ratios"]:
                    continue
                rho = M.performance_profile(prof["ratios"][o], taus)
                ax.step(taus, rho, where="post", color=_color(o, i),
                        label=f"{o} (score {_g(prof['score'][o], 2)})")
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("τ (steps-to-target / best)")
            ax.set_ylabel("fraction of problems")
            ax.set_title(f"Performance profile ({'tuned' if ph == 'tuned' else 'defaults'})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "performance_profile.png"), dpi=110)
        plt.close(fig)
        files.append("performance_profile.png")

    # 2-D trajectories over contours
    from rmsprop.tools import problems

    two_d = [p for p in probs if getattr(problems.get(p), "bounds", None) is not None
             and problems.get(p).dim == 2]
    if two_d:
        tc = min(len(two_d), 3)
        tr_ = math.ceil(len(two_d) / tc)
        fig, axes = plt.subplots(tr_, tc, figsize=(4.6 * tc, 4.2 * tr_), squeeze=False)
        for ax, p in zip(axes.flat, two_d):
            prob = problems.get(p)
            (x0, x1), (y0, y1) = prob.bounds
            xs, ys = np.meshgrid(np.linspace(x0, x1, 300), np.linspace(y0, y1, 300))
            z = prob.value(np.stack([xs, ys], -1)) - (prob.known_min or 0.0)
            ax.contourf(xs, ys, np.log10(z + 1e-3), levels=30, cmap="Greys", alpha=0.55)
            ax.contour(xs, ys, np.log10(z + 1e-3), levels=15, colors="k", linewidths=0.3,
                       alpha=0.5)
            info = agg["problems"][p]
            for i, o in enumerate(opts):
                d = info["opts"].get(o, {}).get("tuned") or info["opts"].get(o, {}).get("default")
                if not d:
                    continue
                tr = d["runs"][0]["result"].get("trajectory")
                if not tr:
                    continue
                a = np.array([[np.nan if v is None else v for v in pt] for pt in tr], float)
                # the first optimizer (ours) on top, so overlapping paths do not hide it
                ax.plot(a[:, 0], a[:, 1], "-", color=_color(o, i), lw=1.2, label=o,
                        zorder=3 + len(opts) - i)
                ax.plot(a[0, 0], a[0, 1], "o", color="k", ms=4)
            for opt_pt in prob.optima:
                ax.plot(*opt_pt, "*", color="gold", ms=12, mec="k")
            ax.set_xlim(x0, x1)
            ax.set_ylim(y0, y1)
            ax.set_title(f"{p} (seed {info['opts'][opts[0]]['tuned']['runs'][0]['seed']}"
                         f", tuned)" if "tuned" in info["opts"].get(opts[0], {}) else p,
                         fontsize=10)
        for ax in axes.flat[len(two_d):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=8, loc="best")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "trajectories.png"), dpi=110)
        plt.close(fig)
        files.append("trajectories.png")
    return files


# -- the report ----------------------------------------------------------------------------------

def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        with open(path, "w") as f:
            f.write("")
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v)
                        for k, v in row.items()})


def write_report(out: str, records: list[dict[str, Any]], cfg: dict[str, Any], *,
                 versions: dict[str, str] | None = None, elapsed: float | None = None,
                 plots: bool = True) -> str:
    """Write ``results.csv``, ``report.md`` and the PNGs into ``out``; return the summary table."""
    from rmsprop.tools.problems.optimizers import ours_available

    agg = aggregate(records, cfg)
    write_csv(os.path.join(out, "results.csv"), agg["rows"])
    files = plot_all(out, agg, cfg) if plots else []
    table = summary_table(agg, cfg)
    versions = versions or {}
    lines = [
        "# rmsprop compare",
        "",
        f"Suite `{cfg['suite']}`: problems {', '.join(cfg['problems'])}; optimizers "
        f"{', '.join(cfg['optimizers'])}. {cfg['trials']} tuning trials per optimizer and problem "
        f"({cfg['search']}, seed 0, validation split), then defaults and the best trial re-run on "
        f"{cfg['seeds']} fresh seeds (1..{cfg['seeds']}) with common random numbers; "
        f"{cfg.get('schedule', 'constant')} learning rate."
        + (f" Wall time {elapsed:.0f} s with {cfg['jobs']} jobs." if elapsed else ""),
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "" if ours_available() else "\n**Note:** `rmsprop.torch.RMSprop` did not import; "
        "`rmsprop` ran `torch.optim.RMSprop` as a stand-in.\n",
        "## Summary",
        "",
        table,
        "",
        "Columns: final validation loss minus the known minimum f* (0 for data problems), "
        "median [25th, 75th percentile] over seeds (∞ = diverged); test accuracy or loss of the "
        "tuned config (median); success = share of seeds reaching the target "
        "`l_L + tau (l_0 - l_L)` (l_L = f*, else the best validation loss any run reached); "
        "steps to target = median over seeds (∞ unless half succeed), censored at the budget; "
        "diverged = share of tuning configs / of re-run seeds with a non-finite loss or more "
        "than 10x the initial excess; oscillation = share of rising steps in the last 10% of "
        "the log excess loss (per step on deterministic problems, per evaluation otherwise; "
        "~0.5 flags a limit cycle); lr band = width in decades of the learning rates whose "
        "trial made >= 99% of the best trial's progress (edge = best lr at the edge of its "
        "range: widen it); default gap = (default − tuned)/(l_0 − tuned), 0 = defaults as good "
        "as tuned; ms/step = median wall time of one step (noisy on shared machines; step "
        "counts are the measure).",
        "",
        "## Overall",
        "",
        overall_table(agg, cfg),
        "",
        "## What this says about the four claims",
        "",
        claims_section(agg, cfg),
        "",
        "## Head to head (paired bootstrap over seeds, final validation loss)",
        "",
        f"Cell: winner, or **tie** unless the 95% CI of the median paired difference "
        f"({agg['base']} − other) excludes 0 and |median| exceeds the margin: on data problems "
        f"the difference of final validation losses, margin {MARGIN:.0%} of the median initial "
        f"loss; on analytic problems (known f*) the difference of log10(f − f*), margin "
        f"{LOG_MARGIN:g} decade (a factor of 10). A diverged seed scores the divergence "
        f"threshold.",
        "",
        h2h_table(agg),
        "",
    ]
    if agg["cross_check"]:
        lines += ["## Cross-check: torch.optim.RMSprop vs ours (`pytorch` preset)", ""]
        if not all(c.get("ours_available") for c in agg["cross_check"].values()):
            lines += ["Not run: `rmsprop.torch.RMSprop` did not import.", ""]
        else:
            lines += [
                "Same seed, same process, per-step training loss. Our for-loop path "
                "(`fused=False`) must be bit-identical to torch; our default path uses the fused "
                "kernel, whose last-bit rounding differs, and chaotic problems grow that.", "",
                "| problem | for-loop path: identical | default path: first differing step | "
                "max rel. diff, first 10 steps | max rel. diff, whole run | final val loss "
                "torch / ours |", "|---|---|---|---|---|---|"]
            for p, c in agg["cross_check"].items():
                fl, df = c["forloop"], c["default"]
                first = df["first_difference_step"]
                same = ("yes" if fl["identical"] else
                        f"NO (step {fl['first_difference_step']})")
                lines.append(
                    f"| {p} | {same}"
                    f" | {'none' if first is None else first} | {_g(df['max_rel_diff_first10'], 2)}"
                    f" | {_g(df['max_rel_diff'], 2)} | {_g(c['torch_final_eval_loss'], 4)} / "
                    f"{_g(df['final_eval_loss'], 4)} |")
            lines.append("")
    lines += ["## Search spaces (printed with every result)", "", search_space_table(cfg), ""]
    edges = [(p, o, oi["edge"], oi["best_hp"]) for p, info in agg["problems"].items()
             for o, oi in info["opts"].items() if oi.get("edge")]
    if edges:
        lines += ["**Best lr at the edge of its range** (extend the range to trust the tuned "
                  "result):", ""]
        lines += [f"- {p} / {o}: {e} edge, lr = {_g(hp['lr'])}" for p, o, e, hp in edges]
        lines.append("")
    lines += ["## Tuned configurations", "", "| problem | optimizer | best trial |",
              "|---|---|---|"]
    for p, info in agg["problems"].items():
        for o, oi in info["opts"].items():
            if oi.get("best_hp"):
                lines.append(f"| {p} | {o} | " + ", ".join(f"{k}={_g(v, 4)}" for k, v in
                                                           oi["best_hp"].items()) + " |")
    lines.append("")
    if files:
        lines += ["## Plots", ""] + [f"![{f}]({f})" for f in files] + [""]
    lines += ["Files: `runs/<problem>/<optimizer>/<phase>-<config>-s<seed>.json` (one per run), "
              "`results.csv` (one row per problem x optimizer x config), `compare.json` (the "
              "plan).", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    return table


def _finish_grid(plt: Any, fig: Any, axes: Any, used: int, rows: int, ncol: int, title: str,
                 out: str, name: str, files: list[str]) -> None:
    """Blank the unused panels of a problem grid, add one legend and the title, save."""
    for ax in axes.flat[used:]:
        ax.axis("off")
    h, lab = axes.flat[0].get_legend_handles_labels()
    fig.legend(h, lab, loc="lower center", ncol=min(ncol, len(lab)), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.13 if rows == 1 else 0.06, 1, 0.96))
    fig.savefig(os.path.join(out, name), dpi=110)
    plt.close(fig)
    files.append(name)
