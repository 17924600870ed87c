"""MAMLSegmentationLogic: the console / GUI entry point, usable without the Slicer application.

It checks the inputs, writes the phases (world coordinates, LPS) to a temporary folder, runs the
engine's own command line (``maml segment ... --json-progress``) as a background process and turns
its output folder into nodes. It never computes a segmentation itself: one path for shell, console
and GUI.

Console example (in Slicer's Python console)::

    from MAMLSegmentation import MAMLSegmentationLogic
    result = MAMLSegmentationLogic().segment({"arterial": getNode("phantom_arterial"),
                                              "venous": getNode("phantom_venous")})
    result.segmentationNode, result.heatmapNodes, result.statisticsTableNode
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from .conversion import checkVolume3D, imageFromVolumeNode
from .dicomsource import copyDicomSource, dicomSourceFiles
from .errors import CancelledError, MAMLSegmentationError, OutOfDistributionRefusal
from .models import ModelCatalog, ModelCommandRun
from .process import EXIT_REFUSED, EngineProcess, EngineRun, ProgressEvent
from .results import importEngineOutput, readEngineOutput

MODULE_DIR = Path(__file__).resolve().parents[1]          # .../MAMLSegmentation (holds maml/)
RESOURCES_DIR = MODULE_DIR / "Resources"
MODELS_DIR = RESOURCES_DIR / "Models"
SAMPLE_DATA_DIR = RESOURCES_DIR / "SampleData"

PHASES = ("arterial", "venous")
DEFAULT_REFERENCE_PHASE = "venous"
REGISTRATION_PRESETS = ("none", "rigid", "affine", "deformable")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "torch", "openvino")  # maml.backends.BACKENDS
DEFAULT_MODEL_NAME = "maml_liver_demo.pt"  # maml.pipeline.DEFAULT_MODEL_NAME

# pip requirements of the engine beyond what Slicer ships (numpy, SimpleITK) and PyTorch (from the
# PyTorch extension). "no_deps": installed with --no-deps because its dependencies would replace torch.
_MODEL_INFO_CACHE: dict = {}  # (resolved path, mtime) -> maml info JSON
_PHASE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def bundledModels() -> list:
    """Checkpoints under Resources/Models, the engine's default (maml_liver_demo.pt) first."""
    models = sorted(MODELS_DIR.glob("*.pt")) if MODELS_DIR.is_dir() else []
    return sorted(models, key=lambda path: path.name != DEFAULT_MODEL_NAME)


def defaultModelPath() -> Path:
    """The model the engine uses when none is given: ``$MAML_MODEL``, else the bundled demo model.

    The same rule as ``maml.pipeline.default_model_path`` (not imported: the engine's imports need
    PyTorch, which may not be installed yet when the module panel opens).
    """
    if os.environ.get("MAML_MODEL"):
        return Path(os.environ["MAML_MODEL"])
    return MODELS_DIR / DEFAULT_MODEL_NAME


def sampleDataFiles(phase: str) -> Path | None:
    """The bundled phantom of a phase: Resources/SampleData/phantom_<phase>.(nrrd|nii.gz|mha)."""
    for suffix in (".nrrd", ".nii.gz", ".mha"):
        path = SAMPLE_DATA_DIR / f"phantom_{phase}{suffix}"
        if path.is_file():
            return path
    return None


