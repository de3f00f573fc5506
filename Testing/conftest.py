"""Shared fixtures of the pytest suite.

`tiny_model_file`: a random-weight model on a 32 x 32 grid, made without training (seconds); fine for
tests of messages, exit codes, files and invariants, not for detection quality.
`synomaly_run`: runs the real command line (`python -m synomaly.cli ...`) in a subprocess.
`phantom`: small head-like test volumes (an ellipse of tissue with texture on a dark background).
"""

from __future__ import annotations

import contextlib
import locale
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pytest

SYNOMALY_CLI = [sys.executable, "-m", "synomaly.cli"]


def skip_or_fail_in_ci(reason: str) -> None:
    """Skip a test whose input is missing here; under CI (CI=true) fail instead: CI must not lose a check silently."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: a check that cannot run fails)")
    pytest.skip(reason)


def synomaly_env(**extra: str) -> dict[str, str]:
    """Environment of a test subprocess: one thread (the machine is shared), plus `extra`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update(extra)
    return env


@pytest.fixture(scope="session", autouse=True)
def plan_cache(tmp_path_factory) -> Iterator[Path]:
    """Execution plans (synomaly.plan) measured in this test session go to a temporary cache, not the user's."""
    path = tmp_path_factory.mktemp("synomaly-cache")
    before = os.environ.get("SYNOMALY_CACHE_DIR")
    os.environ["SYNOMALY_CACHE_DIR"] = str(path)
    yield path
    if before is None:
        os.environ.pop("SYNOMALY_CACHE_DIR", None)
    else:
        os.environ["SYNOMALY_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory) -> Path:
    """A valid model file (card + random weights) on a 32 x 32 grid with two 32-channel levels."""
    import torch

    from synomaly.modelio import build_network, save_model
    from synomaly.train import new_card

    torch.manual_seed(0)
    card = new_card("tiny", grid=32, channels=(32, 32))
    path = tmp_path_factory.mktemp("tiny-model") / "tiny.safetensors"
    save_model(path, card, build_network(card).state_dict())
    return path


@pytest.fixture(scope="session")
def synomaly_run() -> Callable[..., subprocess.CompletedProcess]:
    """`run(args, timeout=..., env=..., prefix=...)`: the `synomaly` command in a subprocess, text output."""

    def run(args: Sequence[str], timeout: float = 180, env: dict[str, str] | None = None,
            prefix: Sequence[str] = (), cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *SYNOMALY_CLI, *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, env=env or synomaly_env(), cwd=cwd)

    return run


def make_phantom(shape: Sequence[int], seed: int = 0, background: float = 0.0, tissue: float = 100.0,
                 noise: float = 5.0) -> np.ndarray:
    """A float32 array of `shape` (numpy order, 2D or 3D): an elliptic body with texture on a dark background."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) if n > 1 else np.zeros(1) for n in shape], indexing="ij")
    inplane = grids[-2:]  # the body fills the last two axes in every slice
    body = sum(g**2 for g in inplane) < 0.7**2
    arr = np.where(body, tissue, background) + rng.normal(0.0, noise, tuple(shape))
    return arr.astype(np.float32)


@pytest.fixture(scope="session")
def phantom() -> Callable[..., np.ndarray]:
    """The `make_phantom` function."""
    return make_phantom


def write_dicom_series(folder: Path, volume: np.ndarray, series_uid: str, *, modality: str = "MR",
                       description: str = "AX T1", spacing: tuple[float, float, float] = (1.0, 1.0, 3.0),
                       prefix: str = "img") -> list[Path]:
    """Write `volume` (numpy (k, j, i), int16 range) as a DICOM series: one file per slice with its own
    SeriesInstanceUID (0020|000e), Modality (0008|0060) and SeriesDescription (0008|103e)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.asarray(volume).astype(np.int16))
    image.SetSpacing(spacing)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    study_uid = "1.2.826.0.1.3680043.2.1125.7.1"
    files = []
    for k in range(image.GetDepth()):
        s = image[:, :, k]
        tags = {
            "0008|0060": modality,
            "0008|103e": description,
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:g}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": f"{spacing[1]:g}\\{spacing[0]:g}",
            "0018|0050": f"{spacing[2]:g}",
            "0008|0020": "20240101",
            "0008|0030": "120000",
        }
        for key, value in tags.items():
            s.SetMetaData(key, value)
        path = folder / f"{prefix}{k:03d}.dcm"
        writer.SetFileName(str(path))
        with _keeping_locale():  # GDCM's DICOM writer sets the process locale to "C" (Python's text turns ASCII)
            writer.Execute(s)
        files.append(path)
    return files


@contextlib.contextmanager
def _keeping_locale() -> Iterator[None]:
    """Put the process locale back after a C library changed it."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


@pytest.fixture(autouse=True)
def _locale_unchanged(request):
    """No test (and no engine code it runs) may leave the process locale changed: a "C" locale makes every
    later default-encoding text read ASCII, and unrelated tests fail far from the cause."""
    before = locale.setlocale(locale.LC_ALL)
    yield
    after = locale.setlocale(locale.LC_ALL)
    if after != before:
        locale.setlocale(locale.LC_ALL, before)
        pytest.fail(f"{request.node.nodeid} changed the process locale: {before!r} -> {after!r}")


@pytest.fixture(scope="session")
def dicom_series() -> Callable[..., list[Path]]:
    """The `write_dicom_series` function."""
    return write_dicom_series
