"""Review helpers against real MRML classes: side-by-side linked views, overlay, jumping to lesions, loss chart."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from slicer_support import app_scene, slicer

from SynomalyDetectLib import bridge, review


def volume(scene, name, value=1.0, shape=(8, 16, 16)):
    image = sitk.GetImageFromArray(np.full(shape, value, np.float32))
    image.SetSpacing((1.0, 1.0, 2.0))
    return bridge.add_volume_from_sitk(scene, image, name)


def test_side_by_side_shows_input_and_counterfactual_in_linked_views():
    scene = app_scene()
    source, healed = volume(scene, "input"), volume(scene, "counterfactual")
    anomaly = volume(scene, "map", 0.0)
    bridge.update_volume_from_array(anomaly, np.linspace(0, 2, 8 * 16 * 16, dtype=np.float32).reshape(8, 16, 16))
    review.show_side_by_side(scene, source, healed, anomaly, threshold=0.5)

    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView
    red, yellow = review.composite_node(scene, "Red"), review.composite_node(scene, "Yellow")
    assert red.GetBackgroundVolumeID() == source.GetID()
    assert yellow.GetBackgroundVolumeID() == healed.GetID()
    assert red.GetForegroundVolumeID() == anomaly.GetID()
    assert red.GetLinkedControl() and yellow.GetLinkedControl()
    assert red.GetForegroundOpacity() == pytest.approx(0.5)


def test_anomaly_map_overlay_is_coloured_and_transparent_below_threshold():
    scene = app_scene()
    anomaly = volume(scene, "map", 0.0)
    bridge.update_volume_from_array(anomaly, np.linspace(0, 2, 8 * 16 * 16, dtype=np.float32).reshape(8, 16, 16))
    review.style_anomaly_map(scene, anomaly, threshold=0.5)
    display = anomaly.GetDisplayNode()
    assert display.GetColorNodeID() in review.ANOMALY_COLOR_NODE_IDS
    assert display.GetColorNodeID() != "vtkMRMLColorTableNodeGrey"
    assert display.GetApplyThreshold()
    assert display.GetLowerThreshold() == pytest.approx(0.5)
    assert display.GetWindowLevelMin() == pytest.approx(0.5)
    assert display.GetWindowLevelMax() == pytest.approx(2.0)


def test_jump_to_lesion_centres_the_slice_views():
    scene = app_scene()
    review.jump_to(scene, (12.0, -7.5, 31.0))
    red = review.slice_node(scene, "Red")
    green = review.slice_node(scene, "Green")
    slice_to_ras = red.GetSliceToRAS()
    assert [slice_to_ras.GetElement(i, 3) for i in range(3)] == pytest.approx([12.0, -7.5, 31.0])
    assert red.GetSliceOffset() == pytest.approx(31.0)   # axial view: offset along S
    assert green.GetSliceOffset() == pytest.approx(-7.5)  # coronal view: offset along A


def test_loss_chart_plots_training_and_validation_loss():
    scene = app_scene()
    table = bridge.new_loss_table(scene, "loss")
    bridge.append_loss(table, 1, 0.9)
    chart = review.show_loss_chart(scene, table, "my model")
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    series = [chart.GetNthPlotSeriesNode(i) for i in range(2)]
    assert {s.GetYColumnName() for s in series} == {"loss", "val_loss"}
    assert all(s.GetTableNodeID() == table.GetID() for s in series)
    assert scene.GetFirstNodeByClass("vtkMRMLPlotViewNode").GetPlotChartNodeID() == chart.GetID()
    assert len(review.chart_nodes(scene, chart)) == 3
