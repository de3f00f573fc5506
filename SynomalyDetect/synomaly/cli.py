"""The `synomaly` command: a thin layer over the engine's functions."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from .contract import (DEFAULT_MODEL, DEMO_FILE, DEMO_TRUTH_FILE, ERROR_PREFIX, EXIT_FAILED, EXIT_INPUT, EXIT_MODEL,
                       __version__)
from .errors import Cancelled, InputError, SynomalyError
from .sampledata import resolve_data

log = logging.getLogger("synomaly")

DATA_SPEC_HELP = (
    "files, folders (DICOM series or images), .txt lists, or sample specs: "
    "'br35h:no:LO:HI' (Br35H healthy numbers LO <= n < HI, HI <= 1050), 'mni152' (MNI152 T1 template), a healthy volume's name "
    "(mni152, brainles, brainles-brain, pydeface, mni2020-brain, oasis, ch2, robex, itk-t1) or 'healthy:ROLE' "
    "(every installed volume of the role train, tune or eval)"
)


def _install_signal_handlers() -> None:
    """Turn SIGTERM into KeyboardInterrupt so every command cleans up the same way."""

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    # A process started in the background by a non-interactive shell inherits SIGINT as ignored, and
    # Python then leaves it ignored; a program (or a person) that interrupts us must still stop us.
    signal.signal(signal.SIGINT, handler)


def _progress(args) -> Any:
    from .progress import make_progress

    return make_progress(getattr(args, "progress", "auto"))


# ---------------------------------------------------------------- train


def cmd_train(args) -> int:
    """Train from scratch or fine-tune a base model on healthy scans."""
    import torch

    from .card import ModelCard
    from .modelio import load_model, read_card
    from .train import TrainingSettings, new_card, split_scans, train

    paths = resolve_data(args.data)
    if not paths:
        raise InputError("no training data found")
    val_paths = resolve_data(args.val_data) if args.val_data else []
    if not val_paths:
        paths, val_paths = split_scans(paths, args.val_fraction, args.seed)
    settings = TrainingSettings(
        iterations=args.iterations, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        device=args.device, precision=args.precision, checkpoint_every=args.checkpoint_every,
        validate_every=args.checkpoint_every, contrast_remap=args.contrast_remap, t_max=args.t_max,
        lesion_blobs=args.lesion_blobs, lesion_amplitude=tuple(args.lesion_amplitude),
        min_snr_gamma=args.min_snr_gamma,
    )
    base_state = None
    if args.base:
        base = load_model(args.base, device="cpu")
        card = base.card.copy()
        card.training = {"name_of_base": base.card.name}
        if args.name:
            card.name = args.name
        if args.description:
            card.description = args.description
        base_state = {k: v.detach().cpu() for k, v in base.network.state_dict().items()}
    elif args.resume:
        from .train import load_checkpoint

        card = ModelCard.from_json(load_checkpoint(args.resume)["card"])
    else:
        card = new_card(
            args.name or Path(args.output).name.split(".")[0], grid=args.grid,
            channels=tuple(args.channels), noise_kind=args.noise, polarity=args.polarity,
            modality=args.modality, contrast=args.contrast, orientation=args.orientation,
            description=args.description,
        )
        if args.sigma is not None:
            card.noise.sigma = args.sigma
        if args.tau is not None:
            card.noise.tau = args.tau
        if args.offset is not None:
            card.noise.offset = args.offset
    if args.model_version:
        card.version = args.model_version
    description = args.data_description or f"{len(paths)} training and {len(val_paths)} validation scans"
    from .train import distributed_from_environment

    world = distributed_from_environment()
    if world.world_size > 1 and world.rank == 0:
        print(f"torchrun: world size {world.world_size}; each process computes its share of every global batch "
              f"of {settings.batch_size}; rank 0 writes checkpoints and the model file", file=sys.stderr)
    summary = train(card, paths, val_paths, args.output, settings, base_state=base_state, resume=args.resume,
                    checkpoint=args.checkpoint, progress=_progress(args), data_description=description)
    if summary["rank"] != 0:
        return 0  # rank 0 calibrates, tunes and reports
    if args.tune_data:  # label-free tuning on healthy volumes, then calibration under the chosen setting
        from .tune import tune_model

        tune_model(args.output, args.tune_data, progress=_progress(args))
    elif not args.no_calibrate and val_paths:
        from .calibrate import calibrate_model

        calibrate_model(args.output, val_paths, progress=_progress(args))
    print(json.dumps({k: v for k, v in summary.items() if k != "validation_paths"}, indent=None))
    on = f" on {summary['world_size']} processes" if summary["world_size"] > 1 else ""
    print(f"model written to {args.output} ({summary['it_per_s']:.2f} iterations/s{on}, "
          f"noise {100 * summary['noise_fraction']:.1f} % of step time)", file=sys.stderr)
    return 0



# ---------------------------------------------------------------- detect


def _detection_settings(args):
    from .detect import DetectionSettings

    return DetectionSettings(
        t=args.t, blur_kernel=args.blur, threshold=args.threshold, fpr=args.fpr, min_lesion_mm3=args.min_size,
        max_stages=args.stages, noise_draws=args.draws, seed=args.seed, batch_size=args.batch_size,
        device=args.device, precision=args.precision, allow_modality_mismatch=args.allow_modality_mismatch,
    )


def cmd_detect(args) -> int:
    """Detect anomalies in one scan and write the outputs."""
    from .modelio import load_model
    from .outputs import amount_text, detect_to_folder
    from .prepare import read_scan

    progress = _progress(args)
    settings = _detection_settings(args).validate()  # a bad option is refused before any work
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        from .errors import OutputError

        raise OutputError(f"{out} already exists; choose another folder or pass --overwrite")
    _check_writable(out)
    progress("read", 0, 1, f"reading {args.input}")
    image = read_scan(args.input, series_id=args.series, expect=args.expect)
    progress("read", 1, 1, "read " + " x ".join(map(str, image.GetSize())))
    model = load_model(args.model, device=args.device, precision=args.precision)
    result, files = detect_to_folder(image, model, settings, out, overwrite=args.overwrite,
                                     compress=args.compress, progress=progress)
    rep = result.report
    message = (f"{rep['lesion_count']} lesion(s), {amount_text(rep)}, threshold "
               f"{result.threshold:.3f} ({result.threshold_source}), {rep['seconds']['total']:.1f} s")
    if args.progress == "json":
        progress("done", 1, 1, message, outputs=files)
    else:
        print(message)
        print(f"outputs in {out} (overview picture: {files['overview']})")
    return 0


def _check_writable(out: Path) -> None:
    """Fail before a long detection if the results could not be written where asked."""
    import tempfile

    from .errors import OutputError

    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent)
        os.rmdir(probe)
    except OSError as exc:
        raise OutputError(f"cannot write results in {parent}: {exc.strerror}") from exc


def add_result_arguments(d: argparse.ArgumentParser) -> None:
    """Options of what one scan's detection accepts and writes, shared by detect and cohort."""
    d.add_argument("--compress", action="store_true",
                   help="gzip the counterfactual and map volumes (smaller files, about 0.6 s more per volume)")
    d.add_argument("--expect", default="any", choices=["any", "volume", "slice"],
                   help="refuse inputs that are not of this kind")


