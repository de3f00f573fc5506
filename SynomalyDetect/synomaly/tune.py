"""Label-free tuning on healthy volumes: choose a model's detection setting and operating point.

Synthetic lesions (lesions.implant_random_lesions) are implanted into healthy volumes that the model
did not train on, each volume is also turned into the forms a site may send (lesions.scan_form), and
detection runs over a grid of settings: noise level t, blur kernel, single or multi-stage, and
ensembles of noise levels (their healed images averaged into one map, or, asked for, one map per level in
units of that level's healthy tail, averaged). The setting with the best pooled pixel AUPRC on the implanted lesions
(on each scan's own grid, inside its foreground) wins; ties go to the cheaper one. Thresholds are then
calibrated on the untouched volumes under that setting, and the default false-positive rate is the
one with the best mean Dice on the implanted lesions that flags at most `max_healthy_ml` in every
lesion-free volume. Asked (choose_by "dice"), the few best settings by AUPRC are each calibrated so, and
the one whose operating point has the best mean Dice within that limit wins. Everything, the whole sweep
table included, goes into the model card as the setting for volumes (detection_3d, calibration_3d);
single 2D slices keep the card's other setting, since 3D lesions in volumes say nothing about what suits
a 2D slice.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InputError
from .progress import ProgressFn, null_progress

log = logging.getLogger(__name__)

AUPRC_TIE = 0.02  # settings within 2 % (relative) of the best pooled AUPRC count as tied; the cheaper one wins


@dataclass
class TuneGrid:
    """The settings tried. Blur kernels in model-grid pixels; ensembles average the healed images of
    several noise levels; the `smooth_top` best single-stage settings are also tried with the map smoothed
    across slices by each of `smooths` (sigma, mm); the `multi_top` best so far are also tried multi-stage."""

    ts: tuple[int, ...] = (5, 10, 25, 50, 100, 200, 400)
    blurs: tuple[int, ...] = (3, 5, 7, 9)
    ensembles: tuple[tuple[int, ...], ...] = ((5, 10, 25), (10, 25, 50), (25, 50, 100), (50, 100, 200))
    max_stages: int = 5
    multi_top: int = 2  # the best settings so far also tried multi-stage
    draws: int = 1
    more_draws: int = 4  # the best single-stage setting is also tried with this many noise draws (1: not)
    smooths: tuple[float, ...] = (2.0, 3.0, 4.0, 6.0)
    smooth_top: int = 4
    # map variants to try on those same best settings (detect.scan_map): the signed difference smoothed before
    # its magnitude is taken, and the map normalised per tissue class of the healed image. Off by default: on
    # the tuning volume they raised the pooled AUPRC (0.33 -> 0.39), on the held-out volumes they did not
    # (Docs/experiments.md, *The signed map and per-tissue normalisation*)
    signed: tuple[bool, ...] = (False,)
    tissue_bins: tuple[int, ...] = (0,)
    # ensembles also scored as one map per noise level, each in units of its healthy tail, averaged
    # (detect.scan_map levels), the tail measured on healthy tissue ("healthy") or in each scan ("scan");
    # off by default until the held-out volumes say (Docs/experiments.md, *Maps per noise level*)
    level_maps: tuple[str, ...] = ()
    # the `smooth_top` best settings (one map each, not maps per level) also tried with the map less its mirror
    # image across the registered brain's midline, that image grown by each of these (mm; detect.contralateral);
    # needs the brain region. Off by default
    mirror: tuple[float, ...] = ()
    # choose among the mirror rows only (an experiment: on a symmetric tuning template with a lesion near the
    # midline, the pooled AUPRC does not favour them; Docs/experiments.md, *The mirror map*)
    mirror_only: bool = False


@dataclass
class TuneOptions:
    """What data the tuning builds and how it decides."""

    forms: tuple[str, ...] = ("native", "brain", "oblique", "thick", "scaled")
    lesions_per_volume: int = 6  # 30 lesions in one volume's five forms; with 15 the choice flipped between
    # settings a few hundredths of AUPRC apart (Docs/experiments.md, *How fragile the tuning's choice is*); no
    # extra time
    fprs: tuple[float, ...] = (1e-2, 1e-3, 1e-4, 1e-5)  # 1e-5: a smoothed map may need a stricter rate for 1 mL
    max_healthy_ml: float = 1.0  # the default FPR flags at most this much in every lesion-free volume
    min_lesion_mm3: float = 50.0
    seed: int = 0
    batch_size: Optional[int] = None  # slices per network call; None: the measured plan
    max_pixels: int = 4_000_000  # pixels sampled for the pooled AUPRC
    region: Optional[str] = None  # where maps are scored (contract.REGIONS), written into the tuned setting;
    # None: the model's volume setting's (so a fine-tuned brain model keeps scoring the brain)
    grid: TuneGrid = field(default_factory=TuneGrid)
    # every operating point is also scored with each lesion outlined at these fractions of its own peak
    # (detect.postprocess); the card keeps one only where it scores better than the plain threshold
    peak_fractions: tuple[float, ...] = (0.5,)
    # how the setting is chosen: "auprc" (the best pooled AUPRC, ties to the cheaper) or "dice" (the `dice_top` best
    # by AUPRC each calibrated, and the one whose best operating point within `max_healthy_ml` has the best mean
    # Dice on the implanted lesions: the target the card is used for, at `dice_top` times the calibration's cost)
    choose_by: str = "auprc"
    dice_top: int = 4


@dataclass
class TuneVolume:
    """A healthy 3D volume for tuning, with where lesions may lie."""

    name: str
    image: sitk.Image
    brain: np.ndarray  # numpy order bool
    has_mask: bool  # the brain mask came with the data (so a skull-stripped form can be made)
    source: str


@dataclass
class TuneCase:
    """One detection input prepared once: its model-grid slices and its truth on the oriented grid."""

    name: str
    prep: Any  # prepare.PreparedScan
    truth: Optional[np.ndarray]  # oriented (Z, Y, X) bool, None for an untouched volume
    spacing: tuple[float, ...]  # the scan's voxel spacing, mm
    meta: dict[str, Any]


def load_tune_volumes(items: Sequence[str], allow_held_out: bool = False) -> list[TuneVolume]:
    """Healthy volumes by name (see sampledata.HEALTHY_VOLUMES) or path; 2D images are refused. A volume kept
    for evaluation is refused unless `allow_held_out` (leave-one-volume-out experiments: the card records the
    volumes, and `synomaly evaluate` will not test the card on them)."""
    from .prepare import expand_inputs, read_image
    from .lesions import brain_mask
    from .sampledata import HEALTHY_VOLUMES, healthy_volume

    vols: list[TuneVolume] = []
    paths: list[tuple[str, str, Optional[str]]] = []
    for item in items:
        if item in HEALTHY_VOLUMES:
            v = HEALTHY_VOLUMES[item]
            if v.role == "eval" and not allow_held_out:
                raise InputError(f"healthy volume {item!r} is reserved for evaluation; tune on other scans "
                                 "(or pass --allow-held-out for a leave-one-volume-out experiment)")
            path, mask = healthy_volume(item)
            paths.append((item, str(path), str(mask) if mask else None))
        else:
            paths.extend((Path(p).name.split(".")[0], p, None) for p in expand_inputs([item]))
    for name, path, mask in paths:
        image = sitk.Cast(read_image(path), sitk.sitkFloat32)
        if image.GetDimension() != 3:
            log.warning("skipping %s: tuning implants 3D lesions and needs volumes", path)
            continue
        vols.append(TuneVolume(name, image, brain_mask(image, mask), mask is not None, path))
    if not vols:
        raise InputError("tuning needs at least one healthy 3D volume")
    return vols


def _prepare(image: sitk.Image, truth: Optional[np.ndarray], card, name: str, meta: dict,
             region: Optional[str] = None) -> TuneCase:
    """Prepare a scan as detection does (scored in `region`) and orient its truth mask the same way."""
    from .prepare import orient_array, prepare_scan

    region = region or "foreground"
    prep = prepare_scan(image, card, region=region)
    if prep.region != region:
        raise InputError(f"{name}: {prep.region_note}; tune on other volumes or with another region")
    g = prep.geometry
    t_o = None if truth is None else np.ascontiguousarray(orient_array(truth, g.transpose, g.flips))
    return TuneCase(name, prep, t_o, tuple(image.GetSpacing()), meta)


def build_cases(volumes: Sequence[TuneVolume], card, opts: TuneOptions,
                progress: ProgressFn = null_progress) -> tuple[list[TuneCase], list[TuneCase]]:
    """Lesion cases (every volume in every form, with implanted lesions) and the same forms untouched."""
    from .lesions import FORMS, implant_random_lesions, scan_form

    lesion_cases: list[TuneCase] = []
    healthy_cases: list[TuneCase] = []
    plan = [(vi, v, f) for vi, v in enumerate(volumes) for f in opts.forms if f != "brain" or v.has_mask]
    for n, (vi, vol, form) in enumerate(plan):
        progress("tune", n, len(plan), f"preparing {vol.name} ({form})")
        rng = np.random.default_rng([opts.seed, vi, FORMS.index(form)])
        lesioned, truth, lesions = implant_random_lesions(vol.image, vol.brain, rng, count=opts.lesions_per_volume)
        form_seed = int(rng.integers(1 << 30))
        img_f, truth_f, meta = scan_form(lesioned, truth, vol.brain, form, np.random.default_rng(form_seed))
        meta = {**meta, "volume": vol.name, "lesions": [asdict(x) for x in lesions]}
        lesion_cases.append(_prepare(img_f, truth_f, card, f"{vol.name}-{form}-lesions", meta, opts.region))
        healthy_f, _, hmeta = scan_form(vol.image, None, vol.brain, form, np.random.default_rng(form_seed))
        healthy_cases.append(_prepare(healthy_f, None, card, f"{vol.name}-{form}", {**hmeta, "volume": vol.name},
                                      opts.region))
    progress("tune", len(plan), len(plan), f"{len(plan)} lesion and {len(plan)} lesion-free volumes prepared")
    return lesion_cases, healthy_cases


def pooled_auprc(maps: list[np.ndarray], cases: Sequence[TuneCase], opts: TuneOptions) -> float:
    """Pixel AUPRC pooled over the voxels each case scores and its lesions (a lesion voxel left out of a
    brain region counts, with score 0), so that regions compare."""
    from .metrics import pixel_auprc

    return pixel_auprc(maps, [c.truth for c in cases], [c.prep.foreground | c.truth for c in cases],
                       max_pixels=opts.max_pixels, seed=opts.seed)


def _split(t: torch.Tensor, cases: Sequence[TuneCase]) -> list[torch.Tensor]:
    """Split a concatenation of the cases' slices back into one tensor per case."""
    return list(torch.split(t, [c.prep.slices.shape[0] for c in cases]))


