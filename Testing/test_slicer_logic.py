"""MAMLSegmentationLib against slicer-core: a real MRML scene and Slicer's module logics.

The engine runs as a real background process. Here it is mostly ``slicer_fake_engine.py``, a
stand-in speaking the engine's command line and JSON-lines protocol whose labels are thresholds
of the reference phase: the node import (names, colours, geometry on oblique grids, transforms,
tables, saved scenes, roll-back) can then be checked voxel for voxel, and a slow run with a child
process exercises cancel deterministically. The real engine (``maml segment``) is run through the
same logic in ``test_slicer_engine.py``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

from slicer_fixtures import (ijk_to_ras, make_volume_node, node_count, oblique_direction, process_alive,  # noqa: F401
                             scene)

import slicer
from MAMLSegmentationLib import (
    MAMLSegmentationError,
    MAMLSegmentationLogic,
    CancelledError,
    imageFromVolumeNode,
    updateVolumeNodeFromImage,
)
from MAMLSegmentationLib.conversion import ijkToRASArray
from maml.config import LIVER_LABELS

FAKE_ENGINE = Path(__file__).with_name("slicer_fake_engine.py")
F = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture(autouse=True)
def standin_model(tmp_path_factory, monkeypatch):
    """The stand-in engine reads no model; the logic still wants an existing file to pass on."""
    path = tmp_path_factory.getbasetemp() / "standin-model.pt"
    if not path.exists():
        path.write_bytes(b"read by nobody: the stand-in engine has no network")
    monkeypatch.setenv("MAML_MODEL", str(path))
    return path


def temp_dirs() -> set:
    return set(Path(tempfile.gettempdir()).glob("MAMLSegmentation-*"))


def fake_logic() -> MAMLSegmentationLogic:
    return MAMLSegmentationLogic(engineCommand=[sys.executable, str(FAKE_ENGINE)])


def phantom(shape=(12, 20, 24), seed=0) -> np.ndarray:
    """A box 'liver' (150) with two separate 'tumors' (250) in a 0..50 background."""
    rng = np.random.default_rng(seed)
    array = rng.uniform(0, 50, shape).astype(np.int16)
    array[2:10, 4:16, 4:20] = 150
    array[4:7, 6:9, 6:9] = 250
    array[4:8, 10:14, 13:18] = 250
    return array


def ras_of_index(matrix, ijk) -> np.ndarray:
    return (np.asarray(matrix) @ np.append(np.asarray(ijk, float), 1.0))[:3]


# ---------------------------------------------------------------- node <-> image ----------------

def test_round_trip_oblique_anisotropic(scene):
    matrix = ijk_to_ras((0.7, 1.3, 2.5), (-12.0, 30.0, 55.0), oblique_direction())
    array = phantom()
    node = make_volume_node(scene, array, matrix, "oblique")
    image = imageFromVolumeNode(node)
    assert image.GetSize() == (24, 20, 12)
    np.testing.assert_allclose(image.GetSpacing(), (0.7, 1.3, 2.5))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
    for ijk in [(0, 0, 0), (23, 0, 0), (5, 17, 9), (23, 19, 11)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose(lps, F @ ras_of_index(matrix, ijk), atol=1e-9)

    back = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "back")
    updateVolumeNodeFromImage(back, image)
    np.testing.assert_allclose(ijkToRASArray(back), matrix, atol=1e-12)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(back), array)


def test_linear_parent_transform_is_in_world_coordinates_and_input_untouched(scene):
    matrix = ijk_to_ras((1.0, 1.5, 3.0), (5.0, -7.0, 2.0), oblique_direction(30, -15))
    node = make_volume_node(scene, phantom(), matrix, "moved")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "t")
    toParent = np.eye(4)
    toParent[:3, :3] = oblique_direction(-25, 5)
    toParent[:3, 3] = (10.0, -4.0, 8.5)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(toParent))
    node.SetAndObserveTransformNodeID(transform.GetID())
    before = node_count(scene)

    image = imageFromVolumeNode(node)
    for ijk in [(0, 0, 0), (3, 11, 7), (23, 19, 11)]:
        world = (toParent @ np.append(ras_of_index(matrix, ijk), 1))[:3]
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(ijk), F @ world, atol=1e-9)
    local = imageFromVolumeNode(node, worldCoordinates=False)
    np.testing.assert_allclose(local.TransformIndexToPhysicalPoint((3, 11, 7)),
                               F @ ras_of_index(matrix, (3, 11, 7)), atol=1e-9)
    assert node.GetTransformNodeID() == transform.GetID()
    np.testing.assert_allclose(ijkToRASArray(node), matrix)
    assert node_count(scene) == before


def test_nonlinear_parent_transform_is_resampled_on_a_copy(scene):
    array = phantom().astype(np.float32)
    node = make_volume_node(scene, array, ijk_to_ras((2.0, 2.0, 2.0), (0.0, 0.0, 0.0)), "warped")
    # A thin-plate spline that is exactly a shift of one voxel (2 mm) towards R: non-linear class.
    tps = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for p in [(0, 0, 0), (60, 0, 0), (0, 60, 0), (0, 0, 60), (60, 60, 60)]:
        source.InsertNextPoint(p)
        target.InsertNextPoint(p[0] + 2.0, p[1], p[2])
    tps.SetSourceLandmarks(source)
    tps.SetTargetLandmarks(target)
    tps.SetBasisToR()
    transform = scene.AddNewNodeByClass("vtkMRMLTransformNode", "tps")
    transform.SetAndObserveTransformToParent(tps)
    node.SetAndObserveTransformNodeID(transform.GetID())
    assert not transform.IsTransformToWorldLinear()
    before = node_count(scene)

    image = imageFromVolumeNode(node)
    out = sitk.GetArrayFromImage(image)
    # Same grid; content moved one voxel along +i (R): out[k, j, i] == array[k, j, i - 1].
    np.testing.assert_allclose(image.GetOrigin(), (0, 0, 0), atol=1e-9)
    np.testing.assert_allclose(out[:, :, 1:-1], array[:, :, :-2], atol=1e-3)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), array)
    assert node.GetTransformNodeID() == transform.GetID()
    assert node_count(scene) == before


# ---------------------------------------------------------------- segment() ---------------------

def two_phase_case(scene, with_parent=False):
    matrix = ijk_to_ras((0.8, 0.9, 2.0), (20.0, -15.0, 40.0), oblique_direction(15, 5))
    venous = make_volume_node(scene, phantom(seed=1), matrix, "venous")
    arterial = make_volume_node(scene, phantom(seed=2), matrix, "arterial")
    return arterial, venous, matrix


def test_segment_two_phases_imports_all_results(scene):
    arterial, venous, matrix = two_phase_case(scene)
    before_dirs = temp_dirs()
    result = fake_logic().segment({"arterial": arterial, "venous": venous}, registration="rigid")
    assert temp_dirs() == before_dirs, "temporary files left behind"

    # Segmentation: names, colours, terminology, labels in the reference (venous) geometry.
    seg = result.segmentationNode
    segmentation = seg.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["Liver", "Liver tumor"]
    liver = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("Liver"))
    tumor = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("Liver tumor"))
    np.testing.assert_allclose(liver.GetColor(), LIVER_LABELS[1].color, atol=1e-6)
    assert "SCT^10200004^Liver" in liver.GetTerminology()
    assert "SCT^108369006^Neoplasm" in tumor.GetTerminology()
    assert seg.GetDisplayNode() is not None

    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    segmentIds = vtk.vtkStringArray()
    for name in names:
        segmentIds.InsertNextValue(segmentation.GetSegmentIdBySegmentName(name))
    slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(seg, segmentIds, labelmap, venous)
    exported = slicer.util.arrayFromVolume(labelmap)
    source = slicer.util.arrayFromVolume(venous)
    expected = np.where(source >= 200, 2, np.where(source >= 100, 1, 0))
    np.testing.assert_array_equal(exported, expected)
    np.testing.assert_allclose(ijkToRASArray(labelmap), matrix, atol=1e-6)

    # Heatmaps: one per phase, perceptual colour map, the engine's window inside the liver
    # (stats.json attention_window), ~0 transparent, reference geometry.
    assert set(result.heatmapNodes) == {"arterial", "venous"}
    for phase, heat in result.heatmapNodes.items():
        display = heat.GetDisplayNode()
        color = display.GetColorNode()
        assert color.IsA("vtkMRMLProceduralColorNode")
        low, high = result.stats["attention_window"][phase]
        values = slicer.util.arrayFromVolume(heat)
        inside = values[np.where(source >= 100)]  # the liver (and tumors) of this phantom
        assert low == pytest.approx(np.percentile(inside, 2), abs=1e-3)
        assert high == pytest.approx(np.percentile(inside, 98), abs=1e-3) and high - low < 1.0
        assert display.GetWindow() == pytest.approx(high - low) and display.GetLevel() == pytest.approx((low + high) / 2)
        assert display.GetApplyThreshold() and 0 < display.GetLowerThreshold() < 0.1
        np.testing.assert_allclose(ijkToRASArray(heat), matrix, atol=1e-6)
        values = slicer.util.arrayFromVolume(heat)
        assert values.min() >= 0 and values.max() <= 1
    ramp = result.heatmapNodes["venous"].GetDisplayNode().GetColorNode().GetColorTransferFunction()
    lum = [np.dot(ramp.GetColor(v), (0.2126, 0.7152, 0.0722)) for v in np.linspace(0, 1, 11)]
    assert all(b > a for a, b in zip(lum, lum[1:])), "colour map luminance must increase"
    att = slicer.util.arrayFromVolume(result.heatmapNodes["venous"])
    np.testing.assert_allclose(att, np.clip(source / 300.0, 0, 1), atol=1e-6)

    # Registration transform: parent of the moving phase only, not hardened, ITK mapping in RAS.
    transform = result.transformNodes["arterial"]
    assert arterial.GetTransformNodeID() == transform.GetID()
    assert venous.GetTransformNodeID() is None
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(arterial), phantom(seed=2))
    center = [(s - 1) / 2 for s in (24, 20, 12)]
    itk = sitk.Euler3DTransform()
    itk.SetCenter(imageFromVolumeNode(venous).TransformContinuousIndexToPhysicalPoint(center))
    itk.SetRotation(0.0, 0.0, 0.05)
    itk.SetTranslation((2.0, -3.0, 1.5))
    for ras in [(20.0, -15.0, 40.0), (5.0, 3.0, 52.0)]:
        expected_ras = F @ np.array(itk.TransformPoint(tuple(F @ np.array(ras))))
        got = transform.GetTransformFromParent().TransformPoint(ras)
        np.testing.assert_allclose(got, expected_ras, atol=1e-6)

    # Statistics tables, from stats.json.
    stats = result.stats
    assert stats["tumor_count"] == 2
    summary = result.statisticsTableNode
    rows = {summary.GetCellText(r, 0): float(summary.GetCellText(r, 1)) for r in range(summary.GetNumberOfRows())}
    assert rows["Tumor count"] == 2
    assert rows["Liver volume"] == pytest.approx(stats["liver_volume_ml"], rel=1e-6)
    assert rows["Tumor burden"] == pytest.approx(100 * stats["tumor_burden"], rel=1e-6)
    voxel_ml = 0.8 * 0.9 * 2.0 / 1000
    assert rows["Total tumor volume"] == pytest.approx((expected == 2).sum() * voxel_ml, rel=1e-6)
    tumors = result.tumorTableNode
    assert tumors.GetNumberOfRows() == 2
    assert tumors.GetColumnUnitLabel("Volume") == "mL"
    centroid = stats["tumors"][0]["centroid_lps"]
    assert float(tumors.GetCellText(0, 4)) == pytest.approx(-centroid[0], abs=1e-3)  # the cell text has 6 digits
    assert float(tumors.GetCellText(0, 6)) == pytest.approx(centroid[2], abs=1e-3)
    # Enhancement per phase and the flags, from stats.json (the engine's maml.stats measure).
    for row, tumor in enumerate(stats["tumors"]):
        e = tumor["enhancement"]
        cells = {tumors.GetColumnName(c): tumors.GetCellText(row, c) for c in range(tumors.GetNumberOfColumns())}
        for phase in ("arterial", "venous"):
            title = phase.capitalize()
            assert float(cells[f"{title} tumor"]) == pytest.approx(e["tumor_median_hu"][phase])
            assert float(cells[f"{title} liver"]) == pytest.approx(e["liver_median_hu"][phase])
            assert float(cells[f"{title} contrast"]) == pytest.approx(e["contrast_hu"][phase])
            assert tumors.GetColumnUnitLabel(f"{title} contrast") == "HU"
        shown = {True: "yes", False: "no", None: "n/a"}
        assert (cells["APHE"], cells["Washout"], cells["Capsule"]) == tuple(
            shown[e[flag]] for flag in ("aphe", "washout", "capsule"))
    assert "not a LI-RADS category" in tumors.GetAttribute("MAMLSegmentation.enhancementNote")


def test_existing_output_segmentation_is_reused(scene):
    arterial, venous, _ = two_phase_case(scene)
    out = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    out.GetSegmentation().AddEmptySegment("", "Liver")
    out.GetSegmentation().AddEmptySegment("", "Other")
    result = fake_logic().segment({"venous": venous}, outputSegmentation=out)
    assert result.segmentationNode is out
    names = sorted(out.GetSegmentation().GetNthSegment(i).GetName()
                   for i in range(out.GetSegmentation().GetNumberOfSegments()))
    assert names == ["Liver", "Liver tumor", "Other"]


def test_output_directory_is_kept_when_given(scene, tmp_path):
    arterial, venous, _ = two_phase_case(scene)
    result = fake_logic().segment({"arterial": arterial, "venous": venous}, outputDirectory=tmp_path / "case")
    assert result.outputDirectory == tmp_path / "case"
    assert {"segmentation.nii.gz", "stats.json", "overview.png", "transform_arterial.h5"} <= {
        p.name for p in (tmp_path / "case").iterdir()}


# ---------------------------------------------------------------- bad input ---------------------

def bad_input_cases(scene, tmp_path):
    arterial, venous, _ = two_phase_case(scene)
    flat = make_volume_node(scene, np.zeros((1, 20, 24), np.int16), None, "slice")
    return {
        "same node twice": (dict(phaseNodes={"arterial": venous, "venous": venous}), "same volume 'venous'"),
        "no phases": (dict(phaseNodes={"arterial": None, "venous": None}), "No input volume"),
        "2D volume": (dict(phaseNodes={"venous": flat}), "is 2D"),
        "missing model": (dict(phaseNodes={"venous": venous}, model=str(tmp_path / "nope.pt")), "nope.pt"),
        "bad preset": (dict(phaseNodes={"venous": venous}, registration="elastic"), "elastic"),
        "bad reference": (dict(phaseNodes={"venous": venous}, referencePhase="arterial"), "reference phase"),
        "no model at all": (dict(phaseNodes={"venous": venous}), "No model given and the default model"),
    }


@pytest.mark.parametrize("case", ["same node twice", "no phases", "2D volume", "missing model", "bad preset",
                                  "bad reference", "no model at all"])
def test_bad_inputs_give_clear_errors_and_leave_scene_unchanged(scene, tmp_path, case, monkeypatch):
    if case == "no model at all":
        monkeypatch.setenv("MAML_MODEL", str(tmp_path / "not-there.pt"))
    kwargs, message = bad_input_cases(scene, tmp_path)[case]
    before, dirs = node_count(scene), temp_dirs()
    with pytest.raises(MAMLSegmentationError, match=message.replace(".", r"\.").replace("(", r"\(")):
        fake_logic().segment(**kwargs)
    assert node_count(scene) == before
    assert temp_dirs() == dirs


def test_engine_that_cannot_start_is_a_clear_error(scene):
    _, venous, _ = two_phase_case(scene)
    before, dirs = node_count(scene), temp_dirs()
    logic = MAMLSegmentationLogic(engineCommand=["/nonexistent/PythonSlicer", "-m", "maml.cli"])
    with pytest.raises(MAMLSegmentationError, match="Cannot start"):
        logic.segment({"venous": venous})
    assert node_count(scene) == before and temp_dirs() == dirs


@pytest.mark.skipif(sys.platform == "win32", reason="process groups checked through /proc")
def test_cancel_kills_process_tree_removes_temp_files_scene_unchanged(scene, monkeypatch, tmp_path):
    arterial, venous, _ = two_phase_case(scene)
    pid_file = tmp_path / "child.pid"
    monkeypatch.setenv("FAKE_ENGINE_DELAY", "120")
    monkeypatch.setenv("FAKE_ENGINE_CHILD_PID_FILE", str(pid_file))
    before, dirs = node_count(scene), temp_dirs()
    run = fake_logic().segment({"arterial": arterial, "venous": venous}, waitForCompletion=False)
    assert run.isRunning and len(temp_dirs() - dirs) == 1
    steps, deadline = [], time.monotonic() + 60
    while "inference" not in steps and time.monotonic() < deadline:
        steps += [e.step for e in run.poll()]
        time.sleep(0.05)
    assert "inference" in steps and run.isRunning
    child = int(pid_file.read_text())
    leader = run.process.pid
    assert process_alive(child) and process_alive(leader)
    run.cancel()
    assert run.state == "cancelled" and isinstance(run.error, CancelledError)
    deadline = time.monotonic() + 10
    while (process_alive(child) or process_alive(leader)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(leader) and not process_alive(child)
    assert temp_dirs() == dirs
    assert node_count(scene) == before and arterial.GetTransformNodeID() is None
    with pytest.raises(CancelledError):
        run.wait()


def test_progress_events_and_capped_log(scene):
    from MAMLSegmentationLib import EngineProcess, parseProgressLine

    assert parseProgressLine('{"step": "register", "fraction": 1.7, "message": "x"}').fraction == 1.0
    assert parseProgressLine("Warning: something") is None
    assert parseProgressLine("{not json") is None
    script = ("import json\nfor i in range(50): print('noise', i)\n"
              "print(json.dumps({'step': 'done', 'fraction': 1, 'message': 'ok'}))")
    process = EngineProcess([sys.executable, "-c", script], logLines=10)
    events = []
    assert process.wait(callback=events.append) == "done"
    assert [e.step for e in events] == ["done"] and len(process.log) == 10
    failing = EngineProcess([sys.executable, "-c", "import sys; print('maml segment: error: bad file x.nrrd',"
                             " file=sys.stderr); sys.exit(1)"])
    assert failing.wait() == "failed" and failing.errorMessage == "bad file x.nrrd"


@pytest.mark.parametrize("script, state, message", [
    # the engine's contract: exit 0 + "done" last; 1 + "error" line + one stderr line; 130 cancelled
    ("print(json.dumps({'step': 'error', 'message': 'x.nrrd is 2D'})); "
     "print('maml segment: error: x.nrrd is 2D', file=sys.stderr); sys.exit(1)", "failed", "x.nrrd is 2D"),
    ("print(json.dumps({'step': 'error', 'cancelled': True, 'message': 'stopped by SIGTERM'})); sys.exit(130)",
     "cancelled", ""),
    ("sys.exit(130)", "cancelled", ""),
    ("print(json.dumps({'step': 'write', 'fraction': 0.95, 'message': 'w'}))", "failed", "without reporting"),
    ("print('Traceback (most recent call last):'); print('MemoryError'); sys.exit(1)", "failed", "MemoryError"),
    ("print(json.dumps({'step': 'done', 'fraction': 1, 'message': '1 failed', 'out': 'o'})); sys.exit(1)",
     "done", ""),  # segment-batch: some cases failed, listed in its summary
])
def test_engine_exit_codes_and_last_lines_decide_the_outcome(script, state, message):
    from MAMLSegmentationLib import EngineProcess

    process = EngineProcess([sys.executable, "-c", "import json, sys\n" + script])
    assert process.wait() == state
    assert message in process.errorMessage


# ---------------------------------------------------------------- command line / deps -----------

def test_segment_command_line_follows_the_engine_contract(tmp_path):
    logic = MAMLSegmentationLogic(pythonExecutable="/opt/Slicer/bin/PythonSlicer")
    model = tmp_path / "m.pt"
    model.write_bytes(b"x")
    command = logic.buildSegmentCommand({"arterial": "/t/a.nrrd", "venous": "/t/v.nrrd"}, "/t/out", model,
                                        "affine", "venous", "cpu")
    assert command[:4] == ["/opt/Slicer/bin/PythonSlicer", "-m", "maml.cli", "segment"]
    joined = " ".join(command)
    for part in ["--phase arterial=/t/a.nrrd", "--phase venous=/t/v.nrrd", "--out /t/out", "--register affine",
                 "--reference venous", "--device cpu", f"--model {model}"]:
        assert part in joined
    assert command[-1] == "--json-progress"
    assert "--no-postprocessing" not in command
    assert "--no-overview" in command  # Slicer draws its own views: no matplotlib needed
    dicom = logic.buildSegmentCommand({"venous": "/t/v.nrrd"}, "/t/out", model, dicomSource="/t/dicom")
    # the engine's own parser accepts both commands, post-processing off included
    from maml.cli import build_parser

    raw = logic.buildSegmentCommand({"venous": "/t/v.nrrd"}, "/t/out", model, postprocess=False)
    assert build_parser().parse_args(raw[3:]).no_postprocessing is True
    assert build_parser().parse_args(command[3:]).no_postprocessing is False
    assert build_parser().parse_args(command[3:]).no_overview is True
    parsed = build_parser().parse_args(dicom[3:])
    assert parsed.dicom_seg is True and parsed.dicom_source == "/t/dicom"
    batch = logic.buildSegmentBatchCommand("/t/in", "/t/out", model, postprocess=False)
    assert batch[3] == "segment-batch" and build_parser().parse_args(batch[3:]).no_postprocessing is True
    # the backend: auto by default, each choice reaches the engine, an unknown one is refused
    assert build_parser().parse_args(command[3:]).backend == "auto"
    for backend in ("torch", "openvino"):
        single = logic.buildSegmentCommand({"venous": "/t/v.nrrd"}, "/t/out", model, backend=backend)
        many = logic.buildSegmentBatchCommand("/t/in", "/t/out", model, backend=backend)
        assert {build_parser().parse_args(c[3:]).backend for c in (single, many)} == {backend}
    with pytest.raises(MAMLSegmentationError, match="Unknown backend"):
        logic.buildSegmentCommand({"venous": "/t/v.nrrd"}, "/t/out", model, backend="tensorrt")
    env = logic.engineEnvironment()
    assert env["PYTHONPATH"].split(os.pathsep)[0].endswith("MAMLSegmentation")
    assert (Path(env["PYTHONPATH"].split(os.pathsep)[0]) / "maml" / "cli.py").is_file()


def test_dependency_install_never_replaces_shipped_packages(tmp_path):
    from MAMLSegmentationLib import install

    constraints = install.pipConstraints()
    for name in ("numpy", "SimpleITK", "torch"):
        assert f"{name}==" in constraints
    folder = tmp_path / "C:\\Users\\Jane Doe\\AppData"  # a Windows-like path with a space and backslashes
    arguments = install.pipInstallArguments(["itk-elastix>=0.20", "highdicom>=0.22"], folder / "c.txt")
    assert arguments == ["itk-elastix>=0.20", "highdicom>=0.22", "-c", str(folder / "c.txt")]  # one list
    assert install.pipInstallArguments([], folder / "c.txt") == []


def test_dependency_check_is_version_aware():
    from importlib import metadata

    from MAMLSegmentationLib import install

    numpy_version = metadata.version("numpy")
    assert install.unmetRequirement("numpy>=1.0") is None
    assert install.unmetRequirement("numpy>=999") == f"numpy {numpy_version} is installed, >=999 is needed"
    assert install.unmetRequirement("maml-no-such-package>=1") == "maml-no-such-package is not installed"
    # only what the options need: no monai, tqdm or matplotlib; highdicom with a DICOM SEG only
    assert not any(name in " ".join(install.requiredPackages(True)) for name in ("monai", "tqdm", "matplotlib"))
    assert "highdicom>=0.22" in install.requiredPackages(dicomSeg=True)
    assert "highdicom>=0.22" not in install.requiredPackages(dicomSeg=False)
    # itk-elastix only for the elastix registration engine (the panel runs SimpleITK's)
    assert not any("itk-elastix" in text for text in install.requiredPackages(True, "openvino"))
    assert "itk-elastix>=0.20" in install.requiredPackages(registrationEngine="elastix")
    # a too old highdicom counts as missing, an installed new enough one does not
    old = {"highdicom": "0.1.0"}
    versions = lambda name: old.get(name) or metadata.version(name)  # noqa: E731
    assert [text for text, _ in install.missingRequirements(True, versions)] == ["highdicom>=0.22"]
    assert install.missingRequirements(True) == []  # this environment has them all


def test_install_missing_passes_pip_install_one_list(tmp_path, monkeypatch):
    from MAMLSegmentationLib import install

    calls = []
    monkeypatch.setattr(install, "DICOM_SEG_REQUIREMENTS", ("maml-no-such-package>=1",))
    installed = install.installMissing(calls.append, tmp_path, dicomSeg=True)
    assert installed == ["maml-no-such-package>=1"]
    assert calls == [["maml-no-such-package>=1", "-c", str(tmp_path / "constraints.txt")]]
    assert "numpy==" in (tmp_path / "constraints.txt").read_text()
    calls.clear()
    assert install.installMissing(calls.append, tmp_path, dicomSeg=False) == [] and calls == []


# ---------------------------------------------------------------- saved scene -------------------

def test_results_survive_saving_and_reloading_the_scene_as_mrb(scene, tmp_path):
    from slicer_fixtures import make_scene

    arterial, venous, matrix = two_phase_case(scene)
    result = fake_logic().segment({"arterial": arterial, "venous": venous}, registration="rigid")
    scene.SetRootDirectory(str(tmp_path))
    assert scene.WriteToMRB(str(tmp_path / "case.mrb"))

    loaded, app, logics = make_scene()
    remote = slicer.vtkMRMLRemoteIOLogic()
    dataIO = slicer.vtkDataIOManagerLogic()
    dataIO.SetMRMLApplicationLogic(app)
    dataIO.SetAndObserveDataIOManager(remote.GetDataIOManager())
    remote.SetMRMLScene(loaded)
    remote.AddDataIOToScene()
    try:
        assert loaded.ReadFromMRB(str(tmp_path / "case.mrb"))
        seg = loaded.GetFirstNodeByName("MAML segmentation")
        segmentation = seg.GetSegmentation()
        tumor = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("Liver tumor"))
        assert "SCT^108369006" in tumor.GetTerminology()
        np.testing.assert_allclose(tumor.GetColor(), LIVER_LABELS[2].color, atol=1e-6)
        venous2 = loaded.GetFirstNodeByName("venous")
        arterial2 = loaded.GetFirstNodeByName("arterial")
        labelmap = loaded.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(
            seg, labelmap, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        source = slicer.util.arrayFromVolume(venous2)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(labelmap),
                                      np.where(source >= 200, 2, np.where(source >= 100, 1, 0)))
        heat = loaded.GetFirstNodeByName("MAML attention arterial")
        assert heat.GetDisplayNode().GetColorNode().GetName() == "MAML attention (inferno)"
        window = result.heatmapNodes["arterial"].GetDisplayNode().GetWindow()  # the engine's, inside the liver
        assert heat.GetDisplayNode().GetApplyThreshold() and heat.GetDisplayNode().GetWindow() == pytest.approx(window)
        np.testing.assert_allclose(slicer.util.arrayFromVolume(heat),
                                   slicer.util.arrayFromVolume(result.heatmapNodes["arterial"]), atol=1e-6)
        transform = arterial2.GetParentTransformNode()
        assert transform is not None and transform.GetName() == "arterial to venous registration"
        point = (12.0, -4.0, 47.0)
        np.testing.assert_allclose(transform.GetTransformFromParent().TransformPoint(point),
                                   result.transformNodes["arterial"].GetTransformFromParent().TransformPoint(point),
                                   atol=1e-6)
        table = loaded.GetFirstNodeByName("MAML tumors")
        assert table.GetNumberOfRows() == result.tumorTableNode.GetNumberOfRows() == 2
        assert table.GetCellText(1, 1) == result.tumorTableNode.GetCellText(1, 1)
    finally:
        loaded.Clear(True)


def test_model_info_comes_from_the_real_maml_info_command(tmp_path):
    """The module shows phases, labels and intended use read by the engine's own `maml info`."""
    torch = pytest.importorskip("torch")
    from maml.config import demo_config
    from maml.model import save_checkpoint
    from maml.network import MAMLNet

    torch.manual_seed(0)
    config = demo_config()
    path = save_checkpoint(tmp_path / "demo.pt", MAMLNet(config), config)
    info = MAMLSegmentationLogic(pythonExecutable=sys.executable).modelInfo(path)
    assert info["phases"] == config.phases
    assert [label["name"] for label in info["labels"]] == [label.name for label in config.labels]
    assert "clinical" in info["intended_use"].lower()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(MAMLSegmentationError, match="broken.pt"):
        MAMLSegmentationLogic(pythonExecutable=sys.executable).modelInfo(broken)
    with pytest.raises(MAMLSegmentationError, match="not found"):
        MAMLSegmentationLogic().modelInfo(tmp_path / "absent.pt")


