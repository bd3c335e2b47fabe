"""Statistics of `harness report` (harness.report.stats) against textbook values."""
from __future__ import annotations

import math

import numpy as np
import pytest

from harness.report import stats

# Student (1908), "The probable error of a mean", the classic paired example (R's `sleep`
# data set): extra hours of sleep of 10 patients under two drugs.
DRUG1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
DRUG2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
DIFFS = [1.2, 2.4, 1.3, 1.3, 0.0, 1.0, 1.8, 0.8, 4.6, 1.4]


def test_student_sleep_data_paired_t():
    p = stats.paired_stats(DRUG2, DRUG1)
    assert np.allclose(p.diffs, DIFFS)
    assert p.n == 10 and p.df == 9
    assert p.mean == pytest.approx(1.58)
    assert p.std == pytest.approx(1.229995, abs=1e-6)
    assert p.t == pytest.approx(4.062, abs=5e-4)
    assert p.p == pytest.approx(0.00283, abs=5e-6)
    assert p.ci_t == pytest.approx((0.700, 2.460), abs=5e-4)
    assert p.significant and p.note == ""
    # the other direction: same p, mirrored interval
    q = stats.paired_stats(DRUG1, DRUG2)
    assert q.p == pytest.approx(p.p) and q.ci_t == pytest.approx((-2.460, -0.700), abs=5e-4)


def test_paired_bootstrap_is_seeded_and_resamples_pairs():
    from scipy import stats as sst

    p = stats.paired_stats(DRUG2, DRUG1)
    again = stats.paired_stats(DRUG2, DRUG1)
    assert p.ci_boot == again.ci_boot                       # fixed seed: reproducible
    lo, hi = p.ci_boot
    assert lo < p.mean < hi
    # resampling pairs == resampling the per-pair differences with the same generator
    ref = sst.bootstrap((np.subtract(DRUG2, DRUG1),), np.mean, n_resamples=stats.N_BOOT,
                        method="BCa", rng=np.random.default_rng(stats.BOOT_SEED))
    assert (lo, hi) == pytest.approx((ref.confidence_interval.low,
                                      ref.confidence_interval.high))
    # a different seed gives a (slightly) different interval
    other = stats.paired_stats(DRUG2, DRUG1, seed=1)
    assert other.ci_boot != p.ci_boot


def test_bootstrap_only_from_five_pairs():
    x = [75.0, 77.0, 71.0, 74.0, 76.0]
    y = [70.0, 73.0, 69.0, 71.0, 70.0]
    assert stats.paired_stats(x[:4], y[:4]).ci_boot is None
    five = stats.paired_stats(x, y)
    assert five.ci_boot is not None and five.ci_t is not None


def test_small_n_has_no_test():
    p = stats.paired_stats([37.0, 38.0], [34.0, 31.0])
    assert (p.n, p.mean) == (2, 5.0)
    assert p.std == pytest.approx(math.sqrt(8))
    assert p.p is None and p.ci_t is None and p.ci_boot is None
    assert p.note == "n too small" and not p.significant
    one = stats.paired_stats([1.0], [0.0])
    assert one.n == 1 and math.isnan(one.std) and one.note == "n too small"
    assert stats.paired_stats([float("nan")], [1.0]) is None
    # pairs with a missing value are dropped, not shifted
    p = stats.paired_stats([1.0, float("nan"), 3.0, 5.0], [0.0, 9.0, 1.0, 2.0])
    assert p.n == 3 and p.diffs == (1.0, 2.0, 3.0)


def test_zero_spread_is_not_called_significant():
    p = stats.paired_stats([75.0, 77.0, 72.0], [70.0, 72.0, 67.0])  # +5 on every seed
    assert p.mean == pytest.approx(5.0) and p.n == 3
    assert p.p is None and p.note == "zero spread" and not p.significant


def test_holm_by_hand():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, max(0.04*1, 0.06) = 0.06
    got = stats.holm([0.01, 0.04, 0.03, 0.005])
    assert got == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.2, None, 0.8]) == pytest.approx([0.4, None, 0.8])
    assert stats.holm([0.6, 0.7]) == [1.0, 1.0]
    assert stats.holm([]) == []


def test_summary_and_formatting():
    s = stats.summary([90.0, 91.0, float("nan"), None])
    assert s.n == 2 and s.mean == 90.5 and s.std == pytest.approx(math.sqrt(0.5))
    assert stats.summary([]) is None
    assert stats.fmt_p(0.00283) == "0.003" and stats.fmt_p(0.0004) == "< 0.001"
    assert stats.fmt_p(None, "n too small") == "n too small"
    assert stats.fmt_ci((0.7001, 2.4599)) == "[+0.70, +2.46]"


def test_paired_stats_many_equals_one_by_one():
    rng = np.random.default_rng(3)
    x = rng.normal(80, 2, size=(7, 6))
    y = x - rng.normal(1, 1, size=(7, 6))
    x[2, 1] = np.nan                        # a row with other pairs
    y[3] = x[3] - 0.5                       # zero spread
    x[4, 3:] = np.nan                       # 3 pairs: no bootstrap
    x[5, 2:] = np.nan                       # 2 pairs: n too small
    many = stats.paired_stats_many(x, y)
    for i in range(x.shape[0]):
        one = stats.paired_stats(x[i], y[i])
        got = many[i]
        assert (got.n, got.note, got.diffs) == (one.n, one.note, one.diffs)
        for f in ("mean", "std", "p", "t", "df"):
            a, b = getattr(got, f), getattr(one, f)
            assert (a is None and b is None) or a == pytest.approx(b, rel=1e-12, nan_ok=True)
        for f in ("ci_t", "ci_boot"):
            a, b = getattr(got, f), getattr(one, f)
            assert (a is None and b is None) or a == pytest.approx(b, rel=1e-10)
    assert many[0].ci_boot is not None and many[4].ci_boot is None
    assert many[3].note == "zero spread" and many[5].note == "n too small"
    assert stats.paired_stats_many(np.full((1, 3), np.nan), np.ones((1, 3))) == [None]
