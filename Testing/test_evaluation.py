"""maml.evaluation and `maml evaluate`: metrics against values computed by hand."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from maml.cli import main as cli_main
from maml.errors import InputError
from maml.evaluation import (dice_score, evaluate_arrays, evaluate_folders, mask_edges,
                             monai_surface_available, summarize, surface_metrics)
from maml.evaluation.metrics import _surface_metrics_sitk


def offset_cubes(n=6, shape=(12, 12, 12)):
    """Two n^3 cubes, the second shifted by one voxel along z."""
    a = np.zeros(shape, bool)
    b = np.zeros(shape, bool)
    a[2:2 + n, 3:3 + n, 3:3 + n] = True
    b[3:3 + n, 3:3 + n, 3:3 + n] = True
    return a, b


def test_dice_by_hand():
    a, b = offset_cubes(6)
    assert dice_score(a, b) == pytest.approx(5 / 6)  # overlap 5*36 of 2*216
    assert dice_score(a, a) == 1.0
    empty = np.zeros_like(a)
    assert dice_score(empty, empty) == 1.0  # both empty: nothing to find, nothing found
    assert dice_score(a, empty) == 0.0 and dice_score(empty, a) == 0.0
    p = np.array([1, 1, 0, 0, 1], bool)
    g = np.array([1, 0, 0, 1, 1], bool)
    assert dice_score(p, g) == pytest.approx(2 * 2 / (3 + 3))


def test_assd_of_offset_cubes_analytically():
    """Cubes of side n, one voxel apart in z (spacing z 1.5 mm, in plane 2 mm).

    Surface = the shell, n^3 - (n-2)^3 voxels. From A to B: the n^2 top-face voxels are 1 slice from
    B's top face; the (n-2)^2 inner bottom-face voxels are 1 slice from B's bottom face (the side
    walls are farther in plane); every other surface voxel of A lies on B's surface. Symmetric for
    B to A. So ASSD = (n^2 + (n-2)^2) / (n^3 - (n-2)^3) slices, and HD95 = 1 slice since more than
    5 % of the distances are 1.
    """
    n = 6
    a, b = offset_cubes(n)
    ones = n * n + (n - 2) ** 2
    surface = n ** 3 - (n - 2) ** 3
    spacing = (1.5, 2.0, 2.0)
    metrics = surface_metrics(a, b, spacing)
    assert metrics["assd_voxels"] == pytest.approx(ones / surface)
    assert metrics["assd_mm"] == pytest.approx(1.5 * ones / surface)
    assert metrics["hd95_mm"] == pytest.approx(1.5)
    assert mask_edges(a).sum() == surface


def test_distance_of_single_voxels_and_empty_masks():
    a = np.zeros((5, 9, 9), bool)
    b = np.zeros_like(a)
    a[1, 2, 2] = True
    b[3, 5, 6] = True
    metrics = surface_metrics(a, b, (1.5, 2.0, 2.0))
    assert metrics["assd_mm"] == pytest.approx(math.sqrt(3.0 ** 2 + 6.0 ** 2 + 8.0 ** 2), rel=1e-6)
    assert metrics["assd_voxels"] == pytest.approx(math.sqrt(2 ** 2 + 3 ** 2 + 4 ** 2), rel=1e-6)
    assert metrics["hd95_mm"] == pytest.approx(math.sqrt(9 + 36 + 64), rel=1e-6)
    assert all(math.isnan(v) for v in surface_metrics(a, np.zeros_like(a), (1, 1, 1)).values())


def test_surface_distances_match_brute_force():
    import torch

    rng = np.random.default_rng(1)
    a = np.zeros((20, 24, 24), bool)
    b = np.zeros_like(a)
    a[3:12, 4:15, 5:20] = rng.random((9, 11, 15)) > 0.3
    b[5:15, 2:18, 5:16] = rng.random((10, 16, 11)) > 0.3
    spacing = np.array([1.5, 0.7, 0.9])
    pa = torch.tensor(np.argwhere(mask_edges(a)) * spacing)
    pb = torch.tensor(np.argwhere(mask_edges(b)) * spacing)
    d = torch.cdist(pa, pb)
    forward, backward = d.min(1).values.numpy(), d.min(0).values.numpy()
    metrics = surface_metrics(a, b, spacing)
    assert metrics["assd_mm"] == pytest.approx(np.concatenate([forward, backward]).mean(), rel=1e-5)
    assert metrics["hd95_mm"] == pytest.approx(
        max(np.percentile(forward, 95), np.percentile(backward, 95)), rel=1e-5)


@pytest.mark.skipif(not monai_surface_available(), reason="MONAI's CPU surface distance needs scipy")
def test_fallback_agrees_with_monai():
    a, b = offset_cubes(5)
    monai = surface_metrics(a, b, (1.5, 2.0, 2.0))
    own = _surface_metrics_sitk(a, b, (1.5, 2.0, 2.0))
    assert own == pytest.approx(monai, rel=1e-5)


def test_summary_excludes_undefined_distances_but_counts_them():
    rows = [{"label": "tumor", "dice": 1.0, "assd_mm": math.nan, "assd_voxels": math.nan, "hd95_mm": math.nan},
            {"label": "tumor", "dice": 0.5, "assd_mm": 2.0, "assd_voxels": 1.0, "hd95_mm": 3.0},
            {"label": "tumor", "dice": 0.0, "assd_mm": 4.0, "assd_voxels": 2.0, "hd95_mm": 5.0}]
    summary = summarize(rows, ["tumor"])["tumor"]
    assert summary["dice"] == {"mean": 0.5, "std": pytest.approx(np.std([1, 0.5, 0])), "n": 3,
                               "n_undefined": 0}
    assert summary["assd_mm"]["mean"] == 3.0 and summary["assd_mm"]["std"] == 1.0
    assert summary["assd_mm"]["n"] == 3 and summary["assd_mm"]["n_undefined"] == 1


def test_evaluate_arrays_per_label():
    gt = np.zeros((10, 10, 10), np.uint8)
    gt[2:8, 2:8, 2:8] = 1
    gt[4:6, 4:6, 4:6] = 2
    pred = gt.copy()
    pred[4:6, 4:6, 4:6] = 1  # tumor missed
    metrics = evaluate_arrays(pred, gt, {"liver": 1, "tumor": 2}, (1, 1, 1))
    assert metrics["liver"]["dice"] == pytest.approx(2 * 208 / (216 + 208))
    assert metrics["tumor"]["dice"] == 0.0 and math.isnan(metrics["tumor"]["assd_mm"])
    assert metrics["tumor"]["gt_voxels"] == 8 and metrics["tumor"]["pred_voxels"] == 0


def _write(path, array, spacing=(2.0, 2.0, 1.5)):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def test_evaluate_folders_and_cli(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    a, b = offset_cubes(6)
    # case A: liver = offset cubes (SimpleITK spacing x, y, z = 2, 2, 1.5 mm), no tumor at all
    _write(gt_dir / "A.nii.gz", a.astype(np.uint8))
    _write(pred_dir / "A.nii.gz", b.astype(np.uint8))
    # case B: perfect liver, tumor predicted exactly
    gt = a.astype(np.uint8)
    gt[4:6, 5:7, 5:7] = 2
    _write(gt_dir / "B.nii.gz", gt)
    _write(pred_dir / "B.nii.gz", gt)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "tumor": 2}}))
    result = evaluate_folders(pred_dir, gt_dir)  # labels from ../dataset.json
    assert result.labels == {"liver": 1, "tumor": 2}
    rows = {(r["case"], r["label"]): r for r in result.rows}
    n = 6
    assert rows["A", "liver"]["dice"] == pytest.approx(5 / 6)
    assert rows["A", "liver"]["assd_mm"] == pytest.approx(1.5 * (n * n + 16) / (n ** 3 - 64))
    assert rows["A", "tumor"]["dice"] == 1.0 and math.isnan(rows["A", "tumor"]["assd_mm"])
    assert rows["B", "tumor"]["dice"] == 1.0 and rows["B", "tumor"]["assd_mm"] == 0.0
    assert result.summary["tumor"]["assd_mm"]["n_undefined"] == 1

    out = tmp_path / "scores.json"
    assert cli_main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out),
                     "--labels", "liver=1", "tumor=2", "--no-progress"]) == 0
    data = json.loads(out.read_text())
    assert data["summary"]["liver"]["dice"]["mean"] == pytest.approx((5 / 6 + 1) / 2)
    assert data["cases"][1]["assd_mm"] is None  # NaN is written as null
    assert "mean of the pooled distances" in data["definitions"]["assd_mm"]
    with open(tmp_path / "scores.csv") as stream:
        table = list(csv.DictReader(stream))
    assert [r["case"] for r in table] == ["A", "A", "B", "B", "mean", "mean", "std", "std"]

    # a missing prediction is an error naming the case
    (pred_dir / "B.nii.gz").unlink()
    with pytest.raises(InputError, match="'?B'?"):
        evaluate_folders(pred_dir, gt_dir)
    assert cli_main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--no-progress"]) == 1


def test_grid_mismatch_names_case(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    a, _ = offset_cubes(4)
    _write(gt_dir / "C1.nii.gz", a)
    _write(pred_dir / "C1.nii.gz", a, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="C1"):
        evaluate_folders(pred_dir, gt_dir, ["1"])


def test_evaluate_model_scores_every_head(tmp_path):
    """A model on a data set: fused and per-phase heads, registered with the data set's transforms."""
    import torch

    from engine_helpers import tiny_config
    from maml.training.dataset import config_for_dataset, read_dataset
    from maml.model import save_checkpoint
    from maml.network import MAMLNet
    from test_training import write_tiny_dataset

    root = write_tiny_dataset(tmp_path / "d", n_cases=2, misaligned_case=1)
    (root / "transforms").mkdir()
    sitk.WriteTransform(sitk.TranslationTransform(3, (0.0, 0.0, 7.5)),
                        str(root / "transforms" / "TINY_001_arterial_to_venous.tfm"))
    config = config_for_dataset(tiny_config(), read_dataset(root))
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pt", MAMLNet(config), config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from maml.evaluation import evaluate_model

        with pytest.raises(InputError, match="TINY_001.*arterial"):  # misaligned, no registration
            evaluate_model(tmp_path / "m.pt", root, register=None)
        assert cli_main(["evaluate", "--model", str(tmp_path / "m.pt"), "--dataset", str(root),
                         "--register", "none", "--no-progress"]) == 1
        assert cli_main(["evaluate", "--model", str(tmp_path / "m.pt"), "--dataset", str(root),
                         "--register", "transforms", "--out", str(tmp_path / "res"),
                         "--save-predictions", str(tmp_path / "pred"), "--device", "cpu",
                         "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "res.json").read_text())
    assert set(data["heads"]) == {"fused", "arterial", "venous"}
    assert data["heads"]["venous"]["summary"]["liver"]["dice"]["n"] == 2
    for head in ("fused", "arterial", "venous"):  # lesion figures of the label named tumor, per head
        assert data["heads"][head]["lesion_label"] == "tumor"
        assert data["heads"][head]["lesion_summary"]["cases"] == 2
    with open(tmp_path / "res_lesions.csv") as stream:
        assert stream.readline().strip().split(",")[:3] == ["head", "case", "lesion"]
    for head in ("fused", "arterial", "venous"):
        for case in ("TINY_000", "TINY_001"):
            assert (tmp_path / "pred" / head / f"{case}.nii.gz").is_file()
    # the saved predictions score the same through the folder path
    again = evaluate_folders(tmp_path / "pred" / "venous", root / "labelsTr")
    first = [r for r in data["heads"]["venous"]["cases"] if r["label"] == "liver"]
    assert [r["dice"] for r in again.rows if r["label"] == "liver"] == pytest.approx([r["dice"] for r in first])
    with open(tmp_path / "res.csv") as stream:
        header = stream.readline().strip().split(",")
    assert header[:3] == ["head", "case", "label"]


def test_ensemble_head_is_the_mean_of_the_phase_heads_probabilities(tmp_path):
    """MS+Ensemble's head: argmax of the mean of each phase head's probabilities (by hand here)."""
    import numpy as np
    import torch

    from engine_helpers import tiny_config
    from maml.evaluation import evaluate_model
    from maml.inference import predict_case
    from maml.model import load_model, save_checkpoint
    from maml.network import MAMLNet
    from maml.training.dataset import config_for_dataset, load_case_images, read_dataset
    from test_training import write_tiny_dataset

    root = write_tiny_dataset(tmp_path / "d", n_cases=1)
    dataset = read_dataset(root)
    config = config_for_dataset(tiny_config(), dataset)
    torch.manual_seed(3)
    save_checkpoint(tmp_path / "m.pt", MAMLNet(config), config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = evaluate_model(tmp_path / "m.pt", root, register=None, heads=["ensemble", "venous"],
                                 predictions_dir=tmp_path / "pred", device="cpu", backend="torch")
        model = load_model(tmp_path / "m.pt")
        images, _ = load_case_images(dataset, model.config, dataset.cases[0], None)
        probabilities = [predict_case(model, {p: images[p]}, device="cpu", backend="torch",
                                      keep_probabilities=True).probabilities for p in config.phases]
        with pytest.raises(InputError, match="'ensemble'"):
            evaluate_model(tmp_path / "m.pt", root, register=None, heads=["mean"], device="cpu")
    finally:
        torch.set_num_threads(threads)
    assert list(results) == ["ensemble", "venous"]
    expected = np.argmax((probabilities[0] + probabilities[1]) / 2, axis=0)
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pred" / "ensemble" /
                                                        f"{dataset.cases[0]}.nii.gz")))
    assert np.array_equal(written, expected)
    # an untrained pair of heads disagrees somewhere: the ensemble is neither head alone
    alone = [np.argmax(p, axis=0) for p in probabilities]
    assert not np.array_equal(alone[0], alone[1])
    assert results["ensemble"].summary["liver"]["dice"]["n"] == 1


def test_result_paths_append_to_a_name_with_dots():
    from maml.evaluation.results import result_paths

    assert [p.name for p in result_paths("runs/tune_o0.25")] == \
        ["tune_o0.25.json", "tune_o0.25.csv", "tune_o0.25_lesions.csv"]
    assert [p.name for p in result_paths("scores.json")] == \
        ["scores.json", "scores.csv", "scores_lesions.csv"]
    assert [p.name for p in result_paths("scores.CSV")] == \
        ["scores.json", "scores.csv", "scores_lesions.csv"]
