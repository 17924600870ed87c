"""maml.preprocessing: input checks, resampling round trips on oblique anisotropic grids,
normalisation, whole-case preprocessing with missing phases."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from maml.config import demo_config
from maml.errors import InputError, ModelError
from maml.preprocessing import (
    Geometry,
    PreprocessedCase,
    check_same_grid,
    labels_from_probabilities,
    intensity_properties,
    normalize,
    one_hot,
    preprocess_phases,
    resample_probabilities_to_reference,
    resample_to_reference,
    resample_to_spacing,
    to_input_geometry,
    validate_image,
)

INPUT_SPACING_XYZ = (0.7, 0.7, 2.5)
MODEL_SPACING_ZYX = (2.0, 1.1, 1.1)


def _rotation(axis: str, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    if axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    raise ValueError(axis)


OBLIQUE = _rotation("z", 20) @ _rotation("x", 10)


def oblique_image(array_zyx: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(INPUT_SPACING_XYZ)
    image.SetOrigin((-31.7, 12.25, -104.5))
    image.SetDirection(tuple(OBLIQUE.ravel()))
    return image


def physical_points(geometry: Geometry) -> np.ndarray:
    """(z, y, x, 3) physical coordinates (x, y, z mm) of every voxel centre."""
    nz, ny, nx = geometry.shape_zyx
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    index = np.stack([i, j, k], axis=-1).astype(np.float64)
    direction = np.array(geometry.direction).reshape(3, 3)
    return np.asarray(geometry.origin) + (index * geometry.spacing_xyz) @ direction.T


SHAPE_ZYX = (16, 64, 64)
_GRID = Geometry(tuple(reversed(SHAPE_ZYX)), INPUT_SPACING_XYZ, (-31.7, 12.25, -104.5), tuple(OBLIQUE.ravel()))
POINTS = physical_points(_GRID)
CENTRE = POINTS[8, 32, 32]


def smooth_image() -> sitk.Image:
    p = POINTS - CENTRE
    values = 100 * np.sin(p[..., 0] / 9.0) + 80 * np.cos(p[..., 1] / 11.0) + 3 * p[..., 2]
    return oblique_image(values.astype(np.float32))


def blob_labels() -> np.ndarray:
    """Ellipsoid (label 1) with an inner sphere (label 2) around a point off the grid centre."""
    d = np.linalg.norm((POINTS - (CENTRE + [2.3, -1.7, 0.9])) / [1.0, 1.0, 0.8], axis=-1)
    labels = np.zeros(SHAPE_ZYX, np.uint8)
    labels[d < 15.0] = 1
    labels[d < 9.0] = 2
    return labels


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def assert_same_geometry(image: sitk.Image, reference: sitk.Image) -> None:
    assert image.GetSize() == reference.GetSize()
    assert image.GetSpacing() == reference.GetSpacing()
    assert image.GetOrigin() == reference.GetOrigin()
    assert image.GetDirection() == reference.GetDirection()


# ---------------------------------------------------------------------------------------------
# Geometry and resampling
# ---------------------------------------------------------------------------------------------


def test_axis_convention_and_model_grid():
    image = smooth_image()
    geometry = Geometry.from_image(image)
    assert geometry.shape_zyx == SHAPE_ZYX
    assert geometry.spacing_zyx == (2.5, 0.7, 0.7)
    resampled = resample_to_spacing(image, MODEL_SPACING_ZYX)
    # (z, y, x) in, SimpleITK (x, y, z) out; size = round(size * old / new).
    assert resampled.GetSpacing() == (1.1, 1.1, 2.0)
    assert resampled.GetSize() == (round(64 * 0.7 / 1.1), round(64 * 0.7 / 1.1), round(16 * 2.5 / 2.0))
    assert resampled.GetOrigin() == image.GetOrigin()
    assert resampled.GetDirection() == image.GetDirection()
    assert Geometry.from_dict(geometry.to_dict()) == geometry
    # A very coarse spacing keeps at least one voxel per axis.
    assert min(resample_to_spacing(image, (500.0, 500.0, 500.0)).GetSize()) == 1


def test_round_trip_of_smooth_oblique_image():
    image = smooth_image()
    model = resample_to_spacing(image, MODEL_SPACING_ZYX, "linear")
    back = resample_to_reference(model, image, "linear")
    assert_same_geometry(back, image)
    original = sitk.GetArrayFromImage(image)
    error = np.abs(sitk.GetArrayFromImage(back) - original)
    value_range = original.max() - original.min()
    assert error.mean() < 0.01 * value_range
    # B-spline is at least as good on a smooth image.
    back_bspline = resample_to_reference(
        resample_to_spacing(image, MODEL_SPACING_ZYX, "bspline"), image, "bspline"
    )
    assert_same_geometry(back_bspline, image)
    assert np.abs(sitk.GetArrayFromImage(back_bspline) - original).mean() <= error.mean() * 1.05
    # Resampling really happened in physical space: the model grid's values match the function
    # evaluated at its voxel centres (linear interpolation of a smooth field).
    model_points = physical_points(Geometry.from_image(model)) - CENTRE
    expected = (
        100 * np.sin(model_points[..., 0] / 9.0)
        + 80 * np.cos(model_points[..., 1] / 11.0)
        + 3 * model_points[..., 2]
    )
    inside = np.zeros(expected.shape, bool)
    inside[1:-1, 1:-1, 1:-1] = True
    assert np.abs(sitk.GetArrayFromImage(model) - expected)[inside].mean() < 0.01 * value_range


def test_label_round_trip_nearest_and_one_hot_linear():
    labels = blob_labels()
    image = oblique_image(labels)
    geometry = Geometry.from_image(image)

    # Nearest neighbour on the label map.
    model = resample_to_spacing(image, MODEL_SPACING_ZYX, "nearest")
    assert model.GetPixelID() == sitk.sitkUInt8
    back = resample_to_reference(model, geometry, "nearest")
    assert_same_geometry(back, image)
    back_nearest = sitk.GetArrayFromImage(back)

    # One-hot linear: each class channel linearly, argmax at the end.
    model_geometry = geometry.with_spacing(MODEL_SPACING_ZYX)
    model_probs = resample_probabilities_to_reference(one_hot(labels, 3), geometry, model_geometry)
    assert model_probs.shape == (3,) + model_geometry.shape_zyx
    np.testing.assert_allclose(model_probs.sum(axis=0), 1.0, atol=1e-5)
    back_probs = resample_probabilities_to_reference(model_probs, model_geometry, image)
    assert back_probs.shape == (3,) + SHAPE_ZYX
    back_linear = labels_from_probabilities(back_probs)

    for result in (back_nearest, back_linear):
        for label in (1, 2):
            assert dice(result >= label, labels >= label) > 0.95


def test_physical_position_preserved():
    """A blob's centroid in physical mm stays put on the model grid and after the round trip."""
    d2 = np.sum((POINTS - (CENTRE + [3.1, -2.2, 1.4])) ** 2, axis=-1)
    image = oblique_image(np.exp(-d2 / (2 * 4.0**2)).astype(np.float32))

    def centroid(img: sitk.Image) -> np.ndarray:
        weights = sitk.GetArrayFromImage(img).astype(np.float64)
        points = physical_points(Geometry.from_image(img))
        return (points * weights[..., None]).sum(axis=(0, 1, 2)) / weights.sum()

    half_voxel = 0.5 * min(INPUT_SPACING_XYZ)
    original = centroid(image)
    np.testing.assert_allclose(original, CENTRE + [3.1, -2.2, 1.4], atol=half_voxel)
    model = resample_to_spacing(image, MODEL_SPACING_ZYX)
    assert np.linalg.norm(centroid(model) - original) < half_voxel
    back = resample_to_reference(model, image)
    assert np.linalg.norm(centroid(back) - original) < half_voxel

    labels = (np.sqrt(d2) < 8.0).astype(np.uint8)
    label_image = oblique_image(labels)
    model_labels = resample_to_spacing(label_image, MODEL_SPACING_ZYX, "nearest")
    assert np.linalg.norm(centroid(model_labels) - centroid(label_image)) < 0.5 * min(MODEL_SPACING_ZYX)


