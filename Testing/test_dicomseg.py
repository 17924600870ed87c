"""`maml segment --dicom-seg`: segmentation.dcm, a DICOM SEG read back with pydicom/highdicom, whose
two SNOMED CT coded segments equal segmentation.nii.gz and reference the source DICOM series."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

highdicom = pytest.importorskip("highdicom")

from engine_helpers import save_tiny_liver_model, write_tiny_case  # noqa: E402
from maml.cli import main  # noqa: E402
from test_io import write_dicom_series  # noqa: E402

SERIES_UID = "1.2.826.0.1.3680043.2.1125.7.4321"
FRAME_OF_REFERENCE_UID = "1.2.826.0.1.3680043.2.1125.7.5555"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_liver_model(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("case")
    files = write_tiny_case(folder)
    venous = sitk.Cast(sitk.ReadImage(str(files["venous"])), sitk.sitkInt16)
    # An oblique-free axial series, one file per slice, as a scanner would send it.
    write_dicom_series(venous, folder / "venous_dicom", SERIES_UID, "Portal venous 70s", 3,
                       extra_tags=[("0020|0052", FRAME_OF_REFERENCE_UID)])
    files["venous_dicom"] = folder / "venous_dicom"
    return files


def run_segment(args, capsys):
    code = main(["segment", *map(str, args)])
    return code, capsys.readouterr().err


def test_dicom_seg_has_two_coded_segments_equal_to_the_nifti_labels(tiny_model, case, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_segment(["--phase", f"venous={case['venous_dicom']}", "--phase", f"arterial={case['arterial']}",
                             "--out", out, "--model", tiny_model, "--register", "none", "--no-overview",
                             "--allow-poor-registration", "--dicom-seg"], capsys)
    assert code == 0, err
    assert (out / "segmentation.dcm").is_file()
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.nii.gz")))

    dataset = pydicom.dcmread(out / "segmentation.dcm")
    assert dataset.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert dataset.Modality == "SEG" and dataset.SegmentationType == "BINARY"
    seg = highdicom.seg.Segmentation.from_dataset(dataset)
    described = {int(s.SegmentNumber): s for s in dataset.SegmentSequence}
    assert described[1].SegmentLabel == "Liver" and described[2].SegmentLabel == "Liver tumor"
    for number, (category, kind) in {1: ("91723000", "10200004"), 2: ("49755003", "108369006")}.items():
        item = described[number]
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == category
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == kind
        assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert item.SegmentAlgorithmType == "AUTOMATIC"

    # The source series is referenced, and each frame of the SEG lies on its source slice.
    sources = sorted((pydicom.dcmread(p) for p in case["venous_dicom"].iterdir()),
                     key=lambda d: int(d.InstanceNumber))
    assert dataset.ReferencedSeriesSequence[0].SeriesInstanceUID == SERIES_UID
    assert dataset.StudyInstanceUID == sources[0].StudyInstanceUID
    assert dataset.PatientID == sources[0].PatientID
    assert dataset.FrameOfReferenceUID == FRAME_OF_REFERENCE_UID
    masks = seg.get_pixels_by_source_instance([s.SOPInstanceUID for s in sources], segment_numbers=[1, 2])
    assert masks.shape == (*labels.shape, 2)
    assert (labels == 1).any() and (labels == 2).any()  # both segments are really compared
    np.testing.assert_array_equal(masks[..., 0] > 0, labels == 1)
    np.testing.assert_array_equal(masks[..., 1] > 0, labels == 2)


def test_dicom_seg_needs_a_dicom_reference_phase_and_refuses_before_the_work(tiny_model, case, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_segment(["--phase", f"venous={case['venous']}", "--phase", f"arterial={case['arterial']}",
                             "--out", out, "--model", tiny_model, "--register", "deformable", "--dicom-seg",
                             "--json-progress"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "--dicom-seg" in err and "not read from a DICOM folder" in err and "venous" in err
    assert not out.exists()
    # refused at loading, before registration started
    assert '"step": "register"' not in capsys.readouterr().out


def test_dicom_source_gives_the_series_of_an_exported_reference_phase(tiny_model, case, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_segment(["--phase", f"venous={case['venous']}", "--out", out, "--model", tiny_model,
                             "--register", "none", "--no-overview", "--dicom-seg",
                             "--dicom-source", case["venous_dicom"]], capsys)
    assert code == 0, err
    dataset = pydicom.dcmread(out / "segmentation.dcm")
    assert dataset.ReferencedSeriesSequence[0].SeriesInstanceUID == SERIES_UID
    # a series of another geometry is refused with one line
    code, err = run_segment(["--phase", f"venous={case['arterial']}", "--out", tmp_path / "other", "--model",
                             tiny_model, "--register", "none", "--dicom-seg", "--dicom-source",
                             case["venous_dicom"]], capsys)
    assert code == 1 and "geometry differs" in err and not (tmp_path / "other").exists()
