"""Multi-stage Synomaly detection on whole scans: batched diffusion on the device, 3D post-processing."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .card import fpr_key
from .contract import DETECTION_SETTING
from .errors import ModelError, SettingsError
from .filters import blur_kernel
from .progress import ProgressFn, null_progress
from .schedule import predict_x0, q_sample

log = logging.getLogger(__name__)

# maps per noise level scaled in each scan (card level_scaling "scan", scan_map): each level's map is divided by
# this quantile of itself over the scan's scored voxels (scripts/multiscale-probe.py --self-quantile: 0.9 kept
# the held-out lesion-free volumes lowest)
SCAN_LEVEL_QUANTILE = 0.9


@dataclass
class DetectionSettings:
    """Detection settings; None means 'the model card's value'. Blur kernel in model-grid pixels."""

    t: Optional[int] = None
    blur_kernel: Optional[int] = None
    threshold: Optional[float] = None
    fpr: Optional[float] = None
    fusion_threshold: Optional[float] = None  # where stages keep healing; None: the card's, else `threshold`
    min_lesion_mm3: float = DETECTION_SETTING["min_lesion_mm3"].default
    max_stages: Optional[int] = None
    tolerance: float = 0.01  # a slice stops when its anomalous area changes by less; negative: never early
    noise_draws: Optional[int] = None  # None: the card's
    grow_fpr: Optional[float] = None  # lesions grow to connected voxels above this FPR's threshold; None: the card's, 0: off
    peak_fraction: Optional[float] = None  # each lesion outlined at this fraction of its own peak; None: the card's, 0: off
    smooth_mm: Optional[float] = None  # volumes: the map smoothed across slices (sigma, mm); None: the card's, 0: off
    region: Optional[str] = None  # volumes: "foreground", "brain" or "brain-stripped" (contract.REGIONS); None: the card's
    signed_map: Optional[bool] = None  # volumes: smooth the signed difference across slices (scan_map); None: card's
    tissue_bins: Optional[int] = None  # volumes: normalise the map in this many tissue classes, 0: off; None: the card's
    # volumes in the brain region: the map less its mirror image across the brain's midline, grown by this many mm
    # (scan_map); 0: off; None: the card's
    mirror_mm: Optional[float] = None
    seed: int = DETECTION_SETTING["seed"].default
    batch_size: Optional[int] = None  # slices per network call; None: the measured plan (synomaly.plan)
    device: str = DETECTION_SETTING["device"].default
    precision: str = DETECTION_SETTING["precision"].default
    allow_modality_mismatch: bool = DETECTION_SETTING["allow_modality_mismatch"].default
    # volumes: the model alone, without the partner its card pairs it with (card.partner_3d)
    single_model: bool = DETECTION_SETTING["single_model"].default

    def validate(self) -> "DetectionSettings":
        """Refuse impossible values with one clear sentence (SettingsError), before any work is done; the
        allowed values are those of contract.DETECTION_SETTINGS, which the command line is built from."""
        import math

        from .contract import DETECTION_SETTINGS
        from .errors import SettingsError

        for spec in DETECTION_SETTINGS:
            problem = spec.problem(getattr(self, spec.name))
            if problem:
                raise SettingsError(problem)
        v = self.fusion_threshold
        if v is not None and not (math.isfinite(float(v)) and float(v) >= 0):
            raise SettingsError(f"the fusion threshold must be a number of 0 or more, got {v}")
        if not float(self.tolerance) < 1:
            raise SettingsError(f"the stage tolerance must be under 1 (negative: every stage runs), got {self.tolerance}")
        return self


@dataclass
class StageResult:
    """Model-grid outputs of the multi-stage loop for S slices."""

    healed: torch.Tensor  # (S, 1, G, G) last x_hat of each slice, in [-1, 1]
    score: torch.Tensor  # (S, 1, G, G) blurred absolute difference with the input, zero outside the foreground
    stages: torch.Tensor  # (S,) stages run per slice
    calls: int  # network calls (batches)
    first_score: torch.Tensor  # (S, 1, G, G) the map after stage 1 (single-stage result)
    levels: Optional[torch.Tensor] = None  # (L, S, 1, G, G) each noise level's last x_hat (run_stages keep_levels)


@dataclass
class DetectionResult:
    """Outputs on the input grid plus what was done to get them."""

    counterfactual: sitk.Image
    anomaly_map: sitk.Image
    segmentation: sitk.Image
    lesions: list[dict[str, Any]]
    threshold: float
    threshold_source: str
    report: dict[str, Any] = field(default_factory=dict)


def resolve_settings(settings: DetectionSettings, card, volume: bool = False) -> tuple[tuple[int, ...], int, int, float, str]:
    """Noise levels, blur kernel, stages, threshold and where the threshold came from (explicit, calibrated,
    card), for a 3D volume (the card's tuned volume setting, when it has one) or a 2D slice. An explicit t
    replaces the card's ensemble of noise levels."""
    d = card.detection_for(volume)
    ts = (int(settings.t),) if settings.t is not None else d.noise_levels()
    from .errors import SettingsError

    for t in ts:
        if not 0 < t < card.timesteps:
            raise SettingsError(f"t must lie between 1 and {card.timesteps - 1} for this model, got {t}")
    k = int(settings.blur_kernel if settings.blur_kernel is not None else d.blur_kernel)
    if k < 1 or k % 2 == 0:
        raise SettingsError(f"the blur kernel must be an odd number of pixels, got {k}")
    stages = int(settings.max_stages if settings.max_stages is not None else d.max_stages)
    if stages < 1:
        raise SettingsError("stages must be at least 1")
    if settings.threshold is not None:
        return ts, k, stages, float(settings.threshold), "explicit"
    cal = card.calibration_for(volume) or {}
    thresholds = cal.get("thresholds", {})
    fpr = settings.fpr
    if fpr is not None:
        value = calibrated_threshold(card, thresholds, fpr, "", "give --threshold")
        source = f"calibrated FPR {fpr_key(fpr)}"
    elif fpr_key(d.fpr) in thresholds:
        value, source = float(thresholds[fpr_key(d.fpr)]), f"calibrated FPR {fpr_key(d.fpr)}"
    else:
        return ts, k, stages, float(d.threshold), "model default (uncalibrated)"
    _warn_if_calibration_differs(cal, ts, k, stages, resolve_smoothing(settings, card, volume),
                                 resolve_region(settings, card, volume), *resolve_map(settings, card, volume),
                                 uses_level_maps(settings, card, ts, volume), d.level_scaling,
                                 resolve_mirror(settings, card, volume))
    return ts, k, stages, value, source


