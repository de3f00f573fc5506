"""Synomaly noise matches its definition (DESIGN.md) for the paper's settings."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from synomaly.noise import coarse_noise, synomaly_noise


def _blob_stats(mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    counts, areas, cover = [], [], []
    for m in mask[:, 0].numpy():
        lab, n = ndimage.label(m)
        counts.append(n)
        areas.extend(np.bincount(lab.ravel())[1:].tolist())
        cover.append(m.mean())
    return np.array(counts), np.array(areas), np.array(cover)


@pytest.mark.parametrize(
    "sigma,tau,count,count_range,median_area,coverage",
    [(3.0, 175.0, 30, (15, 45), 28, 0.10), (7.0, 150.0, 8, (3, 13), 240, 0.30)],
)
def test_blob_statistics_match_reference(sigma, tau, count, count_range, median_area, coverage):
    gen = torch.Generator().manual_seed(1)
    _, mask = synomaly_noise((300, 1, 128, 128), sigma=sigma, tau=tau, generator=gen, return_mask=True)
    counts, areas, cover = _blob_stats(mask)
    assert abs(counts.mean() - count) / count < 0.15
    lo, hi = np.percentile(counts, [5, 95])
    assert count_range[0] - 3 <= lo and hi <= count_range[1] + 3
    assert abs(np.median(areas) - median_area) / median_area < 0.2
    assert abs(cover.mean() - coverage) < 0.03
    assert (counts >= 1).all(), "the min-max stretch reaches 255, so every image has a blob"


def test_amplitude_is_u_plus_offset_inside_blobs_and_zero_outside():
    gen = torch.Generator().manual_seed(2)
    n = 400
    e_gen = torch.Generator().manual_seed(2)
    eps, mask = synomaly_noise((n, 1, 64, 64), sigma=1.5, tau=175, offset=0.5, generator=gen, return_mask=True)
    e = torch.randn((n, 1, 64, 64), generator=e_gen)  # the same first draw as inside the generator
    added = eps - e
    assert torch.allclose(added[~mask], torch.zeros(1), atol=1e-6)
    per_image = torch.stack([added[i][mask[i]].mean() for i in range(n)])
    spread = torch.stack([added[i][mask[i]].std() if mask[i].sum() > 1 else torch.tensor(0.0) for i in range(n)])
    assert (spread < 1e-5).all(), "one amplitude per image"
    assert per_image.min() >= 0.5 - 1e-6 and per_image.max() <= 1.5 + 1e-6
    # u ~ U(0, 1): the amplitudes are uniform on [0.5, 1.5]
    assert abs(per_image.mean().item() - 1.0) < 0.05
    assert abs(per_image.std().item() - (1 / 12) ** 0.5) < 0.03


@pytest.mark.parametrize("polarity,expected", [("brighter", {1.0}), ("darker", {-1.0}), ("both", {-1.0, 1.0})])
def test_polarity(polarity, expected):
    gen = torch.Generator().manual_seed(3)
    e_gen = torch.Generator().manual_seed(3)
    eps, mask = synomaly_noise((200, 1, 32, 32), sigma=1.0, tau=175, polarity=polarity, generator=gen,
                               return_mask=True)
    added = eps - torch.randn((200, 1, 32, 32), generator=e_gen)
    signs = {float(torch.sign(added[i][mask[i]].mean())) for i in range(200) if mask[i].any()}
    assert signs == expected


def test_anatomy_mask_keeps_blobs_inside():
    gen = torch.Generator().manual_seed(4)
    anatomy = torch.zeros((50, 1, 64, 64), dtype=torch.bool)
    anatomy[:, :, 16:48, 16:48] = True
    _, mask = synomaly_noise((50, 1, 64, 64), sigma=1.5, tau=150, anatomy_mask=anatomy, generator=gen,
                             return_mask=True)
    assert mask.any()
    assert not (mask & ~anatomy).any()


def test_noise_is_made_on_the_requested_device_and_reproducible():
    a = synomaly_noise((4, 1, 32, 32), generator=torch.Generator().manual_seed(5), device="cpu")
    b = synomaly_noise((4, 1, 32, 32), generator=torch.Generator().manual_seed(5), device="cpu")
    assert a.device.type == "cpu" and torch.equal(a, b)


def test_coarse_noise_is_smooth_and_scaled():
    gen = torch.Generator().manual_seed(6)
    n = coarse_noise((64, 1, 64, 64), scale=8, std=0.2, generator=gen)
    assert n.shape == (64, 1, 64, 64)
    assert 0.1 < n.std().item() < 0.25
    # neighbouring pixels are strongly correlated (low-frequency noise), unlike white noise
    corr = torch.corrcoef(torch.stack([n[..., :-1].flatten(), n[..., 1:].flatten()]))[0, 1]
    assert corr > 0.9
