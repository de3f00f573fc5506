"""The engine <-> Slicer contract, written once: what the `synomaly` command writes, says and returns.

Standard library only: the Slicer modules import it at module scope, before torch is installed, and the
engine is copied into Slicer rather than pip-installed (Testing/test_slicer_static.py checks both).
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

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