def add_detection_arguments(d: argparse.ArgumentParser) -> None:
    """Options shared by detect, demo and bench."""
    d.add_argument("--model", default=DEFAULT_MODEL, help="model name (see `synomaly models`) or file")
    d.add_argument("--t", type=int, help="noise level t of each stage (default: the model's)")
    d.add_argument("--stages", type=int, help="maximum number of stages (default: the model's, 5)")
    sens = d.add_mutually_exclusive_group()
    sens.add_argument("--threshold", type=float, help="explicit anomaly-score threshold")
    sens.add_argument("--fpr", type=float, help="calibrated per-voxel false-positive rate: 0.01, 0.001 or 0.0001")
    d.add_argument("--blur", type=int, help="Gaussian blur kernel of the map, odd, model-grid pixels")
    d.add_argument("--min-size", type=float, default=50.0, help="smallest lesion kept, mm^3 (default 50)")
    d.add_argument("--draws", type=int, default=None, help="noise draws averaged per stage and noise level (default: the model card's)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--batch-size", type=int, default=8, help="slices per network call")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    d.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    d.add_argument("--allow-modality-mismatch", action="store_true",
                   help="run even if the DICOM modality differs from the model's")
    d.add_argument("--progress", default="auto", choices=["auto", "bar", "json", "none"])


# ---------------------------------------------------------------- cohort


