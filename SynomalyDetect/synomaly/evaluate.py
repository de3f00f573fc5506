"""`synomaly evaluate`: several methods on the same data with the same post-processing, thresholds chosen
on the validation split (or taken from each model card), never on the test split; bootstrap confidence
intervals over patients; a Markdown + CSV + PNG report.

A method is a model file run with a number of stages: `synomaly-multi` (a Synomaly-noise model with the
card's max_stages), `synomaly-single` (the same model, one stage), `gaussian-multi`/`gaussian-single`
(a model trained with `synomaly train --noise gaussian`, the AnoDDPM-style baseline) and `dae` (a model
trained with `--noise coarse`: the denoising autoencoder of Kascenas et al. 2023, one pass, t unused).
"""

from __future__ import annotations

import csv
import heapq
import json
import logging
import math
import os
import re
import shutil
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError
from .evaldata import EvalCase, EvalData
from .progress import ProgressFn, null_progress

log = logging.getLogger(__name__)

AUTO_BASE = {"synomaly": "synomaly", "gaussian": "gaussian", "coarse": "dae"}
IMAGE_SCORE = "the 99th percentile of the anomaly map inside the image's foreground"
IMAGE_PERCENTILE = 99.0
CAVEAT = ("These are not BraTS numbers: the data are what can be had on this machine (see Data), the models "
          "are ours, and nothing here is comparable with the paper's tables except in direction.")
COMPARISONS = (  # (A, B, what a positive A - B supports)
    ("synomaly-multi", "gaussian-multi", "Synomaly noise beats Gaussian noise (multi-stage)"),
    ("synomaly-single", "gaussian-single", "Synomaly noise beats Gaussian noise (single stage)"),
    ("synomaly-multi", "synomaly-single", "multi-stage beats single stage (Synomaly noise)"),
    ("gaussian-multi", "gaussian-single", "multi-stage beats single stage (Gaussian noise)"),
    ("synomaly-multi", "dae", "Synomaly multi-stage beats the coarse-noise denoising autoencoder"),
)

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


# ---------------------------------------------------------------- methods


@dataclass
class Method:
    """One evaluated method: a model file run with a number of stages (None: the card's max_stages)."""

    name: str
    model: str
    stages: Optional[int] = None


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def parse_method(spec: str) -> Method:
    """'NAME=MODEL_FILE:STAGES' (STAGES a number or 'card'; ':STAGES' may be left out) -> Method."""
    if "=" not in spec:
        raise InputError(f"--method {spec!r}: use NAME=MODEL_FILE:STAGES, "
                         "e.g. synomaly-multi=models/brain.safetensors:5")
    name, rest = spec.split("=", 1)
    if not _NAME.match(name):
        raise InputError(f"--method {spec!r}: the name may hold letters, digits and . _ + - only")
    model, stages = rest, None
    if ":" in rest:
        head, tail = rest.rsplit(":", 1)
        if tail.isdigit() or tail == "card":
            model, stages = head, (None if tail == "card" else int(tail))
    if not model:
        raise InputError(f"--method {spec!r}: no model file")
    if stages is not None and stages < 1:
        raise InputError(f"--method {spec!r}: stages must be at least 1")
    return Method(name, model, stages)


def auto_methods(models: Sequence[str], stages: Optional[int] = None) -> list[Method]:
    """Methods named after each model's noise kind: NAME-multi and NAME-single for diffusion models, 'dae'
    for a coarse-noise model; a model's card name replaces the kind when two models share a kind."""
    from .modelio import read_card, resolve_model_path

    cards = [(m, read_card(resolve_model_path(m))) for m in models]
    counts: dict[str, int] = defaultdict(int)
    for _, card in cards:
        counts[card.noise.kind] += 1
    out: list[Method] = []
    for m, card in cards:
        kind = card.noise.kind
        base = AUTO_BASE[kind] if counts[kind] == 1 else re.sub(r"[^A-Za-z0-9._+-]", "-", card.name)
        if card.noise.kind == "coarse":
            out.append(Method(base, m, 1))
        else:
            out.extend([Method(f"{base}-multi", m, stages), Method(f"{base}-single", m, 1)])
    names = [x.name for x in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"two models give the method name(s) {', '.join(dupes)}; "
                         "name them with --method NAME=FILE:STAGES")
    return out


def select_methods(models: Sequence[str], specs: Sequence[str], names: Optional[Sequence[str]],
                   stages: Optional[int] = None) -> list[Method]:
    """The methods of a run: automatic ones from --model, explicit --method specs, filtered by --methods."""
    methods = auto_methods(models, stages) if models else []
    methods += [parse_method(s) for s in specs]
    if not methods:
        raise InputError("no method: give --model MODEL_FILE (repeatable) or --method NAME=MODEL_FILE:STAGES")
    if names:
        known = {m.name: m for m in methods}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise InputError(f"--methods: unknown method(s) {', '.join(unknown)}; available: {', '.join(known)}")
        methods = [known[n] for n in names]
    seen = [m.name for m in methods]
    if len(set(seen)) != len(seen):
        raise InputError(f"method names must differ: {', '.join(seen)}")
    return methods


# ---------------------------------------------------------------- settings


