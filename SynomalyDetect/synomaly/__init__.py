"""Synomaly: unsupervised anomaly detection in medical images with Synomaly noise and multi-stage diffusion.

Importing this package is cheap and has no side effects; torch and friends load on first use.
"""

from __future__ import annotations

from .contract import __version__  # from the package metadata

__all__ = [
    "DetectionSettings",
    "TrainingSettings",
    "detect",
    "load_model",
    "list_models",
    "read_image",
    "tune_model",
    "__version__",
]


_HOMES = {
    "DetectionSettings": ".detect", "detect": ".detect", "DetectionResult": ".detect",
    "load_model": ".modelio", "list_models": ".modelio", "save_model": ".modelio",
    "TrainingSettings": ".settings", "read_image": ".prepare", "tune_model": ".tune",
}


def __getattr__(name: str):
    """Lazy access to the public API.

    `synomaly.detect` is the function, although a submodule has the same name: importing the submodule
    binds the module to the package attribute, so the function is bound again right after."""
    import importlib

    if name not in _HOMES:
        raise AttributeError(f"module 'synomaly' has no attribute {name!r}")
    module = importlib.import_module(_HOMES[name], __name__)
    if _HOMES[name] == ".detect":
        globals()["detect"] = module.detect
    return getattr(module, name)
