"""The Synomaly authors' detection loop, re-implemented as a speed baseline, and a side-by-side benchmark.

Written by us from the method as the paper and the authors' published inference describe it, for timing only:
one slice at a time; each stage draws Gaussian noise, noises the fused image to t, predicts x0 in one network
call (float32, default memory format), moves the prediction to the host, blurs input and prediction there with
an OpenCV-style Gaussian kernel, zeroes differences under the threshold, drops spots under 30 pixels, and fuses
on the device; the difference map is computed twice per stage, as their loop does. With early stopping off on
both sides it does exactly the network work of `synomaly.detect.run_stages`, which runs the same weights
with the machine's execution plan (synomaly.plan), so the ratio of the two times is the engine's speed-up.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from scipy import ndimage

from .filters import opencv_sigma
from .progress import ProgressFn, null_progress
from .schedule import predict_x0, q_sample

#: The authors' BraTS network (their args_brats_best.json): 98.6 M parameters on a 128 x 128 grid.
BRATS_ARGS = {"dataset": "brats23", "img_size": 128, "in_channels": 1, "model_channels": 128, "num_res_blocks": 2,
              "attention_resolutions": "32,16,8", "channel_mult": "", "num_heads": 2, "num_head_channels": 64,
              "dropout": 0.0, "beta_schedule": "cosine", "noise_fn": "synomaly", "noise_steps": 1000}
SMALL_SPOT_PIXELS = 30  # their minimum spot size in the per-slice map


def opencv_kernel(size: int) -> np.ndarray:
    """The 1D Gaussian OpenCV uses for GaussianBlur((size, size), 0)."""
    sigma = opencv_sigma(size)
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def host_map(x0: np.ndarray, xh: np.ndarray, kernel: int, threshold: float) -> np.ndarray:
    """Their per-slice map on the host: |blur x0 - blur x_hat|, zero under the threshold, spots < 30 px removed."""
    k = opencv_kernel(kernel)

    def blur(a: np.ndarray) -> np.ndarray:  # OpenCV's default border (reflect-101) is scipy's "mirror"
        return ndimage.correlate1d(ndimage.correlate1d(a, k, axis=0, mode="mirror"), k, axis=1, mode="mirror")

    diff = np.abs(blur(x0) - blur(xh))
    diff[diff < threshold] = 0
    labels, _ = ndimage.label(diff > 0)
    sizes = np.bincount(labels.ravel())
    return (sizes[labels] >= SMALL_SPOT_PIXELS) * diff


@dataclass
class LoopTiming:
    seconds: float
    network_seconds: float
    network_slice_calls: int


def authors_loop(model, x0: torch.Tensor, *, t: int, kernel: int, threshold: float, stages: int,
                 seed: int = 0) -> LoopTiming:
    """Their loop over S slices (S, 1, G, G): one slice at a time, `stages` stages each, no early stopping."""
    net, device = model.network, model.device
    fmt = model.channels_last
    model.channels_last = False  # their network runs in the default memory format
    gen = torch.Generator(device=device).manual_seed(seed)
    net_s, calls = 0.0, 0
    start = time.perf_counter()
    try:
        for i in range(x0.shape[0]):
            x_in = x0[i : i + 1].to(device)
            x_host = x_in.cpu().squeeze().numpy()
            cache = x_in
            tt = torch.tensor([int(t)], device=device)
            for _ in range(stages):
                with torch.no_grad():
                    noise = torch.randn(cache.shape, generator=gen, device=device)
                    xt = q_sample(cache, tt, noise, model.abar)
                    s0 = time.perf_counter()
                    eps = net(xt, timesteps=tt)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    net_s += time.perf_counter() - s0
                    calls += 1
                    xh = predict_x0(xt, tt, eps, model.abar)
                pred = xh.cpu().squeeze().numpy()
                m = host_map(x_host, pred, kernel, threshold)
                host_map(x_host, pred, kernel, threshold)  # their loop computes the map a second time per stage
                mt = torch.from_numpy((m > 0).astype(np.float32)).view(1, 1, *m.shape).to(device)
                cache = xh * mt + x_in * (1 - mt)
    finally:
        model.channels_last = fmt
    return LoopTiming(time.perf_counter() - start, net_s, calls)


def engine_loop(model, x0: torch.Tensor, mask: torch.Tensor, *, t: int, kernel: int, threshold: float, stages: int,
                seed: int = 0, batch_size: Optional[int] = None) -> LoopTiming:
    """`synomaly.detect.run_stages` on the same slices, every stage run (no early stopping)."""
    from .detect import run_stages

    calls0, secs0 = model.calls, model.call_seconds
    start = time.perf_counter()
    res = run_stages(model, x0, mask, t=t, kernel=kernel, threshold=threshold, max_stages=stages, tolerance=-1.0,
                     batch_size=batch_size, seed=seed)
    seconds = time.perf_counter() - start
    if int(res.stages.min()) != stages:
        raise RuntimeError("a slice stopped early in the engine's loop: the two loops did different work")
    return LoopTiming(seconds, model.call_seconds - secs0, int(x0.shape[0]) * stages)


@dataclass
class Comparison:
    slices: int
    stages: int
    authors: list[LoopTiming]
    engine: list[LoopTiming]
    plan: str
    probe_seconds: float
    peak_rss_gb: float
    gflop_per_slice_call: float = float("nan")

    def per_slice_stage(self, runs: list[LoopTiming], what: str = "seconds") -> float:
        values = sorted(getattr(r, what) / (self.slices * self.stages) for r in runs)
        return values[len(values) // 2]

    @property
    def speedup(self) -> float:
        return self.per_slice_stage(self.authors) / self.per_slice_stage(self.engine)

    def lines(self, device: str, model: str) -> list[str]:
        a, e = self.per_slice_stage(self.authors), self.per_slice_stage(self.engine)
        an, en = self.per_slice_stage(self.authors, "network_seconds"), self.per_slice_stage(self.engine, "network_seconds")
        n = len(self.authors)
        return [
            f"model {model} on {device}; {self.slices} slices x {self.stages} stages each, early stopping off on both "
            f"sides ({self.slices * self.stages} network slice-calls each), median of {n} interleaved rounds",
            f"authors' loop (re-implemented): {a:.3f} s per slice per stage (network {an:.3f})",
            f"synomaly engine ({self.plan}): {e:.3f} s per slice per stage (network {en:.3f})",
            f"network work: {self.gflop_per_slice_call:.1f} GFLOP per slice-call, so the engine's network ran at "
            f"{self.gflop_per_slice_call / en:.0f} GFLOP/s and the authors' at {self.gflop_per_slice_call / an:.0f}",
            f"speed-up: {a / e:.2f}x (network alone {an / en:.2f}x); choosing the plan took {self.probe_seconds:.1f} s "
            f"once (cached); peak RSS {self.peak_rss_gb:.2f} GB",
        ]


def compare(model, x0: torch.Tensor, mask: torch.Tensor, *, t: int, kernel: int, threshold: float = 0.0,
            stages: int = 5, rounds: int = 2, seed: int = 0, batch_size: Optional[int] = None,
            progress: ProgressFn = null_progress, replan: bool = False) -> Comparison:
    """Time both loops on the same slices and weights, interleaved (order alternating) after one warm-up each."""
    from .plan import execution_plan

    s0 = time.perf_counter()
    plan = execution_plan(model, progress, refresh=replan)
    probe_s = time.perf_counter() - s0
    args = dict(t=t, kernel=kernel, threshold=threshold, seed=seed)
    authors_loop(model, x0[:1], stages=1, **args)
    engine_loop(model, x0[:1], mask[:1], stages=1, batch_size=batch_size, **args)
    authors, engine = [], []
    for r in range(rounds):
        progress("bench", r, rounds, f"round {r + 1} of {rounds}")
        order = ("a", "e") if r % 2 == 0 else ("e", "a")
        for who in order:
            if who == "a":
                authors.append(authors_loop(model, x0, stages=stages, **args))
            else:
                engine.append(engine_loop(model, x0, mask, stages=stages, batch_size=batch_size, **args))
    progress("bench", rounds, rounds, "done")
    desc = plan.describe() if batch_size is None else f"batches of {batch_size} (given)"
    gflop = network_gflop(model)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    return Comparison(int(x0.shape[0]), stages, authors, engine, desc, probe_s, peak, gflop)


def brats_model(device: str = "auto", precision: str = "auto", seed: int = 0):
    """The authors' BraTS configuration with seeded random weights (speed does not depend on the weights)."""
    from .modelio import SynomalyModel, build_network
    from .upstream import card_from_args

    card = card_from_args(BRATS_ARGS, name="authors-brats-random")
    torch.manual_seed(seed)
    return SynomalyModel(card, build_network(card), device=device, precision=precision)


def bench_slices(model, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` slices with foreground from the middle of the sample volume, prepared for the model's grid."""
    import tempfile

    from .prepare import prepare_scan
    from .sampledata import demo_volume

    with tempfile.TemporaryDirectory() as tmp:
        prep = prepare_scan(demo_volume(tmp, (240, 240, 155)), model.card, device=torch.device("cpu"))
    n = prep.slices.shape[0]
    if n < count:
        raise ValueError(f"the sample volume has {n} slices with foreground, fewer than {count}")
    first = max(0, n // 2 - count // 2)
    return prep.slices[first : first + count], prep.masks[first : first + count]


def network_gflop(model) -> float:
    """Floating-point operations of one network call on one slice (a multiply-add counts two), in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    g = int(model.card.grid_size)
    x = torch.zeros(1, 1, g, g, device=model.device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.network(x, timesteps=torch.full((1,), 100, device=model.device))
    return counter.get_total_flops() / 1e9


def network_parameters(model) -> float:
    return sum(p.numel() for p in model.network.parameters()) / 1e6


__all__ = ["authors_loop", "engine_loop", "compare", "brats_model", "bench_slices", "host_map", "Comparison",
           "LoopTiming", "network_gflop", "network_parameters"]
