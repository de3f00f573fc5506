"""`synomaly detect`, `demo` and `bench`: anomalies in one scan at a time."""

from __future__ import annotations

import logging
from pathlib import Path

from ..contract import DEMO_FILE, DEMO_TRUTH_FILE
from ..errors import InputError
from .common import add_detection_arguments, add_result_arguments, check_writable, detection_settings, progress_for

log = logging.getLogger("synomaly")


def cmd_detect(args) -> int:
    """Detect anomalies in one scan and write the outputs."""
    from ..modelio import load_model
    from ..outputs import amount_text, detect_to_folder
    from ..prepare import read_scan

    progress = progress_for(args)
    settings = detection_settings(args).validate()  # a bad option is refused before any work
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        from ..errors import OutputError

        raise OutputError(f"{out} already exists; choose another folder or pass --overwrite")
    check_writable(out)
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


def cmd_demo(args) -> int:
    """Run detection with the shipped model on sample data that needs no download."""
    import tempfile

    from ..detect import detect
    from ..modelio import load_model
    from ..outputs import amount_text, write_results
    from ..prepare import read_image
    from ..sampledata import br35h_images, demo_case

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        from ..errors import OutputError

        raise OutputError(f"{out} already exists; choose another folder or pass --overwrite")
    model = load_model(args.model, device=args.device, precision=args.precision)
    settings = detection_settings(args)
    progress = progress_for(args)
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

                from ..metrics import dice

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

    from ..detect import detect
    from ..modelio import load_model
    from ..outputs import write_results
    from ..prepare import read_image
    from ..sampledata import demo_volume

    with tempfile.TemporaryDirectory() as tmp:
        vol = demo_volume(tmp, (240, 240, 155))
        vol_path = Path(tmp) / "bench.nii.gz"
        sitk.WriteImage(vol, str(vol_path))
        model = load_model(args.model, device=args.device, precision=args.precision)
        settings = detection_settings(args)
        if args.replan and settings.batch_size is None:
            from ..plan import execution_plan

            execution_plan(model, refresh=True)  # re-measured, and cached again
            if model.card.partner_3d is not None and not settings.single_model:
                from ..modelio import load_partner

                execution_plan(load_partner(model), refresh=True)
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
                # the report counts both networks when the card pairs volumes with a partner
                results.append((wall, result.report["network_calls"], result.report["network_seconds"], result.report))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    wall = sorted(r[0] for r in results)[len(results) // 2]
    best = min(results, key=lambda r: r[0])
    rep = best[3]
    print(f"volume: 240 x 240 x 155, {rep['slices_analysed']} slices with foreground; model {model.card.name} "
          f"on {model.device} ({rep['precision']}), {rep['stages_per_slice_mean']:.2f} stages per slice")
    print(f"seconds per volume, end to end (read, detect, write): {wall:.2f} (median of {len(results)})")
    plan = model.plan
    if plan is not None:
        tried = ", ".join(f"{k.replace('/cl', ' channels-last').replace('/c', '')}: {v * 1000:.1f}"
                          for k, v in sorted(plan.trials.items(), key=lambda kv: kv[1]))
        print(f"execution plan: {plan.describe()}" + (f"; ms per slice by batch: {tried}" if tried else ""))
    if rep.get("partner"):
        from ..modelio import load_partner

        p_plan = load_partner(model).plan
        print(f"paired with {rep['partner']['file']} ({rep['partner']['map']}): {rep['partner']['network_calls']} "
              f"network calls, {rep['partner']['network_seconds']:.2f} s inside its network"
              + (f"; its execution plan: {p_plan.describe()}" if p_plan is not None else ""))
    batch = settings.batch_size or (plan.batch_size if plan is not None else "?")
    print(f"network calls: {best[1]} (batches of up to {batch}{' and the partner' if rep.get('partner') else ''}), "
          f"time inside the network{'s' if rep.get('partner') else ''}: "
          f"{best[2]:.2f} s = {100 * best[2] / best[0]:.1f} % of wall time")
    print(f"stage times: " + ", ".join(f"{k} {v:.2f} s" for k, v in rep['seconds'].items()))
    print(f"peak RSS: {peak / 1024:.2f} GB")
    return 0


def add_parsers(sub) -> None:
    """Add detect, demo and bench to the sub-parsers."""
    d = sub.add_parser("detect", help="find anomalies in a scan")
    d.add_argument("input", help="NIfTI/NRRD/MHA file, DICOM series folder, or a 2D image")
    d.add_argument("-o", "--output", required=True, help="output folder (must not exist unless --overwrite)")
    d.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    d.add_argument("--series", help="DICOM series UID when the folder holds several")
    add_result_arguments(d)
    add_detection_arguments(d)
    d.set_defaults(func=cmd_detect)

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
    b.add_argument("--replan", action="store_true",
                   help="measure the execution plan again (after a probe that ran on a busy machine)")
    add_detection_arguments(b)
    b.set_defaults(func=cmd_bench)
