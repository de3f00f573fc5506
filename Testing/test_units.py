"""Sizes are in mm and mL only when the input gives a physical pixel size; otherwise the results say pixels."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from synomaly.detect import DetectionSettings, detect
from synomaly.modelio import load_model
from synomaly.outputs import write_results
from synomaly.prepare import pixel_units, read_image

# every foreground pixel flagged (the tiny model's map is above 0 almost everywhere): sizes are easy to check
FLAG_ALL = DetectionSettings(threshold=0.0, min_lesion_mm3=0.0, max_stages=1, allow_modality_mismatch=True)


def _slice(phantom) -> np.ndarray:
    """A 2D head-like slice, 8-bit range."""
    return np.clip(phantom((48, 56), tissue=180, noise=12), 0, 255).astype(np.uint8)


def _picture(tmp_path, phantom, name: str, **pil_options):
    from PIL import Image

    path = tmp_path / name
    Image.fromarray(_slice(phantom)).save(path, **pil_options)
    return path


def _dicom(tmp_path, phantom, modality: str, spacing=(0.7, 0.5)):
    path = tmp_path / f"{modality}.dcm"
    image = sitk.GetImageFromArray(_slice(phantom).astype(np.int16))
    image.SetSpacing(spacing)
    image.SetMetaData("0008|0060", modality)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    writer.Execute(image)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_model_file):
    """The tiny model, loaded once."""
    return load_model(tiny_model_file, device="cpu")


def _check_pixels(result) -> None:
    assert result.report["units"] == "pixels"
    assert result.lesions, "the flag-everything setting found nothing"
    for row in result.lesions:
        assert row["units"] == "pixels"
        assert row["volume_ml"] == pytest.approx(row["voxels"] / 1000, abs=1e-4)  # a pixel counted as 1 mm^3
    assert result.report["anomalous_voxels"] == sum(r["voxels"] for r in result.lesions)
    assert any("no physical pixel size" in w for w in result.report["warnings"])


def test_png_sizes_are_in_pixels_in_the_report_and_the_lesion_table(tmp_path, phantom, tiny):
    path = _picture(tmp_path, phantom, "slice.png")
    image = read_image(path)
    assert pixel_units(image)
    result = detect(image, tiny, FLAG_ALL)
    _check_pixels(result)
    write_results(result, image, tmp_path / "out")
    with open(tmp_path / "out" / "lesions.csv", newline="") as fh:
        assert {row["units"] for row in csv.DictReader(fh)} == {"pixels"}
    assert json.loads((tmp_path / "out" / "report.json").read_text())["units"] == "pixels"


def test_tiff_dots_per_inch_are_not_taken_for_a_pixel_size(tmp_path, phantom, tiny):
    path = _picture(tmp_path, phantom, "slice.tif", dpi=(254, 254))
    image = read_image(path)
    assert image.GetSpacing() == pytest.approx((0.1, 0.1))  # what ITK makes of 254 dots per inch
    _check_pixels(detect(image, tiny, FLAG_ALL))


def test_dicom_pixel_spacing_gives_mm_and_ml(tmp_path, phantom, tiny):
    image = read_image(_dicom(tmp_path, phantom, "MR"))
    assert image.GetSpacing()[:2] == pytest.approx((0.7, 0.5))
    assert not pixel_units(image)
    result = detect(image, tiny, FLAG_ALL)
    assert result.report["units"] == "mm"
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000
    assert result.lesions
    for row in result.lesions:
        assert row["units"] == "mm"
        assert row["volume_ml"] == pytest.approx(row["voxels"] * voxel_ml, abs=1e-4)
    assert not any("pixel size" in w for w in result.report["warnings"])


def test_dicom_without_pixel_spacing_is_in_pixels(tmp_path, phantom, tiny):
    path = _dicom(tmp_path, phantom, "US")  # ITK writes no PixelSpacing for ultrasound
    image = read_image(path)
    assert not any(image.HasMetaDataKey(k) for k in ("0028|0030", "0018|1164"))
    assert pixel_units(image)
    _check_pixels(detect(image, tiny, FLAG_ALL))


def test_a_volume_with_spacing_is_in_mm(tmp_path, phantom):
    image = sitk.GetImageFromArray(phantom((6, 40, 40)))
    image.SetSpacing((1.5, 1.5, 3.0))
    sitk.WriteImage(image, str(tmp_path / "scan.nii.gz"))
    assert not pixel_units(read_image(tmp_path / "scan.nii.gz"))


def test_command_line_summary_says_pixels(tmp_path, phantom, tiny_model_file, synomaly_run):
    path = _picture(tmp_path, phantom, "slice.png")
    out = synomaly_run(["detect", path, "-o", tmp_path / "out", "--model", tiny_model_file, "--threshold", "0",
                        "--min-size", "0", "--stages", "1"])
    assert out.returncode == 0, out.stderr
    assert "pixels (no physical pixel size)" in out.stdout
    assert " mL" not in out.stdout
