"""`synomaly models`, `calibrate`, `tune`, `install-model`, `import-upstream` and `remove-model`: the registry."""

from __future__ import annotations

import json
from pathlib import Path

from ..card import PAIR_COMBINES
from ..contract import REGIONS
from ..errors import InputError
from ..sampledata import resolve_data
from .common import DATA_SPEC_HELP, check_open_unit, progress_for


def cmd_models(args) -> int:
    """List the registry's models with their cards."""
    from ..card import ModelCard
    from ..modelio import list_models, user_models_dir

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
    from ..calibrate import calibrate_model
    from ..modelio import resolve_model_path

    check_open_unit(args.fprs, "false-positive rates")
    paths = resolve_data(args.data)
    if not paths:
        raise InputError("no healthy scans found")
    target = args.output or resolve_model_path(args.model)
    cal = calibrate_model(args.model, paths, fprs=args.fprs, device=args.device,
                          description=args.data_description or "", progress=progress_for(args), output=target)
    for key, value in cal["thresholds"].items():
        print(f"FPR {key}: threshold {value:.4f} (measured {cal['measured_fpr_on_calibration_data'][key]:.2g})")
    print(f"calibration stored in {target}")
    return 0


def cmd_pair(args) -> int:
    """Pair two models' volume maps: calibrate the averaged map and write it into the first model's card."""
    from ..pairing import PAIR_FPRS, PAIR_MAX_HEALTHY_ML, pair_models

    if args.fprs:
        check_open_unit(args.fprs, "false-positive rates")
    rec = pair_models(args.model, args.partner, args.data, output=args.output,
                      max_healthy_ml=PAIR_MAX_HEALTHY_ML if args.max_healthy_ml is None else args.max_healthy_ml,
                      fprs=tuple(sorted(set(args.fprs), reverse=True)) if args.fprs else PAIR_FPRS,
                      outlines=not args.plain, allow_held_out=args.allow_held_out, device=args.device,
                      version=args.model_version, combine=args.combine, progress=progress_for(args))
    a = rec["pooled_auprc"]
    print(f"paired {rec['output']} with {rec['partner_file']} on {rec['lesion_cases']} volumes with {rec['lesions']} "
          f"implanted lesions ({rec['seconds']:.0f} s): pooled pixel AUPRC {a['first']:.3f} alone, {a['partner']:.3f} "
          f"the partner alone, {a['pair']:.3f} paired ({PAIR_COMBINES[rec['combine']]})")
    for row in rec["sweep"]:
        print(f"  {point_line(row)}{'  <- picked' if row == rec['picked'] else ''}")
    print(f"  rule: {rec['rule']}")
    return 0


def cmd_tune(args) -> int:
    """Choose the detection setting and operating point on synthetic lesions in healthy volumes."""
    from ..tune import TuneGrid, TuneOptions, point_words, setting_words, tune_model

    grid = TuneGrid()
    if args.quick:
        grid = TuneGrid(ts=(10, 25, 50, 100, 200), blurs=(3, 5, 7), ensembles=((10, 25, 50),), multi_top=1,
                        more_draws=3)
    if args.t:
        grid.ts = tuple(args.t)
    if args.blur:
        grid.blurs = tuple(args.blur)
    if args.ensembles is not None:
        grid.ensembles = tuple(tuple(int(v) for v in e.split("+")) for e in args.ensembles)
    if args.smooth is not None:
        grid.smooths = tuple(float(v) for v in args.smooth)
    if args.tissue_bins:
        from ..card import MAX_TISSUE_BINS

        if any(not 0 <= b <= MAX_TISSUE_BINS for b in args.tissue_bins):
            raise InputError(f"tissue classes must lie between 0 and {MAX_TISSUE_BINS}, got {args.tissue_bins}")
        grid.tissue_bins = tuple(sorted(set(args.tissue_bins) | {0}))
    if args.signed:
        grid.signed = (False, True)
    if args.level_maps is not None:
        grid.level_maps = tuple(dict.fromkeys(args.level_maps or ("healthy", "scan")))
    if args.mirror:
        from ..card import MAX_MIRROR_MM

        if any(not 0 < m <= MAX_MIRROR_MM for m in args.mirror):
            raise InputError(f"the mirror image's growth must lie in (0, {MAX_MIRROR_MM:g}] mm, got {args.mirror}")
        grid.mirror = tuple(float(m) for m in args.mirror)
    grid.mirror_only = bool(args.mirror_only)
    check_open_unit(args.fprs, "false-positive rates")
    check_open_unit(args.peak_fractions, "peak fractions")
    if args.single_stage:  # no multi-stage rows, no extra noise draws: the cheapest sweep of the grid
        grid.max_stages, grid.multi_top, grid.more_draws = 1, 0, 1
    opts = TuneOptions(forms=tuple(args.forms), lesions_per_volume=args.lesions, seed=args.seed,
                       batch_size=args.batch_size, grid=grid, max_healthy_ml=args.max_healthy_ml, region=args.region,
                       choose_by=args.choose_by, dice_top=args.dice_top,
                       **({"fprs": tuple(sorted(set(args.fprs), reverse=True))} if args.fprs else {}),
                       **({} if args.peak_fractions is None else {"peak_fractions": tuple(args.peak_fractions)}))
    rec = tune_model(args.model, args.data, output=args.output, options=opts, device=args.device,
                     description=args.data_description or "", version=args.model_version,
                     allow_held_out=args.allow_held_out, progress=progress_for(args))
    out = args.output or args.model
    best = rec["chosen"]
    for c in rec["candidates"]:
        print(f"  candidate {setting_words(c['row'])}: AUPRC {c['row']['auprc']:.3f}, mean Dice {c['dice_mean']:.3f} "
              f"at {point_words(c)}, at most {c['healthy_ml_max']:.2f} mL in a lesion-free volume")
    chosen = {"fpr": rec["chosen_fpr"], "grow_fpr": rec.get("chosen_grow_fpr"),
              "peak_fraction": rec.get("chosen_peak_fraction")}
    print(f"tuned {out} on {rec['lesion_cases']} volumes with {rec['lesions']} implanted lesions "
          f"({rec['seconds']['total']:.0f} s): {setting_words(best)}, "
          f"pooled pixel AUPRC {best['auprc']:.3f}; default {point_words(chosen)}")
    for p in rec["points"]:
        print(f"  {point_line(p)}")
    return 0


