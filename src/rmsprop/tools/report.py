"""Aggregation, verdicts, ``results.csv``, ``report.md`` and plots for ``rmsprop compare``.

Input: the per-run records written by :mod:`rmsprop.tools.compare` (phases ``tune`` at seed 0,
``default`` and ``tuned`` at seeds 1..n, ``crosscheck``). Every number is defined in
:mod:`rmsprop.tools.metrics`; the conventions fixed here:

- losses are shown as the excess ``l - f*`` over the known minimum (analytic problems) or as is
  (data problems, ``f* = 0``); selection and comparison use the final *validation* loss;
- a diverged run scores the divergence threshold ``f* + 10 (l_0 - f*)`` in paired comparisons
  and ``inf`` in medians of final loss (so a majority of diverged seeds shows);
- target: ``l_L + tau (l_0 - l_L)`` per seed, ``l_L`` = known minimum, else the lowest validation
  loss any run of that problem reached; ``tau`` is the problem's ``target_tau``; steps to target
  are resolved at the problem's evaluation interval (``eval_every``);
- lr band: :func:`metrics.lr_band` over the tuning trials (``delta`` = :data:`metrics.BAND_DELTA`);
- winner: paired bootstrap CI of the median difference excludes 0 and the difference exceeds a
  margin: 1% of the median initial loss (data problems), or 1 decade of ``log10(f - f*)``
  (analytic problems, whose losses span many decades); otherwise "tie".

The pipeline is small functions over small frozen dataclasses: :func:`aggregate` builds an
:class:`Aggregate` from :func:`problem_facts`, :func:`tuning_summary`, :func:`phase_summary`,
:func:`profile` and :func:`head_to_head`; :func:`claims` turns it into four :class:`Claim`
verdicts; one ``plot_*`` function per figure; :func:`render` writes the Markdown.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import metrics as M

__all__ = [
    "select_best", "aggregate", "write_report", "render", "claims", "Aggregate", "ProblemFacts",
    "Tuning", "Phase", "Entry", "HeadToHead", "Profile", "Claim", "Plot", "Report",
    "lr_sensitivity_series", "plot_convergence", "plot_lr_sensitivity", "plot_profiles",
    "plot_trajectories", "profile_figure", "csv_rows", "PHASES", "BASE", "CROSS_CHECK",
]

MARGIN = 0.01
LOG_MARGIN = 1.0
PHASES = ("default", "tuned")
#: the optimizer the claims are about: ours, at torch's defaults (else the first RMSProp variant)
BASE = "rmsprop"
#: torch.optim.RMSprop, run only to cross-check ours; never a rival in the verdicts
CROSS_CHECK = "torch-rmsprop"


# -- data ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProblemFacts:
    """What the report needs to know about one problem (from its definition and its runs)."""

    name: str
    description: str
    source: str
    ref: float              # f* (known minimum), else 0
    l_low: float            # l_L: f*, else the lowest validation loss any run reached
    l0: float               # median initial validation loss over the re-run seeds
    l0_by_seed: Mapping[int, float]
    tau: float
    target_loss: float | None
    has_fstar: bool
    deterministic: bool
    convex: bool
    eval_every: int
    steps: int
    metric_name: str | None
    two_d: bool

    @property
    def span(self) -> float:
        """The initial excess ``l0 - f*`` (>= 0)."""
        return max(self.l0 - self.ref, 0.0)

    def target(self, seed: int) -> float:
        """The problem's absolute ``target_loss`` when it sets one, else the Moré–Wild target
        of the seed: ``l_L + tau (l_0 - l_L)``."""
        if self.target_loss is not None:
            return self.target_loss
        s0 = self.l0_by_seed.get(seed, self.l0)
        return M.relative_target(s0, self.l_low, self.tau) if s0 > self.l_low else self.l_low


@dataclass(frozen=True)
class Tuning:
    """The tuning trials of one optimizer on one problem (seed 0, validation split)."""

    trials: tuple[Mapping[str, Any], ...]
    diverged: float                  # share of trials that diverged
    band: M.LrBand
    edge: str | None                 # best lr in the outermost part of its range
    best_hp: dict[str, Any] | None


@dataclass(frozen=True)
class Phase:
    """One optimizer's re-runs at one configuration (defaults or tuned) over the seeds."""

    runs: tuple[Mapping[str, Any], ...]
    finals: tuple[float, ...]        # final validation loss per seed, diverged = inf
    clipped: tuple[float, ...]       # same, a diverged seed at the divergence threshold
    stt: tuple[float, ...]           # steps to target per seed (inf = not reached)
    final: tuple[float, float, float]
    test: tuple[float, float, float]
    metric: float
    test_metric: float
    success: float
    median_steps: float
    div: float
    osc: float
    osc_dy: float
    ms: float
    hp: dict[str, Any]


@dataclass(frozen=True)
class Entry:
    """One optimizer on one problem."""

    tuning: Tuning | None
    default: Phase | None
    tuned: Phase | None
    gap: float

    @property
    def main(self) -> Phase | None:
        """The tuned phase when there is one (the comparison's subject), else the defaults."""
        return self.tuned or self.default

    def phase(self, name: str) -> Phase | None:
        return self.tuned if name == "tuned" else self.default


@dataclass(frozen=True)
class HeadToHead:
    """Paired comparison of the base optimizer with another on one problem and phase."""

    verdict: str                     # the winner's name or "tie"
    ci: tuple[float, float, float]   # median paired difference (base - other) and its 95 % CI
    margin: float
    n: int


@dataclass(frozen=True)
class Profile:
    """AlgoPerf performance profile over a set of problems and optimizers."""

    problems: tuple[str, ...]
    steps: Mapping[str, Mapping[str, float]]
    ratios: Mapping[str, list[float]]
    score: Mapping[str, float]


@dataclass(frozen=True)
class Aggregate:
    """Everything the report shows, per problem and optimizer."""

    optimizers: tuple[str, ...]
    base: str | None
    problems: Mapping[str, ProblemFacts]
    entries: Mapping[str, Mapping[str, Entry]]
    profiles: Mapping[str, Profile]
    h2h: Mapping[str, Mapping[str, Mapping[str, HeadToHead]]]
    cross_check: Mapping[str, Any]
    n_seeds: int

    def entry(self, problem: str, optimizer: str) -> Entry | None:
        return self.entries.get(problem, {}).get(optimizer)

    @property
    def rivals(self) -> tuple[str, ...]:
        """The optimizers the claims compare ours with: all but our RMSProp variants."""
        return tuple(o for o in self.optimizers if not _ours(o) and o != CROSS_CHECK)


def _ours(optimizer: str) -> bool:
    """Whether ``optimizer`` is one of our RMSProps: the registry's ``ours`` flag decides, not
    the name (``rmsprop_fork:Adam`` may be anything)."""
    from rmsprop.tools.problems.optimizers import OPTIMIZERS

    spec = OPTIMIZERS.get(optimizer)
    return spec is not None and spec.ours


