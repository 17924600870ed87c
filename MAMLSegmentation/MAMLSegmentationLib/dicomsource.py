"""The DICOM files a volume node was loaded from, for the engine's DICOM SEG (``--dicom-seg``).

Slicer's DICOM module marks a volume loaded from DICOM with the attribute ``DICOM.instanceUIDs``
(its slices' SOP Instance UIDs); the application's DICOM database knows each instance's file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import MAMLSegmentationError

INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"


def defaultFileForInstance():
    """``slicer.dicomDatabase.fileForInstance`` in the application; ``None`` where there is no DICOM
    database (slicer-core, a Slicer started without it)."""
    import slicer

    database = getattr(slicer, "dicomDatabase", None)
    return database.fileForInstance if database is not None else None


def dicomSourceFiles(node, fileForInstance=None) -> list:
    """The DICOM files of ``node``'s slices, or a clear error saying why a DICOM SEG cannot be made."""
    uids = (node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) or "").split()
    name = node.GetName()
    if not uids:
        raise MAMLSegmentationError(
            f"A DICOM SEG needs the reference phase '{name}' loaded from DICOM (through the DICOM "
            "module); this volume was not. Load its DICOM series, or leave out the DICOM SEG.")
    lookup = fileForInstance or defaultFileForInstance()
    if lookup is None:
        raise MAMLSegmentationError(
            f"A DICOM SEG needs Slicer's DICOM database to find the files of '{name}'; it is not available.")
    files = [lookup(uid) for uid in uids]
    missing = [uid for uid, path in zip(uids, files) if not path or not Path(path).is_file()]
    if missing:
        raise MAMLSegmentationError(
            f"The DICOM database has no file for {len(missing)} of the {len(uids)} slices of '{name}' "
            f"(e.g. {missing[0]}); re-import the series, or leave out the DICOM SEG.")
    return files


def copyDicomSource(files: list, folder) -> Path:
    """Copies the series into ``folder`` (the engine reads a DICOM series as a folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    for index, path in enumerate(files):
        shutil.copyfile(path, folder / f"{index:05d}.dcm")
    return folder