SAMPLE_DATA_CATEGORY = "MAML"


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sampleDataSources() -> list:
    """Keyword arguments of ``SampleData.SampleDataLogic.registerCustomSampleDataSource``, one per sample.

    "MAMLPhantom": the two phases as volumes (what Segment needs: two clicks). "MAMLPhantomTruth"
    (optional): the ground truth as a segmentation and the true arterial-to-venous motion as a
    transform. Files are bundled (file:// URIs, offline); the SHA-256 checksums make Slicer's
    download cache take a new copy when a bundled file changes.
    """
    phases = {phase: sampleDataFiles(phase) for phase in PHASES}
    if not all(phases.values()):
        return []
    icon = RESOURCES_DIR / "Icons" / "MAMLSegmentation.png"

    def files(paths):
        return dict(uris=[p.as_uri() for p in paths], fileNames=[p.name for p in paths],
                    checksums=[f"SHA256:{_sha256(p)}" for p in paths])

    sources = [dict(category=SAMPLE_DATA_CATEGORY, sampleName="MAMLPhantom", thumbnailFileName=str(icon),
                    nodeNames=[f"phantom_{phase}" for phase in PHASES], loadFileType=["VolumeFile"] * len(PHASES),
                    **files([phases[phase] for phase in PHASES]))]
    truth = SAMPLE_DATA_DIR / "phantom_truth.nrrd"
    motion = SAMPLE_DATA_DIR / "phantom_arterial_to_venous.tfm"
    if truth.is_file() and motion.is_file():
        sources.append(dict(category=SAMPLE_DATA_CATEGORY, sampleName="MAMLPhantomTruth",
                            thumbnailFileName=str(icon), nodeNames=["phantom_truth", "phantom_true_motion"],
                            loadFileType=["SegmentationFile", "TransformFile"], **files([truth, motion])))
    return sources


def defaultPythonExecutable() -> str:
    """Slicer's PythonSlicer when running inside Slicer, else this interpreter."""
    slicerPython = shutil.which("PythonSlicer")
    return slicerPython or sys.executable


@dataclass
class SegmentationResult:
    segmentationNode: object
    heatmapNodes: dict = field(default_factory=dict)     # phase -> scalar volume node
    transformNodes: dict = field(default_factory=dict)   # moving phase -> transform node
    statisticsTableNode: object = None
    tumorTableNode: object = None
    stats: dict = field(default_factory=dict)
    referencePhase: str = ""
    outputDirectory: Path | None = None                  # kept only when the caller gave one
    log: str = ""
    uncertaintyNode: object = None                       # scalar volume node, 0..1

    @property
    def domainCheck(self) -> dict:
        """The engine's out-of-distribution report: status ok / warning, and its sentence."""
        return self.stats.get("domain_check") or {}


class SegmentationRun(EngineRun):
    """A segmentation running in the background. Call ``poll()`` (a QTimer) or ``wait()``.

    When the engine is done, ``poll()`` imports its results (``result``); on failure or cancel the
    scene is left as it was and ``error`` holds a ``MAMLSegmentationError``. Temporary files are
    removed in all cases.
    """

    def __init__(self, process: EngineProcess, tempDir: Path, outputDir: Path, keepOutput: bool,
                 scene, phaseNodes: dict, referencePhase: str, outputSegmentation, importResults=True):
        self.process = process
        self.tempDir = tempDir
        self.outputDir = outputDir
        self.keepOutput = keepOutput
        self.scene = scene
        self.phaseNodes = phaseNodes
        self.referencePhase = referencePhase
        self.outputSegmentation = outputSegmentation
        self.importResults = importResults
        self.result: SegmentationResult | None = None
        self.error: MAMLSegmentationError | None = None
        self.state = "running"

    def _finish(self) -> None:
        try:
            if self.process.state == "cancelled":
                self.state = "cancelled"
                self.error = CancelledError("Segmentation cancelled; the scene is unchanged.")
            elif self.process.state != "done" and self.process.returnCode == EXIT_REFUSED:
                self.state = "refused"
                self.error = OutOfDistributionRefusal(f"Refused: {self.process.errorMessage}")
            elif self.process.state != "done":
                self.state = "failed"
                self.error = MAMLSegmentationError(f"Segmentation failed: {self.process.errorMessage}")
            elif self.importResults:
                try:
                    output = readEngineOutput(self.outputDir)
                    nodes = importEngineOutput(self.scene, output, self.phaseNodes, self.referencePhase,
                                               self.outputSegmentation)
                except MAMLSegmentationError as error:
                    self.state, self.error = "failed", error
                except Exception as error:  # noqa: BLE001  (turned into one clear line)
                    self.state = "failed"
                    self.error = MAMLSegmentationError(f"Cannot import the results: {error}")
                else:
                    self.state = "done"
                    self.result = SegmentationResult(
                        nodes.segmentation, nodes.heatmaps, nodes.transforms, nodes.statisticsTable,
                        nodes.tumorTable, output.stats, self.referencePhase,
                        self.outputDir if self.keepOutput else None, self.process.logText(),
                        nodes.uncertainty)
            else:
                self.state = "done"
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        if self.tempDir is not None and self.tempDir.exists():
            shutil.rmtree(self.tempDir, ignore_errors=True)

    def _outcome(self):
        return self.result


