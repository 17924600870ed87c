"""The engine's output folder -> MRML nodes (segmentation, heatmaps, transforms, tables).

Files read (written by ``maml segment`` in the reference phase's geometry, see issue 4):
``segmentation.nii.gz``, ``attention_<phase>.nii.gz``, ``transform_<phase>.h5`` and ``stats.json``.
Everything is read and checked before the first node is added; if adding nodes fails half way,
the nodes added so far are removed again, so the scene is either complete or unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import slicer

from .conversion import LPS_FROM_RAS, addVolumeNodeFromImage, ijkToRASFromImage, orientedImageDataFromArray
from .errors import MAMLSegmentationError

# Standard terminology (DICOM / SNOMED CT codes as in Slicer's terminology lists) of the two segments
# and one colour per label everywhere: the engine's (maml.config.LIVER_LABELS: its overview picture
# and DICOM SEG use the same), so a tumor is the same red in Slicer, the overview and PACS.
_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
_ANATOMY = "Anatomic codes - DICOM master list"
STANDARD_SEGMENTS = {
    "liver": {
        "name": "Liver",
        "color": (0.86, 0.57, 0.40),
        "terminology": f"{_CONTEXT}~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~{_ANATOMY}~^^~^^",
    },
    "tumor": {
        "name": "Liver tumor",
        "color": (0.87, 0.30, 0.26),
        "terminology": (
            f"{_CONTEXT}~SCT^49755003^Morphologically Altered Structure~SCT^108369006^Neoplasm~^^"
            f"~{_ANATOMY}~SCT^10200004^Liver~^^"
        ),
    },
}
DEFAULT_LABELS = [
    {"value": 1, "name": "liver", "color": list(STANDARD_SEGMENTS["liver"]["color"])},
    {"value": 2, "name": "tumor", "color": list(STANDARD_SEGMENTS["tumor"]["color"])},
]

HEATMAP_COLOR_NODE_NAME = "MAML attention (inferno)"
HEATMAP_LOWER_THRESHOLD = 0.02
# Control points of matplotlib's perceptually uniform "inferno" map (value, r, g, b).
_INFERNO = [
    (0.00, 0.001, 0.000, 0.014), (0.13, 0.078, 0.043, 0.206), (0.25, 0.258, 0.039, 0.406),
    (0.38, 0.446, 0.098, 0.441), (0.50, 0.615, 0.162, 0.403), (0.63, 0.790, 0.237, 0.320),
    (0.75, 0.929, 0.411, 0.145), (0.88, 0.984, 0.624, 0.030), (1.00, 0.988, 0.998, 0.645),
]


@dataclass
class EngineOutput:
    """The engine's output folder, read into memory (no nodes yet)."""

    folder: Path
    labels: sitk.Image
    attention: dict = field(default_factory=dict)      # phase -> sitk.Image (float32 0..1)
    uncertainty: sitk.Image | None = None              # float32 0..1
    transformFiles: dict = field(default_factory=dict)  # phase -> Path of transform_<phase>.h5
    stats: dict = field(default_factory=dict)


@dataclass
class ImportedNodes:
    segmentation: object = None
    heatmaps: dict = field(default_factory=dict)    # phase -> vtkMRMLScalarVolumeNode
    uncertainty: object = None                      # vtkMRMLScalarVolumeNode
    transforms: dict = field(default_factory=dict)  # phase -> vtkMRMLTransformNode
    statisticsTable: object = None
    tumorTable: object = None
    addedNodes: list = field(default_factory=list)


def readEngineOutput(folder) -> EngineOutput:
    folder = Path(folder)
    segPath = folder / "segmentation.nii.gz"
    if not segPath.is_file():
        raise MAMLSegmentationError(f"The engine wrote no segmentation ({segPath} is missing).")
    try:
        labels = sitk.ReadImage(str(segPath))
    except RuntimeError as error:
        raise MAMLSegmentationError(f"Cannot read {segPath}: {error}") from error
    if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
        raise MAMLSegmentationError(f"{segPath} is not a 3D label image.")
    stats = {}
    statsPath = folder / "stats.json"
    if statsPath.is_file():
        try:
            stats = json.loads(statsPath.read_text())
        except (OSError, ValueError) as error:
            raise MAMLSegmentationError(f"Cannot read {statsPath}: {error}") from error
    attention = {}
    for path in sorted(folder.glob("attention_*.nii.gz")):
        phase = path.name[len("attention_"):-len(".nii.gz")]
        attention[phase] = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
    transforms = {}
    for path in sorted(folder.glob("transform_*.h5")):
        transforms[path.name[len("transform_"):-len(".h5")]] = path
    uncertaintyPath = folder / "uncertainty.nii.gz"
    uncertainty = (sitk.Cast(sitk.ReadImage(str(uncertaintyPath)), sitk.sitkFloat32)
                   if uncertaintyPath.is_file() else None)
    return EngineOutput(folder, labels, attention, uncertainty, transforms, stats)


