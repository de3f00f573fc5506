"""Two models' volume maps averaged (card.partner_3d, detect.resolve_pairing, synomaly.pairing, `synomaly pair`)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_phantom


def _head(seed: int = 0, shape=(12, 48, 48)) -> sitk.Image:
    img = sitk.GetImageFromArray(make_phantom(shape, seed=seed))
    img.SetSpacing((2.0, 2.0, 3.0))
    return img


def _tiny(path: Path, name: str, grid: int, seed: int, t: int = 50):
    """A random-weight model with a one-stage volume setting over the foreground, written to `path`."""
    import torch

    from synomaly.card import DetectionDefaults
    from synomaly.modelio import build_network, save_model
    from synomaly.train import new_card

    torch.manual_seed(seed)
    card = new_card(name, grid=grid, channels=(32, 32))
    card.detection_3d = DetectionDefaults(t=t, blur_kernel=3, max_stages=1, smooth_mm=2.0, fpr=1e-2,
                                          region="foreground")
    card.calibration_3d = {"thresholds": {"0.01": 0.3, "0.001": 0.4}}
    save_model(path, card, build_network(card).state_dict())
    return path


@pytest.fixture()
def pair_files(tmp_path):
    """A first model (grid 32) and its partner (grid 64) in one folder, the first's card naming the partner."""
    from synomaly.card import PartnerModel
    from synomaly.modelio import file_sha256, load_model, read_card, save_model

    folder = tmp_path / "models"
    folder.mkdir()
    first = _tiny(folder / "first.safetensors", "first", 32, 0)
    partner = _tiny(folder / "second.safetensors", "second", 64, 1, t=100)
    card = read_card(first)
    card.partner_3d = PartnerModel(file="second.safetensors", sha256=file_sha256(partner), fpr=1e-2,
                                   thresholds={"0.01": 1.5, "0.001": 2.0})
    model = load_model(first, device="cpu")
    save_model(first, card, model.network.state_dict())
    return first, partner


def _input_region(image, card) -> np.ndarray:
    from synomaly.prepare import prepare_scan, unorient_array

    prep = prepare_scan(image, card, region="foreground")
    return unorient_array(prep.foreground, prep.geometry.transpose, prep.geometry.flips)


def test_card_partner_round_trips_and_refuses_impossible_values(pair_files):
    from synomaly.card import ModelCard, ModelCardError
    from synomaly.modelio import read_card

    card = read_card(pair_files[0])
    again = ModelCard.from_json(card.to_json())
    assert again.partner_3d == card.partner_3d and again.partner_3d.thresholds == {"0.01": 1.5, "0.001": 2.0}
    assert "paired with second.safetensors" in card.summary()
    data = json.loads(card.to_json())
    for change, message in ((dict(file="../x.safetensors"), "plain file name"), (dict(sha256="abc"), "sha256"),
                            (dict(thresholds={}), "no calibrated thresholds"), (dict(fpr=2.0), "fpr"),
                            (dict(grow_fpr=1e-3), "looser rate than fpr"), (dict(peak_fraction=1.0), "peak_fraction"),
                            (dict(fpr=1e-4), "no calibrated threshold at FPR 0.0001 \\(it has 0.001, 0.01\\)"),
                            (dict(fpr=1e-3, grow_fpr=0.1), "no calibrated threshold at FPR 0.1 ")):
        bad = dict(data, partner_3d={**data["partner_3d"], **change})
        with pytest.raises(ModelCardError, match=message):
            ModelCard.from_dict(bad)
    with pytest.raises(ModelCardError, match="needs a tuned volume setting"):
        ModelCard.from_dict(dict(data, detection_3d=None))
    with pytest.raises(ModelCardError, match="unknown keys"):
        ModelCard.from_dict(dict(data, partner_3d={**data["partner_3d"], "weight": 0.5}))
    assert card.at_grid(64).partner_3d is None, "a new grid's map is not the one the pair was calibrated with"


