"""MRML-level logic of the MAMLSegmentation module (imports slicer, vtk, SimpleITK, numpy; no Qt).

Importable with ``slicer-core`` alone, so it is tested without the Slicer application.
"""

from .conversion import (checkVolume3D, ijkToRASFromImage, imageFromVolumeNode, updateVolumeNodeFromImage,
                         addVolumeNodeFromImage)
from .errors import CancelledError, MAMLSegmentationError, OutOfDistributionRefusal
from .logic import (DEVICES, PHASES, REGISTRATION_PRESETS, MAMLSegmentationLogic, SegmentationResult,
                    SegmentationRun, bundledModels, sampleDataFiles, sampleDataSources)
from .install import missingRequirements, pipConstraints, pipInstallArguments, requiredPackages
from .models import ModelCatalog, ModelCommandRun, cardDetails, cardSummary, modelPhases
from .process import EngineProcess, ProgressEvent, parseProgressLine
from .results import STANDARD_SEGMENTS, importEngineOutput, readEngineOutput

__all__ = [
    "CancelledError", "DEVICES", "EngineProcess", "MAMLSegmentationError", "MAMLSegmentationLogic",
    "OutOfDistributionRefusal", "PHASES",
    "ModelCatalog", "ModelCommandRun", "cardDetails", "cardSummary", "modelPhases",
    "ProgressEvent", "REGISTRATION_PRESETS", "STANDARD_SEGMENTS", "SegmentationResult", "SegmentationRun",
    "addVolumeNodeFromImage", "bundledModels", "checkVolume3D", "ijkToRASFromImage", "imageFromVolumeNode",
    "importEngineOutput", "missingRequirements", "parseProgressLine", "pipConstraints", "pipInstallArguments",
    "requiredPackages",
    "readEngineOutput", "sampleDataFiles", "sampleDataSources", "updateVolumeNodeFromImage",
]