@dataclass
class EvalSettings:
    """How every method is run and judged (the same for all methods)."""

    threshold_from: str = "val"  # "val" or "card"
    val_rule: str = "auto"  # "dice", "fpr" or "auto" (dice when validation masks hold anomalies)
    target_fpr: float = 1e-3  # per-pixel FPR on validation negatives, for the "fpr" rule
    card_fpr: Optional[float] = None  # which calibrated FPR of the card (None: the engine's default rule)
    val_passes: int = 2  # multi-stage: threshold passes after the single-stage seed (as calibrate does)
    image_fpr: float = 0.05  # image threshold when the validation split lacks anomalous images
    t: Optional[int] = None
    blur: Optional[int] = None
    min_size: float = 50.0
    seed: int = 0
    bootstrap: int = 1000
    batch_size: int = 8
    device: str = "auto"
    precision: str = "auto"
    gallery_k: int = 2


# ---------------------------------------------------------------- per-case evaluation


def _score_bins(values: np.ndarray) -> np.ndarray:
    """Histogram bin of each score in [0, 2] on a square-root scale (HIST_BINS bins)."""
    v = np.sqrt(np.clip(values.astype(np.float64, copy=False), 0.0, 2.0) / 2.0)
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


@dataclass
class CaseArrays:
    """A case's arrays in axial display order (Z, Y, X) after detection."""

    image: np.ndarray
    counterfactual: np.ndarray
    score: np.ndarray
    pred: np.ndarray
    truth: Optional[np.ndarray]
    fg: np.ndarray
    spacing: tuple[float, ...]
    is_2d: bool


def _oriented_arrays(image: sitk.Image, truth: Optional[np.ndarray], result) -> CaseArrays:
    """Input, counterfactual, map, segmentation, truth and foreground, all as (Z, Y, X) axial arrays."""
    from .prepare import foreground_mask, orient_array, orientation_permutation, to_scalar

    img = to_scalar(image, color="luminance")
    arrays = [sitk.GetArrayFromImage(x).astype(np.float32) for x in (img, result.counterfactual, result.anomaly_map)]
    arrays.append(sitk.GetArrayFromImage(result.segmentation) > 0)
    arrays.append(truth)
    is_2d = img.GetDimension() == 2
    if is_2d:
        arrays = [None if a is None else a[None] for a in arrays]
    else:
        tr, fl = orientation_permutation(img, "axial")
        arrays = [None if a is None else np.ascontiguousarray(orient_array(a, tr, fl)) for a in arrays]
    fg = foreground_mask(arrays[0])
    return CaseArrays(*arrays, fg=fg, spacing=tuple(img.GetSpacing()), is_2d=is_2d)


def _item_slices(a: CaseArrays) -> list[Optional[int]]:
    """Items of a case: its one 2D image; slices with foreground (engine rule) when pixel truth is known;
    else the whole volume (None)."""
    if a.is_2d:
        return [0]
    if a.truth is None:
        return [None]
    z, h, w = a.fg.shape
    area = a.fg.reshape(z, -1).sum(1)
    return [int(k) for k in np.nonzero(area >= max(16, 0.02 * h * w))[0]]


def _pick(arr: Optional[np.ndarray], z: Optional[int]) -> Optional[np.ndarray]:
    return None if arr is None else (arr if z is None else arr[z])


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


