"""Synomaly: unsupervised anomaly detection in medical images with Synomaly noise and multi-stage diffusion.

Importing this package is cheap and has no side effects; torch and friends load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "DetectionSettings",
    "TrainingSettings",
    "detect",
    "load_model",
    "list_models",
    "read_image",
    "__version__",
]


def __getattr__(name: str):
    """Lazy access to the public API."""
    if name in ("DetectionSettings", "detect", "DetectionResult"):
        from . import detect as _detect

        return getattr(_detect, name)
    if name in ("load_model", "list_models", "save_model"):
        from . import modelio

        return getattr(modelio, name)
    if name == "TrainingSettings":
        from .train import TrainingSettings

        return TrainingSettings
    if name == "read_image":
        from .prepare import read_image

        return read_image
    raise AttributeError(f"module 'synomaly' has no attribute {name!r}")