def _paired_alone_partner(pair_files):
    """A head detected by the pair, by its first model alone and by the partner alone; and the scored region."""
    from synomaly.detect import DetectionSettings, detect
    from synomaly.modelio import load_model

    first, second = (load_model(p, device="cpu") for p in pair_files)
    image = _head(seed=3)
    results = [detect(image, first, DetectionSettings(device="cpu")),
               detect(image, first, DetectionSettings(device="cpu", single_model=True)),
               detect(image, second, DetectionSettings(device="cpu"))]
    return image, *results, _input_region(image, first.card)


def test_paired_detection_averages_the_two_scan_scaled_maps_at_the_pairs_threshold(pair_files):
    from synomaly.detect import DetectionSettings, detect, postprocess
    from synomaly.modelio import load_model

    image, paired, alone, partner, region = _paired_alone_partner(pair_files)
    a, b = (sitk.GetArrayFromImage(r.anomaly_map) for r in (alone, partner))
    qa, qb = (np.quantile(m[region], 0.9) for m in (a, b))
    want = (a / qa + b / qb) / 2
    got = sitk.GetArrayFromImage(paired.anomaly_map)
    assert np.allclose(got, want, rtol=1e-4, atol=1e-6), "each map divided by its own 0.9 quantile, averaged"
    assert paired.threshold == 1.5 and paired.report["threshold_source"] == "calibrated FPR 0.01 (paired map)"
    assert paired.report["partner"]["scales"] == pytest.approx([qa, qb], rel=1e-4)
    assert "paired with second.safetensors" in paired.report["setting"]
    assert paired.report["partner"]["map"] == "grid 64, t 100, blur 3, smoothed 2 mm across slices, 1 stage"
    assert paired.report["network_calls"] == alone.report["network_calls"] + partner.report["network_calls"]
    want_seg, _ = postprocess(want, 1.5, image.GetSpacing(), 50.0)
    assert np.array_equal(sitk.GetArrayFromImage(paired.segmentation) > 0, want_seg)
    cf = sitk.GetArrayFromImage(paired.counterfactual)
    assert np.array_equal(cf, sitk.GetArrayFromImage(alone.counterfactual)), "the first model's counterfactual"
    assert alone.report["partner"] is None and alone.threshold == 0.3, "alone: the model's own calibration"
    strict = detect(image, load_model(pair_files[0], device="cpu"), DetectionSettings(device="cpu", fpr=1e-3))
    assert strict.threshold == 2.0, "another rate: the pair's threshold at it"


def test_a_geometric_pair_combines_the_scaled_maps_by_their_geometric_mean(pair_files):
    from synomaly.card import PAIR_COMBINES
    from synomaly.detect import COMBINE_SCALED, geometric_of_scaled
    from synomaly.modelio import load_model, read_card, save_model

    assert list(COMBINE_SCALED) == list(PAIR_COMBINES), "every rule the card accepts has its function in detection"

    a = np.array([0.0, 1.0, 4.0, 2.0], np.float32)
    b = np.array([9.0, 1.0, 1.0, 8.0], np.float32)
    assert np.allclose(geometric_of_scaled([a, b], [1.0, 2.0]), np.sqrt(a * b / 2)), "high only where both are"
    first_path = pair_files[0]
    card = read_card(first_path)
    card.partner_3d = replace(card.partner_3d, combine="geometric")
    save_model(first_path, card, load_model(first_path, device="cpu").network.state_dict())
    assert "combined by their geometric mean" in read_card(first_path).summary()
    _, paired, alone, partner, region = _paired_alone_partner(pair_files)
    x, y = (sitk.GetArrayFromImage(r.anomaly_map) for r in (alone, partner))
    want = np.sqrt((x / np.quantile(x[region], 0.9)) * (y / np.quantile(y[region], 0.9)))
    got = sitk.GetArrayFromImage(paired.anomaly_map)
    assert np.allclose(got, want, rtol=1e-4, atol=1e-6) and paired.report["partner"]["combine"] == "geometric"
    data = json.loads(card.to_json())
    from synomaly.card import ModelCard, ModelCardError

    with pytest.raises(ModelCardError, match="combine 'median' is not one of"):
        ModelCard.from_dict(dict(data, partner_3d={**data["partner_3d"], "combine": "median"}))


