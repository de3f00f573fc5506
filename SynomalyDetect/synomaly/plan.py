"""How to run a network fastest on this machine: slices per call and memory format, measured once and cached.

The fastest batch differs by machine more than by anything else: on a CPU without fast bf16 one slice per call
can beat eight by a quarter, on a CPU with AMX four to eight slices win, and a GPU wants as many as fit. So
the first detection with a model on a device times a few candidates (a second or two for the shipped model,
about half a minute for a 100 M-parameter network on two CPU cores) and remembers the fastest in
`plans.json` in the cache folder, keyed by the device, the number of threads, torch's version, the network and
the precision. Neither choice changes results beyond float rounding (tested: maps agree to 1e-4).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .progress import ProgressFn, null_progress

log = logging.getLogger(__name__)

PLAN_FILE = "plans.json"
CPU_BATCHES = (1, 2, 4, 8, 16, 32)
GPU_BATCHES = (1, 4, 8, 16, 32, 64, 128)
PAST_BEST = 1.15  # stop trying larger batches once one is this much slower per slice than the best so far
PROBE_SECONDS = 0.4  # time each candidate for about this long (one call when a call is slower)
PROBE_BUDGET = 30.0  # start no new trial after this long (a 100 M-parameter network on 2 CPU cores)


@dataclass(frozen=True)
class ExecutionPlan:
    """Slices per network call and memory format, with what they were chosen from."""

    batch_size: int
    channels_last: bool
    seconds_per_slice: float = math.nan
    source: str = "default"  # "probe", "cache", "default"
    trials: dict[str, float] = field(default_factory=dict)  # "8/cl" -> seconds per slice

    def describe(self) -> str:
        fmt = "channels-last" if self.channels_last else "contiguous"
        how = {"probe": "measured now", "cache": "measured earlier on this machine", "default": "not measured"}
        speed = f", {self.seconds_per_slice * 1000:.1f} ms per slice" if math.isfinite(self.seconds_per_slice) else ""
        return f"batches of {self.batch_size}, {fmt}{speed} ({how.get(self.source, self.source)})"


def cache_dir() -> Path:
    """SYNOMALY_CACHE_DIR, else $XDG_CACHE_HOME/synomaly, else ~/.cache/synomaly."""
    env = os.environ.get("SYNOMALY_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "synomaly"


def device_name(device: torch.device) -> str:
    """The hardware behind a device, as specific as the system says (the CPU model, the GPU's name)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        model = ""
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        return f"cpu:{model or platform.processor() or platform.machine()}"
    return device.type


def plan_key(model) -> str:
    """What a measurement holds for: hardware, threads, torch, precision, network and grid."""
    network = json.dumps(asdict(model.card.network), sort_keys=True) + f"@{model.card.grid_size}"
    digest = hashlib.sha256(network.encode()).hexdigest()[:16]
    threads = torch.get_num_threads() if model.device.type == "cpu" else 0
    return "|".join([device_name(model.device), f"threads={threads}", f"torch={torch.__version__}",
                     f"dtype={model.dtype}", f"net={digest}"])


def default_plan(model) -> ExecutionPlan:
    """The plan before any measurement: what was the engine's fixed choice."""
    return ExecutionPlan(batch_size=8, channels_last=model.device.type == "cpu" and model.dtype is not None)


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, key: str, plan: ExecutionPlan) -> None:
    """Add one plan to the cache file atomically; a cache that cannot be written only costs a re-probe."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[key] = {**asdict(plan), "source": "cache", "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".plans-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not remember the execution plan in %s (%s); it will be measured again", path, exc)


def _from_cache(entry: Any) -> Optional[ExecutionPlan]:
    try:
        return ExecutionPlan(batch_size=max(1, int(entry["batch_size"])), channels_last=bool(entry["channels_last"]),
                             seconds_per_slice=float(entry.get("seconds_per_slice", math.nan)), source="cache",
                             trials={str(k): float(v) for k, v in dict(entry.get("trials", {})).items()})
    except (KeyError, TypeError, ValueError):
        return None


def _time_calls(model, batch: int, t: int, gen: torch.Generator) -> float:
    """Seconds per slice of predict_noise at this batch: one warm-up call, then calls for about PROBE_SECONDS."""
    g = int(model.card.grid_size)
    x = torch.randn(batch, 1, g, g, generator=gen).clamp(-1, 1)
    tt = torch.full((batch,), int(t), dtype=torch.long)
    start = time.perf_counter()
    model.predict_noise(x, tt)
    warm = time.perf_counter() - start
    n = 1 if warm >= PROBE_SECONDS else max(2, min(20, int(PROBE_SECONDS / max(warm, 1e-4))))
    start = time.perf_counter()
    for _ in range(n):
        model.predict_noise(x, tt)
    return (time.perf_counter() - start) / (n * batch)


def probe(model, progress: ProgressFn = null_progress, batches: Optional[tuple[int, ...]] = None) -> ExecutionPlan:
    """Time candidate batches in each memory format and return the fastest (the model's counters are kept)."""
    device = model.device
    if batches is None:
        batches = CPU_BATCHES if device.type == "cpu" else GPU_BATCHES
    formats = (False, True) if device.type in ("cpu", "cuda") else (False,)
    calls, secs, fmt0 = model.calls, model.call_seconds, model.channels_last
    gen = torch.Generator().manual_seed(0)
    t = int(model.card.detection.t)
    trials: dict[str, float] = {}
    best = {cl: math.inf for cl in formats}
    began = time.perf_counter()
    try:
        # both formats at each batch before the next batch: the small batches matter most, and a slow network
        # may exhaust the budget before the large ones
        for b in batches:
            for cl in [f for f in formats if f in best]:
                if time.perf_counter() - began > PROBE_BUDGET:
                    break
                model.channels_last = cl
                progress("plan", len(trials), len(formats) * len(batches),
                         f"timing batches of {b} ({'channels-last' if cl else 'contiguous'})")
                try:
                    per = _time_calls(model, b, t, gen)
                except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        del best[cl]
                        continue
                    raise
                trials[f"{b}/{'cl' if cl else 'c'}"] = round(per, 6)
                if per > PAST_BEST * best[cl]:
                    del best[cl]  # past this format's fastest batch
                else:
                    best[cl] = min(best[cl], per)
            if not best:
                break
    finally:
        model.channels_last = fmt0
        model.calls, model.call_seconds = calls, secs
    if not trials:
        return default_plan(model)
    best_key = min(trials, key=trials.get)
    b, f = best_key.split("/")
    progress("plan", 1, 1, f"fastest: batches of {b}, {'channels-last' if f == 'cl' else 'contiguous'}")
    return ExecutionPlan(batch_size=int(b), channels_last=f == "cl", seconds_per_slice=trials[best_key],
                         source="probe", trials=trials)


def execution_plan(model, progress: ProgressFn = null_progress, refresh: bool = False) -> ExecutionPlan:
    """The plan for this model on its device: remembered on the model, else from the cache, else measured.

    SYNOMALY_PLAN=default skips measuring (the fixed plan: batches of 8); the model then keeps its format.
    """
    plan = getattr(model, "plan", None)
    if plan is not None and not refresh:
        return plan
    if os.environ.get("SYNOMALY_PLAN", "").lower() == "default":
        plan = default_plan(model)
    else:
        path = cache_dir() / PLAN_FILE
        key = plan_key(model)
        plan = None if refresh else _from_cache(_read_cache(path).get(key))
        if plan is None:
            plan = probe(model, progress)
            log.info("execution plan for %s on %s: %s", model.card.name, device_name(model.device), plan.describe())
            if plan.source == "probe":
                _write_cache(path, key, plan)
    model.plan = plan
    model.channels_last = plan.channels_last
    return plan