def _label(ts: Sequence[int]) -> str:
    return "+".join(str(int(v)) for v in ts)


def single_stage(model, x0: torch.Tensor, masks: torch.Tensor, t: int, draws: int, seed: int,
                 batch_size: Optional[int] = None) -> torch.Tensor:
    """The slices healed once at noise level t (the mean of `draws` draws), as the sweep scores a setting: the
    seed depends on t and the draws, so each level's result is the same whichever ensemble or model asks for it."""
    from .detect import run_stages

    return run_stages(model, x0, masks, t=t, kernel=1, threshold=float("inf"), max_stages=1, batch_size=batch_size,
                      draws=draws, seed=seed + 7919 * t + draws).healed


def sweep(model, cases: Sequence[TuneCase], opts: TuneOptions,
          progress: ProgressFn = null_progress) -> list[dict[str, Any]]:
    """Pooled pixel AUPRC of the grid's settings on the lesion cases, one row per setting: every noise
    level and ensemble with every blur, single stage (ensembles also as maps per level when the grid asks,
    level_case_maps); the best few again with their maps smoothed across
    slices, signed or not, normalised per tissue class or not; the best of all with more noise draws; the
    best so far multi-stage."""
    from .calibrate import FUSION_FPR, quantile_threshold
    from .detect import anomaly_score, run_stages, scan_map

    g = opts.grid
    x0 = torch.cat([c.prep.slices for c in cases])
    masks = torch.cat([c.prep.masks for c in cases])
    fmask = masks.float()
    levels = sorted(set(g.ts) | {t for e in g.ensembles for t in e})
    healed: dict[tuple[int, int], torch.Tensor] = {}
    steps = len(levels) + 1 + g.multi_top
    done = 0

    def predictions(ts: tuple[int, ...], draws: int) -> torch.Tensor:
        nonlocal done
        for t in ts:
            if (t, draws) not in healed:
                progress("tune", done, steps, f"single-stage predictions at t = {t}, {draws} draw(s)")
                start = time.perf_counter()
                healed[(t, draws)] = single_stage(model, x0, masks, t, draws, opts.seed, opts.batch_size)
                log.info("t = %d, %d draws: %.1f s for %d slices", t, draws, time.perf_counter() - start, x0.shape[0])
                done += 1
        return torch.stack([healed[(t, draws)] for t in ts]).mean(0)

    def stack(ts: tuple[int, ...], draws: int) -> torch.Tensor:
        predictions(ts, draws)
        return torch.stack([healed[(t, draws)] for t in ts])

    def score_row(ts: tuple[int, ...], k: int, draws: int, xh: torch.Tensor, stages: int, mean_stages: float,
                  smooth: float = 0.0, signed: bool = False, bins: int = 0, score: Optional[torch.Tensor] = None,
                  levels: Optional[torch.Tensor] = None, scaling: str = "", mirror: float = 0.0):
        if levels is not None:
            maps = level_case_maps(levels, cases, k, smooth, signed, bins, scaling)
        else:
            scores = _split(score, cases) if score is not None else [None] * len(cases)
            maps = [scan_map(h, c.prep, k, smooth, signed, bins, score=sc, mirror_mm=mirror)
                    for h, sc, c in zip(_split(xh, cases), scores, cases)]
        row = {"t": _label(ts), "blur": k, "smooth": smooth, "signed": bool(signed and smooth > 0), "bins": bins,
               "levels": scaling if levels is not None else "", "stages": stages, "draws": draws,
               "auprc": round(pooled_auprc(maps, cases, opts), 4),
               "cost": round(len(ts) * draws * mean_stages, 2), "stages_mean": round(mean_stages, 2)}
        if mirror > 0 and levels is None:
            row["mirror"] = mirror
        return row

    def levels_of(row: dict[str, Any]) -> tuple[int, ...]:
        return tuple(int(v) for v in row["t"].split("+"))

    rows: list[dict[str, Any]] = []
    for ts in [(t,) for t in g.ts] + [tuple(e) for e in g.ensembles]:
        xh = predictions(ts, g.draws)
        for k in g.blurs:
            rows.append(score_row(ts, k, g.draws, xh, 1, 1.0, score=anomaly_score(x0, xh, fmask, k)))
            if len(ts) > 1:
                rows.extend(score_row(ts, k, g.draws, xh, 1, 1.0, levels=stack(ts, g.draws), scaling=sc)
                            for sc in g.level_maps)
    if g.smooth_top > 0 and (g.smooths or any(g.tissue_bins)):
        variants = [(float(sm), bool(sg), int(b)) for sm in (0.0, *g.smooths) for sg in g.signed for b in g.tissue_bins
                    if not (sg and sm <= 0) and (sm, sg, b) != (0.0, False, 0)]
        also = (", signed or not" if True in g.signed else "") + (
            ", normalised per tissue or not" if any(g.tissue_bins) else "")
        progress("tune", done, steps, f"the {g.smooth_top} best with the map smoothed across slices by {g.smooths} mm"
                 + also)
        for row in sorted(rows, key=lambda r: -r["auprc"])[: g.smooth_top]:
            ts = levels_of(row)
            xh = predictions(ts, g.draws)
            score = anomaly_score(x0, xh, fmask, row["blur"])  # |D| once per row; the signed variants recompute D
            lv = stack(ts, g.draws) if row["levels"] else None
            rows.extend(score_row(ts, row["blur"], g.draws, xh, 1, 1.0, sm, sg, b, score, lv, row["levels"])
                        for sm, sg, b in variants)
    mirrors = [float(m) for m in g.mirror if m > 0]
    if g.smooth_top > 0 and mirrors:
        progress("tune", done, steps, f"the {g.smooth_top} best with the map less its mirror image (grown {mirrors} mm)")
        for row in sorted([r for r in rows if not r["levels"]], key=lambda r: -r["auprc"])[: g.smooth_top]:
            ts = levels_of(row)
            xh = predictions(ts, g.draws)
            score = anomaly_score(x0, xh, fmask, row["blur"])
            rows.extend(score_row(ts, row["blur"], g.draws, xh, 1, 1.0, row["smooth"], row["signed"], row["bins"],
                                  score, mirror=m) for m in mirrors)
    best = max(rows, key=lambda r: r["auprc"])
    if g.more_draws > g.draws:
        ts = levels_of(best)
        rows.append(score_row(ts, best["blur"], g.more_draws, predictions(ts, g.more_draws), 1, 1.0, best["smooth"],
                              best["signed"], best["bins"],
                              levels=stack(ts, g.more_draws) if best["levels"] else None, scaling=best["levels"],
                              mirror=best.get("mirror", 0.0)))
    if g.max_stages > 1:
        lesion = torch.cat([_grid_truth(c) for c in cases])
        healthy = masks.bool() & ~lesion
        for row in sorted(rows, key=lambda r: -r["auprc"])[: g.multi_top]:
            ts = levels_of(row)
            progress("tune", done, steps, f"multi-stage at t = {row['t']}, blur {row['blur']}, {row['draws']} draw(s)")
            first = anomaly_score(x0, predictions(ts, row["draws"]), fmask, row["blur"])
            fusion = quantile_threshold(first[healthy], FUSION_FPR)  # stage-1 level flagging 1 % of lesion-free voxels
            res = run_stages(model, x0, masks, t=ts, kernel=row["blur"], threshold=fusion, max_stages=g.max_stages,
                             batch_size=opts.batch_size, draws=row["draws"], seed=opts.seed,
                             keep_levels=bool(row["levels"]))
            rows.append(score_row(ts, row["blur"], row["draws"], res.healed, g.max_stages,
                                  float(res.stages.float().mean()), row["smooth"], row["signed"], row["bins"],
                                  score=res.score, levels=res.levels, scaling=row["levels"],
                                  mirror=row.get("mirror", 0.0)))
            done += 1
    progress("tune", steps, steps, f"{len(rows)} settings scored")
    return rows


