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

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("tuned")
    parser.add_argument("--alpha", type=float, required=True, help="weight of TUNED, 0-1")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    if not 0.0 <= args.alpha <= 1.0:
        parser.error("--alpha must lie in 0-1")
    with safe_open(args.base, "pt") as a, safe_open(args.tuned, "pt") as b:
        if set(a.keys()) != set(b.keys()):
            parser.error("the two models do not have the same tensors: not the same architecture")
        metadata = b.metadata()
        out = {}
        for key in b.keys():
            x, y = a.get_tensor(key), b.get_tensor(key)
            if x.shape != y.shape:
                parser.error(f"{key}: shapes {tuple(x.shape)} and {tuple(y.shape)} differ")
            mixed = (1.0 - args.alpha) * x.double() + args.alpha * y.double() if y.is_floating_point() else y
            out[key] = mixed.to(y.dtype).contiguous()
    save_file(out, args.output, metadata=metadata)
    print(f"{args.output}: {len(out)} tensors, {1 - args.alpha:g} x {args.base} + {args.alpha:g} x {args.tuned}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
