"""Training patches and their augmentation, as nnU-Net v2 loads them.

A sample starts as a region larger than the patch (big enough that a rotation by the largest angle
and a down-scaling never reach outside it), cropped around a random voxel or, for the last third of
every batch (at least one sample), around a voxel of a random foreground class present in the case;
the region may reach past the volume's border (padded: images with each phase's air value, labels
with -1). nnU-Net's augmentation pipeline, built from its own library ``batchgeneratorsv2`` with its
probabilities and ranges, then rotates, scales and crops to the patch, and changes intensities:

======================================  ===========  ==============================================
transform (batchgeneratorsv2)           probability  range
======================================  ===========  ==============================================
SpatialTransform: rotation              0.2          +-30 deg per axis (+-180 in plane if the patch
                                                     is anisotropic: "dummy 2D")
SpatialTransform: scaling               0.2          0.7-1.4, same on every axis
GaussianNoiseTransform                  0.1          variance 0-0.1
GaussianBlurTransform                   0.2          sigma 0.5-1, each phase with p 0.5
MultiplicativeBrightnessTransform       0.15         x 0.75-1.25 per phase
ContrastTransform                       0.15         0.75-1.25 per phase, range preserved
SimulateLowResolutionTransform          0.25         down-sampled to 0.5-1, each phase with p 0.5
GammaTransform, inverted image          0.1          gamma 0.7-1.5, statistics retained
GammaTransform                          0.3          gamma 0.7-1.5, statistics retained
MirrorTransform                         0.5 per axis every axis
======================================  ===========  ==============================================

"light" keeps the intensity transforms and mirroring (no rotation or scaling), "none" only crops.
Deep-supervision targets are made by the loss (:mod:`maml.training.losses`), not here.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import InputError
from .dataset import CaseData


AUGMENTATIONS = ("default", "light", "none")
ANISOTROPY_THRESHOLD = 3.0  # nnU-Net: a patch this much longer in plane than in z is augmented in 2D
ROTATION_3D = np.deg2rad(30.0)
ROTATION_2D = np.deg2rad(180.0)
SCALING = (0.7, 1.4)
REGION_SCALING = (0.85, 1.25)  # the range nnU-Net sizes its sampled region with
PADDED_LABEL = -1  # outside the volume; background once augmented


# --------------------------------------------------------------------------------------------------
# Where a patch comes from
# --------------------------------------------------------------------------------------------------


def is_anisotropic_patch(patch_size: Sequence[int]) -> bool:
    """nnU-Net's "dummy 2D" rule: rotate in plane only when the patch is flat in z."""
    return max(patch_size) / patch_size[0] > ANISOTROPY_THRESHOLD


