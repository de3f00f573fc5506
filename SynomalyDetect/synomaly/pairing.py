"""Two models' volume maps averaged: `synomaly pair` calibrates the pair and writes it into the first model's card.

Each model heals a volume at its own tuned volume setting (card.detection_3d); each map is divided by its own
0.9 quantile inside the scan's scored region, so that neither model's units dominate; the two are averaged
(detect.paired_map). The pair's thresholds are calibrated here on the lesion-free forms of the tuning volumes
(the data of `synomaly tune`), and the rate used by default is picked on the same volumes with implanted lesions:
the best mean Dice with every lesion-free form at most `max_healthy_ml` flagged. Docs/experiments.md, *Two grids
averaged*, has why (the shipped pair: 0.3.0 at 64 x 64 with the 128 x 128 fine-tune) and what it measured.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .card import PAIR_COMBINES, fpr_key
from .detect import SCAN_LEVEL_QUANTILE, paired_map, scan_map
from .errors import InputError
from .progress import ProgressFn, null_progress

log = logging.getLogger(__name__)

#: the per-voxel false-positive rates the pair is calibrated at
PAIR_FPRS = (1e-2, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
#: the default bound on what a lesion-free tuning form may show at the picked rate: a margin, since held-out
#: scans flagged 3.6 to 6.4 times what the tuning forms did (Docs/experiments.md, *Two grids averaged*)
PAIR_MAX_HEALTHY_ML = 0.2


def check_pairable(model) -> None:
    """Refuse a model whose volume setting the pair's calibration would not reproduce."""
    d = model.card.detection_3d
    if d is None:
        raise InputError(f"{model.card.name!r} has no tuned volume setting: run `synomaly tune` on it first")
    unsupported = [name for name, on in (("more than one stage", d.max_stages > 1), ("noise draws", d.noise_draws > 1),
                                         ("a signed map", d.signed_map), ("tissue classes", d.tissue_bins > 0),
                                         ("a mirror map", d.mirror_mm > 0), ("maps per noise level", d.level_maps))
                   if on]
    if unsupported:
        raise InputError(f"{model.card.name!r}'s volume setting uses {', '.join(unsupported)}, which pairing does "
                         "not calibrate; tune it with one stage and a plain map")


def tuning_maps(model, lesion, healthy, seed: int, progress: ProgressFn = null_progress) -> list[np.ndarray]:
    """The model's oriented map of each case (lesion cases first, then the lesion-free ones; each list healed as
    one batch) at its tuned volume setting (setting_maps)."""
    return [m for cases in (lesion, healthy) for m in setting_maps(model, [c.prep for c in cases], seed, progress)]


def setting_maps(model, preps, seed: int, progress: ProgressFn = null_progress) -> list[np.ndarray]:
    """The model's oriented map of each prepared scan at its tuned volume setting: one stage, the healed images
    of its noise levels averaged (as `synomaly tune` scores a setting), the scans' slices healed as one batch."""
    from .tune import single_stage

    d = model.card.detection_3d
    x0 = torch.cat([p.slices for p in preps])
    masks = torch.cat([p.masks for p in preps])
    healed = []
    for i, t in enumerate(d.noise_levels()):
        progress("pair", i, len(d.noise_levels()), f"{model.card.name}: healing at t {t}")
        healed.append(single_stage(model, x0, masks, t, 1, seed))
    parts = torch.split(torch.stack(healed).mean(0), [p.slices.shape[0] for p in preps])
    return [scan_map(h, p, d.blur_kernel, d.smooth_mm) for h, p in zip(parts, preps)]


def operating_points(maps: Sequence[np.ndarray], lesion, healthy, fprs: Sequence[float] = PAIR_FPRS,
                     min_mm3: float = 50.0, outlines: bool = False,
                     peak_fractions: Sequence[float] = (0.5,)) -> list[dict[str, Any]]:
    """The averaged maps' operating points (lesion cases' maps first, then the lesion-free cases'): per FPR the
    threshold at that per-voxel rate over the lesion-free forms' scored voxels, scored as `synomaly tune` scores a
    single model's (tune.score_points: mean Dice, lesions found, mL flagged in each lesion-free form, lesions under
    `min_mm3` dropped); with `outlines`, also each rate grown into every looser one and outlined at
    `peak_fractions` of each lesion's peak. Rates are keyed as the card stores them (card.fpr_key); each threshold
    is the project's one rule (metrics.threshold_at_fpr), as single models are calibrated."""
    from .metrics import threshold_at_fpr
    from .tune import score_points

    n = len(lesion)
    values = np.concatenate([m[c.prep.foreground] for m, c in zip(maps[n:], healthy)])
    thresholds = {fpr_key(fpr): threshold_at_fpr(values, fpr) for fpr in fprs}
    return score_points(maps[:n], lesion, maps[n:], healthy, thresholds, min_mm3, peak_fractions, outlines)


def tuning_options(models: Sequence, seed: int = 0):
    """`synomaly tune`'s options for the models' shared scored region; refuses models that score different ones."""
    from .tune import TuneOptions

    regions = {m.card.detection_3d.region for m in models if m.card.detection_3d is not None}
    if len(regions) > 1:
        raise InputError(f"the two models score volumes in different regions ({', '.join(sorted(regions))})")
    return TuneOptions(region=regions.pop() if regions else "foreground", seed=seed)


