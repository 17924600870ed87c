"""MAML learns what only the combination of both phases shows.

Each volume holds spheres of three kinds: bright in both phases (the target), bright in phase A only,
bright in phase B only. A single phase cannot tell the target from the decoys; the fused head can.
"""

import numpy as np
import pytest
import torch

from engine_helpers import tiny_config
from maml.inference import SlidingWindowOptions, sliding_window_predict
from maml.training.losses import MutualLearningLoss
from maml.network import MAMLNet

SHAPE = (16, 32, 32)


def make_volume(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    z, y, x = np.meshgrid(*(np.arange(s) for s in SHAPE), indexing="ij")
    bright = np.zeros((2, *SHAPE), bool)
    for kind in (0, 0, 1, 1, 2, 2):  # 0: both phases, 1: phase A only, 2: phase B only
        centre = [rng.uniform(3, s - 3) for s in SHAPE]
        radius = rng.uniform(2.5, 4.0)
        inside = ((z - centre[0]) ** 2 + ((y - centre[1]) / 1.5) ** 2
                  + ((x - centre[2]) / 1.5) ** 2) < radius ** 2
        if kind in (0, 1):
            bright[0] |= inside
        if kind in (0, 2):
            bright[1] |= inside
    phases = (2.0 * bright + rng.normal(0.0, 0.3, size=bright.shape)).astype(np.float32)
    return phases, (bright[0] & bright[1]).astype(np.int64)


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    denominator = prediction.sum() + truth.sum()
    return 1.0 if denominator == 0 else 2.0 * (prediction & truth).sum() / denominator


@pytest.mark.slow
def test_fused_head_learns_the_cross_phase_target():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = tiny_config(phases=("A", "B"), base_features=8, num_classes=2)
    config.patch_size = list(SHAPE)
    net = MAMLNet(config)
    loss_fn = MutualLearningLoss(lambda_intra=0.5)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(200):  # a fresh pair of volumes each step: nothing to memorise
        batch = [make_volume(rng) for _ in range(2)]
        x = torch.from_numpy(np.stack([b[0] for b in batch]))
        y = torch.from_numpy(np.stack([b[1] for b in batch]))[:, None]
        loss = loss_fn(net(x), y).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    net.eval()
    fused, single = [], []
    for _ in range(4):
        phases, truth = make_volume(rng)
        truth = truth.astype(bool)
        probabilities = sliding_window_predict(net, phases, ["A", "B"], SlidingWindowOptions(SHAPE)).probabilities
        fused.append(dice(probabilities.argmax(0) == 1, truth))
        probabilities = sliding_window_predict(net, phases[:1], ["A"], SlidingWindowOptions(SHAPE)).probabilities
        single.append(dice(probabilities.argmax(0) == 1, truth))
    assert np.mean(fused) > 0.9, fused
    # Phase A alone cannot separate the target from its decoys.
    assert np.mean(single) < 0.8, single


def test_mutual_learning_loss_reaches_every_backbone_the_ma_module_and_every_head():
    config = tiny_config(phases=("arterial", "venous"), base_features=4)
    net = MAMLNet(config).train()
    x = torch.randn(2, 2, *config.patch_size)
    y = torch.randint(0, 3, (2, 1, *config.patch_size))
    MutualLearningLoss(lambda_intra=0.5)(net(x), y).total.backward()
    lowest = "decoder.seg_layers.0."  # the lowest-resolution head: nnU-Net gives it weight 0
    full_resolution_head = f"decoder.seg_layers.{config.network.n_stages - 2}."
    for name, parameter in net.named_parameters():
        if lowest in name:
            continue
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    for part in ("backbones.arterial.", "backbones.venous.", "fusion.dual", "fusion.attention.arterial",
                 "fusion.attention.venous", "fused_head", full_resolution_head):
        assert any(part in name for name, _ in net.named_parameters()), part
