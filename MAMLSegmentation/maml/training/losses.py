"""Mutual-learning loss of MAML: L = lambda * sum_i L_intra(head_i) + L_joint(fused head).

Each term is Dice + cross-entropy. We use MONAI's ``DiceCELoss`` (softmax, one-hot target, soft Dice
over the foreground classes only, per sample, smooth 1e-5 in numerator and denominator, CE averaged
over all voxels). It matches nnU-Net's ``DC_and_CE_loss`` used by the published code up to a constant:
MONAI's Dice term is ``1 - dice`` where nnU-Net's is ``-dice``, which changes neither gradients nor
the optimum, so no hand-written loss is needed.

Deep supervision (nnU-Net): output k (k = 0 full resolution) weighs 1/2^k, the lowest resolution 0,
normalised to sum 1; the target is downsampled to each output's shape by nearest neighbour.

Variants:
- "paper" (default): lambda = 0.5 on the intra terms; each intra term is deep-supervised when
  ``deep_supervision`` is on (the paper is silent; its backbones are nnU-Nets, which train that way),
  the joint term uses the fused full-resolution output with weight 1.
- "code" (:meth:`MutualLearningLoss.published_code`), as MAMLTrainerV2 of the published code: no lambda
  (1), intra terms deep-supervised, and the joint term weighted like a full-resolution output, w_0 of
  the deep-supervision weights (the code prepends w_0 to the per-phase weight lists). Full-resolution
  intra and joint outputs thus weigh 1:1.

So in both cases: total = lambda * sum_i intra_i + joint_weight * joint, with intra_i the
deep-supervised (weighted) loss of phase i; :class:`LossBreakdown` reports all four.

Ablations of the paper's Table 1 set the two weights explicitly: ``joint_weight=0`` trains the
per-phase U-Nets independently of each other (MS+Ensemble: the fused head is not trained and its
term not computed); ``lambda_intra=0`` trains the fusion with the joint loss alone, without mutual
learning (MS+MA). Both zero would train nothing and is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn


LOSS_VARIANTS = ("paper", "code")

@runtime_checkable
class MAMLOutputLike(Protocol):
    """What the loss needs from the network's output (``maml.network.MAMLOutput``)."""

    phase_logits: dict[str, list[torch.Tensor]]  # per phase, full resolution first
    fused_logits: torch.Tensor | None  # (B, K, D, H, W), only when all phases are present
    attention: dict[str, torch.Tensor] | None


@dataclass
class LossBreakdown:
    """``total`` = ``lambda_intra`` * sum(``intra``.values()) + ``joint_weight`` * ``joint``.

    ``total`` is the differentiable tensor; the parts are detached floats for logging. ``joint`` is
    None when the fused head did not run (a phase dropped).
    """

    total: torch.Tensor
    joint: float | None
    intra: dict[str, float] = field(default_factory=dict)
    lambda_intra: float = 0.5
    joint_weight: float = 1.0


