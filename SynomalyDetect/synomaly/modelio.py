"""Model files (safetensors + JSON card), the network, loading with clear errors, and the registry."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .card import ModelCard, ModelCardError
from .contract import DEFAULT_MODEL

if TYPE_CHECKING:  # torch loads on first use, so listing models and reading cards need no torch
    import torch

log = logging.getLogger(__name__)

MODEL_SUFFIX = ".safetensors"
CARD_KEY = "synomaly_card"


def shipped_models_dir() -> Path:
    """The shipped models: Resources/Models beside the package (a clone, Slicer), else synomaly/models (a wheel)."""
    package = Path(__file__).resolve().parent
    beside = package.parent / "Resources" / "Models"
    return beside if beside.is_dir() else package / "models"


SHIPPED_DIR = shipped_models_dir()


class ModelFileError(RuntimeError):
    """A model file cannot be used: unreadable, unsafe, or its card and weights disagree."""


def build_network(card: ModelCard) -> torch.nn.Module:
    """The card's network for one-channel 2D slices: MONAI's DiffusionModelUNet, or the authors' UNet."""
    net = card.network
    if net.architecture == "guided-diffusion.UNetModel":
        from .gdunet import GuidedDiffusionUNet

        return GuidedDiffusionUNet(
            model_channels=net.model_channels,
            channel_mult=tuple(c / net.model_channels for c in net.channels),
            num_res_blocks=net.num_res_blocks,
            attention_levels=tuple(net.attention_levels),
            num_heads=net.num_heads,
            num_head_channels=net.num_head_channels,
            dropout=net.dropout,
            groups=net.norm_num_groups,
        )
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=tuple(net.channels),
        attention_levels=tuple(net.attention_levels),
        num_res_blocks=net.num_res_blocks,
        num_head_channels=net.num_head_channels,
        norm_num_groups=net.norm_num_groups,
        use_flash_attention=True,
    )


class SynomalyModel:
    """A loaded model: its card, the network on a device, and the schedule."""

    def __init__(self, card: ModelCard, network: torch.nn.Module, path: Path | None = None,
                 device: str | torch.device = "cpu", precision: str = "auto") -> None:
        import torch

        from .device import autocast_dtype, resolve_device
        from .schedule import cosine_alphas_cumprod

        self.card = card
        self.path = path
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.network = network.to(self.device).eval()
        self.precision = precision
        self.dtype = autocast_dtype(self.device, precision)
        self._channels_last = False
        # before a measured plan (synomaly.plan): channels-last where bf16 runs on the CPU, as measured there
        self.channels_last = self.device.type == "cpu" and self.dtype is not None
        self.plan = None  # the ExecutionPlan once synomaly.plan has chosen one for this device
        self.abar = cosine_alphas_cumprod(card.timesteps).to(self.device)
        self.calls = 0
        self.call_seconds = 0.0

    @property
    def channels_last(self) -> bool:
        """Whether the network and its inputs use the channels-last memory format."""
        return self._channels_last

    @channels_last.setter
    def channels_last(self, value: bool) -> None:
        import torch

        value = bool(value)
        if value != self._channels_last:
            fmt = torch.channels_last if value else torch.contiguous_format
            self.network = self.network.to(memory_format=fmt)
            self._channels_last = value

    def to(self, device: str | torch.device, precision: str | None = None) -> "SynomalyModel":
        """Move to another device (re-choosing mixed precision)."""
        return SynomalyModel(self.card, self.network, self.path, device, precision or self.precision)

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Network output for x (N, 1, H, W) in [-1, 1] at timesteps t (N,) long; float32 (N, 1, H, W)."""
        import time

        import torch

        from .device import autocast

        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"x must have shape (N, 1, H, W), got {tuple(x.shape)}")
        start = time.perf_counter()
        x = x.to(self.device, torch.float32)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(self.device, self.dtype):
            out = self.network(x, timesteps=t.to(self.device).long())
        out = out.float().contiguous()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.calls += 1
        self.call_seconds += time.perf_counter() - start
        return out


def _read_header(path: Path) -> dict[str, Any]:
    """The safetensors JSON header, read without loading tensors; errors name the problem."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc.strerror}") from exc
    if size < 8:
        raise ModelFileError(f"model file {path} is empty or truncated ({size} bytes)")
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little")
        # a safetensors header is a JSON object right after its length; only if it is not there can the
        # file be a pickle (a valid length may itself begin with the byte 0x80 or the letters PK)
        plausible = 0 < n <= 100_000_000 and 8 + n <= size and fh.read(1) == b"{"
        if not plausible and (head[:1] == b"\x80" or head[:2] == b"PK"):
            raise ModelFileError(
                f"{path} is a pickled PyTorch checkpoint, not a safetensors model file; pickles can run code "
                "when loaded and are refused as model files. If it is one of the Synomaly authors' checkpoints, "
                f"convert it with `synomaly import-upstream {path.name}` (which loads it without running code)"
            )
        if not plausible:
            raise ModelFileError(f"{path} is not a valid safetensors file (bad header length; truncated or another format)")
        fh.seek(8)
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFileError(f"{path} has a corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise ModelFileError(f"{path} has a corrupt safetensors header (not a JSON object of tensors)")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path} has a corrupt safetensors header (a tensor without valid data_offsets)") from exc
    if 8 + n + end > size:
        raise ModelFileError(f"{path} is truncated: the header promises {8 + n + end} bytes, the file has {size}")
    return header


