"""What several sub-commands share: the data help, progress, detection options and settings."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..contract import DEFAULT_MODEL
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
    """The detection settings of the shared detection options."""
    from ..detect import DetectionSettings

    return DetectionSettings(
        t=args.t, blur_kernel=args.blur, threshold=args.threshold, fpr=args.fpr, min_lesion_mm3=args.min_size,
        max_stages=args.stages, noise_draws=args.draws, grow_fpr=args.grow_fpr, seed=args.seed,
        batch_size=args.batch_size,
        device=args.device, precision=args.precision, allow_modality_mismatch=args.allow_modality_mismatch,
    )


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


def add_detection_arguments(d: argparse.ArgumentParser) -> None:
    """Options shared by detect, demo and bench."""
    d.add_argument("--model", default=DEFAULT_MODEL, help="model name (see `synomaly models`) or file")
    d.add_argument("--t", type=int, help="noise level t of each stage (default: the model's)")
    d.add_argument("--stages", type=int, help="maximum number of stages (default: the model's, 5)")
    sens = d.add_mutually_exclusive_group()
    sens.add_argument("--threshold", type=float, help="explicit anomaly-score threshold")
    sens.add_argument("--fpr", type=float, help="calibrated per-voxel false-positive rate: 0.01, 0.001 or 0.0001")
    d.add_argument("--grow-fpr", type=float, default=None, metavar="FPR",
                   help="lesions found at the threshold grow into their connected voxels above this calibrated "
                        "false-positive rate's threshold (hysteresis; default: the model card's, 0: off; an "
                        "explicit --threshold turns the card's growth off)")
    d.add_argument("--blur", type=int, help="Gaussian blur kernel of the map, odd, model-grid pixels")
    d.add_argument("--min-size", type=float, default=50.0, help="smallest lesion kept, mm^3 (default 50)")
    d.add_argument("--draws", type=int, default=None, help="noise draws averaged per stage and noise level (default: the model card's)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--batch-size", type=int, default=None,
                   help="slices per network call (default: the fastest, measured once on this machine)")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    d.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    d.add_argument("--allow-modality-mismatch", action="store_true",
                   help="run even if the DICOM modality differs from the model's")
    d.add_argument("--progress", default="auto", choices=["auto", "bar", "json", "none"])
