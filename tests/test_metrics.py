"""rmsprop.tools.metrics against hand-computed cases (every expected value worked out by hand)."""

import math

import pytest

from rmsprop.tools import metrics as M

inf = math.inf


def test_median_iqr_linear_interpolation():
    # [1, 2, 3, 4]: median 2.5; 25th percentile at position 0.75 -> 1.75; 75th at 2.25 -> 3.25
    assert M.median_iqr([4, 1, 3, 2]) == (2.5, 1.75, 3.25)
    assert M.median_iqr([7.0]) == (7.0, 7.0, 7.0)
    # a majority of diverged (inf) seeds must show in the median
    assert M.median_iqr([1.0, inf, inf])[0] == inf
    assert all(math.isnan(v) for v in M.median_iqr([]))


def test_relative_target_more_wild():
    assert M.relative_target(10.0, 0.0, 0.1) == pytest.approx(1.0)
    assert M.relative_target(5.0, 1.0, 0.5) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        M.relative_target(1.0, 0.0, 1.5)


def test_steps_to_target_first_hit_and_censoring():
    steps, losses = [0, 10, 20, 30], [5.0, 3.0, 1.0, 0.5]
    assert M.steps_to_target(steps, losses, 1.0) == 20  # <= counts
    assert M.steps_to_target(steps, losses, 3.5) == 10
    assert M.steps_to_target(steps, losses, 0.1) == inf
    assert M.steps_to_target(steps, [5.0, math.nan, 0.9, 2.0], 1.0) == 20


def test_success_rate_and_median_steps():
    assert M.success_rate([10, inf, 30, inf]) == 0.5
    assert M.median_steps([10, inf, 30]) == 30  # 2 of 3 succeed
    assert M.median_steps([10, inf, inf]) == inf  # fewer than half succeed
    assert M.median_steps([10, 20, 30, inf]) == 25
    assert M.median_steps([10, 20, inf, inf]) == inf  # exactly half: upper middle is censored


def test_performance_ratios_profile_and_score():
    steps = {"p1": {"a": 10, "b": 20}, "p2": {"a": inf, "b": 5}, "p3": {"a": inf, "b": inf}}
    r = M.performance_ratios(steps)
    assert r == {"a": [1.0, inf, inf], "b": [2.0, 1.0, inf]}
    assert M.performance_profile(r["b"], [1, 1.5, 2, 4]) == pytest.approx([1 / 3, 1 / 3, 2 / 3,
                                                                           2 / 3])
    # a: problem p1 counts on [1, 4] -> 3/3; others never: (1 + 0 + 0) / 3
    assert M.profile_score(r["a"]) == pytest.approx(1 / 3)
    # b: p1 counts on [2, 4] -> 2/3, p2 on [1, 4] -> 1: (2/3 + 1 + 0) / 3 = 5/9
    assert M.profile_score(r["b"]) == pytest.approx(5 / 9)
    assert M.profile_score([5.0]) == 0.0  # beyond tau_max counts nowhere


def test_is_diverged():
    assert not M.is_diverged([1.0, 5.0, 9.9])
    assert M.is_diverged([1.0, 11.0])
    assert M.is_diverged([1.0, math.nan])
    # relative to a reference: initial excess 1, limit 10
    assert not M.is_diverged([0.0, 0.5], ref=-1.0)
    assert M.is_diverged([0.0, 9.5], ref=-1.0)


def test_oscillation_limit_cycle_and_monotone():
    cycle = [1.0, 2.0] * 11  # 22 points; tail 0.5 -> last 11 points, 10 differences
    frac, dy = M.oscillation(cycle, floor=0.0, delta=1e-300, tail=0.5)
    assert frac == 0.5
    assert dy == pytest.approx(math.log10(2.0))
    mono = [10.0 ** -k for k in range(20)]
    frac, dy = M.oscillation(mono, floor=0.0, delta=1e-300, tail=0.5)
    assert frac == 0.0
    assert dy == pytest.approx(1.0)
    # round-off flutter at the floor (far below delta) is not oscillation
    flutter = [1e-30, 2e-30] * 10
    assert M.oscillation(flutter, floor=0.0, delta=1e-8)[0] == 0.0


def test_lr_band_width():
    lrs = [1e-4, 1e-3, 1e-2, 1e-1]
    finals = [1.0, 0.105, 0.1, inf]
    # best 0.1, l0 1.1: cut = 0.1 + 0.01 * 1.0 = 0.11 -> lrs 1e-3 and 1e-2 -> one decade
    band = M.lr_band(lrs, finals, l0=1.1)
    assert (band.lo, band.hi, band.n_good, band.n_total) == (1e-3, 1e-2, 2, 4)
    assert band.decades == pytest.approx(1.0)
    assert M.lr_band([1e-2], [0.3], l0=1.0).decades == 0.0
    # a negative minimum (the saddle's -1): progress from l0 = 1 is 2; 1 % of it is 0.02
    band = M.lr_band([1e-3, 1e-2, 1e-1], [-0.985, -1.0, -0.97], l0=1.0)
    assert (band.lo, band.hi) == (1e-3, 1e-2)
    # every trial diverged: no band
    assert math.isnan(M.lr_band([1e-2, 1e-1], [inf, math.nan], l0=1.0).decades)
    with pytest.raises(ValueError, match="2 learning rates but 1 final"):
        M.lr_band([1e-2, 1e-1], [0.3], l0=1.0)


def test_default_tuned_gap():
    assert M.default_tuned_gap(0.55, 0.1, 1.0) == pytest.approx(0.5)
    assert M.default_tuned_gap(0.1, 0.1, 1.0) == 0.0
    assert M.default_tuned_gap(0.05, 0.1, 1.0) < 0
    assert M.default_tuned_gap(inf, 0.1, 1.0) == inf


def test_paired_bootstrap_and_verdict():
    assert M.paired_bootstrap([1, 2, 3], [0, 1, 2]) == (1.0, 1.0, 1.0)
    v, ci = M.verdict([1, 2, 3], [0, 1, 2], margin=0.5, names=("a", "b"))
    assert v == "b" and ci == (1.0, 1.0, 1.0)
    assert M.verdict([0, 1, 2], [1, 2, 3], margin=0.5, names=("a", "b"))[0] == "a"
    # CI excludes 0 but the difference is below the practical margin
    assert M.verdict([1, 2, 3], [0, 1, 2], margin=2.0, names=("a", "b"))[0] == "tie"
    # mixed signs: the CI covers 0
    assert M.verdict([1, 0, 1, 0], [0, 1, 0, 1], margin=0.0, names=("a", "b"))[0] == "tie"


@pytest.mark.parametrize("n, closed_form", [
    (1, 1.0),            # one difference: the bootstrap CI is a point, never covering 0
    (3, 2 / 2**3),       # all three differences share a sign
    (5, 2 / 2**5),       # all five (four of five leave >= 5.8 % of resampled medians <= 0)
    (7, 2 * 8 / 2**7),   # six or seven of seven (six leave 1 %, under the 2.5 % tail)
])
def test_null_winner_rate_against_the_sign_pattern_closed_form(n, closed_form):
    # for odd n, the resampled median's sign is the majority sign of the resample, so whether
    # the 95 % CI excludes 0 depends only on how many of the n differences are positive
    assert M.null_winner_rate(n) == pytest.approx(closed_form, abs=0.05)
