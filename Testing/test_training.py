"""maml.training.dataset, maml.training and `maml train` on tiny generated nnU-Net data sets (CPU)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from engine_helpers import tiny_config
from maml.cli import main as cli_main
from maml.config import ModelConfig
from maml.training.dataset import PreprocessedCache, config_for_dataset, read_dataset, split_cases
from maml.training.loading import (PatchDataset, build_augmentation, crop_patch, forced_to_foreground,
                                   region_start, sampled_region_size)
from maml.errors import InputError
from maml.model import load_model
from maml.training.logs import read_log
from maml.training.options import TrainingOptions, poly_lr
from maml.training.state import STATE_FILE, load_state
from maml.training.trainer import train

SPACING_ZYX = (2.0, 1.5, 1.5)  # tiny_config's spacing: the cache resamples nothing
SHAPE = (12, 24, 24)
HU = {"arterial": (0.0, 60.0, 160.0), "venous": (0.0, 110.0, 40.0)}  # background, liver, tumor


def _image(array: np.ndarray, spacing_zyx=SPACING_ZYX, origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    image.SetOrigin(origin)
    return image


def tiny_case(seed: int, shape=SHAPE) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A ball 'liver' (1) with a smaller ball 'tumor' (2) inside; phase-specific intensities."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape, dtype=float)
    centre = np.array(shape) / 2 + rng.uniform(-1.5, 1.5, 3)
    liver = ((z - centre[0]) / 5) ** 2 + ((y - centre[1]) / 9) ** 2 + ((x - centre[2]) / 9) ** 2 < 1
    tc = centre + np.array([0, rng.uniform(-3, 3), rng.uniform(-3, 3)])
    tumor = ((z - tc[0]) / 2.5) ** 2 + ((y - tc[1]) / 3.5) ** 2 + ((x - tc[2]) / 3.5) ** 2 < 1
    label = np.zeros(shape, np.uint8)
    label[liver] = 1
    label[tumor & liver] = 2
    images = {phase: (np.take(np.array(values), label) + rng.normal(0, 8, shape)).astype(np.float32)
              for phase, values in HU.items()}
    return images, label


def write_tiny_dataset(root: Path, n_cases: int = 5, seed: int = 0, misaligned_case: int | None = None
                       ) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n_cases):
        case = f"TINY_{i:03d}"
        images, label = tiny_case(seed + i)
        for channel, phase in enumerate(("arterial", "venous")):
            origin = (0.0, 0.0, 0.0)
            if i == misaligned_case and phase == "arterial":
                origin = (0.0, 0.0, 7.5)  # another grid (a shifted acquisition)
            sitk.WriteImage(_image(images[phase], origin=origin),
                            str(root / "imagesTr" / f"{case}_{channel:04d}.nii.gz"))
        sitk.WriteImage(_image(label), str(root / "labelsTr" / f"{case}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "name": "Tiny", "channel_names": {"0": "arterial", "1": "venous"},
        "labels": {"background": 0, "liver": 1, "tumor": 2}, "numTraining": n_cases,
        "file_ending": ".nii.gz"}))
    return root


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions run fastest on one thread (and the CI cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "Dataset001_Tiny")


def tiny_model_config() -> ModelConfig:
    """tiny_config; training replaces its label names with the data set's."""
    return tiny_config(base_features=4)


def tiny_options(**changes) -> TrainingOptions:
    values = dict(epochs=2, iterations_per_epoch=3, batch_size=2, val_cases=1, seed=3,
                  augmentation="light", device="cpu", learning_rate=3e-3)
    values.update(changes)
    return TrainingOptions(**values)


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------
# Data set reading, splitting, cache, patches
# --------------------------------------------------------------------------------------------------


def test_read_dataset_and_config(dataset):
    raw = read_dataset(dataset)
    assert raw.cases == [f"TINY_{i:03d}" for i in range(5)]
    assert raw.channel_names == ["arterial", "venous"]
    config = config_for_dataset(tiny_model_config(), raw)
    assert config.phases == ["arterial", "venous"]
    assert [(l.value, l.name) for l in config.labels] == [(0, "background"), (1, "liver"), (2, "tumor")]
    assert config.normalization == {"arterial": "ct", "venous": "ct"}


