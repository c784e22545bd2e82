"""The numbers a reviewer asks for, over the final seeds of the cells: confidence intervals, paired
comparisons with a baseline, unstable seeds, sign counts and the Pareto front of cost and accuracy.

Plain functions on seed -> value mappings (no Arrow, no rendering); ``orchestrator.results`` puts them in
``cells.arrow`` / ``comparisons.arrow`` and ``orchestrator.report_stats`` renders them. Every interval is
two-sided at ``CONFIDENCE``:

* a cell's mean: Student t over its seeds, ``mean ± t(0.975, n-1) · s / sqrt(n)`` (none for n = 1);
* a statistic that is not a mean over seeds — HM = 2BN/(B+N) of the seed-mean Base and Novel, and the
  multi-dataset Average (a mean of per-dataset means; for HM the HM of the averaged Base and Novel) — the
  percentile bootstrap: ``BOOTSTRAP_RESAMPLES`` resamples of the seeds (within each dataset, a seed's values
  kept together), numpy's generator seeded with ``BOOTSTRAP_SEED`` so the same results give the same
  interval. With 2-3 seeds there are only a few distinct resamples: the interval is coarse, not wrong.
* a paired difference (method - baseline over the seeds both finished; the same seed is the same few-shot
  split): Student t over the per-seed differences, the paired t-test's two-sided p-value
  (``scipy.stats.ttest_rel``) and, from ``WILCOXON_MIN_N`` pairs on (the fewest for which its exact
  two-sided p can fall below 0.05), the Wilcoxon signed-rank p-value, which does not assume normal
  differences. HM: the interval is the paired bootstrap of HM(means) - HM(means); the tests use each seed's
  own HM. The Average: the interval is the paired bootstrap within datasets (seed noise, these datasets
  fixed); the tests take each dataset's mean difference as one unit (do the gains hold across datasets?).

Unstable seeds (``outlier_seeds``): with n >= 3 seeds a seed is flagged when ``|x - median| > mads · scale``,
``scale = max(MAD_SCALE · MAD, min_spread)``: the MAD (median absolute deviation from the median), scaled to
estimate a normal standard deviation, is robust to the one bad seed it is meant to find. ``min_spread``
(accuracy points) keeps the rule sane when the MAD is 0 (two of three seeds equal, or every seed equal, as
for zero-shot): without it any other value would sit infinitely many MADs away. With n <= 2 no seed is
flagged: both sit equally far from their median, so which one is off cannot be told (the std rule of
``orchestrator.results`` still lists the cell).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
#: 1 / Phi^-1(3/4): MAD x this estimates the standard deviation of normally distributed values
MAD_SCALE = 1.4826
#: the exact two-sided Wilcoxon p is at least 2 / 2**n: below 0.05 only from n = 6 on
WILCOXON_MIN_N = 6

Interval = tuple[Optional[float], Optional[float]]
#: a bootstrap statistic: resampled group means, shape (resamples, groups, components) -> (resamples,)
Statistic = Callable[[np.ndarray], np.ndarray]


def _float(v) -> Optional[float]:
    return None if v is None or not math.isfinite(float(v)) else float(v)


def t_interval(values: Sequence[float]) -> Interval:
    """Student t interval of the mean of ``values``; (None, None) for fewer than 2 values."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return None, None
    mean, half = x.mean(), stats.t.ppf(0.5 + CONFIDENCE / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(mean - half), float(mean + half)


# --- bootstrap statistics over the group means (a group = a dataset's seeds; components = metrics) ---------


def hm(base, novel):
    """2BN/(B+N) elementwise (0 where B + N = 0), for floats or arrays."""
    b, n = np.asarray(base, dtype=float), np.asarray(novel, dtype=float)
    total = b + n
    return np.where(total > 0, 2 * b * n / np.where(total > 0, total, 1.0), 0.0)


def mean_of_means(m: np.ndarray) -> np.ndarray:
    """The Average: the mean over groups of each group's mean (component 0)."""
    return m[..., 0].mean(axis=-1)


def hm_of_means(m: np.ndarray) -> np.ndarray:
    """HM of the averaged Base (component 0) and Novel (component 1)."""
    return hm(m[..., 0].mean(axis=-1), m[..., 1].mean(axis=-1))


def difference(statistic: Statistic) -> Statistic:
    """``statistic`` of the first half of the components (the method) minus that of the second (the baseline)."""

    def diff(m: np.ndarray) -> np.ndarray:
        k = m.shape[-1] // 2
        return statistic(m[..., :k]) - statistic(m[..., k:])

    return diff


#: method minus baseline of each statistic (made once: ``bootstrap`` caches by the statistic's identity)
DIFFERENCE = {mean_of_means: difference(mean_of_means), hm_of_means: difference(hm_of_means)}


def bootstrap(groups: Sequence, statistic: Statistic) -> tuple[Optional[float], Interval]:
    """``statistic`` of the groups' means and its percentile bootstrap interval.

    ``groups``: one array (seeds x components) per group (dataset); each resample draws every group's seeds
    with replacement, independently per group, keeping a seed's components together. (None, (None, None))
    when a group is empty; no interval when no group has 2 seeds (nothing to resample). Results are cached
    by value: the results files are rewritten after every trial, and most cells have not changed."""
    if not len(groups) or any(len(g) == 0 for g in groups):
        return None, (None, None)
    key = tuple(tuple(map(tuple, np.asarray(g, dtype=float).reshape(len(g), -1))) for g in groups)
    return _bootstrap(key, statistic)


@functools.lru_cache(maxsize=4096)
def _bootstrap(key: tuple, statistic: Statistic) -> tuple[Optional[float], Interval]:
    groups = [np.asarray(g, dtype=float) for g in key]
    point = _float(statistic(np.stack([g.mean(axis=0) for g in groups])[None])[0])
    if all(len(g) < 2 for g in groups):
        return point, (None, None)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = np.stack(
        [g[rng.integers(0, len(g), size=(BOOTSTRAP_RESAMPLES, len(g)))].mean(axis=1) for g in groups], axis=1
    )
    lo, hi = np.percentile(statistic(means), [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    return point, (_float(lo), _float(hi))


# --- paired comparison ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Paired:
    """Method - baseline over ``seeds`` (the seeds both finished)."""

    seeds: tuple[int, ...]
    method_mean: Optional[float]
    baseline_mean: Optional[float]
    diff: Optional[float]
    ci: Interval
    ci_method: Optional[str]  # "t" or "bootstrap" (None without an interval)
    p_ttest: Optional[float]
    p_wilcoxon: Optional[float]

    @property
    def excludes_zero(self) -> bool:
        lo, hi = self.ci
        return lo is not None and hi is not None and (lo > 0 or hi < 0)


def paired_tests(diffs: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    """Two-sided p-values of the paired t-test (``ttest_rel``: a one-sample t-test of the differences) and,
    from ``WILCOXON_MIN_N`` differences on, of the Wilcoxon signed-rank test (None where undefined: fewer
    than 2 differences, or all of them equal, or all zero for Wilcoxon)."""
    import warnings

    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    if len(d) < 2 or np.all(d == d[0]):
        return None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p_t = _float(stats.ttest_rel(d, np.zeros_like(d)).pvalue)
        p_w = _float(stats.wilcoxon(d).pvalue) if len(d) >= WILCOXON_MIN_N and np.any(d != 0) else None
    return p_t, p_w


def compare(method: dict[int, float], baseline: dict[int, float]) -> Paired:
    """Paired comparison of a mean metric over the seeds both cells have (t interval of the differences)."""
    seeds = tuple(sorted(set(method) & set(baseline)))
    if not seeds:
        return Paired(seeds, None, None, None, (None, None), None, None, None)
    m, b = np.array([method[s] for s in seeds]), np.array([baseline[s] for s in seeds])
    d = m - b
    ci = t_interval(d)
    return Paired(
        seeds,
        float(m.mean()),
        float(b.mean()),
        float(d.mean()),
        ci,
        "t" if ci[0] is not None else None,
        *paired_tests(d),
    )


def compare_hm(method: dict[int, tuple[float, float]], baseline: dict[int, tuple[float, float]]) -> Paired:
    """Paired comparison of HM(seed-mean Base, seed-mean Novel): bootstrap interval; tests on per-seed HMs."""
    seeds = tuple(sorted(set(method) & set(baseline)))
    if not seeds:
        return Paired(seeds, None, None, None, (None, None), None, None, None)
    rows = np.array([[*method[s], *baseline[s]] for s in seeds], dtype=float)
    diff, ci = bootstrap([rows], DIFFERENCE[hm_of_means])
    per_seed = hm(rows[:, 0], rows[:, 1]) - hm(rows[:, 2], rows[:, 3])
    return Paired(
        seeds,
        _float(hm_of_means(rows.mean(axis=0)[None, None, :2])[0]),
        _float(hm_of_means(rows.mean(axis=0)[None, None, 2:])[0]),
        diff,
        ci,
        "bootstrap" if ci[0] is not None else None,
        *paired_tests(per_seed),
    )


def compare_average(pairs: Sequence[Paired], rows: Sequence[np.ndarray], statistic: Statistic) -> Paired:
    """The Average over datasets: ``statistic`` (``mean_of_means`` or ``hm_of_means``) of the method minus the
    baseline's, with its paired bootstrap interval over ``rows`` (per dataset: shared seeds x [method
    components, baseline components]); the tests take each dataset's difference (``pairs``) as one unit."""
    diff, ci = bootstrap(rows, DIFFERENCE[statistic])
    if diff is None:
        return Paired((), None, None, None, (None, None), None, None, None)
    k = rows[0].shape[1] // 2
    means = np.stack([r.mean(axis=0) for r in rows])[None]
    return Paired(
        (),
        _float(statistic(means[..., :k])[0]),
        _float(statistic(means[..., k:])[0]),
        diff,
        ci,
        "bootstrap" if ci[0] is not None else None,
        *paired_tests([p.diff for p in pairs]),
    )


def sign_count(diffs: Sequence[Optional[float]]) -> tuple[int, int, int]:
    """(better, worse, compared): how many differences are > 0, < 0, and not None."""
    present = [d for d in diffs if d is not None]
    return sum(d > 0 for d in present), sum(d < 0 for d in present), len(present)


# --- unstable seeds --------------------------------------------------------------------------------------


def outlier_seeds(values: dict[int, float], mads: float, min_spread: float) -> dict[int, float]:
    """{seed: distance from the median in scales} of the seeds further than ``mads`` scales (module docstring)."""
    if len(values) < 3:
        return {}
    x = np.array(list(values.values()), dtype=float)
    median = np.median(x)
    scale = max(MAD_SCALE * float(np.median(np.abs(x - median))), min_spread)
    out = {}
    for seed, v in values.items():
        dev = abs(v - median)
        dist = dev / scale if scale > 0 else (math.inf if dev > 0 else 0.0)
        if dist > mads:
            out[seed] = float(dist)
    return out


# --- cost ------------------------------------------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (cost, accuracy) points: True where no other point costs no more and scores no less (one of the
    two strictly)."""
    return [not any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for c2, a2 in points) for c, a in points]
