"""Intervals and paired tests for held-out accuracy: what a comparison of two methods needs.

Every accuracy is reported with a 95% interval and every comparison is paired on the same
problems:

- `accuracy_interval`: Wilson's score interval for a rate (k = 1: one verdict per problem),
  a percentile bootstrap over problems for avg@k (k > 1: each problem's mean over its
  samples, so the problems, not the samples, are the resampled unit);
- `paired_difference`: mean of the per-problem differences a_i - b_i with a paired
  percentile bootstrap interval (problems resampled together for both methods);
- `mcnemar_exact`: the exact (binomial) McNemar test on the problems where exactly one of
  two methods is right, two-sided;
- `bootstrap_indices`: the resampled problem indices, shared by every statistic of one
  study so that intervals of derived numbers (ratios) come from the same resamples.
- `contain`: an interval's ends clamped to its range and to contain its estimate.

numpy only; nothing here knows about models.
"""
from __future__ import annotations

import math
from statistics import NormalDist


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial rate ``successes / n``.

    ``p +- z sqrt(p(1-p)/n + z^2/4n^2)`` recentred at ``(p + z^2/2n) / (1 + z^2/n)``; unlike
    the normal interval it stays inside [0, 1] and is not empty at 0 or n successes. In exact
    arithmetic the low end is 0 at 0 successes and the high end 1 at n; in floating point they
    miss by an ulp either way, so the ends are clamped to [0, 1] and to contain ``p``
    (`contain`).
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs n >= 1 and 0 <= successes <= n, got {successes}/{n}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return contain(centre - half, centre + half, p)


def contain(low: float, high: float, estimate: float, lowest: float = 0.0, highest: float = 1.0) -> tuple[float, float]:
    """``(low, high)`` clamped to ``[lowest, highest]`` and widened to contain ``estimate``.

    An interval's ends computed in floating point (Wilson's at 0 or n successes) or from
    resamples (a bootstrap's percentiles, whose means are summed in another order than the
    estimate's) can miss the estimate by an ulp, which makes an error bar ``estimate - low``
    negative. NaN ends (no defined resample) stay NaN.
    """
    if not math.isnan(low):
        low = min(max(low, lowest), estimate)
    if not math.isnan(high):
        high = max(min(high, highest), estimate)
    return float(low), float(high)


def bootstrap_indices(n: int, n_bootstrap: int, seed: int = 0):
    """``[n_bootstrap, n]`` problem indices drawn with replacement (numpy int array)."""
    import numpy as np

    if n < 1 or n_bootstrap < 1:
        raise ValueError(f"bootstrap_indices needs n >= 1 and n_bootstrap >= 1, got {n}, {n_bootstrap}")
    return np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))


def percentile_interval(samples, confidence: float = 0.95) -> tuple[float, float]:
    """The central ``confidence`` range of bootstrap ``samples`` (NaNs ignored)."""
    import numpy as np

    samples = np.asarray(samples, dtype=float)
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return math.nan, math.nan
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def accuracy_interval(per_problem, k: int, *, confidence: float = 0.95, indices=None) -> tuple[float, float]:
    """Interval for a held-out accuracy from each problem's fraction correct over its k samples.

    k = 1: Wilson's interval on the count of correct problems. k > 1: the percentile
    bootstrap of the mean over problems, on ``indices`` (see `bootstrap_indices`). Either lies
    in [0, 1] and contains the mean accuracy (`contain`).
    """
    import numpy as np

    values = np.asarray(per_problem, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("accuracy_interval needs a non-empty 1-D array of per-problem accuracies")
    if k == 1:
        if not np.isin(values, (0.0, 1.0)).all():
            raise ValueError("with k = 1 every per-problem accuracy must be 0 or 1")
        return wilson_interval(int(values.sum()), values.size, confidence)
    if indices is None:
        raise ValueError("accuracy_interval with k > 1 needs bootstrap indices")
    return contain(*percentile_interval(values[indices].mean(axis=1), confidence), float(values.mean()))


def paired_difference(a, b, indices, confidence: float = 0.95) -> dict:
    """``mean(a) - mean(b)`` over the same problems, with its paired bootstrap interval.

    ``a`` and ``b`` are per-problem accuracies in the same problem order; ``indices`` resample
    the problems (each resample keeps the pairs together). Returns ``diff``, ``ci_low``,
    ``ci_high``; the interval lies in [-1, 1] and contains ``diff`` (`contain`).
    """
    import numpy as np

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_difference needs two equal-length 1-D arrays, got {a.shape} and {b.shape}")
    d = a - b
    diff = float(d.mean())
    low, high = contain(*percentile_interval(d[indices].mean(axis=1), confidence), diff, lowest=-1.0)
    return {"diff": diff, "ci_low": low, "ci_high": high}


def mcnemar_exact(a_correct, b_correct) -> dict:
    """Exact two-sided McNemar test of two methods' verdicts on the same problems.

    Only discordant problems count: ``a_only`` (a right, b wrong) and ``b_only``. Under the
    null hypothesis each discordant problem is a fair coin, so
    ``p = min(1, 2 * P(X <= min(a_only, b_only)))`` with ``X ~ Binomial(a_only + b_only, 1/2)``;
    ``p = 1`` when there is no discordant problem.
    """
    a = [bool(x) for x in a_correct]
    b = [bool(x) for x in b_correct]
    if len(a) != len(b) or not a:
        raise ValueError(f"mcnemar_exact needs two equal-length non-empty verdict lists, got {len(a)} and {len(b)}")
    a_only = sum(x and not y for x, y in zip(a, b))
    b_only = sum(y and not x for x, y in zip(a, b))
    n = a_only + b_only
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2 ** n if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "p": min(1.0, 2 * tail) if n else 1.0}
