"""How to train: :class:`TrainingOptions`, the presets, the learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..errors import InputError
from .loading import AUGMENTATIONS


OPTIMIZERS = ("adam", "sgd")

# Options a user may change when resuming; everything else is taken from the saved state.
RESUMABLE_OVERRIDES = ("epochs", "device", "num_workers", "val_every", "amp", "threads")


@dataclass
class TrainingOptions:
    """How to train (the model itself is described by :class:`maml.config.ModelConfig`)."""

    epochs: int = 600
    iterations_per_epoch: int = 250
    batch_size: int = 2
    optimizer: str = "adam"  # "adam" (paper) or "sgd" (published code / nnU-Net)
    learning_rate: float | None = None  # default: 3e-4 (adam), 1e-2 (sgd)
    weight_decay: float = 3e-5
    momentum: float = 0.99  # sgd: Nesterov momentum
    poly_exponent: float = 0.9
    grad_clip: float = 12.0
    loss_variant: str = "paper"  # "paper" (lambda 0.5) or "code" (MutualLearningLoss.published_code)
    lambda_intra: float | None = None  # weight of the per-phase terms; 0: MS+MA (joint loss only)
    joint_weight: float | None = None  # weight of the fused term; 0: MS+Ensemble (independent nets)
    modality_dropout: float = 0.0  # probability that an iteration trains one random phase alone
    oversample_foreground: float = 1 / 3
    augmentation: str = "default"
    fold: str = "0"  # "0".."4" or "all"
    n_folds: int = 5
    val_cases: int | None = None
    val_every: int = 0  # full-volume validation every N epochs; 0: only at the end
    val_patches: int = 100  # fixed validation patches for the per-epoch pseudo-Dice (nnU-Net: 50 x 2)
    val_overlap: float = 0.5
    val_batch_size: int = 2
    seed: int = 12345
    device: str = "auto"
    amp: bool = True  # only where CUDA is used
    channels_last: bool = True  # only where CUDA is used
    num_workers: int = 0
    threads: int | None = None
    register: str | None = None
    normalization: str | None = None
    data_kind: str | None = None  # "synthetic" | "clinical"; default: the data set's dataset.json

    def lr(self) -> float:
        if self.learning_rate is not None:
            return float(self.learning_rate)
        return 3e-4 if self.optimizer == "adam" else 1e-2

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.augmentation not in AUGMENTATIONS:
            raise InputError(f"augmentation {self.augmentation!r} is not one of {AUGMENTATIONS}")
        if self.loss_variant not in ("paper", "code"):
            raise InputError(f"loss variant {self.loss_variant!r} is not 'paper' or 'code'")
        for name in ("epochs", "iterations_per_epoch", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name.replace('_', ' ')} must be at least 1")
        for name in ("val_every", "val_patches"):
            if int(getattr(self, name)) < 0:
                raise InputError(f"{name.replace('_', ' ')} must not be negative")
        for name in ("lambda_intra", "joint_weight"):
            value = getattr(self, name)
            if value is not None and not float(value) >= 0:
                raise InputError(f"{name.replace('_', ' ')} must be >= 0, got {value}")
        if self.lambda_intra == 0 and self.joint_weight == 0:
            raise InputError("--lambda-intra 0 and --joint-weight 0 together leave nothing to train")
        if self.lambda_intra == 0 and self.modality_dropout > 0:
            raise InputError("--lambda-intra 0 trains only the fused head, which a modality-dropout "
                             "iteration skips: use one or the other")
        if not 0.0 <= self.modality_dropout <= 1.0:
            raise InputError("modality dropout must be a probability in [0, 1]")
        if not 0.0 <= self.oversample_foreground <= 1.0:
            raise InputError("foreground oversampling must be a fraction in [0, 1]")

    @classmethod
    def from_dict(cls, data: dict) -> "TrainingOptions":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

# Per preset: the paper trains 600 epochs with Adam 3e-4; the published code is nnU-Net's
# 1000 x 250 iterations with SGD; the demo fits about an hour on two CPU cores.
PRESET_OPTIONS: dict[str, dict[str, Any]] = {
    "paper": {"epochs": 600, "iterations_per_epoch": 250, "batch_size": 2},
    "code": {"epochs": 1000, "iterations_per_epoch": 250, "batch_size": 2, "optimizer": "sgd",
             "loss_variant": "code"},
    "demo": {"epochs": 120, "iterations_per_epoch": 25, "batch_size": 2, "learning_rate": 1e-3,
             "val_patches": 12, "val_overlap": 0.25, "threads": 1, "num_workers": 1},
}


def default_options(preset: str | None, **overrides) -> TrainingOptions:
    values = dict(PRESET_OPTIONS.get(preset or "", {}))
    values.update({k: v for k, v in overrides.items() if v is not None})
    options = TrainingOptions.from_dict(values)
    options.validate()
    return options


def poly_lr(initial: float, epoch: int, total: int, exponent: float = 0.9) -> float:
    """nnU-Net's PolyLRScheduler: initial * (1 - epoch / total) ** exponent."""
    return initial * (1.0 - min(epoch, total) / total) ** exponent
