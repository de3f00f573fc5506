#!/usr/bin/env python
"""Write a model whose weights lie on the line between two models of the same architecture:
(1 - alpha) * BASE + alpha * TUNED, with TUNED's card. alpha 1 is TUNED, alpha 0 is BASE's weights.

Weight-space interpolation of a fine-tuned network with the network it started from (WiSE-FT, Wortsman et
al., CVPR 2022) often keeps most of what the fine-tuning gained on the new data while giving back less
on the old. The card's thresholds belong to TUNED's weights, so calibrate and tune the result before use:
    python scripts/interpolate-weights.py BASE.safetensors TUNED.safetensors --alpha 0.5 -o OUT.safetensors
    synomaly calibrate OUT.safetensors --data ...
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "SynomalyDetect"))

from synomaly.errors import SynomalyError  # noqa: E402
from synomaly.modelio import ModelFileError, load_model, save_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("tuned")
    parser.add_argument("--alpha", type=float, required=True, help="weight of TUNED, 0-1")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    if not 0.0 <= args.alpha <= 1.0:
        parser.error("--alpha must lie in 0-1")
    try:  # load_model checks each file's weights against the network its card describes
        base, tuned = load_model(args.base, device="cpu"), load_model(args.tuned, device="cpu")
    except (SynomalyError, ModelFileError) as exc:
        parser.error(str(exc))
    a, b = base.network.state_dict(), tuned.network.state_dict()
    mismatch = [k for k in b if k not in a or a[k].shape != b[k].shape] + [k for k in a if k not in b]
    if mismatch:
        parser.error(f"the two models are not the same architecture (e.g. {mismatch[:3]})")
    mixed = {k: ((1.0 - args.alpha) * a[k].double() + args.alpha * b[k].double()).to(b[k].dtype)
             if b[k].is_floating_point() else b[k] for k in b}
    save_model(args.output, tuned.card, mixed)  # atomic: no half-written file on failure
    print(f"{args.output}: {len(mixed)} tensors, {1 - args.alpha:g} x {args.base} + {args.alpha:g} x {args.tuned}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
