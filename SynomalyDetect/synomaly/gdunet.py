"""The UNet of "guided diffusion" (Dhariwal and Nichol 2021), which the Synomaly authors trained.

Written from the architecture's description so that the authors' published weights load into it
by name. Parameter names follow their state dict exactly (`time_embed.*`, `input_blocks.*`,
`middle_block.*`, `output_blocks.*`, `out.*`); `Testing/test_upstream.py` checks every name and
shape of the BraTS configuration against the listing in the workspace's shared/upstream folder.

The configuration, as the authors' `args` give it:
- sinusoidal timestep embedding of width `model_channels` -> Linear(ch, 4ch) -> SiLU -> Linear;
- levels with `model_channels * mult` channels, `num_res_blocks` residual blocks each, attention
  after every residual block at the listed downsampling factors, a residual block that halves
  (average pooling) or doubles (nearest) the resolution between levels;
- residual block: GroupNorm(32) -> SiLU -> 3x3 conv, plus the projected timestep embedding, then
  GroupNorm -> SiLU -> dropout -> 3x3 conv; a 1x1 conv on the skip path when the width changes;
- attention: GroupNorm, a 1x1 conv to q, k, v laid out head by head ("legacy" order), softmax
  attention, a 1x1 output projection, residual;
- middle: residual block, attention, residual block; output: GroupNorm -> SiLU -> 3x3 conv.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (N, dim) of timesteps (N,): cosines first, then sines."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """Group normalisation computed in float32 whatever the input precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class ResBlock(nn.Module):
    """Residual block with the timestep added after the first convolution; optional up/down."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float,
                 groups: int, resample: str | None = None) -> None:
        super().__init__()
        self.resample = resample
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels), nn.SiLU(), nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample:
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self._resample(h))
            x = self._resample(x)
        else:
            h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Self-attention over all positions; q, k and v come head by head out of one 1x1 conv."""

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels cannot be split into {heads} attention heads")
        self.heads = heads
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))  # (b, 3c, L), laid out as heads x (q, k, v) x head width
        length = qkv.shape[-1]
        q, k, v = qkv.reshape(b * self.heads, 3 * c // self.heads, length).chunk(3, dim=1)
        # softmax(q^T k / sqrt(d)) v, each (b * heads, L, d)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).reshape(b, c, length)
        return (flat + self.proj_out(out)).reshape(b, c, *spatial)


class Step(nn.ModuleList):
    """A sequence of layers where residual blocks also receive the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def heads_for(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Number of attention heads: channels / num_head_channels, or num_heads when that is -1."""
    return num_heads if num_head_channels == -1 else max(1, channels // num_head_channels)


class GuidedDiffusionUNet(nn.Module):
    """2D UNet of guided diffusion; forward(x, timesteps) -> predicted noise, same size as x."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        model_channels: int = 128,
        channel_mult: tuple[float, ...] = (1, 1, 2, 3, 4),
        num_res_blocks: int = 2,
        attention_levels: tuple[bool, ...] = (False, False, False, True, True),
        num_heads: int = 2,
        num_head_channels: int = 64,
        dropout: float = 0.0,
        groups: int = 32,
    ) -> None:
        super().__init__()
        if len(attention_levels) != len(channel_mult):
            raise ValueError("attention_levels and channel_mult differ in length")
        self.model_channels = model_channels
        emb = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))

        def attention(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, heads_for(ch, num_heads, num_head_channels), groups)

        ch = round(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([Step([nn.Conv2d(in_channels, ch, 3, padding=1)])])
        skip_widths = [ch]
        last = len(channel_mult) - 1
        for level, mult in enumerate(channel_mult):
            width = round(mult * model_channels)
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb, width, dropout, groups)]
                ch = width
                if attention_levels[level]:
                    layers.append(attention(ch))
                self.input_blocks.append(Step(layers))
                skip_widths.append(ch)
            if level != last:
                self.input_blocks.append(Step([ResBlock(ch, emb, ch, dropout, groups, resample="down")]))
                skip_widths.append(ch)

        self.middle_block = Step([ResBlock(ch, emb, ch, dropout, groups), attention(ch),
                                  ResBlock(ch, emb, ch, dropout, groups)])

        self.output_blocks = nn.ModuleList()
        for level in range(last, -1, -1):
            width = round(channel_mult[level] * model_channels)
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_widths.pop(), emb, width, dropout, groups)]
                ch = width
                if attention_levels[level]:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, emb, ch, dropout, groups, resample="up"))
                self.output_blocks.append(Step(layers))

        self.out = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))
        self.downsamplings = last

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Predicted noise for x (N, C, H, W) at integer timesteps (N,); H and W divisible by 2^levels."""
        factor = 2 ** self.downsamplings
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be divisible by {factor}")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