def read_card(path: str | Path) -> ModelCard:
    """The card of a model file, validated, without loading weights."""
    path = Path(path)
    header = _read_header(path)
    meta = header.get("__metadata__") or {}
    if CARD_KEY not in meta:
        raise ModelFileError(f"{path} has no Synomaly model card (metadata key '{CARD_KEY}')")
    try:
        return ModelCard.from_json(meta[CARD_KEY])
    except ModelCardError as exc:
        raise ModelFileError(f"{path}: {exc}") from exc


def load_model(path_or_name: str | Path = DEFAULT_MODEL, device: str | torch.device = "auto",
               precision: str = "auto") -> SynomalyModel:
    """Load a model by registry name or file path, checking card and tensor shapes."""
    import torch
    from safetensors.torch import load_file

    path = resolve_model_path(path_or_name)
    card = read_card(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelFileError(f"cannot read the weights in {path}: {exc}") from exc
    network = build_network(card)
    check_weights(tensors, network, path)
    network.load_state_dict(tensors)
    return SynomalyModel(card, network, path, device, precision)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, in lower-case hexadecimal."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_partner(model: SynomalyModel) -> SynomalyModel:
    """The partner model a card pairs this model with for volumes (card.partner_3d), loaded once on the same
    device and precision: the file beside this model's, refused unless its SHA-256 is the card's."""
    pair = model.card.partner_3d
    if pair is None:
        raise ModelFileError(f"model {model.card.name!r} is not paired with another model")
    cached = getattr(model, "_partner", None)
    if cached is not None:
        return cached
    if model.path is None:
        raise ModelFileError(f"model {model.card.name!r} was not loaded from a file, so its partner "
                             f"{pair.file!r} cannot be found")
    path = Path(model.path).parent / pair.file
    if not path.is_file():
        raise ModelFileError(f"model {model.card.name!r} pairs itself with {pair.file}, which is not in "
                             f"{path.parent}: copy it there, or detect with the model alone (--single-model)")
    digest = file_sha256(path)
    if digest != pair.sha256:
        raise ModelFileError(f"{path} is not the partner model {model.card.name!r} was calibrated with (SHA-256 "
                             f"{digest[:12]}..., the card names {pair.sha256[:12]}...); restore that file, or "
                             "detect with the model alone (--single-model)")
    partner = load_model(path, device=model.device, precision=model.precision)
    if partner.card.orientation != model.card.orientation:
        raise ModelFileError(f"the partner {pair.file} slices scans {partner.card.orientation}ly, "
                             f"{model.card.name!r} {model.card.orientation}ly: they cannot be paired")
    if partner.card.detection_3d is None:
        raise ModelFileError(f"the partner {pair.file} has no tuned volume setting (run `synomaly tune` on it)")
    model._partner = partner
    return partner


def check_weights(tensors: dict[str, Any], network: torch.nn.Module, path: Path) -> None:
    """Raise ModelFileError unless `tensors` has exactly the network's names and shapes, all finite."""
    import torch

    expected = network.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ModelFileError(
            f"{path}: weights do not match the network the card describes "
            f"({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )
    for key, value in expected.items():
        if not isinstance(tensors[key], torch.Tensor):
            raise ModelFileError(f"{path}: '{key}' is not a tensor")
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise ModelFileError(
                f"{path}: tensor '{key}' has shape {tuple(tensors[key].shape)} but the card's network needs {tuple(value.shape)}"
            )
        if not torch.isfinite(tensors[key].float()).all():
            raise ModelFileError(f"{path}: tensor '{key}' holds NaN or Inf values")


def save_model(path: str | Path, card: ModelCard, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write weights + card atomically (temporary file, then rename)."""
    import torch
    from safetensors.torch import save_file

    card.validate()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    try:
        save_file(tensors, str(tmp), metadata={CARD_KEY: card.to_json()})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # safetensors creates its file private; a model file is meant to be shared
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def user_models_dir() -> Path:
    """The user-writable model folder: $SYNOMALY_MODELS_DIR, else a per-user data folder."""
    env = os.environ.get("SYNOMALY_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "synomaly" / "models"


def model_dirs() -> list[Path]:
    """Folders searched for models, user folder first (a user model shadows a shipped one)."""
    return [user_models_dir(), SHIPPED_DIR]


def list_models() -> list[dict[str, Any]]:
    """Every model found in the registry folders: name, path, source, card (or the error). A file that another
    model of its folder names as its partner (card.partner_3d) is part of that model and not listed itself."""
    seen: dict[str, dict[str, Any]] = {}
    for folder, source in zip(model_dirs(), ("user", "shipped")):
        if not folder.is_dir():
            continue
        entries = []
        for path in sorted(folder.glob(f"*{MODEL_SUFFIX}")):
            entry: dict[str, Any] = {"name": path.name[: -len(MODEL_SUFFIX)], "path": str(path), "source": source}
            try:
                entry["card"] = read_card(path).to_dict()
            except ModelFileError as exc:
                entry["error"] = str(exc)
            entries.append(entry)
        partners = {(e["card"].get("partner_3d") or {}).get("file") for e in entries if "card" in e}
        for entry in entries:
            if entry["name"] not in seen and Path(entry["path"]).name not in partners:
                seen[entry["name"]] = entry
    return list(seen.values())


def resolve_model_path(path_or_name: str | Path) -> Path:
    """A file path as given, or the registry file of that name."""
    candidate = Path(path_or_name).expanduser()
    if candidate.suffix or os.sep in str(path_or_name) or "/" in str(path_or_name):
        if not candidate.exists():
            raise ModelFileError(f"model file {candidate} does not exist")
        return candidate
    for folder in model_dirs():
        p = folder / f"{path_or_name}{MODEL_SUFFIX}"
        if p.exists():
            return p
    names = ", ".join(m["name"] for m in list_models()) or "none"
    raise ModelFileError(f"no model named {path_or_name!r}; available: {names}")


def install_model(path: str | Path, name: str | None = None) -> Path:
    """Copy a model file into the user folder (validated first), returning its new path."""
    src = Path(path)
    card = read_card(src)
    dest_dir = user_models_dir()
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{name or card.name}{MODEL_SUFFIX}"
    copies = [(src, dest)]
    if card.partner_3d is not None:  # the partner travels with it, checked first
        partner = src.parent / card.partner_3d.file
        if not partner.is_file() or file_sha256(partner) != card.partner_3d.sha256:
            raise ModelFileError(f"{src} pairs itself with {card.partner_3d.file}, which is missing or changed "
                                 f"in {src.parent}")
        if dest.name == card.partner_3d.file:
            raise ModelFileError(f"the name {name or card.name!r} is its partner's file name; choose another")
        copies.insert(0, (partner, dest_dir / card.partner_3d.file))
    for a, b in copies:
        copy_file(a, b)
    return dest


def copy_file(src: str | Path, dest: str | Path) -> Path:
    """Copy a file so that `dest` is either the old file or the whole new one, never a part (a temporary file
    beside it, then a rename)."""
    import shutil

    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return dest


def remove_model(name: str, models_dir: str | Path | None = None) -> list[Path]:
    """Delete a user model by name from `models_dir` (default: the user model folder), with its partner file
    (card.partner_3d) when no other model of the folder pairs with that file too; shipped models cannot be
    removed, and neither can a file that another model of the folder pairs with (remove that model instead).
    Returns the files removed, the model's first."""
    folder = Path(models_dir) if models_dir is not None else user_models_dir()
    p = folder / f"{name}{MODEL_SUFFIX}"
    if not p.exists():
        raise ModelFileError(f"no user model named {name!r} in {folder}")

    def partner_of(path: Path) -> Optional[str]:
        try:
            pair = read_card(path).partner_3d
        except ModelFileError:
            return None
        return pair.file if pair is not None else None

    others = {q.name: partner_of(q) for q in folder.glob(f"*{MODEL_SUFFIX}") if q != p}
    users = sorted(q for q, partner in others.items() if partner == p.name)
    if users:
        raise ModelFileError(f"{p.name} is the partner model of {', '.join(users)} in {folder}: remove "
                             f"{'that model' if len(users) == 1 else 'those models'} instead (its partner goes with it)")
    partner = partner_of(p)
    p.unlink()
    removed = [p]
    if partner is not None and partner not in others.values() and (folder / partner).is_file():
        (folder / partner).unlink()
        removed.append(folder / partner)
    return removed
