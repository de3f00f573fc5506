"""Where the held-out Dice is lost: the network's healing, or the map and threshold around it.

For each of the 14 held-out volumes with implanted lesions (`synomaly evaluate --data implanted --cases 2
--healthy-every 2 --val-cases 0`, the same volumes, forms and lesions), the card's volume setting is run three
ways and thresholded exactly as `synomaly detect` thresholds it (card threshold, its growth, 50 mm^3 minimum):

- model: the network heals the scan with lesions (what `synomaly detect` does; its Dice is evaluate's);
- lesion-blind: the network heals the *same scan without the lesions* (same form, normalisation, noise),
  and the map compares that with the scan with lesions. This is a network that heals every lesion
  perfectly and errs in healthy tissue exactly as this one does, so it keeps the card's threshold honest;
- between-B (`--between`): the network's healed slices moved a share B of the way to the lesion-blind ones,
  i.e. a network that heals that much more of each lesion;
- perfect: the counterfactual is the scan without lesions itself (no healing error anywhere; plain maps
  only). At the card threshold it bounds what the threshold, the model grid, the blur and the smoothing
  allow; at the threshold best for these 14 volumes (chosen on them: a bound, not a result) it bounds
  what the pipeline allows at all.

Each is also segmented with `--peak-fraction` (default 0.5): every lesion found cut at that fraction of its
own peak where this lies above the threshold (`synomaly.detect.postprocess`), which outlines a blurred
lesion at its edge whatever its contrast.

A lesion-free volume is the same scan with and without lesions, so the first two flag the same there
(evaluate's lesion-free numbers) and the third flags nothing. Lesions are counted as found when the
segmentation touches the connected region of their truth.

    python scripts/oracle-ceiling.py --out runs/oracle/oracle.json
"""

from __future__ import annotations

import argparse
import json
import time
import zlib

import numpy as np
import torch


