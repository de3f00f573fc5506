#!/usr/bin/env python
"""Render the ExtensionsIndex screenshots (Docs/Screenshots/*.png) from a `synomaly demo` output.

The pictures are Slicer's own slice views, drawn offscreen with the MRML libraries of the
`slicer-core` wheel: a scene with Slicer's application logic, colour and segmentation logic,
one vtkMRMLSliceLogic per view (it reslices and blends the background/foreground layers exactly
as the application does) and the segmentations' slice-view displayable manager (outline and
fill, as the application draws them). The results are loaded with the module's own code (SynomalyDetectLib.bridge,
as DetectionJob.load_results does) and shown with the module's review layout
(SynomalyDetectLib.review.show_side_by_side: input on the left, counterfactual on the right,
anomaly map as foreground, segmentation outlined, both views at the lesion).

Differences from the application (the Qt widgets are not in the wheel): no view controller bars
(a small label names each view instead) and the anomaly map uses PET-Heat, the module's fallback
colour table, because the wheel does not ship Slicer's colour files (the application uses Inferno).

    synomaly demo -o /tmp/demo
    python scripts/screenshots.py /tmp/demo            # -> Docs/Screenshots/*.png

No display is needed: VTK renders offscreen with EGL (Mesa's software EGL works; set
VTK_DEFAULT_OPENGL_WINDOW=vtkOSOpenGLRenderWindow for OSMesa). Run it with the project's venv.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # no X display needed

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "SynomalyDetect"))

import numpy as np  # noqa: E402
import slicer  # noqa: E402  (slicer-core)
import vtk  # noqa: E402
from vtk.util.numpy_support import vtk_to_numpy  # noqa: E402

from SynomalyDetectLib import bridge, review  # noqa: E402
from synomaly.contract import DEMO_FILE, RESULT_FILES  # noqa: E402

CASE = "mni152_implanted_lesion"  # the demo's 3D case
INPUT_FILE = DEMO_FILE
VIEW_SIZE = (480, 560)  # width, height of one slice view, pixels
#: Slicer's slice view colours (the bar above each view in the application)
VIEW_COLORS = {"Red": (0xF3 / 255, 0x4A / 255, 0x33 / 255), "Yellow": (0xED / 255, 0xD5 / 255, 0x4C / 255)}
#: the orientation the application's layout manager gives each slice view
VIEW_ORIENTATIONS = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}


#: Slicer's side-by-side layout (qMRMLLayoutManager), so that review.show_side_by_side can select it
SIDE_BY_SIDE_LAYOUT = """<layout type="horizontal">
 <item><view class="vtkMRMLSliceNode" singletontag="Red"><property name="orientation" action="default">Axial</property>
  <property name="viewlabel" action="default">R</property><property name="viewcolor" action="default">#F34A33</property></view></item>
 <item><view class="vtkMRMLSliceNode" singletontag="Yellow"><property name="orientation" action="default">Sagittal</property>
  <property name="viewlabel" action="default">Y</property><property name="viewcolor" action="default">#EDD54C</property></view></item>
