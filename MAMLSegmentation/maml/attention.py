"""Attention maps fit to look at: anti-aliased resampling to the image grid, and a stripe measure.

The MA attention of a backbone whose last upsampling is a transposed convolution with kernel =
stride carries a column pattern with the period of that stride (nothing in the loss looks at the
attention, so nothing smooths it). Resampled linearly from the model's grid to the image's slightly
finer grid, that pattern beats into a moire of stripes. :func:`antialias` removes it on the model
grid before resampling: a binomial [1, 2, 1] / 4 filter (zero response at the period-2 frequency)
along each axis the last upsampling strided, and a Gaussian low-pass along any axis where the image
grid is coarser than the model's (the usual anti-aliasing before downsampling).

:func:`stripe_ratio` is the measure: the mean absolute period-2 curvature along x over that along y
inside a mask; about 1 for an isotropic map, large for vertical stripes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["antialias", "attention_windows", "display_window", "stripe_ratio"]


def antialias(heatmap: np.ndarray, model_spacing_zyx: Sequence[float], image_spacing_zyx: Sequence[float],
              upsampling_stride_zyx: Sequence[int] = (1, 2, 2)) -> np.ndarray:
    """A (z, y, x) map on the model grid, low-passed so that linear resampling onto the image grid
    neither shows the last upsampling's period nor aliases (see the module docstring). numpy only
    (SciPy is not part of Slicer's Python)."""
    out = np.asarray(heatmap, dtype=np.float32)
    for axis, stride in enumerate(upsampling_stride_zyx):
        if int(stride) == 2:
            out = _correlate(out, np.array([0.25, 0.5, 0.25]), axis)
        elif int(stride) > 2:  # a box over the period: zero response at its frequency and harmonics
            out = _correlate(out, np.full(int(stride), 1.0 / int(stride)), axis)
    for axis, (model, image) in enumerate(zip(model_spacing_zyx, image_spacing_zyx)):
        ratio = float(image) / float(model)
        if ratio > 1.0 + 1e-6:
            # sigma (model voxels) of the usual anti-aliasing filter for a down-sampling by ratio
            out = _correlate(out, _gaussian_kernel(0.5 * np.sqrt(ratio**2 - 1.0)), axis)
    return out


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(4 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _correlate(values: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """1D correlation along ``axis`` with the edge values repeated beyond the border."""
    n = len(kernel)
    before = (n - 1) // 2
    pad = [(0, 0)] * values.ndim
    pad[axis] = (before, n - 1 - before)
    padded = np.pad(values, pad, mode="edge")
    length = values.shape[axis]
    out = np.zeros(values.shape, np.float32)
    for offset, weight in enumerate(kernel):
        out += np.float32(weight) * np.take(padded, np.arange(offset, offset + length), axis=axis)
    return out


def _curvature(values: np.ndarray, mask: np.ndarray, axis: int) -> float:
    def shifted(array, offset):
        return np.take(array, np.arange(1 + offset, array.shape[axis] - 1 + offset), axis=axis)

    curvature = np.abs(shifted(values, 1) - 2 * shifted(values, 0) + shifted(values, -1))
    inside = shifted(mask, 1) & shifted(mask, 0) & shifted(mask, -1)
    return float(curvature[inside].mean()) if inside.any() else float("nan")


def stripe_ratio(attention: np.ndarray, mask: np.ndarray) -> float:
    """Mean |A[x+1] - 2 A[x] + A[x-1]| over ``mask`` divided by the same along y; arrays (z, y, x)."""
    values = np.asarray(attention, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    return _curvature(values, mask, axis=2) / _curvature(values, mask, axis=1)


def display_window(attention: np.ndarray, region: np.ndarray | None,
                   percentiles: tuple[float, float] = (2.0, 98.0)) -> tuple[float, float]:
    """(low, high) of the colour map for an attention map: percentiles inside ``region`` (the
    liver, where the reader looks); the whole 0..1 range when the region is empty or flat."""
    values = np.asarray(attention, dtype=np.float32)
    if region is None or not np.any(region):
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(values[np.asarray(region, bool)], percentiles))
    if not high > low + 1e-3:
        return 0.0, 1.0
    return low, high


def attention_windows(attention: dict, labels) -> dict[str, list[float]]:
    """{phase: [low, high]}: :func:`display_window` of each attention image inside the liver (every
    non-zero label of ``labels``, tumors included), for stats.json; Slicer and the overview use it."""
    import SimpleITK as sitk

    liver = sitk.GetArrayViewFromImage(labels) > 0
    return {phase: [round(v, 4) for v in display_window(sitk.GetArrayViewFromImage(image), liver)]
            for phase, image in attention.items()}
