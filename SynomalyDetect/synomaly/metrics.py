"""Evaluation metrics in plain numpy: Dice, ROC/PR curves, AUROC, average precision, bootstrap intervals.

Conventions, used throughout:
- A pixel or image is called anomalous when its score is >= the threshold (the engine's rule:
  D[D < theta] = 0 keeps D >= theta).
- Ties are handled exactly: all items with the same score enter or leave the prediction together,
  so AUROC equals the Mann-Whitney statistic with ties counted 1/2, and average precision steps
  once per distinct score (scikit-learn's definition).
- A curve or area is undefined (nan) when the labels hold only one class.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import numpy as np

ArrayList = Sequence[np.ndarray]


def dice(pred: np.ndarray, truth: np.ndarray, empty: float = 1.0) -> float:
    """Dice overlap 2|P & T| / (|P| + |T|) of two boolean masks of the same shape.

    When both masks are empty the prediction is perfect and Dice is `empty` (1.0 by default; pass
    nan to leave such cases out of a mean). An empty prediction of a non-empty truth scores 0.
    """
    p = np.asarray(pred).astype(bool, copy=False)
    t = np.asarray(truth).astype(bool, copy=False)
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and truth {t.shape} differ in shape")
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(t))
    if total == 0:
        return float(empty)
    return 2.0 * int(np.count_nonzero(p & t)) / total


def _scores_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Flattened float scores and boolean labels, checked."""
    s = np.asarray(scores).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if s.dtype.kind not in "fiub":
        raise ValueError("scores must be numbers")
    if s.dtype.kind == "f" and not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be 0/1 or boolean")
        y = y.astype(bool)
    return s, y


def threshold_counts(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores (descending) and the true/false positives when predicting score >= each of them.

    Returns (thresholds, tp, fp), each of length = number of distinct scores.
    """
    s, y = _scores_labels(scores, labels)
    order = np.argsort(s, kind="stable")[::-1]
    s, y = s[order], y[order]
    tp = np.cumsum(y, dtype=np.int64)
    fp = np.arange(1, s.size + 1, dtype=np.int64) - tp
    last = np.ones(s.size, dtype=bool)  # the last item of each group of equal scores
    last[:-1] = s[1:] != s[:-1]
    return s[last], tp[last], fp[last]


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) from (0, 0) to (1, 1); thresholds[0] is +inf (nothing predicted)."""
    thr, tp, fp = threshold_counts(scores, labels)
    pos, neg = (tp[-1], fp[-1]) if tp.size else (0, 0)
    if pos == 0 or neg == 0:
        raise ValueError("the ROC curve needs both positive and negative labels")
    fpr = np.concatenate([[0.0], fp / neg])
    tpr = np.concatenate([[0.0], tp / pos])
    return fpr, tpr, np.concatenate([[np.inf], thr.astype(float)])


def precision_recall_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) at each distinct score, recall increasing; needs a positive label."""
    thr, tp, fp = threshold_counts(scores, labels)
    pos = tp[-1] if tp.size else 0
    if pos == 0:
        raise ValueError("the precision-recall curve needs at least one positive label")
    return tp / (tp + fp), tp / pos, thr.astype(float)


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve (ties count 1/2); nan when only one class is present."""
    thr, tp, fp = threshold_counts(scores, labels)
    if tp.size == 0 or tp[-1] == 0 or fp[-1] == 0:
        return math.nan
    # trapezoids in integer counts, divided once: exact for perfect and inverted rankings
    dfp = np.diff(fp, prepend=0)
    heights = tp + np.concatenate([[0], tp[:-1]])
    return float(np.dot(dfp.astype(np.float64), heights.astype(np.float64)) / (2.0 * tp[-1] * fp[-1]))


def auprc(scores: Any, labels: Any) -> float:
    """Average precision: sum over distinct scores of (recall step) x precision; nan without positives.

    A random scorer gets about the positive fraction, a perfect one 1.
    """
    thr, tp, fp = threshold_counts(scores, labels)
    if tp.size == 0 or tp[-1] == 0:
        return math.nan
    precision = tp / (tp + fp)
    return float(np.dot(np.diff(tp, prepend=0).astype(np.float64), precision) / tp[-1])


average_precision = auprc


def oracle_best_dice(scores: Any, truth: Any) -> tuple[float, float]:
    """ORACLE, for reporting only: the best Dice any single threshold reaches, and that threshold.

    The threshold is chosen with the ground truth of the very data scored, so this is an upper bound
    (the paper's 'best Dice'), never a result to compare with thresholds chosen without the truth.
    Pixels of all images are pooled. Returns (nan, nan) when the truth is empty.
    """
    thr, tp, fp = threshold_counts(scores, truth)
    if tp.size == 0 or tp[-1] == 0:
        return math.nan, math.nan
    d = 2.0 * tp / (tp[-1] + tp + fp)
    i = int(np.argmax(d))
    return float(d[i]), float(thr[i])