def level_case_maps(levels: torch.Tensor, cases: Sequence[TuneCase], k: int, smooth: float, signed: bool = False,
                    bins: int = 0, scaling: str = "healthy") -> list[np.ndarray]:
    """Maps per noise level (detect.scan_map levels) of lesion cases, from each level's healed slices of all the
    cases (L, S, 1, G, G). Scaled in each scan ("scan"), there is nothing to measure first; scaled by the healthy
    tail ("healthy"), each level's scale is measured on these same cases away from their implanted lesions
    (foreground voxels more than LESION_MARGIN voxels from the truth), which are healthy tissue, so the sweep needs
    no lesion-free volumes; the chosen setting is then calibrated on the lesion-free volumes as usual."""
    from .calibrate import level_scales
    from .detect import SCAN_LEVEL_QUANTILE, mean_of_scaled, scan_map

    if scaling == "scan":
        parts = torch.split(levels, [c.prep.slices.shape[0] for c in cases], dim=1)
        return [scan_map(lv.mean(0), c.prep, k, smooth, signed, bins, levels=lv, scan_quantile=SCAN_LEVEL_QUANTILE)
                for lv, c in zip(parts, cases)]
    per_level = [[scan_map(h, c.prep, k, smooth, signed, bins) for h, c in zip(_split(lv, cases), cases)]
                 for lv in levels]
    away = [_away_from_lesions(c) for c in cases]
    scales = level_scales([np.concatenate([m[a] for m, a in zip(maps, away)]) for maps in per_level])
    return [mean_of_scaled([maps[i] for maps in per_level], scales) for i in range(len(cases))]


