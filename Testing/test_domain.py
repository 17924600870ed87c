"""The out-of-distribution check's parts (maml.domain, maml.training.fingerprint) on hand-made measurements."""

import numpy as np
import pytest
import SimpleITK as sitk

from engine_helpers import tiny_config
from maml import domain
from maml.training.fingerprint import build_fingerprint


def test_shrunk_covariance_is_ledoit_wolf_and_well_conditioned_with_few_samples():
    samples = np.random.default_rng(0).normal(size=(12, 40))  # fewer samples than channels
    covariance = domain.shrunk_covariance(samples)
    assert np.linalg.eigvalsh(covariance).min() > 0
    sklearn = pytest.importorskip("sklearn.covariance")
    np.testing.assert_allclose(covariance, sklearn.ledoit_wolf(samples)[0], atol=1e-12)


def test_mahalanobis_distance_matches_the_definition():
    rng = np.random.default_rng(1)
    samples = rng.normal(size=(500, 3)) * [1.0, 2.0, 0.5]
    stats = domain.feature_statistics(samples)
    x = np.array([[3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    covariance = np.linalg.inv(np.asarray(stats["precision"]))
    centred = x - samples.mean(0)
    expected = np.sqrt(np.einsum("nc,cd,nd->n", centred, np.linalg.inv(covariance), centred))
    np.testing.assert_allclose(domain.mahalanobis(x, stats), expected, rtol=1e-9)
    assert domain.mahalanobis(samples.mean(0)[None], stats)[0] == pytest.approx(0.0, abs=1e-9)


def test_body_windows_skip_air_and_fall_back_to_the_best_window():
    assert domain.body_windows(np.array([0.1, 0.6, 0.9]), 3).tolist() == [1, 2]
    assert domain.body_windows(np.array([0.1, 0.3, 0.2]), 3).tolist() == [1]
    assert domain.body_windows(np.full(3, np.nan), 3).tolist() == [0, 1, 2]


def _case(name, spacing, shape, hu_shift, liver_ml, burden, features, tumors=2):
    return {"case": name,
            "geometry": [{"spacing_mm": spacing, "extent_mm": [s * n for s, n in zip(spacing, shape)]}] * 2,
            "intensity": {p: {"body": {"p05": -100.0 + hu_shift, "p50": 40.0 + hu_shift, "p95": 150.0 + hu_shift},
                              "foreground": {"p05": 80.0, "p50": 110.0, "p95": 140.0},
                              "liver": {"p05": 90.0, "p50": 110.0 + hu_shift, "p95": 130.0}}
                          for p in ("arterial", "venous")},
            "liver_volume_ml": liver_ml, "tumor_burden": burden, "tumor_count": tumors,
            "features": features, "body_fraction": np.ones(len(features)), "phases": ["arterial", "venous"]}


@pytest.fixture(scope="module")
def fingerprint():
    rng = np.random.default_rng(2)
    train = [_case(f"t{i}", [3.0, 2.0, 2.0], [80, 160, 160], 5 * i, 1200 + 50 * i, 0.05,
                   rng.normal(size=(30, 2, 6))) for i in range(6)]
    calibration = [_case("c0", [3.0, 2.2, 2.2], [80, 150, 150], 10, 1300, 0.04, rng.normal(size=(30, 2, 6)),
                         tumors=6)]
    return build_fingerprint(train, calibration, ["arterial", "venous"], "synthetic", "phantoms")


def test_fingerprint_pools_ranges_and_takes_limits_from_held_out_cases(fingerprint):
    assert fingerprint["geometry"]["spacing_mm"]["min"] == [3.0, 2.0, 2.0]
    assert fingerprint["geometry"]["spacing_mm"]["max"] == [3.0, 2.2, 2.2]
    assert fingerprint["intensity"]["venous"]["body"]["p50"] == [40.0, 65.0]
    assert fingerprint["output"]["liver_volume_ml"] == [1200.0, 1450.0]
    assert fingerprint["limits_from"] == "calibration cases"
    venous = fingerprint["features"]["venous"]
    assert venous["windows"] == 180 and len(venous["calibration_max"]) == 1
    assert venous["calibration_max_limit"] == pytest.approx(venous["calibration_max"][0], abs=1e-3)
    summary = domain.fingerprint_summary(fingerprint)
    assert summary["training_cases"] == 6 and "features" not in summary
    assert summary["feature_distance_limits"]["venous"]["channels"] == 6


def _image(spacing_xyz, size_xyz, value=40.0):
    image = sitk.Image(list(size_xyz), sitk.sitkFloat32) + value
    image.SetSpacing(spacing_xyz)
    return image


def test_geometry_checks_warn_near_and_refuse_far_outside_the_training_range(fingerprint):
    def status(spacing_xyz, size_xyz):
        return domain.worst([c.status for c in domain.check_geometry(
            {"venous": _image(spacing_xyz, size_xyz)}, fingerprint)])

    assert status((2.1, 2.1, 3.0), (155, 155, 80)) == domain.OK
    assert status((1.5, 1.5, 3.0), (210, 210, 80)) == domain.WARNING  # 0.75 x the smallest spacing
    assert status((0.5, 0.5, 3.0), (640, 640, 80)) == domain.REFUSED
    assert status((2.1, 2.1, 8.0), (155, 155, 30)) == domain.REFUSED
    assert status((50.0, 50.0, 50.0), (160, 160, 80)) == domain.REFUSED  # an 8 m field of view


def test_intensity_check_refuses_unsigned_storage_without_rescale(fingerprint):
    config = tiny_config()
    config.normalization = {"arterial": "ct_dataset", "venous": "ct_dataset"}
    array = np.full((20, 30, 30), -1000.0, np.float32)
    array[:, 5:25, 5:25] = np.linspace(-100, 150, 400, dtype=np.float32).reshape(20, 20)
    image = sitk.GetImageFromArray(array)
    assert domain.worst([c.status for c in domain.check_intensity({"venous": image}, fingerprint, config)]) \
        == domain.OK
    shifted = sitk.GetImageFromArray(array + 1024)
    checks = domain.check_intensity({"venous": shifted}, fingerprint, config)
    assert domain.worst([c.status for c in checks]) == domain.REFUSED


def test_feature_check_thresholds_scale_the_held_out_limit(fingerprint):
    limit = fingerprint["features"]["venous"]["calibration_max_limit"]
    mean_limit = fingerprint["features"]["venous"]["calibration_mean_limit"]

    def status(factor):
        distances = {"venous": {"max": factor * limit, "mean": factor * mean_limit}}
        return domain.worst([c.status for c in domain.check_features(distances, fingerprint)])

    assert status(1.0) == domain.OK
    assert status(domain.FEATURE_MEAN_WARN + 0.1) == domain.WARNING
    assert status(domain.FEATURE_MEAN_REFUSE + 0.1) == domain.REFUSED


def test_feature_limits_lie_beyond_the_held_out_means_by_their_spread(fingerprint):
    stats = dict(fingerprint["features"]["venous"])
    stats["calibration_mean"] = [10.0, 11.0, 12.0, 11.0, 11.0, 13.0]
    stats["calibration_mean_limit"] = 13.0
    spread = float(np.std(stats["calibration_mean"], ddof=1))
    warn, refuse = domain.feature_mean_limits(stats)
    assert warn == pytest.approx(13.0 + domain.FEATURE_MEAN_WARN_SD * spread)
    assert refuse == pytest.approx(13.0 + domain.FEATURE_MEAN_REFUSE_SD * spread)
    wider = dict(stats, calibration_mean=[7.0, 9.0, 13.0, 11.0, 8.0, 13.0])
    assert domain.feature_mean_limits(wider)[1] > refuse  # varied held-out cases: a wider margin
    few = dict(stats, calibration_mean=[13.0])  # no spread to measure: fixed factors
    assert domain.feature_mean_limits(few) == pytest.approx(
        (domain.FEATURE_MEAN_WARN * 13.0, domain.FEATURE_MEAN_REFUSE * 13.0))


def _body_with_lungs_above_the_liver():
    hu = np.full((40, 50, 50), -1000.0, np.float32)
    hu[:, 5:45, 5:45] = 40.0  # the body, every slice
    hu[30:38, 15:35, 15:35] = -850.0  # lungs: air inside the body, high up (z index grows to the head)
    liver = np.zeros(hu.shape, bool)
    liver[10:20, 15:35, 15:35] = True
    return hu, liver


def test_lungs_below_the_liver_are_refused_whatever_the_training_range(fingerprint):
    hu, liver = _body_with_lungs_above_the_liver()
    wide = {**fingerprint, "output": {**fingerprint["output"], "internal_air_offset_mm": [3.0, 95.0]}}

    def orientation(hu, liver):
        image = sitk.GetImageFromArray(hu)
        image.SetSpacing((2.0, 2.0, 2.5))
        checks = domain.check_output(liver.astype(np.uint8), (2.5, 2.0, 2.0), {"venous": image}, wide, 1, 2)
        return {c.name: c for c in checks}["orientation.internal_air_above_liver_mm"]

    assert orientation(hu, liver).status == domain.OK  # lungs 47.5 mm above the liver
    flipped = orientation(hu[::-1].copy(), liver[::-1].copy())
    assert flipped.value == pytest.approx(-47.5)  # within 100 mm of the training range, yet refused
    assert flipped.status == domain.REFUSED and "flipped head to foot" in flipped.message


def test_output_checks_refuse_a_missing_liver_and_warn_on_pieces(fingerprint):
    spacing = (3.0, 2.0, 2.0)
    labels = np.zeros((60, 100, 100), np.uint8)
    phases = {"venous": sitk.GetImageFromArray(np.full(labels.shape, 110.0, np.float32))}
    no_liver = domain.check_output(labels, spacing, phases, fingerprint, 1, 2)
    assert {c.name: c.status for c in no_liver}["liver_volume_ml"] == domain.REFUSED
    labels[10:50, 20:74, 20:70] = 1  # 108,000 voxels of 12 mm^3: 1296 mL
    labels[20:25, 40:45, 40:45] = 2
    fine = {c.name: c.status for c in domain.check_output(labels, spacing, phases, fingerprint, 1, 2)}
    assert fine["liver_volume_ml"] == domain.OK and fine["liver_pieces"] == domain.OK
    assert fine["tumor_burden"] == domain.OK and fine["venous.liver_intensity.p50"] == domain.OK
    pieces = labels.copy()
    for z in range(8, 50, 10):
        pieces[z] = 0  # cut the liver into slabs
    assert {c.name: c.status for c in domain.check_output(pieces, spacing, phases, fingerprint, 1, 2)}[
        "liver_pieces"] != domain.OK


def test_tumor_count_far_beyond_the_training_cases_is_refused(fingerprint):
    assert fingerprint["output"]["tumor_count_max"] == 6  # the most of any case, held-out ones included

    def status(count):
        (check,) = domain.check_tumor_count(count, fingerprint)
        return check.status

    assert status(0) == status(9) == domain.OK  # up to 1.5 x 6
    assert status(10) == status(18) == domain.WARNING
    assert status(19) == domain.REFUSED  # beyond 3 x 6: what real CT gave the demo model (32)
    assert domain.fingerprint_summary(fingerprint)["tumor_count_limits"] == {"warning_above": 9,
                                                                           "refused_above": 18}
    few = {**fingerprint, "output": {**fingerprint["output"], "tumor_count_max": 0}}
    assert domain.tumor_count_limits(few["output"]) == (4, 9)  # a floor: 1.5 x 3 and 3 x 3
    # a fingerprint made before the count was recorded: no check, no limits
    older = {**fingerprint, "output": {k: v for k, v in fingerprint["output"].items() if k != "tumor_count_max"}}
    assert domain.check_tumor_count(50, older) == []
    assert "tumor_count_limits" not in domain.fingerprint_summary(older)


def test_tumors_are_counted_as_the_statistics_list_them():
    from maml.stats import compute_statistics, count_tumors

    labels = np.zeros((20, 40, 40), np.uint8)
    labels[2:18, 2:38, 2:38] = 1
    labels[4:8, 4:8, 4:8] = 2
    labels[8, 8, 8] = 2  # touches the first one at a corner: one tumor (26-connected)
    labels[12:16, 20:24, 20:24] = 2
    labels[16, 30, 30] = 2  # one voxel of 8 mm^3 = 0.008 mL: below the 0.01 mL listed
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((2.0, 2.0, 2.0))
    assert count_tumors(image, 2) == compute_statistics(image)["tumor_count"] == 2


def test_memory_check_refuses_what_cannot_fit():
    config = tiny_config()
    image = _image((50.0, 50.0, 50.0), (160, 160, 80))
    check = domain.check_memory(image, config, 2, available=8 * 1024 ** 3)
    assert check.status == domain.REFUSED and "GB" in check.message
    assert domain.check_memory(_image((2.0, 2.0, 3.0), (64, 64, 32)), config, 2,
                               available=8 * 1024 ** 3).status == domain.OK


def test_report_sentence_names_model_reason_and_way_out():
    checks = [domain.Check("venous.feature_distance.max", domain.REFUSED, 41.0, {"refused_above": 12.0},
                           "venous feature distance (max over the body windows) 41.0, threshold 12.0"),
              domain.Check("liver_volume_ml", domain.OK, 1300, None, "liver volume")]
    refused = domain.summarize(checks, "maml-liver-demo", "synthetic", False)
    assert refused.status == domain.REFUSED
    assert refused.sentence.startswith("maml-liver-demo was trained on synthetic phantoms only")
    assert "41.0, threshold 12.0" in refused.sentence and "--accept-out-of-distribution" in refused.sentence
    with pytest.raises(domain.OutOfDistributionError, match="no result written"):
        domain.raise_if_refused(refused)
    accepted = domain.summarize(checks, "maml-liver-demo", "synthetic", True)
    assert accepted.status == domain.WARNING and accepted.accepted_out_of_distribution
    assert domain.summarize(checks[1:], "m", "clinical", False).status == domain.OK


def test_internal_air_offset_tells_head_from_foot():
    hu, liver = _body_with_lungs_above_the_liver()
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((2.0, 2.0, 2.5))  # 32 mL of air
    assert domain.internal_air_offset_mm(image, liver) == pytest.approx((33.5 - 14.5) * 2.5)
    flipped = sitk.GetImageFromArray(hu[::-1].copy())
    flipped.SetSpacing((2.0, 2.0, 2.5))
    assert domain.internal_air_offset_mm(flipped, liver[::-1]) == pytest.approx(-(33.5 - 14.5) * 2.5)
    hu[30:38, 15:35, 15:35] = 40.0  # no air inside the body: nothing to judge
    assert domain.internal_air_offset_mm(sitk.GetImageFromArray(hu), liver) is None