def clean_slices(oriented_clean: np.ndarray, prep) -> torch.Tensor:
    """The scan without lesions on the model grid, normalised and framed as the scan with lesions was."""
    from synomaly.prepare import _crop_square, _resize, intensity_to_model

    g = prep.geometry
    keep = prep.slice_index

    def kept(v):
        return torch.from_numpy(v[keep]).float().view(-1, 1, 1) if isinstance(v, np.ndarray) else v

    vol = intensity_to_model(torch.from_numpy(np.ascontiguousarray(oriented_clean[keep])), kept(g.lower),
                             kept(g.upper), g.upper_value)
    row0, col0, side = g.box
    return _resize(_crop_square(vol, row0, col0, side, fill=-1.0)[:, None], g.grid).to(prep.slices.device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="SynomalyDetect/Resources/Models/brain-mri-axial.safetensors")
    ap.add_argument("--templates", nargs="+", default=["ch2", "robex", "itk-t1"])
    ap.add_argument("--seed", type=int, default=0, help="evaluate's data seed")
    ap.add_argument("--min-size", type=float, default=50.0, help="smallest lesion kept, mm^3 (detect's default)")
    ap.add_argument("--peak-fraction", type=float, default=0.5,
                    help="also segment each lesion found down or up to this fraction of its own peak (postprocess)")
    ap.add_argument("--between", type=float, nargs="*", default=[0.25, 0.5, 0.75],
                    help="also the network's healed slices moved this share of the way to the lesion-blind ones "
                         "(how much more of each lesion the network would have to heal)")
    ap.add_argument("--out", default=None, help="write every row as JSON here")
    ap.add_argument("--markdown", default=None, help="write the tables as Markdown here")
    args = ap.parse_args()

    from scipy import ndimage

    from synomaly.detect import (DetectionSettings, postprocess, resolve_grow_threshold, resolve_level_maps,
                                 resolve_map, resolve_region, resolve_settings, resolve_smoothing, run_stages,
                                 scan_map)
    from synomaly.evaldata import SPLIT_CODES, _load_template, implant_case, resolve_templates
    from synomaly.lesions import FORMS, implant_random_lesions, scan_form
    from synomaly.metrics import dice
    from synomaly.modelio import load_model
    from synomaly.prepare import orient_array, prepare_scan

    model = load_model(args.model, device="cpu")
    card = model.card
    settings = DetectionSettings().validate()
    ts, k, stages, threshold, source = resolve_settings(settings, card, True)
    grow = resolve_grow_threshold(settings, card, threshold, True)
    smooth = resolve_smoothing(settings, card, True)
    region = resolve_region(settings, card, True)
    signed, bins = resolve_map(settings, card, True)
    level_maps = resolve_level_maps(settings, card, ts, True)
    lm_kwargs = level_maps.kwargs() if level_maps is not None else {}
    stage_args = dict(t=ts, kernel=k, threshold=threshold, max_stages=stages, tolerance=settings.tolerance,
                      draws=int(card.detection_for(True).noise_draws), seed=settings.seed,
                      keep_levels=level_maps is not None)
    print(f"{card.name} {card.version}: t {'+'.join(map(str, ts))}, blur {k}, smoothed {smooth:g} mm, region {region}, "
          f"{stages} stage(s), threshold {threshold:.4f} ({source}), grow {grow}, "
          f"{'maps per level' if level_maps else 'one map'}", flush=True)

    templates, notes = resolve_templates(args.templates)
    for n in notes:
        print("note:", n)
    rows, maps_c, truths, spacings = [], [], [], []
    start = time.perf_counter()
    for t in templates:
        image, brain, _ = _load_template(t)
        for form in FORMS:
            if form == "brain" and t.mask_path is None:
                continue
            index = 0  # evaluate's test case 0 of each template and form has the lesions (healthy every 2nd)
            rng = np.random.default_rng([args.seed, SPLIT_CODES["test"], zlib.crc32(t.name.encode()),
                                         FORMS.index(form), index])
            lesioned, truth, implanted = implant_random_lesions(image, brain, rng, count=2)
            form_seed = int(rng.integers(1 << 30))
            mask = brain if t.mask_path is not None else None
            les_img, truth_f, _ = scan_form(lesioned, truth, mask, form, np.random.default_rng(form_seed))
            clean_img, _, _ = scan_form(image, None, mask, form, np.random.default_rng(form_seed))
            # the very volume evaluate scores
            ref, ref_truth, meta = implant_case(t, "test", index, seed=args.seed, form=form)
            assert np.array_equal(sitk_array(ref), sitk_array(les_img)) and np.array_equal(ref_truth, truth_f)

            prep = prepare_scan(les_img, card, region=region)
            g = prep.geometry
            truth_o = np.ascontiguousarray(orient_array(truth_f, g.transpose, g.flips))
            clean_o = np.ascontiguousarray(orient_array(sitk_array(clean_img).astype(np.float32), g.transpose, g.flips))
            x_clean = clean_slices(clean_o, prep)
            spacing = tuple(les_img.GetSpacing())
            torch.manual_seed(settings.seed)
            res = run_stages(model, prep.slices, prep.masks, **stage_args)
            map_a = scan_map(res.healed, prep, k, smooth, signed, bins, score=res.score, levels=res.levels, **lm_kwargs)
            torch.manual_seed(settings.seed)
            res_b = run_stages(model, x_clean, prep.masks, **stage_args)
            map_b = scan_map(res_b.healed, prep, k, smooth, signed, bins, levels=res_b.levels, **lm_kwargs)
            map_c = scan_map(x_clean, prep, k, smooth, signed, bins) if level_maps is None else None
            between = {}  # the network's healing moved part of the way towards the lesion-blind one
            if level_maps is None:
                for beta in args.between:
                    h = res.healed + beta * (res_b.healed - res.healed)
                    between[f"between-{beta:g}"] = scan_map(h, prep, k, smooth, signed, bins)
            lab, nles = ndimage.label(truth_o, structure=np.ones((3, 3, 3), bool))
            row = {"case": f"{t.name}-{form}-test-{index:03d}", "diameters_mm": meta["diameters_mm"],
                   "contrasts": meta["contrasts"], "lesion_ml": meta["lesion_ml"], "regions": int(nles)}
            for name, m in (("model", map_a), *between.items(), ("blind", map_b), ("perfect", map_c)):
                if m is None:
                    continue
                seg = postprocess(m, threshold, spacing, args.min_size, grow)[0]
                found = [int(seg[lab == i].any()) for i in range(1, nles + 1)]
                inside = [float(m[lab == i].max()) for i in range(1, nles + 1)]
                cut = postprocess(m, threshold, spacing, args.min_size, grow, args.peak_fraction)[0]
                row[name] = {"dice": round(dice(seg, truth_o), 4), "found": int(sum(found)),
                             "peak_in_lesions": [round(v, 4) for v in inside],
                             "flagged_ml": round(float(seg.sum()) * float(np.prod(spacing)) / 1e3, 3),
                             "dice_peak_fraction": round(dice(cut, truth_o), 4),
                             "flagged_ml_peak_fraction": round(float(cut.sum()) * float(np.prod(spacing)) / 1e3, 3)}
            rows.append(row)
            if map_c is not None:
                maps_c.append(map_c)
                truths.append(truth_o)
                spacings.append(spacing)
            print(json.dumps(row), f"({time.perf_counter() - start:.0f} s)", flush=True)

    summary = {name: {"dice_per_volume": round(float(np.mean([r[name]["dice"] for r in rows])), 4),
                      "dice_per_volume_peak_fraction": round(float(np.mean([r[name]["dice_peak_fraction"]
                                                                            for r in rows])), 4),
                      "regions_found": int(sum(r[name]["found"] for r in rows)),
                      "volumes_with_dice_0": int(sum(r[name]["dice"] == 0 for r in rows))}
               for name in rows[0] if isinstance(rows[0][name], dict)}
    summary["regions"] = int(sum(r["regions"] for r in rows))
    summary["card_threshold"] = threshold
    if maps_c:  # the perfect counterfactual at the threshold best for these volumes (a bound, chosen on them)
        best = (-1.0, 0.0)
        for thr in np.geomspace(0.005, max(threshold, 0.4), 40):
            d = float(np.mean([dice(postprocess(m, thr, s, args.min_size)[0], tr)
                               for m, tr, s in zip(maps_c, truths, spacings)]))
            best = max(best, (d, float(thr)))
        summary["perfect_best_threshold"] = {"dice_per_volume": round(best[0], 4), "threshold": round(best[1], 4)}
    print("summary:", json.dumps(summary), flush=True)
    if args.markdown:
        write_markdown(args.markdown, f"{card.name} {card.version}", threshold, rows, summary)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "model": f"{card.name} {card.version}", "threshold": threshold,
                       "setting": {"t": list(ts), "blur": k, "smooth_mm": smooth, "region": region, "stages": stages,
                                   "grow": grow, "level_maps": level_maps is not None},
                       "rows": rows, "summary": summary}, f, indent=1)