def test_resampling_does_not_modify_input_and_rejects_unknown_interpolator():
    image = smooth_image()
    before = sitk.GetArrayFromImage(image).copy()
    resample_to_spacing(image, MODEL_SPACING_ZYX)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), before)
    assert image.GetSpacing() == INPUT_SPACING_XYZ
    with pytest.raises(ValueError, match="interpolator"):
        resample_to_spacing(image, MODEL_SPACING_ZYX, "cubic")


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------


def test_ct_normalisation_clips_at_percentiles_and_z_scores():
    rng = np.random.default_rng(0)
    array = rng.normal(40.0, 100.0, size=(20, 30, 30)).astype(np.int16)
    array[3, 4, 5] = 30000  # metal-like outlier
    array[6, 7, 8] = -3000
    before = array.copy()
    out = normalize(array, "ct")
    np.testing.assert_array_equal(array, before)
    assert out.dtype == np.float32 and out.shape == array.shape
    assert abs(float(out.mean())) < 1e-4
    assert abs(float(out.std()) - 1.0) < 1e-4
    # Computed independently: the clipped values and their statistics.
    low, high = np.percentile(before.astype(np.float64), [0.5, 99.5])
    clipped = np.clip(before.astype(np.float64), low, high)
    mean, std = clipped.mean(), clipped.std()
    np.testing.assert_allclose(out, (clipped - mean) / std, rtol=1e-4, atol=1e-4)
    assert out[3, 4, 5] == pytest.approx((high - mean) / std, rel=1e-5)
    assert out[6, 7, 8] == pytest.approx((low - mean) / std, rel=1e-5)
    assert out.max() == pytest.approx((high - mean) / std, rel=1e-5)
    # Without clipping the outlier would be ~300 standard deviations out.
    assert out.max() < 4.0


