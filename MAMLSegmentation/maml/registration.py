"""Phase registration: a moving phase onto the fixed (reference) phase.

``register(fixed, moving, preset, engine=...)`` runs the preset's stages one at a time with one of
two engines, then resamples the moving image onto the fixed grid:

- ``simpleitk`` (default): SimpleITK's ``ImageRegistrationMethod`` (ITK v4 registration), already
  loaded with the rest of the engine; progress and cancel reach into every stage's iterations.
- ``elastix``: itk-elastix's parameter maps (``parameter_maps``; also writable for the ``elastix``
  program), converted to a SimpleITK transform. itk loads about 250 wrapped modules on its first
  call, 8-23 s once per process on these machines, more than a demo-size registration's stages;
  the stages themselves take about as long as SimpleITK's and are somewhat more accurate.

Both reach sub-millimetre target registration error on the phantoms' breathing motion
(``Testing/test_registration.py``, ``benchmarks/bench_registration_engines.py``). Transforms follow
ITK's resampling direction: a physical point of the fixed image (LPS) maps to the corresponding
point of the moving image. Slicer stores such a transform as its "from parent" transform.

Presets:

- ``none``: identity; the moving image is only resampled onto the fixed grid.
- ``rigid``: Euler transform (rotation + translation).
- ``affine``: rigid, then affine.
- ``deformable`` (default): rigid, then a B-spline with a 40 mm final control-point grid.

Every stage uses Mattes mutual information with 32 bins (tolerates the different enhancement of
arterial and venous phases), a 3-level smoothing and downsampling pyramid and random sampling. With
SimpleITK the B-spline stage runs on the two coarser levels only, refining its grid from 80 to
40 mm (the full-resolution level would add most of the stage's time for a 40 mm grid). The
settings are sized for demo CT (about 160x160x80 voxels at 2x2x3 mm) on two CPU cores.

The quality report compares the two images on the fixed grid before (identity) and after
registration, inside the fixed image's body (or the fixed mask): normalized mutual information
(NMI = (H(F) + H(M)) / H(F, M), 1 for independent images, 2 for identical ones) and the correlation
coefficient. It warns when similarity does not improve, when it stays very low or the registered
image covers little of the body (phases of different patients, or a failed registration), when the
affine or B-spline stage lowered the similarity the rigid stage had reached (mutual information's
known drift on images with large uniform regions), and when the transform looks implausible (a
point of the body moved by more than 50 mm, a linear scaling far from 1, a folding B-spline).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .config import DEFAULT_REGISTRATION_ENGINE, REGISTRATION_ENGINES, REGISTRATION_PRESETS
from .errors import CancelledError, InputError, RegistrationError

__all__ = [
    "PRESETS",
    "ENGINES",
    "RegistrationResult",
    "register",
    "write_transform",
    "warp_label",
    "parameter_maps",
    "write_parameter_file",
    "normalized_mutual_information",
]

PRESETS, ENGINES, DEFAULT_ENGINE = REGISTRATION_PRESETS, REGISTRATION_ENGINES, DEFAULT_REGISTRATION_ENGINE

# Warning thresholds of the quality report.
MAX_DISPLACEMENT_MM = 50.0  # a body point moved further than this: diverged
MIN_NMI_AFTER = 1.15  # NMI below this after registration: unrelated or unaligned images
MIN_COVERAGE = 0.6  # fraction of the fixed body the registered moving image must cover
SCALE_RANGE = (0.8, 1.25)  # determinant of a linear transform's matrix outside: shrink/blow-up
IMPROVEMENT_EPS = 1e-3  # "after" must beat "before" by this much
STAGE_TOLERANCE = 0.01  # NMI the affine/B-spline stage may lose against the rigid stage before a warning

# Shared settings of every stage (elastix parameter-map values are lists of strings).
_COMMON = {
    "Registration": ["MultiResolutionRegistration"],
    "Metric": ["AdvancedMattesMutualInformation"],
    "NumberOfHistogramBins": ["32"],
    "FixedImagePyramid": ["FixedRecursiveImagePyramid"],
    "MovingImagePyramid": ["MovingRecursiveImagePyramid"],
    "NumberOfResolutions": ["3"],
    "Interpolator": ["LinearInterpolator"],
    # FinalLinearInterpolator is missing from older elastix programs (Debian's 5.0.1); order 1 is the same.
    "ResampleInterpolator": ["FinalBSplineInterpolator"],
    "FinalBSplineInterpolationOrder": ["1"],
    "Resampler": ["DefaultResampler"],
    "Optimizer": ["AdaptiveStochasticGradientDescent"],
    "AutomaticParameterEstimation": ["true"],
    "ImageSampler": ["RandomCoordinate"],
    "NewSamplesEveryIteration": ["true"],
    "CheckNumberOfSamples": ["true"],
    "MaximumNumberOfSamplingAttempts": ["8"],
    "NumberOfSamplesForExactGradient": ["4096"],
    "FixedInternalImagePixelType": ["float"],
    "MovingInternalImagePixelType": ["float"],
    "HowToCombineTransforms": ["Compose"],
    "DefaultPixelValue": ["0"],
    "WriteResultImage": ["false"],
    "WriteIterationInfo": ["false"],
    "ResultImageFormat": ["nii"],
    "RandomSeed": ["121212"],
    # Eroding the masks per pyramid level leaves (almost) no valid moving samples with itk-elastix
    # 0.25 ("Too many samples map outside moving image buffer"); masks are used as given.
    "ErodeMask": ["false"],
}

_STAGES = {
    "rigid": {
        "Transform": ["EulerTransform"],
        "AutomaticScalesEstimation": ["true"],
        "AutomaticTransformInitialization": ["false"],
        "MaximumNumberOfIterations": ["200"],
        "NumberOfSpatialSamples": ["2048"],
    },
    "affine": {
        "Transform": ["AffineTransform"],
        "AutomaticScalesEstimation": ["true"],
        "AutomaticTransformInitialization": ["false"],
        "MaximumNumberOfIterations": ["200"],
        "NumberOfSpatialSamples": ["2048"],
    },
    "bspline": {
        "Transform": ["BSplineTransform"],
        "FinalGridSpacingInPhysicalUnits": ["40.0"],
        "GridSpacingSchedule": ["4", "2", "1"],
        "MaximumNumberOfIterations": ["200"],
        "NumberOfSpatialSamples": ["2048"],
    },
}

_PRESET_STAGES = {
    "none": (),
    "rigid": ("rigid",),
    "affine": ("rigid", "affine"),
    "deformable": ("rigid", "bspline"),
}


@dataclass
class RegistrationResult:
    """What :func:`register` returns."""

    registered: sitk.Image  # moving resampled onto the fixed grid (moving's pixel type)
    transform: sitk.Transform  # fixed physical point (LPS) -> moving physical point
    matrix: np.ndarray | None  # 4x4 LPS matrix of the same mapping for linear presets, else None
    quality: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------ parameter maps


def parameter_maps(preset: str) -> list[dict[str, list[str]]]:
    """The elastix parameter maps of ``preset``, one per stage (none for ``"none"``)."""
    _check_preset(preset)
    maps = []
    for stage in _PRESET_STAGES[preset]:
        pmap = {key: list(value) for key, value in _COMMON.items()}
        pmap.update({key: list(value) for key, value in _STAGES[stage].items()})
        maps.append(pmap)
    return maps


def write_parameter_file(pmap: dict[str, list[str]], path: str | os.PathLike) -> Path:
    """Write one parameter map in elastix's text format (for the ``elastix`` program)."""

    def fmt(value: str) -> str:
        try:
            float(value)
        except ValueError:
            return f'"{value}"'
        return value

    lines = [f"({key} {' '.join(fmt(str(v)) for v in values)})" for key, values in pmap.items()]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _check_preset(preset) -> None:
    if preset not in PRESETS:
        raise InputError(f"unknown registration preset {preset!r}: choose one of {', '.join(PRESETS)}")


