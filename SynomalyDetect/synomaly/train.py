"""Training and fine-tuning on healthy slices: Synomaly noise, AdamW, EMA, atomic checkpoints, exact resume."""

from __future__ import annotations

import copy
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .card import ModelCard, NetworkSettings, NoiseSettings
from .device import autocast, autocast_dtype, resolve_device
from .errors import Cancelled, InputError
from .noise import lesion_strength_amplitude, make_training_noise, synomaly_parts
from .progress import ProgressFn, null_progress
from .schedule import cosine_alphas_cumprod, q_sample
from .settings import TrainingSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a torchrun job: its rank, the number of processes, its GPU on the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def share(self, batch_size: int) -> tuple[int, int]:
        """The [start, end) of the global batch this rank computes: balanced, sizes differ by one at most."""
        return self.rank * batch_size // self.world_size, (self.rank + 1) * batch_size // self.world_size


def distributed_from_environment(env: Optional[dict[str, str]] = None) -> Distributed:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them (a single process when unset)."""
    env = os.environ if env is None else env
    try:
        return Distributed(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise InputError(f"torchrun's RANK/WORLD_SIZE/LOCAL_RANK are not numbers: {exc}") from exc


def init_distributed(settings: TrainingSettings) -> tuple[Distributed, bool]:
    """The torchrun context, with its process group started (nccl on CUDA, gloo on the CPU) when there are
    several processes; returns (context, whether this call started the group)."""
    import torch.distributed as dist

    world = distributed_from_environment()
    if world.world_size <= 1 or dist.is_initialized():
        return world, False
    if resolve_device(settings.device).type == "cuda":
        torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return world, True


def remap_contrast(x: torch.Tensor, m: torch.Tensor, gen: torch.Generator, points: int = 5) -> torch.Tensor:
    """A random, not necessarily monotonic, piecewise-linear intensity curve per image, applied inside the
    foreground (N, 1, G, G): tissue classes trade places as between T1, T2, FLAIR and post-contrast
    scans, while the background stays at -1. The foreground is stretched back to [-1, 0.8] (the
    detection normalisation's range). Draws use `gen`, which lives on x's device."""
    n = x.shape[0]
    ys = torch.rand(n, points, generator=gen, device=x.device)  # curve values at evenly spaced inputs
    lo, hi = ys.min(dim=1, keepdim=True).values, ys.max(dim=1, keepdim=True).values
    ys = (ys - lo) / (hi - lo).clamp_min(1e-3) * 1.8 - 1.0
    pos = ((x.clamp(-1, 1) + 1) / 2 * (points - 1)).view(n, -1)  # position along the curve's knots
    i0 = pos.floor().clamp(0, points - 2).long()
    w = pos - i0
    y = torch.gather(ys, 1, i0) * (1 - w) + torch.gather(ys, 1, i0 + 1) * w
    return torch.where(m.bool(), y.view_as(x), x)


def vary_scan(x: torch.Tensor, m: torch.Tensor, gen: torch.Generator, rotate_deg: float = 12.0,
              scale: float = 0.08, warp_px: float = 2.0, bias: float = 0.2, noise: float = 0.03
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """What differs between one person's scan and the averaged templates most training volumes are, per image
    (N, 1, G, G): pose and shape (an in-plane rotation up to `rotate_deg`, a scaling up to `scale` along each
    axis and a smooth warp up to about `warp_px` pixels, image and foreground alike), coil shading (a smooth
    multiplicative field within exp(+-`bias`)) and noise (Gaussian, standard deviation up to `noise` on the
    [-1, 1] scale). The background stays at -1. Draws use `gen`, which lives on x's device."""
    import torch.nn.functional as F

    n, _, h, w = x.shape
    dev = x.device

    def uniform(*shape: int) -> torch.Tensor:  # U(-1, 1)
        return torch.rand(*shape, generator=gen, device=dev) * 2 - 1

    angle = uniform(n) * math.radians(rotate_deg)
    sx, sy = 1 + uniform(n) * scale, 1 + uniform(n) * scale
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * sx, -sin * sy, torch.zeros_like(sx)], 1),
                         torch.stack([sin * sx, cos * sy, torch.zeros_like(sx)], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    coarse = uniform(n, 2, 5, 5) * (2.0 * warp_px / max(h, w))  # grid units: 2 / G per pixel
    grid = grid + F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    moved = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = F.grid_sample(m.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5
    shade = torch.exp(F.interpolate(uniform(n, 1, 4, 4) * bias, size=(h, w), mode="bicubic", align_corners=True))
    sd = torch.rand(n, 1, 1, 1, generator=gen, device=dev) * noise
    shaded = (moved * shade - 1 + sd * torch.randn(x.shape, generator=gen, device=dev)).clamp(-1, 1)
    return torch.where(inside, shaded, torch.full_like(x, -1.0)), inside.to(m.dtype)


def _batch_augment(x: torch.Tensor, m: torch.Tensor, settings: TrainingSettings, gen: torch.Generator,
                   from_volume: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random left-right flips, a random contrast curve for a share of the images, pose, shading and noise
    for a share (`vary_scan`; with `settings.vary_volumes_only`, only images whose `from_volume` is true), and a
    small gamma/contrast change that keeps the background at -1. Every draw is on x's device (`gen` too)."""
    n = x.shape[0]
    dev = x.device
    if settings.flip:
        flip = torch.rand(n, generator=gen, device=dev) < 0.5
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
        m = torch.where(flip.view(n, 1, 1, 1), m.flip(-1), m)
    if settings.contrast_remap > 0:
        chosen = (torch.rand(n, generator=gen, device=dev) < settings.contrast_remap).view(n, 1, 1, 1)
        x = torch.where(chosen, remap_contrast(x, m, gen), x)
    if settings.vary_scans > 0:
        chosen = torch.rand(n, generator=gen, device=dev) < settings.vary_scans
        if settings.vary_volumes_only and from_volume is not None:
            chosen = chosen & from_volume
        chosen = chosen.view(n, 1, 1, 1)
        xv, mv = vary_scan(x, m, gen)
        x, m = torch.where(chosen, xv, x), torch.where(chosen, mv, m)
    a = settings.intensity_augment
    if a > 0:
        gamma = torch.exp((torch.rand(n, generator=gen, device=dev) * 2 - 1) * a).view(n, 1, 1, 1)
        scale = (1 + (torch.rand(n, generator=gen, device=dev) * 2 - 1) * a).view(n, 1, 1, 1)
        x = ((((x + 1) / 2).clamp_min(0) ** gamma) * scale * 2 - 1).clamp(-1, 1)
    return x, m


def training_targets(x0: torch.Tensor, mask: torch.Tensor, card: ModelCard,
                     abar: torch.Tensor, gen: torch.Generator, settings: TrainingSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Network input, timesteps and target noise for one batch (all on x0's device).

    With `settings.lesion_blobs` > 0, that share of the images keeps Synomaly's blobs and noise but gives the
    blobs an amplitude drawn from `settings.lesion_amplitude` in image units at every noise level
    (`lesion_strength_amplitude`), the strength of a real lesion, brighter or darker as the card's polarity.
    """
    n = x0.shape[0]
    dev = x0.device
    t_max = settings.t_max if 0 < settings.t_max <= card.timesteps else card.timesteps
    anatomy = mask if settings.noise_in_foreground else None
    if card.noise.kind == "synomaly" and settings.lesion_blobs > 0:
        ns = card.noise
        e, blobs, d, u = synomaly_parts(tuple(x0.shape), sigma=ns.sigma, tau=ns.tau, polarity=ns.polarity,
                                        anatomy_mask=anatomy, generator=gen, device=dev)
        t = torch.randint(0, t_max, (n,), generator=gen, device=dev)
        chosen = (torch.rand(n, generator=gen, device=dev) < settings.lesion_blobs).view(n, 1, 1, 1)
        lo, hi = settings.lesion_amplitude
        strength = lo + (hi - lo) * torch.rand((n, 1, 1, 1), generator=gen, device=dev)
        a_t = abar.to(dev)[t].view(n, 1, 1, 1)
        amp = torch.where(chosen, lesion_strength_amplitude(strength, a_t), u + ns.offset)
        noise = e + d * amp * blobs
        return q_sample(x0, t, noise, abar), t, noise
    noise = make_training_noise(card.noise.kind, tuple(x0.shape), card.noise, anatomy_mask=anatomy,
                                generator=gen, device=dev)
    if card.noise.kind == "coarse":
        t = torch.zeros(n, dtype=torch.long, device=dev)
        return x0 + noise, t, noise
    t = torch.randint(0, t_max, (n,), generator=gen, device=dev)
    return q_sample(x0, t, noise, abar), t, noise


def noise_loss(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, abar: torch.Tensor,
               min_snr_gamma: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """MSE of the predicted noise (N, 1, H, W); with `min_snr_gamma` > 0 each image weighted by
    min(SNR_t, gamma) / SNR_t, SNR_t = abar_t / (1 - abar_t): an x0 loss at low noise levels (where a
    lesion-strength blob makes the noise target large), the plain noise loss where SNR_t < gamma."""
    err = (pred.float() - target) ** 2
    if min_snr_gamma > 0:
        a = abar.to(pred.device)[t].float()
        snr = a / (1.0 - a).clamp_min(1e-8)
        w = snr.clamp(max=min_snr_gamma) / snr
        err = err * w.view(-1, *([1] * (err.dim() - 1)))
    return err.sum() if reduction == "sum" else err.mean()


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file, fsync, then rename: a kill never leaves a broken checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (conservative: True when unsure)."""
    if sys.platform == "win32":  # os.kill(pid, 0) would terminate the process there
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if handle:
            ctypes.windll.kernel32.CloseHandle(handle)
        return bool(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Delete the '.NAME.tmp-PID' files beside `path` that runs killed while writing left behind."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint, loaded without executing code (weights_only=True)."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"cannot load checkpoint {path}: {str(exc).splitlines()[0]}") from exc


class Trainer:
    """One training run: data in memory on the device, model, EMA, optimiser, RNG streams."""

    def __init__(self, card: ModelCard, train_x: torch.Tensor, train_m: torch.Tensor,
                 val_x: torch.Tensor, val_m: torch.Tensor, settings: TrainingSettings,
                 base_state: Optional[dict[str, torch.Tensor]] = None, world: Optional[Distributed] = None,
                 train_from_volume: Optional[torch.Tensor] = None) -> None:
        from .modelio import build_network

        self.card = card
        self.settings = settings
        self.world = world or Distributed()
        self.device = resolve_device(settings.device)
        if self.world.world_size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", self.world.local_rank)  # one GPU per process
        if settings.batch_size < self.world.world_size:
            raise InputError(f"the batch size ({settings.batch_size}, the global batch) must be at least the "
                             f"number of processes ({self.world.world_size})")
        if settings.lr_decay < 0:
            raise InputError(f"the learning-rate decay is a number of steps (0 or more), not {settings.lr_decay}")
        self.share = self.world.share(settings.batch_size)
        self.dtype = autocast_dtype(self.device, settings.precision)
        self.channels_last = self.dtype is not None
        torch.manual_seed(settings.seed)
        self.model = build_network(card).to(self.device)
        if base_state is not None:
            self.model.load_state_dict(base_state)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.net = self.model  # what the step calls: the model itself, or its DistributedDataParallel wrapper
        if self.world.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=(self.device.type == "cuda" and self.dtype == torch.float16))
        self.abar = cosine_alphas_cumprod(card.timesteps).to(self.device)
        self.train_x, self.train_m = train_x.to(self.device), train_m.to(self.device)
        if train_from_volume is None:  # unknown: every slice counts as a volume's
            train_from_volume = torch.ones(train_x.shape[0], dtype=torch.bool)
        self.train_from_volume = train_from_volume.to(self.device)
        self.val_x, self.val_m = val_x.to(self.device), val_m.to(self.device)
        self.cpu_gen = torch.Generator().manual_seed(settings.seed)
        self.dev_gen = torch.Generator(device=self.device).manual_seed(settings.seed + 1)
        self.aug_gen = torch.Generator(device=self.device).manual_seed(settings.seed + 2)  # augmentation draws
        self.iteration = 0
        self.warm_from = 0  # where the warm-up starts: 0, or where a slim checkpoint restarted AdamW's moments
        self.history: list[list[float]] = []  # [iteration, train loss]
        self.val_history: list[list[float]] = []  # [iteration, validation loss]
        self.noise_seconds = 0.0
        self.step_seconds = 0.0

    def lr_at(self, it: int) -> float:
        """Linear warm-up (again after a slim resume, whose AdamW moments start from zero), then constant, then,
        with `lr_decay`, a linear fall to zero over the run's last iterations (a cool-down: a constant-rate run
        continued with a decay, as in warm-up-stable-decay schedules)."""
        s = self.settings
        rate = s.lr * min(1.0, (it - self.warm_from + 1) / max(1, s.warmup))
        if s.lr_decay > 0:
            rate *= min(1.0, max(0, s.iterations - it) / s.lr_decay)
        return rate

    def step(self) -> float:
        """One optimisation step; returns the batch loss."""
        s = self.settings
        start = time.perf_counter()
        idx = torch.randint(0, self.train_x.shape[0], (s.batch_size,), generator=self.cpu_gen).to(self.device)
        x0, m = _batch_augment(self.train_x[idx], self.train_m[idx], s, self.aug_gen, self.train_from_volume[idx])
        t0 = time.perf_counter()
        x_in, t, target = training_targets(x0, m, self.card, self.abar, self.dev_gen, s)
        self.noise_seconds += time.perf_counter() - t0
        several = self.world.world_size > 1
        if several:  # every rank drew the same whole global batch (same RNG streams): it computes its share
            lo, hi = self.share
            x_in, t, target = x_in[lo:hi], t[lo:hi], target[lo:hi]
        if self.channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.iteration)
        self.model.train()
        with autocast(self.device, self.dtype):
            pred = self.net(x_in, timesteps=t)
        loss = noise_loss(pred, target, t, self.abar, s.min_snr_gamma)
        self.opt.zero_grad(set_to_none=True)
        if several:  # DDP averages the ranks' gradients: weighted by share, that is the global batch's mean
            self.scaler.scale(loss * ((hi - lo) * self.world.world_size / s.batch_size)).backward()
        else:
            self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        with torch.no_grad():
            d = s.ema_decay
            for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
                pe.mul_(d).add_(pm.detach(), alpha=1 - d)
            for be, bm in zip(self.ema.buffers(), self.model.buffers()):
                be.copy_(bm)
        self.iteration += 1
        if several:  # the global batch's loss, as one process would report it
            import torch.distributed as dist

            total = loss.detach() * (hi - lo)
            dist.all_reduce(total)
            value = float(total) / s.batch_size
        else:
            value = float(loss.detach())
        self.history.append([self.iteration, value])
        self.step_seconds += time.perf_counter() - start
        return value

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean loss of the EMA model on a fixed draw over the validation slices."""
        if self.val_x.shape[0] == 0:
            return float("nan")
        gen = torch.Generator(device=self.device).manual_seed(12345)
        n = min(self.val_x.shape[0], self.settings.validation_slices)
        total, count = 0.0, 0
        for i in range(0, n, self.settings.batch_size):
            x0 = self.val_x[i : i + self.settings.batch_size]
            m = self.val_m[i : i + self.settings.batch_size]
            x_in, t, target = training_targets(x0, m, self.card, self.abar, gen, self.settings)
            if self.channels_last:
                x_in = x_in.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.dtype):
                pred = self.ema(x_in, timesteps=t)
            total += float(noise_loss(pred, target, t, self.abar, self.settings.min_snr_gamma, reduction="sum"))
            count += target.numel()
        return total / max(1, count)

    def state(self) -> dict[str, Any]:
        """Everything needed for an exact resume (tensors, numbers and strings only)."""
        return {
            "format": "synomaly-checkpoint/1",
            "card": self.card.to_json(),
            "settings": asdict(self.settings),
            "iteration": self.iteration,
            "warm_from": self.warm_from,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "ema": {k: v.detach().cpu() for k, v in self.ema.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
            "cpu_gen": self.cpu_gen.get_state(),
            "dev_gen": self.dev_gen.get_state().cpu(),
            "aug_gen": self.aug_gen.get_state().cpu(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "val_history": self.val_history,
            "world_size": self.world.world_size,  # informative: a run resumes with any number of processes
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint taken by `state()`."""
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        if state.get("optimizer"):
            self.opt.load_state_dict(state["optimizer"])
            self.warm_from = int(state.get("warm_from", 0))
        else:  # a slim checkpoint (slim_checkpoint): the weights continue, AdamW's moments start afresh
            log.warning("the checkpoint holds no optimizer state; AdamW's moment estimates restart from zero, "
                        "so the learning rate warms up again")
            self.warm_from = int(state["iteration"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.cpu_gen.set_state(state["cpu_gen"])
        self.dev_gen.set_state(state["dev_gen"].to(self.dev_gen.get_state().device))
        if "aug_gen" in state:  # checkpoints written before augmentation had its own device stream
            self.aug_gen.set_state(state["aug_gen"].to(self.aug_gen.get_state().device))
        torch.set_rng_state(state["torch_rng"])
        self.iteration = int(state["iteration"])
        self.history = [list(h) for h in state["history"]]
        self.val_history = [list(h) for h in state["val_history"]]


def slim_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """A copy of a checkpoint without the optimizer state (half the size: weights, EMA, RNG streams and
    history), written atomically; training resumes from it with fresh AdamW moments."""
    state = load_checkpoint(src)
    state["optimizer"] = {}
    state["scaler"] = {}
    dst = Path(dst)
    _save_checkpoint(dst, state)
    return dst


def split_scans(paths: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out a fraction of the scans (by scan, never by slice) for validation."""
    if len(paths) < 2 or fraction <= 0:
        return list(paths), []
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(paths), generator=gen).tolist()
    n_val = max(1, int(round(len(paths) * fraction)))
    val = sorted(paths[i] for i in order[:n_val])
    train = sorted(paths[i] for i in order[n_val:])
    return train, val


def train(
    card: ModelCard,
    train_paths: list[str],
    val_paths: list[str],
    out: str | Path,
    settings: TrainingSettings,
    *,
    base_state: Optional[dict[str, torch.Tensor]] = None,
    resume: Optional[str | Path | dict[str, Any]] = None,
    checkpoint: Optional[str | Path] = None,
    progress: ProgressFn = null_progress,
    data_description: str = "",
    cancel: Optional[Any] = None,
) -> dict[str, Any]:
    """Train (or fine-tune) and write the model file `out`; returns a summary with throughput. `resume`: a
    checkpoint file to continue from, or its contents as `load_checkpoint` read them."""
    from .modelio import save_model
    from .prepare import prepare_images_for_training, prepare_training_slices

    out = Path(out)
    checkpoint = Path(checkpoint) if checkpoint else out.with_suffix(".ckpt")
    world, owns_group = init_distributed(settings)
    lead = world.rank == 0  # the process that validates and writes checkpoints and the model file
    if not lead:
        progress = null_progress
    for target in (checkpoint, out) if lead else ():
        _remove_stale_temporaries(target)
    progress("prepare", 0, 2, "reading training scans")
    tx, tm, n_train, t_vol = prepare_training_slices(train_paths, card)
    progress("prepare", 1, 2, f"{tx.shape[0]} training slices from {n_train} scans ({int(t_vol.sum())} of volumes)")
    if val_paths:
        vx, vm, n_val = prepare_images_for_training(val_paths, card)
    else:
        vx, vm, n_val = tx[:0], tm[:0], 0
    progress("prepare", 2, 2, f"{vx.shape[0]} validation slices from {n_val} scans")
    trainer = Trainer(card, tx, tm, vx, vm, settings, base_state, world=world, train_from_volume=t_vol)
    if world.world_size > 1:
        lo, hi = trainer.share
        message = (f"world size {world.world_size} ({'nccl' if trainer.device.type == 'cuda' else 'gloo'}); "
                   f"rank 0 computes slices {lo}-{hi - 1} of each global batch of {settings.batch_size}")
        log.info(message)
        progress("prepare", 2, 2, message)
    if resume:
        state = resume if isinstance(resume, dict) else load_checkpoint(resume)
        try:  # compare as parsed cards: a card written before a field was added reads with its default
            same = ModelCard.from_json(state.get("card") or "").to_json() == card.to_json()
        except (ValueError, TypeError):  # an unreadable card (ModelCardError is a ValueError) simply differs
            same = False
        if not same:
            log.warning("resuming with a card that differs from the checkpoint's; the checkpoint's network is used")
        trainer.load_state(state)
        log.info("resumed at iteration %d (checkpoint written by %d process(es), now %d)", trainer.iteration,
                 int(state.get("world_size", 1)), world.world_size)
    total = settings.iterations
    t_start = time.perf_counter()
    it_start = trainer.iteration
    recent: list[float] = []
    try:
        while trainer.iteration < total:
            if cancel is not None and cancel():
                raise KeyboardInterrupt
            loss = trainer.step()
            recent.append(loss)
            it = trainer.iteration
            if lead and (it % settings.validate_every == 0 or it == total):
                val = trainer.validation_loss()
                trainer.val_history.append([it, val])
            else:
                val = None
            if lead and (it % settings.checkpoint_every == 0 or it == total):
                _save_checkpoint(checkpoint, trainer.state())
            elapsed = time.perf_counter() - t_start
            extra = {"loss": sum(recent[-50:]) / len(recent[-50:]), "it_per_s": (it - it_start) / max(elapsed, 1e-9)}
            if val is not None:
                extra["val_loss"] = val
            progress("train", it, total, "", **extra)
    except KeyboardInterrupt:
        if lead:
            _save_checkpoint(checkpoint, trainer.state())
        raise Cancelled(f"training interrupted at iteration {trainer.iteration}; resume with --resume {checkpoint}")
    elapsed = time.perf_counter() - t_start
    steps = trainer.iteration - it_start
    val_loss = trainer.val_history[-1][1] if trainer.val_history else float("nan")
    final = card.copy()
    final.training = {
        "data": data_description,
        "training_scans": n_train,
        "training_slices": int(tx.shape[0]),
        "validation_scans": n_val,
        "validation_slices": int(vx.shape[0]),
        "iterations": trainer.iteration,
        "settings": asdict(settings),
        "validation_loss": None if math.isnan(val_loss) else round(val_loss, 6),
        "fine_tuned_from": card.training.get("name_of_base") if base_state is not None else None,
        "loss_curve": [[int(i), round(v, 5)] for i, v in trainer.val_history],
    }
    final.calibration = {}  # thresholds and tuned settings of the base (if any) do not hold for new weights
    final.calibration_3d = {}
    final.detection_3d = None
    final.partner_3d = None  # the pair was calibrated with the old weights' map
    final.tuning = {}
    if world.world_size > 1:
        final.training["processes"] = world.world_size
    if lead:
        save_model(out, final, trainer.ema.state_dict())
    if owns_group:
        import torch.distributed as dist

        dist.barrier()  # the other ranks end when the model file is there
        dist.destroy_process_group()
    return {
        "model": str(out),
        "checkpoint": str(checkpoint),
        "iterations": trainer.iteration,
        "validation_loss": val_loss,
        "it_per_s": steps / max(elapsed, 1e-9),
        "noise_fraction": trainer.noise_seconds / max(trainer.step_seconds, 1e-9),
        "validation_paths": val_paths,
        "world_size": world.world_size,
        "rank": world.rank,
    }


def new_card(name: str, grid: int = 64, channels: tuple[int, ...] = (32, 64, 128), noise_kind: str = "synomaly",
             polarity: str = "brighter", modality: str = "MR", contrast: str = "any",
             orientation: str = "axial", description: str = "") -> ModelCard:
    """A card for a new model; noise sigma scales with the grid from the paper's 3 px at 128."""
    attention = tuple(i == len(channels) - 1 for i in range(len(channels)))
    blur = max(3, int(11 * grid / 128) | 1)  # upstream's k = 11 at 128 x 128, scaled to the grid
    from .card import DetectionDefaults

    return ModelCard(
        name=name,
        description=description,
        modality=modality,
        contrast=contrast,
        orientation=orientation,
        grid_size=grid,
        network=NetworkSettings(channels=tuple(channels), attention_levels=attention),
        noise=NoiseSettings(kind=noise_kind, sigma=3.0 * grid / 128, tau=175.0, offset=0.5, polarity=polarity),
        detection=DetectionDefaults(t=200, blur_kernel=blur, threshold=0.25, max_stages=5),
    )


def model_from_checkpoint(checkpoint: str | Path, out: str | Path, weights: str = "ema") -> Path:
    """Write the EMA (or, with weights="model", the raw) weights of a checkpoint as a model file (a snapshot of a
    run still going). Like a finished run's file, it carries no thresholds or tuned setting: those of the base
    model do not hold for new weights."""
    from .modelio import save_model

    if weights not in ("ema", "model"):
        raise InputError(f"weights must be 'ema' or 'model', not {weights!r}")
    state = load_checkpoint(checkpoint)
    card = ModelCard.from_json(state["card"])
    card.training = {"snapshot_of_checkpoint_at_iteration": int(state["iteration"]), "weights": weights}
    card.calibration = {}
    card.calibration_3d = {}
    card.detection_3d = None
    card.partner_3d = None
    card.tuning = {}
    return save_model(out, card, state[weights])
