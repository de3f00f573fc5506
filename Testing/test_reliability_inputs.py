"""Odd and broken scans through the real command line: a clear one-line message, the right exit code,
nothing written; and unusual but valid scans: results on exactly the input's grid.

Set SYNOMALY_BAD_INPUT_TABLE=path to get a Markdown table of how every bad input ended (for the issue note).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from synomaly.errors import InputError, ResourceError

OUTPUT_FILES = ("counterfactual.nrrd", "anomaly_map.nrrd", "anomaly.seg.nrrd", "lesions.csv", "overview.png",
                "report.json")
SHAPE = (12, 48, 48)  # numpy (k, j, i): 12 slices of 48 x 48


def _image(arr: np.ndarray, spacing=None, origin=None, direction=None, vector: bool = False) -> sitk.Image:
    img = sitk.GetImageFromArray(arr, isVector=vector)
    if spacing is not None:
        img.SetSpacing(spacing)
    if origin is not None:
        img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


def _write(img: sitk.Image, path: Path, compress: bool = False) -> Path:
    sitk.WriteImage(img, str(path), useCompression=compress)
    return path


def _truncate(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


# ------------------------------------------------------------------ bad inputs
# Each builder writes the input into `d` and returns (input path, extra command-line arguments).


def _empty(d, phantom, dicom):
    p = d / "empty.nii.gz"
    p.write_bytes(b"")
    return p, []


def _truncated_nifti(d, phantom, dicom):
    return _truncate(_write(_image(phantom(SHAPE)), d / "scan.nii")), []


def _truncated_nifti_gz(d, phantom, dicom):
    return _truncate(_write(_image(phantom(SHAPE)), d / "scan.nii.gz")), []


def _truncated_nrrd(d, phantom, dicom):
    return _truncate(_write(_image(phantom(SHAPE)), d / "scan.nrrd")), []


def _truncated_nrrd_gz(d, phantom, dicom):
    return _truncate(_write(_image(phantom(SHAPE)), d / "scan.nrrd", compress=True)), []


def _text_as_nifti(d, phantom, dicom):
    p = d / "notes.nii.gz"
    p.write_text("Patient notes, not an image.\n" * 20)
    return p, []


def _four_d(d, phantom, dicom):
    img = sitk.JoinSeries([_image(phantom(SHAPE, seed=t)) for t in range(4)])
    assert img.GetSize() == (48, 48, 12, 4)
    return _write(img, d / "fmri.nii.gz"), []


def _rgb(d, phantom, dicom):
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0] = 40
    rgb[16:48, 16:48, 0] = 220  # a red square ...
    rgb[24:40, 24:40, 2] = 180  # ... with a blue centre: the channels really differ
    return _write(_image(rgb, vector=True), d / "photo.png"), []


def _slice_for_volume(d, phantom, dicom):
    sl = np.clip(phantom((64, 64)) * 2, 0, 255).astype(np.uint8)
    return _write(_image(sl), d / "slice.png"), ["--expect", "volume"]


def _volume_for_slice(d, phantom, dicom):
    return _write(_image(phantom(SHAPE)), d / "volume.nrrd"), ["--expect", "slice"]


def _all_zero(d, phantom, dicom):
    return _write(_image(np.zeros(SHAPE, np.float32)), d / "zeros.nrrd"), []


def _constant(d, phantom, dicom):
    return _write(_image(np.full(SHAPE, 417, np.int16)), d / "constant.nrrd"), []


def _nan(d, phantom, dicom):
    arr = phantom(SHAPE)
    arr[5, 20:23, 20:23] = np.nan
    return _write(_image(arr), d / "nan.nrrd"), []


def _inf(d, phantom, dicom):
    arr = phantom(SHAPE)
    arr[5, 20, 20] = np.inf
    arr[6, 20, 20] = -np.inf
    return _write(_image(arr), d / "inf.nrrd"), []


def _one_voxel(d, phantom, dicom):
    return _write(_image(np.ones((1, 1, 1), np.float32)), d / "voxel.nrrd"), []


def _larger_than_memory(d, phantom, dicom):
    """A detached NRRD header claiming 5000^3 float voxels (500 GB) over a 64-byte data file."""
    (d / "huge.raw").write_bytes(b"\0" * 64)
    p = d / "huge.nhdr"
    p.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 5000 5000 5000\nspacings: 1 1 1\n"
                 "encoding: raw\nendian: little\ndata file: huge.raw\n")
    return p, []


def _two_dicom_series(d, phantom, dicom):
    folder = d / "dicom"
    vol = phantom((6, 40, 40), tissue=800, noise=40)
    dicom(folder, vol, "1.2.826.0.1.3680043.2.1125.7.10", prefix="a")
    dicom(folder, vol[:, ::-1], "1.2.826.0.1.3680043.2.1125.7.11", prefix="b")
    assert len(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))) == 2
    return folder, []


def _missing(d, phantom, dicom):
    return d / "no-such-scan.nii.gz", []


# id, builder, exit code, words of which the message must contain at least one (lower case)
BAD_INPUTS = [
    ("empty file", _empty, InputError.exit_code, ["empty"]),
    ("truncated NIfTI (.nii)", _truncated_nifti, InputError.exit_code, ["truncated"]),
    ("truncated NIfTI (.nii.gz)", _truncated_nifti_gz, InputError.exit_code, ["truncated"]),
    ("truncated NRRD (raw)", _truncated_nrrd, InputError.exit_code, ["truncated"]),
    ("truncated NRRD (gzip)", _truncated_nrrd_gz, InputError.exit_code, ["truncated"]),
    ("text file named .nii.gz", _text_as_nifti, InputError.exit_code, ["not a readable image"]),
    ("4D volume (t = 4)", _four_d, InputError.exit_code, ["4d"]),
    ("RGB colour PNG", _rgb, InputError.exit_code, ["colour", "color"]),
    ("2D slice with --expect volume", _slice_for_volume, InputError.exit_code, ["2d slice"]),
    ("3D volume with --expect slice", _volume_for_slice, InputError.exit_code, ["3d volume"]),
    ("all-zero volume", _all_zero, InputError.exit_code, ["constant", "empty", "no contrast"]),
    ("constant volume", _constant, InputError.exit_code, ["constant", "no contrast"]),
    ("NaN voxels", _nan, InputError.exit_code, ["nan"]),
    ("Inf voxels", _inf, InputError.exit_code, ["infinite", "inf"]),
    ("1 x 1 x 1 volume", _one_voxel, InputError.exit_code, ["too small"]),
    ("5000^3 header (larger than memory)", _larger_than_memory, ResourceError.exit_code, ["memory"]),
    ("DICOM folder with two series", _two_dicom_series, InputError.exit_code, ["2 dicom series", "--series"]),
    ("non-existent path", _missing, InputError.exit_code, ["no such file"]),
]


@pytest.fixture(scope="module")
def outcome_table():
    """Collects (case, exit code, message) and writes a Markdown table to $SYNOMALY_BAD_INPUT_TABLE if set."""
    rows: list[tuple[str, int, str]] = []
    yield rows
    target = os.environ.get("SYNOMALY_BAD_INPUT_TABLE")
    if target and rows:
        lines = ["| bad input | exit code | message on stderr |", "|---|---|---|"]
        lines += [f"| {case} | {code} | {msg.replace('|', '/')} |" for case, code, msg in rows]
        Path(target).write_text("\n".join(lines) + "\n")


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("synomaly: error:")]


@pytest.mark.parametrize("case, build, code, words", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused_with_a_message_and_writes_nothing(case, build, code, words, tmp_path, phantom,
                                                                dicom_series, tiny_model_file, synomaly_run,
                                                                outcome_table):
    src = tmp_path / "in"
    src.mkdir()
    path, extra = build(src, phantom, dicom_series)
    results = tmp_path / "results"
    results.mkdir()
    out = results / "out"
    start = time.monotonic()
    r = synomaly_run(["detect", path, "-o", out, "--model", tiny_model_file, "--progress", "none", *extra],
                     timeout=120)
    seconds = time.monotonic() - start
    errors = _error_lines(r.stderr)
    if errors:
        ended = errors[0]
    elif r.returncode == 0:
        ended = "(no error: detection ran and wrote results)"
    else:
        ended = (r.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
    outcome_table.append((case, r.returncode, ended))
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == code, f"exit {r.returncode}, expected {code}; stderr: {r.stderr}"
    assert len(errors) == 1, f"expected one 'synomaly: error:' line, got: {r.stderr!r}"
    message = errors[0].lower()
    assert any(w in message for w in words), f"message does not name the problem ({words}): {errors[0]}"
    assert r.stderr.strip().splitlines()[-1] == errors[0], "the message must be one line, and the last"
    assert not out.exists(), "nothing may be written for a refused input"
    assert list(results.iterdir()) == [], f"stray files left: {list(results.iterdir())}"
    if case.startswith("5000^3"):
        assert seconds < 60, "a too-large image must be refused from its header, before reading voxels"


# ------------------------------------------------------------------ unusual inputs that must work


def _uint16_max(d, phantom):
    arr = np.clip(phantom(SHAPE, tissue=60000, noise=3000), 0, 65535).astype(np.uint16)
    assert arr.max() == 65535
    return _write(_image(arr, spacing=(0.9, 0.9, 3.0)), d / "u16.nrrd")


def _ct_like(d, phantom):
    arr = np.clip(phantom(SHAPE, background=-1000, tissue=40, noise=30), -1000, 2000).astype(np.int16)
    arr[4:8, 10:14, 10:38] = 1800  # bone
    return _write(_image(arr, spacing=(0.7, 0.7, 2.5), origin=(-170.0, -160.0, -300.0)), d / "ct.nii.gz")


def _anisotropic(d, phantom):
    return _write(_image(phantom(SHAPE), spacing=(0.1, 0.1, 10.0)), d / "aniso.nrrd")


def _oblique(d, phantom):
    from scipy.spatial.transform import Rotation

    direction = Rotation.from_euler("xyz", [17, -31, 52], degrees=True).as_matrix().ravel().tolist()
    return _write(_image(phantom(SHAPE), spacing=(0.9, 1.1, 2.7), origin=(12.5, -33.0, 40.25),
                         direction=direction), d / "oblique.nrrd")


def _png(d, phantom):
    return _write(_image(np.clip(phantom((64, 72), tissue=180, noise=12), 0, 255).astype(np.uint8)), d / "us.png")


GOOD_INPUTS = [
    ("uint16 up to 65535", _uint16_max),
    ("CT-like -1000..2000", _ct_like),
    ("anisotropic 0.1 x 0.1 x 10 mm", _anisotropic),
    ("oblique direction", _oblique),
    ("2D PNG", _png),
]


@pytest.mark.parametrize("case, build", GOOD_INPUTS, ids=[c[0] for c in GOOD_INPUTS])
def test_unusual_but_valid_input_gives_results_on_its_own_grid(case, build, tmp_path, phantom, tiny_model_file,
                                                               synomaly_run):
    path = build(tmp_path, phantom)
    out = tmp_path / "out"
    r = synomaly_run(["detect", path, "-o", out, "--model", tiny_model_file, "--progress", "none"])
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    src = sitk.ReadImage(str(path))
    for name in ("counterfactual.nrrd", "anomaly_map.nrrd", "anomaly.seg.nrrd"):
        img = sitk.ReadImage(str(out / name))
        assert img.GetSize() == src.GetSize(), name
        np.testing.assert_allclose(img.GetSpacing(), src.GetSpacing(), rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(img.GetOrigin(), src.GetOrigin(), rtol=1e-6, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(img.GetDirection(), src.GetDirection(), atol=1e-6, err_msg=name)
        arr = sitk.GetArrayViewFromImage(img)
        assert np.isfinite(arr).all(), f"{name} holds NaN/Inf"
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "anomaly.seg.nrrd")))
    assert set(np.unique(seg)) <= {0, 1}
    score = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "anomaly_map.nrrd")))
    assert score.min() >= 0
    report = json.loads((out / "report.json").read_text())
    csv_rows = (out / "lesions.csv").read_text().strip().splitlines()[1:]
    assert len(csv_rows) == report["lesion_count"] == len(report["lesions"])
    assert sum(r["voxels"] for r in report["lesions"]) == int(seg.sum())


def test_writing_a_dicom_series_in_a_test_leaves_text_encoding_alone(tmp_path, dicom_series, phantom):
    """GDCM's writer sets the process locale to "C"; the fixture puts it back, so later UTF-8 reads with the
    default encoding work (a cohort test once made every later report.md / README read fail)."""
    import locale

    from synomaly.prepare import read_image

    before = locale.setlocale(locale.LC_ALL)
    dicom_series(tmp_path / "dcm", (phantom((4, 16, 16)) * 10).astype(np.int16), "1.2.3.4.1")
    read_image(tmp_path / "dcm")
    assert locale.setlocale(locale.LC_ALL) == before
