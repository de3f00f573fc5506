"""The same scan, model and seed give the same result whatever the batch size (issue 15: the execution plan
may change per device without changing what a user sees)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from synomaly.detect import DetectionSettings, detect, run_stages, stage_noise
from synomaly.modelio import load_model


def _volume(seed: int = 0) -> sitk.Image:
    """A head-like volume with texture and a bright blob (numpy (k, j, i) = (12, 40, 40))."""
    k, j, i = np.mgrid[:12, :40, :40].astype(np.float32)
    body = ((i - 19.5) / 16) ** 2 + ((j - 19.5) / 17) ** 2 < 1
    rng = np.random.default_rng(seed)
    arr = np.where(body, 100 + 10 * np.sin(i / 3) + 4 * rng.standard_normal(body.shape), 0).astype(np.float32)
    arr[4:8, 14:20, 22:28] += 60
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.2, 1.2, 3.0))
    return img


def test_noise_of_a_stage_is_drawn_for_every_slice_at_once():
    gen = torch.Generator().manual_seed(5)
    noise = stage_noise((6, 1, 8, 8), 2, 3, gen, torch.device("cpu"))
    assert noise.shape == (2, 3, 6, 1, 8, 8)
    again = stage_noise((6, 1, 8, 8), 2, 3, torch.Generator().manual_seed(5), torch.device("cpu"))
    assert torch.equal(noise, again)


def test_multi_stage_result_does_not_depend_on_the_batch_size(tiny_model_file):
    model = load_model(tiny_model_file, device="cpu", precision="fp32")
    x = torch.rand(7, 1, 32, 32) * 2 - 1
    m = torch.ones_like(x)
    runs = [run_stages(model, x, m, t=(50, 200), kernel=3, threshold=0.05, max_stages=4, batch_size=b, draws=2,
                       seed=3) for b in (1, 3, 8)]
    for r in runs[1:]:
        assert torch.equal(r.stages, runs[0].stages)
        assert torch.allclose(r.score, runs[0].score, atol=1e-5)
        assert torch.allclose(r.healed, runs[0].healed, atol=1e-5)
    assert int(runs[0].stages.max()) > 1, "some slices went on healing, so later stages were compared too"


def test_detect_gives_the_same_maps_and_lesions_at_any_batch_size(tiny_model_file):
    model = load_model(tiny_model_file, device="cpu", precision="fp32")
    image = _volume()
    results = [detect(image, model, DetectionSettings(batch_size=b, threshold=0.1, max_stages=3, device="cpu",
                                                      precision="fp32")) for b in (1, 5, 16)]
    ref = sitk.GetArrayFromImage(results[0].anomaly_map)
    for r in results[1:]:
        np.testing.assert_allclose(sitk.GetArrayFromImage(r.anomaly_map), ref, atol=1e-5)
        assert np.array_equal(sitk.GetArrayFromImage(r.segmentation), sitk.GetArrayFromImage(results[0].segmentation))
        assert [row["voxels"] for row in r.lesions] == [row["voxels"] for row in results[0].lesions]
