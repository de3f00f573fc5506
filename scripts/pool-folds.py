"""Pool the per-volume results of several `synomaly evaluate --data implanted` runs on disjoint test volumes (the
folds of a leave-one-head-out experiment) into one table, with paired bootstrap intervals against a baseline.

Each run must hold the same method names. Per volume, from `per_case.csv` (level "volume") and the run's
`evaluation.json` (voxel spacing of each test case): Dice and pixel AUPRC for volumes with a lesion, mL flagged
for lesion-free ones. The bootstrap resamples volumes within their label (lesion / lesion-free), as
`synomaly evaluate` does. Pooled pixel AUPRC needs the maps, which the runs do not keep: take it per run from
their reports.

    python scripts/pool-folds.py runs/loho/eval-ch2 runs/loho/eval-robex runs/loho/eval-itk-t1 --baseline oasis-only
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np


def read_run(folder: Path) -> dict[str, dict[str, dict]]:
    """{method: {volume: {"label", "dice", "auprc", "ml"}}} of one evaluation run."""
    summary = json.loads((folder / "evaluation.json").read_text())
    voxel_ml = {f"{c['template']}-{c['form']}-{c['split']}-{c['index']:03d}": float(np.prod(c["spacing_mm"])) / 1000
                for c in summary["data"]["test_cases"]}
    out: dict[str, dict[str, dict]] = {}
    with open(folder / "per_case.csv", newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            if r["level"] != "volume":
                continue
            num = (lambda k: float(r[k]) if r[k] not in ("", "nan") else math.nan)
            out.setdefault(r["method"], {})[r["volume"]] = {
                "label": int(r["label"]), "dice": num("dice"), "auprc": num("pixel_auprc"),
                "ml": float(r["pred_pixels"]) * voxel_ml[r["volume"]]}
    return out


def metrics(rows: list[dict]) -> dict[str, float]:
    lesion = [r for r in rows if r["label"] == 1]
    free = [r for r in rows if r["label"] == 0]
    if not lesion or not free:
        raise SystemExit("pooling needs volumes with and without lesions (evaluate with --healthy-every 2 or 3)")
    return {"Dice / volume": float(np.mean([r["dice"] for r in lesion])),
            "AUPRC / volume": float(np.nanmean([r["auprc"] for r in lesion])),
            "mL per lesion-free volume": float(np.mean([r["ml"] for r in free])),
            "max mL lesion-free": float(max(r["ml"] for r in free)),
            "lesion-free volumes over 1 mL": float(sum(r["ml"] > 1.0 for r in free))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    pooled: dict[str, dict[str, dict]] = {}
    for folder in args.runs:
        for method, vols in read_run(folder).items():
            seen = set(pooled.get(method, {})) & set(vols)
            if seen:
                raise SystemExit(f"{folder}: volume(s) {sorted(seen)} already come from another run")
            pooled.setdefault(method, {}).update(vols)
    methods = list(pooled)
    if args.baseline not in methods:
        raise SystemExit(f"--baseline {args.baseline!r} is not among the methods {methods}")
    volumes = sorted(pooled[args.baseline])
    for m in methods:
        if sorted(pooled[m]) != volumes:
            raise SystemExit(f"method {m} was not run on the same volumes as {args.baseline}")
    labels = np.array([pooled[args.baseline][v]["label"] for v in volumes])
    groups = [np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)]
    rng = np.random.default_rng(args.seed)
    draws = [np.concatenate([rng.choice(g, size=g.size) for g in groups]) for _ in range(args.bootstrap)]

    def table(m: str) -> list[dict]:
        return [pooled[m][v] for v in volumes]

    # every method's metrics on the whole set and on each resample, computed once: the same draws serve the
    # intervals and the paired differences
    est = {m: metrics(table(m)) for m in methods}
    boot = {m: [metrics([table(m)[i] for i in d]) for d in draws] for m in methods}
    names = list(est[args.baseline])
    interval = names[:4]  # the count of volumes over 1 mL is reported as it is
    print(f"{len(args.runs)} runs, {int(labels.sum())} volumes with lesions, {int((labels == 0).sum())} lesion-free; "
          f"{args.bootstrap} bootstrap resamples by volume within label, seed {args.seed}\n")
    print("| method | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for m in methods:
        cells = []
        for k in names:
            lo, hi = np.percentile([b[k] for b in boot[m]], [2.5, 97.5])
            cells.append(f"{est[m][k]:.3f} [{lo:.3f}, {hi:.3f}]" if k in interval else f"{est[m][k]:.0f}")
        print(f"| {m} | " + " | ".join(cells) + " |")
    print(f"\nPaired differences from {args.baseline} (method - baseline, 95 % paired bootstrap interval):\n")
    for m in methods:
        if m == args.baseline:
            continue
        diffs = []
        for k in interval:
            lo, hi = np.percentile([b[k] - a[k] for b, a in zip(boot[m], boot[args.baseline])], [2.5, 97.5])
            diffs.append(f"{k} {est[m][k] - est[args.baseline][k]:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        print(f"- {m}: " + "; ".join(diffs))


if __name__ == "__main__":
    main()
