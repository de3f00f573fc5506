"""How much of an implanted lesion a model heals, brighter against darker, at each noise level.

One ellipsoidal lesion at a time (sampledata.implant_lesion: 14 mm across, +-50 % of the tissue's intensity
range) is implanted at random points of the brain of a tuning volume (default `oasis`, never used in
evaluation), and the model's counterfactual is compared with the untouched volume:

- healed: the share of the implanted change that the counterfactual undoes, mean over the lesion;
- lesion max: the largest anomaly-map value inside the lesion;
- ratio: lesion max over the 99.99th percentile of the map in the rest of the brain (above 1: the lesion
  stands out of the healthy tail).

    python scripts/healing-by-polarity.py --t 100 200 400 700 --ensemble 50+100+200 --lesions 6
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import replace

import numpy as np
import SimpleITK as sitk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="SynomalyDetect/Resources/Models/brain-mri-axial.safetensors")
    ap.add_argument("--volume", default="oasis", help="a healthy volume name with a brain mask (tuning role)")
    ap.add_argument("--t", type=int, nargs="*", default=[100, 200, 400, 700], help="single noise levels")
    ap.add_argument("--ensemble", nargs="*", default=["50+100+200"], help="ensembles of noise levels, e.g. 50+100+200")
    ap.add_argument("--lesions", type=int, default=6, help="lesion positions (each implanted brighter and darker)")
    ap.add_argument("--contrast", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from synomaly.detect import DetectionSettings, detect
    from synomaly.lesions import brain_mask
    from synomaly.modelio import load_model
    from synomaly.sampledata import HEALTHY_VOLUMES, healthy_volume, implant_lesion

    if HEALTHY_VOLUMES[args.volume].role == "eval":
        raise SystemExit(f"{args.volume} is kept for evaluation; use a tuning or training volume")
    path, mask = healthy_volume(args.volume)
    image = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
    healthy = sitk.GetArrayFromImage(image)
    brain = brain_mask(image, str(mask) if mask else None)
    model = load_model(args.model, device="cpu")
    settings = [(str(t), DetectionSettings(device="cpu", t=t)) for t in args.t]
    for e in args.ensemble:  # an ensemble through the card's own route: a copy of the card with it as the setting
        settings.append((e, tuple(int(v) for v in e.split("+"))))
    rng = np.random.default_rng(args.seed)
    points = np.argwhere(brain)
    out = defaultdict(list)
    for k in range(args.lesions):
        z, y, x = points[rng.integers(len(points))]
        centre = image.TransformIndexToPhysicalPoint([int(x), int(y), int(z)])
        for contrast in (args.contrast, -args.contrast):
            lesioned, truth = implant_lesion(image, centre_mm=centre, radii_mm=(7.0, 7.0, 7.0), contrast=contrast, seed=k)
            les = sitk.GetArrayFromImage(lesioned)
            inside = sitk.GetArrayFromImage(truth) > 0
            added = (les - healthy)[inside]
            for name, s in settings:
                if isinstance(s, tuple):
                    card = model.card.copy()
                    card.detection_3d = replace(card.detection_for(True), t=s[0], t_ensemble=s)
                    model.card, kept = card, model.card
                    res = detect(lesioned, model, DetectionSettings(device="cpu"))
                    model.card = kept
                else:
                    res = detect(lesioned, model, s)
                healed_img = sitk.GetArrayFromImage(res.counterfactual)
                amap = sitk.GetArrayFromImage(res.anomaly_map)
                healed = float(((les - healed_img)[inside] * np.sign(added)).mean() / np.abs(added).mean())
                top = float(amap[inside].max())
                tail = float(np.percentile(amap[brain & ~inside], 99.99))
                out[(name, "brighter" if contrast > 0 else "darker")].append((healed, top, tail))
    print(f"{args.model} on {args.volume}: {args.lesions} positions, each lesion 14 mm across at "
          f"+-{100 * args.contrast:.0f} % contrast; means over positions\n")
    print("| t | lesion | healed | lesion max | healthy 99.99th percentile | ratio |")
    print("|---|---|---|---|---|---|")
    for (name, pol), rows in out.items():
        a = np.array(rows)
        print(f"| {name} | {pol} | {a[:, 0].mean():.2f} | {a[:, 1].mean():.3f} | {a[:, 2].mean():.3f} | "
              f"{(a[:, 1] / a[:, 2]).mean():.2f} |")


if __name__ == "__main__":
    main()
