#!/usr/bin/env python
"""How much of a card's healthy tail on the held-out volumes is what both hemispheres show alike (Docs/experiments.md,
*The mirror map*). For the 28 held-out volumes of `synomaly evaluate --data implanted --cases 2 --healthy-every 2
--val-cases 0` (14 with lesions, 14 without), the card's map is taken as detection makes it, and again less its mirror
image across the registered atlas's midline (atlas.contralateral_excess, grown by --grow mm). For each map it prints
the mean AUPRC per lesion volume and, as a bound (the threshold is chosen on these test volumes, so it is not a
result), the Dice per lesion volume at the lowest threshold that keeps every lesion-free volume at or under 1 mL; and,
for the plain map, the Dice and largest lesion-free volume at the card's own threshold (evaluate's numbers).

    python scripts/mirror-diagnostic.py runs/s32/lb-tuned.safetensors --grow 4
"""

from __future__ import annotations

import argparse

import numpy as np
import SimpleITK as sitk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--grow", type=float, nargs="+", default=[4.0], help="mirror image growth(s), mm")
    ap.add_argument("--min-size", type=float, default=50.0, help="smallest lesion kept, mm^3 (detect's default)")
    args = ap.parse_args()

    from synomaly.atlas import atlas_brain_mask, contralateral_excess
    from synomaly.detect import DetectionSettings, detect, postprocess
    from synomaly.evaldata import DEFAULT_TEMPLATES, find_template, implant_case
    from synomaly.lesions import FORMS
    from synomaly.metrics import auprc, dice
    from synomaly.modelio import load_model
    from synomaly.prepare import foreground_mask

    model = load_model(args.model, device="cpu")
    settings = DetectionSettings(mirror_mm=0.0)  # the plain map; the mirror images are taken below
    cases = []
    for name in DEFAULT_TEMPLATES:
        t = find_template(name)
        for form in FORMS:
            if form == "brain" and t.mask_path is None:
                continue
            for index in (0, 1):  # evaluate's test cases: 0 with lesions, 1 without (--healthy-every 2)
                image, truth, _ = implant_case(t, "test", index, seed=0, healthy=index == 1, form=form)
                res = detect(image, model, settings)
                brain = atlas_brain_mask(image, foreground_mask(sitk.GetArrayFromImage(image)))
                maps = {"plain": sitk.GetArrayFromImage(res.anomaly_map)}
                for g in args.grow:
                    maps[f"mirror {g:g} mm"] = sitk.GetArrayFromImage(
                        contralateral_excess(res.anomaly_map, brain.transform, g))
                cases.append(dict(name=f"{name}-{form}-{index}", lesion=index == 0, truth=truth, maps=maps,
                                  spacing=tuple(image.GetSpacing()), threshold=res.threshold))
                print(f"{name} {form} {'lesions' if index == 0 else 'lesion-free'}", flush=True)

    def flagged_ml(m, thr, c):
        binary, _ = postprocess(m, thr, c["spacing"], args.min_size, None, None)
        return binary, float(binary.sum()) * float(np.prod(c["spacing"])) / 1000.0

    lesion = [c for c in cases if c["lesion"]]
    free = [c for c in cases if not c["lesion"]]
    for key in cases[0]["maps"]:
        support = [(c["maps"][key] > 0) | c["truth"] for c in lesion]  # the scored region and the lesions
        ap_mean = np.mean([auprc(c["maps"][key][s], c["truth"][s]) for c, s in zip(lesion, support)])
        top = max(float(c["maps"][key].max()) for c in cases)
        bound = next((thr for thr in np.linspace(0, top, 200)[1:]
                      if all(flagged_ml(c["maps"][key], thr, c)[1] <= 1.0 for c in free)), top)
        dices = [dice(flagged_ml(c["maps"][key], bound, c)[0], c["truth"]) for c in lesion]
        print(f"{key}: AUPRC per lesion volume {ap_mean:.3f}; lowest threshold keeping every lesion-free volume "
              f"<= 1 mL {bound:.4f}, Dice per lesion volume there {np.mean(dices):.3f} "
              f"({sum(d > 0 for d in dices)} of {len(dices)} above 0)")
        if key == "plain":
            thr = cases[0]["threshold"]
            d = [dice(flagged_ml(c["maps"][key], thr, c)[0], c["truth"]) for c in lesion]
            ml = [flagged_ml(c["maps"][key], thr, c)[1] for c in free]
            print(f"  at the card's threshold {thr:.4f}: Dice per lesion volume {np.mean(d):.3f}, "
                  f"largest lesion-free volume flagged {max(ml):.2f} mL")


if __name__ == "__main__":
    main()
