"""Two models' volume maps averaged (Docs/experiments.md, *Two grids averaged*): an experiment, not a product path.

Tuning data only (`oasis`, the five forms and 30 implanted lesions of `synomaly tune`): each model's map at its own
tuned volume setting, alone and averaged, each map first divided by a scale: `healthy`, its 99.9th percentile on
the lesion-free forms, or `scan`, the 0.9 quantile of its own map inside each scan's scored region (detect's
SCAN_LEVEL_QUANTILE). Prints the pooled pixel AUPRC and, at per-voxel FPRs calibrated on the lesion-free forms,
the mean Dice and the most mL flagged in a lesion-free form, and the rate `synomaly tune`'s rule picks (the best
Dice within 1 mL).

With --held-out: then the held-out implanted volumes of `synomaly evaluate --data implanted --cases 2
--healthy-every 2 --val-cases 0 --seed 0` (ch2, robex, itk-t1), each model through `detect` at its card (so its own
numbers are evaluate's), the averaged map thresholded at the picked rate: Dice per volume and mL per lesion-free
volume. Reads the held-out volumes: use once per recipe fixed on the tuning data.

    python scripts/model-ensemble.py --models v030=MODEL_64 g128=MODEL_128 --scale scan [--held-out]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import SimpleITK as sitk
import torch

from synomaly.detect import (SCAN_LEVEL_QUANTILE, DetectionSettings, detect, mean_of_scaled, postprocess, run_stages,
                             scan_map)
from synomaly.metrics import dice
from synomaly.modelio import load_model
from synomaly.prepare import prepare_scan, unorient_array
from synomaly.tune import TuneOptions, _pooled_auprc, _split, build_cases, load_tune_volumes

FPRS = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
MIN_MM3 = 50.0


def tuning_maps(model, volumes, opts):
    """Lesion and lesion-free cases of the tuning volumes and the model's map of each at its tuned volume setting."""
    d = model.card.detection_3d
    ts = d.noise_levels()
    lesion, healthy = build_cases(volumes, model.card, opts)
    maps = []
    for cases in (lesion, healthy):
        x0 = torch.cat([c.prep.slices for c in cases])
        masks = torch.cat([c.prep.masks for c in cases])
        healed = torch.stack([run_stages(model, x0, masks, t=t, kernel=1, threshold=float("inf"), max_stages=1,
                                         draws=1, seed=opts.seed + 7919 * t + 1).healed for t in ts]).mean(0)
        maps += [scan_map(h, c.prep, d.blur_kernel, d.smooth_mm) for h, c in zip(_split(healed, cases), cases)]
    return lesion, healthy, maps


def scan_scale(m: np.ndarray, region: np.ndarray) -> float:
    """A map's scale in its own scan: its SCAN_LEVEL_QUANTILE inside the scored region (as scan_map's per level)."""
    return float(np.quantile(m[region], SCAN_LEVEL_QUANTILE))


def points(maps, lesion, healthy):
    """Per FPR: threshold, mean Dice, lesion-free mL per form; and the tune rule's pick."""
    n = len(lesion)
    values = np.concatenate([m[c.prep.foreground] for m, c in zip(maps[n:], healthy)])
    out = []
    for fpr in FPRS:
        thr = float(np.quantile(values, 1 - fpr))
        d = float(np.mean([dice(postprocess(m, thr, c.spacing, MIN_MM3)[0], c.truth) for m, c in zip(maps[:n], lesion)]))
        ml = [float(postprocess(m, thr, c.spacing, MIN_MM3)[0].sum() * np.prod(c.spacing) / 1000)
              for m, c in zip(maps[n:], healthy)]
        out.append({"fpr": fpr, "threshold": thr, "dice": d, "ml": ml})
    within = [p for p in out if max(p["ml"]) <= 1.0]
    return out, (max(within, key=lambda p: p["dice"]) if within else out[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs=2, required=True, metavar="NAME=TUNED_FILE")
    ap.add_argument("--scale", choices=("healthy", "scan"), default="scan")
    ap.add_argument("--held-out", action="store_true")
    args = ap.parse_args()
    names, files = zip(*(m.split("=", 1) for m in args.models))
    models = [load_model(f) for f in files]
    opts = TuneOptions(region="brain")
    volumes = load_tune_volumes(["oasis"])
    maps, first = {}, None
    for name, model in zip(names, models):
        start = time.perf_counter()
        lesion, healthy, maps[name] = tuning_maps(model, volumes, opts)
        d = model.card.detection_3d
        print(f"{name}: t {d.noise_levels()}, blur {d.blur_kernel}, {d.smooth_mm:g} mm ({time.perf_counter() - start:.0f} s)",
              flush=True)
        if first is None:
            first = (lesion, healthy)
            continue
        # the same lesions; the scored brain regions may differ by a few voxels, as two registrations of the same
        # scan do (the atlas registration is not bit-reproducible): the first model's cases are used
        differ = max((a.prep.foreground != b.prep.foreground).mean() for a, b in zip(sum(first, []), lesion + healthy))
        if not all(np.array_equal(a.truth, b.truth) for a, b in zip(first[0], lesion)) or differ > 1e-3:
            raise SystemExit("the two models' tuning cases differ (lesions or scored region): their maps cannot be averaged")
    lesion, healthy = first
    cases = lesion + healthy
    n = len(lesion)
    if args.scale == "healthy":
        scales = {k: float(np.quantile(np.concatenate([m[c.prep.foreground] for m, c in zip(v[n:], healthy)]), 0.999))
                  for k, v in maps.items()}
        per_case = [[scales[k] for k in names] for _ in cases]
    else:
        scales = None
        per_case = [[scan_scale(maps[k][i], c.prep.foreground) for k in names] for i, c in enumerate(cases)]
    mean = [mean_of_scaled([maps[k][i] for k in names], sc) for i, sc in enumerate(per_case)]
    rows = {**{k: maps[k] for k in names}, "mean": mean}
    picks = {}
    for label, ms in rows.items():
        pts, pick = picks[label] = points(ms, lesion, healthy)
        print(f"{label:6s} pooled AUPRC {_pooled_auprc(ms[:n], lesion, opts):.4f} | "
              + " | ".join(f"FPR {p['fpr']:g}: Dice {p['dice']:.3f}, max {max(p['ml']):.2f} mL" for p in pts)
              + f" || picked FPR {pick['fpr']:g}", flush=True)
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
            r = detect(image, model, DetectionSettings(seed=0, min_lesion_mm3=MIN_MM3))
            own.append(sitk.GetArrayFromImage(r.anomaly_map).astype(np.float32))
            segs.append(sitk.GetArrayFromImage(r.segmentation) > 0)
        if scales is None:
            prep = prepare_scan(image, models[-1].card, region="brain")
            region = unorient_array(prep.foreground, prep.geometry.transpose, prep.geometry.flips)
            ens = mean_of_scaled(own, [scan_scale(m, region) for m in own])
        else:
            ens = mean_of_scaled(own, [scales[k] for k in names])
        segs.append(postprocess(ens, picks["mean"][1]["threshold"], sp, MIN_MM3)[0])
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