def _check_engine(engine) -> None:
    if engine not in ENGINES:
        raise InputError(f"unknown registration engine {engine!r}: choose one of {', '.join(ENGINES)}")


# ---------------------------------------------------------------------------------- input checks


def _check_image(image, role: str) -> sitk.Image:
    from .preprocessing import validate_image

    validate_image(image, f"{role} image")
    return image


def _check_mask(mask, image: sitk.Image, role: str) -> sitk.Image | None:
    """A UInt8 0/1 mask on ``image``'s grid (resampled with nearest neighbour if needed), or None."""
    if mask is None:
        return None
    label = f"{role} mask"
    if not isinstance(mask, sitk.Image):
        raise InputError(f"{label}: expected a SimpleITK image, got {type(mask).__name__}")
    if mask.GetDimension() != 3 or mask.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{label}: a scalar 3D label image is needed")
    if not _same_grid(mask, image):
        mask = sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    array = (sitk.GetArrayViewFromImage(mask) > 0).astype(np.uint8)
    if not array.any():
        raise InputError(f"{label}: mask is empty (no voxel > 0 inside the {role} image)")
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def _same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def _bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical bounding box (LPS mm) of the image's voxel extent."""
    size = np.array(image.GetSize(), float)
    corners = []
    for cx in (-0.5, size[0] - 0.5):
        for cy in (-0.5, size[1] - 0.5):
            for cz in (-0.5, size[2] - 0.5):
                corners.append(image.TransformContinuousIndexToPhysicalPoint((cx, cy, cz)))
    corners = np.array(corners)
    return corners.min(axis=0), corners.max(axis=0)