def resolve_grow_threshold(settings: DetectionSettings, card, threshold: float, volume: bool = False) -> Optional[float]:
    """The hysteresis level lesions grow into (`postprocess`): the calibrated threshold at the asked or the card's
    grow FPR, when the card has one for it and it lies below the segmentation threshold; else None (no growth).
    An explicit threshold means exactly that threshold: the card's growth then applies only when asked for."""
    fpr = asked_grow_fpr(settings, card.detection_for(volume).grow_fpr)
    if not fpr:
        return None
    thresholds = (card.calibration_for(volume) or {}).get("thresholds", {})
    grow = calibrated_threshold(card, thresholds, fpr, " to grow lesions into", "turn growth off (grow FPR 0)")
    return grow if grow < threshold else None


def asked_grow_fpr(settings: DetectionSettings, default: Optional[float]) -> Optional[float]:
    """The grow FPR asked for, else `default` (the card's or the pair's); an explicit threshold without an asked
    growth means exactly that threshold, so the default growth does not apply (None)."""
    if settings.grow_fpr is not None:
        return settings.grow_fpr
    return None if settings.threshold is not None else default


def asked_peak_fraction(settings: DetectionSettings, default: Optional[float]) -> Optional[float]:
    """The peak fraction asked for, else `default` (the card's or the pair's); None (or 0) for off."""
    v = settings.peak_fraction if settings.peak_fraction is not None else default
    return float(v) if v else None


def calibrated_threshold(card, thresholds: dict[str, float], fpr: float, purpose: str, instead: str) -> float:
    """The card's threshold calibrated at `fpr`, or a ModelError that names the rates it has and what to do."""
    key = fpr_key(fpr)
    if key not in thresholds:
        have = ", ".join(sorted(thresholds)) or "none"
        raise ModelError(f"model {card.name!r} has no threshold calibrated for FPR {fpr:g}{purpose} (has: {have}); "
                         f"run `synomaly calibrate` or {instead}")
    return float(thresholds[key])


def resolve_peak_fraction(settings: DetectionSettings, card, volume: bool = False) -> Optional[float]:
    """The fraction of each lesion's own peak it is outlined at (`postprocess`): the asked or the card's; None
    (or 0) for off."""
    return asked_peak_fraction(settings, card.detection_for(volume).peak_fraction)


def resolve_fusion_threshold(settings: DetectionSettings, card, ts: tuple[int, ...], k: int, threshold: float,
                             volume: bool = False) -> float:
    """The map level above which stages keep healing: explicit, else the card's calibrated one (when it was
    calibrated with this t and blur), else the segmentation threshold itself (the original method).

    Keeping it fixed while the reported threshold moves makes the sensitivity setting monotonic: a
    stricter false-positive rate only removes voxels from the segmentation."""
    if settings.fusion_threshold is not None:
        return float(settings.fusion_threshold)
    cal = card.calibration_for(volume) or {}
    if "fusion_threshold" in cal and _calibrated_ts(cal, ts) == ts and int(cal.get("blur_kernel", k)) == k:
        return float(cal["fusion_threshold"])
    return threshold


def _calibrated_ts(cal: dict, default: tuple[int, ...]) -> tuple[int, ...]:
    """The noise levels a calibration was measured with (older cards store one 't')."""
    if "t_ensemble" in cal and cal["t_ensemble"]:
        return tuple(int(v) for v in cal["t_ensemble"])
    return (int(cal["t"]),) if "t" in cal else default


def resolve_smoothing(settings: DetectionSettings, card, volume: bool) -> float:
    """Sigma (mm) of the smoothing of a volume's map across slices: explicit, else the card's; 0 for 2D images."""
    if not volume:
        return 0.0
    return float(settings.smooth_mm if settings.smooth_mm is not None else card.detection_for(True).smooth_mm)


def resolve_region(settings: DetectionSettings, card, volume: bool) -> str:
    """Where the map is scored: explicit, else the card's; 2D images always use their foreground."""
    if not volume:
        return "foreground"
    return settings.region if settings.region is not None else card.detection_for(True).region


def slice_spacing(prep) -> float:
    """The distance between the oriented slices of a prepared scan, mm (its input's spacing on that axis)."""
    g = prep.geometry
    return float(g.reference.GetSpacing()[2 - g.transpose[0]])


def smooth_across_slices(score: np.ndarray, prep, sigma_mm: float) -> np.ndarray:
    """An oriented map (Z, Y, X) smoothed along the slice axis by a Gaussian of `sigma_mm`, zero outside the
    foreground. Each slice is healed alone with its own noise, so the healing's errors change from slice to
    slice while a lesion persists through its neighbours: averaging across slices lowers the first more than
    the second (pooled AUPRC on the tuning lesions: Docs/experiments.md, *Smoothing across slices*)."""
    from scipy import ndimage

    if sigma_mm <= 0 or score.shape[0] < 2:
        return score
    sigma = sigma_mm / max(slice_spacing(prep), 1e-6)
    return (ndimage.gaussian_filter1d(score, sigma, axis=0) * prep.foreground).astype(np.float32, copy=False)


def oriented_score(score: torch.Tensor, prep, smooth_mm: float) -> np.ndarray:
    """The model-grid map of a prepared scan (S, 1, G, G) on its oriented input grid, zero outside the foreground,
    smoothed across slices by `smooth_mm`: the map detection thresholds (and tuning and calibration score)."""
    from .prepare import grid_to_oriented

    return smooth_across_slices(grid_to_oriented(score, prep) * prep.foreground, prep, smooth_mm)


def resolve_map(settings: DetectionSettings, card, volume: bool) -> tuple[bool, int]:
    """Whether a volume's signed difference is smoothed across slices, and in how many tissue classes its map is
    normalised (scan_map): explicit, else the card's; 2D images: neither."""
    from .card import MAX_TISSUE_BINS

    if not volume:
        return False, 0
    d = card.detection_for(True)
    signed = bool(settings.signed_map if settings.signed_map is not None else d.signed_map)
    bins = int(settings.tissue_bins if settings.tissue_bins is not None else d.tissue_bins)
    if not 0 <= bins <= MAX_TISSUE_BINS:
        raise SettingsError(f"tissue classes must lie between 0 (off) and {MAX_TISSUE_BINS}, got {bins}")
    return signed, bins


def resolve_mirror(settings: DetectionSettings, card, volume: bool) -> float:
    """How far (mm) a volume's mirror image is grown before it is taken from its map (contralateral): explicit,
    else the card's; 2D images: 0 (off)."""
    from .card import MAX_MIRROR_MM

    if not volume:
        return 0.0
    mm = float(settings.mirror_mm if settings.mirror_mm is not None else card.detection_for(True).mirror_mm)
    if not 0 <= mm <= MAX_MIRROR_MM:
        raise SettingsError(f"the mirror map's growth must lie between 0 (off) and {MAX_MIRROR_MM:g} mm, got {mm:g}")
    return mm