def test_the_pairs_growth_and_outline_apply_unless_asked_otherwise(pair_files):
    from synomaly.detect import DetectionSettings, detect, postprocess
    from synomaly.modelio import load_model, read_card, save_model

    first_path = pair_files[0]
    card = read_card(first_path)
    card.partner_3d = replace(card.partner_3d, fpr=1e-3, grow_fpr=1e-2, peak_fraction=0.5)
    save_model(first_path, card, load_model(first_path, device="cpu").network.state_dict())
    assert "FPR 0.001 grown to FPR 0.01, each lesion outlined at 0.5 of its peak" in card.summary()
    first = load_model(first_path, device="cpu")
    image = _head(seed=3)
    r = detect(image, first, DetectionSettings(device="cpu"))
    assert (r.threshold, r.report["grow_threshold"], r.report["peak_fraction"]) == (2.0, 1.5, 0.5)
    score = sitk.GetArrayFromImage(r.anomaly_map)
    want, _ = postprocess(score, 2.0, image.GetSpacing(), 50.0, 1.5, 0.5)
    assert np.array_equal(sitk.GetArrayFromImage(r.segmentation) > 0, want)
    plain = detect(image, first, DetectionSettings(device="cpu", grow_fpr=0, peak_fraction=0))
    assert (plain.report["grow_threshold"], plain.report["peak_fraction"]) == (None, None), "turned off when asked"
    explicit = detect(image, first, DetectionSettings(device="cpu", threshold=1.8))
    assert explicit.report["grow_threshold"] is None, "an explicit threshold means exactly that threshold"
    assert np.array_equal(sitk.GetArrayFromImage(plain.anomaly_map), score), "the map itself does not change"


def test_a_changed_map_setting_uses_the_model_alone_and_says_so(pair_files):
    from synomaly.detect import DetectionSettings, detect
    from synomaly.errors import ModelError
    from synomaly.modelio import load_model

    first = load_model(pair_files[0], device="cpu")
    r = detect(_head(), first, DetectionSettings(device="cpu", t=20, threshold=0.5))
    assert r.report["partner"] is None and any("--t change this model's map" in w for w in r.report["warnings"])
    same = detect(_head(), first, DetectionSettings(device="cpu", max_stages=1, blur_kernel=3, region="foreground"))
    assert same.report["partner"] is not None, "a setting asked at the card's own value changes nothing"
    with pytest.raises(ModelError, match="paired map .* no threshold calibrated for FPR 0.0001"):
        detect(_head(), first, DetectionSettings(device="cpu", fpr=1e-4))
    slice2d = sitk.GetImageFromArray(make_phantom((48, 48)))
    assert detect(slice2d, first, DetectionSettings(device="cpu")).report["partner"] is None, "volumes only"


def test_a_missing_or_changed_partner_file_is_refused_with_the_way_out(pair_files):
    from synomaly.detect import DetectionSettings, detect
    from synomaly.modelio import ModelFileError, load_model

    first_path, partner_path = pair_files
    data = partner_path.read_bytes()
    partner_path.write_bytes(data[:-4] + b"\0\0\0\0")
    with pytest.raises(ModelFileError, match="is not the partner model .*--single-model"):
        detect(_head(), load_model(first_path, device="cpu"), DetectionSettings(device="cpu"))
    partner_path.unlink()
    with pytest.raises(ModelFileError, match="second.safetensors, which is not in .*--single-model"):
        detect(_head(), load_model(first_path, device="cpu"), DetectionSettings(device="cpu"))
    r = detect(_head(), load_model(first_path, device="cpu"), DetectionSettings(device="cpu", single_model=True))
    assert r.report["partner"] is None


def test_the_partner_travels_with_installs_and_fine_tunes_and_tuning_unpair(pair_files, tmp_path, monkeypatch):
    from synomaly.modelio import install_model, read_card

    monkeypatch.setenv("SYNOMALY_MODELS_DIR", str(tmp_path / "user"))
    from synomaly import modelio

    monkeypatch.setattr(modelio, "user_models_dir", lambda: tmp_path / "user")
    dest = install_model(pair_files[0], name="site")
    assert (dest.parent / "second.safetensors").read_bytes() == pair_files[1].read_bytes()
    assert read_card(dest).partner_3d is not None
    with pytest.raises(modelio.ModelFileError, match="is its partner's file name"):
        install_model(pair_files[0], name="second")
    pair_files[1].unlink()
    with pytest.raises(modelio.ModelFileError, match="missing or changed"):
        install_model(pair_files[0], name="other")