def dice_ce_loss(smooth: float = 1e-5, batch_dice: bool = False) -> DiceCELoss:
    """Dice + CE on logits (B, K, ...) against integer labels (B, 1, ...)."""
    return DiceCELoss(
        include_background=False,
        to_onehot_y=True,
        softmax=True,
        smooth_nr=smooth,
        smooth_dr=smooth,
        batch=batch_dice,
        reduction="mean",
    )


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's weights for ``n`` outputs (full resolution first): 1/2^k, lowest 0, sum 1.

    For n = 1 the only output weighs 1 (nothing to drop).
    """
    if n < 1:
        raise ValueError(f"need at least one output, got {n}")
    if n == 1:
        return [1.0]
    weights = [1.0 / 2**k for k in range(n)]
    weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def downsample_target(target: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Integer labels (B, 1, D, H, W) -> (B, 1, *spatial_shape) by nearest neighbour.

    torch's "nearest" takes source index floor(i * scale): for stride-2 levels that is voxel 2i,
    the centre of a stride-2, padding-1 convolution's receptive field, so labels line up with the
    network's lower-resolution outputs.
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    if tuple(target.shape[2:]) == spatial_shape:
        return target
    resized = F.interpolate(target.float(), size=spatial_shape, mode="nearest")
    return resized.long()


def _gradient_if(needed: bool):
    """A term weighted 0 is still computed for the log, without building its graph."""
    return contextlib.nullcontext() if needed else torch.no_grad()


class MutualLearningLoss(nn.Module):
    """MAML's training objective over a network output and integer labels (B, 1, D, H, W).

    ``lambda_intra``: weight of the per-phase terms; default 0.5 ("paper") or 1 ("code").
    ``deep_supervision``: use every deep-supervision output of each phase head with nnU-Net's
    weights; when off only the full-resolution output counts.
    ``joint_weight``: weight of the fused term; default: the variant's (:meth:`joint_weight`).
    """

    def __init__(
        self,
        lambda_intra: float | None = None,
        deep_supervision: bool = True,
        variant: str = "paper",
        smooth: float = 1e-5,
        batch_dice: bool = False,
        joint_weight: float | None = None,
    ) -> None:
        super().__init__()
        if variant not in LOSS_VARIANTS:
            raise ValueError(f"loss variant {variant!r} is not one of {LOSS_VARIANTS}")
        if lambda_intra is None:
            lambda_intra = 0.5 if variant == "paper" else 1.0
        if lambda_intra < 0:
            raise ValueError(f"lambda_intra must be >= 0, got {lambda_intra}")
        if joint_weight is not None and joint_weight < 0:
            raise ValueError(f"joint_weight must be >= 0, got {joint_weight}")
        if lambda_intra == 0 and joint_weight == 0:
            raise ValueError("lambda_intra and joint_weight are both 0: nothing would be trained")
        self.fixed_joint_weight = None if joint_weight is None else float(joint_weight)
        self.lambda_intra = float(lambda_intra)
        self.deep_supervision = bool(deep_supervision)
        self.variant = variant
        self.dice_ce = dice_ce_loss(smooth, batch_dice)

    @classmethod
    def published_code(cls, smooth: float = 1e-5) -> "MutualLearningLoss":
        """The weighting of the published code's MAMLTrainerV2 (see the module docstring)."""
        return cls(lambda_intra=1.0, deep_supervision=True, variant="code", smooth=smooth)

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant!r}, lambda_intra={self.lambda_intra}, "
            f"joint_weight={self.fixed_joint_weight}, deep_supervision={self.deep_supervision}"
        )

    def _term(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Losses in float32 even under autocast: softmax and log in half precision lose accuracy.
        return self.dice_ce(logits.float(), target)

    def intra_loss(
        self, outputs: Sequence[torch.Tensor], target: torch.Tensor, cache: dict | None = None
    ) -> torch.Tensor:
        """Deep-supervised Dice + CE of one phase head (outputs full resolution first)."""
        if not outputs:
            raise ValueError("a phase head returned no outputs")
        outputs = list(outputs) if self.deep_supervision else [outputs[0]]
        weights = deep_supervision_weights(len(outputs))
        cache = {} if cache is None else cache
        total = None
        for logits, weight in zip(outputs, weights):
            if weight == 0.0:
                continue  # as nnU-Net: the lowest resolution is not computed at all
            shape = tuple(logits.shape[2:])
            if shape not in cache:
                cache[shape] = downsample_target(target, shape)
            term = weight * self._term(logits, cache[shape])
            total = term if total is None else total + term
        return total

    def joint_weight(self, n_outputs: int) -> float:
        """Weight of the fused term: as given, else 1 ("paper") or the full-resolution DS weight
        ("code")."""
        if self.fixed_joint_weight is not None:
            return self.fixed_joint_weight
        if self.variant == "code" and self.deep_supervision:
            return deep_supervision_weights(n_outputs)[0]
        return 1.0

    def forward(self, output: MAMLOutputLike, target: torch.Tensor) -> LossBreakdown:
        if target.dim() == 4:
            target = target.unsqueeze(1)
        if target.dim() != 5 or target.shape[1] != 1:
            raise ValueError(f"target must be integer labels (B, 1, D, H, W), got {tuple(target.shape)}")
        if target.is_floating_point():
            target = target.long()
        if not output.phase_logits:
            raise ValueError("the network output has no phase heads")
        full_shape = tuple(target.shape[2:])
        cache: dict = {full_shape: target}
        intra: dict[str, torch.Tensor] = {}
        n_outputs = 1
        for phase, outputs in output.phase_logits.items():
            if tuple(outputs[0].shape[2:]) != full_shape:
                raise ValueError(
                    f"phase {phase!r}: full-resolution output {tuple(outputs[0].shape)} does not "
                    f"match the target {tuple(target.shape)}"
                )
            n_outputs = max(n_outputs, len(outputs))
            with _gradient_if(self.lambda_intra > 0):
                intra[phase] = self.intra_loss(outputs, target, cache)
        joint_value = None
        joint_weight = self.joint_weight(n_outputs)
        terms = [self.lambda_intra * torch.stack(list(intra.values())).sum()] if self.lambda_intra > 0 else []
        if output.fused_logits is not None:
            if tuple(output.fused_logits.shape[2:]) != full_shape:
                raise ValueError(
                    f"fused output {tuple(output.fused_logits.shape)} does not match the target "
                    f"{tuple(target.shape)}"
                )
            with _gradient_if(joint_weight > 0):
                joint = self._term(output.fused_logits, target)
            if joint_weight > 0:
                terms.append(joint_weight * joint)
            joint_value = float(joint.detach())
        if not terms:
            raise ValueError("lambda_intra is 0 and the fused head did not run (a phase is missing): "
                             "nothing to train on")
        total = terms[0] if len(terms) == 1 else terms[0] + terms[1]
        return LossBreakdown(
            total=total,
            joint=joint_value,
            intra={phase: float(value.detach()) for phase, value in intra.items()},
            lambda_intra=self.lambda_intra,
            joint_weight=joint_weight,
        )
