"""What `synomaly evaluate` measures: per-image numbers, per-patient aggregates, metrics over them with bootstrap
intervals, and pooled pixel curves from score histograms."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .evaldata import EvalData
from .evalplots import Gallery


IMAGE_SCORE = "the 99th percentile of the anomaly map inside the image's foreground"
IMAGE_PERCENTILE = 99.0

# metric key -> (level, short column title, definition)
METRICS: dict[str, tuple[str, str, str]] = {
    "dice_image": ("pixel", "Dice/image", "Dice at the threshold after post-processing, per anomalous image "
                   "(slice), mean over anomalous images"),
    "dice_volume": ("pixel", "Dice/volume", "Dice at the threshold, all slices of a volume together, mean over "
                    "volumes with an anomaly"),
    "pixel_auprc": ("pixel", "AUPRC pooled", "average precision of the continuous map (before binarisation), "
                    "foreground pixels of all test images pooled"),
    "pixel_auroc": ("pixel", "AUROC pooled", "AUROC of the continuous map, foreground pixels of all test images "
                    "pooled"),
    "pixel_auprc_image": ("pixel", "AUPRC/image", "average precision of the map per anomalous image, mean"),
    "pixel_auroc_image": ("pixel", "AUROC/image", "AUROC of the map per anomalous image, mean"),
    "pixel_auprc_volume": ("pixel", "AUPRC/volume", "average precision of the map per volume with an anomaly, mean"),
    "pixel_auroc_volume": ("pixel", "AUROC/volume", "AUROC of the map per volume with an anomaly, mean"),
    "healthy_fp_fraction": ("healthy", "FP share healthy", "share of the foreground flagged anomalous (after "
                            "post-processing) in healthy images (slices), mean"),
    "healthy_ml_volume": ("healthy", "mL flagged healthy", "volume flagged anomalous (after post-processing) in "
                          "each lesion-free 3D volume, mL, mean over such volumes"),
    "healthy_ml_max": ("healthy", "max mL healthy", "the largest volume flagged in any lesion-free 3D volume, mL"),
    "image_auroc": ("image", "image AUROC", f"healthy vs anomalous images; image score = {IMAGE_SCORE}"),
    "image_auprc": ("image", "image AUPRC", "average precision of the image score (anomalous = positive)"),
    "image_balanced_accuracy": ("image", "bal. accuracy", "mean of sensitivity and specificity of the image score "
                                "at the image threshold chosen on the validation split"),
    "seconds_per_image": ("runtime", "s/image", "detection wall time per 2D image, or per slice of a volume "
                          "(volume time / its slices), mean; includes preparation and post-processing"),
}
MEAN_METRICS = ("dice_image", "dice_volume", "pixel_auprc_image", "pixel_auroc_image", "pixel_auprc_volume",
                "pixel_auroc_volume", "healthy_fp_fraction", "healthy_ml_volume", "seconds_per_image")
HIST_BINS = 16384  # pooled pixel metrics: scores in [0, 2] binned on a square-root scale (fine near 0)
MAP_TOP = 2.0  # a difference map of [-1, 1] images lies in [0, 2]
NORMALISED_MAP_TOP = 64.0  # a map normalised per tissue class (detect.tissue_normalised) counts spreads: [0, 64]


def map_top(report: dict[str, Any]) -> float:
    """The top of the binned range for a detection's map (its report says whether it was normalised)."""
    return NORMALISED_MAP_TOP if report.get("tissue_bins") else MAP_TOP


def score_bins(values: np.ndarray, top: float = MAP_TOP) -> np.ndarray:
    """Histogram bin of each score in [0, top] on a square-root scale (HIST_BINS bins); higher scores share the
    top bin."""
    v = np.sqrt(np.clip(values.astype(np.float64, copy=False), 0.0, top) / top)
    return np.minimum((v * HIST_BINS).astype(np.int64), HIST_BINS - 1)


