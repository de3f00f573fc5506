"""Untrusted and broken model files: pickles are refused without running code, every broken file gets a
message naming the problem (exit code 3), a model for another modality is refused, and `synomaly models`
lists broken user models with their error instead of crashing."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from synomaly.cli import build_parser
from synomaly.errors import ModelError
from synomaly.modelio import CARD_KEY, ModelFileError, build_network, list_models, load_model, read_card, save_model
from synomaly.train import new_card

MODEL_EXIT = ModelError.exit_code
SUBCOMMANDS = set(next(a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)))


class RunsCode:
    """A pickle payload: unpickling it runs `touch MARKER` through os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def tiny_state():
    """Card and random weights of the tiny network (32 x 32 grid, channels 32, 32)."""
    torch.manual_seed(1)
    card = new_card("tiny-models", grid=32, channels=(32, 32))
    state = {k: v.contiguous() for k, v in build_network(card).state_dict().items()}
    return card, state


@pytest.fixture(scope="module")
def scan(tmp_path_factory, phantom):
    """A small valid volume, so that detection reaches the model loading."""
    path = tmp_path_factory.mktemp("scan") / "scan.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(phantom((8, 40, 40))), str(path))
    return path


def _refused(r, out: Path, *words: str) -> str:
    """Assert a clean model refusal on the command line; returns the message."""
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == MODEL_EXIT, f"exit {r.returncode}; stderr: {r.stderr}"
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("synomaly: error:")]
    assert len(errors) == 1, r.stderr
    assert any(w in errors[0].lower() for w in words), errors[0]
    assert not out.exists()
    return errors[0]


# ------------------------------------------------------------------ pickles


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_pickled_checkpoint_is_refused_on_the_command_line(suffix, tmp_path, scan, tiny_state, synomaly_run):
    card, state = tiny_state
    path = tmp_path / f"checkpoint{suffix}"
    torch.save({"model": state, "card": card.to_json()}, path)
    out = tmp_path / "out"
    r = synomaly_run(["detect", scan, "-o", out, "--model", path, "--progress", "none"])
    _refused(r, out, "pickle")


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_pickle_that_would_run_code_is_refused_and_never_executed(protocol, suffix, tmp_path, monkeypatch):
    marker = tmp_path / "code-was-run"
    payload = pickle.dumps({"state_dict": RunsCode(marker)}, protocol=protocol)
    # the payload is live: unpickling it does run the command (with a different marker)
    probe = tmp_path / "probe-marker"
    pickle.loads(pickle.dumps(RunsCode(probe), protocol=protocol))
    assert probe.exists()
    folder = tmp_path / "models"
    folder.mkdir()
    path = folder / f"evil{suffix}"
    path.write_bytes(payload)
    for load in (read_card, load_model):
        with pytest.raises(ModelFileError) as info:
            load(path)
        assert str(path) in str(info.value)
    monkeypatch.setenv("SYNOMALY_MODELS_DIR", str(folder))
    listed = {m["name"]: m for m in list_models()}
    if suffix == ".safetensors":
        assert "error" in listed["evil"]
    assert not marker.exists(), "loading a model file executed code"


@pytest.mark.parametrize("protocol, suffix", [(2, ".pt"), (0, ".safetensors")])
def test_pickle_that_would_run_code_is_refused_on_the_command_line(protocol, suffix, tmp_path, scan, synomaly_run):
    marker = tmp_path / "code-was-run"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps(RunsCode(marker), protocol=protocol))
    out = tmp_path / "out"
    r = synomaly_run(["detect", scan, "-o", out, "--model", path, "--progress", "none"])
    _refused(r, out, "pickle", "not a valid safetensors")
    assert not marker.exists(), "the command line executed code from a model file"


def test_refusal_advice_names_only_commands_that_exist(tmp_path, tiny_state):
    card, state = tiny_state
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": state}, path)
    with pytest.raises(ModelFileError) as info:
        load_model(path)
    for command in re.findall(r"`synomaly ([a-z-]+)", str(info.value)):
        assert command in SUBCOMMANDS, f"the message advises `synomaly {command}`, which does not exist"


