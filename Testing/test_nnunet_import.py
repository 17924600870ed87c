"""nnU-Net v2 models as one-phase MAML models (maml import-nnunet), checked against nnU-Net itself.

The slow tests share one tiny nnU-Net v2 model trained with the real ``nnunetv2`` package on venous
phantoms (``nnunet_tiny.py``: two folds, minutes on one core) and nnU-Net's own predictions of two
cases: one already at the plans' spacing and one that needs resampling.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from engine_helpers import tiny_config
from maml.errors import InputError
from maml.model import FORMAT_VERSION, file_sha256, load_model, save_checkpoint
from maml.network import FoldEnsemble, MAMLNet
from maml.nnunet_import import NNUNetFolder, infer_label_map, model_labels, parse_label_map

FOLDS = ("0", "1")


# --------------------------------------------------------------------------------------------------
# Without nnU-Net: ensembles, label names, label sets
# --------------------------------------------------------------------------------------------------


def test_fold_ensemble_averages_every_output_and_round_trips(tmp_path):
    config = tiny_config(phases=("venous",))
    torch.manual_seed(1)
    members = [MAMLNet(config).eval(), MAMLNet(config).eval()]
    ensemble = FoldEnsemble(members)
    x = torch.randn(1, 1, 8, 16, 16)
    out = ensemble.predict(x)
    outs = [m.predict(x) for m in members]
    assert torch.allclose(out.probabilities, (outs[0].probabilities + outs[1].probabilities) / 2)
    assert torch.allclose(out.logits, (outs[0].logits + outs[1].logits) / 2)
    assert out.heatmaps is None and out.disagreement is None  # one phase: its own head
    path = save_checkpoint(tmp_path / "ensemble.pt", ensemble, config)
    payload = torch.load(path, weights_only=True)
    assert payload["format_version"] == FORMAT_VERSION == 2 and payload["ensemble_size"] == 2
    loaded = load_model(path)
    assert isinstance(loaded.network, FoldEnsemble) and len(loaded.network) == 2
    assert torch.allclose(loaded.network.predict(x).probabilities, out.probabilities)
    assert loaded.describe()["ensemble_size"] == 2


@pytest.mark.parametrize("labels, expected", [
    ({"background": 0, "liver": 1, "tumor": 2}, {"liver": 1, "tumor": 2}),
    ({"background": 0, "Liver": 1, "cancer": 2}, {"liver": 1, "tumor": 2}),  # MSD Task03
    ({"background": 0, "lesion": 1, "liver": 2}, {"liver": 2, "tumor": 1}),
    ({"background": 0, "liver": 1}, {"liver": 1}),
])
def test_liver_and_tumor_labels_are_found_by_name(labels, expected):
    assert infer_label_map(labels, None, "dataset.json") == expected


def test_a_model_without_liver_label_is_refused_unless_mapped():
    labels = {"background": 0, "organ": 1, "spot": 2}
    with pytest.raises(InputError, match="no liver label.*--label-map"):
        infer_label_map(labels, None, "dataset.json")
    assert infer_label_map(labels, parse_label_map(["liver=1", "tumor=2"]), "x") == {"liver": 1, "tumor": 2}
    with pytest.raises(InputError, match="--label-map liver=5"):
        infer_label_map(labels, {"liver": 5}, "x")
    with pytest.raises(InputError, match="liver=VALUE"):
        parse_label_map(["kidney=1"])


def test_region_based_label_sets_are_refused(tmp_path):
    folder = NNUNetFolder(tmp_path, "T", "P", "3d_fullres", {}, {
        "labels": {"background": 0, "liver": [1, 2], "tumor": 2}, "regions_class_order": [1, 2]}, {})
    with pytest.raises(InputError, match="region-based"):
        model_labels(folder)


def _folder(configuration: dict) -> NNUNetFolder:
    return NNUNetFolder(Path("RESULTS/Dataset003_Liver/T__P__3d_fullres"), "T", "P", "3d_fullres", {}, {},
                        configuration)


def test_plans_of_older_nnunet_versions_give_the_same_topology():
    from maml.nnunet_import import network_config

    legacy = _folder({"UNet_class_name": "PlainConvUNet", "UNet_base_num_features": 32,
                      "unet_max_num_features": 320, "conv_kernel_sizes": [[1, 3, 3]] + [[3, 3, 3]] * 5,
                      "pool_op_kernel_sizes": [[1, 1, 1]] + [[2, 2, 2]] * 4 + [[1, 2, 2]],
                      "n_conv_per_stage_encoder": [2] * 6, "n_conv_per_stage_decoder": [2] * 5})
    net = network_config(legacy)
    assert net.features_per_stage == [32, 64, 128, 256, 320, 320]
    assert net.strides[-1] == [1, 2, 2] and net.kernel_sizes[0] == [1, 3, 3]


@pytest.mark.parametrize("architecture, message", [
    ({"network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
      "arch_kwargs": {}}, "PlainConvUNet"),
    ({"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
      "arch_kwargs": {"conv_op": "torch.nn.modules.conv.Conv2d"}}, "2D configuration"),
])
def test_networks_the_engine_does_not_mirror_are_refused(architecture, message):
    from maml.nnunet_import import network_config

    with pytest.raises(InputError, match=message):
        network_config(_folder({"architecture": architecture}))


# --------------------------------------------------------------------------------------------------
# With a real nnU-Net v2 model
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_nnunet(tmp_path_factory):
    pytest.importorskip("nnunetv2")
    import nnunet_tiny

    root = tmp_path_factory.mktemp("nnunet")
    tiny = nnunet_tiny.build(root)
    cases = root / "cases"
    cases.mkdir()
    image = sitk.ReadImage(str(tiny.image(tiny.cases[0])))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tiny.raw / "labelsTr" / f"{tiny.cases[0]}.nii.gz")))
    # A 24 x 48 x 48 block around the liver: few windows, so both predictors run in seconds.
    size = np.array([24, 48, 48])
    low = np.clip(np.argwhere(labels == 1).mean(0).round().astype(int) - size // 2, 0,
                  np.array(labels.shape) - size)
    block = image[int(low[2]):int(low[2] + size[2]), int(low[1]):int(low[1] + size[1]),
                  int(low[0]):int(low[0] + size[0])]
    at_spacing = sitk.Image(block)
    at_spacing.SetSpacing(list(reversed(nnunet_tiny.SPACING)))  # as if scanned at the plans' spacing
    sitk.WriteImage(at_spacing, str(cases / "atspacing.nii.gz"))
    sitk.WriteImage(block, str(cases / "resampled.nii.gz"))  # the phantom's own 4.1 mm in-plane
    assert abs(block.GetSpacing()[0] - nnunet_tiny.SPACING[2]) > 0.05
    prediction = nnunet_tiny.nnunet_predict(tiny, [cases / "atspacing.nii.gz", cases / "resampled.nii.gz"],
                                            root / "nnunet_prediction", FOLDS)
    return tiny, cases, prediction


@pytest.fixture(scope="session")
def imported(tiny_nnunet, tmp_path_factory):
    tiny = tiny_nnunet[0]
    out = tmp_path_factory.mktemp("imported") / "venous.pt"
    result = _maml("import-nnunet", "--model-folder", str(tiny.model_folder), "--phase", "venous",
                   "--folds", *FOLDS, "--data-kind", "clinical", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def _maml(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maml.cli", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_import_keeps_plans_folds_and_provenance(tiny_nnunet, imported):
    tiny = tiny_nnunet[0]
    plans = json.loads((tiny.model_folder / "plans.json").read_text())
    fullres = plans["configurations"]["3d_fullres"]
    model = load_model(imported)
    config = model.config
    assert config.phases == ["venous"]
    assert [l.name for l in config.labels] == ["background", "liver", "tumor"]
    assert config.spacing == fullres["spacing"] and config.patch_size == fullres["patch_size"]
    arch = fullres["architecture"]["arch_kwargs"]
    assert config.network.features_per_stage == arch["features_per_stage"]
    assert config.network.kernel_sizes == arch["kernel_sizes"] and config.network.strides == arch["strides"]
    stats = plans["foreground_intensity_properties_per_channel"]["0"]
    assert config.normalization == {"venous": "ct_dataset"}
    assert config.intensity_properties["venous"] == pytest.approx(
        {"low": stats["percentile_00_5"], "high": stats["percentile_99_5"], "mean": stats["mean"],
         "std": stats["std"]})
    assert config.inference.blend == "logits" and config.inference.resampling == "nnunet"
    assert isinstance(model.network, FoldEnsemble) and len(model.network) == 2
    meta = model.metadata
    assert meta["nnunet_dataset"] == plans["dataset_name"] and meta["nnunet_plans"] == "nnUNetTinyPlans"
    assert meta["nnunet_trainer"] == "nnUNetTrainerTiny" and meta["nnunet_folds"] == list(FOLDS)
    assert meta["nnunet_version"].startswith(version("nnunetv2"))
    assert meta["source_sha256"]["plans.json"] == file_sha256(tiny.model_folder / "plans.json")
    assert meta["source_sha256"]["fold_1/checkpoint_final.pth"] == file_sha256(
        tiny.model_folder / "fold_1" / "checkpoint_final.pth")
    assert meta["data_kind"] == "clinical"
    assert "fingerprint" not in meta  # an imported model has no training fingerprint
    info = _maml("info", str(imported))
    assert info.returncode == 0
    for text in ("nnunet_dataset:", "Dataset917_MAMLTinyVenous", "nnUNetTinyPlans", "data_kind:",
                 "clinical", "ensemble of 2", "source_sha256"):
        assert text in info.stdout


@pytest.mark.slow
def test_weights_give_nnunets_network_output(tiny_nnunet, imported):
    """Each fold's backbone computes what nnU-Net's own PlainConvUNet computes with its weights."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    tiny = tiny_nnunet[0]
    plans = json.loads((tiny.model_folder / "plans.json").read_text())
    arch = dict(plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"])
    arch.update(conv_op=torch.nn.Conv3d, norm_op=torch.nn.InstanceNorm3d, nonlin=torch.nn.LeakyReLU,
                dropout_op=None)
    reference = PlainConvUNet(input_channels=1, num_classes=3, deep_supervision=False, **arch).eval()
    model = load_model(imported)
    x = torch.randn(1, 1, *model.config.patch_size)
    for fold, member in zip(FOLDS, model.network.members):
        checkpoint = torch.load(tiny.model_folder / f"fold_{fold}" / "checkpoint_final.pth",
                                weights_only=False)
        reference.load_state_dict(checkpoint["network_weights"])
        with torch.no_grad():
            np.testing.assert_allclose(member.predict(x).logits.numpy(), reference(x).numpy(), atol=1e-5)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / float(total)


@pytest.mark.slow
def test_segment_equals_nnunet_at_the_plans_spacing(tiny_nnunet, imported, tmp_path):
    """maml segment --register none --tta gives nnUNetv2_predict's labels (same folds, mirroring,
    step 0.5) on >= 99.5 % of voxels, and its probabilities within 1e-3."""
    from maml.inference import predict_case

    _, cases, prediction = tiny_nnunet
    out = tmp_path / "segment"
    result = _maml("segment", "--model", str(imported), "--phase", f"venous={cases / 'atspacing.nii.gz'}",
                   "--register", "none", "--tta", "--no-postprocessing", "--no-overview",
                   "--device", "cpu", "--out", str(out))
    assert result.returncode == 0, result.stderr
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.nii.gz")))
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction / "atspacing.nii.gz")))
    assert (theirs == 1).sum() > 1000  # the model found a liver: agreement is not all background
    agreement = float((ours == theirs).mean())
    assert agreement >= 0.995, agreement

    model = load_model(imported)
    case = predict_case(model, {"venous": sitk.ReadImage(str(cases / "atspacing.nii.gz"))}, mirror=True,
                        device="cpu", keep_probabilities=True, postprocess=False)
    probabilities = np.load(prediction / "atspacing.npz")["probabilities"]
    assert case.probabilities.shape == probabilities.shape
    difference = float(np.abs(case.probabilities - probabilities).max())
    assert difference <= 1e-3, difference
    print(f"\nat the plans' spacing: labels agree on {100 * agreement:.3f} % of voxels, "
          f"probabilities within {difference:.1e}")