def hist_auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUROC from score histograms (ties within a bin count 1/2, as metrics.auroc counts equal scores)."""
    p, n = float(pos.sum()), float(neg.sum())
    if p == 0 or n == 0:
        return math.nan
    tp = np.cumsum(pos[::-1]).astype(np.float64)
    fp = np.cumsum(neg[::-1]).astype(np.float64)
    heights = tp + np.concatenate([[0.0], tp[:-1]])
    return float(np.dot(neg[::-1].astype(np.float64), heights) / (2.0 * p * n))


def hist_auprc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Average precision from score histograms (one step per non-empty bin, as metrics.auprc steps per score)."""
    p = float(pos.sum())
    if p == 0:
        return math.nan
    tp = np.cumsum(pos[::-1]).astype(np.float64)
    fp = np.cumsum(neg[::-1]).astype(np.float64)
    keep = pos[::-1] > 0
    return float(np.dot(pos[::-1][keep].astype(np.float64), tp[keep] / (tp[keep] + fp[keep])) / p)


def hist_curves(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, recall, precision) from score histograms, thresholds descending."""
    keep = (pos + neg)[::-1] > 0
    tp = np.cumsum(pos[::-1]).astype(np.float64)[keep]
    fp = np.cumsum(neg[::-1]).astype(np.float64)[keep]
    p = max(tp[-1], 1.0) if tp.size else 1.0
    n = max(fp[-1], 1.0) if fp.size else 1.0
    fpr, tpr = np.concatenate([[0.0], fp / n]), np.concatenate([[0.0], tp / p])
    return fpr, tpr, tp / p, tp / np.maximum(tp + fp, 1.0)


def _image_score(score: np.ndarray, fg: np.ndarray) -> float:
    """The stated image score: the 99th percentile of the map inside the foreground."""
    values = score[fg] if fg.any() else score.reshape(-1)
    return float(np.percentile(values, IMAGE_PERCENTILE)) if values.size else 0.0


def item_stats(score: np.ndarray, pred: np.ndarray, truth: Optional[np.ndarray], fg: np.ndarray,
               label: int) -> dict[str, Any]:
    """Per-image numbers: image score, and with pixel truth Dice, map AUROC/AUPRC in the foreground, FP share."""
    from .metrics import auprc, auroc, dice

    out: dict[str, Any] = {"label": int(label), "image_score": _image_score(score, fg), "dice": math.nan,
                           "pixel_auroc": math.nan, "pixel_auprc": math.nan, "healthy_fp_fraction": math.nan,
                           "truth_pixels": None, "pred_pixels": int(pred.sum())}
    if truth is None:
        return out
    t = int(truth.sum())
    out["truth_pixels"] = t
    out["inter"] = int((pred & truth).sum())
    roi = fg | truth
    if t > 0:
        out["dice"] = dice(pred, truth)
        s, y = score[roi], truth[roi]
        if y.size > t:
            out["pixel_auroc"] = auroc(s, y)
        out["pixel_auprc"] = auprc(s, y)
    elif label == 0 and roi.any():
        out["healthy_fp_fraction"] = float(pred[roi].sum()) / float(roi.sum())
    return out


class UnitAgg:
    """What one bootstrap unit (a patient) contributes to every metric of one method."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.label = 0
        self.sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        self.scores: list[float] = []
        self.labels: list[int] = []
        self.hist_pos = np.zeros(HIST_BINS, np.int64)
        self.hist_neg = np.zeros(HIST_BINS, np.int64)

    def add(self, key: str, value: float) -> None:
        """One value of a mean-type metric (nan is ignored: not defined for this image)."""
        if value is not None and np.isfinite(value):
            self.sums[key][0] += float(value)
            self.sums[key][1] += 1


@dataclass
class RunOutput:
    """One method on one split at one threshold."""

    units: dict[str, UnitAgg]
    items: list[dict[str, Any]]
    volumes: list[dict[str, Any]]
    store: list[dict[str, Any]]  # validation: maps kept for the threshold search
    gallery: Optional[Gallery]
    skipped: list[str] = field(default_factory=list)  # cases the engine refused (no usable foreground, ...)


def _mean_metric(key: str) -> Callable[[Sequence[UnitAgg]], float]:
    def fn(units: Sequence[UnitAgg]) -> float:
        total = sum(u.sums[key][0] for u in units if key in u.sums)
        count = sum(u.sums[key][1] for u in units if key in u.sums)
        return total / count if count else math.nan

    return fn


