"""Self-configuring plans: a data set fingerprint and nnU-Net v2's 3d_fullres planning rules.

``maml plan`` and ``maml train --config auto`` use this module. It measures a raw data set
(:func:`dataset_fingerprint`) and derives a configuration with the rules of nnU-Net v2's
``ExperimentPlanner`` (2.x, ``default_experiment_planner.py`` and ``network_topology.py``),
re-derived here:

- target spacing: the median spacing per axis; when the coarsest axis is more than 3x coarser than
  the others and has fewer than a third of their voxels, its 10th percentile instead
  (:func:`target_spacing`);
- median shape: the median over cases of the shape after cropping to the non-zero region,
  resampled to the target spacing;
- initial patch: the aspect ratio of 1 / spacing scaled to 256^3 voxels, clipped to the median shape;
- topology (:func:`pool_and_conv_props`): pool an axis while its feature map stays >= 8 voxels and
  its spacing is within 2x of the finest; a 3-kernel along an axis once its spacing is within 2x of
  the finest (1x3x3 with [1,2,2] strides on anisotropic data); the patch is padded to a multiple of
  the total down-sampling; features 32 doubling up to 320; two convolutions per stage;
- budget: shrink the patch along the axis that is largest relative to the median shape until the
  memory estimate fits, then the batch size from what is left (>= 2, at most 5 % of the data set's
  voxels per batch).

Axes are (z, y, x) throughout. nnU-Net also transposes the coarsest axis first; per-axis rules do
not depend on axis order, so the plan is the same up to that transposition.

Memory model (:func:`estimate_elements`). nnU-Net counts the elements of every convolution output of
one PlainConvUNet (encoder, transposed convolutions, segmentation output) and compares the count
with a reference: 560e6 elements fit an 8 GB GPU at batch size 2 (its ``UNet_reference_val_3d``).
MAML runs one such U-Net per phase plus the modality-aware (MA) module at the last decoder level, so
the count is P times a U-Net's plus the MA's, in the same unit. What the MA keeps for the
backward pass, counted layer by layer, is (6P + 1) C V elements for C channels and V voxels (the
concatenated input of the dual convolution, P C; per phase the concatenation 2C, the 3x3x3 output
C, the normalised output C and the attention map C; the fused feature map C). A PlainConvUNet
keeps about 2.5 elements per element nnU-Net counts (measured with
``torch.autograd.graph.saved_tensors_hooks`` on the CPU: 2.3-2.7), so the MA adds
(6P + 1) C V / 2.5 counted elements plus the fused head's output K V: a two-phase network with
C = 32 needs about 2.8 times a single U-Net's memory (measured 2.70-2.85).
``Testing/test_planning.py`` measures this ratio again. The loss is not counted (nnU-Net does not
count its own either).

The CPU budget (``--cpu``) is a rule, not a memory estimate: 16 base features and a patch of at most
2^18 / P voxels (32 x 64 x 64 for two phases), batch size 2: about 3 times the work per iteration
of the ``demo`` preset (8 base features, the same patch).

The intensity statistics in the fingerprint are for reading; ``ct_dataset`` normalisation takes its
statistics from the training fold when training starts (nnU-Net takes them from every case, the
validation fold included).
"""

from __future__ import annotations

import math
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..config import ModelConfig, NetworkConfig
from ..errors import InputError, ModelError

PLANNER_VERSION = 1
PLANS_FORMAT = "maml-plans"
PLANS_FILE = "plans.json"  # what maml train --config auto keeps in the run folder