def pixel_scores(maps: ArrayList, masks: ArrayList, rois: Optional[ArrayList] = None,
                 max_pixels: Optional[int] = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scores and labels of the pixels of many images, pooled (optionally inside ROIs).

    With max_pixels, each pixel is kept with probability max_pixels / total independently, so the
    sample keeps the positive fraction in expectation (AUPRC depends on it) and fits in memory.
    """
    if len(maps) != len(masks) or (rois is not None and len(rois) != len(maps)):
        raise ValueError("maps, masks and rois must hold the same number of images")
    sizes = []
    for i, (m, t) in enumerate(zip(maps, masks)):
        if np.shape(m) != np.shape(t):
            raise ValueError(f"image {i}: map {np.shape(m)} and mask {np.shape(t)} differ in shape")
        sizes.append(int(np.count_nonzero(rois[i])) if rois is not None else int(np.size(m)))
    total = sum(sizes)
    keep = 1.0 if not max_pixels or total <= max_pixels else max_pixels / total
    rng = np.random.default_rng(seed)
    s_out, y_out = [], []
    for i, (m, t) in enumerate(zip(maps, masks)):
        s = np.asarray(m).reshape(-1)
        y = np.asarray(t).reshape(-1).astype(bool, copy=False)
        if rois is not None:
            r = np.asarray(rois[i]).reshape(-1).astype(bool, copy=False)
            s, y = s[r], y[r]
        if keep < 1.0:
            pick = rng.random(s.size) < keep
            s, y = s[pick], y[pick]
        s_out.append(s)
        y_out.append(y)
    if not s_out:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=bool)
    return np.concatenate(s_out), np.concatenate(y_out)


def pixel_auroc(maps: ArrayList, masks: ArrayList, rois: Optional[ArrayList] = None,
                max_pixels: Optional[int] = None, seed: int = 0) -> float:
    """Pixel-level AUROC over many images pooled (see pixel_scores for rois and subsampling)."""
    return auroc(*pixel_scores(maps, masks, rois, max_pixels, seed))


def pixel_auprc(maps: ArrayList, masks: ArrayList, rois: Optional[ArrayList] = None,
                max_pixels: Optional[int] = None, seed: int = 0) -> float:
    """Pixel-level average precision over many images pooled (see pixel_scores)."""
    return auprc(*pixel_scores(maps, masks, rois, max_pixels, seed))


def threshold_at_fpr(healthy_scores: Any, fpr: float = 0.01) -> float:
    """The lowest threshold that calls at most a fraction `fpr` of healthy scores anomalous (score >= t).

    healthy_scores: an array or a list of arrays (pixels or images known to be healthy). With n
    scores, at most floor(fpr * n) lie at or above the threshold; the threshold is the smallest
    number above the (floor(fpr * n) + 1)-th largest score, so ties never push the rate over `fpr`.
    """
    if not 0 <= fpr < 1:
        raise ValueError("fpr must be in [0, 1)")
    if isinstance(healthy_scores, (list, tuple)):
        h = np.concatenate([np.asarray(a).reshape(-1) for a in healthy_scores]) if healthy_scores else np.zeros(0)
    else:
        h = np.asarray(healthy_scores).reshape(-1)
    if h.size == 0:
        raise ValueError("no healthy scores to calibrate on")
    if h.dtype.kind != "f":
        h = h.astype(np.float64)
    if not np.isfinite(h).all():
        raise ValueError("healthy scores contain NaN or infinite values")
    k = min(h.size - 1, int(math.floor(fpr * h.size * (1 + 1e-12) + 1e-9)))  # tolerate 0.29 * 100 = 28.999...
    kth_largest = np.partition(h, h.size - 1 - k)[h.size - 1 - k]
    return float(np.nextafter(kth_largest, np.array(np.inf, dtype=h.dtype)))


def _take(a: Any, idx: np.ndarray) -> Any:
    """Items idx of an array (first axis) or of a list of per-case arrays."""
    if isinstance(a, np.ndarray):
        return a[idx]
    return [a[i] for i in idx]


def bootstrap_ci(metric_fn: Callable[..., float], *arrays: Any, n: int = 1000, seed: int = 0,
                 alpha: float = 0.05, strata: Optional[Any] = None) -> tuple[float, float, float]:
    """(estimate, low, high): metric_fn on the cases as given, and a percentile bootstrap interval.

    Cases (images, or volumes) are resampled with replacement: each of `arrays` is an array whose
    first axis runs over cases, or a list with one entry per case (e.g. per-image maps of different
    sizes), and metric_fn receives the resampled arrays in the same order. With `strata` (one value
    per case, e.g. the image labels), cases are resampled within each stratum, keeping the class
    balance. Resamples where the metric is undefined (nan) are left out of the interval.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array of cases")
    m = len(arrays[0])
    if any(len(a) != m for a in arrays):
        raise ValueError("every array must hold the same number of cases")
    if m == 0:
        raise ValueError("no cases to resample")
    if not 0 < alpha < 1 or n < 1:
        raise ValueError("alpha must be in (0, 1) and n at least 1")
    estimate = float(metric_fn(*arrays))
    rng = np.random.default_rng(seed)
    if strata is None:
        groups = [np.arange(m)]
    else:
        st = np.asarray(strata).reshape(-1)
        if st.size != m:
            raise ValueError("strata must hold one value per case")
        groups = [np.flatnonzero(st == v) for v in np.unique(st)]
    stats = np.empty(n, dtype=np.float64)
    for b in range(n):
        idx = np.concatenate([g[rng.integers(0, g.size, g.size)] for g in groups])
        stats[b] = float(metric_fn(*(_take(a, idx) for a in arrays)))
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return estimate, math.nan, math.nan
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return estimate, float(low), float(high)