def _labelDefinitions(stats: dict) -> list:
    labels = (stats.get("model") or {}).get("labels") or DEFAULT_LABELS
    out = []
    for entry in labels:
        value = int(entry["value"])
        if value == 0:
            continue
        key = str(entry.get("name", "")).strip().lower()
        standard = STANDARD_SEGMENTS.get(key) or next(
            (s for k, s in STANDARD_SEGMENTS.items() if s["name"].lower() == key), None
        )
        color = tuple(float(c) for c in (entry.get("color") or (0.5, 0.5, 0.5))[:3])
        if max(color) > 1:  # 0..255 given
            color = tuple(c / 255 for c in color)
        out.append({
            "value": value,
            "name": standard["name"] if standard else str(entry.get("name") or f"Label {value}"),
            "color": standard["color"] if standard else color,
            "terminology": standard["terminology"] if standard else None,
        })
    return out


def heatmapColorNode(scene):
    """The scene's inferno colour node for attention maps (created once, then reused)."""
    existing = scene.GetFirstNodeByName(HEATMAP_COLOR_NODE_NAME)
    if existing is not None and existing.IsA("vtkMRMLProceduralColorNode"):
        return existing, False
    node = slicer.vtkMRMLProceduralColorNode()
    node.SetName(HEATMAP_COLOR_NODE_NAME)
    node.SetAttribute("Category", "MAMLSegmentation")
    node.SetTypeToUser()
    function = node.GetColorTransferFunction()
    function.RemoveAllPoints()
    for value, r, g, b in _INFERNO:
        function.AddRGBPoint(value, r, g, b)
    scene.AddNode(node)
    return node, True


def _setTable(table, columns: list, rows: list) -> None:
    """columns: [(name, vtkArrayClass, unit)], rows: list of tuples."""
    import vtk

    vtable = table.GetTable()
    arrays = []
    for name, cls, unit in columns:
        array = cls()
        array.SetName(name)
        vtable.AddColumn(array)
        if unit:
            table.SetColumnUnitLabel(name, unit)
        arrays.append(array)
    vtable.SetNumberOfRows(len(rows))
    for r, row in enumerate(rows):
        for array, value in zip(arrays, row):
            if isinstance(array, vtk.vtkStringArray):
                array.SetValue(r, str(value))
            else:
                array.SetValue(r, value)
    table.Modified()


def _lpsToRas(point) -> list:
    return [float(v) for v in LPS_FROM_RAS @ np.asarray(point, float)]


def importEngineOutput(scene, output: EngineOutput, phaseNodes: dict, referencePhase: str,
                       outputSegmentation=None, baseName: str = "MAML") -> ImportedNodes:
    """Add the output's nodes to the scene; all or nothing."""
    definitions = _labelDefinitions(output.stats)
    labelArray = sitk.GetArrayFromImage(output.labels)
    ijkToRAS = ijkToRASFromImage(output.labels)
    imported = ImportedNodes()
    try:
        _importSegmentation(scene, imported, definitions, labelArray, ijkToRAS, outputSegmentation, baseName)
        _importHeatmaps(scene, imported, output, baseName)
        _importUncertainty(scene, imported, output, baseName)
        _importTransforms(scene, imported, output, phaseNodes, referencePhase)
        _importTables(scene, imported, output.stats, baseName)
    except Exception:
        for phase, node in imported.transforms.items():
            moving = phaseNodes.get(phase)
            if moving is not None and moving.GetTransformNodeID() == node.GetID():
                moving.SetAndObserveTransformNodeID(None)
        for node in reversed(imported.addedNodes):
            removeNodeWithDependents(scene, node)
        raise
    return imported


def removeNodeWithDependents(scene, node) -> None:
    """Remove a node and the display and storage nodes that belong to it."""
    dependents = []
    for count, get in (("GetNumberOfDisplayNodes", "GetNthDisplayNode"),
                       ("GetNumberOfStorageNodes", "GetNthStorageNode")):
        if hasattr(node, count):
            dependents += [getattr(node, get)(i) for i in range(getattr(node, count)())]
    for dependent in [node, *dependents]:
        if dependent is not None and dependent.GetScene() is scene:
            scene.RemoveNode(dependent)