@pytest.mark.slow
def test_segment_matches_nnunet_on_a_case_that_needs_resampling(tiny_nnunet, imported, tmp_path):
    _, cases, prediction = tiny_nnunet
    out = tmp_path / "segment"
    result = _maml("segment", "--model", str(imported), "--phase", f"venous={cases / 'resampled.nii.gz'}",
                   "--register", "none", "--tta", "--no-postprocessing", "--no-overview",
                   "--device", "cpu", "--out", str(out))
    assert result.returncode == 0, result.stderr
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.nii.gz")))
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction / "resampled.nii.gz")))
    assert (theirs == 1).sum() > 1000
    dice = {label: _dice(ours == label, theirs == label) for label in (1, 2)}
    assert all(d >= 0.98 for d in dice.values()), dice
    print(f"\nresampled case: Dice liver {dice[1]:.4f}, tumor {dice[2]:.4f}, "
          f"labels agree on {100 * float((ours == theirs).mean()):.3f} %")


@pytest.mark.slow
def test_bad_model_folders_get_one_line_and_no_output(tiny_nnunet, tmp_path):
    tiny = tiny_nnunet[0]

    def variant(name, edit):
        folder = tmp_path / name / tiny.model_folder.name
        shutil.copytree(tiny.model_folder, folder)
        dataset = json.loads((folder / "dataset.json").read_text())
        edit(dataset)
        (folder / "dataset.json").write_text(json.dumps(dataset))
        return folder

    cases = {
        "region-based": (variant("regions", lambda d: d.update(
            labels={"background": 0, "liver": [1, 2], "tumor": 2}, regions_class_order=[1, 2])), []),
        "no liver label": (variant("noliver", lambda d: d.update(
            labels={"background": 0, "organ": 1, "spot": 2})), []),
        "takes 2 input channels": (variant("channels", lambda d: d.update(
            channel_names={"0": "CT", "1": "CT"})), []),
        "no checkpoint_final.pth for fold": (tiny.model_folder, ["--folds", "7"]),
    }
    for expected, (folder, extra) in cases.items():
        out = tmp_path / f"{folder.parent.name}.pt"
        result = _maml("import-nnunet", "--model-folder", str(folder), "--phase", "venous",
                       "--out", str(out), *extra)
        assert result.returncode == 1, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert expected in result.stderr, result.stderr
        assert not out.exists()