def _rotation(axis: int, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


def sampled_region_size(patch_size: Sequence[int], level: str = "default") -> list[int]:
    """The region sampled before augmentation: the bounding box of the patch rotated by the largest
    angle about each axis, divided by the smallest region scale (nnU-Net's initial patch size; its
    own helper rotates one corner only, which can leave a rotated corner outside the region)."""
    patch = np.asarray(patch_size, dtype=float)
    if level != "default":
        return [int(p) for p in patch_size]
    flat = is_anisotropic_patch(patch_size)
    angle = min(ROTATION_2D if flat else ROTATION_3D, np.pi / 2)
    extent = patch.copy()
    for axis in ((0,) if flat else (0, 1, 2)):
        for theta in np.linspace(0.0, angle, 16):  # the box is widest at 45 deg, if reached
            extent = np.maximum(extent, np.abs(_rotation(axis, theta)) @ patch)
    region = (extent / min(REGION_SCALING)).astype(int)
    if flat:
        region[0] = int(patch[0])
    return [int(max(r, p)) for r, p in zip(region, patch_size)]


def region_start(shape: Sequence[int], region: Sequence[int], patch: Sequence[int],
                 rng: np.random.Generator, centre: Sequence[int] | None = None) -> list[int]:
    """Where the region starts: anywhere from half the padding before the volume to half after it
    (nnU-Net's bounds), uniformly or centred on ``centre`` (clipped to those bounds)."""
    starts = []
    for axis, (n, r, p) in enumerate(zip(shape, region, patch)):
        pad = max(r - p, r - n, 0)
        low, high = -(pad // 2), n + pad // 2 + pad % 2 - r
        if centre is None:
            starts.append(int(rng.integers(low, high + 1)))
        else:
            starts.append(int(np.clip(int(centre[axis]) - r // 2, low, high)))
    return starts


def crop_patch(data: np.ndarray, seg: np.ndarray, start: Sequence[int], patch: Sequence[int],
               fill: Sequence[float] | None = None, fill_label: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
    """The box at ``start`` of size ``patch``; outside the volume images take ``fill`` (per
    channel, default 0) and labels ``fill_label``."""
    shape = seg.shape
    src, dst = [], []
    for s, p, n in zip(start, patch, shape):
        lo, hi = max(s, 0), min(s + p, n)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - s, max(hi, lo) - s))
    image = np.empty((data.shape[0], *patch), dtype=np.float32)
    image[:] = np.asarray(fill if fill is not None else [0.0] * data.shape[0],
                          dtype=np.float32).reshape(-1, 1, 1, 1)
    label = np.full(tuple(patch), fill_label, dtype=np.int16)
    image[(slice(None), *dst)] = data[(slice(None), *src)]
    label[tuple(dst)] = seg[tuple(src)]
    return image, label


# --------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------


def _batchgenerators():
    try:
        import batchgeneratorsv2  # noqa: F401  (only whether it is there)
    except ImportError:
        raise InputError("maml train needs nnU-Net's augmentation library batchgeneratorsv2: "
                         "pip install 'maml-segmentation[train]'") from None


class Augmentation:
    """nnU-Net v2's training transforms (see the module docstring) on one sample.

    Called with (image (P, z, y, x) float32 starting at the sampled region, label (z, y, x) int16
    with -1 outside the volume, air value per phase) and returns the augmented patch and label
    (label -1 becomes 0). The spatial transform samples the image minus its air value with zero
    padding, so whatever a rotation brings in from outside looks like air, not like the mean
    intensity of the foreground (which 0 is after normalisation).
    """

    def __init__(self, patch_size: Sequence[int], level: str = "default"):
        if level not in AUGMENTATIONS:
            raise InputError(f"augmentation {level!r} is not one of {', '.join(AUGMENTATIONS)}")
        _batchgenerators()
        from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
        from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

        self.patch_size = [int(p) for p in patch_size]
        self.level = level
        flat = is_anisotropic_patch(self.patch_size)
        rotation = ROTATION_2D if flat else ROTATION_3D
        spatial_on = level == "default"
        spatial = SpatialTransform(
            self.patch_size[1:] if flat else self.patch_size, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
            p_rotation=0.2 if spatial_on else 0.0, rotation=(-rotation, rotation),
            p_rot_per_axis=1, p_scaling=0.2 if spatial_on else 0.0,
            scaling=SCALING, p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False,
            border_mode_seg="constant", padding_value_seg=PADDED_LABEL)
        if flat:  # nnU-Net's "dummy 2D": each slice rotated and scaled in plane alike
            from batchgeneratorsv2.transforms.utils.pseudo2d import (Convert2DTo3DTransform,
                                                                     Convert3DTo2DTransform)

            spatial = ComposeTransforms([Convert3DTo2DTransform(), spatial, Convert2DTo3DTransform()])
        self.spatial = spatial
        self.flat = flat
        self.rest = ComposeTransforms(self._intensity_and_mirroring(level))

    def _intensity_and_mirroring(self, level: str) -> list:
        from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
        from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
        from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
        from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
        from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
        from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
        from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
        from batchgeneratorsv2.transforms.utils.random import RandomTransform
        from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform

        transforms = []
        if level != "none":
            transforms += [
                RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1,
                                                       synchronize_channels=True), apply_probability=0.1),
                RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                                      synchronize_axes=False, p_per_channel=0.5,
                                                      benchmark=False), apply_probability=0.2),
                RandomTransform(MultiplicativeBrightnessTransform(
                    multiplier_range=BGContrast((0.75, 1.25)), synchronize_channels=False,
                    p_per_channel=1), apply_probability=0.15),
                RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)),
                                                  preserve_range=True, synchronize_channels=False,
                                                  p_per_channel=1), apply_probability=0.15),
                RandomTransform(SimulateLowResolutionTransform(
                    scale=(0.5, 1), synchronize_channels=False, synchronize_axes=True,
                    ignore_axes=(0,) if self.flat else None, allowed_channels=None,
                    p_per_channel=0.5), apply_probability=0.25),
                RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=1,
                                               synchronize_channels=False, p_per_channel=1,
                                               p_retain_stats=1), apply_probability=0.1),
                RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0,
                                               synchronize_channels=False, p_per_channel=1,
                                               p_retain_stats=1), apply_probability=0.3),
                MirrorTransform(allowed_axes=(0, 1, 2)),
            ]
        transforms.append(RemoveLabelTansform(PADDED_LABEL, 0))
        return transforms

    def __call__(self, image: np.ndarray, label: np.ndarray, air: Sequence[float]):
        import torch

        offset = torch.as_tensor(np.asarray(air, dtype=np.float32)).reshape(-1, 1, 1, 1)
        shifted = torch.from_numpy(np.ascontiguousarray(image)) - offset
        out = self.spatial(image=shifted, segmentation=torch.from_numpy(label[None].astype(np.int16)))
        out = self.rest(image=out["image"] + offset, segmentation=out["segmentation"])
        return out["image"].float(), out["segmentation"][0].to(torch.int64)


