"""The engine <-> Slicer contract, written once: what the `synomaly` command writes, says and returns.

Standard library only: the Slicer modules import it at module scope, before torch is installed, and the
engine is copied into Slicer rather than pip-installed (Testing/test_slicer_static.py checks both).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

#: The distribution name in pyproject.toml.
DISTRIBUTION = "synomaly"
#: The module the Slicer side runs as `python -m ENGINE_MODULE COMMAND ...`.
ENGINE_MODULE = "synomaly.cli"
#: The model detection uses when none is named.
DEFAULT_MODEL = "brain-mri-axial"

#: Every failing command writes one line that starts with this to stderr, followed by the user's message.
ERROR_PREFIX = "synomaly: error:"

#: Exit codes of the command line (synomaly.errors raises them, the Slicer runner explains them).
EXIT_FAILED = 1
EXIT_INPUT = 2
EXIT_MODEL = 3
EXIT_OUTPUT = 4
EXIT_RESOURCE = 5
EXIT_PARTIAL = 6
EXIT_CANCELLED = 130
#: What each exit code means, in the user's words.
EXIT_MESSAGES = {
    EXIT_FAILED: "the engine failed",
    EXIT_INPUT: "the input cannot be used",
    EXIT_MODEL: "the model cannot be used",
    EXIT_OUTPUT: "the results cannot be written",
    EXIT_RESOURCE: "not enough memory or device capacity",
    EXIT_PARTIAL: "some scans failed; the others have their results",
    EXIT_CANCELLED: "the run was interrupted",
}

#: What one scan's detection puts into its result folder (role -> file name).
RESULT_FILES = {
    "counterfactual": "counterfactual.nrrd",
    "anomaly_map": "anomaly_map.nrrd",
    "segmentation": "anomaly.seg.nrrd",
    "lesions": "lesions.csv",
    "overview": "overview.png",
    "report": "report.json",
}

#: The numbers of one lesion in lesions.csv, in order (volume in mL, centroid in RAS mm, bounding box in voxels).
LESION_COLUMNS = (
    "id", "volume_ml", "max_score", "mean_score", "centroid_r", "centroid_a", "centroid_s",
    "bbox_i0", "bbox_j0", "bbox_k0", "bbox_i1", "bbox_j1", "bbox_k1", "voxels",
)
#: Those of LESION_COLUMNS that are whole numbers.
LESION_INTEGER_COLUMNS = frozenset({"id", "bbox_i0", "bbox_j0", "bbox_k0", "bbox_i1", "bbox_j1", "bbox_k1", "voxels"})
#: The text column after the numbers: the units of the scores.
LESION_UNITS_COLUMN = "units"
#: Every column of lesions.csv, in order.
LESION_FILE_COLUMNS = (*LESION_COLUMNS, LESION_UNITS_COLUMN)

#: The demo case `synomaly demo-data` writes (a healthy template with an implanted lesion) and its true mask.
DEMO_FILE = "demo_lesion.nrrd"
DEMO_TRUTH_FILE = "demo_lesion_truth.seg.nrrd"

#: Where a volume's anomaly map is scored: every foreground voxel, or only the brain (a T1 atlas registered to
#: the scan, synomaly.atlas); 2D images always use their foreground.
REGIONS = ("foreground", "brain", "brain-stripped")


@dataclass(frozen=True)
class Setting:
    """One detection option, defined once: its DetectionSettings field, its command-line flag, its help and
    the values it accepts. The engine's validation and argument parser and the Slicer job's command line
    are all built from DETECTION_SETTINGS."""

    name: str  # the field of synomaly.detect.DetectionSettings
    flag: str  # the option of `synomaly detect`, `demo`, `bench` and `cohort`
    kind: type  # int, float, str or bool
    help: str
    what: str  # the value's name in messages
    low: Optional[float] = None  # smallest value allowed
    high: Optional[float] = None  # largest value allowed
    low_open: bool = False  # `low` itself is not allowed
    high_open: bool = False  # `high` itself is not allowed
    odd: bool = False  # odd whole numbers only
    choices: tuple[str, ...] = ()
    default: Any = None  # None: the model card's value (or "not set")
    example: str = ""  # added to the message of a refused value

    def problem(self, value: Any) -> Optional[str]:
        """Why `value` is refused, in one sentence; None when it is allowed (None itself always is)."""
        if value is None or self.kind is bool:
            return None
        if self.choices:
            return None if value in self.choices else \
                f"{self.what} must be {', '.join(self.choices[:-1])} or {self.choices[-1]}, got {value!r}"
        if self.kind is str:
            return None
        try:
            v = float(value)
        except (TypeError, ValueError):
            return f"{self.what} must be a number, got {value!r}"
        lo_ok = self.low is None or (v > self.low if self.low_open else v >= self.low)
        hi_ok = self.high is None or (v < self.high if self.high_open else v <= self.high)
        odd_ok = not self.odd or (v == int(v) and int(v) % 2 == 1)
        if math.isfinite(v) and lo_ok and hi_ok and odd_ok:
            return None
        return f"{self.what} must be {self.allowed()}{self.example}, got {value}"

    def allowed(self) -> str:
        """The allowed values in words, e.g. 'an odd number of 1 or more', 'in [0, 1)'."""
        noun = "an odd number" if self.odd else ("a whole number" if self.kind is int else "a number")
        if self.low is not None and self.high is not None:
            return f"{noun} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{noun} {'above' if self.low_open else 'of'} {self.low:g}{'' if self.low_open else ' or more'}"
        return noun


#: Every option of one detection, in the order the help lists them.
DETECTION_SETTINGS = (
    Setting("t", "--t", int, "noise level t of each stage (default: the model's)", "t (the noise level)",
            low=1, high=999),
    Setting("max_stages", "--stages", int, "maximum number of stages (default: the model's, 5)", "stages",
            low=1, high=50),
    Setting("threshold", "--threshold", float, "explicit anomaly-score threshold", "the threshold", low=0),
    Setting("fpr", "--fpr", float,
            "calibrated per-voxel false-positive rate, one the model card lists (`synomaly models`; the shipped "
            "card: 0.01, 0.001, 0.0001, and 0.00001 for volumes; default: the card's)",
            "the false-positive rate", low=0, high=1, low_open=True, high_open=True, example=" (e.g. 0.001)"),
    Setting("grow_fpr", "--grow-fpr", float,
            "lesions found at the threshold grow into their connected voxels above this calibrated false-positive "
            "rate's threshold (hysteresis; default: the model card's, 0: off; an explicit --threshold turns the "
            "card's growth off)", "the grow false-positive rate", low=0, high=1, high_open=True,
            example=" (0: no growth)"),
    Setting("peak_fraction", "--peak-fraction", float,
            "each lesion found is outlined where the map exceeds this fraction of the lesion's own peak, where that "
            "lies above the threshold it was found at (0.5: a blurred lesion's edge whatever its contrast; default: "
            "the model card's, 0: off)", "the peak fraction", low=0, high=1, high_open=True, example=" (0: off)"),
    Setting("blur_kernel", "--blur", int, "Gaussian blur kernel of the map, odd, model-grid pixels", "the blur kernel",
            low=1, odd=True),
    Setting("smooth_mm", "--smooth", float,
            "volumes: Gaussian smoothing of the anomaly map across slices, sigma in mm (default: the model card's; "
            "0: none)", "the smoothing across slices (mm)", low=0),
    Setting("region", "--region", str,
            "volumes: where the map is scored: foreground, or brain (a T1 brain atlas registered to the scan; the "
            "scalp, eyes and neck are left out), or brain-stripped (that brain also cut out before healing, as a "
            "skull-stripped scan; tried, not shipped); default: the model card's", "the region", choices=REGIONS),
    Setting("min_lesion_mm3", "--min-size", float, "smallest lesion kept, mm^3 (default 50)",
            "the minimum lesion size (mm^3)", low=0, default=50.0),
    Setting("noise_draws", "--draws", int, "noise draws averaged per stage and noise level (default: the model card's)",
            "noise draws", low=1, high=64),
    Setting("seed", "--seed", int, "random seed of the noise (default 0)", "the seed", default=0),
    Setting("batch_size", "--batch-size", int,
            "slices per network call (default: the fastest, measured once on this machine)", "the batch size", low=1),
    Setting("device", "--device", str, "auto, cpu, cuda or mps", "the device", default="auto"),
    Setting("precision", "--precision", str, "numeric precision of the network (auto: bf16 where it is fast)",
            "precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto"),
    Setting("single_model", "--single-model", bool,
            "volumes: the model alone, without the partner model its card averages its map with (faster, "
            "less accurate: README, Models)", "", default=False),
    Setting("allow_modality_mismatch", "--allow-modality-mismatch", bool,
            "run even if the DICOM modality differs from the model's", "", default=False),
)
#: DETECTION_SETTINGS by field name.
DETECTION_SETTING = {s.name: s for s in DETECTION_SETTINGS}


#: pyproject.toml of a source checkout (engine used from the tree, not installed).
_PYPROJECT = Path(__file__).resolve().parent.parent.parent / "pyproject.toml"


def engine_version() -> str:
    """The engine's version: the installed package's, else the source checkout's pyproject.toml, else 'unknown'."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    try:
        text = _PYPROJECT.read_text(encoding="utf-8")
    except OSError:
        return "unknown"  # copied into Slicer: neither installed nor beside its pyproject.toml
    table = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    match = re.search(r'^version\s*=\s*"([^"]+)"', table.group(1) if table else "", re.M)
    return match.group(1) if match else "unknown"


__version__ = engine_version()
