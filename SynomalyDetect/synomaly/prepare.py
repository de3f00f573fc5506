"""Reading scans and preparing them for the model, with the exact inverse back to the input grid.

One code path for detection and training: read -> reorient to model slices -> foreground mask ->
robust normalisation -> crop a square around the foreground -> resample slices to the model grid.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .errors import InputError, ResourceError

log = logging.getLogger(__name__)

# (world axis, sign) for the slice, row and column axes of each orientation; world axes are
# LPS (0: towards patient left, 1: posterior, 2: superior). Axial rows run anterior to posterior
# and columns right to left (radiological display); coronal and sagittal rows run top to bottom.
ORIENTATION_AXES = {
    "axial": ((2, 1), (1, 1), (0, 1)),
    "coronal": ((1, 1), (2, -1), (0, 1)),
    "sagittal": ((0, 1), (2, -1), (1, -1)),
}
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SCAN_SUFFIXES = VOLUME_SUFFIXES + IMAGE_2D_SUFFIXES  # one scan per file (DICOM files form series instead)
# metadata key read_image sets to "pixels" when the file gives no physical pixel size: sizes are then counted in pixels
UNITS_KEY = "synomaly_units"
DICOM_SPACING_TAGS = ("0028|0030", "0018|1164", "0018|2010")  # pixel, imager pixel, nominal scanned pixel spacing
MIN_INPLANE = 8
MAX_VOXELS = 2**31


def _available_memory() -> int:
    """Bytes of memory available now (MemAvailable on Linux), or a large number if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 60


def _check_size(size: tuple[int, ...], components: int, path: str) -> None:
    """Refuse an image too large for memory before any voxel is read."""
    voxels = int(np.prod(size, dtype=np.int64)) * max(components, 1)
    needed = voxels * 4 * 12  # float32 copies: input, oriented, normalised, outputs, post-processing
    if voxels > MAX_VOXELS or needed > 0.8 * _available_memory():
        raise ResourceError(
            f"{path}: image of {' x '.join(map(str, size))} voxels needs about {needed / 2**30:.1f} GiB "
            f"of memory to process, more than this machine has available ({_available_memory() / 2**30:.1f} GiB); "
            "crop or downsample it first"
        )


def _nifti_shortfall(path: Path) -> str | None:
    """Why a NIfTI file holds fewer voxel bytes than its header promises, or None (ITK pads truncated data with zeros)."""
    import gzip
    import struct
    import zlib

    packed = path.name.lower().endswith(".nii.gz")
    try:
        with (gzip.open(path, "rb") if packed else open(path, "rb")) as fh:
            head = fh.read(540)
            for endian in "<>":
                if len(head) >= 4 and struct.unpack(endian + "i", head[:4])[0] in (348, 540):
                    break
            else:
                return None  # not a NIfTI-1/2 header: ITK judges
            if struct.unpack(endian + "i", head[:4])[0] == 348:
                dims = struct.unpack(endian + "8h", head[40:56])
                bitpix = struct.unpack(endian + "h", head[72:74])[0]
                offset = int(struct.unpack(endian + "f", head[108:112])[0])
            else:
                dims = struct.unpack(endian + "8q", head[16:80])
                bitpix = struct.unpack(endian + "h", head[14:16])[0]
                offset = struct.unpack(endian + "q", head[168:176])[0]
            if not 1 <= dims[0] <= 7:
                return None
            need = offset + int(np.prod([max(int(n), 1) for n in dims[1 : dims[0] + 1]], dtype=np.int64)) * bitpix // 8
            if packed:
                have = len(head)
                while chunk := fh.read(1 << 22):
                    have += len(chunk)
            else:
                have = path.stat().st_size
    except gzip.BadGzipFile:
        return None  # not gzip after all (e.g. plain NIfTI named .nii.gz): ITK judges
    except (EOFError, zlib.error) as exc:
        return f"its compressed data ends early ({exc})"
    return None if have >= need else f"the header promises {need} bytes, the file holds {have}"


