"""`synomaly evaluate`: report files and tables, thresholds never from test data, intervals, the Br35H split
that never reads reserved images, deterministic implanted lesions.

Tiny random-weight models (32 x 32 grid) and tiny datasets: these tests check plumbing and rules, not
detection quality.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from synomaly import evalruns, evalstats
from synomaly.cli.evaluation import add_evaluate_parser
from synomaly.errors import InputError


def _tiny_model(path: Path, kind: str, seed: int) -> Path:
    """A random-weight model whose output is not zero (MONAI zero-initialises the last convolution)."""
    import torch

    from synomaly.modelio import build_network, save_model
    from synomaly.train import new_card

    torch.manual_seed(seed)
    card = new_card(f"tiny-{kind}", grid=32, channels=(32, 32), noise_kind=kind)
    net = build_network(card)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(path, card, net.state_dict())
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-models")
    return {kind: _tiny_model(root / f"tiny-{kind}.safetensors", kind, seed)
            for seed, kind in enumerate(("synomaly", "gaussian", "coarse"))}


def _phantom_2d(rng: np.random.Generator, blob: np.ndarray | None) -> np.ndarray:
    yy, xx = np.mgrid[:48, :48]
    body = ((yy - 24) ** 2 / 18**2 + (xx - 24) ** 2 / 15**2) < 1
    img = np.where(body, 100.0 + rng.normal(0, 5, body.shape), 0.0)
    if blob is not None:
        img = img + 60.0 * blob
    return img.astype(np.float32)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A prepared dataset (datasets.prepare_folder) of 2D phantoms: 8 healthy, 8 with a bright disc and a mask."""
    from synomaly import datasets

    root = tmp_path_factory.mktemp("eval-data")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    for d in ("healthy", "anomalous", "masks"):
        (root / d).mkdir()
    for i in range(8):
        sitk.WriteImage(sitk.GetImageFromArray(_phantom_2d(rng, None)), str(root / "healthy" / f"h{i:02d}.nrrd"))
        cy, cx, r = 24 + rng.integers(-6, 7), 24 + rng.integers(-5, 6), rng.integers(3, 7)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
        sitk.WriteImage(sitk.GetImageFromArray(_phantom_2d(rng, blob)), str(root / "anomalous" / f"a{i:02d}.nrrd"))
        sitk.WriteImage(sitk.GetImageFromArray(blob.astype(np.uint8)), str(root / "masks" / f"a{i:02d}_mask.nrrd"))
    datasets.prepare_folder(root / "healthy", root / "anomalous", root / "prepared", masks_dir=root / "masks",
                            val_fraction=0.3, test_fraction=0.4, seed=0)
    return root / "prepared"


def _evaluate(argv: list[str]) -> int:
    """Run the sub-command as the CLI will: a parser with add_evaluate_parser, then args.func(args)."""
    parser = argparse.ArgumentParser(prog="synomaly")
    sub = parser.add_subparsers(dest="command", required=True)
    add_evaluate_parser(sub)
    args = parser.parse_args(["evaluate", *map(str, argv), "--progress", "none"])
    return args.func(args)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _thresholds(report: Path) -> dict[str, float]:
    summary = json.loads((report / "evaluation.json").read_text())
    return {m["name"]: m["threshold"]["threshold"] for m in summary["methods"]}


@pytest.fixture(scope="module")
def report(models, prepared, tmp_path_factory) -> Path:
    """One evaluation of all five methods on the prepared phantoms."""
    out = tmp_path_factory.mktemp("eval-report") / "report"
    rc = _evaluate(["--model", models["synomaly"], "--model", models["gaussian"], "--model", models["coarse"],
                    "--stages", "2", "--data", prepared, "-o", out, "--bootstrap", "200"])
    assert rc == 0
    return out


METHODS = ["synomaly-multi", "synomaly-single", "gaussian-multi", "gaussian-single", "dae"]