def test_repeated_channel_names_and_region_labels_are_handled(tmp_path):
    root = write_tiny_dataset(tmp_path / "d", n_cases=1)
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT", "1": "CT"}
    (root / "dataset.json").write_text(json.dumps(meta))
    config = config_for_dataset(tiny_model_config(), read_dataset(root))
    # nnU-Net's channel-name keyword "CT" means its CTNormalization (training-set statistics)
    assert config.phases == ["CT_0", "CT_1"] and set(config.normalization.values()) == {"ct_dataset"}
    meta["labels"] = {"background": 0, "whole": [1, 2]}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="region"):
        read_dataset(root)


def test_missing_image_names_case(tmp_path):
    root = write_tiny_dataset(tmp_path / "d", n_cases=2)
    (root / "imagesTr" / "TINY_001_0001.nii.gz").unlink()
    with pytest.raises(InputError, match="TINY_001.*TINY_001_0001"):
        read_dataset(root)


def test_split_cases():
    cases = [f"c{i:02d}" for i in range(12)]
    folds = [split_cases(cases, k)[1] for k in range(5)]
    assert sorted(sum(folds, [])) == cases  # the folds partition the cases
    assert folds[0] == ["c00", "c01", "c02"]
    train_ids, val_ids = split_cases(cases, 2)
    assert not set(train_ids) & set(val_ids) and len(train_ids) + len(val_ids) == 12
    assert split_cases(cases, val_cases=2) == (cases[:10], cases[10:])
    assert split_cases(cases, "all") == (cases, [])
    with pytest.raises(InputError):
        split_cases(cases, 5)


def test_cache_is_built_once_and_patches_oversample_foreground(dataset, tmp_path):
    raw = read_dataset(dataset)
    config = config_for_dataset(tiny_model_config(), raw)
    cache = PreprocessedCache(tmp_path / "pre", config, raw)
    cache.prepare_folder()
    assert cache.build(raw.cases, progress=False) == 5
    assert cache.build(raw.cases, progress=False) == 0  # reused
    case = cache.load("TINY_000")
    assert case.data.shape == (2, *SHAPE) and case.data.dtype == np.float32
    assert case.seg.shape == SHAPE
    # normalised per phase; labels survive the identity resampling exactly
    assert abs(float(np.mean(case.data[0]))) < 1e-3
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / "labelsTr" / "TINY_000.nii.gz")))
    assert np.array_equal(case.seg, original)
    assert set(case.foreground) == {1, 2} and len(case.foreground[2]) == (original == 2).sum()

    # nnU-Net's rule: the last third of every batch (at least one sample) is centred on foreground
    patches = PatchDataset([case], (4, 6, 6), length=300, seed=1, batch_size=3)
    tumor_centred = 0
    for i in range(60):
        image, label, info = patches.sample(i)
        assert image.shape == (2, 4, 6, 6) and label.shape == (4, 6, 6)
        assert (info["class"] is not None) == (i % 3 == 2)
        tumor_centred += info["class"] == 2 and label[2, 3, 3] == 2
    assert 4 <= tumor_centred <= 16  # about half of the 20 forced ones pick the tumor class
    assert forced_to_foreground(1, 2, 1 / 3) and not forced_to_foreground(0, 2, 1 / 3)
    uniform = PatchDataset([case], (4, 6, 6), length=300, seed=1, oversample_foreground=0.0)
    assert all(uniform.sample(i)[2]["class"] is None for i in range(20))
    # items are pure functions of (seed, epoch, rank, index)
    a, b = PatchDataset([case], (4, 8, 8), 10, seed=5), PatchDataset([case], (4, 8, 8), 10, seed=5)
    a.set_epoch(3), b.set_epoch(3)
    assert a.sample(7)[2] == b.sample(7)[2]
    b.rank = 1
    assert [a.sample(i)[2]["start"] for i in range(5)] != [b.sample(i)[2]["start"] for i in range(5)]


def test_crop_pads_outside_volume():
    data = np.arange(2 * 4 * 5 * 6, dtype=np.float32).reshape(2, 4, 5, 6)
    seg = np.ones((4, 5, 6), np.uint8)
    image, label = crop_patch(data, seg, (-1, 2, 3), (6, 4, 4), fill=(-5.0, -7.0), fill_label=-1)
    assert image.shape == (2, 6, 4, 4)
    assert np.all(image[0, 0] == -5) and np.all(image[1, 0] == -7)
    assert np.all(label[0] == -1) and np.all(label[5] == -1)
    assert np.array_equal(image[:, 1:5, :3, :3], data[:, :, 2:5, 3:6])
    assert np.all(label[1:5, 3:, :] == -1) and np.all(label[1:5, :3, :3] == 1)


