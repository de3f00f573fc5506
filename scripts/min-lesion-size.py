"""Where a tuned card's false alarms in lesion-free volumes are, and whether a larger minimum lesion size helps.

Tuning data only (the tuning volumes' implanted lesions and untouched forms, as `synomaly tune` builds them): the
network runs once under the card's tuned volume setting, then every calibrated operating point is scored again for
each minimum lesion size (`--min-size`, mm^3; detection's default is 50), printing the point `synomaly tune` would
choose within 1 mL and, per rate, the mL flagged in each lesion-free form. Usage:
    python scripts/min-lesion-size.py TUNED_MODEL [--data oasis] [--sizes 50 200 500 1000 2000]
"""

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "SynomalyDetect"))

from synomaly import tune  # noqa: E402
from synomaly.modelio import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model file whose card holds a tuning record (synomaly tune)")
    parser.add_argument("--data", nargs="+", default=["oasis"], help="tuning volumes (default: oasis)")
    parser.add_argument("--sizes", type=float, nargs="+", default=[50, 200, 500, 1000, 2000])
    args = parser.parse_args()
    model = load_model(args.model, device="cpu")
    record = model.card.tuning or {}
    if "chosen" not in record:
        sys.exit(f"{args.model}: its card has no tuned setting (run synomaly tune first)")
    row = record["chosen"]
    # the tuning's own cases, rates and bound, so that the default size reproduces the card's choice
    rates = tuple(sorted((float(r) for r in model.card.calibration_3d["thresholds"]), reverse=True))
    opts = tune.TuneOptions(region=record.get("region") or "brain", lesions_per_volume=record["lesions_per_volume"],
                            forms=tuple(record["forms"]), seed=record["seed"], fprs=rates,
                            max_healthy_ml=float(record["max_healthy_ml"]))
    lesion_cases, healthy_cases = tune.build_cases(tune.load_tune_volumes(args.data), model.card, opts)
    print(f"{args.model}: {tune.setting_words(row)}; lesion-free forms: {', '.join(c.name for c in healthy_cases)}")
    runs: dict = {}  # the network's results, reused for every size
    for size in args.sizes:
        _, points = tune.operating_points(model, lesion_cases, healthy_cases, row,
                                          replace(opts, min_lesion_mm3=size), runs=runs)
        p = tune.choose_fpr(points, opts.max_healthy_ml)
        found = p["lesions_found"]
        print(f"minimum {size:g} mm^3: chosen {tune.point_words(p)}: mean Dice {p['dice_mean']:.3f}, at most "
              f"{p['healthy_ml_max']:.2f} mL lesion-free, lesions found {found['all']['found']}/{found['all']['of']} "
              f"(darker {found['darker']['found']}/{found['darker']['of']})")
        for q in points:
            if q["grow_fpr"] is None and q["peak_fraction"] is None:
                print(f"    FPR {q['fpr']}: mean Dice {q['dice_mean']:.3f}, mL per lesion-free form "
                      f"{' '.join(f'{v:.2f}' for v in q['healthy_ml_per_case'])}")


if __name__ == "__main__":
    main()