def _importSegmentation(scene, imported, definitions, labelArray, ijkToRAS, outputSegmentation, baseName):
    names = [d["name"] for d in definitions]
    if outputSegmentation is None:
        segNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{baseName} segmentation")
        imported.addedNodes.append(segNode)
    else:
        segNode = outputSegmentation
    segNode.CreateDefaultDisplayNodes()
    segmentation = segNode.GetSegmentation()
    wasModifying = segNode.StartModify()
    try:
        for name in names:
            segmentId = segmentation.GetSegmentIdBySegmentName(name)
            if segmentId:
                segmentation.RemoveSegment(segmentId)
        for definition in definitions:
            mask = (labelArray == definition["value"]).astype(np.uint8)
            oriented = orientedImageDataFromArray(mask, ijkToRAS)
            segmentId = segNode.AddSegmentFromBinaryLabelmapRepresentation(
                oriented, definition["name"], list(definition["color"])
            )
            segment = segmentation.GetSegment(segmentId)
            if definition["terminology"]:
                segment.SetTerminology(definition["terminology"])
        # Reference geometry = the engine's label grid (the reference phase in world coordinates).
        grid = slicer.vtkOrientedImageData()
        grid.SetExtent(0, labelArray.shape[2] - 1, 0, labelArray.shape[1] - 1, 0, labelArray.shape[0] - 1)
        grid.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ijkToRAS))
        geometry = slicer.vtkSegmentationConverter.SerializeImageGeometry(grid)
        segmentation.SetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(), geometry
        )
    finally:
        segNode.EndModify(wasModifying)
    imported.segmentation = segNode


def _importHeatmaps(scene, imported, output, baseName):
    if not output.attention:
        return
    colorNode = _heatmapColors(scene, imported)
    for phase, image in output.attention.items():
        # The engine's window inside the liver (where the reader looks), else the whole 0..1.
        window = ((output.stats or {}).get("attention_window") or {}).get(phase, (0.0, 1.0))
        node = _addMapVolume(scene, imported, image, f"{baseName} attention {phase}", colorNode, window)
        node.SetAttribute("MAMLSegmentation.phase", phase)
        imported.heatmaps[phase] = node


def _importUncertainty(scene, imported, output, baseName):
    """The uncertainty map as a volume like the heatmaps: same colours, 0..1, transparent where the
    model is sure."""
    if output.uncertainty is None:
        return
    node = _addMapVolume(scene, imported, output.uncertainty, f"{baseName} uncertainty",
                         _heatmapColors(scene, imported))
    node.SetAttribute("MAMLSegmentation.map", "uncertainty")
    imported.uncertainty = node


def _heatmapColors(scene, imported):
    colorNode, created = heatmapColorNode(scene)
    if created:
        imported.addedNodes.append(colorNode)
    return colorNode


