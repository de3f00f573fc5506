"""`synomaly prepare`: datasets split by patient for training and evaluation (research layer).

A research command: it and the modules it needs (datasets, manifest) are installed with the pip package,
not into Slicer; the command line registers it only where they can be imported."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import datasets, manifest
from ..sampledata import resolve_data
from .common import progress_for


def add_prepare_parser(subparsers) -> None:
    """`synomaly prepare brats|lits|folder ...`: add the sub-command to the CLI's sub-parsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-o", "--output", required=True, help="folder to write (must not exist or be empty)")
    common.add_argument("--val-fraction", type=float, default=0.1, help="share of patients for validation")
    common.add_argument("--test-fraction", type=float, default=0.2, help="share of patients for testing")
    common.add_argument("--seed", type=int, default=0, help="seed of the patient split")
    common.add_argument("--grid", type=int, help="resample 2D slices to GRID x GRID pixels (same field of view)")
    common.add_argument("--format", default="nrrd", choices=sorted(manifest.FORMATS), help="image file format")
    common.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")
    common.add_argument("--progress", default="auto", choices=["auto", "bar", "json", "none"])

    p = subparsers.add_parser("prepare", help="prepare BraTS, LiTS or any image folders for training and evaluation "
                              "(split by patient)")
    kinds = p.add_subparsers(dest="dataset", required=True)

    b = kinds.add_parser("brats", parents=[common], help="BraTS 2023 GLI case folders")
    b.add_argument("--root", required=True, help="folder holding BraTS-GLI-XXXXX-YYY case folders")
    b.add_argument("--contrast", default="t2f", choices=datasets.BRATS_CONTRASTS, help="t2f = FLAIR (the paper's choice)")
    b.add_argument("--slices", type=int, nargs=2, default=[80, 100], metavar=("START", "STOP"),
                   help="axial slice numbers START <= k < STOP (default 80 100: the paper's 80-99)")
    b.add_argument("--min-anomaly-pixels", type=int, default=1,
                   help="slices with a smaller tumour (pixels on the written grid) are dropped: neither healthy "
                        "nor anomalous")

    lt = kinds.add_parser("lits", parents=[common], help="LiTS volume-N.nii / segmentation-N.nii")
    lt.add_argument("--root", required=True, help="folder holding the LiTS files (searched recursively)")
    lt.add_argument("--window", type=float, nargs=2, default=[0.0, 150.0], metavar=("LOW", "HIGH"),
                    help="HU window (default 0 150); intensities are clipped and kept in HU")
    lt.add_argument("--slices", type=int, nargs=2, metavar=("START", "STOP"), help="only slices START <= k < STOP")
    lt.add_argument("--min-liver-pixels", type=int, default=1, help="liver pixels a slice needs to be used")
    lt.add_argument("--min-anomaly-pixels", type=int, default=1,
                    help="slices with a smaller tumour (pixels on the written grid) are dropped: neither healthy "
                         "nor anomalous")

    f = kinds.add_parser("folder", parents=[common], help="folders (or lists) of healthy and anomalous images")
    f.add_argument("--healthy", nargs="+", required=True,
                   help="healthy images: folders, files, .txt lists or sample specs like br35h:no:0:1050")
    f.add_argument("--anomalous", nargs="+", default=[], help="anomalous images, the same kinds of arguments")
    f.add_argument("--masks", help="folder of masks matched to anomalous images by file stem")
    f.add_argument("--patient-regex", help="regular expression whose first group is the patient id in a file stem")
    for sp in (b, lt, f):
        sp.set_defaults(func=cmd_prepare)


def cmd_prepare(args) -> int:
    """Run `synomaly prepare` and print the manifest summary's counts as one JSON line."""
    progress = progress_for(args)
    common = dict(val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed,
                  grid=args.grid, fmt=args.format, overwrite=args.overwrite, progress=progress)
    if args.dataset == "brats":
        summary = datasets.prepare_brats(args.root, args.output, contrast=args.contrast,
                                         slice_range=tuple(args.slices), min_anomaly_pixels=args.min_anomaly_pixels,
                                         **common)
    elif args.dataset == "lits":
        summary = datasets.prepare_lits(args.root, args.output, window=tuple(args.window),
                                        slice_range=tuple(args.slices) if args.slices else None,
                                        min_liver_pixels=args.min_liver_pixels,
                                        min_anomaly_pixels=args.min_anomaly_pixels, **common)
    else:
        anomalous = resolve_data(args.anomalous) if args.anomalous else None
        summary = datasets.prepare_folder(resolve_data(args.healthy), anomalous, args.output, masks_dir=args.masks,
                                          patient_regex=args.patient_regex, **common)
    print(json.dumps({"output": str(Path(args.output).absolute()), "counts": summary["counts"],
                      "dropped": summary.get("dropped", {})}))
    c = summary["counts"]
    print(f"prepared {c['total']['images']} images of {c['total']['patients']} patients in {args.output}: "
          + ", ".join(f"{s} {c[s]['healthy']} healthy + {c[s]['anomalous']} anomalous ({c[s]['patients']} patients)"
                      for s in manifest.SPLITS), file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    """Add prepare to the sub-parsers."""
    add_prepare_parser(sub)
