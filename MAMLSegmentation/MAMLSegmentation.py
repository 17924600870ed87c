"""MAMLSegmentation: liver and liver tumor segmentation from two-phase CT with MAML (Slicer module).

Thin Qt layer: the MRML logic lives in MAMLSegmentationLib (tested without Slicer), the computing
in the ``maml`` engine, run as a background process through its command line.
"""

import logging
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

MODEL_SETTING = "MAMLSegmentation/Model"  # the model chosen last (application settings)
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
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    backend: Annotated[str, Choice(["auto", "torch", "openvino"])] = "auto"
    postprocess: bool = True
    acceptOutOfDistribution: bool = False
    outputSegmentation: vtkMRMLSegmentationNode
    heatmapPhase: Annotated[str, Choice(["venous", "arterial", "uncertainty"])] = "venous"
    heatmapOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


class MAMLSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.run = None
        self.modelRun = None   # maml models install / list in the background
        self._cardUpdateStarted = False
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
        self.modelTimer = qt.QTimer()
        self.modelTimer.setInterval(200)
        self.modelTimer.connect("timeout()", self.onModelTimer)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        self.initializeParameterNode()
        # The widget's own slots after connectGui: Qt calls slots in connection order, so the
        # parameter node already holds a widget's new value when these read it.
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.installModelButton.connect("clicked(bool)", self.onInstallModelButton)
        self.ui.heatmapPhaseComboBox.connect("currentIndexChanged(int)", self.showHeatmap)
        self.ui.heatmapOpacitySlider.connect("valueChanged(double)", self.showHeatmap)
        self.updateDeviceChoices()
        self.updateModelList(qt.QSettings().value(MODEL_SETTING))

    def cleanup(self):
        self.removeObservers()
        if self.run is not None:
            self.run.cancel()
        if self.modelRun is not None:
            self.modelRun.cancel()

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
        self.guessPhaseVolumes()

    def onNodeAdded(self, caller, event):
        qt.QTimer.singleShot(0, self.guessPhaseVolumes)  # once the loading code has named the node

    def guessPhaseVolumes(self):
        """Fills empty phase selectors from volume names / DICOM series descriptions (the Lib's guess)."""
        p = self._parameterNode
        if not p or (self.run is not None and self.run.isRunning):
            return
        from MAMLSegmentationLib.phases import guessPhaseVolumes, phaseVolumeCandidates

        guess = guessPhaseVolumes(phaseVolumeCandidates(slicer.mrmlScene),
                                  {"arterial": p.arterialVolume, "venous": p.venousVolume})
        for phase, node in guess.items():
            setattr(p, f"{phase}Volume", node)

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
        modelBusy = self.modelRun is not None and self.modelRun.isRunning
        self.ui.segmentButton.text = "Cancel" if running else "Segment"
        self.ui.segmentButton.enabled = running or bool(
            not modelBusy and self.selectedModel() and p and (p.arterialVolume or p.venousVolume))
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.optionsCollapsibleButton.enabled = not running
        self.ui.modelComboBox.enabled = not modelBusy
        self.ui.installModelButton.text = "Cancel" if modelBusy else "Install model..."

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

    # --- models: listed from their JSON cards (no torch, no engine on the GUI thread) ---------------
    def updateModelList(self, select=None):
        catalog = self.logic.models
        catalog.refresh()
        combo = self.ui.modelComboBox
        select = select or combo.itemData(combo.currentIndex)
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for model in catalog.models:
            combo.addItem(f"{model.name} (bundled)" if model.source == "bundled" else model.name, model.name)
            combo.setItemData(combo.count - 1, lib.cardDetails(model.card, model.card_problem), qt.Qt.ToolTipRole)
        combo.setCurrentIndex(max(combo.findData(select), 0) if select else 0)
        combo.blockSignals(wasBlocked)
        if catalog.catalogProblem and catalog.catalogProblem not in self.ui.statusLabel.text:  # models still listed
            self.ui.statusLabel.text = f"{self.ui.statusLabel.text} {catalog.catalogProblem}".strip()
        self.onModelChanged()
        if (catalog.modelsWithoutCard() and self.modelRun is None and not self._cardUpdateStarted
                and find_spec("torch") is not None):  # reading a checkpoint needs PyTorch
            self._cardUpdateStarted = True  # once: a checkpoint that does not load keeps no card
            self.startModelRun(self.logic.startModelCardUpdate(), "Reading the installed models...")

    def selectedModel(self):
        combo = self.ui.modelComboBox
        name = combo.itemData(combo.currentIndex) if combo.count else None
        return self.logic.models.model(name) if name else None

    def modelFile(self):
        model = self.selectedModel()
        return str(model.path) if model else None

    def onModelChanged(self, *args):
        model = self.selectedModel()
        if model is None:
            self.ui.modelInfoLabel.text = "No model installed: click Install model..."
            self.updateGUI()
            return
        qt.QSettings().setValue(MODEL_SETTING, model.name)
        self.ui.modelInfoLabel.text = lib.cardSummary(model.card, model.card_problem)
        self.ui.modelInfoLabel.toolTip = lib.cardDetails(model.card, model.card_problem)
        phases = lib.modelPhases(model)
        self.ui.arterialVolumeSelector.enabled = "arterial" in phases
        self.ui.venousVolumeSelector.enabled = "venous" in phases
        self.updateGUI()

    def onInstallModelButton(self):
        if self.modelRun is not None and self.modelRun.isRunning:
            self.modelRun.cancel()
            self.onModelTimer()
            return
        if not ensureDependencies():  # the engine loads the model to check it
            return
        source, sha256 = self.askModelSource()
        if not source:
            return
        with slicer.util.tryWithErrorDisplay("Cannot install the model.", waitCursor=True):
            self.startModelRun(self.logic.startModelInstall(source, sha256), "Installing the model...")

    def askModelSource(self):
        """(file, address or catalog name; SHA-256) from small dialogs; ("", "") when cancelled."""
        fromFile, fromAddress = "A model file (.pt) on this computer", "An https address and its SHA-256"
        catalog = {f"From the catalog: {entry.name} ({entry.description[:60]})": entry.name
                   for entry in self.logic.models.available if entry.url}
        choice = qt.QInputDialog.getItem(slicer.util.mainWindow(), "Install model", "Install from:",
                                         [fromFile, fromAddress, *catalog], 0, False)
        if choice == fromFile:
            return qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Choose a MAML model", "",
                                                  "MAML model (*.pt)"), None
        if choice == fromAddress:
            address = qt.QInputDialog.getText(slicer.util.mainWindow(), "Install model", "https address:")
            sha256 = qt.QInputDialog.getText(slicer.util.mainWindow(), "Install model",
                                             "SHA-256 checksum (64 hexadecimal digits):") if address else ""
            return (address, sha256) if address and sha256 else ("", "")
        return catalog.get(choice, ""), None

    def startModelRun(self, run, status):
        self.modelRun = run
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = status
        self.modelTimer.start()
        self.updateGUI()

    def onModelTimer(self):
        run = self.modelRun
        if run is None:
            return
        for event in run.poll():
            if event.fraction is not None:
                self.ui.progressBar.value = int(100 * event.fraction)
            self.ui.statusLabel.text = f"{event.step}: {event.message}"
        if run.isRunning:
            return
        self.modelTimer.stop()
        self.modelRun = None
        self.ui.logTextEdit.setPlainText(run.process.logText())
        if run.error is not None:
            self.ui.statusLabel.text = str(run.error)
            if run.isInstall and not isinstance(run.error, lib.CancelledError):
                slicer.util.errorDisplay(str(run.error), detailedText=run.process.logText())
        elif run.installedName:
            self.ui.statusLabel.text = f"Installed model {run.installedName}."
        self.updateModelList(run.installedName or None)

    def onSegmentButton(self):
        if self.run is not None and self.run.isRunning:
            self.run.cancel()
            self.onTimer()
            return
        p = self._parameterNode
        if not ensureDependencies(backend=p.backend):
            return
        with slicer.util.tryWithErrorDisplay("Cannot start the segmentation.", waitCursor=True):
            self.ui.logTextEdit.clear()
            phases = lib.modelPhases(self.selectedModel())
            self.run = self.logic.startSegmentation(
                {phase: node for phase, node in {"arterial": p.arterialVolume, "venous": p.venousVolume}.items()
                 if phase in phases}, p.outputSegmentation,
                self.modelFile(), p.registration, p.device, p.referencePhase, postprocess=p.postprocess,
                acceptOutOfDistribution=p.acceptOutOfDistribution, backend=p.backend)
            self.showDomainCheck({})
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
            if isinstance(run.error, lib.OutOfDistributionRefusal):
                self.showDomainCheck({"status": "refused", "sentence": str(run.error)})
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
        self.showDomainCheck(result.domainCheck)
        self.ui.progressBar.value = 100
        if result.tumorTableNode:
            self.ui.statisticsTableView.setMRMLTableNode(result.tumorTableNode)
        self.showHeatmap()

    def showHeatmap(self, *args):
        if not self.result or not self._parameterNode:
            return
        p = self._parameterNode
        reference = {"arterial": p.arterialVolume, "venous": p.venousVolume}.get(self.result.referencePhase)
        heatmap = (self.result.uncertaintyNode if p.heatmapPhase == "uncertainty"
                   else self.result.heatmapNodes.get(p.heatmapPhase))
        slicer.util.setSliceViewerLayers(background=reference, foreground=heatmap,
                                         foregroundOpacity=p.heatmapOpacity if heatmap else 0.0)


    def showDomainCheck(self, domain: dict):
        """The out-of-distribution warning in red above the status line, impossible to miss."""
        label = self.ui.domainWarningLabel
        label.visible = domain.get("status") not in (None, "ok")
        label.text = domain.get("sentence", "") if label.visible else ""


