"""Training lowers the loss, resumes exactly, fine-tunes keeping the card, and calibrates thresholds."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from synomaly.calibrate import calibrate
from synomaly.errors import InputError
from synomaly.modelio import load_model, read_card
from synomaly.prepare import prepare_images_for_training
from synomaly.sampledata import br35h_images
from synomaly.train import TrainingSettings, load_checkpoint, new_card, train


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """Twelve healthy Br35H slices for training and six others for validation (numbers < 1050)."""
    return [str(p) for p in br35h_images("no", 0, 12)], [str(p) for p in br35h_images("no", 900, 906)]


def _settings(**kw):
    base = dict(iterations=40, batch_size=4, lr=1e-3, warmup=5, seed=3, device="cpu", precision="fp32",
                checkpoint_every=10, validate_every=10, validation_slices=8)
    base.update(kw)
    return TrainingSettings(**base)


def _card():
    return new_card("tiny", grid=32, channels=(32, 32))


def test_training_lowers_the_loss(healthy, tmp_path):
    tr, va = healthy
    summary = train(_card(), tr, va, tmp_path / "m.safetensors", _settings(iterations=60))
    state = load_checkpoint(summary["checkpoint"])
    losses = [v for _, v in state["history"]]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    card = read_card(tmp_path / "m.safetensors")
    assert card.training["iterations"] == 60
    assert card.training["training_scans"] == len(tr) and card.training["validation_scans"] == len(va)
    assert card.training["validation_loss"] is not None
    assert summary["noise_fraction"] < 0.1


def test_resume_reproduces_the_uninterrupted_run(healthy, tmp_path):
    tr, va = healthy
    full = train(_card(), tr, va, tmp_path / "full.safetensors", _settings(iterations=20))
    half = train(_card(), tr, va, tmp_path / "half.safetensors", _settings(iterations=10),
                 checkpoint=tmp_path / "half.ckpt")
    resumed = train(_card(), tr, va, tmp_path / "resumed.safetensors", _settings(iterations=20),
                    resume=half["checkpoint"], checkpoint=tmp_path / "half.ckpt")
    h_full = load_checkpoint(full["checkpoint"])["history"]
    h_res = load_checkpoint(resumed["checkpoint"])["history"]
    assert [i for i, _ in h_res] == list(range(1, 21))
    assert np.allclose([v for _, v in h_full], [v for _, v in h_res], rtol=0, atol=1e-6)
    a = load_model(tmp_path / "full.safetensors", device="cpu").network.state_dict()
    b = load_model(tmp_path / "resumed.safetensors", device="cpu").network.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_fine_tuning_keeps_the_card_and_changes_the_weights(healthy, tmp_path):
    tr, va = healthy
    train(_card(), tr, va, tmp_path / "base.safetensors", _settings(iterations=10))
    base = load_model(tmp_path / "base.safetensors", device="cpu")
    state = {k: v.clone() for k, v in base.network.state_dict().items()}
    card = base.card.copy()
    card.training = {"name_of_base": base.card.name}
    train(card, tr[:6], va, tmp_path / "tuned.safetensors", _settings(iterations=10, seed=9), base_state=state)
    tuned = load_model(tmp_path / "tuned.safetensors", device="cpu")
    assert tuned.card.network == base.card.network and tuned.card.grid_size == base.card.grid_size
    assert tuned.card.noise == base.card.noise and tuned.card.normalisation == base.card.normalisation
    assert tuned.card.training["fine_tuned_from"] == "tiny"
    changed = [k for k, v in tuned.network.state_dict().items() if not torch.equal(v, state[k])]
    assert len(changed) > len(state) // 2


def test_calibrated_thresholds_hold_on_other_healthy_data(healthy, tmp_path):
    tr, _ = healthy
    train(_card(), tr, [], tmp_path / "c.safetensors", _settings(iterations=30))
    model = load_model(tmp_path / "c.safetensors", device="cpu")
    cal_x, cal_m, _ = prepare_images_for_training([str(p) for p in br35h_images("no", 100, 160)], model.card)
    test_x, test_m, _ = prepare_images_for_training([str(p) for p in br35h_images("no", 200, 260)], model.card)
    cal = calibrate(model, cal_x, cal_m, fprs=(1e-2,), max_stages=2)
    thr = cal["thresholds"]["0.01"]
    from synomaly.detect import run_stages

    res = run_stages(model, test_x, test_m, t=model.card.detection.t, kernel=model.card.detection.blur_kernel,
                     threshold=thr, max_stages=2, seed=5)
    fpr = float((res.score[test_m] > thr).float().mean())
    # other healthy images: the rate is about the target (a factor of three either way)
    assert 0.01 / 3 < fpr < 0.01 * 3, fpr


def test_contrast_remap_keeps_the_background_and_the_normalised_range():
    from synomaly.train import remap_contrast

    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    m = ((yy**2 + xx**2) < 0.6).float().expand(6, 1, 32, 32)
    x = torch.where(m.bool(), (xx * 0.9).expand(6, 1, 32, 32), torch.full_like(m, -1.0))
    out = remap_contrast(x, m, torch.Generator().manual_seed(1))
    again = remap_contrast(x, m, torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and out.device == x.device
    assert torch.equal(out[~m.bool()], x[~m.bool()]), "the background stays at -1"
    fg = out[m.bool()]
    assert fg.min() >= -1.0 - 1e-6 and fg.max() <= 0.8 + 1e-6
    # some curves are not monotonic: the order of intensities changes (as between T1 and T2)
    corr = [float(torch.corrcoef(torch.stack([x[i][m[i].bool()], out[i][m[i].bool()]]))[0, 1]) for i in range(6)]
    assert min(corr) < 0.9


def test_varied_scans_move_image_and_foreground_together_and_keep_the_background():
    """vary_scan turns, warps, shades and adds noise: the foreground moves with the image (no brain voxel lands
    in the background, the background stays -1), values stay on the model scale, the same seed gives the same
    images, and the images really change (a draw that did nothing would pass the other checks)."""
    from synomaly.train import vary_scan

    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    m = (((yy / 0.8) ** 2 + (xx / 0.5) ** 2) < 1).expand(8, 1, 64, 64)  # an upright ellipse: turning shows
    x = torch.where(m, (0.3 * yy).expand(8, 1, 64, 64), torch.full((8, 1, 64, 64), -1.0))
    out, mo = vary_scan(x, m, torch.Generator().manual_seed(3))
    again, _ = vary_scan(x, m, torch.Generator().manual_seed(3))
    assert torch.equal(out, again) and mo.dtype == m.dtype and mo.shape == m.shape
    assert torch.all(out[~mo] == -1.0), "outside the moved foreground the image is background"
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert 0.8 < mo.sum() / m.sum() < 1.25, "a rotation, 8 % scalings and a small warp keep the area roughly"
    moved = (mo != m).flatten(1).sum(1)
    assert (moved > 20).all(), moved  # every image's outline moved (rotation up to 12 degrees, scaling)
    noise = (out - x)[mo & m].std()
    assert noise > 0.01, "shading and noise change the foreground's values"
    # with pose, shading and noise turned off it is the identity inside the foreground
    same, ms = vary_scan(x, m, torch.Generator().manual_seed(3), rotate_deg=0, scale=0, warp_px=0, bias=0, noise=0)
    assert torch.equal(ms, m) and torch.allclose(same, x, atol=1e-5)


def test_training_noise_levels_stay_below_t_max():
    from synomaly.schedule import cosine_alphas_cumprod
    from synomaly.train import training_targets

    card = _card()
    x0 = torch.zeros(64, 1, 32, 32)
    m = torch.ones_like(x0)
    gen = torch.Generator().manual_seed(0)
    _, t, _ = training_targets(x0, m, card, cosine_alphas_cumprod(1000), gen, _settings(t_max=300))
    assert int(t.max()) < 300 and int(t.min()) >= 0
    _, t_all, _ = training_targets(x0, m, card, cosine_alphas_cumprod(1000), gen, _settings())
    assert int(t_all.max()) >= 300, "without t_max the whole schedule is sampled"


def test_a_slim_checkpoint_is_smaller_and_training_resumes_from_it(healthy, tmp_path):
    from synomaly.train import slim_checkpoint

    tr, va = healthy
    summary = train(_card(), tr, va, tmp_path / "a.safetensors", _settings(iterations=10))
    full = tmp_path / "a.ckpt"
    slim = slim_checkpoint(summary["checkpoint"], tmp_path / "slim.ckpt")
    assert slim.stat().st_size < 0.7 * full.stat().st_size
    state = load_checkpoint(slim)
    assert state["iteration"] == 10 and not state["optimizer"]
    resumed = train(_card(), tr, va, tmp_path / "b.safetensors", _settings(iterations=14), resume=slim,
                    checkpoint=tmp_path / "b.ckpt")
    assert resumed["iterations"] == 14
    assert read_card(tmp_path / "b.safetensors").training["iterations"] == 14


def test_the_learning_rate_warms_up_holds_and_cools_down_and_warms_up_again_after_a_slim_resume(healthy, tmp_path):
    from synomaly.train import Trainer, slim_checkpoint

    tr, va = healthy
    x = torch.zeros(2, 1, 32, 32)
    trainer = Trainer(_card(), x, x > 0, x, x > 0, _settings(iterations=40, lr=1e-3, warmup=5, lr_decay=10))
    rates = [trainer.lr_at(i) for i in range(40)]
    assert rates[0] == pytest.approx(2e-4) and rates[4] == pytest.approx(1e-3)  # warm-up over 5 steps
    assert rates[5:30] == [pytest.approx(1e-3)] * 25  # constant until the last 10
    assert rates[30] == pytest.approx(1e-3) and rates[35] == pytest.approx(5e-4) and rates[39] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))
    with pytest.raises(InputError, match="number of steps"):
        Trainer(_card(), x, x > 0, x, x > 0, _settings(lr_decay=-1))

    summary = train(_card(), tr, va, tmp_path / "a.safetensors", _settings(iterations=10))
    full = load_checkpoint(summary["checkpoint"])
    again = Trainer(_card(), x, x > 0, x, x > 0, _settings(iterations=20))
    again.load_state(full)  # AdamW's moments kept: no second warm-up
    assert again.lr_at(10) == pytest.approx(1e-3)
    again.load_state(load_checkpoint(slim_checkpoint(summary["checkpoint"], tmp_path / "slim.ckpt")))
    assert again.lr_at(10) == pytest.approx(2e-4) and again.lr_at(14) == pytest.approx(1e-3)


def test_snapshot_writes_the_ema_weights_of_a_checkpoint_as_a_model_file(healthy, tmp_path, capsys):
    """`synomaly snapshot CHECKPOINT -o MODEL` (a model of a run still going) loads, with the checkpoint's EMA."""
    from synomaly.cli import main

    tr, va = healthy
    summary = train(_card(), tr, va, tmp_path / "run.safetensors", _settings(iterations=6))
    out = tmp_path / "snap.safetensors"
    assert main(["snapshot", summary["checkpoint"], "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    state = load_checkpoint(summary["checkpoint"])
    model = load_model(out, device="cpu")
    assert model.card.name == "tiny" and model.card.training["snapshot_of_checkpoint_at_iteration"] == 6
    weights = model.network.state_dict()
    assert set(weights) == set(state["ema"])
    assert all(torch.equal(weights[k].float(), state["ema"][k].float()) for k in weights)
    raw = tmp_path / "raw.safetensors"
    assert main(["snapshot", summary["checkpoint"], "--weights", "model", "-o", str(raw)]) == 0
    raw_weights = load_model(raw, device="cpu").network.state_dict()
    assert all(torch.equal(raw_weights[k].float(), state["model"][k].float()) for k in raw_weights)
    assert not all(torch.equal(raw_weights[k], weights[k]) for k in weights), "raw and EMA weights differ after 6 steps"
    assert read_card(raw).calibration_3d == {} and read_card(raw).detection_3d is None, "no thresholds of the base"


FACTORIES = {torch.rand, torch.randn, torch.randint, torch.zeros, torch.ones, torch.full, torch.arange,
             torch.empty, torch.linspace, torch.randperm, torch.normal}


class _FactoryCalls(torch.overrides.TorchFunctionMode):
    """Records every tensor factory call (name, device asked for, generator's device) made inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, object, object]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES:
            gen = kwargs.get("generator")
            self.calls.append((func.__name__, kwargs.get("device"), gen.device if gen is not None else None))
        return func(*args, **kwargs)


def test_vary_volumes_only_leaves_the_2d_images_as_they_are(tmp_path):
    """With `vary_volumes_only`, pose, shading and noise go to slices of volumes (the averaged templates) and never
    to 2D images (each already one person's scan); without it, to both. `prepare_training_slices` says which
    slice came from which kind of scan."""
    from synomaly.prepare import prepare_training_slices
    from synomaly.train import _batch_augment

    x = torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(8, 1, 32, 32).clone()
    m = torch.zeros_like(x, dtype=torch.bool)
    m[..., 4:28, 4:28] = True
    x = torch.where(m, x, torch.full_like(x, -1.0))
    vol = torch.tensor([True, False] * 4)
    plain = dict(flip=False, intensity_augment=0.0)
    only, _ = _batch_augment(x, m, _settings(vary_scans=1.0, vary_volumes_only=True, **plain),
                             torch.Generator().manual_seed(1), vol)
    both, _ = _batch_augment(x, m, _settings(vary_scans=1.0, **plain), torch.Generator().manual_seed(1), vol)
    assert torch.equal(only[~vol], x[~vol]), "a 2D image was varied"
    assert all(not torch.equal(only[i], x[i]) for i in range(8) if vol[i]), "a volume's slice was not varied"
    assert all(not torch.equal(both[i], x[i]) for i in range(8)), "without the option every image is varied"

    card = _card()
    flat = sitk.GetImageFromArray(np.random.default_rng(0).uniform(50, 200, (40, 40)).astype(np.float32))
    deep = sitk.GetImageFromArray(np.random.default_rng(1).uniform(50, 200, (6, 40, 40)).astype(np.float32))
    paths = [str(tmp_path / "flat.nrrd"), str(tmp_path / "deep.nrrd")]
    sitk.WriteImage(flat, paths[0])
    sitk.WriteImage(deep, paths[1])
    xs, ms, n, from_volume = prepare_training_slices(paths, card)
    assert n == 2 and from_volume.shape[0] == xs.shape[0] and not bool(from_volume[0]) and bool(from_volume[1:].all())


def test_every_random_draw_of_a_training_step_names_the_data_device():
    """A CPU machine cannot see a CUDA/MPS device mix-up directly, so check what would break there: every
    tensor made while augmenting a batch and drawing its noise is made on the batch's device, and every
    generator used lives there too (a CPU generator drawing for CUDA data fails on a GPU)."""
    from synomaly.schedule import cosine_alphas_cumprod
    from synomaly.train import _batch_augment, training_targets

    card = _card()
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    m = torch.ones_like(x, dtype=torch.bool)
    s = _settings(contrast_remap=1.0, vary_scans=1.0, intensity_augment=0.2, t_max=300)
    gen = torch.Generator(device=x.device).manual_seed(0)
    abar = cosine_alphas_cumprod(1000).to(x.device)  # made once per run, then moved: not part of the step
    with _FactoryCalls() as rec:
        xa, ma = _batch_augment(x, m, s, gen)
        training_targets(xa, ma, card, abar, gen, s)
    names = {name for name, _, _ in rec.calls}
    assert {"rand", "randn", "randint"} <= names, names  # flips, contrast curves, gamma, noise and t were drawn
    wrong = [c for c in rec.calls if c[1] is None or torch.device(c[1]) != x.device
             or (c[2] is not None and torch.device(c[2]) != x.device)]
    assert not wrong, f"tensor factories without the data's device: {wrong}"


def test_lesion_strength_blobs_keep_their_image_amplitude_at_every_noise_level():
    """Synomaly's blobs fade with the noise level (u + offset in noise units); lesion-strength blobs are as strong
    in the image at t 5 as at t 400, so low-noise detection sees lesion-like blobs in training."""
    from synomaly.schedule import cosine_alphas_cumprod
    from synomaly.train import training_targets

    card = new_card("tiny", grid=32, channels=(32, 32))
    card.noise.polarity = "both"
    abar = cosine_alphas_cumprod(1000)
    x0 = torch.zeros(256, 1, 32, 32)
    m = torch.ones_like(x0)

    def blob_strength(settings):
        x_t, t, eps = training_targets(x0, m, card, abar, torch.Generator().manual_seed(4), settings)
        a = abar[t].view(-1, 1, 1, 1)
        image = (x_t / a.sqrt()).abs()  # x0 is 0: the blob plus noise sqrt((1 - a) / a) e, in image units
        low = t < 25
        return image[low].amax(dim=(1, 2, 3)), x_t, t, eps

    plain, *_ = blob_strength(_settings(t_max=500))
    strong, x_t, t, eps = blob_strength(_settings(t_max=500, lesion_blobs=1.0, lesion_amplitude=(0.4, 0.6)))
    assert float(plain.median()) < 0.3, "Synomaly's own blobs are faint at low noise"
    assert float(strong.min()) > 0.4 and float(strong.median()) < 0.9, "lesion-strength blobs keep 0.4-0.6 in the image"
    a = abar[t].view(-1, 1, 1, 1)
    assert torch.allclose(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-5), "the target is the noise in x_t"


def test_min_snr_weighting_is_an_image_loss_at_low_noise_and_the_noise_loss_at_high():
    from synomaly.schedule import cosine_alphas_cumprod
    from synomaly.train import noise_loss

    abar = cosine_alphas_cumprod(1000)
    target = torch.randn(2, 1, 8, 8)
    pred = target + 0.5
    t = torch.tensor([10, 900])
    per_image = [float(noise_loss(pred[i : i + 1], target[i : i + 1], t[i : i + 1], abar, 5.0)) for i in range(2)]
    snr = abar[t] / (1 - abar[t])
    assert per_image[0] == pytest.approx(0.25 * 5.0 / float(snr[0]), rel=1e-4)  # 5 x the image-space error
    assert per_image[1] == pytest.approx(0.25, rel=1e-4)  # SNR < 5: unweighted
    assert float(noise_loss(pred, target, t, abar, 0.0)) == pytest.approx(0.25, rel=1e-5)


def test_fine_tuning_at_a_finer_grid_scales_the_noise_and_drops_the_old_grids_thresholds(tiny_model_file, tmp_path):
    """`synomaly train --base MODEL --grid G`: the same network fine-tuned on another grid; what was measured on
    the old grid (thresholds, the tuned volume setting) must not be carried over as if it held there."""
    from synomaly.card import DetectionDefaults, ModelCardError

    card = read_card(tiny_model_file)
    card.calibration = {"1e-3": 0.3}
    card.detection_3d = DetectionDefaults(t=50, blur_kernel=3, max_stages=1)
    card.calibration_3d = {"1e-5": 0.2}
    card.tuning = {"chosen": {"t": 50}}
    fine = card.at_grid(64)
    assert (fine.grid_size, fine.noise.sigma, fine.noise.coarse_scale) == (64, 2 * card.noise.sigma, 2 * card.noise.coarse_scale)
    assert fine.detection.blur_kernel in (2 * card.detection.blur_kernel - 1, 2 * card.detection.blur_kernel + 1)
    assert fine.detection.blur_kernel % 2 == 1
    assert (fine.calibration, fine.detection_3d, fine.calibration_3d, fine.tuning) == ({}, None, {}, {})
    assert fine.network == card.network and card.grid_size == 32, "the base card itself is unchanged"
    with pytest.raises(ModelCardError, match="grid_size 36"):
        card.at_grid(36)


def test_a_fine_tune_or_a_resumed_run_keeps_the_recipe_it_does_not_name(healthy, tmp_path, capsys):
    """`synomaly train --base M` and `--resume CKPT` continue the objective the weights were trained for (noise
    levels, lesion-strength blobs, min-SNR weighting, augmentation) unless an option names another: the Training
    panel's fine-tune passes none of them, and the plain objective would undo what low-noise detection needs."""
    from synomaly.cli import main

    tr, va = healthy
    recipe = dict(contrast_remap=0.1, vary_scans=0.2, vary_volumes_only=True, t_max=300, lesion_blobs=0.5,
                  lesion_amplitude=(0.3, 0.6), min_snr_gamma=5.0)
    base = tmp_path / "base.safetensors"
    train(_card(), tr, va, base, _settings(iterations=2, **recipe))
    common = ["--data", *tr, "--val-data", *va, "--batch-size", "2", "--device", "cpu", "--no-calibrate",
              "--progress", "none", "--iterations", "2"]
    fine = tmp_path / "fine.safetensors"
    assert main(["train", *common, "--base", str(base), "-o", str(fine), "--lesion-blobs", "0"]) == 0
    said = capsys.readouterr().err
    assert "training with tiny's recipe: --contrast-remap 0.1 --vary-scans 0.2 --vary-volumes-only --t-max 300 " \
           "--lesion-amplitude 0.3 0.6 --min-snr-gamma 5" in said, said
    kept = read_card(fine).training["settings"]
    assert {k: kept[k] for k in recipe} == {**recipe, "lesion_amplitude": [0.3, 0.6], "lesion_blobs": 0.0}
    # resumed without recipe options: the checkpoint's recipe, the explicit 0 included
    again = tmp_path / "again.safetensors"
    assert main(["train", *common[:-1], "3", "--resume", str(fine.with_suffix(".ckpt")), "-o", str(again)]) == 0
    assert "the checkpoint's recipe" in capsys.readouterr().err
    resumed = read_card(again).training
    assert resumed["iterations"] == 3 and resumed["settings"]["lesion_blobs"] == 0.0
    assert resumed["settings"]["t_max"] == 300 and resumed["settings"]["vary_scans"] == 0.2
    # a new model: the defaults, and nothing said about a recipe
    new = tmp_path / "new.safetensors"
    assert main(["train", *common, "-o", str(new), "--grid", "32", "--channels", "32", "32"]) == 0
    assert "recipe" not in capsys.readouterr().err
    fresh = read_card(new).training["settings"]
    defaults = TrainingSettings()
    assert {k: fresh[k] for k in recipe} == {k: (list(v) if isinstance(v, tuple) else v)
                                             for k, v in ((k, getattr(defaults, k)) for k in recipe)}
