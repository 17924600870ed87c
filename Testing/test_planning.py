"""maml.training.planning against nnU-Net v2's own ExperimentPlanner, the memory model against
measured activations, and `maml plan` / `maml train --config auto` on a tiny data set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from maml.cli import main as cli_main
from maml.errors import InputError
from maml.training.planning import (Budget, cpu_budget, estimate_elements, gpu_budget,
                                    nonzero_bounding_box, plan_configuration, pool_and_conv_props,
                                    features_per_stage, read_configuration_file, unet_elements)

LABELS = {"background": 0, "liver": 1, "tumor": 2}


def _fingerprints() -> dict[str, dict]:
    """Per-case spacings and shapes (z, y, x) of three kinds of data set."""
    rng = np.random.default_rng(7)
    n = 30
    liver = {  # portal-venous liver CT: 0.8 mm in plane, 1.5 mm slices (median), ~200 slices
        "spacings": [[float(rng.choice([1.0, 1.25, 1.5, 1.5, 2.0, 2.5])),
                      *[float(rng.uniform(0.7, 0.9))] * 2] for _ in range(n)],
        "shapes": [[int(rng.integers(150, 250)), 512, 512] for _ in range(n)]}
    brain = {  # 1 mm isotropic MR, skull-stripped and cropped (~160 x 240 x 240), many cases
        "spacings": [[1.0, 1.0, 1.0] for _ in range(8 * n)],
        "shapes": [[int(rng.integers(140, 180)), int(rng.integers(220, 260)), int(rng.integers(220, 260))]
                   for _ in range(8 * n)]}
    thick = {  # 0.7 x 0.7 mm in plane, 5 mm slices (some 3-4 mm): the anisotropy rule applies
        "spacings": [[float(rng.choice([3.0, 4.0, 5.0, 5.0, 5.0, 6.0])), 0.7, 0.7] for _ in range(n)],
        "shapes": [[int(rng.integers(20, 40)), int(rng.integers(300, 400)), int(rng.integers(300, 400))]
                   for _ in range(n)]}
    return {"liver": liver, "brain": brain, "thick": thick}


FINGERPRINTS = _fingerprints()


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory):
    """nnU-Net v2's planner module, pointed at a temporary nnUNet_raw / nnUNet_preprocessed."""
    pytest.importorskip("nnunetv2")
    from nnunetv2.experiment_planning.experiment_planners import default_experiment_planner as module

    root = tmp_path_factory.mktemp("nnunet")
    patch = pytest.MonkeyPatch()
    patch.setenv("nnUNet_n_proc_DA", "1")  # the threads its VRAM estimate sets torch to
    # the planner module took the folder names from the environment when it was imported
    patch.setattr(module, "nnUNet_raw", str(root / "raw"))
    patch.setattr(module, "nnUNet_preprocessed", str(root / "preprocessed"))
    module.root = root
    yield module
    patch.undo()


def _nnunet_dataset(module, name: str, fingerprint: dict) -> str:
    """nnU-Net's dataset.json, empty image files and dataset_fingerprint.json for ``fingerprint``."""
    raw = Path(module.nnUNet_raw) / name
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    for i in range(len(fingerprint["spacings"])):
        (raw / "imagesTr" / f"case{i:03d}_0000.nii.gz").touch()
        (raw / "labelsTr" / f"case{i:03d}.nii.gz").touch()
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": LABELS, "file_ending": ".nii.gz",
        "numTraining": len(fingerprint["spacings"]), "overwrite_image_reader_writer": "SimpleITKIO"}))
    preprocessed = Path(module.nnUNet_preprocessed) / name
    preprocessed.mkdir(parents=True)
    (preprocessed / "dataset_fingerprint.json").write_text(json.dumps({
        "spacings": fingerprint["spacings"], "shapes_after_crop": fingerprint["shapes"],
        "median_relative_size_after_cropping": 1.0,
        "foreground_intensity_properties_per_channel": {"0": {
            "mean": 100.0, "median": 100.0, "std": 40.0, "min": -100.0, "max": 300.0,
            "percentile_00_5": -20.0, "percentile_99_5": 220.0}}}))
    return name


def _nnunet_fullres(planner) -> dict:
    """The 3d_fullres branch of ExperimentPlanner.plan_experiment, run with the planner's own
    methods (plan_experiment also plans 2d and searches a 3d_lowres, tens of seconds). Its VRAM
    estimate builds each candidate network only to count feature maps: on the meta device, which
    skips allocating and initialising the weights, the count is the same and seconds faster."""
    with torch.device("meta"):
        return _nnunet_fullres_plan(planner)


