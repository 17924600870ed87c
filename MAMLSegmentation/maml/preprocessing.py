"""Input checks, resampling to the model's grid and back, intensity normalisation.

Axis convention: configuration values (``ModelConfig.spacing``) are in array order (z, y, x);
SimpleITK's ``GetSpacing()`` / ``GetSize()`` are (x, y, z). This module is the only place that
converts between the two: functions taking ``*_zyx`` arguments reverse them before talking to
SimpleITK, and :class:`Geometry` stores SimpleITK's order (``size_xyz``, ``spacing_xyz``) with
``shape_zyx`` / ``spacing_zyx`` views for numpy code.

Resampling happens in physical space (origin, spacing and direction are honoured), so oblique and
anisotropic images are handled; the model grid keeps the input's origin and direction, and outputs are
always mapped back to exactly the input geometry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .config import NORMALIZATION_SCHEMES, ModelConfig
from .errors import InputError, ModelError

INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,  # cubic B-spline
    "nearest": sitk.sitkNearestNeighbor,
}

# Grids are "the same" when spacing agrees to 1e-4 (relative), direction cosines to 1e-4 and origins
# to 1e-3 of the smallest voxel spacing: loose enough for float32 header round-off (NIfTI), far
# tighter than anything that would move a voxel.
SPACING_RTOL = 1e-4
DIRECTION_ATOL = 1e-4
ORIGIN_TOL_VOXELS = 1e-3

CT_PERCENTILES = (0.5, 99.5)
_EPS = 1e-8


# --------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """A 3D voxel grid in physical space, in SimpleITK's (x, y, z) order.

    Kept instead of an image so that arrays (probabilities, heatmaps) can be mapped back to the
    input grid without holding the input image.
    """

    size_xyz: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major, as sitk.Image.GetDirection()

    @classmethod
    def from_image(cls, image: sitk.Image) -> "Geometry":
        if image.GetDimension() != 3:
            raise InputError(f"a 3D image is needed for a geometry, got {image.GetDimension()}D")
        return cls(
            tuple(int(s) for s in image.GetSize()),
            tuple(float(s) for s in image.GetSpacing()),
            tuple(float(o) for o in image.GetOrigin()),
            tuple(float(d) for d in image.GetDirection()),
        )

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """The numpy array shape of an image on this grid."""
        return tuple(reversed(self.size_xyz))

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return tuple(reversed(self.spacing_xyz))

    def reference_image(self, pixel_type: int = sitk.sitkUInt8) -> sitk.Image:
        """An empty (zero) image on this grid, e.g. as a resampling reference."""
        image = sitk.Image([int(s) for s in self.size_xyz], pixel_type)
        self.apply_to(image)
        return image

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Set this geometry's spacing, origin and direction on ``image`` (same size), in place."""
        if tuple(image.GetSize()) != tuple(self.size_xyz):
            raise ValueError(
                f"image size {image.GetSize()} does not match the geometry's {self.size_xyz}"
            )
        image.SetSpacing(self.spacing_xyz)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def image_from_array(self, array: np.ndarray) -> sitk.Image:
        """A scalar image on this grid from a (z, y, x) array (copied)."""
        if tuple(array.shape) != self.shape_zyx:
            raise ValueError(f"array shape {array.shape} does not match the grid {self.shape_zyx}")
        return self.apply_to(sitk.GetImageFromArray(array))

    def with_spacing(self, spacing_zyx) -> "Geometry":
        """The grid with the given spacing covering the same physical extent.

        Origin and direction are kept; per axis, size = round(size * spacing / new spacing), >= 1.
        """
        new_spacing_xyz = tuple(float(s) for s in reversed(tuple(spacing_zyx)))
        if len(new_spacing_xyz) != 3 or any(not s > 0 for s in new_spacing_xyz):
            raise ValueError(f"spacing must be 3 positive values (z, y, x), got {spacing_zyx}")
        new_size = tuple(
            max(1, int(round(n * old / new)))
            for n, old, new in zip(self.size_xyz, self.spacing_xyz, new_spacing_xyz)
        )
        return Geometry(new_size, new_spacing_xyz, self.origin, self.direction)

    def with_spacing_over_extent(self, spacing_zyx) -> "Geometry":
        """nnU-Net's resampled grid: size = round(size * spacing / new spacing) as in
        :meth:`with_spacing`, but voxels spread over exactly the input's extent (what
        ``skimage.transform.resize`` does), so the spacing is the requested one up to rounding and
        the first and last voxels' outer faces meet the input's."""
        rounded = self.with_spacing(spacing_zyx)
        spacing = tuple(n * s / m for n, s, m in zip(self.size_xyz, self.spacing_xyz, rounded.size_xyz))
        shift = 0.5 * (np.asarray(spacing) - np.asarray(self.spacing_xyz))
        origin = np.asarray(self.origin) + np.asarray(self.direction).reshape(3, 3) @ shift
        return Geometry(rounded.size_xyz, spacing, tuple(float(o) for o in origin), self.direction)

    def to_dict(self) -> dict:
        return {
            "size_xyz": list(self.size_xyz),
            "spacing_xyz": list(self.spacing_xyz),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "Geometry":
        return cls(
            tuple(int(v) for v in data["size_xyz"]),
            tuple(float(v) for v in data["spacing_xyz"]),
            tuple(float(v) for v in data["origin"]),
            tuple(float(v) for v in data["direction"]),
        )


def _as_geometry(item: sitk.Image | Geometry) -> Geometry:
    return item if isinstance(item, Geometry) else Geometry.from_image(item)


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def validate_image(image: sitk.Image, name: str) -> None:
    """Raise :class:`InputError` naming ``name`` if ``image`` cannot be segmented.

    Rejected: anything but a 3D scalar image (2D, 4D, vector or complex pixels), a size of 0 along
    any axis, a single slice, an invalid spacing, NaN or infinite voxels, a constant volume. The one
    place these checks live: ``maml.io.read_image`` runs them on every file it reads.
    """
    if not isinstance(image, sitk.Image):
        raise InputError(f"{name}: expected a SimpleITK image, got {type(image).__name__}")
    dimension = image.GetDimension()
    size = image.GetSize()
    if dimension != 3:
        raise InputError(f"{name}: image is {dimension}D (size {_size(size)}); a 3D volume is needed")
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise InputError(
            f"{name}: image has {components} components per voxel (vector, colour or 4D data); "
            "a scalar 3D volume is needed"
        )
    if any(s == 0 for s in size):
        raise InputError(f"{name}: image is empty (size {_size(size)})")
    if sum(s > 1 for s in size) < 3:
        raise InputError(f"{name}: image is a single slice (size {_size(size)}); a 3D volume is needed")
    if not all(np.isfinite(s) and s > 0 for s in image.GetSpacing()):
        raise InputError(f"{name}: image has an invalid voxel spacing {tuple(image.GetSpacing())}")
    array = sitk.GetArrayViewFromImage(image)
    if np.iscomplexobj(array):
        raise InputError(f"{name}: image has complex voxels; a real-valued volume is needed")
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            if bad == finite.size:
                raise InputError(f"{name}: every voxel is NaN or infinite")
            raise InputError(f"{name}: image has {bad} NaN or infinite voxel(s)")
    low, high = array.min(), array.max()
    if low == high:
        raise InputError(f"{name}: image is constant (every voxel is {low}): there is no anatomy in it")


def _size(size) -> str:
    return "x".join(str(s) for s in size)


def check_same_grid(images: Mapping[str, sitk.Image]) -> None:
    """Raise :class:`InputError` unless all images share size, spacing, origin and direction."""
    items = list(images.items())
    if len(items) < 2:
        return
    first_name, first = items[0]
    g0 = Geometry.from_image(first)
    for name, image in items[1:]:
        g = Geometry.from_image(image)
        differences = []
        if g.size_xyz != g0.size_xyz:
            differences.append(f"size (x, y, z) {_fmt(g0.size_xyz)} vs {_fmt(g.size_xyz)}")
        if not np.allclose(g.spacing_xyz, g0.spacing_xyz, rtol=SPACING_RTOL, atol=0.0):
            differences.append(f"spacing (x, y, z) {_fmt(g0.spacing_xyz)} vs {_fmt(g.spacing_xyz)} mm")
        origin_tol = ORIGIN_TOL_VOXELS * min(min(g0.spacing_xyz), min(g.spacing_xyz))
        if np.max(np.abs(np.subtract(g.origin, g0.origin))) > origin_tol:
            differences.append(f"origin {_fmt(g0.origin)} vs {_fmt(g.origin)} mm")
        if np.max(np.abs(np.subtract(g.direction, g0.direction))) > DIRECTION_ATOL:
            differences.append(f"direction {_fmt(g0.direction)} vs {_fmt(g.direction)}")
        if differences:
            raise InputError(
                f"phases {first_name!r} and {name!r} are not on the same voxel grid: "
                + "; ".join(differences)
                + ". Register them first (co-registration with elastix) so they share one grid."
            )


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in values) + ")"


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------