def contralateral(score: np.ndarray, prep, grow_mm: float) -> np.ndarray:
    """An oriented map less its mirror image across the midsagittal plane of the brain atlas registered to the
    scan (atlas.contralateral_excess), zero outside the scored region. What both hemispheres show alike
    (the midline's bright veins, paired structures that the healing gets wrong on both sides) cancels; a
    lesion on one side stays. Unchanged when `grow_mm` is 0 or the scan has no registered brain."""
    from .atlas import contralateral_excess
    from .prepare import orient_array, oriented_to_image

    if grow_mm <= 0 or prep.atlas_transform is None or prep.geometry.is_2d:
        return score
    g = prep.geometry
    out = contralateral_excess(oriented_to_image(score, prep), prep.atlas_transform, grow_mm)
    oriented = orient_array(sitk.GetArrayFromImage(out), g.transpose, g.flips)
    return (oriented * prep.foreground).astype(np.float32, copy=False)


def tissue_normalised(score: np.ndarray, tissue: np.ndarray, region: np.ndarray, bins: int) -> np.ndarray:
    """A map divided by what healthy tissue of its kind shows in the same scan: the region's voxels fall into
    `bins` classes of equal size by `tissue` (the healed image's intensity, which a lesion does not change), and
    in each class the map becomes (value - median) / (90th percentile - median), clipped at 0. A healing that
    errs more along cortex than in white matter no longer outshouts a lesion in white matter; a lesion fills a
    small part of its class, so the class's median and spread stay those of healthy tissue. The spread has a
    floor of a tenth of the whole region's, so a class that heals almost perfectly does not turn noise into
    lesions. Zero outside `region`."""
    if bins <= 0 or not region.any():
        return score
    values = score[region].astype(np.float64)
    cls = tissue[region]
    edges = np.quantile(cls, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    index = np.searchsorted(edges, cls)
    median, high = np.quantile(values, [0.5, 0.9])
    floor = max(0.1 * (high - median), 1e-6)
    norm = np.zeros_like(values)
    for b in range(bins):
        sel = index == b
        if not sel.any():
            continue
        med, hi = np.quantile(values[sel], [0.5, 0.9])
        norm[sel] = (values[sel] - med) / max(hi - med, floor)
    out = np.zeros_like(score, dtype=np.float32)
    out[region] = np.maximum(norm, 0.0)
    return out


def scan_map(healed: torch.Tensor, prep, kernel: int, smooth_mm: float, signed: bool = False, tissue_bins: int = 0,
             score: Optional[torch.Tensor] = None, levels: Optional[torch.Tensor] = None,
             scales: Optional[Sequence[float]] = None, scan_quantile: float = 0.0, mirror_mm: float = 0.0) -> np.ndarray:
    """The map detection thresholds, on a prepared scan's oriented grid, from its healed slices (S, 1, G, G):
    D = G_k * x0 - G_k * x_hat inside the region, smoothed across slices by `smooth_mm` (volumes) either after
    taking its magnitude (the original) or, with `signed`, before: a lesion changes its neighbouring slices with
    the same sign while each slice's healing errs its own way, so the errors cancel instead of adding up.
    With `tissue_bins`, the map is then normalised per tissue class (tissue_normalised). `score`: the
    model-grid |D| when already computed (run_stages' score).

    With `levels` (L, S, 1, G, G: each noise level's own healed slices) and their `scales`, the map is instead
    the average over the levels of each level's map divided by its scale (what that level shows in healthy
    tissue, calibrate.level_scales): a lesion that one level heals and another does not keeps the first
    level's evidence whole instead of having it diluted in an averaged healed image, and every level speaks
    in the same units. With `scan_quantile` instead of scales, each level's scale is that quantile of its own
    map over the scan's scored voxels (a lesion fills far less than the rest of a brain, so a low quantile such
    as the 90th is healthy tissue's): the units then follow how well this scan heals, not the calibration
    scans.

    With `mirror_mm`, the map is finally reduced by its mirror image across the registered brain's midline
    (contralateral)."""
    from .prepare import grid_to_oriented

    if levels is not None:
        if scan_quantile <= 0 and (scales is None or len(scales) != levels.shape[0]):
            raise ValueError("maps per noise level need one scale per level, or a quantile to scale each in the scan")
        parts = [scan_map(h, prep, kernel, smooth_mm, signed, tissue_bins) for h in levels]
        if scan_quantile > 0:
            scales = scan_scales(parts, prep.foreground, scan_quantile)
        return contralateral(mean_of_scaled(parts, scales), prep, mirror_mm)
    signed = bool(signed and smooth_mm > 0)
    if score is None or signed:
        x0 = prep.slices.to(healed.device)
        diff = (blur_kernel(x0, kernel) - blur_kernel(healed, kernel)) * prep.masks.to(healed.device).float()
        score = diff if signed else diff.abs()
    out = oriented_score(score, prep, smooth_mm)
    if signed:
        out = np.abs(out)
    if tissue_bins > 0:
        tissue = grid_to_oriented(blur_kernel(healed, 3), prep)
        out = tissue_normalised(out, tissue, prep.foreground, tissue_bins)
    return contralateral(out, prep, mirror_mm)


def scan_scales(parts: Sequence[np.ndarray], region: np.ndarray, quantile: float) -> list[float]:
    """Each map's scale in its own scan: its `quantile` over the scored region (1 where the region is empty)."""
    return [float(np.quantile(m[region], quantile)) if region.any() else 1.0 for m in parts]


def scaled_parts(parts: Sequence[np.ndarray], scales: Sequence[float]) -> list[np.ndarray]:
    """Maps (or their values at the same voxels) each divided by its scale (at least 1e-6), in float32."""
    return [part / np.float32(max(float(sc), 1e-6)) for part, sc in zip(parts, scales)]


def mean_of_scaled(parts: Sequence[np.ndarray], scales: Sequence[float]) -> np.ndarray:
    """The average of maps (or of their values at the same voxels) each divided by its scale, in float32 and in
    one order, so that detection's map and the calibration's values agree to the bit."""
    scaled = scaled_parts(parts, scales)
    total = scaled[0]
    for part in scaled[1:]:
        total = total + part
    return (total / np.float32(len(parts))).astype(np.float32, copy=False)


def uses_level_maps(settings: DetectionSettings, card, ts: tuple[int, ...], volume: bool) -> bool:
    """Whether a volume's map is built per noise level: the card's volume setting says so, it has an ensemble,
    and no explicit t replaces it."""
    return bool(volume and card.detection_for(volume).level_maps and len(ts) > 1 and settings.t is None)


@dataclass
class LevelMaps:
    """How a volume's map per noise level is scaled (scan_map): by calibrated scales, or by each scan's own
    quantile."""

    scales: Optional[tuple[float, ...]] = None
    scan_quantile: float = 0.0

    def kwargs(self) -> dict[str, Any]:
        return {"scales": self.scales, "scan_quantile": self.scan_quantile}


def resolve_level_maps(settings: DetectionSettings, card, ts: tuple[int, ...], volume: bool) -> Optional[LevelMaps]:
    """How the map is built per noise level when a volume's setting asks for it (the card's setting has level_maps,
    an ensemble, and no explicit t replaces it); None for one map of the averaged healed images. Scaled by each
    scan's own quantile (level_scaling "scan"), or by the calibration's scales, which must have been measured
    with these levels."""
    if not uses_level_maps(settings, card, ts, volume):
        return None
    if card.detection_for(volume).level_scaling == "scan":
        return LevelMaps(scan_quantile=SCAN_LEVEL_QUANTILE)
    cal = card.calibration_for(volume) or {}
    scales = cal.get("level_scales")
    if not scales or _calibrated_ts(cal, ()) != ts or len(scales) != len(ts):
        raise ModelError(f"model {card.name!r} builds a volume's map per noise level (t {'+'.join(map(str, ts))}) "
                         "but its calibration has no scales for those levels; run `synomaly calibrate` on healthy "
                         "volumes, or `synomaly tune`")
    return LevelMaps(scales=tuple(float(v) for v in scales))


def _warn_if_calibration_differs(cal: dict, ts: tuple[int, ...], k: int, stages: int, smooth: float,
                                 region: str = "foreground", signed: bool = False, bins: int = 0,
                                 level_maps: bool = False, level_scaling: str = "healthy", mirror_mm: float = 0.0) -> None:
    """Calibrated thresholds hold only for the settings they were measured with."""
    def maps_words(per_level: bool, scaling: str) -> str:
        if not per_level:
            return "one map of the averaged healed images"
        return "a map per noise level" + (", scaled in each scan" if scaling == "scan" else "") + ", averaged"

    have_maps = (bool(cal.get("level_maps", False)), str(cal.get("level_scaling", "healthy")))
    used = (level_maps, level_scaling if level_maps else "healthy")
    if have_maps[0] != used[0] or (used[0] and have_maps[1] != used[1]):
        log.warning("threshold was calibrated on %s but %s is used; its false-positive rate will differ",
                    maps_words(*have_maps), maps_words(*used))
    have = _calibrated_ts(cal, ts)
    if have != ts:
        log.warning("threshold was calibrated with t=%s but t=%s is used; its false-positive rate will differ",
                    "+".join(map(str, have)), "+".join(map(str, ts)))
    for name, value in (("blur_kernel", k), ("max_stages", stages)):
        if name in cal and int(cal[name]) != value:
            log.warning("threshold was calibrated with %s=%s but %s=%s is used; its false-positive rate will differ",
                        name, cal[name], name, value)
    if float(cal.get("smooth_mm", 0.0)) != smooth:  # calibrations before smoothing existed had none
        log.warning("threshold was calibrated with the map smoothed %g mm across slices but %g mm is used; its "
                    "false-positive rate will differ", float(cal.get("smooth_mm", 0.0)), smooth)
    if cal.get("region", "foreground") != region:  # calibrations before regions existed scored the foreground
        log.warning("threshold was calibrated on the %s but the %s is scored; its false-positive rate will differ",
                    cal.get("region", "foreground"), region)
    if bool(cal.get("signed_map", False)) != signed or int(cal.get("tissue_bins", 0)) != bins:
        log.warning("threshold was calibrated on a map %s but a map %s is used; its false-positive rate will differ",
                    _map_words(bool(cal.get("signed_map", False)), int(cal.get("tissue_bins", 0))),
                    _map_words(signed, bins))
    if float(cal.get("mirror_mm", 0.0)) != mirror_mm:  # calibrations before the mirror map had none
        log.warning("threshold was calibrated on the map less its mirror image grown %g mm but %g mm is used "
                    "(0: no mirror image); its false-positive rate will differ", float(cal.get("mirror_mm", 0.0)),
                    mirror_mm)


def _map_words(signed: bool, bins: int) -> str:
    return (("of the signed difference" if signed else "of the absolute difference")
            + (f" normalised in {bins} tissue classes" if bins else ""))


def slice_generators(count: int, seed: int, device: torch.device) -> list[torch.Generator]:
    """One random stream per slice, so that a slice's noise does not depend on batching or on the other slices."""
    return [torch.Generator(device=device).manual_seed((int(seed) * 1_000_003 + i) % (2**63)) for i in range(count)]


def _slice_noise(shape: torch.Size, gens: Sequence[torch.Generator], device: torch.device) -> torch.Tensor:
    """Gaussian noise (B, 1, G, G), slice b drawn from gens[b]."""
    return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in gens])


