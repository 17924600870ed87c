"""The end-to-end job: `maml segment` on phantom files, its outputs, and every bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from engine_helpers import save_tiny_liver_model, write_tiny_case
from maml.cli import main
from maml.errors import CancelledError, RegistrationError
from maml.pipeline import SegmentOptions, segment, write_result


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_liver_model(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(scope="module")
def case_files(tmp_path_factory):
    return write_tiny_case(tmp_path_factory.mktemp("case"))


def run_segment(args, capsys):
    code = main(["segment", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(paths):
    return {p: Path(p).read_bytes() for p in paths}


def test_segment_both_phases_writes_every_output_in_the_reference_geometry(tiny_model, case_files, tmp_path, capsys):
    out = tmp_path / "out"
    before = snapshot([case_files["arterial"], case_files["venous"]])
    code, stdout, stderr = run_segment(
        ["--phase", f"arterial={case_files['arterial']}", "--phase", f"venous={case_files['venous']}",
         "--out", out, "--model", tiny_model, "--register", "rigid", "--json-progress"], capsys)
    assert code == 0, stderr
    assert snapshot([case_files["arterial"], case_files["venous"]]) == before  # inputs untouched

    names = sorted(p.name for p in out.iterdir())
    assert names == ["arterial_registered.nii.gz", "attention_arterial.nii.gz", "attention_venous.nii.gz",
                     "overview.png", "segmentation.nii.gz", "stats.json", "transform_arterial.h5",
                     "uncertainty.nii.gz"]
    venous = sitk.ReadImage(str(case_files["venous"]))
    for name in ("segmentation.nii.gz", "attention_venous.nii.gz", "arterial_registered.nii.gz"):
        image = sitk.ReadImage(str(out / name))
        assert image.GetSize() == venous.GetSize()
        np.testing.assert_allclose(image.GetOrigin(), venous.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(image.GetSpacing(), venous.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(image.GetDirection(), venous.GetDirection(), atol=1e-6)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.nii.gz")))
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}
    heat = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "attention_arterial.nii.gz")))
    assert heat.min() >= 0 and heat.max() <= 1
    # set to 0 in air (constant input after clipping: the attention there means nothing), kept inside
    air = sitk.GetArrayFromImage(venous) < -500
    assert air.any() and (~air).any()
    assert (heat[air] == 0).all() and (heat[~air] > 0).mean() > 0.99
    # maps in steps of 1/1024 (inference.unit_steps): what lets deflate compress them
    uncertainty = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "uncertainty.nii.gz")))
    for values in (heat, uncertainty):
        assert values.dtype == np.float32 and np.array_equal(values * 1024, np.rint(values * 1024))
    assert len(np.unique(uncertainty)) > 10  # rounded, not flattened
    sitk.ReadTransform(str(out / "transform_arterial.h5"))

    stats = json.loads((out / "stats.json").read_text())
    assert stats["reference_phase"] == "venous" and stats["head"] == "fused"
    assert stats["model"]["name"] == "tiny" and len(stats["model"]["sha256"]) == 64
    assert stats["postprocessing"] == {"largest_component": False, "min_volume_ml": {}}  # the model's
    assert set(stats["timings"]) == {"load", "register", "inference", "statistics", "write"}
    assert stats["registration"]["phases"]["arterial"]["after"] > stats["registration"]["phases"]["arterial"]["before"]
    assert stats["registration"]["engine"] == stats["registration"]["phases"]["arterial"]["engine"] == "simpleitk"
    assert stats["tumor_count"] == len(stats["tumors"])
    for tumor in stats["tumors"]:  # per-phase enhancement of every tumor (maml.stats.tumor_enhancement)
        e = tumor["enhancement"]
        assert set(e["tumor_median_hu"]) == set(e["liver_median_hu"]) == {"arterial", "venous"}
        # None only where there is no liver around the tumor to compare with (the tiny model is crude)
        assert isinstance(e["aphe"], bool) == (e["liver_median_hu"]["arterial"] is not None)
        assert isinstance(e["washout"], bool) == (e["liver_median_hu"]["venous"] is not None)

    records = [json.loads(line) for line in stdout.splitlines()]
    assert records[-1]["step"] == "done"
    fractions = [r["fraction"] for r in records]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {r["step"] for r in records} >= {"load", "register", "inference", "statistics", "write", "done"}


def test_missing_phase_runs_that_phases_own_head(tiny_model, case_files, tmp_path):
    result = segment({"arterial": case_files["arterial"]}, tiny_model, SegmentOptions(registration="none"))
    assert result.reference == "arterial" and result.stats["head"] == "arterial"
    assert result.attention == {} and result.transforms == {}
    arterial = sitk.ReadImage(str(case_files["arterial"]))
    assert result.labels.GetSize() == arterial.GetSize()
    write_result(result, tmp_path / "out", overview=True)
    assert not list((tmp_path / "out").glob("attention_*"))


def test_reference_phase_can_be_chosen(tiny_model, case_files):
    result = segment({"arterial": case_files["arterial"], "venous": case_files["venous"]}, tiny_model,
                     SegmentOptions(registration="rigid", reference="arterial"))
    assert result.reference == "arterial" and set(result.transforms) == {"venous"}
    assert result.labels.GetOrigin() == sitk.ReadImage(str(case_files["arterial"])).GetOrigin()


def test_phases_of_different_patients_are_refused(tiny_model, case_files, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, stderr = run_segment(
        ["--phase", f"arterial={case_files['other_arterial']}", "--phase", f"venous={case_files['venous']}",
         "--out", out, "--model", tiny_model, "--register", "rigid"], capsys)
    assert code == 1 and "same patient" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_cancel_leaves_no_output(tiny_model, case_files, tmp_path):
    with pytest.raises(CancelledError):
        segment({"venous": case_files["venous"]}, tiny_model, SegmentOptions(registration="none"),
                cancel=lambda: True)
    assert list(tmp_path.iterdir()) == []


def write_bad_inputs(folder: Path, venous: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, words the error must contain)."""
    bad = {}
    garbage = folder / "garbage.nii.gz"
    garbage.write_bytes(b"this is not an image" * 10)
    bad["unreadable"] = (garbage, "garbage.nii.gz")
    bad["missing"] = (folder / "missing.nii.gz", "missing.nii.gz")
    flat = sitk.Image(64, 64, sitk.sitkInt16)
    sitk.WriteImage(flat + 5, str(folder / "slice.nii.gz"))
    bad["2d"] = (folder / "slice.nii.gz", "2D")
    four = sitk.JoinSeries([sitk.ReadImage(str(venous))] * 2)
    sitk.WriteImage(four, str(folder / "4d.nii.gz"))
    bad["4d"] = (folder / "4d.nii.gz", "4D")
    empty = sitk.Image(40, 40, 20, sitk.sitkInt16)
    sitk.WriteImage(empty, str(folder / "empty.nii.gz"))
    bad["empty"] = (folder / "empty.nii.gz", "constant")
    return bad