class Gallery:
    """The best and worst anomalous images and the worst healthy image of one method, as picture rows."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.best: list = []
        self.worst: list = []
        self.alarm: list = []
        self.n = 0

    def _offer(self, heap: list, size: int, key: float, make: Callable[[], tuple[str, np.ndarray]]) -> None:
        self.n += 1
        if len(heap) < size:
            heapq.heappush(heap, (key, self.n, make()))
        elif key > heap[0][0]:
            heapq.heapreplace(heap, (key, self.n, make()))

    def offer(self, stats: dict[str, Any], make: Callable[[], tuple[str, np.ndarray]]) -> None:
        """Consider one image: anomalous ranked by Dice (or image score without masks), healthy by image score."""
        if stats["label"] == 1:
            key = stats["dice"] if np.isfinite(stats["dice"]) else stats["image_score"]
            self._offer(self.best, self.k, key, make)
            self._offer(self.worst, self.k, -key, make)
        else:
            self._offer(self.alarm, 1, stats["image_score"], make)

    def sections(self, method: str) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
        """(title, rows) for the gallery picture."""
        best = [p for _, _, p in sorted(self.best, key=lambda e: -e[0])]
        worst = [p for _, _, p in sorted(self.worst, key=lambda e: -e[0])]
        alarm = [p for _, _, p in self.alarm]
        return [("best anomalous images", best), ("worst anomalous images", worst),
                ("healthy image with the highest score", alarm)]


@dataclass
class RunOutput:
    """One method on one split at one threshold."""

    units: dict[str, UnitAgg]
    items: list[dict[str, Any]]
    volumes: list[dict[str, Any]]
    store: list[dict[str, Any]]  # validation: maps kept for the threshold search
    gallery: Optional[Gallery]
    skipped: list[str] = field(default_factory=list)  # cases the engine refused (no usable foreground, ...)


def _detection_settings(stages: int, threshold: float, s: EvalSettings):
    from .detect import DetectionSettings

    return DetectionSettings(t=s.t, blur_kernel=s.blur, threshold=float(threshold), max_stages=int(stages),
                             min_lesion_mm3=s.min_size, seed=s.seed, batch_size=s.batch_size, device=s.device,
                             precision=s.precision)


def run_cases(model, cases: Sequence[EvalCase], stages: int, threshold: float, s: EvalSettings, *,
              keep_maps: bool = False, gallery: Optional[Gallery] = None, progress: ProgressFn = null_progress,
              what: str = "") -> RunOutput:
    """Detect every case at one threshold and collect per-image, per-volume and per-unit numbers."""
    from .detect import detect
    from .metrics import auprc, auroc

    settings = _detection_settings(stages, threshold, s)
    skipped: list[str] = []
    units: dict[str, UnitAgg] = {}
    items: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    store: list[dict[str, Any]] = []
    vol_buf: dict[str, Any] = {}

    def close_volume() -> None:
        if not vol_buf:
            return
        v = dict(vol_buf)
        vol_buf.clear()
        if v["truth"] is None:
            return
        row = {"volume": v["volume"], "unit": v["unit"], "label": v["label"], "dice": math.nan,
               "pixel_auroc": math.nan, "pixel_auprc": math.nan, "truth_pixels": v["truth"], "pred_pixels": v["pred"]}
        if v["truth"] > 0:
            row["dice"] = 2.0 * v["inter"] / (v["pred"] + v["truth"])
            s_all, y_all = np.concatenate(v["s"]), np.concatenate(v["y"])
            row["pixel_auprc"] = auprc(s_all, y_all)
            if not y_all.all():
                row["pixel_auroc"] = auroc(s_all, y_all)
            u = units[v["unit"]]
            u.add("dice_volume", row["dice"])
            u.add("pixel_auprc_volume", row["pixel_auprc"])
            u.add("pixel_auroc_volume", row["pixel_auroc"])
        volumes.append(row)

    order = sorted(range(len(cases)), key=lambda i: (cases[i].unit, cases[i].volume, cases[i].name))
    for n, i in enumerate(order):
        case = cases[i]
        progress("evaluate", n, len(cases), f"{what} {case.name}".strip())
        image, truth = case.load()
        if truth is None and case.label == 0:
            truth = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=bool)  # healthy: nothing to find
        t0 = time.perf_counter()
        try:
            result = detect(image, model, settings)
        except InputError as exc:  # depends on the image only, so every method skips the same cases
            log.warning("%s: skipped (%s)", case.name, exc)
            skipped.append(f"{case.name}: {exc}")
            continue
        seconds = time.perf_counter() - t0
        a = _oriented_arrays(image, truth, result)
        if case.unit not in units:
            units[case.unit] = UnitAgg(len(units))
        u = units[case.unit]
        if case.label == 0 and image.GetDimension() == 3:
            u.add("healthy_ml_volume", float(result.report["anomalous_volume_ml"]))
        if vol_buf and vol_buf["volume"] != case.volume:
            close_volume()
        if not vol_buf:
            vol_buf.update(volume=case.volume, unit=case.unit, label=0, truth=0 if truth is not None else None,
                           pred=0, inter=0, s=[], y=[])
        if truth is None:
            vol_buf["truth"] = None
        slices = _item_slices(a)
        per_item_seconds = seconds / max(1, len(slices))
        for z in slices:
            sc, pr, tr, fg = _pick(a.score, z), _pick(a.pred, z), _pick(a.truth, z), _pick(a.fg, z)
            # a 2D image keeps its own label; a slice of a volume with pixel truth is anomalous where the truth is
            label = int(tr.any()) if (tr is not None and not a.is_2d) else case.label
            st = item_stats(sc, pr, tr, fg, label)
            st["seconds"] = per_item_seconds
            row = {"case": case.name, "unit": case.unit, "volume": case.volume,
                   "slice": "" if (a.is_2d or z is None) else z, **st}
            items.append(row)
            u.label = max(u.label, st["label"])
            vol_buf["label"] = max(vol_buf["label"], st["label"])
            u.scores.append(st["image_score"])
            u.labels.append(st["label"])
            u.add("dice_image", st["dice"])
            u.add("pixel_auroc_image", st["pixel_auroc"])
            u.add("pixel_auprc_image", st["pixel_auprc"])
            u.add("healthy_fp_fraction", st["healthy_fp_fraction"])
            u.add("seconds_per_image", per_item_seconds)
            if tr is not None:
                roi = fg | tr
                s_roi, y_roi = sc[roi], tr[roi]
                bins = _score_bins(s_roi)
                u.hist_pos += np.bincount(bins[y_roi], minlength=HIST_BINS)
                u.hist_neg += np.bincount(bins[~y_roi], minlength=HIST_BINS)
                if vol_buf["truth"] is not None:
                    vol_buf["truth"] += int(tr.sum())
                    vol_buf["pred"] += int(pr.sum())
                    vol_buf["inter"] += int((pr & tr).sum())
                    vol_buf["s"].append(s_roi)
                    vol_buf["y"].append(y_roi)
            if gallery is not None:
                caption = f"{case.name}{'' if row['slice'] == '' else ' slice ' + str(z)}: " + (
                    f"Dice {st['dice']:.2f}, " if np.isfinite(st["dice"]) else "") + f"score {st['image_score']:.3f}"

                def make(z=z, caption=caption, a=a):
                    from .evalplots import tile_row

                    zz = z if z is not None else _best_slice(a)
                    return caption, tile_row(a.image[zz], a.counterfactual[zz], a.score[zz], a.pred[zz],
                                             None if a.truth is None else a.truth[zz], threshold)

                gallery.offer(st, make)
        if keep_maps:
            store.append({"score": a.score, "truth": a.truth, "fg": a.fg, "spacing": a.spacing,
                          "label": case.label})
    close_volume()
    progress("evaluate", len(cases), len(cases), f"{what} done".strip())
    return RunOutput(units, items, volumes, store, gallery, skipped)


def _best_slice(a: CaseArrays) -> int:
    """The slice to show for a whole-volume item: most truth, else the highest map."""
    if a.truth is not None and a.truth.any():
        return int(np.argmax(a.truth.reshape(a.truth.shape[0], -1).sum(1)))
    return int(np.argmax(a.score.reshape(a.score.shape[0], -1).max(1)))


# ---------------------------------------------------------------- thresholds (validation split only)


def _pooled_dice(store: list[dict[str, Any]], threshold: float, min_mm3: float) -> float:
    """Dice of all validation pixels together at a threshold, after the engine's post-processing."""
    from .detect import postprocess

    inter = pred = truth = 0
    for e in store:
        if e["truth"] is None:
            continue
        binary, _ = postprocess(e["score"], threshold, e["spacing"], min_mm3)
        inter += int((binary & e["truth"]).sum())
        pred += int(binary.sum())
        truth += int(e["truth"].sum())
    return 2.0 * inter / (pred + truth) if pred + truth else 1.0


