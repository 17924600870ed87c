"""The dual-phase liver CT phantom (maml.synthetic) and the ``maml phantom`` subcommand."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from maml import synthetic as phantom
from maml.cli import main
from maml.errors import InputError
from maml.synthetic import contrast
from maml.synthetic.contrast import draw_timing, tissue_hu
from maml.synthetic.lesions import mimic_plan, tumor_plan
from maml.synthetic.scanner import SLICE_CHOICES, draw_protocol


def arr(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def demo_case() -> phantom.PhantomCase:
    return phantom.make_case(8, "demo", tumor_kinds=["hypervascular", "hypovascular"])


@pytest.fixture(scope="module")
def tiny_case() -> phantom.PhantomCase:
    return phantom.make_case(5, "tiny")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "Dataset001_Phantom"
    assert main(["phantom", "--out", str(out), "--cases", "3", "--seed", "20", "--size", "tiny", "--quiet"]) == 0
    return out


# ------------------------------------------------------------------------------------ determinism


def test_same_seed_gives_identical_case(tiny_case):
    again = phantom.make_case(5, "tiny")
    assert again.case_id == tiny_case.case_id == "phantom_0005"
    for phase in phantom.PHASES:
        np.testing.assert_array_equal(arr(again.images[phase]), arr(tiny_case.images[phase]))
        np.testing.assert_array_equal(arr(again.labels[phase]), arr(tiny_case.labels[phase]))
        assert again.images[phase].GetOrigin() == tiny_case.images[phase].GetOrigin()
    point = tiny_case.info["liver_centre_mm"]
    assert again.arterial_to_venous.TransformPoint(point) == tiny_case.arterial_to_venous.TransformPoint(point)
    assert again.tumors == tiny_case.tumors


def test_different_seed_gives_different_case(tiny_case):
    other = phantom.make_case(6, "tiny")
    assert other.case_id != tiny_case.case_id
    a, b = arr(other.images["venous"]), arr(tiny_case.images["venous"])
    assert a.shape != b.shape or not np.array_equal(a, b)
    assert other.images["venous"].GetSpacing() != tiny_case.images["venous"].GetSpacing()


# ------------------------------------------------------------------------------ labels and tissue


def test_labels_are_background_liver_tumor(demo_case, tiny_case):
    for case in (demo_case, tiny_case):
        for phase in phantom.PHASES:
            lab = case.labels[phase]
            assert lab.GetPixelID() == sitk.sitkUInt8
            assert case.images[phase].GetPixelID() == sitk.sitkInt16
            values = set(np.unique(arr(lab)).tolist())
            assert values <= {0, 1, 2}
            assert 1 in values
            # The label of a phase lies on that phase's image grid.
            assert lab.GetSize() == case.images[phase].GetSize()
            assert lab.GetOrigin() == case.images[phase].GetOrigin()
            assert lab.GetSpacing() == case.images[phase].GetSpacing()
    liver_ml = float((arr(demo_case.labels["venous"]) > 0).sum()) * np.prod(demo_case.images["venous"].GetSpacing()) / 1000
    assert 600 < liver_ml < 3000, liver_ml


def test_hounsfield_units_are_plausible(demo_case):
    art, ven = arr(demo_case.images["arterial"]).astype(float), arr(demo_case.images["venous"]).astype(float)
    la, lv = arr(demo_case.labels["arterial"]), arr(demo_case.labels["venous"])
    liver_a, liver_v = np.median(art[la == 1]), np.median(ven[lv == 1])
    # The images show the HU the case drew (vessels and mimics in the liver label shift the median a little).
    drawn = demo_case.info["liver_hu"]
    assert abs(liver_a - drawn["arterial"]) < 12 and abs(liver_v - drawn["venous"]) < 12, (liver_a, liver_v, drawn)
    assert 15 < liver_a < 110 and 50 < liver_v < 170
    assert liver_v > liver_a + 10
    # Air outside the body (image corners), lung at the top, bone, fat.
    for image in (art, ven):
        assert np.mean(image[:, :8, :8]) < -950
        assert np.percentile(image[-3:], 5) < -700  # lung bases in the top slices
        assert np.percentile(image, 99.8) > 350  # bone
        assert ((image > -130) & (image < -70)).mean() > 0.03  # fat
    # The aorta is the brightest large vessel in the arterial phase: ~300 HU, ~150 venous.
    assert np.percentile(art, 99.5) > 220


def _tumor_voxels(case, tumor, phase):
    """Label-2 voxels of the tumor's viable part, in the phase's own geometry: within 0.6 radius of
    its centre, or 0.65-0.9 radius around a necrotic core (necrosis is fluid in both phases)."""
    image, label = case.images[phase], case.labels[phase]
    centre = tumor["centre_mm"]
    if phase == "arterial":
        centre = case.arterial_to_venous.TransformPoint(centre)
    size = np.array(image.GetSize())
    idx = np.indices(size[::-1]).reshape(3, -1)[::-1].T  # (x, y, z) per voxel, array order
    pts = np.asarray(image.GetOrigin()) + idx * np.asarray(image.GetSpacing())
    dist = np.linalg.norm(pts - centre, axis=1) / tumor["radius_mm"]
    near = ((dist > 0.65) & (dist < 0.9) if tumor["necrotic"] else dist < 0.6).reshape(size[::-1])
    return near & (arr(label) == 2)


def test_tumor_kinds_enhance_as_described(demo_case):
    kinds = {t["kind"]: t for t in demo_case.tumors}
    assert set(kinds) == {"hypervascular", "hypovascular"}
    means = {}
    for phase in phantom.PHASES:
        image = arr(demo_case.images[phase]).astype(float)
        liver = np.mean(image[arr(demo_case.labels[phase]) == 1])
        for kind, tumor in kinds.items():
            m = _tumor_voxels(demo_case, tumor, phase)
            assert m.sum() > 10
            means[kind, phase] = np.mean(image[m]) - liver
    assert means["hypervascular", "arterial"] > 20  # bright in the arterial phase
    assert means["hypervascular", "venous"] < 0  # washout
    # Dark, clearest in the venous phase, by what the case drew (>= 18 HU: weakly conspicuous cases exist).
    assert means["hypovascular", "venous"] < -12
    assert abs(means["hypovascular", "venous"] - kinds["hypovascular"]["contrast_hu"]["venous"]) < 10
    assert means["hypovascular", "venous"] < means["hypovascular", "arterial"]
    assert kinds["hypervascular"]["visible_phases"] == ["arterial", "venous"]
    assert "venous" in kinds["hypovascular"]["visible_phases"]


def test_one_phase_and_cyst_tumors_and_no_tumor():
    case = phantom.make_case(3, "tiny", tumor_kinds=["arterial_only", "venous_only", "cyst"])
    seen = {t["kind"]: t for t in case.tumors}
    assert seen, "no tumor could be placed"
    if "arterial_only" in seen:
        assert seen["arterial_only"]["visible_phases"] == ["arterial"]
    if "venous_only" in seen:
        assert seen["venous_only"]["visible_phases"] == ["venous"]
    if "cyst" in seen:
        assert seen["cyst"]["contrast_hu"]["venous"] < -60
    empty = phantom.make_case(3, "tiny", tumor_kinds=[])
    assert empty.tumors == []
    assert 2 not in np.unique(arr(empty.labels["venous"]))
    with pytest.raises(InputError, match="tumor kind"):
        phantom.make_case(3, "tiny", tumor_kinds=["benign"])


# ----------------------------------------------------------------------------------------- geometry


def test_demo_geometry_is_drawn_per_case_within_the_protocol_ranges(demo_case):
    ven = demo_case.images["venous"]
    sx, sy, sz = ven.GetSpacing()
    assert sx == sy and 1.0 <= sx <= 4.5
    assert sz in SLICE_CHOICES
    nx, ny, nz = ven.GetSize()
    assert 0.5 < nx * ny * nz / (160 * 160 * 80) < 1.6
    assert ven.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    assert list(ven.GetSize()) == demo_case.info["grid_xyz"]


def test_arterial_geometry_and_anatomy_differ(demo_case):
    art, ven = demo_case.images["arterial"], demo_case.images["venous"]
    assert art.GetSpacing() == ven.GetSpacing()
    assert art.GetOrigin() != ven.GetOrigin()
    p = np.array(demo_case.info["liver_centre_mm"])
    shift = np.array(demo_case.arterial_to_venous.TransformPoint(p.tolist())) - p
    breathing = demo_case.info["breathing"]
    tx, ty, tz = breathing["translation_mm"]
    assert 5.0 <= abs(tz) <= 15.0 and abs(tx) <= 3 and abs(ty) <= 3  # mostly cranio-caudal
    assert 1.0 <= breathing["rotation_deg"] <= 3.0
    # At the liver the shift is the rigid one give or take the smooth deformation (a few mm).
    assert abs(shift[2] - tz) < 9.0 and np.linalg.norm(shift) > 2.0


def test_transform_aligns_arterial_to_venous(demo_case):
    ven_img = demo_case.images["venous"]
    ven_lab = arr(demo_case.labels["venous"]) > 0
    aligned = sitk.Resample(demo_case.labels["arterial"], ven_img, demo_case.arterial_to_venous, sitk.sitkNearestNeighbor, 0)
    unaligned = sitk.Resample(demo_case.labels["arterial"], ven_img, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    d_aligned, d_unaligned = dice(arr(aligned) > 0, ven_lab), dice(arr(unaligned) > 0, ven_lab)
    assert d_aligned > 0.97, d_aligned
    assert d_unaligned < 0.93 and d_unaligned < d_aligned - 0.04, (d_aligned, d_unaligned)
    # The images themselves: resampling the arterial image with the transform (as elastix would)
    # brings its edges (bone, air, organ outlines) onto the venous ones.
    art_res = {name: arr(sitk.Resample(demo_case.images["arterial"], ven_img, t, sitk.sitkLinear, -1000)).astype(float)
               for name, t in (("aligned", demo_case.arterial_to_venous), ("unaligned", sitk.Transform()))}
    ven = arr(ven_img).astype(float)
    body = (ven > -500) & (art_res["aligned"] > -500)
    corr = {k: np.corrcoef(np.clip(v[body], -200, 400), np.clip(ven[body], -200, 400))[0, 1] for k, v in art_res.items()}
    assert corr["aligned"] > corr["unaligned"] + 0.05, corr


# --------------------------------------------------------------------------------- dataset writing


def test_nnunet_layout_and_dataset_json(dataset):
    ds = json.loads((dataset / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "arterial", "1": "venous"}
    assert ds["labels"] == {"background": 0, "liver": 1, "tumor": 2}
    assert ds["numTraining"] == 3 and ds["file_ending"] == ".nii.gz"
    cases = json.loads((dataset / "cases.json").read_text())
    ids = [c["case_id"] for c in cases["cases"]]
    assert ids == ["phantom_0020", "phantom_0021", "phantom_0022"]
    for cid in ids:
        art = sitk.ReadImage(str(dataset / "imagesTr" / f"{cid}_0000.nii.gz"))
        ven = sitk.ReadImage(str(dataset / "imagesTr" / f"{cid}_0001.nii.gz"))
        lab = sitk.ReadImage(str(dataset / "labelsTr" / f"{cid}.nii.gz"))
        lab_a = sitk.ReadImage(str(dataset / "labels_arterial" / f"{cid}.nii.gz"))
        assert art.GetPixelID() == ven.GetPixelID() == sitk.sitkInt16
        assert lab.GetPixelID() == lab_a.GetPixelID() == sitk.sitkUInt8
        assert lab.GetSize() == ven.GetSize() and np.allclose(lab.GetOrigin(), ven.GetOrigin())
        assert lab_a.GetSize() == art.GetSize() and np.allclose(lab_a.GetOrigin(), art.GetOrigin())
        tfm = sitk.ReadTransform(str(dataset / "transforms" / f"{cid}_arterial_to_venous.tfm"))
        assert tfm.GetNumberOfFixedParameters() > 0 or "Composite" in tfm.GetName()
    assert (dataset / "contact_sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    leftovers = [p.name for p in dataset.rglob("*") if ".part" in p.name or p.name.startswith(".")]
    assert leftovers == []


def test_cases_json_matches_labels_and_regenerates(dataset):
    cases = json.loads((dataset / "cases.json").read_text())["cases"]
    for record in cases:
        lab = sitk.ReadImage(str(dataset / record["label"]))
        values = arr(lab)
        assert record["n_tumors"] == len(record["tumors"])
        assert (2 in values) == (record["n_tumors"] > 0)
        for tumor in record["tumors"]:
            assert tumor["kind"] in phantom.TUMOR_KINDS
            assert set(tumor["visible_phases"]) <= {"arterial", "venous"}
            idx = lab.TransformPhysicalPointToIndex(tumor["centre_mm"])
            assert values[idx[2], idx[1], idx[0]] == 2
            assert tumor["volume_ml"] > 0 and tumor["radius_mm"] > 0
    # Any one case regenerates alone from its seed, with the same transform as the file.
    record = cases[1]
    case = phantom.make_case(record["seed"], "tiny")
    np.testing.assert_array_equal(arr(case.labels["venous"]), arr(sitk.ReadImage(str(dataset / record["label"]))))
    tfm = sitk.ReadTransform(str(dataset / record["arterial_to_venous"]))
    p = record["liver_centre_mm"]
    assert np.allclose(tfm.TransformPoint(p), case.arterial_to_venous.TransformPoint(p), atol=1e-6)


def test_written_bytes_are_deterministic(tmp_path):
    a = phantom.write_dataset(tmp_path / "a", n_cases=1, seed=30, size="tiny", progress=False)
    b = phantom.write_dataset(tmp_path / "b", n_cases=1, seed=30, size="tiny", progress=False)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 8
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


# -------------------------------------------------------------------------------------- bad input


def test_bad_input_is_reported(tmp_path, capsys):
    with pytest.raises(InputError, match="number of phantom cases"):
        phantom.write_dataset(tmp_path / "x", n_cases=0, seed=1)
    with pytest.raises(InputError, match="unknown phantom size 'huge'"):
        phantom.write_dataset(tmp_path / "x", n_cases=1, seed=1, size="huge")
    with pytest.raises(InputError, match="unknown phantom size"):
        phantom.make_case(1, "huge")
    with pytest.raises(InputError, match="seed"):
        phantom.make_case(-1, "tiny")
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(InputError, match="not writable") as info:
        phantom.write_dataset(blocker / "out", n_cases=1, seed=1, size="tiny")
    assert "file.txt" in str(info.value)
    assert main(["phantom", "--out", str(tmp_path / "y"), "--cases", "0", "--seed", "1"]) == 1
    assert "number of phantom cases 0" in capsys.readouterr().err
    assert main(["phantom", "--out", str(tmp_path / "y"), "--cases", "1", "--size", "giant"]) == 1
    assert "giant" in capsys.readouterr().err
    assert not (tmp_path / "y" / "dataset.json").exists()
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            assert main(["phantom", "--out", str(locked), "--cases", "1", "--size", "tiny"]) == 1
            assert "not writable" in capsys.readouterr().err
        finally:
            locked.chmod(0o700)


# ------------------------------------------------------------------------- what is drawn per case

SEEDS = range(300)


def test_protocol_spans_slice_thickness_pixels_and_noise_around_the_demo_voxel_count():
    spec = phantom.SIZES["demo"]
    protocols = [draw_protocol(np.random.default_rng(s), spec, float(np.random.default_rng(s).uniform(240, 380)))
                 for s in SEEDS]
    sz = np.array([p["spacing"][2] for p in protocols])
    sxy = np.array([p["spacing"][0] for p in protocols])
    voxels = np.array([np.prod(p["size"]) for p in protocols])
    noise = np.array([p["noise_sd_venous"] for p in protocols])
    assert sz.min() == 0.7 and sz.max() == 5.0 and ((sz > 1.2) & (sz < 4)).mean() > 0.4
    assert 1.0 < sxy.min() and sxy.max() < 4.5 and sxy.max() / sxy.min() > 2
    # Thin slices pay with fewer pixels or a shorter z extent: the voxel count stays near 160x160x80.
    assert 0.8 < voxels.mean() / (160 * 160 * 80) < 1.1 and voxels.max() < 1.6 * 160 * 160 * 80
    assert 8.0 <= noise.min() and noise.max() <= 30.0 and noise.max() - noise.min() > 18
    grains = [p["noise_grain_mm"] for p in protocols]
    assert min(grains) < 0.7 and max(grains) > 1.4
    assert 0.04 < np.mean([abs(p["fov_shift_x"]) > 15 for p in protocols]) < 0.25  # some fields cut a side


def test_contrast_timing_gives_published_hu_ranges_per_phase():
    hus = [tissue_hu(rng, draw_timing(rng)) for rng in (np.random.default_rng(s) for s in SEEDS)]
    liver = np.array([h[contrast.LIVER][0] for h in hus])  # (arterial, venous)
    aorta = np.array([h[contrast.AORTA][0] for h in hus])
    portal = np.array([h[contrast.PORTAL][0] for h in hus])
    hv = np.array([h[contrast.HEPATIC_VEIN][0] for h in hus])
    assert (liver[:, 1] > liver[:, 0] + 10).all()  # the liver enhances most in the portal venous phase
    assert 95 < np.median(liver[:, 1]) < 130 and 55 < np.median(liver[:, 0]) < 90
    assert liver[:, 1].min() < 80  # some weakly enhancing (steatotic or low-dose) livers
    assert (aorta[:, 0] >= 180).all() and (aorta[:, 0] > aorta[:, 1]).all() and aorta[:, 0].max() > 330
    assert (portal[:, 1] >= 130).all() and portal[:, 0].min() < 90 and portal[:, 0].max() > 150
    # Hepatic veins: darker than the liver arterially; in early portal venous phases sometimes still darker.
    assert (hv[:, 0] < liver[:, 0] + 35).all() and (hv[:, 1] < liver[:, 1]).mean() > 0.15


def test_tumor_counts_sizes_and_mimics_over_many_cases():
    plans = [tumor_plan(np.random.default_rng(s), contrast.TUMOR_KINDS, contrast.KIND_WEIGHTS) for s in range(600)]
    counts = np.array([len(p) for p in plans])
    diameters = np.array([2 * r for p in plans for _, r in p])
    assert counts.min() == 0 and counts.max() == 8 and 0.1 < (counts == 0).mean() < 0.22
    assert diameters.min() >= 3.0 and diameters.max() <= 80.0
    assert (diameters < 10).mean() > 0.1 and (diameters > 40).mean() > 0.02  # many small, a few large
    assert all(k != "cyst" for p in plans for k, _ in p)  # random cysts are mimics, labelled liver
    # Coarse voxels: no tumor smaller than the case's visible size is labelled.
    coarse = [tumor_plan(np.random.default_rng(s), contrast.TUMOR_KINDS, contrast.KIND_WEIGHTS, min_diameter=10.0)
              for s in range(200)]
    assert min(2 * r for p in coarse for _, r in p) >= 10.0
    mimics = [mimic_plan(np.random.default_rng(s), steatosis=s % 5 == 0) for s in range(600)]
    kinds = {k for m in mimics for k, _ in m}
    assert kinds == set(phantom.MIMIC_KINDS)
    assert 2 < np.mean([len(m) for m in mimics]) < 8


def test_mimics_are_labelled_liver_and_look_like_lesions():
    case = phantom.make_case(11, "tiny", tumor_kinds=[], mimic_kinds=["cyst", "hemangioma", "vessel", "focal_fat"])
    lab = arr(case.labels["venous"])
    assert 2 not in np.unique(lab) and case.tumors == []
    mimics = case.info["mimics"]
    assert len(mimics) >= 3
    ven = arr(case.images["venous"]).astype(float)
    liver = np.median(ven[lab == 1])
    image = case.images["venous"]
    for mimic in mimics:
        if mimic["volume_ml"] > 0:
            i, j, k = image.TransformPhysicalPointToIndex(mimic["centre_mm"])
            assert lab[k, j, i] == 1, mimic
        if mimic["kind"] == "cyst" and mimic["volume_ml"] > 1.0:
            i, j, k = image.TransformPhysicalPointToIndex(mimic["centre_mm"])
            assert ven[k, j, i] < liver - 40  # water in the liver, yet not tumor
    with pytest.raises(InputError, match="mimic kind"):
        phantom.make_case(3, "tiny", mimic_kinds=["polyp"])


def test_drawn_values_are_reported_per_case(demo_case):
    info = demo_case.info
    assert info["spacing_xyz"] == list(demo_case.images["venous"].GetSpacing())
    assert set(info["tissue_hu"]) >= {"liver", "aorta", "portal_vein"}
    assert {"dose", "arterial_timing", "venous_timing", "conspicuity"} <= set(info["contrast_timing"])
    assert 8.0 <= info["noise_sd_hu"]["venous"] <= 30.0
