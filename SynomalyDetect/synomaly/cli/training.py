"""`synomaly train`, `slim-checkpoint` and `bench-train`: models from healthy scans."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from ..errors import InputError
from ..sampledata import resolve_data
from .common import DATA_SPEC_HELP, progress_for


def _leave_torchrun_process(code: int) -> NoReturn:
    """End a torchrun worker without interpreter finalisation. Its work is done and written (the process group
    is destroyed, the model file and checkpoint are closed); what is left is tearing down gloo's worker threads,
    which now and then aborts a rank at exit ("terminate called without an active exception", SIGABRT) and turns
    a finished run into a failed one. os._exit skips that teardown; the streams are flushed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


#: The options that make a run's objective (which noise levels, what blobs, the loss weighting, the augmentation),
#: with their flags: a fine-tune (--base) or a resumed run (--resume) that does not name one keeps the base model's
#: or the checkpoint's value, since weights trained for low-noise detection with lesion-strength blobs lose that
#: under the plain objective; a new model gets TrainingSettings' defaults.
RECIPE = {"contrast_remap": "--contrast-remap", "vary_scans": "--vary-scans",
          "vary_volumes_only": "--vary-volumes-only", "t_max": "--t-max",
          "lesion_blobs": "--lesion-blobs", "lesion_amplitude": "--lesion-amplitude",
          "min_snr_gamma": "--min-snr-gamma"}


def training_recipe(args, inherited: dict) -> tuple[dict, list[str]]:
    """The recipe options for TrainingSettings: each as given on the command line, else `inherited`'s (a base
    card's or a checkpoint's recorded settings), else the default; with the words for those inherited."""
    from ..settings import TrainingSettings

    recipe, taken = {}, []
    for field, flag in RECIPE.items():
        value = getattr(args, field)
        if value is None and field in inherited:
            value = inherited[field]
            if isinstance(value, bool):
                taken.append(flag if value else "--no-" + flag[2:])
            else:
                words = " ".join(f"{v:g}" for v in value) if field == "lesion_amplitude" else f"{value:g}"
                taken.append(f"{flag} {words}")
        elif value is None:
            value = getattr(TrainingSettings, field)
        recipe[field] = tuple(value) if field == "lesion_amplitude" else value
    return recipe, taken


