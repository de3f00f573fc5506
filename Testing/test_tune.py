"""Label-free tuning: synthetic lesions, scan forms, the settings sweep, and what ends up in the card."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from synomaly import tune
from synomaly.errors import InputError, ModelError
from synomaly.lesions import FORMS, LesionSpec, brain_mask, implant_random_lesions, scan_form, tissue_range
from synomaly.modelio import load_model, read_card


def _head(size=(48, 56, 40), spacing=(1.5, 1.5, 2.0), seed=0, direction=None) -> sitk.Image:
    """A head-like volume with texture: an ellipsoid of tissue on a dark background (ITK size order)."""
    k, j, i = np.mgrid[: size[2], : size[1], : size[0]].astype(np.float32)
    c = [(n - 1) / 2 for n in size]
    body = ((i - c[0]) / (0.42 * size[0])) ** 2 + ((j - c[1]) / (0.42 * size[1])) ** 2 + ((k - c[2]) / (0.45 * size[2])) ** 2 < 1
    rng = np.random.default_rng(seed)
    arr = np.where(body, 100 + 10 * np.sin(i / 3) + 4 * rng.standard_normal(body.shape), 0).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((-30.0, -40.0, -35.0))
    if direction is not None:
        img.SetDirection(direction)
    return img


def test_lesions_lie_in_tissue_follow_the_spec_and_are_reproducible():
    img = _head()
    tissue = brain_mask(img, depth_mm=6.0)
    spec = LesionSpec(diameter_mm=(8.0, 20.0), contrast=(0.4, 0.9), polarity="darker")
    a, ta, la = implant_random_lesions(img, tissue, np.random.default_rng(5), count=3, spec=spec)
    b, tb, lb = implant_random_lesions(img, tissue, np.random.default_rng(5), count=3, spec=spec)
    assert np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b)) and np.array_equal(ta, tb)
    assert la == lb and len(la) == 3
    assert ta.any() and not (ta & ~tissue).any(), "the truth lies inside the tissue mask"
    diff = sitk.GetArrayFromImage(a) - sitk.GetArrayFromImage(img)
    assert (diff[~tissue] == 0).all(), "nothing changes outside the tissue"
    lo, hi = tissue_range(sitk.GetArrayFromImage(img), tissue)
    assert diff[ta].mean() < -0.2 * (hi - lo), "darker lesions are darker, by at least half the lowest contrast"
    for lesion in la:
        assert 8.0 <= lesion.diameter_mm <= 20.0 and -0.9 <= lesion.contrast <= -0.4
    assert a.GetSpacing() == img.GetSpacing() and a.GetDirection() == img.GetDirection()


def test_every_form_keeps_the_truth_on_the_new_grid():
    img = _head()
    tissue = brain_mask(img, depth_mm=6.0)
    lesioned, truth, _ = implant_random_lesions(img, tissue, np.random.default_rng(1), count=2,
                                                spec=LesionSpec(diameter_mm=(12.0, 18.0)))
    voxel = np.prod(img.GetSpacing())
    for form in FORMS:
        out, t_out, meta = scan_form(lesioned, truth, tissue, form, np.random.default_rng(2))
        assert meta["form"] == form
        assert t_out.shape == sitk.GetArrayViewFromImage(out).shape
        ml_in, ml_out = truth.sum() * voxel, t_out.sum() * np.prod(out.GetSpacing())
        assert ml_out == pytest.approx(ml_in, rel=0.35), f"{form}: the lesion keeps its volume"
        healthy, _, _ = scan_form(img, None, tissue, form, np.random.default_rng(2))
        change = np.abs(sitk.GetArrayFromImage(out) - sitk.GetArrayFromImage(healthy))
        assert change[t_out].mean() > 5 * change[~t_out].mean(), f"{form}: the lesion is where the truth says"
    oblique, _, meta = scan_form(lesioned, truth, tissue, "oblique", np.random.default_rng(3))
    d = np.array(oblique.GetDirection()).reshape(3, 3)
    assert not np.allclose(np.abs(d), np.eye(3), atol=0.05) and sorted(oblique.GetSpacing())[-1] == 3.0
    scaled, _, meta = scan_form(lesioned, truth, tissue, "scaled", np.random.default_rng(3))
    ratio = sitk.GetArrayFromImage(scaled)[truth].std() / sitk.GetArrayFromImage(lesioned)[truth].std()
    assert ratio == pytest.approx(meta["scale"], rel=5e-3)  # the card rounds the scale to 3 decimals
    with pytest.raises(ValueError, match="brain mask"):
        scan_form(lesioned, truth, None, "brain", np.random.default_rng(0))


def test_choice_prefers_the_cheaper_of_tied_settings_and_the_fpr_respects_healthy_volumes():
    rows = [{"t": "100", "blur": 3, "stages": 5, "draws": 1, "auprc": 0.300, "cost": 4.5},
            {"t": "50", "blur": 3, "stages": 1, "draws": 1, "auprc": 0.296, "cost": 1.0},
            {"t": "25+50+100", "blur": 5, "stages": 1, "draws": 1, "auprc": 0.250, "cost": 3.0},
            {"t": "10", "blur": 1, "stages": 1, "draws": 1, "auprc": math.nan, "cost": 1.0}]
    assert tune.choose(rows)["t"] == "50"
    rows[1]["auprc"] = 0.2
    assert tune.choose(rows)["t"] == "100"
    points = [{"fpr": "0.01", "dice_mean": 0.5, "healthy_ml_max": 12.0},
              {"fpr": "0.001", "dice_mean": 0.4, "healthy_ml_max": 0.8},
              {"fpr": "0.0001", "dice_mean": 0.2, "healthy_ml_max": 0.0}]
    assert tune.choose_fpr(points, 1.0)["fpr"] == "0.001"
    assert tune.choose_fpr(points, 0.5)["fpr"] == "0.0001"
    assert tune.choose_fpr(points, 0.0)["fpr"] == "0.0001"
    assert tune.choose_fpr(points[:1], 1.0)["fpr"] == "0.01", "none qualifies: the rate that flags least"
    grown = {"fpr": "0.0001", "grow_fpr": "0.01", "dice_mean": 0.45, "healthy_ml_max": 0.6}
    assert tune.choose_fpr(points + [grown], 1.0) is grown, "growth wins when it segments better and stays clean"
    assert tune.choose_fpr(points + [dict(grown, healthy_ml_max=1.5)], 1.0)["fpr"] == "0.001"
    assert tune.choose_fpr(points + [dict(grown, dice_mean=0.2)], 0.5).get("grow_fpr") is None, "ties: no growth"
    cut = dict(points[1], peak_fraction=0.5)
    assert tune.choose_fpr(points + [cut], 1.0).get("peak_fraction") is None, "ties: the plain threshold"
    assert tune.choose_fpr(points + [dict(cut, dice_mean=0.41)], 1.0) == dict(cut, dice_mean=0.41)


def test_hysteresis_grows_found_lesions_to_their_extent_and_leaves_unseeded_regions_out():
    from synomaly.detect import postprocess

    score = np.zeros((10, 40, 40), dtype=np.float32)
    score[3:7, 5:15, 5:15] = 0.3  # a lesion whose core alone passes the strict threshold
    score[4:6, 9:11, 9:11] = 0.9
    score[3:7, 25:35, 25:35] = 0.3  # as large and as bright as the lesion's rim, but never above the strict level
    strict, _ = postprocess(score, 0.5, (1.0, 1.0, 1.0), 0.0)
    assert strict.sum() == 8
    grown, labels = postprocess(score, 0.5, (1.0, 1.0, 1.0), 0.0, grow=0.2)
    assert grown.sum() == 400 and grown[3:7, 5:15, 5:15].all() and not grown[:, 25:, 25:].any()
    assert labels.max() == 1
    # the minimum size counts the grown component: kept at 400 mm^3, gone at 401
    assert postprocess(score, 0.5, (1.0, 1.0, 1.0), 400.0, grow=0.2)[0].sum() == 400
    assert not postprocess(score, 0.5, (1.0, 1.0, 1.0), 401.0, grow=0.2)[0].any()
    # a grow level at or above the threshold changes nothing
    assert np.array_equal(postprocess(score, 0.5, (1.0, 1.0, 1.0), 0.0, grow=0.6)[0], strict)


def test_each_lesion_can_be_outlined_at_half_its_own_peak_whatever_its_contrast():
    from synomaly.detect import postprocess

    # two blurred lesions of the same size (radius 7), one faint and one strong: one absolute threshold outlines
    # the strong one too wide; half of each one's own peak falls at its edge
    zz, yy, xx = np.mgrid[:24, :60, :60]
    from scipy import ndimage

    ball = lambda cy, cx: ((zz - 12) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= 49).astype(np.float32)
    truth = ball(15, 15) + ball(15, 45) > 0
    score = ndimage.gaussian_filter(0.25 * ball(15, 15) + 2.0 * ball(15, 45), 1.5)
    spacing, thr = (1.0, 1.0, 1.0), 0.15
    plain, _ = postprocess(score, thr, spacing, 0.0)
    cut, labels = postprocess(score, thr, spacing, 0.0, peak_fraction=0.5)
    left, right = (slice(None), slice(None), slice(0, 30)), (slice(None), slice(None), slice(30, 60))

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    assert plain[right].sum() > 1.5 * truth[right].sum(), "the absolute threshold overflows the strong lesion"
    assert dice(cut[right], truth[right]) > 0.9 > dice(plain[right], truth[right])
    # the faint lesion's half peak lies below the threshold it was found at: outlined as before, never grown
    assert np.array_equal(cut[left], plain[left]) and labels.max() == 2
    # with growth, the faint one grows to its own half peak and stops there
    grown, _ = postprocess(score, thr, spacing, 0.0, grow=0.01, peak_fraction=0.5)
    assert dice(grown[left], truth[left]) > 0.9 and dice(grown[right], truth[right]) > 0.9
    assert postprocess(score, thr, spacing, 0.0, grow=0.01)[0][left].sum() > 1.5 * truth[left].sum()
    # pieces a cut leaves under the minimum size are dropped as any small lesion is
    assert postprocess(score, thr, spacing, float(cut[left].sum()) + 1, peak_fraction=0.5)[0][left].sum() == 0


def test_tuning_writes_the_chosen_setting_and_detection_uses_it(tiny_model_file, tmp_path):
    from synomaly.detect import DetectionSettings, detect, resolve_settings

    vol = tmp_path / "healthy.nii.gz"
    sitk.WriteImage(_head(seed=4), str(vol))
    out = tmp_path / "tuned.safetensors"
    grid = tune.TuneGrid(ts=(50, 200), blurs=(1, 3), ensembles=((50, 200),), max_stages=2, multi_top=1, more_draws=2,
                         smooths=(3.0,), smooth_top=2, signed=(False, True), tissue_bins=(0, 8))
    opts = tune.TuneOptions(forms=("native", "thick"), lesions_per_volume=2, grid=grid, seed=1)
    record = tune.tune_model(tiny_model_file, [str(vol)], output=out, options=opts, device="cpu")
    card = read_card(out)
    table = card.tuning["table"]
    # 3 level settings x 2 blurs; the 2 best again in 5 map variants each (normalised in 8 tissue classes
    # unsmoothed; smoothed 3 mm absolute or signed, normalised or not); one with more draws, one multi-stage
    assert len(table) == 3 * 2 + 2 * 5 + 1 + 1
    variants = [(r["smooth"], r["signed"], r["bins"]) for r in table[6:16]]
    assert variants == [(0.0, False, 8), (3.0, False, 0), (3.0, False, 8), (3.0, True, 0), (3.0, True, 8)] * 2
    assert all((r["smooth"], r["signed"], r["bins"]) == (0.0, False, 0) for r in table[:6])
    assert {r["t"] for r in table} >= {"50", "200", "50+200"} and any(r["draws"] == 2 for r in table)
    chosen = card.tuning["chosen"]
    assert chosen in table and chosen["auprc"] >= max(r["auprc"] for r in table) * (1 - tune.AUPRC_TIE)
    ts = [int(v) for v in chosen["t"].split("+")]
    d3 = card.detection_3d
    assert list(d3.t_ensemble or [d3.t]) == ts
    assert d3.blur_kernel == chosen["blur"] and d3.max_stages == chosen["stages"] and d3.noise_draws == chosen["draws"]
    assert d3.smooth_mm == chosen["smooth"] and card.calibration_3d.get("smooth_mm", 0.0) == chosen["smooth"]
    assert (d3.signed_map, d3.tissue_bins) == (chosen["signed"], chosen["bins"])
    assert card.calibration_3d.get("signed_map", False) == chosen["signed"]
    assert card.calibration_3d.get("tissue_bins", 0) == chosen["bins"]
    assert f"{d3.fpr:g}" == card.tuning["chosen_fpr"]
    grow_key = card.tuning["chosen_grow_fpr"]
    assert (d3.grow_fpr is None) if grow_key is None else (f"{d3.grow_fpr:g}" == grow_key)
    points = card.tuning["operating_points"]
    rates = ["0.01", "0.001", "0.0001", "1e-05"]
    assert {(p["fpr"], p["grow_fpr"], p["peak_fraction"]) for p in points} == {
        (r, g, pf) for i, r in enumerate(rates) for g in [None] + rates[:i] for pf in (None, 0.5)
    }  # each rate alone and grown, each of those also outlined at half of each lesion's peak
    assert d3.peak_fraction == card.tuning["chosen_peak_fraction"]
    for p in points:  # growing a rate's lesions never flags less in a lesion-free volume than the rate alone
        if p["grow_fpr"]:
            alone = next(q for q in points if q["fpr"] == p["fpr"] and q["grow_fpr"] is None
                         and q["peak_fraction"] == p["peak_fraction"])
            assert p["healthy_ml_max"] >= alone["healthy_ml_max"]
    assert card.detection == read_card(tiny_model_file).detection, "single slices keep the untuned setting"
    assert card.calibration == read_card(tiny_model_file).calibration
    cal = card.calibration_3d
    assert set(cal["thresholds"]) == {"0.01", "0.001", "0.0001", "1e-05"}
    assert cal["thresholds"]["0.01"] < cal["thresholds"]["0.001"] < cal["thresholds"]["0.0001"] <= cal["thresholds"]["1e-05"]
    assert cal["scans"] == 2 and cal["blur_kernel"] == chosen["blur"]
    assert record["lesions"] == 4 and card.tuning["seconds"]["total"] > 0
    assert card.tuning["volumes"] == ["healthy"] and card.tuning["volume_files"] == [str(vol.resolve())]
    for p in card.tuning["operating_points"]:  # every truth component counted once, split by polarity
        lf = p["lesions_found"]
        assert lf["all"]["of"] >= 1 and lf["brighter"]["of"] + lf["darker"]["of"] <= lf["all"]["of"]
        assert lf["under_1ml"]["of"] + lf["1ml_or_more"]["of"] == lf["all"]["of"]
        assert 0 <= lf["all"]["found"] <= lf["all"]["of"]
    assert read_card(tiny_model_file).tuning == {}, "the input model file is left as it was"
    model = load_model(out, device="cpu")
    got_ts, k, stages, thr, source = resolve_settings(DetectionSettings(), model.card, volume=True)
    assert list(got_ts) == ts and k == chosen["blur"] and stages == chosen["stages"]
    assert source == f"calibrated FPR {card.tuning['chosen_fpr']}"
    result = detect(_head(seed=9), model, DetectionSettings(device="cpu"))
    assert result.report["t"] == (ts[0] if len(ts) == 1 else ts) and result.threshold == pytest.approx(thr)
    assert result.report["smooth_mm"] == d3.smooth_mm and result.report["peak_fraction"] == d3.peak_fraction
    cut = detect(_head(seed=9), model, DetectionSettings(device="cpu", peak_fraction=0.5))
    assert cut.report["peak_fraction"] == 0.5
    assert detect(_head(seed=9), model, DetectionSettings(device="cpu", peak_fraction=0)).report["peak_fraction"] is None
    if d3.grow_fpr:
        assert result.report["grow_threshold"] == pytest.approx(cal["thresholds"][grow_key])
    else:
        assert result.report["grow_threshold"] is None
    grown = detect(_head(seed=9), model, DetectionSettings(device="cpu", fpr=1e-4, grow_fpr=1e-2))
    assert grown.report["grow_threshold"] == pytest.approx(cal["thresholds"]["0.01"])
    strict = detect(_head(seed=9), model, DetectionSettings(device="cpu", fpr=1e-4, grow_fpr=0))
    assert strict.report["grow_threshold"] is None
    g_seg = sitk.GetArrayFromImage(grown.segmentation) > 0
    s_seg = sitk.GetArrayFromImage(strict.segmentation) > 0
    assert g_seg.sum() >= s_seg.sum() and not (s_seg & ~g_seg).any(), "growth only adds to the strict lesions"
    from synomaly.detect import resolve_grow_threshold

    loose = cal["thresholds"]["0.01"]
    assert resolve_grow_threshold(DetectionSettings(threshold=1.0), model.card, 1.0, volume=True) is None, \
        "an explicit threshold is taken as it is"
    assert resolve_grow_threshold(DetectionSettings(threshold=1.0, grow_fpr=1e-2), model.card, 1.0, True) == loose
    assert resolve_grow_threshold(DetectionSettings(fpr=1e-2, grow_fpr=1e-2), model.card, loose, True) is None
    with pytest.raises(ModelError, match="no threshold calibrated for FPR 0.05"):
        resolve_grow_threshold(DetectionSettings(grow_fpr=0.05), model.card, 1.0, volume=True)
    # an explicit t replaces the tuned ensemble
    assert resolve_settings(DetectionSettings(t=77), model.card, volume=True)[0] == (77,)
    # a single 2D slice keeps the card's slice setting
    flat = detect(sitk.GetImageFromArray(sitk.GetArrayFromImage(_head(seed=9))[10]), model, DetectionSettings(device="cpu"))
    assert flat.report["t"] == model.card.detection.t and flat.report["setting"] == "card default"


def test_tuning_refuses_evaluation_volumes_and_2d_images(tiny_model_file, tmp_path):
    from synomaly.errors import InputError

    with pytest.raises(InputError, match="reserved for evaluation"):
        tune.load_tune_volumes(["ch2"])
    try:  # a leave-one-volume-out experiment may name it (then it loads, with its brain mask, where installed)
        held = tune.load_tune_volumes(["ch2"], allow_held_out=True)
    except InputError as exc:
        assert "not installed here" in str(exc)
    else:
        assert [v.name for v in held] == ["ch2"] and held[0].has_mask
    png = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((20, 20), np.float32)), str(png))
    with pytest.raises(InputError, match="3D volume"):
        tune.load_tune_volumes([str(png)])


def test_an_ensemble_of_noise_levels_averages_the_healed_images(tiny_model_file):
    from synomaly.detect import _denoise, slice_generators

    model = load_model(tiny_model_file, device="cpu")
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    both, none = _denoise(model, x, (50, 300), 1, slice_generators(3, 0, torch.device("cpu")))
    assert none is None
    g2 = slice_generators(3, 0, torch.device("cpu"))  # each slice's stream continues from level to level
    a, _ = _denoise(model, x, 50, 1, g2)
    b, _ = _denoise(model, x, 300, 1, g2)
    assert torch.allclose(both, (a + b) / 2, atol=1e-5)
    # asked for, each level's own prediction comes back too, from the same noise (the average is unchanged)
    again, each = _denoise(model, x, (50, 300), 1, slice_generators(3, 0, torch.device("cpu")), per_level=True)
    assert torch.equal(again, both)
    assert each.shape == (2, 3, 1, 32, 32)
    assert torch.allclose(each[0], a, atol=1e-6) and torch.allclose(each[1], b, atol=1e-6)


def test_lesion_recall_counts_found_lesions_by_polarity_and_size():
    from types import SimpleNamespace

    healthy = np.zeros((20, 20, 20), np.float32)
    lesioned = healthy.copy()
    truth = np.zeros(healthy.shape, bool)
    truth[2:6, 2:6, 2:6] = True  # 64 voxels of 1 mm^3 = 0.064 mL, brighter
    lesioned[truth] += 1.0
    dark = np.zeros(healthy.shape, bool)
    dark[10:20, 10:20, 10:20] = True  # 1,000 voxels = 1 mL, darker
    lesioned[dark] -= 0.5
    truth |= dark

    def case(arr, tr):
        return tune.TuneCase("c", SimpleNamespace(oriented=arr), tr, (1.0, 1.0, 1.0), {})

    labels, rows = tune.lesion_polarities(case(lesioned, truth), case(healthy, None))
    assert sorted((r["polarity"], r["ml"]) for r in rows) == [(-1, 1.0), (1, 0.064)]
    found = [(r["polarity"], r["ml"], r["polarity"] > 0) for r in rows]  # the bright one found, the dark missed
    rec = tune.lesion_recall(found)
    assert rec["all"] == {"found": 1, "of": 2}
    assert rec["brighter"] == {"found": 1, "of": 1} and rec["darker"] == {"found": 0, "of": 1}
    assert rec["under_1ml"] == {"found": 1, "of": 1} and rec["1ml_or_more"] == {"found": 0, "of": 1}
    assert labels.max() == 2 and set(np.unique(labels[truth])) == {1, 2}


def test_tune_command_with_a_single_stage_grid_of_our_choosing(tiny_model_file, tmp_path, capsys):
    from synomaly.cli import main

    vol = tmp_path / "healthy.nii.gz"
    sitk.WriteImage(_head(seed=4), str(vol))
    out = tmp_path / "tuned.safetensors"
    assert main(["tune", str(tiny_model_file), "--data", str(vol), "--forms", "native", "--lesions", "2",
                 "--t", "50", "--blur", "3", "5", "--ensembles", "50+200", "--single-stage", "--smooth", "3",
                 "--fprs", "1e-4", "1e-3", "3e-4", "-o", str(out), "--progress", "none"]) == 0
    card = read_card(out)
    table = card.tuning["table"]
    # rates of our choosing, between the decades: calibrated, scored, and the default is one of them
    assert set(card.calibration_3d["thresholds"]) == {"0.001", "0.0003", "0.0001"}
    assert {p["fpr"] for p in card.tuning["operating_points"]} == {"0.001", "0.0003", "0.0001"}
    assert card.tuning["chosen_fpr"] in card.calibration_3d["thresholds"]
    assert f"{card.detection_3d.fpr:g}" == card.tuning["chosen_fpr"]
    assert not any(r["signed"] or r["bins"] for r in table)  # by default the original map only
    settings = [("50", 3), ("50", 5), ("50+200", 3), ("50+200", 5)]
    assert sorted((r["t"], r["blur"], r["smooth"]) for r in table) == sorted(
        [(t, b, 0.0) for t, b in settings] + [(t, b, 3.0) for t, b in settings])  # the 4 best, smoothed 3 mm
    assert all(r["stages"] == 1 and r["draws"] == 1 for r in table)
    assert "default FPR" in capsys.readouterr().out
    assert main(["tune", str(tiny_model_file), "--data", str(vol), "--tissue-bins", "-2", "-o", str(out),
                 "--progress", "none"]) != 0
    assert "tissue classes must lie between 0 and 64" in capsys.readouterr().err
    assert main(["tune", str(tiny_model_file), "--data", str(vol), "--fprs", "0.001", "0", "-o", str(out),
                 "--progress", "none"]) != 0
    assert "false-positive rates must lie between 0 and 1" in capsys.readouterr().err
    assert main(["tune", str(tiny_model_file), "--data", str(vol), "--forms", "native", "--lesions", "2",
                 "--t", "50", "--blur", "3", "--ensembles", "--single-stage", "--smooth", "3", "--signed",
                 "--tissue-bins", "4", "-o", str(out), "--progress", "none"]) == 0
    variants = {(r["smooth"], r["signed"], r["bins"]) for r in read_card(out).tuning["table"]}
    assert variants == {(0.0, False, 0), (0.0, False, 4), (3.0, False, 0), (3.0, False, 4), (3.0, True, 0),
                        (3.0, True, 4)}, "asked for, both variants are tried"


def test_smoothing_across_slices_lowers_one_slice_errors_more_than_lesions_through_slices():
    """A lesion spans neighbouring slices; a healing error of one slice does not: the smoothing keeps the first
    and lowers the second, in mm of the slice axis, and nothing outside the foreground."""
    from types import SimpleNamespace

    from synomaly.detect import slice_spacing, smooth_across_slices

    def prep(dz):
        image = sitk.Image(8, 8, 21, sitk.sitkFloat32)
        image.SetSpacing((1.0, 1.0, dz))
        fg = np.ones((21, 8, 8), bool)
        fg[:, 0, :] = False
        return SimpleNamespace(geometry=SimpleNamespace(reference=image, transpose=(0, 1, 2)), foreground=fg)

    score = np.zeros((21, 8, 8), np.float32)
    score[5:16, 4, 4] = 1.0  # a lesion through 11 slices
    score[10, 2, 2] = 1.0  # an error of one slice
    score[10, 0, 3] = 1.0  # outside the foreground
    p = prep(1.0)
    assert slice_spacing(p) == 1.0
    assert smooth_across_slices(score, p, 0.0) is score
    out = smooth_across_slices(score, p, 3.0)
    assert out[10, 4, 4] > 0.9 and out[10, 2, 2] < 0.15 and out[:, 0, :].max() == 0
    thick = smooth_across_slices(score, prep(6.0), 3.0)  # the same sigma in mm is half a slice at 6 mm
    assert thick[10, 2, 2] > 0.6


def test_a_smoothed_volume_setting_is_calibrated_on_each_scans_smoothed_map(tiny_model_file):
    """calibrate() thresholds a smoothed volume setting on the scans' maps as detection makes them (on their own
    grid, smoothed across slices), and refuses to guess without the scans' preparations."""
    from synomaly.calibrate import calibrate
    from synomaly.card import DetectionDefaults
    from synomaly.detect import oriented_score, run_stages, scan_map
    from synomaly.metrics import threshold_at_fpr
    from synomaly.prepare import prepare_scan

    model = load_model(tiny_model_file, device="cpu")
    model.card.detection_3d = DetectionDefaults(t=50, blur_kernel=3, max_stages=1, smooth_mm=3.0)
    prep = prepare_scan(_head(seed=5), model.card)
    with pytest.raises(ValueError, match="preps"):
        calibrate(model, prep.slices, prep.masks, fprs=(1e-2,), volume=True)
    cal = calibrate(model, prep.slices, prep.masks, fprs=(1e-2, 1e-3), volume=True, preps=[prep])
    assert cal["smooth_mm"] == 3.0 and "whole scan" in cal["unit"] and "signed_map" not in cal
    res = run_stages(model, prep.slices, prep.masks, t=50, kernel=3, threshold=float("inf"), max_stages=1)
    values = oriented_score(res.score, prep, 3.0)[prep.foreground]
    assert cal["thresholds"]["0.01"] == pytest.approx(threshold_at_fpr(values, 1e-2), abs=1e-5)
    # the signed map normalised per tissue class: its thresholds are those of that map, and the record says so
    model.card.detection_3d = DetectionDefaults(t=50, blur_kernel=3, max_stages=1, smooth_mm=3.0, signed_map=True,
                                                tissue_bins=4)
    cal = calibrate(model, prep.slices, prep.masks, fprs=(1e-2,), volume=True, preps=[prep])
    assert cal["signed_map"] is True and cal["tissue_bins"] == 4
    values = scan_map(res.healed, prep, 3, 3.0, True, 4)[prep.foreground]
    assert cal["thresholds"]["0.01"] == pytest.approx(threshold_at_fpr(values, 1e-2), abs=1e-5)
    assert cal["thresholds"]["0.01"] != pytest.approx(threshold_at_fpr(oriented_score(res.score, prep, 3.0)[
        prep.foreground], 1e-2), abs=1e-3)
    model.card.detection_3d = DetectionDefaults(t=50, blur_kernel=3, max_stages=1, tissue_bins=4)  # unsmoothed too
    with pytest.raises(ValueError, match="preps"):
        calibrate(model, prep.slices, prep.masks, fprs=(1e-2,), volume=True)
    unsmoothed = calibrate(model, prep.slices, prep.masks, fprs=(1e-2,), volume=False)
    assert "smooth_mm" not in unsmoothed