def threshold_max_dice(store: list[dict[str, Any]], min_mm3: float) -> tuple[float, float]:
    """The threshold (and its Dice) maximising pooled validation Dice: 48 quantiles of the validation map,
    then 16 steps between the best one's neighbours."""
    values = np.concatenate([e["score"][e["fg"] | e["truth"]] for e in store if e["truth"] is not None])
    if values.size == 0:
        raise InputError("the validation split has no foreground pixels with known truth")
    levels = 1.0 - np.geomspace(0.5, 1e-5, 48)
    cands = np.unique(np.quantile(values, levels))
    scores = [_pooled_dice(store, c, min_mm3) for c in cands]
    i = int(np.argmax(scores))
    lo, hi = cands[max(0, i - 1)], cands[min(len(cands) - 1, i + 1)]
    fine = np.linspace(lo, hi, 18)[1:-1]
    fine_scores = [_pooled_dice(store, c, min_mm3) for c in fine]
    all_c = np.concatenate([cands, fine])
    all_s = np.concatenate([scores, fine_scores])
    j = int(np.argmax(all_s))
    return float(all_c[j]), float(all_s[j])


def threshold_at_pixel_fpr(store: list[dict[str, Any]], fpr: float) -> float:
    """The threshold flagging at most `fpr` of the validation foreground pixels known to be healthy."""
    from .metrics import threshold_at_fpr

    negatives = [e["score"][e["fg"] & ~e["truth"]] for e in store if e["truth"] is not None]
    if not negatives or sum(v.size for v in negatives) == 0:
        raise InputError("the validation split has no pixels known to be healthy to set a threshold on")
    return threshold_at_fpr(negatives, fpr)


def image_threshold(items: list[dict[str, Any]], fpr: float) -> tuple[float, str]:
    """Image-score threshold from validation items: maximum balanced accuracy, or a healthy FPR when the
    validation split has only healthy images."""
    from .metrics import roc_curve, threshold_at_fpr

    scores = np.array([r["image_score"] for r in items], dtype=np.float64)
    labels = np.array([r["label"] for r in items], dtype=bool)
    if labels.all() or scores.size == 0:
        return math.nan, "no healthy validation image"
    if not labels.any():
        return threshold_at_fpr(scores, fpr), f"healthy validation images at image FPR {fpr:g}"
    fpr_c, tpr_c, thr = roc_curve(scores, labels)
    j = int(np.argmax(tpr_c - fpr_c))
    return float(thr[j]), "maximum balanced accuracy on the validation images"


