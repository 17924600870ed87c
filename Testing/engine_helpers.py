"""Small configurations shared by the engine tests (fast on two CPU cores)."""

from __future__ import annotations

from maml.config import Label, ModelConfig, NetworkConfig


def tiny_config(phases=("arterial", "venous"), base_features=4, num_classes=3,
                ma_variant="paper", deep_supervision=True) -> ModelConfig:
    labels = [Label(0, "background")] + [Label(i, f"class{i}") for i in range(1, num_classes)]
    return ModelConfig(
        name="tiny",
        phases=list(phases),
        labels=labels,
        spacing=[2.0, 1.5, 1.5],
        patch_size=[8, 16, 16],
        normalization={p: "ct" for p in phases},
        network=NetworkConfig(
            base_features=base_features,
            kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]],
            strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]],
            deep_supervision=deep_supervision,
            ma_variant=ma_variant,
        ),
    )


def save_tiny_liver_model(path, patch_size=None, note="untrained, for pipeline tests"):
    """An untrained tiny model with the liver labels at 6 mm: fast end-to-end runs."""
    import torch

    from maml.config import LIVER_LABELS
    from maml.model import save_checkpoint
    from maml.network import MAMLNet

    config = tiny_config(base_features=4)
    config.labels = list(LIVER_LABELS)
    config.spacing = [6.0, 6.0, 6.0]
    if patch_size is not None:
        config.patch_size = list(patch_size)
    torch.manual_seed(0)
    return save_checkpoint(path, MAMLNet(config), config, {"note": note})


def write_tiny_case(folder, suffix=".nii.gz", prefix=""):
    """The tiny phantom's phases as files, plus another patient's arterial phase ("other_arterial")."""
    import SimpleITK as sitk

    from maml.synthetic import make_case

    case = make_case(3, "tiny")
    paths = {phase: folder / f"{prefix}{phase}{suffix}" for phase in case.images}
    for phase, image in case.images.items():
        sitk.WriteImage(image, str(paths[phase]))
    paths["other_arterial"] = folder / f"other_arterial{suffix}"
    sitk.WriteImage(make_case(40, "tiny").images["arterial"], str(paths["other_arterial"]))
    return paths
