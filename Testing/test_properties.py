"""Property-based tests (hypothesis) of scan preparation and post-processing over random shapes, spacings,
directions and intensities: outputs on the input grid, exact inverses, finite values, a binary segmentation
without components below the minimum size, and a lesion table consistent with the segmentation."""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from synomaly.detect import lesion_table, postprocess
from synomaly.prepare import (grid_to_oriented, orient_array, orientation_permutation, oriented_to_image,
                              prepare_scan, unorient_array)
from synomaly.train import new_card

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CARDS = {o: new_card(f"prop-{o}", grid=32, channels=(32, 32), orientation=o) for o in ("axial", "coronal", "sagittal")}

spacing_1d = st.floats(0.1, 5.0, allow_nan=False, allow_infinity=False)
origin_1d = st.floats(-500.0, 500.0, allow_nan=False, allow_infinity=False)


@st.composite
def directions(draw, dim: int) -> tuple[float, ...]:
    """A random rotation (uniform through a random quaternion or angle), an axis permutation or the
    identity, optionally with a reflection; flattened row-major as SimpleITK wants."""
    kind = draw(st.sampled_from(["identity", "permutation", "rotation"]))
    if kind == "identity":
        m = np.eye(dim)
    elif kind == "permutation":
        perm = draw(st.permutations(list(range(dim))))
        m = np.eye(dim)[list(perm)]
    elif dim == 2:
        a = draw(st.floats(-math.pi, math.pi))
        m = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    else:
        from scipy.spatial.transform import Rotation

        q = np.array(draw(st.tuples(*[st.floats(-1, 1)] * 4)))
        assume(np.linalg.norm(q) > 1e-3)
        m = Rotation.from_quat(q / np.linalg.norm(q)).as_matrix()
    if draw(st.booleans()):
        m = m @ np.diag([-1.0] + [1.0] * (dim - 1))
    return tuple(float(v) for v in m.ravel())


@st.composite
def scans(draw) -> sitk.Image:
    """A small 2D or 3D scan with a textured body, random geometry and random intensity offset/scale/type."""
    dim = draw(st.sampled_from([2, 3]))
    if dim == 2:
        shape = (draw(st.integers(12, 40)), draw(st.integers(12, 40)))
    else:
        shape = (draw(st.integers(2, 9)), draw(st.integers(12, 36)), draw(st.integers(12, 36)))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = sum(g**2 for g in grids) < 0.75**2 * dim
    contrast = np.where(body, 1.0, 0.0) + 0.3 * body * rng.random(shape)
    scale = draw(st.sampled_from([1e-3, 1.0, 100.0, 4000.0]))
    offset = draw(st.sampled_from([0.0, -0.25, 2.5, 10.0])) * scale  # relative: float32 keeps the contrast
    arr = contrast * scale + offset
    pixel = draw(st.sampled_from(["float32", "int16", "uint16"]))
    if pixel != "float32":
        info = np.iinfo(pixel)
        assume(scale >= 100 and arr.min() >= info.min and arr.max() <= info.max)
        arr = np.round(arr)
    img = sitk.GetImageFromArray(arr.astype(pixel))
    img.SetSpacing(draw(st.tuples(*[spacing_1d] * dim)))
    img.SetOrigin(draw(st.tuples(*[origin_1d] * dim)))
    img.SetDirection(draw(directions(dim)))
    return img


def _same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetDirection() == b.GetDirection()


@SETTINGS
@given(image=scans(), orientation=st.sampled_from(sorted(CARDS)))
def test_prepare_and_back_lands_exactly_on_the_input_grid(image, orientation):
    prep = prepare_scan(image, CARDS[orientation])
    g = CARDS[orientation].grid_size
    s = prep.slices.shape[0]
    assert prep.slices.shape == (s, 1, g, g) and prep.masks.shape == (s, 1, g, g) and s >= 1
    assert prep.masks.dtype == torch.bool
    assert torch.isfinite(prep.slices).all() and prep.slices.min() >= -1 and prep.slices.max() <= 1
    assert np.all(np.diff(prep.slice_index) > 0) and 0 <= prep.slice_index[0] and prep.slice_index[-1] < prep.oriented.shape[0]
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    # the oriented volume is a pure re-indexing of the input: mapping it back gives the input voxel for voxel
    back = oriented_to_image(prep.oriented, prep)
    _same_grid(back, image)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), arr)
    # model-grid values come back on the input grid, finite, inside [-1, 1] on analysed slices, fill elsewhere
    oriented = grid_to_oriented(prep.slices, prep, fill=-7.0)
    assert oriented.shape == prep.oriented.shape
    out = oriented_to_image(oriented, prep)
    _same_grid(out, image)
    values = sitk.GetArrayViewFromImage(out)
    assert np.isfinite(values).all()
    analysed = np.zeros(prep.oriented.shape[0], bool)
    analysed[prep.slice_index] = True
    inside = oriented[analysed]
    tol = 1e-5  # bilinear weights sum to 1 only up to float32 rounding
    assert ((inside >= -1 - tol) & (inside <= 1 + tol) | (inside == -7.0)).all(), float(inside[inside != -7.0].max())
    assert (oriented[~analysed] == -7.0).all()
    # the foreground mask comes back as a binary image on the grid as well
    mask = oriented_to_image(prep.foreground.astype(np.uint8), prep, sitk.sitkUInt8)
    _same_grid(mask, image)
    assert set(np.unique(sitk.GetArrayViewFromImage(mask))) <= {0, 1}


@SETTINGS
@given(shape=st.tuples(*[st.integers(1, 6)] * 3), perm=st.permutations([0, 1, 2]),
       flips=st.tuples(*[st.booleans()] * 3), seed=st.integers(0, 2**16))
