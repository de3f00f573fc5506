"""Outputs lie exactly on the input grid: size, spacing, origin, direction, voxel for voxel."""

import numpy as np
import SimpleITK as sitk
import torch

from synomaly.prepare import grid_to_oriented, orient_array, orientation_permutation, oriented_to_image, prepare_scan
from synomaly.train import new_card


def _oblique_volume(size=(40, 36, 12), spacing=(0.9, 1.3, 4.0), origin=(-12.5, 30.0, 7.25)):
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    flip = np.diag([1, -1, 1])  # also mirror an axis, as some scanners do
    direction = (rot @ flip)[:, [1, 0, 2]]  # and swap the first two index axes
    k, j, i = np.meshgrid(np.arange(size[2]), np.arange(size[1]), np.arange(size[0]), indexing="ij")
    arr = np.zeros(size[::-1], np.float32)
    blob = ((i - size[0] / 2) ** 2 / 150 + (j - size[1] / 2) ** 2 / 100) < 1
    arr[blob] = 100 + 3 * i[blob] + 7 * k[blob]
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction.flatten().tolist())
    return img


def test_round_trip_keeps_geometry_exactly():
    img = _oblique_volume()
    card = new_card("geo", grid=32, channels=(32, 32))
    prep = prepare_scan(img, card)
    out = oriented_to_image(prep.oriented, prep)
    assert out.GetSize() == img.GetSize()
    assert out.GetSpacing() == img.GetSpacing()
    assert out.GetOrigin() == img.GetOrigin()
    assert out.GetDirection() == img.GetDirection()
    assert np.array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(img))


def test_slice_values_return_to_their_voxels():
    img = _oblique_volume()
    card = new_card("geo", grid=32, channels=(32, 32))
    prep = prepare_scan(img, card)
    # a constant per slice on the grid must come back on exactly that oriented slice
    values = torch.arange(1, prep.slices.shape[0] + 1, dtype=torch.float32).view(-1, 1, 1, 1).expand_as(prep.slices)
    back = grid_to_oriented(values.contiguous(), prep)
    for n, z in enumerate(prep.slice_index):
        inside = back[z][back[z] != 0]
        assert np.allclose(inside, n + 1)
    # and the map lands on the input's own voxel grid
    out = oriented_to_image(back, prep)
    assert out.GetSize() == img.GetSize() and out.GetDirection() == img.GetDirection()


def test_axial_orientation_puts_superior_slices_last():
    img = _oblique_volume()
    tr, fl = orientation_permutation(img, "axial")
    arr = sitk.GetArrayFromImage(img)
    oriented = orient_array(arr, tr, fl)
    # the slice axis runs towards superior: physical z of slice centres increases
    d = np.array(img.GetDirection()).reshape(3, 3)
    assert oriented.shape[0] == arr.shape[0]  # the through-plane axis (k) is the slice axis here
    assert d[2, 2] > 0 and not fl[0]


def test_2d_image_round_trip():
    arr = np.zeros((50, 70), np.float32)
    arr[10:40, 15:60] = np.linspace(10, 200, 45)[None, :]
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 0.7))
    img.SetOrigin((3.0, -4.0))
    card = new_card("geo", grid=32, channels=(32, 32))
    prep = prepare_scan(img, card)
    assert prep.slices.shape == (1, 1, 32, 32)
    out = oriented_to_image(prep.oriented, prep)
    assert out.GetDimension() == 2 and out.GetSize() == img.GetSize() and out.GetSpacing() == img.GetSpacing()
    assert np.array_equal(sitk.GetArrayFromImage(out), arr)