def test_report_files_and_every_method_in_every_table(report):
    import imageio.v3 as iio

    names = {p.name for p in report.iterdir()}
    assert names == {"report.md", "results.csv", "per_case.csv", "evaluation.json", "roc.png", "pr.png", "gallery.png"}
    md = (report / "report.md").read_text()
    assert "not BraTS numbers" in md and "synomaly evaluate --model" in md
    assert "Threshold source: the validation split" in md
    tables = [block for block in md.split("\n\n") if block.startswith("| method |")]
    assert len(tables) == 3  # methods/thresholds, pixel level, image level
    for table in tables:
        assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == METHODS
    rows = _rows(report / "results.csv")
    metrics = {r["metric"] for r in rows}
    assert {"dice_image", "dice_volume", "pixel_auprc", "pixel_auroc", "image_auroc", "seconds_per_image"} <= metrics
    assert len(rows) == len(METHODS) * len(metrics)
    assert all(r["threshold_source"].startswith("validation split") for r in rows)
    per_case = _rows(report / "per_case.csv")
    test_images = 8  # 3 healthy + 5 anomalous phantoms in the test split
    assert sum(r["level"] == "image" for r in per_case) == len(METHODS) * test_images
    for name in ("roc.png", "pr.png", "gallery.png"):
        picture = iio.imread(report / name)
        assert picture.ndim == 3 and picture.shape[2] == 3 and picture.shape[0] > 100
    dice = {r["method"]: float(r["estimate"]) for r in rows if r["metric"] == "dice_image"}
    assert all(0.0 <= d <= 1.0 for d in dice.values())


def test_confidence_intervals_contain_their_estimate(report):
    rows = [r for r in _rows(report / "results.csv") if r["ci_low"] != ""]
    assert len(rows) > 20
    for r in rows:
        low, est, high = float(r["ci_low"]), float(r["estimate"]), float(r["ci_high"])
        assert low - 1e-9 <= est <= high + 1e-9, r


def test_thresholds_never_come_from_test_masks(models, prepared, tmp_path, monkeypatch):
    from synomaly.manifest import load_manifest

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    argv = ["--method", f"one={models['synomaly']}:1", "--method", f"two={models['synomaly']}:2",
            "--data", data, "--bootstrap", "0"]
    calls: list[tuple[str, set[str]]] = []
    original = evalruns.run_cases

    def recording(model, cases, *a, **k):
        calls.append((k.get("what", ""), {c.name for c in cases}))
        return original(model, cases, *a, **k)

    monkeypatch.setattr(evalruns, "run_cases", recording)
    assert _evaluate([*argv, "-o", tmp_path / "a"]) == 0
    before = _thresholds(tmp_path / "a")
    test_names = {r.image.name.split(".")[0] for r in load_manifest(data, split="test")}
    val_names = {r.image.name.split(".")[0] for r in load_manifest(data, split="val")}
    assert [w for w, names in calls if names & test_names] == ["one test", "two test"]
    assert all(names == val_names for w, names in calls if "val" in w) and len(calls) >= 5
    # move every test lesion mask somewhere else (and put one in a healthy test image)
    rng = np.random.default_rng(1)
    for row in load_manifest(data, split="test"):
        mask = np.zeros((48, 48), np.uint8)
        y, x = rng.integers(5, 40, 2)
        mask[y:y + 6, x:x + 6] = 1
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(row.mask))
    assert _evaluate([*argv, "-o", tmp_path / "b"]) == 0
    assert _thresholds(tmp_path / "b") == before
    dice = {p: {r["method"]: r["estimate"] for r in _rows(tmp_path / p / "results.csv") if r["metric"] == "dice_image"}
            for p in ("a", "b")}
    assert dice["a"] != dice["b"], "the test masks are what the metrics are computed on"
    # the validation masks, by contrast, do decide the threshold
    for row in load_manifest(data, split="val"):
        if row.label:
            sitk.WriteImage(sitk.GetImageFromArray(np.ones((48, 48), np.uint8)), str(row.mask))
    assert _evaluate([*argv, "-o", tmp_path / "c"]) == 0
    assert _thresholds(tmp_path / "c") != before


def test_card_thresholds_are_the_cards(models, prepared, tmp_path):
    from synomaly.modelio import read_card

    out = tmp_path / "card"
    assert _evaluate(["--method", f"s={models['synomaly']}:1", "--data", prepared, "-o", out, "--bootstrap", "0",
                      "--threshold-from", "card"]) == 0
    summary = json.loads((out / "evaluation.json").read_text())
    (m,) = summary["methods"]
    assert m["threshold"]["threshold"] == read_card(models["synomaly"]).detection.threshold
    assert m["threshold"]["source"].startswith("model card")
    assert "each model card's calibration" in (out / "report.md").read_text()


def _fake_br35h(root: Path, numbers: list[int]) -> Path:
    """A Br35H-like folder: no/No{n}.jpg and yes/Y{n}.jpg phantoms (a bright disc in 'yes')."""
    import imageio.v3 as iio

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    for label in ("no", "yes"):
        (root / label).mkdir(parents=True)
        for n in numbers:
            blob = (((yy - 20) ** 2 + (xx - 26) ** 2) < 25) if label == "yes" else None
            img = np.clip(_phantom_2d(rng, blob), 0, 255).astype(np.uint8)
            iio.imwrite(root / label / f"{'No' if label == 'no' else 'Y'}{n}.jpg", img)
    return root


