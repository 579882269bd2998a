"""The interval and test math of sandbox/stats.py against values worked out by hand."""

import math

import pytest

from sandbox.stats import mean_interval, t_quantile, verdict, welch


def test_t_quantiles_match_closed_forms():
    # df = 1 is the Cauchy distribution: P(|T| > t) = 1 - 2 atan(t) / pi, so t(0.975) = tan(0.475 pi).
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-9)
    # df = 2: P(|T| > t) = 1 - t / sqrt(t^2 + 2); setting it to 0.05 gives t^2 = 1.805 / 0.0975.
    assert t_quantile(0.975, 2) == pytest.approx(math.sqrt(1.805 / 0.0975), rel=1e-9)


def test_mean_interval_by_hand():
    # [1, 2, 3]: mean 2, s = 1, n = 3, half-width t(0.975, 2) / sqrt(3).
    result = mean_interval([1.0, 2.0, 3.0])
    assert (result.mean, result.std, result.n) == (2.0, 1.0, 3)
    assert result.half_width == pytest.approx(math.sqrt(1.805 / 0.0975) / math.sqrt(3), rel=1e-9)
    assert (result.low, result.high) == pytest.approx((2 - result.half_width, 2 + result.half_width))
    single = mean_interval([0.7])
    assert single.mean == 0.7 and math.isnan(single.half_width)


def test_welch_by_hand():
    # a = [1, 2, 3], b = [3, 4, 5]: d = 2, s_a^2 / n = s_b^2 / n = 1/3, se = sqrt(2/3), t = sqrt(6), and
    # Welch's df = (2/3)^2 / (2 (1/3)^2 / 2) = 4. For df = 4 the t CDF has the closed form
    # F(t) = 1/2 + 3/8 x (1 - x^2 / 12 ... ) with x = t / sqrt(1 + t^2/4): here x = sqrt(6 / 2.5),
    # t^2 / (1 + t^2 / 4) = 2.4, so F = 1/2 + 3/8 sqrt(2.4) (1 - 2.4 / 12) and p = 2 (1 - F).
    result = welch([1.0, 2.0, 3.0], [3.0, 4.0, 5.0])
    assert result.difference == 2.0
    assert result.t == pytest.approx(math.sqrt(6), rel=1e-12)
    assert result.df == pytest.approx(4.0, rel=1e-12)
    cdf = 0.5 + 3 / 8 * math.sqrt(2.4) * (1 - 2.4 / 12)
    assert result.p_value == pytest.approx(2 * (1 - cdf), rel=1e-9)
    # t(0.975, 4) = 2.7764451 (tables); interval 2 +- 2.7764451 sqrt(2/3), which contains 0.
    assert result.low == pytest.approx(2 - 2.7764451 * math.sqrt(2 / 3), rel=1e-6)
    assert result.high == pytest.approx(2 + 2.7764451 * math.sqrt(2 / 3), rel=1e-6)


def test_welch_constant_samples_and_too_few():
    exact = welch([1.0, 1.0], [0.5, 0.5])
    assert (exact.difference, exact.low, exact.high, exact.p_value) == (-0.5, -0.5, -0.5, 0.0)
    assert welch([0.5, 0.5], [0.5, 0.5]).p_value == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        welch([1.0], [1.0, 2.0])


def test_verdicts():
    unclear = welch([1.0, 2.0, 3.0], [3.0, 4.0, 5.0])        # p = 0.07
    assert verdict("gated_delta", "momentum_delta", unclear) == \
        "momentum_delta and gated_delta not distinguishable with 3 and 3 seeds"
    clear = welch([1.0, 2.0, 3.0], [6.0, 7.0, 8.0])
    assert verdict("a", "b", clear) == "b better than a"
    assert verdict("a", "b", clear, higher_is_better=False) == "a better than b"   # e.g. bits per character