def point_line(p: dict) -> str:
    """One operating point of `synomaly tune` or `synomaly pair` in a line: its rate(s) and thresholds, the mean
    Dice, the most any lesion-free volume flags and the implanted lesions found."""
    from ..tune import point_words

    lf = p["lesions_found"]
    by = ", ".join(f"{k.replace('_', ' ')} {v['found']}/{v['of']}" for k, v in lf.items() if k != "all")
    return (f"{point_words(p, thresholds=True)}: mean Dice {p['dice_mean']:.3f}, "
            f"at most {p['healthy_ml_max']:.2f} mL flagged in a lesion-free volume; "
            f"lesions found {lf['all']['found']}/{lf['all']['of']} ({by})")


def cmd_install_model(args) -> int:
    """Copy a model file into the user model folder."""
    from ..modelio import install_model

    print(f"installed {install_model(args.file, args.name)}")
    return 0


def cmd_import_upstream(args) -> int:
    """Convert one of the Synomaly authors' checkpoints (.pt) into a model file with a card."""
    from ..modelio import MODEL_SUFFIX, read_card, user_models_dir
    from ..upstream import import_checkpoint

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
    from ..modelio import remove_model

    model, *partner = remove_model(args.name)
    print(f"removed {model}" + (f" and its partner model {partner[0].name}" if partner else ""))
    return 0


