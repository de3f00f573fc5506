"""Threshold calibration on healthy scans only: thresholds for target per-voxel false-positive rates."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .progress import ProgressFn, null_progress

DEFAULT_FPRS = (1e-2, 1e-3, 1e-4)
FUSION_FPR = 1e-2  # stages keep healing where a stage-1 map flags 1 % of healthy voxels
# maps per noise level (detect.scan_map): each level's map is divided by this quantile of it over healthy voxels
# (0.999 and 0.9999 chose the same settings on the tuning volumes: scripts/multiscale-probe.py)
LEVEL_SCALE_QUANTILE = 0.999
# (or, with level_scaling "scan", by detect.SCAN_LEVEL_QUANTILE of it in the scan itself)


def quantile_threshold(values: torch.Tensor, fpr: float) -> float:
    """The threshold that at most a fraction `fpr` of these (healthy foreground) scores reach: the one rule
    of the project (metrics.threshold_at_fpr), so Slicer's calibrated thresholds and the evaluation's agree.
    NaN when there are no scores."""
    from .metrics import threshold_at_fpr

    v = values.float().flatten().cpu().numpy()
    return threshold_at_fpr(v, fpr) if v.size else float("nan")


def calibration_maps(model, slices: torch.Tensor, masks: torch.Tensor, *, ts: tuple[int, ...], kernel: int,
                     max_stages: int, draws: int = 1, fusion_fpr: float = FUSION_FPR, batch_size: Optional[int] = None,
                     seed: int = 0, keep_levels: bool = False, progress: ProgressFn = null_progress):
    """The fusion threshold (the stage-1 level that flags `fusion_fpr` of healthy foreground voxels) and the
    multi-stage result on healthy slices (S, 1, G, G) run with it (`keep_levels`: with each noise level's own
    healed slices, for maps per level). With one stage the fusion threshold changes nothing of that result
    (run_stages thresholds only to choose what the next stage heals), so the single-stage run is returned as
    it is instead of being run twice."""
    from .detect import run_stages

    fg = masks.bool()
    progress("calibrate", 0, 2, "single-stage maps of healthy slices")
    first = run_stages(model, slices, masks, t=ts, kernel=kernel, threshold=float("inf"), max_stages=1,
                       batch_size=batch_size, draws=draws, seed=seed, keep_levels=keep_levels and max_stages == 1)
    fusion = quantile_threshold(first.score[fg.to(first.score.device)], fusion_fpr)
    if max_stages == 1:
        return fusion, first
    progress("calibrate", 1, 2, "multi-stage maps of healthy slices")
    res = run_stages(model, slices, masks, t=ts, kernel=kernel, threshold=fusion, max_stages=max_stages,
                     batch_size=batch_size, draws=draws, seed=seed, keep_levels=keep_levels)
    return fusion, res


def thresholds_at_fprs(values: torch.Tensor, fprs: Sequence[float]) -> tuple[dict[str, float], dict[str, float]]:
    """Thresholds exceeded by each fraction of healthy scores, and the rate each gives on those scores."""
    from .detect import fpr_key

    thresholds: dict[str, float] = {}
    measured: dict[str, float] = {}
    for fpr in fprs:
        thr = quantile_threshold(values, fpr)
        thresholds[fpr_key(fpr)] = round(thr, 5)
        measured[fpr_key(fpr)] = float((values > thr).float().mean())
    return thresholds, measured


def calibrate(model, slices: torch.Tensor, masks: torch.Tensor, *, fprs: Sequence[float] = DEFAULT_FPRS,
              t: Optional[int | Sequence[int]] = None, draws: Optional[int] = None,
              kernel: Optional[int] = None, max_stages: Optional[int] = None,
              fusion_fpr: float = FUSION_FPR, batch_size: Optional[int] = None, seed: int = 0, volume: bool = False,
              preps: Optional[Sequence[Any]] = None, progress: ProgressFn = null_progress) -> dict[str, Any]:
    """Thresholds giving each FPR on healthy slices (S, 1, G, G), for the multi-stage map.

    The stages keep healing where the map exceeds a fusion threshold: the stage-1 level that flags
    `fusion_fpr` of healthy voxels. One multi-stage run with it gives the final maps, whose quantiles
    are the thresholds for the requested rates. t, blur, stages and draws default to the card's setting
    for slices, or for volumes with `volume`. A volume setting that smooths the map across slices is
    calibrated on each scan's smoothed map, so it needs the scans' preparations (`preps`, whose slices
    are `slices`, in order); so does one scored inside the brain (region "brain"), whose masks are the
    preparations' brain regions.
    """
    d = model.card.detection_for(volume)
    if t is None:
        ts = d.noise_levels()
    else:
        ts = (int(t),) if isinstance(t, int) else tuple(int(v) for v in t)
    draws = int(draws or d.noise_draws)
    kernel = int(kernel or d.blur_kernel)
    max_stages = int(max_stages or d.max_stages)
    region = d.region if volume else "foreground"
    # refused before the network runs: what the thresholds need that the slices alone do not hold
    if volume and needs_whole_scans(d) and preps is None:
        raise ValueError("a volume setting smoothed across slices or normalised per scan is calibrated on whole "
                         "scans: pass their preps")
    if region != "foreground" and (preps is None or any(p.region != region for p in preps)):
        raise ValueError(f"a volume setting scored in the {region} is calibrated on scans prepared with that "
                         "region: pass their preps")
    per_level = volume and d.level_maps and len(ts) > 1
    fusion, res = calibration_maps(model, slices, masks, ts=ts, kernel=kernel, max_stages=max_stages, draws=draws,
                                   fusion_fpr=fusion_fpr, batch_size=batch_size, seed=seed, keep_levels=per_level,
                                   progress=progress)
    progress("calibrate", 2, 2, "calibrated")
    cal = calibration_record(res, masks, fprs, fusion=fusion, fusion_fpr=fusion_fpr, ts=ts, kernel=kernel,
                             max_stages=max_stages, draws=draws, region=region)
    if volume and needs_whole_scans(d):
        measured = replace(d, blur_kernel=kernel, t=ts[0], t_ensemble=ts if len(ts) > 1 else (), level_maps=per_level)
        cal = scan_map_thresholds(cal, res.healed, preps, measured, fprs, levels=res.levels)
    return cal


def calibration_record(res, masks: torch.Tensor, fprs: Sequence[float], *, fusion: float, fusion_fpr: float,
                       ts: tuple[int, ...], kernel: int, max_stages: int, draws: int,
                       region: str = "foreground") -> dict[str, Any]:
    """The calibration a card stores: thresholds from the multi-stage maps `res` of healthy slices (masks
    (S, 1, G, G): the region scored), and the setting they were measured with (a region other than the
    foreground is named; calibrations without the key scored the foreground)."""
    fg = masks.bool()
    thresholds, measured = thresholds_at_fprs(res.score[fg.to(res.score.device)], fprs)
    named = {} if region == "foreground" else {"region": region}
    return {
        **named,
        "thresholds": thresholds,
        "fusion_threshold": round(fusion, 5),
        "fusion_fpr": fusion_fpr,
        "t": ts[0],
        "t_ensemble": list(ts) if len(ts) > 1 else [],
        "noise_draws": draws,
        "blur_kernel": kernel,
        "max_stages": max_stages,
        "slices": int(masks.shape[0]),
        "foreground_voxels": int(fg.sum()),
        "measured_fpr_on_calibration_data": measured,
        "unit": "per foreground voxel of the model grid",
    }


def needs_whole_scans(d) -> bool:
    """Whether a volume setting's map is more than each slice's own (smoothed across slices, normalised per
    scan, or built per noise level: detect.scan_map): its thresholds are then measured on whole scans' maps."""
    return (d.smooth_mm > 0 or d.tissue_bins > 0 or d.mirror_mm > 0
            or (d.level_maps and len(d.noise_levels()) > 1))


