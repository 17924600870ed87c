"""Attention maps without stripes: aligned windows, anti-aliased resampling, the trilinear final
up-sampling option, and the stripe ratio on the bundled sample case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_helpers import tiny_config
from maml.attention import antialias, display_window, stripe_ratio
from maml.config import ModelConfig
from maml.errors import ModelError
from maml.inference import window_starts
from maml.model import load_model, save_checkpoint
from maml.network import MAMLNet


@pytest.mark.parametrize("size,patch,align", [(100, 64, 8), (104, 64, 8), (168, 64, 16), (37, 16, 4),
                                               (64, 64, 8), (300, 128, 32)])
def test_window_starts_on_the_stride_grid_cover_the_volume(size, patch, align):
    starts = window_starts(size, patch, 0.5, align)
    assert starts[0] == 0 and starts[-1] == max(size - patch, 0)  # coverage, last flush with the end
    aligned = starts if (size - patch) % align == 0 else starts[:-1]
    assert all(s % align == 0 for s in aligned)
    gaps = np.diff(starts)
    assert (gaps > 0).all() and (gaps <= -(-patch * 0.5 // align) * align).all()


def test_antialias_removes_the_period_2_column_pattern_and_keeps_smooth_content():
    z, y, x = np.meshgrid(np.arange(12), np.arange(40), np.arange(40), indexing="ij")
    smooth = 0.5 + 0.3 * np.sin(x / 6.0) * np.cos(y / 6.0)
    striped = smooth + 0.07 * (-1.0) ** x  # the +-0.07 column swing of a transposed convolution
    mask = np.zeros(smooth.shape, bool)
    mask[:, 2:-2, 2:-2] = True  # the filter's border (nearest-neighbour padding) aside
    assert stripe_ratio(smooth, mask) == pytest.approx(1.0, abs=0.1)
    assert stripe_ratio(striped, mask) > 5
    filtered = antialias(striped, (3.0, 2.5, 2.5), (3.0, 2.2, 2.2), (1, 2, 2))
    assert stripe_ratio(filtered, mask) == pytest.approx(stripe_ratio(smooth, mask), abs=0.1)
    inner = (slice(None), slice(2, -2), slice(2, -2))
    assert np.abs(filtered - smooth)[inner].max() < 0.01  # [1, 2, 1] / 4 barely touches the signal


def test_antialias_low_passes_when_the_image_grid_is_coarser():
    rng = np.random.default_rng(0)
    noise = rng.random((6, 32, 32)).astype(np.float32)
    same = antialias(noise, (3.0, 1.0, 1.0), (3.0, 1.0, 1.0), (1, 1, 1))
    np.testing.assert_array_equal(same, noise)  # nothing to do: same grid, no up-sampling period
    coarser = antialias(noise, (3.0, 1.0, 1.0), (3.0, 3.0, 3.0), (1, 1, 1))
    assert coarser.std() < 0.5 * noise.std()


def test_display_window_is_chosen_inside_the_liver():
    attention = np.full((4, 10, 10), 0.9, np.float32)
    liver = np.zeros(attention.shape, bool)
    liver[:, 3:7, 3:7] = True
    attention[liver] = np.linspace(0.6, 0.7, liver.sum())
    low, high = display_window(attention, liver)
    assert 0.6 <= low < 0.61 and 0.69 < high <= 0.7
    assert display_window(attention, np.zeros_like(liver)) == (0.0, 1.0)
    assert display_window(np.zeros_like(attention), liver) == (0.0, 1.0)  # flat: the full range


def _config(final_upsampling):
    # "paper-linear": the paper form's instance norm after the 1x1x1 convolution rescales an
    # untrained network's almost flat response to a constant input to unit variance, magnifying
    # rounding-level ripples; the up-sampling's own pattern is measured without that norm.
    config = tiny_config(ma_variant="paper-linear")
    config.network.final_upsampling = final_upsampling
    config.network.deep_supervision = False
    return config


def _nyquist_fraction(heatmaps: torch.Tensor) -> float:
    """Share of the period-2 frequency in the power spectrum along x (interior, mean removed)."""
    inner = heatmaps[..., 2:-2, 4:-4, 4:-4].numpy()
    inner = inner - inner.mean(axis=-1, keepdims=True)
    power = np.abs(np.fft.rfft(inner, axis=-1)) ** 2
    return float(power[..., -1].sum() / power[..., 1:].sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trilinear_final_upsampling_has_no_period_2_pattern(seed):
    """On a constant input a transposed convolution with kernel = stride leaves a column pattern
    of period 2 in the attention; trilinear up-sampling (zero response at that frequency) does not."""
    constant = torch.full((1, 2, 8, 32, 32), 0.3)
    share = {}
    for mode in ("transpose", "trilinear"):
        torch.manual_seed(seed)
        heatmaps = MAMLNet(_config(mode)).eval().predict(constant).heatmaps
        share[mode] = _nyquist_fraction(heatmaps)
    assert share["transpose"] > 0.1
    assert share["trilinear"] < 0.05 and share["trilinear"] < share["transpose"] / 3


def test_both_upsamplings_round_trip_and_old_checkpoints_load_unchanged(tmp_path):
    for mode in ("transpose", "trilinear"):
        config = _config(mode)
        net = MAMLNet(config).eval()
        path = save_checkpoint(tmp_path / f"{mode}.pt", net, config, {})
        loaded = load_model(path)
        assert loaded.config.network.final_upsampling == mode
        x = torch.randn(1, 2, 8, 16, 16)
        assert torch.equal(loaded.network.predict(x)[0], net.predict(x)[0])
    # A configuration written before the option existed: the transposed convolution it was trained with.
    data = _config("transpose").to_dict()
    del data["network"]["final_upsampling"]
    assert ModelConfig.from_dict(data).network.final_upsampling == "transpose"
    bundled = load_model(__import__("maml.pipeline", fromlist=["x"]).default_model_path())
    assert bundled.config.network.final_upsampling == "transpose"
    data["network"]["final_upsampling"] = "nearest"
    with pytest.raises(ModelError, match="final_upsampling 'nearest'"):
        MAMLNet(ModelConfig.from_dict(data))


@pytest.mark.slow
def test_stripe_ratio_on_the_sample_case_is_at_most_1_3():
    """The bundled model on the bundled sample (arterial put on the venous grid with the sample's
    known transform): period-2 curvature along x over that along y, in the body and in the liver."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from stripe_ratio import measure, sample_case

    from maml.pipeline import default_model_path

    ratios = measure(sample_case(), load_model(default_model_path()))
    assert set(ratios) == {"arterial", "venous"}
    for phase, regions in ratios.items():
        for region, ratio in regions.items():
            assert 0.7 < ratio <= 1.3, (phase, region, ratio)
