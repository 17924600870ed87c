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

    def forward(self, x: torch.Tensor, deep_supervision: bool = False
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.decoder(self.encoder(x), deep_supervision)


def he_init(module: nn.Module) -> None:
    """nnU-Net's InitWeights_He(1e-2) for the backbones."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ModalityAwareFusion(nn.Module):
    """The MA module (paper eq. 1-2): F_att = sum_i sigmoid(f_a,i([F_dual; F_i])) * F_i."""

    def __init__(self, phases: Sequence[str], channels: int, variant: str):
        super().__init__()
        self.dual = nn.Conv3d(len(phases) * channels, channels, 3, 1, 1)
        second_kernel = 1 if variant == "paper" else 3
        self.attention = nn.ModuleDict({
            phase: nn.Sequential(
                nn.Conv3d(2 * channels, channels, 3, 1, 1),
                nn.InstanceNorm3d(channels, eps=1e-5, affine=True),
                nn.LeakyReLU(1e-2, inplace=True),
                nn.Conv3d(channels, channels, second_kernel, 1, (second_kernel - 1) // 2),
                nn.Sigmoid(),
            )
            for phase in phases
        })

    def forward(self, features: Mapping[str, torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        dual = self.dual(torch.cat(list(features.values()), dim=1))
        attention = {phase: self.attention[phase](torch.cat((dual, f), dim=1))
                     for phase, f in features.items()}
        fused = sum(attention[phase] * f for phase, f in features.items())
        return fused, attention


@dataclass
class MAMLOutput:
    """What a forward pass gives the loss.

    phase_logits: per phase, logits full resolution first (deep-supervision scales after it when
    training with deep supervision). fused_logits/attention: only when every phase is present.
    """

    phase_logits: dict[str, list[torch.Tensor]]
    fused_logits: torch.Tensor | None
    attention: dict[str, torch.Tensor] | None


class MAMLNet(nn.Module):
    """Per-phase U-Nets + MA fusion + fused head. Any number of phases >= 1."""

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
                                    bias=net.ma_variant == "paper")

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
        features, logits = {}, {}
        for channel, phase in enumerate(present):
            features[phase], logits[phase] = self.backbones[phase](x[:, channel:channel + 1], deep)
        if len(present) < len(self.phases):
            return MAMLOutput(logits, None, None)
        fused, attention = self.fusion(features)
        return MAMLOutput(logits, self.fused_head(fused), attention)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, phases: Sequence[str] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Class probabilities (B, K, ...) and attention heatmaps (B, P, ...) or None.

        All phases -> the fused head; one phase -> that phase's own head; two or more of N > 2 ->
        the mean of the present heads' probabilities (the paper covers only all or one).
        """
        out = self.forward(x, phases)
        if out.fused_logits is not None:
            heatmaps = torch.cat([a.mean(dim=1, keepdim=True) for a in out.attention.values()], 1)
            return torch.softmax(out.fused_logits.float(), 1), heatmaps.float()
        probabilities = [torch.softmax(l[0].float(), 1) for l in out.phase_logits.values()]
        return torch.stack(probabilities).mean(0), None


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