def normalize(array: np.ndarray, scheme: str,
              properties: Mapping[str, float] | None = None) -> np.ndarray:
    """Intensity normalisation of one phase; returns a new float32 array, ``array`` is untouched.

    - "ct": clip to the image's own 0.5 and 99.5 percentiles, then z-score (the paper, read
      literally; needs no training statistics).
    - "ct_dataset": nnU-Net's CTNormalization: clip to the training set's foreground 0.5-99.5
      percentiles ``properties["low"/"high"]``, subtract its foreground mean, divide by its standard
      deviation. Liver and tumor keep a contrast of about one unit instead of a few hundredths
      (the per-image range is dominated by air and bone).
    - "mr": z-score using the mean and standard deviation of the non-zero voxels; zeros stay 0.
    - "none": a float32 copy.
    """
    if scheme not in NORMALIZATION_SCHEMES:
        raise ModelError(f"normalization scheme {scheme!r} is not one of {NORMALIZATION_SCHEMES}")
    data = np.asarray(array)
    if scheme == "none":
        return data.astype(np.float32, copy=True)
    if scheme == "ct_dataset":
        if not properties:
            raise ModelError("normalization 'ct_dataset' needs the training set's intensity "
                             "properties (low, high, mean, std); the model configuration has none")
        out = data.astype(np.float32, copy=True)
        np.clip(out, float(properties["low"]), float(properties["high"]), out=out)
        out -= float(properties["mean"])
        out /= max(float(properties["std"]), _EPS)
        return out
    if scheme == "ct":
        low, high = np.percentile(data, CT_PERCENTILES)
        out = data.astype(np.float32, copy=True)
        np.clip(out, float(low), float(high), out=out)
        mean = float(np.mean(out, dtype=np.float64))
        std = float(np.std(out, dtype=np.float64))
        out -= mean
        out /= max(std, _EPS)
        return out
    # "mr"
    mask = data != 0
    out = np.zeros(data.shape, dtype=np.float32)
    if mask.any():
        values = data[mask].astype(np.float64)
        mean = values.mean()
        std = values.std()
        out[mask] = ((values - mean) / max(std, _EPS)).astype(np.float32)
    return out


