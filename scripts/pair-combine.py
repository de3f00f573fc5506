"""How two models' scan-scaled maps are best combined (Docs/experiments.md, *How the two maps are combined*).

Tuning data only (`oasis`, the forms and implanted lesions of `synomaly tune`, one lesion draw per seed): each
model's map at its own tuned volume setting, divided by its 0.9 quantile inside each scan's scored region (as
`synomaly pair` does), then combined voxel by voxel: `mean` (what the shipped pair does), `geometric` (the square
root of the product: high only where both are), `min` (the lower of the two) and `max`. Per rule and seed: the
pooled pixel AUPRC and, at each rate calibrated on the lesion-free forms (plain thresholds), the mean Dice and
the most mL flagged in a lesion-free form; then the point tune's rule picks within each bound. The idea tested:
a healthy voxel that only one model gets wrong is suppressed by `geometric` and `min`, a lesion both see is not.

    python scripts/pair-combine.py --models FIRST_TUNED PARTNER_TUNED [--seeds 0 1 2] [--bounds 0.2 1]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from synomaly.detect import COMBINE_SCALED, SCAN_LEVEL_QUANTILE, scaled_parts, scan_scales
from synomaly.modelio import load_model
from synomaly.pairing import PAIR_FPRS, operating_points, paired_tuning, tuning_options
from synomaly.tune import choose_fpr, load_tune_volumes, pooled_auprc

# each rule takes a case's raw maps and their scales; detection's own (detect.COMBINE_SCALED: mean, geometric)
# and two more that detection does not offer
RULES = {
    **COMBINE_SCALED,
    "min": lambda parts, scales: np.minimum(*scaled_parts(parts, scales)),
    "max": lambda parts, scales: np.maximum(*scaled_parts(parts, scales)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs=2, required=True, metavar="TUNED_FILE")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="lesion draws (0 is tune's own)")
    ap.add_argument("--bounds", nargs="+", type=float, default=[0.2, 1.0], help="mL bounds the pick is made within")
    args = ap.parse_args()
    models = [load_model(f) for f in args.models]
    volumes = load_tune_volumes(["oasis"])
    start = time.perf_counter()
    table: dict[str, list[dict]] = {r: [] for r in RULES}
    for seed in args.seeds:
        opts = tuning_options(models, seed=seed)
        lesion, healthy, maps, _ = paired_tuning(models, volumes, opts)
        n = len(lesion)
        cases = lesion + healthy
        parts = [[m[i] for m in maps] for i in range(len(cases))]
        scales = [scan_scales(p, c.prep.foreground, SCAN_LEVEL_QUANTILE) for p, c in zip(parts, cases)]
        print(f"seed {seed}: maps of both models ({time.perf_counter() - start:.0f} s)", flush=True)
        for rule, f in RULES.items():
            combined = [f(p, sc).astype(np.float32, copy=False) for p, sc in zip(parts, scales)]
            pts = operating_points(combined, lesion, healthy, PAIR_FPRS, opts.min_lesion_mm3)
            picks = {b: choose_fpr(pts, b) for b in args.bounds}
            table[rule].append({"seed": seed, "auprc": pooled_auprc(combined[:n], lesion, opts), "points": pts,
                                "picks": picks})
            print(f"  {rule:9s} AUPRC {table[rule][-1]['auprc']:.4f} | "
                  + " | ".join(f"{p['fpr']}: {p['dice_mean']:.3f}, {p['healthy_ml_max']:.2f} mL "
                               f"({p['lesions_found']['all']['found']}/{p['lesions_found']['all']['of']})" for p in pts)
                  + " || " + ", ".join(f"<= {b:g} mL: {p['fpr']} Dice {p['dice_mean']:.3f}" for b, p in picks.items()),
                  flush=True)
    print("\n| rule | pooled AUPRC per seed | " + " | ".join(f"Dice within {b:g} mL per seed (mean)" for b in args.bounds)
          + " |")
    print("|---" * (2 + len(args.bounds)) + "|")
    for rule, rows in table.items():
        cells = [", ".join(f"{r['auprc']:.3f}" for r in rows)]
        for b in args.bounds:
            d = [r["picks"][b]["dice_mean"] for r in rows]
            cells.append(", ".join(f"{v:.3f}" for v in d) + f" ({np.mean(d):.3f})")
        print(f"| {rule} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
