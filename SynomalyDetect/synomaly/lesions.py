"""Synthetic lesions and scan forms for label-free tuning and evaluation on healthy volumes.

One lesion generator serves `synomaly tune` and `synomaly evaluate`'s implanted data: irregular 3D
shapes 3-30 mm across, brighter or darker, 20-100 % of the tissue's intensity range, with texture and
soft edges, inside a tissue mask. The scan forms turn one healthy volume into what a site may send:
skull-stripped, oblique and anisotropic, thick slices, other intensity units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import SimpleITK as sitk


@dataclass
class LesionSpec:
    """Ranges the lesions are drawn from (mm, fractions of the tissue's 1st-99th percentile range)."""

    diameter_mm: tuple[float, float] = (3.0, 30.0)  # log-uniform
    contrast: tuple[float, float] = (0.2, 1.0)
    polarity: str = "both"  # brighter, darker or both
    irregularity: float = 0.3  # relative radial wobble of the outline
    texture: float = 0.25  # relative amplitude variation inside the lesion
    edge: tuple[float, float] = (0.05, 0.25)  # width of the soft edge, relative to the radius


@dataclass
class Lesion:
    """What was implanted: enough to describe a case in a report."""

    centre_mm: tuple[float, ...]
    diameter_mm: float
    contrast: float  # signed fraction of the tissue range
    volume_ml: float
    meta: dict[str, Any] = field(default_factory=dict)


def _smooth_field(shape: tuple[int, ...], sigma_vox: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed white noise with unit standard deviation (numpy order shape)."""
    from scipy import ndimage

    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=sigma_vox, mode="wrap")
    s = float(f.std())
    return f / s if s > 0 else f


def _random_rotation(rng: np.random.Generator, dim: int) -> np.ndarray:
    """A uniformly random rotation matrix (dim x dim)."""
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def tissue_range(arr: np.ndarray, tissue: np.ndarray) -> tuple[float, float]:
    """1st and 99th percentile of the intensities inside the tissue mask."""
    vals = arr[tissue]
    if vals.size < 16:
        vals = arr.ravel()
    lo, hi = np.percentile(vals[:: max(1, vals.size // 1_000_000)], [1, 99])
    return float(lo), float(hi)


def implant_random_lesions(image: sitk.Image, tissue: np.ndarray, rng: np.random.Generator, count: int = 1,
                           spec: Optional[LesionSpec] = None) -> tuple[sitk.Image, np.ndarray, list[Lesion]]:
    """Implant `count` lesions into a copy of a healthy 3D image; returns the image, the truth mask (numpy
    (k, j, i) bool) and what was implanted. `tissue` (numpy order, bool) is where lesions may lie; each
    centre lies at least half a radius inside it and lesions do not overlap."""
    from scipy import ndimage

    spec = spec or LesionSpec()
    if image.GetDimension() != 3:
        raise ValueError("lesions are implanted into 3D volumes")
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    tissue = tissue.astype(bool)
    lo, hi = tissue_range(arr, tissue)
    spacing = np.array(image.GetSpacing()[::-1], dtype=np.float64)  # numpy order (k, j, i)
    dist = ndimage.distance_transform_edt(tissue, sampling=spacing)
    truth = np.zeros(arr.shape, dtype=bool)
    added = np.zeros(arr.shape, dtype=np.float32)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(image.GetOrigin())
    ispacing = np.array(image.GetSpacing())
    lesions: list[Lesion] = []
    for _ in range(count):
        for _attempt in range(30):
            d = float(np.exp(rng.uniform(math.log(spec.diameter_mm[0]), math.log(spec.diameter_mm[1]))))
            radii = d / 2 * rng.uniform(0.7, 1.3, 3)
            free = dist >= 0.5 * float(radii.mean())
            if truth.any():
                free &= ~ndimage.binary_dilation(truth, iterations=2)
            candidates = np.flatnonzero(free.ravel())
            if candidates.size:
                break
        else:
            break
        k = np.array(np.unravel_index(int(candidates[rng.integers(candidates.size)]), arr.shape))
        reach = np.ceil(1.6 * radii.max() / spacing).astype(int) + 2
        box = tuple(slice(max(0, int(k[a] - reach[a])), min(arr.shape[a], int(k[a] + reach[a] + 1))) for a in range(3))
        shape = tuple(s.stop - s.start for s in box)
        idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
        idx += np.array([s.start for s in box], dtype=np.float64)[:, None]
        ijk = idx[::-1]  # (i, j, k) rows
        phys = (direction @ (ijk * ispacing[:, None])).T + origin
        centre = direction @ (k[::-1] * ispacing) + origin
        rot = _random_rotation(rng, 3)
        rel = ((phys - centre) @ rot.T) / radii
        r = np.sqrt((rel ** 2).sum(axis=1)).reshape(shape)
        sig = np.maximum(0.5, 0.35 * float(radii.mean()) / spacing)
        wobble = _smooth_field(shape, sig, rng)
        r_eff = r / np.clip(1.0 + spec.irregularity * wobble, 0.4, 1.8)
        edge = float(rng.uniform(*spec.edge))
        profile = 1.0 / (1.0 + np.exp(np.clip((r_eff - 1.0) / edge, -50, 50)))
        texture = 1.0 + spec.texture * _smooth_field(shape, np.maximum(0.5, 0.15 * float(radii.mean()) / spacing), rng)
        sign = {"brighter": 1.0, "darker": -1.0}.get(spec.polarity, 1.0 if rng.random() < 0.5 else -1.0)
        contrast = sign * float(rng.uniform(*spec.contrast))
        inside = tissue[box]
        amp = (contrast * (hi - lo) * profile * np.clip(texture, 0.3, 1.7) * inside).astype(np.float32)
        added[box] += amp
        mask = (profile > 0.5) & inside
        truth[box] |= mask
        voxel_ml = float(np.prod(spacing)) / 1000.0
        lesions.append(Lesion(tuple(round(float(v), 1) for v in centre), round(d, 2), round(contrast, 3),
                              round(float(mask.sum()) * voxel_ml, 3)))
    out = arr + added
    floor = float(arr.min())
    np.maximum(out, floor, out=out)  # a dark lesion never goes below the image's own background
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(image)
    return img, truth, lesions


# ---------------------------------------------------------------- scan forms

FORMS = ("native", "brain", "oblique", "thick", "scaled")


def _resample_like(image: sitk.Image, truth: Optional[np.ndarray], reference: sitk.Image,
                   smooth_mm: Optional[tuple[float, float, float]] = None) -> tuple[sitk.Image, Optional[np.ndarray]]:
    """Resample an image (linear) and its truth mask (linear, then > 0.5) onto a reference grid;
    smooth_mm (per ITK axis) first blurs the image as a thick acquisition would average it."""
    src = image
    if smooth_mm is not None:
        variance = [(s / 2.355) ** 2 for s in smooth_mm]  # FWHM -> sigma, mm^2
        src = sitk.DiscreteGaussian(image, variance=variance, maximumKernelWidth=64) if any(variance) else image
    bg = float(np.percentile(sitk.GetArrayViewFromImage(image), 0.5))
    out = sitk.Resample(src, reference, sitk.Transform(), sitk.sitkLinear, bg, sitk.sitkFloat32)
    t_out = None
    if truth is not None:
        t_img = sitk.GetImageFromArray(truth.astype(np.float32))
        t_img.CopyInformation(image)
        t_out = sitk.GetArrayFromImage(sitk.Resample(t_img, reference, sitk.Transform(), sitk.sitkLinear, 0.0)) > 0.5
    return out, t_out


def _grid(image: sitk.Image, direction: np.ndarray, spacing: tuple[float, float, float]) -> sitk.Image:
    """An empty image with the given direction and spacing that covers the whole of `image`."""
    size = np.array(image.GetSize())
    corners = np.array([[i, j, k] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)], float)
    phys = np.array([image.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in corners])
    local = phys @ direction  # coordinates along the new axes (columns of direction)
    lo, hi = local.min(axis=0), local.max(axis=0)
    n = np.ceil((hi - lo) / np.array(spacing)).astype(int) + 1
    ref = sitk.Image([int(v) for v in n], sitk.sitkFloat32)
    ref.SetSpacing(spacing)
    ref.SetDirection(direction.flatten().tolist())
    ref.SetOrigin((direction @ lo).tolist())
    return ref


def scan_form(image: sitk.Image, truth: Optional[np.ndarray], brain: Optional[np.ndarray], form: str,
              rng: np.random.Generator) -> tuple[sitk.Image, Optional[np.ndarray], dict[str, Any]]:
    """One form of a (lesioned or healthy) volume as a site might send it, with the truth mask moved along.

    native: as it is; brain: skull-stripped with the brain mask; oblique: rotated 10-25 degrees about two
    axes and resampled to 1 x 1 x 3 mm; thick: 5-6.5 mm axial slices (through-plane averaging); scaled:
    intensities times 0.2-5 plus an offset (other units). Deterministic for a given rng state."""
    if form == "native":
        return image, truth, {"form": form}
    if form == "brain":
        if brain is None:
            raise ValueError("the 'brain' form needs a brain mask")
        arr = sitk.GetArrayFromImage(image)
        floor = float(np.percentile(arr, 0.5))
        out = sitk.GetImageFromArray(np.where(brain, arr, floor).astype(np.float32))
        out.CopyInformation(image)
        return out, (truth & brain) if truth is not None else None, {"form": form}
    if form == "scaled":
        a = float(np.exp(rng.uniform(math.log(0.2), math.log(5.0))))
        b = float(rng.uniform(0, 200))
        out = sitk.Cast(image, sitk.sitkFloat32) * a + b
        return out, truth, {"form": form, "scale": round(a, 3), "offset": round(b, 1)}
    from .prepare import orientation_permutation

    d0 = np.array(image.GetDirection()).reshape(3, 3)
    itk_axis = 2 - orientation_permutation(image, "axial")[0][0]  # the ITK axis that runs through axial slices
    if form == "oblique":
        ax, ay = np.radians(rng.uniform(10, 25, 2) * rng.choice([-1, 1], 2))
        rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
        ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
        direction = ry @ rx @ d0
        spacing = [1.0, 1.0, 1.0]
        spacing[itk_axis] = 3.0
        smooth = [0.0, 0.0, 0.0]
        smooth[itk_axis] = 3.0
        ref = _grid(image, direction, tuple(spacing))
        out, t_out = _resample_like(image, truth, ref, smooth_mm=tuple(smooth))
        return out, t_out, {"form": form, "degrees": [round(math.degrees(ax), 1), round(math.degrees(ay), 1)],
                            "spacing_mm": list(spacing)}
    if form == "thick":
        thickness = float(rng.choice([5.0, 6.5]))
        spacing = [1.0, 1.0, 1.0]
        spacing[itk_axis] = thickness
        smooth = [0.0, 0.0, 0.0]
        smooth[itk_axis] = thickness
        ref = _grid(image, d0, tuple(spacing))
        out, t_out = _resample_like(image, truth, ref, smooth_mm=tuple(smooth))
        return out, t_out, {"form": form, "slice_mm": thickness}
    raise ValueError(f"unknown scan form {form!r}; known: {', '.join(FORMS)}")


def brain_mask(image: sitk.Image, mask_path: Optional[str] = None, depth_mm: float = 12.0) -> np.ndarray:
    """Where lesions may lie (numpy order, bool): a mask file on the same grid, else the head's foreground
    eroded by `depth_mm` (which keeps lesions off the scalp when there is a skull)."""
    from scipy import ndimage

    if mask_path is not None:
        m = sitk.ReadImage(str(mask_path), sitk.sitkFloat32)
        if m.GetSize() != image.GetSize():
            m = sitk.Resample(m, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)
        return sitk.GetArrayFromImage(m) > 0
    from .prepare import foreground_mask

    fg = foreground_mask(sitk.GetArrayFromImage(image).astype(np.float32))
    depth = max(1, int(round(depth_mm / min(image.GetSpacing()))))
    return ndimage.binary_erosion(fg, iterations=depth)
