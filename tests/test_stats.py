"""Tests of wspace.stats: the t interval against scipy.stats.ttest_1samp, Holm against its
step-down procedure and hand-computed values, the crossed bootstrap against the standard
error of each axis alone (closed form), the per-example bit packing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from wspace import stats


def test_paired_t_matches_scipy_ttest_1samp_and_the_closed_form():
    d = np.random.default_rng(1).normal(0.01, 0.02, 10)
    ci, p = stats.paired_t(d.tolist(), -0.03)
    ref = scipy_stats.ttest_1samp(d, -0.03)
    np.testing.assert_allclose(p, ref.pvalue, rtol=1e-12)
    half = scipy_stats.t.ppf(0.975, 9) * d.std(ddof=1) / math.sqrt(10)
    np.testing.assert_allclose(ci, [d.mean() - half, d.mean() + half], rtol=1e-12)
    assert stats.paired_t([0.3], 0.0) == ([-math.inf, math.inf], 1.0)  # one seed: no test
    assert stats.paired_t([0.2, 0.2, 0.2], 0.0) == ([0.2, 0.2], 0.0)  # no spread: the limit
    assert stats.paired_t([0.2, 0.2], 0.2) == ([0.2, 0.2], 1.0)
    with pytest.raises(ValueError, match=r"1-D differences .* shape \(2, 3\)"):
        stats.paired_t(np.zeros((2, 3)), 0.0)


def test_mean_ci_is_the_t_interval_over_any_seed_axis():
    values = np.random.default_rng(0).normal(size=(6, 4))
    mean, half = stats.mean_ci(values)
    ci = scipy_stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
    np.testing.assert_allclose(mean - half, ci.low, rtol=1e-10)
    np.testing.assert_allclose(mean + half, ci.high, rtol=1e-10)
    mean_t, half_t = stats.mean_ci(values.T, axis=1)
    np.testing.assert_array_equal(mean_t, mean)
    np.testing.assert_array_equal(half_t, half)
    one_mean, one_half = stats.mean_ci(values[:, 0])  # 1-D: floats
    assert isinstance(one_half, float) and one_half == half[0] and one_mean == mean[0]
    _, no_half = stats.mean_ci([0.5])
    assert math.isnan(no_half)  # one seed: no interval


@pytest.mark.parametrize(
    "p,expected",
    [
        ([0.01, 0.04, 0.03, 0.005], [0.03, 0.06, 0.06, 0.02]),  # sorted x 4, 3, 2, 1, running max
        ([0.5, 0.001], [0.5, 0.002]),
        ([0.6, 0.7], [1.0, 1.0]),  # capped at one
        ([0.02, 0.02, 0.02], [0.06, 0.06, 0.06]),  # ties
    ],
)
def test_holm_matches_hand_computed_values(p, expected):
    np.testing.assert_allclose(stats.holm(p), expected, rtol=1e-12)


def test_holm_rejects_what_holms_step_down_procedure_rejects():
    """Holm 1979: reject H_(1), ..., H_(k-1), k the first with p_(k) > alpha / (m - k + 1)."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = rng.uniform(0, 0.1, rng.integers(1, 9)) ** rng.uniform(0.5, 2)
        for alpha in (0.01, 0.05, 0.1):
            order = np.argsort(p)
            rejected = set()
            for k, i in enumerate(order):
                if p[i] > alpha / (len(p) - k):
                    break
                rejected.add(int(i))
            adjusted = np.array(stats.holm(p.tolist()))
            assert set(np.flatnonzero(adjusted <= alpha).tolist()) == rejected
    assert stats.holm([]) == []
    with pytest.raises(ValueError, match=r"p-values in \[0, 1\], got \[0.5, 1.5\]"):
        stats.holm([0.5, 1.5])
    with pytest.raises(ValueError, match="p-values in"):
        stats.holm([0.5, math.nan])


def test_pack_correct_round_trips_in_an_eighth_of_the_bytes():
    bits = np.random.default_rng(0).random(1003) < 0.5
    packed = stats.pack_correct(bits)
    np.testing.assert_array_equal(stats.unpack_correct(json.loads(json.dumps(packed))), bits)
    assert packed["n"] == 1003 and len(packed["bits"]) <= 4 * (126 + 2) // 3 + 4
    with pytest.raises(ValueError, match="1-D bool array"):
        stats.pack_correct(np.ones(4))


def test_crossed_bootstrap_over_examples_matches_the_binomial_standard_error():
    """One seed: resampling examples alone gives sd(d) / sqrt(N) (closed form)."""
    rng = np.random.default_rng(0)
    n, d = 2000, rng.choice([-1, 0, 0, 0, 1, 1], 2000)
    ex = {"n": n, "wins": [np.flatnonzero(d == 1).tolist()]}
    ex["losses"] = [np.flatnonzero(d == -1).tolist()]
    (lo, hi), p = stats.crossed_bootstrap(ex, 0.0)
    half = 1.96 * d.std() / np.sqrt(n)
    np.testing.assert_allclose([lo, hi], [d.mean() - half, d.mean() + half], atol=0.15 * half)
    assert stats.crossed_bootstrap(ex, 0.0) == ([lo, hi], p)  # fixed seed: bit-exact
    none = {"n": 50, "wins": [[], []], "losses": [[], []]}
    assert stats.crossed_bootstrap(none, 0.0) == ([0.0, 0.0], 1.0)


def test_crossed_bootstrap_over_seeds_matches_the_standard_error_of_the_seed_mean():
    """Each seed wins on all examples or on none: only seeds vary, sd(c) / sqrt(S)."""
    seeds, n = 400, 30
    c = np.random.default_rng(1).random(seeds) < 0.3
    ex = {"n": n, "wins": [list(range(n)) if w else [] for w in c], "losses": [[]] * seeds}
    (lo, hi), p = stats.crossed_bootstrap(ex, 0.0)
    half = 1.96 * c.std() / np.sqrt(seeds)
    np.testing.assert_allclose([lo, hi], [c.mean() - half, c.mean() + half], atol=0.1 * half)
    assert p == 2 / (stats.BOOTSTRAP_SAMPLES + 1)  # no replicate reaches 0: the smallest p


@pytest.mark.parametrize(
    "examples,match",
    [
        ({"n": 5, "wins": [], "losses": []}, "same seeds"),
        ({"n": 5, "wins": [[1]], "losses": [[], []]}, "got 1 and 2"),
        ({"n": 5, "wins": [[1, 5]], "losses": [[]]}, r"n=5 examples, indices \[1\]..\[5\]"),
        ({"n": 0, "wins": [[]], "losses": [[]]}, "n=0 examples"),
    ],
)
def test_crossed_bootstrap_refuses_inconsistent_examples(examples, match):
    with pytest.raises(ValueError, match=match):
        stats.crossed_bootstrap(examples, 0.0)
