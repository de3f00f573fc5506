"""Datasets prepared the way the Synomaly paper prepares them, but split by patient, never by slice.

Every preparer writes one folder (paths in the manifest are relative to it, so it can be moved):

    OUT/train/healthy/*.nrrd        healthy slices of training patients only (give it to `synomaly train --data`)
    OUT/val/healthy, OUT/val/anomalous, OUT/test/healthy, OUT/test/anomalous
                                    slices of held-out patients, with and without an anomaly
    OUT/<split>/masks/*_mask.nrrd   ground truth (uint8 0/1) on the grid of its image, where known
    OUT/manifest.csv                one row per image (manifest.MANIFEST_COLUMNS)
    OUT/manifest.json               summary: counts per split, seed, fractions, what was dropped and why

Images are 2D float32 files that keep the in-plane spacing of their source (in mm) and the physical
position of their first pixel; slices are cut in the engine's axial display orientation (rows
anterior to posterior, columns patient right to left), while the slice number is the index in the
stored volume, as in the paper (BraTS slices 80-99 are numpy z indices 80-99 of the NIfTI file).
Intensities are not normalised: the engine normalises, and `ref_low`/`ref_high` in the manifest give
each source volume's robust range for whoever wants per-volume rather than per-slice normalisation.

The whole folder is written under a temporary name and renamed at the end, so an error leaves nothing.
The patient split lives in synomaly.datasplit; the manifest, its writer and its reader in synomaly.manifest;
this module prepares each kind of dataset.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .datasplit import split_held_out, split_patients
from .errors import InputError
from .manifest import DatasetWriter, common_summary
from .progress import ProgressFn, null_progress

log = logging.getLogger(__name__)

BRATS_CONTRASTS = ("t1n", "t1c", "t2w", "t2f")
MASK_SUFFIXES = ("", "_mask", "-mask", "_seg", "-seg", "_label", "-label", "_gt", "-gt")
REF_PERCENTILES = (1.0, 99.0)  # the engine's default normalisation percentiles


# ---------------------------------------------------------------- slices and geometry


def _read_volume(path: Path, pixel_type: int = sitk.sitkUnknown) -> sitk.Image:
    """A 3D image from a NIfTI/NRRD file (no size check: slices are taken one at a time)."""
    try:
        image = sitk.ReadImage(str(path), pixel_type)
    except RuntimeError as exc:
        raise InputError(f"{path}: not a readable image ({str(exc).strip().splitlines()[-1][:200]})") from exc
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = sitk.Extract(image, list(image.GetSize()[:3]) + [0], [0, 0, 0, 0])
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: expected a scalar 3D volume, got {image.GetDimension()}D with "
                         f"{image.GetNumberOfComponentsPerPixel()} component(s)")
    return image


@dataclass(frozen=True)
class _AxialFrame:
    """How to cut axial slices of one volume: numpy transpose/flips to (slice, row, col) and 2D geometry."""

    transpose: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    spacing: tuple[float, float]  # (columns, rows) in mm
    shape: tuple[int, int, int]  # numpy shape of the stored array

    @property
    def depth(self) -> int:
        """Number of axial slices."""
        return self.shape[self.transpose[0]]


def _axial_frame(image: sitk.Image) -> _AxialFrame:
    """The axial frame of a 3D image, from its direction matrix."""
    from .prepare import orientation_permutation

    transpose, flips = orientation_permutation(image, "axial")
    sp = image.GetSpacing()
    spacing = (float(sp[2 - transpose[2]]), float(sp[2 - transpose[1]]))
    shape = tuple(reversed(image.GetSize()))
    if transpose[0] != 0:
        log.warning("axial slices of this volume run along numpy axis %d, not z; slice numbers count along it",
                    transpose[0])
    return _AxialFrame(transpose, flips, spacing, shape)  # type: ignore[arg-type]


def _axial_slice(array: np.ndarray, frame: _AxialFrame, k: int) -> np.ndarray:
    """Slice number k (index in the stored array) as a (rows, cols) array in axial display orientation."""
    t = frame.transpose
    sl = np.take(array, k, axis=t[0])
    rest = [a for a in range(3) if a != t[0]]
    sl = np.transpose(sl, (rest.index(t[1]), rest.index(t[2])))
    if frame.flips[1]:
        sl = sl[::-1]
    if frame.flips[2]:
        sl = sl[:, ::-1]
    return np.ascontiguousarray(sl)


def _slice_origin(image: sitk.Image, frame: _AxialFrame, k: int) -> tuple[float, float]:
    """Physical (x, y) position in mm (LPS) of the first pixel of axial slice k."""
    index = [0, 0, 0]  # numpy order
    index[frame.transpose[0]] = k
    for a in (1, 2):
        p = frame.transpose[a]
        index[p] = frame.shape[p] - 1 if frame.flips[a] else 0
    point = image.TransformIndexToPhysicalPoint((int(index[2]), int(index[1]), int(index[0])))
    return float(point[0]), float(point[1])


def _resize(arr: np.ndarray, grid: int, is_mask: bool) -> np.ndarray:
    """(H, W) -> (grid, grid) over the same field of view: anti-aliased linear for images, >= 0.5 for masks."""
    from scipy import ndimage

    h, w = arr.shape
    if (h, w) == (grid, grid):
        return arr
    src = arr.astype(np.float32)
    if not is_mask:
        sigma = (max(0.0, (h / grid - 1) / 2), max(0.0, (w / grid - 1) / 2))
        if max(sigma) > 0:
            src = ndimage.gaussian_filter(src, sigma, mode="nearest")
    out = ndimage.zoom(src, (grid / h, grid / w), order=1, mode="nearest", grid_mode=True)
    return out >= 0.5 if is_mask else out.astype(np.float32)


def _resized_geometry(shape: tuple[int, int], spacing: tuple[float, float], origin: tuple[float, float],
                      grid: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Spacing and origin of a (grid, grid) image covering the same field of view as (H, W)."""
    h, w = shape
    new = (spacing[0] * w / grid, spacing[1] * h / grid)
    return new, (origin[0] + (new[0] - spacing[0]) / 2, origin[1] + (new[1] - spacing[1]) / 2)


