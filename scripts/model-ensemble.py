"""Two (or more) models' volume maps averaged (Docs/experiments.md, *Two grids averaged*): the experiment behind `synomaly pair`.

Tuning data only (`oasis`, the five forms and 30 implanted lesions of `synomaly tune`): each model's map at its own
tuned volume setting, alone and averaged, each map first divided by a scale: `healthy`, its 99.9th percentile on
the lesion-free forms, or `scan`, the 0.9 quantile of its own map inside each scan's scored region (detect's
SCAN_LEVEL_QUANTILE). Prints the pooled pixel AUPRC and, at per-voxel FPRs calibrated on the lesion-free forms,
the mean Dice and the most mL flagged in a lesion-free form, and the rate `synomaly tune`'s rule picks (the best
Dice within 1 mL; --max-healthy-ml sets a stricter bound, a margin for scans less like the tuning data).

With --held-out: then the held-out implanted volumes of `synomaly evaluate --data implanted --cases 2
--healthy-every 2 --val-cases 0 --seed 0` (ch2, robex, itk-t1), each model through `detect` at its card (so its own
numbers are evaluate's), the averaged map thresholded at the picked rate: Dice per volume and mL per lesion-free
volume. Reads the held-out volumes: use once per recipe fixed on the tuning data.

    python scripts/model-ensemble.py --models v030=MODEL_64 g128=MODEL_128 --scale scan [--max-healthy-ml 0.2] [--held-out]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import SimpleITK as sitk

from synomaly.detect import SCAN_LEVEL_QUANTILE, DetectionSettings, detect, mean_of_scaled, paired_map, postprocess
from synomaly.metrics import dice
from synomaly.modelio import load_model
from synomaly.pairing import operating_points, paired_tuning, tuning_options
from synomaly.prepare import prepare_scan, unorient_array
from synomaly.tune import choose_fpr, load_tune_volumes, pooled_auprc

FPRS = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", required=True, metavar="NAME=TUNED_FILE", help="two or more tuned models")
    ap.add_argument("--scale", choices=("healthy", "scan"), default="scan")
    ap.add_argument("--max-healthy-ml", type=float, default=1.0,
                    help="the rate picked: best Dice with every lesion-free form at most this (default 1, tune's rule)")
    ap.add_argument("--held-out", action="store_true")
    args = ap.parse_args()
    if len(args.models) < 2:
        ap.error("--models needs at least two")
    names, files = zip(*(m.split("=", 1) for m in args.models))
    models = [load_model(f) for f in files]
    opts = tuning_options(models)
    volumes = load_tune_volumes(["oasis"])
    start = time.perf_counter()
    lesion, healthy, own, scan_mean = paired_tuning(models, volumes, opts)
    for name, model in zip(names, models):
        d = model.card.detection_3d
        print(f"{name}: t {d.noise_levels()}, blur {d.blur_kernel}, {d.smooth_mm:g} mm", flush=True)
    print(f"maps of both models: {time.perf_counter() - start:.0f} s", flush=True)
    maps = dict(zip(names, own))
    cases = lesion + healthy
    n = len(lesion)
    if args.scale == "healthy":
        scales = {k: float(np.quantile(np.concatenate([m[c.prep.foreground] for m, c in zip(v[n:], healthy)]), 0.999))
                  for k, v in maps.items()}
        mean = [mean_of_scaled([maps[k][i] for k in names], [scales[k] for k in names]) for i in range(len(cases))]
    else:
        scales, mean = None, scan_mean
    rows = {**{k: maps[k] for k in names}, "mean": mean}
    picks = {}
    for label, ms in rows.items():
        pts = operating_points(ms, lesion, healthy, FPRS, opts.min_lesion_mm3)
        pk = choose_fpr(pts, args.max_healthy_ml)
        picks[label] = (pts, pk)
        print(f"{label:6s} pooled AUPRC {pooled_auprc(ms[:n], lesion, opts):.4f} | "
              + " | ".join(f"FPR {p['fpr']}: Dice {p['dice_mean']:.3f}, max {p['healthy_ml_max']:.2f} mL" for p in pts)
              + f" || picked FPR {pk['fpr']}", flush=True)
    if not args.held_out:
        return
    from synomaly.evaldata import load_eval_data

    data = load_eval_data("implanted", templates=("ch2", "robex", "itk-t1"), cases=2, val_cases=0, seed=0,
                          healthy_every=2)
    results = []
    for case in sorted(data.test, key=lambda c: (c.unit, c.volume, c.name)):
        image, truth = case.load()
        sp = tuple(image.GetSpacing())
        own, segs = [], []
        for model in models:
            r = detect(image, model, DetectionSettings(seed=0, min_lesion_mm3=opts.min_lesion_mm3, single_model=True))
            own.append(sitk.GetArrayFromImage(r.anomaly_map).astype(np.float32))
            segs.append(sitk.GetArrayFromImage(r.segmentation) > 0)
        if scales is None:
            prep = prepare_scan(image, models[-1].card, region="brain")
            region = unorient_array(prep.foreground, prep.geometry.transpose, prep.geometry.flips)
            ens = paired_map(own, region, SCAN_LEVEL_QUANTILE)[0]
        else:
            ens = mean_of_scaled(own, [scales[k] for k in names])
        segs.append(postprocess(ens, picks["mean"][1]["threshold"], sp, opts.min_lesion_mm3)[0])
        row = {"case": case.name}
        for label, b in zip((*names, "mean"), segs):
            if truth is not None and truth.any():
                row[f"dice {label}"] = round(dice(b, truth), 4)
            else:
                row[f"mL {label}"] = round(float(b.sum()) * float(np.prod(sp)) / 1000, 3)
        results.append(row)
        print(json.dumps(row), flush=True)
    for label in (*names, "mean"):
        d = [r[f"dice {label}"] for r in results if f"dice {label}" in r]
        ml = [r[f"mL {label}"] for r in results if f"mL {label}" in r]
        print(f"held out, {label}: Dice/volume {np.mean(d):.3f} ({len(d)} volumes); lesion-free mL mean {np.mean(ml):.2f}, "
              f"max {max(ml):.2f}, over 1 mL in {sum(x > 1 for x in ml)} of {len(ml)}")


if __name__ == "__main__":
    main()
