"""The mirror map: a volume's map less its mirror image across the registered brain's midline (atlas.contralateral_excess,
detect.contralateral), in the card, in calibration and tuning, and in detection.

The scans here are the atlas itself under a known affine transform (test_atlas._moved_atlas), so the true mirror
image of every point is known; what the option does on other people's heads is measured on the held-out volumes
(Docs/experiments.md, *The mirror map*), not here.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from synomaly import atlas
from synomaly.card import MAX_MIRROR_MM, DetectionDefaults, ModelCardError
from synomaly.modelio import load_model, read_card

from test_atlas import _brain, _moved_atlas, _moved_transform


def test_the_atlas_midline_splits_its_brain_into_mirror_halves():
    brain = atlas._load_atlas()[2]
    b = sitk.GetArrayFromImage(brain) > 0.5
    mid = atlas.atlas_midline_x()
    xs = np.array([brain.TransformIndexToPhysicalPoint([i, 0, 0])[0] for i in range(brain.GetSize()[0])])
    centroid = float(xs[np.nonzero(b)[2]].mean())
    assert abs(mid - centroid) < 3.0
    left, right = (b[:, :, xs < mid].sum(), b[:, :, xs > mid].sum())
    assert abs(left - right) < 0.03 * b.sum()


def _blobs(image: sitk.Image, to_atlas: sitk.Transform, centres_atlas: list[tuple[float, float, float]],
           sigma_mm: float = 5.0) -> sitk.Image:
    """Gaussian blobs of height 1 on the scan's grid, centred at these atlas points (mapped into the scan)."""
    back = to_atlas.GetInverse()
    shape = sitk.GetArrayViewFromImage(image).shape  # (z, y, x)
    idx = np.indices(shape).reshape(3, -1)[::-1].T.astype(float)  # (x, y, z) index of every voxel, C order
    direction = np.array(image.GetDirection()).reshape(3, 3)
    pts = np.array(image.GetOrigin()) + (idx * np.array(image.GetSpacing())) @ direction.T
    out = np.zeros(len(pts), np.float32)
    for c in centres_atlas:
        p = np.array(back.TransformPoint(c))
        out = np.maximum(out, np.exp(-((pts - p) ** 2).sum(1) / (2 * sigma_mm ** 2)))
    arr = out.reshape(shape)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    img.CopyInformation(image)
    return img


def test_a_map_less_its_mirror_keeps_a_one_sided_finding_and_cancels_paired_and_midline_ones():
    image, _ = _moved_atlas()
    found = _brain(image)
    assert found.problem is None and found.transform is not None
    truth = _moved_transform()
    mid = atlas.atlas_midline_x()
    head = atlas._load_atlas()[0]
    y0, z0 = head.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in head.GetSize()])[1:]
    pair = [(mid + 30.0, y0, z0), (mid - 30.0, y0, z0)]
    single = (mid + 25.0, y0 + 35.0, z0)
    middle = (mid, y0 - 30.0, z0)
    score = _blobs(image, truth, [*pair, single, middle])
    out = sitk.GetArrayFromImage(atlas.contralateral_excess(score, found.transform, 4.0))
    arr = sitk.GetArrayFromImage(score)
    assert out.min() >= 0 and (out <= arr + 1e-6).all(), "the map only ever loses what its mirror image shows"

    def at(volume, point_atlas):
        p = truth.GetInverse().TransformPoint(point_atlas)
        i = image.TransformPhysicalPointToIndex(p)
        return float(volume[i[2], i[1], i[0]])

    assert at(arr, single) > 0.9 and at(out, single) > 0.8, "a finding on one side keeps its value"
    for p in [*pair, middle]:
        assert at(arr, p) > 0.9 and at(out, p) < 0.1, f"what the other side shows too cancels: {p}"
    unchanged = atlas.contralateral_excess(score, found.transform, 0.0)  # no growth: still a mirror image
    assert sitk.GetArrayFromImage(unchanged).sum() >= out.sum()


def test_the_card_holds_the_mirror_growth_and_checks_it(tiny_model_file):
    from synomaly.detect import DetectionSettings, resolve_mirror
    from synomaly.errors import SettingsError

    card = read_card(tiny_model_file)
    assert card.detection_for(True).mirror_mm == 0.0
    card.detection_3d = DetectionDefaults(t=50, blur_kernel=3, max_stages=1, region="brain", mirror_mm=4.0)
    assert "less its mirror image across the midline (grown 4 mm)" in card.detection_text(True)
    assert "mirror" not in card.detection_text(False)
    again = type(card).from_json(card.to_json())
    assert again.detection_3d.mirror_mm == 4.0 and again.detection.mirror_mm == 0.0
    bad = card.to_dict()
    bad["detection_3d"]["mirror_mm"] = MAX_MIRROR_MM + 1
    with pytest.raises(ModelCardError, match="mirror_mm"):
        type(card).from_dict(bad)
    assert resolve_mirror(DetectionSettings(), card, volume=True) == 4.0
    assert resolve_mirror(DetectionSettings(mirror_mm=0.0), card, volume=True) == 0.0
    assert resolve_mirror(DetectionSettings(), card, volume=False) == 0.0, "2D images have no midline here"
    with pytest.raises(SettingsError, match="mirror"):
        resolve_mirror(DetectionSettings(mirror_mm=-1.0), card, volume=True)