</layout>"""


class App:
    """The core of a Slicer application: scene, application logic and the module logics the views use."""

    def __init__(self):
        out = vtk.vtkOutputWindow()
        out.SetDisplayModeToAlwaysStdErr()
        vtk.vtkOutputWindow.SetInstance(out)
        self.scene = slicer.vtkMRMLScene()
        crosshair = slicer.vtkMRMLCrosshairNode()
        crosshair.SetCrosshairName("default")
        self.scene.AddNode(crosshair)
        self.logic = slicer.vtkSlicerApplicationLogic()
        self.logic.SetMRMLScene(self.scene)
        self.logic.SetSliceLogics(vtk.vtkCollection())
        self.logic.SetViewLogics(vtk.vtkCollection())
        colors = self.logic.GetColorLogic()  # the default (procedural) colour tables
        colors.SetMRMLScene(self.scene)
        if self.scene.GetNodeByID("vtkMRMLPETProceduralColorNodePET-Heat") is None:
            colors.AddDefaultColorNodes()
        self.modules = []
        for name, module in (("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic()),
                             ("Volumes", slicer.vtkSlicerVolumesLogic())):
            module.SetMRMLApplicationLogic(self.logic)
            module.SetMRMLScene(self.scene)
            self.logic.SetModuleLogic(name, module)
            self.modules.append(module)
        slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance().SetMRMLApplicationLogic(self.logic)
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(self.scene, True)
        layout = slicer.vtkMRMLLayoutNode()
        layout.AddLayoutDescription(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView, SIDE_BY_SIDE_LAYOUT)
        self.scene.AddNode(layout)


SLICE_MANAGERS = ("vtkMRMLSegmentationsDisplayableManager2D",)  # draws segmentations in slice views


class SliceView:
    """An offscreen slice view: what qMRMLSliceWidget does, without Qt.

    The slice logic produces the blended RGBA slice image; a 2D image actor shows it (as CTK's
    vtkLightBoxRendererManager does in the application) and the displayable managers draw the
    segmentation and annotations on top.
    """

    def __init__(self, app: App, name: str, size=VIEW_SIZE):
        self.name = name
        self.renderer = vtk.vtkRenderer()
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.window = vtk.vtkRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.window.SetMultiSamples(0)
        self.window.AddRenderer(self.renderer)
        self.window.SetSize(*size)
        self.interactor = vtk.vtkRenderWindowInteractor()  # the displayable managers observe it
        self.interactor.SetRenderWindow(self.window)
        self.interactor.Initialize()
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(app.logic)
        app.logic.GetSliceLogics().AddItem(self.logic)
        self.logic.SetMRMLScene(app.scene)
        self.node = self.logic.AddSliceNode(name)
        self.node.SetLayoutColor(*VIEW_COLORS.get(name, (0.5, 0.5, 0.5)))
        self.node.SetOrientation(VIEW_ORIENTATIONS.get(name, "Axial"))
        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        for manager in SLICE_MANAGERS:
            if not factory.IsDisplayableManagerRegistered(manager):
                factory.RegisterDisplayableManager(manager)
        self.managers = slicer.vtkMRMLDisplayableManagerGroup()
        self.managers.Initialize(factory, self.renderer)
        self.managers.SetMRMLDisplayableNode(self.node)
        mapper = vtk.vtkImageMapper()
        mapper.SetColorWindow(255)
        mapper.SetColorLevel(127.5)
        self.image_actor = vtk.vtkActor2D()
        self.image_actor.SetMapper(mapper)
        self.image_actor.GetProperty().SetDisplayLocationToBackground()
        self.renderer.AddViewProp(self.image_actor)
        self.label = vtk.vtkCornerAnnotation()
        self.label.SetMaximumFontSize(15)
        self.label.SetMinimumFontSize(10)
        self.label.GetTextProperty().SetColor(1, 1, 1)
        self.label.GetTextProperty().ShadowOn()
        self.renderer.AddViewProp(self.label)

    def fit(self) -> None:
        self.logic.ResizeSliceNode(*self.window.GetSize())
        self.logic.FitSliceToBackground()

    def annotate(self, top: str = "", bottom: str = "") -> None:
        self.label.SetText(2, top)  # upper left
        self.label.SetText(0, bottom)  # lower left

    def render(self) -> np.ndarray:
        """The view as an RGB array (rows top to bottom)."""
        self.logic.ResizeSliceNode(*self.window.GetSize())
        self.image_actor.GetMapper().SetInputConnection(self.logic.GetImageDataConnection())
        self.window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.window)
        grab.ReadFrontBufferOff()
        grab.Update()
        image = grab.GetOutput()
        width, height, _ = image.GetDimensions()
        pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)[::-1, :, :3]
        return np.ascontiguousarray(pixels)


def side_by_side(left: np.ndarray, right: np.ndarray, left_color, right_color,
                 bar: int = 6, gap: int = 2) -> np.ndarray:
    """Two views in Slicer's side-by-side layout: a coloured bar above each, a thin gap between."""
    def with_bar(view, color):
        strip = np.empty((bar, view.shape[1], 3), np.uint8)
        strip[:] = (np.array(color) * 255).astype(np.uint8)
        return np.concatenate([strip, view], axis=0)

    left, right = with_bar(left, left_color), with_bar(right, right_color)
    separator = np.full((left.shape[0], gap, 3), 60, np.uint8)
    return np.concatenate([left, separator, right], axis=1)