def read_image(path: str | os.PathLike, series_id: str | None = None, color: str = "reject") -> sitk.Image:
    """Read a NIfTI/NRRD/MHA file, a 2D image or a DICOM series folder as one scalar float32 image.

    color: 'reject' accepts RGB only when its channels are equal (grey stored as colour);
    'luminance' converts colour to grey.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_dir():
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p))
        if not ids:
            raise InputError(f"{p}: folder holds no DICOM series")
        if series_id is None and len(ids) > 1:
            counts = [f"{s} ({len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), s))} files)" for s in ids]
            raise InputError(f"{p}: folder holds {len(ids)} DICOM series; choose one with --series: " + "; ".join(counts))
        sid = series_id or ids[0]
        if sid not in ids:
            raise InputError(f"{p}: no DICOM series {sid!r}; the folder has {', '.join(ids)}")
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), sid)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        try:
            info = sitk.ImageFileReader()
            info.SetFileName(files[0])
            info.ReadImageInformation()
            _check_size(tuple(info.GetSize()[:2]) + (len(files),), info.GetNumberOfComponents(), str(p))
            image = reader.Execute()
            for key in info.GetMetaDataKeys():  # modality, series description: checked against the model card
                image.SetMetaData(key, info.GetMetaData(key))
        except RuntimeError as exc:
            raise InputError(f"{p}: cannot read the DICOM series: {error_line(exc)}") from exc
    else:
        if p.stat().st_size == 0:
            raise InputError(f"{p}: file is empty")
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise InputError(f"{p}: not a readable image ({error_line(exc)})") from exc
        _check_size(tuple(reader.GetSize()), reader.GetNumberOfComponents(), str(p))
        if p.name.lower().endswith((".nii", ".nii.gz")):
            short = _nifti_shortfall(p)
            if short:
                raise InputError(f"{p}: the file is truncated: {short}")
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise InputError(f"{p}: image data cannot be read, the file may be truncated ({error_line(exc)})") from exc
    image = to_scalar(image, str(p), color)
    if _no_physical_spacing(p, image):
        image.SetMetaData(UNITS_KEY, "pixels")
    return image


def _no_physical_spacing(path: Path, image: sitk.Image) -> bool:
    """Whether a file gives no physical pixel size: a picture format (PNG has none; a TIFF's or JPEG's
    dots per inch are a print size) or DICOM without a pixel spacing tag (ITK then reads 1 mm)."""
    if path.is_file() and path.name.lower().endswith(IMAGE_2D_SUFFIXES):
        return True
    keys = set(image.GetMetaDataKeys())
    is_dicom = "0008|0060" in keys or "0008|0016" in keys
    return is_dicom and not keys.intersection(DICOM_SPACING_TAGS)


def pixel_units(image: sitk.Image) -> bool:
    """Whether sizes in `image` are in pixels, not mm (read_image found no physical pixel size)."""
    return image.HasMetaDataKey(UNITS_KEY) and image.GetMetaData(UNITS_KEY) == "pixels"


def read_scan(path: str | os.PathLike, series_id: str | None = None, expect: str = "any") -> sitk.Image:
    """Read a scan for detection (`read_image`, colour refused) and refuse it unless it is of the kind
    expected: 'volume' (3D), 'slice' (2D) or 'any'."""
    image = read_image(path, series_id=series_id, color="reject")
    if expect == "volume" and (image.GetDimension() == 2 or min(image.GetSize()) == 1):
        raise InputError(f"{path}: a single 2D slice was given where a 3D volume is expected")
    if expect == "slice" and image.GetDimension() == 3 and min(image.GetSize()) > 1:
        raise InputError(f"{path}: a 3D volume was given where a single 2D slice is expected")
    return image


def error_line(exc: Exception) -> str:
    """The most useful line of an ITK exception message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "description" in ln.lower() or "error" in ln.lower():
            return ln[:300]
    return lines[-1][:300] if lines else type(exc).__name__