def test_orient_and_unorient_are_exact_inverses(shape, perm, flips, seed):
    a = np.random.default_rng(seed).integers(-1000, 1000, size=shape).astype(np.float32)
    o = orient_array(a, tuple(perm), tuple(flips))
    assert o.shape == tuple(shape[p] for p in perm)
    np.testing.assert_array_equal(unorient_array(o, tuple(perm), tuple(flips)), a)
    b = np.random.default_rng(seed + 1).random(o.shape).astype(np.float32)
    np.testing.assert_array_equal(orient_array(unorient_array(b, tuple(perm), tuple(flips)), tuple(perm), tuple(flips)), b)


@SETTINGS
@given(direction=directions(3), orientation=st.sampled_from(sorted(CARDS)))
def test_orientation_permutation_is_a_permutation_for_any_direction(direction, orientation):
    img = sitk.Image([4, 5, 6], sitk.sitkFloat32)
    img.SetDirection(direction)
    transpose, flips = orientation_permutation(img, orientation)
    assert sorted(transpose) == [0, 1, 2]
    assert len(flips) == 3 and all(isinstance(f, bool) for f in flips)


@st.composite
def score_maps(draw):
    """A smooth random anomaly map (2D or 3D) with blobs of many sizes, its image geometry and settings."""
    dim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.integers(3, 14)) for _ in range(dim))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    raw = ndimage.gaussian_filter(rng.random(shape), draw(st.floats(0.5, 2.0)))
    score = ((raw - raw.min()) / max(float(np.ptp(raw)), 1e-9)).astype(np.float32)
    image = sitk.GetImageFromArray(score)
    image.SetSpacing(draw(st.tuples(*[spacing_1d] * dim)))
    image.SetOrigin(draw(st.tuples(*[origin_1d] * dim)))
    image.SetDirection(draw(directions(dim)))
    return score, image, draw(st.floats(0.0, 0.95)), draw(st.floats(0.0, 60.0))


@SETTINGS
@given(case=score_maps())
def test_postprocess_gives_a_binary_mask_of_components_no_smaller_than_the_minimum(case):
    score, image, threshold, min_mm3 = case
    voxel_mm3 = float(np.prod(image.GetSpacing()))
    binary, labels = postprocess(score, threshold, image.GetSpacing(), min_mm3)
    assert binary.dtype == bool and binary.shape == score.shape
    np.testing.assert_array_equal(binary, labels > 0)
    assert not (binary & ~(score > threshold)).any(), "segmented voxels must exceed the threshold"
    n = int(labels.max())
    assert set(np.unique(labels)) == set(range(n + 1)), "labels are 0..n without gaps"
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    assert (counts * voxel_mm3 >= min_mm3 * (1 - 1e-9)).all()
    # nothing big enough is dropped: exactly the large 3D (full connectivity) components of score > threshold
    full, m = ndimage.label(score > threshold, structure=np.ones((3,) * score.ndim))
    sizes = np.bincount(full.ravel(), minlength=m + 1)
    big = sizes * voxel_mm3 >= min_mm3
    big[0] = False
    np.testing.assert_array_equal(binary, big[full])


@SETTINGS
@given(case=score_maps())
def test_lesion_table_agrees_with_the_segmentation(case):
    score, image, threshold, min_mm3 = case
    binary, labels = postprocess(score, threshold, image.GetSpacing(), min_mm3)
    rows = lesion_table(labels, score, image)
    assert len(rows) == int(labels.max())
    assert [r["id"] for r in rows] == list(range(1, len(rows) + 1))
    assert [r["voxels"] for r in rows] == sorted((r["voxels"] for r in rows), reverse=True)
    assert sum(r["voxels"] for r in rows) == int(binary.sum())
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    tol = 0.01 * math.sqrt(3) / min(image.GetSpacing()) + 1e-6  # centroids are rounded to 0.01 mm
    dim = image.GetDimension()
    for r in rows:
        assert abs(r["volume_ml"] - r["voxels"] * voxel_ml) <= 5e-5 + 1e-9 * r["voxels"] * voxel_ml
        assert threshold - 1e-4 <= r["mean_score"] <= r["max_score"] + 1e-4 <= float(score.max()) + 2e-4
        lo = [r["bbox_i0"], r["bbox_j0"], r["bbox_k0"]][:dim]
        hi = [r["bbox_i1"], r["bbox_j1"], r["bbox_k1"]][:dim]
        box = np.prod([h - l + 1 for l, h in zip(lo, hi)])
        assert r["voxels"] <= box
        ras = (r["centroid_r"], r["centroid_a"], r["centroid_s"])
        lps = (-ras[0], -ras[1], ras[2])[:dim]
        index = image.TransformPhysicalPointToContinuousIndex(lps)
        for c, a, b in zip(index, lo, hi):
            assert a - tol <= c <= b + tol, f"centroid index {index} outside the box {lo}..{hi}"
        if dim == 2:
            assert r["bbox_k0"] == r["bbox_k1"] == 0 and r["centroid_s"] == 0


@SETTINGS
@given(shape=st.tuples(st.integers(1, 4), st.integers(1, 24), st.integers(1, 24)), density=st.floats(0.2, 0.9),
       seed=st.integers(0, 2**16), smooth=st.booleans())
def test_hole_filling_equals_two_dimensional_fill_holes_of_every_slice(shape, density, seed, smooth):
    from synomaly.prepare import fill_holes_per_slice

    mask = np.random.default_rng(seed).random(shape) < density
    if smooth:
        mask = ndimage.binary_opening(mask, structure=np.ones((1, 2, 2), bool))
    expected = np.stack([ndimage.binary_fill_holes(s) for s in mask])  # default 2D structure: 4-connected
    assert np.array_equal(fill_holes_per_slice(mask), expected)
