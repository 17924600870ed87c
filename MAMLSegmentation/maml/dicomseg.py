"""DICOM Segmentation output (``segmentation.dcm``), written with highdicom.

The DICOM SEG object references the DICOM series the reference phase was read from (each frame
names its source slice), so PACS viewers show it over that series. It holds two binary segments,
coded with SNOMED CT as Slicer's standard terminology codes them:

- "Liver": category Anatomical Structure (SCT 91723000), type Liver (SCT 10200004): the voxels of
  the liver label (parenchyma; tumors are the other segment, as in ``segmentation.nii.gz``);
- "Liver tumor": category Morphologically Abnormal Structure (SCT 49755003), type Neoplasm (SCT
  108369006), anatomic region Liver: the voxels of the tumor label.

Source slices: the reference phase must be a DICOM folder (``maml.io.read_image`` keeps its file
list with the image, see :func:`maml.io.dicom_files`), or a file exported from such a series with
``dicom_source`` naming the series folder (it must have the same geometry).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

__all__ = ["dicom_source_files", "write_dicom_seg", "SEGMENTS"]

# label name in the model's config -> (segment label, category, type) as (code value, meaning)
SEGMENTS = {
    "liver": ("Liver", ("91723000", "Anatomical Structure"), ("10200004", "Liver")),
    "tumor": ("Liver tumor", ("49755003", "Morphologically Abnormal Structure"), ("108369006", "Neoplasm")),
}
_GEOMETRY_TOLERANCE_MM = 1e-3


def dicom_source_files(reference_image: sitk.Image, reference: str,
                       dicom_source: str | os.PathLike | None = None) -> list[str]:
    """The DICOM files (in the volume's slice order) of the reference phase, or one clear error.

    Cheap: called before registration and inference, so a run that cannot write its DICOM SEG is
    refused at once."""
    from .io import dicom_files, read_image

    if dicom_source is not None:
        source = read_image(dicom_source, f"DICOM source of the {reference} phase")
        files = dicom_files(source)
        if not files:
            raise InputError(f"DICOM source ({dicom_source}): not a DICOM series folder")
        _check_same_geometry(source, reference_image, reference, dicom_source)
        _check_frame_of_reference(files)
        return files
    files = dicom_files(reference_image)
    if not files:
        raise InputError(
            f"--dicom-seg: the reference phase ({reference}) was not read from a DICOM folder, so a "
            "DICOM SEG has no series to reference; give that phase as its DICOM series folder (or "
            "--dicom-source FOLDER)")
    _check_frame_of_reference(files)
    return files


def _check_frame_of_reference(files: Sequence[str]) -> None:
    import pydicom

    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    if "FrameOfReferenceUID" not in first:
        raise InputError(f"--dicom-seg: the DICOM series in {Path(files[0]).parent} has no Frame of "
                         "Reference UID, which a DICOM SEG must share with its source; it cannot be "
                         "referenced (leave out --dicom-seg)")


def _check_same_geometry(source: sitk.Image, image: sitk.Image, reference: str, folder) -> None:
    same = (source.GetSize() == image.GetSize()
            and np.allclose(source.GetSpacing(), image.GetSpacing(), atol=_GEOMETRY_TOLERANCE_MM)
            and np.allclose(source.GetOrigin(), image.GetOrigin(), atol=_GEOMETRY_TOLERANCE_MM)
            and np.allclose(source.GetDirection(), image.GetDirection(), atol=1e-5))
    if not same:
        raise InputError(f"DICOM source ({folder}): its geometry differs from the {reference} phase "
                         "image; give the series that image was exported from")


def _code(value_meaning):
    from pydicom.sr.coding import Code

    value, meaning = value_meaning
    return Code(value, "SCT", meaning)


def _segment_descriptions(colors: dict[str, Sequence[float]]):
    import highdicom as hd

    from . import __version__

    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name="MAML", version=__version__, family=codes.DCM.ArtificialIntelligence)  # CID 7162
    descriptions = []
    for number, name in enumerate(("liver", "tumor"), 1):
        label, category, kind = SEGMENTS[name]
        extra = {}
        if name == "tumor":
            extra["anatomic_regions"] = [_code(SEGMENTS["liver"][2])]
        if name in colors:
            extra["display_color"] = hd.color.CIELabColor.from_rgb(
                *[int(round(255 * float(c))) for c in colors[name]])
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=label, segmented_property_category=_code(category),
            segmented_property_type=_code(kind), algorithm_type="AUTOMATIC",
            algorithm_identification=algorithm, **extra))
    return descriptions


def write_dicom_seg(labels: sitk.Image, source_files: Sequence[str], path: str | os.PathLike,
                    label_values: dict[str, int], colors: dict[str, Sequence[float]] | None = None) -> Path:
    """Write ``labels`` (on the grid of the DICOM series ``source_files``) as a DICOM SEG at ``path``.

    ``label_values``: {"liver": value, "tumor": value} of the label map; ``colors``: name -> RGB 0..1.
    """
    import highdicom as hd
    import pydicom

    from . import __version__

    sources = [pydicom.dcmread(f, stop_before_pixels=False) for f in source_files]
    if "FrameOfReferenceUID" not in sources[0]:
        raise InputError(f"DICOM SEG: the source series ({Path(source_files[0]).parent}) has no Frame of "
                         "Reference UID, which a DICOM SEG must share with it; it cannot be referenced")
    array = sitk.GetArrayViewFromImage(labels)
    if array.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise InputError(f"DICOM SEG: the label map ({array.shape[::-1]}) is not on the grid of the "
                         f"source series ({sources[0].Columns} x {sources[0].Rows} x {len(sources)})")
    segment_map = np.zeros(array.shape, np.uint8)  # 0 none, 1 liver, 2 tumor (segment numbers)
    for number, name in enumerate(("liver", "tumor"), 1):
        segment_map[array == label_values[name]] = number
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=segment_map,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(colors or {}),
        series_instance_uid=hd.UID(),
        series_number=_series_number(sources[0]),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="MAMLSegmentation",
        manufacturer_model_name="MAML liver tumor segmentation (research use only)",
        software_versions=__version__,
        device_serial_number="none",
        series_description="MAML liver and tumor segmentation (research use only)",
        content_label="MAML",
        content_description="Liver and liver tumor, research use only, not for clinical use",
    )
    seg.save_as(str(path))
    return Path(path)


def _series_number(source) -> int:
    number = getattr(source, "SeriesNumber", None)
    try:
        return int(number) + 1000 if number is not None else 1000
    except (TypeError, ValueError):
        return 1000