def test_dataset_ct_normalisation_uses_the_given_training_statistics():
    rng = np.random.default_rng(2)
    array = rng.normal(80.0, 300.0, size=(8, 16, 16)).astype(np.float32)
    before = array.copy()
    props = {"low": -20.0, "high": 200.0, "mean": 95.0, "std": 25.0}
    out = normalize(array, "ct_dataset", props)
    np.testing.assert_array_equal(array, before)
    np.testing.assert_allclose(out, (np.clip(before, -20.0, 200.0) - 95.0) / 25.0, rtol=1e-6, atol=1e-6)
    assert out.min() == pytest.approx(-4.6) and out.max() == pytest.approx(4.2)
    with pytest.raises(ModelError, match="intensity properties"):
        normalize(array, "ct_dataset")


def test_intensity_properties_are_nnunet_foreground_statistics():
    rng = np.random.default_rng(3)
    values = rng.normal(100.0, 20.0, 5000)
    props = intensity_properties(np.concatenate([values, [np.nan]]))
    assert props["low"] == pytest.approx(np.percentile(values, 0.5))
    assert props["high"] == pytest.approx(np.percentile(values, 99.5))
    assert props["mean"] == pytest.approx(values.mean())
    assert props["std"] == pytest.approx(values.std())
    with pytest.raises(InputError, match="no foreground"):
        intensity_properties(np.array([]))


def test_a_dataset_normalised_config_without_statistics_is_refused():
    config = _config()
    config.normalization = {phase: "ct_dataset" for phase in config.phases}
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32))
    with pytest.raises(ModelError, match="not a trained model"):
        preprocess_phases({phase: image for phase in config.phases}, config)
    config.intensity_properties = {"arterial": {"low": 0, "high": 1, "mean": 0.5, "std": 0}}
    with pytest.raises(ModelError, match="std > 0"):
        config.validate()
    config.intensity_properties = {"portal": {"low": 0, "high": 1, "mean": 0.5, "std": 1}}
    with pytest.raises(ModelError, match="unknown phase 'portal'"):
        config.validate()