def choose_threshold(model, method: Method, stages: int, val_cases: Sequence[EvalCase], s: EvalSettings,
                     progress: ProgressFn = null_progress, volume: bool = False) -> dict[str, Any]:
    """The pixel threshold of a method and where it came from; validation or card, never the test split.

    Validation: 'dice' maximises pooled Dice (after post-processing) on the validation images; 'fpr'
    takes the threshold at a per-pixel false-positive rate on validation pixels known to be healthy.
    A multi-stage map depends on its threshold (fusion): a single-stage pass proposes a threshold, each
    of up to `val_passes` multi-stage passes runs with the current proposal and proposes the next (stopping
    within 2 %). 'dice' then uses the proposal whose own pass gave the best Dice, 'fpr' the smallest
    proposal whose own pass met the FPR (else the largest one tried): the chosen threshold was measured
    while driving the fusion.
    """
    from .detect import DetectionSettings, resolve_settings

    card = model.card
    info: dict[str, Any] = {"val_images": len(val_cases)}
    if s.threshold_from == "card":
        _, _, _, thr, source = resolve_settings(DetectionSettings(t=s.t, blur_kernel=s.blur, max_stages=stages,
                                                                  fpr=s.card_fpr), card, volume)
        info.update(threshold=thr, source=f"model card: {source}", rule="card")
        cal = card.calibration_for(volume) or {}
        if cal.get("max_stages") is not None and int(cal["max_stages"]) != stages and "calibrated" in source:
            info["source"] += f" (calibrated with {cal['max_stages']} stages, used with {stages})"
        if val_cases:
            out = run_cases(model, val_cases, stages, thr, s, progress=progress, what=f"{method.name} val")
            info["image_threshold"], info["image_threshold_rule"] = image_threshold(out.items, s.image_fpr)
        return info
    if not val_cases:
        raise InputError("the data have no validation split to choose thresholds on; use --threshold-from card")
    out = run_cases(model, val_cases, 1, card.detection.threshold, s, keep_maps=True, progress=progress,
                    what=f"{method.name} val pass 1")
    has_anomaly = any(e["truth"] is not None and e["truth"].any() for e in out.store)
    rule = s.val_rule if s.val_rule != "auto" else ("dice" if has_anomaly else "fpr")
    if rule == "dice" and not has_anomaly:
        raise InputError("--val-rule dice needs validation images with anomaly masks; use --val-rule fpr")

    def pick(store) -> float:
        if rule == "dice":
            return threshold_max_dice(store, s.min_size)[0]
        return threshold_at_pixel_fpr(store, s.target_fpr)

    def own_dice(store, thr: float) -> float:
        return _pooled_dice(store, thr, s.min_size) if has_anomaly else math.nan

    def own_fpr(store, thr: float) -> float:
        neg = [e["score"][e["fg"] & ~e["truth"]] for e in store if e["truth"] is not None]
        n = sum(v.size for v in neg)
        return sum(int((v >= thr).sum()) for v in neg) / n if n else math.nan

    proposal = pick(out.store)
    # (threshold driving the fusion, its own validation Dice, its own healthy-pixel FPR, the pass's items);
    # a single-stage map does not depend on the threshold, so one pass measures it exactly
    measured = []
    if stages == 1:
        measured.append((proposal, own_dice(out.store, proposal), own_fpr(out.store, proposal), out.items))
    if stages > 1:
        for p in range(max(1, s.val_passes)):
            out = run_cases(model, val_cases, stages, proposal, s, keep_maps=True, progress=progress,
                            what=f"{method.name} val pass {p + 2}")
            measured.append((proposal, own_dice(out.store, proposal), own_fpr(out.store, proposal), out.items))
            new = pick(out.store)
            done = abs(new - proposal) <= 0.02 * max(abs(proposal), 1e-9)
            proposal = new
            if done:
                break
    if rule == "dice":
        # the best threshold whose Dice was measured with that same threshold driving the stage fusion
        thr, val_dice, val_fpr, items = max(measured, key=lambda m: (m[1], -m[0]))
        how = "maximum pooled Dice (after post-processing)"
    else:
        # the most sensitive measured threshold that meets the FPR with itself driving the fusion
        ok = [m for m in measured if m[2] <= s.target_fpr * (1 + 1e-9)]
        if ok:
            thr, val_dice, val_fpr, items = min(ok, key=lambda m: m[0])
        else:
            last = max(measured, key=lambda m: m[0])
            thr, val_dice, val_fpr, items = max(proposal, last[0]), math.nan, math.nan, last[3]
        how = f"per-pixel FPR {s.target_fpr:g} on validation pixels known to be healthy"
    tried = [m[0] for m in measured]
    if stages > 1:
        how += "; multi-stage fusion thresholds tried " + ", ".join(
            f"{m[0]:.4g} (" + (f"Dice {m[1]:.3f}" if rule == "dice" else f"FPR {m[2]:.2g}") + ")" for m in measured)
    info.update(threshold=float(thr), rule=rule, val_dice=val_dice, val_fpr=val_fpr, tried=tried,
                source=f"validation split ({len(val_cases)} images/volumes): {how}")
    info["image_threshold"], info["image_threshold_rule"] = image_threshold(items, s.image_fpr)
    return info


# ---------------------------------------------------------------- metrics over units, bootstrap


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


# ---------------------------------------------------------------- the whole evaluation


@dataclass
class MethodResult:
    """Everything about one method's evaluation."""

    method: Method
    card: dict[str, Any]
    stages: int
    t: int
    blur: int
    threshold: dict[str, Any]
    run: RunOutput
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0


def evaluate_methods(methods: Sequence[Method], data: EvalData, s: EvalSettings,
                     progress: ProgressFn = null_progress) -> list[MethodResult]:
    """Run every method: threshold on validation (or card), then the test split; metrics with intervals."""
    from .detect import DetectionSettings, resolve_settings
    from .modelio import load_model

    models: dict[str, Any] = {}
    results = []
    keys = reported_metrics(data)
    for m in methods:
        if m.model not in models:
            models[m.model] = load_model(m.model, device=s.device, precision=s.precision)
        model = models[m.model]
        card = model.card
        volume = data.kind == "implanted"  # whole volumes; Br35H and prepared datasets are 2D slices
        stages = int(m.stages or card.detection_for(volume).max_stages)
        ts, k, _, _, _ = resolve_settings(DetectionSettings(t=s.t, blur_kernel=s.blur, max_stages=stages,
                                                            threshold=0.0), card, volume)
        t = ts[0] if len(ts) == 1 else "+".join(str(v) for v in ts)
        t0 = time.perf_counter()
        thr = choose_threshold(model, m, stages, data.val, s, progress, volume)  # the test split is not passed
        run = run_cases(model, data.test, stages, thr["threshold"], s, gallery=Gallery(s.gallery_k),
                        progress=progress, what=f"{m.name} test")
        res = MethodResult(m, {"name": card.name, "noise": card.noise.kind, "version": card.version,
                               "grid": card.grid_size, "training_data": card.training.get("data", "")},
                           stages, t, k, thr, run)
        res.metrics = summarise(run, keys, thr.get("image_threshold", math.nan), s.bootstrap, s.seed)
        res.seconds = time.perf_counter() - t0
        results.append(res)
        log.info("%s: threshold %.4g (%s)", m.name, thr["threshold"], thr["source"])
    return results


