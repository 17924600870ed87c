"""`maml segment` knows when not to answer: the bundled model refuses images unlike its training data.

The out-of-distribution inputs are the variants of Testing/ood_cases.py, made from the bundled sample
case (a phantom of the kind the model was trained on). benchmarks/domain_check.py runs the same
variants and 20 unseen phantoms and records the figures.
"""

import json

import numpy as np
import pytest
import SimpleITK as sitk

import ood_cases
from engine_helpers import save_tiny_liver_model
from maml.cli import main
from maml.errors import OutOfDistributionError
from maml.pipeline import SegmentOptions, default_model_path, segment, write_result

SAMPLE = default_model_path().parents[1] / "SampleData"


@pytest.fixture(scope="module")
def venous():
    return sitk.ReadImage(str(SAMPLE / "phantom_venous.nrrd"))


@pytest.fixture(scope="module")
def reports(venous):
    """Every check of every variant, measured (accepted, so nothing stops early)."""
    truth = sitk.ReadImage(str(SAMPLE / "phantom_truth.nrrd"))
    cases = {"original": venous, **ood_cases.variants(venous, truth)}
    out = {}
    for name, image in cases.items():
        result = segment({"venous": image}, options=SegmentOptions(accept_out_of_distribution=True))
        out[name] = result.stats["domain_check"]
    return out


def refused_by(report):
    return {check["name"] for check in report["checks"] if check["status"] == "refused"}


def test_the_sample_phase_alone_is_in_distribution(reports):
    assert reports["original"]["status"] == "ok", reports["original"]["sentence"]


@pytest.mark.parametrize("variant", ["hu_shift_1024", "mr_like", "no_liver_fov", "noise",
                                     "resampled_0.5mm", "slices_8mm", "flipped_head_to_foot"])
def test_each_out_of_distribution_variant_is_refused(reports, variant):
    report = reports[variant]
    assert refused_by(report), f"{variant} passed: {report['sentence']}"
    assert report["status"] == "warning" and report["accepted_out_of_distribution"]


def test_dozens_of_tumors_on_noise_are_refused_by_their_count(reports):
    # What the demo model made of real CT before the domain check existed: dozens of "tumors".
    counts = {name: next(c for c in report["checks"] if c["name"] == "tumor_count") for name, report in reports.items()}
    # The phantom's one tumor; the venous head alone adds a small false one (2.1 mL, twice the
    # uncertainty of the true tumor) with the model trained 150 epochs.
    assert counts["original"]["status"] == "ok" and 1 <= counts["original"]["value"] <= 2
    assert counts["noise"]["status"] == "refused", counts["noise"]
    assert counts["noise"]["value"] > counts["noise"]["threshold"]["refused_above"]


def test_the_feature_distance_alone_refuses_most_variants(reports):
    alone = [name for name, report in reports.items()
             if any("feature_distance" in check for check in refused_by(report))]
    assert "original" not in alone
    assert len(alone) >= 4, alone


def test_both_phases_of_the_sample_case_are_in_distribution(tmp_path):
    result = segment({"arterial": str(SAMPLE / "phantom_arterial.nrrd"),
                      "venous": str(SAMPLE / "phantom_venous.nrrd")})
    domain = result.stats["domain_check"]
    assert domain["status"] == "ok", domain["sentence"]
    features = [c for c in domain["checks"] if c["name"].endswith("feature_distance.mean")]
    assert {c["name"].split(".")[0] for c in features} == {"arterial", "venous"}
    # the uncertainty map: on the reference grid, in [0, 1], higher at the liver's edge than inside
    uncertainty = sitk.GetArrayFromImage(result.uncertainty)
    labels = sitk.GetArrayFromImage(result.labels)
    assert result.uncertainty.GetSize() == result.labels.GetSize()
    assert 0.0 <= uncertainty.min() and uncertainty.max() <= 1.0
    liver = labels == 1
    edge = liver & ~_eroded(liver)
    assert uncertainty[edge].mean() > 2 * uncertainty[_eroded(_eroded(liver))].mean()
    for tumor in result.stats["tumors"]:
        assert 0.0 <= tumor["mean_uncertainty"] <= 1.0
    write_result(result, tmp_path / "out", overview=False)
    assert (tmp_path / "out" / "uncertainty.nii.gz").is_file()