def ensureDependencies(dicomSeg: bool = False, backend: str = "auto") -> bool:
    """PyTorch through the PyTorch extension, then the pip packages the chosen options need and lack
    (version-aware, MAMLSegmentationLib.install; OpenVINO when that backend is chosen), after one
    confirmation."""
    from MAMLSegmentationLib import install

    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        slicer.util.errorDisplay("MAML segmentation needs the PyTorch extension. Install 'PyTorch' from the "
                                 "Extensions Manager, restart Slicer and try again.")
        return False
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    needTorch = not torchLogic.torchInstalled()
    missing = install.missingRequirements(dicomSeg, backend=backend)
    if not needTorch and not missing:
        return True
    items = (["PyTorch (through the PyTorch extension)"] if needTorch else []) + [
        f"{text} ({reason})" for text, reason in missing]
    if not slicer.util.confirmOkCancelDisplay(
            "MAML segmentation needs these Python packages; they will be downloaded and installed now "
            "(SimpleITK, numpy and torch are kept as they are):\n\n" + "\n".join(items)):
        return False
    with slicer.util.WaitCursor():
        if needTorch and torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=">=2.1") is None:
            slicer.util.errorDisplay("PyTorch could not be installed; see the PyTorch Utils module.")
            return False
        constraintsDir = tempfile.mkdtemp(prefix="MAMLSegmentation-pip-")
        try:
            install.installMissing(slicer.util.pip_install, constraintsDir, dicomSeg, backend)
        finally:
            shutil.rmtree(constraintsDir, ignore_errors=True)
    return True


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
        message = self.missingDependenciesMessage()
        if message:  # the Extensions build machines have no PyTorch: a skip, not a failure
            logging.warning(message)
            self.delayDisplay(message)
            return
        self.test_SegmentSamplePhantom()

    @staticmethod
    def missingDependenciesMessage() -> str:
        from MAMLSegmentationLib.install import missingEngineDependencies

        missing = missingEngineDependencies()
        if not missing:
            return ""
        return ("MAMLSegmentationTest skipped: the engine needs " + ", ".join(missing)
                + ". Press Segment in the module once to install them, then run the test again.")

    def test_SegmentSamplePhantom(self):
        message = self.missingDependenciesMessage()
        if message:
            self.skipTest(message)
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
