"""maml.stats: volumes, counts, diameters and burden on synthetic label maps of known geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from maml.config import Label
from maml.errors import InputError
from maml.stats import compute_statistics, max_distance

SPACING = (0.8, 0.6, 2.5)  # anisotropic (x, y, z) mm


def _rotation(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


OBLIQUE = tuple(_rotation([1, -2, 0.5], np.deg2rad(25)).ravel())


def grid(size=(80, 100, 30), spacing=SPACING, direction=None):
    """Physical coordinates (mm, relative to the origin, in the index frame) of voxel centres."""
    image = sitk.Image(list(size), sitk.sitkUInt8)
    image.SetSpacing(spacing)
    image.SetOrigin((-30.0, 12.0, 100.0))
    if direction is not None:
        image.SetDirection(direction)
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    return image, i * spacing[0], j * spacing[1], k * spacing[2]


def to_image(array, like):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(like)
    return image


def itk_feret(image, value):
    f = sitk.LabelShapeStatisticsImageFilter()
    f.ComputeFeretDiameterOn()
    f.Execute(image == value)
    return f.GetFeretDiameter(1)


def test_sphere_in_liver_box_volumes_diameter_centroid():
    ref, x, y, z = grid()
    labels = np.zeros(ref.GetSize()[::-1], np.uint8)
    labels[(x > 5) & (x < 55) & (y > 5) & (y < 55) & (z > 5) & (z < 70)] = 1  # liver box
    centre = (30.0, 30.0, 37.5)
    radius = 10.0
    sphere = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= radius**2
    labels[sphere] = 2
    image = to_image(labels, ref)
    stats = compute_statistics(image, label_names=["background", "liver", "tumor"])

    voxel_ml = 0.8 * 0.6 * 2.5 / 1000
    assert stats["voxel_volume_ml"] == pytest.approx(voxel_ml)
    assert stats["tumor_count"] == 1
    tumor = stats["tumors"][0]
    true_volume = 4 / 3 * math.pi * radius**3 / 1000
    assert tumor["volume_ml"] == pytest.approx(true_volume, rel=0.03)  # voxelisation error
    assert tumor["volume_ml"] == pytest.approx(sphere.sum() * voxel_ml)  # exact count
    assert tumor["diameter_mm"] == pytest.approx(2 * radius, abs=0.8)
    assert tumor["diameter_mm"] == pytest.approx(itk_feret(image, 2), rel=1e-6)
    # In-plane: the slice through the centre is a disc of diameter ~20 mm.
    assert tumor["axial_diameter_mm"] == pytest.approx(2 * radius, abs=0.8)
    assert tumor["axial_slice_index"] == 15
    expected_centroid = image.TransformContinuousIndexToPhysicalPoint(
        (centre[0] / 0.8, centre[1] / 0.6, centre[2] / 2.5))
    np.testing.assert_allclose(tumor["centroid_lps"], expected_centroid, atol=0.05)
    assert tumor["centroid_index"] == [38, 50, 15]

    liver_box = labels > 0
    assert stats["liver_volume_ml"] == pytest.approx(liver_box.sum() * voxel_ml)
    assert stats["liver_parenchyma_volume_ml"] == pytest.approx((labels == 1).sum() * voxel_ml)
    assert stats["tumor_volume_ml"] == pytest.approx(sphere.sum() * voxel_ml)
    assert stats["tumor_burden"] == pytest.approx(sphere.sum() / liver_box.sum())
    assert stats["label_volumes_ml"] == {"liver": pytest.approx(stats["liver_parenchyma_volume_ml"]),
                                         "tumor": pytest.approx(stats["tumor_volume_ml"])}


def test_cube_known_volume_and_diagonal_oblique():
    """A box of whole voxels: volume exact, diameter = the centre-to-centre space diagonal, the same
    with an oblique direction (distances do not depend on it)."""
    for direction in (None, OBLIQUE):
        ref, *_ = grid(size=(40, 40, 20), direction=direction)
        labels = np.zeros((20, 40, 40), np.uint8)
        labels[2:18, 3:30, 5:35] = 1
        labels[5:9, 10:20, 10:25] = 2  # 4 x 10 x 15 voxels
        image = to_image(labels, ref)
        stats = compute_statistics(image)
        tumor = stats["tumors"][0]
        assert tumor["volume_ml"] == pytest.approx(4 * 10 * 15 * 0.8 * 0.6 * 2.5 / 1000)
        diagonal = math.sqrt((14 * 0.8) ** 2 + (9 * 0.6) ** 2 + (3 * 2.5) ** 2)
        assert tumor["diameter_mm"] == pytest.approx(diagonal)
        assert tumor["axial_diameter_mm"] == pytest.approx(math.hypot(14 * 0.8, 9 * 0.6))
        centre_index = (10 + 7, 10 + 4.5, 5 + 1.5)
        np.testing.assert_allclose(
            tumor["centroid_lps"], image.TransformContinuousIndexToPhysicalPoint(centre_index), atol=1e-6)


def test_two_tumors_sorted_by_volume_and_separate():
    ref, x, y, z = grid()
    labels = np.zeros(ref.GetSize()[::-1], np.uint8)
    labels[2:28, 5:95, 5:75] = 1
    small = (x - 15) ** 2 + (y - 15) ** 2 + (z - 30) ** 2 <= 5**2
    big = (x - 40) ** 2 + (y - 40) ** 2 + (z - 35) ** 2 <= 9**2
    labels[small] = 2
    labels[big] = 2
    stats = compute_statistics(to_image(labels, ref))
    assert stats["tumor_count"] == 2
    volumes = [t["volume_ml"] for t in stats["tumors"]]
    assert volumes == sorted(volumes, reverse=True)
    assert [t["id"] for t in stats["tumors"]] == [1, 2]
    assert volumes[0] == pytest.approx(big.sum() * 0.0012)
    assert volumes[1] == pytest.approx(small.sum() * 0.0012)
    assert stats["tumors"][0]["diameter_mm"] == pytest.approx(18, abs=0.8)
    assert stats["tumors"][1]["diameter_mm"] == pytest.approx(10, abs=0.8)


def test_diagonal_touch_is_one_tumor_26_connectivity():
    ref, *_ = grid(size=(20, 20, 10))
    labels = np.ones((10, 20, 20), np.uint8)
    labels[2:4, 2:5, 2:5] = 2
    labels[4:6, 5:8, 5:8] = 2  # touches the first only at a corner (k=3/4, j=4/5, i=4/5)
    stats = compute_statistics(to_image(labels, ref), min_tumor_ml=0)
    assert stats["tumor_count"] == 1
    labels[4:6, 5:8, 5:8] = 1
    labels[4:6, 6:9, 6:9] = 2  # now a one-voxel gap: two tumors
    stats = compute_statistics(to_image(labels, ref), min_tumor_ml=0)
    assert stats["tumor_count"] == 2


def test_small_components_are_ignored_but_counted_in_volume():
    ref, *_ = grid(size=(30, 30, 10))
    labels = np.ones((10, 30, 30), np.uint8)
    labels[3:7, 5:15, 5:15] = 2  # 400 voxels = 0.48 mL
    labels[8, 25, 25] = 2  # one stray voxel, 0.0012 mL < 0.01 mL
    stats = compute_statistics(to_image(labels, ref))
    assert stats["tumor_count"] == 1
    assert stats["ignored_tumor_components"] == 1
    assert stats["ignored_tumor_volume_ml"] == pytest.approx(0.0012)
    assert stats["tumor_volume_ml"] == pytest.approx(401 * 0.0012)
    assert compute_statistics(to_image(labels, ref), min_tumor_ml=0)["tumor_count"] == 2


def test_no_tumor_and_no_liver():
    ref, *_ = grid(size=(10, 10, 5))
    labels = np.zeros((5, 10, 10), np.uint8)
    labels[1:4, 2:8, 2:8] = 1
    stats = compute_statistics(to_image(labels, ref))
    assert stats["tumor_count"] == 0 and stats["tumors"] == []
    assert stats["tumor_volume_ml"] == 0
    assert stats["tumor_burden"] == 0
    assert stats["liver_volume_ml"] == pytest.approx(3 * 6 * 6 * 0.0012)

    empty = compute_statistics(to_image(np.zeros((5, 10, 10)), ref))
    assert empty["tumor_count"] == 0
    assert empty["liver_volume_ml"] == 0
    assert empty["tumor_burden"] is None

    only_tumor = np.zeros((5, 10, 10), np.uint8)
    only_tumor[1:4, 2:8, 2:8] = 2
    stats = compute_statistics(to_image(only_tumor, ref))
    assert stats["tumor_count"] == 1
    assert stats["tumor_burden"] is None


def test_label_names_from_config_labels_and_custom_values():
    ref, *_ = grid(size=(10, 10, 5))
    labels = np.zeros((5, 10, 10), np.uint8)
    labels[1:4, 2:8, 2:8] = 3
    labels[2, 4:6, 4:6] = 7
    names = [Label(0, "background"), Label(3, "liver"), Label(7, "lesion"), Label(9, "vessel")]
    stats = compute_statistics(to_image(labels, ref), liver_label=3, tumor_label=7, label_names=names,
                               min_tumor_ml=0)
    assert stats["tumor_count"] == 1
    assert stats["tumors"][0]["volume_ml"] == pytest.approx(4 * 0.0012)
    assert set(stats["label_volumes_ml"]) == {"liver", "lesion", "vessel"}
    assert stats["label_volumes_ml"]["vessel"] == 0


def test_max_distance_matches_brute_force_and_itk_on_random_blobs():
    rng = np.random.default_rng(1)
    # Many points (the fast path): compare with an exact search.
    for _ in range(3):
        pts = rng.normal(size=(3500, 3)) * rng.uniform(1, 20, size=3)
        exact = max(float(((pts - p) ** 2).sum(axis=1).max()) for p in pts)
        assert max_distance(pts) == pytest.approx(math.sqrt(exact), rel=1e-9)
    assert max_distance(np.zeros((1, 3))) == 0.0

    # A large irregular tumor against ITK's Feret diameter (same voxel-centre definition).
    ref, x, y, z = grid(size=(90, 110, 40))
    blob = np.zeros(ref.GetSize()[::-1], bool)
    for centre, r in [((25, 30, 40), 14), ((45, 35, 50), 10), ((30, 45, 35), 9)]:
        blob |= (x - centre[0]) ** 2 + ((y - centre[1]) * 1.3) ** 2 + (z - centre[2]) ** 2 <= r**2
    image = to_image(np.where(blob, 2, 1), ref)
    stats = compute_statistics(image)
    assert stats["tumor_count"] == 1
    assert stats["tumors"][0]["diameter_mm"] == pytest.approx(itk_feret(image, 2), rel=1e-9)


def test_bad_label_maps():
    with pytest.raises(InputError, match="label map"):
        compute_statistics(np.zeros((3, 3, 3)))
    with pytest.raises(InputError, match="3D"):
        compute_statistics(sitk.Image([4, 4], sitk.sitkUInt8))
    float_labels = sitk.GetImageFromArray(np.full((3, 4, 5), 0.5, np.float32))
    with pytest.raises(InputError, match="whole numbers"):
        compute_statistics(float_labels)


def test_label_counts_match_numpy_unique_for_any_integer_labels():
    from maml.stats import _label_counts

    rng = np.random.default_rng(4)
    for array in (rng.integers(0, 3, (20, 30, 30)).astype(np.uint8),  # the histogram
                  rng.integers(-2, 3, (5, 6, 7)).astype(np.int16),  # negative values: np.unique
                  np.array([[[0, 70000]]], dtype=np.int32)):  # large values: np.unique
        values, counts = np.unique(array, return_counts=True)
        assert _label_counts(array) == dict(zip(values.tolist(), counts.tolist()))
