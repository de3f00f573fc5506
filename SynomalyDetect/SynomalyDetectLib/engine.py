"""How the Slicer side reaches the engine: command lines, environment, the model registry, demo data.

Nothing here imports torch at module scope; the registry functions import the engine lazily.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from synomaly.contract import DEFAULT_MODEL, DEMO_FILE, DEMO_TRUTH_FILE, ENGINE_MODULE  # standard library only

#: The folder that holds the `synomaly` package (SynomalyDetect/ in the source tree and the install).
ENGINE_PARENT = Path(__file__).resolve().parent.parent

#: Python packages the engine needs besides numpy and SimpleITK (which ship with Slicer) and torch
#: (which comes from the PyTorch extension). Import name -> pip requirement. The same requirements as
#: pyproject.toml's dependencies (Testing/test_slicer_static.py checks that they agree).
PIP_REQUIREMENTS = {
    "monai": "monai[einops]>=1.4",
    "skimage": "scikit-image>=0.21",
    "safetensors": "safetensors>=0.4",
    "scipy": "scipy>=1.9",
    "PIL": "Pillow>=9",
    "imageio": "imageio>=2.22",
}
TORCH_REQUIREMENT = ">=2.1"
#: The demo case is the MNI152 template from this wheel (installed with --no-deps).
DEMO_REQUIREMENT = "nilearn"


class EngineUnavailable(RuntimeError):
    """The engine (or torch under it) cannot be imported in this Python yet."""


def engine_command(python: Sequence[str], *args: Any) -> list[str]:
    """[python..., -m, synomaly.cli, args...]."""
    return [*python, "-m", ENGINE_MODULE, *(str(a) for a in args)]


def engine_environment(base: Optional[Mapping[str, str]] = None, models_dir: Optional[str] = None) -> dict[str, str]:
    """The environment for an engine process: `base` (default os.environ) with the engine on PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    paths = [str(ENGINE_PARENT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if models_dir:
        env["SYNOMALY_MODELS_DIR"] = str(models_dir)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def missing_packages() -> list[str]:
    """Import names of the engine's packages that are not installed here (torch first)."""
    import importlib.util

    names = ["torch", *PIP_REQUIREMENTS]
    return [name for name in names if importlib.util.find_spec(name) is None]


def _modelio():
    try:
        from synomaly import modelio
    except ImportError as exc:
        raise EngineUnavailable(
            f"the detection engine cannot be loaded ({exc}); install its dependencies first"
        ) from exc
    return modelio


def list_models() -> list[dict[str, Any]]:
    """The engine's registry: [{"name", "path", "source", "card" | "error"}], user models first."""
    return _modelio().list_models()


def default_model_name() -> str:
    """The model the engine uses when none is named."""
    return DEFAULT_MODEL


def user_models_dir() -> Path:
    """Where user models live (SYNOMALY_MODELS_DIR or the per-user default)."""
    return Path(_modelio().user_models_dir())


def remove_model(name: str, models_dir: Optional[Path] = None) -> list[Path]:
    """Delete a user model from `models_dir` (default: the user model folder), with its partner model file unless
    another model there pairs with it too; shipped models cannot be removed. Returns the files removed."""
    return _modelio().remove_model(name, models_dir)


def _file_safe(text: str) -> str:
    """`text` with every character other than letters, digits, '-', '_' and '.' replaced by '_'."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def checkpoint_path(name: str, models_dir: Optional[Path] = None) -> Path:
    """The training checkpoint kept for model `name` (next to the user model folder), for resuming."""
    base = Path(models_dir) if models_dir is not None else user_models_dir()
    safe = _file_safe(name) or "model"
    return base.parent / "checkpoints" / f"{safe}.ckpt"


def model_summary(entry: Mapping[str, Any]) -> str:
    """A few lines about a registry entry for the panel: modality, contrast, intended use, calibration."""
    if "card" not in entry:
        return f"{entry.get('name', '?')}: cannot be used ({entry.get('error', 'unknown problem')})"
    card = entry["card"]
    thresholds = (card.get("calibration") or {}).get("thresholds") or {}
    calibration = ", ".join(f"FPR {k}: {float(v):.3g}" for k, v in sorted(thresholds.items(), key=lambda kv: -float(kv[0])))
    lines = [
        f"<b>{card.get('name', entry.get('name'))}</b> {card.get('version', '')} ({entry.get('source', '')})",
        card.get("description", "") or "",
        f"Modality: {card.get('modality', '?')}, contrast: {card.get('contrast', '?')}, "
        f"{card.get('orientation', '?')} slices, grid {card.get('grid_size', '?')}",
        f"Calibrated thresholds: {calibration or 'none (use an explicit threshold)'}",
        *([f"Volumes: its map averaged with {card['partner_3d'].get('file')}'s (a second model, in the same folder)"]
          if card.get("partner_3d") else []),
        f"<i>{card.get('intended_use', '')}</i>",
    ]
    return "<br>".join(line for line in lines if line)


#: File endings of the Synomaly authors' published checkpoints, converted by `synomaly import-upstream`.
UPSTREAM_SUFFIXES = (".pt", ".pth")


def model_name_for_file(path: str | Path) -> str:
    """The registry name a model file gets when added: its file name without the ending, made safe."""
    name = Path(path).name
    for suffix in (".safetensors", *UPSTREAM_SUFFIXES):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _file_safe(name).strip("._") or "model"


def add_model_args(path: str | Path, name: str, overwrite: bool = False) -> list[Any]:
    """The engine command that puts a model file into the user model folder under `name`.

    Our own model files (.safetensors) are checked and copied (`synomaly install-model`); the
    authors' checkpoints (.pt/.pth) are converted on the way (`synomaly import-upstream`), loaded
    without executing code. Raises RuntimeError for a file that is neither.
    """
    path = Path(path)
    if path.suffix.lower() in UPSTREAM_SUFFIXES:
        return ["import-upstream", path, "--name", name] + (["--overwrite"] if overwrite else [])
    if path.name.lower().endswith(".safetensors"):
        return ["install-model", path, "--name", name]
    raise RuntimeError(f"{path.name}: not a model file (expected .safetensors, or the authors' .pt checkpoint)")


def add_model_file(path: str | Path, python: Sequence[str], env: Optional[Mapping[str, str]] = None,
                   name: Optional[str] = None, overwrite: bool = False, timeout: float = 1800) -> str:
    """Put a model file into the user model folder and wait for it (scripts, self-tests); its registry name.
    Raises RuntimeError with the engine's message when the file is refused. The panel runs the same job
    in the background (jobs.add_model_job)."""
    from .jobs import add_model_job, run_to_end

    return run_to_end(add_model_job(path, python, env, name=name, overwrite=overwrite), timeout)


def uncalibrated_threshold(entry: Optional[Mapping[str, Any]]) -> Optional[float]:
    """For a usable model without calibration, the threshold its card recommends; else None."""
    if not entry or "card" not in entry or calibrated_fprs(entry):
        return None
    try:
        return float((entry["card"].get("detection") or {})["threshold"])
    except (KeyError, TypeError, ValueError):
        return None


def calibrated_fprs(entry: Optional[Mapping[str, Any]]) -> list[float]:
    """False-positive rates the model is calibrated for (for volumes, when tuned; when paired with a second
    model, the averaged map's), largest first."""
    if not entry or "card" not in entry:
        return []
    card = entry["card"]
    cal = card.get("calibration_3d") if card.get("detection_3d") else card.get("calibration")
    if card.get("partner_3d"):  # volumes are detected with the pair: its averaged map's thresholds
        cal = card["partner_3d"]
    thresholds = (cal or {}).get("thresholds") or {}
    return sorted((float(k) for k in thresholds), reverse=True)


def default_fpr(entry: Optional[Mapping[str, Any]]) -> Optional[float]:
    """The false-positive rate the model's card uses for volumes when none is asked for (`synomaly tune`
    sets it; Slicer's inputs are volumes)."""
    if not entry or "card" not in entry:
        return None
    card = entry["card"]
    value = (card.get("partner_3d") or card.get("detection_3d") or card.get("detection") or {}).get("fpr", 1e-3)
    return float(value)


def generate_demo_data(out_dir: str | Path, python: Sequence[str], env: Optional[Mapping[str, str]] = None,
                       timeout: float = 600) -> Path:
    """Have the engine write its demo case (healthy template with an implanted lesion) and wait; its path.

    The engine also writes the implanted lesion's true mask next to it (DEMO_TRUTH_FILE).
    The panel runs the same job in the background (jobs.demo_data_job).
    """
    path = Path(out_dir) / DEMO_FILE
    if path.exists():
        return path
    from .jobs import demo_data_job, run_to_end

    return run_to_end(demo_data_job(out_dir, python, env), timeout)


def read_report(path: str | Path) -> dict[str, Any]:
    """The engine's report.json ({} if absent or unreadable)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