def test_br35h_split_never_reads_reserved_or_training_images(models, tmp_path, monkeypatch):
    from synomaly import sampledata

    numbers = [0, 5, 149, 150, 899, 900, 930, 959, 960, 1000, 1049, 1050, 1051, 1200, 1499]
    fake = _fake_br35h(tmp_path / "br35h", numbers)
    monkeypatch.setattr(sampledata, "br35h_dir", lambda: fake)
    read: list[str] = []
    original_reader = sitk.ImageFileReader

    class RecordingReader(original_reader):
        def SetFileName(self, name):  # noqa: N802 (SimpleITK's spelling)
            read.append(str(name))
            return super().SetFileName(name)

    original_read = sitk.ReadImage
    monkeypatch.setattr(sitk, "ImageFileReader", RecordingReader)

    def recording_read(name, *a, **k):
        read.append(str(name))
        return original_read(name, *a, **k)

    monkeypatch.setattr(sitk, "ReadImage", recording_read)
    out = tmp_path / "report"
    assert _evaluate(["--method", f"s={models['synomaly']}:1", "--data", "br35h", "-o", out, "--bootstrap", "20"]) == 0
    images = [p for p in read if p.endswith(".jpg")]
    assert images, "the evaluation read the Br35H images through SimpleITK"
    got = {(Path(p).parent.name, sampledata.br35h_number(p)) for p in images}
    assert all(n < 1050 for _, n in got), "a reserved Br35H image was read"
    assert not {(lab, n) for lab, n in got if lab == "no" and n < 900}, "a healthy training image was read"
    expected = {("no", n) for n in numbers if 900 <= n < 1050} | {("yes", n) for n in numbers
                                                                   if n < 150 or 960 <= n < 1050}
    assert got == expected
    md = (out / "report.md").read_text()
    assert "Dice/image" not in md and "image AUROC" in md and "reserved" in md
    rows = _rows(out / "per_case.csv")
    assert {int(r["case"].split("-")[-1]) for r in rows} == {960, 1000, 1049}  # the test part only