def build_augmentation(level: str, patch_size: Sequence[int]) -> Augmentation:
    return Augmentation(patch_size, level)


# --------------------------------------------------------------------------------------------------
# The data set of training patches
# --------------------------------------------------------------------------------------------------


def item_seed(*parts: int) -> int:
    """A 32-bit seed from integers (stable across processes and Python runs)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def forced_to_foreground(position_in_batch: int, batch_size: int, fraction: float) -> bool:
    """nnU-Net's rule: the last ``fraction`` of every batch, rounded, is forced onto foreground;
    with batch 2 and a third that is one sample in every batch."""
    return position_in_batch >= round(batch_size * (1.0 - fraction))


class PatchDataset:
    """Training patches; item ``i`` of an epoch is a pure function of (seed, epoch, rank, i).

    Items are read in batches of ``batch_size`` consecutive indices; the last third of each batch
    (``oversample_foreground``, nnU-Net's rule) is centred on a voxel of a random foreground class
    present in the case, the rest anywhere. Works as a ``torch.utils.data.Dataset`` (map-style).
    """

    def __init__(self, cases: Sequence[CaseData], patch_size: Sequence[int], length: int,
                 seed: int = 0, rank: int = 0, oversample_foreground: float = 1 / 3,
                 augmentation: Augmentation | None = None, batch_size: int = 2):
        if not cases:
            raise InputError("no training cases")
        self.cases = list(cases)
        self.patch_size = [int(p) for p in patch_size]
        self.region_size = (sampled_region_size(self.patch_size, augmentation.level)
                            if augmentation is not None else list(self.patch_size))
        self.length = int(length)
        self.seed = int(seed)
        self.rank = int(rank)
        self.batch_size = max(int(batch_size), 1)
        self.oversample_foreground = float(oversample_foreground)
        self.augmentation = augmentation
        self.epoch = 0
        self._air: dict[str, np.ndarray] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def air(self, case: CaseData) -> np.ndarray:
        """Each phase's lowest value: air after the intensity clipping (the padding value)."""
        if case.case_id not in self._air:
            self._air[case.case_id] = np.array([float(np.min(case.data[c]))
                                                for c in range(case.data.shape[0])], np.float32)
        return self._air[case.case_id]

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """The region of an item before augmentation (label -1 outside the volume), and how it
        was chosen."""
        rng = np.random.default_rng(item_seed(self.seed, self.epoch, self.rank, index))
        case = self.cases[int(rng.integers(len(self.cases)))]
        centre, chosen_class = None, None
        force = forced_to_foreground(index % self.batch_size, self.batch_size,
                                     self.oversample_foreground)
        if force:
            present = [k for k, coords in case.foreground.items() if len(coords)]
            if present:
                chosen_class = present[int(rng.integers(len(present)))]
                coords = case.foreground[chosen_class]
                centre = coords[int(rng.integers(len(coords)))]
        start = region_start(case.seg.shape, self.region_size, self.patch_size, rng, centre)
        image, label = crop_patch(case.data, case.seg, start, self.region_size,
                                  fill=self.air(case), fill_label=PADDED_LABEL)
        return image, label, {"case": case.case_id, "start": start, "class": chosen_class,
                              "aug_seed": int(rng.integers(2**31 - 1))}

    def __getitem__(self, index: int):
        import torch

        image, label, info = self.sample(index)
        if self.augmentation is None:
            return (torch.from_numpy(image), torch.from_numpy(np.maximum(label, 0)[None].astype(np.int64)))
        # batchgeneratorsv2 draws from numpy's and torch's global generators: seed both for this
        # item only, leaving the training loop's generators as they were.
        numpy_state = np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            np.random.seed(info["aug_seed"])
            torch.manual_seed(info["aug_seed"])
            image_t, label_t = self.augmentation(image, label, self._air[info["case"]])
        np.random.set_state(numpy_state)
        return image_t.contiguous(), label_t[None].contiguous()