def _nnunet_fullres_plan(planner) -> dict:
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    forward, _ = planner.determine_transpose()
    assert list(forward) == [0, 1, 2]  # the coarsest axis is z: no transposition to undo
    spacing = planner.determine_fullres_target_spacing()
    fingerprint = planner.dataset_fingerprint
    shapes = [compute_new_shape(shape, s, spacing)
              for s, shape in zip(fingerprint["spacings"], fingerprint["shapes_after_crop"])]
    median = np.median(shapes, 0)
    voxels = float(np.prod(median, dtype=np.float64) * planner.dataset_json["numTraining"])
    return planner.get_plans_for_configuration(spacing, median, "3d_fullres", voxels, {})


def _as_lists(value) -> list:
    return [list(map(int, v)) for v in value]


def _compare(ours: dict, theirs: dict) -> None:
    arch = theirs["architecture"]["arch_kwargs"]
    assert np.allclose(ours["spacing"], theirs["spacing"])
    assert np.allclose(ours["median_shape"], theirs["median_image_size_in_voxels"])
    assert ours["patch_size"] == [int(v) for v in theirs["patch_size"]]
    assert ours["strides"] == _as_lists(arch["strides"])
    assert ours["kernel_sizes"] == _as_lists(arch["kernel_sizes"])
    assert ours["features_per_stage"] == list(arch["features_per_stage"])
    assert ours["batch_size"] == theirs["batch_size"]


@pytest.mark.parametrize("kind, gpu_gb", [("liver", 8), ("brain", 8), ("brain", 80), ("thick", 8)])
def test_single_phase_plan_equals_nnunet_v2(nnunet, kind, gpu_gb):
    name = _nnunet_dataset(nnunet, f"Dataset9{len(list(Path(nnunet.nnUNet_raw).glob('*'))):02d}_{kind}",
                           FINGERPRINTS[kind])
    planner = nnunet.ExperimentPlanner(name, gpu_memory_target_in_gb=gpu_gb)
    theirs = _nnunet_fullres(planner)
    fingerprint = FINGERPRINTS[kind]
    ours = plan_configuration(fingerprint["spacings"], fingerprint["shapes"], 1, len(LABELS),
                              Budget("gpu", float(gpu_gb)))
    _compare(ours, theirs)
    # our count of one U-Net's feature maps is nnU-Net's, element for element
    arch = theirs["architecture"]
    with torch.device("meta"):
        counted = planner.static_estimate_VRAM_usage(
        tuple(theirs["patch_size"]), 1, len(LABELS), arch["network_class_name"], arch["arch_kwargs"],
        arch["_kw_requires_import"])
    assert ours["unet_elements_per_sample"] == int(counted)
    if kind == "liver":
        assert ours["spacing"][0] == pytest.approx(1.5) and ours["patch_size"] == [64, 192, 192]
    if kind == "thick":  # the 10th percentile slice spacing, not the 5 mm median; 1x3x3 kernels first
        slices = [s[0] for s in fingerprint["spacings"]]
        assert np.median(slices) == 5.0 and ours["spacing"][0] == pytest.approx(np.percentile(slices, 10))
        assert ours["spacing"][0] < 5.0 and ours["anisotropic_axis"] == 0
        assert ours["kernel_sizes"][0] == [1, 3, 3] and ours["strides"][1] == [1, 2, 2]
    if gpu_gb == 80:
        assert ours["batch_size"] > 2  # the headroom went into the batch, as nnU-Net's did


def test_whole_plan_experiment_agrees_on_the_anisotropic_data_set(nnunet):
    """nnU-Net's complete plan_experiment (no 3d_lowres is searched for this data set)."""
    name = _nnunet_dataset(nnunet, "Dataset950_thickwhole", FINGERPRINTS["thick"])
    with torch.device("meta"):
        plans = nnunet.ExperimentPlanner(name, 8).plan_experiment()
    assert "3d_lowres" not in plans["configurations"]
    fingerprint = FINGERPRINTS["thick"]
    ours = plan_configuration(fingerprint["spacings"], fingerprint["shapes"], 1, len(LABELS),
                              Budget("gpu", 8.0))
    _compare(ours, plans["configurations"]["3d_fullres"])


