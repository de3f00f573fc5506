"""Where the brain is in a head volume: a T1 atlas registered to the scan (affine, mutual information).

Detection on a brain volume scores every foreground voxel, so the scalp, the eyes, the neck and the
skull's marrow light up where the network has seen little of them; restricting the map to the brain
(`--region brain`) removes those false positives without labels. The atlas (Resources/Atlas, written by
scripts/make-atlas.py) is a T1 head template at 2 mm with its brain mask. A scan whose foreground is small
enough to be a brain alone (skull-stripped) is registered to the template's brain, any other to the whole
head. Mutual information makes the contrast (T1, T2, FLAIR, post-contrast) matter less; the mask is grown by
a margin so that the edge of the cortex stays in. When the result is implausible (a brain far too small or
too large, or lying outside the scan's foreground) the caller gets the reason and keeps the foreground.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

#: Scans whose foreground is smaller than this (mL) are taken to be skull-stripped brains.
BRAIN_ONLY_ML = 2300.0
#: A registered brain outside this range (mL) is refused as implausible.
PLAUSIBLE_ML = (700.0, 2600.0)
#: Share of the registered brain that must lie inside the scan's foreground.
MIN_INSIDE = 0.8
#: The margin the registered brain is grown by (mm): affine registration misses a few mm at the cortex.
MARGIN_MM = 3.0
#: The grid the registration works on (mm).
WORK_MM = 3.0
#: The registration's optimiser stops when its step falls below this (physical-shift scaled units, about mm).
MIN_STEP = 1e-4
#: The registration sees the scan's foreground and this much around it (mm).
CROP_MARGIN_MM = 10.0


def atlas_dir() -> Path:
    """Resources/Atlas beside the package (a clone, Slicer), else synomaly/atlasdata (a wheel)."""
    package = Path(__file__).resolve().parent
    beside = package.parent / "Resources" / "Atlas"
    return beside if beside.is_dir() else package / "atlasdata"


@dataclass
class BrainMask:
    """A registered brain mask on a scan's grid, or why there is none."""

    mask: Optional[np.ndarray]  # numpy (ITK array) order bool, grown by `margin_mm`; None when refused
    volume_ml: float  # the registered brain before the margin
    template: str  # "head" or "brain": which template the scan was registered to
    seconds: float
    problem: Optional[str] = None  # why the mask was refused (then mask is None)
    margin_mm: float = MARGIN_MM
    transform: Optional[sitk.Transform] = None  # maps the scan's points to the atlas's; None when refused


_ATLAS: dict[str, sitk.Image] = {}
_MIDLINE: list[float] = []


def _load_atlas() -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """The head template, the brain-only template (head x mask) and the brain fraction (0..1), float32."""
    if not _ATLAS:
        d = atlas_dir()
        head = sitk.ReadImage(str(d / "t1-head-2mm.nrrd"), sitk.sitkFloat32)
        brain = sitk.ReadImage(str(d / "brain-2mm.nrrd"), sitk.sitkFloat32) / 255.0
        _ATLAS.update(head=head, brain_t1=head * sitk.Cast(brain > 0.5, sitk.sitkFloat32), brain=brain)
    return _ATLAS["head"], _ATLAS["brain_t1"], _ATLAS["brain"]


def occupied(mask: np.ndarray) -> list[np.ndarray]:
    """The indices along each numpy axis at which `mask` holds anything (from its projections)."""
    return [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis))) for axis in range(mask.ndim)]


def _head_box(image: sitk.Image, foreground: np.ndarray) -> sitk.Image:
    """The part of the scan around its foreground (CROP_MARGIN_MM beyond it on every side): an oblique or padded
    scan's empty corners add voxels, and registration time, but no information."""
    found = occupied(foreground)
    if not found[0].size:
        return image
    size = image.GetSize()
    pad = [int(np.ceil(CROP_MARGIN_MM / s)) for s in image.GetSpacing()]
    lo = [max(0, int(a[0]) - p) for a, p in zip(found[::-1], pad)]  # numpy order (z, y, x) to ITK (x, y, z)
    hi = [min(n - 1, int(a[-1]) + p) for a, p, n in zip(found[::-1], pad, size)]
    return sitk.RegionOfInterest(image, [h - l + 1 for l, h in zip(lo, hi)], lo)