def add_parsers(sub) -> None:
    """Add models, calibrate, tune, install-model, import-upstream and remove-model to the sub-parsers."""
    m = sub.add_parser("models", help="list available models and their cards")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=cmd_models)

    c = sub.add_parser("calibrate", help="set thresholds from healthy scans (per-voxel false-positive rates)")
    c.add_argument("model", help="model name or file")
    c.add_argument("--data", nargs="+", required=True, help=DATA_SPEC_HELP)
    c.add_argument("--fprs", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4], metavar="RATE",
                   help="the per-voxel false-positive rates to set thresholds at (default 1e-2 1e-3 1e-4)")
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
    tu.add_argument("--lesions", type=int, default=6, help="lesions implanted per volume and form (default 6)")
    tu.add_argument("--t", type=int, nargs="+", help="noise levels to try (default 5 10 25 50 100 200 400)")
    tu.add_argument("--blur", type=int, nargs="+", help="blur kernels to try (default 3 5 7 9)")
    tu.add_argument("--quick", action="store_true", help="a small grid (about a quarter of the time)")
    tu.add_argument("--ensembles", nargs="*", metavar="T+T+T",
                    help="ensembles of noise levels to try, e.g. 10+25+50 (default: four; none with no value)")
    tu.add_argument("--smooth", type=float, nargs="*", metavar="MM",
                    help="smoothings of the map across slices to try on the best settings, sigma in mm "
                         "(default 2 3 4 6; none with no value)")
    tu.add_argument("--tissue-bins", type=int, nargs="+", metavar="N",
                    help="also try the best settings' maps normalised in N tissue classes of the healed image "
                         "(e.g. 8; default: not; not better on our held-out volumes, see the README)")
    tu.add_argument("--signed", action="store_true",
                    help="also try smoothing the signed difference across slices before its magnitude is taken "
                         "(default: not; not better on our held-out volumes, see the README)")
    tu.add_argument("--level-maps", nargs="*", choices=["healthy", "scan"],
                    help="also try each ensemble as one map per noise level, each in units of its healthy tail, "
                         "averaged: the tail measured on the healthy volumes (healthy) or in each scan (scan); "
                         "no value: both (default: not; see the README, Maps per noise level)")
    tu.add_argument("--mirror", type=float, nargs="+", metavar="MM",
                    help="also try the best settings' maps less their mirror image across the brain's midline (the "
                         "registered atlas's), that image grown by MM (e.g. 4): what both hemispheres show alike "
                         "cancels, and so would a lesion on the midline or two mirror-image lesions; needs "
                         "--region brain (default: not; see the README, The mirror map)")
    tu.add_argument("--mirror-only", action="store_true",
                    help="choose among the --mirror rows only (an experiment; see the README, The mirror map)")
    tu.add_argument("--choose-by", choices=["auprc", "dice"], default="auprc",
                    help="auprc: the setting with the best pooled pixel AUPRC on the implanted lesions (default); "
                         "dice: the --dice-top best by AUPRC each calibrated, and the one with the best mean Dice "
                         "that flags at most --max-healthy-ml in every lesion-free volume (costs one calibration each)")
    tu.add_argument("--dice-top", type=int, default=4, metavar="N",
                    help="how many settings --choose-by dice calibrates (default 4)")
    tu.add_argument("--peak-fractions", type=float, nargs="*", metavar="F",
                    help="also score every operating point with each lesion found outlined at this fraction of its "
                         "own peak (detect --peak-fraction; default 0.5; none with no value)")
    tu.add_argument("--single-stage", action="store_true",
                    help="score single-stage settings only (no multi-stage rows, no extra noise draws)")
    tu.add_argument("--max-healthy-ml", type=float, default=1.0,
                    help="the default FPR may flag at most this many mL in a lesion-free volume (default 1)")
    tu.add_argument("--fprs", type=float, nargs="+", metavar="RATE",
                    help="the per-voxel false-positive rates calibrated and scored as operating points (default "
                         "1e-2 1e-3 1e-4 1e-5); rates between those let the default come closer to --max-healthy-ml")
    tu.add_argument("--region", choices=REGIONS,
                    help="where maps are scored: foreground, or brain (a T1 brain atlas registered to each volume), or "
                         "brain-stripped (that brain also cut out before healing); default: the model's current "
                         "volume setting's")
    tu.add_argument("--allow-held-out", action="store_true",
                    help="accept the volumes kept for evaluation (ch2, robex, itk-t1) as tuning data, for a "
                         "leave-one-volume-out experiment; `synomaly evaluate` then refuses to test the card on them")
    tu.add_argument("--data-description", help="what the tuning volumes are (for the card)")
    tu.add_argument("--model-version", help="the tuned card's version (default: the model's; the weights are the same)")
    tu.add_argument("--seed", type=int, default=0)
    tu.add_argument("--batch-size", type=int, default=None,
                    help="slices per network call (default: the fastest, measured once on this machine)")
    tu.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    tu.add_argument("--progress", default="auto", choices=["auto", "bar", "json", "none"])
    tu.set_defaults(func=cmd_tune)

    pa = sub.add_parser("pair", help="volumes: average a second model's map with this one's; calibrates the "
                        "averaged map on tuning volumes and writes the pair into the first model's card")
    pa.add_argument("model", help="the first model (name or file): its counterfactual is the one shown")
    pa.add_argument("partner", help="the second model's file; copied beside the output")
    pa.add_argument("--data", nargs="+", default=["oasis"],
                    help="healthy tuning volumes, as `synomaly tune` takes them (default: oasis)")
    pa.add_argument("--max-healthy-ml", type=float, default=None,
                    help="the rate picked: the best Dice with every lesion-free tuning form at most this many mL "
                         "(default 0.2: a margin, since held-out scans flagged up to 6 times what tuning forms did)")
    pa.add_argument("--fprs", type=float, nargs="+", default=None, metavar="RATE",
                    help="the per-voxel false-positive rates to calibrate (default 1e-2 1e-3 3e-4 1e-4 3e-5 1e-5)")
    pa.add_argument("--plain", action="store_true",
                    help="pick among plain thresholds only (default: also each rate grown into a looser one and "
                         "lesions outlined at half their peak, as `synomaly tune` offers a single model)")
    pa.add_argument("--combine", choices=PAIR_COMBINES, default="mean",
                    help="how the two scan-scaled maps become one: their mean (default), or their geometric mean, "
                         "high only where both maps are")
    pa.add_argument("--allow-held-out", action="store_true", help="accept volumes kept for evaluation")
    pa.add_argument("-o", "--output", help="write the paired model here (default: update the first model's file)")
    pa.add_argument("--model-version", help="the paired card's version (default: the first model's)")
    pa.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    pa.add_argument("--progress", default="auto", choices=["auto", "bar", "json", "none"])
    pa.set_defaults(func=cmd_pair)

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