def _denoise(model, x: torch.Tensor, ts: int | Sequence[int], draws: int, gens: Sequence[torch.Generator],
             per_level: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One stage for a batch (B, 1, G, G): noise to each level in `ts`, predict x0 in one call per level
    and draw, and average the predictions (one level and one draw: the original method). Slice b's noise
    comes from its own stream gens[b], in the order level, draw. Returns the average and, with `per_level`,
    each level's own average over its draws (L, B, 1, G, G), else None."""
    levels = (int(ts),) if isinstance(ts, int) else tuple(int(t) for t in ts)
    out = torch.zeros_like(x)
    each = torch.zeros((len(levels), *x.shape), dtype=x.dtype, device=x.device) if per_level else None
    for i, t in enumerate(levels):
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        for _ in range(draws):
            noise = _slice_noise(x.shape, gens, x.device)
            if model.card.noise.kind == "coarse":
                # denoising autoencoder: the input itself is the corrupted image; predict its noise at t = 0
                eps = model.predict_noise(x, torch.zeros_like(tt))
                pred = (x - eps).clamp(-1, 1)
            else:
                xt = q_sample(x, tt, noise, model.abar)
                eps = model.predict_noise(xt, tt)
                pred = predict_x0(xt, tt, eps, model.abar)
            out += pred
            if each is not None:
                each[i] += pred
    return out / (draws * len(levels)), (each / draws if each is not None else None)


def anomaly_score(x0: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor, kernel: int,
                  x0_blurred: Optional[torch.Tensor] = None) -> torch.Tensor:
    """D = |G_k * x0 - G_k * x_hat| inside the foreground, (N, 1, G, G); `x0_blurred` (G_k * x0) saves
    blurring the unchanging input again at every stage."""
    if x0_blurred is None:
        x0_blurred = blur_kernel(x0, kernel)
    return (x0_blurred - blur_kernel(x_hat, kernel)).abs() * mask


def run_stages(model, x0: torch.Tensor, mask: torch.Tensor, *, t: int | Sequence[int], kernel: int, threshold: float,
               max_stages: int, tolerance: float = 0.01, batch_size: Optional[int] = None, draws: int = 1, seed: int = 0,
               keep_levels: bool = False, progress: ProgressFn = null_progress) -> StageResult:
    """Multi-stage healing of S slices (S, 1, G, G): each stage noises the fused image, denoises it in one
    call, and keeps healed pixels only where the map (against the original x0) exceeds the threshold.
    A slice stops when its anomalous area changes by less than `tolerance` (or is zero after stage 1).
    `batch_size` None: slices per call from the model's execution plan (measured once per machine).
    `keep_levels`: also keep each noise level's own healed slices (for maps per level, scan_map)."""
    from .plan import execution_plan

    if batch_size is None:
        batch_size = execution_plan(model, progress).batch_size
    device = model.device
    x0 = x0.to(device)
    mask = mask.to(device).float()
    s = x0.shape[0]
    x = x0.clone()
    healed = x0.clone()
    first = torch.zeros_like(x0)
    n_levels = 1 if isinstance(t, int) else len(t)
    levels = x0.unsqueeze(0).repeat(n_levels, 1, 1, 1, 1) if keep_levels else None
    stages = torch.zeros(s, dtype=torch.long, device=device)
    prev_area = torch.full((s,), -1.0, device=device)
    active = torch.arange(s, device=device)
    gens = slice_generators(s, seed, device)
    x0_blurred = blur_kernel(x0, kernel)  # the input never changes: blur it once, not at every stage
    calls = 0
    total = s * max_stages
    done = 0
    bs = max(1, batch_size)
    for stage in range(1, max_stages + 1):
        if active.numel() == 0:
            break
        area = torch.zeros(active.numel(), device=device)
        start = 0
        while start < active.numel():
            idx = active[start : start + bs]
            try:
                xh, each = _denoise(model, x[idx], t, draws, [gens[i] for i in idx.tolist()], keep_levels)
            except torch.cuda.OutOfMemoryError:
                if bs > 1:
                    bs = max(1, bs // 2)
                    log.warning("GPU out of memory; retrying with batches of %d slices", bs)
                    torch.cuda.empty_cache()
                    continue
                raise
            calls += draws * (1 if isinstance(t, int) else len(t))
            d = anomaly_score(x0[idx], xh, mask[idx], kernel, x0_blurred[idx])
            m = (d > threshold).float()
            area[start : start + idx.numel()] = m.sum(dim=(1, 2, 3))
            x[idx] = xh * m + x0[idx] * (1 - m)
            healed[idx] = xh
            if levels is not None:
                levels[:, idx] = each
            if stage == 1:
                first[idx] = d
            stages[idx] = stage
            start += idx.numel()
            done += idx.numel()
            progress("detect", done, total, f"stage {stage}/{max_stages}")
        prev = prev_area[active]
        if stage == 1:
            converged = area == 0
        else:
            converged = (area - prev).abs() <= tolerance * prev.clamp_min(1.0)
        prev_area[active] = area
        n_conv = int(converged.sum())
        if n_conv:
            done += n_conv * (max_stages - stage)
        active = active[~converged]
    progress("detect", total, total, "multi-stage diffusion finished")
    score = anomaly_score(x0, healed, mask, kernel, x0_blurred)
    return StageResult(healed, score, stages, calls, first, levels)


#: settings that change a model's own volume map: with any of them the pair's calibration does not hold
MAP_SETTINGS = ("t", "blur_kernel", "max_stages", "noise_draws", "smooth_mm", "region", "signed_map", "tissue_bins",
                "mirror_mm")


@dataclass
class Pairing:
    """How a volume's map is paired (card.partner_3d): the partner model, the threshold and what it came from."""

    partner: Any
    threshold: float
    source: str
    grow: Optional[float]
    peak_fraction: Optional[float]


def resolve_pairing(settings: DetectionSettings, model, volume: bool, warnings: list[str]) -> Optional[Pairing]:
    """The partner model and the averaged map's threshold, when the card pairs volumes with one and nothing asked
    for the model alone (--single-model) or for another map of it than its card's (a warning then says the pair
    was not used; a setting asked at the card's own value changes nothing)."""
    from .modelio import load_partner

    pair = model.card.partner_3d
    if not volume or pair is None or settings.single_model:
        return None
    d = model.card.detection_3d
    own = {"t": d.noise_levels(), "blur_kernel": d.blur_kernel, "max_stages": d.max_stages, "noise_draws": d.noise_draws,
           "smooth_mm": d.smooth_mm, "region": d.region, "signed_map": d.signed_map, "tissue_bins": d.tissue_bins,
           "mirror_mm": d.mirror_mm}
    asked = {n: getattr(settings, n) for n in MAP_SETTINGS if getattr(settings, n) is not None}
    if "t" in asked:
        asked["t"] = (int(asked["t"]),)
    changed = [DETECTION_SETTING[n].flag if n in DETECTION_SETTING else n for n, v in asked.items() if v != own[n]]
    if changed:
        message = (f"the partner model {pair.file} is not used: {', '.join(changed)} change this model's map, "
                   "with which the pair was calibrated")
        log.warning(message)
        warnings.append(message)
        return None

    def paired_threshold(fpr: float, purpose: str) -> float:
        if fpr_key(fpr) not in pair.thresholds:
            have = ", ".join(sorted(pair.thresholds, key=float, reverse=True))
            raise ModelError(f"the paired map of {model.card.name!r} has no threshold calibrated for FPR {fpr:g}"
                             f"{purpose} (has: {have}); `synomaly pair --fprs` calibrates others, or detect with "
                             "the model alone (--single-model)")
        return float(pair.thresholds[fpr_key(fpr)])

    partner = load_partner(model)
    if settings.threshold is not None:
        threshold, source = float(settings.threshold), "explicit"
    else:
        fpr = settings.fpr if settings.fpr is not None else pair.fpr
        threshold, source = paired_threshold(fpr, ""), f"calibrated FPR {fpr_key(fpr)} (paired map)"
    # growth and outline: the asked or the pair's own, by the single model's rules
    grow_fpr = asked_grow_fpr(settings, pair.grow_fpr)
    grow = None
    if grow_fpr:
        grow = paired_threshold(grow_fpr, " to grow lesions into")
        grow = grow if grow < threshold else None
    return Pairing(partner, threshold, source, grow, asked_peak_fraction(settings, pair.peak_fraction))


def partner_map(partner, image: sitk.Image, prep, settings: DetectionSettings, progress: ProgressFn) -> tuple[np.ndarray, Any]:
    """The partner's oriented map of the scan prepared in `prep`, at the partner card's own volume setting (as
    `detect` with the partner alone would make it), its brain region reused from `prep`; and its stage result."""
    from .prepare import prepare_scan

    own = DetectionSettings(seed=settings.seed, tolerance=settings.tolerance, batch_size=settings.batch_size)
    card = partner.card
    ts, k, stages, threshold, _ = resolve_settings(own, card, True)
    fusion = resolve_fusion_threshold(own, card, ts, k, threshold, True)
    signed, bins = resolve_map(own, card, True)
    level_maps = resolve_level_maps(own, card, ts, True)
    p = prepare_scan(image, card, device=partner.device, region=prep.region, brain_from=prep)
    torch.manual_seed(settings.seed)
    res = run_stages(partner, p.slices, p.masks, t=ts, kernel=k, threshold=fusion, max_stages=stages,
                     tolerance=settings.tolerance, batch_size=settings.batch_size, draws=card.detection_3d.noise_draws,
                     seed=settings.seed, keep_levels=level_maps is not None, progress=progress)
    mirror = resolve_mirror(own, card, True) if p.atlas_transform is not None else 0.0
    score = scan_map(res.healed, p, k, resolve_smoothing(own, card, True), signed, bins, score=res.score,
                     levels=res.levels, mirror_mm=mirror, **(level_maps.kwargs() if level_maps is not None else {}))
    return score, res


def with_cpu_fallback(model, run: Callable[[Any, bool], Any], what: str, warnings: list[str],
                      progress: ProgressFn) -> tuple[Any, Any]:
    """`run(model, False)`; when the GPU runs out of memory even at one slice per batch (run_stages has already
    halved the batch down to one), the model moves to the CPU with a warning and `run(cpu_model, True)`.
    Returns the model that ran and what it returned."""
    try:
        return model, run(model, False)
    except torch.cuda.OutOfMemoryError:
        if model.device.type == "cpu":
            raise
        message = f"GPU out of memory{what} even with one slice per batch; continuing on the CPU (slower)"
        log.warning(message)
        warnings.append(message)
        progress("detect", 0, 1, message)
        torch.cuda.empty_cache()
        model = model.to("cpu")
        return model, run(model, True)


def partner_map_words(card) -> str:
    """The partner's map in words: what its tuned volume setting heals and blurs (its own thresholds are not used)."""
    d = card.detection_3d
    stages = "1 stage" if d.max_stages == 1 else f"up to {d.max_stages} stages"
    return (f"grid {card.grid_size}, t {'+'.join(str(t) for t in d.noise_levels())}, blur {d.blur_kernel}, "
            f"smoothed {d.smooth_mm:g} mm across slices, {stages}")


def paired_map(maps: Sequence[np.ndarray], region: np.ndarray, quantile: float,
               combine: str = "mean") -> tuple[np.ndarray, list[float]]:
    """The maps of one scan by the paired models, each divided by its own `quantile` inside the scored region,
    then averaged (mean_of_scaled) or, `combine` "geometric", combined by their geometric mean
    (geometric_of_scaled); and their scales."""
    scales = scan_scales(maps, region, quantile)
    return COMBINE_SCALED[combine](maps, scales), scales


def geometric_of_scaled(parts: Sequence[np.ndarray], scales: Sequence[float]) -> np.ndarray:
    """The geometric mean of maps each divided by its scale (the n-th root of their product; maps are >= 0), in
    float32 and in one order, as mean_of_scaled."""
    scaled = scaled_parts(parts, scales)
    total = np.maximum(scaled[0], np.float32(0))
    for part in scaled[1:]:
        total = total * np.maximum(part, np.float32(0))
    return np.power(total, np.float32(1.0 / len(parts))).astype(np.float32, copy=False)


#: the function of each of card.PAIR_COMBINES
COMBINE_SCALED = {"mean": mean_of_scaled, "geometric": geometric_of_scaled}


def check_compatibility(image: sitk.Image, card, allow: bool = False) -> list[str]:
    """Compare what the image's metadata says (DICOM modality, series description) with the card."""
    warnings: list[str] = []
    keys = set(image.GetMetaDataKeys())
    if "0008|0060" in keys:
        modality = image.GetMetaData("0008|0060").strip().upper()
        if modality and card.modality and modality != card.modality.upper() and modality not in ("OT", ""):
            msg = f"the image is {modality} but model {card.name!r} was trained on {card.modality}"
            if not allow:
                raise ModelError(msg + "; use a model for this modality (or --allow-modality-mismatch)")
            warnings.append(msg)
    if "0008|103e" in keys and card.contrast.lower() not in ("any", ""):
        desc = image.GetMetaData("0008|103e").upper()
        known = ("FLAIR", "T1", "T2", "DWI", "ADC", "SWI", "PD")
        found = [c for c in known if c in desc]
        if found and not any(c in card.contrast.upper() for c in found):
            warnings.append(f"series description {desc.strip()!r} suggests {found[0]}, "
                            f"but the model expects {card.contrast}")
    for w in warnings:
        log.warning(w)
    return warnings


def postprocess(score: np.ndarray, threshold: float, spacing: tuple[float, ...], min_mm3: float,
                grow: Optional[float] = None, peak_fraction: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
    """Threshold an anomaly map and drop 3D connected components smaller than min_mm3; returns (binary, labels).

    With `grow` below `threshold` (hysteresis): the components of the map above `grow` that reach above
    `threshold` somewhere are kept whole, so a lesion found at a strict threshold is segmented to its
    extent at a looser one, while regions that never reach the strict threshold stay out.

    With `peak_fraction` (say 0.5): each lesion kept is then cut at that fraction of its own peak, where
    this is above the threshold it was found at (`grow` if given, else `threshold`). A blurred map of a
    lesion crosses half its peak at the lesion's edge whatever its contrast, while one absolute threshold
    outlines a strong lesion too wide and a faint one too narrow; which lesions are found is unchanged.
    """
    from scipy import ndimage

    hysteresis = grow is not None and grow < threshold
    binary = score > (grow if hysteresis else threshold)
    labels = np.zeros(score.shape, dtype=np.int32)
    hits = [np.nonzero(binary.any(axis=tuple(a for a in range(score.ndim) if a != axis)))[0] for axis in range(score.ndim)]
    if hits[0].size == 0:
        return binary, labels
    # label inside the bounding box of the above-threshold voxels only: lesions are small, volumes large
    box = tuple(slice(int(h[0]), int(h[-1]) + 1) for h in hits)
    structure = np.ones((3,) * score.ndim, dtype=bool)
    inner, n = ndimage.label(binary[box], structure=structure)
    voxel_mm3 = float(np.prod(spacing))
    counts = np.bincount(inner.ravel(), minlength=n + 1)
    keep = counts * voxel_mm3 >= min_mm3
    if hysteresis:  # only the components with a voxel above the strict threshold
        seeded = np.zeros(n + 1, dtype=bool)
        seeded[np.unique(inner[score[box] > threshold])] = True
        keep &= seeded
    keep[0] = False
    if peak_fraction is not None and keep.any():
        voxels = inner > 0  # each component's peak from its own voxels (ndimage.maximum scans the whole box per call)
        peaks = np.full(n + 1, -np.inf)
        np.maximum.at(peaks, inner[voxels], score[box][voxels])
        level = np.maximum(peak_fraction * peaks, grow if hysteresis else threshold)
        cut = keep[inner] & (score[box] > level[inner])
        inner, n = ndimage.label(cut, structure=structure)  # a cut lesion may fall into pieces: size each again
        counts = np.bincount(inner.ravel(), minlength=n + 1)
        keep = counts * voxel_mm3 >= min_mm3
        keep[0] = False
    if not keep[1:].all():  # renumber the components kept 1..m (removing components never joins others)
        renumber = np.where(keep, np.cumsum(keep), 0).astype(np.int32)
        inner = renumber[inner]
    labels[box] = inner
    return labels > 0, labels


def lesion_table(labels: np.ndarray, score: np.ndarray, image: sitk.Image,
                 units: str = "mm") -> list[dict[str, Any]]:
    """One row per labelled component (labels/score in numpy (k, j, i) order of `image`), largest first.

    units 'pixels': the image has no physical pixel size, so volume_ml counts a pixel as 1 mm^3
    (pixels / 1000); centroids stay in the image's own coordinates. Works on the labelled voxels
    only (bincount per label), so its cost follows the lesion volume, not the image size.
    """
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return []
    coords = np.nonzero(labels)
    lab = labels[coords]
    vals = score[coords].astype(np.float64)
    counts = np.bincount(lab, minlength=n + 1)[1:]
    sums = np.bincount(lab, weights=vals, minlength=n + 1)[1:]
    order = np.lexsort((vals, lab))
    last = np.r_[np.nonzero(np.diff(lab[order]))[0], lab.size - 1]
    maxs = vals[order][last]
    ndim = labels.ndim
    centre = np.zeros((n, ndim))
    lo = np.zeros((n, ndim), dtype=np.int64)
    hi = np.zeros((n, ndim), dtype=np.int64)
    for axis in range(ndim):
        c = coords[axis]
        centre[:, axis] = np.bincount(lab, weights=c, minlength=n + 1)[1:] / counts
        mn = np.full(n + 1, np.iinfo(np.int64).max)
        mx = np.full(n + 1, -1, dtype=np.int64)
        np.minimum.at(mn, lab, c)
        np.maximum.at(mx, lab, c)
        lo[:, axis], hi[:, axis] = mn[1:], mx[1:]
    voxel_ml = (float(np.prod(image.GetSpacing())) if units == "mm" else 1.0) / 1000.0
    rows = []
    for i in range(n):
        c = centre[i][::-1]  # numpy (k, j, i) -> index (i, j, k)
        lps = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in c])
        ras = (-lps[0], -lps[1], lps[2] if len(lps) > 2 else 0.0)
        b0 = list(lo[i][::-1]) + [0] * (3 - ndim)
        b1 = list(hi[i][::-1]) + [0] * (3 - ndim)
        rows.append({
            "voxels": int(counts[i]),
            "volume_ml": round(float(counts[i]) * voxel_ml, 4),
            "max_score": round(float(maxs[i]), 4),
            "mean_score": round(float(sums[i] / counts[i]), 4),
            "centroid_r": round(float(ras[0]), 2),
            "centroid_a": round(float(ras[1]), 2),
            "centroid_s": round(float(ras[2]), 2),
            "bbox_i0": int(b0[0]), "bbox_j0": int(b0[1]), "bbox_k0": int(b0[2]),
            "bbox_i1": int(b1[0]), "bbox_j1": int(b1[1]), "bbox_k1": int(b1[2]),
            "units": units,
        })
    rows.sort(key=lambda r: -r["voxels"])
    return [{"id": i, **r} for i, r in enumerate(rows, start=1)]


def detect(image: sitk.Image, model, settings: Optional[DetectionSettings] = None,
           progress: Optional[ProgressFn] = None) -> DetectionResult:
    """Detect anomalies in a SimpleITK image (2D slice or 3D volume) with a loaded model.

    Returns the counterfactual (input intensity units), the anomaly map (the normalised intensity difference,
    0..2; for a volume whose setting normalises per tissue class, how far above its tissue's typical value in
    units of that tissue's spread; for one built per noise level, the levels' maps in units of their healthy
    99.9th percentiles or of their own 90th percentile in the scan, averaged: scan_map), the binary segmentation
    and the lesion rows, all on the input grid.
    """
    from .prepare import (grid_to_oriented, is_volume, model_units_per_intensity, oriented_to_image, pixel_units,
                          prepare_scan)

    settings = (settings or DetectionSettings()).validate()
    progress = progress or null_progress
    card = model.card
    t0 = time.perf_counter()
    calls0, secs0 = model.calls, model.call_seconds
    warnings = check_compatibility(image, card, settings.allow_modality_mismatch)
    volume = is_volume(image)
    pairing = resolve_pairing(settings, model, volume, warnings)
    # paired: this model's own map as it is alone at its card's setting; the thresholds are the pair's
    own = replace(settings, threshold=None, fpr=None, grow_fpr=None, peak_fraction=None) if pairing else settings
    ts, k, stages, threshold, source = resolve_settings(own, card, volume)
    fusion = resolve_fusion_threshold(own, card, ts, k, threshold, volume)
    grow = resolve_grow_threshold(own, card, threshold, volume)
    peak_fraction = resolve_peak_fraction(own, card, volume)
    smooth = resolve_smoothing(settings, card, volume)
    region = resolve_region(settings, card, volume)
    signed, bins = resolve_map(settings, card, volume)
    mirror = resolve_mirror(settings, card, volume)
    level_maps = resolve_level_maps(settings, card, ts, volume)
    draws = int(settings.noise_draws if settings.noise_draws is not None else card.detection_for(volume).noise_draws)
    if draws < 1:
        raise SettingsError(f"noise draws must be at least 1, got {draws}")
    own_threshold = threshold
    if pairing is not None:
        threshold, source, grow, peak_fraction = pairing.threshold, pairing.source, pairing.grow, pairing.peak_fraction
    progress("prepare", 0, 1, "reorienting, normalising and resampling slices"
             + ("; registering the brain atlas" if region != "foreground" else ""))
    prep = prepare_scan(image, card, device=model.device, region=region)
    if prep.region != region:
        warnings.append(prep.region_note)
    if mirror > 0 and prep.atlas_transform is None:
        message = "the map is not reduced by its mirror image: that needs the registered brain, which this scan lacks"
        log.warning(message)
        warnings.append(message)
    progress("prepare", 1, 1, f"{prep.slices.shape[0]} slices with " + ("foreground" if prep.region == "foreground" else "brain"))
    t_prep = time.perf_counter()
    torch.manual_seed(settings.seed)
    stage_args = dict(t=ts, kernel=k, threshold=fusion, max_stages=stages, tolerance=settings.tolerance,
                      batch_size=settings.batch_size, draws=draws, seed=settings.seed,
                      keep_levels=level_maps is not None, progress=progress)
    model, res = with_cpu_fallback(model, lambda m, cpu: run_stages(m, prep.slices.cpu() if cpu else prep.slices,
                                                                  prep.masks.cpu() if cpu else prep.masks, **stage_args),
                                   "", warnings, progress)
    g = prep.geometry
    score_o = scan_map(res.healed, prep, k, smooth, signed, bins, score=res.score, levels=res.levels, mirror_mm=mirror,
                       **(level_maps.kwargs() if level_maps is not None else {}))
    paired = None
    if pairing is not None:
        first = pairing.partner
        p_calls, p_secs = first.calls, first.call_seconds
        progress("detect", 0, 1, f"healing again with the partner model {card.partner_3d.file}")
        partner, (p_score, p_res) = with_cpu_fallback(
            first, lambda m, cpu: partner_map(m, image, prep, settings, progress), " for the partner model", warnings,
            progress)
        if partner is not first:  # moved to the CPU: a new model, counting from zero
            p_calls, p_secs = 0, 0.0
        score_o, scales = paired_map([score_o, p_score], prep.foreground, card.partner_3d.scan_quantile,
                                     card.partner_3d.combine)
        paired = {"file": card.partner_3d.file, "model": partner.card.name, "model_version": partner.card.version,
                  "combine": card.partner_3d.combine,
                  "map": partner_map_words(partner.card), "scan_quantile": card.partner_3d.scan_quantile,
                  "scales": [round(v, 6) for v in scales], "own_threshold": own_threshold,
                  "network_calls": partner.calls - p_calls, "network_seconds": round(partner.call_seconds - p_secs, 3),
                  "stages_per_slice_mean": round(float(p_res.stages.float().mean()), 3) if p_res.stages.numel() else 0.0}
    t_net = time.perf_counter()
    progress("postprocess", 0, 1, "mapping back to the input grid, 3D components")
    delta_o = grid_to_oriented(res.healed - prep.slices.to(res.healed.device), prep)
    cf_o = prep.oriented + delta_o * np.asarray(1.0 / model_units_per_intensity(g), dtype=np.float32)
    score_img = oriented_to_image(score_o, prep)
    cf_img = oriented_to_image(cf_o, prep)
    score_in = sitk.GetArrayViewFromImage(score_img)
    units = "pixels" if pixel_units(image) else "mm"
    spacing = tuple(image.GetSpacing()) if units == "mm" else (1.0,) * image.GetDimension()
    if units == "pixels":
        message = ("the image gives no physical pixel size: sizes are in pixels (volume_ml is pixels / 1000, "
                   f"the minimum lesion size {settings.min_lesion_mm3:g} pixels), not mm")
        log.warning(message)
        warnings.append(message)
    binary, labels = postprocess(np.asarray(score_in), threshold, spacing, settings.min_lesion_mm3, grow, peak_fraction)
    seg_img = sitk.GetImageFromArray(binary.astype(np.uint8))
    seg_img.CopyInformation(score_img)
    lesions = lesion_table(labels, np.asarray(score_in), score_img, units=units)
    progress("postprocess", 1, 1, f"{len(lesions)} lesions")
    t_end = time.perf_counter()
    report = {
        "model": card.name,
        "model_version": card.version,
        "settings": asdict(settings),
        "t": ts[0] if len(ts) == 1 else list(ts), "noise_draws": draws, "blur_kernel": k, "smooth_mm": smooth,
        "signed_map": signed, "tissue_bins": bins,
        "mirror_mm": mirror if prep.atlas_transform is not None else 0.0, "level_maps": level_maps is not None,
        "level_scales": list(level_maps.scales) if level_maps is not None and level_maps.scales else None,
        "level_scan_quantile": level_maps.scan_quantile if level_maps is not None else None,
        "region": prep.region, "region_note": prep.region_note,
        "setting": ("volume (tuned)" if volume and card.detection_3d is not None else "card default")
        + (f", paired with {paired['file']}" if paired else ""), "max_stages": stages, "threshold": threshold,
        "threshold_source": source, "partner": paired,
        "fusion_threshold": fusion,
        "grow_threshold": grow,
        "peak_fraction": peak_fraction,
        "slices_total": int(g.oriented_shape[0]),
        "slices_analysed": int(prep.slices.shape[0]),
        "stages_per_slice_mean": round(float(res.stages.float().mean()), 3) if res.stages.numel() else 0.0,
        "network_calls": model.calls - calls0 + (paired["network_calls"] if paired else 0),
        "network_seconds": round(model.call_seconds - secs0 + (paired["network_seconds"] if paired else 0.0), 3),
        "seconds": {"prepare": round(t_prep - t0, 3), "diffusion": round(t_net - t_prep, 3),
                    "postprocess": round(t_end - t_net, 3), "total": round(t_end - t0, 3)},
        "device": str(model.device),
        "batch_size": settings.batch_size or (model.plan.batch_size if model.plan is not None else None),
        "channels_last": model.channels_last,
        "precision": str(model.dtype) if model.dtype is not None else "float32",
        "lesion_count": len(lesions),
        "anomalous_volume_ml": round(sum(r["volume_ml"] for r in lesions), 4),
        "anomalous_voxels": sum(r["voxels"] for r in lesions),
        "units": units,
        "warnings": warnings,
        "intended_use": card.intended_use,
    }
    return DetectionResult(cf_img, score_img, seg_img, lesions, threshold, source, report)
