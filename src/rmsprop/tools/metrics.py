"""Metric definitions used by ``rmsprop compare`` and ``rmsprop tune`` (and the README's table).

All functions are pure NumPy/Python; lower loss is better throughout. Definitions follow
DeepOBS (Schneider et al. 2019), "Descending through a Crowded Valley" (Schmidt et al. 2021),
AlgoPerf (Dahl et al. 2023) and Moré & Wild (2009):

- final performance: median and IQR over seeds (:func:`median_iqr`);
- relative target ``l_L + tau (l_0 - l_L)`` (:func:`relative_target`) and censored
  steps-to-target (:func:`steps_to_target`, ``inf`` when never reached), success rate
  (:func:`success_rate`) and median steps when at least half the seeds succeed
  (:func:`median_steps`);
- AlgoPerf performance profiles ``rho_o(tau)`` and score ``B_o`` (:func:`performance_ratios`,
  :func:`performance_profile`, :func:`profile_score`);
- divergence (:func:`is_diverged`), oscillation on the tail of the log excess loss
  (:func:`oscillation`), lr-sensitivity band (:func:`lr_band`), default-vs-tuned gap
  (:func:`default_tuned_gap`), paired bootstrap and the winner-or-tie rule
  (:func:`paired_bootstrap`, :func:`verdict`) and how often that rule names a winner between
  two equal optimizers (:func:`null_winner_rate`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "median_iqr", "relative_target", "steps_to_target", "success_rate", "median_steps",
    "performance_ratios", "performance_profile", "profile_score", "is_diverged", "oscillation",
    "lr_band", "LrBand", "BAND_DELTA", "default_tuned_gap", "paired_bootstrap", "verdict",
    "null_winner_rate", "TAU_MAX",
]

#: AlgoPerf integrates the performance profile up to a ratio of 4.
TAU_MAX = 4.0
#: a "good" trial made at least 1 - BAND_DELTA of the best trial's progress (:func:`lr_band`)
BAND_DELTA = 0.01


def median_iqr(values: Sequence[float]) -> tuple[float, float, float]:
    """``(median, 25th percentile, 75th percentile)`` with linear interpolation (NumPy's
    default); ``inf`` values (diverged runs) are kept, so a majority of diverged seeds shows.
    ``nan`` triple for an empty input."""
    a = np.asarray([v for v in values if not (isinstance(v, float) and math.isnan(v))], float)
    if a.size == 0:
        return (math.nan, math.nan, math.nan)
    a = np.sort(a)

    def pct(q: float) -> float:
        # NumPy's linear rule, written out so that interpolating towards inf gives inf, not nan
        h = (a.size - 1) * q
        lo, hi = a[int(math.floor(h))], a[int(math.ceil(h))]
        frac = h - math.floor(h)
        if frac == 0 or lo == hi:
            return float(lo)
        return float(lo + frac * (hi - lo)) if math.isfinite(hi) else math.inf

    return (pct(0.5), pct(0.25), pct(0.75))


def relative_target(l0: float, l_best: float, tau: float) -> float:
    """Moré–Wild target ``l_best + tau * (l0 - l_best)``: reached after closing all but a
    fraction ``tau`` of the gap between the start and the best reachable value."""
    if not 0 < tau < 1:
        raise ValueError(f"tau must be in (0, 1), got {tau}")
    return l_best + tau * (l0 - l_best)


def steps_to_target(steps: Sequence[int], losses: Sequence[float], target: float) -> float:
    """First step ``t`` whose loss is ``<= target``; ``inf`` when never reached (censored)."""
    for t, v in zip(steps, losses):
        if v is not None and not math.isnan(v) and v <= target:
            return float(t)
    return math.inf


def success_rate(steps_needed: Sequence[float]) -> float:
    """Fraction of runs that reached the target (finite steps-to-target)."""
    if len(steps_needed) == 0:
        return math.nan
    return sum(math.isfinite(s) for s in steps_needed) / len(steps_needed)


def median_steps(steps_needed: Sequence[float]) -> float:
    """Median steps-to-target over seeds, censored values counted as ``inf``; ``inf`` unless at
    least half the seeds succeed (the median is then finite by construction)."""
    if len(steps_needed) == 0:
        return math.inf
    s = sorted(steps_needed)
    n = len(s)
    if n % 2:
        return float(s[n // 2])
    lo, hi = s[n // 2 - 1], s[n // 2]
    return float((lo + hi) / 2) if math.isfinite(hi) else math.inf


def performance_ratios(steps: Mapping[str, Mapping[str, float]]) -> dict[str, list[float]]:
    """AlgoPerf ratios ``r_{o,p} = S_{o,p} / min_o S_{o,p}`` from ``steps[problem][optimizer]``.

    ``inf`` where ``o`` never reached the target, and for every optimizer on a problem that no
    optimizer solved. Returns ``{optimizer: [ratio per problem]}`` in problem order.
    """
    opts: list[str] = []
    for per in steps.values():
        for o in per:
            if o not in opts:
                opts.append(o)
    out: dict[str, list[float]] = {o: [] for o in opts}
    for per in steps.values():
        finite = [v for v in per.values() if math.isfinite(v)]
        best = min(finite) if finite else math.inf
        for o in opts:
            s = per.get(o, math.inf)
            if not math.isfinite(s) or not math.isfinite(best):
                out[o].append(math.inf)
            elif best == 0:
                out[o].append(1.0 if s == 0 else math.inf)
            else:
                out[o].append(s / best)
    return out


def performance_profile(ratios: Sequence[float], taus: Sequence[float]) -> list[float]:
    """``rho(tau)`` = fraction of problems with ratio ``<= tau``, for each ``tau``."""
    r = np.asarray(ratios, float)
    if r.size == 0:
        return [math.nan for _ in taus]
    return [float(np.mean(r <= t)) for t in taus]


def profile_score(ratios: Sequence[float], tau_max: float = TAU_MAX) -> float:
    """AlgoPerf score ``B = 1/(tau_max - 1) * integral_1^tau_max rho(tau) dtau``, exactly.

    Each problem with ratio ``r <= tau_max`` contributes ``(tau_max - r)/(tau_max - 1)`` (the
    length of the tau-interval over which it counts), others 0; averaged over problems. 1 means
    fastest on every problem.
    """
    r = np.asarray(ratios, float)
    if r.size == 0:
        return math.nan
    contrib = np.where(np.isfinite(r) & (r <= tau_max), (tau_max - np.maximum(r, 1.0)), 0.0)
    return float(contrib.mean() / (tau_max - 1.0))


def is_diverged(losses: Sequence[float], ref: float = 0.0, factor: float = 10.0) -> bool:
    """Non-finite loss, or excess over ``ref`` above ``factor`` times the initial excess."""
    if len(losses) == 0:
        return False
    l0 = losses[0]
    if l0 is None or not math.isfinite(l0):
        return True
    limit = factor * max(l0 - ref, 0.0)
    return any(v is None or not math.isfinite(v) or (v - ref) > limit for v in losses[1:])


def oscillation(losses: Sequence[float], floor: float, delta: float,
                tail: float = 0.1, min_points: int = 5) -> tuple[float, float]:
    """Oscillation on the tail of ``y_t = log10(l_t - floor + delta)``.

    Returns ``(increase fraction, mean |dy|)`` over the last ``tail`` share of the curve (at least
    ``min_points`` points): the share of consecutive pairs whose ``y`` rises by more than 1e-9
    decades (so round-off flutter at the floor does not count), and the mean absolute change in
    decades. An increase fraction near 0.5 with a sizeable ``|dy|`` flags a limit cycle;
    monotone convergence gives 0. ``(nan, nan)`` when the curve is too short or not finite.
    """
    v = np.asarray([math.nan if x is None else x for x in losses], float)
    n = max(min_points, int(math.ceil(tail * len(v))))
    v = v[-n:]
    if len(v) < 2 or not np.all(np.isfinite(v)):
        return (math.nan, math.nan)
    y = np.log10(np.maximum(v - floor, 0.0) + delta)
    dy = np.diff(y)
    return (float(np.mean(dy > 1e-9)), float(np.mean(np.abs(dy))))


@dataclass(frozen=True)
class LrBand:
    """The good learning rates of a set of trials: ``lo`` to ``hi``, ``decades`` wide
    (``log10(hi / lo)``; 0 for a single good trial; ``nan`` when no trial ended finite), and how
    many of the ``n_total`` trials were good."""

    lo: float
    hi: float
    decades: float
    n_good: int
    n_total: int


def lr_band(lrs: Sequence[float], finals: Sequence[float], l0: float,
            delta: float = BAND_DELTA) -> LrBand:
    """The band of learning rates whose trials came within ``delta`` of the best progress.

    A trial is *good* when ``final <= best + delta * (l0 - best)``, i.e. it made at least
    ``1 - delta`` of the best trial's progress from the initial loss ``l0`` (a relative rule
    that also holds for negative minima, where ``best * (1 + delta)`` would not). Non-finite
    finals (diverged trials) are never good. Larger ``decades`` = easier to tune (the DeepOBS
    good-band width). This is the one definition ``compare`` and ``tune`` share.
    """
    if len(lrs) != len(finals):
        raise ValueError(f"lr_band: {len(lrs)} learning rates but {len(finals)} final losses")
    pairs = [(float(lr), float(f)) for lr, f in zip(lrs, finals)
             if f is not None and math.isfinite(f)]
    if not pairs:
        return LrBand(math.nan, math.nan, math.nan, 0, len(lrs))
    best = min(f for _, f in pairs)
    cut = best + delta * max(l0 - best, 0.0)
    good = [lr for lr, f in pairs if f <= cut]
    lo, hi = min(good), max(good)
    return LrBand(lo, hi, math.log10(hi / lo), len(good), len(lrs))


def default_tuned_gap(default: float, tuned: float, l0: float) -> float:
    """``(default - tuned) / (l0 - tuned)``: the share of the tuned run's progress that the
    defaults miss. 0 = defaults as good as tuned, 1 = defaults made no progress, < 0 = defaults
    better (the tuning budget found nothing better on these seeds), ``inf`` if defaults diverged.
    """
    if not math.isfinite(default):
        return math.inf
    span = l0 - tuned
    if span <= 0 or not math.isfinite(span):
        return math.nan
    return (default - tuned) / span


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 2000,
                     seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Median of the paired differences ``a_k - b_k`` (seed k is shared: common random numbers)
    and its percentile bootstrap CI, resampling seeds with replacement."""
    d = np.asarray(a, float) - np.asarray(b, float)
    if d.size == 0:
        return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    meds = np.median(d[idx], axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(meds, [alpha, 1 - alpha])
    return (float(np.median(d)), float(lo), float(hi))


def verdict(a: Sequence[float], b: Sequence[float], margin: float, names: tuple[str, str],
            n_boot: int = 2000, seed: int = 0) -> tuple[str, tuple[float, float, float]]:
    """Winner (lower is better) only when the paired bootstrap CI of ``median(a - b)`` excludes
    0 *and* ``|median| > margin``; otherwise ``"tie"``. Returns ``(verdict, (med, lo, hi))``."""
    med, lo, hi = paired_bootstrap(a, b, n_boot=n_boot, seed=seed)
    if math.isnan(med):
        return "tie", (med, lo, hi)
    if hi < 0 and -med > margin:
        return names[0], (med, lo, hi)
    if lo > 0 and med > margin:
        return names[1], (med, lo, hi)
    return "tie", (med, lo, hi)


def null_winner_rate(n: int, level: float = 0.95, n_sim: int = 400, seed: int = 0) -> float:
    """How often :func:`paired_bootstrap`'s ``level`` CI excludes 0 when the two optimizers are
    equally good (paired differences i.i.d. N(0, 1)), with ``n`` seeds; estimated from
    ``n_sim`` simulated comparisons. Well calibrated, it would be ``1 - level``; with few seeds
    the percentile bootstrap is much thinner (3 seeds: the CI excludes 0 exactly when all three
    differences share a sign, 2/8 = 25 % of the time)."""
    if n < 1:
        raise ValueError(f"null_winner_rate: n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_sim):
        d = rng.standard_normal(n)
        _, lo, hi = paired_bootstrap(d.tolist(), [0.0] * n, level=level,
                                     seed=int(rng.integers(2**31)))
        hits += lo > 0 or hi < 0
    return hits / n_sim