def _work_copy(image: sitk.Image) -> sitk.Image:
    """The scan, smoothed and resampled to WORK_MM isotropic over the same extent."""
    f = sitk.Cast(image, sitk.sitkFloat32)
    size = [max(8, int(round(n * s / WORK_MM))) for n, s in zip(f.GetSize(), f.GetSpacing())]
    sigma = max(WORK_MM / 3.0, 0.5 * min(f.GetSpacing()))
    return sitk.Resample(sitk.SmoothingRecursiveGaussian(f, sigma), size, sitk.Transform(), sitk.sitkLinear,
                         f.GetOrigin(), [WORK_MM] * 3, f.GetDirection(), 0.0, sitk.sitkFloat32)


def register(fixed: sitk.Image, moving: sitk.Image, seed: int = 1, min_step: float = MIN_STEP,
             iterations: Optional[list[int]] = None) -> sitk.AffineTransform:
    """Affine transform mapping `fixed` points into `moving`: centre of mass, then similarity, then affine,
    Mattes mutual information on a random fifth of the voxels, two resolutions. `iterations`, when given,
    receives the optimiser's iteration count for the similarity and for the affine transform (both levels)."""
    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed=seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, min_step, 200, relaxationFactor=0.6)
    count = [0]
    if iterations is not None:
        reg.AddCommand(sitk.sitkIterationEvent, lambda: count.__setitem__(0, count[0] + 1))
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    sim = sitk.Similarity3DTransform()
    sim.SetCenter(init.GetCenter())
    sim.SetTranslation(init.GetTranslation())
    reg.SetInitialTransform(sim, inPlace=True)
    reg.Execute(fixed, moving)
    similarity = count[0]
    aff = sitk.AffineTransform(3)
    aff.SetCenter(sim.GetCenter())
    aff.SetMatrix(sim.GetMatrix())
    aff.SetTranslation(sim.GetTranslation())
    reg.SetInitialTransform(aff, inPlace=True)
    reg.Execute(fixed, moving)
    if iterations is not None:
        iterations[:] = [similarity, count[0] - similarity]
    return aff


def grow(mask: np.ndarray, like: sitk.Image, margin_mm: float) -> np.ndarray:
    """`mask` (numpy order, on the grid of `like`) and every voxel within `margin_mm` of it (Euclidean, in mm):
    ITK's exact distance map, multi-threaded (a tenth of the time of scipy's distance_transform_edt, which
    gives the same voxels), computed only over the mask's bounding box widened by the margin (the bench volume's
    brain fills a fifth of its grid; no voxel outside that box is within the margin, so the result is the same)."""
    found = occupied(mask)
    if not all(f.size for f in found):
        return mask.copy()
    spacing = like.GetSpacing()[::-1]  # numpy order
    box = tuple(slice(max(0, int(f[0]) - pad), min(n, int(f[-1]) + pad + 1))
                for f, n, pad in zip(found, mask.shape, (int(np.ceil(margin_mm / s)) + 1 for s in spacing)))
    image = sitk.GetImageFromArray(mask[box].astype(np.uint8))
    image.SetSpacing(like.GetSpacing())
    squared = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=True, useImageSpacing=True)
    out = mask.copy()
    out[box] |= sitk.GetArrayViewFromImage(squared) <= margin_mm * margin_mm
    return out