def test_detection_takes_the_mirror_image_from_the_map_in_the_brain_and_says_when_it_cannot(tiny_model_file):
    from synomaly.detect import DetectionSettings, detect

    model = load_model(tiny_model_file, device="cpu")
    image, _ = _moved_atlas()
    common = dict(device="cpu", t=50, threshold=0.05, max_stages=1, region="brain")
    plain = detect(image, model, DetectionSettings(**common))
    mirrored = detect(image, model, DetectionSettings(**common, mirror_mm=4.0))
    assert (plain.report["mirror_mm"], mirrored.report["mirror_mm"]) == (0.0, 4.0)
    p = sitk.GetArrayFromImage(plain.anomaly_map)
    m = sitk.GetArrayFromImage(mirrored.anomaly_map)
    assert (m <= p + 1e-6).all() and m.sum() < 0.9 * p.sum()
    found = _brain(image)
    expected = sitk.GetArrayFromImage(atlas.contralateral_excess(plain.anomaly_map, found.transform, 4.0))
    assert np.abs(m - expected).max() < 0.02 * p.max(), "the same seed heals alike; only the mirror step differs"
    whole = detect(image, model, DetectionSettings(**{**common, "region": "foreground"}, mirror_mm=4.0))
    assert whole.report["mirror_mm"] == 0.0
    assert any("mirror image" in w for w in whole.report["warnings"])


def test_a_calibration_of_the_mirror_map_is_measured_on_that_map(tiny_model_file):
    from synomaly.calibrate import calibrate
    from synomaly.prepare import prepare_scan

    model = load_model(tiny_model_file, device="cpu")
    card = model.card
    image, _ = _moved_atlas()
    prep = prepare_scan(image, card, region="brain")
    card.detection_3d = DetectionDefaults(t=50, blur_kernel=3, max_stages=1, region="brain")
    plain = calibrate(model, prep.slices, prep.masks, fprs=(1e-2,), volume=True, preps=[prep])
    card.detection_3d = DetectionDefaults(t=50, blur_kernel=3, max_stages=1, region="brain", mirror_mm=4.0)
    mirrored = calibrate(model, prep.slices, prep.masks, fprs=(1e-2,), volume=True, preps=[prep])
    assert "mirror_mm" not in plain and mirrored["mirror_mm"] == 4.0
    assert mirrored["thresholds"]["0.01"] < plain["thresholds"]["0.01"]


def test_tuning_tries_the_mirror_map_on_its_best_settings_and_writes_the_choice(tiny_model_file, tmp_path, caplog):
    from synomaly import tune
    from synomaly.errors import InputError

    vol = tmp_path / "moved.nii.gz"
    sitk.WriteImage(_moved_atlas()[0], str(vol))
    grid = tune.TuneGrid(ts=(50, 100), blurs=(3,), ensembles=(), max_stages=1, multi_top=0, more_draws=1, smooths=(),
                         smooth_top=1, mirror=(4.0,))
    opts = tune.TuneOptions(forms=("native",), lesions_per_volume=1, grid=grid, fprs=(1e-2, 1e-3), region="brain")
    out = tmp_path / "tuned.safetensors"
    record = tune.tune_model(tiny_model_file, [str(vol)], output=out, options=opts, device="cpu")
    mirrored = [r for r in record["table"] if r.get("mirror")]
    plain = [r for r in record["table"] if not r.get("mirror")]
    assert len(plain) == 2 and len(mirrored) == 1 and mirrored[0]["mirror"] == 4.0
    best_plain = max(plain, key=lambda r: r["auprc"])
    assert (mirrored[0]["t"], mirrored[0]["blur"]) == (best_plain["t"], best_plain["blur"])
    card = read_card(out)
    chosen = record["chosen"]
    assert card.detection_3d.mirror_mm == chosen.get("mirror", 0.0)
    assert card.calibration_3d.get("mirror_mm", 0.0) == chosen.get("mirror", 0.0)
    only = tune.TuneGrid(ts=(50, 100), blurs=(3,), ensembles=(), max_stages=1, multi_top=0, more_draws=1, smooths=(),
                         smooth_top=1, mirror=(4.0,), mirror_only=True)
    forced = tune.tune_model(tiny_model_file, [str(vol)], output=tmp_path / "only.safetensors", device="cpu",
                             options=tune.TuneOptions(forms=("native",), lesions_per_volume=1, grid=only,
                                                      fprs=(1e-2, 1e-3), region="brain"))
    card = read_card(tmp_path / "only.safetensors")
    assert forced["chosen"]["mirror"] == 4.0 and card.detection_3d.mirror_mm == 4.0
    assert card.calibration_3d["mirror_mm"] == 4.0 and "mirror image" in card.detection_text(True)
    from synomaly.detect import DetectionSettings, resolve_settings

    caplog.clear()
    resolve_settings(DetectionSettings(), card, volume=True)
    assert not any("mirror image" in r.getMessage() for r in caplog.records)
    resolve_settings(DetectionSettings(mirror_mm=0.0), card, volume=True)
    assert any("less its mirror image grown 4 mm but 0 mm is used" in r.getMessage() for r in caplog.records)
    with pytest.raises(InputError, match="at least one mirror growth"):
        tune.tune_model(tiny_model_file, [str(vol)], output=tmp_path / "y.safetensors", device="cpu",
                        options=tune.TuneOptions(forms=("native",), lesions_per_volume=1, region="brain",
                                                 grid=tune.TuneGrid(mirror_only=True)))
    foreground = tune.TuneOptions(forms=("native",), lesions_per_volume=1, grid=grid, region="foreground")
    with pytest.raises(InputError, match="brain region"):
        tune.tune_model(tiny_model_file, [str(vol)], output=tmp_path / "x.safetensors", options=foreground, device="cpu")
