"""Statistics of the report: per-cell summaries and paired NQ − QCFS tests.

All tests and intervals come from :mod:`scipy.stats`; only the Holm step-down
adjustment (a sort and a running maximum) is written out here.

- :func:`summary`       mean, sample std (ddof = 1) and n of one cell
- :func:`paired_stats`  paired differences x − y: mean, std, n, the t-based CI and
  p-value of the paired t-test (``scipy.stats.ttest_rel``) when n ≥ 3, and a
  paired bootstrap CI (``scipy.stats.bootstrap``, BCa, fixed seed) when n ≥ 5
- :func:`paired_stats_many`  the same for many cells at once (one scipy call per set
  of cells with the same pairs)
- :func:`holm`          Holm-adjusted p-values of one family of tests
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

import numpy as np

__all__ = ["Stat", "Paired", "summary", "paired_stats", "paired_stats_many", "holm", "fmt_p",
           "fmt_ci",
           "CONFIDENCE", "MIN_N_TEST", "MIN_N_BOOT", "N_BOOT", "BOOT_SEED"]

CONFIDENCE = 0.95
MIN_N_TEST = 3      # below this no CI and no p-value: "n too small"
MIN_N_BOOT = 5      # bootstrap CI from this many pairs on
N_BOOT = 9999       # bootstrap resamples
BOOT_SEED = 0       # fixed: the report is reproducible
N_TOO_SMALL = "n too small"
ZERO_SPREAD = "zero spread"


class Stat(NamedTuple):
    mean: float
    std: float      # nan when n == 1
    n: int


def _clean(values: Iterable) -> np.ndarray:
    if isinstance(values, np.ndarray) or hasattr(values, "dtype"):   # array or Series
        try:
            arr = np.asarray(values, dtype=float)
        except (TypeError, ValueError):
            arr = None
        if arr is not None:
            return arr[np.isfinite(arr)]
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if np.isfinite(f):
            out.append(f)
    return np.asarray(out, dtype=float)


def summary(values: Iterable) -> Stat | None:
    """Mean, sample std (ddof = 1, nan for n = 1) and n of the finite values; None if none."""
    vals = _clean(values)
    if vals.size == 0:
        return None
    std = float(np.std(vals, ddof=1)) if vals.size > 1 else float("nan")
    return Stat(float(np.mean(vals)), std, int(vals.size))


@dataclass(frozen=True)
class Paired:
    """Paired differences x − y of one table cell."""
    mean: float
    std: float                              # sample std of the differences (nan for n = 1)
    n: int                                  # number of pairs
    ci_t: tuple[float, float] | None = None     # t-based CI of the mean difference (n ≥ 3)
    ci_boot: tuple[float, float] | None = None  # paired bootstrap CI (n ≥ 5)
    p: float | None = None                  # two-sided paired t-test (n ≥ 3)
    t: float | None = None
    df: int | None = None
    note: str = ""                          # why p is missing: "n too small" / "zero spread"
    p_holm: float | None = None             # set by the caller for a family of cells
    diffs: tuple[float, ...] = ()

    @property
    def significant(self) -> bool:
        """The t-based CI excludes 0 (equivalently p < 1 − confidence, unadjusted)."""
        return self.ci_t is not None and (self.ci_t[0] > 0 or self.ci_t[1] < 0)

    @property
    def significant_holm(self) -> bool:
        return self.p_holm is not None and self.p_holm < 1 - CONFIDENCE


def paired_stats(x: Sequence[float], y: Sequence[float], *, confidence: float = CONFIDENCE,
                 n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> Paired | None:
    """Statistics of the paired differences ``x[i] − y[i]`` (pairs with a NaN are dropped).

    n < 3: mean, std and n only (``note = "n too small"``).  n ≥ 3: the paired
    t-test (``scipy.stats.ttest_rel``), its p-value and the t-based CI of the mean
    difference.  n ≥ 5: also a bootstrap CI (``scipy.stats.bootstrap``, BCa,
    ``n_boot`` resamples of the pairs, ``rng`` seeded with ``seed``).  Differences
    with no spread (all equal) have no t statistic: ``note = "zero spread"``.
    """
    from scipy import stats

    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xa.shape != ya.shape:
        raise ValueError(f"paired samples differ in length: {xa.shape} vs {ya.shape}")
    keep = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[keep], ya[keep]
    n = int(xa.size)
    if n == 0:
        return None
    d = xa - ya
    mean = float(np.mean(d))
    std = float(np.std(d, ddof=1)) if n > 1 else float("nan")
    base = dict(mean=mean, std=std, n=n, diffs=tuple(float(v) for v in d))
    if n < MIN_N_TEST:
        return Paired(**base, note=N_TOO_SMALL)
    if std <= 1e-9 * max(1.0, abs(mean)):
        return Paired(**base, note=ZERO_SPREAD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_rel(xa, ya)
        ci = res.confidence_interval(confidence_level=confidence)
        boot = None
        if n >= MIN_N_BOOT:
            b = stats.bootstrap((xa, ya), _mean_diff, paired=True, vectorized=True,
                                n_resamples=n_boot, confidence_level=confidence,
                                method="BCa", rng=np.random.default_rng(seed))
            lo, hi = float(b.confidence_interval.low), float(b.confidence_interval.high)
            boot = (lo, hi) if np.isfinite(lo) and np.isfinite(hi) else None
    return Paired(**base, ci_t=(float(ci.low), float(ci.high)), ci_boot=boot,
                  p=float(res.pvalue), t=float(res.statistic), df=int(res.df))


def paired_stats_many(x: np.ndarray, y: np.ndarray, *, confidence: float = CONFIDENCE,
                      n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> list[Paired | None]:
    """:func:`paired_stats` of every row of ``x`` and ``y`` (shape: cells x pairs), equal to
    calling it row by row, but rows with the same number of pairs (after dropping pairs
    with a NaN) share one ``ttest_rel`` and one ``bootstrap`` call along the last axis:
    the bootstrap draws the same resampled pair indices for every row of a call, those
    of a one-row call (the generator is seeded with ``seed`` for each call)."""
    from scipy import stats

    xa, ya = np.atleast_2d(np.asarray(x, dtype=float)), np.atleast_2d(np.asarray(y, dtype=float))
    if xa.shape != ya.shape:
        raise ValueError(f"paired samples differ in shape: {xa.shape} vs {ya.shape}")
    out: list[Paired | None] = [None] * xa.shape[0]
    keep = np.isfinite(xa) & np.isfinite(ya)
    # rows with the same number of pairs share a call (their pairs, NaN pairs dropped,
    # in their order: what paired_stats sees)
    batches: dict[int, list[int]] = {}
    for i in range(xa.shape[0]):
        batches.setdefault(int(keep[i].sum()), []).append(i)
    for n, all_rows in batches.items():
        if n < MIN_N_TEST:          # nothing to batch: means and std only
            for i in all_rows:
                out[i] = paired_stats(xa[i], ya[i])
            continue
        for k in range(0, len(all_rows), MAX_BATCH):
            _paired_batch(xa, ya, keep, all_rows[k:k + MAX_BATCH], n, out, confidence,
                          n_boot, seed)
    return out


MAX_BATCH = 16   # cells per scipy call: the bootstrap holds cells x N_BOOT x n values


def _paired_batch(xa: np.ndarray, ya: np.ndarray, keep: np.ndarray, rows: list[int], n: int,
                  out: list, confidence: float, n_boot: int, seed: int) -> None:
    """Fill ``out[i]`` for ``rows``, which have ``n`` >= MIN_N_TEST pairs each."""
    from scipy import stats

    xs = np.stack([xa[i][keep[i]] for i in rows])
    ys = np.stack([ya[i][keep[i]] for i in rows])
    d = xs - ys
    means, stds = d.mean(axis=1), d.std(axis=1, ddof=1)
    spread = stds > 1e-9 * np.maximum(1.0, np.abs(means))
    idx = [i for i, ok in zip(rows, spread) if ok]
    for i, ok in zip(rows, spread):
        if not ok:
            out[i] = paired_stats(xa[i], ya[i])     # zero spread
    if not idx:
        return
    sel = spread.nonzero()[0]
    xs, ys, d = xs[sel], ys[sel], d[sel]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_rel(xs, ys, axis=-1)
        ci = res.confidence_interval(confidence_level=confidence)
        lo_b = hi_b = None
        if n >= MIN_N_BOOT:
            # resampling the pairs = resampling their differences (same indices)
            b = stats.bootstrap((d,), np.mean, vectorized=True, n_resamples=n_boot,
                                confidence_level=confidence, method="BCa", axis=-1,
                                rng=np.random.default_rng(seed))
            lo_b = np.atleast_1d(b.confidence_interval.low)
            hi_b = np.atleast_1d(b.confidence_interval.high)
    lo, hi = np.atleast_1d(ci.low), np.atleast_1d(ci.high)
    pv, tv, dfv = (np.atleast_1d(res.pvalue), np.atleast_1d(res.statistic),
                   np.atleast_1d(res.df))
    for j, i in enumerate(idx):
        boot = None
        if lo_b is not None and np.isfinite(lo_b[j]) and np.isfinite(hi_b[j]):
            boot = (float(lo_b[j]), float(hi_b[j]))
        out[i] = Paired(mean=float(np.mean(d[j])), std=float(np.std(d[j], ddof=1)), n=n,
                        diffs=tuple(float(v) for v in d[j]),
                        ci_t=(float(lo[j]), float(hi[j])), ci_boot=boot,
                        p=float(pv[j]), t=float(tv[j]), df=int(dfv[j]))


def _mean_diff(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a - b, axis=axis)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values of one family (None entries are not in the family).

    With the m defined p-values sorted ascending, p_(i) becomes
    max_{j ≤ i} min(1, (m − j + 1) · p_(j)).
    """
    idx = [i for i, p in enumerate(pvalues) if p is not None and np.isfinite(p)]
    out: list[float | None] = [None] * len(pvalues)
    m = len(idx)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        out[i] = running
    return out


def fmt_p(p: float | None, note: str = "") -> str:
    """``0.003`` / ``< 0.001``; the note ("n too small", ...) when there is no p."""
    if p is None or not np.isfinite(p):
        return note or "—"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def fmt_ci(ci: tuple[float, float] | None) -> str:
    if ci is None:
        return "—"
    return f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"
