"""maml.stats.tumor_enhancement: per-phase enhancement of each tumor on phantoms whose lesion kinds
enhance in known ways (maml.synthetic.contrast.lesion_hu)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from maml.errors import InputError
from maml.synthetic import make_case
from maml.stats import ENHANCEMENT_NOTE, SHELL_MM, add_enhancement, compute_statistics, tumor_enhancement

KINDS = ["hypervascular", "hypovascular", "arterial_only", "venous_only", "cyst"]
# (aphe, washout) the phantom's lesion kinds are drawn with: HCC-like is bright in the arterial phase
# and washes out; a metastasis is dark in both; a cyst is water (darker than the liver in both).
EXPECTED = {
    "hypervascular": (True, True),
    "hypovascular": (False, True),
    "arterial_only": (True, False),
    "venous_only": (False, True),
    "cyst": (False, True),
}


def phases_on_venous_grid(case):
    venous = case.images["venous"]
    arterial = sitk.Resample(case.images["arterial"], venous, case.arterial_to_venous, sitk.sitkLinear,
                             -1000.0, sitk.sitkFloat32)
    return {"arterial": arterial, "venous": venous}


def matched(case, stats):
    """(truth, entry) per listed tumor: the phantom's tumor nearest to the tumor's centroid."""
    pairs = []
    for tumor in stats["tumors"]:
        truth = min(case.tumors, key=lambda t: np.linalg.norm(np.subtract(t["centre_mm"], tumor["centroid_lps"])))
        pairs.append((truth, tumor))
    return pairs


# Seeds whose drawn protocol has slices of at most 2 mm (the generator draws 0.7-5 mm): thin enough
# for the small kinds to keep a core inside their rim, which the capsule assertions need.
@pytest.fixture(scope="module", params=[2, 8])
def enhanced_case(request):
    case = make_case(request.param, tumor_kinds=KINDS)
    labels = case.labels["venous"]
    stats = add_enhancement(compute_statistics(labels), labels, phases_on_venous_grid(case))
    return case, stats


def test_every_tumor_gets_its_kinds_flags(enhanced_case):
    case, stats = enhanced_case
    pairs = matched(case, stats)
    assert sorted(t["kind"] for t, _ in pairs) == sorted(KINDS)  # each kind listed once
    for truth, tumor in pairs:
        e = tumor["enhancement"]
        assert (e["aphe"], e["washout"]) == EXPECTED[truth["kind"]], (truth, e)
        # The capsule the phantom draws around most HCC-like lesions; no other kind has one. A tumor
        # too thin to have a core (under 2 * RIM_MM across) gets no capsule flag.
        if e["core_median_hu"]["venous"] is None:
            assert e["capsule"] is None
        else:
            assert e["capsule"] == (truth["kind"] == "hypervascular" and truth["capsule"]), (truth, e)
        assert e["note"] == ENHANCEMENT_NOTE and "not a LI-RADS category" in e["note"]
    assert sum(t["enhancement"]["capsule"] is not None for _, t in pairs) >= 4  # the flag is really tested


def test_contrast_is_tumor_minus_surrounding_liver_and_follows_the_truth(enhanced_case):
    case, stats = enhanced_case
    for truth, tumor in matched(case, stats):
        e = tumor["enhancement"]
        for phase in ("arterial", "venous"):
            assert e["contrast_hu"][phase] == e["tumor_median_hu"][phase] - e["liver_median_hu"][phase]
            # the phantom's noise-free mean contrast; medians over blurred voxels shrink it a little
            expected = truth["contrast_hu"][phase]
            if abs(expected) >= 30:
                assert np.sign(e["contrast_hu"][phase]) == np.sign(expected)
                assert abs(e["contrast_hu"][phase]) <= abs(expected) + 10
        # the phantom liver's own HU (the shell is parenchyma only, no tumor, no vessels' extremes)
        for phase in ("arterial", "venous"):
            assert abs(e["liver_median_hu"][phase] - case.info["liver_hu"][phase]) < 15
        assert e["liver_shell_mm"] == SHELL_MM and e["liver_shell_voxels"] > 0


def test_shell_is_liver_within_5_mm():
    """A cube tumor in a liver of 100 HU, a ring of 200 HU 4-5 mm away and 0 HU beyond: the shell
    sees the liver and the ring only; tumor at 50 HU."""
    size, spacing = (60, 60, 30), (1.0, 1.0, 2.0)
    labels = np.ones(size[::-1], np.uint8)
    hu = np.full(size[::-1], 100.0, np.float32)
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    # Chebyshev distance (mm) from a cube of half size 8 mm in x/y and 8 mm in z
    d = np.maximum.reduce([np.abs(i - 30) - 8, np.abs(j - 30) - 8, (np.abs(k - 15) - 4) * 2.0])
    labels[d <= 0] = 2
    hu[d <= 0] = 50.0
    hu[d > 8] = 0.0  # beyond the shell: would pull the liver median down if it were counted
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing(spacing)
    phase = sitk.GetImageFromArray(hu)
    phase.CopyInformation(image)
    [entry] = tumor_enhancement(image, {"venous": phase})
    assert entry["tumor_median_hu"] == {"venous": 50.0}
    assert entry["liver_median_hu"] == {"venous": 100.0}
    assert entry["contrast_hu"] == {"venous": -50.0}
    assert entry["washout"] is True and entry["aphe"] is None  # no arterial phase: no APHE flag
    assert entry["capsule"] is False  # rim and core both 50 HU


def test_phase_off_the_label_grid_is_refused():
    case = make_case(3, size="tiny", tumor_kinds=["hypervascular"])
    with pytest.raises(InputError, match="phase 'arterial': not on the label map's grid"):
        tumor_enhancement(case.labels["venous"], {"arterial": case.images["arterial"]})
