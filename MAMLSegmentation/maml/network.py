"""The MAML network: one nnU-Net v2 PlainConvUNet per phase, fused by the modality-aware module.

The backbone mirrors ``dynamic_network_architectures.architectures.unet.PlainConvUNet`` module for
module (same parameter names and shapes), so a trained nnU-Net v2 network can warm-start a phase
(``load_nnunet_weights``) without depending on that package (its timm -> torchvision chain would
replace Slicer's torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from .config import ModelConfig, NetworkConfig
from .errors import InputError, ModelError
from .inference import WindowOutput


class ConvNormAct(nn.Module):
    """Conv3d -> InstanceNorm3d(affine) -> LeakyReLU(0.01), named like nnU-Net's ConvDropoutNormReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int],
                 stride: Sequence[int], bias: bool):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, tuple(kernel), tuple(stride),
                              padding=[(k - 1) // 2 for k in kernel], bias=bias)
        self.norm = nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True)
        self.nonlin = nn.LeakyReLU(negative_slope=1e-2, inplace=True)
        # The same modules again under nnU-Net's key names, so state dicts match key for key.
        self.all_modules = nn.Sequential(self.conv, self.norm, self.nonlin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_modules(x)


class StackedConvs(nn.Module):
    """``n`` ConvNormAct blocks; only the first one strides (nnU-Net's StackedConvBlocks)."""

    def __init__(self, n: int, in_channels: int, out_channels: int, kernel: Sequence[int],
                 first_stride: Sequence[int], bias: bool):
        super().__init__()
        blocks = [ConvNormAct(in_channels, out_channels, kernel, first_stride, bias)]
        blocks += [ConvNormAct(out_channels, out_channels, kernel, (1, 1, 1), bias) for _ in range(n - 1)]
        self.convs = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class Encoder(nn.Module):
    def __init__(self, in_channels: int, net: NetworkConfig):
        super().__init__()
        stages = []
        for features, kernel, stride, n_convs in zip(net.features_per_stage, net.kernel_sizes,
                                                    net.strides, net.convs_per_stage()):
            stages.append(nn.Sequential(StackedConvs(n_convs, in_channels, features, kernel, stride,
                                                     net.conv_bias)))
            in_channels = features
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class Decoder(nn.Module):
    def __init__(self, net: NetworkConfig, num_classes: int):
        super().__init__()
        features = net.features_per_stage
        stages, transpconvs, seg_layers = [], [], []
        for s in range(1, net.n_stages):
            below, skip = features[-s], features[-(s + 1)]
            stride = net.strides[-s]
            if s == net.n_stages - 1 and net.final_upsampling == "trilinear":
                transpconvs.append(_trilinear_upsampling(below, skip, stride, net))
            else:
                transpconvs.append(nn.ConvTranspose3d(below, skip, tuple(stride), tuple(stride),
                                                      bias=net.conv_bias))
            stages.append(StackedConvs(net.convs_per_decoder_stage()[s - 1], 2 * skip, skip,
                                       net.kernel_sizes[-(s + 1)], (1, 1, 1), net.conv_bias))
            seg_layers.append(nn.Conv3d(skip, num_classes, 1, 1, 0, bias=True))
        self.stages = nn.ModuleList(stages)
        self.transpconvs = nn.ModuleList(transpconvs)
        self.seg_layers = nn.ModuleList(seg_layers)

    def forward(self, skips: list[torch.Tensor], deep_supervision: bool
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns the last stage's features and the logits, full resolution first."""
        x = skips[-1]
        logits = []
        last = len(self.stages) - 1
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = stage(torch.cat((up(x), skips[-(s + 2)]), dim=1))
            if deep_supervision or s == last:
                logits.append(self.seg_layers[s](x))
        return x, logits[::-1]


def _trilinear_upsampling(below: int, skip: int, stride, net: NetworkConfig) -> nn.Module:
    """Trilinear up-sampling then a convolution, in place of a transposed convolution whose kernel =
    stride leaves a period-stride pattern in the features (and so in the attention maps)."""
    kernel = tuple(net.kernel_sizes[0])
    return nn.Sequential(
        nn.Upsample(scale_factor=tuple(float(v) for v in stride), mode="trilinear", align_corners=False),
        nn.Conv3d(below, skip, kernel, 1, tuple(k // 2 for k in kernel), bias=net.conv_bias))


class PhaseUNet(nn.Module):
    """One phase's backbone: nnU-Net v2 PlainConvUNet with access to its last decoder features."""

    def __init__(self, net: NetworkConfig, num_classes: int, in_channels: int = 1):
        super().__init__()
        self.encoder = Encoder(in_channels, net)
        self.decoder = Decoder(net, num_classes)

    def forward(self, x: torch.Tensor, deep_supervision: bool = False,
                return_bottleneck: bool = False):
        """(last decoder features, logits full resolution first), plus the deepest encoder stage's
        output when ``return_bottleneck``."""
        skips = self.encoder(x)
        features, logits = self.decoder(skips, deep_supervision)
        return (features, logits, skips[-1]) if return_bottleneck else (features, logits)


def he_init(module: nn.Module) -> None:
    """nnU-Net's InitWeights_He(1e-2) for the backbones."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ModalityAwareFusion(nn.Module):
    """The MA module (paper eq. 1-2): F_att = sum_i sigmoid(f_a,i([F_dual; F_i])) * F_i.

    f_a,i: conv3x3x3 + instance norm + leaky ReLU, then conv1x1x1 (3x3x3 in the published code),
    followed by instance norm + leaky ReLU too in the "paper" variant ("each convolutional layer is
    followed by an instance normalization and a leaky ReLU"); "paper-linear" and "code" feed the
    second convolution's output to the sigmoid directly.
    """

    def __init__(self, phases: Sequence[str], channels: int, variant: str):
        super().__init__()
        self.dual = nn.Conv3d(len(phases) * channels, channels, 3, 1, 1)
        self.attention = nn.ModuleDict({phase: _attention_layers(channels, variant)
                                        for phase in phases})

    def forward(self, features: Mapping[str, torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        dual = self.dual(torch.cat(list(features.values()), dim=1))
        attention = {phase: self.attention[phase](torch.cat((dual, f), dim=1))
                     for phase, f in features.items()}
        fused = sum(attention[phase] * f for phase, f in features.items())
        return fused, attention


def _norm_and_activation(channels: int) -> list[nn.Module]:
    return [nn.InstanceNorm3d(channels, eps=1e-5, affine=True), nn.LeakyReLU(1e-2, inplace=True)]


def _attention_layers(channels: int, variant: str) -> nn.Sequential:
    second_kernel = 3 if variant == "code" else 1
    layers = [nn.Conv3d(2 * channels, channels, 3, 1, 1), *_norm_and_activation(channels),
              nn.Conv3d(channels, channels, second_kernel, 1, (second_kernel - 1) // 2)]
    if variant == "paper":
        layers += _norm_and_activation(channels)
    return nn.Sequential(*layers, nn.Sigmoid())


@dataclass
class MAMLOutput:
    """What a forward pass gives the loss.

    phase_logits: per phase, logits full resolution first (deep-supervision scales after it when
    training with deep supervision). fused_logits/attention: only when every phase is present.
    """

    phase_logits: dict[str, list[torch.Tensor]]
    fused_logits: torch.Tensor | None
    attention: dict[str, torch.Tensor] | None
    bottleneck: dict[str, torch.Tensor] | None = None  # per phase, the deepest encoder features


class MAMLNet(nn.Module):
    """Per-phase U-Nets + MA fusion + fused head. Any number of phases >= 1; with one phase (e.g. an
    imported nnU-Net model) the fusion is never used and that phase's own head segments."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.phases = list(config.phases)
        self.num_classes = config.num_classes
        self.deep_supervision = config.network.deep_supervision
        net = config.network
        self.backbones = nn.ModuleDict({p: PhaseUNet(net, config.num_classes) for p in self.phases})
        self.backbones.apply(he_init)
        channels = net.features_per_stage[0]
        self.fusion = ModalityAwareFusion(self.phases, channels, net.ma_variant)
        self.fused_head = nn.Conv3d(channels, config.num_classes, 1, 1, 0,
                                    bias=net.ma_variant != "code")

    def present_phases(self, phases: Sequence[str] | None) -> list[str]:
        """The given phases in model order; unknown or repeated names are an input error."""
        if phases is None:
            return list(self.phases)
        unknown = [p for p in phases if p not in self.phases]
        if unknown:
            raise InputError(f"unknown phase(s) {unknown}: this model's phases are {self.phases}")
        if len(set(phases)) != len(phases) or not phases:
            raise InputError(f"phases must be distinct and at least one, got {list(phases)}")
        return [p for p in self.phases if p in phases]

    def forward(self, x: torch.Tensor, phases: Sequence[str] | None = None) -> MAMLOutput:
        """x: (B, P, D, H, W), one channel per present phase in model order."""
        present = self.present_phases(phases)
        if x.ndim != 5 or x.shape[1] != len(present):
            raise InputError(
                f"network input must be (batch, {len(present)} phases, D, H, W), got {tuple(x.shape)}"
            )
        deep = self.deep_supervision and self.training
        features, logits, bottleneck = {}, {}, {}
        for channel, phase in enumerate(present):
            features[phase], logits[phase], bottleneck[phase] = (
                self.backbones[phase](x[:, channel:channel + 1], deep, return_bottleneck=True))
        if len(present) < len(self.phases) or len(self.phases) == 1:
            # A one-phase model has nothing to fuse: its own head segments.
            return MAMLOutput(logits, None, None, bottleneck)
        fused, attention = self.fusion(features)
        return MAMLOutput(logits, self.fused_head(fused), attention, bottleneck)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, phases: Sequence[str] | None = None) -> WindowOutput:
        """Probabilities, heatmaps, head disagreement and pooled bottleneck features of a batch.

        All phases -> the fused head; one phase -> that phase's own head; two or more of N > 2 ->
        the mean of the present heads' probabilities (the paper covers only all or one).
        """
        return window_output(self.forward(x, phases))


def _entropy_bits(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log2(p.clamp_min(1e-12))).sum(1, keepdim=True)


def jensen_shannon_bits(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-voxel Jensen-Shannon divergence (B, 1, ...) of class probabilities (B, K, ...), in [0, 1]."""
    return (_entropy_bits((p + q) / 2) - (_entropy_bits(p) + _entropy_bits(q)) / 2).clamp(0, 1)


def pool_bottleneck(features: torch.Tensor) -> torch.Tensor:
    """(B, C, z, y, x) deepest encoder features -> (B, 2C): each channel's mean and spread over the
    window. The spread tells a flat or noisy input from anatomy where the mean alone cannot."""
    features = features.float()
    return torch.cat([features.mean(dim=(2, 3, 4)), features.std(dim=(2, 3, 4), correction=0)], 1)


def window_output(out: MAMLOutput) -> WindowOutput:
    """The inference view of a forward pass (see :class:`WindowOutput`)."""
    head_logits = [l[0].float() for l in out.phase_logits.values()]
    heads = [torch.softmax(l, 1) for l in head_logits]
    bottleneck = torch.stack([pool_bottleneck(b) for b in out.bottleneck.values()], 1)
    if out.fused_logits is None:
        return WindowOutput(torch.stack(heads).mean(0), None, None, bottleneck,
                            torch.stack(head_logits).mean(0))
    fused_logits = out.fused_logits.float()
    fused = torch.softmax(fused_logits, 1)
    heatmaps = torch.cat([a.mean(dim=1, keepdim=True) for a in out.attention.values()], 1)
    disagreement = torch.stack([jensen_shannon_bits(fused, head) for head in heads]).mean(0)
    return WindowOutput(fused, heatmaps.float(), disagreement, bottleneck, fused_logits)


class FoldEnsemble(nn.Module):
    """Several MAMLNets of one configuration (e.g. an nnU-Net model's cross-validation folds) that
    predict as one: every field of :class:`WindowOutput` that the members give is averaged over
    them (probabilities: the mean of the members' softmax outputs; logits: the mean of their logits,
    what nnU-Net's predictor blends). Inference and export see the attributes of a MAMLNet
    (``phases``, ``num_classes``, ``predict``)."""

    def __init__(self, members: Sequence[MAMLNet]):
        super().__init__()
        if not members:
            raise ModelError("an ensemble needs at least one network")
        first = members[0]
        if any(m.phases != first.phases or m.num_classes != first.num_classes for m in members):
            raise ModelError("ensemble members must share phases and classes")
        self.members = nn.ModuleList(members)
        self.phases = list(first.phases)
        self.num_classes = first.num_classes

    def __len__(self) -> int:
        return len(self.members)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, phases: Sequence[str] | None = None) -> WindowOutput:
        outputs = [member.predict(x, phases) for member in self.members]
        fields = []
        for values in zip(*outputs):
            fields.append(None if values[0] is None else torch.stack(values).mean(0))
        return WindowOutput(*fields)


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):  # DDP and torch.compile wrappers
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith("decoder.encoder."):  # nnU-Net's decoder keeps a second path to its encoder
            continue
        cleaned[key] = value
    return cleaned


def load_nnunet_weights(net: MAMLNet, phase: str, source: str | Path | Mapping[str, torch.Tensor],
                        input_channel: int | None = None, load_heads: bool = True) -> None:
    """Warm-start one phase's backbone from a trained nnU-Net v2 PlainConvUNet.

    ``source`` is an nnU-Net checkpoint file (``checkpoint_final.pth``) or a state dict. When the
    nnU-Net model saw several input channels (phases stacked), ``input_channel`` picks this phase's
    slice of the first convolution. ``load_heads=False`` keeps the segmentation heads (other labels).
    """
    if phase not in net.backbones:
        raise InputError(f"unknown phase {phase!r}: this model's phases are {net.phases}")
    if isinstance(source, (str, Path)):
        try:
            checkpoint = torch.load(source, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, EOFError) as error:
            raise ModelError(f"cannot read nnU-Net checkpoint {source}: {error}") from error
        source = checkpoint.get("network_weights", checkpoint)
    state = _strip_prefixes(source)
    first = "encoder.stages.0.0.convs.0.conv.weight"
    if first in state and input_channel is not None:
        for key in (first, "encoder.stages.0.0.convs.0.all_modules.0.weight"):
            state[key] = state[key][:, input_channel:input_channel + 1]
    if not load_heads:
        state = {k: v for k, v in state.items() if not k.startswith("decoder.seg_layers.")}
    backbone = net.backbones[phase]
    expected = backbone.state_dict()
    mismatched = [k for k, v in state.items() if k in expected and expected[k].shape != v.shape]
    missing = [k for k in expected if k not in state and (load_heads or "seg_layers" not in k)]
    unexpected = [k for k in state if k not in expected]
    if mismatched or missing or unexpected:
        raise ModelError(
            f"nnU-Net weights do not fit the {phase!r} backbone: "
            f"{len(mismatched)} shape mismatches (e.g. {mismatched[:2]}), "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:2]}); check base features, stages, kernels and input channels"
        )
    backbone.load_state_dict(state, strict=load_heads)