ANISOTROPY_THRESHOLD = 3.0  # nnU-Net's ANISO_THRESHOLD
INITIAL_PATCH_VOXELS = 256 ** 3
MIN_FEATURE_MAP_EDGE = 4  # the bottleneck keeps >= 4 voxels per axis (pooling needs >= 8)
BASE_FEATURES = 32
MAX_FEATURES = 320
CONVS_PER_STAGE = 2
MIN_STAGES = 3  # shrinking the patch for a budget stops (an error) before the U-Net gets shallower
REFERENCE_ELEMENTS = 560_000_000  # counted elements that fit nnU-Net's reference GPU ...
REFERENCE_GB = 8.0  # ... of this size ...
REFERENCE_BATCH = 2  # ... at this batch size
MIN_BATCH = 2
MAX_DATASET_FRACTION = 0.05  # one batch sees at most 5 % of the data set's voxels
# nnU-Net's 8 GB target trains in about 10 GB (its documentation asks for a 10 GB GPU), so a
# visible GPU's memory is scaled by 0.8 to get the target.
GPU_MEMORY_FRACTION = 0.8
SAVED_PER_COUNTED = 2.5  # elements a PlainConvUNet keeps for backward per element nnU-Net counts
CPU_BASE_FEATURES = 16
CPU_VOXEL_BUDGET = 2 ** 18  # patch voxels summed over the phases


# --------------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------------


def nonzero_bounding_box(arrays: Sequence[np.ndarray]) -> tuple[slice, ...]:
    """The box nnU-Net crops a case to: voxels non-zero in any channel, holes filled."""
    from scipy.ndimage import binary_fill_holes

    mask = np.zeros(arrays[0].shape, bool)
    for array in arrays:
        mask |= array != 0
    mask = binary_fill_holes(mask)
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    where = np.argwhere(mask)
    low, high = where.min(0), where.max(0) + 1
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def _foreground_statistics(values: np.ndarray) -> dict[str, float]:
    from ..preprocessing import intensity_properties

    stats = intensity_properties(values)  # low/high: the 0.5 and 99.5 percentiles
    stats.update(median=float(np.median(values)), min=float(values.min()), max=float(values.max()),
                 samples=int(values.size))
    return stats


def _case_images(dataset, config: ModelConfig, case: str, register: str | None):
    """{phase: image or None} and the label image. Without ``register`` a phase off the label's grid
    is None: planning needs the geometry (the label's grid) and can go without its intensities."""
    from ..preprocessing import check_same_grid
    from .dataset import load_case_images, read_case_image

    if register is not None:
        return load_case_images(dataset, config, case, register)

    label = read_case_image(dataset.label_file(case), case, "label map")
    images = {}
    for phase, path in zip(config.phases, dataset.image_files(case)):
        image = read_case_image(path, case, f"phase {phase!r}")
        try:
            check_same_grid({"label": label, phase: image})
            images[phase] = image
        except InputError:
            images[phase] = None
    if not any(image is not None for image in images.values()):
        raise InputError(f"case {case!r}: no phase is on the label map's grid; the label map must "
                         "share the grid of a phase")
    return images, label


def measure_case(dataset, config: ModelConfig, case: str, register: str | None = None
                 ) -> dict[str, Any]:
    """Spacing and shape (z, y, x) of the label grid, the shape after cropping to the non-zero
    region of the phases on that grid, and foreground (label > 0) voxel samples per phase."""
    import SimpleITK as sitk

    from .dataset import MAX_FOREGROUND_SAMPLES, case_seed

    images, label = _case_images(dataset, config, case, register)
    labels = sitk.GetArrayViewFromImage(label)
    arrays = {phase: sitk.GetArrayViewFromImage(image) for phase, image in images.items()
              if image is not None}
    box = nonzero_bounding_box(list(arrays.values()))
    foreground = labels > 0
    rng = np.random.default_rng(case_seed(case))  # the draws of dataset_intensity_properties
    samples = {}
    for phase in config.phases:
        if phase not in arrays:
            samples[phase] = None
            continue
        values = arrays[phase][foreground]
        if values.size > MAX_FOREGROUND_SAMPLES:
            values = rng.choice(values, MAX_FOREGROUND_SAMPLES, replace=False)
        samples[phase] = np.asarray(values, dtype=np.float64)
    return {
        "case": case,
        "spacing": [float(s) for s in label.GetSpacing()[::-1]],
        "shape": [int(n) for n in labels.shape],
        "shape_after_crop": [s.stop - s.start for s in box],
        "samples": samples,
    }


