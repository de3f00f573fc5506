"""The report of `synomaly evaluate`: the paper's claims as paired differences, Markdown, CSV, JSON and
pictures, written atomically."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import OutputError
from .evaldata import EvalData
from .evalruns import EvalSettings, MethodResult
from .evalstats import (HIST_BINS, IMAGE_SCORE, METRICS, hist_auprc, hist_auroc, hist_curves, paired_difference,
                        reported_metrics)


CAVEAT = ("These are not BraTS numbers: the data are what can be had on this machine (see Data), the models "
          "are ours, and nothing here is comparable with the paper's tables except in direction.")
COMPARISONS = (  # (A, B, what a positive A - B supports)
    ("synomaly-multi", "gaussian-multi", "Synomaly noise beats Gaussian noise (multi-stage)"),
    ("synomaly-single", "gaussian-single", "Synomaly noise beats Gaussian noise (single stage)"),
    ("synomaly-multi", "synomaly-single", "multi-stage beats single stage (Synomaly noise)"),
    ("gaussian-multi", "gaussian-single", "multi-stage beats single stage (Gaussian noise)"),
    ("synomaly-multi", "dae", "Synomaly multi-stage beats the coarse-noise denoising autoencoder"),
)


def _paired(ra: MethodResult, rb: MethodResult, key: str, s: EvalSettings) -> tuple[float, float, float, int]:
    """A - B for one metric with its paired bootstrap interval, and which side of 0 the interval lies on (+1 above,
    -1 below, 0 it includes 0)."""
    est, lo, hi = paired_difference(ra.run, rb.run, key, ra.threshold.get("image_threshold", math.nan),
                                    rb.threshold.get("image_threshold", math.nan), s.bootstrap, s.seed)
    side = 1 if (np.isfinite(lo) and lo > 0) else -1 if (np.isfinite(hi) and hi < 0) else 0
    return est, lo, hi, side


def comparisons(results: Sequence[MethodResult], data: EvalData, s: EvalSettings) -> list[dict[str, Any]]:
    """The paper's claims as paired differences between methods present in this run."""
    by_name = {r.method.name: r for r in results}
    keys = ["dice_image", "pixel_auprc"] if data.pixel_level else []
    keys += ["image_auroc"]
    rows = []
    for a, b, claim in COMPARISONS:
        if a not in by_name or b not in by_name:
            continue
        ra, rb = by_name[a], by_name[b]
        for key in keys:
            est, lo, hi, side = _paired(ra, rb, key, s)
            if not np.isfinite(est):
                continue
            verdict = {1: "supports the claim", -1: "contradicts the claim",
                       0: "inconclusive (interval includes 0)"}[side]
            rows.append({"a": a, "b": b, "claim": claim, "metric": key, "difference": est, "low": lo, "high": hi,
                         "verdict": verdict})
    return rows


#: What a paired comparison with the baseline reports, when the data define it (pixel metrics need pixel truth,
#: lesion-free volume metrics need 3D lesion-free volumes).
BASELINE_METRICS = ("dice_volume", "dice_image", "pixel_auprc", "pixel_auprc_volume", "healthy_ml_volume",
                    "healthy_ml_max", "image_auroc")