@pytest.mark.parametrize("kind", ["unreadable", "missing", "2d", "4d", "empty"])
def test_bad_phase_files_exit_with_one_clear_line_and_no_output(kind, tiny_model, case_files, tmp_path, capsys):
    bad_file, words = write_bad_inputs(tmp_path, case_files["venous"])[kind]
    out = tmp_path / "out"
    code, _, stderr = run_segment(
        ["--phase", f"arterial={bad_file}", "--phase", f"venous={case_files['venous']}",
         "--out", out, "--model", tiny_model, "--register", "none"], capsys)
    assert code == 1
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert words.lower() in stderr.lower() and "arterial" in stderr
    assert not out.exists()


def test_no_phases_unknown_phase_and_bad_model(tiny_model, case_files, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, stderr = run_segment(["--out", out, "--model", tiny_model], capsys)
    assert code == 1 and "no phases" in stderr
    code, _, stderr = run_segment(["--phase", f"portal={case_files['venous']}", "--out", out,
                                   "--model", tiny_model], capsys)
    assert code == 1 and "portal" in stderr and "arterial" in stderr
    broken = tmp_path / "broken.pt"
    broken.write_bytes(tiny_model.read_bytes()[:500])
    code, _, stderr = run_segment(["--phase", f"venous={case_files['venous']}", "--out", out,
                                   "--model", broken], capsys)
    assert code == 1 and "broken.pt" in stderr
    code, _, stderr = run_segment(["--phase", f"venous={case_files['venous']}", "--phase",
                                   f"arterial={case_files['venous']}", "--out", out, "--model", tiny_model], capsys)
    assert code == 1 and "same file" in stderr
    assert not out.exists()


def test_json_progress_ends_with_an_error_line_on_failure(tiny_model, tmp_path, capsys):
    code, stdout, _ = run_segment(["--phase", f"venous={tmp_path / 'nope.nii.gz'}", "--out", tmp_path / "o",
                                   "--model", tiny_model, "--json-progress"], capsys)
    last = json.loads(stdout.strip().splitlines()[-1])
    assert code == 1 and last["step"] == "error" and "nope.nii.gz" in last["message"]


def test_no_space_left_on_device(tiny_model, case_files, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here to fill up")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "maml.cli", "segment", "--phase", f"venous={case_files['venous']}",
             "--out", str(mount / "out"), "--model", str(tiny_model), "--register", "none"],
            capture_output=True, text=True, timeout=300)
        assert result.returncode == 1
        assert "no space left" in result.stderr
        assert os.listdir(mount) == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_sigterm_stops_cleanly(tiny_model, case_files, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "maml.cli", "segment", "--phase", f"arterial={case_files['arterial']}",
         "--phase", f"venous={case_files['venous']}", "--out", str(out), "--model", str(tiny_model),
         "--register", "rigid", "--json-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # wait until the run is under way
        if json.loads(line)["step"] == "register":
            break
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["step"] == "error"
    assert not out.exists()
    assert [p for p in tmp_path.iterdir() if p.name != "out"] == []


def test_dicom_folder_with_several_series_is_one_clear_error_and_one_series_can_be_picked(
        tiny_model, case_files, tmp_path, capsys):
    from test_io import write_dicom_series

    venous = sitk.ReadImage(str(case_files["venous"]))
    folder = tmp_path / "dicom"
    write_dicom_series(venous, folder, "1.2.826.0.1.3680043.2.1125.1", "venous", 1)
    write_dicom_series(venous, folder, "1.2.826.0.1.3680043.2.1125.2", "venous again", 2)
    out = tmp_path / "out"
    code, _, stderr = run_segment(["--phase", f"venous={folder}", "--out", out, "--model", tiny_model,
                                   "--register", "none", "--no-overview"], capsys)
    assert code == 1 and len(stderr.strip().splitlines()) == 1
    assert "1.2.826.0.1.3680043.2.1125.1" in stderr and "1.2.826.0.1.3680043.2.1125.2" in stderr
    assert not out.exists()
    code, _, stderr = run_segment(["--phase", f"venous={folder}::1.2.826.0.1.3680043.2.1125.2", "--out", out,
                                   "--model", tiny_model, "--register", "none", "--no-overview"], capsys)
    assert code == 0, stderr
    assert sitk.ReadImage(str(out / "segmentation.nii.gz")).GetSize() == venous.GetSize()


def test_registration_engine_option_reaches_the_segment_options():
    import argparse

    from maml.commands import segment as command

    parser = argparse.ArgumentParser()
    command.configure(parser)
    given = ["--phase", "venous=v.nii.gz", "--out", "o"]
    assert command.options_from(parser.parse_args(given)).registration_engine == "simpleitk"
    chosen = parser.parse_args([*given, "--registration-engine", "elastix"])
    assert command.options_from(chosen).registration_engine == "elastix"