def test_a_model_file_is_calibrated_on_whole_volumes_each_read_once_and_on_2d_images_per_slice(tiny_model_file,
                                                                                                 tmp_path, monkeypatch):
    """calibrate_model: healthy volumes calibrate the card's volume setting on whole scans (each file read once);
    a 2D image among the scans sends the calibration to the slice setting instead."""
    from synomaly import prepare
    from synomaly.calibrate import calibrate_model
    from synomaly.card import DetectionDefaults
    from synomaly.modelio import save_model

    model = load_model(tiny_model_file, device="cpu")
    card = model.card.copy()
    card.detection_3d = DetectionDefaults(t=50, blur_kernel=3, max_stages=1, smooth_mm=3.0)
    path = tmp_path / "smoothed.safetensors"
    save_model(path, card, model.network.state_dict())
    volumes = []
    for seed in (5, 6):
        volumes.append(str(tmp_path / f"head-{seed}.nii.gz"))
        sitk.WriteImage(_head(size=(36, 40, 24), seed=seed), volumes[-1])
    reads, real = [], prepare.read_image
    monkeypatch.setattr(prepare, "read_image", lambda p, **kw: reads.append(str(p)) or real(p, **kw))
    cal = calibrate_model(path, volumes, fprs=(1e-2,), device="cpu")
    assert reads == volumes, "each volume is read once"
    written = read_card(path)
    assert written.calibration_3d["scans"] == 2 and written.calibration_3d["smooth_mm"] == 3.0
    assert "whole scan" in written.calibration_3d["unit"] and cal["thresholds"] == written.calibration_3d["thresholds"]
    assert written.calibration == card.calibration, "the slice setting's calibration is left as it was"

    flat = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.Extract(_head(size=(36, 40, 24), seed=7), [36, 40, 0], [0, 0, 12]), str(flat))
    cal2d = calibrate_model(path, [str(flat), *volumes], fprs=(1e-2,), device="cpu")
    again = read_card(path)
    assert again.calibration["scans"] == 3 and again.calibration["thresholds"] == cal2d["thresholds"]
    assert again.calibration_3d == written.calibration_3d, "the volume calibration is kept"

    card.detection_3d = DetectionDefaults(t=50, blur_kernel=3, max_stages=1)  # each slice's own map, foreground
    plain = tmp_path / "plain.safetensors"
    save_model(plain, card, model.network.state_dict())
    reads.clear()
    cal_plain = calibrate_model(plain, volumes, fprs=(1e-2,), device="cpu")
    assert reads == volumes, "a volume setting scored per slice also reads each volume once"
    slices = read_card(plain).calibration_3d
    assert slices["scans"] == 2 and slices["thresholds"] == cal_plain["thresholds"] and "whole scan" not in slices["unit"]
    reads.clear()
    mixed = calibrate_model(plain, [*volumes, str(flat)], fprs=(1e-2,), device="cpu")
    assert reads == [*volumes, str(flat)], "a 2D image after the volumes: none of them is read again"
    assert read_card(plain).calibration["scans"] == 3 and read_card(plain).calibration["thresholds"] == mixed["thresholds"]
    assert read_card(plain).calibration_3d == slices, "the volume calibration is kept"

    blank = tmp_path / "blank.nii.gz"  # a scan that cannot be prepared: skipped with its reason, order kept
    sitk.WriteImage(sitk.Image([36, 40, 24], sitk.sitkFloat32), str(blank))
    skipped = []
    kept = list(prepare.prepared_scans([volumes[0], str(blank), str(flat)], card, skipped=skipped))
    assert [(p, is_vol) for p, is_vol, _ in kept] == [(volumes[0], True), (str(flat), False)]
    assert len(skipped) == 1 and str(blank) in skipped[0] and "constant" in skipped[0]
    with pytest.raises(InputError, match="calibrated on whole scans.*blank"):  # thresholds for every scan given
        calibrate_model(path, [*volumes, str(blank)], fprs=(1e-2,), device="cpu")


