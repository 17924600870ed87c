"""maml.training.losses: Dice + CE against hand-computed values, deep-supervision weights, the mutual-learning
combination (paper and published-code weighting, missing fused path), gradients to every part."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from maml.training.losses import (
    LossBreakdown,
    MAMLOutputLike,
    MutualLearningLoss,
    deep_supervision_weights,
    dice_ce_loss,
    downsample_target,
)


@dataclass
class Output:
    """Stands in for maml.network.MAMLOutput (same three attributes)."""

    phase_logits: dict
    fused_logits: torch.Tensor | None = None
    attention: dict | None = None


def reference_dice_ce(logits: np.ndarray, target: np.ndarray, smooth: float = 1e-5) -> float:
    """Numpy: 1 - mean over samples and foreground classes of soft Dice, plus mean voxel CE."""
    logits = logits.astype(np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    labels = target[:, 0]
    n_classes = logits.shape[1]
    dices = []
    for b in range(logits.shape[0]):
        for k in range(1, n_classes):
            g = (labels[b] == k).astype(np.float64)
            dices.append((2 * (p[b, k] * g).sum() + smooth) / (p[b, k].sum() + g.sum() + smooth))
    picked = np.take_along_axis(p, labels[:, None], axis=1)[:, 0]
    ce = -np.log(picked).mean()
    return 1.0 - float(np.mean(dices)) + float(ce)


def test_dice_ce_by_hand_on_four_voxels():
    # B=1, K=2, one slice of 2x2 voxels.
    logits = torch.tensor([[[[[0.0, 1.0], [2.0, -1.0]]], [[[1.0, 0.0], [0.5, 0.5]]]]])
    target = torch.tensor([[[[[1, 0], [0, 1]]]]])
    assert logits.shape == (1, 2, 1, 2, 2) and target.shape == (1, 1, 1, 2, 2)
    # Foreground probability per voxel: sigmoid(l1 - l0).
    p1 = [1 / (1 + math.exp(-(a - b))) for a, b in ((1.0, 0.0), (0.0, 1.0), (0.5, 2.0), (0.5, -1.0))]
    g = [1, 0, 0, 1]
    dice = (2 * (p1[0] + p1[3]) + 1e-5) / (sum(p1) + 2 + 1e-5)
    ce = -(math.log(p1[0]) + math.log(1 - p1[1]) + math.log(1 - p1[2]) + math.log(p1[3])) / 4
    expected = (1 - dice) + ce
    assert g == target.flatten().tolist()
    value = dice_ce_loss()(logits, target)
    assert value.item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_dice_ce_matches_numpy_for_three_classes_per_sample(batch):
    gen = torch.Generator().manual_seed(batch)
    logits = torch.randn(batch, 3, 2, 3, 4, generator=gen)
    target = torch.randint(0, 3, (batch, 1, 2, 3, 4), generator=gen)
    value = dice_ce_loss()(logits, target).item()
    assert value == pytest.approx(reference_dice_ce(logits.numpy(), target.numpy()), abs=1e-5)


def test_deep_supervision_weights():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(2) == [1.0, 0.0]
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert deep_supervision_weights(4) == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0.0])
    with pytest.raises(ValueError):
        deep_supervision_weights(0)


def test_target_downsampling_is_nearest_at_even_voxels():
    target = torch.randint(0, 3, (2, 1, 4, 6, 8))
    down = downsample_target(target, (2, 3, 4))
    assert down.dtype == torch.long
    assert torch.equal(down, target[:, :, ::2, ::2, ::2])
    anisotropic = downsample_target(target, (4, 3, 4))
    assert torch.equal(anisotropic, target[:, :, :, ::2, ::2])


def _random_output(gen, phases=("arterial", "venous"), levels=3, fused=True, batch=2, k=3):
    shapes = [(4 // 2**i or 1, 8 // 2**i, 8 // 2**i) for i in range(levels)]
    phase_logits = {
        p: [torch.randn(batch, k, *s, generator=gen) for s in shapes] for p in phases
    }
    fused_logits = torch.randn(batch, k, *shapes[0], generator=gen) if fused else None
    return Output(phase_logits, fused_logits, None)


def _random_output_tracking_gradients(gen):
    """A random two-phase output whose fused logits and full-resolution phase logits get gradients."""
    output = _random_output(gen)
    output.fused_logits.requires_grad_(True)
    for outputs in output.phase_logits.values():
        outputs[0].requires_grad_(True)
    return output


def _hand_intra(outputs, target, weights):
    total = 0.0
    for logits, weight in zip(outputs, weights):
        step = target.shape[2] // logits.shape[2], target.shape[3] // logits.shape[3], target.shape[4] // logits.shape[4]
        down = target[:, :, :: step[0], :: step[1], :: step[2]]
        total += weight * reference_dice_ce(logits.numpy(), down.numpy())
    return total


def test_paper_weighting_against_hand_values():
    gen = torch.Generator().manual_seed(0)
    output = _random_output(gen)
    assert isinstance(output, MAMLOutputLike)
    target = torch.randint(0, 3, (2, 1, 4, 8, 8), generator=gen)
    loss = MutualLearningLoss()
    result = loss(output, target)
    assert isinstance(result, LossBreakdown)
    assert result.lambda_intra == 0.5 and result.joint_weight == 1.0
    weights = [2 / 3, 1 / 3, 0.0]
    for phase in ("arterial", "venous"):
        assert result.intra[phase] == pytest.approx(
            _hand_intra(output.phase_logits[phase], target, weights), abs=1e-5
        )
    assert result.joint == pytest.approx(
        reference_dice_ce(output.fused_logits.numpy(), target.numpy()), abs=1e-5
    )
    assert result.total.item() == pytest.approx(
        0.5 * sum(result.intra.values()) + result.joint, abs=1e-5
    )
    # A (B, D, H, W) target is accepted as well.
    assert loss(output, target[:, 0]).total.item() == pytest.approx(result.total.item(), abs=1e-6)


def test_lambda_and_deep_supervision_off():
    gen = torch.Generator().manual_seed(1)
    output = _random_output(gen)
    target = torch.randint(0, 3, (2, 1, 4, 8, 8), generator=gen)
    result = MutualLearningLoss(lambda_intra=0.25, deep_supervision=False)(output, target)
    for phase in ("arterial", "venous"):
        full = output.phase_logits[phase][0]
        assert result.intra[phase] == pytest.approx(
            reference_dice_ce(full.numpy(), target.numpy()), abs=1e-5
        )
    assert result.total.item() == pytest.approx(
        0.25 * sum(result.intra.values()) + result.joint, abs=1e-5
    )


def test_published_code_weighting():
    gen = torch.Generator().manual_seed(2)
    output = _random_output(gen, levels=4)
    output.phase_logits = {
        p: [torch.randn(1, 3, 8, 8, 8, generator=gen)]
        + [torch.randn(1, 3, 8 // 2**i, 8 // 2**i, 8 // 2**i, generator=gen) for i in (1, 2, 3)]
        for p in ("arterial", "venous")
    }
    output.fused_logits = torch.randn(1, 3, 8, 8, 8, generator=gen)
    target = torch.randint(0, 3, (1, 1, 8, 8, 8), generator=gen)
    loss = MutualLearningLoss.published_code()
    assert loss.variant == "code" and loss.lambda_intra == 1.0 and loss.deep_supervision
    result = loss(output, target)
    weights = [4 / 7, 2 / 7, 1 / 7, 0.0]
    assert result.joint_weight == pytest.approx(4 / 7)
    for phase in ("arterial", "venous"):
        assert result.intra[phase] == pytest.approx(
            _hand_intra(output.phase_logits[phase], target, weights), abs=1e-5
        )
    # As MAMLTrainerV2: weights [w0] + w + w over [fused] + arterial outputs + venous outputs.
    expected = 4 / 7 * result.joint + sum(result.intra.values())
    assert result.total.item() == pytest.approx(expected, abs=1e-5)


def test_missing_fused_path_counts_present_phases_only():
    gen = torch.Generator().manual_seed(3)
    output = _random_output(gen, phases=("venous",), fused=False)
    target = torch.randint(0, 3, (2, 1, 4, 8, 8), generator=gen)
    result = MutualLearningLoss()(output, target)
    assert result.joint is None
    assert list(result.intra) == ["venous"]
    assert result.total.item() == pytest.approx(0.5 * result.intra["venous"], abs=1e-6)


def test_joint_weight_zero_trains_the_phase_nets_independently():
    """MS+Ensemble: the fused term is logged but adds nothing, and no gradient reaches the fusion."""
    gen = torch.Generator().manual_seed(5)
    output = _random_output_tracking_gradients(gen)
    target = torch.randint(0, 3, (2, 1, 4, 8, 8), generator=gen)
    result = MutualLearningLoss(lambda_intra=1.0, joint_weight=0.0)(output, target)
    assert result.joint_weight == 0.0 and result.joint is not None
    assert result.total.item() == pytest.approx(sum(result.intra.values()), abs=1e-5)
    result.total.backward()
    assert output.fused_logits.grad is None
    assert all(o[0].grad is not None and o[0].grad.abs().sum() > 0 for o in output.phase_logits.values())


def test_lambda_zero_trains_the_fusion_alone():
    """MS+MA: only the joint term counts; the phase terms are still logged."""
    gen = torch.Generator().manual_seed(6)
    output = _random_output_tracking_gradients(gen)
    target = torch.randint(0, 3, (2, 1, 4, 8, 8), generator=gen)
    result = MutualLearningLoss(lambda_intra=0.0)(output, target)
    assert set(result.intra) == {"arterial", "venous"} and all(v > 0 for v in result.intra.values())
    assert result.total.item() == pytest.approx(result.joint, abs=1e-6)
    result.total.backward()
    assert output.fused_logits.grad is not None
    assert all(o[0].grad is None for o in output.phase_logits.values())
    # with a phase missing there is no fused term: nothing to train, said plainly
    single = _random_output(gen, phases=("venous",), fused=False)
    with pytest.raises(ValueError, match="nothing to train"):
        MutualLearningLoss(lambda_intra=0.0)(single, target)


def test_an_explicit_joint_weight_overrides_the_variants():
    gen = torch.Generator().manual_seed(7)
    output = _random_output(gen)
    target = torch.randint(0, 3, (2, 1, 4, 8, 8), generator=gen)
    result = MutualLearningLoss(variant="code", joint_weight=2.0)(output, target)
    assert result.joint_weight == 2.0
    assert result.total.item() == pytest.approx(sum(result.intra.values()) + 2 * result.joint, abs=1e-5)
    with pytest.raises(ValueError, match="nothing would be trained"):
        MutualLearningLoss(lambda_intra=0.0, joint_weight=0.0)
    with pytest.raises(ValueError, match="joint_weight"):
        MutualLearningLoss(joint_weight=-1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        MutualLearningLoss(variant="other")
    with pytest.raises(ValueError, match="lambda"):
        MutualLearningLoss(lambda_intra=-1)
    gen = torch.Generator().manual_seed(4)
    output = _random_output(gen)
    with pytest.raises(ValueError, match="target"):
        MutualLearningLoss()(output, torch.zeros(2, 1, 4, 8, 6, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# Gradients reach every part of a small MAML-shaped network
# ---------------------------------------------------------------------------------------------


class ToyMAML(nn.Module):
    """Two per-phase "backbones", an MA-like fusion (F_dual, A_i, sum A_i F_i) and heads: per-phase
    heads at three resolutions (deep supervision) and a fused head."""

    def __init__(self, phases=("arterial", "venous"), channels=4, classes=3):
        super().__init__()
        self.phases = list(phases)
        self.backbones = nn.ModuleDict(
            {p: nn.Sequential(nn.Conv3d(1, channels, 3, padding=1), nn.LeakyReLU(0.01)) for p in phases}
        )
        self.heads = nn.ModuleDict(
            {p: nn.ModuleList([nn.Conv3d(channels, classes, 1) for _ in range(3)]) for p in phases}
        )
        self.dual = nn.Conv3d(channels * len(phases), channels, 3, padding=1)
        self.f_a = nn.Sequential(
            nn.Conv3d(2 * channels, channels, 3, padding=1),
            nn.InstanceNorm3d(channels, affine=True),
            nn.LeakyReLU(0.01),
            nn.Conv3d(channels, channels, 1),
        )
        self.fused_head = nn.Conv3d(channels, classes, 1, bias=False)

    def forward(self, x: torch.Tensor, present=None) -> Output:
        present = self.phases if present is None else present
        features = {p: self.backbones[p](x[:, [self.phases.index(p)]]) for p in present}
        phase_logits = {}
        for p, f in features.items():
            levels = [f, nn.functional.avg_pool3d(f, 2), nn.functional.avg_pool3d(f, 4)]
            phase_logits[p] = [head(level) for head, level in zip(self.heads[p], levels)]
        if list(present) != self.phases:
            return Output(phase_logits, None, None)
        dual = self.dual(torch.cat([features[p] for p in self.phases], dim=1))
        attention = {p: torch.sigmoid(self.f_a(torch.cat([dual, features[p]], dim=1))) for p in self.phases}
        fused = sum(attention[p] * features[p] for p in self.phases)
        return Output(phase_logits, self.fused_head(fused), attention)


def _grads(model):
    return {
        name: (None if p.grad is None else float(p.grad.abs().sum()))
        for name, p in model.named_parameters()
    }


def test_gradients_reach_backbones_ma_module_and_heads():
    torch.manual_seed(0)
    model = ToyMAML()
    x = torch.randn(2, 2, 8, 8, 8)
    target = torch.randint(0, 3, (2, 1, 8, 8, 8))
    result = MutualLearningLoss()(model(x), target)
    result.total.backward()
    grads = _grads(model)
    for name, value in grads.items():
        if name.startswith("heads.") and ".2." in name:
            # The lowest-resolution deep-supervision output has weight 0 (nnU-Net): not computed.
            assert value is None, name
        else:
            assert value is not None and value > 0, name


def test_gradients_with_a_dropped_phase_and_without_deep_supervision():
    torch.manual_seed(1)
    model = ToyMAML()
    x = torch.randn(1, 2, 8, 8, 8)
    target = torch.randint(0, 3, (1, 1, 8, 8, 8))
    MutualLearningLoss(deep_supervision=False)(model(x, present=["venous"]), target).total.backward()
    for name, value in _grads(model).items():
        if name.startswith(("backbones.venous", "heads.venous.0")):
            assert value is not None and value > 0, name
        else:
            assert value is None, name