def baseline_comparisons(results: Sequence[MethodResult], data: EvalData, s: EvalSettings) -> list[dict[str, Any]]:
    """Every method against the baseline method (s.baseline) on the same test units: the difference of each
    metric with a paired bootstrap interval (units resampled together for both methods, within their label),
    narrower than comparing two unpaired intervals. Empty without a baseline."""
    if not s.baseline:
        return []
    by_name = {r.method.name: r for r in results}
    base = by_name[s.baseline]
    keys = [k for k in BASELINE_METRICS if k in base.metrics and np.isfinite(base.metrics[k]["estimate"])]
    rows = []
    for r in results:
        if r is base:
            continue
        for key in keys:
            if not np.isfinite(r.metrics.get(key, {}).get("estimate", math.nan)):
                continue
            est, lo, hi, side = _paired(r, base, key, s)
            reading = {1: "higher", -1: "lower", 0: "no clear difference (interval includes 0)"}[side]
            rows.append({"method": r.method.name, "baseline": base.method.name, "metric": key, "difference": est,
                         "low": lo, "high": hi, "reading": reading})
    return rows


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _csv(v: Any) -> Any:
    """A CSV cell: empty for None/nan, 6 significant digits for floats."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.6g}"
    return v


def ci_text(m: dict[str, float], digits: int = 3) -> str:
    """An estimate with its bootstrap interval, '0.812 [0.790, 0.834]', or 'n/a'."""
    if not np.isfinite(m.get("estimate", math.nan)):
        return "n/a"
    text = f"{m['estimate']:.{digits}f}"
    if np.isfinite(m.get("low", math.nan)):
        text += f" [{m['low']:.{digits}f}, {m['high']:.{digits}f}]"
    return text


def _curves(results: Sequence[MethodResult], data: EvalData) -> tuple[np.ndarray, np.ndarray]:
    """ROC and PR pictures: pixel-level (pooled, when there is pixel truth) and image-level panels."""
    from .evalplots import curve_panel, side_by_side
    from . import metrics
    from .metrics import precision_recall_curve, roc_curve

    roc_panels, pr_panels = [], []
    if data.pixel_level:
        rocs, prs, prevalence = [], [], math.nan
        for r in results:
            hp = sum(u.hist_pos for u in r.run.units.values())
            hn = sum(u.hist_neg for u in r.run.units.values())
            if hp.sum() == 0 or hn.sum() == 0:
                continue
            fpr, tpr, rec, prec = hist_curves(hp, hn)
            rocs.append((f"{r.method.name} (AUROC {hist_auroc(hp, hn):.3f})", fpr, tpr))
            prs.append((f"{r.method.name} (AUPRC {hist_auprc(hp, hn):.3f})", rec, prec))
            prevalence = hp.sum() / (hp.sum() + hn.sum())
        roc_panels.append(curve_panel(rocs, "Pixel level (foreground pixels pooled)", "false-positive rate",
                                      "true-positive rate", diagonal=True))
        pr_panels.append(curve_panel(prs, "Pixel level (foreground pixels pooled)", "recall", "precision",
                                     baseline=prevalence))
    rocs, prs, prevalence = [], [], math.nan
    for r in results:
        s = np.array([x["image_score"] for x in r.run.items], np.float64)
        y = np.array([x["label"] for x in r.run.items], bool)
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(s, y)
        prec, rec, _ = precision_recall_curve(s, y)
        roc_area, pr_area = metrics.auroc(s, y), metrics.auprc(s, y)
        rocs.append((f"{r.method.name} (AUROC {roc_area:.3f})", fpr, tpr))
        prs.append((f"{r.method.name} (AUPRC {pr_area:.3f})", np.concatenate([[0.0], rec]),
                    np.concatenate([[prec[0]], prec])))
        prevalence = y.mean()
    roc_panels.append(curve_panel(rocs, "Image level (99th-percentile score)", "false-positive rate",
                                  "true-positive rate", diagonal=True))
    pr_panels.append(curve_panel(prs, "Image level (99th-percentile score)", "recall", "precision",
                                 baseline=prevalence))
    return side_by_side(roc_panels), side_by_side(pr_panels)


def _markdown(results: Sequence[MethodResult], data: EvalData, s: EvalSettings, command: str,
              comps: list[dict[str, Any]], device: str) -> str:
    from .contract import __version__

    keys = reported_metrics(data)
    lines = [f"# Synomaly evaluation on `{data.kind}` data", "",
             f"Made by: `{command}`  ",
             f"synomaly {__version__}, {time.strftime('%Y-%m-%d %H:%M')}, device {device}, seed {s.seed}, "
             f"{s.bootstrap} bootstrap resamples.", "",
             f"> **Caveat.** {CAVEAT}", "", "## Data", "", *data.description, "",
             "## Methods and thresholds", "",
             "The same data, post-processing (Gaussian blur of the map, threshold, connected components smaller "
             f"than {s.min_size:g} mm³ removed; mm² for 2D images) and rules for every method.", ""]
    if s.threshold_from == "card":
        lines.append("**Threshold source: each model card's calibration** (healthy scans only); the test split "
                     "is never used to choose a threshold.")
    else:
        lines.append("**Threshold source: the validation split** (rule per method below); the test split is never "
                     "used to choose a threshold.")
    lines += ["", "| method | model file | card name | noise | stages (max) | t | blur k | threshold | threshold "
              "source | image threshold |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        thr = r.threshold
        lines.append(f"| {r.method.name} | `{r.method.model}` | {r.card['name']} | {r.card['noise']} | {r.stages} | "
                     f"{'n/a (no diffusion)' if r.card['noise'] == 'coarse' else r.t} | {r.blur} | "
                     f"{_fmt(thr['threshold'], 4)} | {thr['source']}"
                     + (f"; validation Dice {_fmt(thr['val_dice'])}"
                        if np.isfinite(thr.get("val_dice", math.nan)) else "")
                     + f" | {_fmt(thr.get('image_threshold', math.nan), 4)} |")
    skipped = sorted({c for r in results for c in r.run.skipped})
    if skipped:
        lines += ["", f"Skipped test cases ({len(skipped)}; the engine refused them, for every method alike): "
                  + "; ".join(skipped[:20]) + (" ..." if len(skipped) > 20 else "")]
    lines += ["", "## Results on the test split", "",
              "Estimate [95 % bootstrap interval]; cases are resampled by patient/volume "
              f"({len(results[0].run.units) if results else 0} units), within their label.", ""]
    groups = [("Pixel level", [k for k in keys if METRICS[k][0] == "pixel"]),
              ("Image level, healthy images and runtime", [k for k in keys if METRICS[k][0] != "pixel"])]
    for title, gkeys in groups:
        if not gkeys:
            continue
        lines += [f"### {title}", "", "| method | " + " | ".join(METRICS[k][1] for k in gkeys) + " |",
                  "|---|" + "---|" * len(gkeys)]
        for r in results:
            lines.append(f"| {r.method.name} | " + " | ".join(ci_text(r.metrics[k], 4 if k == 'healthy_fp_fraction' else 3)
                                                            for k in gkeys) + " |")
        lines.append("")
    lines += ["## The paper's claims, tested", ""]
    if comps:
        lines += ["Paired bootstrap over the same test units: difference A - B, a positive value favours A.", "",
                  "| claim | A | B | metric | A - B [95 % interval] | verdict |", "|---|---|---|---|---|---|"]
        for c in comps:
            lines.append(f"| {c['claim']} | {c['a']} | {c['b']} | {c['metric']} | "
                         f"{c['difference']:+.3f} [{_fmt(c['low'])}, {_fmt(c['high'])}] | {c['verdict']} |")
        lines.append("")
        lines.append("If a verdict contradicts the paper, that is the finding: thresholds were not tuned on test "
                     "data, and reserved Br35H images (numbers >= 1050) were never read.")
    else:
        lines.append("Not tested: this run lacks the pairs of methods (synomaly-multi, gaussian-multi, "
                     "synomaly-single, gaussian-single, dae) the claims compare.")
    if s.baseline:
        lines += ["", f"## Against the baseline `{s.baseline}`", ""]
        rows = baseline_comparisons(results, data, s)
        if rows:
            lines += ["Paired bootstrap over the same test units (resampled together for both methods, within their "
                      "label): method - baseline. For the mL metrics lower is better, for the others higher.", "",
                      "| method | metric | method - baseline [95 % interval] | reading |", "|---|---|---|---|"]
            for c in rows:
                lines.append(f"| {c['method']} | {METRICS[c['metric']][1]} | {c['difference']:+.3f} "
                             f"[{_fmt(c['low'])}, {_fmt(c['high'])}] | {c['reading']} |")
        else:
            lines.append("No other method to compare with the baseline.")
    lines += ["", "## Definitions", ""]
    lines += [f"- **{METRICS[k][1]}** (`{k}`): {METRICS[k][2]}." for k in keys]
    lines += [f"- Image score: {IMAGE_SCORE}; the foreground is the engine's (`prepare.foreground_mask` on the "
              "axial input); pixel metrics count foreground pixels plus any truth pixel outside it.",
              "- Pooled pixel AUROC/AUPRC (and their curves) bin the map values into "
              f"{HIST_BINS} bins on a square-root scale over [0, 2] (bin width below 2.5e-4 up to a map value of 0.1; "
              "maps normalised per tissue class, in units of their tissue's spread: over [0, 64]); "
              "per-image and per-volume values are exact.",
              "- Volumes: slices of one volume are pooled for per-volume numbers; per-image numbers count each 2D "
              "image or each slice of a volume (slices with the engine's minimum foreground).",
              "- Multi-stage maps depend on the threshold (it drives the fusion): a single-stage validation pass "
              f"proposes a threshold, then up to {s.val_passes} multi-stage passes each run with the current proposal "
              "and propose the next; the Dice rule keeps the proposal whose own pass scored best, the FPR rule the "
              "smallest proposal whose own pass met the FPR (else the largest tried).",
              "- Runtime depends on the machine and on what else it was running; compare methods within one run.",
              "", "## Figures", "", "![ROC curves](roc.png)", "", "![Precision-recall curves](pr.png)", "",
              "![Best and worst cases per method](gallery.png)", "",
              "## Files", "",
              "- `results.csv`: one row per method and metric (estimate, interval, units).",
              "- `per_case.csv`: one row per method and test image (level `image`) or volume (level `volume`).",
              "- `evaluation.json`: settings, thresholds, data description, comparisons.", ""]
    return "\n".join(lines)


def write_report(results: Sequence[MethodResult], data: EvalData, s: EvalSettings, out: str | Path, command: str,
                 overwrite: bool = False, device: str = "") -> dict[str, str]:
    """report.md, results.csv, per_case.csv, evaluation.json, roc.png, pr.png, gallery.png, written atomically."""
    import imageio.v3 as iio

    from .evalplots import gallery

    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists; choose another folder or pass --overwrite")
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    from .outputs import temp_folder

    tmp = temp_folder(parent, out.name)
    comps = comparisons(results, data, s)
    keys = reported_metrics(data)
    try:
        with open(tmp / "results.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["method", "metric", "level", "estimate", "ci_low", "ci_high", "n_units", "threshold",
                        "threshold_source", "definition"])
            for r in results:
                for k in keys:
                    m = r.metrics[k]
                    w.writerow([r.method.name, k, METRICS[k][0], _csv(m["estimate"]), _csv(m["low"]),
                                _csv(m["high"]), m["n_units"], _csv(r.threshold["threshold"]),
                                r.threshold["source"], METRICS[k][2]])
        cols = ["method", "level", "case", "unit", "volume", "slice", "label", "image_score", "dice", "pixel_auroc",
                "pixel_auprc", "truth_pixels", "pred_pixels", "healthy_fp_fraction", "seconds"]
        with open(tmp / "per_case.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in results:
                for row in r.run.items:
                    w.writerow({**{k: _csv(v) for k, v in row.items()}, "method": r.method.name, "level": "image"})
                for row in (r.run.volumes if data.pixel_level else []):
                    w.writerow({**{k: _csv(v) for k, v in row.items()}, "method": r.method.name, "level": "volume",
                                "case": row["volume"]})
        roc, pr = _curves(results, data)
        iio.imwrite(tmp / "roc.png", roc)
        iio.imwrite(tmp / "pr.png", pr)
        iio.imwrite(tmp / "gallery.png", gallery([(r.method.name, r.run.gallery.sections(r.method.name))
                                                  for r in results]))
        (tmp / "report.md").write_text(_markdown(results, data, s, command, comps, device), encoding="utf-8")
        summary = {
            "command": command, "settings": asdict(s), "data": {"kind": data.kind, "description": data.description,
                                                                 "pixel_level": data.pixel_level, **data.info},
            "methods": [{"name": r.method.name, "model": r.method.model, "stages": r.stages, "t": r.t,
                         "blur_kernel": r.blur, "card": r.card, "threshold": r.threshold, "metrics": r.metrics,
                         "seconds_total": round(r.seconds, 2)} for r in results],
            "comparisons": comps, "baseline_comparisons": baseline_comparisons(results, data, s),
            "caveat": CAVEAT, "image_score": IMAGE_SCORE,
        }
        (tmp / "evaluation.json").write_text(json.dumps(finite(summary), indent=1, default=_json_default,
                                                        allow_nan=False), encoding="utf-8")
        if out.exists():
            old = parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    names = ["report.md", "results.csv", "per_case.csv", "evaluation.json", "roc.png", "pr.png", "gallery.png"]
    return {n: str(out / n) for n in names}


def finite(v: Any) -> Any:
    """Plain data with nan/inf floats replaced by None (strict JSON)."""
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return float(v) if np.isfinite(v) else None
    return v


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    return str(v)