def test_tissue_normalisation_lets_a_lesion_in_quiet_tissue_outrank_noisy_tissue():
    """A map whose healing errs five times more in one tissue class than in another: raw, that class's errors
    outrank a lesion in the quiet class; normalised per class, the lesion ranks first. Zero outside the region,
    never negative, and off with 0 classes."""
    from synomaly.detect import tissue_normalised

    rng = np.random.default_rng(0)
    shape = (6, 40, 40)
    tissue = np.zeros(shape, np.float32)
    tissue[:, :, 20:] = 1.0  # two classes: left quiet, right noisy
    score = np.abs(rng.normal(0.0, 1.0, shape)).astype(np.float32) * np.where(tissue > 0, 5.0, 1.0)
    lesion = np.zeros(shape, bool)
    lesion[2:4, 10:14, 5:9] = True
    score[lesion] += 6.0
    region = np.ones(shape, bool)
    region[:, :2] = False
    raw_top = np.argsort(score[region])[-lesion.sum():]
    assert not lesion[region][raw_top].all(), "raw, the noisy class takes some of the top ranks"
    norm = tissue_normalised(score, tissue, region, 2)
    assert (norm >= 0).all() and not norm[~region].any()
    assert norm[lesion].min() > norm[region & ~lesion].max(), "normalised, every lesion voxel outranks the rest"
    assert tissue_normalised(score, tissue, region, 0) is score


