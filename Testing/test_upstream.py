"""The Synomaly authors' checkpoints: our network accepts their parameter names and shapes, a checkpoint in
their format converts into a model file that gives identical outputs, code in a checkpoint is never
run, and the detector honours what the imported card says (whole slice, per-slice min-max)."""

from __future__ import annotations

import ast
import math
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from synomaly.modelio import ModelFileError, build_network, load_model, read_card
from synomaly.upstream import card_from_args, import_checkpoint, load_checkpoint

LISTING = Path(__file__).parent / "data" / "brats_unet_state_dict.tsv"
SHARED_LISTING = Path(__file__).resolve().parents[2] / "shared" / "upstream" / "brats_unet_state_dict.tsv"

# The authors' BraTS configuration (their args_brats_best.json), as it is stored in their checkpoints.
BRATS_ARGS = {
    "dataset": "brats23", "epochs": 3000, "batch_size": 8, "num_training_data": 10000, "noise_steps": 1000,
    "beta_schedule": "cosine", "noise_fn": "synomaly",
    "noise_params": {"anomaly_sigma": 3, "anomaly_threshold": 175, "anomaly_offset": 0.5, "anomaly_direction": 1},
    "lr": 1e-5, "lr_weight_decay": 0.0, "loss-type": "vlb", "loss_weight": "none", "img_size": 128,
    "in_channels": 1, "model_channels": 128, "num_res_blocks": 2, "attention_resolutions": "32,16,8",
    "dropout": 0.0, "channel_mult": "", "num_heads": 2, "num_head_channels": 64,
    "output_path": "/their/cluster/path", "json_file_name": "args_brats_best",
}

# A small configuration in the same format (32 x 32, two levels, attention at downsampling 2, heads by count).
SMALL_ARGS = dict(BRATS_ARGS, dataset="lits", img_size=32, model_channels=32, channel_mult="1,2", num_res_blocks=1,
                  attention_resolutions="2", num_head_channels=-1, num_heads=2,
                  noise_params={"anomaly_sigma": 3, "anomaly_threshold": 175, "anomaly_offset": 1,
                                "anomaly_direction": -1})


def read_listing(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    rows = path.read_text().splitlines()[1:]
    return [(key, tuple(ast.literal_eval(shape))) for key, shape in (row.split("\t") for row in rows if row.strip())]


def write_authors_checkpoint(path: Path, args: dict, seed: int = 0, prefix: str = "") -> torch.nn.Module:
    """A checkpoint laid out as the authors' training code saves it, with random (non-zero) weights."""
    torch.manual_seed(seed)
    net = build_network(card_from_args(args, name="x"))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.05)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    net(torch.randn(1, 1, args["img_size"], args["img_size"]), torch.tensor([10])).mean().backward()
    opt.step()
    torch.save({
        "n_epoch": 1234,
        "model_state_dict": {prefix + k: v for k, v in net.state_dict().items()},
        "optimizer_state_dict": opt.state_dict(),
        "args": args,
        "loss": np.mean([np.float32(0.01), np.float32(0.02)]),  # a numpy scalar, as their np.mean(losses) is
    }, path)
    return net.eval()


def test_brats_network_matches_the_published_parameter_listing():
    card = card_from_args(BRATS_ARGS, name="brats")
    state = build_network(card).state_dict()
    listing = read_listing(LISTING)
    assert [(k, tuple(v.shape)) for k, v in state.items()] == listing  # one for one, in order
    assert len(listing) == 462
    assert round(sum(math.prod(s) for _, s in listing) / 1e6, 1) == 98.6
    assert card.network.channels == (128, 128, 256, 384, 512)
    assert card.network.attention_levels == (False, False, False, True, True)  # downsampling 8 and 16


def test_repo_listing_is_the_workspace_listing():
    if not SHARED_LISTING.exists():
        pytest.skip("the workspace's shared/upstream folder is not beside this checkout")
    assert LISTING.read_text() == SHARED_LISTING.read_text()


