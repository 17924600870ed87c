"""`maml segment-batch`: nnU-Net folders and CSV lists, resume, sharding, summary with Dice."""

import csv
import json

import pytest

from engine_helpers import save_tiny_liver_model
from maml.cli import main
from maml.synthetic import write_dataset


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_liver_model(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), 3, seed=500, size="tiny",
                         contact_sheet=False, progress=False)


def read_summary(out):
    with open(out / "summary.csv") as stream:
        return list(csv.DictReader(stream))


def test_nnunet_folder_with_labels_resumes_and_summarises(tiny_model, dataset, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["segment-batch", "--input", str(dataset), "--out", str(out), "--model", str(tiny_model),
            "--register", "none", "--no-overview"]
    assert main(args) == 0, capsys.readouterr().err
    rows = read_summary(out)
    cases = sorted(p.name[:-len(".nii.gz")] for p in (dataset / "labelsTr").glob("*.nii.gz"))
    assert [r["case"] for r in rows] == cases and len(cases) == 3
    assert all(r["status"] == "ok" and r["head"] == "fused" for r in rows)
    assert all(0.0 <= float(r["dice_liver"]) <= 1.0 for r in rows)
    for row in rows:
        assert (out / row["case"] / "segmentation.nii.gz").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 3 and "mean_dice_liver" in summary

    stamp = (out / cases[1] / "stats.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / cases[1] / "stats.json").stat().st_mtime_ns == stamp  # resumed, not redone
    assert len(read_summary(out)) == 3


def test_torchrun_processes_share_the_cases(tiny_model, dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["segment-batch", "--input", str(dataset), "--out", str(out), "--model", str(tiny_model),
                 "--register", "none", "--no-overview"]) == 0
    cases = sorted(p.name[:-len(".nii.gz")] for p in (dataset / "labelsTr").glob("*.nii.gz"))
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [cases[1]]


def test_csv_case_list_with_a_missing_phase_and_a_bad_case(tiny_model, dataset, tmp_path, capsys):
    images = dataset / "imagesTr"
    table = tmp_path / "cases.csv"
    with open(table, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["case", "arterial", "venous"])
        writer.writerow(["venous_only", "", str(sorted(images.glob("*_0001.nii.gz"))[0])])
        writer.writerow(["broken", str(images / "missing_0000.nii.gz"), str(sorted(images.glob("*_0001.nii.gz"))[1])])
    out = tmp_path / "out"
    code = main(["segment-batch", "--input", str(table), "--out", str(out), "--model", str(tiny_model),
                 "--register", "none", "--no-overview"])
    assert code == 1
    rows = {r["case"]: r for r in read_summary(out)}
    assert rows["venous_only"]["status"] == "ok" and rows["venous_only"]["head"] == "venous"
    assert rows["broken"]["status"] == "error" and "missing_0000" in rows["broken"]["message"]
    assert not (out / "broken").exists()
    assert "broken" in capsys.readouterr().out


def test_missing_input_is_one_clear_error(tiny_model, tmp_path, capsys):
    assert main(["segment-batch", "--input", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"),
                 "--model", str(tiny_model)]) == 1
    assert "nowhere" in capsys.readouterr().err