def test_sampled_region_holds_any_rotation_of_the_patch():
    assert sampled_region_size((32, 64, 64), "light") == [32, 64, 64]
    region = sampled_region_size((32, 64, 64))
    # a 30 degree in-plane turn of 64 x 64 spans 64 (cos 30 + sin 30) = 87.4, over 0.85 -> 102
    assert region[1] == region[2] == 102 and region[0] > 32
    flat = sampled_region_size((8, 64, 64))  # anisotropic: rotated in plane only, by up to 180
    assert flat[0] == 8 and flat[1] == int(64 * 2 ** 0.5 / 0.85)
    # regions reach past the border by at most half the extra size, on both sides
    rng = np.random.default_rng(0)
    starts = np.array([region_start((40, 80, 80), region, (32, 64, 64), rng) for _ in range(300)])
    assert starts[:, 1].min() == -(102 - 64) // 2 and starts[:, 1].max() == 80 + 19 - 102


def _preprocessed_cases(tmp_path, config, raw, count: int) -> list:
    """The first ``count`` cases of ``raw``, preprocessed into a cache under ``tmp_path``."""
    cache = PreprocessedCache(tmp_path / "pre", config, raw)
    cache.prepare_folder()
    cache.build(raw.cases[:count], progress=False)
    return [cache.load(case) for case in raw.cases[:count]]


def test_augmentation_is_nnunets_and_pads_with_air(dataset, tmp_path):
    raw = read_dataset(dataset)
    config = config_for_dataset(tiny_model_config(), raw)
    case, = _preprocessed_cases(tmp_path, config, raw, 1)
    air = [float(case.data[c].min()) for c in range(2)]
    patch = (8, 16, 16)
    patches = PatchDataset([case], patch, length=64, seed=2, augmentation=build_augmentation(
        "default", patch), batch_size=2)
    changed = 0
    for i in range(32):
        image, label = patches[i]
        assert image.shape == (2, *patch) and label.shape == (1, *patch)
        assert set(torch.unique(label).tolist()) <= {0, 1, 2}  # padding -1 became background
        plain = PatchDataset([case], patch, length=64, seed=2, batch_size=2).sample(i)[0]
        changed += image.shape != plain.shape or not np.allclose(image.numpy(), plain[:, :8, :16, :16])
    assert changed >= 24
    assert torch.equal(patches[5][0], patches[5][0])  # deterministic per item
    # a region wholly outside the volume holds air in every phase (not 0, the foreground mean)
    image, _ = crop_patch(case.data, case.seg, (-100, -100, -100), patch, fill=air, fill_label=-1)
    assert np.allclose(image[0], air[0]) and np.allclose(image[1], air[1])
    with pytest.raises(InputError, match="augmentation"):
        build_augmentation("strong", patch)


def test_ablation_loss_weights_are_checked_before_training():
    from maml.training.options import default_options

    assert default_options("demo", joint_weight=0.0, lambda_intra=1.0).joint_weight == 0.0
    with pytest.raises(InputError, match="nothing to train"):
        default_options("demo", joint_weight=0.0, lambda_intra=0.0)
    with pytest.raises(InputError, match="joint weight must be >= 0"):
        default_options("demo", joint_weight=-1.0)
    with pytest.raises(InputError, match="modality-dropout"):
        default_options("demo", lambda_intra=0.0, modality_dropout=0.5)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def test_poly_lr():
    assert poly_lr(0.01, 0, 100) == 0.01
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert poly_lr(0.01, 100, 100) == 0.0


