#!/usr/bin/env python
"""The picture of Docs/experiments.md *The mirror map*: one held-out volume without lesions and one with, the card's
map as it is and less its mirror image across the registered brain's midline, on the axial slice where the plain map
flags most (lesion-free) or the lesion is largest; contours: what each flags at the card's threshold (before the 50 mm^3
minimum) and, dashed, the implanted lesion.

    python scripts/mirror-figure.py runs/s32/lb-tuned.safetensors --grow 4 -o Docs/evaluation/mirror-7995/mirror-map.png
"""

from __future__ import annotations

import argparse

import numpy as np
import SimpleITK as sitk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--grow", type=float, default=4.0, help="mirror image growth, mm")
    ap.add_argument("--cases", nargs="+", default=["robex:brain:1", "robex:thick:0"],
                    help="TEMPLATE:FORM:INDEX of evaluate's test cases (index 1: lesion-free, 0: with lesions)")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from synomaly.atlas import atlas_brain_mask, contralateral_excess
    from synomaly.detect import DetectionSettings, detect
    from synomaly.evaldata import find_template, implant_case
    from synomaly.modelio import load_model
    from synomaly.prepare import foreground_mask

    model = load_model(args.model, device="cpu")
    fig, axes = plt.subplots(len(args.cases), 3, figsize=(9.6, 3.4 * len(args.cases)))
    for row, spec in zip(np.atleast_2d(axes), args.cases):
        name, form, index = spec.split(":")
        image, truth, meta = implant_case(find_template(name), "test", int(index), seed=0,
                                          healthy=int(index) == 1, form=form)
        res = detect(image, model, DetectionSettings(mirror_mm=0.0))
        brain = atlas_brain_mask(image, foreground_mask(sitk.GetArrayFromImage(image)))
        plain = sitk.GetArrayFromImage(res.anomaly_map)
        mirror = sitk.GetArrayFromImage(contralateral_excess(res.anomaly_map, brain.transform, args.grow))
        img = sitk.GetArrayFromImage(image)
        z = int(np.argmax(truth.sum(axis=(1, 2)))) if truth.any() else int(np.argmax((plain > res.threshold).sum(axis=(1, 2))))
        top = float(np.quantile(plain[plain > 0], 0.999)) if (plain > 0).any() else 1.0
        aspect = image.GetSpacing()[1] / image.GetSpacing()[0]
        what = "lesion-free" if int(index) == 1 else f"{len(meta['diameters_mm'])} lesions"
        panels = [(img[z], "gray", None, f"{name} {form} ({what}), slice {z}"),
                  (plain[z], "magma", top, "map"), (mirror[z], "magma", top, f"less its mirror image ({args.grow:g} mm)")]
        for ax, (data, cmap, vmax, title) in zip(row, panels):
            ax.imshow(data, cmap=cmap, vmin=0, vmax=vmax, aspect=aspect)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        for ax, m in ((row[1], plain), (row[2], mirror)):
            if (m[z] > res.threshold).any():
                ax.contour(m[z] > res.threshold, levels=[0.5], colors="cyan", linewidths=1.4)
            if truth[z].any():
                ax.contour(truth[z], levels=[0.5], colors="lime", linewidths=1.2, linestyles="dashed")
        print(f"{spec}: slice {z}; flagged at the card threshold {res.threshold:.4f} (before the minimum size): "
              f"plain {int((plain > res.threshold).sum())} voxels, mirror {int((mirror > res.threshold).sum())}")
    fig.tight_layout()
    fig.savefig(args.output, dpi=80)


if __name__ == "__main__":
    main()
