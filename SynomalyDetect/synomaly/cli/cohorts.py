"""`synomaly cohort`, `cohort-report` and `bench-cohort`: many scans, resumable, in parts."""

from __future__ import annotations

import os
import sys

from ..errors import Cancelled, InputError
from .common import add_detection_arguments, add_result_arguments, detection_settings, progress_for


def cmd_cohort(args) -> int:
    """Detect in every scan of a cohort (or one part of it, for a job array) into OUTDIR/<scan id>/."""
    from ..cohort import CohortFailures, CohortOptions, find_scans, resolve_part, run_cohort

    settings = detection_settings(args).validate()  # a bad option is refused before any work
    part, parts, source = resolve_part(args.num_parts, args.part_id)
    scans = find_scans(args.scans)
    if not scans:
        raise InputError("no scans found")
    options = CohortOptions(num_parts=parts, part_id=part, workers=args.workers, expect=args.expect,
                            compress=args.compress)
    print(f"cohort of {len(scans)} scans; part {part} of {parts} (0-based, from {source}); "
          f"{args.workers} worker(s)", file=sys.stderr)
    progress = progress_for(args)
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
    from ..cohort import cohort_report

    rep = cohort_report(args.outdir, top=args.top)
    print(rep["summary"], end="")
    print(f"table: {rep['csv']}; summary: {rep['summary_file']}; largest findings: {rep['overview']}")
    return 0


def cmd_bench_cohort(args) -> int:
    """Scans per minute of `synomaly cohort` with 1, 2, ... workers, and the time per scan outside the network."""
    import tempfile

    import torch

    from ..cohort import bench_cohort

    settings = detection_settings(args).validate()
    with tempfile.TemporaryDirectory() as tmp:
        figures = bench_cohort(args.model, settings, tmp, scans=args.scans, slices=args.slices,
                               worker_counts=tuple(args.workers), progress=progress_for(args))
    print(f"cohort of {args.scans} volumes of 160 x 160 x {args.slices} (MNI152 resampled, noise added); "
          f"model {args.model}; {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads in all")
    for f in figures:
        print(f"{f['workers']} worker(s) on {f['device']}: {f['scans_per_minute']:.2f} scans per minute "
              f"({f['wall_seconds']:.1f} s for {f['scans']} scans, model loading and process start included); "
              f"per scan {f['seconds_per_scan']:.2f} s, of which {f['network_seconds_per_scan']:.2f} s in the "
              f"network and {f['overhead_per_scan']:.2f} s outside it")
    return 0


def add_parsers(sub) -> None:
    """Add cohort, cohort-report and bench-cohort to the sub-parsers."""
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

    bc = sub.add_parser("bench-cohort", help="scans per minute of `synomaly cohort` with 1 and 2 workers")
    bc.add_argument("--scans", type=int, default=4, help="small volumes in the cohort (default 4)")
    bc.add_argument("--slices", type=int, default=40, help="slices of each 160 x 160 volume (default 40)")
    bc.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default 1 2)")
    add_detection_arguments(bc)
    bc.set_defaults(func=cmd_bench_cohort)