def cmd_cohort(args) -> int:
    """Detect in every scan of a cohort (or one part of it, for a job array) into OUTDIR/<scan id>/."""
    from .cohort import CohortFailures, CohortOptions, find_scans, resolve_part, run_cohort

    settings = _detection_settings(args).validate()  # a bad option is refused before any work
    part, parts, source = resolve_part(args.num_parts, args.part_id)
    scans = find_scans(args.scans)
    if not scans:
        raise InputError("no scans found")
    options = CohortOptions(num_parts=parts, part_id=part, workers=args.workers, expect=args.expect,
                            compress=args.compress)
    print(f"cohort of {len(scans)} scans; part {part} of {parts} (0-based, from {source}); "
          f"{args.workers} worker(s)", file=sys.stderr)
    progress = _progress(args)
    try:
        summary = run_cohort(scans, args.output, args.model, settings, options, progress=progress)
    except KeyboardInterrupt:
        raise Cancelled(f"interrupted; the scans finished so far are complete in {args.output}, "
                        "the same command resumes") from None
    message = (f"part {part} of {parts}: {summary['in_part']} scans, {summary['skipped']} already complete, "
               f"{summary['ok']} done, {summary['failed']} failed ({summary['seconds']:.0f} s); "
               f"status in {summary['status_file']}")
    if args.progress == "json":
        progress("done", 1, 1, message, ok=summary["ok"], failed=summary["failed"], skipped=summary["skipped"])
    else:
        print(message)
    if summary["failed"]:
        first = "; ".join(f"{sid}: {msg}" for sid, msg in summary["failures"][:3])
        raise CohortFailures(f"{summary['failed']} of {summary['in_part'] - summary['skipped']} scans failed "
                             f"(the others have their results; a rerun retries the failed ones): {first}")
    return 0


def cmd_cohort_report(args) -> int:
    """Merge every part of a cohort run into cohort.csv, a summary and an overview picture."""
    from .cohort import cohort_report

    rep = cohort_report(args.outdir, top=args.top)
    print(rep["summary"], end="")
    print(f"table: {rep['csv']}; summary: {rep['summary_file']}; largest findings: {rep['overview']}")
    return 0


def cmd_bench_cohort(args) -> int:
    """Scans per minute of `synomaly cohort` with 1, 2, ... workers, and the time per scan outside the network."""
    import tempfile

    import torch

    from .cohort import bench_cohort

    settings = _detection_settings(args).validate()
    with tempfile.TemporaryDirectory() as tmp:
        figures = bench_cohort(args.model, settings, tmp, scans=args.scans, slices=args.slices,
                               worker_counts=tuple(args.workers), progress=_progress(args))
    print(f"cohort of {args.scans} volumes of 160 x 160 x {args.slices} (MNI152 resampled, noise added); "
          f"model {args.model}; {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads in all")
    for f in figures:
        print(f"{f['workers']} worker(s) on {f['device']}: {f['scans_per_minute']:.2f} scans per minute "
              f"({f['wall_seconds']:.1f} s for {f['scans']} scans, model loading and process start included); "
              f"per scan {f['seconds_per_scan']:.2f} s, of which {f['network_seconds_per_scan']:.2f} s in the "
              f"network and {f['overhead_per_scan']:.2f} s outside it")
    return 0


# ---------------------------------------------------------------- models, calibrate


def cmd_models(args) -> int:
    """List the registry's models with their cards."""
    from .card import ModelCard
    from .modelio import list_models, user_models_dir

    models = list_models()
    if args.json:
        print(json.dumps(models, indent=1))
        return 0
    if not models:
        print(f"no models found (user folder: {user_models_dir()})")
    for m in models:
        print(f"{m['name']}  [{m['source']}]  {m['path']}")
        if "card" in m:
            print(ModelCard.from_dict(m["card"]).summary())
        else:
            print(f"  unusable: {m['error']}")
    print(f"user model folder: {user_models_dir()} (set SYNOMALY_MODELS_DIR to change)")
    return 0


def cmd_calibrate(args) -> int:
    """Recompute the model's thresholds on the user's healthy scans."""
    from .calibrate import calibrate_model
    from .modelio import resolve_model_path

    paths = resolve_data(args.data)
    if not paths:
        raise InputError("no healthy scans found")
    target = args.output or resolve_model_path(args.model)
    cal = calibrate_model(args.model, paths, fprs=args.fprs, device=args.device,
                          description=args.data_description or "", progress=_progress(args), output=target)
    for key, value in cal["thresholds"].items():
        print(f"FPR {key}: threshold {value:.4f} (measured {cal['measured_fpr_on_calibration_data'][key]:.2g})")
    print(f"calibration stored in {target}")
    return 0