def test_signed_smoothing_cancels_errors_that_change_sign_from_slice_to_slice(tiny_model_file):
    """scan_map with a signed difference: a healing error whose sign alternates between slices averages away
    across slices, a lesion that changes several slices alike does not; the absolute map keeps both."""
    from synomaly.detect import scan_map
    from synomaly.prepare import grid_to_oriented, prepare_scan

    model = load_model(tiny_model_file, device="cpu")
    prep = prepare_scan(_head(size=(48, 56, 40), spacing=(1.5, 1.5, 1.5), seed=5), model.card)
    s, g = prep.slices.shape[0], prep.slices.shape[-1]
    healed = prep.slices.clone()
    sign = torch.tensor([(-1.0) ** i for i in range(s)]).view(s, 1, 1)
    c = g // 2
    healed[:, 0, c - 6 : c - 2, c - 6 : c + 6] += 0.3 * sign  # error: alternating sign, every slice
    mid = s // 2
    healed[mid - 4 : mid + 4, 0, c + 2 : c + 6, c - 6 : c + 6] += 0.3  # lesion: same sign, 8 slices
    absolute = scan_map(healed, prep, 1, 4.0)
    signed = scan_map(healed, prep, 1, 4.0, signed=True)
    err_grid = torch.zeros_like(healed)
    err_grid[:, 0, c - 6 : c - 2, c - 6 : c + 6] = 1
    les_grid = torch.zeros_like(healed)
    les_grid[mid - 2 : mid + 2, 0, c + 2 : c + 6, c - 6 : c + 6] = 1  # the lesion's middle slices
    err = (grid_to_oriented(err_grid, prep) > 0.99) & prep.foreground
    les = (grid_to_oriented(les_grid, prep) > 0.99) & prep.foreground
    assert err.any() and les.any()
    assert absolute[err].mean() > 0.5 * absolute[les].mean(), "the absolute map keeps the alternating error"
    assert signed[err].mean() < 0.25 * signed[les].mean(), "the signed map cancels it and keeps the lesion"
    assert np.allclose(scan_map(healed, prep, 1, 0.0, signed=True), scan_map(healed, prep, 1, 0.0)), \
        "without smoothing the sign changes nothing"


