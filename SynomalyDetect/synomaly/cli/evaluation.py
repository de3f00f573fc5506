"""`synomaly evaluate`: several methods on the same labelled data, and a report."""

from __future__ import annotations

import shlex
import sys

from ..progress import make_progress
from .common import add_setting_argument


def command_line(args) -> str:
    """The `synomaly evaluate` command that reproduces a run (from the parsed arguments)."""
    parts = ["synomaly", "evaluate"]
    for m in args.model or []:
        parts += ["--model", m]
    for m in args.method or []:
        parts += ["--method", m]
    if args.methods:
        parts += ["--methods", *args.methods]
    parts += ["--data", args.data, "-o", str(args.output), "--threshold-from", args.threshold_from]
    if args.threshold_from == "val":
        parts += ["--val-rule", args.val_rule, "--target-fpr", f"{args.target_fpr:g}"]
    elif args.fpr is not None:
        parts += ["--fpr", f"{args.fpr:g}"]
    parts += ["--bootstrap", str(args.bootstrap), "--seed", str(args.seed), "--min-size", f"{args.min_size:g}"]
    for flag, value in (("--t", args.t), ("--stages", args.stages), ("--blur", args.blur), ("--smooth", args.smooth),
                        ("--region", args.region), ("--limit", args.limit)):
        if value is not None:
            parts += [flag, str(value)]
    if args.data == "implanted":
        parts += ["--templates", *args.templates, "--val-templates", *args.val_templates, "--cases", str(args.cases),
                  "--val-cases", str(args.val_cases), "--healthy-every", str(args.healthy_every), "--forms", *args.forms]
    if args.device != "auto":
        parts += ["--device", args.device]
    return shlex.join(parts)


