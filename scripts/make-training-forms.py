#!/usr/bin/env python
"""Write the training volumes as a site might send them: an oblique 1 x 1 x 3 mm resampling and thick axial
slices (5-6.5 mm) of every healthy volume whose role is "train" (synomaly.sampledata), with fixed seeds.

The forms fine-tune (Docs/experiments.md, *Training on the forms scans arrive in*) reads these beside the volumes
themselves. The "scaled" form is left out (percentile normalisation undoes it) and so is the
skull-stripped one (brainles-brain and mni2020-brain already are). Usage:
    python scripts/make-training-forms.py runs/train-forms
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "SynomalyDetect"))

from synomaly.lesions import brain_mask, scan_form  # noqa: E402
from synomaly.prepare import read_image  # noqa: E402
from synomaly.sampledata import healthy_volume, healthy_volumes  # noqa: E402

FORMS = ("oblique", "thick")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="folder to write NAME-FORM.nii.gz into")
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(healthy_volumes("train")):
        path, mask = healthy_volume(name)
        image = sitk.Cast(read_image(str(path)), sitk.sitkFloat32)
        brain = brain_mask(image, str(mask) if mask else None)
        for j, form in enumerate(("oblique", "thick", "scaled")):  # j keeps the seeds the forms fine-tune drew
            if form not in FORMS:
                continue
            moved, _, meta = scan_form(image, None, brain, form, np.random.default_rng([4, i, j]))
            sitk.WriteImage(moved, str(out / f"{name}-{form}.nii.gz"))
            print(f"{name} {form}: {moved.GetSize()} {meta}", flush=True)


if __name__ == "__main__":
    main()