def test_training_reduces_loss_and_writes_everything(dataset, tmp_path):
    out = tmp_path / "run"
    result = train(dataset, out, tiny_model_config(),
                   tiny_options(epochs=4, iterations_per_epoch=4, augmentation="none"),
                   progress=False)
    rows = read_log(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    for key in ("val_dice_fused_tumor", "val_dice_arterial_liver", "val_dice_venous_tumor",
                "val_assd_voxels_fused_liver", "lr", "train_intra_arterial", "train_joint"):
        assert key in rows[-1]
    assert (out / "log.csv").read_text().splitlines()[0].startswith("epoch,")
    png = (out / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000
    for name in ("checkpoint_latest.pt", "checkpoint_best.pt", "checkpoint_final.pt"):
        loaded = load_model(out / name)
        assert loaded.config.phases == ["arterial", "venous"]
        assert [l.name for l in loaded.config.labels] == ["background", "liver", "tumor"]
    latest = load_model(out / "checkpoint_latest.pt")
    assert latest.metadata["trained_epochs"] == 4
    assert state_dicts_equal(latest.network.state_dict(), result.network.state_dict())
    best = load_model(out / "checkpoint_best.pt")
    assert best.metadata["epoch"] == result.best_epoch
    # the finished run carries its training fingerprint: limits from the validation case
    fingerprint = best.metadata["fingerprint"]
    assert fingerprint["calibration_cases"] == ["TINY_004"] and len(fingerprint["training_cases"]) == 4
    assert best.metadata["validation_case_ids"] == ["TINY_004"]
    assert best.metadata["data_kind"] == "clinical"  # the tiny data set does not say "synthetic"
    channels = 2 * best.config.network.features_per_stage[-1]  # mean and spread per channel
    for phase in ("arterial", "venous"):
        assert tuple(fingerprint["features"][phase]["precision"].shape) == (channels, channels)
        assert fingerprint["features"][phase]["calibration_mean_limit"] > 0
    assert latest.metadata["fingerprint"]["training_cases"] == fingerprint["training_cases"]
    assert best.describe()["fingerprint"]["calibration_cases"] == 1
    # every epoch: pseudo-Dice of every head on fixed validation patches, and its moving average
    assert all(0.0 <= r["val_pseudo_dice_fused"] <= 1.0 and "val_pseudo_dice_venous_tumor" in r
               for r in rows)
    assert rows[1]["val_pseudo_dice_ema_fused"] == pytest.approx(
        0.9 * rows[0]["val_pseudo_dice_ema_fused"] + 0.1 * rows[1]["val_pseudo_dice_fused"])
    assert "val_dice_fused_tumor" not in rows[0]  # full volumes only at the end by default
    final = load_model(out / "checkpoint_final.pt")
    assert state_dicts_equal(final.network.state_dict(), result.network.state_dict())
    validation = json.loads((out / "validation_final.json").read_text())
    assert set(validation["cases"]["TINY_004"]) == {"fused", "arterial", "venous"}
    state = load_state(out / STATE_FILE)  # weights_only loading works
    assert state["epoch"] == 4 and state["val_cases"] == ["TINY_004"]
    # an existing run is not overwritten without --resume
    with pytest.raises(InputError, match="--resume"):
        train(dataset, out, tiny_model_config(), tiny_options(), progress=False)


def test_dataset_ct_normalisation_statistics_come_from_the_training_foreground(dataset, tmp_path):
    """'ct_dataset': training computes the foreground statistics of the training cases only, the
    checkpoint carries them, and the cache holds data normalised with them."""
    config = tiny_model_config()
    config.normalization = {phase: "ct_dataset" for phase in config.phases}
    out = tmp_path / "run"
    train(dataset, out, config, tiny_options(epochs=1, iterations_per_epoch=1, augmentation="none"),
          progress=False)
    raw = read_dataset(dataset)
    train_ids = raw.cases[:-1]  # val_cases=1: the last case validates and is not counted
    model = load_model(out / "checkpoint_latest.pt")
    for channel, phase in enumerate(("arterial", "venous")):
        values = []
        for case in train_ids:  # fewer foreground voxels than the sampling cap: all are used
            label = sitk.GetArrayFromImage(sitk.ReadImage(str(raw.label_file(case))))
            image = sitk.GetArrayFromImage(sitk.ReadImage(str(raw.image_files(case)[channel])))
            values.append(image[label > 0].astype(np.float64))
        values = np.concatenate(values)
        props = model.config.intensity_properties[phase]
        assert props["low"] == pytest.approx(np.percentile(values, 0.5))
        assert props["high"] == pytest.approx(np.percentile(values, 99.5))
        assert props["mean"] == pytest.approx(values.mean())
        assert props["std"] == pytest.approx(values.std())
        # the cached training data is that normalisation of the (unresampled) image
        case = train_ids[0]
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(raw.image_files(case)[channel])))
        expected = (np.clip(image, props["low"], props["high"]) - props["mean"]) / props["std"]
        cached = np.load(out / "preprocessed" / f"{case}.npy")[channel]
        np.testing.assert_allclose(cached, expected, rtol=1e-4, atol=1e-4)
        # liver and tumor differ by whole units, not hundredths
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(raw.label_file(case))))
        assert abs(cached[label == 2].mean() - cached[label == 1].mean()) > 1.0


