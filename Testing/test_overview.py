"""overview.png: its rows go through the largest lesions (by volume), each at its largest cross-section."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from synomaly.detect import lesion_table
from synomaly.outputs import lesion_slices, overview_image
from synomaly.prepare import orient_array, orientation_permutation, unorient_array

SHAPE = (40, 48, 44)  # oriented (slice, row, col)


def _oblique_sagittal_image() -> sitk.Image:
    """An empty image acquired sagittally (index axes permuted, one flipped against LPS), 1.2 x 2 x 1 mm."""
    direction = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], dtype=float)  # columns: i, j, k in LPS
    image = sitk.Image([SHAPE[1], SHAPE[0], SHAPE[2]], sitk.sitkFloat32)  # i: rows (P), j: slices (S), k: cols (L)
    image.SetDirection(direction.flatten().tolist())
    image.SetSpacing((1.2, 2.0, 1.0))
    image.SetOrigin((10.0, -20.0, 5.0))
    return image


def _lesions_oriented() -> tuple[np.ndarray, dict[str, int]]:
    """Three lesions in oriented space and the axial slice expected for each of the two largest."""
    seg = np.zeros(SHAPE, dtype=bool)
    seg[5:30, 10:13, 10:13] = True  # a tall column: the largest lesion (225 + 16 voxels) ...
    seg[21, 9:14, 9:14] = True  # ... widest at slice 21
    seg[34, 25:40, 25:40] = True  # a flat plate: 225 voxels, the most flagged area in one slice
    seg[8:10, 35:38, 5:8] = True  # a small spot (18 voxels)
    return seg, {"column": 21, "plate": 34, "spot": 8}


def test_rows_go_through_the_largest_lesions_at_their_largest_cross_section():
    image = _oblique_sagittal_image()
    tr, fl = orientation_permutation(image, "axial")
    assert tr != (0, 1, 2), "the test needs an image whose axes are permuted"
    seg_o, expected = _lesions_oriented()
    seg_in = unorient_array(seg_o, tr, fl)
    assert seg_in.shape == sitk.GetArrayViewFromImage(image).shape
    labels, _ = ndimage.label(seg_in, structure=np.ones((3, 3, 3), dtype=bool))
    rows = lesion_table(labels.astype(np.int32), seg_in.astype(np.float32), image)
    assert [r["voxels"] for r in rows] == [241, 225, 18]

    seg_view = orient_array(seg_in, tr, fl)
    assert lesion_slices(seg_view, rows, tr, fl, max_rows=2) == [expected["column"], expected["plate"]]
    assert lesion_slices(seg_view, rows, tr, fl, max_rows=3) == [expected["column"], expected["plate"], expected["spot"]]
    # the slices with the most flagged area would have been the plate's first, then the column's widest
    area = seg_o.reshape(SHAPE[0], -1).sum(1)
    assert int(np.argmax(area)) == expected["plate"]


def test_a_lesion_cut_by_a_chosen_row_gets_no_row_of_its_own():
    image = _oblique_sagittal_image()
    tr, fl = orientation_permutation(image, "axial")
    seg_o = np.zeros(SHAPE, dtype=bool)
    seg_o[10:20, 5:15, 5:15] = True  # large, widest everywhere: first slice 10
    seg_o[8:12, 30:34, 30:34] = True  # smaller, also cut by slice 10
    seg_in = unorient_array(seg_o, tr, fl)
    labels, _ = ndimage.label(seg_in, structure=np.ones((3, 3, 3), dtype=bool))
    rows = lesion_table(labels.astype(np.int32), seg_in.astype(np.float32), image)
    assert lesion_slices(orient_array(seg_in, tr, fl), rows, tr, fl) == [10]


def test_overview_has_one_row_per_chosen_lesion():
    image = _oblique_sagittal_image()
    tr, fl = orientation_permutation(image, "axial")
    seg_o, _ = _lesions_oriented()
    seg_in = unorient_array(seg_o, tr, fl)
    labels, _ = ndimage.label(seg_in, structure=np.ones((3, 3, 3), dtype=bool))
    rows = lesion_table(labels.astype(np.int32), seg_in.astype(np.float32), image)

    def like(arr: np.ndarray, pixel=sitk.sitkFloat32) -> sitk.Image:
        out = sitk.Cast(sitk.GetImageFromArray(arr.astype(np.float32)), pixel)
        out.CopyInformation(image)
        return out

    anatomy = like(np.random.default_rng(0).normal(100, 10, seg_in.shape))
    picture = overview_image(anatomy, anatomy, like(seg_in * 1.0), like(seg_in, sitk.sitkUInt8), rows,
                             threshold=0.5, max_rows=2, tile=64)
    assert picture.shape[0] == 2 * (64 + 4) and picture.shape[2] == 3