def cmd_tune(args) -> int:
    """Choose the detection setting and operating point on synthetic lesions in healthy volumes."""
    from .tune import TuneGrid, TuneOptions, tune_model

    grid = TuneGrid()
    if args.quick:
        grid = TuneGrid(ts=(10, 25, 50, 100, 200), blurs=(3, 5, 7), ensembles=((10, 25, 50),), multi_top=1,
                        more_draws=3)
    if args.t:
        grid.ts = tuple(args.t)
    if args.blur:
        grid.blurs = tuple(args.blur)
    opts = TuneOptions(forms=tuple(args.forms), lesions_per_volume=args.lesions, seed=args.seed,
                       batch_size=args.batch_size, grid=grid, max_healthy_ml=args.max_healthy_ml)
    rec = tune_model(args.model, args.data, output=args.output, options=opts, device=args.device,
                     description=args.data_description or "", progress=_progress(args))
    out = args.output or args.model
    best = rec["chosen"]
    print(f"tuned {out} on {rec['lesion_cases']} volumes with {rec['lesions']} implanted lesions "
          f"({rec['seconds']['total']:.0f} s): t {best['t']}, blur {best['blur']}, {best['stages']} stage(s), "
          f"pooled pixel AUPRC {best['auprc']:.3f}; default FPR {rec['chosen_fpr']}")
    for p in rec["points"]:
        lf = p["lesions_found"]
        by = ", ".join(f"{k.replace('_', ' ')} {v['found']}/{v['of']}" for k, v in lf.items() if k != "all")
        print(f"  FPR {p['fpr']}: threshold {p['threshold']:.4f}, mean Dice {p['dice_mean']:.3f}, "
              f"at most {p['healthy_ml_max']:.2f} mL flagged in a lesion-free volume; "
              f"lesions found {lf['all']['found']}/{lf['all']['of']} ({by})")
    return 0


def cmd_volumes(args) -> int:
    """List the healthy volumes that ship inside packages, their role, and whether they are installed here."""
    from .sampledata import HEALTHY_VOLUMES, healthy_volume

    for name, v in HEALTHY_VOLUMES.items():
        try:
            where = str(healthy_volume(name)[0])
        except InputError:
            where = f"not installed ({v.install})"
        print(f"{name:14s} {v.role:6s} {v.what}: {where}")
    return 0


def cmd_slim_checkpoint(args) -> int:
    """Write a checkpoint without optimizer state (small enough to keep in a repository)."""
    from .train import load_checkpoint, slim_checkpoint

    out = slim_checkpoint(args.checkpoint, args.output)
    state = load_checkpoint(out)
    print(f"{out}: iteration {state['iteration']}, {out.stat().st_size / 1e6:.1f} MB (no optimizer state)")
    return 0


def cmd_install_model(args) -> int:
    """Copy a model file into the user model folder."""
    from .modelio import install_model

    print(f"installed {install_model(args.file, args.name)}")
    return 0


def cmd_import_upstream(args) -> int:
    """Convert one of the Synomaly authors' checkpoints (.pt) into a model file with a card."""
    from .modelio import MODEL_SUFFIX, read_card, user_models_dir
    from .upstream import import_checkpoint

    src = Path(args.checkpoint)
    # without --name the model is named after the file it is written to (import_checkpoint's rule)
    target = Path(args.output) if args.output else user_models_dir() / f"{args.name or 'upstream-' + src.stem}{MODEL_SUFFIX}"
    if target.exists() and not args.overwrite:
        raise InputError(f"{target} exists; use --overwrite to replace it")
    path = import_checkpoint(src, target, name=args.name, modality=args.modality, contrast=args.contrast,
                             orientation=args.orientation)
    print(f"imported {src} -> {path}")
    print(read_card(path).summary())
    print("not calibrated: it detects with the authors' threshold until you run "
          f"'synomaly calibrate {path} --data HEALTHY_SCANS...'")
    return 0


def cmd_remove_model(args) -> int:
    """Delete a user model."""
    from .modelio import remove_model

    print(f"removed {remove_model(args.name)}")
    return 0


# ---------------------------------------------------------------- demo, bench


def cmd_demo_data(args) -> int:
    """Write the demo case (MNI152 with an implanted lesion) for the Slicer Sample Data module."""
    from .sampledata import demo_case

    img, mask = demo_case(args.output)
    print(json.dumps({"image": str(img), "truth": str(mask)}))
    return 0