@pytest.mark.slow
def test_init_from_loads_backbones_and_leaves_fusion_fresh(tiny_nnunet, imported):
    from maml.nnunet_import import backbone_source, config_from_init, initialise_backbones

    tiny = tiny_nnunet[0]
    config = config_from_init({"venous": str(imported)})
    config.phases = ["arterial", "venous"]
    config.normalization = {"arterial": "ct_dataset", "venous": "ct_dataset"}
    config.intensity_properties = {p: config.intensity_properties["venous"] for p in config.phases}
    assert config.inference.blend == "probabilities"  # a MAML model trained from it blends as MAML does
    torch.manual_seed(3)
    net = MAMLNet(config)
    fresh_fusion = {k: v.clone() for k, v in net.fusion.state_dict().items()}
    # one imported checkpoint for the arterial phase, the nnU-Net folder itself for the venous one
    initialise_backbones(net, {"arterial": str(imported), "venous": str(tiny.model_folder)})
    fold0 = load_model(imported).network.members[0].backbones["venous"].state_dict()
    for phase in config.phases:
        for key, value in net.backbones[phase].state_dict().items():
            assert torch.equal(value, fold0[key]), (phase, key)
    assert all(torch.equal(v, fresh_fusion[k]) for k, v in net.fusion.state_dict().items())
    with pytest.raises(InputError, match="one phase is needed|phases are"):
        initialise_backbones(net, {"portal": str(imported)})
    assert backbone_source(str(tiny.model_folder), "venous")[0].num_classes == 3
