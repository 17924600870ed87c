"""Post-processing of predicted label maps, and choosing it on validation cases.

Two operations, both on connected components (26-connectivity: touching at a corner counts):

- largest foreground component: everything outside the largest connected component of the
  non-zero labels is cleared (nnU-Net's "remove all but the largest component"); for a liver with
  its tumors this drops islands of liver or tumor elsewhere in the abdomen.
- minimum volume per label: components of a label smaller than its minimum volume take the label
  that surrounds them most, so a speck of tumor inside the liver becomes liver and one outside
  becomes background.

:func:`tune` chooses the settings the way nnU-Net determines its post-processing: starting from
nothing, a step is kept only if it raises the mean Dice over the validation cases.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from .config import ModelConfig, PostprocessingConfig

CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
# Candidate minimum volumes (ml) tried per label by tune(); 0 = off. A 0.5 ml ball is ~10 mm across.
MIN_VOLUME_CANDIDATES_ML = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
MIN_GAIN = 1e-4  # a step must raise the mean Dice by more than this to be kept


def keep_largest_component(labels: np.ndarray) -> np.ndarray:
    """A copy of ``labels`` with every voxel outside the largest foreground component set to 0."""
    out = np.array(labels, copy=True)
    components, count = ndimage.label(out > 0, structure=CONNECTIVITY)
    if count > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        out[(components != int(np.argmax(sizes))) & (components > 0)] = 0
    return out


def remove_small_components(labels: np.ndarray, value: int, min_voxels: float) -> np.ndarray:
    """A copy of ``labels`` where components of ``value`` with fewer than ``min_voxels`` voxels take
    the most common other label on their one-voxel outer border (0 when there is none)."""
    out = np.array(labels, copy=True)
    if min_voxels <= 0:
        return out
    components, count = ndimage.label(out == value, structure=CONNECTIVITY)
    if count == 0:
        return out
    sizes = np.bincount(components.ravel())
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None or sizes[index] >= min_voxels:
            continue
        # one voxel of margin so the border is inside the box
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        mask = components[box] == index
        border = ndimage.binary_dilation(mask, structure=CONNECTIVITY) & ~mask
        around = labels[box][border]
        around = around[around != value]
        out[box][mask] = int(np.bincount(around).argmax()) if around.size else 0
    return out


def postprocess(labels: np.ndarray, spacing_zyx: Sequence[float], config: ModelConfig,
                settings: PostprocessingConfig | None = None) -> np.ndarray:
    """``settings`` (default: the model's own) applied to a (z, y, x) label map; returns a copy."""
    settings = config.postprocessing if settings is None else settings
    out = np.array(labels, copy=True)
    if settings.largest_component:
        out = keep_largest_component(out)
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    values = {label.name: label.value for label in config.labels}
    for name, volume in settings.min_volume_ml.items():
        if volume > 0:
            out = remove_small_components(out, values[name], float(volume) / voxel_ml)
    return out


# --------------------------------------------------------------------------------------------------
# Choosing the settings on validation cases
# --------------------------------------------------------------------------------------------------


@dataclass
class ValidationCase:
    case_id: str
    prediction: np.ndarray  # (z, y, x) labels before post-processing
    truth: np.ndarray
    spacing_zyx: tuple[float, float, float]


@dataclass
class TuningResult:
    settings: PostprocessingConfig
    mean_dice: float  # with the chosen settings
    baseline_dice: float  # without post-processing
    steps: list[dict] = field(default_factory=list)  # every candidate tried, in order


def mean_dice(cases: Sequence[ValidationCase], config: ModelConfig, settings: PostprocessingConfig
              ) -> tuple[float, dict[str, float]]:
    """Mean Dice over cases and foreground labels (1 when both are empty), and per label."""
    from .evaluation import dice_score

    per_label: dict[str, list[float]] = {l.name: [] for l in config.labels if l.value != 0}
    for case in cases:
        labels = postprocess(case.prediction, case.spacing_zyx, config, settings)
        for label in config.labels:
            if label.value != 0:
                per_label[label.name].append(dice_score(labels == label.value, case.truth == label.value))
    means = {name: float(np.mean(values)) for name, values in per_label.items()}
    return float(np.mean(list(means.values()))), means


def tune(cases: Sequence[ValidationCase], config: ModelConfig,
         candidates_ml: Sequence[float] = MIN_VOLUME_CANDIDATES_ML) -> TuningResult:
    """Greedy, as nnU-Net: largest component on or off, then each label's minimum volume in turn;
    a step is kept only if the mean Dice rises by more than MIN_GAIN."""
    if not cases:
        raise ValueError("no validation cases to choose the post-processing on")
    steps = []

    def score(settings: PostprocessingConfig, step: str) -> float:
        value, per_label = mean_dice(cases, config, settings)
        steps.append({"step": step, "largest_component": settings.largest_component,
                      "min_volume_ml": dict(settings.min_volume_ml), "mean_dice": value,
                      "dice": per_label})
        return value

    best = PostprocessingConfig()
    baseline = best_score = score(best, "none")
    trial = deepcopy(best)
    trial.largest_component = True
    value = score(trial, "largest component")
    if value > best_score + MIN_GAIN:
        best, best_score = trial, value
    for label in config.labels:
        if label.value == 0:
            continue
        chosen = best
        for volume in candidates_ml:
            if volume <= 0:
                continue
            trial = deepcopy(best)
            trial.min_volume_ml[label.name] = float(volume)
            value = score(trial, f"{label.name} >= {volume:g} ml")
            if value > best_score + MIN_GAIN:
                chosen, best_score = trial, value
        best = chosen
    return TuningResult(best, best_score, baseline, steps)
