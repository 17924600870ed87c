"""Validation of a network during training: full volumes of every head."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig
from ..evaluation import evaluate_arrays
from ..network import MAMLNet, WindowOutput, window_output
from .dataset import CaseData


class AllHeads(nn.Module):
    """Adapter for :func:`maml.inference.sliding_window_predict`: one pass gives the fused head's and
    every phase head's probabilities, stacked on the class axis (fused first, then phases in order),
    so a validation costs one forward pass per window instead of one per head."""

    def __init__(self, net: MAMLNet):
        super().__init__()
        self.net = net
        self.phases = list(net.phases)
        self.heads = ["fused", *self.phases]
        self.num_classes = net.num_classes * len(self.heads)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, phases: Sequence[str] | None = None) -> WindowOutput:
        out = self.net(x)
        window = window_output(out)
        probabilities = [window.probabilities]
        probabilities += [torch.softmax(out.phase_logits[p][0].float(), 1) for p in self.phases]
        return window._replace(probabilities=torch.cat(probabilities, 1))


def validate(net: MAMLNet, cases: Sequence[CaseData], config: ModelConfig, device: torch.device,
             overlap: float = 0.5, batch_size: int = 2, progress: bool = False) -> dict[str, Any]:
    """Full-volume sliding-window inference of each case; metrics in the original label geometry.

    Returns {"cases": {case: {head: {label: metrics}}}, "summary": {head: {label: {metric: mean}}},
    "mean_foreground_dice": {head: float}} with heads "fused" and each phase name.
    """
    import SimpleITK as sitk

    from ..inference import (SlidingWindowOptions, padding_of, sliding_window_predict,
                             window_alignment)
    from ..preprocessing import Geometry, resample_probabilities_to_reference

    adapter = AllHeads(net)
    k = config.num_classes
    labels = {label.name: label.value for label in config.labels if label.value != 0}
    options = SlidingWindowOptions(patch_size=config.patch_size, overlap=overlap,
                                   batch_size=batch_size, device=str(device),
                                   align=window_alignment(config), pad_with=padding_of(config))
    was_training = net.training
    net.eval()
    results: dict[str, dict] = {}
    iterator = cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(cases, desc="validate", unit="case", leave=False)
    try:
        for case in iterator:
            probs = sliding_window_predict(adapter, np.array(case.data), config.phases,
                                           options).probabilities
            model_geometry = Geometry.from_dict(case.meta["model_geometry"])
            label_geometry = Geometry.from_dict(case.meta["label_geometry"])
            gt = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label_file)))
            results[case.case_id] = {}
            for h, head in enumerate(adapter.heads):
                head_probs = resample_probabilities_to_reference(probs[h * k:(h + 1) * k],
                                                                 model_geometry, label_geometry)
                pred = np.argmax(head_probs, axis=0).astype(np.uint8)
                results[case.case_id][head] = evaluate_arrays(pred, gt, labels,
                                                              label_geometry.spacing_zyx)
    finally:
        net.train(was_training)
    summary: dict[str, dict] = {}
    mean_dice = {}
    for head in adapter.heads:
        summary[head] = {}
        for label in labels:
            summary[head][label] = {}
            for metric in ("dice", "assd_mm", "assd_voxels", "hd95_mm"):
                values = np.array([results[c][head][label][metric] for c in results], dtype=float)
                finite = values[~np.isnan(values)]
                summary[head][label][metric] = float(finite.mean()) if finite.size else math.nan
                summary[head][label][metric + "_std"] = float(finite.std()) if finite.size else math.nan
        mean_dice[head] = float(np.mean([summary[head][l]["dice"] for l in labels]))
    return {"cases": results, "summary": summary, "mean_foreground_dice": mean_dice}


# --------------------------------------------------------------------------------------------------
# Pseudo-Dice on fixed validation patches (every epoch, as nnU-Net's online evaluation)
# --------------------------------------------------------------------------------------------------


EMA_WEIGHT = 0.9  # nnU-Net: ema = 0.9 ema + 0.1 new


def validation_patches(cases: Sequence[CaseData], patch_size: Sequence[int], count: int,
                       seed: int, batch_size: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` patches of the validation cases, drawn once (the same every epoch) by the training
    sampler without augmentation, so a third of each batch is foreground as in training."""
    from .loading import PatchDataset

    if not cases or count < 1:
        return []
    sampler = PatchDataset(cases, patch_size, count, seed=seed, rank=10_000,
                           batch_size=batch_size)
    return [sampler[i] for i in range(count)]


@torch.no_grad()
def pseudo_dice(net: MAMLNet, patches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                labels: Mapping[str, int], device: torch.device, batch_size: int = 2
                ) -> dict[str, dict[str, float]]:
    """Dice of every head over all patches pooled (true and false positives summed over patches
    before dividing, as nnU-Net does): {head: {label: dice, ..., "mean": mean over labels}}."""
    heads = ["fused", *net.phases]
    counts = {h: {name: np.zeros(3) for name in labels} for h in heads}  # tp, fp, fn
    was_training = net.training
    net.eval()
    try:
        for start in range(0, len(patches), batch_size):
            chunk = patches[start:start + batch_size]
            image = torch.stack([c[0] for c in chunk]).to(device)
            target = torch.stack([c[1][0] for c in chunk]).to(device)
            out = net(image)
            logits = {"fused": out.fused_logits, **{p: out.phase_logits[p][0] for p in net.phases}}
            for head, value in logits.items():
                pred = value.argmax(1)
                for name, index in labels.items():
                    p, t = pred == index, target == index
                    counts[head][name] += [float((p & t).sum()), float((p & ~t).sum()),
                                           float((~p & t).sum())]
    finally:
        net.train(was_training)
    result = {}
    for head in heads:
        dice = {}
        for name, (tp, fp, fn) in counts[head].items():
            dice[name] = float(2 * tp / (2 * tp + fp + fn)) if (tp + fp + fn) else math.nan
        finite = [v for v in dice.values() if not math.isnan(v)]
        dice["mean"] = float(np.mean(finite)) if finite else math.nan
        result[head] = dice
    return result


def exponential_moving_average(previous: float | None, value: float) -> float:
    if previous is None or not math.isfinite(previous):
        return value
    return EMA_WEIGHT * previous + (1.0 - EMA_WEIGHT) * value
