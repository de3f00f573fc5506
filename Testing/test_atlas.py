"""The brain region: the shipped T1 atlas registered to a scan, and detection, calibration and tuning scored in it.

The moved heads below are the atlas itself under a known affine transform on another grid, so the true brain
is known exactly; how well the registration does on other people's heads is measured on the held-out
volumes (Docs/experiments.md, *Scoring the brain only*), not here.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from synomaly import atlas
from synomaly.card import DetectionDefaults, ModelCardError
from synomaly.modelio import load_model, read_card


def _moved_transform() -> sitk.AffineTransform:
    """What _moved_atlas resamples with: its grid's points to the atlas's (rotated 12 degrees about the head's
    centre, scaled by 1 / 1.08, shifted), i.e. the true registration of the moved head."""
    head = atlas._load_atlas()[0]
    moved = sitk.AffineTransform(3)
    moved.SetCenter(head.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in head.GetSize()]))
    c, s = np.cos(np.radians(12)), np.sin(np.radians(12))
    moved.SetMatrix((np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) / 1.08).ravel().tolist())  # output -> atlas
    moved.SetTranslation((6.0, -4.0, 5.0))
    return moved


def _moved_atlas(skull: bool = True) -> tuple[sitk.Image, np.ndarray]:
    """The atlas head (or its brain alone) rotated 12 degrees, scaled by 1.08 and shifted, on a 1.5 x 1.5 x 3 mm
    grid; and its true brain on that grid (numpy order)."""
    head, brain_t1, brain = atlas._load_atlas()
    moved = _moved_transform()
    centre = moved.GetCenter()
    ref = sitk.Image([160, 160, 60], sitk.sitkFloat32)
    ref.SetSpacing((1.5, 1.5, 3.0))
    ref.SetOrigin([centre[i] - [120, 120, 90][i] for i in range(3)])
    image = sitk.Resample(brain_t1 if not skull else head, ref, moved, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    truth = sitk.GetArrayFromImage(sitk.Resample(brain, ref, moved, sitk.sitkLinear, 0.0, sitk.sitkFloat32)) > 0.5
    return image, truth


def _brain(image: sitk.Image, **kw) -> atlas.BrainMask:
    from synomaly.prepare import foreground_mask

    return atlas.atlas_brain_mask(image, foreground_mask(sitk.GetArrayFromImage(image)), **kw)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.mark.parametrize("skull", [True, False])
def test_the_atlas_finds_the_brain_of_a_moved_head_with_and_without_skull(skull):
    image, truth = _moved_atlas(skull)
    found = _brain(image, margin_mm=0.0)
    assert found.problem is None and found.template == ("head" if skull else "brain")
    assert found.mask.shape == truth.shape
    assert _dice(found.mask, truth) > 0.93
    assert found.volume_ml == pytest.approx(truth.sum() * 1.5 * 1.5 * 3.0 / 1000, rel=0.08)
    grown = _brain(image)  # the default margin only adds voxels around the brain
    assert grown.margin_mm == atlas.MARGIN_MM and grown.mask.sum() > found.mask.sum()
    assert (truth & ~grown.mask).sum() < 0.01 * truth.sum()


def test_registration_reports_its_iterations_and_a_coarser_stop_takes_no_more():
    """atlas.register's `iterations`: the optimiser's counts for the similarity and the affine transform (what
    scripts/registration-profile.py prints); a larger minimum step stops the optimiser sooner, and the result
    stays close to the truth."""
    image, _ = _moved_atlas(skull=False)
    brain_t1 = atlas._load_atlas()[1]
    work = atlas._work_copy(image)
    fine, coarse = [], []
    t_fine = atlas.register(work, brain_t1, iterations=fine)
    t_coarse = atlas.register(work, brain_t1, min_step=0.05, iterations=coarse)
    assert len(fine) == 2 and all(n > 0 for n in fine)
    assert len(coarse) == 2 and sum(coarse) < sum(fine)
    truth = _moved_transform()
    point = truth.GetCenter()
    for found in (t_fine, t_coarse):
        assert np.linalg.norm(np.subtract(found.TransformPoint(point), truth.TransformPoint(point))) < 3.0  # mm


def test_registration_sees_the_head_and_not_the_empty_canvas_around_it():
    """A head in a corner of a large empty grid (as an oblique resampling leaves it): the registration works on
    the foreground's box plus a margin, in the same physical space, and finds the brain as well as without."""
    from synomaly.prepare import foreground_mask

    image, truth = _moved_atlas()
    canvas = sitk.ConstantPad(image, [70, 0, 12], [15, 80, 0], 0.0)  # x, y, z: lower and upper padding
    truth = np.pad(truth, ((12, 0), (0, 80), (70, 15)))  # numpy order (z, y, x)
    foreground = foreground_mask(sitk.GetArrayFromImage(canvas))
    box = atlas._head_box(canvas, foreground)
    assert all(b < c for b, c in zip(box.GetSize(), canvas.GetSize()))
    corner = [int(a.min()) for a in np.nonzero(foreground)][::-1]
    start = canvas.TransformPhysicalPointToIndex(box.GetOrigin())
    assert all(0 <= c - s <= np.ceil(atlas.CROP_MARGIN_MM / sp) for c, s, sp in zip(corner, start, canvas.GetSpacing()))
    found = _brain(canvas, margin_mm=0.0)
    assert found.mask.shape == truth.shape and _dice(found.mask, truth) > 0.93


