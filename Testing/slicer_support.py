"""Helpers for the Slicer-side tests (test_slicer_*.py): real MRML classes from the `slicer-core` wheel.

`app_scene()` makes a scene set up the way the Slicer application sets one up for the code under
test: default colour tables, segmentation converters, a layout node and the slice views of the
side-by-side layout (Red, Yellow, Green) with their composite nodes, and a plot view.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DETECT_DIR = ROOT / "SynomalyDetect"
TRAINING_DIR = ROOT / "SynomalyTraining"
FAKE_ENGINE = DETECT_DIR / "Testing" / "Python" / "synomaly_fake_engine.py"

if str(DETECT_DIR) not in sys.path:
    sys.path.insert(0, str(DETECT_DIR))

try:
    import slicer
except ImportError as exc:  # a declared test dependency: fail loudly rather than skip
    raise ImportError("the Slicer-side tests need the slicer-core wheel: pip install slicer-core") from exc
if not hasattr(slicer, "vtkMRMLScene"):  # the unrelated PyPI package that is also named 'slicer'
    raise ImportError("the installed 'slicer' package is not slicer-core: pip uninstall slicer; pip install slicer-core")


def app_scene():
    """A scene with what the Slicer application would have added (see module docstring)."""
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(scene)
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()  # registers the segmentation converters
    segmentations.SetMRMLScene(scene)
    scene._keep_alive = (colors, segmentations)
    scene.AddNode(slicer.vtkMRMLLayoutNode())
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    for name, orientation in (("Red", "Axial"), ("Yellow", "Axial"), ("Green", "Coronal")):
        slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode", name)
        slice_node.SetLayoutName(name)
        slice_node.SetOrientation(orientation)
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(name)
        scene.AddNode(composite)
    plot_view = slicer.vtkMRMLPlotViewNode()
    plot_view.SetLayoutName("PlotView1")
    scene.AddNode(plot_view)
    return scene


def fake_python() -> list[str]:
    """The command prefix that runs the stand-in engine instead of `python -m synomaly.cli`."""
    return [sys.executable, str(FAKE_ENGINE)]


def quiet_env(**extra: str) -> dict[str, str]:
    """Environment for engine processes in tests: one thread (the machine is shared), plus `extra`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update(extra)
    return env
