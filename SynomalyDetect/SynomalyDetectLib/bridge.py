"""The MRML bridge: volume, segmentation and table nodes <-> numpy, SimpleITK and the engine's files.

Every function that creates nodes takes the scene as an argument (never the global
`slicer.mrmlScene`), so the same code runs in the Slicer application and against the MRML
classes of the `slicer-core` wheel in pytest. Reading is done by Slicer's own storage nodes into
nodes of a scratch scene first, so a file that cannot be read never half-changes a node the
user chose as output.

Geometry conventions: MRML volume nodes hold an IJK-to-RAS matrix; SimpleITK images hold
spacing, origin and direction in LPS. Arrays are indexed (k, j, i) in both.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import slicer
import vtk

# the numbers the engine writes into lesions.csv, in order, and those that are whole numbers
from synomaly.contract import LESION_COLUMNS, LESION_INTEGER_COLUMNS  # standard library only, no torch

#: A colour that stands out on grey-scale images (orange-yellow), for segments without one.
ANOMALY_COLOR = (1.0, 0.65, 0.0)

_LPS_TO_RAS = (-1.0, -1.0, 1.0)


class BridgeError(RuntimeError):
    """A file cannot be read into, or a node cannot be written to, the scene."""


# ---------------------------------------------------------------- geometry


def ijk_to_ras(volume_node) -> "Any":
    """The node's IJK-to-RAS matrix as a 4 x 4 numpy array."""
    import numpy as np

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def set_ijk_to_ras(volume_node, matrix) -> None:
    """Set the node's IJK-to-RAS matrix from a 4 x 4 array."""
    vmatrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vmatrix.SetElement(r, c, float(matrix[r][c]))
    volume_node.SetIJKToRASMatrix(vmatrix)


def ijk_to_ras_from_sitk(image) -> "Any":
    """IJK-to-RAS of a 3D SimpleITK image (LPS spacing/origin/direction) as a 4 x 4 array."""
    import numpy as np

    if image.GetDimension() != 3:
        raise BridgeError(f"expected a 3D image, got {image.GetDimension()}D")
    flip = np.diag(_LPS_TO_RAS)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = flip @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = flip @ np.array(image.GetOrigin(), dtype=float)
    return matrix


def sitk_geometry_from_ijk_to_ras(matrix) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(spacing, origin, direction) in LPS from a 4 x 4 IJK-to-RAS array."""
    import numpy as np

    matrix = np.asarray(matrix, dtype=float)
    flip = np.diag(_LPS_TO_RAS)
    columns = flip @ matrix[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0):
        raise BridgeError("the volume has a zero spacing")
    direction = columns / spacing
    origin = flip @ matrix[:3, 3]
    return tuple(spacing.tolist()), tuple(origin.tolist()), tuple(direction.ravel().tolist())


# ---------------------------------------------------------------- volumes <-> arrays and SimpleITK


def array_from_volume(volume_node) -> "Any":
    """A copy of the voxels, indexed (k, j, i)."""
    if volume_node is None or volume_node.GetImageData() is None:
        raise BridgeError("the volume has no image data")
    return slicer.util.arrayFromVolume(volume_node).copy()


def update_volume_from_array(volume_node, array, ijk_to_ras_matrix=None) -> None:
    """Set voxels (k, j, i) and, if given, the IJK-to-RAS matrix of an existing volume node."""
    import numpy as np

    array = np.asarray(array)
    if array.ndim != 3:
        raise BridgeError(f"expected a 3D array (k, j, i), got shape {array.shape}")
    slicer.util.updateVolumeFromArray(volume_node, np.ascontiguousarray(array))
    if ijk_to_ras_matrix is not None:
        set_ijk_to_ras(volume_node, ijk_to_ras_matrix)


def add_volume_from_array(scene, array, ijk_to_ras_matrix, name: str,
                          class_name: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node in `scene` holding `array` (k, j, i) with the given geometry."""
    node = scene.AddNewNodeByClass(class_name, name)
    update_volume_from_array(node, array, ijk_to_ras_matrix)
    node.CreateDefaultDisplayNodes()
    return node