def test_registration_goes_above_an_existing_parent_transform(scene):
    arterial, venous, _ = two_phase_case(scene)
    existing = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "user shift")
    shift = np.eye(4)
    shift[:3, 3] = (1.0, 0.0, 0.0)
    existing.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    arterial.SetAndObserveTransformNodeID(existing.GetID())
    result = fake_logic().segment({"arterial": arterial, "venous": venous}, registration="rigid")
    registration = result.transformNodes["arterial"]
    assert arterial.GetTransformNodeID() == existing.GetID()
    assert existing.GetTransformNodeID() == registration.GetID()


def test_model_label_names_and_colours_are_used_for_other_labels(scene):
    from MAMLSegmentationLib.results import EngineOutput, importEngineOutput

    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1:3, 1:4, 1:5] = 1
    labels[2, 2, 2] = 3
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((1.5, 1.5, 3.0))
    stats = {"model": {"labels": [{"value": 0, "name": "background", "color": [0, 0, 0]},
                                  {"value": 1, "name": "liver", "color": [0.1, 0.2, 0.3]},
                                  {"value": 3, "name": "vessel", "color": [0, 0, 255]}]}}
    before = node_count(scene)
    nodes = importEngineOutput(scene, EngineOutput(Path("."), image, stats=stats), {}, "venous")
    segmentation = nodes.segmentation.GetSegmentation()
    vessel = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("vessel"))
    liver = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("Liver"))
    np.testing.assert_allclose(vessel.GetColor(), (0, 0, 1))
    np.testing.assert_allclose(liver.GetColor(), LIVER_LABELS[1].color, atol=1e-6)
    assert node_count(scene) > before and nodes.heatmaps == {} and nodes.transforms == {}