def add_evaluate_parser(subparsers) -> None:
    """`synomaly evaluate ...`: add the sub-command to the CLI's sub-parsers."""
    e = subparsers.add_parser(
        "evaluate", help="compare methods on labelled data: Dice, AUROC/AUPRC with bootstrap intervals, a report",
        description="Evaluate methods (model file + number of stages) on the same data with the same "
                    "post-processing. Thresholds come from the validation split or the model card, never the test "
                    "split. Data: a prepared dataset folder (synomaly prepare), 'br35h' (image level, fixed split, "
                    "reserved numbers >= 1050 never read) or 'implanted' (healthy templates with implanted lesions).")
    e.add_argument("--model", action="append", default=[],
                   help="model file or name; adds KIND-multi and KIND-single (KIND: synomaly, gaussian) or 'dae' "
                        "(coarse noise) by the card's noise kind (repeatable)")
    e.add_argument("--method", action="append", default=[], metavar="NAME=MODEL_FILE:STAGES",
                   help="an explicit method; STAGES a number or 'card' (repeatable)")
    e.add_argument("--methods", nargs="+", metavar="NAME", help="evaluate only these methods, in this order")
    e.add_argument("--data", required=True, help="prepared dataset folder, 'br35h' or 'implanted'")
    e.add_argument("-o", "--output", required=True, help="report folder (must not exist unless --overwrite)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    e.add_argument("--threshold-from", default="val", choices=["val", "card"],
                   help="choose pixel thresholds on the validation split (default) or take the card's calibration")
    e.add_argument("--val-rule", default="auto", choices=["auto", "dice", "fpr"],
                   help="validation rule: maximum Dice (needs masks), or a per-pixel FPR on healthy pixels; auto: "
                        "dice when validation masks hold anomalies")
    e.add_argument("--target-fpr", type=float, default=1e-3, help="per-pixel FPR of the 'fpr' rule (default 0.001)")
    e.add_argument("--fpr", type=float, help="with --threshold-from card: which calibrated FPR (default: 0.001 if "
                                             "calibrated, else the card's default threshold)")
    e.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0: no intervals)")
    e.add_argument("--baseline", metavar="NAME",
                   help="a method's name: report every other method's difference from it on the same test units, "
                        "with paired bootstrap intervals (e.g. a candidate model against the shipped one)")
    # the options a detection has are those of contract.DETECTION_SETTINGS (flag, type, default), here for every method
    add_setting_argument(e, "t", "noise level t for every diffusion method (default: each card's)")
    add_setting_argument(e, "max_stages", "stages of the automatic *-multi methods (default: each card's)", dest="stages")
    add_setting_argument(e, "blur_kernel", "blur kernel of the map for every method (default: each card's)", dest="blur")
    add_setting_argument(e, "smooth_mm", "volumes: smoothing of the map across slices for every method, sigma in mm "
                                         "(default: each card's)", dest="smooth")
    add_setting_argument(e, "region", "volumes: where every method's map is scored, foreground or brain (the registered "
                                      "atlas brain; default: each card's)")
    add_setting_argument(e, "min_lesion_mm3", "smallest lesion kept, mm^3 (mm^2 for 2D images)", dest="min_size")
    add_setting_argument(e, "seed", "seed of detection noise, implanted lesions and bootstrap")
    e.add_argument("--limit", type=int, help="at most N images per split (br35h: per class; implanted: volumes per "
                                             "template), for quick runs")
    e.add_argument("--templates", nargs="+", default=["ch2", "robex", "itk-t1"],
                   help="implanted: healthy volumes for the test split (default: those held out for evaluation, "
                        "ch2 robex itk-t1) or volume files; validation uses the tuning volume oasis")
    e.add_argument("--val-templates", nargs="+", default=["oasis"],
                   help="implanted: healthy volumes for the validation split (default: the tuning volume oasis)")
    e.add_argument("--cases", type=int, default=3,
                   help="implanted: test volumes per template and form, every 3rd lesion-free (default 3)")
    e.add_argument("--val-cases", type=int, default=2, help="implanted: validation volumes per form (default 2)")
    e.add_argument("--healthy-every", type=int, default=3,
                   help="implanted: every Nth volume has no lesion (default 3)")
    e.add_argument("--forms", nargs="+", default=["native", "brain", "oblique", "thick", "scaled"],
                   choices=["native", "brain", "oblique", "thick", "scaled"],
                   help="implanted: forms of each volume (default all five)")
    e.add_argument("--gallery", type=int, default=2, help="best and worst cases per method in the gallery")
    for name in ("batch_size", "device", "precision"):
        add_setting_argument(e, name)
    e.add_argument("--progress", default="auto", choices=["auto", "bar", "json", "none"])
    e.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    """Run `synomaly evaluate` and print where the report is, with one line per method."""
    from ..evalreport import ci_text, finite
    from ..evalruns import EvalSettings, select_methods
    from ..evalstats import METRICS
    from ..evaluate import run_evaluation

    methods = select_methods(args.model, args.method, args.methods, args.stages)
    if args.baseline is not None and args.baseline not in [m.name for m in methods]:
        from ..errors import InputError

        raise InputError(f"--baseline {args.baseline!r} is not one of the methods: "
                         f"{', '.join(m.name for m in methods)}")
    s = EvalSettings(threshold_from=args.threshold_from, val_rule=args.val_rule, target_fpr=args.target_fpr,
                     card_fpr=args.fpr, t=args.t, blur=args.blur, smooth=args.smooth, region=args.region,
                     min_size=args.min_size,
                     seed=args.seed, bootstrap=args.bootstrap, batch_size=args.batch_size, device=args.device,
                     precision=args.precision, gallery_k=args.gallery, baseline=args.baseline)
    progress = make_progress(args.progress)
    out = run_evaluation(methods, args.data, args.output, s, command=command_line(args), overwrite=args.overwrite,
                         limit=args.limit, templates=args.templates, cases=args.cases, val_cases=args.val_cases,
                         forms=args.forms, val_templates=args.val_templates, healthy_every=args.healthy_every,
                         progress=progress)
    lines = []
    for name, m in out["methods"].items():
        key = "dice_image" if "dice_image" in m["metrics"] else "image_auroc"
        lines.append(f"{name}: threshold {m['threshold']:.4g} ({m['threshold_source']}); "
                     f"{METRICS[key][1]} {ci_text(m['metrics'][key])}")
    if args.progress == "json":
        progress("done", 1, 1, f"report written to {out['files']['report.md']}", outputs=out["files"],
                 methods=finite(out["methods"]))
    else:
        print("\n".join(lines))
        print(f"report: {out['files']['report.md']}", file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    """Add evaluate to the sub-parsers."""
    add_evaluate_parser(sub)