def _eroded(mask):
    return sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray(mask.astype(np.uint8)), [1, 1, 1])) > 0


def test_a_refusal_is_exit_code_3_with_one_line_and_no_output(venous, tmp_path, capsys):
    path = tmp_path / "unsigned.nii.gz"
    sitk.WriteImage(ood_cases.hu_shift(venous), str(path))
    out = tmp_path / "out"
    assert main(["segment", "--phase", f"venous={path}", "--out", str(out)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("maml segment: refused: maml-liver-demo was trained on synthetic "
                             "phantoms only and this image lies outside its training data (")
    assert "no result written" in err[0] and "--accept-out-of-distribution" in err[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["unsigned.nii.gz"]


def test_accepting_writes_results_marked_as_outside(venous, tmp_path, capsys):
    path = tmp_path / "unsigned.nii.gz"
    sitk.WriteImage(ood_cases.hu_shift(venous), str(path))
    out = tmp_path / "out"
    assert main(["segment", "--phase", f"venous={path}", "--out", str(out),
                 "--accept-out-of-distribution"]) == 0
    assert capsys.readouterr().out.startswith("WARNING: maml-liver-demo was trained on synthetic")
    domain = json.loads((out / "stats.json").read_text())["domain_check"]
    assert domain["status"] == "warning" and domain["accepted_out_of_distribution"]
    assert (out / "overview.png").is_file()  # with the band and watermark (test_overview checks them)


def test_a_header_with_50_mm_voxels_is_refused_before_any_allocation(venous, tmp_path, capsys):
    image = sitk.Image(venous)
    image.SetSpacing((50.0, 50.0, 50.0))
    path = tmp_path / "header_error.nii.gz"
    sitk.WriteImage(image, str(path))
    assert main(["segment", "--phase", f"venous={path}", "--out", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err.strip()
    assert "voxel spacing along" in err and len(err.splitlines()) == 1
    # a model without a fingerprint cannot tell; the memory estimate refuses instead
    tiny = save_tiny_liver_model(tmp_path / "tiny.pt")
    image.SetSpacing((200.0, 200.0, 200.0))
    sitk.WriteImage(image, str(path))
    assert main(["segment", "--phase", f"venous={path}", "--out", str(tmp_path / "out"),
                 "--model", str(tiny)]) == 1
    err = capsys.readouterr().err.strip()
    assert "GB of memory" in err and "voxel spacing" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_model_without_fingerprint_says_so(tmp_path):
    from engine_helpers import write_tiny_case

    tiny = save_tiny_liver_model(tmp_path / "tiny.pt")
    files = write_tiny_case(tmp_path)
    result = segment({"venous": files["venous"]}, tiny)
    domain = result.stats["domain_check"]
    assert domain["status"] == "warning"
    assert [c["name"] for c in domain["checks"] if c["status"] != "ok"] == ["fingerprint"]
    assert "carries no training fingerprint" in domain["sentence"]


def test_refusal_raises_in_the_python_api(venous):
    with pytest.raises(OutOfDistributionError, match="no result written"):
        segment({"venous": ood_cases.noise(venous)})


def test_segment_batch_lists_a_refused_case_and_goes_on(venous, tmp_path, capsys):
    sitk.WriteImage(ood_cases.hu_shift(venous), str(tmp_path / "unsigned.nii.gz"))
    sitk.WriteImage(ood_cases.noise(venous), str(tmp_path / "noise.nii.gz"))
    (tmp_path / "cases.csv").write_text("case,venous\nunsigned,unsigned.nii.gz\nnoise,noise.nii.gz\n")
    out = tmp_path / "out"
    assert main(["segment-batch", "--input", str(tmp_path / "cases.csv"), "--out", str(out)]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["case"], r["status"], r["domain_check"]) for r in summary["rows"]] == [
        ("noise", "refused", "refused"), ("unsigned", "refused", "refused")]
    assert all("no result written" in r["message"] for r in summary["rows"])
    assert not (out / "unsigned").exists() and not (out / "noise").exists()
    assert "domain_check" in (out / "summary.csv").read_text().splitlines()[0]