def test_a_card_or_a_setting_with_impossible_tissue_classes_is_refused_in_one_sentence(tiny_model_file):
    from synomaly.card import MAX_TISSUE_BINS, ModelCard, ModelCardError
    from synomaly.detect import DetectionSettings, resolve_map

    card = read_card(tiny_model_file)
    data = card.to_dict()
    data["detection_3d"] = {**data["detection"], "tissue_bins": MAX_TISSUE_BINS + 1}
    with pytest.raises(ModelCardError, match=f"detection_3d.tissue_bins {MAX_TISSUE_BINS + 1} must lie between"):
        ModelCard.from_dict(data)
    data["detection_3d"]["tissue_bins"] = 8
    tuned = ModelCard.from_dict(data)
    assert resolve_map(DetectionSettings(), tuned, volume=True) == (False, 8)
    assert resolve_map(DetectionSettings(), tuned, volume=False) == (False, 0), "2D images keep the original map"
    from synomaly.errors import SettingsError

    with pytest.raises(SettingsError, match="tissue classes must lie between 0 \\(off\\) and 64, got -1"):
        resolve_map(DetectionSettings(tissue_bins=-1), tuned, volume=True)


def test_maps_per_noise_level_are_each_scaled_by_their_healthy_tail_and_averaged(tiny_model_file, caplog):
    """A setting with level_maps: run_stages keeps each level's healed slices (their mean is the ensemble's
    healed image); scan_map divides each level's map by its scale and averages; calibrate measures the scales
    on the healthy scans (their 99.9th percentile) and thresholds the averaged map; detect builds the same map
    from the card and refuses a card whose calibration has no scales for its levels."""
    from dataclasses import replace

    from synomaly.calibrate import LEVEL_SCALE_QUANTILE, calibrate
    from synomaly.card import DetectionDefaults
    from synomaly.detect import SCAN_LEVEL_QUANTILE, DetectionSettings, detect, resolve_settings, run_stages, scan_map
    from synomaly.metrics import threshold_at_fpr
    from synomaly.prepare import prepare_scan

    model = load_model(tiny_model_file, device="cpu")
    prep = prepare_scan(_head(seed=5), model.card)
    both = run_stages(model, prep.slices, prep.masks, t=(50, 300), kernel=3, threshold=float("inf"), max_stages=1,
                      keep_levels=True)
    plain = run_stages(model, prep.slices, prep.masks, t=(50, 300), kernel=3, threshold=float("inf"), max_stages=1)
    assert plain.levels is None and both.levels.shape == (2, *prep.slices.shape)
    assert torch.equal(both.healed, plain.healed), "keeping the levels changes nothing else"
    assert torch.allclose(both.levels.mean(0), both.healed, atol=1e-6)
    m50 = scan_map(both.levels[0], prep, 3, 2.0)
    m300 = scan_map(both.levels[1], prep, 3, 2.0)
    per_level = scan_map(both.healed, prep, 3, 2.0, levels=both.levels, scales=(0.5, 2.0))
    assert np.allclose(per_level, (m50 / 0.5 + m300 / 2.0) / 2, atol=1e-6)
    assert not np.allclose(per_level, scan_map(both.healed, prep, 3, 2.0) / 1.25, atol=1e-3)
    with pytest.raises(ValueError, match="one scale per level"):
        scan_map(both.healed, prep, 3, 2.0, levels=both.levels, scales=(1.0,))

    model.card.detection_3d = DetectionDefaults(t=50, t_ensemble=(50, 300), blur_kernel=3, max_stages=1,
                                                smooth_mm=2.0, fpr=1e-2, level_maps=True)
    with pytest.raises(ValueError, match="preps"):
        calibrate(model, prep.slices, prep.masks, fprs=(1e-2,), volume=True)
    cal = calibrate(model, prep.slices, prep.masks, fprs=(1e-2, 1e-3), volume=True, preps=[prep])
    fg = prep.foreground
    want = [float(np.quantile(m[fg].astype(np.float64), LEVEL_SCALE_QUANTILE)) for m in (m50, m300)]
    assert cal["level_maps"] is True and cal["level_scales"] == pytest.approx(want, rel=1e-4)
    combined = scan_map(both.healed, prep, 3, 2.0, levels=both.levels, scales=cal["level_scales"])
    assert cal["thresholds"]["0.01"] == pytest.approx(threshold_at_fpr(combined[fg], 1e-2), abs=1e-4)
    for m, sc in zip((m50, m300), cal["level_scales"]):  # each level, scaled, reaches 1 at its healthy tail
        assert np.quantile(m[fg] / sc, LEVEL_SCALE_QUANTILE) == pytest.approx(1.0, rel=1e-3)

    other = calibrate(model, prep.slices, prep.masks, fprs=(1e-2,), t=(50, 100, 200), volume=True, preps=[prep])
    assert other["t_ensemble"] == [50, 100, 200] and len(other["level_scales"]) == 3, "asked-for levels are measured"
    model.card.calibration_3d = cal
    assert "a map per level" in model.card.detection_text(True)
    result = detect(_head(seed=5), model, DetectionSettings(device="cpu"))
    assert result.report["level_maps"] is True and result.report["level_scales"] == cal["level_scales"]
    assert result.threshold == pytest.approx(cal["thresholds"]["0.01"])
    amap = sitk.GetArrayFromImage(result.anomaly_map)
    assert float(amap.max()) == pytest.approx(float(combined.max()), rel=1e-4), "detect builds the calibrated map"
    one = detect(_head(seed=5), model, DetectionSettings(device="cpu", t=50, threshold=0.5))
    assert one.report["level_maps"] is False, "an explicit t is one level: the plain map"
    healthy_cal = cal
    model.card.calibration_3d = {**cal, "level_scales": []}
    with pytest.raises(ModelError, match="no scales for those levels"):
        detect(_head(seed=5), model, DetectionSettings(device="cpu"))

    # scaled in each scan: each level by its own 90th percentile there, nothing to measure beforehand
    by_scan = scan_map(both.healed, prep, 3, 2.0, levels=both.levels, scan_quantile=SCAN_LEVEL_QUANTILE)
    want = (m50 / np.quantile(m50[fg], SCAN_LEVEL_QUANTILE) + m300 / np.quantile(m300[fg], SCAN_LEVEL_QUANTILE)) / 2
    assert np.allclose(by_scan, want, rtol=1e-4, atol=1e-6)
    model.card.detection_3d = replace(model.card.detection_3d, level_scaling="scan")
    cal = calibrate(model, prep.slices, prep.masks, fprs=(1e-2,), volume=True, preps=[prep])
    assert cal["level_scaling"] == "scan" and "level_scales" not in cal
    assert cal["thresholds"]["0.01"] == pytest.approx(threshold_at_fpr(by_scan[fg], 1e-2), abs=1e-4)
    model.card.calibration_3d = healthy_cal  # thresholds measured with the other scaling: said, not silent
    with caplog.at_level("WARNING", logger="synomaly.detect"):
        resolve_settings(DetectionSettings(), model.card, volume=True)
    assert "calibrated on a map per noise level, averaged but a map per noise level, scaled in each scan" in caplog.text
    model.card.calibration_3d = cal
    caplog.clear()
    with caplog.at_level("WARNING", logger="synomaly.detect"):
        resolve_settings(DetectionSettings(), model.card, volume=True)
    assert "per noise level" not in caplog.text, "the same scaling: no warning"
    assert "scaled in each scan" in model.card.detection_text(True)
    result = detect(_head(seed=5), model, DetectionSettings(device="cpu"))
    assert result.report["level_scan_quantile"] == SCAN_LEVEL_QUANTILE and result.report["level_scales"] is None
    assert float(sitk.GetArrayFromImage(result.anomaly_map).max()) == pytest.approx(float(by_scan.max()), rel=1e-4)
    from synomaly.card import ModelCard, ModelCardError

    bad = model.card.to_json().replace('"level_scaling": "scan"', '"level_scaling": "atlas"')
    with pytest.raises(ModelCardError, match="level_scaling 'atlas'"):
        ModelCard.from_json(bad)


