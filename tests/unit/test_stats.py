"""results.stats on hand-computable cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from results import stats

N_BOOT = 4000


def bernoulli(n: int, k: int) -> np.ndarray:
    """n items, the first k of them 1."""
    return (np.arange(n) < k).astype(float)


def test_aggregates_match_lm_evals_formulas():
    from lm_eval.api import metrics as lm

    ll_w = np.array([[-2.0, 3.0], [-5.0, 4.0], [-1.5, 1.0]])
    pairs = [tuple(r) for r in ll_w]
    assert stats.aggregate(ll_w, "weighted_perplexity") == pytest.approx(
        lm.weighted_perplexity(pairs)
    )
    assert stats.aggregate(ll_w, "weighted_perplexity") == pytest.approx(math.exp(8.5 / 8))
    assert stats.aggregate(ll_w, "bits_per_byte") == pytest.approx(lm.bits_per_byte(pairs))
    assert stats.aggregate(ll_w, "bits_per_byte") == pytest.approx(8.5 / (8 * math.log(2)))
    ll = np.array([-0.5, -1.0, -3.0])
    assert stats.aggregate(ll, "perplexity") == pytest.approx(lm.perplexity(list(ll)))
    assert stats.aggregate([1, 0, 1, 1], "mean") == 0.75
    # several seeds: the mean over seeds of the per-seed aggregates
    assert stats.aggregate([[1, 1, 0, 0], [1, 1, 1, 1]]) == 0.75


def test_unknown_aggregation_and_bad_shapes_are_named():
    with pytest.raises(ValueError, match="'f1'.*supported: mean"):
        stats.interval([1.0, 0.0], "f1")
    with pytest.raises(ValueError, match=r"weighted_perplexity.*\(n_items, 2\)"):
        stats.interval([1.0, 2.0, 3.0], "weighted_perplexity")
    with pytest.raises(ValueError, match="at least one item"):
        stats.interval([], "mean")
    with pytest.raises(ValueError, match="level"):
        stats.interval([1.0, 0.0], level=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        stats.interval([1.0, 0.0], n_boot=0)


def test_constant_vector_has_zero_width_interval():
    iv = stats.interval(np.full(50, 0.7), n_boot=500)
    assert (iv.estimate, iv.low, iv.high) == pytest.approx((0.7, 0.7, 0.7))
    assert iv.sd is None and iv.n_seeds == 1 and iv.n_items == 50 and iv.level == 0.95


def test_bernoulli_interval_is_close_to_the_normal_approximation():
    n, k = 400, 120
    p = k / n
    half = 1.96 * math.sqrt(p * (1 - p) / n)  # 0.0449
    iv = stats.interval(bernoulli(n, k), n_boot=N_BOOT, seed=3)
    assert iv.estimate == pytest.approx(p)
    assert iv.low == pytest.approx(p - half, abs=0.006)
    assert iv.high == pytest.approx(p + half, abs=0.006)
    narrower = stats.interval(bernoulli(n, k), n_boot=N_BOOT, level=0.5, seed=3)
    assert iv.low < narrower.low < narrower.high < iv.high


def test_seeded_output_is_identical_and_the_seed_matters():
    x = bernoulli(200, 70)
    assert stats.interval(x, seed=5, n_boot=1000) == stats.interval(x, seed=5, n_boot=1000)
    assert stats.interval(x, seed=5, n_boot=1000) != stats.interval(x, seed=6, n_boot=1000)
    a, b = bernoulli(200, 90), bernoulli(200, 70)
    assert stats.paired(a, b, n_boot=1000) == stats.paired(a, b, n_boot=1000)


def test_one_seed_two_level_is_the_item_bootstrap():
    x = np.random.default_rng(0).random(80)
    assert stats.interval(x[None, :], n_boot=1000) == stats.interval(x, n_boot=1000)


def test_seeds_whose_means_differ_widen_the_interval():
    x = bernoulli(300, 150)
    same = stats.interval(np.stack([x, x, x]), n_boot=N_BOOT)
    shifted = np.stack([bernoulli(300, 120), x, bernoulli(300, 180)])
    apart = stats.interval(shifted, n_boot=N_BOOT)
    assert same.estimate == apart.estimate == pytest.approx(0.5)
    assert same.sd == 0.0 and apart.sd == pytest.approx(0.1)
    assert apart.n_seeds == 3 and apart.n_items == 300
    assert (apart.high - apart.low) > 1.5 * (same.high - same.low)
    # seed resampling alone: the interval spans most of the per-seed means' range
    assert apart.low < 0.45 and apart.high > 0.55


def test_paired_identical_arrays_is_exactly_zero():
    x = np.random.default_rng(1).random((2, 60))
    d = stats.paired(x, x.copy(), n_boot=1000)
    assert (d.estimate, d.low, d.high) == (0.0, 0.0, 0.0)
    assert not d.significant and d.mcnemar_p is None  # not binary
    b = stats.paired(bernoulli(50, 20), bernoulli(50, 20), n_boot=1000)
    assert (b.low, b.high, b.mcnemar_p) == (0.0, 0.0, 1.0)


def test_paired_clear_difference_is_significant_with_mcnemar():
    a, b = bernoulli(100, 60), bernoulli(100, 30)  # 30 discordant, all in A's favour
    d = stats.paired(a, b, n_boot=N_BOOT)
    assert d.estimate == pytest.approx(0.3) and d.significant and d.low > 0.15
    assert d.mcnemar_p == pytest.approx(2 * 0.5**30)
    assert stats.verdict(d, +1) == "reproduced"
    assert stats.verdict(d, -1) == "not reproduced"


def test_pairing_narrows_the_interval():
    """Correlated sides: the paired interval of the difference is far narrower than the
    intervals of the two sides."""
    rng = np.random.default_rng(2)
    b = (rng.random(500) < 0.5).astype(float)
    a = b.copy()
    a[np.flatnonzero(b == 0)[:15]] = 1.0
    d = stats.paired(a, b, n_boot=N_BOOT)
    side = stats.interval(a, n_boot=N_BOOT)
    assert d.high - d.low < 0.5 * (side.high - side.low)


def test_mcnemar_exact_on_known_counts():
    a = np.array([1] * 9 + [0] * 1 + [1] * 5 + [0] * 5, dtype=float)
    b = np.array([0] * 9 + [1] * 1 + [1] * 5 + [0] * 5, dtype=float)
    assert stats.mcnemar(a, b) == pytest.approx(22 / 1024)  # 2 * P(X <= 1), X ~ Bin(10, .5)
    assert stats.mcnemar(bernoulli(5, 5), bernoulli(5, 0)) == pytest.approx(2 / 32)
    assert stats.mcnemar(bernoulli(8, 4), bernoulli(8, 4)) == 1.0  # no discordant pair
    with pytest.raises(ValueError, match="binary"):
        stats.mcnemar([0.5, 1.0], [0.0, 1.0])


def test_paired_reports_the_largest_mcnemar_p_over_seeds():
    a = np.stack([bernoulli(40, 30), bernoulli(40, 12)])
    b = np.stack([bernoulli(40, 10), bernoulli(40, 10)])
    d = stats.paired(a, b, n_boot=500)
    assert d.mcnemar_p == pytest.approx(max(stats.mcnemar(a[0], b[0]), 0.5))  # 2 discordant
    with pytest.raises(ValueError, match="same seeds and items"):
        stats.paired(a, b[:, :30])


def test_verdict_is_inconclusive_when_the_interval_covers_zero():
    iv = stats.Interval(0.01, -0.02, 0.04, 0.95, None, 1, 100)
    assert stats.verdict(iv, +1) == stats.verdict(iv, -1) == "inconclusive"
    lower = stats.Interval(-0.1, -0.2, -0.05, 0.95, None, 1, 100)
    assert stats.verdict(lower, -1) == "reproduced" and stats.verdict(lower, 1) == "not reproduced"
    with pytest.raises(ValueError, match="direction"):
        stats.verdict(iv, 0)


def test_macro_average_resamples_tasks_independently():
    t1, t2 = bernoulli(200, 50), bernoulli(40, 30)
    iv = stats.macro_interval([t1, t2], n_boot=N_BOOT)
    assert iv.estimate == pytest.approx((0.25 + 0.75) / 2) and iv.n_items == 240
    # independent tasks: variance of the mean = (var1 + var2) / 4
    half = 1.96 * math.sqrt(0.25 * 0.75 / 200 + 0.75 * 0.25 / 40) / 2
    assert iv.high - iv.low == pytest.approx(2 * half, rel=0.15)
    mixed = stats.macro_interval(
        [t1, np.array([[-1.0, 2.0], [-3.0, 2.0]])], ["mean", "weighted_perplexity"], n_boot=200
    )
    assert mixed.estimate == pytest.approx((0.25 + math.exp(1.0)) / 2)


def test_macro_paired_uses_the_same_draws_on_both_sides():
    t1, t2 = bernoulli(100, 40), bernoulli(60, 20)
    same = stats.macro_paired([t1, t2], [t1.copy(), t2.copy()], n_boot=1000)
    assert (same.low, same.high, same.significant) == (0.0, 0.0, False)
    better = stats.macro_paired([bernoulli(100, 70), t2], [t1, t2], n_boot=1000)
    assert better.estimate == pytest.approx(0.15) and better.significant
    assert better.mcnemar_p is None


def test_replicates_algebra_pairs_draw_by_draw():
    x, y = bernoulli(100, 50), bernoulli(100, 25)
    draws = stats.resample_items(np.stack([x, y]), n_boot=500, stream=7)
    assert draws.shape == (2, 500)
    rx = stats.resample_seeds(draws[:1], [0.5], 100)
    ry = stats.resample_seeds(draws[1:], [0.25], 100)
    r = stats.ratio(rx, ry)
    assert r.estimate == 2.0 and np.allclose(r.draws, draws[0] / draws[1])
    m = stats.mean_of([rx, ry], weights=[3, 1])
    assert m.estimate == pytest.approx(0.4375) and m.n_items == 200
    with pytest.raises(ValueError, match="paired replicates"):
        stats.difference(rx, stats.resample_seeds(draws[:1], [0.5], 99))
