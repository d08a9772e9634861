"""opsd_kit.evaluation.stats against values computed by hand (closed forms written out here)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from opsd_kit.evaluation.stats import (
    accuracy_interval,
    bootstrap_indices,
    contain,
    mcnemar_exact,
    paired_difference,
    paired_test,
    percentile_interval,
    sign_flip_test,
    wilson_interval,
)

Z95 = 1.959963984540054  # the 97.5% standard normal quantile


def test_wilson_by_hand():
    # 5 of 10: centre 0.5, half-width z sqrt(0.025 + z^2/400) / (1 + z^2/10)
    low, high = wilson_interval(5, 10)
    half = Z95 * math.sqrt(0.025 + Z95 ** 2 / 400) / (1 + Z95 ** 2 / 10)
    assert (low, high) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # the textbook table value
    # 0 of 10: [0, z^2 / (n + z^2)], never empty
    assert wilson_interval(0, 10) == pytest.approx((0.0, Z95 ** 2 / (10 + Z95 ** 2)), abs=1e-12)
    # a wider confidence gives a wider interval
    assert wilson_interval(5, 10, 0.99)[0] < low < wilson_interval(5, 10, 0.5)[0]
    all_low, all_high = wilson_interval(10, 10)
    assert all_high == 1.0 and all_low == pytest.approx(10 / (10 + Z95 ** 2), abs=1e-12)


def test_wilson_ends_at_the_estimate_at_0_and_n_successes():
    """In floating point the Wilson ends miss 0 and 1 by an ulp for many n (n = 20: low 1.4e-17);
    an error bar ``p - low`` is then negative. Every n a benchmark might have, both extremes."""
    for n in range(1, 2001):
        low, high = wilson_interval(0, n)
        assert low == 0.0 and 0.0 < high <= 1.0, n
        low, high = wilson_interval(n, n)
        assert high == 1.0 and 0.0 <= low < 1.0, n
        for successes in (1, n // 2, n - 1):  # inside [0, 1] and around the estimate everywhere else
            low, high = wilson_interval(successes, n)
            assert 0.0 <= low <= successes / n <= high <= 1.0, (successes, n)


def test_contain_clamps_and_widens_to_the_estimate():
    assert contain(1.4e-17, 0.16, 0.0) == (0.0, 0.16)
    assert contain(0.84, 1.0 - 1e-16, 1.0) == (0.84, 1.0)
    assert contain(-0.1, 1.2, 0.5) == (0.0, 1.0)
    assert contain(0.3, 0.4, 0.5) == (0.3, 0.5)  # a bootstrap interval beside its estimate
    assert contain(-1.5, 0.2, -0.5, lowest=-1.0) == (-1.0, 0.2)
    low, high = contain(math.nan, math.nan, 0.5)
    assert math.isnan(low) and math.isnan(high)


def test_bootstrap_intervals_contain_their_estimate():
    # avg@3 values whose resampled means, summed in another order, miss the mean by an ulp
    values = np.array([1, 2, 1, 2, 1]) / 3
    indices = np.array([[0, 1, 2, 4, 3], [0, 1, 3, 2, 4], [0, 1, 3, 4, 2]])  # permutations: same mean
    assert (values[indices].mean(axis=1) < values.mean()).all()
    low, high = accuracy_interval(values, 3, indices=indices)
    assert low <= values.mean() <= high
    out = paired_difference(values, np.zeros(5), indices)
    assert out["ci_low"] <= out["diff"] <= out["ci_high"]
    assert accuracy_interval(np.zeros(5), 4, indices=bootstrap_indices(5, 20)) == (0.0, 0.0)
    assert accuracy_interval(np.ones(5), 4, indices=bootstrap_indices(5, 20)) == (1.0, 1.0)


def test_wilson_rejects_impossible_counts():
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="n >= 1"):
        wilson_interval(0, 0)


def test_mcnemar_exact_by_hand():
    # a right alone on 1 problem, b right alone on 9: p = 2 * (C(10,0) + C(10,1)) / 2^10
    a = [True] * 1 + [False] * 9 + [True] * 5 + [False] * 3
    b = [False] * 1 + [True] * 9 + [True] * 5 + [False] * 3
    out = mcnemar_exact(a, b)
    assert (out["a_only"], out["b_only"]) == (1, 9)
    assert out["p"] == pytest.approx(2 * 11 / 1024, abs=1e-15)
    # 0 vs 5 discordant: 2 / 2^5
    assert mcnemar_exact([False] * 5, [True] * 5)["p"] == pytest.approx(2 / 32)
    # symmetric, and 1 when the discordant counts are equal or absent
    assert mcnemar_exact(b, a)["p"] == out["p"]
    assert mcnemar_exact([True, False], [False, True])["p"] == 1.0
    assert mcnemar_exact([True, True], [True, True])["p"] == 1.0
    with pytest.raises(ValueError, match="equal-length"):
        mcnemar_exact([True], [True, False])


def test_sign_flip_exact_by_hand():
    # d = (0.5, 0.25, -0.25, 0): the 0 is left out; of the 8 sign patterns of (0.5, 0.25, -0.25),
    # sums +-1.0 (2), +-0.5 (4) and 0 (2): 6 reach |0.5|, p = 6/8
    out = sign_flip_test([0.75, 0.5, 0.25, 0.5], [0.25, 0.25, 0.5, 0.5])
    assert out == {"test": "sign_flip_exact", "p": 0.75, "a_better": 2, "b_better": 1, "n_resamples": 8}
    # five equal positive differences: only all-plus and all-minus reach |5/3|, p = 2/32
    assert sign_flip_test([1 / 3] * 5, [0.0] * 5)["p"] == pytest.approx(2 / 32)
    assert sign_flip_test([0.5, 0.5], [0.5, 0.5]) == {"test": "sign_flip_exact", "p": 1.0, "a_better": 0,
                                                      "b_better": 0, "n_resamples": 1}
    assert sign_flip_test([0.2, 0.9], [0.7, 0.1])["p"] == sign_flip_test([0.7, 0.1], [0.2, 0.9])["p"]  # symmetric
    with pytest.raises(ValueError, match="equal-length"):
        sign_flip_test([0.5], [0.5, 0.5])


def test_sign_flip_on_verdicts_is_mcnemar():
    """With 0/1 accuracies the differences are +-1 and |sum| >= |a_only - b_only| is McNemar's tail."""
    rng = np.random.default_rng(1)
    for _ in range(5):
        a, b = rng.integers(0, 2, 15), rng.integers(0, 2, 15)
        assert sign_flip_test(a, b)["p"] == pytest.approx(mcnemar_exact(a, b)["p"])


