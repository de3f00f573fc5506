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
    # of the brain (measured with the shipped model: 0.28 vs 0.06).
    brain = sitk.GetArrayFromImage(mni) > 20
    assert score[gt].mean() > 3 * score[brain & ~gt].mean()
    # Dice threshold, justified by measurement: the shipped 64 x 64 model under-segments at the
    # conservative Br35H-calibrated FPR of 1e-3 (Dice 0.15 measured; 0.46 at the best threshold, 0.25).
    # 0.1 guards against losing the lesion altogether, which is what this test is for.
    assert _dice(seg, gt) > 0.1


def test_untouched_healthy_volume_has_no_lesion(model, mni):
    result = detect(mni, model, DetectionSettings(fpr=1e-4, seed=0))
    assert sitk.GetArrayFromImage(result.segmentation).sum() == 0
    assert result.lesions == []
