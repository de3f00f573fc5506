"""What several sub-commands share: the data help, progress, detection options and settings."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..contract import DEFAULT_MODEL, DETECTION_SETTING, DETECTION_SETTINGS
from ..progress import ProgressFn

if TYPE_CHECKING:  # torch loads on first use
    from ..detect import DetectionSettings

DATA_SPEC_HELP = (
    "files, folders (DICOM series or images), .txt lists, or sample specs: "
    "'br35h:no:LO:HI' (Br35H healthy numbers LO <= n < HI, HI <= 1050), 'mni152' (MNI152 T1 template), a healthy volume's name "
    "(mni152, brainles, brainles-brain, pydeface, mni2020-brain, oasis, ch2, robex, itk-t1) or 'healthy:ROLE' "
    "(every installed volume of the role train, tune or eval)"
)


def progress_for(args) -> ProgressFn:
    """The progress callback the command's --progress option asks for (bar, JSON lines or none)."""
    from ..progress import make_progress

    return make_progress(getattr(args, "progress", "auto"))


def detection_settings(args) -> DetectionSettings:
    """The detection settings of the shared detection options (contract.DETECTION_SETTINGS)."""
    from ..detect import DetectionSettings

    return DetectionSettings(**{spec.name: getattr(args, spec.name) for spec in DETECTION_SETTINGS})


def check_open_unit(values, what: str) -> None:
    """Refuse, in one sentence, a list of rates or fractions where one is not strictly between 0 and 1."""
    from ..errors import InputError

    if values and any(not 0 < v < 1 for v in values):
        raise InputError(f"{what} must lie between 0 and 1 (exclusive), got {' '.join(f'{v:g}' for v in values)}")


def check_writable(out: Path) -> None:
    """Fail before a long detection if the results could not be written where asked."""
    import tempfile

    from ..errors import OutputError

    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent)
        os.rmdir(probe)
    except OSError as exc:
        raise OutputError(f"cannot write results in {parent}: {exc.strerror}") from exc


def add_result_arguments(d: argparse.ArgumentParser) -> None:
    """Options of what one scan's detection accepts and writes, shared by detect and cohort."""
    d.add_argument("--compress", action="store_true",
                   help="gzip the counterfactual and map volumes (smaller files, about 0.6 s more per volume)")
    d.add_argument("--expect", default="any", choices=["any", "volume", "slice"],
                   help="refuse inputs that are not of this kind")


def add_setting_argument(parser, name: str, help: str | None = None, dest: str | None = None) -> None:
    """The command-line option of one detection setting (contract.DETECTION_SETTINGS: its flag, type, choices and
    default); `help` and `dest` override the table's where a command gives the option another role."""
    spec = DETECTION_SETTING[name]
    dest = dest or spec.name
    if spec.kind is bool:
        parser.add_argument(spec.flag, dest=dest, action="store_true", help=help or spec.help)
        return
    parser.add_argument(spec.flag, dest=dest, type=spec.kind, default=spec.default,
                        help=help or spec.help, choices=spec.choices or None,
                        metavar=None if spec.choices else spec.flag[2:].upper())


def add_detection_arguments(d: argparse.ArgumentParser) -> None:
    """Options shared by detect, demo and bench: --model, every one of contract.DETECTION_SETTINGS, --progress."""
    d.add_argument("--model", default=DEFAULT_MODEL, help="model name (see `synomaly models`) or file")
    sensitivity = d.add_mutually_exclusive_group()  # an explicit threshold, or one calibrated at a rate
    for spec in DETECTION_SETTINGS:
        add_setting_argument(sensitivity if spec.name in ("threshold", "fpr") else d, spec.name)
    d.add_argument("--progress", default="auto", choices=["auto", "bar", "json", "none"])