def test_tuning_tries_maps_per_noise_level_when_asked_and_the_card_keeps_the_choice(tiny_model_file, tmp_path):
    vol = tmp_path / "healthy.nii.gz"
    sitk.WriteImage(_head(seed=4), str(vol))
    out = tmp_path / "tuned.safetensors"
    grid = tune.TuneGrid(ts=(50,), blurs=(3,), ensembles=((50, 200),), max_stages=1, multi_top=0, more_draws=1,
                         smooths=(2.0,), smooth_top=4, level_maps=("healthy", "scan"))
    opts = tune.TuneOptions(forms=("native",), lesions_per_volume=2, grid=grid, seed=1)
    tune.tune_model(tiny_model_file, [str(vol)], output=out, options=opts, device="cpu")
    card = read_card(out)
    table = card.tuning["table"]
    # t 50 (one level: no per-level row), 50+200 plain and per level both ways; the four again smoothed 2 mm
    assert sorted((r["t"], r["levels"], r["smooth"]) for r in table) == sorted(
        [("50", "", s) for s in (0.0, 2.0)] + [("50+200", lv, s) for lv in ("", "healthy", "scan") for s in (0.0, 2.0)])
    chosen = card.tuning["chosen"]
    d3 = card.detection_3d
    assert d3.level_maps == bool(chosen["levels"])
    assert d3.level_scaling == (chosen["levels"] or "healthy")
    assert bool(card.calibration_3d.get("level_maps", False)) == bool(chosen["levels"])
    if chosen["levels"] == "healthy":
        assert len(card.calibration_3d["level_scales"]) == 2
    # the operating points of a setting scaled in each scan: calibrated without scales, thresholds of that map
    model = load_model(tiny_model_file, device="cpu")
    lesion_cases, healthy_cases = tune.build_cases(tune.load_tune_volumes([str(vol)]), model.card, opts)
    setting = {"t": "50+200", "blur": 3, "stages": 1, "draws": 1, "smooth": 2.0, "levels": "scan"}
    cal, points = tune.operating_points(model, lesion_cases, healthy_cases, setting, opts)
    assert cal["level_maps"] is True and cal["level_scaling"] == "scan" and "level_scales" not in cal
    assert len(points) == 10 * 2 and all(0 <= p["dice_mean"] <= 1 for p in points)  # each also cut at half peak
    # the sweep's scales for a per-level row are measured away from the implanted lesions
    lesion_cases, _ = tune.build_cases(tune.load_tune_volumes([str(vol)]), read_card(tiny_model_file), opts)
    away = tune._away_from_lesions(lesion_cases[0])
    assert not (away & lesion_cases[0].truth).any() and away.sum() < lesion_cases[0].prep.foreground.sum()