def _check_overlap(fixed: sitk.Image, moving: sitk.Image) -> float:
    """Fraction of the smaller image's bounding box shared by both; error when (almost) none."""
    (flo, fhi), (mlo, mhi) = _bounds(fixed), _bounds(moving)
    inter = np.clip(np.minimum(fhi, mhi) - np.maximum(flo, mlo), 0, None)
    smaller = min(np.prod(fhi - flo), np.prod(mhi - mlo))
    fraction = float(np.prod(inter) / smaller) if smaller > 0 else 0.0
    if fraction < 0.01:
        raise RegistrationError(
            "fixed and moving images do not overlap in physical space "
            f"(fixed spans {np.round(flo, 1).tolist()}..{np.round(fhi, 1).tolist()} mm, "
            f"moving {np.round(mlo, 1).tolist()}..{np.round(mhi, 1).tolist()} mm): "
            "are they phases of the same patient and scan?"
        )
    return fraction


# -------------------------------------------------------------------------- SimpleITK <-> ITK


def sitk_to_itk(image: sitk.Image, pixel=np.float32):
    """A copy of a 3D SimpleITK image as an ITK image (same origin, spacing and direction)."""
    import itk

    array = np.ascontiguousarray(sitk.GetArrayFromImage(image).astype(pixel, copy=False))
    out = itk.image_from_array(array)
    out.SetOrigin([float(v) for v in image.GetOrigin()])
    out.SetSpacing([float(v) for v in image.GetSpacing()])
    out.SetDirection(itk.matrix_from_array(np.array(image.GetDirection(), float).reshape(3, 3)))
    return out


def itk_to_sitk(image) -> sitk.Image:
    """A copy of an ITK image as a SimpleITK image (same origin, spacing and direction)."""
    import itk

    out = sitk.GetImageFromArray(itk.array_from_image(image))
    out.SetOrigin(tuple(float(v) for v in image.GetOrigin()))
    out.SetSpacing(tuple(float(v) for v in image.GetSpacing()))
    out.SetDirection(tuple(float(v) for v in itk.array_from_matrix(image.GetDirection()).ravel()))
    return out


def _itk_transform_to_sitk(transform) -> sitk.Transform:
    """Convert through an ITK .h5 file, which both toolkits read and write (B-splines included)."""
    import itk

    with tempfile.TemporaryDirectory(prefix="maml_reg_") as tmp:
        path = os.path.join(tmp, "transform.h5")
        itk.transformwrite([transform], path)
        return sitk.ReadTransform(path)


# ------------------------------------------------------------------------------------ register