def cmd_demo(args) -> int:
    """Run detection with the shipped model on sample data that needs no download."""
    import tempfile

    from .detect import detect
    from .modelio import load_model
    from .outputs import amount_text, write_results
    from .prepare import read_image
    from .sampledata import br35h_images, demo_case

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        from .errors import OutputError

        raise OutputError(f"{out} already exists; choose another folder or pass --overwrite")
    model = load_model(args.model, device=args.device, precision=args.precision)
    settings = _detection_settings(args)
    progress = _progress(args)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        img_path, truth_path = demo_case(tmp)
        cases.append(("mni152_implanted_lesion", str(img_path)))
        try:
            for p in br35h_images("yes", 0, 1050)[: args.br35h]:
                cases.append((f"br35h_tumour_{p.stem}", str(p)))
        except InputError as exc:
            log.warning("skipping Br35H cases: %s", exc)
        out.mkdir(parents=True, exist_ok=True)
        import shutil

        shutil.copy(img_path, out / DEMO_FILE)
        shutil.copy(truth_path, out / DEMO_TRUTH_FILE)
        for name, path in cases:
            image = read_image(path, color="luminance")
            result = detect(image, model, settings, progress=progress)
            files = write_results(result, image, out / name, overwrite=True)
            rep = result.report
            print(f"{name}: {rep['lesion_count']} lesion(s), {amount_text(rep)}, "
                  f"{rep['seconds']['total']:.1f} s -> {files['overview']}")
            if path == str(img_path):  # the implanted lesion's truth is known: say whether it was found
                import numpy as np
                import SimpleITK as sitk

                from .metrics import dice

                truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_path))) > 0
                seg = sitk.GetArrayFromImage(result.segmentation) > 0
                hit = int((seg & truth).sum())
                print(f"  implanted lesion: {'FOUND' if hit else 'MISSED'} ({hit} of {int(truth.sum())} lesion voxels "
                      f"segmented, Dice {dice(seg, truth):.2f}; {int((seg & ~truth).sum())} voxels flagged elsewhere)")
    print(f"demo outputs in {out}; open the overview.png pictures (input | counterfactual | map | outline)")
    return 0


