"""Training settings as plain data: no torch, so the Slicer panels and the command line share these defaults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainingSettings:
    """Everything that decides a training run (defaults: the shipped brain model's recipe)."""

    iterations: int = 6000
    batch_size: int = 16
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: int = 100
    lr_decay: int = 0  # the last this many iterations bring the rate linearly to zero (0: constant after warm-up)
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    noise_in_foreground: bool = True
    flip: bool = True
    intensity_augment: float = 0.1
    contrast_remap: float = 0.0  # share of training images given a random contrast curve (remap_contrast)
    vary_scans: float = 0.0  # share of training images given another pose, shape, shading and noise (vary_scan)
    vary_volumes_only: bool = False  # vary only slices of volumes, not 2D images (real single scans already vary)
    t_max: int = 0  # sample training noise levels uniformly below t_max (0: the whole schedule)
    lesion_blobs: float = 0.0  # share of images whose Synomaly blobs get a lesion-strength amplitude in image units
    lesion_amplitude: tuple[float, float] = (0.2, 1.2)  # that amplitude's range, model units ([-1, 1] scale)
    min_snr_gamma: float = 0.0  # loss weight min(SNR_t, gamma) / SNR_t (Hang et al. 2023); 0: plain noise MSE
    checkpoint_every: int = 250
    validate_every: int = 250
    validation_slices: int = 256
    validation_fraction: float = 0.1
