"""Dataset preparation: tiny fake BraTS, LiTS and folder datasets, split by patient, labels matching masks."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from synomaly import datasets, datasplit, manifest
from synomaly.cli.preparation import add_prepare_parser
from synomaly.errors import InputError, OutputError

FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # how ITK reads a typical RAS-stored NIfTI


def _write(arr: np.ndarray, path: Path, spacing=(0.9, 1.1, 2.0), origin=(10.0, -20.0, 5.0),
           direction=None) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def brats_volume(depth: int = 120, side: int = 16) -> np.ndarray:
    """(z, y, x) FLAIR-like volume whose values tell slice and pixel apart: 1000 + 10 z + y + x / 100 in the 'brain'."""
    z, y, x = np.meshgrid(np.arange(depth), np.arange(side), np.arange(side), indexing="ij")
    vol = (1000 + 10 * z + y + x / 100).astype(np.float32)
    brain = np.zeros_like(vol, dtype=bool)
    brain[:, 2:side - 2, 2:side - 2] = True
    return np.where(brain, vol, 0).astype(np.float32)


# case -> axial slices holding tumour (labels 1, 2, 3 in turn)
BRATS_CASES = {
    "BraTS-GLI-00001-000": [85, 86, 87, 88],
    "BraTS-GLI-00001-001": [90, 91],  # second time point of patient 00001
    "BraTS-GLI-00002-000": list(range(75, 95)),
    "BraTS-GLI-00003-000": [60, 61],  # tumour outside the range: every slice in range is healthy
    "BraTS-GLI-00004-000": [99, 100, 101],  # 100 and 101 lie outside the half-open range 80..100
    "BraTS-GLI-00005-000": [80],
    "BraTS-GLI-00006-000": list(range(82, 98)),
    "BraTS-GLI-00007-000": [95, 96],
}


def make_brats(root: Path, cases=BRATS_CASES, direction=None) -> Path:
    vol = brats_volume()
    for case, tumour in cases.items():
        seg = np.zeros(vol.shape, np.uint8)
        for i, z in enumerate(tumour):
            seg[z, 5:9, 6:9] = 1 + i % 3
            seg[z, 7, 9] = 2
        _write(vol, root / case / f"{case}-t2f.nii.gz", direction=direction)
        _write(vol * 0.5, root / case / f"{case}-t1n.nii.gz", direction=direction)
        _write(seg, root / case / f"{case}-seg.nii.gz", direction=direction)
    return root


def read(path: Path) -> tuple[np.ndarray, sitk.Image]:
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), img


def check_manifest_consistent(out: Path) -> list[manifest.ManifestRow]:
    """Checks every prepared dataset must pass; returns the rows."""
    rows = manifest.load_manifest(out)
    summary = json.loads((out / "manifest.json").read_text())
    assert summary["split_unit"] == "patient"
    # no patient on two sides
    split_of = defaultdict(set)
    for r in rows:
        split_of[r.patient].add(r.split)
    assert all(len(s) == 1 for s in split_of.values()), split_of
    # training holds healthy images only
    assert all(r.label == 0 for r in rows if r.split == "train")
    # labels and pixel counts match the masks; files lie where the manifest says
    for r in rows:
        assert r.image.is_file()
        assert r.image.parent.name == ("anomalous" if r.label else "healthy")
        assert r.image.parent.parent.name == r.split
        if r.mask is not None:
            mask, mimg = read(r.mask)
            image, img = read(r.image)
            assert mask.shape == image.shape
            assert mimg.GetSpacing() == pytest.approx(img.GetSpacing())
            assert set(np.unique(mask)) <= {0, 1}
            assert int(mask.sum()) == r.anomaly_pixels
            assert r.label == int(mask.any())
    # counts in the summary are the manifest's counts
    for split in manifest.SPLITS:
        sub = [r for r in rows if r.split == split]
        c = summary["counts"][split]
        assert c["images"] == len(sub)
        assert c["healthy"] == sum(r.label == 0 for r in sub)
        assert c["anomalous"] == sum(r.label == 1 for r in sub)
        assert c["patients"] == len({r.patient for r in sub})
        assert sorted({r.patient for r in sub}) == summary["patients"][split]
    assert summary["counts"]["total"]["images"] == len(rows)
    return rows


# ---------------------------------------------------------------- BraTS


def test_brats_split_by_patient_labels_and_counts(tmp_path):
    root = make_brats(tmp_path / "brats")
    out = tmp_path / "prepared"
    summary = datasets.prepare_brats(root, out, val_fraction=0.15, test_fraction=0.3, seed=0)
    rows = check_manifest_consistent(out)

    patients = {datasets.brats_patient(c) for c in BRATS_CASES}
    assert len(patients) == 7
    assert (summary["counts"]["train"]["patients"], summary["counts"]["val"]["patients"],
            summary["counts"]["test"]["patients"]) == (4, 1, 2)
    # both time points of patient 00001 are in one split (one patient, not two)
    assert {r.split for r in rows if r.case.startswith("BraTS-GLI-00001-")} == {summary_split(rows, "BraTS-GLI-00001")}
    assert {r.case for r in rows if r.patient == "BraTS-GLI-00001"} == {"BraTS-GLI-00001-000", "BraTS-GLI-00001-001"}

    # every slice in 80..99 is used, except tumour slices of training patients
    expected, dropped_train = 0, 0
    for case, tumour in BRATS_CASES.items():
        split = summary_split(rows, datasets.brats_patient(case))
        in_range = [z for z in tumour if 80 <= z < 100]
        if split == "train":
            expected += 20 - len(in_range)
            dropped_train += len(in_range)
        else:
            expected += 20
        case_rows = {r.slice: r for r in rows if r.case == case}
        assert set(case_rows) <= set(range(80, 100))
        for z, r in case_rows.items():
            assert r.label == int(z in tumour)
    assert len(rows) == expected
    assert summary["dropped"]["anomalous slices of training patients"] == dropped_train
    assert summary["slice_range"] == [80, 100] and summary["contrast"] == "t2f"

    # the right slice, in the right place, with the in-plane spacing kept
    vol = brats_volume()
    for r in rows[:5] + rows[-5:]:
        image, img = read(r.image)
        assert np.array_equal(image, vol[r.slice])
        assert img.GetSpacing() == pytest.approx((0.9, 1.1))
        assert img.GetOrigin() == pytest.approx((10.0, -20.0))
        assert r.ref_low > 1000 and r.ref_high > r.ref_low  # the brain's range, not the zero background
    # the engine reads the slices as 2D scans, and finds the training folder
    from synomaly.prepare import expand_inputs, read_image

    assert read_image(rows[0].image).GetDimension() == 2
    assert len(expand_inputs([str(out / "train" / "healthy")])) == sum(r.split == "train" for r in rows)
    # whole tumour: labels 1, 2 and 3 all count (12 pixels of one label + 1 of label 2 per tumour slice)
    anomalous = [r for r in rows if r.label]
    assert anomalous and all(r.anomaly_pixels == 13 for r in anomalous)
    assert {r.split for r in anomalous} == {"val", "test"}

    # the training folder is directly usable by `synomaly train --data OUT/train/healthy`
    train_files = sorted((out / "train" / "healthy").iterdir())
    assert len(train_files) == sum(1 for r in rows if r.split == "train")
    assert not (out / "train" / "anomalous").exists()


def summary_split(rows, patient: str) -> str:
    (split,) = {r.split for r in rows if r.patient == patient}
    return split


def test_brats_reads_axial_slices_of_flipped_volumes_in_display_orientation(tmp_path):
    cases = {"BraTS-GLI-00011-000": [90], "BraTS-GLI-00012-000": [91], "BraTS-GLI-00013-000": [92]}
    root = make_brats(tmp_path / "brats", cases, direction=FLIPPED)
    out = tmp_path / "prepared"
    datasets.prepare_brats(root, out, contrast="t1n", slice_range=(88, 94), seed=3)
    rows = check_manifest_consistent(out)
    vol = brats_volume() * 0.5
    for r in rows:
        image, img = read(r.image)
        # slice numbers count along the stored z axis, as in the paper; in-plane flipped to LPS display
        assert np.array_equal(image, vol[r.slice][::-1, ::-1])
        assert img.GetOrigin() == pytest.approx((10.0 - 15 * 0.9, -20.0 - 15 * 1.1))
        if r.mask is not None and r.label:
            mask, _ = read(r.mask)
            assert mask[15 - 7, 15 - 9] == 1  # the single voxel at (y 7, x 9) of the stored volume
    assert {r.slice for r in rows} <= set(range(88, 94))


def test_brats_grid_resampling_keeps_field_of_view_and_labels(tmp_path):
    root = make_brats(tmp_path / "brats", {k: BRATS_CASES[k] for k in list(BRATS_CASES)[:5]})
    out = tmp_path / "prepared"
    summary = datasets.prepare_brats(root, out, grid=8, min_anomaly_pixels=2, fmt="nii.gz")
    rows = check_manifest_consistent(out)
    assert rows[0].image.name.endswith(".nii.gz")
    image, img = read(rows[0].image)
    assert image.shape == (8, 8)
    assert img.GetSpacing() == pytest.approx((0.9 * 2, 1.1 * 2))
    assert img.GetOrigin() == pytest.approx((10.0 + 0.45, -20.0 + 0.55))  # same field of view
    assert all(r.anomaly_pixels >= 2 for r in rows if r.label)
    assert summary["grid"] == 8


def test_brats_split_is_reproducible_and_seeded(tmp_path):
    root = make_brats(tmp_path / "brats")
    a = datasets.prepare_brats(root, tmp_path / "a", seed=1)
    b = datasets.prepare_brats(root, tmp_path / "b", seed=1)
    assert a["patients"] == b["patients"]
    assert (tmp_path / "a" / "manifest.csv").read_text() == (tmp_path / "b" / "manifest.csv").read_text()
    others = [datasets.prepare_brats(root, tmp_path / f"s{s}", seed=s)["patients"] for s in range(2, 6)]
    assert any(p != a["patients"] for p in others)


def test_split_patients_rules():
    split = datasplit.split_patients([f"p{i}" for i in range(10)], 0.1, 0.2, seed=0)
    assert sorted(split.values()).count("train") == 7
    assert list(split.values()).count("val") == 1 and list(split.values()).count("test") == 2
    assert datasplit.split_patients(reversed(list(split)), 0.1, 0.2, seed=0) == split  # order does not matter
    three = datasplit.split_patients(["a", "b", "c"], 0.1, 0.2, seed=0)
    assert sorted(three.values()) == ["test", "train", "val"]
    with pytest.raises(InputError):
        datasplit.split_patients(["a", "b"], 0.1, 0.2)
    with pytest.raises(InputError):
        datasplit.split_patients(["a", "b", "c"], 0.6, 0.5)


def test_existing_output_is_refused_and_errors_leave_nothing(tmp_path):
    root = make_brats(tmp_path / "brats", {k: BRATS_CASES[k] for k in list(BRATS_CASES)[:4]})
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError):
        datasets.prepare_brats(root, out)
    with pytest.raises(OutputError):
        datasets.prepare_brats(root, out, overwrite=True)  # not a prepared dataset: never deleted
    assert (out / "notes.txt").read_text() == "mine"

    datasets.prepare_brats(root, tmp_path / "ok")
    datasets.prepare_brats(root, tmp_path / "ok", overwrite=True, seed=5)  # a prepared dataset may be replaced
    assert json.loads((tmp_path / "ok" / "manifest.json").read_text())["seed"] == 5

    bad = tmp_path / "brats" / "BraTS-GLI-00009-000"
    bad.mkdir()
    (bad / "BraTS-GLI-00009-000-t2f.nii.gz").write_bytes(b"not a nifti")
    (bad / "BraTS-GLI-00009-000-seg.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(InputError):
        datasets.prepare_brats(root, tmp_path / "broken")
    assert not (tmp_path / "broken").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_brats_without_cases_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no BraTS case"):
        datasets.prepare_brats(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(InputError, match="contrast"):
        datasets.prepare_brats(tmp_path / "empty", tmp_path / "out", contrast="flair")


# ---------------------------------------------------------------- LiTS


def lits_pair(n: int, tumour: bool) -> tuple[np.ndarray, np.ndarray]:
    """(z, y, x) CT volume spanning -1000..+400 HU and its labels: liver in slices 4-15, tumour in 7-9."""
    rng = np.random.default_rng(n)
    vol = rng.uniform(-1000, 400, size=(20, 16, 16)).astype(np.float32)
    seg = np.zeros(vol.shape, np.uint8)
    seg[4:16, 3:12, 3:12] = 1
    if tumour:
        seg[7:10, 5:8, 5:8] = 2
    return vol, seg


def make_lits(root: Path, count: int = 6) -> Path:
    for n in range(count):
        vol, seg = lits_pair(n, tumour=n % 2 == 0)
        folder = root / ("batch1" if n < count // 2 else "batch2")
        _write(vol, folder / f"volume-{n}.nii", spacing=(0.7, 0.7, 2.5))
        _write(seg, folder / f"segmentation-{n}.nii", spacing=(0.7, 0.7, 2.5))
    return root


def test_lits_window_labels_and_split(tmp_path):
    root = make_lits(tmp_path / "lits")
    out = tmp_path / "prepared"
    summary = datasets.prepare_lits(root, out, seed=0)
    rows = check_manifest_consistent(out)
    assert summary["hu_window"] == [0.0, 150.0]
    assert len({r.patient for r in rows}) == 6
    for r in rows:
        n = int(r.case.split("-")[1])
        vol, seg = lits_pair(n, tumour=n % 2 == 0)
        image, img = read(r.image)
        assert image.min() >= 0 and image.max() <= 150
        assert np.allclose(image, np.clip(vol[r.slice], 0, 150))  # clipped, kept in HU
        assert img.GetSpacing() == pytest.approx((0.7, 0.7))
        labels = seg[r.slice]
        assert (labels >= 1).any()  # slices without liver are never used
        mask, _ = read(r.mask)
        assert np.array_equal(mask.astype(bool), labels == 2)
        assert r.label == int((labels == 2).any())
        assert (r.ref_low, r.ref_high) == (0.0, 150.0)
    for n in range(6):
        split = summary_split(rows, f"lits-{n:03d}")
        got = sum(r.case == f"volume-{n}" for r in rows)
        tumour_slices = 3 if n % 2 == 0 else 0
        assert got == (12 - tumour_slices if split == "train" else 12)
    assert summary["dropped"]["slices without liver"] == 6 * 8


def test_lits_unpaired_files_are_skipped(tmp_path):
    root = make_lits(tmp_path / "lits", count=4)
    (root / "batch1" / "segmentation-1.nii").unlink()
    summary = datasets.prepare_lits(root, tmp_path / "out", val_fraction=0.2, test_fraction=0.2)
    assert summary["numbers_skipped_unpaired"] == [1]
    assert summary["counts"]["total"]["patients"] == 3


# ---------------------------------------------------------------- any folders


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(arr.astype(np.uint8)), str(path))


def test_folder_images_masks_and_patient_split(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(10):
        _png(tmp_path / "no" / f"n{i:02d}.png", rng.integers(0, 200, (20, 24)))
    for i in range(6):
        img = rng.integers(0, 120, (20, 24))
        img[5:9, 6:12] = 250
        _png(tmp_path / "yes" / f"y{i:02d}.png", img)
        if i < 4:
            m = np.zeros((20, 24))
            m[5:9, 6:12] = 255
            _png(tmp_path / "gt" / f"y{i:02d}_mask.png", m)
    out = tmp_path / "prepared"
    summary = datasets.prepare_folder(tmp_path / "no", tmp_path / "yes", out, masks_dir=tmp_path / "gt")
    rows = check_manifest_consistent(out)
    anomalous = [r for r in rows if r.label]
    assert len(anomalous) == 6 and all(r.split in ("val", "test") for r in anomalous)
    assert {r.split for r in anomalous} == {"val", "test"}
    assert summary["counts"]["train"]["healthy"] == 7  # 10 healthy-only patients: 7 / 1 / 2
    with_mask = [r for r in anomalous if r.mask is not None]
    assert sorted(r.case for r in with_mask) == ["y00", "y01", "y02", "y03"]
    assert all(r.anomaly_pixels == 24 for r in with_mask)
    assert summary["anomalous_without_mask"] == 2
    healthy = [r for r in rows if not r.label]
    assert all(r.mask is not None and r.anomaly_pixels == 0 for r in healthy)  # masks_dir given: zero masks
    image, _ = read(rows[0].image)
    assert image.shape == (20, 24) and image.dtype == np.float32


def test_folder_patient_regex_keeps_a_patient_together_and_grid(tmp_path):
    rng = np.random.default_rng(1)
    for p in range(6):
        for j in range(3):
            _png(tmp_path / "healthy" / f"p{p}_img{j}.png", rng.integers(0, 200, (32, 32)))
    _png(tmp_path / "anomalous" / "p0_img9.png", rng.integers(0, 200, (32, 32)))
    out = tmp_path / "prepared"
    datasets.prepare_folder(tmp_path / "healthy", tmp_path / "anomalous", out, grid=16,
                            patient_regex=r"^(p\d+)_", val_fraction=0.2, test_fraction=0.2)
    rows = check_manifest_consistent(out)
    assert len({r.patient for r in rows}) == 6
    assert summary_split(rows, "p0") in ("val", "test")  # its anomalous image keeps it out of training
    assert sum(r.patient == "p0" for r in rows) == 4
    image, img = read(rows[0].image)
    assert image.shape == (16, 16) and img.GetSpacing() == pytest.approx((2.0, 2.0))
    assert all(r.mask is None for r in rows)  # no masks folder: image-level labels only
    with pytest.raises(InputError, match="pattern"):
        datasets.prepare_folder(tmp_path / "healthy", None, tmp_path / "x", patient_regex=r"^(q\d+)")


def test_folder_of_volumes_keeps_their_geometry(tmp_path):
    vol = brats_volume(depth=10)
    for i in range(4):
        _write(vol + i, tmp_path / "h" / f"s{i}.nii.gz")
    out = tmp_path / "prepared"
    datasets.prepare_folder(tmp_path / "h", None, out, val_fraction=0.25, test_fraction=0.25)
    rows = check_manifest_consistent(out)
    image, img = read(rows[0].image)
    assert image.shape == vol.shape and rows[0].slice is None
    assert img.GetSpacing() == pytest.approx((0.9, 1.1, 2.0)) and img.GetOrigin() == pytest.approx((10.0, -20.0, 5.0))


# ---------------------------------------------------------------- manifest and command line


def test_load_manifest_filters_and_refuses_bad_files(tmp_path):
    root = make_lits(tmp_path / "lits", count=4)
    out = tmp_path / "prepared"
    datasets.prepare_lits(root, out, val_fraction=0.25, test_fraction=0.25)
    rows = manifest.load_manifest(out / "manifest.csv")
    test_rows = manifest.load_manifest(out, split="test")
    assert test_rows == [r for r in rows if r.split == "test"] and test_rows
    assert all(r.image.is_absolute() for r in rows)
    with pytest.raises(InputError):
        manifest.load_manifest(tmp_path / "nowhere")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="not a synomaly manifest"):
        manifest.load_manifest(tmp_path / "bad.csv")


def test_command_line_prepare(tmp_path, capsys):
    root = make_brats(tmp_path / "brats", {k: BRATS_CASES[k] for k in list(BRATS_CASES)[:4]})
    parser = argparse.ArgumentParser(prog="synomaly")
    sub = parser.add_subparsers(dest="command", required=True)
    add_prepare_parser(sub)
    args = parser.parse_args(["prepare", "brats", "--root", str(root), "-o", str(tmp_path / "out"),
                              "--slices", "85", "95", "--progress", "none", "--seed", "2"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    rows = check_manifest_consistent(tmp_path / "out")
    assert printed["counts"]["total"]["images"] == len(rows)
    assert {r.slice for r in rows} <= set(range(85, 95))
    with pytest.raises(SystemExit):
        parser.parse_args(["prepare", "brats", "-o", "x"])  # --root is required
