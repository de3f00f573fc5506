"""Methods of `synomaly evaluate` (a model file and a number of stages) and their runs: every case detected at
one threshold, with per-image, per-volume and per-patient numbers."""

from __future__ import annotations

import logging
import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .evaldata import EvalCase
from .evalplots import Gallery
from .evalstats import HIST_BINS, RunOutput, UnitAgg, item_stats, map_top, score_bins
from .progress import ProgressFn, null_progress

log = logging.getLogger(__name__)


AUTO_BASE = {"synomaly": "synomaly", "gaussian": "gaussian", "coarse": "dae"}


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
    smooth: Optional[float] = None  # volumes: sigma (mm) of the smoothing across slices; None: each card's
    region: Optional[str] = None  # volumes: "foreground", "brain" or "brain-stripped" (contract.REGIONS); None: each card's
    min_size: float = 50.0
    seed: int = 0
    bootstrap: int = 1000
    batch_size: Optional[int] = None  # slices per network call; None: the measured plan
    device: str = "auto"
    precision: str = "auto"
    gallery_k: int = 2
    baseline: Optional[str] = None  # a method's name: every other method's paired difference from it is reported


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


def _detection_settings(stages: int, threshold: float, s: EvalSettings):
    """The engine's settings for one run. Thresholds from the card are left for the engine to resolve (the
    same calibrated value `threshold` holds), so the card's whole operating point applies, its hysteresis
    (grow FPR) included, exactly as a user's detection at that rate gets it."""
    from .detect import DetectionSettings

    by_card = s.threshold_from == "card"
    return DetectionSettings(t=s.t, blur_kernel=s.blur, smooth_mm=s.smooth, region=s.region,
                             threshold=None if by_card else float(threshold), fpr=s.card_fpr if by_card else None, max_stages=int(stages), min_lesion_mm3=s.min_size,
                             seed=s.seed, batch_size=s.batch_size, device=s.device, precision=s.precision)


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
                bins = score_bins(s_roi, map_top(result.report))
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
