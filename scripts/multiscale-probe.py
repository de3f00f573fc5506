"""Probe: one anomaly map per noise level, each in units of its own healthy tail, combined by their maximum.

The shipped setting averages the healed images of t = 50, 100 and 200 and takes one map. Small lesions
stand out at low t and large or darker ones only at high t (Docs/experiments.md, *Why darker lesions are missed*), and
averaging the healed images mixes a level that heals a lesion with levels that do not. Here each level's
map is divided by a high quantile of that level's map on lesion-free tuning volumes (so every level is in
the same units: "how far past its healthy tail"), and the levels are combined voxel by voxel by their
maximum (or mean). Thresholds are calibrated on the lesion-free tuning volumes, as `synomaly tune` does.

Two data sets, both prepared exactly as `synomaly tune` and `synomaly evaluate` prepare them:
- tune: the tuning volume(s) in five forms with implanted lesions, and the same forms untouched;
- heldout (`--heldout`): the 28 held-out evaluation volumes of `synomaly evaluate --data implanted --cases 2
  --healthy-every 2 --val-cases 0` (14 with lesions, 14 lesion-free), scored with the scales and thresholds
  from the tuning volumes.

    python scripts/multiscale-probe.py --t 25 50 100 200 400 --heldout
    python scripts/multiscale-probe.py --t 50 100 200 400 --blur 5 --quantile 0.999 --self-quantile 0.9 0.99 --heldout
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="SynomalyDetect/Resources/Models/brain-mri-axial.safetensors")
    ap.add_argument("--data", nargs="+", default=["oasis"], help="healthy tuning volumes (synomaly tune --data)")
    ap.add_argument("--t", type=int, nargs="+", default=[25, 50, 100, 200, 400])
    ap.add_argument("--blur", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--smooth", type=float, default=4.0)
    ap.add_argument("--quantile", type=float, nargs="+", default=[0.999, 0.9999],
                    help="the healthy quantile each level's map is divided by")
    ap.add_argument("--self-quantile", type=float, nargs="*", default=[],
                    help="also: each level's map divided by this quantile of itself in the same scan (no calibration "
                         "scale), averaged over the levels")
    ap.add_argument("--fprs", type=float, nargs="+", default=[1e-4, 1e-5])
    ap.add_argument("--heldout", action="store_true", help="also score the held-out evaluation volumes")
    ap.add_argument("--top", type=int, default=3, help="held out: the best this many by tuning AUPRC and Dice")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()

    from synomaly.calibrate import quantile_threshold
    from synomaly.detect import postprocess, run_stages, scan_map
    from synomaly.metrics import dice, pixel_auprc
    from synomaly.modelio import load_model
    from synomaly.tune import TuneOptions, _prepare, build_cases, load_tune_volumes

    model = load_model(args.model, device="cpu")
    region = model.card.detection_for(True).region
    opts = TuneOptions(region=region)
    start = time.perf_counter()
    lesion_cases, healthy_cases = build_cases(load_tune_volumes(args.data), model.card, opts)
    sets = {"tune": (lesion_cases, healthy_cases)}
    if args.heldout:
        from synomaly.evaldata import implanted_data

        data = implanted_data(cases=2, val_cases=0, healthy_every=2)
        les, hea = [], []
        for c in data.test:
            image, truth = c.load()
            case = _prepare(image, truth if c.label else None, model.card, c.name, c.meta, region)
            (les if c.label else hea).append(case)
        sets["heldout"] = (les, hea)
    print(f"prepared in {time.perf_counter() - start:.0f} s: "
          + ", ".join(f"{k} {len(a)} lesion + {len(b)} lesion-free" for k, (a, b) in sets.items()), flush=True)

    healed: dict[tuple[str, int], list[torch.Tensor]] = {}
    for name, (les, hea) in sets.items():
        cases = les + hea
        x0 = torch.cat([c.prep.slices for c in cases])
        masks = torch.cat([c.prep.masks for c in cases])
        for t in args.t:
            s = time.perf_counter()
            h = run_stages(model, x0, masks, t=t, kernel=1, threshold=float("inf"), max_stages=1,
                           seed=7919 * t + 1).healed
            healed[(name, t)] = list(torch.split(h, [c.prep.slices.shape[0] for c in cases]))
            print(f"{name}: t = {t} in {time.perf_counter() - s:.0f} s", flush=True)

    def level_maps(name: str, ts, k: int) -> dict[int, list[np.ndarray]]:
        les, hea = sets[name]
        return {t: [scan_map(h, c.prep, k, args.smooth) for h, c in zip(healed[(name, t)], les + hea)] for t in ts}

    def mean_healed_maps(name: str, ts, k: int) -> list[np.ndarray]:
        les, hea = sets[name]
        return [scan_map(torch.stack([healed[(name, t)][i] for t in ts]).mean(0), c.prep, k, args.smooth)
                for i, c in enumerate(les + hea)]

    def score(name: str, maps: list[np.ndarray], thresholds: dict[float, float]) -> dict:
        les, hea = sets[name]
        lm, hm = maps[: len(les)], maps[len(les):]
        row = {"auprc": round(pixel_auprc(lm, [c.truth for c in les], [c.prep.foreground | c.truth for c in les],
                                          max_pixels=opts.max_pixels, seed=0), 4)}
        for fpr, thr in thresholds.items():
            d = [dice(postprocess(m, thr, c.spacing, opts.min_lesion_mm3)[0], c.truth) for m, c in zip(lm, les)]
            ml = [float(postprocess(m, thr, c.spacing, opts.min_lesion_mm3)[0].sum()) * float(np.prod(c.spacing)) / 1e3
                  for m, c in zip(hm, hea)]
            row[f"dice@{fpr:g}"] = round(float(np.mean(d)), 4)
            row[f"maxml@{fpr:g}"] = round(max(ml), 3)
        return row

    def healthy_values(name: str, maps: list[np.ndarray]) -> np.ndarray:
        les, hea = sets[name]
        return np.concatenate([m[c.prep.foreground] for m, c in zip(maps[len(les):], hea)])

    rows = []
    levels = sorted(args.t)
    combos = [tuple(levels[i:j]) for i in range(len(levels)) for j in range(i + 2, len(levels) + 1)]
    for k in args.blur:
        tune_levels = level_maps("tune", args.t, k)
        held_levels = level_maps("heldout", args.t, k) if args.heldout else None
        variants = []  # (label, tune maps, heldout maps)
        for ts in [(t,) for t in args.t] + [c for c in combos if len(c) == 3]:
            label = "mean-healed " + "+".join(map(str, ts))
            variants.append((label, (lambda ts=ts: mean_healed_maps("tune", ts, k)),
                             (lambda ts=ts: mean_healed_maps("heldout", ts, k))))
        for q in args.quantile:
            scale = {t: float(np.quantile(healthy_values("tune", tune_levels[t]), q)) for t in args.t}
            for ts in combos:
                for how in ("max", "mean"):
                    label = f"{how}-normalised q{q:g} " + "+".join(map(str, ts))

                    def combine(levels, ts=ts, how=how, scale=scale):
                        stack = [np.stack([levels[t][i] / scale[t] for t in ts]) for i in range(len(levels[ts[0]]))]
                        return [s.max(0) if how == "max" else s.mean(0) for s in stack]

                    variants.append((label, (lambda c=combine: c(tune_levels)),
                                     (lambda c=combine: c(held_levels))))
        for q in args.self_quantile:  # each level's map in units of its own tail in the same scan
            for ts in [(t,) for t in args.t] + combos:
                label = f"mean-self q{q:g} " + "+".join(map(str, ts))

                def selfnorm(levels, name, ts=ts, q=q):
                    les, hea = sets[name]
                    out = []
                    for i, c in enumerate(les + hea):
                        parts = [levels[t][i] / max(float(np.quantile(levels[t][i][c.prep.foreground], q)), 1e-6)
                                 for t in ts]
                        out.append(np.mean(parts, axis=0).astype(np.float32))
                    return out

                variants.append((label, (lambda f=selfnorm: f(tune_levels, "tune")),
                                 (lambda f=selfnorm: f(held_levels, "heldout"))))
        scored = []
        for label, tune_fn, held_fn in variants:
            tmaps = tune_fn()
            hv = healthy_values("tune", tmaps)
            thresholds = {fpr: quantile_threshold(torch.from_numpy(hv), fpr) for fpr in args.fprs}
            row = {"setting": label, "blur": k, "thresholds": thresholds, "tune": score("tune", tmaps, thresholds)}
            del tmaps, hv
            scored.append((row, held_fn))
            print(json.dumps(row), flush=True)
        # held out: only what the tuning volumes would choose (best AUPRC, best Dice within 1 mL) and the
        # shipped-like baseline, so the held-out volumes judge a choice instead of making it
        strict = f"{min(args.fprs):g}"
        by_auprc = sorted(scored, key=lambda r: -r[0]["tune"]["auprc"])[: args.top]
        ok = [r for r in scored if r[0]["tune"][f"maxml@{strict}"] <= 1.0]
        by_dice = sorted(ok, key=lambda r: -r[0]["tune"][f"dice@{strict}"])[: args.top]
        base = [r for r in scored if r[0]["setting"] == "mean-healed 50+100+200"]
        for row, held_fn in scored:
            if args.heldout and any(row is r[0] for r in by_auprc + by_dice + base):
                row["heldout"] = score("heldout", held_fn(), row["thresholds"])
                print("held out:", json.dumps(row), flush=True)
            rows.append(row)
        del tune_levels, held_levels, scored, variants
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