def test_mr_normalisation_keeps_zeros():
    rng = np.random.default_rng(1)
    array = rng.normal(500.0, 50.0, size=(10, 20, 20))
    array[:, :5] = 0.0
    before = array.copy()
    out = normalize(array, "mr")
    np.testing.assert_array_equal(array, before)
    assert out.dtype == np.float32
    assert np.all(out[:, :5] == 0.0)
    inside = out[:, 5:]
    assert abs(float(inside.mean())) < 1e-5
    assert abs(float(inside.std()) - 1.0) < 1e-5


def test_no_normalisation_is_a_float_copy_and_unknown_scheme_fails():
    array = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    out = normalize(array, "none")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, array)
    out[0, 0, 0] = 99
    assert array[0, 0, 0] == 0
    with pytest.raises(ModelError, match="zscore"):
        normalize(array, "zscore")


# ---------------------------------------------------------------------------------------------
# Whole case
# ---------------------------------------------------------------------------------------------


def _config(spacing=MODEL_SPACING_ZYX):
    config = demo_config()
    config.spacing = list(spacing)
    config.normalization = {phase: "ct" for phase in config.phases}  # per image: no statistics needed
    return config


def _ct_phase(seed: int) -> sitk.Image:
    rng = np.random.default_rng(seed)
    array = (smooth_image_array() + rng.normal(0, 5, SHAPE_ZYX)).astype(np.int16)
    return oblique_image(array)


def smooth_image_array() -> np.ndarray:
    return sitk.GetArrayFromImage(smooth_image())


def test_preprocess_two_phases_and_map_outputs_back():
    arterial, venous = _ct_phase(1), _ct_phase(2)
    copies = {name: sitk.GetArrayFromImage(img).copy() for name, img in (("a", arterial), ("v", venous))}
    # Given in the "wrong" order: data comes in the configuration's phase order.
    case = preprocess_phases({"venous": venous, "arterial": arterial}, _config())
    assert isinstance(case, PreprocessedCase)
    assert case.phases == ["arterial", "venous"]
    assert case.input_geometry == Geometry.from_image(arterial)
    assert case.model_geometry == case.input_geometry.with_spacing(MODEL_SPACING_ZYX)
    assert case.data.dtype == np.float32
    assert case.data.shape == (2,) + case.model_geometry.shape_zyx
    expected_arterial = normalize(
        sitk.GetArrayFromImage(resample_to_spacing(arterial, MODEL_SPACING_ZYX)), "ct"
    )
    np.testing.assert_allclose(case.data[0], expected_arterial, atol=1e-5)
    for channel in case.data:
        assert abs(float(channel.mean())) < 1e-3 and abs(float(channel.std()) - 1) < 1e-3
    # Inputs are untouched.
    np.testing.assert_array_equal(sitk.GetArrayFromImage(arterial), copies["a"])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(venous), copies["v"])
    assert arterial.GetSpacing() == INPUT_SPACING_XYZ

    # Outputs come back in exactly the input geometry.
    labels = blob_labels()
    model_labels = sitk.GetArrayFromImage(
        resample_to_reference(oblique_image(labels), case.model_geometry, "nearest")
    )
    label_image = to_input_geometry(model_labels, case, "labels")
    assert label_image.GetPixelID() == sitk.sitkUInt8
    assert_same_geometry(label_image, arterial)
    assert dice(sitk.GetArrayFromImage(label_image) >= 1, labels >= 1) > 0.95
    probs = to_input_geometry(one_hot(model_labels, 3), case, "probabilities")
    assert probs.shape == (3,) + SHAPE_ZYX
    heatmap = to_input_geometry(np.full(case.model_geometry.shape_zyx, 0.25), case, "map")
    assert_same_geometry(heatmap, arterial)
    np.testing.assert_allclose(sitk.GetArrayFromImage(heatmap), 0.25, atol=1e-6)