def paired_tuning(models: Sequence, volumes, opts, progress: ProgressFn = null_progress, combine: str = "mean"):
    """Both models' tuning maps over the same cases (built with `opts`, tuning_options), and the combined map
    (each scaled in its own scan, then averaged or, `combine` "geometric", their geometric mean: detect.paired_map).
    Returns (lesion cases, lesion-free cases, each model's maps, the combined maps)."""
    from .tune import build_cases

    first, maps = None, []
    for model in models:
        check_pairable(model)
        lesion, healthy = build_cases(volumes, model.card, opts)
        if first is not None:
            # the same lesions; the scored brain regions may differ by a few voxels, as two registrations of the
            # same scan do (the atlas registration is not bit-reproducible): the first model's cases are used
            differ = max((a.prep.foreground != b.prep.foreground).mean()
                         for a, b in zip(first[0] + first[1], lesion + healthy))
            if not all(np.array_equal(a.truth, b.truth) for a, b in zip(first[0], lesion)) or differ > 1e-3:
                raise InputError("the two models' tuning cases differ (lesions or scored region): they slice the "
                                 "volumes differently and cannot be paired")
        else:
            first = (lesion, healthy)
        maps.append(tuning_maps(model, lesion, healthy, opts.seed, progress))
    lesion, healthy = first
    combined = [paired_map([m[i] for m in maps], c.prep.foreground, SCAN_LEVEL_QUANTILE, combine)[0]
                for i, c in enumerate(lesion + healthy)]
    return lesion, healthy, maps, combined


def pair_models(model_file: str | Path, partner_file: str | Path, data: Sequence[str] = ("oasis",),
                output: Optional[str | Path] = None, max_healthy_ml: float = PAIR_MAX_HEALTHY_ML,
                fprs: Sequence[float] = PAIR_FPRS, outlines: bool = True, allow_held_out: bool = False,
                device: str = "auto", version: Optional[str] = None, combine: str = "mean",
                progress: ProgressFn = null_progress) -> dict[str, Any]:
    """Calibrate the averaged map of two models on tuning volumes, pick its operating point (with `outlines`,
    among tune's growth and peak outlines too; else among plain thresholds), and write the first model with
    card.partner_3d naming the second (copied beside the output when it is not there). Returns the record."""
    from .card import PartnerModel
    from .modelio import copy_file, file_sha256, load_model, save_model
    from .tune import choose_fpr, load_tune_volumes, point_summary, point_words, pooled_auprc

    start = time.perf_counter()
    model, partner = load_model(model_file, device=device), load_model(partner_file, device=device)
    if partner.card.orientation != model.card.orientation:
        raise InputError("the two models slice scans in different orientations and cannot be paired")
    if (Path(output).name if output is not None else Path(model.path).name) == Path(partner.path).name:
        raise InputError(f"the paired model and its partner would both be named {Path(partner.path).name}: name the "
                         "output (-o) or the partner file differently")
    if combine not in PAIR_COMBINES:
        raise InputError(f"the maps are combined by one of {', '.join(PAIR_COMBINES)}, not {combine!r}")
    if not 0 < max_healthy_ml:
        raise InputError(f"the bound on lesion-free volume must be positive, got {max_healthy_ml}")
    volumes = load_tune_volumes(list(data), allow_held_out)
    if not volumes:
        raise InputError("no tuning volumes: pairing needs healthy 3D volumes")
    progress("pair", 0, 1, f"building tuning cases from {len(volumes)} volume(s)")
    opts = tuning_options([model, partner])
    lesion, healthy, maps, mean = paired_tuning([model, partner], volumes, opts, progress=progress, combine=combine)
    points = operating_points(mean, lesion, healthy, fprs, opts.min_lesion_mm3, outlines=outlines,
                              peak_fractions=opts.peak_fractions)
    chosen = choose_fpr(points, max_healthy_ml)
    n = len(lesion)
    auprc = {"first": pooled_auprc(maps[0][:n], lesion, opts), "partner": pooled_auprc(maps[1][:n], lesion, opts),
             "pair": pooled_auprc(mean[:n], lesion, opts)}
    out = Path(output) if output is not None else Path(model.path)
    partner_path = Path(partner.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    beside = out.parent / partner_path.name
    if beside.resolve() != partner_path.resolve():
        copy_file(partner_path, beside)
    record = {
        "data": ", ".join(f"{v.name} ({v.source})" for v in volumes),
        "volumes": [v.name for v in volumes], "volume_files": [str(Path(v.source).resolve()) for v in volumes],
        "lesion_cases": n, "lesion_free_cases": len(healthy), "lesions": int(sum(len(c.meta["lesions"]) for c in lesion)),
        "combine": combine,
        "rule": f"best mean Dice with every lesion-free form <= {max_healthy_ml:g} mL"
                + ("" if outlines else ", plain thresholds only"),
        "picked": point_summary(chosen),
        "max_healthy_ml": max_healthy_ml, "pooled_auprc": {k: round(v, 4) for k, v in auprc.items()},
        "sweep": [point_summary(p) for p in points], "partner_model": f"{partner.card.name} {partner.card.version}",
        "partner_setting": partner.card.detection_text(True), "seconds": round(time.perf_counter() - start, 1),
    }
    card = model.card.copy()
    if version:
        card.version = version
    card.partner_3d = PartnerModel(file=partner_path.name, sha256=file_sha256(beside), fpr=float(chosen["fpr"]),
                                   grow_fpr=float(chosen["grow_fpr"]) if chosen["grow_fpr"] else None,
                                   peak_fraction=chosen["peak_fraction"], scan_quantile=SCAN_LEVEL_QUANTILE,
                                   combine=combine,
                                   thresholds={p["fpr"]: round(p["threshold"], 6) for p in points
                                               if p["grow_fpr"] is None and p["peak_fraction"] is None},
                                   calibration=record)
    card.validate()
    state = {k: v.detach().cpu() for k, v in model.network.state_dict().items()}
    save_model(out, card, state)
    progress("pair", 1, 1, f"paired: {point_words(chosen)}")
    return {**record, "output": str(out), "partner_file": str(beside), "fpr": float(chosen["fpr"])}