def dataset_fingerprint(dataset, config: ModelConfig, register: str | None = None,
                        progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """The fingerprint of a read data set (:func:`maml.training.dataset.read_dataset`) whose phases
    ``config`` names (:func:`maml.training.dataset.config_for_dataset`)."""
    measured = []
    for index, case in enumerate(dataset.cases):
        if progress is not None:
            progress(case, index, len(dataset.cases))
        measured.append(measure_case(dataset, config, case, register))
    if progress is not None:
        progress("", len(dataset.cases), len(dataset.cases))
    intensity, notes = {}, {}
    for phase in config.phases:
        pooled = [m["samples"][phase] for m in measured if m["samples"][phase] is not None]
        missing = [m["case"] for m in measured if m["samples"][phase] is None]
        values = np.concatenate(pooled) if pooled else np.zeros(0)
        if missing:
            notes[phase] = (f"not on the label map's grid in {len(missing)} case(s) (e.g. "
                            f"{missing[0]!r}); pass --register to include them")
        if values.size:
            intensity[phase] = _foreground_statistics(values)
        else:
            intensity[phase] = None
            notes.setdefault(phase, "no foreground voxels")
    relative = [float(np.prod(m["shape_after_crop"]) / np.prod(m["shape"])) for m in measured]
    return {
        "dataset": dataset.name,
        "root": str(dataset.root.resolve()),
        "cases": [m["case"] for m in measured],
        "phases": list(config.phases),
        "labels": dict(dataset.labels),
        "register": register,
        "spacings": [m["spacing"] for m in measured],
        "shapes": [m["shape"] for m in measured],
        "shapes_after_crop": [m["shape_after_crop"] for m in measured],
        "median_relative_size_after_cropping": float(np.median(relative)),
        "foreground_intensity": intensity,
        "intensity_notes": notes,
    }


# --------------------------------------------------------------------------------------------------
# nnU-Net's rules
# --------------------------------------------------------------------------------------------------


def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]) -> list[float]:
    """Median spacing; on anisotropic data the coarse axis takes its 10th percentile instead (never
    finer than the other axes), so thick-slice cases are not interpolated from the thin ones'
    median. Anisotropic: that axis is > 3x coarser than the others and has < 1/3 of their voxels."""
    spacings = np.asarray(spacings, dtype=np.float64)
    target = np.percentile(spacings, 50, axis=0)
    median_shape = np.percentile(np.asarray(shapes, dtype=np.float64), 50, axis=0)
    coarse = int(np.argmax(target))
    others = [a for a in range(3) if a != coarse]
    finest_other = max(target[a] for a in others)
    anisotropic_spacing = target[coarse] > ANISOTROPY_THRESHOLD * finest_other
    anisotropic_voxels = median_shape[coarse] * ANISOTROPY_THRESHOLD < min(median_shape[a] for a in others)
    if anisotropic_spacing and anisotropic_voxels:
        low = float(np.percentile(spacings[:, coarse], 10))
        if low < finest_other:
            low = max(finest_other, low) + 1e-5
        target[coarse] = low
    return [float(s) for s in target]


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> list[int]:
    return [int(round(s / t * n)) for n, s, t in zip(shape, spacing, target)]


@dataclass
class Topology:
    pools_per_axis: list[int]
    strides: list[list[int]]  # per stage, the first [1, 1, 1]
    kernel_sizes: list[list[int]]  # per stage
    patch_size: list[int]  # padded to a multiple of divisor
    divisor: list[int]  # total down-sampling per axis


def _pad_to_multiple(shape: Sequence[float], divisor: Sequence[int]) -> list[int]:
    padded = []
    for size, d in zip(shape, divisor):
        padded.append(int(size if size % d == 0 else size + d - size % d))
    return padded


