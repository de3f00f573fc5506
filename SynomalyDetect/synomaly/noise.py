"""Noise for training and inference: Synomaly noise, Gaussian noise, coarse noise (Kascenas et al.)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .filters import gaussian_blur


def synomaly_parts(
    shape: tuple[int, int, int, int],
    *,
    sigma: float = 3.0,
    tau: float = 175.0,
    polarity: str = "brighter",
    anatomy_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The parts of Synomaly noise for a batch (N, 1, H, W): Gaussian noise e, blob mask M (float 0/1),
    polarity d (N, 1, 1, 1, +-1) and u ~ U(0, 1) (N, 1, 1, 1), all on `device`.

    M = minmax_0..255(GaussianBlur(e, sigma)) > tau per image, restricted to `anatomy_mask` (bool) when given.
    """
    device = torch.device(device)
    n = shape[0]
    e = torch.randn(shape, generator=generator, device=device)
    b = gaussian_blur(e, sigma)
    flat = b.reshape(n, -1)
    lo = flat.min(dim=1).values.view(n, 1, 1, 1)
    hi = flat.max(dim=1).values.view(n, 1, 1, 1)
    s = (b - lo) / (hi - lo).clamp_min(1e-12) * 255.0
    mask = s > tau
    if anatomy_mask is not None:
        mask = mask & anatomy_mask.to(device=device, dtype=torch.bool)
    u = torch.rand((n, 1, 1, 1), generator=generator, device=device)
    if polarity == "brighter":
        d = torch.ones((n, 1, 1, 1), device=device)
    elif polarity == "darker":
        d = -torch.ones((n, 1, 1, 1), device=device)
    elif polarity == "both":
        d = torch.randint(0, 2, (n, 1, 1, 1), generator=generator, device=device).float() * 2 - 1
    else:
        raise ValueError(f"polarity must be 'brighter', 'darker' or 'both', not {polarity!r}")
    return e, mask.float(), d, u


def synomaly_noise(
    shape: tuple[int, int, int, int],
    *,
    sigma: float = 3.0,
    tau: float = 175.0,
    offset: float = 0.5,
    polarity: str = "brighter",
    anatomy_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    return_mask: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Synomaly noise eps_syn = e + d (u + offset) M for a batch (N, 1, H, W), all on `device`.

    e ~ N(0, I); M = minmax_0..255(GaussianBlur(e, sigma)) > tau per image; u ~ U(0, 1) once per
    image; d = +1 (brighter), -1 (darker) or a random sign per image (both). M is restricted to
    `anatomy_mask` (N, 1, H, W, bool) when given.
    """
    e, mask, d, u = synomaly_parts(shape, sigma=sigma, tau=tau, polarity=polarity, anatomy_mask=anatomy_mask,
                                   generator=generator, device=device)
    eps = e + d * (u + offset) * mask
    return (eps, mask.bool()) if return_mask else eps


def lesion_strength_amplitude(amplitude: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """The blob amplitude in noise units that puts a blob of `amplitude` (model intensity units, [-1, 1]
    scale) into the noised image x_t = sqrt(abar) x0 + sqrt(1 - abar) eps: amplitude sqrt(abar / (1 - abar)).

    Synomaly's own amplitude (u + offset) is in noise units, so its blobs fade with the noise level (about
    0.05 at t 25): a network trained only on those never sees a blob as strong as a lesion at the low
    noise levels that detection on volumes uses. Shapes broadcast, e.g. (N, 1, 1, 1).
    """
    return amplitude * (abar_t / (1.0 - abar_t).clamp_min(1e-8)).sqrt()


def gaussian_noise(
    shape: tuple[int, ...], *, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Plain N(0, I) noise on `device`."""
    return torch.randn(shape, generator=generator, device=torch.device(device))


def coarse_noise(
    shape: tuple[int, int, int, int],
    *,
    scale: int = 8,
    std: float = 0.2,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Coarse noise of Kascenas et al. (2023): N(0, std^2) at 1/scale resolution, bilinearly upsampled.

    A random sub-pixel shift (crop of a one-cell larger field) keeps the cell grid from lining up
    with the image grid; shape (N, 1, H, W).
    """
    device = torch.device(device)
    n, c, h, w = shape
    ch, cw = max(1, h // scale) + 1, max(1, w // scale) + 1
    low = torch.randn((n, c, ch, cw), generator=generator, device=device) * std
    big = F.interpolate(low, size=(ch * scale, cw * scale), mode="bilinear", align_corners=False)
    dy = int(torch.randint(0, scale, (1,), generator=generator, device=device).item())
    dx = int(torch.randint(0, scale, (1,), generator=generator, device=device).item())
    return big[:, :, dy : dy + h, dx : dx + w].contiguous()


def make_training_noise(
    kind: str,
    shape: tuple[int, int, int, int],
    noise_settings,
    *,
    anatomy_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The noise a model of this kind learns to predict, for a batch (N, 1, H, W)."""
    if kind == "synomaly":
        return synomaly_noise(
            shape,
            sigma=noise_settings.sigma,
            tau=noise_settings.tau,
            offset=noise_settings.offset,
            polarity=noise_settings.polarity,
            anatomy_mask=anatomy_mask,
            generator=generator,
            device=device,
        )
    if kind == "gaussian":
        return gaussian_noise(shape, generator=generator, device=device)
    if kind == "coarse":
        return coarse_noise(
            shape, scale=noise_settings.coarse_scale, std=noise_settings.coarse_std, generator=generator, device=device
        )
    raise ValueError(f"unknown noise kind {kind!r}")