def test_br35h_split_is_documented_and_disjoint():
    from synomaly.evaldata import BR35H_SPLIT, BR35H_TRAINING

    for label in ("no", "yes"):
        (vlo, vhi), (tlo, thi) = BR35H_SPLIT["val"][label], BR35H_SPLIT["test"][label]
        assert vhi <= tlo or thi <= vlo, "validation and test overlap"
        assert max(vhi, thi) <= 1050
        if label in BR35H_TRAINING:
            lo, hi = BR35H_TRAINING[label]
            assert vlo >= hi and tlo >= hi, "a training image is in validation or test"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A head-like 3D volume (1.5 mm voxels) to implant lesions into."""
    z, y, x = np.mgrid[:40, :64, :64]
    head = ((z - 20) ** 2 / 17**2 + (y - 32) ** 2 / 28**2 + (x - 32) ** 2 / 24**2) < 1
    rng = np.random.default_rng(3)
    arr = np.where(head, 100 + 8 * rng.standard_normal(head.shape), 0).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.5, 1.5, 1.5))
    img.SetOrigin((-48.0, -48.0, -30.0))
    path = tmp_path_factory.mktemp("template") / "head.nii.gz"
    sitk.WriteImage(img, str(path))
    return path


def test_implanted_lesions_are_deterministic_varied_and_inside(template):
    from synomaly.evaldata import find_template, implant_case

    t = find_template(str(template))
    a = [implant_case(t, "test", i, seed=0) for i in range(4)]
    b = [implant_case(t, "test", i, seed=0) for i in range(4)]
    head = sitk.GetArrayFromImage(sitk.ReadImage(str(template))) > 0
    for (ia, ta, ma), (ib, tb, mb) in zip(a, b):
        assert np.array_equal(sitk.GetArrayViewFromImage(ia), sitk.GetArrayViewFromImage(ib))
        assert np.array_equal(ta, tb) and ma == mb
        assert ta.any() and ta.shape == head.shape
        assert not (ta & ~head).any(), "every lesion voxel lies in tissue"
        assert all(3.0 <= d <= 30.0 for d in ma["diameters_mm"]) and ma["lobes"] == 2
    contrasts = [c for _, _, m in a for c in m["contrasts"]]
    assert min(contrasts) < 0 < max(contrasts), "brighter and darker lesions"
    assert len({m["lesion_ml"] for _, _, m in a}) == 4
    val = implant_case(t, "val", 0, seed=0)
    assert val[2]["centre_mm"] != a[0][2]["centre_mm"], "validation and test lesions differ"
    healthy = implant_case(t, "test", 2, seed=0, healthy=True)
    assert not healthy[1].any()
    assert np.array_equal(sitk.GetArrayViewFromImage(healthy[0]), sitk.GetArrayViewFromImage(sitk.ReadImage(str(template))))
    thick = implant_case(t, "test", 0, seed=0, form="thick")
    assert max(thick[0].GetSpacing()) in (5.0, 6.5) and thick[1].shape == sitk.GetArrayViewFromImage(thick[0]).shape
    assert thick[1].any(), "the truth mask follows the volume into its thick-slice form"


def test_implanted_volumes_end_to_end(models, template, tmp_path):
    out = tmp_path / "report"
    assert _evaluate(["--method", f"s={models['synomaly']}:2", "--method", f"again={models['synomaly']}:2",
                      "--data", "implanted", "--templates", template, "--baseline", "s",
                      "--val-templates", template, "--forms", "native", "thick", "--cases", "3", "--val-cases", "2",
                      "-o", out, "--bootstrap", "50"]) == 0
    summary = json.loads((out / "evaluation.json").read_text())
    assert [t["name"] for t in summary["data"]["templates"]] == ["head"]
    rows = [r for r in _rows(out / "per_case.csv") if r["method"] == "s"]
    volumes = [r for r in rows if r["level"] == "volume"]
    assert len(volumes) == 6 and sum(r["label"] == "1" for r in volumes) == 4  # every 3rd volume is lesion-free
    slices = [r for r in rows if r["level"] == "image"]
    assert all(r["slice"] != "" for r in slices) and {r["label"] for r in slices} == {"0", "1"}
    md = (out / "report.md").read_text()
    assert "Dice/volume" in md and "head" in md and "max mL healthy" in md
    # the same method twice, paired against itself: every difference and both ends of its interval are 0 (two
    # unpaired intervals of the same numbers would overlap, not vanish)
    paired = summary["baseline_comparisons"]
    assert {c["metric"] for c in paired} >= {"dice_volume", "pixel_auprc", "healthy_ml_max"}
    assert all(c["method"] == "again" and c["baseline"] == "s" for c in paired)
    assert all(c["difference"] == c["low"] == c["high"] == 0 for c in paired)
    assert "## Against the baseline `s`" in md and "| again | Dice/volume | +0.000 [0.000, 0.000] |" in md
    from synomaly.errors import InputError

    with pytest.raises(InputError, match="--baseline 'nope' is not one of the methods: s"):
        _evaluate(["--method", f"s={models['synomaly']}:2", "--data", "implanted", "--baseline", "nope", "-o",
                   tmp_path / "never"])


def test_a_card_tuned_on_a_test_volume_is_refused(models, template, tmp_path):
    """A leave-one-volume-out card (`synomaly tune --allow-held-out`) records the volumes it was tuned on; testing it
    on one of them, by name or by file, would report tuning numbers as held-out ones."""
    from synomaly.modelio import load_model, save_model

    base = load_model(models["synomaly"], device="cpu")
    state = base.network.state_dict()
    for i, tuning in enumerate(({"volumes": ["head"]}, {"volumes": ["x"], "volume_files": [str(template)]})):
        card = base.card.copy()
        card.tuning = tuning
        tuned = save_model(tmp_path / f"tuned-{i}.safetensors", card, state)
        with pytest.raises(InputError, match=r"method t: its card was tuned on the test volume\(s\) head"):
            _evaluate(["--method", f"t={tuned}:1", "--data", "implanted", "--templates", template, "--forms",
                       "native", "--cases", "1", "--val-cases", "0", "--threshold-from", "card", "-o",
                       tmp_path / f"never-{i}"])
        assert not (tmp_path / f"never-{i}").exists()
    card = base.card.copy()
    card.tuning = {"volumes": ["other"], "volume_files": [str(tmp_path / "other.nii.gz")]}
    from synomaly.evaldata import implanted_data
    from synomaly.evaluate import tuned_on_test

    data = implanted_data([str(template)], cases=1, val_cases=0, forms=("native",))
    assert tuned_on_test(card, data) == [] and tuned_on_test(base.card, data) == []
    from synomaly.card import PartnerModel

    card.partner_3d = PartnerModel(file="p.safetensors", sha256="0" * 64, thresholds={"1e-05": 1.0},
                                   calibration={"volumes": ["x"], "volume_files": [str(template)]})
    assert tuned_on_test(card, data) == [data.info["templates"][0]["name"]], "a pair calibrated on it counts too"


def test_method_names_and_specs(models):
    auto = evalruns.auto_methods([str(models["synomaly"]), str(models["gaussian"]), str(models["coarse"])])
    assert [(m.name, m.stages) for m in auto] == [("synomaly-multi", None), ("synomaly-single", 1),
                                                  ("gaussian-multi", None), ("gaussian-single", 1), ("dae", 1)]
    assert evalruns.parse_method("x=models/a.safetensors:3") == evalruns.Method("x", "models/a.safetensors", 3)
    assert evalruns.parse_method("x=models/a.safetensors:card").stages is None
    assert evalruns.parse_method("x=brain-mri-axial").model == "brain-mri-axial"
    with pytest.raises(InputError):
        evalruns.parse_method("models/a.safetensors")
    with pytest.raises(InputError, match="unknown method"):
        evalruns.select_methods([str(models["synomaly"])], [], ["gaussian-multi"])
    with pytest.raises(InputError, match="two models"):  # one kind, one card name: ambiguous names
        evalruns.auto_methods([str(models["synomaly"]), str(models["synomaly"])])
    chosen = evalruns.select_methods([str(models["synomaly"])], [], ["synomaly-single"], stages=3)
    assert [m.name for m in chosen] == ["synomaly-single"]


def test_binned_pixel_metrics_match_exact_ones():
    from synomaly.metrics import auprc, auroc

    rng = np.random.default_rng(0)
    y = rng.random(200_000) < 0.03
    s = np.clip(np.where(y, rng.gamma(3.0, 0.08, y.size), rng.gamma(1.5, 0.04, y.size)), 0, 2)
    bins = evalstats.score_bins(s)
    pos = np.bincount(bins[y], minlength=evalstats.HIST_BINS)
    neg = np.bincount(bins[~y], minlength=evalstats.HIST_BINS)
    assert evalstats.hist_auroc(pos, neg) == pytest.approx(auroc(s, y), abs=1e-3)
    assert evalstats.hist_auprc(pos, neg) == pytest.approx(auprc(s, y), abs=2e-3)
    # scores already on distinct bins: the binned values are exact
    q = bins.astype(float)
    assert evalstats.hist_auroc(pos, neg) == pytest.approx(auroc(q, y), abs=1e-12)
    assert evalstats.hist_auprc(pos, neg) == pytest.approx(auprc(q, y), abs=1e-12)
    # a map normalised per tissue class counts spreads (lesions at 5-20): binned over its own range it keeps its
    # ranking, where the difference maps' [0, 2] would lump every lesion voxel into the top bin
    n = s * 10.0
    top = evalstats.map_top({"tissue_bins": 8})
    assert top > 20 and evalstats.map_top({"tissue_bins": 0}) == evalstats.map_top({}) == 2.0
    nb = evalstats.score_bins(n, top)
    pos = np.bincount(nb[y], minlength=evalstats.HIST_BINS)
    neg = np.bincount(nb[~y], minlength=evalstats.HIST_BINS)
    assert evalstats.hist_auprc(pos, neg) == pytest.approx(auprc(n, y), abs=2e-3)
    lumped = evalstats.score_bins(n)
    assert evalstats.hist_auprc(np.bincount(lumped[y], minlength=evalstats.HIST_BINS),
                                np.bincount(lumped[~y], minlength=evalstats.HIST_BINS)) < auprc(n, y) - 0.01


def test_card_mode_leaves_the_operating_point_to_the_engine_and_validation_mode_fixes_the_threshold():
    """With card thresholds the engine resolves the card's operating point itself (its grow FPR included);
    with a validation threshold that threshold is used exactly, without the card's growth."""
    from synomaly.card import DetectionDefaults
    from synomaly.detect import resolve_grow_threshold
    from synomaly.evalruns import EvalSettings, _detection_settings
    from synomaly.train import new_card

    card = new_card("g", grid=32, channels=(32, 32))
    card.detection_3d = DetectionDefaults(t=25, blur_kernel=5, fpr=1e-4, grow_fpr=1e-2)
    card.calibration_3d = {"thresholds": {"0.01": 0.1, "0.001": 0.2, "0.0001": 0.3}}
    by_card = _detection_settings(5, 0.3, EvalSettings(threshold_from="card"))
    assert by_card.threshold is None and resolve_grow_threshold(by_card, card, 0.3, volume=True) == 0.1
    by_val = _detection_settings(5, 0.3, EvalSettings(threshold_from="val"))
    assert by_val.threshold == 0.3 and resolve_grow_threshold(by_val, card, 0.3, volume=True) is None