# ------------------------------------------------------------------ broken safetensors files


def test_safetensors_without_card_is_refused(tmp_path, scan, tiny_state, synomaly_run):
    from safetensors.torch import save_file

    _, state = tiny_state
    path = tmp_path / "nocard.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelFileError, match="no Synomaly model card"):
        load_model(path)
    out = tmp_path / "out"
    _refused(synomaly_run(["detect", scan, "-o", out, "--model", path, "--progress", "none"]), out, "model card")


@pytest.mark.parametrize("channels", [(32, 64), (64, 64), (32, 32, 32)], ids=["wider level", "wider input", "extra level"])
def test_card_that_does_not_match_the_weights_is_refused(channels, tmp_path, tiny_state):
    from safetensors.torch import save_file

    _, state = tiny_state
    other = new_card("swapped", grid=32, channels=channels)
    path = tmp_path / "swapped.safetensors"
    save_file(state, str(path), metadata={CARD_KEY: other.to_json()})
    read_card(path)  # the card on its own is fine ...
    with pytest.raises(ModelFileError, match="do not match|has shape"):
        load_model(path)  # ... but it does not describe these weights


def test_swapped_card_is_refused_on_the_command_line(tmp_path, scan, tiny_state, synomaly_run):
    from safetensors.torch import save_file

    _, state = tiny_state
    path = tmp_path / "swapped.safetensors"
    save_file(state, str(path), metadata={CARD_KEY: new_card("swapped", grid=32, channels=(64, 64)).to_json()})
    out = tmp_path / "out"
    _refused(synomaly_run(["detect", scan, "-o", out, "--model", path, "--progress", "none"]), out,
             "do not match", "shape")


@pytest.mark.parametrize("keep", [0.5, 0.99, 200, 7, 0], ids=["half", "last byte missing", "header cut", "7 bytes", "empty"])
def test_truncated_model_file_is_refused(keep, tmp_path, tiny_model_file):
    data = tiny_model_file.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:n])
    with pytest.raises(ModelFileError, match="truncated|not a valid|empty"):
        load_model(path)


def test_truncated_model_file_is_refused_on_the_command_line(tmp_path, scan, tiny_model_file, synomaly_run):
    data = tiny_model_file.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    _refused(synomaly_run(["detect", scan, "-o", out, "--model", path, "--progress", "none"]), out, "truncated")


def _raw_safetensors(path: Path, header: object) -> Path:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    return path


@pytest.mark.parametrize("header", [
    [1, 2, 3],
    "a string",
    {"w": {"dtype": "F32", "shape": [2]}, "__metadata__": {}},
    {"w": {"dtype": "F32", "shape": [2], "data_offsets": "0 8"}, "__metadata__": {}},
], ids=["JSON list", "JSON string", "tensor without offsets", "offsets not a list"])
def test_corrupt_safetensors_header_is_a_model_error(header, tmp_path):
    path = _raw_safetensors(tmp_path / "corrupt.safetensors", header)
    with pytest.raises(ModelFileError):
        read_card(path)
    with pytest.raises(ModelFileError):
        load_model(path)


def test_valid_model_whose_header_length_begins_with_byte_0x80_loads(tmp_path, tiny_state):
    """The pickle sniffing must not refuse real safetensors files: the 8-byte header length is
    little-endian, so 1 in 32 valid files (length = 128 mod 256) begins with the byte 0x80."""
    card, state = tiny_state
    path = tmp_path / "unlucky.safetensors"
    for extra in range(0, 8 * 40, 8):  # the header is padded to 8 bytes: 32 steps reach every length mod 256
        card.description = "x" * extra
        save_model(path, card, state)
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("could not produce a header length of 128 mod 256")
    model = load_model(path, device="cpu")
    assert model.card.description == card.description


# ------------------------------------------------------------------ modality


@pytest.fixture(scope="module")
def mr_dicom(tmp_path_factory, phantom, dicom_series):
    """An MR DICOM series (Modality 0008|0060 = MR, description 'AX T1') and one of its files."""
    folder = tmp_path_factory.mktemp("mr-dicom") / "series"
    files = dicom_series(folder, phantom((6, 40, 40), tissue=800, noise=40), "1.2.826.0.1.3680043.2.1125.7.20",
                         modality="MR")
    return folder, files[3]


