"""The model card: what a model file says about itself, validated without torch."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from .contract import REGIONS

CARD_FORMAT = "synomaly-model-card/1"
ORIENTATIONS = ("axial", "coronal", "sagittal")
POLARITIES = ("brighter", "darker", "both")
LEVEL_SCALINGS = ("healthy", "scan")  # DetectionDefaults.level_scaling
ARCHITECTURES = ("monai.DiffusionModelUNet", "guided-diffusion.UNetModel")
NORMALISATIONS = ("foreground-percentile", "slice-minmax")
FRAMINGS = ("foreground-square", "whole-slice")
MAX_TISSUE_BINS = 64  # a volume map is normalised in at most this many tissue classes (detect.tissue_normalised)
MAX_MIRROR_MM = 20.0  # a volume map's mirror image is grown by at most this much (detect.contralateral)


class ModelCardError(ValueError):
    """A model card is missing a field or holds an impossible value."""


@dataclass
class NoiseSettings:
    """Synomaly noise parameters at the model grid (sigma in grid pixels, tau on the 0-255 scale)."""

    kind: str = "synomaly"  # "synomaly", "gaussian" or "coarse"
    sigma: float = 1.5
    tau: float = 175.0
    offset: float = 0.5
    polarity: str = "brighter"
    coarse_scale: int = 8  # only for kind == "coarse": noise resolution divisor (Kascenas et al.)
    coarse_std: float = 0.2


@dataclass
class NormalisationSettings:
    """How intensities become model units in [-1, 1].

    "foreground-percentile" (ours): per volume, the lower/upper percentiles inside the foreground
    map to -1 / upper_value. "slice-minmax" (the Synomaly authors'): intensities are clipped to
    [window_low, window_high] when given, else to the volume's lower/upper percentiles over all
    voxels, then every slice is stretched from its own minimum (-1) to its maximum (+1).
    """

    method: str = "foreground-percentile"
    lower_percentile: float = 1.0
    upper_percentile: float = 99.0
    upper_value: float = 0.8  # the upper percentile maps here, leaving head-room for hyperintensities
    window_low: float | None = None  # slice-minmax only: fixed window in input units (e.g. CT HU)
    window_high: float | None = None


@dataclass
class NetworkSettings:
    """The network (2D, one channel in and out): MONAI's DiffusionModelUNet, or the authors' UNet.

    channels and attention_levels are per resolution level. For "guided-diffusion.UNetModel"
    (imported from the authors' checkpoints) model_channels is the timestep-embedding width and
    the base the level widths are multiples of; num_head_channels -1 means num_heads heads.
    """

    architecture: str = "monai.DiffusionModelUNet"
    channels: tuple[int, ...] = (32, 64, 128)
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_res_blocks: int = 1
    num_head_channels: int = 32
    norm_num_groups: int = 32
    model_channels: int = 0  # guided-diffusion only
    num_heads: int = 1  # guided-diffusion only, used when num_head_channels is -1
    dropout: float = 0.0


@dataclass
class DetectionDefaults:
    """Detection settings the model was developed with (grid pixels for the blur kernel)."""

    t: int = 200
    blur_kernel: int = 5
    threshold: float = 0.25
    max_stages: int = 5
    t_ensemble: tuple[int, ...] = ()  # several noise levels whose healed images are averaged (overrides t)
    noise_draws: int = 1  # noise draws averaged per noise level
    fpr: float = 1e-3  # the calibrated false-positive rate used when none is asked for
    grow_fpr: Optional[float] = None  # lesions grow into connected voxels above this rate's threshold (hysteresis)
    # each lesion found is then outlined at this fraction of its own peak where that lies above the threshold it
    # was found at (detect.postprocess; None: not)
    peak_fraction: Optional[float] = None
    smooth_mm: float = 0.0  # a volume's map is smoothed across slices (Gaussian sigma, mm; 0: not)
    # where a volume is scored: the foreground, the registered atlas brain ("brain"), or that brain cut out
    # before healing ("brain-stripped")
    region: str = "foreground"
    # volumes only (detect.scan_map): smooth the signed difference across slices before taking its magnitude,
    # so that healing errors of either sign cancel while a lesion's persist; and divide the map by the spread
    # each of `tissue_bins` classes of the healed image's intensity shows in the same scan (0: not)
    signed_map: bool = False
    tissue_bins: int = 0
    # volumes scored in the registered brain only (detect.contralateral): the map less its mirror image across
    # the brain's midline, that image grown by `mirror_mm` (0: not)
    mirror_mm: float = 0.0
    # volumes with an ensemble only (detect.scan_map): one map per noise level, each divided by what that level
    # shows in healthy tissue, averaged; instead of one map of the averaged healed images. level_scaling
    # "healthy": by the level's 99.9th percentile on the calibration scans (calibration_3d.level_scales);
    # "scan": by the level's 90th percentile in the scan itself (no scales to calibrate)
    level_maps: bool = False
    level_scaling: str = "healthy"

    def noise_levels(self) -> tuple[int, ...]:
        """The noise levels of one stage: the ensemble, else t alone."""
        return tuple(int(t) for t in self.t_ensemble) or (int(self.t),)


#: how a pair's two scaled maps can be combined (PartnerModel.combine), each with the words that say it
PAIR_COMBINES = {"mean": "averaged", "geometric": "combined by their geometric mean"}


def fpr_key(fpr: float) -> str:
    """Canonical text of a false-positive rate, as thresholds are keyed in the card ('0.001', '1e-05')."""
    return f"{float(fpr):g}" if float(fpr) >= 1e-4 else f"{float(fpr):.0e}"


@dataclass
class PartnerModel:
    """Volumes only: a second model whose map is averaged with this model's (`synomaly pair`, detect.paired_map).

    Each model heals the scan at its own tuned volume setting; each map is divided by its own `scan_quantile`
    inside the scan's scored region; the two are averaged and thresholded at `thresholds` (per FPR, calibrated on
    the averaged map of lesion-free volumes), at `fpr` unless another is asked for, lesions grown into the looser
    threshold at `grow_fpr` and each outlined at `peak_fraction` of its own peak when these are set (as a single
    model's DetectionDefaults). The counterfactual stays this model's. `file` lies beside this model's file;
    `sha256` is that file's, checked before it is loaded."""

    file: str
    sha256: str
    fpr: float = 1e-5
    grow_fpr: Optional[float] = None
    peak_fraction: Optional[float] = None
    scan_quantile: float = 0.9
    thresholds: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)  # data, scans, the sweep and the rule that picked fpr
    combine: str = "mean"  # how the two scaled maps become one: "mean", or "geometric" (the square root of their
    # product: high only where both are; Docs/experiments.md, *How the two maps are combined*)


@dataclass
class ModelCard:
    """Everything needed to use a model correctly, stored as JSON in the model file."""

    name: str
    version: str = "0.1.0"
    description: str = ""
    modality: str = "MR"
    contrast: str = "any"
    orientation: str = "axial"
    grid_size: int = 64
    field_of_view: str = "foreground bounding square with a 4 % margin"
    framing: str = "foreground-square"  # or "whole-slice": the full slice padded to a square
    normalisation: NormalisationSettings = field(default_factory=NormalisationSettings)
    network: NetworkSettings = field(default_factory=NetworkSettings)
    noise: NoiseSettings = field(default_factory=NoiseSettings)
    timesteps: int = 1000
    schedule: str = "cosine"
    prediction: str = "epsilon"
    detection: DetectionDefaults = field(default_factory=DetectionDefaults)
    calibration: dict[str, Any] = field(default_factory=dict)
    # volumes may need other settings than single slices: `synomaly tune` (3D lesions in healthy volumes)
    # writes these; without them volumes use `detection` and `calibration` like slices
    detection_3d: DetectionDefaults | None = None
    calibration_3d: dict[str, Any] = field(default_factory=dict)
    # volumes: a partner model averaged with this one (PartnerModel); None: this model alone
    partner_3d: PartnerModel | None = None
    training: dict[str, Any] = field(default_factory=dict)
    tuning: dict[str, Any] = field(default_factory=dict)  # `synomaly tune`: data, sweep table, choice
    intended_use: str = "Research use only. Not for diagnosis or treatment decisions."
    licence: str = "Apache-2.0 (weights); see training data licences"
    format: str = CARD_FORMAT

    def to_json(self) -> str:
        """Serialise the card as compact JSON."""
        return json.dumps(asdict(self), sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        """The card as plain data."""
        return asdict(self)

    def copy(self) -> "ModelCard":
        """A deep copy (used when fine-tuning keeps the base card)."""
        return copy.deepcopy(self)

    def at_grid(self, grid: int) -> "ModelCard":
        """A copy for the same network run on another model grid (fine-tuning a base at a finer grid): the noise
        blobs and the slice blur keep their size in the image, and every threshold, tuned setting and sweep
        of the old grid is dropped, since they were measured there (calibrate and tune again)."""
        out = self.copy()
        scale = grid / self.grid_size
        out.grid_size = grid
        out.noise.sigma = self.noise.sigma * scale
        out.noise.coarse_scale = max(1, round(self.noise.coarse_scale * scale))
        out.detection.blur_kernel = max(1, int(round(self.detection.blur_kernel * scale)) | 1)
        out.calibration, out.detection_3d, out.calibration_3d, out.tuning = {}, None, {}, {}
        out.partner_3d = None
        out.validate()
        return out

    @classmethod
    def from_json(cls, text: str) -> "ModelCard":
        """Parse and validate a card, naming the first problem found."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelCardError(f"model card is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> "ModelCard":
        """Build a card from plain data, validating every field."""
        if not isinstance(data, dict):
            raise ModelCardError("model card must be a JSON object")
        if data.get("format") != CARD_FORMAT:
            raise ModelCardError(f"model card format is {data.get('format')!r}, expected {CARD_FORMAT!r}")
        if not data.get("name"):
            raise ModelCardError("model card has no 'name'")
        nested = {
            "normalisation": NormalisationSettings,
            "network": NetworkSettings,
            "noise": NoiseSettings,
            "detection": DetectionDefaults,
        }
        kwargs = dict(data)
        for key, klass in (("detection_3d", DetectionDefaults), ("partner_3d", PartnerModel)):
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
            else:
                nested[key] = klass
        for key, klass in nested.items():
            value = kwargs.get(key, {})
            if not isinstance(value, dict):
                raise ModelCardError(f"model card field '{key}' must be an object")
            known = set(klass.__dataclass_fields__)
            unknown = set(value) - known
            if unknown:
                raise ModelCardError(f"model card field '{key}' has unknown keys {sorted(unknown)}")
            kwargs[key] = klass(**value)
        known = set(cls.__dataclass_fields__)
        unknown = set(kwargs) - known
        if unknown:
            raise ModelCardError(f"model card has unknown fields {sorted(unknown)}")
        card = cls(**kwargs)
        card.network.channels = tuple(int(c) for c in card.network.channels)
        card.network.attention_levels = tuple(bool(a) for a in card.network.attention_levels)
        for d in (card.detection, card.detection_3d):
            if d is not None:
                d.t_ensemble = tuple(int(t) for t in d.t_ensemble)
        card.validate()
        return card

    def validate(self) -> None:
        """Raise ModelCardError if a value is impossible."""
        if self.orientation not in ORIENTATIONS:
            raise ModelCardError(f"orientation {self.orientation!r} is not one of {ORIENTATIONS}")
        if not 8 <= int(self.grid_size) <= 1024 or int(self.grid_size) % 8:
            raise ModelCardError(f"grid_size {self.grid_size} must be a multiple of 8 between 8 and 1024")
        if self.schedule != "cosine" or self.prediction != "epsilon":
            raise ModelCardError("only the cosine schedule with epsilon prediction is supported")
        if self.timesteps < 10:
            raise ModelCardError(f"timesteps {self.timesteps} is too small")
        if len(self.network.channels) != len(self.network.attention_levels):
            raise ModelCardError("network.channels and network.attention_levels differ in length")
        if self.network.architecture not in ARCHITECTURES:
            raise ModelCardError(f"network.architecture {self.network.architecture!r} is not one of {ARCHITECTURES}")
        if self.network.architecture == "guided-diffusion.UNetModel":
            if self.network.model_channels <= 0:
                raise ModelCardError("network.model_channels must be positive for guided-diffusion.UNetModel")
            if self.grid_size % 2 ** (len(self.network.channels) - 1):
                raise ModelCardError(
                    f"grid_size {self.grid_size} is not divisible by 2^{len(self.network.channels) - 1}, "
                    "as the network's downsampling needs"
                )
        if self.framing not in FRAMINGS:
            raise ModelCardError(f"framing {self.framing!r} is not one of {FRAMINGS}")
        if self.noise.kind not in ("synomaly", "gaussian", "coarse"):
            raise ModelCardError(f"noise.kind {self.noise.kind!r} is unknown")
        if self.noise.polarity not in POLARITIES:
            raise ModelCardError(f"noise.polarity {self.noise.polarity!r} is not one of {POLARITIES}")
        for name, d in (("detection", self.detection), ("detection_3d", self.detection_3d)):
            if d is None:
                continue
            if not 0 < d.t < self.timesteps:
                raise ModelCardError(f"{name}.t {d.t} must lie in (0, {self.timesteps})")
            if any(not 0 < int(t) < self.timesteps for t in d.t_ensemble):
                raise ModelCardError(f"{name}.t_ensemble {list(d.t_ensemble)} must lie in (0, {self.timesteps})")
            if int(d.noise_draws) < 1 or not 0 < float(d.fpr) < 1 or int(d.max_stages) < 1:
                raise ModelCardError(f"{name}: noise_draws and max_stages must be >= 1 and fpr in (0, 1)")
            if int(d.blur_kernel) < 1 or int(d.blur_kernel) % 2 == 0:
                raise ModelCardError(f"{name}.blur_kernel {d.blur_kernel} must be odd and positive")
            if not 0 <= int(d.tissue_bins) <= MAX_TISSUE_BINS:
                raise ModelCardError(f"{name}.tissue_bins {d.tissue_bins} must lie between 0 (off) and "
                                     f"{MAX_TISSUE_BINS}")
            if not 0 <= float(d.mirror_mm) <= MAX_MIRROR_MM:
                raise ModelCardError(f"{name}.mirror_mm {d.mirror_mm} must lie between 0 (off) and {MAX_MIRROR_MM:g}")
            if d.peak_fraction is not None and not 0 < float(d.peak_fraction) < 1:
                raise ModelCardError(f"{name}.peak_fraction {d.peak_fraction} must lie in (0, 1), or be absent")
            if d.level_scaling not in LEVEL_SCALINGS:
                raise ModelCardError(f"{name}.level_scaling {d.level_scaling!r} is not one of {LEVEL_SCALINGS}")
            if d.region not in REGIONS:
                raise ModelCardError(f"{name}.region {d.region!r} is not one of {REGIONS}")
        p = self.partner_3d
        if p is not None:
            if self.detection_3d is None:
                raise ModelCardError("partner_3d needs a tuned volume setting (detection_3d) to pair with")
            if not p.file or "/" in p.file or "\\" in p.file or p.file.startswith("."):
                raise ModelCardError(f"partner_3d.file {p.file!r} must be a plain file name beside the model")
            if len(p.sha256) != 64 or any(c not in "0123456789abcdef" for c in p.sha256):
                raise ModelCardError("partner_3d.sha256 must be 64 lower-case hexadecimal digits")
            if not 0 < float(p.fpr) < 1 or not 0 < float(p.scan_quantile) < 1:
                raise ModelCardError("partner_3d: fpr and scan_quantile must lie in (0, 1)")
            if not p.thresholds:
                raise ModelCardError("partner_3d has no calibrated thresholds (run `synomaly pair`)")
            if p.grow_fpr is not None and not float(p.fpr) < float(p.grow_fpr) < 1:
                raise ModelCardError(f"partner_3d.grow_fpr {p.grow_fpr} must be a looser rate than fpr {p.fpr}, "
                                     "or be absent")
            if p.peak_fraction is not None and not 0 < float(p.peak_fraction) < 1:
                raise ModelCardError(f"partner_3d.peak_fraction {p.peak_fraction} must lie in (0, 1), or be absent")
            if p.combine not in PAIR_COMBINES:
                raise ModelCardError(f"partner_3d.combine {p.combine!r} is not one of {tuple(PAIR_COMBINES)}")
            missing = [fpr_key(f) for f in (p.fpr, p.grow_fpr) if f is not None and fpr_key(f) not in p.thresholds]
            if missing:
                raise ModelCardError(f"partner_3d has no calibrated threshold at FPR {', '.join(missing)} (it has "
                                     f"{', '.join(sorted(p.thresholds, key=float))}): run `synomaly pair` again")
        n = self.normalisation
        if n.method not in NORMALISATIONS:
            raise ModelCardError(f"normalisation.method {n.method!r} is not one of {NORMALISATIONS}")
        if (n.window_low is None) != (n.window_high is None) or (
            n.window_low is not None and not float(n.window_low) < float(n.window_high)
        ):
            raise ModelCardError("normalisation window needs both window_low < window_high, or neither")
        if not 0 <= n.lower_percentile < n.upper_percentile <= 100:
            raise ModelCardError("normalisation percentiles must satisfy 0 <= lower < upper <= 100")
        if not -1.0 < n.upper_value <= 1.0:
            raise ModelCardError("normalisation.upper_value must lie in (-1, 1]")

    def detection_for(self, volume: bool) -> DetectionDefaults:
        """The detection setting for a 3D volume (the tuned one, when the card has it) or a 2D slice."""
        return self.detection_3d if (volume and self.detection_3d is not None) else self.detection

    def calibration_for(self, volume: bool) -> dict[str, Any]:
        """The thresholds that belong to detection_for(volume)."""
        return self.calibration_3d if (volume and self.detection_3d is not None) else self.calibration

    def detection_text(self, volume: bool = False) -> str:
        """A detection setting in one phrase ('t 50+100+200, blur 3, up to 5 stages, FPR 0.001')."""
        d = self.detection_for(volume)
        t = "+".join(str(v) for v in d.t_ensemble) if d.t_ensemble else str(d.t)
        if volume and d.level_maps and len(d.t_ensemble) > 1:
            t += f" (a map per level{', scaled in each scan' if d.level_scaling == 'scan' else ''}, averaged)"
        draws = f", {d.noise_draws} draws" if d.noise_draws > 1 else ""
        grow = f" grown to FPR {d.grow_fpr:g}" if d.grow_fpr else ""
        grow += f", each lesion outlined at {d.peak_fraction:g} of its peak" if d.peak_fraction else ""
        smooth = ""
        if volume and d.smooth_mm:
            smooth = f", {'signed difference ' if d.signed_map else ''}smoothed {d.smooth_mm:g} mm across slices"
        if volume and d.tissue_bins:
            smooth += f", normalised in {d.tissue_bins} tissue classes"
        if volume and d.mirror_mm:
            smooth += f", less its mirror image across the midline (grown {d.mirror_mm:g} mm)"
        stages = "1 stage" if d.max_stages == 1 else f"up to {d.max_stages} stages"
        region = {"brain": ", scored in the brain", "brain-stripped": ", the brain cut out and scored"}.get(d.region, "") \
            if volume else ""
        return f"t {t}, blur {d.blur_kernel}{smooth}, {stages}{draws}, FPR {d.fpr:g}{grow}{region}"

    def summary(self) -> str:
        """A few human lines: what the model is for and what it expects."""
        def rates(cal: dict) -> str:
            pairs = sorted(cal.get("thresholds", {}).items(), key=lambda kv: -float(kv[0]))
            return ", ".join(f"FPR {k}: {v:.3f}" for k, v in pairs)

        cal_text = rates(self.calibration)
        cal_3d = rates(self.calibration_3d or {})
        lines = [
            f"{self.name} (version {self.version}): {self.description}".rstrip(": "),
            f"  modality {self.modality}, contrast {self.contrast}, {self.orientation} slices, "
            f"grid {self.grid_size} x {self.grid_size}, noise {self.noise.kind}",
            f"  network {self.network.architecture}; intensities {self.normalisation.method}, framing {self.framing}",
            f"  calibrated thresholds: {cal_text or 'none'}",
            *([f"  calibrated thresholds for volumes{' (the model alone, --single-model)' if self.partner_3d else ''}: "
               f"{cal_3d}"] if cal_3d else []),
            f"  detection: {self.detection_text()}"
            + (f"; volumes: {self.detection_text(True)} (tuned)" if self.detection_3d is not None else ""),
            *([f"  volumes paired with {self.partner_3d.file}: the two maps "
               f"{PAIR_COMBINES[self.partner_3d.combine]}, "
               f"FPR {self.partner_3d.fpr:g}"
               + (f" grown to FPR {self.partner_3d.grow_fpr:g}" if self.partner_3d.grow_fpr else "")
               + (f", each lesion outlined at {self.partner_3d.peak_fraction:g} of its peak"
                  if self.partner_3d.peak_fraction else "")
               + f" ({rates(self.partner_3d.__dict__)})"] if self.partner_3d is not None else []),
            f"  {self.intended_use}",
        ]
        return "\n".join(lines)
