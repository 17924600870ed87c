"""Model configuration as data: what a checkpoint carries besides its weights.

Axis convention: every per-axis value here (spacing, patch size, kernel sizes, strides) is in numpy /
torch array order, (z, y, x), as nnU-Net stores it. SimpleITK uses (x, y, z); conversions happen in
``maml.preprocessing`` only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ModelError

# "ct": the image's own 0.5-99.5 percentiles and z-score; "ct_dataset": nnU-Net's CTNormalization
# (clip and z-score with the foreground statistics of the training set, ``intensity_properties``).
NORMALIZATION_SCHEMES = ("ct", "ct_dataset", "mr", "none")
INTENSITY_PROPERTY_KEYS = ("low", "high", "mean", "std")
MA_VARIANTS = ("paper", "paper-linear", "code")
# What sliding-window inference averages over mirrored copies, overlapping windows and ensemble
# members: class probabilities (MAML's own models) or logits, softmax once at the end (nnU-Net v2's
# predictor, kept for imported nnU-Net models so that their results equal nnU-Net's own).
BLEND_MODES = ("probabilities", "logits")
# How inputs reach the model grid: "maml" resamples first (linear), then normalises, on a grid of
# exactly the model's spacing from the input's first voxel; "nnunet" normalises first, then resamples
# with cubic B-splines onto a grid of the input's extent (nnU-Net v2's preprocessing).
RESAMPLING_MODES = ("maml", "nnunet")
# Sliding windows overlap by half a patch unless the model or the user says otherwise (nnU-Net's
# step size 0.5); each voxel is then predicted by up to 8 windows.
DEFAULT_OVERLAP = 0.5


def check_overlap(value: float, what: str, error=ModelError) -> float:
    """An overlap is a fraction of a patch in [0, 0.95]: beyond, the windows multiply for nothing."""
    if not 0.0 <= float(value) <= 0.95:
        raise error(f"{what} {value} is not a fraction of a patch between 0 and 0.95 (0.5: half a patch)")
    return float(value)


# Run options named here, where the command line reads them without loading the modules that do
# the work (maml.registration, maml.backends).
REGISTRATION_PRESETS = ("none", "rigid", "affine", "deformable")  # deformable = rigid then B-spline
DEFAULT_REGISTRATION = "deformable"
REGISTRATION_ENGINES = ("simpleitk", "elastix")
DEFAULT_REGISTRATION_ENGINE = "simpleitk"
BACKENDS = ("auto", "torch", "openvino")


@dataclass(frozen=True)
class Label:
    """One output class. ``value`` is the voxel value in label maps; 0 is background."""

    value: int
    name: str
    color: tuple[float, float, float] = (0.5, 0.5, 0.5)


FINAL_UPSAMPLING = ("transpose", "trilinear")


@dataclass
class NetworkConfig:
    """Topology of each phase's nnU-Net v2 PlainConvUNet and of the MA fusion.

    ``ma_variant``: "paper" (f_a = conv3x3x3 and conv1x1x1, each followed by instance norm and
    leaky ReLU, as the paper states, then the sigmoid; eq. 1-2), "paper-linear" (the 1x1x1
    convolution feeds the sigmoid directly: this project's models before version 2 of the MA
    module, kept so they load unchanged) or "code" (the published code: second conv 3x3x3, fused
    head without bias). The MA module works on
    ``base_features`` channels, the width of each backbone's last decoder stage (C).
    """

    base_features: int = 32
    max_features: int = 320
    kernel_sizes: list[list[int]] = field(default_factory=lambda: [[3, 3, 3]] * 6)
    strides: list[list[int]] = field(
        default_factory=lambda: [[1, 1, 1]] + [[2, 2, 2]] * 4 + [[1, 2, 2]]
    )
    n_conv_per_stage: list[int] | int = 2
    n_conv_per_stage_decoder: list[int] | int = 2
    conv_bias: bool = True  # nnU-Net v2 plans use biased convolutions
    deep_supervision: bool = True
    ma_variant: str = "paper"
    # The decoder's last up-sampling: "transpose" (nnU-Net's transposed convolution, kernel = stride)
    # or "trilinear" (trilinear up-sampling + a convolution: no period-stride pattern in the features
    # and so in the attention maps). New models only: a checkpoint keeps the layers it was trained with.
    final_upsampling: str = "transpose"

    @property
    def n_stages(self) -> int:
        return len(self.kernel_sizes)

    @property
    def features_per_stage(self) -> list[int]:
        return [min(self.base_features * 2**s, self.max_features) for s in range(self.n_stages)]

    def convs_per_stage(self) -> list[int]:
        return _per_stage(self.n_conv_per_stage, self.n_stages, "n_conv_per_stage")

    def convs_per_decoder_stage(self) -> list[int]:
        return _per_stage(self.n_conv_per_stage_decoder, self.n_stages - 1, "n_conv_per_stage_decoder")

    def total_downsampling(self) -> list[int]:
        """Product of strides per axis: patch sizes must be divisible by this."""
        total = [1, 1, 1]
        for stride in self.strides:
            total = [t * s for t, s in zip(total, stride)]
        return total

    def validate(self) -> None:
        if len(self.strides) != self.n_stages:
            raise ModelError(
                f"network config: {len(self.strides)} strides for {self.n_stages} stages"
            )
        for name, values in (("kernel_sizes", self.kernel_sizes), ("strides", self.strides)):
            if any(len(v) != 3 for v in values):
                raise ModelError(f"network config: every entry of {name} needs 3 values (z, y, x)")
        if self.ma_variant not in MA_VARIANTS:
            raise ModelError(
                f"network config: ma_variant {self.ma_variant!r} is not one of {MA_VARIANTS}"
            )
        if self.base_features < 1:
            raise ModelError("network config: base_features must be positive")
        if self.final_upsampling not in FINAL_UPSAMPLING:
            raise ModelError(f"network config: final_upsampling {self.final_upsampling!r} is not one of "
                             f"{FINAL_UPSAMPLING}")
        self.convs_per_stage()
        self.convs_per_decoder_stage()


def _per_stage(value: list[int] | int, count: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * count
    if len(value) != count:
        raise ModelError(f"network config: {name} needs {count} entries, got {len(value)}")
    return list(value)


@dataclass
class PostprocessingConfig:
    """What is done to a label map after inference (see :mod:`maml.postprocessing`).

    Chosen on validation cases (``maml tune-postprocessing``), never on test cases, as nnU-Net
    determines its post-processing. The default does nothing.

    ``largest_component``: keep only the largest connected foreground component (all non-zero labels
    together: the organ with its lesions) and clear the rest.
    ``min_volume_ml``: label name -> connected components of that label smaller than this volume
    take the label that surrounds them most (a speck of tumor inside the liver becomes liver).
    """

    largest_component: bool = False
    min_volume_ml: dict[str, float] = field(default_factory=dict)

    @property
    def is_identity(self) -> bool:
        return not self.largest_component and not any(v > 0 for v in self.min_volume_ml.values())


@dataclass
class InferenceConfig:
    """How inference combines predictions (see ``BLEND_MODES``), which axes test-time mirroring
    flips (array axes 0, 1, 2 = z, y, x; nnU-Net records the axes its training augmentation used)
    and how inputs are resampled (see ``RESAMPLING_MODES``)."""

    blend: str = "probabilities"
    mirror_axes: list[int] = field(default_factory=lambda: [0, 1, 2])
    resampling: str = "maml"
    # Sliding windows overlap by this fraction of a patch (its domain check's fingerprint is
    # measured with at least DEFAULT_OVERLAP: maml.training.fingerprint.fingerprint_overlap).
    overlap: float = DEFAULT_OVERLAP

    @property
    def is_default(self) -> bool:
        return self == InferenceConfig()

    @property
    def is_maml(self) -> bool:
        """MAML's own way of predicting (an imported nnU-Net model blends logits as nnU-Net does);
        the overlap is a choice within either."""
        return replace(self, overlap=DEFAULT_OVERLAP) == InferenceConfig()

    def validate(self, name: str) -> None:
        if self.blend not in BLEND_MODES:
            raise ModelError(f"model {name!r}: inference blend {self.blend!r} is not one of {BLEND_MODES}")
        if self.resampling not in RESAMPLING_MODES:
            raise ModelError(f"model {name!r}: resampling {self.resampling!r} is not one of "
                             f"{RESAMPLING_MODES}")
        check_overlap(self.overlap, f"model {name!r}: inference overlap", ModelError)
        if any(a not in (0, 1, 2) for a in self.mirror_axes) or \
                len(set(self.mirror_axes)) != len(self.mirror_axes):
            raise ModelError(f"model {name!r}: mirror axes must be distinct values of 0, 1, 2 "
                             f"(z, y, x), got {self.mirror_axes}")


@dataclass
class ModelConfig:
    """Everything needed to preprocess inputs, build the network and name its outputs."""

    name: str
    phases: list[str]
    labels: list[Label]
    spacing: list[float]  # (z, y, x) mm, the spacing the network works at
    patch_size: list[int]  # (z, y, x) voxels
    normalization: dict[str, str]  # phase -> one of NORMALIZATION_SCHEMES
    network: NetworkConfig = field(default_factory=NetworkConfig)
    # phase -> {"low", "high", "mean", "std"} in the image's units (HU): the training set's
    # foreground statistics that "ct_dataset" normalises with; set by training.
    intensity_properties: dict[str, dict[str, float]] = field(default_factory=dict)
    postprocessing: PostprocessingConfig = field(default_factory=PostprocessingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    intended_use: str = "Research use only. Not for clinical use."

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def label_by_name(self, name: str) -> Label:
        for label in self.labels:
            if label.name == name:
                return label
        raise ModelError(f"model {self.name!r} has no label named {name!r}")

    def validate(self) -> None:
        if not self.phases:
            raise ModelError(f"model {self.name!r}: no phases in configuration")
        if len(set(self.phases)) != len(self.phases):
            raise ModelError(f"model {self.name!r}: phase names repeat: {self.phases}")
        values = sorted(label.value for label in self.labels)
        if values != list(range(len(self.labels))) or len(values) < 2:
            raise ModelError(
                f"model {self.name!r}: label values must be 0..N-1 with N >= 2, got {values}"
            )
        if set(self.normalization) != set(self.phases):
            raise ModelError(
                f"model {self.name!r}: normalization given for {sorted(self.normalization)}, "
                f"phases are {self.phases}"
            )
        for phase, scheme in self.normalization.items():
            if scheme not in NORMALIZATION_SCHEMES:
                raise ModelError(
                    f"model {self.name!r}: normalization {scheme!r} of phase {phase!r} "
                    f"is not one of {NORMALIZATION_SCHEMES}"
                )
        self._validate_intensity_properties()
        self.inference.validate(self.name)
        names = {label.name for label in self.labels if label.value != 0}
        for name, volume in self.postprocessing.min_volume_ml.items():
            if name not in names:
                raise ModelError(f"model {self.name!r}: post-processing names label {name!r}; the "
                                 f"foreground labels are {sorted(names)}")
            if not float(volume) >= 0:
                raise ModelError(f"model {self.name!r}: minimum volume of {name!r} must be >= 0 ml")
        if len(self.spacing) != 3 or any(s <= 0 for s in self.spacing):
            raise ModelError(f"model {self.name!r}: spacing must be 3 positive values (z, y, x)")
        self.network.validate()
        divisor = self.network.total_downsampling()
        if len(self.patch_size) != 3 or any(p % d for p, d in zip(self.patch_size, divisor)):
            raise ModelError(
                f"model {self.name!r}: patch size {self.patch_size} must have 3 values divisible "
                f"by the network's total downsampling {divisor}"
            )

    def _validate_intensity_properties(self) -> None:
        for phase, props in self.intensity_properties.items():
            if phase not in self.phases:
                raise ModelError(f"model {self.name!r}: intensity properties given for unknown phase "
                                 f"{phase!r}; phases are {self.phases}")
            try:
                values = {key: float(props[key]) for key in INTENSITY_PROPERTY_KEYS}
            except (KeyError, TypeError, ValueError):
                raise ModelError(f"model {self.name!r}: intensity properties of phase {phase!r} need "
                                 f"numbers {list(INTENSITY_PROPERTY_KEYS)}, got {props!r}") from None
            if not values["low"] <= values["high"] or not values["std"] > 0:
                raise ModelError(f"model {self.name!r}: intensity properties of phase {phase!r} are "
                                 f"inconsistent (need low <= high and std > 0): {values}")

    def missing_intensity_properties(self) -> list[str]:
        """Phases normalised with "ct_dataset" whose statistics are not known yet."""
        return [phase for phase in self.phases if self.normalization.get(phase) == "ct_dataset"
                and phase not in self.intensity_properties]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = [asdict(label) for label in self.labels]
        if self.inference.is_default:
            # Written only when it says something: configurations stay readable by older versions.
            del data["inference"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        try:
            known = {f.name for f in fields(cls)}
            unknown = set(data) - known
            if unknown:
                raise ModelError(f"model configuration has unknown keys {sorted(unknown)}")
            kwargs = dict(data)
            kwargs["labels"] = [
                Label(int(item["value"]), str(item["name"]), tuple(item.get("color", (0.5, 0.5, 0.5))))
                for item in data["labels"]
            ]
            kwargs["network"] = NetworkConfig(**data.get("network", {}))
            kwargs["postprocessing"] = PostprocessingConfig(**data.get("postprocessing", {}))
            kwargs["inference"] = InferenceConfig(**data.get("inference", {}))
            config = cls(**kwargs)
        except ModelError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise ModelError(f"model configuration is malformed: {error}") from error
        config.validate()
        return config

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ModelError(f"cannot read model configuration {path}: {error}") from error
        return cls.from_dict(data)


LIVER_LABELS = [
    Label(0, "background", (0.0, 0.0, 0.0)),
    # Colours of Slicer's standard terminology for liver and liver tumor.
    Label(1, "liver", (0.86, 0.57, 0.40)),
    Label(2, "tumor", (0.87, 0.30, 0.26)),
]


def paper_config() -> ModelConfig:
    """The paper's setting: C=32, 128^3 patches, full nnU-Net depth (for a GPU)."""
    return ModelConfig(
        name="maml-liver-paper",
        phases=["arterial", "venous"],
        labels=list(LIVER_LABELS),
        spacing=[1.5, 0.8, 0.8],
        patch_size=[128, 128, 128],
        normalization={"arterial": "ct_dataset", "venous": "ct_dataset"},
        network=NetworkConfig(
            base_features=32,
            kernel_sizes=[[3, 3, 3]] * 6,
            strides=[[1, 1, 1]] + [[2, 2, 2]] * 4 + [[1, 2, 2]],
        ),
    )


def demo_config() -> ModelConfig:
    """Small enough to train on two CPU cores: base 8 features, 4 stages, coarse spacing."""
    return ModelConfig(
        name="maml-liver-demo",
        phases=["arterial", "venous"],
        labels=list(LIVER_LABELS),
        spacing=[3.0, 2.5, 2.5],
        patch_size=[32, 64, 64],
        normalization={"arterial": "ct_dataset", "venous": "ct_dataset"},
        network=NetworkConfig(
            base_features=8,
            kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
            strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
        ),
    )


def published_code_config() -> ModelConfig:
    """The published code's variant: 16 base features and its MA module (see maml-reference)."""
    config = paper_config()
    config.name = "maml-liver-code"
    config.network.base_features = 16
    config.network.ma_variant = "code"
    return config


PRESETS = {"paper": paper_config, "demo": demo_config, "code": published_code_config}