def intensity_properties(foreground_values: np.ndarray) -> dict[str, float]:
    """The statistics "ct_dataset" normalises with, from pooled foreground voxel values (nnU-Net's
    dataset fingerprint): 0.5 and 99.5 percentiles, mean and standard deviation."""
    values = np.asarray(foreground_values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise InputError("no foreground voxels to compute the CT intensity statistics from")
    low, high = np.percentile(values, CT_PERCENTILES)
    return {"low": float(low), "high": float(high), "mean": float(values.mean()),
            "std": float(max(values.std(), _EPS))}


# --------------------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------------------


def _interpolator(name: str) -> int:
    try:
        return INTERPOLATORS[name]
    except KeyError:
        raise ValueError(f"interpolator {name!r} is not one of {sorted(INTERPOLATORS)}") from None


def _resample(image: sitk.Image, target: Geometry, interpolator: str) -> sitk.Image:
    # Images come out as float32 for linear/B-spline (no truncation of integer CT); nearest keeps
    # the pixel type (label maps stay labels). Points just outside the input take the nearest
    # voxel's value instead of a default 0, which would be a false intensity (or background).
    pixel_type = image.GetPixelID() if interpolator == "nearest" else sitk.sitkFloat32
    if Geometry.from_image(image) == target:
        # Sampling a grid at its own voxel centres is the identity: skip the work.
        out = sitk.Cast(image, pixel_type)
        return out
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(s) for s in target.size_xyz])
    resampler.SetOutputSpacing(target.spacing_xyz)
    resampler.SetOutputOrigin(target.origin)
    resampler.SetOutputDirection(target.direction)
    resampler.SetTransform(sitk.Transform())
    resampler.SetInterpolator(_interpolator(interpolator))
    resampler.SetOutputPixelType(pixel_type)
    resampler.SetDefaultPixelValue(0)
    resampler.UseNearestNeighborExtrapolatorOn()
    return resampler.Execute(image)


def resample_to_spacing(
    image: sitk.Image, spacing_zyx, interpolator: str = "linear"
) -> sitk.Image:
    """Resample ``image`` to ``spacing_zyx`` (mm, z y x), same origin, direction and extent.

    Size per axis = round(old size * old spacing / new spacing), at least 1. ``interpolator`` is
    "linear" or "bspline" for images (float32 output), "nearest" for label maps (type kept).
    """
    _interpolator(interpolator)
    target = Geometry.from_image(image).with_spacing(spacing_zyx)
    return _resample(image, target, interpolator)


