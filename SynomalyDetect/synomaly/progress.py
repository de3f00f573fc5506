"""Progress reporting: a terminal bar, JSON lines for programs, or nothing."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable, Optional

ProgressFn = Callable[..., None]


def null_progress(stage: str, done: int, total: int, message: str = "", **extra: Any) -> None:
    """Ignore progress."""


class JsonProgress:
    """One JSON object per line on a stream: {"stage", "done", "total", "message", ...}."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stdout

    def __call__(self, stage: str, done: int, total: int, message: str = "", **extra: Any) -> None:
        record = {"stage": stage, "done": int(done), "total": int(total), "message": message}
        record.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in extra.items()})
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()


class BarProgress:
    """A one-line progress bar on a terminal (stderr), redrawn at most 10 times a second."""

    def __init__(self, stream=None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.last = 0.0
        self.stage: Optional[str] = None

    def __call__(self, stage: str, done: int, total: int, message: str = "", **extra: Any) -> None:
        now = time.monotonic()
        finished = total > 0 and done >= total
        if stage == self.stage and not finished and now - self.last < 0.1:
            return
        if self.stage is not None and stage != self.stage:
            self.stream.write("\n")
        self.stage, self.last = stage, now
        frac = min(1.0, done / total) if total > 0 else 0.0
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        extras = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items())
        self.stream.write(f"\r{stage:>12} [{bar}] {done}/{total} {message} {extras}".rstrip()[:160].ljust(100))
        if finished:
            self.stream.write("\n")
            self.stage = None
        self.stream.flush()


def make_progress(kind: str) -> ProgressFn:
    """'json', 'bar', 'none' or 'auto' (a bar on a terminal, nothing otherwise)."""
    if kind == "json":
        return JsonProgress()
    if kind == "bar" or (kind == "auto" and sys.stderr.isatty()):
        return BarProgress()
    return null_progress