# -- aggregation ---------------------------------------------------------------------------------

def _final(rec: Mapping[str, Any]) -> float:
    r = rec["result"]
    v = r.get("final_eval_loss")
    if r.get("diverged") or v is None or not math.isfinite(v):
        return math.inf
    return float(v)


def _num(x: Any) -> float:
    return math.nan if x is None else float(x)


def select_best(trials: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The tuning trial with the lowest final validation loss (diverged = ``inf``; ties go to
    the earlier trial). Raises ``ValueError`` on an empty list."""
    if not trials:
        raise ValueError("no tuning trials to select from")
    return min(sorted(trials, key=lambda r: r.get("trial") or 0), key=_final)


def problem_facts(prob: Any, recs: Sequence[Mapping[str, Any]], source: str = "") -> ProblemFacts:
    """Reference values of one problem: f*, l_L, the initial loss per seed, tau."""
    l0: dict[int, float] = {}
    for r in recs:
        el = r["result"]["eval_loss"]
        if el and el[0] is not None:
            l0.setdefault(int(r["seed"]), float(el[0]))
    if prob.known_min is not None:
        l_low = float(prob.known_min)
    else:
        vals = [v for r in recs for v in r["result"]["eval_loss"]
                if v is not None and math.isfinite(v)]
        l_low = min(vals) if vals else 0.0
    l0_med = M.median_iqr([v for s, v in l0.items() if s != 0] or list(l0.values()))[0]
    return ProblemFacts(
        name=prob.name, description=prob.description, source=source,
        ref=float(prob.known_min) if prob.known_min is not None else 0.0, l_low=l_low,
        l0=l0_med, l0_by_seed=l0, tau=float(prob.target_tau),
        target_loss=(None if getattr(prob, "target_loss", None) is None
                     else float(prob.target_loss)),
        has_fstar=prob.known_min is not None, deterministic=bool(prob.deterministic),
        convex=bool(getattr(prob, "convex", False)),
        eval_every=int(prob.eval_every), steps=int(recs[0].get("steps") or prob.steps),
        metric_name=prob.metric_name,
        two_d=getattr(prob, "bounds", None) is not None and getattr(prob, "dim", None) == 2)


def tuning_summary(trials: Sequence[Mapping[str, Any]], space: Mapping[str, Any] | None,
                   facts: ProblemFacts) -> Tuning | None:
    """Divergence share, lr band, best trial and edge flag of one optimizer's trials.

    ``space``: ``{name: Param}`` of the searched dimensions (for the edge flag)."""
    if not trials:
        return None
    trials = tuple(sorted(trials, key=lambda r: r.get("trial") or 0))
    l0 = float(trials[0]["result"]["eval_loss"][0])
    band = M.lr_band([t["hyperparameters"]["lr"] for t in trials], [_final(t) for t in trials],
                     l0, M.BAND_DELTA)
    best = select_best(trials)
    best_hp = dict(best["tuned_hyperparameters"])
    edge = None
    lr_dim = (space or {}).get("lr")
    if lr_dim is not None and "lr" in best_hp:
        edge = lr_dim.on_edge(best_hp["lr"], len(trials))
    div = sum(bool(t["result"]["diverged"]) for t in trials) / len(trials)
    return Tuning(trials, div, band, edge, best_hp)


def phase_summary(runs: Sequence[Mapping[str, Any]], facts: ProblemFacts) -> Phase | None:
    """Final loss, steps to target, divergence, oscillation and time over one phase's seeds."""
    if not runs:
        return None
    runs = tuple(sorted(runs, key=lambda r: r["seed"]))
    finals, clipped, tests, mets, tmets, stt, divs, oscs, dys, sps = ([] for _ in range(10))
    for r in runs:
        res = r["result"]
        s0 = facts.l0_by_seed.get(int(r["seed"]), facts.l0)
        f = _final(r)
        finals.append(f)
        thr = facts.ref + 10.0 * max(s0 - facts.ref, 0.0)
        clipped.append(min(f, thr) if math.isfinite(f) else thr)
        tests.append(math.inf if res["diverged"] and res.get("test_loss") is None
                     else _num(res.get("test_loss")))
        mets.append(_num(res.get("final_eval_metric")))
        tmets.append(_num(res.get("test_metric")))
        stt.append(M.steps_to_target(res["eval_steps"], res["eval_loss"],
                                     facts.target(int(r["seed"]))))
        divs.append(bool(res["diverged"]))
        curve = res["train_loss"] if facts.deterministic else res["eval_loss"]
        osc = ((math.nan, math.nan) if res["diverged"] else
               M.oscillation(curve, facts.l_low, 1e-8 * max(s0 - facts.l_low, 1e-12)))
        oscs.append(osc[0])
        dys.append(osc[1])
        sps.append(_num(res.get("seconds_per_step")))
    return Phase(
        runs=runs, finals=tuple(finals), clipped=tuple(clipped), stt=tuple(stt),
        final=M.median_iqr(finals), test=M.median_iqr(tests), metric=M.median_iqr(mets)[0],
        test_metric=M.median_iqr(tmets)[0], success=M.success_rate(stt),
        median_steps=M.median_steps(stt), div=sum(divs) / len(divs),
        osc=M.median_iqr(oscs)[0], osc_dy=M.median_iqr(dys)[0],
        ms=M.median_iqr(sps)[0] * 1e3, hp=dict(runs[0]["hyperparameters"]))


def profile(steps: Mapping[str, Mapping[str, float]],
            optimizers: Sequence[str] | None = None) -> Profile | None:
    """Performance profile of ``steps[problem][optimizer]`` (restricted to ``optimizers``)."""
    keep = {p: {o: s for o, s in per.items() if optimizers is None or o in optimizers}
            for p, per in steps.items()}
    keep = {p: per for p, per in keep.items() if per}
    if not keep:
        return None
    ratios = M.performance_ratios(keep)
    return Profile(tuple(keep), keep, ratios, {o: M.profile_score(r) for o, r in ratios.items()})


def _score_fn(facts: ProblemFacts) -> Any:
    def score(c: float) -> float:
        # known f*: compare log10 excess, since 1e-2 vs 1e-6 is a real gap that an absolute
        # margin would call a tie; round-off (< 1e-12 of the initial excess) is a floor
        if not facts.has_fstar:
            return c
        return math.log10(max(c - facts.ref, 0.0) + 1e-12 * max(facts.span, 1e-300))

    return score


def head_to_head(facts: ProblemFacts, a: Phase, b: Phase,
                 names: tuple[str, str]) -> HeadToHead:
    """Winner or tie between ``a`` and ``b`` over their common seeds (paired bootstrap)."""
    margin = LOG_MARGIN if facts.has_fstar else MARGIN * facts.span
    score = _score_fn(facts)
    sa = {r["seed"]: c for r, c in zip(a.runs, a.clipped)}
    sb = {r["seed"]: c for r, c in zip(b.runs, b.clipped)}
    common = sorted(set(sa) & set(sb))
    v, ci = M.verdict([score(sa[s]) for s in common], [score(sb[s]) for s in common], margin,
                      names)
    return HeadToHead(v, ci, margin, len(common))


def _group(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, str], list]:
    by: dict[tuple[str, str, str], list] = defaultdict(list)
    for r in records:
        by[(r["problem"], r["optimizer"], r["phase"])].append(r)
    return by