def test_card_from_brats_args_states_what_the_model_expects():
    card = card_from_args(BRATS_ARGS, name="brats")
    assert (card.modality, card.contrast, card.orientation, card.grid_size) == ("MR", "FLAIR", "axial", 128)
    assert card.framing == "whole-slice"
    n = card.normalisation
    assert (n.method, n.lower_percentile, n.upper_percentile, n.upper_value) == ("slice-minmax", 0.0, 99.0, 1.0)
    assert (card.noise.kind, card.noise.sigma, card.noise.tau, card.noise.offset, card.noise.polarity) == (
        "synomaly", 3.0, 175.0, 0.5, "brighter")
    assert (card.detection.t, card.detection.blur_kernel, card.detection.threshold) == (200, 11, 0.25)
    assert card.timesteps == 1000 and card.calibration == {}
    assert "/their/cluster" not in card.to_json()  # no paths of the authors' machines in our card


def test_checkpoint_round_trips_to_identical_outputs(tmp_path):
    ckpt = tmp_path / "best_model.pt"
    net = write_authors_checkpoint(ckpt, SMALL_ARGS)
    out = import_checkpoint(ckpt, tmp_path / "lits-small.safetensors")
    card = read_card(out)
    assert card.name == "lits-small" and card.network.architecture == "guided-diffusion.UNetModel"
    assert card.modality == "CT" and card.noise.polarity == "darker" and card.noise.offset == 1.0
    assert (card.normalisation.window_low, card.normalisation.window_high) == (0.0, 150.0)
    assert card.training["epochs"] == 1234
    model = load_model(out, device="cpu", precision="fp32")
    assert not model.network.training
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    t = torch.tensor([0, 200, 999])
    got = model.predict_noise(x, t)
    with torch.no_grad():
        want = net(x, t)
    assert got.shape == (3, 1, 32, 32) and got.dtype == torch.float32
    assert torch.equal(got, want)
    # only the weights are kept: the file holds exactly the network's tensors
    from safetensors.torch import load_file

    assert set(load_file(str(out))) == set(net.state_dict())


def test_dataparallel_prefix_is_accepted(tmp_path):
    ckpt = tmp_path / "dp.pt"
    write_authors_checkpoint(ckpt, SMALL_ARGS, prefix="module.")
    out = import_checkpoint(ckpt, tmp_path / "dp.safetensors")
    assert load_model(out, device="cpu").card.grid_size == 32


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-was-run"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {}, "args": SMALL_ARGS, "loss": RunsCode()}, ckpt)
    with pytest.raises(ModelFileError, match="without executing code"):
        import_checkpoint(ckpt, tmp_path / "evil.safetensors")
    assert not marker.exists(), "importing a checkpoint executed code"
    assert not (tmp_path / "evil.safetensors").exists()


