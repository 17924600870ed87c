"""MAMLSegmentation: liver and liver tumor segmentation from two-phase CT with MAML (Slicer module).

Thin Qt layer: the MRML logic lives in MAMLSegmentationLib (tested without Slicer), the computing
in the ``maml`` engine, run as a background process through its command line.
"""

import os
import pathlib
import shutil
import tempfile
from importlib.util import find_spec
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

import MAMLSegmentationLib as lib

CITATION = ("Y. Zhang et al., Modality-aware Mutual Learning for Multi-modal Medical Image Segmentation, "
            "MICCAI 2021 (arXiv:2107.09842).")


class MAMLSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MAML Liver Tumor Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["MAMLSegmentation developers"]
        self.parent.helpText = (
            "Segments the liver and liver tumors in arterial- and venous-phase CT with MAML (modality-aware "
            "mutual learning). The phases are registered first; per-phase attention maps show which phase the "
            "network relied on. Either phase may be missing. Research use only, not for clinical use.")
        self.parent.acknowledgementText = "Method: " + CITATION
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The bundled phantom (offline) under the "MAML" category of the Sample Data module.

    "MAMLPhantom" loads the arterial and venous phases (then Segment: two clicks);
    "MAMLPhantomTruth" adds the ground truth segmentation and the true motion transform.
    """
    import SampleData

    for source in lib.sampleDataSources():
        SampleData.SampleDataLogic.registerCustomSampleDataSource(**source)


@parameterNodeWrapper
class MAMLSegmentationParameterNode:
    arterialVolume: vtkMRMLScalarVolumeNode
    venousVolume: vtkMRMLScalarVolumeNode
    referencePhase: Annotated[str, Choice(["venous", "arterial"])] = "venous"
    registration: Annotated[str, Choice(["deformable", "rigid", "affine", "none"])] = "deformable"
    modelPath: pathlib.Path
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    backend: Annotated[str, Choice(["auto", "torch", "openvino"])] = "auto"
    postprocess: bool = True
    outputSegmentation: vtkMRMLSegmentationNode
    heatmapPhase: Annotated[str, Choice(["venous", "arterial"])] = "venous"
    heatmapOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


class MAMLSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.run = None
        self.result = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MAMLSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MAMLSegmentationLogic()
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.onTimer)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.updateModelInfo)
        self.ui.heatmapPhaseComboBox.connect("currentIndexChanged(int)", self.showHeatmap)
        self.ui.heatmapOpacitySlider.connect("valueChanged(double)", self.showHeatmap)
        self.initializeParameterNode()
        self.updateDeviceChoices()
        qt.QTimer.singleShot(0, self.updateModelInfo)  # runs `maml info`: after the panel is shown

    def cleanup(self):
        self.removeObservers()
        if self.run is not None:
            self.run.cancel()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)

    def onSceneStartClose(self, caller, event):
        if self.run is not None:
            self.run.cancel()
        self.result = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.venousVolume:
            self._parameterNode.venousVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
            self.updateGUI()

    def updateGUI(self, caller=None, event=None):
        p = self._parameterNode
        running = self.run is not None and self.run.isRunning
        self.ui.segmentButton.text = "Cancel" if running else "Segment"
        self.ui.segmentButton.enabled = running or bool(p and (p.arterialVolume or p.venousVolume))
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.optionsCollapsibleButton.enabled = not running

    def updateDeviceChoices(self):
        reason = "PyTorch is not installed yet."
        if find_spec("torch") is not None:
            import torch
            reason = "" if torch.cuda.is_available() else "No CUDA GPU is available to PyTorch."
        item = self.ui.deviceComboBox.model().item(lib.DEVICES.index("cuda"))
        item.setEnabled(not reason)
        item.setToolTip(reason or "Run on the GPU.")
        if reason and self._parameterNode and self._parameterNode.device == "cuda":
            self._parameterNode.device = "auto"

    def modelFile(self):
        path = str(self._parameterNode.modelPath) if self._parameterNode and self._parameterNode.modelPath else ""
        if path in ("", "."):
            bundled = lib.bundledModels()
            return str(bundled[0]) if bundled else None
        return path

    def updateModelInfo(self, *args):
        try:
            info = self.logic.modelInfo(self.modelFile())
        except lib.MAMLSegmentationError as error:
            self.ui.modelInfoLabel.text = f"Model information unavailable: {error}"
            return
        phases = info.get("phases", list(lib.PHASES))
        labels = ", ".join(entry.get("name", "?") for entry in info.get("labels", []))
        self.ui.modelInfoLabel.text = (f"Phases: {', '.join(phases)}. Labels: {labels}.\n"
                                       f"{info.get('intended_use', 'Synthetic demo model, not for clinical use.')}")
        self.ui.arterialVolumeSelector.enabled = "arterial" in phases
        self.ui.venousVolumeSelector.enabled = "venous" in phases

    def onSegmentButton(self):
        if self.run is not None and self.run.isRunning:
            self.run.cancel()
            self.onTimer()
            return
        if not ensureDependencies():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Cannot start the segmentation.", waitCursor=True):
            self.ui.logTextEdit.clear()
            self.run = self.logic.startSegmentation(
                {"arterial": p.arterialVolume, "venous": p.venousVolume}, p.outputSegmentation,
                self.modelFile(), p.registration, p.device, p.referencePhase, postprocess=p.postprocess,
                backend=p.backend)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Starting the engine..."
            self.timer.start()
        self.updateGUI()

    def onTimer(self):
        if self.run is None:
            return
        for event in self.run.poll():
            if event.fraction is not None:
                self.ui.progressBar.value = int(100 * event.fraction)
            self.ui.statusLabel.text = f"{event.step}: {event.message}"
        log = self.run.process.logText()
        if log != self.ui.logTextEdit.toPlainText():
            self.ui.logTextEdit.setPlainText(log)
        if self.run.isRunning:
            return
        self.timer.stop()
        run, self.run = self.run, None
        if run.error is not None:
            self.ui.statusLabel.text = str(run.error)
            if not isinstance(run.error, lib.CancelledError):
                slicer.util.errorDisplay(str(run.error), detailedText=run.process.logText())
        else:
            self.showResult(run.result)
        self.updateGUI()

    def showResult(self, result):
        self.result = result
        self._parameterNode.outputSegmentation = result.segmentationNode
        result.segmentationNode.CreateClosedSurfaceRepresentation()
        count = result.stats.get("tumor_count", "?")
        self.ui.statusLabel.text = f"Done: {count} tumor(s) found."
        self.ui.progressBar.value = 100
        if result.tumorTableNode:
            self.ui.statisticsTableView.setMRMLTableNode(result.tumorTableNode)
        self.showHeatmap()

    def showHeatmap(self, *args):
        if not self.result or not self._parameterNode:
            return
        p = self._parameterNode
        reference = {"arterial": p.arterialVolume, "venous": p.venousVolume}.get(self.result.referencePhase)
        heatmap = self.result.heatmapNodes.get(p.heatmapPhase)
        slicer.util.setSliceViewerLayers(background=reference, foreground=heatmap,
                                         foregroundOpacity=p.heatmapOpacity if heatmap else 0.0)


def ensureDependencies() -> bool:
    """PyTorch through the PyTorch extension, then the engine's pip packages, after one confirmation."""
    global _optionalOffered
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        slicer.util.errorDisplay("MAML segmentation needs the PyTorch extension. Install 'PyTorch' from the "
                                 "Extensions Manager, restart Slicer and try again.")
        return False
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    needTorch = not torchLogic.torchInstalled()
    missing = lib.missingPipRequirements()
    required = [m for m in missing if not m.get("optional")]
    if not needTorch and not required:
        # The optional packages (OpenVINO: faster CPU inference) are offered once per session.
        if not missing or _optionalOffered:
            return True
        _optionalOffered = True
        if not slicer.util.confirmYesNoDisplay(
                "Install OpenVINO for about twice as fast segmentation on the CPU (optional)?\n\n"
                + "\n".join(m["requirement"] for m in missing)):
            return True
    items = (["PyTorch (through the PyTorch extension)"] if needTorch else []) + [
        m["requirement"] + (" (optional: faster on the CPU)" if m.get("optional") else "") for m in missing]
    if required and not slicer.util.confirmOkCancelDisplay(
            "MAML segmentation needs these Python packages; they will be downloaded and installed now "
            "(SimpleITK, numpy and torch are kept as they are):\n\n" + "\n".join(items)):
        return False
    with slicer.util.WaitCursor():
        if needTorch and torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=">=2.1") is None:
            slicer.util.errorDisplay("PyTorch could not be installed; see the PyTorch Utils module.")
            return False
        constraints = pathlib.Path(tempfile.mkdtemp(prefix="MAMLSegmentation-pip-")) / "constraints.txt"
        constraints.write_text(lib.pipConstraints())
        try:
            for arguments in lib.pipInstallArguments(missing, constraints):
                slicer.util.pip_install(arguments)
        finally:
            shutil.rmtree(constraints.parent, ignore_errors=True)
    return True