def resample_to_reference(
    image: sitk.Image, reference: sitk.Image | Geometry, interpolator: str = "linear"
) -> sitk.Image:
    """Resample ``image`` onto the grid of ``reference`` (an image or a :class:`Geometry`)."""
    return _resample(image, _as_geometry(reference), interpolator)


def resample_probabilities_to_reference(
    probs: np.ndarray,
    model_geometry: sitk.Image | Geometry,
    reference: sitk.Image | Geometry,
) -> np.ndarray:
    """Map class probabilities (K, z, y, x) on the model grid to the reference grid (K, Z, Y, X).

    One-hot linear interpolation: each class channel is resampled linearly, so the argmax afterwards
    gives labels with sub-voxel boundaries, smoother than nearest-neighbour on the label map. A
    one-hot label map given as ``probs`` works the same way.
    """
    probs = np.asarray(probs)
    source = _as_geometry(model_geometry)
    target = _as_geometry(reference)
    if probs.ndim != 4 or tuple(probs.shape[1:]) != source.shape_zyx:
        raise ValueError(
            f"probabilities of shape {probs.shape} do not fit the model grid "
            f"(K, {', '.join(map(str, source.shape_zyx))})"
        )
    out = np.empty((probs.shape[0],) + target.shape_zyx, dtype=np.float32)
    for k in range(probs.shape[0]):
        channel = source.image_from_array(np.ascontiguousarray(probs[k], dtype=np.float32))
        resampled = _resample(channel, target, "linear")
        # Keep ``resampled`` referenced while its array view is read: a view does not own the image.
        out[k] = sitk.GetArrayViewFromImage(resampled)
        del resampled
    return out


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(z, y, x) integer labels -> (K, z, y, x) float32 one-hot."""
    labels = np.asarray(labels)
    out = np.zeros((num_classes,) + labels.shape, dtype=np.float32)
    for k in range(num_classes):
        out[k][labels == k] = 1.0
    return out


# --------------------------------------------------------------------------------------------------
# Whole case
# --------------------------------------------------------------------------------------------------


@dataclass
class PreprocessedCase:
    """Network input for one case and the grids needed to map outputs back.

    ``data``: float32 (P, z, y, x) on the model grid, one channel per present phase, in the
    configuration's phase order (``phases``).
    """

    data: np.ndarray
    phases: list[str]
    model_geometry: Geometry
    input_geometry: Geometry
    body: np.ndarray | None = None  # (z, y, x) bool on the model grid: voxels inside the body


def preprocess_phases(
    images: Mapping[str, sitk.Image], config: ModelConfig, interpolator: str = "linear"
) -> PreprocessedCase:
    """Check, resample to ``config.spacing`` and normalise the given phases.

    ``images`` maps phase names to co-registered images; any non-empty subset of ``config.phases``
    may be given (missing phases). The images are not modified.
    """
    if interpolator not in ("linear", "bspline"):
        raise ValueError(f"image interpolator must be 'linear' or 'bspline', got {interpolator!r}")
    if not images:
        raise InputError(
            f"no phase images given; model {config.name!r} needs one or more of {config.phases}"
        )
    unknown = [name for name in images if name not in config.phases]
    if unknown:
        raise InputError(
            f"unknown phase name(s) {unknown}; model {config.name!r} has phases {config.phases}"
        )
    phases = [p for p in config.phases if p in images]
    missing = [p for p in config.missing_intensity_properties() if p in phases]
    if missing:
        raise ModelError(f"model {config.name!r} normalises phase(s) {missing} with the training "
                         "set's CT statistics ('ct_dataset') but carries none; it is not a trained model")
    for phase in phases:
        validate_image(images[phase], f"phase {phase!r}")
    check_same_grid({p: images[p] for p in phases})

    input_geometry = Geometry.from_image(images[phases[0]])
    if config.inference.resampling == "nnunet":
        return _preprocess_like_nnunet(images, phases, config, input_geometry)
    model_geometry = input_geometry.with_spacing(config.spacing)
    data = np.empty((len(phases),) + model_geometry.shape_zyx, dtype=np.float32)
    body = None
    for index, phase in enumerate(phases):
        # Resample first, then normalise: the clipping percentiles and z-score statistics are those
        # of the voxels the network actually sees (and clipping also removes B-spline overshoot),
        # as in nnU-Net v1, which the published MAML code forks.
        resampled = _resample(images[phase], model_geometry, interpolator)
        values = sitk.GetArrayViewFromImage(resampled)
        if body is None:
            body = body_mask(values, config.normalization[phase])
        data[index] = normalize(values, config.normalization[phase],
                                config.intensity_properties.get(phase))
    return PreprocessedCase(data, phases, model_geometry, input_geometry, body)


def _preprocess_like_nnunet(images: Mapping[str, sitk.Image], phases: list[str], config: ModelConfig,
                            input_geometry: Geometry) -> PreprocessedCase:
    """nnU-Net v2's order: normalise on the input grid, then resample with cubic B-splines onto a
    grid of the input's extent (nnU-Net: ``skimage`` order-3 splines; for anisotropic data it
    resamples the slice axis separately with order 0, which this does not)."""
    same = Geometry.from_image(images[phases[0]]).with_spacing(config.spacing)
    model_geometry = input_geometry.with_spacing_over_extent(config.spacing)
    if same.size_xyz == input_geometry.size_xyz and np.allclose(
            same.spacing_xyz, input_geometry.spacing_xyz, rtol=SPACING_RTOL, atol=0):
        model_geometry = input_geometry  # at the model's spacing already: nnU-Net does not resample
    data = np.empty((len(phases),) + model_geometry.shape_zyx, dtype=np.float32)
    body = None
    for index, phase in enumerate(phases):
        scheme = config.normalization[phase]
        values = sitk.GetArrayViewFromImage(images[phase])
        if body is None:
            mask = input_geometry.image_from_array(body_mask(values, scheme).astype(np.uint8))
            body = sitk.GetArrayFromImage(_resample(mask, model_geometry, "nearest")).astype(bool)
        normalized = input_geometry.image_from_array(
            normalize(values, scheme, config.intensity_properties.get(phase)))
        resampled = _resample(normalized, model_geometry, "bspline")
        # Keep ``resampled`` referenced while its array view is read: a view does not own the image.
        data[index] = sitk.GetArrayViewFromImage(resampled)
        del resampled
    return PreprocessedCase(data, phases, model_geometry, input_geometry, body)


# Air: CT voxels below this are outside the body (air is about -1000 HU, fat -100, lung -800..-600).
BODY_HU = -500.0


def body_mask(values: np.ndarray, scheme: str) -> np.ndarray:
    """Voxels inside the body: above BODY_HU for CT, non-zero for MR, all for unnormalised input."""
    if scheme in ("ct", "ct_dataset"):
        return np.asarray(values) > BODY_HU
    if scheme == "mr":
        return np.asarray(values) != 0
    return np.ones(np.shape(values), dtype=bool)


def labels_to_input_geometry(labels: np.ndarray, case: PreprocessedCase) -> sitk.Image:
    """A (z, y, x) label map on the model grid -> UInt8 image in the input geometry (nearest)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("label values must be in 0..255 for a UInt8 label map")
    image = case.model_geometry.image_from_array(labels.astype(np.uint8))
    return _resample(image, case.input_geometry, "nearest")