def test_two_phases_shrink_the_patch_to_fit_the_same_memory():
    for kind in ("liver", "brain"):
        fingerprint = FINGERPRINTS[kind]
        one, two = (plan_configuration(fingerprint["spacings"], fingerprint["shapes"], phases,
                                       len(LABELS), Budget("gpu", 8.0)) for phases in (1, 2))
        assert two["spacing"] == one["spacing"]
        assert math.prod(two["patch_size"]) < math.prod(one["patch_size"])
        assert two["estimated_elements_per_sample"] <= two["budget_elements"]
        # the single-phase patch would not fit two U-Nets and the MA module
        topology = pool_and_conv_props(one["spacing"], one["patch_size"])
        assert estimate_elements(one["patch_size"], topology, one["features_per_stage"], 2,
                                 len(LABELS)) > two["budget_elements"]
    # where one phase leaves headroom for a larger batch, two phases leave less
    brain = FINGERPRINTS["brain"]
    one, two = (plan_configuration(brain["spacings"], brain["shapes"], phases, len(LABELS),
                                   Budget("gpu", 40.0)) for phases in (1, 2))
    assert two["batch_size"] * math.prod(two["patch_size"]) < one["batch_size"] * math.prod(one["patch_size"])


def test_cpu_budget_rule():
    liver = FINGERPRINTS["liver"]
    plan = plan_configuration(liver["spacings"], liver["shapes"], 2, len(LABELS), cpu_budget())
    assert 2 * math.prod(plan["patch_size"]) <= 2 ** 18 and plan["batch_size"] == 2
    assert plan["features_per_stage"][0] == 16
    assert all(p % d == 0 for p, d in zip(plan["patch_size"], pool_and_conv_props(
        plan["spacing"], plan["patch_size"]).divisor))


def test_a_budget_too_small_is_refused_not_planned_into_a_one_stage_net():
    liver = FINGERPRINTS["liver"]
    with pytest.raises(InputError, match="no U-Net of 3 stages fits 0.01 GB"):
        plan_configuration(liver["spacings"], liver["shapes"], 2, len(LABELS), Budget("gpu", 0.01))
    with pytest.raises(InputError, match="too small to pool"):
        plan_configuration([[1.0, 1.0, 1.0]], [[4, 6, 6]], 2, len(LABELS), cpu_budget())


def _saved_bytes(module, x) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward pass of ``module(x)``."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x)
    return sum(storages.values())


def test_memory_model_matches_measured_activations():
    """Two U-Nets + MA over one U-Net: the estimate's ratio is the measured one within 10 %."""
    from engine_helpers import tiny_config
    from maml.network import MAMLNet

    torch.set_num_threads(1)
    patch = [16, 32, 32]
    topology = pool_and_conv_props([1.0, 1.0, 1.0], patch)
    features = features_per_stage(len(topology.strides), 16)
    config = tiny_config(base_features=16, deep_supervision=False)
    config.patch_size = patch
    config.network.kernel_sizes, config.network.strides = topology.kernel_sizes, topology.strides
    single = tiny_config(phases=("venous",), base_features=16, deep_supervision=False)
    single.patch_size, single.network = config.patch_size, config.network
    torch.manual_seed(0)
    x = torch.randn(1, 2, *patch)
    measured = _saved_bytes(MAMLNet(config).train(), x) / _saved_bytes(MAMLNet(single).train(), x[:, :1])
    estimated = (estimate_elements(config.patch_size, topology, features, 2, 3)
                 / estimate_elements(config.patch_size, topology, features, 1, 3))
    assert estimated == pytest.approx(measured, rel=0.10)
    assert estimated > 2.3  # the MA module is not negligible
    assert unet_elements(config.patch_size, topology, features, 3) == \
        estimate_elements(config.patch_size, topology, features, 1, 3)


def test_nonzero_bounding_box_fills_holes_and_joins_phases():
    a = np.zeros((6, 8, 8))
    a[1:5, 2:6, 2:6] = 1
    a[2:4, 3:5, 3:5] = 0  # a hole: still inside
    b = np.zeros_like(a)
    b[1, 1, 7] = 5  # another phase reaches further
    assert nonzero_bounding_box([a, b]) == (slice(1, 5), slice(1, 6), slice(2, 8))


def test_gpu_budget_input():
    assert gpu_budget(12).reference_elements == pytest.approx(560e6 * 12 / 8)
    assert gpu_budget(None).gpu_memory_gb == 8  # the tests hide CUDA: nnU-Net's reference
    with pytest.raises(Exception, match="gpu-memory"):
        gpu_budget(0)


# --------------------------------------------------------------------------------------------------
# maml plan and maml train --config auto on a tiny data set
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    from test_training import write_tiny_dataset

    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "Dataset001_Tiny")


