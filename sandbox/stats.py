"""Statistics over seeds: a mean with its confidence interval, and Welch's test for a difference of two means.

An ablation runs each configuration with a handful of seeds, so the numbers a reader acts on need the
small-sample (Student t) versions, not normal approximations:

    interval of a mean        mean +- t(0.975, n - 1) * s / sqrt(n)
    difference of two means   d = mean_b - mean_a,  se = sqrt(s_a^2 / n_a + s_b^2 / n_b)
    Welch's t test            t = d / se with Welch-Satterthwaite degrees of freedom
                              df = se^4 / ((s_a^2 / n_a)^2 / (n_a - 1) + (s_b^2 / n_b)^2 / (n_b - 1))
                              interval d +- t(0.975, df) * se, two-sided p = 2 P(T_df > |t|)

Welch's test does not assume equal variances, which matters here: a rule that solves a task on every seed
has a spread near zero, one that fails on some seeds a spread near 0.5. The Student t distribution is
computed from the regularised incomplete beta function (a continued fraction), so this module needs only
the standard library.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True)
class MeanInterval:
    """The mean of n values, their sample standard deviation and the half-width of the confidence interval."""

    mean: float
    std: float
    half_width: float   # NaN with fewer than 2 values: one seed says nothing about the spread
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


@dataclass(frozen=True)
class Difference:
    """``b - a`` for two samples, its confidence interval and Welch's two-sided test."""

    difference: float
    low: float
    high: float
    t: float
    df: float
    p_value: float
    n_a: int
    n_b: int


def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        # Even step, then odd step, of the fraction's coefficients.
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return result


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    # The fraction converges fast for x < (a + 1) / (a + b + 2); otherwise use I_x(a, b) = 1 - I_{1-x}(b, a).
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _incomplete_beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _incomplete_beta_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom (df may be fractional, as in Welch's test)."""
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(probability: float, df: float) -> float:
    """The ``probability`` quantile of Student's t (0.5 < probability < 1), by bisection on the tail."""
    if not 0.5 < probability < 1.0:
        raise ValueError(f"probability: expected a number in (0.5, 1), got {probability}")
    tail = 2.0 * (1.0 - probability)   # the two-sided tail mass beyond the quantile
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > tail:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_two_sided_p(middle, df) > tail:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def mean_interval(values: list[float], confidence: float = CONFIDENCE) -> MeanInterval:
    """Mean, sample standard deviation and the Student t confidence interval of the mean."""
    if not values:
        raise ValueError("values: expected at least one value")
    n, mean = len(values), statistics.fmean(values)
    if n < 2:
        return MeanInterval(mean, 0.0, math.nan, n)
    std = statistics.stdev(values)
    return MeanInterval(mean, std, t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n), n)


def welch(a: list[float], b: list[float], confidence: float = CONFIDENCE) -> Difference:
    """``mean(b) - mean(a)`` with its Welch confidence interval and two-sided p-value (2+ values each)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"welch: expected at least 2 values in each sample, got {len(a)} and {len(b)}")
    difference = statistics.fmean(b) - statistics.fmean(a)
    var_a, var_b = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se_sq = var_a + var_b
    if se_sq == 0.0:
        # Both samples constant: the difference is exact (seeds agree to every digit).
        p_value = 1.0 if difference == 0.0 else 0.0
        t = 0.0 if difference == 0.0 else math.copysign(math.inf, difference)
        return Difference(difference, difference, difference, t, math.inf, p_value, len(a), len(b))
    se = math.sqrt(se_sq)
    df = se_sq ** 2 / (var_a ** 2 / (len(a) - 1) + var_b ** 2 / (len(b) - 1))
    t = difference / se
    half_width = t_quantile(0.5 + confidence / 2, df) * se
    return Difference(difference, difference - half_width, difference + half_width, t, df,
                      t_two_sided_p(t, df), len(a), len(b))


def verdict(name_a: str, name_b: str, result: Difference, higher_is_better: bool = True,
            alpha: float = 1 - CONFIDENCE) -> str:
    """Plain words for a comparison: which is better, or that the seeds cannot tell them apart."""
    if result.p_value >= alpha:
        return f"{name_b} and {name_a} not distinguishable with {result.n_b} and {result.n_a} seeds"
    b_better = (result.difference > 0) == higher_is_better
    better, worse = (name_b, name_a) if b_better else (name_a, name_b)
    return f"{better} better than {worse}"