@pytest.fixture(scope="module")
def ct_model(tmp_path_factory, tiny_state):
    card, state = tiny_state
    card = card.copy()
    card.name, card.modality = "tiny-ct", "CT"
    return save_model(tmp_path_factory.mktemp("ct-model") / "tiny-ct.safetensors", card, state)


@pytest.mark.parametrize("which", ["series folder", "single file"])
def test_model_for_another_modality_is_refused(which, mr_dicom, ct_model, tmp_path, synomaly_run):
    path = mr_dicom[0] if which == "series folder" else mr_dicom[1]
    out = tmp_path / "out"
    r = synomaly_run(["detect", path, "-o", out, "--model", ct_model, "--progress", "none"])
    message = _refused(r, out, "modality", "trained on")
    assert "MR" in message and "CT" in message, message


def test_modality_mismatch_can_be_overridden_with_a_recorded_warning(mr_dicom, ct_model, tmp_path, synomaly_run):
    out = tmp_path / "out"
    r = synomaly_run(["detect", mr_dicom[0], "-o", out, "--model", ct_model, "--progress", "none",
                      "--allow-modality-mismatch"])
    assert r.returncode == 0, r.stderr
    warnings = json.loads((out / "report.json").read_text())["warnings"]
    assert any("MR" in w and "CT" in w for w in warnings), warnings


def test_model_of_the_right_modality_runs_on_dicom(mr_dicom, tmp_path, tiny_model_file, synomaly_run):
    out = tmp_path / "out"
    r = synomaly_run(["detect", mr_dicom[0], "-o", out, "--model", tiny_model_file, "--progress", "none"])
    assert r.returncode == 0, r.stderr
    seg = sitk.ReadImage(str(out / "anomaly.seg.nrrd"))
    assert seg.GetSize() == (40, 40, 6)
    np.testing.assert_allclose(seg.GetSpacing(), (1.0, 1.0, 3.0), rtol=1e-6)


# ------------------------------------------------------------------ the registry


def _user_folder(tmp_path: Path, tiny_model_file: Path, broken: dict[str, bytes]) -> Path:
    folder = tmp_path / "user-models"
    folder.mkdir()
    (folder / "good.safetensors").write_bytes(tiny_model_file.read_bytes())
    for name, data in broken.items():
        (folder / f"{name}.safetensors").write_bytes(data)
    return folder


def _check_listing(folder: Path, broken: set[str], synomaly_run) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SYNOMALY_MODELS_DIR": str(folder)}
    r = synomaly_run(["models", "--json"], env=env)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    listed = {m["name"]: m for m in json.loads(r.stdout) if m["source"] == "user"}
    assert set(listed) == broken | {"good"}
    assert "card" in listed["good"] and "error" not in listed["good"]
    for name in broken:
        assert listed[name].get("error"), f"{name} is listed without its error"
    r = synomaly_run(["models"], env=env)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.count("unusable:") >= len(broken)


def test_models_lists_broken_user_models_with_their_error(tmp_path, tiny_model_file, synomaly_run):
    data = tiny_model_file.read_bytes()
    broken = {
        "garbage": np.random.default_rng(0).bytes(4096),
        "empty": b"",
        "truncated": data[: len(data) // 3],
        "pickle": pickle.dumps({"weights": [1, 2, 3]}, protocol=4),
    }
    _check_listing(_user_folder(tmp_path, tiny_model_file, broken), set(broken), synomaly_run)


def test_models_lists_user_models_with_corrupt_headers(tmp_path, tiny_model_file, synomaly_run):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    broken = {
        "json-list": _raw_safetensors(scratch / "a", [1, 2, 3]).read_bytes(),
        "no-offsets": _raw_safetensors(scratch / "b", {"w": {"dtype": "F32", "shape": [2]}}).read_bytes(),
    }
    _check_listing(_user_folder(tmp_path, tiny_model_file, broken), set(broken), synomaly_run)