def aggregate(records: Iterable[Mapping[str, Any]], cfg: Mapping[str, Any],
              problems: Mapping[str, Any] | None = None,
              spaces: Mapping[str, Mapping[str, Any]] | None = None) -> Aggregate:
    """All metrics per problem and optimizer.

    ``cfg``: ``problems`` (names) and ``optimizers``; ``problems``: ``{name: Problem}``
    (default: the suite's); ``spaces``: ``{optimizer: {dimension: Param}}`` for edge flags.
    """
    from rmsprop.tools import problems as suite

    recs = list(records)
    by = _group(recs)
    opts = tuple(cfg["optimizers"])
    variants = [o for o in opts if _ours(o)]
    base = BASE if BASE in opts else variants[0] if variants else (opts[0] if opts else None)
    sources = cfg.get("problem_sources", {})
    facts: dict[str, ProblemFacts] = {}
    entries: dict[str, dict[str, Entry]] = {}
    for pname in cfg["problems"]:
        prob = (problems or {}).get(pname) or suite.get(pname)
        mine = [r for r in recs if r["problem"] == pname]
        if not mine:
            continue
        fx = facts[pname] = problem_facts(prob, mine, sources.get(pname, ""))
        entries[pname] = {}
        for o in opts:
            tuning = tuning_summary(by.get((pname, o, "tune"), []), (spaces or {}).get(o), fx)
            d = phase_summary(by.get((pname, o, "default"), []), fx)
            t = phase_summary(by.get((pname, o, "tuned"), []), fx)
            gap = (M.default_tuned_gap(d.final[0] - fx.ref, t.final[0] - fx.ref, fx.span)
                   if d and t else math.nan)
            if tuning or d or t:
                entries[pname][o] = Entry(tuning, d, t, gap)
    profiles = {}
    for ph in PHASES:
        steps: dict[str, dict[str, float]] = {}
        for p, per in entries.items():
            for o, e in per.items():
                d = e.phase(ph)
                if d is not None:
                    steps.setdefault(p, {})[o] = d.median_steps
        prof = profile(steps)
        if prof:
            profiles[ph] = prof
    h2h: dict[str, dict[str, dict[str, HeadToHead]]] = {}
    for p, per in entries.items():
        for o, e in per.items():
            if o == base or base not in per:
                continue
            for ph in PHASES:
                a, b = per[base].phase(ph), e.phase(ph)
                if a and b:
                    h2h.setdefault(p, {}).setdefault(o, {})[ph] = head_to_head(
                        facts[p], a, b, (base, o))
    cross = {r["problem"]: r["cross_check"] for r in recs
             if r["phase"] == "crosscheck" and "cross_check" in r}
    return Aggregate(opts, base, facts, entries, profiles, h2h, cross, int(cfg.get("seeds", 0)))


def csv_rows(agg: Aggregate) -> list[dict[str, Any]]:
    """One row per problem x optimizer x configuration (``results.csv``)."""
    rows = []
    for p, per in agg.entries.items():
        fx = agg.problems[p]
        for o, e in per.items():
            tu = e.tuning
            for ph in PHASES:
                d = e.phase(ph)
                if d is None:
                    continue
                tuned = ph == "tuned"
                rows.append({
                    "problem": p, "optimizer": o, "config": ph,
                    "hyperparameters": json.dumps(d.hp, sort_keys=True), "n_seeds": len(d.runs),
                    "val_loss_median": d.final[0], "val_loss_q25": d.final[1],
                    "val_loss_q75": d.final[2],
                    "known_min": fx.ref if fx.has_fstar else None,
                    "val_metric_median": d.metric,
                    "test_loss_median": d.test[0], "test_loss_q25": d.test[1],
                    "test_loss_q75": d.test[2], "test_metric_median": d.test_metric,
                    "target_tau": fx.tau, "eval_every": fx.eval_every,
                    "success_rate": d.success, "median_steps_to_target": d.median_steps,
                    "time_to_target_s": d.median_steps * d.ms / 1e3,
                    "divergence_rate_seeds": d.div,
                    "divergence_rate_grid": tu.diverged if tuned and tu else math.nan,
                    "osc_increase_fraction": d.osc, "osc_mean_abs_dlog10": d.osc_dy,
                    "lr_band_lo": tu.band.lo if tu else math.nan,
                    "lr_band_hi": tu.band.hi if tu else math.nan,
                    "lr_band_decades": tu.band.decades if tuned and tu else math.nan,
                    "best_lr_edge": (tu.edge or "") if tuned and tu else "",
                    "default_tuned_gap": e.gap if tuned else math.nan,
                    "ms_per_step": d.ms,
                })
    return rows


# -- the four claims -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    """A verdict on one of the four claims, with the numbers and plots it rests on."""

    title: str
    verdict: str                      # "yes", "partly", "no" or "not shown"
    summary: str
    evidence: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()


