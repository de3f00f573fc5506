"""scripts/screenshots.py renders Slicer slice views offscreen from a demo output (here: the stand-in engine's)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import SimpleITK as sitk

from conftest import skip_or_fail_in_ci, synomaly_env
from slicer_support import FAKE_ENGINE, ROOT

SCRIPT = ROOT / "scripts" / "screenshots.py"


def fake_demo(folder):
    """A demo folder as `synomaly demo` lays it out: the input, and the 3D case's results beside it."""
    folder.mkdir()
    k, j, i = np.mgrid[0:40, 0:48, 0:44].astype(float)
    brain = ((i - 22) / 18) ** 2 + ((j - 24) / 21) ** 2 + ((k - 20) / 17) ** 2 < 1
    volume = np.where(brain, 100.0, 0.0) + np.where(brain, 10 * np.sin(i / 2) * np.cos(j / 3), 0.0)
    volume[np.sqrt((i - 28) ** 2 + (j - 20) ** 2 + (k - 20) ** 2) < 5] = 300.0  # the "lesion"
    image = sitk.GetImageFromArray(volume.astype(np.float32))
    image.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(image, str(folder / "demo_lesion.nrrd"))
    subprocess.run([sys.executable, str(FAKE_ENGINE), "detect", str(folder / "demo_lesion.nrrd"),
                    "-o", str(folder / "mni152_implanted_lesion")], check=True, env=synomaly_env(), timeout=120)
    return folder


def test_screenshots_show_the_review_layout_and_the_bare_counterfactual(tmp_path):
    demo = fake_demo(tmp_path / "demo")
    out = tmp_path / "shots"
    run = subprocess.run([sys.executable, str(SCRIPT), str(demo), "-o", str(out)], capture_output=True, text=True,
                         env=synomaly_env(), timeout=300)
    if run.returncode != 0 and any(word in run.stderr for word in ("OpenGL", "EGL", "GLX", "X server", "OSMesa")):
        skip_or_fail_in_ci(f"no offscreen OpenGL context here: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr
    from PIL import Image

    review = np.asarray(Image.open(out / "SynomalyDetect.png").convert("RGB")).astype(int)
    plain = np.asarray(Image.open(out / "SynomalyDetect-counterfactual.png").convert("RGB")).astype(int)
    assert review.shape == plain.shape and review.shape[1] > review.shape[0]
    half = review.shape[1] // 2
    bar = 6  # the view colour bars (red, yellow) above each view
    assert tuple(review[2, 10]) == (0xF3, 0x4A, 0x33) and tuple(review[2, half + 10]) == (0xED, 0xD5, 0x4C)

    def coloured(picture):  # pixels of the overlays: not grey
        body = picture[bar + 20:-60]  # below the labels, above the layer names
        return int((np.ptp(body, axis=2) > 60).sum())

    assert coloured(review[:, :half]) > 50 and coloured(review[:, half:]) > 50  # map and segmentation, both views
    assert coloured(plain) == 0  # overlays off: grey anatomy only
    width = (plain.shape[1] - 2) // 2  # two views and a 2-pixel gap
    left, right = plain[bar + 20:-60, :width], plain[bar + 20:-60, -width:]
    assert np.abs(left - right).max() > 50  # the counterfactual healed the lesion