def volume_to_sitk(volume_node):
    """A SimpleITK image with the node's voxels and geometry (LPS); parent transforms are not applied."""
    import SimpleITK as sitk

    array = array_from_volume(volume_node)
    image = sitk.GetImageFromArray(array, isVector=False)
    spacing, origin, direction = sitk_geometry_from_ijk_to_ras(ijk_to_ras(volume_node))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def add_volume_from_sitk(scene, image, name: str, class_name: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node in `scene` from a 3D SimpleITK image."""
    import SimpleITK as sitk

    return add_volume_from_array(scene, sitk.GetArrayFromImage(image), ijk_to_ras_from_sitk(image), name, class_name)


# ---------------------------------------------------------------- files


def write_volume(volume_node, path: str | Path, compress: bool = False) -> Path:
    """Write a volume node (voxels and geometry, not its parent transform) with Slicer's volume writer."""
    if volume_node is None or volume_node.GetImageData() is None:
        raise BridgeError("the volume has no image data")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(1 if compress else 0)
    if not storage.WriteData(volume_node) or not path.exists():
        raise BridgeError(f"cannot write {volume_node.GetName()} to {path}")
    return path


def _scratch_scene():
    """A private scene to read files into, so the user's scene is only touched once reading succeeded."""
    return slicer.vtkMRMLScene()


def read_volume(path: str | Path, class_name: str = "vtkMRMLScalarVolumeNode"):
    """Read a volume file with Slicer's reader into a new node in a scratch scene (not the user's)."""
    path = Path(path)
    if not path.is_file():
        raise BridgeError(f"{path.name} is missing from the engine's results")
    scratch = _scratch_scene()  # dropped on return: the node keeps its data and leaves the scratch scene
    node = scratch.AddNewNodeByClass(class_name, path.name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node) or node.GetImageData() is None:
        raise BridgeError(f"Slicer cannot read {path.name}")
    return node


def read_segmentation(path: str | Path):
    """Read a .seg.nrrd with Slicer's segmentation reader into a new node in a scratch scene."""
    path = Path(path)
    if not path.is_file():
        raise BridgeError(f"{path.name} is missing from the engine's results")
    scratch = _scratch_scene()
    node = scratch.AddNewNodeByClass("vtkMRMLSegmentationNode", path.name)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise BridgeError(f"Slicer cannot read the segmentation {path.name}")
    return node


def write_segmentation(segmentation_node, path: str | Path) -> Path:
    """Write a segmentation node as .seg.nrrd with Slicer's writer."""
    path = Path(path)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.WriteData(segmentation_node) or not path.exists():
        raise BridgeError(f"cannot write the segmentation to {path}")
    return path


def read_lesions_csv(path: str | Path) -> list[dict[str, Any]]:
    """The engine's lesions.csv as a list of rows with typed values (ints and floats)."""
    path = Path(path)
    if not path.is_file():
        raise BridgeError(f"{path.name} is missing from the engine's results")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in LESION_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise BridgeError(f"{path.name} lacks the columns {', '.join(missing)}")
        rows = []
        for number, raw in enumerate(reader, start=2):
            row: dict[str, Any] = {}
            for column in reader.fieldnames or []:
                text = (raw.get(column) or "").strip()
                try:
                    if column in LESION_INTEGER_COLUMNS:
                        row[column] = int(float(text))
                    elif column in LESION_COLUMNS:
                        row[column] = float(text)
                    else:
                        row[column] = text
                except ValueError as exc:
                    raise BridgeError(f"{path.name} line {number}: {column} is not a number ({text!r})") from exc
            rows.append(row)
    return rows


def write_table(table_node, path: str | Path) -> Path:
    """Write a table node (CSV or TSV by extension) with Slicer's table writer."""
    path = Path(path)
    storage = slicer.vtkMRMLTableStorageNode()
    storage.SetFileName(str(path))
    if not storage.WriteData(table_node) or not path.exists():
        raise BridgeError(f"cannot write the table to {path}")
    return path


# ---------------------------------------------------------------- results into the scene


def _transfer_parent_transform(reference, node) -> None:
    if reference is not None and node is not None and reference.GetParentTransformNode() is not None:
        node.SetAndObserveTransformNodeID(reference.GetParentTransformNode().GetID())


def assign_volume(scene, source, target=None, name: str = "", reference=None):
    """Put the voxels and geometry of `source` (a node read into a scratch scene) into `target`, or a new node.

    `target` is only ever a node the user chose; a new node is created otherwise. The result sits
    under the same parent transform as `reference` (the input volume), so it overlays the input.
    """
    if target is None:
        target = scene.AddNewNodeByClass(source.GetClassName(), name or source.GetName() or "Volume")
    elif target.GetScene() is not scene:
        raise BridgeError(f"{target.GetName()} is not in this scene")
    image = vtk.vtkImageData()
    image.DeepCopy(source.GetImageData())
    matrix = vtk.vtkMatrix4x4()
    source.GetIJKToRASMatrix(matrix)
    was_modifying = target.StartModify()
    target.SetIJKToRASMatrix(matrix)
    target.SetAndObserveImageData(image)
    target.EndModify(was_modifying)
    if target.GetDisplayNode() is None:
        target.CreateDefaultDisplayNodes()
    _transfer_parent_transform(reference, target)
    return target


def _is_default_grey(color: Sequence[float]) -> bool:
    return all(abs(c - 0.5) < 1e-3 for c in color)


def assign_segmentation(scene, source, target=None, name: str = "", reference_volume=None,
                        color: Optional[Sequence[float]] = None):
    """Copy the segments of `source` (read into a scratch scene) into `target` or a new segmentation node.

    The segmentation gets `reference_volume` as its reference geometry (so editing it happens on
    the input's grid) and every segment a visible colour: the one in the file, else `color`, else
    ANOMALY_COLOR.
    """
    if target is None:
        target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or "Anomalies")
    elif target.GetScene() is not scene:
        raise BridgeError(f"{target.GetName()} is not in this scene")
    was_modifying = target.StartModify()
    target.GetSegmentation().DeepCopy(source.GetSegmentation())
    segmentation = target.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        if color is not None:
            segment.SetColor(*color)
        elif _is_default_grey(segment.GetColor()):
            segment.SetColor(*ANOMALY_COLOR)
    if reference_volume is not None:
        target.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        role = target.GetReferenceImageGeometryReferenceRole()
        target.SetNodeReferenceID(role, reference_volume.GetID())
    target.EndModify(was_modifying)
    if target.GetDisplayNode() is None:
        target.CreateDefaultDisplayNodes()
    display = target.GetDisplayNode()
    if display is not None:
        display.SetVisibility(True)
        display.SetVisibility2DFill(True)
        display.SetVisibility2DOutline(True)
        display.SetOpacity2DFill(0.35)
    _transfer_parent_transform(reference_volume, target)
    return target


