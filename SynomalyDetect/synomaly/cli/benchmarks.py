"""`synomaly bench-authors`: the engine against a re-implementation of the authors' loop, same weights, one run."""

from __future__ import annotations

from ..progress import make_progress


def cmd_bench_authors(args) -> int:
    from ..authorsloop import bench_slices, brats_model, compare, network_parameters
    from ..modelio import load_model

    if args.model:
        model = load_model(args.model, device=args.device, precision=args.precision)
    else:
        model = brats_model(device=args.device, precision=args.precision, seed=args.seed)
    x0, mask = bench_slices(model, args.slices)
    card = model.card
    t = args.t if args.t is not None else int(card.detection.t)
    kernel = args.blur if args.blur is not None else int(card.detection.blur_kernel)
    result = compare(model, x0, mask, t=t, kernel=kernel, threshold=args.threshold, stages=args.stages,
                     rounds=args.rounds, seed=args.seed, batch_size=args.batch_size,
                     progress=make_progress(args.progress), replan=args.replan)
    precision = str(model.dtype).replace("torch.", "") if model.dtype is not None else "float32"
    name = f"{card.name} ({network_parameters(model):.1f} M parameters, {card.grid_size} x {card.grid_size})"
    for line in result.lines(f"{model.device} ({precision})", name):
        print(line)
    return 0


def add_parsers(sub) -> None:
    """Add bench-authors to the sub-parsers."""
    b = sub.add_parser("bench-authors", help="time the engine against the authors' loop (re-implemented) on the "
                       "same weights and slices, and print the speed-up")
    b.add_argument("--model", help="model name or file (default: the authors' BraTS network, 98.6 M parameters, "
                   "128 x 128, seeded random weights; an imported authors' checkpoint times the same)")
    b.add_argument("--slices", type=int, default=6, help="slices from the middle of the sample volume (default 6)")
    b.add_argument("--stages", type=int, default=5, help="stages per slice, all run on both sides (default 5)")
    b.add_argument("--rounds", type=int, default=2, help="interleaved timed rounds after one warm-up (default 2)")
    b.add_argument("--t", type=int, help="noise level (default: the model's)")
    b.add_argument("--blur", type=int, help="blur kernel (default: the model's)")
    b.add_argument("--threshold", type=float, default=0.0,
                   help="map threshold of the fusion (default 0: timing does not depend on it)")
    b.add_argument("--batch-size", type=int, default=None, help="engine's slices per call (default: the plan's)")
    b.add_argument("--replan", action="store_true", help="measure the engine's execution plan again")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    b.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    b.add_argument("--progress", default="auto", choices=["auto", "bar", "json", "none"])
    b.set_defaults(func=cmd_bench_authors)