def test_choosing_by_dice_takes_the_best_segmentation_within_the_healthy_limit():
    rows = [{"t": "10", "blur": 5, "stages": 1, "draws": 1, "auprc": 0.40, "cost": 1.0},
            {"t": "10+25+50", "blur": 5, "stages": 1, "draws": 1, "auprc": 0.38, "cost": 3.0},
            {"t": "25", "blur": 3, "stages": 1, "draws": 1, "auprc": 0.38, "cost": 1.0},
            {"t": "400", "blur": 9, "stages": 1, "draws": 1, "auprc": math.nan, "cost": 1.0}]
    assert [r["t"] for r in tune.dice_candidates(rows, 3)] == ["10", "25", "10+25+50"], "AUPRC, then cheaper"
    assert [r["t"] for r in tune.dice_candidates(rows, 9)] == ["10", "25", "10+25+50"], "no NaN row"
    trials = [{"row": rows[0], "point": {"dice_mean": 0.30, "healthy_ml_max": 2.5}},
              {"row": rows[1], "point": {"dice_mean": 0.20, "healthy_ml_max": 0.4}},
              {"row": rows[2], "point": {"dice_mean": 0.10, "healthy_ml_max": 0.0}}]
    assert tune.choose_by_dice(trials, 1.0)["row"]["t"] == "10+25+50", "the best Dice that stays clean"
    assert tune.choose_by_dice(trials, 3.0)["row"]["t"] == "10"
    assert tune.choose_by_dice(trials, 0.1)["row"]["t"] == "25"
    assert tune.choose_by_dice(trials[:2], 0.1)["row"]["t"] == "10+25+50", "none qualifies: the one that flags least"
    tied = [dict(trials[1], point={"dice_mean": 0.10, "healthy_ml_max": 0.0}), trials[2]]
    assert tune.choose_by_dice(tied, 1.0)["row"]["t"] == "25", "equal Dice: the cheaper"