def register(
    fixed: sitk.Image,
    moving: sitk.Image,
    preset: str = "deformable",
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    engine: str = DEFAULT_ENGINE,
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` with ``engine``; see the module docstring.

    ``fixed_mask`` / ``moving_mask`` (optional, voxels > 0) restrict where the metric is sampled
    (e.g. a body or liver mask); the fixed mask also defines where the quality is measured.
    ``progress(fraction, message)`` is called as stages start and end (and, with SimpleITK, as
    levels go by); ``cancel()`` is polled between stages (SimpleITK: every iteration) and a True
    answer raises :class:`~maml.errors.CancelledError`. Inputs are not modified.
    """
    start = time.perf_counter()
    _check_preset(preset)
    _check_engine(engine)

    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(float(fraction), message)

    def check_cancel() -> None:
        if cancel is not None and cancel():
            raise CancelledError("registration cancelled")

    report(0.0, "checking the images")
    fixed = _check_image(fixed, "fixed")
    moving = _check_image(moving, "moving")
    fmask = _check_mask(fixed_mask, fixed, "fixed")
    mmask = _check_mask(moving_mask, moving, "moving")
    overlap = _check_overlap(fixed, moving)
    check_cancel()

    stages = _PRESET_STAGES[preset]
    maps = parameter_maps(preset)
    stage_seconds = {}
    loading_seconds = 0.0
    if stages and engine == "elastix":
        # Timed apart from the stages: itk-elastix's loading is paid once per process, not per image.
        report(0.02, "loading elastix")
        t0 = time.perf_counter()
        _load_elastix()
        loading_seconds = round(time.perf_counter() - t0, 3)
        transform, linear_stage = _run_elastix(fixed, moving, maps, stages, fmask, mmask, report, check_cancel,
                                               stage_seconds)
    elif stages:
        transform, linear_stage = _run_simpleitk(fixed, moving, stages, fmask, mmask, report, cancel,
                                                 stage_seconds)
    else:
        transform, linear_stage = sitk.AffineTransform(3), None
    linear = preset != "deformable"
    matrix = transform_matrix(transform) if linear else None
    if linear:
        # One plain affine transform: simplest for Slicer (a linear transform node) and for users.
        transform = affine_from_matrix(matrix)

    check_cancel()
    report(0.9, "resampling the moving image")
    default = float(sitk.GetArrayViewFromImage(moving).min())
    resampling = transform if linear else sampled_displacement(transform, fixed)
    registered = sitk.Resample(moving, fixed, resampling, sitk.sitkLinear, default, moving.GetPixelID())

    report(0.95, "measuring the registration quality")
    # Judged through the transform the image was resampled with: the sampled field is what the
    # phases were aligned by, and interpolating it is cheaper than evaluating the B-spline again.
    quality = _quality(fixed, moving, registered, resampling, matrix, fmask, preset, default,
                       linear_stage if preset in ("affine", "deformable") else None)
    quality["overlap_fraction_of_extents"] = round(overlap, 4)
    quality["engine"] = engine
    quality["stage_seconds"] = stage_seconds
    quality["elastix_loading_seconds"] = loading_seconds
    quality["seconds"] = round(time.perf_counter() - start, 3)
    report(1.0, "registration done")
    return RegistrationResult(registered=registered, transform=transform, matrix=matrix, quality=quality)


def _stage_bounds(stages) -> np.ndarray:
    """Where each stage starts and ends in the progress fraction (0.05-0.9); B-spline stages take
    most of the time, so they get four times the share."""
    weights = np.array([4.0 if s == "bspline" else 1.0 for s in stages])
    return 0.05 + 0.85 * np.concatenate([[0.0], np.cumsum(weights) / weights.sum()])


def _run_elastix(fixed, moving, maps, stages, fmask, mmask, report, check_cancel, stage_seconds):
    """Run the stages one by one, each starting from the previous result.

    Returns the final SimpleITK transform and the one after the first (linear) stage.
    """
    itk = _load_elastix()
    fixed_itk = sitk_to_itk(fixed)
    moving_itk = sitk_to_itk(moving)
    fmask_itk = sitk_to_itk(fmask, np.uint8) if fmask is not None else None
    mmask_itk = sitk_to_itk(mmask, np.uint8) if mmask is not None else None
    bounds = _stage_bounds(stages)

    previous = None  # itk.ParameterObject of the stages so far
    first_stage = None
    for index, (stage, pmap) in enumerate(zip(stages, maps)):
        check_cancel()
        report(bounds[index], f"registration stage {index + 1}/{len(stages)}: {stage}")
        t0 = time.perf_counter()
        parameters = itk.ParameterObject.New()
        parameters.AddParameterMap(pmap)
        method = itk.ElastixRegistrationMethod.New(fixed_itk, moving_itk)
        method.SetParameterObject(parameters)
        if previous is not None:
            method.SetInitialTransformParameterObject(previous)
        if fmask_itk is not None:
            method.SetFixedMask(fmask_itk)
        if mmask_itk is not None:
            method.SetMovingMask(mmask_itk)
        method.SetLogToConsole(False)
        with tempfile.TemporaryDirectory(prefix="maml_elastix_") as log_dir:
            # elastix explains failures only in its log: keep one to quote from.
            method.SetOutputDirectory(log_dir)
            method.SetLogToFile(True)
            try:
                method.UpdateLargestPossibleRegion()
            except RuntimeError as exc:
                raise RegistrationError(f"elastix failed registering the moving image onto the fixed image "
                                        f"({stage} stage): {_elastix_message(exc, log_dir)}") from None
        stage_seconds[stage] = round(time.perf_counter() - t0, 3)
        combined = method.GetCombinationTransform()
        itk_transform = method.ConvertToItkTransform(combined)
        if index == 0 and len(stages) > 1:
            first_stage = _itk_transform_to_sitk(itk_transform)
        result_parameters = method.GetTransformParameterObject()
        # Keep the chain of every stage for the next one.
        chain = itk.ParameterObject.New()
        if previous is not None:
            for i in range(previous.GetNumberOfParameterMaps()):
                chain.AddParameterMap(previous.GetParameterMap(i))
        for i in range(result_parameters.GetNumberOfParameterMaps()):
            chain.AddParameterMap(result_parameters.GetParameterMap(i))
        previous = chain
    report(bounds[-1], "converting the transform")
    final = _itk_transform_to_sitk(itk_transform)
    return final, (first_stage if first_stage is not None else final)


# SimpleITK's stages: random samples per pyramid level (as many at every level, like elastix's
# NumberOfSpatialSamples), and the pyramid (shrink factors, smoothing sigmas in voxels).
SITK_SAMPLES_PER_LEVEL = 3000
SITK_SHRINK, SITK_SMOOTHING = (4, 2, 1), (2.0, 1.0, 0.0)
SITK_BSPLINE_LEVELS = 2  # the B-spline stage stops at half resolution (module docstring)
BSPLINE_GRID_MM = 40.0
SITK_SEED = 121212


SITK_WORKING_SPACING_MM = 2.0  # finer images are block-averaged to about this before the pyramid


def _working_copy(image: sitk.Image, mask: sitk.Image | None) -> tuple[sitk.Image, sitk.Image | None]:
    """Float32 copy of ``image`` block-averaged to voxels of about 2 mm (and its mask alike).

    The metric sees a few thousand random samples per level whatever the resolution, so a 0.7 mm
    image only makes every level's smoothing and resampling slower (4 times the stages' time on a
    512 x 512 x 150 case); the 40 mm B-spline grid and the sub-millimetre accuracy do not need it.
    """
    factors = [max(1, round(SITK_WORKING_SPACING_MM / spacing)) for spacing in image.GetSpacing()]
    working = sitk.Cast(image, sitk.sitkFloat32)
    if max(factors) > 1:
        working = sitk.BinShrink(working, factors)
        if mask is not None:
            mask = sitk.Cast(sitk.BinShrink(sitk.Cast(mask, sitk.sitkFloat32), factors) > 0.5, sitk.sitkUInt8)
    return working, mask


def _bspline_domain(fixed: sitk.Image, mask: sitk.Image | None) -> tuple[sitk.Image, sitk.Image]:
    """The B-spline stage's fixed image, padded by two voxels, and a mask that keeps the metric off
    the padding.

    The registration fits the B-spline's domain to each level's shrunk image, whose outermost voxel
    centres lie inside the full image's; outside its domain ITK's B-spline gives no displacement
    while Slicer's reading of the same file gives the spline's value, so the two would disagree on
    the image's outermost half voxel (0.13 mm on a phantom). Padded, the domain covers every voxel.
    """
    pad = [2, 2, 2]
    if mask is None:
        mask = sitk.Image(fixed.GetSize(), sitk.sitkUInt8) + 1
        mask.CopyInformation(fixed)
    return (sitk.ZeroFluxNeumannPad(fixed, pad, pad),  # border values repeated: no edge to smooth in
            sitk.ConstantPad(sitk.Cast(mask > 0, sitk.sitkUInt8), pad, pad, 0))


def _sitk_method(fixed: sitk.Image, levels: int, fmask, mmask) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    voxels = float(np.prod(fixed.GetSize()))
    shrink = SITK_SHRINK[:levels]
    method.SetMetricSamplingPercentagePerLevel(
        [min(1.0, SITK_SAMPLES_PER_LEVEL * f ** 3 / voxels) for f in shrink], SITK_SEED)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetShrinkFactorsPerLevel(list(shrink))
    method.SetSmoothingSigmasPerLevel(list(SITK_SMOOTHING[:levels]))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    if fmask is not None:
        method.SetMetricFixedMask(fmask)
    if mmask is not None:
        method.SetMetricMovingMask(mmask)
    return method


def _run_simpleitk(fixed, moving, stages, fmask, mmask, report, cancel, stage_seconds):
    """The preset's stages with SimpleITK, each starting from the previous one's result.

    Returns the final transform and the one after the first (rigid) stage.
    """
    fixed_f, fmask = _working_copy(fixed, fmask)
    moving_f, mmask = _working_copy(moving, mmask)
    bounds = _stage_bounds(stages)
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
    final: sitk.Transform = rigid
    for index, stage in enumerate(stages):
        if cancel is not None and cancel():
            raise CancelledError("registration cancelled")
        report(bounds[index], f"registration stage {index + 1}/{len(stages)}: {stage}")
        t0 = time.perf_counter()
        levels = SITK_BSPLINE_LEVELS if stage == "bspline" else len(SITK_SHRINK)
        stage_fixed, stage_mask = _bspline_domain(fixed_f, fmask) if stage == "bspline" else (fixed_f, fmask)
        method = _sitk_method(stage_fixed, levels, stage_mask, mmask)
        if stage == "bspline":  # composed after the rigid stage
            coarse_mm = BSPLINE_GRID_MM * 2 ** (levels - 1)
            mesh = [max(1, int(round(n * d / coarse_mm))) for n, d in zip(stage_fixed.GetSize(), stage_fixed.GetSpacing())]
            bspline = sitk.BSplineTransformInitializer(stage_fixed, mesh, order=3)
            method.SetOptimizerAsGradientDescentLineSearch(5.0, 100, convergenceMinimumValue=1e-4,
                                                           convergenceWindowSize=5)
            method.SetInitialTransformAsBSpline(bspline, inPlace=True, scaleFactors=[2 ** i for i in range(levels)])
            method.SetMovingInitialTransform(rigid)
        else:
            if stage == "affine":  # starts where the rigid stage ended
                final = sitk.AffineTransform(3)
                final.SetCenter(rigid.GetCenter())
                final.SetMatrix(rigid.GetMatrix())
                final.SetTranslation(rigid.GetTranslation())
            method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=200,
                                                            relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
            method.SetOptimizerScalesFromPhysicalShift()
            method.SetInitialTransform(final, inPlace=True)  # the rigid one in the rigid stage
        _execute(method, stage_fixed, moving_f, stage, cancel,
                 lambda level, i=index: report(bounds[i] + (bounds[i + 1] - bounds[i]) * level / levels,
                                               f"registration stage {i + 1}/{len(stages)}: {stages[i]}, "
                                               f"level {level + 1}"))
        if stage == "bspline":
            # Composed only now: a composite copies its parts (copy on write), so one built before
            # Execute would keep the B-spline's identity start and drop what the stage found.
            final = sitk.CompositeTransform([rigid, bspline])
        stage_seconds[stage] = round(time.perf_counter() - t0, 3)
    report(bounds[-1], "registration stages done")
    return final, rigid


def _execute(method, fixed, moving, stage, cancel, level_started) -> None:
    """Runs one stage; a cancel request stops it at the next iteration.

    The iteration callbacks are the only Python code that runs during a stage, so a signal handler
    (Ctrl-C, SIGTERM) raises there; SimpleITK would print that exception and turn it into a generic
    error. So the exception is kept, the registration stopped, and the exception raised again
    afterwards; one raised on a callback's very first instruction, before its guard, is read back
    from what SimpleITK printed (kept off the terminal)."""
    raised: list[BaseException] = []

    def guarded(callback):
        def run() -> None:
            if raised:
                return
            try:
                callback()
            except BaseException as exc:  # noqa: BLE001 (re-raised below, whatever it is)
                raised.append(exc)
                method.StopRegistration()
        return run

    def on_iteration() -> None:
        if cancel is not None and cancel():
            raise CancelledError("registration cancelled")

    method.AddCommand(sitk.sitkIterationEvent, guarded(on_iteration))
    method.AddCommand(sitk.sitkMultiResolutionIterationEvent,
                      guarded(lambda: level_started(method.GetCurrentLevel())))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            method.Execute(fixed, moving)
    except RuntimeError as exc:
        if raised:
            raise raised[0] from None
        if "Python Callable" in str(exc):
            raise _interruption(printed.getvalue()) from None
        raise RegistrationError(f"SimpleITK failed registering the moving image onto the fixed image "
                                f"({stage} stage): {_itk_message(exc)}") from None
    if raised:
        raise raised[0]


def _interruption(printed: str) -> BaseException:
    """The exception a signal handler raised inside a callback, from its printed traceback."""
    last = next((line.strip() for line in reversed(printed.splitlines()) if line.strip()), "")
    if last.startswith("KeyboardInterrupt"):
        return KeyboardInterrupt()
    message = last.split(": ", 1)[1] if "Error: " in last else "registration interrupted"
    return CancelledError(message)


def _itk_message(exc: Exception) -> str:
    """The ITK error's own sentence, without the file, line and object address around it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if "ITK ERROR" in line:
            sentence = line.split("):", 1)[-1].strip() if "):" in line else line
            return sentence.split(". ", 1)[0].rstrip(".")  # the rest is ITK's advice to programmers
    return lines[-1] if lines else type(exc).__name__


def _load_elastix():
    """The itk module with elastix's classes loaded (itk loads its ~250 wrapped modules lazily, on
    first use; seconds the first time in a process, nothing after)."""
    try:
        import itk
    except ImportError:
        raise InputError("the elastix registration engine needs itk-elastix, which is not installed: "
                         "pip install itk-elastix, or use the default engine "
                         "(--registration-engine simpleitk)") from None

    itk.ElastixRegistrationMethod, itk.ParameterObject, itk.image_from_array  # noqa: B018 (loads them)
    return itk


def _elastix_message(exc: Exception, log_dir: str | None = None) -> str:
    text = str(exc)
    for log in sorted(Path(log_dir).glob("*.log")) if log_dir else ():
        found = [line.split("Description:", 1)[1].strip()
                 for line in log.read_text(errors="replace").splitlines() if "Description:" in line]
        if found:
            return found[-1].replace("ITK ERROR: ", "")
    for line in text.splitlines():
        if "Description:" in line:
            return line.split("Description:", 1)[1].strip()
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return lines[-1] if lines else type(exc).__name__


# ------------------------------------------------------------------------------ transforms


def transform_matrix(transform: sitk.Transform) -> np.ndarray:
    """4x4 LPS matrix of a linear transform (fixed point -> moving point), found from point images."""
    origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    matrix = np.eye(4)
    matrix[:3, 3] = origin
    for axis in range(3):
        unit = [0.0, 0.0, 0.0]
        unit[axis] = 1.0
        matrix[:3, axis] = np.array(transform.TransformPoint(unit)) - origin
    return matrix


def affine_from_matrix(matrix: np.ndarray) -> sitk.AffineTransform:
    affine = sitk.AffineTransform(3)
    affine.SetMatrix([float(v) for v in np.asarray(matrix)[:3, :3].ravel()])
    affine.SetTranslation([float(v) for v in np.asarray(matrix)[:3, 3]])
    return affine


FIELD_SPACING_MM = 4.0


def sampled_displacement(transform: sitk.Transform, reference: sitk.Image) -> sitk.Transform:
    """``transform`` sampled as a displacement field every ~4 mm over ``reference``'s extent, for
    resampling: a B-spline evaluated at each of 39 million voxels of a full-size CT took 21 s, the
    field and its linear interpolation 3 s. A 40 mm B-spline grid is smooth enough that the field
    stays within hundredths of a millimetre of it (``Testing/test_registration.py``)."""
    spacing = np.array(reference.GetSpacing())
    step = np.maximum(1, np.round(FIELD_SPACING_MM / spacing)).astype(int)
    # The last sample reaches the last voxel: outside its field a displacement field moves nothing.
    size = [int(math.ceil((n - 1) / s)) + 1 for n, s in zip(reference.GetSize(), step)]
    displacement = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, size,
                                                     reference.GetOrigin(), (spacing * step).tolist(),
                                                     reference.GetDirection())
    return sitk.DisplacementFieldTransform(displacement)


def write_transform(result: RegistrationResult | sitk.Transform, path: str | os.PathLike) -> Path:
    """Write the transform as an ITK transform file (.h5 or .tfm) that Slicer reads, atomically."""
    transform = result.transform if isinstance(result, RegistrationResult) else result
    path = Path(path)
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix not in (".h5", ".hdf5", ".tfm", ".txt"):
        raise InputError(f"transform file {path}: use a .h5 or .tfm name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        sitk.WriteTransform(transform, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def warp_label(label: sitk.Image, reference: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """Resample a label map onto ``reference``'s grid with nearest neighbour (UInt8 stays UInt8)."""
    if not isinstance(label, sitk.Image) or label.GetDimension() != 3:
        raise InputError("label map to warp: a 3D SimpleITK image is needed")
    return sitk.Resample(label, reference, transform, sitk.sitkNearestNeighbor, 0, label.GetPixelID())


# -------------------------------------------------------------------------------- quality


def normalized_mutual_information(a: np.ndarray, b: np.ndarray, bins: int = 64) -> float:
    """(H(a) + H(b)) / H(a, b) of two equally long samples (1: independent, 2: identical)."""
    a = np.asarray(a, float).ravel()
    b = np.asarray(b, float).ravel()
    if a.size < 2:
        return float("nan")
    lo_a, hi_a = np.percentile(a, [0.5, 99.5])
    lo_b, hi_b = np.percentile(b, [0.5, 99.5])
    if hi_a <= lo_a or hi_b <= lo_b:
        return 1.0
    joint, _, _ = np.histogram2d(np.clip(a, lo_a, hi_a), np.clip(b, lo_b, hi_b), bins=bins,
                                 range=[[lo_a, hi_a], [lo_b, hi_b]])
    p = joint / joint.sum()

    def entropy(q):
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    h_joint = entropy(p)
    if h_joint <= 0:
        return 2.0
    return (entropy(p.sum(axis=1)) + entropy(p.sum(axis=0))) / h_joint


def _body_mask(fixed: sitk.Image) -> np.ndarray:
    """Voxels of the fixed image's body: above -500 HU for CT, else above the Otsu threshold."""
    array = sitk.GetArrayViewFromImage(fixed)
    if float(np.percentile(array, 1)) <= -500:
        return array > -500
    otsu = sitk.OtsuThreshold(sitk.Cast(fixed, sitk.sitkFloat32), 0, 1)
    return sitk.GetArrayViewFromImage(otsu) > 0


def _similarity(fixed_arr, warped_arr, region) -> tuple[float, float]:
    if np.count_nonzero(region) < 100:
        return float("nan"), float("nan")
    a = fixed_arr[region].astype(float)
    b = warped_arr[region].astype(float)
    nmi = normalized_mutual_information(a, b)
    corr = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0
    return nmi, corr


def _coarse_grid(fixed: sitk.Image) -> tuple[np.ndarray, sitk.Image]:
    """Integer voxel steps giving about 4 mm, and the fixed grid subsampled by them."""
    spacing = np.array(fixed.GetSpacing())
    step = np.maximum(1, np.round(4.0 / spacing)).astype(int)
    size = [int(math.ceil(n / s)) for n, s in zip(fixed.GetSize(), step)]
    ref = sitk.Image(size, sitk.sitkUInt8)
    ref.SetOrigin(fixed.GetOrigin())
    ref.SetSpacing((spacing * step).tolist())
    ref.SetDirection(fixed.GetDirection())
    return step, ref


def _inside(moving: sitk.Image, points: np.ndarray) -> np.ndarray:
    """Which physical points (N, 3) fall inside the moving image's voxel extent."""
    direction = np.array(moving.GetDirection()).reshape(3, 3)
    to_index = np.linalg.inv(direction * np.array(moving.GetSpacing()))
    index = (points - np.array(moving.GetOrigin())) @ to_index.T
    size = np.array(moving.GetSize())
    return np.all((index >= -0.5) & (index <= size - 0.5), axis=1)


def _quality(fixed, moving, registered, transform, matrix, fmask, preset, default, linear_stage=None) -> dict:
    """Similarity before/after and transform plausibility, on a ~4 mm subsample of the fixed grid."""
    step, coarse = _coarse_grid(fixed)
    sub = (slice(None, None, step[2]), slice(None, None, step[1]), slice(None, None, step[0]))
    body_full = sitk.GetArrayViewFromImage(fmask) > 0 if fmask is not None else _body_mask(fixed)
    body = body_full[sub]
    fixed_arr = sitk.GetArrayViewFromImage(fixed)[sub]
    after_arr = sitk.GetArrayViewFromImage(registered)[sub]
    identity = sitk.Transform(3, sitk.sitkIdentity)
    # In moving's pixel type, like the registered image, so that "none" compares equal.
    before_arr = sitk.GetArrayFromImage(
        sitk.Resample(moving, coarse, identity, sitk.sitkLinear, default, moving.GetPixelID()))

    field_img = sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, coarse.GetSize(), coarse.GetOrigin(), coarse.GetSpacing(),
        coarse.GetDirection())
    disp = sitk.GetArrayFromImage(field_img)  # (z, y, x, 3)
    kk, jj, ii = np.meshgrid(*(np.arange(n) for n in disp.shape[:3]), indexing="ij")
    index = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1).astype(float)
    direction = np.array(coarse.GetDirection()).reshape(3, 3)
    points = np.array(coarse.GetOrigin()) + (index * np.array(coarse.GetSpacing())) @ direction.T
    covered_before = _inside(moving, points).reshape(body.shape)
    covered_after = _inside(moving, points + disp.reshape(-1, 3)).reshape(body.shape)

    region_before = body & covered_before
    region_after = body & covered_after
    nmi_before, corr_before = _similarity(fixed_arr, before_arr, region_before)
    nmi_after, corr_after = _similarity(fixed_arr, after_arr, region_after)

    quality = {
        "preset": preset,
        "metric": "normalized_mutual_information",
        "before": _round(nmi_before),
        "after": _round(nmi_after),
        "correlation_before": _round(corr_before),
        "correlation_after": _round(corr_after),
        "region": "fixed mask" if fmask is not None else "fixed image body",
        "region_covered_after": _round(np.count_nonzero(region_after) / max(1, np.count_nonzero(body))),
    }
    warnings = []
    if not math.isfinite(nmi_after):
        warnings.append("the registered moving image hardly covers the fixed image's body")
    else:
        if preset != "none" and math.isfinite(nmi_before) and nmi_after <= nmi_before + IMPROVEMENT_EPS:
            warnings.append(f"similarity did not improve (NMI {nmi_before:.3f} before, {nmi_after:.3f} after)")
        if nmi_after < MIN_NMI_AFTER:
            warnings.append(f"very low similarity after registration (NMI {nmi_after:.3f} < {MIN_NMI_AFTER}): "
                            "phases of different patients, or images that are not aligned?")
        covered = np.count_nonzero(region_after) / max(1, np.count_nonzero(body))
        if covered < MIN_COVERAGE:
            warnings.append(f"the registered moving image covers only {100 * covered:.0f} % of the fixed "
                            "image's body: phases of different patients or scan ranges?")
    if linear_stage is not None and math.isfinite(nmi_after):
        # The affine / B-spline stage must not undo what the rigid stage found (mutual information can
        # prefer shrinking or shifting large uniform regions when images have little structure).
        linear_arr = sitk.GetArrayFromImage(
            sitk.Resample(moving, coarse, linear_stage, sitk.sitkLinear, default, moving.GetPixelID()))
        nmi_linear, _ = _similarity(fixed_arr, linear_arr, region_after)
        quality["after_rigid_stage"] = _round(nmi_linear)
        if math.isfinite(nmi_linear) and nmi_after < nmi_linear - STAGE_TOLERANCE:
            second = "B-spline" if preset == "deformable" else "affine"
            warnings.append(f"the {second} stage lowered the similarity reached by the rigid stage (NMI "
                            f"{nmi_linear:.3f} -> {nmi_after:.3f}): try the rigid preset")
    warnings += _transform_checks(field_img, disp, body, matrix, quality)
    quality["warning"] = "; ".join(warnings) if warnings else None
    return quality


def _transform_checks(field_img, disp, body, matrix, quality) -> list[str]:
    """Largest displacement inside the body; scaling of linear transforms; B-spline folding."""
    warnings = []
    magnitude = np.linalg.norm(disp, axis=-1)
    inside = magnitude[body] if body.any() else magnitude.ravel()
    max_disp = float(inside.max())
    quality["max_displacement_mm"] = round(max_disp, 2)
    quality["mean_displacement_mm"] = round(float(inside.mean()), 2)
    if max_disp > MAX_DISPLACEMENT_MM:
        warnings.append(f"the transform moves part of the body by {max_disp:.0f} mm "
                        f"(> {MAX_DISPLACEMENT_MM:.0f} mm): the registration may have diverged")
    if matrix is not None:
        det = float(np.linalg.det(matrix[:3, :3]))
        quality["matrix_determinant"] = round(det, 4)
        if not SCALE_RANGE[0] <= det <= SCALE_RANGE[1]:
            warnings.append(f"the linear transform scales volumes by {det:.2f}: implausible between phases")
    else:
        jac = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field_img))
        jac_inside = jac[body] if body.any() else jac.ravel()
        quality["jacobian_min"] = round(float(jac_inside.min()), 4)
        quality["jacobian_max"] = round(float(jac_inside.max()), 4)
        if jac_inside.min() <= 0:
            warnings.append(f"the deformation folds (Jacobian determinant down to {jac_inside.min():.2f})")
    return warnings


def _round(value, digits: int = 4):
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None
