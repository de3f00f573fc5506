"""How well the brain atlas (synomaly.atlas) finds the brain of volumes it was not made from.

For every form (native, skull-stripped, oblique, thick slices, rescaled) of the tuning and evaluation volumes
(`bash scripts/healthy-volumes.sh` installs them), registers the atlas and compares its brain with the
volume's own: its mask file (ch2, robex, oasis) or, for itk-t1, which has none, the head's foreground eroded by
12 mm (the rule lesions are implanted with). Prints one row per volume and form. Usage:
    python scripts/atlas-check.py [--margin MM]
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "SynomalyDetect"))

from synomaly.atlas import MARGIN_MM, atlas_brain_mask  # noqa: E402
from synomaly.evaldata import _load_template, find_template, implanted_data  # noqa: E402
from synomaly.prepare import foreground_mask  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--margin", type=float, nargs="+", default=[0.0, MARGIN_MM], help="margins to report (mm)")
    args = parser.parse_args()
    data = implanted_data(templates=("ch2", "robex", "itk-t1", "oasis"), cases=1, val_cases=0, healthy_every=1)
    print("| volume and form | template | seconds | reference mL | atlas mL | " +
          " | ".join(f"Dice, {m:g} mm | reference outside, {m:g} mm" for m in args.margin) + " |")
    print("|---" * (5 + 2 * len(args.margin)) + "|")
    for case in data.test:
        name = "itk-t1" if case.name.startswith("itk-t1") else case.name.split("-")[0]
        timg, brain, _ = _load_template(find_template(name))
        ref_img = sitk.GetImageFromArray(brain.astype(np.uint8))
        ref_img.CopyInformation(timg)
        image, _ = case.load()
        ref = sitk.GetArrayFromImage(sitk.Resample(ref_img, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
        fg = foreground_mask(sitk.GetArrayFromImage(image).astype(np.float32))
        cells, first = [], None
        for margin in args.margin:
            found = atlas_brain_mask(image, fg, margin)
            first = first or found
            if found.mask is None:
                cells += [f"refused: {found.problem}", ""]
                continue
            m = found.mask
            cells += [f"{2 * (m & ref).sum() / (m.sum() + ref.sum()):.3f}", f"{(ref & ~m).sum() / ref.sum():.3f}"]
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000
        form = case.name.rsplit("-test", 1)[0]
        print(f"| {form} | {first.template} | {first.seconds:.1f} | {ref.sum() * voxel_ml:.0f} | {first.volume_ml:.0f} | "
              + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
