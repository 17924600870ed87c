"""The Slicer side running the REAL engine (``python -m maml.cli segment``) on slicer-core nodes.

A tiny untrained checkpoint (one sliding window per case, so inference takes a second) and the
engine's tiny phantom keep each run to seconds; what is checked is the contract between the module
and the engine: the same labels as ``maml segment`` on the same files, a missing phase, the
engine's own error line for bad input, and cancel during a run leaving nothing behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

from slicer_fixtures import MODULE_DIR, node_count, process_alive, scene  # noqa: F401  (scene: pytest fixture)

import slicer
from MAMLSegmentationLib import CancelledError, MAMLSegmentationError, MAMLSegmentationLogic
from MAMLSegmentationLib.conversion import ijkToRASArray
from MAMLSegmentationLib.rendering import loadVolumeNode

torch = pytest.importorskip("torch")


def temp_dirs() -> set:
    return set(Path(tempfile.gettempdir()).glob("MAMLSegmentation-*"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """An untrained MAML checkpoint with the liver labels; its patch covers a whole tiny case."""
    from engine_helpers import save_tiny_liver_model

    return save_tiny_liver_model(tmp_path_factory.mktemp("model") / "tiny.pt", patch_size=[40, 64, 64],
                                 note="untrained, for Slicer-side tests")


@pytest.fixture(scope="module")
def case_files(tmp_path_factory):
    """The engine's tiny two-phase phantom as NRRD files (like the bundled sample case)."""
    from engine_helpers import write_tiny_case

    return write_tiny_case(tmp_path_factory.mktemp("case"), suffix=".nrrd", prefix="phantom_")


def real_logic(model) -> MAMLSegmentationLogic:
    """The logic as the module uses it: default engine command (this interpreter, -m maml.cli)."""
    logic = MAMLSegmentationLogic(pythonExecutable=sys.executable, defaultModel=model)
    assert logic.engineCommandPrefix() == [sys.executable, "-m", "maml.cli"]
    return logic


def exported_labels(segmentationNode, referenceNode) -> np.ndarray:
    """The segmentation as label values (Liver 1, Liver tumor 2) on the reference volume's grid."""
    scene = segmentationNode.GetScene()
    segmentation = segmentationNode.GetSegmentation()
    ids = vtk.vtkStringArray()
    for name in ("Liver", "Liver tumor"):
        ids.InsertNextValue(segmentation.GetSegmentIdBySegmentName(name))
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    try:
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentationNode, ids, labelmap, referenceNode)
        np.testing.assert_allclose(ijkToRASArray(labelmap), ijkToRASArray(referenceNode), atol=1e-6)
        return slicer.util.arrayFromVolume(labelmap).copy()
    finally:
        scene.RemoveNode(labelmap)


def scene_snapshot(scene) -> list:
    return sorted((scene.GetNthNode(i).GetClassName(), scene.GetNthNode(i).GetName() or "")
                  for i in range(scene.GetNumberOfNodes()))