def test_resume_after_a_kill_matches_an_uninterrupted_run(dataset, tmp_path):
    options = dict(epochs=3, iterations_per_epoch=3, val_every=2, modality_dropout=0.5)
    straight = train(dataset, tmp_path / "a", tiny_model_config(), tiny_options(**options),
                     progress=False)

    def kill(info):  # dies in the middle of the second epoch
        if info["epoch"] == 1 and info["iteration"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(dataset, tmp_path / "b", tiny_model_config(), tiny_options(**options),
              progress=False, callback=kill)
    assert load_state(tmp_path / "b" / STATE_FILE)["epoch"] == 1  # at most one epoch lost
    resumed = train(dataset, tmp_path / "b", tiny_model_config(), tiny_options(**options),
                    resume=True, progress=False)
    assert state_dicts_equal(straight.network.state_dict(), resumed.network.state_dict())
    assert [r["epoch"] for r in read_log(tmp_path / "b")] == [1, 2, 3]
    a = load_state(tmp_path / "a" / STATE_FILE)["optimizer"]["state"]
    b = load_state(tmp_path / "b" / STATE_FILE)["optimizer"]["state"]
    assert all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)


def test_modality_dropout_trains_single_phase_iterations(dataset, tmp_path):
    """With dropout 1 every iteration trains one phase alone: the fusion gets no gradient."""
    result = train(dataset, tmp_path / "drop", tiny_model_config(),
                   tiny_options(epochs=1, iterations_per_epoch=3, modality_dropout=1.0,
                                optimizer="sgd"), progress=False)
    saved = load_model(tmp_path / "drop" / "checkpoint_latest.pt")
    from maml.network import MAMLNet

    torch.manual_seed(3)
    fresh = MAMLNet(result.config)
    trained = result.network.state_dict()
    fusion_keys = [k for k in trained if k.startswith(("fusion.", "fused_head."))]
    assert all(torch.equal(trained[k], fresh.state_dict()[k]) for k in fusion_keys)
    backbone_keys = [k for k in trained if k.startswith("backbones.") and k.endswith("conv.weight")]
    assert any(not torch.equal(trained[k], fresh.state_dict()[k]) for k in backbone_keys)
    row = read_log(tmp_path / "drop")[0]
    assert row["train_joint"] is None  # no fused term was trained
    assert saved.metadata["modality_dropout"] == 1.0
    assert state_dicts_equal(saved.network.state_dict(), trained)


@pytest.mark.parametrize("flags, frozen, trained", [
    # MS+Ensemble: the per-phase U-Nets alone learn; fusion and fused head stay as initialised
    (["--joint-weight", "0", "--lambda-intra", "1"], ("fusion.", "fused_head."), ("backbones.",)),
    # MS+MA: the fusion learns from the joint loss; the phase heads' output layers get nothing
    (["--lambda-intra", "0"], ("backbones.arterial.decoder.seg_layers", "backbones.venous.decoder.seg_layers"),
     ("fusion.", "fused_head.", "backbones.arterial.encoder")),
])
def test_cli_ablations_train_only_their_parts(dataset, tmp_path, flags, frozen, trained):
    from maml.network import MAMLNet

    out = tmp_path / "ablation"
    config_file = tmp_path / "tiny.json"
    config_file.write_text(tiny_model_config().to_json())
    assert cli_main(["train", "--dataset", str(dataset), "--out", str(out), "--config", str(config_file),
                     "--epochs", "1", "--iterations", "2", "--fold", "all", "--optimizer", "sgd",
                     "--seed", "3", "--device", "cpu", "--augmentation", "none", "--no-progress",
                     *flags]) == 0
    model = load_model(out / "checkpoint_final.pt")
    torch.manual_seed(3)
    fresh = MAMLNet(model.config).state_dict()
    weights = model.network.state_dict()
    assert all(torch.equal(weights[k], fresh[k]) for k in weights if k.startswith(frozen))
    for prefix in trained:
        assert any(not torch.equal(weights[k], fresh[k]) for k in weights
                   if k.startswith(prefix) and k.endswith("weight")), prefix
    row = read_log(out)[0]
    assert row["train_joint"] is not None and row["train_intra_venous"] is not None  # both logged