def test_an_implausible_registration_is_refused_with_the_reason(monkeypatch):
    image, _ = _moved_atlas()
    monkeypatch.setattr(atlas, "PLAUSIBLE_ML", (3000.0, 4000.0))
    found = _brain(image)
    assert found.mask is None and "outside 3000-4000 mL" in found.problem
    with pytest.raises(ValueError, match="3D"):
        atlas.atlas_brain_mask(sitk.GetImageFromArray(np.ones((32, 32), np.float32)), np.ones((32, 32), bool))


def test_prepare_scores_the_brain_with_the_foregrounds_framing_and_intensities(tiny_model_file):
    from synomaly.prepare import prepare_scan

    card = read_card(tiny_model_file)
    image, truth = _moved_atlas()
    whole = prepare_scan(image, card)
    brain = prepare_scan(image, card, region="brain")
    assert (whole.region, brain.region) == ("foreground", "brain") and "registered to the head" in brain.region_note
    assert brain.geometry.box == whole.geometry.box
    assert (brain.geometry.lower, brain.geometry.upper) == (whole.geometry.lower, whole.geometry.upper)
    assert not (brain.foreground & ~whole.foreground).any() and brain.foreground.sum() < 0.8 * whole.foreground.sum()
    assert set(brain.slice_index) <= set(whole.slice_index) and len(brain.slice_index) < len(whole.slice_index)
    # the same slices, the same model input; only the scored region differs
    same = np.searchsorted(whole.slice_index, brain.slice_index)
    assert np.array_equal(brain.slices.numpy(), whole.slices[same].numpy())
    assert brain.masks.sum() < whole.masks[same].sum()


