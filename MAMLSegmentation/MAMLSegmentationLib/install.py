"""Which Python packages the engine needs inside Slicer, and installing only those (with pip).

As SlicerNNUnet's install logic does: requirements are checked by version (``packaging``), not by
presence, and only what the chosen options need is installed. PyTorch comes from the PyTorch
extension (not here). What Slicer's engine runs needs:

- always: SciPy (post-processing; bundled with Slicer, so normally already satisfied); the phases
  are registered with SimpleITK, which Slicer bundles;
- the elastix registration engine (``--registration-engine elastix``, not what the panel runs):
  itk-elastix;
- a DICOM SEG output: highdicom (it brings pydicom);
- the OpenVINO backend (about twice as fast as torch on the CPU): openvino, when chosen explicitly
  (``auto`` uses it only when it is there).

monai, tqdm and matplotlib are not needed: they serve training, evaluation, the terminal progress
bar and the overview picture, which Slicer does not ask for (it runs the engine with
``--json-progress --no-overview``). numpy, SimpleITK and torch are never replaced: pip gets a
constraints file pinning their installed versions.
"""

from __future__ import annotations

from importlib import metadata

BASE_REQUIREMENTS = ("scipy>=1.10",)
ELASTIX_REQUIREMENTS = ("itk-elastix>=0.20",)
DICOM_SEG_REQUIREMENTS = ("highdicom>=0.22",)
OPENVINO_REQUIREMENTS = ("openvino>=2024.6",)
# What pip must never replace: pinned to the installed versions with a constraints file.
PROTECTED_DISTRIBUTIONS = ("numpy", "SimpleITK", "torch")


def _requirementClass():
    try:
        from packaging.requirements import Requirement
    except ModuleNotFoundError:  # pip always vendors it
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def requiredPackages(dicomSeg: bool = False, backend: str = "auto",
                     registrationEngine: str = "simpleitk") -> list:
    """Requirement strings for the chosen options."""
    return (list(BASE_REQUIREMENTS) + (list(DICOM_SEG_REQUIREMENTS) if dicomSeg else [])
            + (list(OPENVINO_REQUIREMENTS) if backend == "openvino" else [])
            + (list(ELASTIX_REQUIREMENTS) if registrationEngine == "elastix" else []))


def unmetRequirement(text: str, version=metadata.version) -> str | None:
    """Why ``text`` (a requirement such as "highdicom>=0.22") is not met, or ``None`` when it is."""
    requirement = _requirementClass()(text)
    try:
        installed = version(requirement.name)
    except metadata.PackageNotFoundError:
        return f"{requirement.name} is not installed"
    if requirement.specifier and not requirement.specifier.contains(installed, prereleases=True):
        return f"{requirement.name} {installed} is installed, {requirement.specifier} is needed"
    return None


def missingRequirements(dicomSeg: bool = False, version=metadata.version, backend: str = "auto") -> list:
    """``[(requirement, reason)]`` for the requirements of the chosen options that are not met."""
    missing = []
    for text in requiredPackages(dicomSeg, backend):
        reason = unmetRequirement(text, version)
        if reason:
            missing.append((text, reason))
    return missing


def pipConstraints(version=metadata.version) -> str:
    """A pip constraints file's text pinning the protected packages to their installed versions."""
    lines = []
    for name in PROTECTED_DISTRIBUTIONS:
        try:
            lines.append(f"{name}=={version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return "\n".join(lines) + "\n"


def pipInstallArguments(requirements: list, constraintsFile) -> list:
    """The argument list for one ``slicer.util.pip_install`` call: a list, not a string, so a path
    with spaces or backslashes (Windows) reaches pip as one argument."""
    if not requirements:
        return []
    return [*requirements, "-c", str(constraintsFile)]


def installMissing(pipInstall, constraintsDir, dicomSeg: bool = False, backend: str = "auto") -> list:
    """Installs what the chosen options need and is missing; returns the requirements installed.
    ``pipInstall``: ``slicer.util.pip_install``; ``constraintsDir``: a folder for the constraints file."""
    from pathlib import Path

    missing = [text for text, _ in missingRequirements(dicomSeg, backend=backend)]
    if not missing:
        return []
    constraints = Path(constraintsDir) / "constraints.txt"
    constraints.write_text(pipConstraints())
    pipInstall(pipInstallArguments(missing, constraints))
    return missing


def missingEngineDependencies(findSpec=None, version=metadata.version) -> list:
    """What a run of the engine lacks in this Python ("torch", "scipy>=1.10 (...)"): the
    Reload-and-Test case skips with this list where the Extensions build machines have neither."""
    from importlib.util import find_spec

    missing = [] if (findSpec or find_spec)("torch") is not None else ["torch (the PyTorch extension)"]
    for text in BASE_REQUIREMENTS:
        reason = unmetRequirement(text, version)
        if reason:
            missing.append(f"{text} ({reason})")
    return missing