def to_scalar(image: sitk.Image, name: str = "image", color: str = "reject") -> sitk.Image:
    """A 2D or 3D scalar float32 image; refuses 4D, true colour (unless color='luminance') and 1-voxel images."""
    meta = {key: image.GetMetaData(key) for key in image.GetMetaDataKeys()}
    dim = image.GetDimension()
    if dim == 4:
        size = image.GetSize()
        if size[3] != 1:
            raise InputError(f"{name}: 4D image ({' x '.join(map(str, size))}): give one 3D volume (e.g. one time point)")
        image = sitk.Extract(image, list(size[:3]) + [0], [0, 0, 0, 0])
        dim = 3
    if dim not in (2, 3):
        raise InputError(f"{name}: {dim}D images are not supported; give a 2D slice or a 3D volume")
    ncomp = image.GetNumberOfComponentsPerPixel()
    if ncomp > 1:
        arr = sitk.GetArrayViewFromImage(image).astype(np.float32)
        channels = arr[..., :3] if ncomp >= 3 else arr
        spread = float(np.abs(channels - channels[..., :1]).mean())
        if spread > 2.0 and color != "luminance":
            raise InputError(
                f"{name}: colour image with {ncomp} components; Synomaly needs a greyscale scan "
                "(convert it to grey, or pick one channel)"
            )
        if ncomp >= 3:
            grey = 0.299 * channels[..., 0] + 0.587 * channels[..., 1] + 0.114 * channels[..., 2]
        else:
            grey = channels[..., 0]
        out = sitk.GetImageFromArray(grey.astype(np.float32))
        out.SetSpacing(image.GetSpacing())
        out.SetOrigin(image.GetOrigin())
        out.SetDirection(image.GetDirection())
        image = out
    image = sitk.Cast(image, sitk.sitkFloat32)
    for key, value in meta.items():  # Cast and the colour conversion drop the metadata
        image.SetMetaData(key, value)
    size = image.GetSize()
    inplane = sorted(size)[-2:]
    if min(inplane) < MIN_INPLANE:
        raise InputError(f"{name}: image of {' x '.join(map(str, size))} voxels is too small; slices need at least "
                         f"{MIN_INPLANE} x {MIN_INPLANE} voxels")
    arr = sitk.GetArrayViewFromImage(image)
    bad = int((~np.isfinite(arr)).sum())
    if bad:
        raise InputError(f"{name}: {bad} voxels are NaN or infinite; fix or mask them before detection")
    return image


@dataclass
class ScanGeometry:
    """What is needed to map model-grid slices back onto the input grid exactly."""

    reference: sitk.Image  # zero-cost holder of the input's size/spacing/origin/direction (the input itself)
    is_2d: bool
    transpose: tuple[int, int, int]  # numpy axes of the input array, in oriented (slice, row, col) order
    flips: tuple[bool, bool, bool]  # flip of each oriented axis after transposing
    oriented_shape: tuple[int, int, int]
    box: tuple[int, int, int]  # (row0, col0, side) of the square crop in the oriented in-plane grid
    lower: float | np.ndarray  # intensity mapped to -1 (per oriented slice, shape (Z,), for slice-minmax)
    upper: float | np.ndarray  # intensity mapped to upper_value
    upper_value: float
    grid: int


@dataclass
class PreparedScan:
    """Model-grid slices of one scan: intensities, foreground, and where they came from."""

    slices: torch.Tensor  # (S, 1, G, G) float32 in [-1, 1]
    masks: torch.Tensor  # (S, 1, G, G) bool, where the map is scored (as `foreground`)
    slice_index: np.ndarray  # (S,) index of each slice in the oriented volume
    oriented: np.ndarray  # (Z, Y, X) float32 input intensities, oriented
    foreground: np.ndarray  # (Z, Y, X) bool where the map is scored: the foreground, or the brain within it
    geometry: ScanGeometry
    region: str = "foreground"  # what `foreground` is: "foreground", or "brain" (the registered atlas brain)
    region_note: str = ""  # how the region was found, or why the brain was asked for but not used
    # the registered atlas's map from the input's points to its own (region "brain"), else None
    atlas_transform: Optional[sitk.Transform] = None


def orientation_permutation(image: sitk.Image, orientation: str) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """Numpy transpose and flips that bring the image array to (slice, row, col) of `orientation`."""
    d = np.array(image.GetDirection(), dtype=float).reshape(3, 3)  # columns: index axes in LPS
    # assign each world axis the index axis most aligned with it (greedy by alignment)
    assignment: dict[int, int] = {}
    order = sorted(((abs(d[w, p]), w, p) for w in range(3) for p in range(3)), reverse=True)
    used_p: set[int] = set()
    for _, w, p in order:
        if w in assignment or p in used_p:
            continue
        assignment[w] = p
        used_p.add(p)
    transpose = []
    flips = []
    for world, sign in ORIENTATION_AXES[orientation]:
        p = assignment[world]
        transpose.append(2 - p)  # numpy arrays are (k, j, i)
        flips.append(bool(np.sign(d[world, p]) * sign < 0))
    return tuple(transpose), tuple(flips)  # type: ignore[return-value]


