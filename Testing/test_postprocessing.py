"""maml.postprocessing: connected-component clean-up and choosing it on validation cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from engine_helpers import save_tiny_liver_model, write_tiny_case
from maml.cli import main as cli_main
from maml.config import ModelConfig, PostprocessingConfig, demo_config
from maml.errors import ModelError
from maml.model import load_model
from maml.evaluation.tuning import ValidationCase, tune
from maml.postprocessing import keep_largest_component, postprocess, remove_small_components

SPACING = (2.0, 2.0, 2.0)  # 8 mm^3 per voxel: 125 voxels = 1 ml


def liver_with_tumors() -> np.ndarray:
    """A liver block with a large tumor, a 1-voxel tumor speck inside it, a 2x2x2 tumor outside the
    liver, and a detached liver island."""
    labels = np.zeros((20, 30, 30), np.uint8)
    labels[2:18, 2:20, 2:20] = 1
    labels[5:11, 5:11, 5:11] = 2  # 216 voxels = 1.73 ml
    labels[14, 15, 15] = 2  # a speck inside the liver
    labels[2:4, 25:27, 25:27] = 2  # 8 voxels outside the liver
    labels[15:18, 24:27, 24:27] = 1  # liver island, 27 voxels
    return labels


def test_largest_component_keeps_the_organ_and_counts_corner_contact():
    labels = liver_with_tumors()
    before = labels.copy()
    out = keep_largest_component(labels)
    np.testing.assert_array_equal(labels, before)
    assert out[2:4, 25:27, 25:27].max() == 0 and out[15:18, 24:27, 24:27].max() == 0
    assert (out[2:18, 2:20, 2:20] == labels[2:18, 2:20, 2:20]).all()
    corner = np.zeros((6, 6, 6), np.uint8)
    corner[0:2, 0:2, 0:2] = 1
    corner[2, 2, 2] = 2  # touches the block at one corner only: the same component
    corner[5, 5, 5] = 1  # separate
    kept = keep_largest_component(corner)
    assert kept[2, 2, 2] == 2 and kept[5, 5, 5] == 0


def test_small_components_take_the_surrounding_label():
    labels = liver_with_tumors()
    out = remove_small_components(labels, value=2, min_voxels=10)
    assert out[14, 15, 15] == 1  # the speck inside the liver becomes liver
    assert out[2:4, 25:27, 25:27].max() == 0  # outside: background
    assert (out[5:11, 5:11, 5:11] == 2).all()  # the large tumor stays
    np.testing.assert_array_equal(remove_small_components(labels, 2, 0), labels)


def test_minimum_volume_is_in_millilitres_of_the_image_spacing():
    config = demo_config()
    labels = liver_with_tumors()
    keep = PostprocessingConfig(min_volume_ml={"tumor": 0.06})  # 7.5 voxels at 2 mm
    drop = PostprocessingConfig(min_volume_ml={"tumor": 0.07})  # 8.75 voxels
    assert postprocess(labels, SPACING, config, keep)[2, 25, 25] == 2
    assert postprocess(labels, SPACING, config, drop)[2, 25, 25] == 0
    # 0.01 ml keeps the 8 voxels at 2 mm (0.064 ml) but not at 1 mm (0.008 ml)
    small = PostprocessingConfig(min_volume_ml={"tumor": 0.01})
    assert postprocess(labels, SPACING, config, small)[2, 25, 25] == 2
    assert postprocess(labels, (1.0, 1.0, 1.0), config, small)[2, 25, 25] == 0
    both = PostprocessingConfig(largest_component=True, min_volume_ml={"tumor": 0.07})
    out = postprocess(labels, SPACING, config, both)
    assert out[14, 15, 15] == 1 and out[15:18, 24:27, 24:27].max() == 0
    assert (out == 2).sum() == 216


def test_config_round_trip_and_validation():
    config = demo_config()
    config.postprocessing = PostprocessingConfig(True, {"tumor": 0.5})
    again = ModelConfig.from_dict(json.loads(config.to_json()))
    assert again.postprocessing == config.postprocessing
    assert not again.postprocessing.is_identity and PostprocessingConfig().is_identity
    data = json.loads(config.to_json())
    del data["postprocessing"]  # checkpoints written before post-processing existed
    assert ModelConfig.from_dict(data).postprocessing.is_identity
    data["postprocessing"] = {"min_volume_ml": {"lesion": 1.0}}
    with pytest.raises(ModelError, match="'lesion'"):
        ModelConfig.from_dict(data)


def _case(seed: int, with_true_small_tumor: bool) -> ValidationCase:
    """Truth: liver + one large tumor (+ optionally a true 0.2 ml tumor). Prediction: the truth
    plus false-positive specks (3 voxels) in the liver and an island outside it."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((20, 30, 30), np.uint8)
    truth[2:18, 2:22, 2:22] = 1
    truth[4:10, 4:10, 4:10] = 2
    if with_true_small_tumor:
        truth[13:16, 14:17, 14:17] = 2  # 27 voxels = 0.216 ml
    prediction = truth.copy()
    for _ in range(3):
        z, y, x = rng.integers(12, 16), rng.integers(4, 10), rng.integers(14, 20)
        prediction[z, y, x:x + 3] = 2
    prediction[2:5, 25:28, 25:28] = 1
    return ValidationCase(f"case{seed}", prediction, truth, SPACING)