def test_results_that_fail_to_import_half_way_are_rolled_back(scene, monkeypatch):
    arterial, venous, _ = two_phase_case(scene)
    monkeypatch.setenv("FAKE_ENGINE_BAD_TRANSFORM", "1")
    before, dirs = node_count(scene), temp_dirs()
    names_before = sorted(scene.GetNthNode(i).GetName() or "" for i in range(scene.GetNumberOfNodes()))
    with pytest.raises(MAMLSegmentationError, match="transform"):
        fake_logic().segment({"arterial": arterial, "venous": venous}, registration="rigid")
    assert node_count(scene) == before and arterial.GetTransformNodeID() is None
    assert sorted(scene.GetNthNode(i).GetName() or "" for i in range(scene.GetNumberOfNodes())) == names_before
    assert temp_dirs() == dirs


# ---------------------------------------------------------------- sample data -------------------

def test_sample_data_registers_the_bundled_phantom_offline_and_every_file_loads(scene):
    import hashlib
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    from MAMLSegmentationLib import sampleDataSources
    from MAMLSegmentationLib.rendering import loadVolumeNode

    sources = {source["sampleName"]: source for source in sampleDataSources()}
    assert set(sources) == {"MAMLPhantom", "MAMLPhantomTruth"}
    phases, truth = sources["MAMLPhantom"], sources["MAMLPhantomTruth"]
    assert {s["category"] for s in sources.values()} == {"MAML"}
    assert phases["nodeNames"] == ["phantom_arterial", "phantom_venous"]
    assert phases["loadFileType"] == ["VolumeFile", "VolumeFile"]
    assert truth["loadFileType"] == ["SegmentationFile", "TransformFile"]
    files = {}
    for source in sources.values():
        keys = ("uris", "fileNames", "nodeNames", "checksums", "loadFileType")
        assert len({len(source[k]) for k in keys}) == 1, "SampleDataSource needs equal-length lists"
        assert Path(source["thumbnailFileName"]).is_file()
        for uri, name, checksum in zip(source["uris"], source["fileNames"], source["checksums"]):
            assert uri.startswith("file://"), "bundled, offline"
            path = Path(url2pathname(urlparse(uri).path))
            assert path.is_file() and path.name == name
            assert checksum == "SHA256:" + hashlib.sha256(path.read_bytes()).hexdigest()
            files[name] = path
    assert set(files) == {"phantom_arterial.nrrd", "phantom_venous.nrrd", "phantom_truth.nrrd",
                          "phantom_arterial_to_venous.tfm"}

    # What Slicer's readers make of them (the same storage nodes, headless).
    venous = loadVolumeNode(scene, files["phantom_venous.nrrd"], "phantom_venous")
    arterial = loadVolumeNode(scene, files["phantom_arterial.nrrd"], "phantom_arterial")
    assert slicer.util.arrayFromVolume(venous).ndim == 3 and slicer.util.arrayFromVolume(arterial).ndim == 3
    labelmap = loadVolumeNode(scene, files["phantom_truth.nrrd"], "phantom_truth", labelmap=True)
    assert set(np.unique(slicer.util.arrayFromVolume(labelmap))) == {0, 1, 2}
    np.testing.assert_allclose(ijkToRASArray(labelmap), ijkToRASArray(venous), atol=1e-4)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "phantom_truth")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 2
    motion = scene.AddNewNodeByClass("vtkMRMLTransformNode", "phantom_true_motion")
    storage = slicer.vtkMRMLTransformStorageNode()
    storage.SetFileName(str(files["phantom_arterial_to_venous.tfm"]))
    assert storage.ReadData(motion)
    itk = sitk.ReadTransform(str(files["phantom_arterial_to_venous.tfm"]))
    center = (ijkToRASArray(venous) @ np.array([80, 80, 40, 1.0]))[:3]
    np.testing.assert_allclose(motion.GetTransformFromParent().TransformPoint(center),
                               F @ np.array(itk.TransformPoint(tuple(F @ center))), atol=1e-2)


def test_one_colour_per_label_in_slicer_the_engine_and_the_overview():
    from maml import overview
    from MAMLSegmentationLib.results import DEFAULT_LABELS, STANDARD_SEGMENTS

    engine = {label.name: tuple(label.color) for label in LIVER_LABELS}
    assert STANDARD_SEGMENTS["liver"]["color"] == engine["liver"] == overview.LIVER_COLOR
    assert STANDARD_SEGMENTS["tumor"]["color"] == engine["tumor"] == overview.TUMOR_COLOR
    assert {d["name"]: tuple(d["color"]) for d in DEFAULT_LABELS} == {"liver": engine["liver"], "tumor": engine["tumor"]}