def cmd_train(args) -> int:
    """Train from scratch or fine-tune a base model on healthy scans."""
    from ..card import ModelCard
    from ..modelio import load_model
    from ..train import TrainingSettings, new_card, split_scans, train

    paths = resolve_data(args.data)
    if not paths:
        raise InputError("no training data found")
    val_paths = resolve_data(args.val_data) if args.val_data else []
    if not val_paths:
        paths, val_paths = split_scans(paths, args.val_fraction, args.seed)
    base_state, resumed, inherited, source = None, None, {}, ""
    base = load_model(args.base, device="cpu") if args.base else None
    if args.resume:  # the run itself: its checkpoint's recipe (and, without --base, its card)
        from ..train import load_checkpoint

        resumed = load_checkpoint(args.resume)
        inherited, source = dict(resumed.get("settings") or {}), "the checkpoint's"
    elif base is not None:
        inherited, source = dict((base.card.training or {}).get("settings") or {}), f"{base.card.name}'s"
    recipe, taken = training_recipe(args, inherited)
    if taken:
        print(f"training with {source} recipe: {' '.join(taken)} (name an option to change it)", file=sys.stderr)
    settings = TrainingSettings(
        iterations=args.iterations, batch_size=args.batch_size, lr=args.lr, lr_decay=args.lr_decay, seed=args.seed,
        device=args.device, precision=args.precision, checkpoint_every=args.checkpoint_every,
        validate_every=args.checkpoint_every, **recipe,
    )
    if base is not None:
        card = base.card.copy() if args.grid in (None, base.card.grid_size) else base.card.at_grid(args.grid)
        card.training = {"name_of_base": base.card.name}
        if args.name:
            card.name = args.name
        if args.description:
            card.description = args.description
        base_state = {k: v.detach().cpu() for k, v in base.network.state_dict().items()}
    elif resumed is not None:
        card = ModelCard.from_json(resumed["card"])
    else:
        card = new_card(
            args.name or Path(args.output).name.split(".")[0], grid=args.grid or 64,
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
    from ..train import distributed_from_environment

    world = distributed_from_environment()
    if world.world_size > 1 and world.rank == 0:
        print(f"torchrun: world size {world.world_size}; each process computes its share of every global batch "
              f"of {settings.batch_size}; rank 0 writes checkpoints and the model file", file=sys.stderr)
    summary = train(card, paths, val_paths, args.output, settings, base_state=base_state, resume=resumed,
                    checkpoint=args.checkpoint, progress=progress_for(args), data_description=description)
    if summary["rank"] != 0:
        _leave_torchrun_process(0)  # rank 0 calibrates, tunes and reports
    if args.tune_data:  # label-free tuning on healthy volumes, then calibration under the chosen setting
        from ..tune import tune_model

        tune_model(args.output, args.tune_data, progress=progress_for(args))
    elif not args.no_calibrate and val_paths:
        from ..calibrate import calibrate_model

        calibrate_model(args.output, val_paths, progress=progress_for(args))
    print(json.dumps({k: v for k, v in summary.items() if k != "validation_paths"}, indent=None))
    on = f" on {summary['world_size']} processes" if summary["world_size"] > 1 else ""
    print(f"model written to {args.output} ({summary['it_per_s']:.2f} iterations/s{on}, "
          f"noise {100 * summary['noise_fraction']:.1f} % of step time)", file=sys.stderr)
    if summary["world_size"] > 1:
        _leave_torchrun_process(0)
    return 0


def cmd_slim_checkpoint(args) -> int:
    """Write a checkpoint without optimizer state (small enough to keep in a repository)."""
    from ..train import load_checkpoint, slim_checkpoint

    out = slim_checkpoint(args.checkpoint, args.output)
    state = load_checkpoint(out)
    print(f"{out}: iteration {state['iteration']}, {out.stat().st_size / 1e6:.1f} MB (no optimizer state)")
    return 0


def cmd_snapshot(args) -> int:
    """Write the EMA weights of a training checkpoint as a model file (a snapshot of a run still going)."""
    from ..train import model_from_checkpoint

    out = model_from_checkpoint(args.checkpoint, args.output, weights=args.weights)
    print(f"{out}: the {'EMA' if args.weights == 'ema' else 'raw'} weights of {args.checkpoint}")
    return 0


def cmd_bench_train(args) -> int:
    """Training throughput at the default recipe: iterations per second and the noise's share of a step."""
    import time

    import torch

    from ..train import Trainer, TrainingSettings, new_card

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


#: How the recipe options' help says that a fine-tune or a resumed run keeps its source's value (RECIPE).
_KEPT = "or with --base or --resume the base model's or the checkpoint's"


def add_parsers(sub) -> None:
    """Add train, slim-checkpoint, snapshot and bench-train to the sub-parsers."""
    from ..settings import TrainingSettings  # plain data, no torch: the defaults are written once, there

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
    t.add_argument("--lr-decay", type=int, default=TrainingSettings.lr_decay, metavar="STEPS",
                   help="bring the learning rate linearly to zero over the last STEPS iterations (a cool-down, for "
                        "example of a constant-rate run continued with --resume; default 0: constant after warm-up)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    t.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    t.add_argument("--contrast-remap", type=float, metavar="P",
                   help="share of training images given a random contrast curve, so that T2/FLAIR-like "
                        "intensities are seen (0-1; default 0, " + _KEPT + ")")
    t.add_argument("--vary-scans", type=float, metavar="P",
                   help="share of training images given a random pose and shape (rotation, scaling, a smooth "
                        "warp), coil shading and noise, so that averaged templates (most of the shipped model's "
                        "training volumes) look more like one person's scan (0-1; default 0, " + _KEPT + ")")
    t.add_argument("--vary-volumes-only", action=argparse.BooleanOptionalAction,
                   help="apply --vary-scans to slices of volumes only, not to 2D images (each of which is already one "
                        "person's scan; default: to all, " + _KEPT + ")")
    t.add_argument("--t-max", type=int, metavar="T",
                   help="train on noise levels below this only, around those detection uses (default: all, "
                        + _KEPT + ")")
    t.add_argument("--lesion-blobs", type=float, metavar="P",
                   help="share of training images whose Synomaly blobs have the strength of a real lesion in image "
                        "units at every noise level, not Synomaly's (u + offset) in noise units, which fades to about "
                        "0.05 at the low noise levels detection on volumes uses (0-1; default 0, " + _KEPT + ")")
    t.add_argument("--lesion-amplitude", type=float, nargs=2, metavar=("LO", "HI"),
                   help="range of that strength in model units, [-1, 1] scale (default 0.2 1.2, " + _KEPT + ")")
    t.add_argument("--min-snr-gamma", type=float, metavar="G",
                   help="weight each image's loss by min(SNR, G) / SNR (min-SNR weighting; an x0 loss at low noise, "
                        "needed with --lesion-blobs; 0 = plain noise MSE, the default; 5 is usual; " + _KEPT + ")")
    t.add_argument("--name", help="model name (default: output file name)")
    t.add_argument("--description", default="")
    t.add_argument("--model-version", help="version written into the card (default: the base model's, or 0.1.0)")
    t.add_argument("--data-description", help="what the training data is (no patient identifiers)")
    t.add_argument("--grid", type=int, help="in-plane model grid (pixels; default 64, or the base model's; with "
                   "--base another grid fine-tunes the same network there: its noise and blur are scaled, its "
                   "thresholds and tuned setting dropped)")
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

    sc = sub.add_parser("slim-checkpoint", help="copy a training checkpoint without its optimizer state")
    sc.add_argument("checkpoint")
    sc.add_argument("-o", "--output", required=True)
    sc.set_defaults(func=cmd_slim_checkpoint)

    sn = sub.add_parser("snapshot", help="write the EMA weights of a training checkpoint as a model file "
                        "(for a run still going)")
    sn.add_argument("checkpoint")
    sn.add_argument("-o", "--output", required=True, help="model file to write (.safetensors)")
    sn.add_argument("--weights", default="ema", choices=["ema", "model"],
                    help="the EMA weights (default) or the raw weights of the last step (early in a fine-tuning "
                         "run the EMA still holds much of the base model)")
    sn.set_defaults(func=cmd_snapshot)

    bt = sub.add_parser("bench-train", help="training throughput and the noise's share of a step")
    bt.add_argument("--steps", type=int, default=20)
    bt.add_argument("--grid", type=int, default=64)
    bt.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128])
    bt.add_argument("--batch-size", type=int, default=16)
    bt.add_argument("--noise", default="synomaly", choices=["synomaly", "gaussian", "coarse"])
    bt.add_argument("--device", default="auto")
    bt.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    bt.set_defaults(func=cmd_bench_train)