def test_tuning_removes_false_specks_but_keeps_true_small_tumors():
    config = demo_config()
    cases = [_case(seed, with_true_small_tumor=False) for seed in range(4)]
    result = tune(cases, config)
    assert result.settings.largest_component
    # specks (3 voxels = 0.024 ml) go at the smallest candidate; larger thresholds add nothing
    assert result.settings.min_volume_ml == {"tumor": 0.05}
    assert result.mean_dice > result.baseline_dice
    assert result.steps[0]["step"] == "none" and len(result.steps) > 10
    # when the validation cases have true 0.216 ml tumors, thresholds above that are refused
    cases = [_case(seed, with_true_small_tumor=True) for seed in range(4)]
    chosen = tune(cases, config).settings.min_volume_ml["tumor"]
    assert 0 < chosen < 0.216


def test_tune_command_writes_a_model_copy_and_predict_case_applies_it(tmp_path):
    model_path = save_tiny_liver_model(tmp_path / "tiny.pt")
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    for seed in range(3):
        case = _case(seed, with_true_small_tumor=False)
        for folder, array in ((pred_dir, case.prediction), (gt_dir, case.truth)):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing(SPACING)
            sitk.WriteImage(image, str(folder / f"{case.case_id}.nii.gz"))
    out_model, report = tmp_path / "tuned.pt", tmp_path / "report.json"
    assert cli_main(["tune-postprocessing", "--model", str(model_path), "--pred", str(pred_dir),
                     "--gt", str(gt_dir), "--write", str(out_model), "--report", str(report)]) == 0
    tuned, original = load_model(out_model), load_model(model_path)
    assert tuned.config.postprocessing == PostprocessingConfig(True, {"tumor": 0.05})
    assert json.loads(report.read_text())["chosen"]["largest_component"] is True
    assert all(torch.equal(a, b) for a, b in zip(tuned.network.state_dict().values(),
                                                 original.network.state_dict().values()))
    assert original.config.postprocessing.is_identity  # the input model is not modified

    from maml.inference import predict_case

    paths = write_tiny_case(tmp_path)
    images = {"venous": sitk.ReadImage(str(paths["venous"]))}  # one phase: no registration needed
    tuned.config.postprocessing = PostprocessingConfig(False, {"liver": 1e6, "tumor": 1e6})
    raw = sitk.GetArrayFromImage(predict_case(tuned, images, postprocess=False).labels)
    cleaned = sitk.GetArrayFromImage(predict_case(tuned, images).labels)
    spacing = tuple(reversed(images["venous"].GetSpacing()))
    np.testing.assert_array_equal(cleaned, postprocess(raw, spacing, tuned.config))
    assert raw.max() > 0 and cleaned.max() == 0  # nothing is a million millilitres