_optionalOffered = False


class MAMLSegmentationLogic(ScriptedLoadableModuleLogic, lib.MAMLSegmentationLogic):
    """Console API: ``MAMLSegmentationLogic().segment({"arterial": a, "venous": v})`` (see the Lib)."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        python = shutil.which("PythonSlicer", path=os.path.join(slicer.app.slicerHome, "bin")) \
            or shutil.which("PythonSlicer")
        lib.MAMLSegmentationLogic.__init__(self, pythonExecutable=python)

    def getParameterNode(self):
        return MAMLSegmentationParameterNode(super().getParameterNode())


class MAMLSegmentationTest(ScriptedLoadableModuleTest):
    """Reload and Test: the bundled phantom segmented end to end in the running Slicer."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentSamplePhantom()

    def test_SegmentSamplePhantom(self):
        import SampleData

        registerSampleData()
        self.assertTrue(all(lib.sampleDataFiles(p) for p in lib.PHASES), "sample phantom is not bundled")
        arterial, venous = SampleData.downloadSamples("MAMLPhantom")
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(lib.MAMLSegmentationError):
            MAMLSegmentationLogic().segment({"arterial": venous, "venous": venous})
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        result = MAMLSegmentationLogic().segment({"arterial": arterial, "venous": venous}, registration="rigid")
        segmentation = result.segmentationNode.GetSegmentation()
        self.assertIsNotNone(segmentation.GetSegmentIdBySegmentName("Liver"))
        tumorId = segmentation.GetSegmentIdBySegmentName("Liver tumor")
        self.assertGreater(slicer.util.arrayFromSegmentBinaryLabelmap(
            result.segmentationNode, tumorId, venous).sum(), 0)
        self.assertEqual(set(result.heatmapNodes), {"arterial", "venous"})
        self.assertEqual(arterial.GetParentTransformNode(), result.transformNodes["arterial"])
        self.assertGreaterEqual(result.tumorTableNode.GetNumberOfRows(), 1)
        self.delayDisplay("MAML segmentation of the sample phantom passed")
