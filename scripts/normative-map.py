"""Where healthy heads usually score high: an expected map in atlas space, subtracted (Docs/experiments.md,
*An expected healthy map in atlas space*).

The pair's false positives on held-out heads come from the heads, not from too few forms of the tuning head
(scripts/fresh-forms.py), and its two models err in the same places (scripts/pair-combine.py). If those places
are the same anatomy in every head, a map of them can be learnt from healthy heads and taken off.

1. The prior, from the training volumes only (no lesions needed): the pair's averaged scan-scaled map of every
   lesion-free form of each (the forms of `synomaly tune`), moved into the brain atlas's space (2 mm) by the
   scan's own registration (the one that finds its brain), averaged over all forms, smoothed by --sigma mm: E.
   Written to --prior (read back when it exists).
2. The test, on tuning data only (`oasis`, one lesion draw per seed): each tuning map less alpha x E (moved onto
   the scan by its registration), clipped at 0 (or, `--mode divide`, divided by alpha + E), then calibrated and scored as `synomaly pair` does (plain
   thresholds); the point tune's rule picks within each bound, per alpha.

    python scripts/normative-map.py --models FIRST_TUNED PARTNER_TUNED [--mode divide] [--alphas 0 0.5 1 1.5] [--seeds 0 1]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from synomaly.atlas import atlas_dir
from synomaly.detect import SCAN_LEVEL_QUANTILE, paired_map
from synomaly.lesions import FORMS, scan_form
from synomaly.modelio import load_model
from synomaly.pairing import PAIR_FPRS, operating_points, paired_tuning, setting_maps, tuning_options
from synomaly.prepare import orient_array, prepare_scan, unorient_array
from synomaly.tune import choose_fpr, load_tune_volumes

TRAINING = ("mni152", "brainles", "brainles-brain", "pydeface", "mni2020-brain")


def to_atlas(m: np.ndarray, prep, atlas: sitk.Image) -> sitk.Image:
    """An oriented map of a scan resampled onto the atlas grid (0 where the scan has none)."""
    g = prep.geometry
    img = sitk.GetImageFromArray(unorient_array(m, g.transpose, g.flips).astype(np.float32))
    img.CopyInformation(g.reference)
    return sitk.Resample(img, atlas, prep.atlas_transform.GetInverse(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def from_atlas(e: sitk.Image, prep) -> np.ndarray:
    """E on a scan's oriented grid."""
    g = prep.geometry
    arr = sitk.GetArrayFromImage(sitk.Resample(e, g.reference, prep.atlas_transform, sitk.sitkLinear, 0.0,
                                               sitk.sitkFloat32))
    return np.ascontiguousarray(orient_array(arr, g.transpose, g.flips))


def build_prior(models, sigma: float, out: Path) -> sitk.Image:
    atlas = sitk.ReadImage(str(atlas_dir() / "brain-2mm.nrrd"), sitk.sitkFloat32)  # the grid E lives on
    total = np.zeros(sitk.GetArrayViewFromImage(atlas).shape, np.float64)
    count = np.zeros_like(total)
    start = time.perf_counter()
    opts = tuning_options(models)
    for vi, vol in enumerate(load_tune_volumes(list(TRAINING))):
        for form in opts.forms:
            if form == "brain" and not vol.has_mask:
                continue
            rng = np.random.default_rng([0, vi, FORMS.index(form)])
            image, _, _ = scan_form(vol.image, None, vol.brain, form, rng)
            maps, preps = [], []
            for model in models:
                prep = prepare_scan(image, model.card, region=opts.region)
                maps += setting_maps(model, [prep], 0)  # this scan healed alone, seed 0
                preps.append(prep)
            prep = preps[0]
            if prep.atlas_transform is None:
                print(f"  {vol.name} {form}: no registered brain, skipped", flush=True)
                continue
            pair = paired_map(maps, prep.foreground, SCAN_LEVEL_QUANTILE)[0] * prep.foreground
            inside = to_atlas(prep.foreground.astype(np.float32), prep, atlas)
            total += sitk.GetArrayFromImage(to_atlas(pair, prep, atlas))
            count += sitk.GetArrayFromImage(inside)
            print(f"  {vol.name} {form}: {time.perf_counter() - start:.0f} s", flush=True)
    e = sitk.GetImageFromArray((total / np.maximum(count, 1e-3) * (count > 0.5)).astype(np.float32))
    e.CopyInformation(atlas)
    if sigma > 0:
        e = sitk.SmoothingRecursiveGaussian(e, sigma)
    sitk.WriteImage(e, str(out), True)
    return e


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs=2, required=True, metavar="TUNED_FILE")
    ap.add_argument("--prior", type=Path, default=Path("runs/normative-prior.nrrd"))
    ap.add_argument("--sigma", type=float, default=2.0, help="smoothing of the prior (mm)")
    ap.add_argument("--mode", choices=("subtract", "divide"), default="subtract",
                    help="the map less alpha x E (clipped at 0), or the map divided by alpha + E (alpha > 0)")
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.0, 0.5, 1.0, 1.5])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--bounds", nargs="+", type=float, default=[0.2, 1.0])
    args = ap.parse_args()
    models = [load_model(f) for f in args.models]
    if args.prior.exists():
        e = sitk.ReadImage(str(args.prior), sitk.sitkFloat32)
    else:
        args.prior.parent.mkdir(parents=True, exist_ok=True)
        e = build_prior(models, args.sigma, args.prior)
    ev = sitk.GetArrayViewFromImage(e)
    print(f"prior: mean {ev[ev > 0].mean():.3f}, 99th percentile {np.quantile(ev[ev > 0], 0.99):.3f}, "
          f"max {ev.max():.3f} (scan-scaled units: 1 is a scan's 0.9 quantile)", flush=True)
    volumes = load_tune_volumes(["oasis"])
    table = {a: [] for a in args.alphas}
    for seed in args.seeds:
        opts = tuning_options(models, seed=seed)
        lesion, healthy, _, mean = paired_tuning(models, volumes, opts)
        cases = lesion + healthy
        expected = [from_atlas(e, c.prep) for c in cases]
        for a in args.alphas:
            if args.mode == "divide":  # a: the constant added to E before dividing (so E matters less as a grows)
                corrected = [(m / (np.float32(a) + x)).astype(np.float32) for m, x in zip(mean, expected)]
            else:
                corrected = [np.maximum(m - np.float32(a) * x, 0).astype(np.float32) for m, x in zip(mean, expected)]
            pts = operating_points(corrected, lesion, healthy, PAIR_FPRS, opts.min_lesion_mm3)
            picks = {b: choose_fpr(pts, b) for b in args.bounds}
            table[a].append(picks)
            print(f"seed {seed}, alpha {a:g}: "
                  + " | ".join(f"{p['fpr']}: {p['dice_mean']:.3f}, {p['healthy_ml_max']:.2f} mL "
                               f"({p['lesions_found']['all']['found']}/{p['lesions_found']['all']['of']})" for p in pts)
                  + " || " + ", ".join(f"<= {b:g} mL: {p['fpr']} Dice {p['dice_mean']:.3f}" for b, p in picks.items()),
                  flush=True)
    print("\n| alpha | " + " | ".join(f"Dice within {b:g} mL per seed (mean)" for b in args.bounds) + " |")
    print("|---" * (1 + len(args.bounds)) + "|")
    for a, rows in table.items():
        cells = []
        for b in args.bounds:
            d = [r[b]["dice_mean"] for r in rows]
            cells.append(", ".join(f"{v:.3f}" for v in d) + f" ({np.mean(d):.3f})")
        print(f"| {a:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