def comparisons(results: Sequence[MethodResult], data: EvalData, s: EvalSettings) -> list[dict[str, Any]]:
    """The paper's claims as paired differences between methods present in this run."""
    by_name = {r.method.name: r for r in results}
    keys = ["dice_image", "pixel_auprc"] if data.pixel_level else []
    keys += ["image_auroc"]
    rows = []
    for a, b, claim in COMPARISONS:
        if a not in by_name or b not in by_name:
            continue
        ra, rb = by_name[a], by_name[b]
        for key in keys:
            est, lo, hi = paired_difference(ra.run, rb.run, key, ra.threshold.get("image_threshold", math.nan),
                                            rb.threshold.get("image_threshold", math.nan), s.bootstrap, s.seed)
            if not np.isfinite(est):
                continue
            if np.isfinite(lo) and lo > 0:
                verdict = "supports the claim"
            elif np.isfinite(hi) and hi < 0:
                verdict = "contradicts the claim"
            else:
                verdict = "inconclusive (interval includes 0)"
            rows.append({"a": a, "b": b, "claim": claim, "metric": key, "difference": est, "low": lo, "high": hi,
                         "verdict": verdict})
    return rows


# ---------------------------------------------------------------- report


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _csv(v: Any) -> Any:
    """A CSV cell: empty for None/nan, 6 significant digits for floats."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.6g}"
    return v


def ci_text(m: dict[str, float], digits: int = 3) -> str:
    """An estimate with its bootstrap interval, '0.812 [0.790, 0.834]', or 'n/a'."""
    if not np.isfinite(m.get("estimate", math.nan)):
        return "n/a"
    text = f"{m['estimate']:.{digits}f}"
    if np.isfinite(m.get("low", math.nan)):
        text += f" [{m['low']:.{digits}f}, {m['high']:.{digits}f}]"
    return text


def _curves(results: Sequence[MethodResult], data: EvalData) -> tuple[np.ndarray, np.ndarray]:
    """ROC and PR pictures: pixel-level (pooled, when there is pixel truth) and image-level panels."""
    from .evalplots import curve_panel, side_by_side
    from . import metrics
    from .metrics import precision_recall_curve, roc_curve

    roc_panels, pr_panels = [], []
    if data.pixel_level:
        rocs, prs, prevalence = [], [], math.nan
        for r in results:
            hp = sum(u.hist_pos for u in r.run.units.values())
            hn = sum(u.hist_neg for u in r.run.units.values())
            if hp.sum() == 0 or hn.sum() == 0:
                continue
            fpr, tpr, rec, prec = hist_curves(hp, hn)
            rocs.append((f"{r.method.name} (AUROC {hist_auroc(hp, hn):.3f})", fpr, tpr))
            prs.append((f"{r.method.name} (AUPRC {hist_auprc(hp, hn):.3f})", rec, prec))
            prevalence = hp.sum() / (hp.sum() + hn.sum())
        roc_panels.append(curve_panel(rocs, "Pixel level (foreground pixels pooled)", "false-positive rate",
                                      "true-positive rate", diagonal=True))
        pr_panels.append(curve_panel(prs, "Pixel level (foreground pixels pooled)", "recall", "precision",
                                     baseline=prevalence))
    rocs, prs, prevalence = [], [], math.nan
    for r in results:
        s = np.array([x["image_score"] for x in r.run.items], np.float64)
        y = np.array([x["label"] for x in r.run.items], bool)
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(s, y)
        prec, rec, _ = precision_recall_curve(s, y)
        roc_area, pr_area = metrics.auroc(s, y), metrics.auprc(s, y)
        rocs.append((f"{r.method.name} (AUROC {roc_area:.3f})", fpr, tpr))
        prs.append((f"{r.method.name} (AUPRC {pr_area:.3f})", np.concatenate([[0.0], rec]),
                    np.concatenate([[prec[0]], prec])))
        prevalence = y.mean()
    roc_panels.append(curve_panel(rocs, "Image level (99th-percentile score)", "false-positive rate",
                                  "true-positive rate", diagonal=True))
    pr_panels.append(curve_panel(prs, "Image level (99th-percentile score)", "recall", "precision",
                                 baseline=prevalence))
    return side_by_side(roc_panels), side_by_side(pr_panels)


def _markdown(results: Sequence[MethodResult], data: EvalData, s: EvalSettings, command: str,
              comps: list[dict[str, Any]], device: str) -> str:
    from .contract import __version__

    keys = reported_metrics(data)
    lines = [f"# Synomaly evaluation on `{data.kind}` data", "",
             f"Made by: `{command}`  ",
             f"synomaly {__version__}, {time.strftime('%Y-%m-%d %H:%M')}, device {device}, seed {s.seed}, "
             f"{s.bootstrap} bootstrap resamples.", "",
             f"> **Caveat.** {CAVEAT}", "", "## Data", "", *data.description, "",
             "## Methods and thresholds", "",
             "The same data, post-processing (Gaussian blur of the map, threshold, connected components smaller "
             f"than {s.min_size:g} mm³ removed; mm² for 2D images) and rules for every method.", ""]
    if s.threshold_from == "card":
        lines.append("**Threshold source: each model card's calibration** (healthy scans only); the test split "
                     "is never used to choose a threshold.")
    else:
        lines.append("**Threshold source: the validation split** (rule per method below); the test split is never "
                     "used to choose a threshold.")
    lines += ["", "| method | model file | card name | noise | stages (max) | t | blur k | threshold | threshold "
              "source | image threshold |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        thr = r.threshold
        lines.append(f"| {r.method.name} | `{r.method.model}` | {r.card['name']} | {r.card['noise']} | {r.stages} | "
                     f"{'n/a (no diffusion)' if r.card['noise'] == 'coarse' else r.t} | {r.blur} | "
                     f"{_fmt(thr['threshold'], 4)} | {thr['source']}"
                     + (f"; validation Dice {_fmt(thr['val_dice'])}"
                        if np.isfinite(thr.get("val_dice", math.nan)) else "")
                     + f" | {_fmt(thr.get('image_threshold', math.nan), 4)} |")
    skipped = sorted({c for r in results for c in r.run.skipped})
    if skipped:
        lines += ["", f"Skipped test cases ({len(skipped)}; the engine refused them, for every method alike): "
                  + "; ".join(skipped[:20]) + (" ..." if len(skipped) > 20 else "")]
    lines += ["", "## Results on the test split", "",
              "Estimate [95 % bootstrap interval]; cases are resampled by patient/volume "
              f"({len(results[0].run.units) if results else 0} units), within their label.", ""]
    groups = [("Pixel level", [k for k in keys if METRICS[k][0] == "pixel"]),
              ("Image level, healthy images and runtime", [k for k in keys if METRICS[k][0] != "pixel"])]
    for title, gkeys in groups:
        if not gkeys:
            continue
        lines += [f"### {title}", "", "| method | " + " | ".join(METRICS[k][1] for k in gkeys) + " |",
                  "|---|" + "---|" * len(gkeys)]
        for r in results:
            lines.append(f"| {r.method.name} | " + " | ".join(ci_text(r.metrics[k], 4 if k == 'healthy_fp_fraction' else 3)
                                                            for k in gkeys) + " |")
        lines.append("")
    lines += ["## The paper's claims, tested", ""]
    if comps:
        lines += ["Paired bootstrap over the same test units: difference A - B, a positive value favours A.", "",
                  "| claim | A | B | metric | A - B [95 % interval] | verdict |", "|---|---|---|---|---|---|"]
        for c in comps:
            lines.append(f"| {c['claim']} | {c['a']} | {c['b']} | {c['metric']} | "
                         f"{c['difference']:+.3f} [{_fmt(c['low'])}, {_fmt(c['high'])}] | {c['verdict']} |")
        lines.append("")
        lines.append("If a verdict contradicts the paper, that is the finding: thresholds were not tuned on test "
                     "data, and reserved Br35H images (numbers >= 1050) were never read.")
    else:
        lines.append("Not tested: this run lacks the pairs of methods (synomaly-multi, gaussian-multi, "
                     "synomaly-single, gaussian-single, dae) the claims compare.")
    lines += ["", "## Definitions", ""]
    lines += [f"- **{METRICS[k][1]}** (`{k}`): {METRICS[k][2]}." for k in keys]
    lines += [f"- Image score: {IMAGE_SCORE}; the foreground is the engine's (`prepare.foreground_mask` on the "
              "axial input); pixel metrics count foreground pixels plus any truth pixel outside it.",
              "- Pooled pixel AUROC/AUPRC (and their curves) bin the map values into "
              f"{HIST_BINS} bins on a square-root scale over [0, 2] (bin width below 2.5e-4 up to a map value of 0.1); "
              "per-image and per-volume values are exact.",
              "- Volumes: slices of one volume are pooled for per-volume numbers; per-image numbers count each 2D "
              "image or each slice of a volume (slices with the engine's minimum foreground).",
              "- Multi-stage maps depend on the threshold (it drives the fusion): a single-stage validation pass "
              f"proposes a threshold, then up to {s.val_passes} multi-stage passes each run with the current proposal "
              "and propose the next; the Dice rule keeps the proposal whose own pass scored best, the FPR rule the "
              "smallest proposal whose own pass met the FPR (else the largest tried).",
              "- Runtime depends on the machine and on what else it was running; compare methods within one run.",
              "", "## Figures", "", "![ROC curves](roc.png)", "", "![Precision-recall curves](pr.png)", "",
              "![Best and worst cases per method](gallery.png)", "",
              "## Files", "",
              "- `results.csv`: one row per method and metric (estimate, interval, units).",
              "- `per_case.csv`: one row per method and test image (level `image`) or volume (level `volume`).",
              "- `evaluation.json`: settings, thresholds, data description, comparisons.", ""]
    return "\n".join(lines)


def write_report(results: Sequence[MethodResult], data: EvalData, s: EvalSettings, out: str | Path, command: str,
                 overwrite: bool = False, device: str = "") -> dict[str, str]:
    """report.md, results.csv, per_case.csv, evaluation.json, roc.png, pr.png, gallery.png, written atomically."""
    import imageio.v3 as iio

    from .evalplots import gallery

    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists; choose another folder or pass --overwrite")
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    from .outputs import temp_folder

    tmp = temp_folder(parent, out.name)
    comps = comparisons(results, data, s)
    keys = reported_metrics(data)
    try:
        with open(tmp / "results.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["method", "metric", "level", "estimate", "ci_low", "ci_high", "n_units", "threshold",
                        "threshold_source", "definition"])
            for r in results:
                for k in keys:
                    m = r.metrics[k]
                    w.writerow([r.method.name, k, METRICS[k][0], _csv(m["estimate"]), _csv(m["low"]),
                                _csv(m["high"]), m["n_units"], _csv(r.threshold["threshold"]),
                                r.threshold["source"], METRICS[k][2]])
        cols = ["method", "level", "case", "unit", "volume", "slice", "label", "image_score", "dice", "pixel_auroc",
                "pixel_auprc", "truth_pixels", "pred_pixels", "healthy_fp_fraction", "seconds"]
        with open(tmp / "per_case.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in results:
                for row in r.run.items:
                    w.writerow({**{k: _csv(v) for k, v in row.items()}, "method": r.method.name, "level": "image"})
                for row in (r.run.volumes if data.pixel_level else []):
                    w.writerow({**{k: _csv(v) for k, v in row.items()}, "method": r.method.name, "level": "volume",
                                "case": row["volume"]})
        roc, pr = _curves(results, data)
        iio.imwrite(tmp / "roc.png", roc)
        iio.imwrite(tmp / "pr.png", pr)
        iio.imwrite(tmp / "gallery.png", gallery([(r.method.name, r.run.gallery.sections(r.method.name))
                                                  for r in results]))
        (tmp / "report.md").write_text(_markdown(results, data, s, command, comps, device), encoding="utf-8")
        summary = {
            "command": command, "settings": asdict(s), "data": {"kind": data.kind, "description": data.description,
                                                                 "pixel_level": data.pixel_level, **data.info},
            "methods": [{"name": r.method.name, "model": r.method.model, "stages": r.stages, "t": r.t,
                         "blur_kernel": r.blur, "card": r.card, "threshold": r.threshold, "metrics": r.metrics,
                         "seconds_total": round(r.seconds, 2)} for r in results],
            "comparisons": comps, "caveat": CAVEAT, "image_score": IMAGE_SCORE,
        }
        (tmp / "evaluation.json").write_text(json.dumps(finite(summary), indent=1, default=_json_default,
                                                        allow_nan=False), encoding="utf-8")
        if out.exists():
            old = parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    names = ["report.md", "results.csv", "per_case.csv", "evaluation.json", "roc.png", "pr.png", "gallery.png"]
    return {n: str(out / n) for n in names}


def finite(v: Any) -> Any:
    """Plain data with nan/inf floats replaced by None (strict JSON)."""
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return float(v) if np.isfinite(v) else None
    return v


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    return str(v)


def run_evaluation(methods: Sequence[Method], data_spec: str, out: str | Path, s: EvalSettings, *,
                   command: str = "", overwrite: bool = False, limit: Optional[int] = None,
                   templates: Sequence[str] = ("ch2", "robex", "itk-t1"), cases: int = 3, val_cases: int = 2,
                   forms: Sequence[str] = ("native", "brain", "oblique", "thick", "scaled"),
                   val_templates: Sequence[str] = ("oasis",), healthy_every: int = 3,
                   progress: ProgressFn = null_progress) -> dict[str, Any]:
    """Load the data, evaluate every method, write the report; returns file paths and the metrics."""
    from .device import resolve_device
    from .evaldata import load_eval_data

    from .modelio import read_card, resolve_model_path

    if s.threshold_from not in ("val", "card"):
        raise InputError("--threshold-from must be 'val' or 'card'")
    for m in methods:  # a missing or broken model file fails before any work
        read_card(resolve_model_path(m.model))
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists; choose another folder or pass --overwrite")
    progress("data", 0, 1, f"loading {data_spec}")
    data = load_eval_data(data_spec, limit=limit, templates=templates, cases=cases, val_cases=val_cases,
                          seed=s.seed, forms=forms, val_templates=val_templates, healthy_every=healthy_every)
    progress("data", 1, 1, f"{len(data.val)} validation and {len(data.test)} test cases")
    results = evaluate_methods(methods, data, s, progress)
    import torch

    device = f"{resolve_device(s.device)} ({torch.get_num_threads()} CPU threads)"
    files = write_report(results, data, s, out, command, overwrite=overwrite, device=device)
    return {"files": files, "methods": {r.method.name: {"threshold": r.threshold["threshold"],
                                                        "threshold_source": r.threshold["source"],
                                                        "metrics": r.metrics} for r in results}}