def atlas_brain_mask(image: sitk.Image, foreground: np.ndarray, margin_mm: float = MARGIN_MM) -> BrainMask:
    """The atlas brain registered to a 3D scan, on the scan's grid, grown by `margin_mm`; `foreground`: the
    scan's foreground (numpy order, prepare.foreground_mask), which decides between the head and the brain-only
    template and must hold most of the registered brain."""
    start = time.perf_counter()
    if image.GetDimension() != 3:
        raise ValueError("the brain atlas is registered to 3D volumes only")
    head, brain_t1, brain = _load_atlas()
    work = _work_copy(_head_box(image, foreground))
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    fg_ml = float(foreground.sum()) * voxel_ml
    template = "brain" if fg_ml < BRAIN_ONLY_ML else "head"
    transform = register(work, brain_t1 if template == "brain" else head)
    frac = sitk.GetArrayFromImage(sitk.Resample(brain, image, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    mask = frac > 0.5
    volume_ml = float(mask.sum()) * voxel_ml
    inside = float((mask & foreground).sum()) / max(1, int(mask.sum()))
    problem = None
    if not PLAUSIBLE_ML[0] <= volume_ml <= PLAUSIBLE_ML[1]:
        problem = (f"the registered brain atlas measures {volume_ml:.0f} mL, outside "
                   f"{PLAUSIBLE_ML[0]:.0f}-{PLAUSIBLE_ML[1]:.0f} mL (not a whole brain, or the registration failed)")
    elif inside < MIN_INSIDE:
        problem = f"only {100 * inside:.0f} % of the registered brain atlas lies inside the scan's foreground"
    if problem is None and margin_mm > 0:
        mask = grow(mask, image, margin_mm)
    return BrainMask(None if problem else mask, round(volume_ml, 1), template,
                     round(time.perf_counter() - start, 2), problem, margin_mm, None if problem else transform)


def atlas_midline_x() -> float:
    """The atlas brain's midsagittal plane, as its physical x (left-right) coordinate: the x at which the brain
    mask, mirrored, overlaps itself best (searched in 0.5 mm steps within 10 mm of its centroid)."""
    if not _MIDLINE:
        brain = _load_atlas()[2]
        b = sitk.GetArrayFromImage(brain) > 0.5  # (z, y, x)
        d = brain.GetDirection()
        if any(abs(d[i]) > 1e-6 for i in (1, 2, 3, 6)) or abs(abs(d[0]) - 1.0) > 1e-6:
            raise ValueError("the brain atlas's first index axis must be its left-right axis")
        sx, ox = brain.GetSpacing()[0], brain.GetOrigin()[0]
        xs = np.nonzero(b.any(axis=(0, 1)))[0]
        centre = float((np.nonzero(b)[2]).mean())  # index units
        best, best_x = -1.0, centre
        for c in np.arange(centre - 10.0 / sx, centre + 10.0 / sx + 1e-9, 0.5 / sx):
            mirrored = np.round(2 * c - xs).astype(int)
            ok = (mirrored >= 0) & (mirrored < b.shape[2])
            overlap = float((b[:, :, xs[ok]] & b[:, :, mirrored[ok]]).sum())
            if overlap > best:
                best, best_x = overlap, float(c)
        _MIDLINE.append(ox + d[0] * best_x * sx)
    return _MIDLINE[0]


def mirror_transform(transform: sitk.Transform) -> sitk.Transform:
    """The map of a scan's points to their mirror images across the registered atlas's midsagittal plane:
    into the atlas, reflected in x about its midline, back into the scan."""
    m = sitk.AffineTransform(3)
    m.SetMatrix([-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    m.SetCenter([atlas_midline_x(), 0.0, 0.0])
    inverse = transform.GetInverse()
    out = sitk.CompositeTransform(3)
    # a composite applies the transform added last first: scan -> atlas, mirror, atlas -> scan
    out.AddTransform(inverse)
    out.AddTransform(m)
    out.AddTransform(transform)
    return out


def contralateral_excess(score: sitk.Image, transform: sitk.Transform, grow_mm: float) -> sitk.Image:
    """A map less its own mirror image across the brain's midsagittal plane (the registered atlas's), the mirror
    image first grown by a maximum filter of `grow_mm` (radius) for what an affine registration misses; clipped
    at 0. A finding on one side keeps its value; whatever both hemispheres show alike (the midline's veins and
    sinuses, paired structures the healing misses on both sides) cancels. A lesion on the midline, or two mirror
    lesions, cancel too: the method's blind spot, said where the option is offered."""
    from scipy import ndimage

    mirrored = sitk.GetArrayFromImage(
        sitk.Resample(score, score, mirror_transform(transform), sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    if grow_mm > 0:  # a box of 2 * grow_mm per side, at least one voxel (numpy order: z, y, x)
        size = [2 * max(0, int(round(grow_mm / s))) + 1 for s in score.GetSpacing()[::-1]]
        mirrored = ndimage.maximum_filter(mirrored, size=size)
    a = sitk.GetArrayFromImage(score).astype(np.float32, copy=False)  # a copy: a view would outlive a cast image
    out = sitk.GetImageFromArray(np.maximum(a - mirrored, 0).astype(np.float32, copy=False))
    out.CopyInformation(score)
    return out