def _robust_range(values: np.ndarray, background: Optional[float] = None) -> tuple[float, float]:
    """REF_PERCENTILES of the voxels above the background (the minimum unless given), sampled for speed."""
    flat = values.reshape(-1)
    flat = flat[:: max(1, flat.size // 2_000_000)]
    floor = float(flat.min()) if background is None else background
    fg = flat[flat > floor]
    if fg.size < 16:
        fg = flat
    lo, hi = np.percentile(fg, REF_PERCENTILES)
    return float(lo), float(hi)


def _stem(path: Path) -> str:
    """File name without its image extension (.nii.gz counts as one)."""
    name = path.name
    for ext in (".nii.gz", ".seg.nrrd"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem if path.suffix else name


def _classify(split: str, pixels: int, min_anomaly_pixels: int, dropped: dict[str, int]) -> Optional[int]:
    """Label of a slice with `pixels` anomalous pixels, or None (counted in `dropped`) if it is not kept."""
    if pixels == 0:
        return 0
    if pixels < min_anomaly_pixels:
        dropped["anomaly smaller than min_anomaly_pixels"] += 1
        return None
    if split == "train":
        dropped["anomalous slices of training patients"] += 1
        return None
    return 1


def _slice_series(writer: DatasetWriter, *, split: str, patient: str, case: str, image: sitk.Image,
                  arr: np.ndarray, truth: np.ndarray, indices: Iterable[int], grid: Optional[int],
                  min_anomaly_pixels: int, ref: tuple[float, float], dropped: dict[str, int],
                  eligible: Optional[np.ndarray] = None, window: Optional[tuple[float, float]] = None) -> None:
    """Write the kept axial slices of one volume: `truth` is the anomaly mask, `eligible` the slices allowed."""
    frame = _axial_frame(image)
    for k in indices:
        if eligible is not None and not eligible[k]:
            continue
        img2d = _axial_slice(arr, frame, k).astype(np.float32)
        if window is not None:
            img2d = np.clip(img2d, window[0], window[1])
        if float(img2d.max()) == float(img2d.min()):
            dropped["empty slices (constant intensity)"] += 1
            continue
        m2d = _axial_slice(truth, frame, k)
        spacing, origin = frame.spacing, _slice_origin(image, frame, k)
        if grid:
            had = bool(m2d.any())
            spacing, origin = _resized_geometry(img2d.shape, spacing, origin, grid)
            img2d = _resize(img2d, grid, is_mask=False)
            m2d = _resize(m2d, grid, is_mask=True)
            if had and not m2d.any():  # an anomaly too small to survive resampling: neither healthy nor anomalous
                dropped["anomaly smaller than min_anomaly_pixels"] += 1
                continue
        label = _classify(split, int(np.count_nonzero(m2d)), min_anomaly_pixels, dropped)
        if label is None:
            continue
        writer.add(split=split, patient=patient, case=case, slice_index=int(k), label=label, image=img2d,
                   mask=m2d, spacing=spacing, origin=origin, ref=ref)


def _new_dropped() -> dict[str, int]:
    return {
        "anomalous slices of training patients": 0,
        "anomaly smaller than min_anomaly_pixels": 0,
        "empty slices (constant intensity)": 0,
    }


def _slice_indices(depth: int, slice_range: Optional[tuple[int, int]], case: str) -> range:
    """Slice numbers start <= k < stop that exist in a volume of `depth` slices."""
    if slice_range is None:
        return range(depth)
    start, stop = int(slice_range[0]), int(slice_range[1])
    if not 0 <= start < stop:
        raise InputError(f"slice range {start}..{stop} must satisfy 0 <= start < stop (stop is exclusive)")
    if stop > depth:
        log.warning("%s has %d slices; slices %d..%d do not exist", case, depth, max(start, depth), stop - 1)
    return range(min(start, depth), min(stop, depth))


# ---------------------------------------------------------------- BraTS

_BRATS_CASE = re.compile(r"^(BraTS-[A-Za-z]+-\d+)-(\d+)$")


def brats_patient(case: str) -> str:
    """Patient of a BraTS case folder: 'BraTS-GLI-00042-001' -> 'BraTS-GLI-00042' (time points stay together)."""
    m = _BRATS_CASE.match(case)
    return m.group(1) if m else case


def _find_brats_cases(root: Path, contrast: str) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """(case, image, segmentation) of every BraTS case folder under root, and cases lacking a file."""
    cases, missing = [], []
    folders = {p for p in root.rglob("BraTS-*") if p.is_dir()}
    if root.name.startswith("BraTS-"):
        folders.add(root)

    def first(d: Path, tag: str) -> Optional[Path]:
        found = [d / f"{d.name}-{tag}{ext}" for ext in (".nii.gz", ".nii")]
        return next((f for f in found if f.is_file()), None)

    for d in sorted(folders):
        image, seg = first(d, contrast), first(d, "seg")
        if image is not None and seg is not None:
            cases.append((d.name, image, seg))
        elif any(d.glob(f"{d.name}-*.nii*")):
            missing.append(d.name)
    return cases, missing


def prepare_brats(
    root: str | os.PathLike,
    out: str | os.PathLike,
    contrast: str = "t2f",
    slice_range: Optional[tuple[int, int]] = (80, 100),
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    grid: Optional[int] = None,
    *,
    min_anomaly_pixels: int = 1,
    fmt: str = "nrrd",
    overwrite: bool = False,
    progress: ProgressFn = null_progress,
) -> dict[str, Any]:
    """Axial slices of BraTS 2023 GLI cases, split by patient; returns the manifest.json summary.

    slice_range is half-open, (80, 100) = the paper's slices 80-99, counted along the stored z axis.
    A slice with no tumour label is healthy, whole tumour = any label > 0; training patients give
    only healthy slices. Slices are written as 2D images in mm; `grid` resamples them to grid x grid.
    """
    root = Path(root)
    if contrast not in BRATS_CONTRASTS:
        raise InputError(f"unknown BraTS contrast {contrast!r}; choose one of {', '.join(BRATS_CONTRASTS)}")
    if not root.is_dir():
        raise InputError(f"{root}: no such folder")
    cases, missing = _find_brats_cases(root, contrast)
    if missing:
        log.warning("%d BraTS case(s) lack the %s image or the segmentation and are skipped: %s",
                    len(missing), contrast, ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    if not cases:
        raise InputError(f"{root}: no BraTS case folders with '-{contrast}.nii.gz' and '-seg.nii.gz' files found")
    split_of = split_patients((brats_patient(c) for c, _, _ in cases), val_fraction, test_fraction, seed)
    dropped = _new_dropped()
    with DatasetWriter(out, fmt, overwrite) as writer:
        for i, (case, image_path, seg_path) in enumerate(cases):
            progress("prepare", i, len(cases), case)
            patient = brats_patient(case)
            image = _read_volume(image_path)
            seg = _read_volume(seg_path)
            if image.GetSize() != seg.GetSize():
                raise InputError(f"{case}: image {image.GetSize()} and segmentation {seg.GetSize()} differ in size")
            arr = sitk.GetArrayViewFromImage(image)
            truth = sitk.GetArrayViewFromImage(seg) > 0
            indices = _slice_indices(_axial_frame(image).depth, slice_range, case)
            _slice_series(writer, split=split_of[patient], patient=patient, case=case, image=image, arr=arr,
                          truth=truth, indices=indices, grid=grid, min_anomaly_pixels=min_anomaly_pixels,
                          ref=_robust_range(arr, background=0.0), dropped=dropped)
        progress("prepare", len(cases), len(cases), "writing manifest")
        summary = common_summary("brats", str(root), seed, val_fraction, test_fraction, grid, fmt)
        summary.update({
            "contrast": contrast,
            "slice_range": None if slice_range is None else [int(slice_range[0]), int(slice_range[1])],
            "slice_range_note": "half-open [start, stop) along the stored z axis; (80, 100) = the paper's slices 80-99",
            "labels": "healthy: no tumour label in the slice; anomalous: whole tumour (any label > 0)",
            "min_anomaly_pixels": min_anomaly_pixels,
            "intensity": f"raw {contrast} intensities (float32); ref_low/ref_high: percentiles "
                         f"{REF_PERCENTILES} of the brain (voxels > 0) of each volume",
            "patient_rule": "BraTS-GLI-XXXXX-YYY: patient BraTS-GLI-XXXXX; all its time points share a split",
            "dropped": dropped,
            "cases_skipped_missing_files": missing,
        })
        return writer.finish(summary)


# ---------------------------------------------------------------- LiTS

_LITS_NUMBER = re.compile(r"^(volume|segmentation)-(\d+)\.nii(\.gz)?$", re.IGNORECASE)


def prepare_lits(
    root: str | os.PathLike,
    out: str | os.PathLike,
    window: tuple[float, float] = (0.0, 150.0),
    slice_range: Optional[tuple[int, int]] = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    grid: Optional[int] = None,
    *,
    min_liver_pixels: int = 1,
    min_anomaly_pixels: int = 1,
    fmt: str = "nrrd",
    overwrite: bool = False,
    progress: ProgressFn = null_progress,
) -> dict[str, Any]:
    """Axial slices of LiTS CT volumes (volume-N.nii, segmentation-N.nii), split by patient (one per N).

    Intensities are clipped to the HU window and stay in HU (so [0, 150] by default). A slice is
    healthy when the liver is present (label >= 1 in at least min_liver_pixels pixels) and there
    is no tumour (label 2); anomalous when tumour is present (mask = label 2); slices without liver
    are not used.
    """
    root = Path(root)
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise InputError(f"HU window {lo}..{hi} is empty")
    if not root.is_dir():
        raise InputError(f"{root}: no such folder")
    volumes: dict[int, Path] = {}
    segs: dict[int, Path] = {}
    for p in sorted(root.rglob("*.nii*")):
        m = _LITS_NUMBER.match(p.name)
        if m:
            table = volumes if m.group(1).lower() == "volume" else segs
            if int(m.group(2)) in table:
                raise InputError(f"{p}: LiTS number {m.group(2)} appears twice under {root}")
            table[int(m.group(2))] = p
    numbers = sorted(set(volumes) & set(segs))
    unmatched = sorted(set(volumes) ^ set(segs))
    if unmatched:
        log.warning("LiTS numbers without both volume and segmentation are skipped: %s", unmatched[:10])
    if not numbers:
        raise InputError(f"{root}: no LiTS pairs volume-N.nii / segmentation-N.nii found")
    patient_of = {n: f"lits-{n:03d}" for n in numbers}
    split_of = split_patients(patient_of.values(), val_fraction, test_fraction, seed)
    dropped = _new_dropped()
    dropped["slices without liver"] = 0
    with DatasetWriter(out, fmt, overwrite) as writer:
        for i, n in enumerate(numbers):
            patient = patient_of[n]
            progress("prepare", i, len(numbers), patient)
            image = _read_volume(volumes[n])
            seg = _read_volume(segs[n], sitk.sitkUInt8)
            if image.GetSize() != seg.GetSize():
                raise InputError(f"{patient}: volume {image.GetSize()} and segmentation {seg.GetSize()} differ in size")
            arr = sitk.GetArrayViewFromImage(image)
            labels = sitk.GetArrayViewFromImage(seg)
            frame = _axial_frame(image)
            axes = tuple(a for a in range(3) if a != frame.transpose[0])
            liver_pixels = np.count_nonzero(labels >= 1, axis=axes)
            eligible = liver_pixels >= max(1, min_liver_pixels)
            indices = _slice_indices(frame.depth, slice_range, patient)
            dropped["slices without liver"] += int(sum(1 for k in indices if not eligible[k]))
            _slice_series(writer, split=split_of[patient], patient=patient, case=f"volume-{n}", image=image,
                          arr=arr, truth=labels == 2, indices=indices, grid=grid,
                          min_anomaly_pixels=min_anomaly_pixels, ref=(lo, hi), dropped=dropped,
                          eligible=eligible, window=(lo, hi))
        progress("prepare", len(numbers), len(numbers), "writing manifest")
        summary = common_summary("lits", str(root), seed, val_fraction, test_fraction, grid, fmt)
        summary.update({
            "hu_window": [lo, hi],
            "intensity": f"CT in Hounsfield units clipped to [{lo:g}, {hi:g}] (not rescaled); "
                         "ref_low/ref_high are the window",
            "slice_range": None if slice_range is None else [int(slice_range[0]), int(slice_range[1])],
            "labels": f"healthy: liver (label >= 1) in >= {max(1, min_liver_pixels)} pixels and no tumour; "
                      "anomalous: tumour (label 2) present, mask = label 2; slices without liver unused",
            "min_liver_pixels": max(1, min_liver_pixels),
            "min_anomaly_pixels": min_anomaly_pixels,
            "patient_rule": "one patient per LiTS number N",
            "dropped": dropped,
            "numbers_skipped_unpaired": unmatched,
        })
        return writer.finish(summary)


# ---------------------------------------------------------------- any folders


def _list_images(source: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    """Image files (or DICOM folders) from a folder, a file, a .txt list, or a list of those."""
    from .prepare import expand_inputs

    if source is None:
        return []
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    return [Path(p) for p in expand_inputs([str(p) for p in items])]


def _source_names(source: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[str]:
    """The given folders/files as strings, for the summary (long lists are shortened)."""
    if source is None:
        return []
    items = [str(source)] if isinstance(source, (str, os.PathLike)) else [str(p) for p in source]
    return items if len(items) <= 20 else items[:20] + [f"... {len(items) - 20} more"]


def _mask_index(masks_dir: Optional[str | os.PathLike]) -> dict[str, Path]:
    """Mask files by the image stem they belong to (stem, or stem + _mask/_seg/_label/_gt)."""
    if masks_dir is None:
        return {}
    index: dict[str, Path] = {}
    for p in _list_images(masks_dir):
        stem = _stem(p)
        key = stem
        for suffix in MASK_SUFFIXES[1:]:
            if stem.lower().endswith(suffix):
                key = stem[: -len(suffix)]
                break
        if key in index:
            raise InputError(f"two masks for image {key!r}: {index[key].name} and {p.name}")
        index[key] = p
    return index


def _binary_mask(path: Path, shape: tuple[int, ...], image_name: str) -> np.ndarray:
    """A mask file as booleans: pixels above half its maximum (0/1, 0/255 and JPEG masks alike)."""
    from .prepare import read_image

    arr = sitk.GetArrayFromImage(read_image(path, color="luminance"))
    if arr.shape != shape:
        raise InputError(f"mask {path.name} is {arr.shape[::-1]} pixels but image {image_name} is {shape[::-1]}")
    top = float(arr.max())
    return arr > top / 2 if top > 0 else np.zeros(shape, dtype=bool)


def prepare_folder(
    healthy_dir: str | os.PathLike | Sequence[str | os.PathLike],
    anomalous_dir: str | os.PathLike | Sequence[str | os.PathLike] | None,
    out: str | os.PathLike,
    masks_dir: Optional[str | os.PathLike] = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    grid: Optional[int] = None,
    *,
    patient_regex: Optional[str] = None,
    fmt: str = "nrrd",
    overwrite: bool = False,
    progress: ProgressFn = null_progress,
) -> dict[str, Any]:
    """Any healthy and anomalous images (2D images or volumes, folders or lists), split by patient.

    The patient of a file is its stem, or the first group of `patient_regex` searched in the stem
    (e.g. r'^(sub-\\d+)'), so that images of one patient stay together. Patients with an anomalous
    image go to val/test only (ratio val_fraction : test_fraction); healthy-only patients are split
    train/val/test. Masks in masks_dir match images by stem (optionally + _mask, _seg, _label, _gt);
    with masks_dir, healthy images get an all-zero mask. `grid` resamples 2D images; volumes are
    written whole on their own grid.
    """
    from .prepare import read_image

    healthy = _list_images(healthy_dir)
    anomalous = _list_images(anomalous_dir)
    if not healthy and not anomalous:
        raise InputError("no images found in the healthy or anomalous folders")
    pattern = re.compile(patient_regex) if patient_regex else None

    def patient_of(path: Path) -> str:
        stem = _stem(path)
        if pattern is None:
            return stem
        m = pattern.search(stem)
        if not m:
            raise InputError(f"{path.name}: patient pattern {patient_regex!r} does not match its name")
        return m.group(1) if m.groups() else m.group(0)

    items = [(p, 0, patient_of(p)) for p in healthy] + [(p, 1, patient_of(p)) for p in anomalous]
    anomalous_patients = {pat for _, label, pat in items if label}
    healthy_only = {pat for _, _, pat in items} - anomalous_patients
    split_of = split_patients(healthy_only, val_fraction, test_fraction, seed) if healthy_only else {}
    split_of.update(split_held_out(anomalous_patients, val_fraction, test_fraction, seed))
    masks = _mask_index(masks_dir)
    used_masks: set[str] = set()
    stats = {"volumes_kept_on_own_grid": 0, "anomalous_without_mask": 0, "anomalous_with_empty_mask": 0}
    with DatasetWriter(out, fmt, overwrite) as writer:
        for i, (path, label, patient) in enumerate(items):
            progress("prepare", i, len(items), path.name)
            image = read_image(path, color="luminance")
            arr = sitk.GetArrayFromImage(image)
            stem = _stem(path)
            mask = None
            if stem in masks:
                used_masks.add(stem)
                mask = _binary_mask(masks[stem], arr.shape, path.name) if label else np.zeros(arr.shape, bool)
            elif masks_dir is not None and not label:
                mask = np.zeros(arr.shape, dtype=bool)
            if label and mask is None:
                stats["anomalous_without_mask"] += 1
            elif label and mask is not None and not mask.any():
                stats["anomalous_with_empty_mask"] += 1
                log.warning("%s is in the anomalous folder but its mask is empty", path.name)
            ref = _robust_range(arr)
            case = stem
            if image.GetDimension() == 2:
                spacing, origin = image.GetSpacing(), image.GetOrigin()
                if grid:
                    spacing, origin = _resized_geometry(arr.shape, spacing, origin, grid)
                    arr = _resize(arr, grid, is_mask=False)
                    mask = None if mask is None else _resize(mask, grid, is_mask=True)
                writer.add(split=split_of[patient], patient=patient, case=case, slice_index=None, label=label,
                           image=arr, mask=mask, spacing=spacing, origin=origin, ref=ref)
            else:
                if grid:
                    stats["volumes_kept_on_own_grid"] += 1
                writer.add(split=split_of[patient], patient=patient, case=case, slice_index=None, label=label,
                           image=arr, mask=mask, ref=ref, reference=image)
        unused = sorted(set(masks) - used_masks)
        if unused:
            log.warning("%d mask(s) match no image: %s", len(unused), ", ".join(unused[:5]))
        progress("prepare", len(items), len(items), "writing manifest")
        source = {"healthy": _source_names(healthy_dir), "anomalous": _source_names(anomalous_dir),
                  "masks": None if masks_dir is None else str(masks_dir)}
        summary = common_summary("folder", source, seed, val_fraction, test_fraction, grid, fmt)
        summary.update({
            "labels": "from the folder: healthy 0, anomalous 1; masks above half their maximum",
            "patient_rule": f"regex {patient_regex!r} on the file stem" if patient_regex else "one patient per file stem",
            "split_rule": "patients with an anomalous image: val/test only; healthy-only patients: train/val/test",
            "intensity": f"as read (colour converted to luminance), float32; ref_low/ref_high: percentiles "
                         f"{REF_PERCENTILES} of each image above its minimum",
            "orientation": "as stored",
            "masks_unmatched": unused,
            **stats,
        })
        return writer.finish(summary)


# ---------------------------------------------------------------- reading