def _g(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞" if x > 0 else "-∞"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def _pct(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.0f}%"


def _median(xs: Iterable[float]) -> float:
    return M.median_iqr([x for x in xs if not math.isnan(x)])[0]


def _phase_of_claims(agg: Aggregate) -> str:
    """The phase the claims compare: tuned, or the defaults when nothing was tuned."""
    return "tuned" if any(e.tuned for per in agg.entries.values() for e in per.values()) \
        else "default"


def _tunings(agg: Aggregate, o: str) -> list[Tuning]:
    """The tuning summaries of optimizer ``o``, one per problem that has them."""
    return [t for per in agg.entries.values() if o in per
            for t in (per[o].tuning,) if t is not None]


def _where(agg: Aggregate) -> str:
    names = list(agg.problems)
    return (f"on `{names[0]}`" if len(names) == 1 else
            f"over {len(names)} problems")


def claim_fast(agg: Aggregate) -> Claim:
    """Fast convergence: tuned steps-to-target, as an AlgoPerf profile over ours and rivals.

    yes = ours scores at least the best rival's profile score (within 0.05); partly = above some
    rival's; no = below every rival's; not shown = no run reached any target."""
    title = "Fast convergence"
    plots = ("performance_profile.png", "convergence.png")
    base, rivals = agg.base or BASE, agg.rivals
    ph = _phase_of_claims(agg)
    steps: dict[str, dict[str, float]] = {}
    for p, per in agg.entries.items():
        for o, e in per.items():
            d = e.phase(ph)
            if d is not None and (o == base or o in rivals):
                steps.setdefault(p, {})[o] = d.median_steps
    prof = profile(steps, (base,) + rivals)
    if prof is None or base not in prof.score or not rivals:
        return Claim(title, "not shown", f"needs runs of {base} and at least one rival", (),
                     plots)
    if all(not math.isfinite(s) for per in prof.steps.values() for s in per.values()):
        return Claim(title, "not shown", "no optimizer reached the target on any problem "
                     "(raise the step budget or tau)", (), plots)
    mine = prof.score[base]
    others = {o: prof.score[o] for o in rivals if o in prof.score}
    best_o = max(others, key=lambda o: others[o])
    verdict = ("yes" if mine >= others[best_o] - 0.05 else
               "partly" if any(mine > s + 0.05 for s in others.values()) else "no")
    summary = (f"{'tuned' if ph == 'tuned' else 'defaults'}, {_where(agg)}: {base}'s "
               f"profile score {_g(mine, 2)} against "
               + ", ".join(f"{o} {_g(s, 2)}" for o, s in others.items())
               + " (1 = fastest to the target everywhere)")
    evidence = ("steps to target, median over seeds (resolution: the evaluation interval)",) \
        + tuple(f"`{p}` (every {agg.problems[p].eval_every}): "
                + ", ".join(f"{o} {_g(s, 4)}" for o, s in per.items())
                for p, per in prof.steps.items())
    return Claim(title, verdict, summary, evidence, plots)


def claim_stable(agg: Aggregate) -> Claim:
    """Stable learning: ours never diverges on the re-runs and shows no limit cycle.

    no = a tuned re-run diverged or oscillated (index >= 0.4); partly = only default re-runs
    diverged; yes otherwise. The tuning trials' divergence shares are the context."""
    title = "Stable learning"
    plots = ("lr_sensitivity.png", "convergence.png")
    base = agg.base or BASE
    mine = {p: per[base] for p, per in agg.entries.items() if base in per}
    if not mine:
        return Claim(title, "not shown", f"needs runs of {base}", (), plots)
    tuned_div = [p for p, e in mine.items() if e.tuned and e.tuned.div > 0]
    default_div = [p for p, e in mine.items() if e.default and e.default.div > 0]
    cycles = [p for p, e in mine.items() if e.tuned and agg.problems[p].deterministic
              and not math.isnan(e.tuned.osc) and e.tuned.osc >= 0.4]
    verdict = ("no" if tuned_div or cycles else "partly" if default_div else "yes")
    grid = {o: _median(t.diverged for t in _tunings(agg, o)) for o in (base,) + agg.rivals}
    parts = [f"re-runs of {base} that diverged: tuned {len(tuned_div)}, defaults "
             f"{len(default_div)} of {len(mine)} problem(s)"]
    if cycles:
        parts.append("limit cycle (oscillation index >= 0.4) on " + ", ".join(cycles))
    evidence = [
        "share of tuning trials that diverged (median over problems): "
        + ", ".join(f"{o} {_pct(v)}" for o, v in grid.items()),
    ]
    evidence += [f"`{p}`: diverged re-runs tuned {_pct(e.tuned.div) if e.tuned else '–'}, "
                 f"defaults {_pct(e.default.div) if e.default else '–'}; oscillation index "
                 f"{_g(e.tuned.osc if e.tuned else math.nan, 2)}" for p, e in mine.items()]
    return Claim(title, verdict, "; ".join(parts), tuple(evidence), plots)


def claim_few_hyperparameters(agg: Aggregate) -> Claim:
    """Few hyperparameters: the defaults come close to tuned, and the good lr band is wide.

    A = median default-vs-tuned gap <= 0.1 (the defaults make >= 90 % of the tuned progress);
    B = median good-lr band at least the median rival's minus 0.25 decade. yes = A and B,
    partly = one of them, no = neither."""
    title = "Few hyperparameters"
    plots = ("lr_sensitivity.png",)
    base = agg.base or BASE
    opts = (base,) + agg.rivals

    def band(o: str) -> float:
        return _median(t.band.decades for t in _tunings(agg, o))

    def gap(o: str) -> float:
        return _median(per[o].gap for per in agg.entries.values() if o in per)

    def tuned(o: str) -> bool:  # trial 0 is the defaults: one trial tunes nothing
        return any(len(t.trials) > 1 for t in _tunings(agg, o))

    g, b = gap(base), band(base)
    if math.isnan(g) and math.isnan(b):
        return Claim(title, "not shown", f"needs tuning trials and re-runs of {base}", (),
                     plots)
    if not tuned(base) or not any(tuned(o) for o in agg.rivals):
        return Claim(title, "not shown", f"needs at least 2 tuning trials of {base} and of a "
                     "rival (trial 0 is the defaults)", (), plots)
    rival_bands = [band(o) for o in agg.rivals if not math.isnan(band(o))]
    a_ok = not math.isnan(g) and g <= 0.1
    b_ok = not math.isnan(b) and (not rival_bands or b >= _median(rival_bands) - 0.25)
    verdict = "yes" if a_ok and b_ok else "partly" if a_ok or b_ok else "no"
    summary = (f"{base}'s defaults miss {_g(g, 2)} of the tuned progress (median gap; 0 = "
               f"as good as tuned) and its good-lr band is {_g(b, 2)} decades wide (median)")
    evidence = ("per optimizer, median over problems: " + ", ".join(
        f"{o} gap {_g(gap(o), 2)} / band {_g(band(o), 2)}" for o in opts),
        f"good lr: a trial that made >= {100 * (1 - M.BAND_DELTA):.0f}% of the best trial's "
        "progress from the initial loss")
    return Claim(title, verdict, summary, evidence, plots)


def claim_nonconvex(agg: Aggregate) -> Claim:
    """Non-convex problems: tuned head-to-head against each rival on the non-convex problems.

    yes = no loss; partly = losses in under half of the comparisons; no = at least half lost."""
    title = "Non-convex problems"
    plots = ("convergence.png", "trajectories.png")
    nonconvex = [p for p, fx in agg.problems.items() if not fx.convex]
    if not nonconvex:
        return Claim(title, "not shown", "every problem in this run is convex", (), plots)
    ph = _phase_of_claims(agg)
    tally: dict[str, list[int]] = {o: [0, 0, 0] for o in agg.rivals}
    for p in nonconvex:
        for o in agg.rivals:
            h = agg.h2h.get(p, {}).get(o, {}).get(ph)
            if h:
                tally[o][0 if h.verdict == agg.base else 1 if h.verdict == "tie" else 2] += 1
    n = sum(sum(t) for t in tally.values())
    if n == 0:
        return Claim(title, "not shown", f"needs re-runs of {agg.base} and a rival", (), plots)
    lost = sum(t[2] for t in tally.values())
    verdict = "yes" if lost == 0 else "partly" if lost < n / 2 else "no"
    summary = (f"{'tuned' if ph == 'tuned' else 'defaults'}, final validation loss, paired "
               f"over seeds, on {', '.join(nonconvex)}: "
               + "; ".join(f"vs {o} {w} won, {t} tied, {lo} lost"
                           for o, (w, t, lo) in tally.items() if w + t + lo))
    evidence = ("a Problem with convex=True is left out of this verdict"
                + ("" if len(nonconvex) == len(agg.problems) else
                   f" ({', '.join(p for p in agg.problems if p not in nonconvex)})"),)
    return Claim(title, verdict, summary, evidence, plots)


def claims(agg: Aggregate) -> list[Claim]:
    """The verdicts on the seed's four claims about the base optimizer (``rmsprop``, else the
    first RMSProp variant of the run); empty when the run has no RMSProp."""
    if not _ours(agg.base or ""):
        return []
    return [claim_fast(agg), claim_stable(agg), claim_few_hyperparameters(agg),
            claim_nonconvex(agg)]


def power_note(n_seeds: int) -> str:
    """How much a '95 % CI winner' means with ``n_seeds`` paired seeds."""
    if n_seeds < 1:
        return ""
    rate = M.null_winner_rate(n_seeds)
    text = (f"With {n_seeds} seed{'s' if n_seeds > 1 else ''}, the paired bootstrap's 95 % CI is "
            f"thin: for two equally good optimizers it excludes 0 in {100 * rate:.0f} % of "
            "comparisons (a well-calibrated 95 % CI would in 5 %)")
    if n_seeds <= 3:
        text += (f"; with {n_seeds} seeds that happens whenever every paired difference has the "
                 "same sign")
    return text + (". Only the margin keeps such a winner from being chance; read a winner as "
                   "provisional and re-run with `--seeds 10` before relying on it.")


# -- plots ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plot:
    """One written figure."""

    file: str
    caption: str


_COLORS = {"rmsprop": "#d62728", "rmsprop-centered": "#ff7f0e", "rmsprop-momentum": "#8c564b",
           CROSS_CHECK: "#e377c2", "adam": "#1f77b4", "sgd": "#7f7f7f",
           "sgd-momentum": "#2ca02c"}


def _color(o: str, i: int) -> str:
    return _COLORS.get(o, f"C{(i + 4) % 10}")


def _panels(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return (math.ceil(n / cols), cols)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_grid(plt: Any, fig: Any, axes: Any, used: int, title: str, out: str,
               name: str) -> None:
    """Blank the unused panels, put one legend below the panels (never over a curve), save."""
    for ax in axes.flat[used:]:
        ax.axis("off")
    handles, labels = [], []
    for ax in axes.flat[:used]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.95 if "\n" not in title else 0.9))
    if labels:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.savefig(os.path.join(out, name), dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_convergence(out: str, agg: Aggregate) -> Plot | None:
    """Median and IQR band over seeds of the validation (excess) loss against steps."""
    import numpy as np

    probs = list(agg.problems)
    if not probs:
        return None
    plt = _pyplot()
    r, c = _panels(len(probs))
    fig, axes = plt.subplots(r, c, figsize=(4.2 * c, 3.2 * r), squeeze=False)
    for ax, p in zip(axes.flat, probs):
        fx = agg.problems[p]
        top = 20 * max(fx.span, 1e-300)
        floor = 1e-16 * max(fx.span, 1e-300)
        for i, o in enumerate(agg.optimizers):
            e = agg.entry(p, o)
            for ph, ls in (("tuned", "-"), ("default", ":")):
                d = e.phase(ph) if e else None
                if not d:
                    continue
                n = max(len(x["result"]["eval_steps"]) for x in d.runs)
                steps = next(x["result"]["eval_steps"] for x in d.runs
                             if len(x["result"]["eval_steps"]) == n)
                mat = np.full((len(d.runs), n), np.nan)
                for k, x in enumerate(d.runs):
                    v = np.array([np.nan if y is None else y for y in x["result"]["eval_loss"]])
                    mat[k, :len(v)] = v - fx.ref
                    if len(v) < n:  # stopped at a non-finite loss: hold the blow-up
                        mat[k, len(v):] = np.inf
                mat = np.clip(np.nan_to_num(mat, nan=np.inf, posinf=top), floor, top)
                q = np.percentile(mat, [25, 50, 75], axis=0)
                ax.plot(steps, q[1], ls, color=_color(o, i), lw=1.4,
                        label=f"{o} ({'tuned' if ph == 'tuned' else 'defaults'})")
                if ph == "tuned":
                    ax.fill_between(steps, q[0], q[2], color=_color(o, i), alpha=0.18, lw=0)
        ax.set_yscale("log")
        ax.set_ylim(top=top if fx.span > 0 else None)
        ax.set_title(p, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("val loss − f*" if fx.has_fstar else "val loss")
        ax.grid(alpha=0.3)
    _save_grid(plt, fig, axes, len(probs), "Convergence: median over seeds, IQR band "
               "(tuned: solid, defaults: dotted)", out, "convergence.png")
    return Plot("convergence.png", "validation loss (minus f*) against steps, median over seeds "
                "with the IQR band of the tuned runs")


@dataclass(frozen=True)
class SensitivitySeries:
    """Tuning trials of one optimizer on one problem that differ only in lr (one line), or a
    single trial (one marker)."""

    problem: str
    optimizer: str
    fixed: tuple[tuple[str, float], ...]   # the other hyperparameters, shared by every point
    lrs: tuple[float, ...]
    finals: tuple[float, ...]              # final validation loss, inf = diverged


def lr_sensitivity_series(agg: Aggregate) -> list[SensitivitySeries]:
    """Group each optimizer's trials by their non-lr hyperparameters, so that a line only ever
    joins trials that share the decay (alpha, beta2, momentum...): trials sampled in 2-D get one
    marker each, a grid over lr one line."""
    out = []
    for p, per in agg.entries.items():
        for o, e in per.items():
            if not e.tuning:
                continue
            groups: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
            for t in e.tuning.trials:
                hp = t["hyperparameters"]
                key = tuple(sorted((k, float(f"{float(v):.12g}")) for k, v in hp.items()
                                   if k != "lr" and isinstance(v, (int, float))
                                   and not isinstance(v, bool)))
                groups[key].append((float(hp["lr"]), _final(t)))
            for key, pts in groups.items():
                pts.sort()
                out.append(SensitivitySeries(p, o, key, tuple(a for a, _ in pts),
                                             tuple(b for _, b in pts)))
    return out


def plot_lr_sensitivity(out: str, agg: Aggregate) -> Plot | None:
    """Final validation (excess) loss of every tuning trial against its lr."""
    import numpy as np

    series = lr_sensitivity_series(agg)
    if not series:
        return None
    probs = [p for p in agg.problems if any(s.problem == p for s in series)]
    plt = _pyplot()
    r, c = _panels(len(probs))
    fig, axes = plt.subplots(r, c, figsize=(4.2 * c, 3.2 * r), squeeze=False)
    for ax, p in zip(axes.flat, probs):
        fx = agg.problems[p]
        cap = 10 * max(fx.span, 1e-12)
        labelled = set()
        for s in (s for s in series if s.problem == p):
            i = agg.optimizers.index(s.optimizer)
            f = np.array(s.finals) - fx.ref
            bad = ~np.isfinite(f)
            f = np.clip(np.where(bad, cap, f), 1e-16 * cap, cap)
            lr = np.array(s.lrs)
            label = None if s.optimizer in labelled else s.optimizer
            labelled.add(s.optimizer)
            ax.plot(lr, f, "-o" if len(lr) > 1 else "o", ms=4, color=_color(s.optimizer, i),
                    lw=1, label=label, alpha=0.85)
            if bad.any():
                ax.plot(lr[bad], f[bad], "x", ms=8, color=_color(s.optimizer, i))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(p, fontsize=10)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final val loss − f*" if fx.has_fstar else "final val loss")
        ax.grid(alpha=0.3)
    _save_grid(plt, fig, axes, len(probs), "LR sensitivity (seed 0): one point per tuning "
               "trial,\nlines join only trials with the same decay; x = diverged", out,
               "lr_sensitivity.png")
    return Plot("lr_sensitivity.png", "final validation loss of every tuning trial against its "
                "learning rate (x = diverged)")


def profile_figure(agg: Aggregate) -> Any:
    """The performance-profile figure (tuned, defaults), its legends below the axes so that no
    legend covers a curve; ``None`` without profiles. The caller closes it."""
    import numpy as np

    if not agg.profiles:
        return None
    plt = _pyplot()
    taus = np.linspace(1, M.TAU_MAX, 301)
    items = sorted(agg.profiles.items(), reverse=True)  # tuned first
    fig, axes = plt.subplots(1, len(items), figsize=(4.6 * len(items), 3.4), squeeze=False)
    for ax, (ph, prof) in zip(axes.flat, items):
        for i, o in enumerate(agg.optimizers):
            if o not in prof.ratios:
                continue
            ax.step(taus, M.performance_profile(prof.ratios[o], taus.tolist()), where="post",
                    color=_color(o, i), label=f"{o} (score {_g(prof.score[o], 2)})")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("τ (steps to target / best)")
        ax.set_ylabel("fraction of problems")
        ax.set_title(f"Performance profile ({'tuned' if ph == 'tuned' else 'defaults'})",
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2,
                  frameon=False)
    fig.tight_layout()
    return fig


def plot_profiles(out: str, agg: Aggregate) -> Plot | None:
    """AlgoPerf performance profiles, tuned and defaults (:func:`profile_figure`)."""
    fig = profile_figure(agg)
    if fig is None:
        return None
    fig.savefig(os.path.join(out, "performance_profile.png"), dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return Plot("performance_profile.png", "share of problems on which each optimizer reached "
                "the target within τ times the fastest one's steps")


def plot_trajectories(out: str, agg: Aggregate, problems: Mapping[str, Any]) -> Plot | None:
    """Paths of the first tuned seed over the contours of each 2-D analytic problem."""
    import numpy as np

    two_d = [p for p, fx in agg.problems.items() if fx.two_d and p in problems]
    if not two_d:
        return None
    plt = _pyplot()
    tc = min(len(two_d), 3)
    tr = math.ceil(len(two_d) / tc)
    fig, axes = plt.subplots(tr, tc, figsize=(4.6 * tc, 4.2 * tr), squeeze=False)
    for ax, p in zip(axes.flat, two_d):
        prob = problems[p]
        (x0, x1), (y0, y1) = prob.bounds
        xs, ys = np.meshgrid(np.linspace(x0, x1, 300), np.linspace(y0, y1, 300))
        z = np.log10(prob.value(np.stack([xs, ys], -1)) - (prob.known_min or 0.0) + 1e-3)
        ax.contourf(xs, ys, z, levels=30, cmap="Greys", alpha=0.55)
        ax.contour(xs, ys, z, levels=15, colors="k", linewidths=0.3, alpha=0.5)
        seed = None
        for i, o in enumerate(agg.optimizers):
            e = agg.entry(p, o)
            d = e.main if e else None
            if d is None or not d.runs[0]["result"].get("trajectory"):
                continue
            tr_ = d.runs[0]["result"]["trajectory"]
            seed = d.runs[0]["seed"]
            a = np.array([[np.nan if v is None else v for v in pt] for pt in tr_], float)
            # the first optimizer (ours) on top, so that overlapping paths do not hide it
            ax.plot(a[:, 0], a[:, 1], "-", color=_color(o, i), lw=1.2, label=o,
                    zorder=3 + len(agg.optimizers) - i)
            ax.plot(a[0, 0], a[0, 1], "o", color="k", ms=4)
        for pt in getattr(prob, "optima", ()):
            ax.plot(*pt, "*", color="gold", ms=12, mec="k")
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_title(f"{p} (seed {seed})" if seed is not None else p, fontsize=10)
    _save_grid(plt, fig, axes, len(two_d), "Trajectories (tuned, first seed)", out,
               "trajectories.png")
    return Plot("trajectories.png", "paths over the contours of the 2-D problems (tuned, first "
                "seed; ★ = minima)")


def plot_all(out: str, agg: Aggregate, problems: Mapping[str, Any]) -> list[Plot]:
    """Every figure, in the report's order."""
    made = [plot_convergence(out, agg), plot_lr_sensitivity(out, agg), plot_profiles(out, agg),
            plot_trajectories(out, agg, problems)]
    return [p for p in made if p is not None]


# -- Markdown ------------------------------------------------------------------------------------

def _miqr(t: tuple[float, float, float], ref: float, scale: float = 0.0) -> str:
    # excess below 1e-12 of the initial excess is round-off at the minimum: shown as 0
    m, lo, hi = ((0.0 if abs(v - ref) <= 1e-12 * scale else v - ref) if math.isfinite(v) else v
                 for v in t)
    return f"{_g(m)} [{_g(lo, 2)}, {_g(hi, 2)}]"


def render_claims(cl: Sequence[Claim], plots: Sequence[str]) -> str:
    """The verdict table and, under it, the evidence of each claim."""
    if not cl:
        return "_(the claims are assessed only when an RMSProp of ours is among the optimizers)_"
    have = set(plots)

    def refs(c: Claim) -> str:
        shown = [p for p in c.plots if p in have]
        return ", ".join(f"[{p}]({p})" for p in shown) if shown else "–"

    lines = ["| claim | verdict | what it rests on | plots |", "|---|---|---|---|"]
    lines += [f"| {c.title} | **{c.verdict}** | {c.summary} | {refs(c)} |" for c in cl]
    lines.append("")
    for c in cl:
        if c.evidence:
            lines.append(f"- **{c.title}**: " + "; ".join(c.evidence) + ".")
    return "\n".join(lines)


def problem_table(agg: Aggregate, p: str) -> str:
    """The per-problem table: one row per optimizer."""
    fx = agg.problems[p]
    lines = ["| optimizer | tuned: final val loss − f* median [IQR] | defaults: final val loss "
             "− f* | test (tuned) | success | steps to target | diverged trials / seeds | "
             "oscillation | lr band (decades) | default gap | ms/step |", "|" + "---|" * 11]
    for o, e in agg.entries[p].items():
        t, d, main = e.tuned, e.default, e.main
        if main is None:
            continue
        test = "–"
        if not math.isnan(main.test_metric):
            test = f"{fx.metric_name or 'metric'} {100 * main.test_metric:.1f}%" \
                if fx.metric_name == "accuracy" else f"{fx.metric_name} {_g(main.test_metric)}"
        elif not math.isnan(main.test[0]):
            test = f"loss {_g(main.test[0])}"
        tu = e.tuning
        edge = f" (edge: {tu.edge})" if tu and tu.edge else ""
        lines.append(
            f"| {o} | {_miqr(t.final, fx.ref, fx.span) if t else '–'} | "
            f"{_miqr(d.final, fx.ref, fx.span) if d else '–'} | {test} | {_pct(main.success)} | "
            f"{_g(main.median_steps, 4)} | {_pct(tu.diverged if tu else math.nan)} / "
            f"{_pct(main.div)} | {_g(main.osc, 2)} | "
            f"{_g(tu.band.decades if tu else math.nan, 2)}{edge} | {_g(e.gap, 2)} | "
            f"{_g(main.ms, 2)} |")
    return "\n".join(lines)


def summary_table(agg: Aggregate) -> str:
    """One line per problem and optimizer (printed by the command): tuned final loss and
    steps to target."""
    lines = ["| problem | optimizer | tuned final val loss − f* | defaults | steps to target "
             "(tuned) | diverged seeds |", "|---|---|---|---|---|---|"]
    for p, per in agg.entries.items():
        fx = agg.problems[p]
        for o, e in per.items():
            main = e.main
            if main is None:
                continue
            lines.append(f"| {p} | {o} | "
                         f"{_miqr(e.tuned.final, fx.ref, fx.span) if e.tuned else '–'} | "
                         f"{_miqr(e.default.final, fx.ref, fx.span) if e.default else '–'} | "
                         f"{_g(main.median_steps, 4)} | {_pct(main.div)} |")
    return "\n".join(lines)


def overall_table(agg: Aggregate) -> str:
    """One row per optimizer: profile scores, head-to-head tally, stability and tuning."""
    base = agg.base
    lines = [f"| optimizer | profile score tuned | profile score defaults | vs {base} (tuned): "
             "won / tie / lost | diverged tuning trials | median lr band (decades) | median "
             "default gap |", "|" + "---|" * 7]
    for o in agg.optimizers:
        sc_t = agg.profiles["tuned"].score.get(o, math.nan) if "tuned" in agg.profiles \
            else math.nan
        sc_d = agg.profiles["default"].score.get(o, math.nan) if "default" in agg.profiles \
            else math.nan
        won = tie = lost = 0
        for per in agg.h2h.values():
            h = per.get(o, {}).get("tuned")
            if h:
                won += h.verdict == o
                tie += h.verdict == "tie"
                lost += h.verdict not in (o, "tie")
        tally = "–" if o == base else f"{won} / {tie} / {lost}"
        es = [per[o] for per in agg.entries.values() if o in per]
        grid = [e.tuning.diverged for e in es if e.tuning]
        bands = [e.tuning.band.decades for e in es if e.tuning]
        lines.append(f"| {o} | {_g(sc_t, 2)} | {_g(sc_d, 2)} | {tally} | "
                     f"{_pct(sum(grid) / len(grid)) if grid else '–'} | {_g(_median(bands), 2)}"
                     f" | {_g(_median(e.gap for e in es), 2)} |")
    return "\n".join(lines)


def h2h_table(agg: Aggregate, p: str) -> str:
    """Head to head on one problem: one row per phase, one column per other optimizer."""
    per = agg.h2h.get(p, {})
    others = [o for o in agg.optimizers if o in per]
    if not others:
        return ""
    base = agg.base
    lines = ["| config | " + " | ".join(f"{base} vs {o}" for o in others) + " |",
             "|" + "---|" * (1 + len(others))]
    for ph in PHASES:
        cells = []
        for o in others:
            h = per[o].get(ph)
            if not h:
                cells.append("–")
                continue
            med, lo, hi = h.ci
            cells.append(f"**{h.verdict}** ({_g(med, 2)} [{_g(lo, 2)}, {_g(hi, 2)}])")
        lines.append(f"| {ph} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cross_check_section(agg: Aggregate) -> list[str]:
    """torch.optim.RMSprop against ours under the ``pytorch`` preset, per problem."""
    if not agg.cross_check:
        return []
    lines = ["## Cross-check: torch.optim.RMSprop vs ours (`pytorch` preset)", "",
             "Same seed, same process, per-step training loss. Our for-loop path "
             "(`fused=False`) must be bit-identical to torch; our default path uses the fused "
             "kernel, whose last-bit rounding differs, and chaotic problems grow that.", "",
             "| problem | for-loop path: identical | default path: first differing step | "
             "max rel. diff, first 10 steps | max rel. diff, whole run | final val loss "
             "torch / ours |", "|---|---|---|---|---|---|"]
    for p, c in agg.cross_check.items():
        fl, df = c["forloop"], c["default"]
        first = df["first_difference_step"]
        same = "yes" if fl["identical"] else f"NO (step {fl['first_difference_step']})"
        lines.append(f"| {p} | {same} | {'none' if first is None else first} | "
                     f"{_g(df['max_rel_diff_first10'], 2)} | {_g(df['max_rel_diff'], 2)} | "
                     f"{_g(c['torch_final_eval_loss'], 4)} / {_g(df['final_eval_loss'], 4)} |")
    return lines + [""]


def search_space_table(cfg: Mapping[str, Any]) -> str:
    """Defaults and the dimensions each optimizer's tuning varied (``cfg["search_spaces"]``:
    ``{optimizer: [description, ...]}``; ``cfg["defaults"]``: ``{optimizer: {...}}``)."""
    lines = ["| optimizer | defaults (one-shot) | dimensions the tuning varies |", "|---|---|---|"]
    for o in cfg["optimizers"]:
        dims = cfg.get("search_spaces", {}).get(o, [])
        d = cfg.get("defaults", {}).get(o, {})
        lines.append(f"| {o} | {', '.join(f'{k}={v}' for k, v in d.items())} | "
                     f"{'; '.join(dims) if dims else '–'} |")
    return "\n".join(lines)


def render(agg: Aggregate, cfg: Mapping[str, Any], plots: Sequence[Plot] = (), *,
           versions: Mapping[str, str] | None = None, elapsed: float | None = None) -> str:
    """The whole ``report.md``: the verdict first, then the per-problem detail."""
    from rmsprop.tools.user_problem import source_of

    files = [p.file for p in plots]
    cl = claims(agg)
    names = list(agg.problems)
    user = [p for p in names if agg.problems[p].source and agg.problems[p].source != p]
    subject = (f"your problem `{names[0]}`" if len(user) == 1 and len(names) == 1 else
               "your problems " + ", ".join(f"`{p}`" for p in names) if user else
               f"the `{cfg.get('suite', '?')}` suite" if not cfg.get("explicit_problems") else
               ", ".join(f"`{p}`" for p in names))
    seeds = int(cfg.get("seeds", 0))
    lines = [
        f"# rmsprop compare: {subject}", "",
        f"Should you use RMSProp here? Problems: {', '.join(names)}; optimizers: "
        f"{', '.join(agg.optimizers)}. {cfg.get('trials', 0)} tuning trials per optimizer and "
        f"problem ({cfg.get('search', '?')}, seed 0, validation split), then the defaults and the "
        f"best trial re-run on {seeds} fresh seeds (1..{seeds}) with common random numbers; "
        f"{cfg.get('schedule', 'constant')} learning rate."
        + (f" Wall time {elapsed:.0f} s with {cfg.get('jobs')} jobs." if elapsed else ""), "",
        "## Verdict on the four claims", "",
        *([(f"About {agg.base}" + (" (ours, torch's defaults)" if agg.base == BASE else
                                   " (ours)") + " against ")
           + f"{', '.join(agg.rivals) or 'no rival'}, {_where(agg)}.", ""] if cl else []),
        render_claims(cl, files), "",
    ]
    note = power_note(seeds)
    if note and agg.h2h:
        lines += [f"**How far to trust a winner.** {note}", ""]
    lines += ["## Per problem", "",
              "Columns: final validation loss minus the known minimum f* (0 for data problems), "
              "median [25th, 75th percentile] over seeds (∞ = diverged); test metric or loss of "
              "the tuned configuration (median); success = share of seeds reaching the target "
              "`l_L + tau (l_0 - l_L)` (l_L = f*, else the best validation loss any run "
              "reached); steps to target = median over seeds (∞ unless half succeed), resolved "
              "at the problem's evaluation interval; diverged = share of tuning trials / of "
              "re-run seeds whose loss became non-finite or ended above 10x the initial "
              "excess; oscillation = share of rising steps in the last 10% of the log excess "
              "loss (~0.5 flags a limit cycle); lr band = width in decades of the learning "
              f"rates whose trial made >= {100 * (1 - M.BAND_DELTA):.0f}% of the best trial's "
              "progress (edge = best lr at the edge of its range: widen it); default gap = "
              "(default − tuned)/(l_0 − tuned), 0 = defaults as good as tuned; ms/step = median "
              "wall time of one step (noisy on shared machines; step counts are the measure).",
              "", "Head to head: **winner** only when the 95% CI of the median paired "
              f"difference ({agg.base} − other, over seeds) excludes 0 and |median| exceeds the "
              f"margin: on data problems the difference of final validation losses, margin "
              f"{MARGIN:.0%} of the median initial loss; with a known f*, the difference of "
              f"log10(f − f*), margin {LOG_MARGIN:g} decade. A diverged seed scores the "
              "divergence threshold.", ""]
    for p in names:
        fx = agg.problems[p]
        where = f" From {source_of(fx.source)}." if fx.source and fx.source != p else ""
        lines += [f"### {p}", "",
                  f"{fx.description}.{where} Budget {fx.steps} steps, evaluated every "
                  f"{fx.eval_every} (the resolution of steps to target); "
                  + (f"target = {_g(fx.target_loss, 4)} (the problem's own)"
                     if fx.target_loss is not None else
                     f"tau = {_g(fx.tau)}, target = l_L + tau (l_0 − l_L) with l_0 = "
                     f"{_g(fx.l0, 4)}, "
                     + (f"l_L = f* = {_g(fx.ref, 4)}" if fx.has_fstar else
                        f"l_L = {_g(fx.l_low, 4)} (best validation loss reached)"))
                  + (", convex" if fx.convex else "") + ".", "",
                  problem_table(agg, p), ""]
        h = h2h_table(agg, p)
        if h:
            lines += [h, ""]
    lines += ["## Overall", "", overall_table(agg), ""]
    lines += cross_check_section(agg)
    lines += ["## Search spaces (printed with every result)", "", search_space_table(cfg), ""]
    edges = [(p, o, e.tuning) for p, per in agg.entries.items() for o, e in per.items()
             if e.tuning and e.tuning.edge and e.tuning.best_hp]
    if edges:
        lines += ["**Best lr at the edge of its range** (extend the range to trust the tuned "
                  "result):", ""]
        lines += [f"- {p} / {o}: {t.edge} edge, lr = {_g((t.best_hp or {}).get('lr'))}"
                  for p, o, t in edges]
        lines.append("")
    lines += ["## Tuned configurations", "", "| problem | optimizer | best trial |",
              "|---|---|---|"]
    for p, per in agg.entries.items():
        for o, e in per.items():
            if e.tuning and e.tuning.best_hp:
                lines.append(f"| {p} | {o} | " + ", ".join(
                    f"{k}={_g(v, 4)}" for k, v in e.tuning.best_hp.items()) + " |")
    lines.append("")
    if plots:
        lines += ["## Plots", ""]
        for pl in plots:
            lines += [f"![{pl.file}]({pl.file})", "", f"{pl.file}: {pl.caption}.", ""]
    if versions:
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".", ""]
    lines += ["Files: `runs/<problem>/<optimizer>/<phase>-<config>-s<seed>.json` (one per run), "
              "`results.csv` (one row per problem x optimizer x config), `compare.json` (the "
              "options and plan; a resume must match them).", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` wrote."""

    path: str
    table: str
    claims: tuple[Claim, ...]
    plots: tuple[Plot, ...]
    aggregate: Aggregate = field(repr=False)


def write_csv(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """``rows`` as CSV; NaN as an empty cell."""
    with open(path, "w", newline="") as f:
        if not rows:
            return
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else
                            "" if v is None else v) for k, v in row.items()})


def write_report(out: str, records: Sequence[Mapping[str, Any]], cfg: Mapping[str, Any], *,
                 problems: Mapping[str, Any] | None = None,
                 spaces: Mapping[str, Mapping[str, Any]] | None = None,
                 versions: Mapping[str, str] | None = None, elapsed: float | None = None,
                 plots: bool = True) -> Report:
    """Write ``results.csv``, ``report.md`` and the PNGs into ``out``."""
    from rmsprop.tools import problems as suite

    probs = dict(problems or {})
    for p in cfg["problems"]:
        probs.setdefault(p, suite.PROBLEMS.get(p))
    agg = aggregate(records, cfg, probs, spaces)
    write_csv(os.path.join(out, "results.csv"), csv_rows(agg))
    figs = plot_all(out, agg, probs) if plots else []
    text = render(agg, cfg, figs, versions=versions, elapsed=elapsed)
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write(text)
    return Report(path, summary_table(agg), tuple(claims(agg)), tuple(figs), agg)