def test_segment_in_slicer_gives_the_same_labels_as_maml_segment_on_the_same_files(scene, tiny_model, case_files,
                                                                                    tmp_path):
    arterial = loadVolumeNode(scene, case_files["arterial"], "arterial")
    venous = loadVolumeNode(scene, case_files["venous"], "venous")
    before_dirs = temp_dirs()
    steps = []
    result = real_logic(tiny_model).segment({"arterial": arterial, "venous": venous}, registration="rigid",
                                            device="cpu", progressCallback=lambda e: steps.append(e.step))
    assert temp_dirs() == before_dirs, "temporary files left behind"
    assert steps[-1] == "done" and {"load", "register", "inference", "statistics", "write"} <= set(steps)

    # The same job from a shell, on the files the volumes were read from.
    out = tmp_path / "shell"
    completed = subprocess.run(
        [sys.executable, "-m", "maml.cli", "segment", "--phase", f"arterial={case_files['arterial']}",
         "--phase", f"venous={case_files['venous']}", "--out", str(out), "--model", str(tiny_model),
         "--register", "rigid", "--device", "cpu", "--no-overview"],
        cwd=MODULE_DIR, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.nii.gz")))
    assert set(np.unique(expected)) == {0, 1, 2}, "the check needs liver and tumor voxels"

    # Slicer re-exports the volumes with their geometry rounded to float (the phantom's spacing is
    # drawn, not round), so elastix aligns the arterial phase a hair differently; the untrained
    # model, near a tie almost everywhere, then flips a handful of voxels. All else agrees.
    agree = float(np.mean(exported_labels(result.segmentationNode, venous) == expected))
    assert agree >= 0.999, f"only {agree:.4%} of the voxels agree"
    shell_stats = json.loads((out / "stats.json").read_text())
    assert abs(result.stats["tumor_count"] - shell_stats["tumor_count"]) <= 1
    assert result.stats["liver_volume_ml"] == pytest.approx(shell_stats["liver_volume_ml"], rel=0.02)
    assert result.stats["model"]["sha256"] == shell_stats["model"]["sha256"]
    assert result.stats["registration"]["preset"] == "rigid" and result.stats["reference_phase"] == "venous"
    for phase in ("arterial", "venous"):
        difference = np.abs(slicer.util.arrayFromVolume(result.heatmapNodes[phase]) - sitk.GetArrayFromImage(
            sitk.ReadImage(str(out / f"attention_{phase}.nii.gz"))))
        assert difference.mean() < 1e-3 and np.percentile(difference, 99) < 1e-2
    # The registration: the moving phase under the engine's transform, mapped like the shell's file
    # (to within the hair's breadth the two elastix runs differ by, above; a wrong convention is
    # off by centimetres).
    transform = result.transformNodes["arterial"]
    assert arterial.GetParentTransformNode() is transform and venous.GetParentTransformNode() is None
    shell_transform = sitk.ReadTransform(str(out / "transform_arterial.h5"))
    F = np.diag([-1.0, -1.0, 1.0])
    for ras in ([0.0, 0.0, 0.0], [40.0, -30.0, 25.0]):
        expected_ras = F @ np.array(shell_transform.TransformPoint(tuple(F @ np.array(ras))))
        np.testing.assert_allclose(transform.GetTransformFromParent().TransformPoint(ras), expected_ras, atol=0.5)
    rows = {result.statisticsTableNode.GetCellText(r, 0): float(result.statisticsTableNode.GetCellText(r, 1))
            for r in range(result.statisticsTableNode.GetNumberOfRows())}
    assert rows["Tumor count"] == result.stats["tumor_count"]  # the tables show the engine's figures
    assert rows["Total tumor volume"] == pytest.approx(result.stats["tumor_volume_ml"], rel=1e-4)
    assert result.tumorTableNode.GetNumberOfRows() == result.stats["tumor_count"]


def test_missing_phase_runs_the_present_phase_alone(scene, tiny_model, case_files):
    venous = loadVolumeNode(scene, case_files["venous"], "venous")
    result = real_logic(tiny_model).segment({"arterial": None, "venous": venous}, registration="rigid")
    assert result.stats["phases"] == ["venous"] and result.stats["head"] == "venous"
    assert result.heatmapNodes == {} and result.transformNodes == {}
    assert result.referencePhase == "venous"
    labels = exported_labels(result.segmentationNode, venous)
    assert labels.shape == slicer.util.arrayFromVolume(venous).shape
    assert int((labels > 0).sum()) > 0


def test_a_one_phase_model_in_the_imported_nnunet_format_runs_from_slicer(scene, case_files, tmp_path):
    """What ``maml import-nnunet`` writes (one phase, a fold ensemble, nnU-Net's inference rules)
    runs through the module's single-phase path and gives the shell's labels."""
    from engine_helpers import tiny_config
    from maml.config import LIVER_LABELS, InferenceConfig
    from maml.model import save_checkpoint
    from maml.network import FoldEnsemble, MAMLNet

    config = tiny_config(phases=("venous",))
    config.labels, config.spacing, config.patch_size = list(LIVER_LABELS), [6.0, 6.0, 6.0], [16, 32, 32]
    config.inference = InferenceConfig(blend="logits", mirror_axes=[0, 1, 2], resampling="nnunet")
    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "imported.pt", FoldEnsemble([MAMLNet(config), MAMLNet(config)]),
                            config, {"source": "nnU-Net v2 model folder (maml import-nnunet)"})
    venous = loadVolumeNode(scene, case_files["venous"], "venous")
    result = real_logic(model).segment({"arterial": None, "venous": venous}, registration="none",
                                       device="cpu")
    assert result.stats["phases"] == ["venous"] and result.stats["head"] == "venous"
    assert result.heatmapNodes == {} and result.transformNodes == {}
    out = tmp_path / "shell"
    completed = subprocess.run(
        [sys.executable, "-m", "maml.cli", "segment", "--phase", f"venous={case_files['venous']}",
         "--out", str(out), "--model", str(model), "--register", "none", "--device", "cpu",
         "--no-overview"], cwd=MODULE_DIR, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.nii.gz")))
    assert int((expected > 0).sum()) > 0
    np.testing.assert_array_equal(exported_labels(result.segmentationNode, venous), expected)


def test_phases_of_different_patients_get_the_engines_error_and_leave_the_scene_unchanged(scene, tiny_model,
                                                                                          case_files):
    arterial = loadVolumeNode(scene, case_files["other_arterial"], "arterial")
    venous = loadVolumeNode(scene, case_files["venous"], "venous")
    before, names, dirs = node_count(scene), scene_snapshot(scene), temp_dirs()
    with pytest.raises(MAMLSegmentationError) as error:
        real_logic(tiny_model).segment({"arterial": arterial, "venous": venous}, registration="rigid")
    message = str(error.value)
    assert "\n" not in message and not isinstance(error.value, CancelledError)
    assert message.startswith("Segmentation failed: the arterial phase stays dissimilar to the venous phase")
    assert "same patient" in message
    assert node_count(scene) == before and scene_snapshot(scene) == names
    assert arterial.GetParentTransformNode() is None
    assert temp_dirs() == dirs


def test_a_phase_the_model_does_not_know_gets_the_engines_error(scene, tiny_model, case_files):
    venous = loadVolumeNode(scene, case_files["venous"], "venous")
    before, dirs = node_count(scene), temp_dirs()
    with pytest.raises(MAMLSegmentationError, match=r"phase\(s\) \['portal'\] are not phases of model 'tiny'"):
        real_logic(tiny_model).segment({"portal": venous})
    assert node_count(scene) == before and temp_dirs() == dirs


@pytest.mark.skipif(sys.platform == "win32", reason="process state read from /proc")
def test_cancel_during_registration_stops_the_engine_and_leaves_nothing(scene, tiny_model, case_files):
    arterial = loadVolumeNode(scene, case_files["arterial"], "arterial")
    venous = loadVolumeNode(scene, case_files["venous"], "venous")
    before, names, dirs = node_count(scene), scene_snapshot(scene), temp_dirs()
    run = real_logic(tiny_model).segment({"arterial": arterial, "venous": venous}, registration="deformable",
                                         waitForCompletion=False)
    (tempDir,) = temp_dirs() - dirs
    steps, deadline = [], time.monotonic() + 120
    while "register" not in steps and run.isRunning and time.monotonic() < deadline:
        steps += [e.step for e in run.poll()]
        time.sleep(0.05)
    assert "register" in steps and run.isRunning, run.process.logText()
    time.sleep(0.5)  # inside elastix
    leader = run.process.pid
    started = time.monotonic()
    run.cancel()
    assert time.monotonic() - started < 15
    assert run.state == "cancelled" and isinstance(run.error, CancelledError)
    assert run.process.returnCode in (130, -9), run.process.logText()  # clean stop, or killed after the grace
    if run.process.returnCode == 130:
        assert '"cancelled": true' in run.process.logText() or "[error]" in run.process.logText()
    assert not process_alive(leader)
    assert not tempDir.exists() and temp_dirs() == dirs
    assert node_count(scene) == before and scene_snapshot(scene) == names
    assert arterial.GetParentTransformNode() is None
    with pytest.raises(CancelledError):
        run.wait()


def test_segment_folder_runs_the_real_segment_batch(tiny_model, case_files, tmp_path):
    from maml.cli import COMMANDS

    if "segment-batch" not in COMMANDS:
        pytest.skip("maml segment-batch is not in this engine yet")
    table = tmp_path / "cases.csv"
    table.write_text("case,arterial,venous\n"
                     f"good,{case_files['arterial']},{case_files['venous']}\n"
                     f"second,{case_files['other_arterial']},{case_files['venous']}\n")
    events = []
    out = real_logic(tiny_model).segmentFolder(table, tmp_path / "out", registration="none",
                                               progressCallback=events.append)
    assert out == tmp_path / "out"
    assert (out / "good" / "segmentation.nii.gz").is_file()
    assert (out / "summary.csv").is_file()
    assert events[-1].step == "done"


def test_uncertainty_and_tumor_uncertainty_reach_the_scene(scene, tiny_model, case_files):
    venous = loadVolumeNode(scene, case_files["venous"], "venous")
    result = real_logic(tiny_model).segment({"venous": venous}, device="cpu")
    node = result.uncertaintyNode
    assert node is not None and node.GetName() == "MAML uncertainty"
    values = slicer.util.arrayFromVolume(node)
    assert values.shape == slicer.util.arrayFromVolume(venous).shape
    assert 0.0 <= values.min() and values.max() <= 1.0
    table = result.tumorTableNode
    assert table.GetTable().GetColumnByName("Mean uncertainty") is not None
    # the tiny model carries no fingerprint: the report says so, the run is not refused
    assert result.domainCheck["status"] == "warning"
    assert result.statisticsTableNode.GetAttribute("MAMLSegmentation.domain_check") == "warning"


def test_an_image_unlike_the_training_data_is_refused_with_the_engines_sentence(scene):
    """The bundled model refuses unsigned storage (+1024): the panel's error is the engine's
    sentence, the scene stays as it was; accepting gives the result with a warning."""
    from MAMLSegmentationLib import OutOfDistributionRefusal

    sample = MODULE_DIR / "Resources" / "SampleData"
    venous = loadVolumeNode(scene, sample / "phantom_venous.nrrd", "venous")
    slicer.util.arrayFromVolume(venous)[:] += 1024
    slicer.util.arrayFromVolumeModified(venous)
    before, before_dirs = scene_snapshot(scene), temp_dirs()
    logic = MAMLSegmentationLogic(pythonExecutable=sys.executable)
    with pytest.raises(OutOfDistributionRefusal) as info:
        logic.segment({"venous": venous}, device="cpu")
    message = str(info.value)
    assert message.startswith("Refused: maml-liver-demo was trained on synthetic phantoms only")
    assert "\n" not in message and "--accept-out-of-distribution" in message
    assert scene_snapshot(scene) == before and temp_dirs() == before_dirs
    result = logic.segment({"venous": venous}, device="cpu", acceptOutOfDistribution=True)
    assert result.domainCheck["status"] == "warning" and result.domainCheck["accepted_out_of_distribution"]


def test_dicom_seg_from_the_console_references_the_loaded_series(scene, tiny_model, case_files, tmp_path):
    """``segment(..., dicomSeg=True)``: the reference node's DICOM files (found through its
    DICOM.instanceUIDs, as Slicer's DICOM module sets them) go to the engine, which writes
    segmentation.dcm into the output folder; its masks equal the imported segmentation."""
    highdicom = pytest.importorskip("highdicom")
    import pydicom
    from test_io import write_dicom_series

    venous_image = sitk.Cast(sitk.ReadImage(str(case_files["venous"])), sitk.sitkInt16)
    series = tmp_path / "series"
    uid = "1.2.826.0.1.3680043.2.1125.9.7777"
    write_dicom_series(venous_image, series, uid, "Portal venous", 2,
                       extra_tags=[("0020|0052", "1.2.826.0.1.3680043.2.1125.9.8888")])
    files = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: str(p) for p in series.iterdir()}
    venous = loadVolumeNode(scene, case_files["venous"], "venous")
    # slicer-core has no DICOM database: the lookup Slicer's database would give, from the files
    ordered = sorted(files, key=lambda u: int(u.rsplit(".", 1)[1]))
    venous.SetAttribute("DICOM.instanceUIDs", " ".join(ordered))
    logic = MAMLSegmentationLogic(pythonExecutable=sys.executable, defaultModel=tiny_model,
                                  dicomFileForInstance=files.get)

    with pytest.raises(MAMLSegmentationError, match="needs outputDirectory"):
        logic.segment({"venous": venous}, registration="none", dicomSeg=True)
    out = tmp_path / "out"
    result = logic.segment({"venous": venous}, registration="none", dicomSeg=True, outputDirectory=out)
    seg = highdicom.seg.segread(out / "segmentation.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    masks = seg.get_pixels_by_source_instance(ordered, segment_numbers=[1, 2])
    labels = exported_labels(result.segmentationNode, venous)
    assert (labels == 1).any()
    np.testing.assert_array_equal(masks[..., 0] > 0, labels == 1)
    np.testing.assert_array_equal(masks[..., 1] > 0, labels == 2)


def test_dicom_seg_of_a_volume_not_from_dicom_is_refused_before_the_engine_starts(scene, tiny_model, case_files,
                                                                                  tmp_path):
    venous = loadVolumeNode(scene, case_files["venous"], "venous")
    before = scene_snapshot(scene), temp_dirs()
    with pytest.raises(MAMLSegmentationError, match="needs the reference phase 'venous' loaded from DICOM"):
        real_logic(tiny_model).segment({"venous": venous}, dicomSeg=True, outputDirectory=tmp_path / "out")
    assert (scene_snapshot(scene), temp_dirs()) == before and not (tmp_path / "out").exists()
    venous.SetAttribute("DICOM.instanceUIDs", "1.2.3.4 1.2.3.5")
    logic = MAMLSegmentationLogic(pythonExecutable=sys.executable, defaultModel=tiny_model,
                                  dicomFileForInstance={}.get)
    with pytest.raises(MAMLSegmentationError, match="no file for 2 of the 2 slices"):
        logic.segment({"venous": venous}, dicomSeg=True, outputDirectory=tmp_path / "out")