def cmd_bench(args) -> int:
    """Time detection of a 155-slice 240 x 240 volume end to end, with the model's share and peak memory."""
    import resource
    import tempfile
    import time

    import SimpleITK as sitk

    from .detect import detect
    from .modelio import load_model
    from .outputs import write_results
    from .prepare import read_image
    from .sampledata import demo_volume

    with tempfile.TemporaryDirectory() as tmp:
        vol = demo_volume(tmp, (240, 240, 155))
        vol_path = Path(tmp) / "bench.nii.gz"
        sitk.WriteImage(vol, str(vol_path))
        model = load_model(args.model, device=args.device, precision=args.precision)
        settings = _detection_settings(args)
        if args.all_stages:
            settings.tolerance = -1.0  # no slice stops early (unless nothing is anomalous): the worst case
        results = []
        for run in range(args.repeat + 1):
            model.calls, model.call_seconds = 0, 0.0
            t0 = time.perf_counter()
            image = read_image(vol_path)
            t1 = time.perf_counter()
            result = detect(image, model, settings)
            t2 = time.perf_counter()
            write_results(result, image, Path(tmp) / f"out{run}")
            wall = time.perf_counter() - t0
            result.report["seconds"].update(read=round(t1 - t0, 3), detect_call=round(t2 - t1, 3),
                                            write=round(time.perf_counter() - t2, 3))
            if run > 0 or args.repeat == 0:
                results.append((wall, model.calls, model.call_seconds, result.report))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    wall = sorted(r[0] for r in results)[len(results) // 2]
    best = min(results, key=lambda r: r[0])
    rep = best[3]
    print(f"volume: 240 x 240 x 155, {rep['slices_analysed']} slices with foreground; model {model.card.name} "
          f"on {model.device} ({rep['precision']}), {rep['stages_per_slice_mean']:.2f} stages per slice")
    print(f"seconds per volume, end to end (read, detect, write): {wall:.2f} (median of {len(results)})")
    print(f"network calls: {best[1]} (batches of up to {settings.batch_size}), time inside the network: "
          f"{best[2]:.2f} s = {100 * best[2] / best[0]:.1f} % of wall time")
    print(f"stage times: " + ", ".join(f"{k} {v:.2f} s" for k, v in rep['seconds'].items()))
    print(f"peak RSS: {peak / 1024:.2f} GB")
    return 0


def cmd_bench_train(args) -> int:
    """Training throughput at the default recipe: iterations per second and the noise's share of a step."""
    import time

    import torch

    from .train import Trainer, TrainingSettings, new_card

    card = new_card("bench", grid=args.grid, channels=tuple(args.channels), noise_kind=args.noise)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((256, 1, args.grid, args.grid), generator=gen) * 2 - 1
    m = torch.ones_like(x, dtype=torch.bool)
    settings = TrainingSettings(batch_size=args.batch_size, device=args.device, precision=args.precision)
    trainer = Trainer(card, x, m, x[:0], m[:0], settings)
    for _ in range(3):
        trainer.step()
    trainer.noise_seconds = trainer.step_seconds = 0.0
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.step()
    wall = time.perf_counter() - start
    precision = str(trainer.dtype) if trainer.dtype is not None else "float32"
    print(f"training step: grid {args.grid}, channels {tuple(args.channels)}, batch {args.batch_size}, "
          f"{card.noise.kind} noise, {trainer.device} ({precision}, {torch.get_num_threads()} threads)")
    print(f"iterations per second: {args.steps / wall:.3f} ({wall / args.steps:.3f} s per step, {args.steps} steps)")
    print(f"noise generation: {1000 * trainer.noise_seconds / args.steps:.2f} ms per step = "
          f"{100 * trainer.noise_seconds / trainer.step_seconds:.2f} % of the step")
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    from .settings import TrainingSettings  # plain data, no torch: the defaults are written once, there

    p = argparse.ArgumentParser(prog="synomaly", description="Unsupervised anomaly detection with Synomaly noise "
                                "and multi-stage diffusion. Research use only; not for diagnosis.")
    p.add_argument("--version", action="version", version=f"synomaly {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log diagnostics to stderr")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train or fine-tune a model on healthy scans")
    t.add_argument("--data", nargs="+", required=True, help=DATA_SPEC_HELP)
    t.add_argument("--val-data", nargs="+", help="held-out healthy scans (default: a split of --data by scan)")
    t.add_argument("--val-fraction", type=float, default=0.1)
    t.add_argument("-o", "--output", required=True, help="model file to write (.safetensors)")
    t.add_argument("--base", help="fine-tune this model (name or file) instead of training from scratch")
    t.add_argument("--resume", help="continue from this checkpoint")
    t.add_argument("--checkpoint", help="checkpoint file (default: OUTPUT with .ckpt)")
    t.add_argument("--checkpoint-every", type=int, default=250)
    t.add_argument("--iterations", type=int, default=TrainingSettings.iterations)
    t.add_argument("--batch-size", type=int, default=TrainingSettings.batch_size)
    t.add_argument("--lr", type=float, default=TrainingSettings.lr)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    t.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    t.add_argument("--contrast-remap", type=float, default=0.0, metavar="P",
                   help="share of training images given a random contrast curve, so that T2/FLAIR-like "
                        "intensities are seen (0-1; default 0)")
    t.add_argument("--t-max", type=int, default=0,
                   help="train on noise levels below this only, around those detection uses (default: all)")
    t.add_argument("--lesion-blobs", type=float, default=TrainingSettings.lesion_blobs, metavar="P",
                   help="share of training images whose Synomaly blobs have the strength of a real lesion in image "
                        "units at every noise level, not Synomaly's (u + offset) in noise units, which fades to about "
                        "0.05 at the low noise levels detection on volumes uses (0-1; default 0)")
    t.add_argument("--lesion-amplitude", type=float, nargs=2, default=list(TrainingSettings.lesion_amplitude),
                   metavar=("LO", "HI"), help="range of that strength in model units, [-1, 1] scale (default 0.2 1.2)")
    t.add_argument("--min-snr-gamma", type=float, default=TrainingSettings.min_snr_gamma, metavar="G",
                   help="weight each image's loss by min(SNR, G) / SNR (min-SNR weighting; an x0 loss at low noise, "
                        "needed with --lesion-blobs; 0 = plain noise MSE, the default; 5 is usual)")
    t.add_argument("--name", help="model name (default: output file name)")
    t.add_argument("--description", default="")
    t.add_argument("--model-version", help="version written into the card (default: the base model's, or 0.1.0)")
    t.add_argument("--data-description", help="what the training data is (no patient identifiers)")
    t.add_argument("--grid", type=int, default=64, help="in-plane model grid (pixels)")
    t.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128])
    t.add_argument("--noise", default="synomaly", choices=["synomaly", "gaussian", "coarse"])
    t.add_argument("--polarity", default="brighter", choices=["brighter", "darker", "both"])
    t.add_argument("--sigma", type=float, help="Synomaly blob blur sigma in grid pixels (default 3 * grid / 128)")
    t.add_argument("--tau", type=float, help="Synomaly threshold on the 0-255 scale (default 175)")
    t.add_argument("--offset", type=float, help="Synomaly amplitude offset (default 0.5)")
    t.add_argument("--modality", default="MR")
    t.add_argument("--contrast", default="any")
    t.add_argument("--orientation", default="axial", choices=["axial", "coronal", "sagittal"])
    t.add_argument("--no-calibrate", action="store_true", help="skip threshold calibration after training")
    t.add_argument("--tune-data", nargs="+", metavar="HEALTHY",
                   help="after training, tune detection settings on these healthy 3D volumes (see `synomaly tune`) "
                        "instead of only calibrating on the validation scans")
    t.add_argument("--progress", default="auto", choices=["auto", "bar", "json", "none"])
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("detect", help="find anomalies in a scan")
    d.add_argument("input", help="NIfTI/NRRD/MHA file, DICOM series folder, or a 2D image")
    d.add_argument("-o", "--output", required=True, help="output folder (must not exist unless --overwrite)")
    d.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    d.add_argument("--series", help="DICOM series UID when the folder holds several")
    add_result_arguments(d)
    add_detection_arguments(d)
    d.set_defaults(func=cmd_detect)

    co = sub.add_parser("cohort", help="find anomalies in every scan of a cohort (resumable; parts for job arrays)")
    co.add_argument("scans", nargs="+", help="scan files, folders of scans (one per image file or DICOM series, "
                    "searched recursively), .txt lists (a path a line) or .csv lists (a 'path' column, optional "
                    "'id' and 'series')")
    co.add_argument("-o", "--output", required=True, help="cohort folder: OUTDIR/<scan id>/ per scan")
    co.add_argument("--num-parts", type=int, help="split the sorted scan list into this many parts "
                    "(default: the job array's size where the scheduler says it, else 1)")
    co.add_argument("--part-id", type=int, help="the part to run, 0-based (default: from SLURM_ARRAY_TASK_ID, "
                    "SGE_TASK_ID (1-based), LSB_JOBINDEX (1-based), PBS_ARRAY_INDEX or PBS_ARRAYID when set)")
    co.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1); "
                    "one GPU each when several exist, the CPU threads split between them otherwise")
    add_result_arguments(co)
    add_detection_arguments(co)
    co.set_defaults(func=cmd_cohort)

    cr = sub.add_parser("cohort-report", help="merge a cohort's parts into cohort.csv, a summary and a picture")
    cr.add_argument("outdir", help="the folder given to `synomaly cohort -o`")
    cr.add_argument("--top", type=int, default=12, help="scans shown in cohort-overview.png (largest findings)")
    cr.set_defaults(func=cmd_cohort_report)

    m = sub.add_parser("models", help="list available models and their cards")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=cmd_models)

    c = sub.add_parser("calibrate", help="set thresholds from healthy scans (per-voxel false-positive rates)")
    c.add_argument("model", help="model name or file")
    c.add_argument("--data", nargs="+", required=True, help=DATA_SPEC_HELP)
    c.add_argument("--fprs", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    c.add_argument("-o", "--output", help="write the calibrated model here (default: update the model file)")
    c.add_argument("--data-description", help="what the healthy data is")
    c.add_argument("--device", default="auto")
    c.add_argument("--progress", default="auto", choices=["auto", "bar", "json", "none"])
    c.set_defaults(func=cmd_calibrate)

    tu = sub.add_parser("tune", help="choose detection settings on synthetic lesions in healthy volumes "
                        "(no labels), then calibrate")
    tu.add_argument("model", help="model name or file")
    tu.add_argument("--data", nargs="+", required=True,
                    help="healthy 3D volumes not used in training: files, folders, .txt lists, or healthy-volume "
                         "names (oasis, ...; 'healthy:tune' for every installed tuning volume)")
    tu.add_argument("-o", "--output", help="write the tuned model here (default: update MODEL in place)")
    tu.add_argument("--forms", nargs="+", default=["native", "brain", "oblique", "thick", "scaled"],
                    choices=["native", "brain", "oblique", "thick", "scaled"],
                    help="forms of each volume to tune on (brain: skull-stripped, for volumes with a mask)")
    tu.add_argument("--lesions", type=int, default=3, help="lesions implanted per volume and form (default 3)")
    tu.add_argument("--t", type=int, nargs="+", help="noise levels to try (default 5 10 25 50 100 200 400)")
    tu.add_argument("--blur", type=int, nargs="+", help="blur kernels to try (default 3 5 7 9)")
    tu.add_argument("--quick", action="store_true", help="a small grid (about a quarter of the time)")
    tu.add_argument("--max-healthy-ml", type=float, default=1.0,
                    help="the default FPR may flag at most this many mL in a lesion-free volume (default 1)")
    tu.add_argument("--data-description", help="what the tuning volumes are (for the card)")
    tu.add_argument("--seed", type=int, default=0)
    tu.add_argument("--batch-size", type=int, default=8)
    tu.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    tu.add_argument("--progress", default="auto", choices=["auto", "bar", "json", "none"])
    tu.set_defaults(func=cmd_tune)

    vo = sub.add_parser("volumes", help="the healthy volumes inside packages: role (train, tune, eval) and where")
    vo.set_defaults(func=cmd_volumes)

    sc = sub.add_parser("slim-checkpoint", help="copy a training checkpoint without its optimizer state")
    sc.add_argument("checkpoint")
    sc.add_argument("-o", "--output", required=True)
    sc.set_defaults(func=cmd_slim_checkpoint)

    im = sub.add_parser("install-model", help="copy a model file into the user model folder")
    im.add_argument("file")
    im.add_argument("--name", help="registry name (default: the card's name)")
    im.set_defaults(func=cmd_install_model)
    iu = sub.add_parser("import-upstream", help="convert the Synomaly authors' checkpoint (.pt) into a model file")
    iu.add_argument("checkpoint", help="the authors' torch.save checkpoint (e.g. best_model.pt)")
    iu.add_argument("-o", "--output", help="model file to write (default: the user model folder, as NAME)")
    iu.add_argument("--name", help="model name (default: from the output file name, else upstream-<checkpoint name>)")
    iu.add_argument("--modality", help="override the modality the card states (default: from the checkpoint's dataset)")
    iu.add_argument("--contrast", help="override the contrast the card states")
    iu.add_argument("--orientation", choices=["axial", "coronal", "sagittal"], help="slice orientation of the training data")
    iu.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    iu.set_defaults(func=cmd_import_upstream)
    rm = sub.add_parser("remove-model", help="delete a model from the user model folder")
    rm.add_argument("name")
    rm.set_defaults(func=cmd_remove_model)

    dd = sub.add_parser("demo-data", help="write the demo case (MNI152 with an implanted lesion)")
    dd.add_argument("-o", "--output", required=True)
    dd.set_defaults(func=cmd_demo_data)

    de = sub.add_parser("demo", help="run the shipped model on sample data (no download needed)")
    de.add_argument("-o", "--output", default="synomaly-demo")
    de.add_argument("--overwrite", action="store_true")
    de.add_argument("--br35h", type=int, default=3, help="number of Br35H tumour slices to include")
    add_detection_arguments(de)
    de.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="time a 155-slice 240 x 240 volume end to end")
    b.add_argument("--repeat", type=int, default=2, help="timed runs after one warm-up run")
    b.add_argument("--all-stages", action="store_true",
                   help="worst case: every slice runs all stages (with --threshold 0 even an untrained model does)")
    add_detection_arguments(b)
    b.set_defaults(func=cmd_bench)

    bc = sub.add_parser("bench-cohort", help="scans per minute of `synomaly cohort` with 1 and 2 workers")
    bc.add_argument("--scans", type=int, default=4, help="small volumes in the cohort (default 4)")
    bc.add_argument("--slices", type=int, default=40, help="slices of each 160 x 160 volume (default 40)")
    bc.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default 1 2)")
    add_detection_arguments(bc)
    bc.set_defaults(func=cmd_bench_cohort)

    bt = sub.add_parser("bench-train", help="training throughput and the noise's share of a step")
    bt.add_argument("--steps", type=int, default=20)
    bt.add_argument("--grid", type=int, default=64)
    bt.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128])
    bt.add_argument("--batch-size", type=int, default=16)
    bt.add_argument("--noise", default="synomaly", choices=["synomaly", "gaussian", "coarse"])
    bt.add_argument("--device", default="auto")
    bt.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    bt.set_defaults(func=cmd_bench_train)

    from .datasets import add_prepare_parser

    add_prepare_parser(sub)

    from .evaluate import add_evaluate_parser

    add_evaluate_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a sub-command, turning errors into messages and exit codes."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _install_signal_handlers()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("synomaly: interrupted; nothing was written", file=sys.stderr)
        return Cancelled.exit_code
    except SynomalyError as exc:
        print(f"{ERROR_PREFIX} {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # model file problems and the like come with their own messages
        from .modelio import ModelFileError

        if isinstance(exc, ModelFileError):
            print(f"{ERROR_PREFIX} {exc}", file=sys.stderr)
            return EXIT_MODEL
        if isinstance(exc, RuntimeError) and "device" in str(exc) and "requested" in str(exc):
            print(f"{ERROR_PREFIX} {exc}", file=sys.stderr)  # an unavailable --device
            return EXIT_INPUT
        if args.verbose:
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"{ERROR_PREFIX} unexpected {type(exc).__name__}: {first} (run with --verbose for the details)",
              file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
