"""`synomaly evaluate`: several methods on the same data with the same post-processing, thresholds chosen
on the validation split (or taken from each model card), never on the test split; bootstrap confidence
intervals over patients; a Markdown + CSV + PNG report.

A method is a model file run with a number of stages: `synomaly-multi` (a Synomaly-noise model with the
card's max_stages), `synomaly-single` (the same model, one stage), `gaussian-multi`/`gaussian-single`
(a model trained with `synomaly train --noise gaussian`, the AnoDDPM-style baseline) and `dae` (a model
trained with `--noise coarse`: the denoising autoencoder of Kascenas et al. 2023, one pass, t unused).

This module runs the whole evaluation; its jobs live beside it: the methods and their runs (evalruns), the
threshold choice (evalthresholds), the metrics and bootstrap intervals (evalstats) and the report (evalreport).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from . import evalruns  # run_cases through the module: a test watches every run
from .errors import InputError, OutputError
from .evaldata import EvalData
from .evalplots import Gallery
from .evalreport import write_report
from .evalruns import EvalSettings, Method, MethodResult
from .evalstats import reported_metrics, summarise
from .evalthresholds import choose_threshold
from .progress import ProgressFn, null_progress

log = logging.getLogger(__name__)


def evaluate_methods(methods: Sequence[Method], data: EvalData, s: EvalSettings,
                     progress: ProgressFn = null_progress) -> list[MethodResult]:
    """Run every method: threshold on validation (or card), then the test split; metrics with intervals."""
    from .detect import DetectionSettings, resolve_settings
    from .modelio import load_model

    models: dict[str, Any] = {}
    results = []
    keys = reported_metrics(data)
    for m in methods:
        if m.model not in models:
            models[m.model] = load_model(m.model, device=s.device, precision=s.precision)
        model = models[m.model]
        card = model.card
        volume = data.kind == "implanted"  # whole volumes; Br35H and prepared datasets are 2D slices
        stages = int(m.stages or card.detection_for(volume).max_stages)
        ts, k, _, _, _ = resolve_settings(DetectionSettings(t=s.t, blur_kernel=s.blur, max_stages=stages,
                                                            threshold=0.0), card, volume)
        t = ts[0] if len(ts) == 1 else "+".join(str(v) for v in ts)
        t0 = time.perf_counter()
        thr = choose_threshold(model, m, stages, data.val, s, progress, volume)  # the test split is not passed
        run = evalruns.run_cases(model, data.test, stages, thr["threshold"], s, gallery=Gallery(s.gallery_k),
                        progress=progress, what=f"{m.name} test")
        res = MethodResult(m, {"name": card.name, "noise": card.noise.kind, "version": card.version,
                               "grid": card.grid_size, "training_data": card.training.get("data", "")},
                           stages, t, k, thr, run)
        res.metrics = summarise(run, keys, thr.get("image_threshold", math.nan), s.bootstrap, s.seed)
        res.seconds = time.perf_counter() - t0
        results.append(res)
        log.info("%s: threshold %.4g (%s)", m.name, thr["threshold"], thr["source"])
    return results


def tuned_on_test(card, data: EvalData) -> list[str]:
    """The test volumes of implanted data that a card's 3D tuning or its pairing (`synomaly pair`) used (by name or
    by file), in test order."""
    records = [card.tuning or {}] + ([card.partner_3d.calibration] if card.partner_3d is not None else [])
    names = {n for r in records for n in r.get("volumes", [])}
    files = {str(Path(f).resolve()) for r in records for f in r.get("volume_files", [])}
    return [t["name"] for t in (data.info or {}).get("templates", [])
            if t["name"] in names or str(Path(t["path"]).resolve()) in files]


def run_evaluation(methods: Sequence[Method], data_spec: str, out: str | Path, s: EvalSettings, *,
                   command: str = "", overwrite: bool = False, limit: Optional[int] = None,
                   templates: Sequence[str] = ("ch2", "robex", "itk-t1"), cases: int = 3, val_cases: int = 2,
                   forms: Sequence[str] = ("native", "brain", "oblique", "thick", "scaled"),
                   val_templates: Sequence[str] = ("oasis",), healthy_every: int = 3,
                   progress: ProgressFn = null_progress) -> dict[str, Any]:
    """Load the data, evaluate every method, write the report; returns file paths and the metrics."""
    from .device import resolve_device
    from .evaldata import load_eval_data

    from .modelio import read_card, resolve_model_path

    if s.threshold_from not in ("val", "card"):
        raise InputError("--threshold-from must be 'val' or 'card'")
    cards = [read_card(resolve_model_path(m.model)) for m in methods]  # a missing or broken file fails first
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists; choose another folder or pass --overwrite")
    progress("data", 0, 1, f"loading {data_spec}")
    data = load_eval_data(data_spec, limit=limit, templates=templates, cases=cases, val_cases=val_cases,
                          seed=s.seed, forms=forms, val_templates=val_templates, healthy_every=healthy_every)
    progress("data", 1, 1, f"{len(data.val)} validation and {len(data.test)} test cases")
    for m, card in zip(methods, cards):
        seen = tuned_on_test(card, data)
        if seen:
            raise InputError(f"method {m.name}: its card was tuned on the test volume(s) {', '.join(seen)}; "
                             "test it on other volumes (--templates)")
    results = evaluate_methods(methods, data, s, progress)
    import torch

    device = f"{resolve_device(s.device)} ({torch.get_num_threads()} CPU threads)"
    files = write_report(results, data, s, out, command, overwrite=overwrite, device=device)
    return {"files": files, "methods": {r.method.name: {"threshold": r.threshold["threshold"],
                                                        "threshold_source": r.threshold["source"],
                                                        "metrics": r.metrics} for r in results}}
