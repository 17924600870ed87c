"""Out-of-distribution variants of a phantom CT: the inputs a model trained on phantoms must refuse.

Each variant is what a user could really give the tool by mistake or on purpose: unsigned storage
without rescale (+1024), an MR volume, a field of view without the liver, noise, other resolutions
and a flipped head-to-foot axis. Used by the test suite and by benchmarks/domain_check.py.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def _like(array: np.ndarray, image: sitk.Image, spacing=None) -> sitk.Image:
    out = sitk.GetImageFromArray(array)
    out.SetOrigin(image.GetOrigin())
    out.SetDirection(image.GetDirection())
    out.SetSpacing(spacing or image.GetSpacing())
    return out


def hu_shift(image: sitk.Image) -> sitk.Image:
    """Unsigned storage without its rescale intercept: every value 1024 too high."""
    return _like(sitk.GetArrayFromImage(image).astype(np.int32) + 1024, image)


def mr_like(image: sitk.Image) -> sitk.Image:
    """Values 0-2000 with no HU meaning: fat bright, water-like tissue dark, air 0."""
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    values = np.where(hu < -500, 0.0, np.clip(1500 - 8 * np.abs(hu + 100), 50, 2000))
    return _like(values.astype(np.float32), image)


def no_liver(image: sitk.Image, truth: sitk.Image, slices: int = 60) -> sitk.Image:
    """A field of view below the liver (pelvis-like): the slab under the liver, mirrored back and
    forth to a full-size volume."""
    array = sitk.GetArrayFromImage(image)
    labels = sitk.GetArrayFromImage(truth)
    lowest = int(np.flatnonzero(labels.any((1, 2))).min())
    slab = array[:max(lowest - 1, 2)]
    period = np.concatenate([slab, slab[::-1]])
    stacked = np.concatenate([period] * (slices // len(period) + 1))[:slices]
    return _like(stacked, image)


def noise(image: sitk.Image, seed: int = 0) -> sitk.Image:
    values = np.random.default_rng(seed).normal(0, 300, sitk.GetArrayViewFromImage(image).shape)
    return _like(values.astype(np.float32), image)


def resampled(image: sitk.Image, spacing_xyz) -> sitk.Image:
    size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing_xyz)]
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                         tuple(spacing_xyz), image.GetDirection(), -1000.0, sitk.sitkFloat32)


def flipped_head_to_foot(image: sitk.Image) -> sitk.Image:
    return _like(sitk.GetArrayFromImage(image)[::-1].copy(), image)


def variants(image: sitk.Image, truth: sitk.Image) -> dict[str, sitk.Image]:
    """Every out-of-distribution variant of one phase, by name."""
    spacing = image.GetSpacing()
    return {
        "hu_shift_1024": hu_shift(image),
        "mr_like": mr_like(image),
        "no_liver_fov": no_liver(image, truth),
        "noise": noise(image),
        "resampled_0.5mm": resampled(image, (0.5, 0.5, spacing[2])),
        "slices_8mm": resampled(image, (spacing[0], spacing[1], 8.0)),
        "flipped_head_to_foot": flipped_head_to_foot(image),
    }