def segment_array(scene, segmentation_node, segment_id: str, reference_volume) -> "Any":
    """The binary mask (k, j, i) of one segment on the reference volume's grid (a copy)."""
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__synomaly_temp__")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap, reference_volume):
            raise BridgeError(f"cannot export segment {segment_id}")
        return (slicer.util.arrayFromVolume(labelmap) > 0).astype("uint8")
    finally:
        scene.RemoveNode(labelmap)


def segment_names_and_colors(segmentation_node) -> list[tuple[str, str, tuple[float, float, float]]]:
    """(id, name, colour) of every segment, in order."""
    segmentation = segmentation_node.GetSegmentation()
    out = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        out.append((segmentation.GetNthSegmentID(index), segment.GetName(), tuple(segment.GetColor())))
    return out


def assign_table(scene, rows: Iterable[dict[str, Any]], target=None, name: str = "Lesions",
                 columns: Sequence[str] = LESION_COLUMNS):
    """Fill `target` (or a new table node) with typed columns from rows of values."""
    rows = list(rows)
    if target is None:
        target = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    elif target.GetScene() is not scene:
        raise BridgeError(f"{target.GetName()} is not in this scene")
    table = vtk.vtkTable()
    for column in columns:
        values = [row.get(column) for row in rows]
        if column in LESION_INTEGER_COLUMNS and all(isinstance(v, int) for v in values):
            array = vtk.vtkIntArray()
        elif all(isinstance(v, (int, float)) for v in values):
            array = vtk.vtkDoubleArray()
        else:
            array = vtk.vtkStringArray()
        array.SetName(column)
        array.SetNumberOfTuples(len(values))
        for index, value in enumerate(values):
            array.SetValue(index, value if not isinstance(array, vtk.vtkStringArray) else str(value))
        table.AddColumn(array)
    was_modifying = target.StartModify()
    target.SetAndObserveTable(table)
    target.SetUseColumnTitleAsColumnHeader(True)
    target.SetLocked(True)  # results: read-only in the table view
    target.EndModify(was_modifying)
    return target


