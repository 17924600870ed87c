"""Lesion-level metrics (maml.evaluation.metrics.lesion_metrics / summarize_lesions) and their place in
`maml evaluate`: synthetic label maps whose answers are counted by hand."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from maml.cli import main as cli_main
from maml.errors import InputError
from maml.evaluation import evaluate_folders, lesion_metrics, size_bin, summarize_lesions

UNIT = (1.0, 1.0, 1.0)  # 1 mm^3 voxels: 1000 voxels = 1 mL


def two_lesions_one_missed():
    """Reference: lesion A (4^3 = 64 voxels) and lesion B (2^3 = 8 voxels, missed). Prediction: the
    front half of A (32 voxels) and a false positive (3^3) far from both."""
    gt = np.zeros((20, 20, 20), bool)
    pred = np.zeros_like(gt)
    gt[2:6, 2:6, 2:6] = True  # A
    gt[12:14, 12:14, 2:4] = True  # B
    pred[2:4, 2:6, 2:6] = True  # half of A
    pred[14:17, 2:5, 14:17] = True  # false positive
    return pred, gt


def test_missed_lesion_and_false_positive_counted_by_hand():
    pred, gt = two_lesions_one_missed()
    m = lesion_metrics(pred, gt, UNIT)
    assert (m["lesions_reference"], m["lesions_detected"], m["lesions_false_positive"]) == (2, 1, 1)
    a, b = m["lesions"]
    assert a["detected"] and not b["detected"]
    assert a["dice"] == pytest.approx(2 * 32 / (64 + 32)) and b["dice"] == 0.0
    assert a["volume_ml"] == pytest.approx(0.064) and b["volume_ml"] == pytest.approx(0.008)
    # BraTS-style: the missed lesion and the false positive each add a 0 to the mean
    assert m["lesion_wise_dice"] == pytest.approx((2 / 3) / 3)
    assert m["false_positive_volumes_ml"] == pytest.approx([0.027])


def test_diagonal_neighbours_are_one_lesion():
    """Two cubes that share only a corner are one 26-connected component (6-connectivity: two)."""
    gt = np.zeros((10, 10, 10), bool)
    gt[1:3, 1:3, 1:3] = True
    gt[3:5, 3:5, 3:5] = True  # touches the first at voxel (2,2,2)-(3,3,3), a corner
    pred = np.zeros_like(gt)
    pred[4, 4, 4] = True  # one voxel inside the second cube
    m = lesion_metrics(pred, gt, UNIT)
    assert m["lesions_reference"] == 1 and m["lesions_detected"] == 1
    assert m["lesions"][0]["dice"] == pytest.approx(2 * 1 / (16 + 1))
    # a predicted lesion made of two corner-touching parts is one component too: no false positive
    pred[6, 6, 6] = pred[5, 5, 5] = True
    assert lesion_metrics(pred, gt, UNIT)["lesions_false_positive"] == 0


def test_one_prediction_over_two_lesions_detects_both():
    gt = np.zeros((8, 8, 8), bool)
    gt[1:3, 1:3, 1:3] = True
    gt[1:3, 1:3, 5:7] = True
    pred = np.zeros_like(gt)
    pred[1:3, 1:3, 1:7] = True  # a bridge over both (24 voxels)
    m = lesion_metrics(pred, gt, UNIT)
    assert (m["lesions_reference"], m["lesions_detected"], m["lesions_false_positive"]) == (2, 2, 0)
    assert [l["dice"] for l in m["lesions"]] == pytest.approx([2 * 8 / (8 + 24)] * 2)


def test_empty_cases():
    empty = np.zeros((6, 6, 6), bool)
    spot = empty.copy()
    spot[2:4, 2:4, 2:4] = True
    nothing = lesion_metrics(empty, empty, UNIT)  # nothing to find, nothing found
    assert (nothing["lesions_reference"], nothing["lesions_false_positive"]) == (0, 0)
    assert nothing["lesion_wise_dice"] == 1.0 and nothing["lesions"] == []
    false_alarm = lesion_metrics(spot, empty, UNIT)
    assert false_alarm["lesions_false_positive"] == 1 and false_alarm["lesion_wise_dice"] == 0.0
    missed = lesion_metrics(empty, spot, UNIT)
    assert missed["lesions_detected"] == 0 and missed["lesion_wise_dice"] == 0.0
    summary = summarize_lesions([{"label": "tumor", **nothing}])
    assert summary["reference_lesions"] == 0 and math.isnan(summary["lesion_sensitivity"])
    assert summary["false_positives_per_case"] == 0.0


def test_size_bins_use_the_spacing():
    assert [size_bin(v) for v in (0.0, 0.999, 1.0, 10.0, 10.001)] == [
        "<1 mL", "<1 mL", "1-10 mL", "1-10 mL", ">10 mL"]
    spacing = (5.0, 2.0, 2.0)  # 20 mm^3 per voxel: 50 voxels = 1 mL
    gt = np.zeros((10, 30, 30), bool)
    gt[0:2, 0:4, 0:4] = True  # 32 voxels = 0.64 mL
    gt[0:2, 10:15, 0:5] = True  # 50 voxels = 1.0 mL: 1-10 mL
    gt[4:10, 10:20, 10:20] = True  # 600 voxels = 12 mL
    pred = np.zeros_like(gt)
    pred[4:10, 10:20, 10:15] = True  # half of the large lesion
    pred[0:2, 0:4, 0:4] = True  # all of the small one
    m = lesion_metrics(pred, gt, spacing)
    volumes = sorted((l["volume_ml"], l["size_bin"], l["dice"]) for l in m["lesions"])
    assert volumes == [(pytest.approx(0.64), "<1 mL", 1.0), (pytest.approx(1.0), "1-10 mL", 0.0),
                       (pytest.approx(12.0), ">10 mL", pytest.approx(2 / 3))]
    bins = summarize_lesions([{"label": "tumor", **m}])["size_bins"]
    assert {name: (b["lesions"], b["detected"]) for name, b in bins.items()} == {
        "<1 mL": (1, 1), "1-10 mL": (1, 0), ">10 mL": (1, 1)}
    assert bins[">10 mL"]["dice_mean"] == pytest.approx(2 / 3)


def test_summary_pools_lesions_over_cases():
    pred, gt = two_lesions_one_missed()
    first = lesion_metrics(pred, gt, UNIT)  # 2 lesions, 1 found, 1 false positive
    second = lesion_metrics(gt, gt, UNIT)  # 2 lesions, both found exactly
    s = summarize_lesions([first, second])
    assert (s["cases"], s["reference_lesions"], s["detected_lesions"]) == (2, 4, 3)
    assert s["lesion_sensitivity"] == pytest.approx(0.75)
    assert s["false_positives_per_case"] == pytest.approx(0.5)
    assert s["lesion_wise_dice"]["mean"] == pytest.approx(((2 / 9) + 1.0) / 2)
    assert s["detected_lesion_dice"] == pytest.approx((2 / 3 + 1 + 1) / 3)  # LiTS: detected only


def _write(path, array, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def test_evaluate_cli_reports_lesions(tmp_path, capsys):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    pred_tumor, gt_tumor = two_lesions_one_missed()
    liver = np.zeros(gt_tumor.shape, np.uint8)
    liver[1:18, 1:18, 1:18] = 1
    gt = np.where(gt_tumor, 2, liver)
    _write(gt_dir / "A.nii.gz", gt)
    _write(pred_dir / "A.nii.gz", np.where(pred_tumor, 2, liver))
    _write(gt_dir / "B.nii.gz", gt)
    _write(pred_dir / "B.nii.gz", gt)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "tumor": 2}}))

    out = tmp_path / "scores"
    assert cli_main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out),
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "tumor lesions: 3 of 4 detected (sensitivity 0.750), 1 false positives (0.50 per case)" in printed
    assert "scores_lesions.csv" in printed
    data = json.loads((tmp_path / "scores.json").read_text())
    assert data["lesion_label"] == "tumor"
    assert data["lesion_summary"]["lesion_sensitivity"] == pytest.approx(0.75)
    assert data["lesion_summary"]["size_bins"]["<1 mL"]["lesions"] == 4
    assert "BraTS 2023" in data["definitions"]["lesion_wise_dice"]
    with open(tmp_path / "scores.csv") as stream:
        table = {(r["case"], r["label"]): r for r in csv.DictReader(stream)}
    assert table["A", "tumor"]["lesions_false_positive"] == "1"
    assert table["A", "liver"]["lesions_reference"] == ""  # lesion columns: the lesion label only
    assert float(table["mean", "tumor"]["lesions_false_positive"]) == pytest.approx(0.5)
    with open(tmp_path / "scores_lesions.csv") as stream:
        lesions = list(csv.DictReader(stream))
    assert [(r["case"], r["kind"], r["detected"]) for r in lesions] == [
        ("A", "reference", "True"), ("A", "reference", "False"), ("A", "false_positive", ""),
        ("B", "reference", "True"), ("B", "reference", "True")]

    # no label named tumor: no lesion figures; an unknown --lesion-label is one clear error
    result = evaluate_folders(pred_dir, gt_dir, ["liver=1", "lesion=2"])
    assert result.lesion_summary is None and "lesions" not in result.rows[1]
    assert evaluate_folders(pred_dir, gt_dir, ["liver=1", "lesion=2"],
                            lesion_label="lesion").lesion_summary["detected_lesions"] == 3
    with pytest.raises(InputError, match="'vessel' is not one of the labels.*--lesion-label"):
        evaluate_folders(pred_dir, gt_dir, lesion_label="vessel")
    assert cli_main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--lesion-label",
                     "vessel", "--no-progress"]) == 1