def _max_metric(key: str) -> Callable[[Sequence[UnitAgg]], float]:
    """The largest single value of a per-item metric (units hold one value each, as 3D volumes do)."""
    def fn(units: Sequence[UnitAgg]) -> float:
        values = [u.sums[key][0] / u.sums[key][1] for u in units if key in u.sums and u.sums[key][1]]
        return max(values) if values else math.nan

    return fn


def _pooled_metric(key: str, all_units: Sequence[UnitAgg]) -> Callable[[Sequence[UnitAgg]], float]:
    hp = np.stack([u.hist_pos for u in all_units]).astype(np.float64)
    hn = np.stack([u.hist_neg for u in all_units]).astype(np.float64)
    area = hist_auroc if key == "pixel_auroc" else hist_auprc

    def fn(units: Sequence[UnitAgg]) -> float:
        w = np.bincount([u.index for u in units], minlength=len(all_units)).astype(np.float64)
        return area(w @ hp, w @ hn)

    return fn


def _image_metric(key: str, image_thr: float) -> Callable[[Sequence[UnitAgg]], float]:
    from .metrics import auprc, auroc

    def fn(units: Sequence[UnitAgg]) -> float:
        s = np.concatenate([np.asarray(u.scores, np.float64) for u in units]) if units else np.zeros(0)
        y = np.concatenate([np.asarray(u.labels, bool) for u in units]) if units else np.zeros(0, bool)
        if s.size == 0:
            return math.nan
        if key == "image_auroc":
            return auroc(s, y)
        if key == "image_auprc":
            return auprc(s, y)
        if not np.isfinite(image_thr) or y.all() or not y.any():
            return math.nan
        return 0.5 * (float((s[y] >= image_thr).mean()) + float((s[~y] < image_thr).mean()))

    return fn


def metric_function(key: str, units: Sequence[UnitAgg],
                    image_thr: float = math.nan) -> Callable[[Sequence[UnitAgg]], float]:
    """A function of a (resampled) list of units giving metric `key`."""
    if key in MEAN_METRICS:
        return _mean_metric(key)
    if key == "healthy_ml_max":
        return _max_metric("healthy_ml_volume")
    if key in ("pixel_auroc", "pixel_auprc"):
        return _pooled_metric(key, units)
    return _image_metric(key, image_thr)


def reported_metrics(data: EvalData) -> list[str]:
    """Metric keys for this kind of data: pixel-level ones only with pixel truth."""
    keys = [k for k, (level, _, _) in METRICS.items() if level != "pixel" or data.pixel_level]
    return keys


def summarise(run: RunOutput, keys: Sequence[str], image_thr: float, n_boot: int,
              seed: int) -> dict[str, dict[str, float]]:
    """Estimate and bootstrap 95 % interval of every metric, resampling units (patients) within their label."""
    from .metrics import bootstrap_ci

    units = sorted(run.units.values(), key=lambda u: u.index)
    strata = [u.label for u in units]
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        fn = metric_function(key, units, image_thr)
        est = fn(units)
        if not np.isfinite(est):
            out[key] = {"estimate": math.nan, "low": math.nan, "high": math.nan, "n_units": len(units)}
            continue
        if n_boot > 0:
            e, lo, hi = bootstrap_ci(fn, units, n=n_boot, seed=seed, strata=strata)
        else:
            e, lo, hi = est, math.nan, math.nan
        out[key] = {"estimate": e, "low": lo, "high": hi, "n_units": len(units)}
    return out


def paired_difference(run_a: RunOutput, run_b: RunOutput, key: str, thr_a: float, thr_b: float, n_boot: int,
                      seed: int) -> tuple[float, float, float]:
    """A - B for one metric with a paired bootstrap interval (the same units resampled for both)."""
    from .metrics import bootstrap_ci

    ids = sorted(set(run_a.units) & set(run_b.units))
    ua = sorted(run_a.units.values(), key=lambda u: u.index)
    ub = sorted(run_b.units.values(), key=lambda u: u.index)
    fa, fb = metric_function(key, ua, thr_a), metric_function(key, ub, thr_b)
    strata = [run_a.units[i].label for i in ids]

    def fn(sample: Sequence[str]) -> float:
        return fa([run_a.units[i] for i in sample]) - fb([run_b.units[i] for i in sample])

    if n_boot <= 0:
        return fn(ids), math.nan, math.nan
    return bootstrap_ci(fn, ids, n=n_boot, seed=seed, strata=strata)