def test_missing_phase_gives_one_channel():
    venous = _ct_phase(3)
    case = preprocess_phases({"venous": venous}, _config())
    assert case.phases == ["venous"]
    assert case.data.shape == (1,) + case.model_geometry.shape_zyx


def test_same_spacing_keeps_the_grid():
    venous = _ct_phase(4)
    case = preprocess_phases({"venous": venous}, _config(spacing=(2.5, 0.7, 0.7)))
    assert case.model_geometry == case.input_geometry
    np.testing.assert_allclose(
        case.data[0], normalize(sitk.GetArrayFromImage(venous), "ct"), atol=1e-6
    )


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def _good() -> sitk.Image:
    return oblique_image(np.random.default_rng(5).normal(size=(6, 8, 8)).astype(np.float32))


def _with(array: np.ndarray) -> sitk.Image:
    return oblique_image(array.astype(np.float32))


def _nan():
    a = np.random.default_rng(6).normal(size=(6, 8, 8))
    a[2, 3, 4] = np.nan
    return _with(a)


def _inf():
    a = np.random.default_rng(6).normal(size=(6, 8, 8))
    a[1, 1, 1] = np.inf
    return _with(a)


BAD_IMAGES = {
    "2D": (lambda: sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(8, 8))), "2D"),
    "4D": (lambda: sitk.JoinSeries([_good(), _good()]), "4D"),
    "vector": (
        lambda: sitk.GetImageFromArray(
            np.random.default_rng(0).normal(size=(6, 8, 8, 3)), isVector=True
        ),
        "components",
    ),
    "nan": (_nan, "NaN"),
    "inf": (_inf, "infinite"),
    "empty": (lambda: sitk.Image([0, 8, 8], sitk.sitkFloat32), "empty"),
    "constant": (lambda: _with(np.full((6, 8, 8), 7.0)), "constant"),
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_bad_image_raises_input_error_naming_the_phase(kind):
    make, words = BAD_IMAGES[kind]
    with pytest.raises(InputError, match=words) as info:
        preprocess_phases({"arterial": _good(), "venous": make()}, _config())
    assert "venous" in str(info.value)
    with pytest.raises(InputError, match="my scan"):
        validate_image(make(), "my scan")


def test_integer_image_passes_validation():
    validate_image(oblique_image(np.arange(6 * 8 * 8, dtype=np.int16).reshape(6, 8, 8)), "x")


@pytest.mark.parametrize("what", ["size", "spacing", "origin", "direction"])
def test_different_grids_are_rejected(what):
    arterial = _good()
    venous = _good()
    if what == "size":
        venous = _with(np.random.default_rng(7).normal(size=(6, 8, 9)))
        words = "size"
    elif what == "spacing":
        venous.SetSpacing((0.7, 0.7, 3.0))
        words = "spacing"
    elif what == "origin":
        venous.SetOrigin(np.add(arterial.GetOrigin(), (0.0, 0.5, 0.0)).tolist())
        words = "origin"
    else:
        venous.SetDirection(tuple(_rotation("z", 25).ravel()))
        words = "direction"
    with pytest.raises(InputError, match=words) as info:
        preprocess_phases({"arterial": arterial, "venous": venous}, _config())
    message = str(info.value)
    assert "arterial" in message and "venous" in message and "Register" in message


def test_grids_equal_up_to_header_round_off_are_accepted():
    arterial = _good()
    venous = _good()
    venous.SetOrigin(np.add(arterial.GetOrigin(), (1e-6, -1e-6, 2e-6)).tolist())
    venous.SetSpacing(np.multiply(arterial.GetSpacing(), 1 + 1e-7).tolist())
    check_same_grid({"arterial": arterial, "venous": venous})


def test_unknown_or_no_phase_names():
    with pytest.raises(InputError, match="portal") as info:
        preprocess_phases({"portal": _good()}, _config())
    assert "arterial" in str(info.value) and "venous" in str(info.value)
    with pytest.raises(InputError, match="no phase"):
        preprocess_phases({}, _config())