def write_markdown(path: str, model: str, threshold: float, rows: list, summary: dict) -> None:
    """The summary and the per-volume Dice as Markdown tables."""
    names = [n for n in rows[0] if isinstance(rows[0][n], dict)]
    pf = "outlined at half of each lesion's peak"
    lines = [f"# Where the held-out Dice is lost ({model}, card threshold {threshold:.4f})", "",
             "Made by `python scripts/oracle-ceiling.py` (see its docstring for what each counterfactual is).", "",
             f"| counterfactual | Dice / volume | Dice / volume, {pf} | lesion regions found (of {summary['regions']}) "
             "| volumes with Dice 0 (of 14) |", "|---|---|---|---|---|"]
    for n in names:
        v = summary[n]
        lines.append(f"| {n} | {v['dice_per_volume']:.3f} | {v['dice_per_volume_peak_fraction']:.3f} | "
                     f"{v['regions_found']} | {v['volumes_with_dice_0']} |")
    if "perfect_best_threshold" in summary:
        b = summary["perfect_best_threshold"]
        lines += ["", f"The perfect counterfactual at the threshold best for these volumes ({b['threshold']:.4f}, "
                  f"chosen on them): Dice / volume {b['dice_per_volume']:.3f}."]
    lines += ["", "Per volume: Dice at the card threshold (and mL flagged; the truth's mL in the second column).", "",
              "| volume | lesion mL | diameters (mm) | contrasts | " + " | ".join(names) + " |",
              "|---|---|---|---|" + "---|" * len(names)]
    for r in rows:
        lines.append(f"| {r['case']} | {r['lesion_ml']:.2f} | {', '.join(f'{d:g}' for d in r['diameters_mm'])} | "
                     f"{', '.join(f'{c:+.2f}' for c in r['contrasts'])} | "
                     + " | ".join(f"{r[n]['dice']:.2f} ({r[n]['flagged_ml']:.1f})" for n in names) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def sitk_array(image):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image)


if __name__ == "__main__":
    main()
