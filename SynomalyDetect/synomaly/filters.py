"""Gaussian blur on the device, shared by the noise generator and the anomaly map."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def opencv_sigma(kernel_size: int) -> float:
    """The sigma OpenCV uses for a Gaussian kernel of this size when sigma is not given (pixels)."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1.0) + 0.8


def gaussian_kernel1d(sigma: float, radius: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Normalised 1D Gaussian of length 2 * radius + 1."""
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / max(sigma, 1e-6)) ** 2)
    return (k / k.sum()).to(dtype)


def gaussian_blur(x: torch.Tensor, sigma: float, radius: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) with reflected borders; radius defaults to 4 sigma."""
    if sigma <= 0:
        return x
    if radius is None:
        radius = max(1, int(math.ceil(4.0 * sigma)))
    n, c, h, w = x.shape
    radius = min(radius, h - 1, w - 1) if min(h, w) > 1 else 0
    if radius <= 0:
        return x
    k = gaussian_kernel1d(sigma, radius, x.device, x.dtype)
    y = x.reshape(n * c, 1, h, w)
    y = F.pad(y, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y.reshape(n, c, h, w)


def blur_kernel(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Gaussian blur with an OpenCV-style odd kernel size k (sigma from k); k <= 1 returns x."""
    if kernel_size <= 1:
        return x
    return gaussian_blur(x, opencv_sigma(kernel_size), radius=kernel_size // 2)