def _addMapVolume(scene, imported, image, name, colorNode, window=(0.0, 1.0)):
    """A 0..1 map as a volume node shown in the heatmap colours over ``window``, transparent near 0."""
    node = addVolumeNodeFromImage(scene, image, name)
    imported.addedNodes.append(node)
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(colorNode.GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(float(window[0]), float(window[1]))
    display.SetApplyThreshold(True)
    display.SetLowerThreshold(HEATMAP_LOWER_THRESHOLD)
    display.SetUpperThreshold(1.0e6)
    display.SetInterpolate(True)
    return node


def _importTransforms(scene, imported, output, phaseNodes, referencePhase):
    for phase, path in output.transformFiles.items():
        moving = phaseNodes.get(phase)
        if moving is None or phase == referencePhase:
            continue
        node = scene.AddNewNodeByClass("vtkMRMLTransformNode", f"{phase} to {referencePhase} registration")
        imported.addedNodes.append(node)
        storage = slicer.vtkMRMLTransformStorageNode()
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            raise MAMLSegmentationError(f"Cannot read the registration transform {path}.")
        node.SetAttribute("MAMLSegmentation.phase", phase)
        imported.transforms[phase] = node
    # Attach after all were read, so a failure above leaves the moving volumes untouched.
    for phase, node in imported.transforms.items():
        attachTransformOnTop(phaseNodes[phase], node)


def attachTransformOnTop(movingNode, transformNode) -> None:
    """Make ``transformNode`` the outermost transform of the moving volume (not hardened).

    The engine registered the moving volume as shown in world coordinates, i.e. with its existing
    parent transforms applied; the registration therefore goes above them.
    """
    top = movingNode
    while top.GetParentTransformNode() is not None and top.GetParentTransformNode() is not transformNode:
        top = top.GetParentTransformNode()
    top.SetAndObserveTransformNodeID(transformNode.GetID())


def _importTables(scene, imported, stats, baseName):
    import vtk

    if not stats:
        return
    summary = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{baseName} statistics")
    imported.addedNodes.append(summary)
    burden = stats.get("tumor_burden")
    tumorVolume = stats.get("tumor_volume_ml")
    if tumorVolume is None:
        tumorVolume = sum(t.get("volume_ml", 0.0) for t in stats.get("tumors", []))
    rows = [
        ("Tumor count", float(stats.get("tumor_count", len(stats.get("tumors", [])))), ""),
        ("Liver volume", float(stats.get("liver_volume_ml", float("nan"))), "mL"),
    ]
    if stats.get("liver_parenchyma_volume_ml") is not None:
        rows.append(("Liver parenchyma volume", float(stats["liver_parenchyma_volume_ml"]), "mL"))
    rows += [
        ("Total tumor volume", float(tumorVolume), "mL"),
        ("Tumor burden", float(burden) * 100 if burden is not None else float("nan"), "%"),
    ]
    _setTable(summary, [("Measurement", vtk.vtkStringArray, ""), ("Value", vtk.vtkDoubleArray, ""),
                        ("Unit", vtk.vtkStringArray, "")], rows)
    model = stats.get("model") or {}
    domain = stats.get("domain_check") or {}
    for key, value in (("domain_check", domain.get("status")),
                       ("domain_check_sentence", domain.get("sentence")),
                       ("model", model.get("name")), ("model_sha256", model.get("sha256")),
                       ("device", stats.get("device")), ("head", stats.get("head")),
                       ("reference_phase", stats.get("reference_phase")),
                       ("registration", (stats.get("registration") or {}).get("preset"))):
        if value is not None:
            summary.SetAttribute(f"MAMLSegmentation.{key}", str(value))
    imported.statisticsTable = summary

    tumors = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{baseName} tumors")
    imported.addedNodes.append(tumors)
    tumorList = stats.get("tumors", [])
    enhancementColumns, enhancementCells = _enhancementColumns(tumorList)
    tumorRows = []
    for tumor, cells in zip(tumorList, enhancementCells):
        r, a, s = _lpsToRas(tumor.get("centroid_lps", (float("nan"),) * 3))
        tumorRows.append((int(tumor.get("id", len(tumorRows) + 1)), float(tumor.get("volume_ml", float("nan"))),
                          float(tumor.get("diameter_mm", float("nan"))),
                          float(tumor.get("axial_diameter_mm", float("nan"))), r, a, s,
                          float(tumor.get("mean_uncertainty", float("nan"))), *cells))
    _setTable(tumors, [("Tumor", vtk.vtkIntArray, ""), ("Volume", vtk.vtkDoubleArray, "mL"),
                       ("Largest diameter", vtk.vtkDoubleArray, "mm"),
                       ("Largest axial diameter", vtk.vtkDoubleArray, "mm"), ("Centroid R", vtk.vtkDoubleArray, "mm"),
                       ("Centroid A", vtk.vtkDoubleArray, "mm"), ("Centroid S", vtk.vtkDoubleArray, "mm"),
                       ("Mean uncertainty", vtk.vtkDoubleArray, "0-1"), *enhancementColumns],
              tumorRows)
    if enhancementColumns:
        tumors.SetAttribute("MAMLSegmentation.enhancementNote", ENHANCEMENT_TABLE_NOTE)
    imported.tumorTable = tumors


ENHANCEMENT_TABLE_NOTE = ("Enhancement columns: median HU of the tumor and of the liver within 5 mm of it per "
                          "phase, their difference, and the engine's APHE / washout / capsule flags: "
                          "research features, not a LI-RADS category.")


def _enhancementColumns(tumors: list) -> tuple:
    """Columns (name, vtkArrayClass, unit) and one list of cells per tumor for the engine's
    per-phase enhancement (stats.json tumors[i].enhancement); none when the engine gave none."""
    import vtk

    phases = []
    for tumor in tumors:
        for phase in (tumor.get("enhancement") or {}).get("tumor_median_hu", {}):
            if phase not in phases:
                phases.append(phase)
    if not phases:
        return [], [[] for _ in tumors]
    columns = []
    for phase in phases:
        title = phase.capitalize()
        columns += [(f"{title} tumor", vtk.vtkDoubleArray, "HU"), (f"{title} liver", vtk.vtkDoubleArray, "HU"),
                    (f"{title} contrast", vtk.vtkDoubleArray, "HU")]
    columns += [("APHE", vtk.vtkStringArray, ""), ("Washout", vtk.vtkStringArray, ""),
                ("Capsule", vtk.vtkStringArray, "")]

    def number(value):
        return float("nan") if value is None else float(value)

    def flag(value):
        return "n/a" if value is None else "yes" if value else "no"

    cells = []
    for tumor in tumors:
        e = tumor.get("enhancement") or {}
        row = []
        for phase in phases:
            row += [number(e.get(key, {}).get(phase))
                    for key in ("tumor_median_hu", "liver_median_hu", "contrast_hu")]
        row += [flag(e.get(key)) for key in ("aphe", "washout", "capsule")]
        cells.append(row)
    return columns, cells
