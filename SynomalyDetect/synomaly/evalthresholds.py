"""How `synomaly evaluate` chooses a method's thresholds: on the validation split (maximum pooled Dice, or a
per-pixel false-positive rate) or from the model card; never on the test split."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from . import evalruns  # run_cases through the module: a test watches every run
from .errors import InputError
from .evaldata import EvalCase
from .evalruns import EvalSettings, Method
from .progress import ProgressFn, null_progress


def _pooled_dice(store: list[dict[str, Any]], threshold: float, min_mm3: float) -> float:
    """Dice of all validation pixels together at a threshold, after the engine's post-processing."""
    from .detect import postprocess

    inter = pred = truth = 0
    for e in store:
        if e["truth"] is None:
            continue
        binary, _ = postprocess(e["score"], threshold, e["spacing"], min_mm3)
        inter += int((binary & e["truth"]).sum())
        pred += int(binary.sum())
        truth += int(e["truth"].sum())
    return 2.0 * inter / (pred + truth) if pred + truth else 1.0


def threshold_max_dice(store: list[dict[str, Any]], min_mm3: float) -> tuple[float, float]:
    """The threshold (and its Dice) maximising pooled validation Dice: 48 quantiles of the validation map,
    then 16 steps between the best one's neighbours."""
    values = np.concatenate([e["score"][e["fg"] | e["truth"]] for e in store if e["truth"] is not None])
    if values.size == 0:
        raise InputError("the validation split has no foreground pixels with known truth")
    levels = 1.0 - np.geomspace(0.5, 1e-5, 48)
    cands = np.unique(np.quantile(values, levels))
    scores = [_pooled_dice(store, c, min_mm3) for c in cands]
    i = int(np.argmax(scores))
    lo, hi = cands[max(0, i - 1)], cands[min(len(cands) - 1, i + 1)]
    fine = np.linspace(lo, hi, 18)[1:-1]
    fine_scores = [_pooled_dice(store, c, min_mm3) for c in fine]
    all_c = np.concatenate([cands, fine])
    all_s = np.concatenate([scores, fine_scores])
    j = int(np.argmax(all_s))
    return float(all_c[j]), float(all_s[j])


def threshold_at_pixel_fpr(store: list[dict[str, Any]], fpr: float) -> float:
    """The threshold flagging at most `fpr` of the validation foreground pixels known to be healthy."""
    from .metrics import threshold_at_fpr

    negatives = [e["score"][e["fg"] & ~e["truth"]] for e in store if e["truth"] is not None]
    if not negatives or sum(v.size for v in negatives) == 0:
        raise InputError("the validation split has no pixels known to be healthy to set a threshold on")
    return threshold_at_fpr(negatives, fpr)


def image_threshold(items: list[dict[str, Any]], fpr: float) -> tuple[float, str]:
    """Image-score threshold from validation items: maximum balanced accuracy, or a healthy FPR when the
    validation split has only healthy images."""
    from .metrics import roc_curve, threshold_at_fpr

    scores = np.array([r["image_score"] for r in items], dtype=np.float64)
    labels = np.array([r["label"] for r in items], dtype=bool)
    if labels.all() or scores.size == 0:
        return math.nan, "no healthy validation image"
    if not labels.any():
        return threshold_at_fpr(scores, fpr), f"healthy validation images at image FPR {fpr:g}"
    fpr_c, tpr_c, thr = roc_curve(scores, labels)
    j = int(np.argmax(tpr_c - fpr_c))
    return float(thr[j]), "maximum balanced accuracy on the validation images"


