"""The README's picture of `--vary-scans`: eight axial slices of the first training volume (MNI152) on the shipped
model's grid, as they are (top row) and after `synomaly.train.vary_scan` with seed 0 (bottom row).

    python scripts/vary-scan-figure.py Docs/evaluation/varied-scans/vary-scan.png
"""

import sys

import numpy as np
import torch
from skimage.io import imsave

from synomaly.modelio import read_card, shipped_models_dir
from synomaly.prepare import prepare_images_for_training
from synomaly.sampledata import resolve_data
from synomaly.train import vary_scan


def main(out: str) -> None:
    card = read_card(shipped_models_dir() / "brain-mri-axial.safetensors")
    x, m, _ = prepare_images_for_training(resolve_data(["healthy:train"])[:1], card)
    idx = torch.arange(40, x.shape[0], max(1, (x.shape[0] - 40) // 8))[:8]
    moved, _ = vary_scan(x[idx], m[idx], torch.Generator().manual_seed(0))
    row = lambda t: np.concatenate([t[i, 0].numpy() for i in range(len(idx))], 1)  # noqa: E731
    picture = np.concatenate([row(x[idx]), row(moved)], 0)
    imsave(out, ((picture + 1) / 2 * 255).clip(0, 255).astype(np.uint8))
    print(f"{out}: {len(idx)} slices, before (top) and after vary_scan (bottom)")


if __name__ == "__main__":
    main(sys.argv[1])
