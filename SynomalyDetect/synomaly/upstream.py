"""Import the Synomaly authors' published checkpoints (`torch.save` dictionaries) as our model files.

Their checkpoint holds `n_epoch`, `model_state_dict`, `optimizer_state_dict`, `args` (the training
configuration) and `loss`. We read it with `torch.load(weights_only=True)`, so a file that needs
code to be executed to load is refused; the only extra types allowed are numpy scalars and dtypes
(their `loss` is a numpy float), which are plain data. From `args` we write a model card that
states what the model expects: the authors' 128 x 128 whole-slice framing and per-slice min-max
normalisation, their noise settings and their detection settings. Only the weights are kept.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

from .card import DetectionDefaults, ModelCard, NetworkSettings, NoiseSettings, NormalisationSettings
from .modelio import MODEL_SUFFIX, ModelFileError, build_network, check_weights, save_model

log = logging.getLogger(__name__)

UPSTREAM_ARCHITECTURE = "guided-diffusion.UNetModel"

# The authors' default channel multipliers by image size (used when args["channel_mult"] is "").
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 3, 4),
}

# What each of the authors' datasets means for using the model: modality, contrast, orientation,
# intensity window, and the detection settings they published (t, blur kernel k, threshold theta).
DATASETS: dict[str, dict[str, Any]] = {
    "brats23": {
        "modality": "MR", "contrast": "FLAIR", "orientation": "axial",
        "description": "Brain MRI (FLAIR), axial slices; the Synomaly authors' BraTS 2023 model",
        "normalisation": {"lower_percentile": 0.0, "upper_percentile": 99.0},
        "detection": {"t": 200, "blur_kernel": 11, "threshold": 0.25},
    },
    "lits": {
        "modality": "CT", "contrast": "abdominal CT, HU window 0-150", "orientation": "axial",
        "description": "Liver CT, axial slices; the Synomaly authors' LiTS model",
        "normalisation": {"window_low": 0.0, "window_high": 150.0, "lower_percentile": 0.0, "upper_percentile": 100.0},
        "detection": {"t": 200, "blur_kernel": 11, "threshold": 0.25},
    },
    "ultrasound": {
        "modality": "US", "contrast": "B-mode", "orientation": "axial",
        "description": "Carotid ultrasound (B-mode) images; the Synomaly authors' model",
        "normalisation": {"lower_percentile": 0.0, "upper_percentile": 100.0},
        "detection": {"t": 250, "blur_kernel": 15, "threshold": 0.3},
    },
}

NOISE_KINDS = {"synomaly": "synomaly", "gauss": "gaussian", "gaussian": "gaussian"}


def _numpy_data_globals() -> list[Any]:
    """numpy scalar/dtype constructors: plain data, needed for the numpy float the authors store as loss."""
    import numpy as np

    allowed: list[Any] = [np.dtype]
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    # a pickle written under numpy 1.x names numpy.core..., one written under numpy 2 numpy._core...
    allowed += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and isinstance(getattr(dtypes, n), type)]
    return allowed


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The authors' checkpoint dictionary, loaded without executing code; clear errors otherwise."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise ModelFileError(f"checkpoint {path} is empty")
    try:
        with torch.serialization.safe_globals(_numpy_data_globals()):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        needs = ""
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            if found:
                needs = f" (it references {', '.join(sorted(found)[:4])})"
        except Exception:  # noqa: BLE001 - only used to improve the message
            pass
        raise ModelFileError(
            f"{path} cannot be loaded without executing code{needs}; it is refused. Checkpoints from the "
            "authors' training code hold only tensors, numbers and strings."
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ModelFileError(f"{path} is not a readable PyTorch checkpoint (truncated or another format): {exc}") from exc
    if not isinstance(data, dict) or "model_state_dict" not in data or "args" not in data:
        keys = sorted(data)[:6] if isinstance(data, dict) else type(data).__name__
        raise ModelFileError(
            f"{path} is not a Synomaly checkpoint: expected a dictionary with 'model_state_dict' and 'args', found {keys}"
        )
    if not isinstance(data["args"], dict) or not isinstance(data["model_state_dict"], dict):
        raise ModelFileError(f"{path}: 'args' and 'model_state_dict' must be dictionaries")
    return data


def _as_int_list(value: Any, what: str) -> list[int]:
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    try:
        return [int(p) for p in parts]
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"args['{what}'] = {value!r} is not a list of integers") from exc


def card_from_args(args: dict[str, Any], *, name: str, modality: str | None = None, contrast: str | None = None,
                   orientation: str | None = None, epochs: Any = None) -> ModelCard:
    """A model card that says what the authors' model expects, from their training `args`."""
    def need(key: str) -> Any:
        if key not in args:
            raise ModelFileError(f"the checkpoint's args have no '{key}'; cannot describe the network")
        return args[key]

    size = int(need("img_size"))
    if int(args.get("in_channels", 1)) != 1:
        raise ModelFileError(f"in_channels {args['in_channels']}: only one-channel (greyscale) models are supported")
    mc = int(need("model_channels"))
    mult_text = args.get("channel_mult", "")
    if mult_text in ("", None):
        if size not in DEFAULT_CHANNEL_MULT:
            raise ModelFileError(f"img_size {size} has no default channel_mult in the authors' code; give channel_mult")
        mult: tuple[float, ...] = DEFAULT_CHANNEL_MULT[size]
    elif isinstance(mult_text, str):
        mult = tuple(float(m) for m in mult_text.split(",") if m.strip())
    else:
        mult = tuple(float(m) for m in mult_text)
    attention_ds = set(_as_int_list(args.get("attention_resolutions", "32,16,8"), "attention_resolutions"))
    schedule = str(args.get("beta_schedule", "cosine"))
    if schedule != "cosine":
        raise ModelFileError(f"beta_schedule {schedule!r}: only the cosine schedule is supported")
    noise_fn = str(args.get("noise_fn", "synomaly")).lower()
    if noise_fn not in NOISE_KINDS:
        raise ModelFileError(f"noise_fn {noise_fn!r} is not supported (synomaly or gauss)")

    dataset = str(args.get("dataset", "")).lower()
    preset = DATASETS.get(dataset, {})
    if not preset:
        log.warning("unknown dataset %r in the checkpoint: give --modality and --contrast", dataset)

    p = args.get("noise_params") or {}
    direction = p.get("anomaly_direction", 1)
    directions = set(direction) if isinstance(direction, (list, tuple)) else {direction}
    polarity = "both" if len(directions) > 1 else ("darker" if directions == {-1} else "brighter")
    noise = NoiseSettings(
        kind=NOISE_KINDS[noise_fn],
        sigma=float(p.get("anomaly_sigma", 3)),
        tau=float(p.get("anomaly_threshold", 175)),
        offset=float(p.get("anomaly_offset", 0.5)),
        polarity=polarity,
    )
    network = NetworkSettings(
        architecture=UPSTREAM_ARCHITECTURE,
        channels=tuple(round(m * mc) for m in mult),
        attention_levels=tuple((2 ** level) in attention_ds for level in range(len(mult))),
        num_res_blocks=int(need("num_res_blocks")),
        num_head_channels=int(args.get("num_head_channels", -1)),
        norm_num_groups=32,
        model_channels=mc,
        num_heads=int(args.get("num_heads", 1)),
        dropout=float(args.get("dropout", 0.0)),
    )
    normalisation = NormalisationSettings(method="slice-minmax", upper_value=1.0, **preset.get("normalisation", {}))
    detection = DetectionDefaults(max_stages=5, **preset.get("detection", {"t": 200, "blur_kernel": 11, "threshold": 0.25}))
    training = {
        "source": "imported from the Synomaly authors' checkpoint (github.com/yuan-12138/Synomaly)",
        "dataset": dataset or "unknown",
        "epochs": int(epochs) if isinstance(epochs, (int, float)) else None,
        "authors_settings": {k: args[k] for k in ("batch_size", "lr", "epochs", "num_training_data", "loss-type")
                             if k in args and isinstance(args[k], (int, float, str))},
    }
    return ModelCard(
        name=name,
        description=preset.get("description", f"Imported from the Synomaly authors' checkpoint (dataset {dataset or 'unknown'})"),
        modality=modality or preset.get("modality", "any"),
        contrast=contrast or preset.get("contrast", "any"),
        orientation=orientation or preset.get("orientation", "axial"),
        grid_size=size,
        field_of_view="the whole slice, padded to a square, resized to the grid (the authors' framing)",
        framing="whole-slice",
        normalisation=normalisation,
        network=network,
        noise=noise,
        timesteps=int(args.get("noise_steps", 1000)),
        detection=detection,
        training=training,
        licence="see the authors' repository for the licence of their weights",
    )


def import_checkpoint(checkpoint: str | Path, output: str | Path, *, name: str | None = None,
                      modality: str | None = None, contrast: str | None = None,
                      orientation: str | None = None) -> Path:
    """Convert the authors' checkpoint into our model file (safetensors + card); returns its path."""
    data = load_checkpoint(checkpoint)
    output = Path(output)
    stem = output.name[: -len(MODEL_SUFFIX)] if output.name.endswith(MODEL_SUFFIX) else output.stem
    card = card_from_args(data["args"], name=name or stem, modality=modality, contrast=contrast,
                          orientation=orientation, epochs=data.get("n_epoch"))
    state = data["model_state_dict"]
    if state and all(k.startswith("module.") for k in state):  # saved from a DataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    network = build_network(card)
    check_weights(state, network, Path(checkpoint))
    return save_model(output, card, state)