class MAMLSegmentationLogic:
    """Segment liver and liver tumors in two-phase CT volume nodes with the MAML engine.

    ``pythonExecutable``: interpreter that runs the engine (PythonSlicer inside Slicer).
    ``engineCommand``: the command prefix to which ``segment ...`` is appended; default
    ``[pythonExecutable, "-m", "maml.cli"]`` with the module folder on PYTHONPATH.
    ``defaultModel``: checkpoint used when a call names none (else ``$MAML_MODEL``, else the bundled
    demo model, as the engine does).
    ``popen``: how processes are started.
    ``modelsDir``: the user models folder (default ``$MAML_MODELS``, else under Slicer's settings
    folder); ``models`` (a ``ModelCatalog``) lists it with the bundled model.
    ``dicomFileForInstance``: SOP Instance UID -> file, for a DICOM SEG (default: Slicer's DICOM
    database).
    """

    def __init__(self, pythonExecutable: str | None = None, engineCommand: list | None = None,
                 popen=subprocess.Popen, scene=None, defaultModel=None, modelsDir=None,
                 dicomFileForInstance=None):
        self.pythonExecutable = pythonExecutable or defaultPythonExecutable()
        self.engineCommand = list(engineCommand) if engineCommand else None
        self.popen = popen
        self.scene = scene
        self.defaultModel = defaultModel
        self.models = ModelCatalog(modelsDir)
        self.dicomFileForInstance = dicomFileForInstance

    # --- the engine's command line -------------------------------------------------------------
    def engineCommandPrefix(self) -> list:
        return list(self.engineCommand) if self.engineCommand else [self.pythonExecutable, "-m", "maml.cli"]

    def engineEnvironment(self) -> dict:
        env = dict(os.environ)
        paths = [str(MODULE_DIR)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        env["MAML_MODELS"] = str(self.models.userDir)  # the engine sees the folder the panel lists
        return env

    def buildSegmentCommand(self, phasePaths: dict, outputDir, model=None, registration="deformable",
                            referencePhase=None, device="auto", postprocess=True,
                            acceptOutOfDistribution=False, dicomSource=None, backend="auto") -> list:
        command = [*self.engineCommandPrefix(), "segment"]
        for phase, path in phasePaths.items():
            command += ["--phase", f"{phase}={path}"]
        command += ["--out", str(outputDir), "--register", registration, "--device", device]
        if referencePhase:
            command += ["--reference", referencePhase]
        if dicomSource:
            command += ["--dicom-seg", "--dicom-source", str(dicomSource)]
        return command + self._commonRunOptions(model, postprocess, acceptOutOfDistribution, backend)

    def buildSegmentBatchCommand(self, inputDir, outputDir, model=None, registration="deformable",
                                 device="auto", postprocess=True, acceptOutOfDistribution=False,
                                 backend="auto") -> list:
        command = [*self.engineCommandPrefix(), "segment-batch", "--input", str(inputDir),
                   "--out", str(outputDir), "--register", registration, "--device", device]
        return command + self._commonRunOptions(model, postprocess, acceptOutOfDistribution, backend)

    @staticmethod
    def _commonRunOptions(model, postprocess: bool, acceptOutOfDistribution: bool = False,
                          backend: str = "auto") -> list:
        if backend not in BACKENDS:
            raise MAMLSegmentationError(f"Unknown backend '{backend}' (choose from {', '.join(BACKENDS)}).")
        options = ["--model", str(model)] if model else []
        options += ["--backend", backend]
        if not postprocess:
            options.append("--no-postprocessing")
        if acceptOutOfDistribution:
            options.append("--accept-out-of-distribution")
        # No overview.png: Slicer shows the results itself (and needs no matplotlib for it).
        return options + ["--no-overview", "--json-progress"]

    def modelInfo(self, model=None, timeout: float = 120) -> dict:
        """The model's card (phases, labels, intended use, training): what ``maml info --json`` prints.

        Read from the JSON sidecar beside the checkpoint (no torch, no engine). A checkpoint without
        one is asked with ``maml info MODEL --json``, which blocks: the panel never does that, it
        lists models through ``models`` and has missing cards written in the background.
        """
        model = self.resolveModel(model)
        card = self.models.cardForPath(model)
        if card is not None:
            return card
        key = (str(Path(model).resolve()), Path(model).stat().st_mtime_ns)
        if key in _MODEL_INFO_CACHE:
            return dict(_MODEL_INFO_CACHE[key])
        command = [*self.engineCommandPrefix(), "info", str(model), "--json"]
        try:
            completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                       env=self.engineEnvironment(), check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise MAMLSegmentationError(f"Cannot read the model information: {error}") from error
        if completed.returncode != 0:
            lines = (completed.stderr or completed.stdout).strip().splitlines()
            errors = [line for line in lines if line.startswith("maml ") and ": error: " in line]
            raise MAMLSegmentationError((errors or lines or ["maml info failed"])[-1 if not errors else 0])
        try:
            info = json.loads(completed.stdout)
        except ValueError as error:
            raise MAMLSegmentationError(f"maml info printed no JSON: {error}") from error
        _MODEL_INFO_CACHE[key] = info
        return dict(info)

    # --- installing models ----------------------------------------------------------------------
    def buildModelInstallCommand(self, source, sha256=None, name=None) -> list:
        command = [*self.engineCommandPrefix(), "models", "install", str(source)]
        if sha256:
            command += ["--sha256", str(sha256).strip()]
        if name:
            command += ["--name", str(name)]
        return command + ["--json-progress"]

    def startModelInstall(self, source, sha256=None, name=None) -> ModelCommandRun:
        """``maml models install`` in the background: a file, an https address (with its SHA-256)
        or a catalog entry's name. Returns at once; poll() / wait() / cancel() the run."""
        source = str(source).strip()
        if not source:
            raise MAMLSegmentationError("Choose a model file or give an https address.")
        if "://" in source:
            if not source.startswith("https://"):
                raise MAMLSegmentationError(f"Only https addresses are installed, not {source}.")
            if not sha256 or not re.fullmatch(r"[0-9a-fA-F]{64}", str(sha256).strip()):
                raise MAMLSegmentationError(
                    "Give the model's SHA-256 checksum (64 hexadecimal digits) with its address: the "
                    "download is verified against it.")
        elif not Path(source).is_file() and source not in {e.name for e in self.models.available}:
            raise MAMLSegmentationError(f"Model file not found: {source}")
        process = EngineProcess(self.buildModelInstallCommand(source, sha256, name),
                                env=self.engineEnvironment(), popen=self.popen)
        return ModelCommandRun(process, self.models, "Model installation", isInstall=True)

    def installModel(self, source, sha256=None, name=None, progressCallback=None) -> str:
        """Blocking install (console); returns the installed model's name."""
        return self.startModelInstall(source, sha256, name).wait(progressCallback=progressCallback or _printProgress)

    def startModelCardUpdate(self) -> ModelCommandRun:
        """``maml models list`` in the background: writes the card of checkpoints copied into the
        user folder by hand (loading them needs torch, so never on the GUI thread)."""
        process = EngineProcess([*self.engineCommandPrefix(), "models", "list", "--json-progress"],
                                env=self.engineEnvironment(), popen=self.popen)
        return ModelCommandRun(process, self.models, "Reading the models")

    # --- input checks ---------------------------------------------------------------------------
    @staticmethod
    def checkModel(model):
        """A given model file (None when none is given: then the engine's default is used)."""
        if model in (None, ""):
            return None
        path = Path(model)
        if not path.is_file():
            raise MAMLSegmentationError(f"Model file not found: {path}")
        return path

    def resolveModel(self, model=None) -> Path:
        """The model file a run will use: the given one (a file, or an installed model's name), else
        ``defaultModel``, else the engine's default."""
        model = model if model not in (None, "") else self.defaultModel
        if isinstance(model, str) and not Path(model).is_file() and self.models.model(model) is not None:
            return self.models.model(model).path
        given = self.checkModel(model)
        if given is not None:
            return given
        default = defaultModelPath()
        if not default.is_file():
            raise MAMLSegmentationError(
                f"No model given and the default model {default} is missing: choose a model file "
                "(the bundled demo model ships with the extension; $MAML_MODEL may name another).")
        return default

    def checkInputs(self, phaseNodes: dict, registration: str, device: str, referencePhase, outputSegmentation):
        if not isinstance(phaseNodes, dict):
            raise MAMLSegmentationError("phaseNodes must be a dict {phase name: volume node}.")
        phases = {phase: node for phase, node in phaseNodes.items() if node is not None}
        if not phases:
            raise MAMLSegmentationError(
                f"No input volume: select a volume for at least one phase ({', '.join(PHASES)}).")
        seen = {}
        for phase, node in phases.items():
            if not _PHASE_NAME.match(str(phase)):
                raise MAMLSegmentationError(f"Invalid phase name '{phase}' (letters, digits and _ only).")
            if not hasattr(node, "IsA") or not node.IsA("vtkMRMLScalarVolumeNode"):
                raise MAMLSegmentationError(f"The {phase} input is not a scalar volume node.")
            key = node.GetID() or id(node)
            if key in seen:
                raise MAMLSegmentationError(
                    f"The same volume '{node.GetName()}' is selected for the {seen[key]} and {phase} phases; "
                    "each phase needs its own volume.")
            seen[key] = phase
            checkVolume3D(node, f"{node.GetName()} ({phase})")
        scenes = {id(node.GetScene()) for node in phases.values()}
        if len(scenes) != 1 or next(iter(phases.values())).GetScene() is None:
            raise MAMLSegmentationError("All input volumes must be in the same scene.")
        if registration not in REGISTRATION_PRESETS:
            raise MAMLSegmentationError(
                f"Unknown registration preset '{registration}' (choose from {', '.join(REGISTRATION_PRESETS)}).")
        if device not in DEVICES:
            raise MAMLSegmentationError(f"Unknown device '{device}' (choose from {', '.join(DEVICES)}).")
        if referencePhase is None:
            referencePhase = DEFAULT_REFERENCE_PHASE if DEFAULT_REFERENCE_PHASE in phases else next(iter(phases))
        if referencePhase not in phases:
            raise MAMLSegmentationError(
                f"The reference phase '{referencePhase}' has no input volume (given: {', '.join(phases)}).")
        if outputSegmentation is not None and not outputSegmentation.IsA("vtkMRMLSegmentationNode"):
            raise MAMLSegmentationError(f"The output '{outputSegmentation.GetName()}' is not a segmentation node.")
        return phases, referencePhase

    def _dicomSegSource(self, dicomSeg: bool, referenceNode, outputDirectory) -> list:
        if not dicomSeg:
            return []
        if outputDirectory is None:
            raise MAMLSegmentationError(
                "dicomSeg=True needs outputDirectory= (the folder that keeps segmentation.dcm).")
        return dicomSourceFiles(referenceNode, self.dicomFileForInstance)

    # --- running --------------------------------------------------------------------------------
    def startSegmentation(self, phaseNodes: dict, outputSegmentation=None, model=None,
                          registration="deformable", device="auto", referencePhase=None,
                          outputDirectory=None, postprocess=True,
                          acceptOutOfDistribution=False, dicomSeg=False, backend="auto") -> SegmentationRun:
        """Check inputs, write them to a temporary folder and start the engine; returns at once."""
        phases, referencePhase = self.checkInputs(phaseNodes, registration, device, referencePhase,
                                                  outputSegmentation)
        dicomFiles = self._dicomSegSource(dicomSeg, phases[referencePhase], outputDirectory)
        model = self.resolveModel(model)
        scene = next(iter(phases.values())).GetScene()
        tempDir = Path(tempfile.mkdtemp(prefix="MAMLSegmentation-"))
        try:
            inputDir = tempDir / "inputs"
            inputDir.mkdir()
            phasePaths = {}
            for phase, node in phases.items():
                path = inputDir / f"{phase}.nrrd"
                sitk.WriteImage(imageFromVolumeNode(node), str(path), useCompression=False)
                phasePaths[phase] = path
            keep = outputDirectory is not None
            outputDir = Path(outputDirectory) if keep else tempDir / "output"
            dicomSource = copyDicomSource(dicomFiles, tempDir / "dicom_source") if dicomFiles else None
            command = self.buildSegmentCommand(phasePaths, outputDir, model, registration, referencePhase,
                                               device, postprocess, acceptOutOfDistribution,
                                               dicomSource, backend)
            process = EngineProcess(command, env=self.engineEnvironment(), popen=self.popen)
        except Exception:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        return SegmentationRun(process, tempDir, outputDir, keep, scene, phases, referencePhase,
                               outputSegmentation)

    def segment(self, phaseNodes: dict, outputSegmentation=None, model=None, registration="deformable",
                device="auto", waitForCompletion=True, referencePhase=None, outputDirectory=None,
                progressCallback=None, postprocess=True, acceptOutOfDistribution=False,
                dicomSeg=False, backend="auto"):
        """Segment; blocking by default (returns a SegmentationResult), else a SegmentationRun.

        ``postprocess=False`` keeps the network's raw labels (skips the model's post-processing).
        An image unlike the model's training data raises ``OutOfDistributionRefusal`` with the
        engine's sentence and leaves the scene unchanged, unless ``acceptOutOfDistribution``: then
        the result comes with ``stats["domain_check"]["status"] == "warning"``.
        ``dicomSeg=True`` also writes ``segmentation.dcm`` (a DICOM SEG referencing the reference
        phase's DICOM series) into ``outputDirectory``, which it needs; the reference phase must have
        been loaded from DICOM. ``backend``: auto, torch or openvino (auto: OpenVINO on the CPU
        when it is installed)."""
        run = self.startSegmentation(phaseNodes, outputSegmentation, model, registration, device,
                                     referencePhase, outputDirectory, postprocess,
                                     acceptOutOfDistribution, dicomSeg, backend)
        if not waitForCompletion:
            return run
        return run.wait(progressCallback=progressCallback or _printProgress)

    def segmentFolder(self, inputDir, outputDir, model=None, registration="deformable", device="auto",
                      waitForCompletion=True, progressCallback=None, postprocess=True,
                      acceptOutOfDistribution=False, backend="auto"):
        """``maml segment-batch`` over many cases; files in, files out (no nodes).

        ``inputDir``: an nnU-Net raw folder (imagesTs/CASE_0000.nii.gz = arterial, CASE_0001 = venous)
        or a CSV file with columns case,arterial,venous. Each case is written to ``outputDir/CASE/``
        as ``maml segment`` writes it, with ``summary.csv`` beside; finished cases are skipped when
        run again. Blocking by default: returns ``outputDir``; cases that failed are printed (and
        listed in summary.csv), a failure of the whole batch raises MAMLSegmentationError.
        """
        inputDir = Path(inputDir)
        if not inputDir.exists():
            raise MAMLSegmentationError(f"Batch input not found: {inputDir}")
        if registration not in REGISTRATION_PRESETS:
            raise MAMLSegmentationError(f"Unknown registration preset '{registration}'.")
        if device not in DEVICES:
            raise MAMLSegmentationError(f"Unknown device '{device}'.")
        model = self.resolveModel(model)
        Path(outputDir).mkdir(parents=True, exist_ok=True)
        command = self.buildSegmentBatchCommand(inputDir, outputDir, model, registration, device,
                                                postprocess, acceptOutOfDistribution, backend)
        process = EngineProcess(command, env=self.engineEnvironment(), popen=self.popen)
        run = SegmentationRun(process, None, Path(outputDir), True, None, {}, "", None, importResults=False)
        if not waitForCompletion:
            return run
        run.wait(progressCallback=progressCallback or _printProgress)
        for row in failedBatchCases(outputDir):
            print(f"MAMLSegmentation: case {row.get('case')} failed: {row.get('message')}")
        return Path(outputDir)


def failedBatchCases(outputDir) -> list:
    """Rows of ``outputDir/summary.csv`` (written by segment-batch) whose status is not ok."""
    import csv

    path = Path(outputDir) / "summary.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as stream:
        return [row for row in csv.DictReader(stream) if row.get("status") not in ("ok", "done")]


def _printProgress(event: ProgressEvent) -> None:
    percent = "" if event.fraction is None else f"{event.fraction * 100:3.0f}% "
    print(f"MAMLSegmentation: {percent}{event.step}: {event.message}".rstrip(": "))
