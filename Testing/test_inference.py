import numpy as np
import pytest
import torch

from engine_helpers import tiny_config
from maml.errors import CancelledError, InputError
from maml.inference import (SlidingWindowOptions, gaussian_importance, resolve_device,
                            sliding_window_predict, window_starts)
from maml.network import MAMLNet

PATCH = [8, 16, 16]


def maps(windowed):
    return windowed.probabilities, windowed.heatmaps


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(1)
    return MAMLNet(tiny_config()).eval()


def test_single_patch_volume_equals_plain_forward(net):
    data = np.random.default_rng(0).normal(size=(2, *PATCH)).astype(np.float32)
    probabilities, heatmaps = maps(sliding_window_predict(net, data, net.phases, SlidingWindowOptions(PATCH)))
    expected, expected_heat = net.predict(torch.from_numpy(data)[None])[:2]
    np.testing.assert_allclose(probabilities, expected[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(heatmaps, expected_heat[0].numpy(), atol=1e-5)


def test_single_phase_volume_equals_that_heads_forward(net):
    data = np.random.default_rng(1).normal(size=(1, *PATCH)).astype(np.float32)
    probabilities, heatmaps = maps(sliding_window_predict(net, data, ["arterial"], SlidingWindowOptions(PATCH)))
    _, logits = net.backbones["arterial"](torch.from_numpy(data)[None])
    assert heatmaps is None
    np.testing.assert_allclose(probabilities, torch.softmax(logits[0], 1)[0].detach().numpy(), atol=1e-5)


def test_large_volume_probabilities_and_heatmaps_are_valid(net):
    data = np.random.default_rng(2).normal(size=(2, 13, 37, 29)).astype(np.float32)
    fractions = []
    probabilities, heatmaps = maps(sliding_window_predict(
        net, data, net.phases, SlidingWindowOptions(PATCH, batch_size=3), progress=fractions.append))
    assert probabilities.shape == (3, 13, 37, 29) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)
    assert heatmaps.shape == (2, 13, 37, 29)
    assert heatmaps.min() >= 0 and heatmaps.max() <= 1
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_small_volume_is_padded_and_cropped_back(net):
    data = np.random.default_rng(3).normal(size=(2, 5, 11, 9)).astype(np.float32)
    probabilities, heatmaps = maps(sliding_window_predict(net, data, net.phases, SlidingWindowOptions(PATCH)))
    assert probabilities.shape == (3, 5, 11, 9) and heatmaps.shape == (2, 5, 11, 9)


def test_padding_holds_air_for_maml_models_and_zero_for_nnunet_ones(net):
    from maml.inference import _pad_to_patch, padding_of

    data = np.random.default_rng(4).normal(size=(2, 5, 11, 9)).astype(np.float32)
    data[1] -= 3.0
    padded, crop = _pad_to_patch(data, PATCH, pad_with="air")
    assert padded.shape == (2, 8, 16, 16)
    np.testing.assert_array_equal(padded[(slice(None), *crop)], data)
    outside = np.ones(padded.shape[1:], dtype=bool)
    outside[tuple(crop)] = False
    for channel in range(2):  # each phase's own lowest value, not the normalised mean 0
        np.testing.assert_allclose(padded[channel][outside], data[channel].min())
    zero, _ = _pad_to_patch(data, PATCH, pad_with="zero")
    assert np.all(zero[0][outside] == 0)
    config = tiny_config()
    assert padding_of(config) == "air"
    config.inference.blend = "logits"  # an imported nnU-Net model's inference
    assert padding_of(config) == "zero"


def test_mirroring_averages_all_eight_flips(net):
    data = torch.randn(1, 2, *PATCH)
    probabilities = sliding_window_predict(net, data[0].numpy(), net.phases,
                                           SlidingWindowOptions(PATCH, mirror=True)).probabilities
    expected = 0
    for axes in [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]:
        flipped = torch.flip(data, axes) if axes else data
        p = net.predict(flipped).probabilities
        expected = expected + (torch.flip(p, axes) if axes else p)
    np.testing.assert_allclose(probabilities, (expected / 8)[0].numpy(), atol=1e-5)


def test_window_starts_cover_the_volume_with_the_requested_overlap():
    for size, patch in [(16, 16), (17, 16), (100, 16), (37, 16), (5, 16)]:
        starts = window_starts(size, patch, 0.5)
        assert starts[0] == 0
        assert starts[-1] == max(size - patch, 0)
        steps = np.diff(starts)
        assert (steps <= patch * 0.5).all() and (steps > 0).all()


def test_gaussian_importance_peaks_at_nnunets_centre_voxel_without_zeros():
    weight = gaussian_importance([8, 16, 16], 1 / 8)
    assert weight.max() == 1.0 and weight.min() > 0
    # nnU-Net's peak is voxel size // 2 (not the geometric centre of an even patch)
    assert tuple(np.unravel_index(int(weight.argmax()), weight.shape)) == (4, 8, 8)
    # sigma = patch / 8 = 2 voxels along x: two sigma from the peak the weight is exp(-2) (float16)
    np.testing.assert_allclose(weight[4, 8, 4], np.exp(-2.0), rtol=1e-3)


def test_gaussian_and_window_starts_equal_nnunets():
    """The blending weights and window positions are nnU-Net v2's own, value for value."""
    pytest.importorskip("nnunetv2")
    from nnunetv2.inference.sliding_window_prediction import (compute_gaussian,
                                                              compute_steps_for_sliding_window)

    for patch in [(16, 32, 32), (8, 16, 16), (20, 40, 36), (5, 7, 9)]:
        theirs = compute_gaussian(patch, 1 / 8, 10, device=torch.device("cpu")).float()
        np.testing.assert_array_equal(gaussian_importance(patch, 1 / 8) * 10, theirs.numpy())
    for size, patch in [((40, 80, 80), (16, 32, 32)), ((37, 101, 64), (16, 32, 32)), ((16, 33, 90), (16, 32, 32))]:
        assert [window_starts(s, p, 0.5) for s, p in zip(size, patch)] == \
            compute_steps_for_sliding_window(size, patch, 0.5)


def test_cancel_stops_between_windows(net):
    data = np.zeros((2, 16, 64, 64), np.float32)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(CancelledError):
        sliding_window_predict(net, data, net.phases, SlidingWindowOptions(PATCH), cancel=cancel)
    assert len(calls) == 3


def test_device_selection():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(InputError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA"):
            resolve_device("cuda")


def test_input_must_be_four_dimensional(net):
    with pytest.raises(InputError, match="phases, z, y, x"):
        sliding_window_predict(net, np.zeros(PATCH, np.float32), net.phases, SlidingWindowOptions(PATCH))


def test_network_keeps_its_layout_and_stays_trainable_after_inference():
    net = MAMLNet(tiny_config()).train()
    sliding_window_predict(net, np.zeros((2, *PATCH), np.float32), net.phases, SlidingWindowOptions(PATCH))
    assert all(p.is_contiguous() for p in net.parameters())
    assert net.training
    out = net(torch.randn(1, 2, *PATCH))
    out.fused_logits.sum().backward()  # no inference tensors left in the weights
    assert net.fused_head.weight.grad is not None


def test_a_models_own_overlap_places_its_windows_and_a_run_may_override_it(tmp_path):
    import SimpleITK as sitk

    from engine_helpers import save_tiny_liver_model
    from maml.inference import padding_of, predict_case, window_alignment
    from maml.model import load_model, save_checkpoint

    path = save_tiny_liver_model(tmp_path / "half.pt")
    half = load_model(path)
    quarter_config = half.config
    quarter_config.inference.overlap = 0.25
    # still MAML's own way of predicting: air padding, windows on the network's stride grid
    assert padding_of(quarter_config) == "air"
    assert window_alignment(quarter_config) == tuple(quarter_config.network.total_downsampling())
    save_checkpoint(tmp_path / "quarter.pt", half.network, quarter_config, {"note": "overlap 0.25"})
    quarter = load_model(tmp_path / "quarter.pt")
    assert quarter.config.inference.overlap == 0.25
    assert load_model(path).config.inference.overlap == 0.5

    rng = np.random.default_rng(5)
    images = {}
    for phase, level in (("arterial", 100.0), ("venous", 150.0)):  # z, y, x; windows 8 x 16 x 16
        images[phase] = sitk.GetImageFromArray(rng.normal(level, 30.0, (24, 24, 40)).astype(np.float32))
        images[phase].SetSpacing([6.0, 6.0, 6.0])

    def windows(model, **options) -> int:
        calls = []
        predict_case(model, images, device="cpu", backend="torch", batch_size=1,
                     progress=calls.append, **options)
        return len(calls)

    counts = {"half": windows(load_model(path)), "quarter": windows(quarter),
              "override": windows(load_model(path), overlap=0.25)}
    assert counts["quarter"] == counts["override"] < counts["half"]


def test_an_overlap_outside_a_patch_is_refused_in_one_line(tmp_path):
    import subprocess
    import sys

    from engine_helpers import write_tiny_case

    paths = write_tiny_case(tmp_path)
    for value in ("1.5", "half"):
        run = subprocess.run([sys.executable, "-m", "maml.cli", "segment", "--phase",
                              f"venous={paths['venous']}", "--out", str(tmp_path / "out"),
                              "--overlap", value], capture_output=True, text=True)
        assert run.returncode == 2 and "Traceback" not in run.stderr
        assert "--overlap" in run.stderr and ("fraction of a patch" in run.stderr or "number" in run.stderr)
        assert not (tmp_path / "out").exists()