def test_calibrating_a_paired_volume_setting_points_to_synomaly_pair(pair_files, tmp_path):
    from synomaly.calibrate import calibrate_model
    from synomaly.errors import InputError

    scan = tmp_path / "healthy.nii.gz"
    sitk.WriteImage(_head(seed=7), str(scan))
    with pytest.raises(InputError, match="synomaly pair MODEL second.safetensors --data VOLUMES"):
        calibrate_model(pair_files[0], [str(scan)], fprs=(1e-2,), device="cpu")


def _case(fg, truth=None, spacing=(1.0, 1.0, 1.0), oriented=None):
    oriented = np.zeros(fg.shape, np.float32) if oriented is None else oriented
    return SimpleNamespace(prep=SimpleNamespace(foreground=fg, oriented=oriented), truth=truth, spacing=spacing)


def test_operating_points_and_the_pick_rule():
    from synomaly.pairing import operating_points
    from synomaly.tune import choose_fpr

    rng = np.random.default_rng(0)
    fg = np.ones((20, 20, 20), bool)
    truth = np.zeros_like(fg)
    truth[5:11, 5:11, 5:11] = True  # 216 voxels of 1 mm: above the 50 mm^3 minimum
    lesion_map = rng.random(fg.shape).astype(np.float32) * 0.5
    lesion_map[truth] += 1.0
    healthy_map = rng.random(fg.shape).astype(np.float32) * 0.5
    scan = rng.random(fg.shape).astype(np.float32)
    pts = operating_points([lesion_map, healthy_map], [_case(fg, truth, oriented=scan + truth)],
                           [_case(fg, oriented=scan)], fprs=(1e-2, 1e-4))
    assert [p["fpr"] for p in pts] == ["0.01", "0.0001"], "rates keyed as the card stores them"
    k = int(1e-4 * fg.sum())  # the project's rule (metrics.threshold_at_fpr): at most k healthy voxels reach it
    assert pts[1]["threshold"] == np.nextafter(np.sort(healthy_map[fg])[-1 - k], np.float32(np.inf))
    assert int((healthy_map[fg] >= pts[0]["threshold"]).sum()) <= 1e-2 * fg.sum()
    assert pts[1]["dice_mean"] == pytest.approx(1.0) and pts[1]["healthy_ml_max"] == 0.0
    assert pts[1]["lesions_found"]["brighter"] == {"found": 1, "of": 1}, "tune's lesion count: the pair gets it too"
    assert pts[1]["lesions_found"]["darker"] == {"found": 0, "of": 0}

    def point(fpr, dice, ml, **kw):
        return {"fpr": fpr, "threshold": 0.0, "grow_fpr": None, "peak_fraction": None, "dice_mean": dice,
                "healthy_ml_max": ml, **kw}

    loose, mid, strict = point("0.01", 0.6, 3.0), point("0.001", 0.5, 0.15), point("0.0001", 0.3, 0.0)
    assert choose_fpr([loose, mid, strict], 0.2) is mid, "the best Dice within the bound"
    assert choose_fpr([loose, mid, strict], 5.0) is loose
    assert choose_fpr([loose, point("0.001", 0.5, 1.0), point("0.0001", 0.3, 0.5)], 0.2)["fpr"] == "0.0001", \
        "none within the bound: the point that flags least"
    grown = point("0.0001", 0.55, 0.1, grow_fpr="0.01")
    assert choose_fpr([loose, mid, strict, grown], 0.2) is grown, "growth competes by the same rule"
    assert choose_fpr([loose, mid, point("0.0001", 0.5, 0.1)], 0.2)["fpr"] == "0.0001", "equal Dice: the stricter rate"


