"""The numbers a reviewer asks for, against values worked out by hand (scipy only as a cross-check):
Student t intervals, the seed bootstrap of HM and of the Average, the paired comparison and its p-values,
the unstable-seed rule (n = 1, 2, 3, MAD = 0) and the Pareto front."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from orchestrator import statistics as S

T_975_DF1, T_975_DF2 = 12.706204736174698, 4.302652729911275  # Student t quantiles from the tables


def test_the_t_constants_are_scipys():
    assert stats.t.ppf(0.975, 1) == pytest.approx(T_975_DF1) and stats.t.ppf(0.975, 2) == pytest.approx(T_975_DF2)


def test_t_interval_for_three_two_and_one_seed():
    # 60, 70, 80: mean 70, s = 10, sem = 10 / sqrt 3
    lo, hi = S.t_interval([60.0, 70.0, 80.0])
    half = T_975_DF2 * 10 / math.sqrt(3)
    assert (lo, hi) == pytest.approx((70 - half, 70 + half)) and half == pytest.approx(24.8414, abs=1e-4)
    # 60, 70: mean 65, s = 7.071, sem = 5
    assert S.t_interval([60.0, 70.0]) == pytest.approx((65 - 5 * T_975_DF1, 65 + 5 * T_975_DF1))
    assert S.t_interval([60.0]) == (None, None) and S.t_interval([]) == (None, None)
    assert S.t_interval([50.0, 50.0, 50.0]) == (50.0, 50.0)  # no spread, no width


def test_bootstrap_of_hm_with_two_seeds_spans_the_seeds_own_hms():
    """Two seeds resample to {1,1} (p 1/4), {1,2} (1/2), {2,2} (1/4): the 2.5 % and 97.5 % points fall in the
    one-seed resamples, so the interval is [HM of seed 1, HM of seed 2] and the point is HM of the means."""
    point, (lo, hi) = S.bootstrap([[(80.0, 40.0), (60.0, 80.0)]], S.hm_of_means)
    assert point == pytest.approx(2 * 70 * 60 / 130)  # HM(70, 60) = 64.615
    assert lo == pytest.approx(2 * 80 * 40 / 120) and hi == pytest.approx(2 * 60 * 80 / 140)  # 53.33, 68.57
    assert S.bootstrap([[(80.0, 40.0)]], S.hm_of_means) == (pytest.approx(53.3333, abs=1e-4), (None, None))
    assert S.bootstrap([[]], S.hm_of_means) == (None, (None, None))


def test_bootstrap_interval_is_the_95_percent_one_of_all_resamples():
    """Five seeds 0, 1, 2, 4, 8: all 5**5 resamples enumerated give the exact distribution of the resampled mean;
    its 2.5 % and 97.5 % points are 0.8 and 5.6 (a 90 % interval would be 1.0 to 5.2, a 98 % one 0.6 to 6.0)."""
    import itertools

    import numpy as np

    seeds = [0.0, 1.0, 2.0, 4.0, 8.0]
    exact = [sum(r) / 5 for r in itertools.product(seeds, repeat=5)]
    assert tuple(np.percentile(exact, [2.5, 97.5])) == pytest.approx((0.8, 5.6))
    assert S.bootstrap([seeds], S.mean_of_means) == (pytest.approx(3.0), pytest.approx((0.8, 5.6)))


def test_bootstrap_of_the_average_resamples_within_each_dataset():
    """Datasets A (10, 20) and B (30, 50): the Average of means is 27.5; its extremes (10+30)/2 = 20 and
    (20+50)/2 = 35 each have probability 1/16 > 2.5 %, so they are the interval."""
    point, (lo, hi) = S.bootstrap([[10.0, 20.0], [30.0, 50.0]], S.mean_of_means)
    assert (point, lo, hi) == pytest.approx((27.5, 20.0, 35.0))
    assert S.bootstrap([[10.0, 20.0], [30.0, 50.0]], S.mean_of_means) == (point, (lo, hi))  # fixed seed: the same


def test_paired_comparison_over_the_shared_seeds():
    """Seeds 1-3 shared (4 only in the method, 5 only in the baseline): differences 2, 1, 5."""
    p = S.compare({1: 62.0, 2: 71.0, 3: 85.0, 4: 90.0}, {1: 60.0, 2: 70.0, 3: 80.0, 5: 50.0})
    assert p.seeds == (1, 2, 3) and p.method_mean == pytest.approx(218 / 3) and p.baseline_mean == 70.0
    mean, s = 8 / 3, math.sqrt(((2 - 8 / 3) ** 2 + (1 - 8 / 3) ** 2 + (5 - 8 / 3) ** 2) / 2)
    sem = s / math.sqrt(3)
    assert p.diff == pytest.approx(mean) and p.ci == pytest.approx((mean - T_975_DF2 * sem, mean + T_975_DF2 * sem))
    t = mean / sem
    assert p.p_ttest == pytest.approx(1 - t / math.sqrt(2 + t * t))  # Student t with 2 df: P(|T| > t) in closed form
    assert p.p_ttest == pytest.approx(stats.ttest_rel([62, 71, 85], [60, 70, 80]).pvalue)
    assert p.p_wilcoxon is None and p.ci_method == "t" and not p.excludes_zero  # [-2.5, 7.8]


def test_two_seeds_one_seed_no_seed():
    p = S.compare({1: 60.0, 2: 70.0}, {1: 12.0, 2: 15.2})  # differences 48, 54.8
    sem = abs(48 - 54.8) / 2
    assert p.ci == pytest.approx((51.4 - T_975_DF1 * sem, 51.4 + T_975_DF1 * sem)) and p.excludes_zero
    assert p.p_ttest == pytest.approx(1 - 2 / math.pi * math.atan(51.4 / sem))  # t with 1 df is Cauchy
    one = S.compare({1: 60.0, 2: 70.0}, {1: 50.0})
    assert (one.seeds, one.diff, one.ci, one.p_ttest, one.ci_method) == ((1,), 10.0, (None, None), None, None)
    assert not one.excludes_zero
    none = S.compare({1: 60.0}, {2: 50.0})
    assert none.seeds == () and none.diff is None


def test_identical_differences_have_no_test_but_a_zero_width_interval():
    p = S.compare({1: 61.0, 2: 71.0, 3: 81.0}, {1: 60.0, 2: 70.0, 3: 80.0})
    assert p.diff == pytest.approx(1.0) and p.ci == pytest.approx((1.0, 1.0)) and p.excludes_zero
    assert p.p_ttest is None and p.p_wilcoxon is None


def test_wilcoxon_from_six_pairs_on():
    """Six positive differences: only the all-positive sign pattern has W- = 0, so p = 2 / 2**6."""
    base = {s: 50.0 for s in range(1, 7)}
    p = S.compare({s: 50.0 + s for s in range(1, 7)}, base)
    assert p.p_wilcoxon == pytest.approx(2 / 64)
    assert p.p_wilcoxon == pytest.approx(stats.wilcoxon(list(range(1, 7))).pvalue)
    five = S.compare({s: 50.0 + s for s in range(1, 6)}, base)
    assert five.p_wilcoxon is None and five.p_ttest is not None


def test_hm_comparison_bootstraps_hm_of_means_and_tests_per_seed_hms():
    method = {1: (80.0, 40.0), 2: (60.0, 80.0)}
    baseline = {1: (70.0, 50.0), 2: (70.0, 50.0), 3: (10.0, 10.0)}
    p = S.compare_hm(method, baseline)
    hm_base = 2 * 70 * 50 / 120  # 58.33: the baseline's seeds are identical
    assert p.seeds == (1, 2) and p.baseline_mean == pytest.approx(hm_base)
    assert p.diff == pytest.approx(2 * 70 * 60 / 130 - hm_base)
    assert (
        p.ci == pytest.approx((2 * 80 * 40 / 120 - hm_base, 2 * 60 * 80 / 140 - hm_base)) and p.ci_method == "bootstrap"
    )
    d = [2 * 80 * 40 / 120 - hm_base, 2 * 60 * 80 / 140 - hm_base]
    assert p.p_ttest == pytest.approx(stats.ttest_1samp(d, 0).pvalue)


def test_average_comparison_tests_datasets_as_units():
    pairs = [S.compare({1: 12.0, 2: 14.0}, {1: 10.0, 2: 10.0}), S.compare({1: 31.0, 2: 33.0}, {1: 30.0, 2: 30.0})]
    rows = [[[12.0, 10.0], [14.0, 10.0]], [[31.0, 30.0], [33.0, 30.0]]]
    import numpy as np

    avg = S.compare_average(pairs, [np.array(r) for r in rows], S.mean_of_means)
    assert avg.diff == pytest.approx((3 + 2) / 2)  # dataset differences 3 and 2
    assert avg.ci == pytest.approx(((2 + 1) / 2, (4 + 3) / 2))  # the one-seed extremes, 1/16 each
    assert avg.p_ttest == pytest.approx(stats.ttest_1samp([3.0, 2.0], 0).pvalue)
    assert S.sign_count([3.0, -1.0, 0.0, None]) == (1, 1, 3)


def test_the_unstable_seed_rule():
    # CoOp's 16-shot DTD (seeds 1/2/3): median 15.2, MAD 3.2, scale 1.4826 x 3.2 = 4.744; seed 3 is 48.2 away
    far = S.outlier_seeds({1: 12.0, 2: 15.2, 3: 63.4}, mads=3.5, min_spread=2.0)
    assert list(far) == [3] and far[3] == pytest.approx(48.2 / (1.4826 * 3.2))
    # MAD 0 (two seeds equal): the scale is min_spread, so a far seed is found and a near one is not
    assert S.outlier_seeds({1: 50.0, 2: 50.0, 3: 80.0}, 3.5, 2.0) == {3: pytest.approx(15.0)}
    assert S.outlier_seeds({1: 50.0, 2: 50.0, 3: 55.0}, 3.5, 2.0) == {}  # 5 / 2 = 2.5 scales
    assert S.outlier_seeds({1: 50.0, 2: 50.0, 3: 50.0}, 3.5, 2.0) == {}  # zero-shot: every seed the same
    assert S.outlier_seeds({1: 50.0, 2: 50.0, 3: 50.1}, 3.5, 0.0) == {3: math.inf}  # no floor: any departure
    # two seeds, or one: which one is off cannot be told
    assert S.outlier_seeds({1: 10.0, 2: 90.0}, 3.5, 2.0) == {} and S.outlier_seeds({1: 10.0}, 3.5, 2.0) == {}
    assert S.outlier_seeds({1: 10.0, 2: 90.0}, 0.5, 0.0) == {}  # each is 1 / 1.4826 = 0.67 scales out: not both
    # the MAD, not the std, sets the scale: one wild seed among five does not hide itself
    assert list(S.outlier_seeds({1: 60.0, 2: 61.0, 3: 59.0, 4: 60.5, 5: 20.0}, 3.5, 0.5)) == [5]


def test_pareto_front():
    pts = [(1.0, 60.0), (2.0, 70.0), (3.0, 65.0), (2.0, 69.0), (0.5, 50.0), (1.0, 60.0)]
    assert S.pareto_front(pts) == [True, True, False, False, True, True]  # equal points do not dominate each other
