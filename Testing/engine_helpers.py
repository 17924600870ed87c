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