def test_tuning_by_dice_calibrates_each_candidate_and_keeps_the_winners_operating_point(tiny_model_file, tmp_path,
                                                                                       capsys):
    from synomaly.cli import main
    from synomaly.errors import InputError

    vol = tmp_path / "healthy.nii.gz"
    sitk.WriteImage(_head(seed=4), str(vol))
    out = tmp_path / "tuned.safetensors"
    assert main(["tune", str(tiny_model_file), "--data", str(vol), "--forms", "native", "--lesions", "2",
                 "--t", "50", "200", "--blur", "3", "--ensembles", "--single-stage", "--smooth",
                 "--choose-by", "dice", "--dice-top", "2", "-o", str(out), "--progress", "none"]) == 0
    printed = capsys.readouterr().out
    card = read_card(out)
    rec = card.tuning
    assert len(rec["candidates"]) == 2 and rec["chosen_by"].startswith("dice")
    assert printed.count("  candidate t ") == 2
    assert {c["row"]["t"] for c in rec["candidates"]} == {"50", "200"}
    ok = [c for c in rec["candidates"] if c["healthy_ml_max"] <= rec["max_healthy_ml"]]
    win = max(ok, key=lambda c: c["dice_mean"]) if ok else min(rec["candidates"], key=lambda c: c["healthy_ml_max"])
    assert rec["chosen"] == win["row"] and rec["chosen_fpr"] == win["fpr"]
    assert card.detection_3d.t == int(win["row"]["t"]) and f"{card.detection_3d.fpr:g}" == win["fpr"]
    assert card.calibration_3d["t"] == int(win["row"]["t"]), "the thresholds are the winner's calibration"
    with pytest.raises(InputError, match="'auprc' or 'dice'"):
        tune.tune_model(tiny_model_file, [str(vol)], output=out, device="cpu",
                        options=tune.TuneOptions(choose_by="dice", dice_top=0))


def test_candidates_sharing_the_networks_work_run_it_once_with_the_same_results(tiny_model_file, tmp_path,
                                                                             monkeypatch):
    import synomaly.detect as detect_module
    from synomaly.calibrate import calibration_maps

    vol = tmp_path / "healthy.nii.gz"
    sitk.WriteImage(_head(seed=4), str(vol))
    model = load_model(tiny_model_file, device="cpu")
    opts = tune.TuneOptions(forms=("native",), lesions_per_volume=2, seed=1)
    lesion_cases, healthy_cases = tune.build_cases(tune.load_tune_volumes([str(vol)]), model.card, opts)
    base = {"t": "50+200", "blur": 3, "stages": 1, "draws": 1, "smooth": 0.0}
    smoothed = dict(base, smooth=2.0)
    multi = dict(base, stages=3)
    assert tune.network_key(base) == tune.network_key(smoothed) != tune.network_key(multi)
    assert tune.network_key(dict(base, levels="healthy")) == tune.network_key(dict(base, levels="scan"))
    assert tune.network_key(dict(base, t="50", levels="healthy")) == tune.network_key(dict(base, t="50"))
    fresh = [tune.operating_points(model, lesion_cases, healthy_cases, s, opts) for s in (base, smoothed)]

    calls = []
    real = detect_module.run_stages
    monkeypatch.setattr(detect_module, "run_stages", lambda *a, **k: calls.append(k["max_stages"]) or real(*a, **k))
    runs: dict = {}
    shared = [tune.operating_points(model, lesion_cases, healthy_cases, s, opts, runs=runs) for s in (base, smoothed)]
    # one stage: one healthy run (its fusion threshold changes nothing of it) and one lesion run, for both settings
    assert calls == [1, 1] and list(runs) == [tune.network_key(base)]
    for (cal_a, pts_a), (cal_b, pts_b) in zip(fresh, shared):
        assert cal_a == cal_b and pts_a == pts_b
    assert shared[0][0]["thresholds"] != shared[1][0]["thresholds"], "the smoothed map has its own thresholds"

    # the single-stage shortcut of the calibration gives what the second run with the fusion threshold gave
    hx = torch.cat([c.prep.slices for c in healthy_cases])
    hm = torch.cat([c.prep.masks for c in healthy_cases])
    calls.clear()
    fusion, res = calibration_maps(model, hx, hm, ts=(50, 200), kernel=3, max_stages=1, keep_levels=True)
    assert calls == [1] and res.levels is not None and res.levels.shape[0] == 2
    again = real(model, hx, hm, t=(50, 200), kernel=3, threshold=fusion, max_stages=1, keep_levels=True)
    for a, b in ((res.healed, again.healed), (res.score, again.score), (res.levels, again.levels),
                 (res.stages, again.stages), (res.first_score, again.first_score)):
        assert torch.equal(a, b)
    assert res.calls == again.calls
    calls.clear()
    calibration_maps(model, hx, hm, ts=(50,), kernel=3, max_stages=2)
    assert calls == [1, 2], "more stages: the fusion threshold steers the later stages, so two runs"


def test_an_operating_point_in_words():
    assert tune.point_words({"fpr": "1e-05"}) == "FPR 1e-05"
    p = {"fpr": "1e-05", "threshold": 0.123456, "grow_fpr": "0.0001", "grow_threshold": 0.1, "peak_fraction": 0.5}
    assert tune.point_words(p) == "FPR 1e-05 grown to FPR 0.0001, each lesion outlined at 0.5 of its peak"
    assert tune.point_words(p, thresholds=True) == ("FPR 1e-05 (0.1235) grown to FPR 0.0001 (0.1000), "
                                                    "each lesion outlined at 0.5 of its peak")
    assert tune.point_words({"fpr": "0.001", "grow_fpr": None, "peak_fraction": None}, thresholds=True) == "FPR 0.001"
