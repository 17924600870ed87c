"""The OpenVINO backend gives torch's outputs; its cache of converted networks is keyed and checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_helpers import save_tiny_liver_model, tiny_config, write_tiny_case
from maml.backends import (MODEL_FILES, OpenVINONetwork, inference_network, resolve_backend,
                           resolve_engine)
from maml.errors import CancelledError, InputError
from maml.inference import SlidingWindowOptions, predict_case, sliding_window_predict
from maml.model import load_model
from maml.network import MAMLNet

pytest.importorskip("openvino", reason="the [cpu-fast] extra (make setup installs it)")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "MAMLSegmentation" / "Resources" / "SampleData"
DEMO_MODEL = ROOT / "MAMLSegmentation" / "Resources" / "Models" / "maml_liver_demo.pt"
PATCH = (8, 16, 16)


def assert_same_outputs(expected, actual, what):
    """Labels equal on >= 99.9 % of voxels and every map within 1e-3."""
    agree = np.mean(expected.probabilities.argmax(0) == actual.probabilities.argmax(0))
    assert agree >= 0.999, f"{what}: labels agree on {100 * agree:.3f} % of voxels"
    for field in ("probabilities", "heatmaps", "disagreement", "window_features"):
        a, b = getattr(expected, field), getattr(actual, field)
        assert (a is None) == (b is None), f"{what}: {field} present in one backend only"
        if a is not None:
            assert a.shape == b.shape
            assert np.abs(a - b).max() < 1e-3, f"{what}: {field} differs by {np.abs(a - b).max():.2e}"


@pytest.mark.parametrize("model_phases, given", [
    (("arterial", "venous"), ("arterial", "venous")),  # fused head, heatmaps, disagreement
    (("arterial", "venous"), ("arterial",)),  # each phase's own head
    (("arterial", "venous"), ("venous",)),
    (("arterial", "portal", "venous"), ("arterial", "venous")),  # mean of present heads
])
def test_openvino_gives_torch_outputs_for_every_phase_subset(model_phases, given, tmp_path):
    torch.manual_seed(1)
    net = MAMLNet(tiny_config(phases=model_phases)).eval()
    data = np.random.default_rng(0).normal(size=(len(given), 12, 30, 24)).astype(np.float32)
    options = SlidingWindowOptions(PATCH, batch_size=3)  # 12 windows: a smaller last batch
    expected = sliding_window_predict(net, data, list(given), options)
    compiled = OpenVINONetwork(net, cache=tmp_path)
    fractions = []
    actual = sliding_window_predict(compiled, data, list(given), options, progress=fractions.append)
    assert_same_outputs(expected, actual, f"{given} of {model_phases}")
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert len(list(tmp_path.glob("*/entry.json"))) == 1


def test_openvino_outputs_with_mirroring_and_cancel(tmp_path):
    net = MAMLNet(tiny_config()).eval()
    data = np.random.default_rng(2).normal(size=(2, 8, 20, 16)).astype(np.float32)
    options = SlidingWindowOptions(PATCH, mirror=True)
    compiled = OpenVINONetwork(net, cache=tmp_path)
    assert_same_outputs(sliding_window_predict(net, data, net.phases, options),
                        sliding_window_predict(compiled, data, net.phases, options), "mirrored")
    with pytest.raises(CancelledError):
        sliding_window_predict(compiled, data, net.phases, options, cancel=lambda: True)


@pytest.fixture(scope="module")
def sample_images():
    import SimpleITK as sitk

    venous = sitk.ReadImage(str(SAMPLE / "phantom_venous.nrrd"))
    arterial = sitk.ReadImage(str(SAMPLE / "phantom_arterial.nrrd"))
    motion = sitk.ReadTransform(str(SAMPLE / "phantom_arterial_to_venous.tfm"))
    arterial = sitk.Resample(arterial, venous, motion, sitk.sitkLinear, -1000.0)
    return {"arterial": arterial, "venous": venous}


def test_sample_case_labels_equal_torch(sample_images):
    # Both phases, the bundled model's every output; each phase subset's own graph is compared on
    # random weights above (the venous phase alone here too cost 36 s of the suite's 15 minutes).
    import SimpleITK as sitk

    model = load_model(DEMO_MODEL)
    images = dict(sample_images)
    results = {backend: predict_case(model, images, keep_probabilities=True, backend=backend,
                                     device="cpu") for backend in ("torch", "openvino")}
    assert results["openvino"].backend == "openvino" and results["torch"].backend == "torch"
    labels = {b: sitk.GetArrayFromImage(r.labels) for b, r in results.items()}
    assert np.mean(labels["torch"] == labels["openvino"]) >= 0.999
    assert (labels["torch"] == 2).sum() > 0  # the sample's tumors are found: a meaningful comparison
    assert np.abs(results["torch"].probabilities - results["openvino"].probabilities).max() < 1e-3
    assert results["torch"].attention.keys() == results["openvino"].attention.keys()
    for phase in results["torch"].attention:
        a, b = (sitk.GetArrayFromImage(r.attention[phase]) for r in results.values())
        assert np.abs(a - b).max() < 1e-3
    u, v = (sitk.GetArrayFromImage(r.uncertainty) for r in results.values())
    assert np.abs(u - v).max() < 1e-3
    assert np.abs(results["torch"].window_features - results["openvino"].window_features).max() < 1e-3


def _entries(cache):
    return sorted(p.parent for p in (cache / "openvino").glob("*/entry.json"))


def test_cache_entry_follows_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("MAML_CACHE", str(tmp_path / "cache"))
    import SimpleITK as sitk

    images = {"venous": sitk.ReadImage(str(write_tiny_case(tmp_path)["venous"]))}
    first = load_model(save_tiny_liver_model(tmp_path / "model.pt"))
    predict_case(first, images, backend="openvino")
    [entry] = _entries(tmp_path / "cache")
    assert json.loads((entry / "entry.json").read_text())["weights_sha256"] == first.sha256

    # Same file name, new weights: a new entry, and the outputs are those of the new weights.
    torch.manual_seed(5)
    config = first.config
    from maml.model import save_checkpoint

    save_checkpoint(tmp_path / "model.pt", MAMLNet(config), config)
    second = load_model(tmp_path / "model.pt")
    assert second.sha256 != first.sha256
    got = predict_case(second, images, backend="openvino", keep_probabilities=True)
    want = predict_case(second, images, backend="torch", keep_probabilities=True)
    assert np.abs(got.probabilities - want.probabilities).max() < 1e-3
    assert len(_entries(tmp_path / "cache")) == 2


@pytest.mark.parametrize("damage", ["weights", "record", "missing", "compiled"])
def test_a_damaged_cache_entry_is_rebuilt(damage, tmp_path):
    import hashlib

    net = MAMLNet(tiny_config()).eval()
    data = np.random.default_rng(3).normal(size=(2, 8, 16, 16)).astype(np.float32)
    options = SlidingWindowOptions(PATCH)
    expected = sliding_window_predict(net, data, net.phases, options)
    OpenVINONetwork(net, cache=tmp_path).prepare(net.phases, (2, *PATCH))
    [entry] = [p.parent for p in tmp_path.glob("*/entry.json")]
    weights = entry / MODEL_FILES[1]
    [blob] = entry.glob("compiled-*.blob")  # the network compiled for this CPU, for the next process
    if damage == "weights":  # same size, other values: only the checksum can tell
        raw = bytearray(weights.read_bytes())
        raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)
        weights.write_bytes(bytes(raw))
    elif damage == "record":
        (entry / "entry.json").write_text('{"format": 1, "sha256"')
    elif damage == "missing":
        weights.unlink()
    else:  # a sound compiled network, of other weights: it would import and run, but is not ours
        torch.manual_seed(11)
        other = MAMLNet(tiny_config()).eval()
        OpenVINONetwork(other, cache=tmp_path / "other").prepare(other.phases, (2, *PATCH))
        [other_blob] = (tmp_path / "other").glob("*/compiled-*.blob")
        blob.write_bytes(other_blob.read_bytes())
    actual = sliding_window_predict(OpenVINONetwork(net, cache=tmp_path), data, net.phases, options)
    assert_same_outputs(expected, actual, f"after damaged {damage}")
    record = json.loads((entry / "entry.json").read_text())
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == record["sha256"][MODEL_FILES[1]]
    compiled_record = json.loads(blob.with_suffix(".json").read_text())
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == compiled_record["sha256"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_an_unwritable_cache_is_one_clear_error(tmp_path):
    from maml.errors import ModelError

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    net = MAMLNet(tiny_config()).eval()
    with pytest.raises(ModelError, match="MAML_CACHE"):
        OpenVINONetwork(net, cache=blocker / "openvino").prepare(net.phases, (2, *PATCH))


def test_backend_choice():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "openvino"
    assert resolve_backend("torch", cpu) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    with pytest.raises(InputError, match="runs on the CPU"):
        resolve_backend("openvino", torch.device("cuda"))
    with pytest.raises(InputError, match="not one of"):
        resolve_backend("tensorrt", cpu)
    assert resolve_engine("auto", "openvino") == ("cpu", "openvino")
    assert resolve_engine("cpu", "auto") == ("cpu", "openvino")
    model = load_model(DEMO_MODEL)
    assert inference_network(model, "torch") is model.network
    assert inference_network(model, "openvino") is inference_network(model, "openvino")


def test_without_openvino_auto_is_torch_and_openvino_is_a_clear_error():
    code = ("import sys, torch; sys.modules['openvino'] = None\n"
            "from maml.backends import resolve_backend\n"
            "print(resolve_backend('auto', torch.device('cpu')))\n"
            "resolve_backend('openvino', torch.device('cpu'))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "torch"
    assert "needs the OpenVINO runtime" in result.stderr and "[cpu-fast]" in result.stderr


@pytest.mark.parametrize("backend", ["openvino", "torch"])
def test_segment_command_reports_its_backend(backend, tmp_path):
    paths = write_tiny_case(tmp_path)
    model = save_tiny_liver_model(tmp_path / "model.pt")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "maml.cli", "segment", "--phase", f"arterial={paths['arterial']}",
         "--phase", f"venous={paths['venous']}", "--model", str(model), "--register", "none",
         "--no-overview", "--backend", backend, "--out", str(out)],
        capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "stats.json").read_text())["backend"] == backend


def _imports_torch(importtime_log: str) -> bool:
    """Whether a ``python -X importtime`` log shows torch imported."""
    return any(line.rsplit("|", 1)[-1].strip() == "torch" for line in importtime_log.splitlines())


def test_a_segment_from_the_cache_never_imports_torch(tmp_path):
    """The first run fills the cache (model description, converted network); the second reads
    them back without importing torch, and writes the same results. Device and backend auto: on
    a computer without a GPU driver that is OpenVINO on the CPU, decided without torch."""
    paths = write_tiny_case(tmp_path)
    model = save_tiny_liver_model(tmp_path / "model.pt")
    env = dict(os.environ, MAML_CACHE=str(tmp_path / "cache"))
    from maml.backends import gpu_driver_present

    device = "cpu" if gpu_driver_present() else "auto"  # auto: no GPU driver, no torch asked
    runs = []
    for name in ("first", "second"):
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "maml.cli", "segment",
             "--phase", f"arterial={paths['arterial']}", "--phase", f"venous={paths['venous']}",
             "--model", str(model), "--register", "none", "--no-overview", "--device", device,
             "--backend", "auto", "--out", str(tmp_path / name)],
            capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        runs.append(result)
    assert _imports_torch(runs[0].stderr)  # converting needs torch
    assert not _imports_torch(runs[1].stderr)
    for output in ("segmentation.nii.gz", "uncertainty.nii.gz", "attention_venous.nii.gz"):
        first, second = (sitk_array(tmp_path / name / output) for name in ("first", "second"))
        np.testing.assert_array_equal(first, second)
    stats = [json.loads((tmp_path / name / "stats.json").read_text()) for name in ("first", "second")]
    checks = [[(c["name"], c["status"]) for c in run["domain_check"]["checks"]] for run in stats]
    assert checks[0] == checks[1]
    assert stats[1]["model"]["sha256"] == stats[0]["model"]["sha256"]
    assert stats[0]["backend"] == stats[1]["backend"] == "openvino"


def sitk_array(path):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
