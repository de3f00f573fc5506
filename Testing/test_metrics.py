"""Evaluation metrics: known values, exact tie handling, agreement with brute force, bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from synomaly import metrics


def brute_auroc(scores, labels) -> float:
    """Probability that a random positive outscores a random negative, ties counting 1/2."""
    s = np.asarray(scores, float)
    y = np.asarray(labels, bool)
    pos, neg = s[y], s[~y]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


def brute_ap(scores, labels) -> float:
    """Average precision by trying every distinct threshold (score >= t) from the highest down."""
    s = np.asarray(scores, float)
    y = np.asarray(labels, bool)
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
        pred = s >= t
        tp = (pred & y).sum()
        recall = tp / y.sum()
        ap += (recall - prev_recall) * tp / pred.sum()
        prev_recall = recall
    return ap


def brute_best_dice(scores, labels) -> float:
    """Best Dice over every distinct threshold."""
    s = np.asarray(scores, float)
    y = np.asarray(labels, bool)
    return max(2 * (y & (s >= t)).sum() / (y.sum() + (s >= t).sum()) for t in set(s.tolist()))


# ---------------------------------------------------------------- Dice


def test_dice_known_values_and_empty_convention():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert metrics.dice(a, b) == 1.0  # both empty: a perfect (empty) prediction
    assert math.isnan(metrics.dice(a, b, empty=math.nan))
    b[0, :2] = True
    assert metrics.dice(a, b) == 0.0  # missed everything
    a[0, 0] = True
    assert metrics.dice(a, b) == pytest.approx(2 * 1 / 3)
    assert metrics.dice(b, b) == 1.0
    with pytest.raises(ValueError):
        metrics.dice(a, b[:3])


# ---------------------------------------------------------------- AUROC / AP


def test_auroc_and_ap_known_small_case():
    y = [0, 0, 1, 1]
    s = [0.1, 0.4, 0.35, 0.8]
    assert metrics.auroc(s, y) == pytest.approx(0.75)
    assert metrics.auprc(s, y) == pytest.approx((0.5 * 1.0) + (0.5 * 2 / 3))
    assert metrics.auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert metrics.auroc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert metrics.auprc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0


def test_ties_are_counted_half_and_grouped():
    # every score equal: no ranking at all
    assert metrics.auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == pytest.approx(0.5)
    assert metrics.auprc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == pytest.approx(0.5)
    # a positive tied with a negative at the top: the tied pair enters together
    s = [0.9, 0.9, 0.2, 0.1]
    y = [1, 0, 1, 0]
    assert metrics.auroc(s, y) == pytest.approx(brute_auroc(s, y)) == pytest.approx(0.625)
    assert metrics.auprc(s, y) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    # the order of tied items in the input does not matter
    assert metrics.auprc([0.9, 0.9, 0.2, 0.1], [0, 1, 1, 0]) == metrics.auprc(s, y)


def test_one_class_is_undefined():
    assert math.isnan(metrics.auroc([0.1, 0.2], [1, 1]))
    assert math.isnan(metrics.auroc([0.1, 0.2], [0, 0]))
    assert math.isnan(metrics.auprc([0.1, 0.2], [0, 0]))
    assert metrics.auprc([0.1, 0.2], [1, 1]) == 1.0
    with pytest.raises(ValueError):
        metrics.roc_curve([0.1, 0.2], [1, 1])


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        metrics.auroc([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError):
        metrics.auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError):
        metrics.auroc([0.1, 0.2, 0.3], [0, 1])


@pytest.mark.parametrize("seed", range(6))
def test_agree_with_brute_force_on_random_tied_data(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    s = rng.integers(0, 6, n) / 5.0  # few distinct values: many ties
    if seed % 2:
        s = s + rng.normal(0, 0.01, n) * (rng.random(n) < 0.3)
    y = rng.random(n) < 0.35
    y[0], y[1] = True, False
    assert metrics.auroc(s, y) == pytest.approx(brute_auroc(s, y), abs=1e-12)
    assert metrics.auprc(s, y) == pytest.approx(brute_ap(s, y), abs=1e-12)
    assert metrics.oracle_best_dice(s, y)[0] == pytest.approx(brute_best_dice(s, y), abs=1e-12)
    # integer and float32 scores give the same answers
    assert metrics.auroc(s.astype(np.float32), y.astype(int)) == pytest.approx(metrics.auroc(s, y), abs=1e-6)


def test_curves_run_from_nothing_to_everything():
    s = np.array([0.3, 0.8, 0.8, 0.1, 0.5])
    y = np.array([0, 1, 0, 0, 1])
    fpr, tpr, thr = metrics.roc_curve(s, y)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert thr[0] == np.inf and list(thr[1:]) == [0.8, 0.5, 0.3, 0.1]
    precision, recall, thr = metrics.precision_recall_curve(s, y)
    assert recall[-1] == 1.0 and precision[-1] == pytest.approx(2 / 5)
    assert precision[0] == pytest.approx(0.5)  # the tied pair at 0.8


def test_oracle_best_dice_and_its_threshold():
    truth = np.array([0, 0, 1, 1, 1, 0], bool)
    score = np.array([0.1, 0.2, 0.7, 0.8, 0.9, 0.75])
    best, thr = metrics.oracle_best_dice(score, truth)
    assert best == pytest.approx(brute_best_dice(score, truth))
    assert metrics.dice(score >= thr, truth) == pytest.approx(best)
    assert all(np.isnan(metrics.oracle_best_dice(score, np.zeros(6, bool))))


# ---------------------------------------------------------------- pixel level


def test_pixel_metrics_pool_images_and_respect_rois():
    rng = np.random.default_rng(0)
    masks = [np.zeros((8, 8), bool), np.zeros((6, 10), bool)]
    masks[0][2:4, 2:5] = True
    maps = [rng.random(m.shape) + 1.5 * m for m in masks]
    s = np.concatenate([m.ravel() for m in maps])
    y = np.concatenate([m.ravel() for m in masks])
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(metrics.auroc(s, y))
    assert metrics.pixel_auprc(maps, masks) == pytest.approx(metrics.auprc(s, y))
    rois = [np.ones((8, 8), bool), np.zeros((6, 10), bool)]
    assert metrics.pixel_auroc(maps, masks, rois=rois) == pytest.approx(metrics.auroc(maps[0], masks[0]))


def test_pixel_subsampling_is_close_and_bounded():
    rng = np.random.default_rng(1)
    masks = [rng.random((64, 64)) < 0.05 for _ in range(20)]
    maps = [rng.normal(0, 1, m.shape) + 1.0 * m for m in masks]
    full = metrics.pixel_auroc(maps, masks)
    s, y = metrics.pixel_scores(maps, masks, max_pixels=20_000, seed=3)
    assert 17_000 < s.size < 23_000 and s.size == y.size
    assert abs(y.mean() - np.mean([m.mean() for m in masks])) < 0.01  # prevalence kept
    assert metrics.pixel_auroc(maps, masks, max_pixels=20_000, seed=3) == pytest.approx(full, abs=0.02)
    with pytest.raises(ValueError):
        metrics.pixel_scores(maps, masks[:-1])


# ---------------------------------------------------------------- calibration


@pytest.mark.parametrize("fpr", [0.0, 0.01, 0.05, 0.1, 0.29, 0.5])
def test_threshold_at_fpr_keeps_the_rate_and_is_lowest(fpr):
    rng = np.random.default_rng(2)
    healthy = np.round(rng.random(100), 2).astype(np.float32)  # two decimals: ties
    t = metrics.threshold_at_fpr(healthy, fpr)
    assert np.mean(healthy >= t) <= fpr + 1e-12
    below = np.nextafter(np.float32(t), np.float32(-np.inf))
    assert np.mean(healthy >= below) > fpr  # any lower threshold breaks the target


def test_threshold_at_fpr_accepts_lists_of_maps_and_exact_counts():
    maps = [np.arange(10, dtype=float), np.arange(10, 20, dtype=float)]
    t = metrics.threshold_at_fpr(maps, 0.1)  # 2 of 20 allowed: 18 and 19
    assert 17.0 < t <= 18.0
    assert metrics.threshold_at_fpr(np.ones(5), 0.5) > 1.0  # a tie block cannot be split
    with pytest.raises(ValueError):
        metrics.threshold_at_fpr([], 0.1)
    with pytest.raises(ValueError):
        metrics.threshold_at_fpr(np.ones(3), 1.0)


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_estimate_and_narrows_with_more_cases():
    rng = np.random.default_rng(4)
    big = rng.normal(0.7, 0.1, 400)
    small = big[:25]
    est_s, lo_s, hi_s = metrics.bootstrap_ci(np.mean, small, n=500, seed=0)
    est_b, lo_b, hi_b = metrics.bootstrap_ci(np.mean, big, n=500, seed=0)
    assert est_s == pytest.approx(small.mean()) and est_b == pytest.approx(big.mean())
    assert lo_s <= est_s <= hi_s and lo_b <= est_b <= hi_b
    assert (hi_b - lo_b) < 0.5 * (hi_s - lo_s)  # 16 x the cases: about a quarter of the width
    assert (hi_b - lo_b) == pytest.approx(2 * 1.96 * big.std() / 20, rel=0.25)
    assert metrics.bootstrap_ci(np.mean, small, n=200, seed=7) == metrics.bootstrap_ci(np.mean, small, n=200, seed=7)


def test_bootstrap_resamples_whole_cases_of_different_sizes():
    rng = np.random.default_rng(5)
    masks = [rng.random((8 + i, 8)) < 0.2 for i in range(12)]
    maps = [rng.random(m.shape) + 0.5 * m for m in masks]

    def pooled(mp, mk):
        return metrics.pixel_auroc(mp, mk)

    est, lo, hi = metrics.bootstrap_ci(pooled, maps, masks, n=100, seed=0)
    assert est == pytest.approx(metrics.pixel_auroc(maps, masks))
    assert lo <= est <= hi and 0.5 < lo


def test_bootstrap_strata_keep_both_classes():
    scores = np.array([0.9, 0.8, 0.3, 0.2, 0.1, 0.4, 0.35, 0.05])
    labels = np.array([1, 1, 0, 0, 0, 0, 0, 0])
    est, lo, hi = metrics.bootstrap_ci(metrics.auroc, scores, labels, n=300, seed=0, strata=labels)
    assert est == 1.0 and lo == hi == 1.0
    # without strata some resamples lack positives; they are skipped, not counted as nan
    est, lo, hi = metrics.bootstrap_ci(metrics.auroc, scores, labels, n=300, seed=0)
    assert not math.isnan(lo)
    with pytest.raises(ValueError):
        metrics.bootstrap_ci(np.mean, np.ones(3), np.ones(4))


def test_calibration_and_evaluation_share_one_threshold_rule():
    """Slicer's calibrated thresholds (calibrate) and the evaluation's (metrics) come from the same rule: at
    most `fpr` of the healthy scores reach the threshold, ties included."""
    import torch

    from synomaly.calibrate import quantile_threshold, thresholds_at_fprs

    rng = np.random.default_rng(4)
    scores = np.round(rng.random(10_000), 2).astype(np.float32)  # many ties
    for fpr in (1e-2, 1e-3, 1e-4):
        t = quantile_threshold(torch.from_numpy(scores), fpr)
        assert t == metrics.threshold_at_fpr(scores, fpr)
        assert (scores >= t).mean() <= fpr
    thresholds, measured = thresholds_at_fprs(torch.from_numpy(scores), (1e-2,))
    assert measured["0.01"] <= 1e-2
    assert np.isnan(quantile_threshold(torch.zeros(0), 0.01))
