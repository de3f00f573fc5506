"""Review helpers: show detection results with Slicer's own views (the scene is always an argument).

- the input and the counterfactual side by side in two linked slice views,
- the anomaly map as a coloured foreground overlay (transparent below the threshold),
- the segmentation outlined on top,
- slice views jumped to a lesion's centroid,
- a training loss curve in a plot view.
"""

from __future__ import annotations

from typing import Optional, Sequence

import slicer

#: Colour maps for the anomaly map, first one present in the scene wins.
ANOMALY_COLOR_NODE_IDS = (
    "vtkMRMLColorTableNodeFileInferno.txt",
    "vtkMRMLPETProceduralColorNodePET-Heat",
    "vtkMRMLColorTableNodeRainbow",
)
INPUT_VIEW, COUNTERFACTUAL_VIEW = "Red", "Yellow"  # the two slice views of the side-by-side layout


def composite_node(scene, layout_name: str):
    """The slice composite node of the slice view named `layout_name` (e.g. 'Red'), or None."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        if node.GetLayoutName() == layout_name:
            return node
    return None


def slice_node(scene, layout_name: str):
    """The slice node of the slice view named `layout_name`, or None."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLSliceNode")
        if node.GetLayoutName() == layout_name:
            return node
    return None


def style_anomaly_map(scene, anomaly_map, threshold: Optional[float] = None) -> None:
    """A heat colour map, window from the threshold to the map's maximum, transparent below the threshold."""
    if anomaly_map.GetDisplayNode() is None:
        anomaly_map.CreateDefaultDisplayNodes()
    display = anomaly_map.GetDisplayNode()
    for color_id in ANOMALY_COLOR_NODE_IDS:
        if scene.GetNodeByID(color_id) is not None:
            display.SetAndObserveColorNodeID(color_id)
            break
    low, high = anomaly_map.GetImageData().GetScalarRange() if anomaly_map.GetImageData() else (0.0, 1.0)
    low = float(threshold) if threshold is not None and threshold > 0 else low
    high = max(float(high), low + 1e-6)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(low, high)
    display.SetApplyThreshold(True)
    display.SetLowerThreshold(low)
    display.SetUpperThreshold(max(high, low) * 10 + 1)


def show_side_by_side(scene, input_volume, counterfactual, anomaly_map=None, segmentation=None,
                      threshold: Optional[float] = None, overlay_opacity: float = 0.5) -> None:
    """Two linked slice views: input (with the anomaly overlay) on the left, counterfactual on the right."""
    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    if layout is not None:
        layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
    if anomaly_map is not None:
        style_anomaly_map(scene, anomaly_map, threshold)
    for view, background in ((INPUT_VIEW, input_volume), (COUNTERFACTUAL_VIEW, counterfactual)):
        composite = composite_node(scene, view)
        if composite is None:
            continue
        composite.SetBackgroundVolumeID(background.GetID() if background is not None else None)
        if anomaly_map is not None:
            composite.SetForegroundVolumeID(anomaly_map.GetID())
            composite.SetForegroundOpacity(overlay_opacity)
        composite.SetLinkedControl(True)
        composite.SetHotLinkedControl(True)
    # Both views show the same orientation so that linked panning and zooming line up.
    left, right = slice_node(scene, INPUT_VIEW), slice_node(scene, COUNTERFACTUAL_VIEW)
    if left is not None and right is not None:
        right.SetOrientation(left.GetOrientationString())
    if segmentation is not None and segmentation.GetDisplayNode() is not None:
        segmentation.GetDisplayNode().SetVisibility(True)


def jump_to(scene, ras: Sequence[float], centered: bool = True) -> None:
    """Move every slice view to the point `ras` (world RAS, mm), centring it if asked."""
    mode = slicer.vtkMRMLSliceNode.CenteredJumpSlice if centered else slicer.vtkMRMLSliceNode.OffsetJumpSlice
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, float(ras[0]), float(ras[1]), float(ras[2]), mode)


def show_loss_chart(scene, loss_table, title: str = "Training loss", chart=None):
    """A plot chart of loss against iteration (training and validation), shown in the plot view."""
    if chart is None:
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", title)
    chart.SetTitle(title)
    chart.SetXAxisTitle("iteration")
    chart.SetYAxisTitle("loss")
    chart.SetYAxisLogScale(True)
    for column, colour in (("loss", (0.2, 0.4, 0.9)), ("val_loss", (0.9, 0.3, 0.1))):
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{title} {column}")
        series.SetAndObserveTableNodeID(loss_table.GetID())
        series.SetXColumnName("iteration")
        series.SetYColumnName(column)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone if column == "loss"
                              else slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        series.SetColor(*colour)
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    if layout is not None:
        layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalPlotView)
    view = scene.GetFirstNodeByClass("vtkMRMLPlotViewNode")
    if view is not None:
        view.SetPlotChartNodeID(chart.GetID())
    return chart


def chart_nodes(scene, chart) -> list:
    """The chart and its series nodes (to remove them together)."""
    nodes = [chart]
    for index in range(chart.GetNumberOfPlotSeriesNodes()):
        series = chart.GetNthPlotSeriesNode(index)
        if series is not None:
            nodes.append(series)
    return nodes