# ---------------------------------------------------------------- lesions


@dataclass
class Lesion:
    """One row of the lesion table: where it is (RAS, mm) and how large and strong it is."""

    id: int
    centroid_ras: tuple[float, float, float]
    volume_ml: float
    max_score: float

    def describe(self) -> str:
        """A one-line summary for the status text."""
        r, a, s = self.centroid_ras
        return (f"lesion {self.id}: {self.volume_ml:.2f} mL, max score {self.max_score:.3f}, "
                f"at R {r:.1f} A {a:.1f} S {s:.1f}")


def lesions_from_table(table_node) -> list[Lesion]:
    """The lesions listed in a lesion table node, in table order."""
    if table_node is None or table_node.GetTable() is None:
        return []
    table = table_node.GetTable()
    needed = ("id", "centroid_r", "centroid_a", "centroid_s", "volume_ml", "max_score")
    arrays = {name: table.GetColumnByName(name) for name in needed}
    if any(array is None for array in arrays.values()):
        return []

    def number(name: str, row: int) -> float:
        return float(arrays[name].GetVariantValue(row).ToDouble())

    lesions = []
    for row in range(table.GetNumberOfRows()):
        lesions.append(Lesion(
            int(number("id", row)),
            (number("centroid_r", row), number("centroid_a", row), number("centroid_s", row)),
            number("volume_ml", row), number("max_score", row),
        ))
    return lesions


def to_world(node, ras: Sequence[float]) -> tuple[float, float, float]:
    """A point in the node's local RAS mapped through its parent transforms into world RAS."""
    parent = node.GetParentTransformNode() if node is not None else None
    if parent is None:
        return tuple(float(v) for v in ras[:3])
    transform = vtk.vtkGeneralTransform()
    parent.GetTransformToWorld(transform)
    return tuple(transform.TransformPoint([float(v) for v in ras[:3]]))


# ---------------------------------------------------------------- training loss curve


def new_loss_table(scene, name: str):
    """An empty table with columns iteration, loss, validation loss (NaN where not measured)."""
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    for column, title in (("iteration", "Iteration"), ("loss", "Training loss"), ("val_loss", "Validation loss")):
        array = table.AddColumn(vtk.vtkDoubleArray())
        array.SetName(column)
        table.SetColumnTitle(column, title)
    return table


def append_loss(table_node, iteration: int, loss: float, val_loss: Optional[float] = None) -> None:
    """Add one point to a loss table (NaN for a missing validation loss)."""
    table = table_node.GetTable()
    row = table.InsertNextBlankRow()
    table.SetValue(row, 0, vtk.vtkVariant(float(iteration)))
    table.SetValue(row, 1, vtk.vtkVariant(float(loss)))
    table.SetValue(row, 2, vtk.vtkVariant(float("nan") if val_loss is None else float(val_loss)))
    table.Modified()
    table_node.Modified()
