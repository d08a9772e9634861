"""Intervals and paired tests for held-out accuracy: what a comparison of two methods needs.

Every accuracy is reported with a 95% interval and every comparison is paired on the same
problems:

- `accuracy_interval`: Wilson's score interval for a rate (k = 1: one verdict per problem),
  a percentile bootstrap over problems for avg@k (k > 1: each problem's mean over its
  samples, so the problems, not the samples, are the resampled unit);
- `paired_difference`: mean of the per-problem differences a_i - b_i with a paired
  percentile bootstrap interval (problems resampled together for both methods);
- `mcnemar_exact`: the exact (binomial) McNemar test on the problems where exactly one of
  two methods is right, two-sided (k = 1);
- `sign_flip_test`: the paired sign-flip permutation test of the mean per-problem difference
  (k > 1: it tests the avg@k difference that is printed, every sample counted);
- `paired_test`: the test that goes with k, labelled (McNemar for k = 1, sign flips for k > 1);
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


SIGN_FLIP_EXACT_MAX = 16
"""`sign_flip_test` enumerates every sign pattern up to this many non-zero differences (2^16)."""
SIGN_FLIP_RESAMPLES = 100_000
"""Seeded random sign patterns above `SIGN_FLIP_EXACT_MAX` (the p of a Monte Carlo test with R
resamples has a standard error of at most 0.5 / sqrt(R) = 0.0016)."""


def sign_flip_test(a, b, *, n_resamples: int = SIGN_FLIP_RESAMPLES, seed: int = 0,
                   exact_max: int = SIGN_FLIP_EXACT_MAX) -> dict:
    """Two-sided paired sign-flip permutation test of ``mean(a - b) = 0`` over problems.

    ``a``, ``b``: per-problem accuracies (avg@k, each problem's mean over its k samples) in the
    same problem order. Under the null hypothesis each problem's difference d_i = a_i - b_i is
    as likely to have either sign, so the statistic |sum_i d_i| is compared with |sum_i s_i d_i|
    over sign patterns s in {-1, +1}^n. Problems with d_i = 0 change nothing and are left out;
    with m non-zero differences:

    - m <= ``exact_max``: all 2^m patterns (the observed one included): p = #{|S*| >= |S|} / 2^m;
    - else ``n_resamples`` seeded random patterns: p = (1 + #{|S*| >= |S|}) / (1 + n_resamples),
      the +1 counting the observed pattern, so that p is never 0 and the test keeps its level.

    ``p = 1`` when every difference is 0. Returns ``test`` ('sign_flip_exact' or
    'sign_flip_monte_carlo'), ``p``, ``a_better`` and ``b_better`` (problems where a's accuracy
    is above b's, and the reverse), ``n_resamples`` (patterns compared).
    """
    import numpy as np

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"sign_flip_test needs two equal-length non-empty 1-D arrays, got {a.shape} and {b.shape}")
    d = a - b
    d = d[d != 0]
    out = {"a_better": int((d > 0).sum()), "b_better": int((d < 0).sum())}
    if d.size == 0:
        return dict(out, test="sign_flip_exact", p=1.0, n_resamples=1)
    observed = abs(d.sum())
    slack = 1e-9 * np.abs(d).sum()  # equal sums computed in another order count as equal
    if d.size <= exact_max:
        patterns = 1 - 2 * ((np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1)  # [2^m, m] of +-1
        count = int((np.abs(patterns @ d) >= observed - slack).sum())
        return dict(out, test="sign_flip_exact", p=count / 2 ** d.size, n_resamples=2 ** d.size)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    count, done, block = 0, 0, max(1, 2 ** 22 // d.size)  # bounded memory per block
    while done < n_resamples:
        size = min(block, n_resamples - done)
        signs = rng.integers(0, 2, size=(size, d.size), dtype=np.int8) * 2 - 1
        count += int((np.abs(signs @ d) >= observed - slack).sum())
        done += size
    return dict(out, test="sign_flip_monte_carlo", p=(1 + count) / (1 + n_resamples), n_resamples=n_resamples)


def paired_test(a, b, k: int, *, seed: int = 0, n_resamples: int = SIGN_FLIP_RESAMPLES) -> dict:
    """The paired test of two methods' per-problem accuracies ``a``, ``b`` that goes with k
    samples per problem, labelled in ``test``:

    - k = 1 (each accuracy 0 or 1): exact McNemar (`mcnemar_exact`), ``test`` = 'mcnemar_exact';
    - k > 1: the sign-flip permutation test of the mean per-problem difference (`sign_flip_test`),
      which uses all k samples of every problem, the avg@k difference that is printed beside it.

    Returns ``test``, ``p``, ``a_better``, ``b_better`` (problems where a is above b, and the reverse).
    """
    import numpy as np

    if k == 1:
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        if not (np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all()):
            raise ValueError("paired_test with k = 1 needs per-problem accuracies of 0 or 1")
        test = mcnemar_exact(a == 1, b == 1)
        return {"test": "mcnemar_exact", "p": test["p"], "a_better": test["a_only"], "b_better": test["b_only"]}
    out = sign_flip_test(a, b, seed=seed, n_resamples=n_resamples)
    return {key: out[key] for key in ("test", "p", "a_better", "b_better")}
