"""How far a threshold calibrated on the tuning forms carries to fresh forms of the same head (tuning data only).

`synomaly tune` and `synomaly pair` calibrate on five lesion-free forms of `oasis` (native, skull-stripped, oblique,
thick, scaled) made with seed 0; held-out heads have flagged 3.6 to 7.4 times the most a tuning form did. This
script separates one cause from the other: it calibrates the averaged map of the given models (one model: its map
scaled in each scan, as a pair would) on the seed-0 forms, then applies those thresholds to the forms made with
other seeds (new oblique angles, slice phases, intensity scalings, lesions, and noise draws; the native and
skull-stripped images repeat, with new noise), printing per rate the most any lesion-free form flags and the mean
Dice of the new lesion cases. If fresh forms of the same head already flag far more than the calibration forms,
five forms are too few to calibrate a tail on; if not, the excess held out comes from the heads.

    python scripts/fresh-forms.py --models runs/brain-mri-axial-0.3.0.safetensors \
        SynomalyDetect/Resources/Models/brain-mri-axial-128.safetensors --seeds 1 2
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from synomaly.detect import postprocess
from synomaly.metrics import dice
from synomaly.modelio import load_model
from synomaly.pairing import PAIR_FPRS, operating_points, paired_tuning, tuning_options
from synomaly.tune import load_tune_volumes


def flagged_ml(m: np.ndarray, case, threshold: float, min_mm3: float) -> float:
    return float(postprocess(m, threshold, case.spacing, min_mm3)[0].sum() * np.prod(case.spacing) / 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", required=True, metavar="TUNED_FILE")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2], help="seeds of the fresh forms (0 calibrates)")
    args = ap.parse_args()
    models = [load_model(f) for f in args.models]
    volumes = load_tune_volumes(["oasis"])
    start = time.perf_counter()
    opts = tuning_options(models, seed=0)
    lesion, healthy, _, mean = paired_tuning(models, volumes, opts)
    points = operating_points(mean, lesion, healthy, PAIR_FPRS, opts.min_lesion_mm3)
    print(f"calibrated on seed 0 ({len(healthy)} lesion-free forms, {time.perf_counter() - start:.0f} s)", flush=True)
    rows = {float(p["fpr"]): {"threshold": p["threshold"], "seed 0": (p["dice_mean"], p["healthy_ml_max"])}
            for p in points}
    for seed in args.seeds:
        o = tuning_options(models, seed=seed)
        les, hea, _, mn = paired_tuning(models, volumes, o)
        n = len(les)
        for fpr, row in rows.items():
            d = float(np.mean([dice(postprocess(m, row["threshold"], c.spacing, o.min_lesion_mm3)[0], c.truth)
                               for m, c in zip(mn[:n], les)]))
            ml = [flagged_ml(m, c, row["threshold"], o.min_lesion_mm3) for m, c in zip(mn[n:], hea)]
            row[f"seed {seed}"] = (d, max(ml))
            if fpr == min(rows):
                print(f"seed {seed}, FPR {fpr:g}: mL per lesion-free form "
                      + ", ".join(f"{c.name} {v:.2f}" for c, v in zip(hea, ml)), flush=True)
        print(f"seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    keys = ["seed 0"] + [f"seed {s}" for s in args.seeds]
    print("| FPR (threshold) | " + " | ".join(f"{k}: Dice, max mL" for k in keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for fpr, r in rows.items():
        print(f"| {fpr:g} ({r['threshold']:.3f}) | " + " | ".join(f"{r[k][0]:.3f}, {r[k][1]:.2f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
