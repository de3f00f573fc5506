"""A prepared dataset's manifest: the row of one image, the writer that fills the folder and its manifest
atomically, and the reader (folder layout: see synomaly.datasets)."""

from __future__ import annotations

import csv
import json
import math
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError

MANIFEST_COLUMNS = ("split", "patient", "case", "slice", "label", "image", "mask",
                    "anomaly_pixels", "ref_low", "ref_high")
SPLITS = ("train", "val", "test")
FORMATS = {"nrrd": ".nrrd", "nii.gz": ".nii.gz", "nii": ".nii", "mha": ".mha"}


@dataclass(frozen=True)
class ManifestRow:
    """One prepared image: where it came from, which split it is in, and its ground truth."""

    split: str
    patient: str
    case: str
    slice: Optional[int]  # index in the source volume (None: the whole image)
    label: int  # 1: contains an anomaly, 0: healthy
    image: Path  # absolute path
    mask: Optional[Path]  # absolute path of a 0/1 mask on the image's grid; None: no pixel-level truth
    anomaly_pixels: Optional[int]  # pixels in the mask (None without a mask)
    ref_low: float  # robust low intensity of the source volume (nan if unknown)
    ref_high: float  # robust high intensity of the source volume (nan if unknown)


class DatasetWriter:
    """Writes images, masks and manifests into a temporary folder that becomes OUT on success."""

    def __init__(self, out: str | os.PathLike, fmt: str = "nrrd", overwrite: bool = False) -> None:
        if fmt not in FORMATS:
            raise InputError(f"unknown image format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.out = Path(out).absolute()
        if self.out.exists():
            if not self.out.is_dir():
                raise OutputError(f"{self.out}: exists and is not a folder")
            if any(self.out.iterdir()):
                if not overwrite:
                    raise OutputError(f"{self.out}: folder exists and is not empty (use --overwrite to replace "
                                      "a prepared dataset)")
                if not (self.out / "manifest.json").exists():
                    raise OutputError(f"{self.out}: refusing to overwrite a folder that is not a prepared dataset")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            # not tempfile.mkdtemp: its 0700 mode would follow the folder into place
            self.tmp = self.out.parent / f".{self.out.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
            self.tmp.mkdir()
        except OSError as exc:
            raise OutputError(f"{self.out}: cannot write here ({exc})") from exc
        self.ext = FORMATS[fmt]
        self.overwrite = overwrite
        self.rows: list[dict[str, Any]] = []
        self.names: set[str] = set()

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _unique(self, split: str, name: str) -> str:
        """A file stem not used before in this split."""
        base, n = name, 1
        while f"{split}/{name}" in self.names:
            n += 1
            name = f"{base}_{n}"
        self.names.add(f"{split}/{name}")
        return name

    def _write(self, arr: np.ndarray, rel: str, spacing: Sequence[float], origin: Sequence[float],
               reference: Optional[sitk.Image] = None) -> None:
        """One image file; 2D arrays get spacing/origin, 3D ones the reference's geometry."""
        path = self.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
        if reference is not None:
            img.CopyInformation(reference)
        else:
            img.SetSpacing([float(s) for s in spacing])
            img.SetOrigin([float(o) for o in origin])
        try:
            sitk.WriteImage(img, str(path), useCompression=True)
        except RuntimeError as exc:
            raise OutputError(f"{path}: cannot write ({str(exc).strip().splitlines()[-1][:200]})") from exc

    def add(self, *, split: str, patient: str, case: str, slice_index: Optional[int], label: int,
            image: np.ndarray, mask: Optional[np.ndarray], spacing: Sequence[float] = (1.0, 1.0),
            origin: Sequence[float] = (0.0, 0.0), ref: tuple[float, float] = (math.nan, math.nan),
            reference: Optional[sitk.Image] = None) -> None:
        """Write one image (and its mask) and record its manifest row."""
        stem = case if slice_index is None else f"{case}_z{slice_index:03d}"
        stem = self._unique(split, stem)
        kind = "anomalous" if label else "healthy"
        image_rel = f"{split}/{kind}/{stem}{self.ext}"
        self._write(image.astype(np.float32, copy=False), image_rel, spacing, origin, reference)
        mask_rel, pixels = "", ""
        if mask is not None:
            mask_rel = f"{split}/masks/{stem}_mask{self.ext}"
            self._write(mask.astype(np.uint8), mask_rel, spacing, origin, reference)
            pixels = int(np.count_nonzero(mask))
        self.rows.append({
            "split": split, "patient": patient, "case": case,
            "slice": "" if slice_index is None else int(slice_index), "label": int(label),
            "image": image_rel, "mask": mask_rel, "anomaly_pixels": pixels,
            "ref_low": "" if math.isnan(ref[0]) else f"{ref[0]:.6g}",
            "ref_high": "" if math.isnan(ref[1]) else f"{ref[1]:.6g}",
        })

    def counts(self) -> dict[str, dict[str, int]]:
        """Patients, cases, healthy and anomalous images per split, and in total."""
        out: dict[str, dict[str, int]] = {}
        for split in SPLITS + ("total",):
            rows = [r for r in self.rows if split == "total" or r["split"] == split]
            out[split] = {
                "patients": len({r["patient"] for r in rows}),
                "cases": len({r["case"] for r in rows}),
                "images": len(rows),
                "healthy": sum(1 for r in rows if r["label"] == 0),
                "anomalous": sum(1 for r in rows if r["label"] == 1),
                "with_mask": sum(1 for r in rows if r["mask"]),
            }
        return out

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write manifest.csv and manifest.json, then move the folder into place; returns the summary."""
        if not self.rows:
            raise InputError("no image qualified for any split; nothing was written")
        patients = {s: sorted({r["patient"] for r in self.rows if r["split"] == s}) for s in SPLITS}
        summary = dict(summary)
        summary["split_unit"] = "patient"
        summary["counts"] = self.counts()
        summary["patients"] = patients
        summary["manifest_columns"] = list(MANIFEST_COLUMNS)
        with open(self.tmp / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)
        (self.tmp / "manifest.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        try:
            if self.out.exists():
                if any(self.out.iterdir()):  # checked at the start: a prepared dataset we may replace
                    shutil.rmtree(self.out)
                else:
                    self.out.rmdir()
            os.replace(self.tmp, self.out)
        except OSError as exc:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise OutputError(f"{self.out}: cannot move the prepared dataset into place ({exc})") from exc
        return summary


def common_summary(dataset: str, source: Any, seed: int, val_fraction: float, test_fraction: float,
                    grid: Optional[int], fmt: str) -> dict[str, Any]:
    """The part of manifest.json every preparer writes."""
    from .contract import __version__

    return {
        "dataset": dataset, "source": source, "created_by": f"synomaly {__version__}",
        "seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction,
        "grid": grid, "format": fmt,
        "orientation": "axial display: rows anterior to posterior, columns patient right to left (LPS +x)",
    }


def load_manifest(path: str | os.PathLike, split: Optional[str] = None) -> list[ManifestRow]:
    """Rows of a prepared dataset's manifest.csv (give the file or its folder), optionally of one split."""
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.csv"
    if not p.is_file():
        raise InputError(f"{p}: no manifest.csv here; prepare the data with `synomaly prepare` first")
    if split is not None and split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    base = p.parent.absolute()
    rows: list[ManifestRow] = []
    with open(p, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = set(MANIFEST_COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise InputError(f"{p}: not a synomaly manifest (missing columns {', '.join(sorted(missing))})")
        for n, r in enumerate(reader, start=2):
            try:
                row = ManifestRow(
                    split=r["split"], patient=r["patient"], case=r["case"],
                    slice=int(r["slice"]) if r["slice"] else None, label=int(r["label"]),
                    image=base / r["image"], mask=base / r["mask"] if r["mask"] else None,
                    anomaly_pixels=int(r["anomaly_pixels"]) if r["anomaly_pixels"] else None,
                    ref_low=float(r["ref_low"]) if r["ref_low"] else math.nan,
                    ref_high=float(r["ref_high"]) if r["ref_high"] else math.nan,
                )
            except (TypeError, ValueError) as exc:
                raise InputError(f"{p}, line {n}: malformed row ({exc})") from exc
            if row.split not in SPLITS or row.label not in (0, 1):
                raise InputError(f"{p}, line {n}: split must be train/val/test and label 0/1")
            if split is None or row.split == split:
                rows.append(row)
    return rows
