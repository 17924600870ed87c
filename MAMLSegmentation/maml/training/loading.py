"""Training patches and their augmentation."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..errors import InputError
from .dataset import CaseData

def crop_patch(data: np.ndarray, seg: np.ndarray, start: Sequence[int], patch: Sequence[int]
               ) -> tuple[np.ndarray, np.ndarray]:
    """The patch at ``start`` (may reach outside the volume: zero padding, label 0)."""
    shape = seg.shape
    src, dst = [], []
    for s, p, n in zip(start, patch, shape):
        lo, hi = max(s, 0), min(s + p, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    image = np.zeros((data.shape[0], *patch), dtype=np.float32)
    label = np.zeros(tuple(patch), dtype=np.uint8)
    image[(slice(None), *dst)] = data[(slice(None), *src)]
    label[tuple(dst)] = seg[tuple(src)]
    return image, label

def patch_start(shape: Sequence[int], patch: Sequence[int], rng: np.random.Generator,
                centre: Sequence[int] | None = None) -> list[int]:
    """A random start inside the volume, or one centring ``centre`` (clipped to the volume)."""
    starts = []
    for axis, (n, p) in enumerate(zip(shape, patch)):
        high = n - p
        if high <= 0:  # volume smaller than the patch: centre it (padding both sides)
            starts.append(high // 2)
        elif centre is None:
            starts.append(int(rng.integers(0, high + 1)))
        else:
            starts.append(int(np.clip(int(centre[axis]) - p // 2, 0, high)))
    return starts

def build_augmentation(level: str = "default", spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0)):
    """MONAI dictionary transforms on {"image": (P, z, y, x), "label": (1, z, y, x)}.

    "default": rotation (+-30 deg in plane; out of plane too when the spacing is near isotropic),
    scaling 0.75-1.25, elastic deformation, gamma, brightness, Gaussian noise, mirroring on every
    axis; the label is resampled by nearest neighbour with the same random parameters. "light":
    mirroring, gamma and noise only (cheapest). "none": nothing.
    """
    from monai.transforms import (Compose, Rand3DElasticd, RandAdjustContrastd, RandAffined,
                                  RandFlipd, RandGaussianNoised, RandScaleIntensityd)

    if level == "none":
        return None
    keys = ["image", "label"]
    flips = [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)]
    intensity = [
        RandGaussianNoised("image", prob=0.1, mean=0.0, std=0.1),
        RandScaleIntensityd("image", factors=0.25, prob=0.15),
        RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5), retain_stats=True),
    ]
    if level == "light":
        return Compose([*intensity, *flips])
    if level != "default":
        raise InputError(f"augmentation {level!r} is not one of default, light, none")
    anisotropic = max(spacing_zyx) / min(spacing_zyx) > 2.0
    in_plane = np.pi / 6
    out_of_plane = np.pi / 36 if anisotropic else np.pi / 6
    # MONAI's first 3D angle rotates within the (y, x) plane of a (z, y, x) array.
    rotate = (in_plane, out_of_plane, out_of_plane)
    spatial = [
        RandAffined(keys, prob=0.3, rotate_range=rotate, scale_range=(0.25, 0.25, 0.25),
                    mode=("bilinear", "nearest"), padding_mode="border"),
        Rand3DElasticd(keys, sigma_range=(5, 8), magnitude_range=(50, 150), prob=0.1,
                       mode=("bilinear", "nearest"), padding_mode="border"),
    ]
    return Compose([*spatial, *intensity, *flips])

def _plain(x) -> np.ndarray:
    """MONAI MetaTensor / torch tensor / array -> plain numpy array."""
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)

def item_seed(*parts: int) -> int:
    """A 32-bit seed from integers (stable across processes and Python runs)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])

class PatchDataset:
    """Random training patches; item ``i`` of an epoch is a pure function of (seed, epoch, rank, i).

    1/3 of the patches (``oversample_foreground``) are centred on a random voxel of a random
    foreground class present in the case (nnU-Net's oversampling); the others are uniform.
    Works as a ``torch.utils.data.Dataset`` (map-style).
    """

    def __init__(self, cases: Sequence[CaseData], patch_size: Sequence[int], length: int,
                 seed: int = 0, rank: int = 0, oversample_foreground: float = 1 / 3,
                 augmentation: Callable | None = None):
        if not cases:
            raise InputError("no training cases")
        self.cases = list(cases)
        self.patch_size = [int(p) for p in patch_size]
        self.length = int(length)
        self.seed = int(seed)
        self.rank = int(rank)
        self.oversample_foreground = float(oversample_foreground)
        self.augmentation = augmentation
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """The raw (unaugmented) patch of an item and how it was chosen."""
        rng = np.random.default_rng(item_seed(self.seed, self.epoch, self.rank, index))
        case = self.cases[int(rng.integers(len(self.cases)))]
        centre = None
        force = rng.random() < self.oversample_foreground
        chosen_class = None
        if force:
            present = [k for k, coords in case.foreground.items() if len(coords)]
            if present:
                chosen_class = present[int(rng.integers(len(present)))]
                coords = case.foreground[chosen_class]
                centre = coords[int(rng.integers(len(coords)))]
        start = patch_start(case.seg.shape, self.patch_size, rng, centre)
        image, label = crop_patch(case.data, case.seg, start, self.patch_size)
        return image, label, {"case": case.case_id, "start": start, "class": chosen_class,
                              "aug_seed": int(rng.integers(2**31 - 1))}

    def __getitem__(self, index: int):
        import torch

        image, label, info = self.sample(index)
        if self.augmentation is not None:
            self.augmentation.set_random_state(seed=info["aug_seed"])
            out = self.augmentation({"image": image, "label": label[None]})
            image = _plain(out["image"]).astype(np.float32, copy=False)
            label = np.rint(_plain(out["label"])[0]).astype(np.uint8)
        return (torch.from_numpy(np.ascontiguousarray(image)),
                torch.from_numpy(np.ascontiguousarray(label[None]).astype(np.int64)))
