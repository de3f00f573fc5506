"""Pictures for evaluation reports, drawn with numpy and Pillow (no plotting library): curves and a gallery."""

from __future__ import annotations

import heapq
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .outputs import heat_colours, label_font, text_strip

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
Curve = tuple[str, np.ndarray, np.ndarray]  # (legend label, x in [0, 1], y in [0, 1])


def _decimate(x: np.ndarray, y: np.ndarray, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """At most n points of a curve, always keeping the first and the last."""
    if x.size <= n:
        return x, y
    idx = np.unique(np.linspace(0, x.size - 1, n).round().astype(int))
    return x[idx], y[idx]


def curve_panel(curves: Sequence[Curve], title: str, xlabel: str, ylabel: str, size: tuple[int, int] = (460, 380),
                diagonal: bool = False, baseline: Optional[float] = None) -> np.ndarray:
    """One RGB panel (H, W, 3) uint8: unit-square axes with a 0.2 grid, one coloured line per curve, a legend below.

    diagonal draws the chance line of a ROC plot; baseline a horizontal chance line (PR plots: the positive share).
    """
    from PIL import Image, ImageDraw

    font = label_font()
    width, height = size
    legend_h = 14 * max(1, len(curves)) + 8
    left, right, top, bottom = 46, 14, 38, 36
    img = Image.new("RGB", (width, height + legend_h), "white")
    d = ImageDraw.Draw(img)
    pw, ph = width - left - right, height - top - bottom

    def px(x: np.ndarray, y: np.ndarray) -> list[tuple[float, float]]:
        return list(zip((left + np.clip(x, 0, 1) * pw).tolist(), (top + (1 - np.clip(y, 0, 1)) * ph).tolist()))

    for v in np.linspace(0, 1, 6):
        gx, gy = left + v * pw, top + (1 - v) * ph
        d.line([(gx, top), (gx, top + ph)], fill=(225, 225, 225))
        d.line([(left, gy), (left + pw, gy)], fill=(225, 225, 225))
        d.text((gx - 8, top + ph + 4), f"{v:.1f}", fill="black", font=font)
        d.text((left - 26, gy - 6), f"{v:.1f}", fill="black", font=font)
    if diagonal:
        d.line(px(np.array([0.0, 1.0]), np.array([0.0, 1.0])), fill=(160, 160, 160), width=1)
    if baseline is not None and np.isfinite(baseline):
        d.line(px(np.array([0.0, 1.0]), np.array([baseline, baseline])), fill=(160, 160, 160), width=1)
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    for i, (label, x, y) in enumerate(curves):
        colour = COLOURS[i % len(COLOURS)]
        x, y = _decimate(np.asarray(x, float), np.asarray(y, float))
        if x.size >= 2:
            d.line(px(x, y), fill=colour, width=2)
        elif x.size == 1:
            (cx, cy), = px(x, y)
            d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
        ly = height + 4 + 14 * i
        d.line([(left, ly + 6), (left + 22, ly + 6)], fill=colour, width=3)
        d.text((left + 28, ly), label, fill="black", font=font)
    if not curves:
        d.text((left + 10, top + ph // 2), "no curve: the labels hold one class only", fill="black", font=font)
    d.text((left, 4), title, fill="black", font=font)
    d.text((left + pw // 2 - 3 * len(xlabel), top + ph + 20), xlabel, fill="black", font=font)
    d.text((4, top - 15), ylabel, fill="black", font=font)
    return np.asarray(img)


def side_by_side(panels: Sequence[np.ndarray], gap: int = 8) -> np.ndarray:
    """Panels (H, W, 3) next to each other on white, top-aligned."""
    h = max(p.shape[0] for p in panels)
    parts = []
    for i, p in enumerate(panels):
        pad = np.full((h, p.shape[1] + (gap if i else 0), 3), 255, np.uint8)
        pad[: p.shape[0], (gap if i else 0):] = p
        parts.append(pad)
    return np.concatenate(parts, axis=1)


def _square(a: np.ndarray, fill: float) -> np.ndarray:
    """Pad a 2D array to a square, centred."""
    h, w = a.shape
    s = max(h, w)
    out = np.full((s, s), fill, dtype=a.dtype)
    out[(s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w] = a
    return out


def tile_row(image: np.ndarray, counterfactual: np.ndarray, score: np.ndarray, pred: Optional[np.ndarray],
             truth: Optional[np.ndarray], threshold: float, tile: int = 128) -> np.ndarray:
    """(tile, 4 tile, 3) uint8: input, counterfactual (same window), map (scaled to twice the threshold),
    and the input with outlines (red: detected after post-processing, green: ground truth)."""
    from skimage.segmentation import find_boundaries
    from skimage.transform import resize

    lo, hi = np.percentile(image, [0.5, 99.5])
    hi = hi if hi > lo else lo + 1.0

    def grey(a: np.ndarray) -> np.ndarray:
        g = resize(_square(np.clip((a - lo) / (hi - lo), 0, 1), 0.0), (tile, tile), order=1, anti_aliasing=True)
        return (np.repeat(g[..., None], 3, -1) * 255).astype(np.uint8)

    scale = max(2.0 * float(threshold), 1e-6) if np.isfinite(threshold) else max(float(score.max()), 1e-6)
    heat = heat_colours(resize(_square(score / scale, 0.0), (tile, tile), order=1))
    outlined = grey(image)
    for mask, colour in ((truth, (40, 220, 40)), (pred, (255, 40, 40))):
        if mask is not None and mask.any():
            m = resize(_square(mask.astype(np.float32), 0.0), (tile, tile), order=0) > 0.5
            outlined[find_boundaries(m, mode="inner")] = colour
    return np.concatenate([grey(image), grey(counterfactual), heat, outlined], axis=1)


Section = tuple[str, Sequence[tuple[str, np.ndarray]]]  # (title, [(caption, tile_row)])


def gallery(columns: Sequence[tuple[str, Sequence[Section]]], tile: int = 128) -> np.ndarray:
    """One column per method (name, sections), each a stack of captioned tile rows, side by side on white."""
    width = 4 * tile
    blocks = []
    for name, sections in columns:
        parts = [text_strip(name, width, 18, bold=True),
                 text_strip("input | counterfactual | map (0 to 2x threshold) | red: detected, green: truth", width)]
        for title, rows in sections:
            parts.append(text_strip(title, width, 16, bold=True))
            if not rows:
                parts.append(text_strip("(no case)", width))
            for caption, row in rows:
                parts.append(text_strip(caption, width))
                parts.append(row)
        blocks.append(np.concatenate(parts, axis=0))
    if not blocks:
        return text_strip("no method", width)
    h = max(b.shape[0] for b in blocks)
    blocks = [np.pad(b, ((0, h - b.shape[0]), (0, 0), (0, 0)), constant_values=255) for b in blocks]
    return side_by_side(blocks, gap=12)


class Gallery:
    """The best and worst anomalous images and the worst healthy image of one method, as picture rows."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.best: list = []
        self.worst: list = []
        self.alarm: list = []
        self.n = 0

    def _offer(self, heap: list, size: int, key: float, make: Callable[[], tuple[str, np.ndarray]]) -> None:
        self.n += 1
        if len(heap) < size:
            heapq.heappush(heap, (key, self.n, make()))
        elif key > heap[0][0]:
            heapq.heapreplace(heap, (key, self.n, make()))

    def offer(self, stats: dict[str, Any], make: Callable[[], tuple[str, np.ndarray]]) -> None:
        """Consider one image: anomalous ranked by Dice (or image score without masks), healthy by image score."""
        if stats["label"] == 1:
            key = stats["dice"] if np.isfinite(stats["dice"]) else stats["image_score"]
            self._offer(self.best, self.k, key, make)
            self._offer(self.worst, self.k, -key, make)
        else:
            self._offer(self.alarm, 1, stats["image_score"], make)

    def sections(self, method: str) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
        """(title, rows) for the gallery picture."""
        best = [p for _, _, p in sorted(self.best, key=lambda e: -e[0])]
        worst = [p for _, _, p in sorted(self.worst, key=lambda e: -e[0])]
        alarm = [p for _, _, p in self.alarm]
        return [("best anomalous images", best), ("worst anomalous images", worst),
                ("healthy image with the highest score", alarm)]
