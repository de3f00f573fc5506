"""Cosine diffusion schedule and the one-call denoising step Synomaly uses at inference."""

from __future__ import annotations

import torch


def cosine_alphas_cumprod(timesteps: int = 1000) -> torch.Tensor:
    """abar_t for t in [0, T) of the cosine schedule (s = 0.008, beta capped at 0.999), shape (T,)."""
    from monai.networks.schedulers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=timesteps, schedule="cosine")
    return scheduler.alphas_cumprod.detach().clone().float()


def _gather(abar: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """abar[t] broadcast to (N, 1, 1, 1) on the device and dtype of `like`."""
    return abar.to(like.device)[t.to(like.device)].to(like.dtype).view(-1, 1, 1, 1)


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """Noised image x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; x0, noise (N, 1, H, W), t (N,)."""
    a = _gather(abar, t, x0)
    return a.sqrt() * x0 + (1.0 - a).sqrt() * noise


def predict_x0(x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """Denoised estimate (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), clamped to [-1, 1]."""
    a = _gather(abar, t, x_t)
    return ((x_t - (1.0 - a).sqrt() * eps) / a.sqrt()).clamp(-1.0, 1.0)