def orient_array(arr: np.ndarray, transpose: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> np.ndarray:
    """Input array (k, j, i) -> oriented (slice, row, col)."""
    out = np.transpose(arr, transpose)
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis=axis)
    return out


def unorient_array(arr: np.ndarray, transpose: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> np.ndarray:
    """Exact inverse of orient_array."""
    out = arr
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis=axis)
    return np.ascontiguousarray(np.transpose(out, np.argsort(transpose)))


def foreground_mask(volume: np.ndarray) -> np.ndarray:
    """Foreground of an oriented volume (Z, Y, X): above half-way from background to Otsu, holes filled per slice."""
    from skimage.filters import threshold_otsu

    flat = volume.reshape(-1)
    sample = flat[:: max(1, flat.size // 2_000_000)]
    lo = float(np.percentile(sample, 0.5))
    hi = float(sample.max())
    if hi <= lo:
        return np.zeros(volume.shape, dtype=bool)
    try:
        otsu = float(threshold_otsu(sample))
    except ValueError:
        otsu = (lo + hi) / 2
    level = lo + 0.5 * (otsu - lo)
    mask = volume > level
    return fill_holes_per_slice(mask)


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of every slice of a (Z, Y, X) mask: background not 4-connected to the slice's edge.

    Labels the background once (in-plane connectivity) instead of ndimage.binary_fill_holes, whose
    iterative propagation takes about 0.5 s on a 240 x 240 x 155 volume, a tenth of it here.
    """
    from scipy import ndimage

    in_plane = np.zeros((3, 3, 3), dtype=bool)  # connects voxels within a slice only
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    labels, count = ndimage.label(~mask, structure=in_plane)
    outside = np.zeros(count + 1, dtype=bool)
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        outside[edge] = True
    outside[0] = True  # label 0 is the mask itself
    return mask | ~outside[labels]


def normalise(volume: np.ndarray, mask: np.ndarray, lower_pct: float, upper_pct: float) -> tuple[float, float]:
    """Intensities at the given percentiles inside the foreground; refuses volumes without contrast."""
    values = volume[mask]
    if values.size < 16:
        raise InputError("no foreground found: the image is empty or has no contrast")
    values = values[:: max(1, values.size // 2_000_000)]
    lo, hi = np.percentile(values, [lower_pct, upper_pct])
    if not hi > lo:
        raise InputError("the image has no contrast inside the foreground (constant intensity)")
    return float(lo), float(hi)


def intensity_to_model(v: torch.Tensor, lower: float | torch.Tensor, upper: float | torch.Tensor,
                       upper_value: float) -> torch.Tensor:
    """Linear map of intensities, lower -> -1 and upper -> upper_value, clamped to [-1, 1] (bounds may be
    tensors broadcasting over v, e.g. (S, 1, 1) per slice)."""
    scale = (upper_value + 1.0) / (upper - lower)
    return ((v - lower) * scale - 1.0).clamp_(-1.0, 1.0)


def model_units_per_intensity(geometry: "ScanGeometry") -> float | np.ndarray:
    """How many model units one intensity unit is: a number, or (Z, 1, 1) per slice for slice-minmax."""
    span = np.asarray(geometry.upper, dtype=np.float64) - np.asarray(geometry.lower, dtype=np.float64)
    units = (geometry.upper_value + 1.0) / span
    return units[:, None, None] if units.ndim else float(units)


def slice_minmax(oriented: np.ndarray, n) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The authors' normalisation: clip (window or volume percentiles), then each slice min -> -1, max -> +1.

    Returns the clipped volume and the per-slice minimum and maximum (shape (Z,)); a constant slice
    gets a span of 1 so it maps to -1 instead of dividing by zero.
    """
    if n.window_low is not None:
        lo, hi = float(n.window_low), float(n.window_high)
    else:
        sample = oriented.reshape(-1)[:: max(1, oriented.size // 2_000_000)]
        lo, hi = (float(v) for v in np.percentile(sample, [n.lower_percentile, n.upper_percentile]))
    if not hi > lo:
        raise InputError("the image has no contrast inside the normalisation window")
    clipped = np.clip(oriented, lo, hi)
    smin = clipped.min(axis=(1, 2)).astype(np.float64)
    smax = clipped.max(axis=(1, 2)).astype(np.float64)
    smax = np.where(smax > smin, smax, smin + 1.0)
    return clipped, smin, smax


def _resize(x: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Resize (N, C, H, W) to size x size; area averaging when shrinking, bilinear when enlarging."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if mode == "bilinear" and x.shape[-1] > size:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode=mode, align_corners=False if mode == "bilinear" else None)


def prepare_scan(
    image: sitk.Image,
    card,
    *,
    min_foreground_fraction: float = 0.02,
    device: torch.device | str = "cpu",
    region: str = "foreground",
    brain_from: Optional[PreparedScan] = None,
) -> PreparedScan:
    """Slices of `image` on the model grid of `card` (orientation, normalisation, grid size).

    region "brain" (volumes): the map is scored only inside the brain of a T1 atlas registered to the scan
    (synomaly.atlas) and slices without brain are not healed; normalisation and framing stay those of the
    whole foreground. Region "brain-stripped" cuts that brain out as a skull-stripped scan is: voxels outside
    it are set to the background, intensities are normalised inside it and slices are framed around it
    (Docs/experiments.md, *Skull-stripping before healing*). When the registration is implausible the whole
    foreground is kept and `region_note` says why. `brain_from`: an earlier preparation of the same image (for a
    model of the same orientation) whose registered brain is reused instead of registering the atlas again."""
    if not isinstance(image, sitk.Image):
        raise TypeError("image must be a SimpleITK image")
    image = to_scalar(image)
    is_2d = image.GetDimension() == 2
    arr = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    if is_2d:
        transpose, flips = (0, 1, 2), (False, False, False)
        oriented = arr[None]
    else:
        transpose, flips = orientation_permutation(image, card.orientation)
        oriented = np.ascontiguousarray(orient_array(arr, transpose, flips))
    if float(oriented.max()) == float(oriented.min()):
        raise InputError("the image is constant (every voxel has the same value): nothing to detect")
    fg = foreground_mask(oriented)
    n = card.normalisation
    z, h, w = oriented.shape
    area = fg.reshape(z, -1).sum(axis=1)
    keep = np.nonzero(area >= max(16, min_foreground_fraction * h * w))[0]
    if n.method == "slice-minmax":  # lo, hi per oriented slice, shape (Z,)
        source, lo, hi = slice_minmax(oriented, n)
        upper_value = 1.0
    else:
        source = oriented
        lo, hi = normalise(oriented, fg, n.lower_percentile, n.upper_percentile)
        upper_value = n.upper_value
    if keep.size == 0:
        raise InputError("no slice has enough foreground to analyse")
    scored, used, note, to_atlas = fg, "foreground", "", None
    if region in ("brain", "brain-stripped") and not is_2d:
        if brain_from is not None:
            if brain_from.foreground.shape != fg.shape or brain_from.geometry.transpose != transpose \
                    or brain_from.geometry.flips != flips:
                raise ValueError("brain_from was prepared from another image or orientation")
            found = brain_from.region in ("brain", "brain-stripped")
            scored = fg & brain_from.foreground if found else fg
            used, note, to_atlas = ("brain" if found else "foreground"), brain_from.region_note, brain_from.atlas_transform
        else:
            scored, used, note, to_atlas = _brain_region(image, fg, transpose, flips)
        if used == "brain":
            area_b = scored.reshape(z, -1).sum(axis=1)
            keep_b = keep[area_b[keep] >= 16]
            if keep_b.size == 0:
                scored, used, note, to_atlas = (fg, "foreground", "no slice holds enough of the registered brain; "
                                                "scoring the foreground", None)
        if used == "brain" and region == "brain-stripped":  # cut out as a skull-stripped scan is
            used, fg, keep = "brain-stripped", scored, keep_b
            if n.method != "slice-minmax":
                lo, hi = normalise(oriented, scored, n.lower_percentile, n.upper_percentile)
            source = np.where(scored, source, np.float32(np.min(lo)))
    if card.framing == "whole-slice":
        side = max(h, w)  # the whole slice, padded to a square around its centre
        row0, col0 = (h - side) // 2, (w - side) // 2
    else:
        rows = np.nonzero(fg[keep].any(axis=(0, 2)))[0]
        cols = np.nonzero(fg[keep].any(axis=(0, 1)))[0]
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        side = int(np.ceil(max(r1 - r0, c1 - c0) * 1.08)) + 2
        row0 = int((r0 + r1) // 2 - side // 2)
        col0 = int((c0 + c1) // 2 - side // 2)
    grid = int(card.grid_size)
    geometry = ScanGeometry(image, is_2d, transpose, flips, (z, h, w), (row0, col0, side), lo, hi, upper_value, grid)
    if used == "brain":
        keep = keep_b  # framed as the whole foreground (above), healed only where there is brain
    def kept(v):  # a per-slice bound, as (S, 1, 1) over the slices kept; a volume bound as it is
        return torch.from_numpy(v[keep]).float().view(-1, 1, 1) if isinstance(v, np.ndarray) else v

    vol = intensity_to_model(torch.from_numpy(source[keep]), kept(lo), kept(hi), upper_value)
    crop = _crop_square(vol, row0, col0, side, fill=-1.0)
    mcrop = _crop_square(torch.from_numpy(scored[keep]).float(), row0, col0, side, fill=0.0)
    dev = torch.device(device)
    slices = _resize(crop[:, None].to(dev), grid)
    masks = _resize(mcrop[:, None].to(dev), grid) > 0.5
    return PreparedScan(slices.contiguous(), masks, keep, oriented, scored, geometry, used, note, to_atlas)


def _brain_region(image: sitk.Image, fg: np.ndarray, transpose,
                  flips) -> tuple[np.ndarray, str, str, Optional[sitk.Transform]]:
    """The oriented foreground within the registered atlas brain, "brain", how it was found and the
    registration (input points to atlas points); or the foreground, "foreground", why the brain was refused
    and None."""
    from .atlas import atlas_brain_mask

    fg_input = unorient_array(fg, transpose, flips)
    found = atlas_brain_mask(image, fg_input)
    if found.mask is None:
        log.warning("brain region not used: %s; scoring the whole foreground", found.problem)
        return fg, "foreground", f"brain region not used: {found.problem}; scoring the whole foreground", None
    brain = np.ascontiguousarray(orient_array(found.mask, transpose, flips))
    note = (f"brain atlas registered to the {found.template} ({found.volume_ml:.0f} mL, grown {found.margin_mm:g} mm) "
            f"in {found.seconds:.1f} s")
    return fg & brain, "brain", note, found.transform


def _crop_square(vol: torch.Tensor, row0: int, col0: int, side: int, fill: float) -> torch.Tensor:
    """Square crop (S, side, side) at (row0, col0) of (S, H, W), padding outside the image with `fill`."""
    s, h, w = vol.shape
    out = torch.full((s, side, side), fill, dtype=vol.dtype)
    rs, re = max(row0, 0), min(row0 + side, h)
    cs, ce = max(col0, 0), min(col0 + side, w)
    if rs < re and cs < ce:
        out[:, rs - row0 : re - row0, cs - col0 : ce - col0] = vol[:, rs:re, cs:ce]
    return out


def grid_to_oriented(values: torch.Tensor, prep: PreparedScan, fill: float = 0.0) -> np.ndarray:
    """Model-grid slices (S, 1, G, G) -> oriented volume (Z, Y, X) float32, bilinear, `fill` elsewhere."""
    g = prep.geometry
    z, h, w = g.oriented_shape
    row0, col0, side = g.box
    out = np.full((z, h, w), fill, dtype=np.float32)
    if values.shape[0] == 0:
        return out
    up = F.interpolate(values.float(), size=(side, side), mode="bilinear", align_corners=False)[:, 0]
    up = up.cpu().numpy()
    rs, re = max(row0, 0), min(row0 + side, h)
    cs, ce = max(col0, 0), min(col0 + side, w)
    out[prep.slice_index, rs:re, cs:ce] = up[:, rs - row0 : re - row0, cs - col0 : ce - col0]
    return out


def oriented_to_grid(volume: np.ndarray, prep: PreparedScan) -> torch.Tensor:
    """An oriented volume (Z, Y, X) on the model grid of the analysed slices, (S, 1, G, G) float32 (area
    fractions for a mask): the forward map of grid_to_oriented."""
    g = prep.geometry
    row0, col0, side = g.box
    v = torch.from_numpy(np.ascontiguousarray(volume[prep.slice_index], dtype=np.float32))
    return _resize(_crop_square(v, row0, col0, side, fill=0.0)[:, None], g.grid)


def oriented_to_image(volume: np.ndarray, prep: PreparedScan, pixel_type=sitk.sitkFloat32) -> sitk.Image:
    """Oriented volume (Z, Y, X) -> SimpleITK image on exactly the input grid."""
    g = prep.geometry
    arr = volume[0] if g.is_2d else unorient_array(volume, g.transpose, g.flips)
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    if out.GetPixelID() != pixel_type:
        out = sitk.Cast(out, pixel_type)
    out.CopyInformation(g.reference)
    return out


def is_volume(image: sitk.Image) -> bool:
    """A 3D image with more than one slice along every axis (a single slice stored in 3D counts as 2D)."""
    return image.GetDimension() == 3 and min(image.GetSize()) > 1


def prepare_images_for_training(paths: list[str], card, color: str = "luminance") -> tuple[torch.Tensor, torch.Tensor, int]:
    """All foreground slices of many scans on the model grid: (S, 1, G, G) images, masks, scan count."""
    x, m, n, _ = prepare_training_slices(paths, card, color)
    return x, m, n


def prepare_training_slices(paths: list[str], card, color: str = "luminance"
                            ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """As `prepare_images_for_training`, with a fourth item: per slice, whether it came from a volume
    (`is_volume`) rather than a 2D image."""
    xs, ms, vs = [], [], []
    for _, volume, prep in prepared_scans(paths, card, color=color):  # only the slices kept, not each scan's volume
        xs.append(prep.slices)
        ms.append(prep.masks)
        vs.append(torch.full((prep.slices.shape[0],), volume, dtype=torch.bool))
    if not xs:
        raise InputError("none of the training inputs could be used")
    return torch.cat(xs), torch.cat(ms), len(xs), torch.cat(vs)


def prepared_scans(paths: list[str], card, *, color: str = "luminance", region: str = "foreground",
                   skipped: Optional[list[str]] = None) -> Iterator[tuple[str, bool, PreparedScan]]:
    """Each scan of `paths` read once and prepared (`prepare_scan` in `region`), in order, as (path, whether it
    is a volume, preparation). A scan that cannot be read or prepared is skipped with a warning, and its path
    and reason are appended to `skipped` when given. A 2D image is prepared as a whole slice whatever `region`."""
    for path in paths:
        try:
            image = read_image(path, color=color)
            prep = prepare_scan(image, card, region=region)
        except InputError as exc:
            log.warning("skipping %s: %s", path, exc)
            if skipped is not None:
                skipped.append(f"{path} ({exc})")
            continue
        yield str(path), is_volume(image), prep


def read_list(path: Path) -> list[str]:
    """The paths listed in a .txt file, one a line ('#' starts a comment line), relative ones resolved
    against the file's folder."""
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return [str(Path(ln) if Path(ln).is_absolute() else path.parent / ln) for ln in lines
            if ln and not ln.startswith("#")]


def expand_inputs(items: list[str]) -> list[str]:
    """Files from paths: image files, DICOM folders, folders of images/volumes, or .txt lists of them."""
    out: list[str] = []
    vol_suffixes = SCAN_SUFFIXES + (".dcm",)
    for item in items:
        p = Path(item)
        if p.is_file() and p.suffix.lower() == ".txt":
            out.extend(expand_inputs(read_list(p)))
        elif p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(vol_suffixes))
            if files and not all(f.suffix.lower() == ".dcm" for f in files):
                out.extend(str(f) for f in files)
            else:
                out.append(str(p))  # a DICOM series folder
        elif p.exists():
            out.append(str(p))
        else:
            raise InputError(f"{p}: no such file or folder")
    return out