def test_sign_flip_monte_carlo_has_the_plus_one_correction_and_is_seeded():
    # six equal differences, forced onto the Monte Carlo path: the exact p is 2/64
    a, b = [0.5] * 6, [0.0] * 6
    out = sign_flip_test(a, b, exact_max=5, n_resamples=20_000, seed=3)
    assert out["test"] == "sign_flip_monte_carlo" and out["n_resamples"] == 20_000
    assert out == sign_flip_test(a, b, exact_max=5, n_resamples=20_000, seed=3)  # seeded
    count = out["p"] * 20_001 - 1  # p = (1 + count) / (1 + R)
    assert count == pytest.approx(round(count))
    # count ~ Binomial(R, 1/32): within 6 standard deviations of R/32
    sd = (20_000 * (1 / 32) * (31 / 32)) ** 0.5
    assert abs(count - 20_000 / 32) < 6 * sd
    # a difference no pattern but the observed one reaches (m = 30): p = 1 / (1 + R) at most 2 / (1 + R)
    tiny = sign_flip_test([1.0] * 30, [0.0] * 30, n_resamples=999, seed=0)
    assert tiny["p"] == pytest.approx(1 / 1000)


def test_paired_test_picks_mcnemar_for_k1_and_sign_flips_for_more():
    a, b = [1, 1, 1, 0], [0, 0, 1, 0]
    assert paired_test(a, b, 1) == {"test": "mcnemar_exact", "p": mcnemar_exact(a, b)["p"], "a_better": 2,
                                    "b_better": 0}
    out = paired_test([0.75, 0.5, 0.25, 0.5], [0.25, 0.25, 0.5, 0.5], 4)
    assert out == {"test": "sign_flip_exact", "p": 0.75, "a_better": 2, "b_better": 1}
    with pytest.raises(ValueError, match="0 or 1"):
        paired_test([0.5], [0.0], 1)


def test_paired_difference_by_hand():
    a = np.array([1.0, 1.0, 0.0, 1.0])
    b = np.array([0.0, 1.0, 0.0, 0.0])
    # resamples written out: the differences are [1, 0, 0, 1]
    indices = np.array([[0, 0, 0, 0], [1, 2, 1, 2], [0, 1, 2, 3], [0, 3, 1, 1]])  # means 1, 0, 0.5, 0.5
    out = paired_difference(a, b, indices, confidence=0.5)  # the 25th and 75th percentiles
    assert out["diff"] == 0.5
    means = [1, 0, 0.5, 0.5]
    assert (out["ci_low"], out["ci_high"]) == (np.percentile(means, 25), np.percentile(means, 75))
    # pairing matters: the same marginals shuffled give another interval
    unpaired = paired_difference(a, b[[1, 0, 2, 3]], indices, confidence=0.5)
    assert unpaired["diff"] == out["diff"]
    assert (unpaired["ci_low"], unpaired["ci_high"]) != (out["ci_low"], out["ci_high"])


def test_accuracy_interval_picks_wilson_for_k1_and_bootstrap_for_avg_at_k():
    verdicts = np.array([1.0] * 3 + [0.0] * 7)
    assert accuracy_interval(verdicts, 1) == wilson_interval(3, 10)
    with pytest.raises(ValueError, match="0 or 1"):
        accuracy_interval(np.array([0.5, 1.0]), 1)
    per_problem = np.array([0.5, 1.0, 0.0, 0.25])
    indices = np.array([[0, 1, 2, 3], [1, 1, 1, 1], [2, 2, 2, 2]])  # means 0.4375, 1, 0
    assert accuracy_interval(per_problem, 4, indices=indices, confidence=0.5) == percentile_interval(
        [0.4375, 1.0, 0.0], 0.5)
    with pytest.raises(ValueError, match="bootstrap indices"):
        accuracy_interval(per_problem, 4)


def test_bootstrap_indices_are_seeded_and_in_range():
    a, b = bootstrap_indices(7, 50, seed=3), bootstrap_indices(7, 50, seed=3)
    assert a.shape == (50, 7) and (a == b).all() and a.min() >= 0 and a.max() <= 6
    assert not (bootstrap_indices(7, 50, seed=4) == a).all()


def test_bootstrap_interval_covers_the_truth_about_95_percent_of_the_time():
    """Coverage check of the percentile bootstrap on avg@k-like data (a known mean)."""
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(200):
        values = rng.binomial(4, 0.3, size=150) / 4  # per-problem avg@4, true mean 0.3
        low, high = accuracy_interval(values, 4, indices=bootstrap_indices(150, 400, seed=trial))
        covered += low <= 0.3 <= high
    assert 0.88 <= covered / 200 <= 0.99