def test_outlined_operating_points_grow_into_looser_rates_and_outline_at_half_the_peak():
    from synomaly.detect import postprocess
    from synomaly.metrics import dice
    from synomaly.pairing import operating_points

    rng = np.random.default_rng(1)
    fg = np.ones((24, 24, 24), bool)
    truth = np.zeros_like(fg)
    truth[6:14, 6:14, 6:14] = True
    lesion_map = rng.exponential(0.1, fg.shape).astype(np.float32)  # a healthy map's long tail
    lesion_map[6:14, 6:14, 6:14] += np.linspace(0.5, 1.5, 8, dtype=np.float32)  # a lesion fading towards one side
    healthy_map = rng.exponential(0.1, fg.shape).astype(np.float32)
    fprs = (1e-2, 1e-3, 1e-4)
    cases = [_case(fg, truth)], [_case(fg)]
    plain = operating_points([lesion_map, healthy_map], *cases, fprs=fprs)
    full = operating_points([lesion_map, healthy_map], *cases, fprs=fprs, outlines=True)
    assert len(plain) == 3 and len(full) == 2 * (3 + 2 + 1), "each rate x (alone + each looser rate) x (plain, 0.5)"
    assert [(p["fpr"], p["dice_mean"]) for p in plain] == \
        [(p["fpr"], p["dice_mean"]) for p in full if p["grow_fpr"] is None and p["peak_fraction"] is None]
    p = next(p for p in full if p["fpr"] == "0.0001" and p["grow_fpr"] == "0.01" and p["peak_fraction"] is None)
    assert p["grow_threshold"] == next(q["threshold"] for q in plain if q["fpr"] == "0.01") < p["threshold"]
    want = dice(postprocess(lesion_map, p["threshold"], (1.0, 1.0, 1.0), 50.0, p["grow_threshold"])[0], truth)
    assert p["dice_mean"] == pytest.approx(want, abs=1e-4)
    strict = next(q for q in plain if q["fpr"] == "0.0001")
    assert p["dice_mean"] > strict["dice_mean"], "growing a strict seed into the looser rate recovers the faint edge"


def test_synomaly_pair_writes_the_calibrated_pair_and_copies_the_partner(tmp_path, synomaly_run):
    from synomaly.modelio import file_sha256, load_model, read_card
    from synomaly.detect import DetectionSettings, detect

    src = tmp_path / "src"
    src.mkdir()
    first = _tiny(src / "first.safetensors", "first", 32, 0)
    partner = _tiny(src / "second.safetensors", "second", 64, 1, t=100)
    vol = tmp_path / "healthy-volume.nii.gz"
    sitk.WriteImage(_head(seed=11, shape=(40, 64, 64)), str(vol))
    out = tmp_path / "out" / "paired.safetensors"
    r = synomaly_run(["pair", first, partner, "--data", vol, "-o", out, "--max-healthy-ml", "1000",
                      "--fprs", "0.01", "0.001", "--device", "cpu", "--progress", "none"], timeout=600)
    assert r.returncode == 0, r.stderr
    assert "paired " in r.stdout and "<- picked" in r.stdout and "pooled pixel AUPRC" in r.stdout
    assert "lesions found" in r.stdout, "each point with the lesions it finds, as `synomaly tune` prints it"
    card = read_card(out)
    copied = out.parent / "second.safetensors"
    assert copied.read_bytes() == partner.read_bytes() and card.partner_3d.sha256 == file_sha256(copied)
    assert set(card.partner_3d.thresholds) == {"0.01", "0.001"}
    assert card.partner_3d.thresholds["0.001"] > card.partner_3d.thresholds["0.01"]
    rows = card.partner_3d.calibration["sweep"]
    assert sorted({row["fpr"] for row in rows}) == ["0.001", "0.01"] and card.partner_3d.calibration["lesion_cases"] >= 1
    assert {(r["grow_fpr"], r["peak_fraction"]) for r in rows} == {(None, None), (None, 0.5), ("0.01", None), ("0.01", 0.5)}, \
        "tune's outlines: each rate alone, grown into the looser one, each also outlined at half its peak"
    best = max(r["dice_mean"] for r in rows)
    assert card.partner_3d.calibration["picked"]["dice_mean"] == best, "a bound nothing exceeds: the best Dice"
    picked = card.partner_3d.calibration["picked"]
    assert (card.partner_3d.fpr, card.partner_3d.grow_fpr, card.partner_3d.peak_fraction) == \
        (float(picked["fpr"]), picked["grow_fpr"] and float(picked["grow_fpr"]), picked["peak_fraction"])
    assert all("per_case" not in k for k in picked) and "lesions_found" in picked
    assert "<- picked" in r.stdout and r.stdout.count("<- picked") == 1
    result = detect(_head(seed=2), load_model(out, device="cpu"), DetectionSettings(device="cpu"))
    assert result.report["partner"]["file"] == "second.safetensors"
    assert result.threshold == card.partner_3d.thresholds[f"{card.partner_3d.fpr:g}"]
    assert card.partner_3d.combine == "mean" and "(averaged)" in r.stdout
    geo = synomaly_run(["pair", first, partner, "--data", vol, "-o", tmp_path / "geo" / "paired.safetensors",
                        "--max-healthy-ml", "1000", "--fprs", "0.01", "--plain", "--combine", "geometric",
                        "--device", "cpu", "--progress", "none"], timeout=600)
    assert geo.returncode == 0, geo.stderr
    geo_card = read_card(tmp_path / "geo" / "paired.safetensors")
    assert geo_card.partner_3d.combine == "geometric" and geo_card.partner_3d.calibration["combine"] == "geometric"
    assert geo_card.partner_3d.thresholds["0.01"] != card.partner_3d.thresholds["0.01"], "calibrated on its own map"
    bad = synomaly_run(["pair", first, partner, "--data", vol, "-o", tmp_path / "x.safetensors",
                        "--max-healthy-ml", "0", "--device", "cpu", "--progress", "none"])
    assert bad.returncode != 0 and "must be positive" in bad.stderr
    same = synomaly_run(["pair", first, partner, "--data", vol, "-o", tmp_path / "second.safetensors", "--device", "cpu",
                         "--progress", "none"])
    assert same.returncode != 0 and "would both be named second.safetensors" in same.stderr


