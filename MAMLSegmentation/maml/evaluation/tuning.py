"""Choosing a model's post-processing on validation cases (``maml tune-postprocessing``).

:func:`tune` chooses the settings of :func:`maml.postprocessing.postprocess` the way nnU-Net
determines its post-processing: starting from nothing, a step is kept only if it raises the mean Dice
over the validation cases.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..config import ModelConfig, PostprocessingConfig
from ..postprocessing import postprocess
from .metrics import dice_score

# Candidate minimum volumes (ml) tried per label by tune(); 0 = off. A 0.5 ml ball is ~10 mm across.
MIN_VOLUME_CANDIDATES_ML = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
MIN_GAIN = 1e-4  # a step must raise the mean Dice by more than this to be kept


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