@pytest.mark.parametrize("change, message", [
    ({"model_state_dict": "drop"}, "not a Synomaly checkpoint"),
    ({"args": {"img_size": 32}}, "no 'model_channels'"),
    ({"args": dict(SMALL_ARGS, beta_schedule="linear")}, "only the cosine schedule"),
    ({"args": dict(SMALL_ARGS, model_channels=64)}, "has shape"),
    ({"args": dict(SMALL_ARGS, num_res_blocks=2)}, "do not match"),
])
def test_broken_checkpoints_get_a_message_naming_the_problem(tmp_path, change, message):
    ckpt = tmp_path / "good.pt"
    write_authors_checkpoint(ckpt, SMALL_ARGS)
    data = torch.load(ckpt, weights_only=False)
    for key, value in change.items():
        if value == "drop":
            del data[key]
        else:
            data[key] = value
    torch.save(data, tmp_path / "bad.pt")
    with pytest.raises(ModelFileError, match=message):
        import_checkpoint(tmp_path / "bad.pt", tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_truncated_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "good.pt"
    write_authors_checkpoint(ckpt, SMALL_ARGS)
    data = ckpt.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")


def test_upstream_cosine_schedule_is_ours():
    """The authors' cosine betas (beta_i = min(1 - f((i+1)/T) / f(i/T), 0.999)) give our abar_t."""
    from synomaly.schedule import cosine_alphas_cumprod

    T = 1000
    f = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
    betas = np.array([min(1 - f[i + 1] / f[i], 0.999) for i in range(T)])
    assert np.allclose(np.cumprod(1 - betas), cosine_alphas_cumprod(T).numpy(), atol=1e-5)


def test_slice_minmax_and_whole_slice_framing(tmp_path, phantom):
    """An imported card makes prepare_scan stretch every slice from its min (-1) to its max (+1), over the
    whole slice, and the counterfactual's scale follows each slice's own stretch."""
    from synomaly.prepare import model_units_per_intensity, prepare_scan

    card = card_from_args(dict(SMALL_ARGS, dataset="brats23"), name="b")  # percentile clip 0-99, no window
    vol = phantom((6, 32, 32)) * np.linspace(1.0, 3.0, 6, dtype=np.float32)[:, None, None]  # slices differ in scale
    img = sitk.GetImageFromArray(vol)
    prep = prepare_scan(img, card)
    s = prep.slices[:, 0].numpy()
    assert s.shape[1:] == (32, 32) and prep.geometry.box == (0, 0, 32)  # whole slice, no crop
    assert np.allclose(s.min(axis=(1, 2)), -1.0, atol=1e-6) and np.allclose(s.max(axis=(1, 2)), 1.0, atol=1e-6)
    hi = np.percentile(vol, 99)
    clipped = np.clip(vol, vol.min(), hi)
    k = prep.slice_index[0]
    expect = (clipped[k] - clipped[k].min()) / (clipped[k].max() - clipped[k].min()) * 2 - 1
    assert np.allclose(s[0], expect, atol=1e-5)
    units = model_units_per_intensity(prep.geometry)
    assert units.shape == (6, 1, 1)
    assert np.allclose(units[:, 0, 0], 2.0 / (clipped.max(axis=(1, 2)) - clipped.min(axis=(1, 2))))


def test_lits_window_is_applied_in_input_units(phantom):
    from synomaly.prepare import prepare_scan

    card = card_from_args(SMALL_ARGS, name="lits")  # window 0-150 HU
    vol = phantom((4, 32, 32), background=-1000.0, tissue=100.0, noise=40.0)
    prep = prepare_scan(sitk.GetImageFromArray(vol), card)
    k = prep.slice_index[0]
    clipped = np.clip(vol[k], 0.0, 150.0)
    expect = (clipped - clipped.min()) / (clipped.max() - clipped.min()) * 2 - 1
    assert np.allclose(prep.slices[0, 0].numpy(), expect, atol=1e-5)


def test_import_then_detect_and_fine_tune_on_the_command_line(tmp_path, phantom, synomaly_run):
    ckpt = tmp_path / "best_model.pt"
    write_authors_checkpoint(ckpt, dict(SMALL_ARGS, dataset="brats23"))
    models = tmp_path / "models"
    env = dict(os.environ, OMP_NUM_THREADS="1", SYNOMALY_MODELS_DIR=str(models))
    r = synomaly_run(["import-upstream", ckpt, "--name", "authors-small"], env=env)
    assert r.returncode == 0, r.stderr
    assert (models / "authors-small.safetensors").exists() and "FLAIR" in r.stdout
    again = synomaly_run(["import-upstream", ckpt, "--name", "authors-small"], env=env)
    assert again.returncode != 0 and "--overwrite" in again.stderr

    vol = phantom((8, 40, 48), background=0.0, tissue=300.0)  # not square: padded to 48 x 48, then 32 x 32
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.9, 0.9, 3.0))
    scan = tmp_path / "scan.nrrd"
    sitk.WriteImage(img, str(scan))
    out = tmp_path / "out"
    r = synomaly_run(["detect", scan, "-o", out, "--model", "authors-small", "--progress", "none"], env=env)
    assert r.returncode == 0, r.stderr
    cf = sitk.ReadImage(str(out / "counterfactual.nrrd"))
    assert cf.GetSize() == img.GetSize() and cf.GetSpacing() == img.GetSpacing()
    assert np.isfinite(sitk.GetArrayFromImage(cf)).all()

    r = synomaly_run(["calibrate", "authors-small", "--data", scan, "--progress", "none"], env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert set(read_card(models / "authors-small.safetensors").calibration["thresholds"]) >= {"0.01", "0.001"}

    tuned = tmp_path / "tuned.safetensors"
    r = synomaly_run(["train", "--data", scan, "--base", "authors-small", "-o", tuned, "--iterations", "2",
                      "--batch-size", "2", "--no-calibrate", "--progress", "none"], env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    card = read_card(tuned)
    assert card.network.architecture == "guided-diffusion.UNetModel" and card.framing == "whole-slice"
    assert card.normalisation.method == "slice-minmax"


def test_pickled_model_message_points_to_the_importer(tmp_path):
    ckpt = tmp_path / "best_model.pt"
    write_authors_checkpoint(ckpt, SMALL_ARGS)
    with pytest.raises(ModelFileError, match="synomaly import-upstream best_model.pt"):
        load_model(ckpt)