def choose_threshold(model, method: Method, stages: int, val_cases: Sequence[EvalCase], s: EvalSettings,
                     progress: ProgressFn = null_progress, volume: bool = False) -> dict[str, Any]:
    """The pixel threshold of a method and where it came from; validation or card, never the test split.

    Validation: 'dice' maximises pooled Dice (after post-processing) on the validation images; 'fpr'
    takes the threshold at a per-pixel false-positive rate on validation pixels known to be healthy.
    A multi-stage map depends on its threshold (fusion): a single-stage pass proposes a threshold, each
    of up to `val_passes` multi-stage passes runs with the current proposal and proposes the next (stopping
    within 2 %). 'dice' then uses the proposal whose own pass gave the best Dice, 'fpr' the smallest
    proposal whose own pass met the FPR (else the largest one tried): the chosen threshold was measured
    while driving the fusion.
    """
    from .detect import DetectionSettings, resolve_pairing, resolve_settings

    card = model.card
    info: dict[str, Any] = {"val_images": len(val_cases)}
    if s.threshold_from == "card":
        asked = DetectionSettings(t=s.t, blur_kernel=s.blur, max_stages=stages, fpr=s.card_fpr, smooth_mm=s.smooth,
                                  region=s.region)
        pairing = resolve_pairing(asked, model, volume, [])  # as detection itself resolves it (detect.detect)
        if pairing is not None:
            thr, source = pairing.threshold, pairing.source
        else:
            _, _, _, thr, source = resolve_settings(asked, card, volume)
        info.update(threshold=thr, source=f"model card: {source}", rule="card")
        cal = card.calibration_for(volume) or {}
        if cal.get("max_stages") is not None and int(cal["max_stages"]) != stages and "calibrated" in source:
            info["source"] += f" (calibrated with {cal['max_stages']} stages, used with {stages})"
        if val_cases:
            out = evalruns.run_cases(model, val_cases, stages, thr, s, progress=progress, what=f"{method.name} val")
            info["image_threshold"], info["image_threshold_rule"] = image_threshold(out.items, s.image_fpr)
        return info
    if not val_cases:
        raise InputError("the data have no validation split to choose thresholds on; use --threshold-from card")
    out = evalruns.run_cases(model, val_cases, 1, card.detection.threshold, s, keep_maps=True, progress=progress,
                    what=f"{method.name} val pass 1")
    has_anomaly = any(e["truth"] is not None and e["truth"].any() for e in out.store)
    rule = s.val_rule if s.val_rule != "auto" else ("dice" if has_anomaly else "fpr")
    if rule == "dice" and not has_anomaly:
        raise InputError("--val-rule dice needs validation images with anomaly masks; use --val-rule fpr")

    def pick(store) -> float:
        if rule == "dice":
            return threshold_max_dice(store, s.min_size)[0]
        return threshold_at_pixel_fpr(store, s.target_fpr)

    def own_dice(store, thr: float) -> float:
        return _pooled_dice(store, thr, s.min_size) if has_anomaly else math.nan

    def own_fpr(store, thr: float) -> float:
        neg = [e["score"][e["fg"] & ~e["truth"]] for e in store if e["truth"] is not None]
        n = sum(v.size for v in neg)
        return sum(int((v >= thr).sum()) for v in neg) / n if n else math.nan

    proposal = pick(out.store)
    # (threshold driving the fusion, its own validation Dice, its own healthy-pixel FPR, the pass's items);
    # a single-stage map does not depend on the threshold, so one pass measures it exactly
    measured = []
    if stages == 1:
        measured.append((proposal, own_dice(out.store, proposal), own_fpr(out.store, proposal), out.items))
    if stages > 1:
        for p in range(max(1, s.val_passes)):
            out = evalruns.run_cases(model, val_cases, stages, proposal, s, keep_maps=True, progress=progress,
                            what=f"{method.name} val pass {p + 2}")
            measured.append((proposal, own_dice(out.store, proposal), own_fpr(out.store, proposal), out.items))
            new = pick(out.store)
            done = abs(new - proposal) <= 0.02 * max(abs(proposal), 1e-9)
            proposal = new
            if done:
                break
    if rule == "dice":
        # the best threshold whose Dice was measured with that same threshold driving the stage fusion
        thr, val_dice, val_fpr, items = max(measured, key=lambda m: (m[1], -m[0]))
        how = "maximum pooled Dice (after post-processing)"
    else:
        # the most sensitive measured threshold that meets the FPR with itself driving the fusion
        ok = [m for m in measured if m[2] <= s.target_fpr * (1 + 1e-9)]
        if ok:
            thr, val_dice, val_fpr, items = min(ok, key=lambda m: m[0])
        else:
            last = max(measured, key=lambda m: m[0])
            thr, val_dice, val_fpr, items = max(proposal, last[0]), math.nan, math.nan, last[3]
        how = f"per-pixel FPR {s.target_fpr:g} on validation pixels known to be healthy"
    tried = [m[0] for m in measured]
    if stages > 1:
        how += "; multi-stage fusion thresholds tried " + ", ".join(
            f"{m[0]:.4g} (" + (f"Dice {m[1]:.3f}" if rule == "dice" else f"FPR {m[2]:.2g}") + ")" for m in measured)
    info.update(threshold=float(thr), rule=rule, val_dice=val_dice, val_fpr=val_fpr, tried=tried,
                source=f"validation split ({len(val_cases)} images/volumes): {how}")
    info["image_threshold"], info["image_threshold_rule"] = image_threshold(items, s.image_fpr)
    return info