LESION_MARGIN = 3  # voxels: where an implanted lesion's soft edge may still change the map


def _away_from_lesions(case: TuneCase) -> np.ndarray:
    """The case's foreground voxels more than LESION_MARGIN voxels from its implanted lesions (all of it when none)."""
    from scipy import ndimage

    if case.truth is None or not case.truth.any():
        return case.prep.foreground
    near = ndimage.binary_dilation(case.truth, iterations=LESION_MARGIN)
    return case.prep.foreground & ~near


def _grid_truth(case: TuneCase) -> torch.Tensor:
    """The truth of a case on its model grid (S, 1, G, G) bool, dilated by a pixel (lesion edges are soft)."""
    from .prepare import oriented_to_grid

    small = oriented_to_grid(case.truth, case.prep) > 0.05
    return torch.nn.functional.max_pool2d(small.float(), 3, stride=1, padding=1) > 0


def choose(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The best pooled AUPRC; settings within AUPRC_TIE (relative) of it count as tied and the cheapest wins."""
    best = max(r["auprc"] for r in rows if not math.isnan(r["auprc"]))
    tied = [r for r in rows if r["auprc"] >= best * (1 - AUPRC_TIE)]
    return min(tied, key=lambda r: (r["cost"], -r["auprc"]))


def network_key(setting: dict[str, Any]) -> tuple:
    """What the network's work for a sweep row depends on (noise levels, blur, stages, draws, maps per level):
    rows that differ only in how the map is made from it (smoothing, signed, tissue classes, mirror, scaling)
    share it."""
    ts = tuple(int(v) for v in str(setting["t"]).split("+"))
    return (ts, int(setting["blur"]), int(setting["stages"]), int(setting["draws"]),
            bool(setting.get("levels", False)) and len(ts) > 1)


def operating_points(model, lesion_cases: Sequence[TuneCase], healthy_cases: Sequence[TuneCase],
                     setting: dict[str, Any], opts: TuneOptions, progress: ProgressFn = null_progress,
                     runs: Optional[dict[tuple, Any]] = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Calibrate on the untouched volumes under `setting`, then score every calibrated FPR: mean Dice on
    the lesion cases and the volume flagged in each lesion-free one (after the minimum lesion size).
    `runs`: the network's results kept by network_key, reused by a later setting with the same key (the same
    seed, so the same results) and filled with this one's."""
    from .calibrate import FUSION_FPR, calibration_maps, calibration_record, needs_whole_scans, scan_map_thresholds
    from .card import DetectionDefaults
    from .detect import SCAN_LEVEL_QUANTILE, run_stages, scan_map

    key = network_key(setting)
    ts, k, stages, draws, per_level = key
    smooth = float(setting.get("smooth", 0.0))
    signed, bins = bool(setting.get("signed", False)), int(setting.get("bins", 0))
    mirror = float(setting.get("mirror", 0.0))
    scaling = _scaling(setting)
    d = DetectionDefaults(t=ts[0], t_ensemble=ts if len(ts) > 1 else (), blur_kernel=k, smooth_mm=smooth,
                          signed_map=signed, tissue_bins=bins, level_maps=per_level, level_scaling=scaling,
                          mirror_mm=mirror)
    hm = torch.cat([c.prep.masks for c in healthy_cases])
    if runs is not None and key in runs:
        fusion, hres, lres = runs[key]
    else:
        hx = torch.cat([c.prep.slices for c in healthy_cases])
        fusion, hres = calibration_maps(model, hx, hm, ts=ts, kernel=k, max_stages=stages, draws=draws,
                                        batch_size=opts.batch_size, seed=opts.seed, keep_levels=per_level,
                                        progress=progress)
        lx = torch.cat([c.prep.slices for c in lesion_cases])
        lm = torch.cat([c.prep.masks for c in lesion_cases])
        lres = run_stages(model, lx, lm, t=ts, kernel=k, threshold=fusion, max_stages=stages,
                          batch_size=opts.batch_size, draws=draws, seed=opts.seed, keep_levels=per_level)
        if runs is not None:
            runs[key] = (fusion, hres, lres)
    cal = calibration_record(hres, hm, opts.fprs, fusion=fusion, fusion_fpr=FUSION_FPR, ts=ts, kernel=k,
                             max_stages=stages, draws=draws, region=opts.region or "foreground")
    if needs_whole_scans(d):
        cal = scan_map_thresholds(cal, hres.healed, [c.prep for c in healthy_cases], d, opts.fprs, levels=hres.levels)
    scales = cal.get("level_scales") if per_level else None

    def case_maps(res, cases):
        sizes = [c.prep.slices.shape[0] for c in cases]
        lv = torch.split(res.levels, sizes, dim=1) if per_level else [None] * len(cases)
        return [scan_map(h, c.prep, k, smooth, signed, bins, score=s, levels=v, scales=scales,
                         scan_quantile=SCAN_LEVEL_QUANTILE if per_level and scaling == "scan" else 0.0,
                         mirror_mm=mirror)
                for h, s, v, c in zip(_split(res.healed, cases), _split(res.score, cases), lv, cases)]

    lmaps = case_maps(lres, lesion_cases)
    hmaps = case_maps(hres, healthy_cases)
    points = score_points(lmaps, lesion_cases, hmaps, healthy_cases, cal["thresholds"], opts.min_lesion_mm3,
                          opts.peak_fractions)
    return cal, points


def score_points(lesion_maps: Sequence[np.ndarray], lesion_cases: Sequence[TuneCase],
                 healthy_maps: Sequence[np.ndarray], healthy_cases: Sequence[TuneCase], thresholds: dict[str, float],
                 min_mm3: float, peak_fractions: Sequence[float] = (0.5,), outlines: bool = True) -> list[dict[str, Any]]:
    """Every operating point of calibrated `thresholds` ({rate key: threshold}) scored on maps of the tuning cases:
    each rate alone and, with `outlines`, grown (hysteresis) into each looser rate, and each of those with every
    lesion outlined at each of `peak_fractions` of its own peak. Per point: the mean Dice of the lesion cases, the
    implanted lesions found (by polarity and size) and the mL flagged in each lesion-free case, lesions under
    `min_mm3` dropped. Lesion case i and lesion-free case i are forms of the same volume (build_cases). Shared by
    `synomaly tune` (one model's maps) and `synomaly pair` (two models' averaged)."""
    from .detect import postprocess
    from .metrics import dice

    components = [lesion_polarities(c, h) for c, h in zip(lesion_cases, healthy_cases)]
    points = []
    for key, thr in thresholds.items():
        grows = [None] + ([g for g, v in thresholds.items() if v < thr] if outlines else [])
        for grow_key, pf in itertools.product(grows, (None,) + (tuple(peak_fractions) if outlines else ())):
            grow = thresholds[grow_key] if grow_key is not None else None
            dices = []
            found: list[tuple[int, float, bool]] = []
            for m, c, (labels, rows) in zip(lesion_maps, lesion_cases, components):
                binary, _ = postprocess(m, thr, c.spacing, min_mm3, grow, pf)
                dices.append(dice(binary, c.truth))
                hit = np.unique(labels[binary & (labels > 0)])
                found.extend((r["polarity"], r["ml"], j + 1 in hit) for j, r in enumerate(rows))
            flagged = []
            for m, c in zip(healthy_maps, healthy_cases):
                binary, _ = postprocess(m, thr, c.spacing, min_mm3, grow, pf)
                flagged.append(float(binary.sum()) * float(np.prod(c.spacing)) / 1000.0)
            points.append({"fpr": key, "threshold": thr, "grow_fpr": grow_key, "grow_threshold": grow,
                           "peak_fraction": pf, "dice_mean": round(float(np.mean(dices)), 4),
                           "dice_per_case": [round(d, 3) for d in dices], "lesions_found": lesion_recall(found),
                           "healthy_ml_max": round(max(flagged), 3),
                           "healthy_ml_per_case": [round(f, 3) for f in flagged]})
    return points


def _scaling(row: dict[str, Any]) -> str:
    """How a sweep row's maps per level are scaled (the card's level_scaling; "healthy" for a row without)."""
    return row.get("levels") or "healthy"


def lesion_polarities(lesion_case: TuneCase, healthy_case: TuneCase) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The implanted lesions of a case as 3D connected components of its truth (labels on the oriented grid)
    with their volume (mL) and polarity (+1 brighter, -1 darker: the sign of the mean change against the same
    form of the untouched volume, which shares the case's grid)."""
    from scipy import ndimage

    labels, n = ndimage.label(lesion_case.truth, structure=np.ones((3, 3, 3), dtype=bool))
    same_grid = lesion_case.prep.oriented.shape == healthy_case.prep.oriented.shape
    change = (lesion_case.prep.oriented - healthy_case.prep.oriented) if same_grid else None
    voxel_ml = float(np.prod(lesion_case.spacing)) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    sums = (np.bincount(labels.ravel(), weights=change.ravel(), minlength=n + 1)[1:] if change is not None
            else np.zeros(n))
    rows = [{"ml": round(float(c) * voxel_ml, 3), "polarity": int(np.sign(v))} for c, v in zip(counts, sums)]
    return labels, rows


def point_summary(point: dict[str, Any]) -> dict[str, Any]:
    """An operating point (score_points) as a card's record keeps it: without its per-case lists, thresholds
    rounded to 6 decimals."""
    return {k: (round(v, 6) if k.endswith("threshold") and v is not None else v)
            for k, v in point.items() if not k.endswith("per_case")}


def lesion_recall(found: Sequence[tuple[int, float, bool]]) -> dict[str, Any]:
    """Share of implanted lesions found (any voxel segmented), overall and by polarity and size, from
    (polarity, mL, found) triples; each entry is {"found": k, "of": n}."""
    def share(sel: list[bool]) -> dict[str, int]:
        return {"found": int(sum(sel)), "of": len(sel)}

    return {"all": share([f for _, _, f in found]),
            "brighter": share([f for p, _, f in found if p > 0]),
            "darker": share([f for p, _, f in found if p < 0]),
            "under_1ml": share([f for _, ml, f in found if ml < 1.0]),
            "1ml_or_more": share([f for _, ml, f in found if ml >= 1.0])}


def choose_fpr(points: Sequence[dict[str, Any]], max_healthy_ml: float) -> dict[str, Any]:
    """The best mean Dice among the operating points (rate, the looser rate lesions grow into, if any, and the
    fraction of its peak each lesion is outlined at, if any) that flag at most `max_healthy_ml` in every
    lesion-free volume (if none does, the one that flags least); ties go to the stricter rate, then to no
    growth, then to the plain threshold."""
    ok = [p for p in points if p["healthy_ml_max"] <= max_healthy_ml]
    if not ok:
        return min(points, key=lambda p: (p["healthy_ml_max"], p.get("grow_fpr") is not None,
                                          p.get("peak_fraction") is not None))
    return max(ok, key=lambda p: (p["dice_mean"], -float(p["fpr"]), p.get("grow_fpr") is None,
                                  -float(p.get("grow_fpr") or 0), p.get("peak_fraction") is None))


def setting_words(row: dict[str, Any]) -> str:
    """A sweep row in words: 't 10+25+50, blur 5, smoothing 4 mm, tissue classes 0, 1 stage(s)'."""
    return (f"t {row['t']}{' (a map per level)' if row.get('levels') else ''}, blur {row['blur']}, "
            f"smoothing {row['smooth']:g} mm{' (signed)' if row.get('signed') else ''}, "
            f"tissue classes {row.get('bins', 0)}, {mirror_words(row)}{row['stages']} stage(s)")


def point_words(p: dict[str, Any], thresholds: bool = False) -> str:
    """An operating point in words: 'FPR 1e-05 grown to FPR 0.0001, each lesion outlined at 0.5 of its peak'
    (`thresholds`: each rate's threshold in brackets)."""
    def rate(fpr_key: str, thr_key: str) -> str:
        thr = p.get(thr_key)
        return f"FPR {p[fpr_key]}" + (f" ({thr:.4f})" if thresholds and thr is not None else "")

    words = rate("fpr", "threshold") + (f" grown to {rate('grow_fpr', 'grow_threshold')}" if p.get("grow_fpr") else "")
    return words + (f", each lesion outlined at {p['peak_fraction']:g} of its peak" if p.get("peak_fraction") else "")


def dice_candidates(rows: Sequence[dict[str, Any]], top: int) -> list[dict[str, Any]]:
    """The `top` rows with the best pooled AUPRC (NaN last), the cheaper first among equal AUPRC."""
    ok = [r for r in rows if not math.isnan(r["auprc"])]
    return sorted(ok, key=lambda r: (-r["auprc"], r["cost"]))[: max(1, top)]


def choose_by_dice(trials: Sequence[dict[str, Any]], max_healthy_ml: float) -> dict[str, Any]:
    """Among calibrated candidates ({"row", "point"}: a sweep row and its chosen operating point), the best mean
    Dice among those whose point flags at most `max_healthy_ml` in every lesion-free volume, ties to the cheaper row
    then the better AUPRC; if none does, the one that flags least."""
    ok = [c for c in trials if c["point"]["healthy_ml_max"] <= max_healthy_ml]
    if not ok:
        return min(trials, key=lambda c: (c["point"]["healthy_ml_max"], c["row"]["cost"]))
    return max(ok, key=lambda c: (c["point"]["dice_mean"], -c["row"]["cost"], c["row"]["auprc"]))


def mirror_words(row: dict[str, Any]) -> str:
    """', less its mirror image (grown 4 mm), ' for a sweep row with the mirror map, else ''."""
    return f"less its mirror image (grown {row['mirror']:g} mm), " if row.get("mirror") else ""


def tune_model(model_path: str | Path, data: Sequence[str], *, output: str | Path | None = None,
               options: Optional[TuneOptions] = None, device: str = "auto", description: str = "",
               version: Optional[str] = None, allow_held_out: bool = False,
               progress: ProgressFn = null_progress) -> dict[str, Any]:
    """Tune a model file on healthy volumes and write the chosen setting, the calibrated thresholds and the
    sweep table into its card (atomically, in place unless `output` is given; `version`: the card's new
    version, the weights being the same). Returns the tuning record."""
    from .modelio import load_model, save_model

    opts = options or TuneOptions()
    start = time.perf_counter()
    model = load_model(model_path, device=device)
    if opts.region is None:
        from dataclasses import replace

        opts = replace(opts, region=model.card.detection_for(True).region)
    if opts.choose_by not in ("auprc", "dice") or opts.dice_top < 1:
        raise InputError(f"the setting is chosen by 'auprc' or 'dice' (of at least 1 candidate), got "
                         f"{opts.choose_by!r} of {opts.dice_top}")
    if opts.grid.mirror_only and not any(m > 0 for m in opts.grid.mirror):
        raise InputError("choosing among the mirror maps only needs at least one mirror growth (--mirror MM)")
    if any(m > 0 for m in opts.grid.mirror) and opts.region not in ("brain", "brain-stripped"):
        raise InputError("the mirror map needs the brain's midline: tune with the brain region (--region brain)")
    volumes = load_tune_volumes(data, allow_held_out)
    lesion_cases, healthy_cases = build_cases(volumes, model.card, opts, progress)
    t_cases = time.perf_counter()
    rows = sweep(model, lesion_cases, opts, progress)
    pool = [r for r in rows if r.get("mirror")] if opts.grid.mirror_only else rows
    t_sweep = time.perf_counter()
    trials: list[dict[str, Any]] = []
    if opts.choose_by == "dice":
        candidates = dice_candidates(pool, opts.dice_top)
        # candidates that differ only in how the map is made share the network's work; each result is kept
        # until the last candidate that needs it
        uses = Counter(network_key(r) for r in candidates)
        runs: dict[tuple, Any] = {}
        for i, row in enumerate(candidates):
            progress("tune", i, len(candidates), f"calibrating candidate {i + 1}: {setting_words(row)}")
            key = network_key(row)
            cal, points = operating_points(model, lesion_cases, healthy_cases, row, opts, progress,
                                           runs=runs if uses[key] > 1 else None)
            uses[key] -= 1
            if uses[key] == 0:
                runs.pop(key, None)
            trials.append({"row": row, "cal": cal, "points": points, "point": choose_fpr(points, opts.max_healthy_ml)})
            p = trials[-1]["point"]
            log.info("candidate %s: mean Dice %.3f, at most %.2f mL in a lesion-free volume",
                     setting_words(row), p["dice_mean"], p["healthy_ml_max"])
        best = choose_by_dice(trials, opts.max_healthy_ml)
        chosen, cal, points, op = best["row"], best["cal"], best["points"], best["point"]
        progress("tune", 0, 1, f"chosen: {setting_words(chosen)} (the best tuning Dice within "
                 f"{opts.max_healthy_ml:g} mL of {len(trials)} calibrated)")
    else:
        chosen = choose(pool)
        progress("tune", 0, 1, f"chosen: {setting_words(chosen)}; calibrating on the lesion-free volumes")
        cal, points = operating_points(model, lesion_cases, healthy_cases, chosen, opts, progress)
        op = choose_fpr(points, opts.max_healthy_ml)
    ts = [int(v) for v in chosen["t"].split("+")]
    from .card import DetectionDefaults

    card = model.card.copy()
    if version:
        card.version = version
    if card.partner_3d is not None:  # its thresholds belong to the old setting's map: pair again (`synomaly pair`)
        log.warning("the new volume setting unpairs the model from %s; `synomaly pair` pairs it again",
                    card.partner_3d.file)
        card.partner_3d = None
    card.detection_3d = DetectionDefaults(t=ts[0], blur_kernel=int(chosen["blur"]), threshold=card.detection.threshold,
                                          max_stages=int(chosen["stages"]), t_ensemble=tuple(ts) if len(ts) > 1 else (),
                                          noise_draws=int(chosen["draws"]), fpr=float(op["fpr"]),
                                          grow_fpr=float(op["grow_fpr"]) if op.get("grow_fpr") else None,
                                          peak_fraction=op.get("peak_fraction"),
                                          smooth_mm=float(chosen.get("smooth", 0.0)), region=opts.region or "foreground",
                                          signed_map=bool(chosen.get("signed", False)),
                                          tissue_bins=int(chosen.get("bins", 0)),
                                          level_maps=bool(chosen.get("levels", False)) and len(ts) > 1,
                                          level_scaling=_scaling(chosen),
                                          mirror_mm=float(chosen.get("mirror", 0.0)))
    what = description or ", ".join(f"{v.name} ({v.source})" for v in volumes)
    cal["data"] = f"the lesion-free forms of: {what}"
    cal["scans"] = len(healthy_cases)
    card.calibration_3d = cal
    seconds = time.perf_counter() - start
    record = {
        "data": what,
        "volumes": [v.name for v in volumes],
        "volume_files": [str(Path(v.source).resolve()) for v in volumes],
        "forms": list(opts.forms),
        "lesions_per_volume": opts.lesions_per_volume,
        "lesion_cases": len(lesion_cases),
        "lesions": sum(len(c.meta["lesions"]) for c in lesion_cases),
        "metric": "pooled pixel AUPRC of the anomaly map on implanted lesions, each scan's own grid, foreground",
        "chosen_by": ("auprc" if opts.choose_by != "dice" else
                      f"dice: the best mean Dice within {opts.max_healthy_ml:g} mL of the {len(trials)} best by AUPRC"),
        "candidates": [{"row": c["row"], **{k: c["point"].get(k) for k in (
            "fpr", "grow_fpr", "peak_fraction", "dice_mean", "healthy_ml_max")}} for c in trials],
        "region": opts.region,
        "grid": asdict(opts.grid),
        "table": rows,
        "chosen": chosen,
        "operating_points": [point_summary(p) for p in points],
        "chosen_fpr": op["fpr"],
        "chosen_grow_fpr": op.get("grow_fpr"),
        "chosen_peak_fraction": op.get("peak_fraction"),
        "max_healthy_ml": opts.max_healthy_ml,
        "seed": opts.seed,
        "seconds": {"prepare": round(t_cases - start, 1), "sweep": round(t_sweep - t_cases, 1),
                    "calibrate": round(time.perf_counter() - t_sweep, 1), "total": round(seconds, 1)},
        "device": str(model.device),
    }
    card.tuning = record
    state = {k: v.detach().cpu() for k, v in model.network.state_dict().items()}
    save_model(output or model.path, card, state)
    progress("tune", 1, 1, f"tuned in {seconds:.0f} s: volumes use {card.detection_text(True)}")
    return {**record, "points": points}
