"""End to end with the shipped model: an implanted lesion is found where it was put; a healthy scan stays clean."""

import numpy as np
import pytest
import SimpleITK as sitk

from synomaly.detect import DetectionSettings, detect
from synomaly.modelio import SHIPPED_DIR, load_model
from synomaly.sampledata import implant_lesion, mni152_t1

MODEL = SHIPPED_DIR / "brain-mri-axial.safetensors"
pytestmark = pytest.mark.skipif(not MODEL.exists(), reason="the shipped model file is not in this checkout")


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL, device="cpu")


@pytest.fixture(scope="module")
def mni():
    """The MNI152 T1 template, downsampled to 2 mm so the test stays quick."""
    img = sitk.ReadImage(str(mni152_t1()), sitk.sitkFloat32)
    return sitk.Resample(img, [s // 2 for s in img.GetSize()], sitk.Transform(), sitk.sitkLinear, img.GetOrigin(),
                         [2 * s for s in img.GetSpacing()], img.GetDirection(), 0.0, sitk.sitkFloat32)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def test_implanted_bright_lesion_is_segmented_where_it_was_put(model, mni):
    lesioned, truth = implant_lesion(mni, radii_mm=(14.0, 11.0, 12.0), contrast=0.6)
    result = detect(lesioned, model, DetectionSettings(fpr=1e-3, seed=0))
    seg = sitk.GetArrayFromImage(result.segmentation).astype(bool)
    gt = sitk.GetArrayFromImage(truth).astype(bool)
    score = sitk.GetArrayFromImage(result.anomaly_map)
    assert result.segmentation.GetSize() == mni.GetSize()
    # Where it was put: the largest segmented lesion's centroid lies within 10 mm (5 voxels at this 2 mm
    # test resolution) of the implanted lesion's centre.
    assert result.lesions, "at least one lesion row"
    largest = result.lesions[0]
    k, j, i = np.argwhere(gt).mean(axis=0)
    centre = np.array(lesioned.TransformContinuousIndexToPhysicalPoint((i, j, k)))
    found = np.array([-largest["centroid_r"], -largest["centroid_a"], largest["centroid_s"]])
    assert np.linalg.norm(found - centre) < 10.0
    # The map singles the lesion out: its mean score inside the lesion is several times that of the rest
    # of the brain (measured with the shipped model: 0.24 vs 0.058; the 2,466-step model: 0.28 vs 0.06).
    brain = sitk.GetArrayFromImage(mni) > 20
    assert score[gt].mean() > 3 * score[brain & ~gt].mean()
    # Dice threshold, justified by measurement: the shipped 64 x 64 model under-segments at the
    # conservative Br35H-calibrated FPR of 1e-3 (Dice 0.146 measured; 0.30 at the best threshold, 0.25;
    # the 2,466-step model: 0.15 and 0.46).
    # 0.1 guards against losing the lesion altogether, which is what this test is for.
    assert _dice(seg, gt) > 0.1


@pytest.mark.parametrize("fpr", [1e-3, 1e-4])
def test_untouched_healthy_volume_keeps_the_calibrated_false_positive_rate(model, mni, fpr):
    """A healthy scan stays (nearly) clean: the flagged share of the head is at most twice the per-voxel
    false-positive rate the threshold was calibrated for on other healthy scans (Br35H 900-959).

    Measured with the shipped model (6,000 steps): 9.8e-4 at FPR 1e-3 (16 small spots, 1.9 mL) and
    3.8e-5 at FPR 1e-4 (one 0.07 mL spot). The 2,466-step model flagged nothing at 1e-4; the test asked
    for zero lesions then, which states more than the calibration promises."""
    from synomaly.prepare import foreground_mask

    result = detect(mni, model, DetectionSettings(fpr=fpr, seed=0))
    flagged = sitk.GetArrayFromImage(result.segmentation).astype(bool)
    head = foreground_mask(sitk.GetArrayFromImage(mni))
    assert flagged.sum() / head.sum() <= 2 * fpr
    assert not (flagged & ~head).any()
    if fpr == 1e-4:
        assert len(result.lesions) <= 1 and result.report["anomalous_volume_ml"] < 0.2