def pool_and_conv_props(spacing: Sequence[float], patch_size: Sequence[float],
                        min_edge: int = MIN_FEATURE_MAP_EDGE) -> Topology:
    """Strides and kernels of each stage (nnU-Net's ``get_pool_and_conv_props``).

    Each step pools (stride 2) every axis whose feature map is still >= 2 * ``min_edge`` and whose
    current spacing is within 2x of the finest pooled axis; a single remaining axis is pooled only
    while >= 3 * ``min_edge``. An axis gets a 3-kernel once its spacing is within 2x of the finest
    (before: 1). The bottleneck has 3x3x3 kernels.
    """
    spacing = [float(s) for s in spacing]
    size = [float(s) for s in patch_size]
    pools = [0, 0, 0]
    kernel = [1, 1, 1]
    strides, kernels = [[1, 1, 1]], []
    while True:
        axes = [a for a in range(3) if size[a] >= 2 * min_edge]
        if not axes:
            break
        finest = min(spacing[a] for a in axes)
        axes = [a for a in axes if spacing[a] / finest < 2]
        if len(axes) == 1 and size[axes[0]] < 3 * min_edge:
            break
        if not axes:
            break
        for a in range(3):
            if kernel[a] != 3 and spacing[a] / min(spacing) < 2:
                kernel[a] = 3
        stride = [1, 1, 1]
        for a in axes:
            stride[a] = 2
            pools[a] += 1
            spacing[a] *= 2
            size[a] = math.ceil(size[a] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3, 3, 3])
    divisor = [2 ** p for p in pools]
    return Topology(pools, strides, kernels, _pad_to_multiple(patch_size, divisor), divisor)


def features_per_stage(n_stages: int, base: int, maximum: int = MAX_FEATURES) -> list[int]:
    return [min(base * 2 ** s, maximum) for s in range(n_stages)]