def probabilities_to_input_geometry(probs: np.ndarray, case: PreprocessedCase) -> np.ndarray:
    """(K, z, y, x) class probabilities on the model grid -> (K, Z, Y, X) on the input grid."""
    return resample_probabilities_to_reference(probs, case.model_geometry, case.input_geometry)


def labels_from_probabilities(probs: np.ndarray) -> np.ndarray:
    """Argmax over the class axis of (K, z, y, x) probabilities, as uint8."""
    return np.argmax(probs, axis=0).astype(np.uint8)


def map_to_input_geometry(
    array: np.ndarray, case: PreprocessedCase, interpolator: str = "linear"
) -> sitk.Image:
    """A (z, y, x) scalar map on the model grid (e.g. an attention heatmap) -> float32 image in the
    input geometry."""
    image = case.model_geometry.image_from_array(np.asarray(array, dtype=np.float32))
    return _resample(image, case.input_geometry, interpolator)


def to_input_geometry(array: np.ndarray, case: PreprocessedCase, kind: str):
    """Bring a model-grid output back to the input geometry.

    ``kind``: "labels" -> UInt8 image (nearest); "probabilities" -> (K, Z, Y, X) float32 array
    (one-hot linear); "map" -> float32 image (linear).
    """
    if kind == "labels":
        return labels_to_input_geometry(array, case)
    if kind == "probabilities":
        return probabilities_to_input_geometry(array, case)
    if kind == "map":
        return map_to_input_geometry(array, case)
    raise ValueError(f"kind must be 'labels', 'probabilities' or 'map', got {kind!r}")