def test_cli_plan_on_a_tiny_data_set(tiny_dataset, tmp_path, capsys):
    from maml.config import paper_config
    from maml.training.dataset import config_for_dataset, dataset_intensity_properties, read_dataset

    out = tmp_path / "plans.json"
    assert cli_main(["plan", "--dataset", str(tiny_dataset), "--out", str(out), "--cpu", "--quiet"]) == 0
    plans = json.loads(out.read_text())
    fingerprint = plans["fingerprint"]
    assert plans["planner"]["version"] == 1 and len(fingerprint["cases"]) == 5
    assert fingerprint["spacings"] == [[2.0, 1.5, 1.5]] * 5
    assert fingerprint["shapes_after_crop"] == [[12, 24, 24]] * 5
    configuration = plans["configuration"]
    assert configuration["patch_size"] == [12, 24, 24] and configuration["batch_size"] == 2
    assert configuration["strides"] == [[1, 1, 1], [2, 2, 2], [1, 2, 2]]
    # the fingerprint's foreground statistics are those training computes (same voxel draws)
    raw = read_dataset(tiny_dataset)
    expected = dataset_intensity_properties(raw, config_for_dataset(paper_config(), raw), raw.cases,
                                            progress=False)
    for phase in ("arterial", "venous"):
        for key in ("low", "high", "mean", "std"):
            assert fingerprint["foreground_intensity"][phase][key] == pytest.approx(expected[phase][key])
    config, options = read_configuration_file(out)
    assert config.patch_size == [12, 24, 24] and config.network.base_features == 16
    assert config.phases == ["arterial", "venous"] and options == {"batch_size": 2}
    assert "patch: 12 x 24 x 24, batch 2" in capsys.readouterr().out


def test_cli_plan_refuses_bad_input_in_one_line(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "plans.json"
    assert cli_main(["plan", "--dataset", str(tmp_path / "nowhere"), "--out", str(out)]) == 1
    assert cli_main(["plan", "--dataset", str(tiny_dataset), "--out", str(out), "--gpu-memory", "0"]) == 1
    assert cli_main(["plan", "--dataset", str(tiny_dataset), "--out", str(tmp_path)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("maml plan")]
    assert len(errors) == 3 and "dataset.json" in errors[0] and "--gpu-memory" in errors[1]
    assert not out.exists()
    with pytest.raises(SystemExit):
        cli_main(["plan", "--dataset", str(tiny_dataset), "--out", str(out), "--cpu", "--gpu-memory", "8"])


def test_cli_train_config_auto_plans_then_trains(tiny_dataset, tmp_path):
    from maml.config import ModelConfig
    from maml.training.state import STATE_FILE, load_state

    torch.set_num_threads(1)
    out = tmp_path / "run"
    # --fold all: no validation, which is not what is tested here
    common = ["--dataset", str(tiny_dataset), "--epochs", "1", "--iterations", "1", "--fold", "all",
              "--device", "cpu", "--augmentation", "none", "--no-progress"]
    assert cli_main(["train", "--out", str(out), *common]) == 0  # no --config: auto
    plans = json.loads((out / "plans.json").read_text())
    assert plans["budget"]["kind"] == "cpu"  # training runs on the CPU
    state = load_state(out / STATE_FILE)
    trained = ModelConfig.from_dict(state["config"])
    assert trained.patch_size == plans["model_config"]["patch_size"] == [12, 24, 24]
    assert trained.network.strides == plans["model_config"]["network"]["strides"]
    assert trained.network.base_features == 16
    assert state["options"]["batch_size"] == plans["training_options"]["batch_size"]
    # the run's plans stay as they are: a second run into OUT is refused before planning
    written = (out / "plans.json").read_bytes()
    assert cli_main(["train", "--out", str(out), *common]) == 1
    assert (out / "plans.json").read_bytes() == written
    # a plans file is a --config; a given option wins over the planned one
    other = tmp_path / "from_file"
    assert cli_main(["train", "--out", str(other), "--config", str(out / "plans.json"),
                     "--batch-size", "3", *common]) == 0
    assert load_state(other / STATE_FILE)["options"]["batch_size"] == 3
    # a refused run leaves nothing behind, the plans included
    refused = tmp_path / "refused"
    assert cli_main(["train", "--out", str(refused), "--dataset", str(tiny_dataset), "--fold", "7",
                     "--device", "cpu", "--no-progress"]) == 1
    assert not refused.exists()