def test_the_stripped_brain_region_feeds_the_network_a_skull_stripped_scan(tiny_model_file):
    """Region brain-stripped: the registered brain cut out, normalised inside itself, framed around itself; it
    matches what the network is given for the same head stripped beforehand (up to the registration's edge)."""
    from synomaly.prepare import prepare_scan, unorient_array

    card = read_card(tiny_model_file)
    image, _ = _moved_atlas()
    brain = prepare_scan(image, card, region="brain")
    cut = prepare_scan(image, card, region="brain-stripped")
    assert cut.region == "brain-stripped" and "registered to the head" in cut.region_note
    assert np.array_equal(cut.foreground, brain.foreground) and np.array_equal(cut.slice_index, brain.slice_index)
    assert cut.geometry.box[2] < brain.geometry.box[2], "framed around the brain, not the head"
    assert cut.geometry.upper < brain.geometry.upper, "the bright scalp no longer sets the top of the range"
    # outside the brain the model sees background (-1) only; inside, the brain is stretched over more of the range
    grid_in = cut.slices[cut.masks].numpy()
    near = torch.nn.functional.max_pool2d(cut.masks.float(), 3, stride=1, padding=1) > 0  # a pixel's edge blends
    assert (cut.slices[~near] <= -0.999).all()
    brain_in = brain.slices[brain.masks].numpy()
    assert np.percentile(grid_in, 99) > np.percentile(brain_in, 99) + 0.1 and np.median(grid_in) > np.median(brain_in)
    # the same head stripped by hand with that mask, prepared as a skull-stripped scan, gives the same input
    arr = sitk.GetArrayFromImage(image)
    mask = unorient_array(cut.foreground, cut.geometry.transpose, cut.geometry.flips)
    stripped = sitk.GetImageFromArray(np.where(mask, arr, 0).astype(np.float32))
    stripped.CopyInformation(image)
    by_hand = prepare_scan(stripped, card)
    assert by_hand.geometry.box == cut.geometry.box
    common, i_cut, i_hand = np.intersect1d(cut.slice_index, by_hand.slice_index, return_indices=True)
    assert len(common) > 0.8 * len(cut.slice_index)
    assert np.allclose(cut.slices[i_cut].numpy(), by_hand.slices[i_hand].numpy(), atol=0.02)  # 0.007 here


def test_a_scan_without_a_findable_brain_keeps_its_foreground_and_says_why(tiny_model_file):
    from synomaly.prepare import prepare_scan

    from test_tune import _head  # a 160 mL ellipsoid: no registered whole brain fits inside it

    prep = prepare_scan(_head(seed=2), read_card(tiny_model_file), region="brain")
    assert prep.region == "foreground" and prep.region_note.startswith("brain region not used")


def test_detection_in_the_brain_region_scores_nothing_outside_it(tiny_model_file):
    from synomaly.detect import DetectionSettings, detect
    from synomaly.prepare import foreground_mask

    model = load_model(tiny_model_file, device="cpu")
    image, _ = _moved_atlas()
    whole = detect(image, model, DetectionSettings(device="cpu", t=50, threshold=0.05))
    brain = detect(image, model, DetectionSettings(device="cpu", t=50, threshold=0.05, region="brain"))
    assert (whole.report["region"], brain.report["region"]) == ("foreground", "brain")
    w = sitk.GetArrayFromImage(whole.anomaly_map)
    b = sitk.GetArrayFromImage(brain.anomaly_map)
    found = _brain(image).mask
    assert not b[~found].any(), "nothing is scored outside the registered brain"
    fg = foreground_mask(sitk.GetArrayFromImage(image))
    assert (w[fg & ~found] > 0).mean() > 0.5, "the foreground run does score the scalp"
    assert brain.report["slices_analysed"] < whole.report["slices_analysed"]
    flat = detect(sitk.GetImageFromArray(sitk.GetArrayFromImage(image)[30]), model,
                  DetectionSettings(device="cpu", t=50, region="brain"))
    assert flat.report["region"] == "foreground", "2D images have no atlas: their foreground is scored"