def unet_elements(patch_size: Sequence[int], topology: Topology, features: Sequence[int],
                  num_classes: int) -> int:
    """nnU-Net's count for one PlainConvUNet (``compute_conv_feature_map_size``): every encoder
    convolution's output, per decoder stage its convolutions' and transposed convolution's outputs,
    and the full-resolution segmentation output (deep-supervision outputs are not counted)."""
    size = list(patch_size)
    sizes, total = [], 0
    for stride, channels in zip(topology.strides, features):
        size = [s // t for s, t in zip(size, stride)]
        sizes.append(size)
        total += CONVS_PER_STAGE * channels * math.prod(size)
    for level in range(len(sizes) - 2, -1, -1):
        total += (CONVS_PER_STAGE + 1) * features[level] * math.prod(sizes[level])
    total += num_classes * math.prod(sizes[0])
    return int(total)


def ma_elements(patch_size: Sequence[int], channels: int, n_phases: int, num_classes: int) -> int:
    """The MA module and fused head in nnU-Net's unit (see the module docstring)."""
    if n_phases < 2:
        return 0  # a one-phase model segments with its own head
    voxels = math.prod(patch_size)
    return int(round((6 * n_phases + 1) * channels * voxels / SAVED_PER_COUNTED + num_classes * voxels))


def estimate_elements(patch_size: Sequence[int], topology: Topology, features: Sequence[int],
                      n_phases: int, num_classes: int) -> int:
    """Counted elements of one sample through a MAML network: P U-Nets and the MA module."""
    return (n_phases * unet_elements(patch_size, topology, features, num_classes)
            + ma_elements(patch_size, features[0], n_phases, num_classes))


@dataclass
class Budget:
    """What the plan must fit: a GPU memory target (GB) or the CPU rule."""

    kind: str  # "gpu" | "cpu"
    gpu_memory_gb: float | None = None
    source: str = ""

    @property
    def base_features(self) -> int:
        return CPU_BASE_FEATURES if self.kind == "cpu" else BASE_FEATURES

    @property
    def reference_elements(self) -> float | None:
        if self.kind == "cpu":
            return None
        return REFERENCE_ELEMENTS * self.gpu_memory_gb / REFERENCE_GB

    def fits(self, estimate: int, patch_size: Sequence[int], n_phases: int) -> bool:
        if self.kind == "cpu":
            return math.prod(patch_size) * n_phases <= CPU_VOXEL_BUDGET
        # the estimate is per sample; the reference holds REFERENCE_BATCH samples
        return estimate * MIN_BATCH / REFERENCE_BATCH <= self.reference_elements

    def batch_size(self, estimate: int) -> int:
        if self.kind == "cpu":
            return MIN_BATCH
        return int(round(self.reference_elements / estimate * REFERENCE_BATCH))

    def describe(self) -> str:
        if self.kind == "cpu":
            return f"the CPU rule ({CPU_VOXEL_BUDGET} patch voxels over all phases)"
        return f"{self.gpu_memory_gb:g} GB of GPU memory"

    def way_out(self) -> str:
        return "plan for a GPU (--gpu-memory GB)" if self.kind == "cpu" else "give more --gpu-memory"

    def to_dict(self) -> dict[str, Any]:
        data = {"kind": self.kind, "source": self.source}
        if self.kind == "gpu":
            data.update(gpu_memory_gb=self.gpu_memory_gb, reference_elements=self.reference_elements,
                        reference=f"{REFERENCE_ELEMENTS:.3g} elements at batch {REFERENCE_BATCH} "
                                  f"per {REFERENCE_GB:g} GB (nnU-Net v2)")
        else:
            data.update(base_features=CPU_BASE_FEATURES, voxel_budget=CPU_VOXEL_BUDGET,
                        rule=f"patch voxels x phases <= {CPU_VOXEL_BUDGET}, batch {MIN_BATCH}, "
                             f"{CPU_BASE_FEATURES} base features")
        return data


def gpu_budget(gpu_memory_gb: float | None = None) -> Budget:
    """``gpu_memory_gb`` if given; else the visible CUDA device's memory times 0.8; else 8 GB."""
    if gpu_memory_gb is not None:
        if not gpu_memory_gb > 0:
            raise InputError(f"--gpu-memory {gpu_memory_gb}: give the GPU memory in GB, > 0")
        return Budget("gpu", float(gpu_memory_gb), "given")
    try:
        import torch

        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory / 1024 ** 3
            return Budget("gpu", round(total * GPU_MEMORY_FRACTION, 1),
                          f"{GPU_MEMORY_FRACTION:g} x {total:.1f} GB of {torch.cuda.get_device_name(0)}")
    except ImportError:
        pass
    return Budget("gpu", REFERENCE_GB, "nnU-Net's reference (no CUDA device visible)")


def cpu_budget() -> Budget:
    return Budget("cpu", None, "--cpu")


def plan_configuration(spacings: Sequence[Sequence[float]], shapes_after_crop: Sequence[Sequence[int]],
                       n_phases: int, num_classes: int, budget: Budget) -> dict[str, Any]:
    """nnU-Net's 3d_fullres configuration for P phases under ``budget`` (see the module docstring)."""
    if len(spacings) != len(shapes_after_crop) or not spacings:
        raise InputError("planning needs the spacing and shape of at least one case")
    spacing = target_spacing(spacings, shapes_after_crop)
    shapes = [resampled_shape(shape, s, spacing) for shape, s in zip(shapes_after_crop, spacings)]
    median_shape = [float(v) for v in np.median(np.asarray(shapes, dtype=np.float64), axis=0)]
    dataset_voxels = float(math.prod(median_shape)) * len(shapes)

    inverse = 1.0 / np.asarray(spacing)
    scale = (INITIAL_PATCH_VOXELS / float(np.prod(inverse))) ** (1 / 3)
    initial = [min(float(round(v * scale)), m) for v, m in zip(inverse, median_shape)]
    topology = pool_and_conv_props(spacing, initial)
    initial_stages = len(topology.strides)
    if initial_stages < 2:
        raise InputError(f"the median image ({' x '.join(f'{v:g}' for v in median_shape)} voxels at "
                         f"the target spacing) is too small to pool once: no U-Net can be planned")
    patch = topology.patch_size
    features = features_per_stage(len(topology.strides), budget.base_features)
    estimate = estimate_elements(patch, topology, features, n_phases, num_classes)
    shrunk = 0
    while not budget.fits(estimate, patch, n_phases):
        # the axis that is largest relative to the median shape (the last of equals, as nnU-Net)
        ratios = [p / m for p, m in zip(patch, median_shape)]
        axis = max(range(3), key=lambda a: (ratios[a], a))
        # step by the divisor of the smaller patch: stepping by the current one could skip sizes
        trial = list(patch)
        trial[axis] -= topology.divisor[axis]
        step = pool_and_conv_props(spacing, trial).divisor[axis]
        patch = list(patch)
        patch[axis] -= step
        if patch[axis] < 1:
            raise InputError(f"no patch fits {budget.describe()} for {n_phases} phase(s); "
                             f"{budget.way_out()}")
        topology = pool_and_conv_props(spacing, patch)
        if len(topology.strides) < min(MIN_STAGES, initial_stages):
            raise InputError(f"no U-Net of {MIN_STAGES} stages fits {budget.describe()} for "
                             f"{n_phases} phase(s); {budget.way_out()}")
        patch = topology.patch_size
        features = features_per_stage(len(topology.strides), budget.base_features)
        estimate = estimate_elements(patch, topology, features, n_phases, num_classes)
        shrunk += 1
    batch = budget.batch_size(estimate)
    five_percent = int(round(dataset_voxels * MAX_DATASET_FRACTION / math.prod(patch)))
    batch = max(min(batch, five_percent), MIN_BATCH)
    coarse = int(np.argmax(spacing))
    return {
        "spacing": spacing,
        "median_shape": median_shape,
        "median_spacing": [float(v) for v in np.median(np.asarray(spacings, float), axis=0)],
        "anisotropic_axis": coarse if spacing[coarse] > ANISOTROPY_THRESHOLD * min(spacing) else None,
        "initial_patch_size": [int(v) for v in initial],
        "patch_size": [int(v) for v in patch],
        "batch_size": int(batch),
        "strides": topology.strides,
        "kernel_sizes": topology.kernel_sizes,
        "pools_per_axis": topology.pools_per_axis,
        "features_per_stage": features,
        "n_phases": n_phases,
        "estimated_elements_per_sample": int(estimate),
        "unet_elements_per_sample": unet_elements(patch, topology, features, num_classes),
        "budget_elements": budget.reference_elements,
        "patch_reductions": shrunk,
        "batch_share_of_dataset": float(batch * math.prod(patch) / dataset_voxels),
    }


# --------------------------------------------------------------------------------------------------
# Plans files
# --------------------------------------------------------------------------------------------------


def model_config_from_plan(base: ModelConfig, configuration: dict, name: str) -> ModelConfig:
    """``base`` (already adapted to the data set's phases and labels) with the planned grid and
    network."""
    config = deepcopy(base)
    config.name = name
    config.spacing = [round(s, 6) for s in configuration["spacing"]]
    config.patch_size = list(configuration["patch_size"])
    config.intensity_properties = {}  # training measures them on its training cases
    config.network = NetworkConfig(
        base_features=configuration["features_per_stage"][0],
        max_features=MAX_FEATURES,
        kernel_sizes=[list(k) for k in configuration["kernel_sizes"]],
        strides=[list(s) for s in configuration["strides"]],
        n_conv_per_stage=CONVS_PER_STAGE,
        n_conv_per_stage_decoder=CONVS_PER_STAGE,
        ma_variant=base.network.ma_variant,
        final_upsampling=base.network.final_upsampling,
    )
    config.validate()
    return config


def plan_dataset(dataset_dir: str | Path, budget: Budget, register: str | None = None,
                 normalization: str | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """The plans of a raw data set: fingerprint, configuration and the ModelConfig to train."""
    from .. import __version__
    from ..config import paper_config
    from .dataset import config_for_dataset, read_dataset

    dataset = read_dataset(dataset_dir)
    base = config_for_dataset(paper_config(), dataset, normalization)
    fingerprint = dataset_fingerprint(dataset, base, register, progress)
    configuration = plan_configuration(fingerprint["spacings"], fingerprint["shapes_after_crop"],
                                       len(base.phases), base.num_classes, budget)
    config = model_config_from_plan(base, configuration, f"maml-{dataset.name}")
    return {
        "format": PLANS_FORMAT,
        "planner": {"version": PLANNER_VERSION, "maml": __version__,
                    "rules": "nnU-Net v2 ExperimentPlanner, 3d_fullres (maml.training.planning)"},
        "budget": budget.to_dict(),
        "fingerprint": fingerprint,
        "configuration": configuration,
        "training_options": {"batch_size": configuration["batch_size"]},
        "model_config": config.to_dict(),
    }


def is_plans(data: Any) -> bool:
    return isinstance(data, dict) and data.get("format") == PLANS_FORMAT


def read_configuration_file(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """(model configuration, planned training options) of a plans file (``maml plan``) or of a
    ModelConfig JSON file (no planned options)."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read configuration {path}: {error}") from error
    if not is_plans(data):
        return ModelConfig.from_dict(data), {}
    version = data.get("planner", {}).get("version")
    if not isinstance(version, int) or version > PLANNER_VERSION:
        raise InputError(f"plans {path} were written by planner version {version}; this maml reads "
                         f"up to {PLANNER_VERSION}: update maml or plan again")
    try:
        config = ModelConfig.from_dict(data["model_config"])
    except (KeyError, ModelError) as error:
        raise InputError(f"plans {path}: no valid model_config ({error})") from error
    return config, dict(data.get("training_options", {}))


def describe(plans: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    c = plans["configuration"]
    fp = plans["fingerprint"]
    fmt = lambda values: " x ".join(f"{v:g}" for v in values)  # noqa: E731
    budget = plans["budget"]
    if budget["kind"] == "gpu":
        budget_text = f"GPU {budget['gpu_memory_gb']:g} GB ({budget['source']})"
    else:
        budget_text = f"CPU ({budget['rule']})"
    lines = [
        f"data set {fp['dataset']}: {len(fp['cases'])} cases, phases {', '.join(fp['phases'])}",
        f"budget: {budget_text}",
        f"spacing (z, y, x): {fmt(c['spacing'])} mm (median {fmt(c['median_spacing'])})",
        f"median shape at that spacing: {fmt(c['median_shape'])}",
        f"patch: {fmt(c['patch_size'])}, batch {c['batch_size']}, "
        f"{len(c['strides'])} stages, features {c['features_per_stage'][0]}-{c['features_per_stage'][-1]}",
        "strides: " + " ".join("".join(map(str, s)) for s in c["strides"]),
        "kernels: " + " ".join("".join(map(str, k)) for k in c["kernel_sizes"]),
    ]
    if c["budget_elements"]:
        lines.append(f"memory estimate: {c['estimated_elements_per_sample'] / 1e6:.0f}M elements per "
                     f"sample (one U-Net {c['unet_elements_per_sample'] / 1e6:.0f}M), budget "
                     f"{c['budget_elements'] / 1e6:.0f}M at batch {REFERENCE_BATCH}")
    for phase, note in fp["intensity_notes"].items():
        lines.append(f"intensity of {phase}: {note}")
    return "\n".join(lines)