def scan_map_thresholds(cal: dict[str, Any], healed: torch.Tensor, preps: Sequence[Any], d,
                        fprs: Sequence[float], levels: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """A volume calibration whose map is built from whole scans (detect.scan_map with the setting `d`: smoothed
    across slices, signed, normalised per tissue class, per noise level, less its mirror image): the thresholds
    recomputed on each scan's map on its own grid (`healed`: the scans' model-grid healed slices, concatenated in
    the order of `preps`), foreground voxels pooled, as detection thresholds them. A setting with maps per noise
    level needs `levels` (L, S, 1, G, G; run_stages keep_levels): each level's scale is first measured on these
    scans (level_scales), then the thresholds on the averaged scaled maps."""
    import numpy as np

    from .detect import SCAN_LEVEL_QUANTILE, contralateral, mean_of_scaled, scan_map

    k, smooth, signed, bins = int(d.blur_kernel), float(d.smooth_mm), bool(d.signed_map), int(d.tissue_bins)
    mirror = float(d.mirror_mm)
    sizes = [p.slices.shape[0] for p in preps]
    extra: dict[str, Any] = {"signed_map": signed, "tissue_bins": bins} if signed or bins else {}
    if mirror > 0:
        extra["mirror_mm"] = mirror
    per_level = d.level_maps and len(d.noise_levels()) > 1
    if per_level and (levels is None or levels.shape[0] != len(d.noise_levels())):
        raise ValueError("a setting with maps per noise level is calibrated on each level's healed slices")
    if per_level and d.level_scaling == "scan":
        pooled_np = np.concatenate([scan_map(lv.mean(0), p, k, smooth, signed, bins, levels=lv,
                                             scan_quantile=SCAN_LEVEL_QUANTILE, mirror_mm=mirror)[p.foreground]
                                    for lv, p in zip(torch.split(levels, sizes, dim=1), preps)])
        extra.update(level_maps=True, level_scaling="scan", level_scan_quantile=SCAN_LEVEL_QUANTILE)
    elif per_level:
        values = [np.concatenate([scan_map(h, p, k, smooth, signed, bins)[p.foreground]
                                  for h, p in zip(torch.split(lv, sizes), preps)]) for lv in levels]
        scales = level_scales(values)
        pooled_np = mean_of_scaled(values, scales)
        if mirror > 0:  # the mirror image is taken from each scan's whole averaged map, as detection does; the
            # level maps are made again here rather than kept from above, which would hold every level's whole map
            # of every scan at once
            pooled_np = np.concatenate([
                contralateral(mean_of_scaled([scan_map(h, p, k, smooth, signed, bins) for h in lv], scales), p,
                              mirror)[p.foreground]
                for lv, p in zip(torch.split(levels, sizes, dim=1), preps)])
        extra.update(level_maps=True, level_scaling="healthy", level_scales=[round(s, 6) for s in scales],
                     level_scale_quantile=LEVEL_SCALE_QUANTILE)
    else:
        pooled_np = np.concatenate([scan_map(h, p, k, smooth, signed, bins, mirror_mm=mirror)[p.foreground]
                                    for h, p in zip(torch.split(healed, sizes), preps)])
    pooled = torch.from_numpy(pooled_np.astype(np.float32, copy=False))
    thresholds, measured = thresholds_at_fprs(pooled, fprs)
    return {**cal, **extra, "thresholds": thresholds, "measured_fpr_on_calibration_data": measured,
            "smooth_mm": smooth, "foreground_voxels": int(pooled.numel()),
            "unit": "per foreground voxel of each scan's own grid, the map built from the whole scan (detect.scan_map)"}


def level_scales(values: Sequence[Any]) -> list[float]:
    """Each noise level's scale for maps per level: the LEVEL_SCALE_QUANTILE of its map over healthy voxels
    (one array of values per level), so that 1 means "as high as that level goes in a thousandth of healthy
    tissue" whichever level it is."""
    import numpy as np

    return [max(float(np.quantile(np.asarray(v, dtype=np.float64), LEVEL_SCALE_QUANTILE)), 1e-6) for v in values]


def calibrate_model(model_path: str | Path, paths: list[str], *, fprs: Sequence[float] = DEFAULT_FPRS,
                    device: str = "auto", description: str = "", progress: ProgressFn = null_progress,
                    output: str | Path | None = None) -> dict[str, Any]:
    """Calibrate a model file on healthy scans and write the thresholds into its card (atomically).

    When the card has a tuned setting for volumes and every scan is a volume, that setting is calibrated
    (calibration_3d); otherwise the slice setting (calibration). Each scan is read once, except the volumes of a
    list that also holds 2D images when the volume setting is calibrated on whole scans in a region: those are
    prepared again, over the whole foreground, for the slice setting. Unusable scans are skipped with a warning,
    but not for a volume setting on whole scans: its thresholds must cover every scan it was given."""
    from .errors import InputError
    from .modelio import load_model, save_model
    from .prepare import prepare_scan, prepared_scans, read_image

    model = load_model(model_path, device=device)
    progress("calibrate", 0, len(fprs), "preparing healthy scans")
    d3 = model.card.detection_3d
    whole = d3 is not None and (needs_whole_scans(d3) or d3.region != "foreground")
    skipped: list[str] = []  # each scan read once and prepared as the setting it will calibrate needs
    scans = list(prepared_scans(paths, model.card, region=d3.region if whole else "foreground", skipped=skipped))
    if not scans:
        raise InputError("none of the calibration scans could be used: " + "; ".join(skipped))
    volume = d3 is not None and all(is_vol for _, is_vol, _ in scans)
    if volume and model.card.partner_3d is not None:
        pair = model.card.partner_3d.file
        raise InputError(f"{model.card.name!r} averages its volume map with {pair}'s, and this would calibrate its own "
                         f"map alone, which detection does not use: calibrate the pair on these volumes with "
                         f"`synomaly pair MODEL {pair} --data VOLUMES` (it also implants lesions to choose the rate)")
    if volume and whole:  # whole scans, as detection maps them: every one of them, in its region
        if skipped:
            raise InputError("the card's volume setting is calibrated on whole scans, and these could not be used: "
                             + "; ".join(skipped))
        refused = [p for p, _, prep in scans if prep.region != d3.region]
        if refused:
            raise InputError(f"the {d3.region} region could not be found in {', '.join(refused)}; calibrate on other "
                             "scans (the thresholds must be measured where detection scores)")
    elif whole:  # a 2D image among them: the slice setting, whose volumes are prepared over the whole foreground
        scans = [(p, is_vol, prepare_scan(read_image(p, color="luminance"), model.card) if is_vol else prep)
                 for p, is_vol, prep in scans]
    preps = [prep for _, _, prep in scans]
    x, m, n = torch.cat([p.slices for p in preps]), torch.cat([p.masks for p in preps]), len(preps)
    cal = calibrate(model, x, m, fprs=fprs, volume=volume, preps=preps if volume and whole else None,
                    progress=progress)
    cal["scans"] = n
    cal["data"] = description or f"{n} healthy scans"
    card = model.card.copy()
    if volume:
        card.calibration_3d = cal
    else:
        card.calibration = cal
    state = {k: v.detach().cpu() for k, v in model.network.state_dict().items()}
    save_model(output or model.path, card, state)
    return cal