def test_mismatched_grids_are_rejected_naming_case_and_phase(tmp_path):
    root = write_tiny_dataset(tmp_path / "d", n_cases=5, misaligned_case=3)
    with pytest.raises(InputError, match=r"TINY_003.*'arterial'.*--register"):
        train(root, tmp_path / "run", tiny_model_config(), tiny_options(), progress=False)


def test_register_with_transform_files(tmp_path):
    """--register transforms resamples a misaligned phase with the data set's transform file."""
    root = write_tiny_dataset(tmp_path / "d", n_cases=2, misaligned_case=1)
    (root / "transforms").mkdir()
    shift = sitk.TranslationTransform(3, (0.0, 0.0, 7.5))  # venous point -> arterial point
    sitk.WriteTransform(shift, str(root / "transforms" / "TINY_001_arterial_to_venous.tfm"))
    raw = read_dataset(root)
    config = config_for_dataset(tiny_model_config(), raw)
    cache = PreprocessedCache(tmp_path / "pre", config, raw, register="transforms")
    cache.prepare_folder()
    cache.build(raw.cases, progress=False)
    case = cache.load("TINY_001")
    # The arterial grid starts 7.5 mm further in z; resampled through the transform its anatomy
    # lines up with the label map again.
    arterial = case.data[0]
    liver = case.seg == 1
    assert arterial[case.seg == 2].mean() > arterial[liver].mean() + 1.0  # tumor bright again


def test_cli_train_end_to_end(dataset, tmp_path):
    out = tmp_path / "cli"
    config_file = tmp_path / "tiny.json"
    config_file.write_text(tiny_model_config().to_json())
    code = cli_main(["train", "--dataset", str(dataset), "--out", str(out), "--config",
                     str(config_file), "--epochs", "1", "--iterations", "2", "--val-cases", "1",
                     "--device", "cpu", "--augmentation", "none", "--no-progress"])
    assert code == 0
    assert load_model(out / "checkpoint_best.pt").metadata["trained_epochs"] == 1
    code = cli_main(["train", "--dataset", str(dataset), "--out", str(out), "--config",
                     str(config_file), "--epochs", "2", "--resume", "--no-progress"])
    assert code == 0
    assert load_state(out / STATE_FILE)["epoch"] == 2
    assert load_state(out / STATE_FILE)["options"]["iterations_per_epoch"] == 2  # kept on resume
    assert cli_main(["train", "--dataset", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"),
                     "--config", "demo"]) == 1


def test_cli_fingerprint_sets_the_overlap_and_measures_at_least_half_a_patch(dataset, tmp_path):
    out = tmp_path / "run"
    config_file = tmp_path / "tiny.json"
    config_file.write_text(tiny_model_config().to_json())
    assert cli_main(["train", "--dataset", str(dataset), "--out", str(out), "--config", str(config_file),
                     "--epochs", "1", "--iterations", "1", "--val-cases", "1", "--device", "cpu",
                     "--augmentation", "none", "--no-progress"]) == 0
    windows = {}
    for overlap in (None, "0.25", "0.9"):
        written = tmp_path / f"fingerprinted_{overlap}.pt"
        assert cli_main(["fingerprint", "--model", str(out / "checkpoint_final.pt"), "--dataset",
                         str(dataset), "--write", str(written), "--device", "cpu",
                         *(["--overlap", overlap] if overlap else [])]) == 0
        model = load_model(written)
        assert model.config.inference.overlap == (float(overlap) if overlap else 0.5)
        windows[overlap] = model.metadata["fingerprint"]["features"]["arterial"]["windows"]
    assert windows["0.25"] == windows[None]  # measured with half a patch's overlap all the same
    assert windows["0.9"] > windows[None]  # denser: 3 x 3 x 3 windows per case instead of 2 x 2 x 2


def test_cli_train_with_trilinear_final_upsampling(dataset, tmp_path):
    """A new model trained with the stripe-free up-sampling keeps it in its checkpoint."""
    out = tmp_path / "trilinear"
    config_file = tmp_path / "tiny.json"
    config_file.write_text(tiny_model_config().to_json())
    code = cli_main(["train", "--dataset", str(dataset), "--out", str(out), "--config", str(config_file),
                     "--epochs", "1", "--iterations", "1", "--val-cases", "1", "--device", "cpu",
                     "--augmentation", "none", "--no-progress", "--final-upsampling", "trilinear"])
    assert code == 0
    model = load_model(out / "checkpoint_best.pt")
    assert model.config.network.final_upsampling == "trilinear"
    assert any(isinstance(m, torch.nn.Upsample) for m in model.network.modules())