def test_the_region_is_part_of_the_card_and_a_calibration_elsewhere_is_warned_about(tiny_model_file, caplog):
    from synomaly.calibrate import calibrate
    from synomaly.detect import DetectionSettings, resolve_settings
    from synomaly.prepare import prepare_scan

    model = load_model(tiny_model_file, device="cpu")
    card = model.card
    card.detection_3d = DetectionDefaults(t=50, blur_kernel=3, max_stages=1, region="brain")
    assert "scored in the brain" in card.detection_text(True) and "brain" not in card.detection_text(False)
    again = type(card).from_json(card.to_json())
    assert again.detection_3d.region == "brain" and again.detection.region == "foreground"
    bad = card.to_dict()
    bad["detection_3d"]["region"] = "skull"
    with pytest.raises(ModelCardError, match="region 'skull'"):
        type(card).from_dict(bad)
    image, _ = _moved_atlas()
    whole = prepare_scan(image, card)
    with pytest.raises(ValueError, match="prepared with that region"):
        calibrate(model, whole.slices, whole.masks, fprs=(1e-2,), volume=True, preps=[whole])
    prep = prepare_scan(image, card, region="brain")
    cal = calibrate(model, prep.slices, prep.masks, fprs=(1e-2,), volume=True, preps=[prep])
    assert cal["region"] == "brain"
    card.calibration_3d = cal
    caplog.clear()
    resolve_settings(DetectionSettings(fpr=1e-2), card, volume=True)
    assert not any("region" in r.message or "scored" in r.message for r in caplog.records)
    resolve_settings(DetectionSettings(fpr=1e-2, region="foreground"), card, volume=True)
    assert any("calibrated on the brain but the foreground is scored" in r.message for r in caplog.records)


def test_tuning_in_the_brain_region_writes_it_into_the_setting_and_its_calibration(tiny_model_file, tmp_path):
    from synomaly import tune
    from synomaly.errors import InputError

    from test_tune import _head

    vol = tmp_path / "moved.nii.gz"
    sitk.WriteImage(_moved_atlas()[0], str(vol))
    grid = tune.TuneGrid(ts=(50,), blurs=(3,), ensembles=(), max_stages=1, multi_top=0, more_draws=1, smooths=())
    opts = tune.TuneOptions(forms=("native",), lesions_per_volume=1, grid=grid, fprs=(1e-2, 1e-3), region="brain")
    out = tmp_path / "tuned.safetensors"
    record = tune.tune_model(tiny_model_file, [str(vol)], output=out, options=opts, device="cpu")
    card = read_card(out)
    assert record["region"] == "brain" and card.detection_3d.region == "brain"
    assert card.calibration_3d["region"] == "brain"
    # tuning the tuned model again keeps its region unless told otherwise
    again = tune.tune_model(out, [str(vol)], output=tmp_path / "again.safetensors",
                            options=tune.TuneOptions(forms=("native",), lesions_per_volume=1, grid=grid,
                                                     fprs=(1e-2,)), device="cpu")
    assert again["region"] == "brain"
    phantom = tmp_path / "phantom.nii.gz"
    sitk.WriteImage(_head(seed=3), str(phantom))
    with pytest.raises(InputError, match="brain region not used"):
        tune.tune_model(tiny_model_file, [str(phantom)], output=tmp_path / "x.safetensors", options=opts, device="cpu")


def test_growing_a_mask_adds_the_voxels_within_the_margin_in_mm():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    mask = rng.random((20, 30, 25)) > 0.995  # scattered voxels: many distances close to each margin
    like = sitk.GetImageFromArray(mask.astype(np.float32))
    like.SetSpacing((0.8, 1.1, 2.5))  # ITK order: x, y, z
    for margin in (1.0, 2.5, 3.0):
        expected = ndimage.distance_transform_edt(~mask, sampling=(2.5, 1.1, 0.8)) <= margin
        assert np.array_equal(atlas.grow(mask, like, margin), expected), margin
    # a compact mask (grown within its box) and one touching the grid's edge; an empty mask stays empty
    k, j, i = np.mgrid[:20, :30, :25]
    for centre in ((10, 14, 12), (2, 3, 22)):
        blob = (k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 < 10
        for margin in (1.0, 3.0, 6.0):
            expected = ndimage.distance_transform_edt(~blob, sampling=(2.5, 1.1, 0.8)) <= margin
            assert np.array_equal(atlas.grow(blob, like, margin), expected), (centre, margin)
    assert not atlas.grow(np.zeros_like(mask), like, 3.0).any()