def save_png(pixels: np.ndarray, path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, optimize=True)
    return path


def load_case(app: App, demo: Path):
    """The demo input and its results in the scene, loaded the way the module loads them."""
    results = demo / CASE
    scene = app.scene
    input_volume = bridge.assign_volume(scene, bridge.read_volume(demo / INPUT_FILE), None, "demo_lesion")
    counterfactual = bridge.assign_volume(scene, bridge.read_volume(results / RESULT_FILES["counterfactual"]),
                                          None, "demo_lesion counterfactual", input_volume)
    anomaly_map = bridge.assign_volume(scene, bridge.read_volume(results / RESULT_FILES["anomaly_map"]),
                                       None, "demo_lesion anomaly map", input_volume)
    segmentation = bridge.assign_segmentation(scene, bridge.read_segmentation(results / RESULT_FILES["segmentation"]),
                                              None, "demo_lesion anomalies", input_volume)
    table = bridge.assign_table(scene, bridge.read_lesions_csv(results / RESULT_FILES["lesions"]), None,
                                "demo_lesion lesions")
    import json
    report = json.loads((results / RESULT_FILES["report"]).read_text(encoding="utf-8"))
    return input_volume, counterfactual, anomaly_map, segmentation, bridge.lesions_from_table(table), report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo", type=Path, help="the folder `synomaly demo -o` wrote")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "Docs" / "Screenshots")
    args = parser.parse_args(argv)

    app = App()
    views = {name: SliceView(app, name) for name in (review.INPUT_VIEW, review.COUNTERFACTUAL_VIEW)}
    input_volume, counterfactual, anomaly_map, segmentation, lesions, report = load_case(app, args.demo)
    threshold = report.get("threshold")
    if not lesions:
        raise SystemExit(f"{args.demo / CASE} lists no lesion to show")
    lesion = max(lesions, key=lambda item: item.volume_ml)

    # What the module does when a detection finishes (SynomalyDetectLogic.finishDetection) ...
    review.show_side_by_side(app.scene, input_volume, counterfactual, anomaly_map, segmentation,
                             threshold=threshold)
    for view in views.values():
        view.fit()  # slicer.util.resetSliceViews()
    # ... and when the user clicks the lesion in the table (SynomalyDetectLogic.jumpToLesion).
    review.jump_to(app.scene, bridge.to_world(input_volume, lesion.centroid_ras))

    red, yellow = views[review.INPUT_VIEW], views[review.COUNTERFACTUAL_VIEW]
    where = f"S {lesion.centroid_ras[2]:.1f} mm"
    opacity = review.composite_node(app.scene, review.INPUT_VIEW).GetForegroundOpacity()
    overlay = f"F: anomaly map ({opacity:.0%}, transparent below {threshold:.3g})" if threshold else "F: anomaly map"
    red.annotate(f"Red: input  {where}", f"B: input\n{overlay}\nsegmentation: fill 35 % and outline")
    yellow.annotate(f"Yellow: counterfactual  {where}",
                    f"B: counterfactual\n{overlay}\nsegmentation: fill 35 % and outline")
    review_picture = side_by_side(red.render(), yellow.render(), VIEW_COLORS["Red"], VIEW_COLORS["Yellow"])

    # The same views with the overlays switched off: what the counterfactual replaced.
    for name in views:
        review.composite_node(app.scene, name).SetForegroundOpacity(0.0)
    segmentation.GetDisplayNode().SetVisibility(False)
    red.annotate(f"Red: input  {where}", "B: input")
    yellow.annotate(f"Yellow: counterfactual  {where}", "B: counterfactual")
    plain_picture = side_by_side(red.render(), yellow.render(), VIEW_COLORS["Red"], VIEW_COLORS["Yellow"])

    for name, pixels in (("SynomalyDetect.png", review_picture), ("SynomalyDetect-counterfactual.png", plain_picture)):
        path = save_png(pixels, args.output / name)
        print(f"{path} ({path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