def test_a_partner_file_is_part_of_its_model_not_a_model_of_its_own_in_the_list(pair_files, monkeypatch):
    from synomaly import modelio

    monkeypatch.setattr(modelio, "user_models_dir", lambda: pair_files[0].parent)
    names = [m["name"] for m in modelio.list_models() if m["source"] == "user"]
    assert names == ["first"], names
    assert modelio.load_model(pair_files[1], device="cpu").card.name == "second", "still loadable by its path"


def test_removing_a_paired_model_removes_its_partner_unless_another_model_pairs_with_it(pair_files):
    import shutil

    from synomaly.modelio import ModelFileError, remove_model

    first, partner = pair_files
    folder = first.parent
    with pytest.raises(ModelFileError, match="is the partner model of first.safetensors .* remove that model"):
        remove_model("second", folder)
    assert partner.is_file(), "a refused removal removes nothing"
    shutil.copy(first, folder / "copy.safetensors")  # a second model paired with the same partner
    assert remove_model("first", folder) == [first] and partner.is_file(), "still the copy's partner"
    assert remove_model("copy", folder) == [folder / "copy.safetensors", partner]
    assert sorted(p.name for p in folder.iterdir()) == []


def test_a_network_out_of_gpu_memory_continues_on_the_cpu_with_a_warning():
    import torch

    from synomaly.detect import with_cpu_fallback

    class Fake:
        def __init__(self, device):
            self.device = torch.device(device)

        def to(self, device):
            return Fake(device)

    def run(m, on_cpu):
        if m.device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return ("ran", on_cpu)

    warnings, seen = [], []
    used, out = with_cpu_fallback(Fake("cuda"), run, " for the partner model", warnings,
                                  lambda *a: seen.append(a))
    assert used.device.type == "cpu" and out == ("ran", True)
    assert warnings == ["GPU out of memory for the partner model even with one slice per batch; continuing on the "
                        "CPU (slower)"] and seen
    with pytest.raises(torch.cuda.OutOfMemoryError):  # already on the CPU: nothing to fall back to
        with_cpu_fallback(Fake("cpu"), lambda m, c: run(Fake("cuda"), c), "", [], lambda *a: None)