# --------------------------------------------------------------------------------------------------
# Distributed (two CPU processes, gloo)
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, dataset: str, out: str, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = train(dataset, out, tiny_model_config(),
                   tiny_options(epochs=1, iterations_per_epoch=3, modality_dropout=0.5),
                   progress=False)
    torch.save(result.network.state_dict(), Path(result_dir) / f"rank{rank}.pt")


def test_ddp_two_gloo_processes_keep_identical_weights(dataset, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(dataset), str(tmp_path / "run"), str(tmp_path)),
             nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert state_dicts_equal(a, b)
    saved = load_model(tmp_path / "run" / "checkpoint_latest.pt")
    assert saved.metadata["world_size"] == 2
    assert state_dicts_equal(saved.network.state_dict(), a)
    torch.manual_seed(3)
    from maml.network import MAMLNet

    assert not state_dicts_equal(MAMLNet(saved.config).state_dict(), a)  # it did train


def test_cli_train_init_from_starts_both_backbones_from_a_one_phase_model(dataset, tmp_path):
    """--init-from arterial=M venous=M (one imported one-phase model for both phases): training
    starts from its backbone; without --config the network comes from it. A vanishing learning rate
    keeps the weights where they started, so the check sees the initialisation."""
    from maml.model import save_checkpoint
    from maml.network import MAMLNet

    config = tiny_config(phases=("venous",), base_features=4)
    torch.manual_seed(11)
    source = save_checkpoint(tmp_path / "venous.pt", MAMLNet(config), config)
    backbone = load_model(source).network.backbones["venous"].state_dict()
    out = tmp_path / "run"
    code = cli_main(["train", "--dataset", str(dataset), "--out", str(out), "--init-from",
                     f"arterial={source}", f"venous={source}", "--epochs", "1", "--iterations", "1",
                     "--lr", "1e-12", "--val-cases", "1", "--device", "cpu", "--augmentation", "none",
                     "--no-progress"])
    assert code == 0
    trained = load_model(out / "checkpoint_best.pt").network
    assert trained.phases == ["arterial", "venous"]
    for phase in trained.phases:
        for key, value in trained.backbones[phase].state_dict().items():
            if value.is_floating_point():
                torch.testing.assert_close(value, backbone[key], atol=1e-6, rtol=0)
    assert cli_main(["train", "--dataset", str(dataset), "--out", str(tmp_path / "x"),
                     "--init-from", f"portal={source}"]) == 1  # the data set has no such phase


def test_init_from_a_two_phase_model_takes_each_phase_its_own_backbone(tmp_path):
    from maml.model import save_checkpoint
    from maml.network import MAMLNet
    from maml.nnunet_import import backbone_source

    config = tiny_model_config()
    earlier = MAMLNet(config)
    save_checkpoint(tmp_path / "earlier.pt", earlier, config, {})
    for phase in ("arterial", "venous"):
        _, state = backbone_source(tmp_path / "earlier.pt", phase)
        assert state_dicts_equal(state, earlier.backbones[phase].state_dict())
    with pytest.raises(InputError, match="portal"):
        backbone_source(tmp_path / "earlier.pt", "portal")


def test_loader_workers_draw_new_patches_every_epoch(dataset, tmp_path):
    """With loader worker processes, epoch e's batches are epoch e's patches (not the first's)."""
    from maml.training.distributed import Distributed
    from maml.training.trainer import Trainer

    raw = read_dataset(dataset)
    config = config_for_dataset(tiny_model_config(), raw)
    trainer = Trainer(dataset, tmp_path / "run", config, tiny_options(num_workers=1, augmentation="none"),
                      None, Distributed(), torch.device("cpu"), show=False)
    trainer.config, trainer.train_cases = config, _preprocessed_cases(tmp_path, config, raw, 2)
    loader = trainer.build_loader()
    batches = []
    for epoch in range(2):
        trainer.patches.set_epoch(epoch)
        batches.append(torch.cat([image for image, _ in loader]))
    trainer.patches.set_epoch(1)
    expected = torch.stack([trainer.patches[i][0] for i in range(len(trainer.patches))])
    assert torch.equal(batches[1], expected) and not torch.equal(batches[0], batches[1])
