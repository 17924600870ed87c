"""Post-processing of predicted label maps.

Two operations, both on connected components (26-connectivity: touching at a corner counts):

- largest foreground component: everything outside the largest connected component of the
  non-zero labels is cleared (nnU-Net's "remove all but the largest component"); for a liver with
  its tumors this drops islands of liver or tumor elsewhere in the abdomen.
- minimum volume per label: components of a label smaller than its minimum volume take the label
  that surrounds them most, so a speck of tumor inside the liver becomes liver and one outside
  becomes background.

:func:`maml.evaluation.tuning.tune` (``maml tune-postprocessing``) chooses the settings on
validation cases; it lives with the metrics so that the runtime never imports them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from .config import ModelConfig, PostprocessingConfig

CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


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
