"""`maml prepare`: phantom cases written as DICOM series (with a DICOM SEG label), NIfTI, NRRD and MHA
files become the raw data set that `maml train` reads; doubtful phases and bad labels are skipped
with one line each, and nothing is left behind by a run that writes nothing."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("highdicom")

from engine_helpers import tiny_config  # noqa: E402
from maml.cli import main  # noqa: E402
from maml.dicomseg import write_dicom_seg  # noqa: E402
from maml.training import prepare as prep  # noqa: E402
from maml.training.dataset import read_dataset  # noqa: E402
from test_io import write_dicom_series  # noqa: E402

from maml.synthetic import make_case  # noqa: E402

FRAME_OF_REFERENCE = ("0020|0052", "1.2.826.0.1.3680043.2.1125.7.6000")


@pytest.fixture(scope="module")
def phantom():
    """One tiny phantom, cropped to a small slab through its tumor, both phases on the venous grid."""
    case = make_case(3, "tiny")
    venous, label = case.images["venous"], case.labels["venous"]
    region = (slice(8, 64), slice(14, 62), slice(13, 23))  # x, y, z: liver and tumor, 10 slices
    venous_crop = venous[region]
    arterial = sitk.Resample(case.images["arterial"], venous_crop, case.arterial_to_venous,
                             sitk.sitkLinear, -1000.0, sitk.sitkInt16)
    label_crop = label[region]
    values = np.unique(sitk.GetArrayViewFromImage(label_crop))
    assert set(values) == {0, 1, 2}  # the slab holds liver and tumor
    return {"arterial": arterial, "venous": sitk.Cast(venous_crop, sitk.sitkInt16), "label": label_crop}


def write_series(image, folder: Path, uid: str, description: str, number: int, time: str) -> Path:
    write_dicom_series(image, folder, uid, description, number,
                       extra_tags=[FRAME_OF_REFERENCE, ("0008|0032", time), ("0008|0031", time)])
    return folder


def write_study(folder: Path, phantom, key: int, descriptions=("Arterial 25s", "Portal venous 70s"),
                seg=True) -> dict:
    """A study folder: one series per description (arterial image first, the rest venous) and a
    DICOM SEG of the label on the venous series."""
    series = {}
    for number, description in enumerate(descriptions, 1):
        phase = "arterial" if number < len(descriptions) else "venous"
        uid = f"1.2.826.0.1.3680043.2.1125.8.{1000 * key + number}"  # file names end in 4 digits
        series[description] = write_series(phantom[phase], folder / f"series{number}", uid, description,
                                           number, f"1000{number}0")
    if seg:
        venous_folder = series[descriptions[-1]]
        files = sorted(str(p) for p in venous_folder.iterdir())
        (folder / "seg").mkdir()
        write_dicom_seg(phantom["label"], files, folder / "seg" / "label.dcm", {"liver": 1, "tumor": 2})
    return series


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def run_prepare(args, capsys) -> tuple[int, str, str]:
    code = main(["prepare", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def lines_about(text: str, case: str) -> list[str]:
    return [line for line in text.splitlines() if f"case {case}:" in line]


@pytest.fixture(scope="module")
def csv_cases(phantom, tmp_path_factory):
    """A CSV of mixed formats: DICOM venous + NIfTI arterial + DICOM SEG label; NRRD/MHA/NIfTI; a label
    on a shifted grid; a label holding a 7; an arterial series of another patient."""
    root = tmp_path_factory.mktemp("hospital")
    study = root / "dicom_case"
    series = write_study(study, phantom, 1)
    sitk.WriteImage(phantom["arterial"], str(root / "a1.nii.gz"))
    sitk.WriteImage(phantom["arterial"], str(root / "a2.nrrd"))
    sitk.WriteImage(phantom["venous"], str(root / "v2.mha"))
    sitk.WriteImage(phantom["label"], str(root / "l2.nii.gz"))
    # the label of C2 stored with its axes flipped (RAS): the same voxels, re-indexed on reading
    sitk.WriteImage(sitk.DICOMOrient(phantom["label"], "RAS"), str(root / "l2_ras.nii.gz"))
    shifted = sitk.Image(phantom["label"])
    shifted.SetOrigin(tuple(np.add(shifted.GetOrigin(), (0.0, 0.0, 2.5))))  # half a slice off
    sitk.WriteImage(shifted, str(root / "l3_shifted.nii.gz"))
    seven = sitk.GetArrayFromImage(phantom["label"])
    seven[seven == 2] = 7
    seven_image = sitk.GetImageFromArray(seven)
    seven_image.CopyInformation(phantom["label"])
    sitk.WriteImage(seven_image, str(root / "l4_seven.nii.gz"))
    venous_dicom = series["Portal venous 70s"].relative_to(root)
    write_dicom_series(phantom["arterial"], root / "other_patient", "1.2.826.0.1.3680043.2.1125.8.99001",
                       "Arterial", 1, extra_tags=[FRAME_OF_REFERENCE, ("0010|0020", "P0002")])
    (root / "cases.csv").write_text(
        "case,arterial,venous,label\n"
        f"C1,a1.nii.gz,{venous_dicom},dicom_case/seg/label.dcm\n"
        "C2,a2.nrrd,v2.mha,l2_ras.nii.gz\n"
        "C3,a2.nrrd,v2.mha,l3_shifted.nii.gz\n"
        "C4,a1.nii.gz,v2.mha,l4_seven.nii.gz\n"
        f"C5,other_patient,{venous_dicom},dicom_case/seg/label.dcm\n")
    return root


def test_csv_of_mixed_formats_writes_the_raw_layout_and_refuses_bad_labels(csv_cases, phantom, tmp_path,
                                                                            capsys):
    before = tree_digest(csv_cases)
    out = tmp_path / "DS"
    code, stdout, err = run_prepare(["--csv", csv_cases / "cases.csv", "--out", out], capsys)
    assert code == 0, err
    assert tree_digest(csv_cases) == before  # inputs never modified

    dataset = read_dataset(out)
    assert dataset.cases == ["C1", "C2"]
    assert dataset.channel_names == ["arterial", "venous"]
    assert dataset.labels == {"background": 0, "liver": 1, "tumor": 2}
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["data_kind"] == "clinical" and meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    expected = sitk.GetArrayFromImage(phantom["label"])
    for case in ("C1", "C2"):  # the DICOM SEG and the re-oriented NIfTI give the phantom's label
        label = sitk.ReadImage(str(dataset.label_file(case)))
        venous = sitk.ReadImage(str(dataset.image_files(case)[1]))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label), expected)
        assert label.GetSize() == venous.GetSize() == phantom["venous"].GetSize()
        np.testing.assert_allclose(label.GetOrigin(), phantom["venous"].GetOrigin(), atol=1e-3)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(venous), sitk.GetArrayFromImage(phantom["venous"]))
    arterial = sitk.ReadImage(str(dataset.image_files("C2")[0]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(arterial), sitk.GetArrayFromImage(phantom["arterial"]))

    assert "RAS" in lines_about(stdout, "C2")[0] and "written" in lines_about(stdout, "C2")[0]
    (c3,) = lines_about(stdout, "C3")
    assert "skipped" in c3 and "l3_shifted.nii.gz" in c3 and "not on the venous image's grid" in c3
    assert "origin" in c3
    (c4,) = lines_about(stdout, "C4")
    assert "skipped" in c4 and "holds value(s) 7," in c4 and "--label-map 1=liver 7=tumor " in c4
    (c5,) = lines_about(stdout, "C5")
    assert "skipped" in c5 and "different patients" in c5 and "'P0002'" in c5
    summary = stdout[stdout.index("written: 2 case(s)"):]
    assert "skipped: 3 case(s)" in summary and "C3:" in summary and "C4:" in summary
    report = json.loads((out / "prepare.json").read_text())
    assert [s["case"] for s in report["skipped"]] == ["C3", "C4", "C5"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left

    # the way out named by C4's line works
    out2 = tmp_path / "DS2"
    code, stdout, err = run_prepare(["--csv", csv_cases / "cases.csv", "--out", out2,
                                     "--label-map", "1=liver", "2=tumor", "7=tumor"], capsys)
    assert code == 0, err
    assert read_dataset(out2).cases == ["C1", "C2", "C4"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out2 / "labelsTr" / "C4.nii.gz"))),
                                  expected)


def test_a_run_that_writes_nothing_fails_with_one_line_and_leaves_nothing(csv_cases, tmp_path, capsys):
    rows = (csv_cases / "cases.csv").read_text().splitlines()
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("\n".join([rows[0], *[r.replace("a2.nrrd", str(csv_cases / "a2.nrrd"))
                                              .replace("v2.mha", str(csv_cases / "v2.mha"))
                                              .replace("l3_", str(csv_cases / "l3_"))
                                              for r in rows if r.startswith("C3")]]))
    out = tmp_path / "DS"
    code, stdout, err = run_prepare(["--csv", bad_csv, "--out", out], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "no case could be prepared" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]
    # an existing, non-empty --out is refused before any work, and kept
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_prepare(["--csv", csv_cases / "cases.csv", "--out", out], capsys)
    assert code == 1 and "--force" in err and (out / "keep.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def studies(phantom, tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    write_study(root / "Patient 1", phantom, 11)
    write_study(root / "P2", phantom, 12, ("ART", "PVP"))
    # two 'arterial' series: ambiguous, never guessed
    write_study(root / "P3", phantom, 13, ("Arterial 1mm", "Late arterial", "Venous"))
    return root


def test_dicom_studies_pick_phases_and_skip_an_ambiguous_study_without_a_terminal(studies, phantom, tmp_path,
                                                                                  capsys):
    out = tmp_path / "DS"
    code, stdout, err = run_prepare(["--dicom", studies, "--out", out], capsys)
    assert code == 0, err
    dataset = read_dataset(out)
    assert dataset.cases == ["P2", "Patient_1"]
    report = json.loads((out / "prepare.json").read_text())
    chosen = {w["case"]: w["series"] for w in report["written"]}
    assert chosen["P2"]["arterial"]["description"] == "ART" and chosen["P2"]["venous"]["description"] == "PVP"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(dataset.label_file("P2")))),
                                  sitk.GetArrayFromImage(phantom["label"]))
    (line,) = lines_about(stdout, "P3")
    assert "skipped" in line and "2 arterial candidates" in line
    assert "'Arterial 1mm'" in line and "'Late arterial'" in line and "--phase-map" in line
    assert "P3:" in stdout[stdout.index("skipped: 1 case(s)"):]

    # the way out: a --phase-map row (by series number)
    phase_map = tmp_path / "phases.csv"
    phase_map.write_text("case,arterial,venous\nP3,2,3\n")
    out2 = tmp_path / "DS2"
    code, stdout, err = run_prepare(["--dicom", studies, "--out", out2, "--phase-map", phase_map], capsys)
    assert code == 0, err
    assert read_dataset(out2).cases == ["P2", "P3", "Patient_1"]
    series = {w["case"]: w["series"] for w in json.loads((out2 / "prepare.json").read_text())["written"]}
    assert series["P3"]["arterial"]["description"] == "Late arterial"
    replay = (out2 / "phase_map.csv").read_text().splitlines()
    assert replay[0] == "case,arterial,venous" and "P3,1.2.826.0.1.3680043.2.1125.8.13002," in replay[2]


def test_phase_choice_follows_keywords_and_time_and_asks_when_in_doubt(studies):
    series = prep.scan_dicom(studies / "P3")
    decision = prep.pick_phases(series)
    assert not decision.chosen and len(decision.candidates["arterial"]) == 2
    answers = io.StringIO("9\n2\n")  # an out-of-range answer is asked again
    shown = io.StringIO()
    picked = prep.ask_series("P3", "arterial", prep.image_series(series), decision.candidates["arterial"],
                             stdin=answers, stdout=shown)
    assert picked.description == prep.image_series(series)[1].description
    assert "Late arterial" in shown.getvalue() and "<- keyword" in shown.getvalue()
    assert prep.ask_series("P3", "venous", series, [], stdin=io.StringIO("s\n"), stdout=io.StringIO()) is None
    # what a terminal user sees: only the phase in doubt is asked, the clear studies are not
    questions = []

    def answer(case, phase, all_series, candidates):
        questions.append((case, phase))
        return prep.ask_series(case, phase, all_series, candidates, stdin=io.StringIO("2\n"),
                               stdout=io.StringIO())

    sources, skipped = prep.dicom_cases(studies, choose=answer, report=lambda line: None)
    assert questions == [("P3", "arterial")] and not skipped
    p3 = next(s for s in sources if s.case == "P3")
    assert p3.details["arterial"]["description"] == "Late arterial" and p3.details["venous"]["description"] == "Venous"
    # keywords agree but the 'arterial' series came after the venous one: a doubt, not a pick
    good = prep.scan_dicom(studies / "P2")
    swapped = [prep.Series(**{**s.__dict__, "time": "235959" if s.description == "ART" else s.time})
               for s in good]
    assert prep.pick_phases(good).chosen["arterial"].description == "ART"
    assert "not acquired before" in prep.pick_phases(swapped).doubt
    assert prep.phase_of("PV 70s") == {"venous"} and prep.phase_of("HAP 1.0 B30f") == {"arterial"}
    assert prep.phase_of("Non contrast") == set()


def test_train_reads_the_prepared_data_set(csv_cases, tmp_path, capsys):
    out = tmp_path / "DS"
    code, _, err = run_prepare(["--csv", csv_cases / "cases.csv", "--out", out,
                                "--label-map", "0=background", "1=liver", "2=tumor", "7=tumor"], capsys)
    assert code == 0, err
    config = tiny_config(base_features=4)
    config.spacing = [5.0, 4.0, 4.0]  # the phantom's own spacing: little resampling
    config_file = tmp_path / "tiny.json"
    config_file.write_text(config.to_json())
    run = tmp_path / "run"
    code = main(["train", "--dataset", str(out), "--out", str(run), "--config", str(config_file), "--epochs", "1",
                 "--iterations", "1", "--val-cases", "1", "--device", "cpu", "--augmentation", "none",
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert (run / "checkpoint_best.pt").is_file()
    assert len(list((run / "preprocessed").glob("*_seg.npy"))) == 3


def test_label_map_lists_every_value_and_names_segments():
    label_map = prep.LabelMap.parse(["7=tumor", "Portal vein=background", "Mass=2"])
    assert label_map.map_values([0, 1, 7]) == ({7: 2, 0: 0}, [1])  # a partial map keeps nothing silently
    assert prep.LabelMap().map_values([0, 1, 2, 7])[1] == [7]
    assert label_map.segment_value(["Portal  vein", "Vein"], "32764006") == 0
    assert label_map.segment_value(["MASS", "Mass"], None) == 2
    assert prep.LabelMap().segment_value(["Lesion 3", "Abnormal"], None) == 2  # one segment per lesion
    assert prep.LabelMap().segment_value(["Liver tumor", "Neoplasm"], "108369006") == 2
    assert prep.LabelMap().segment_value(["Segment_1", "Organ"], "10200004") == 1  # by its SNOMED code
    assert prep.LabelMap().segment_value(["Spleen", "Spleen"], "78961009") is None
    with pytest.raises(prep.InputError, match="SOURCE=TARGET"):
        prep.LabelMap.parse(["7=kidney"])
