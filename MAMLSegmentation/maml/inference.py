"""Sliding-window inference over a preprocessed volume, nnU-Net style.

Windows overlap by a fraction of a patch (the model's own; half by default) and are blended with a
Gaussian importance map (sigma = patch / 8); class probabilities and attention heatmaps are
accumulated at the model's resolution, so memory grows with the resampled volume, never with the
number of windows. Window placement, zero padding, the Gaussian (peak at voxel ``patch // 2``, cut
at 4 sigma) and the mirroring are those of nnU-Net v2's predictor; models imported from nnU-Net
also blend logits as it does (``InferenceConfig.blend``).
"""

from __future__ import annotations

import itertools
import math
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from .config import DEFAULT_OVERLAP
from .errors import CancelledError, InputError

if TYPE_CHECKING:
    import SimpleITK as sitk
    import torch

    from .model import LoadedModel
    from .network import MAMLNet

ProgressCallback = Callable[[float], None]
CancelCheck = Callable[[], bool]


@dataclass
class SlidingWindowOptions:
    patch_size: Sequence[int]
    overlap: float = DEFAULT_OVERLAP
    sigma_scale: float = 1.0 / 8
    batch_size: int = 2
    mirror: bool = False  # test-time augmentation: every combination of flips of mirror_axes
    device: str = "auto"
    mirror_axes: Sequence[int] = (0, 1, 2)  # array axes (z, y, x) that mirroring flips
    blend: str = "probabilities"  # or "logits": averaged, softmax once at the end (nnU-Net)
    # Window starts on multiples of this (z, y, x): the network's total stride (predict_case sets it).
    align: Sequence[int] = (1, 1, 1)
    # What fills the volume's padding: "air" (each phase's lowest value, as training pads) or
    # "zero" (nnU-Net's predictor, for imported nnU-Net models).
    pad_with: str = "zero"


def resolve_device(name: str = "auto") -> "torch.device":
    """"auto" takes CUDA when available, else the CPU; "cuda" without a GPU is an input error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but no CUDA GPU is available; use 'cpu' or 'auto'")
    if name != "cpu" and not name.startswith("cuda"):
        raise InputError(f"device {name!r} is not one of auto, cpu, cuda")
    return torch.device(name)


class WindowOutput(NamedTuple):
    """What inference takes from one batch of windows (:meth:`maml.network.MAMLNet.predict`): torch
    tensors from a torch network, numpy arrays from a backend that takes numpy (``takes_numpy``).

    probabilities: (B, K, ...) of the fused head, or of the one present phase's head (the mean of
    the present heads' when two or more of N > 2 phases are given).
    heatmaps: (B, P, ...) channel-mean attention per phase, fused head only, else None.
    disagreement: (B, 1, ...) in [0, 1], the mean Jensen-Shannon divergence between the fused head
    and each phase's own head (in bits), fused head only, else None.
    bottleneck: (B, P, 2C) each present phase's deepest encoder features pooled over the window
    (:func:`maml.network.pool_bottleneck`): what the out-of-distribution check measures distances on.
    logits: (B, K, ...) the logits whose softmax ``probabilities`` is (for a mean of heads, the
    mean of their logits), for models that blend logits as nnU-Net does (``InferenceConfig``).
    """

    probabilities: Any
    heatmaps: Any | None
    disagreement: Any | None
    bottleneck: Any
    logits: Any | None = None


def nnunet_gaussian(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """nnU-Net v2's importance map, value for value (its ``compute_gaussian``): a unit impulse at
    voxel ``size // 2`` of each axis smoothed by a Gaussian of sigma = size * sigma_scale cut at 4
    sigma (scipy's ``gaussian_filter`` with zero borders), scaled to a maximum of 10, in float16;
    weights that float16 rounds to 0 take the smallest non-zero one. That floor matters: near window
    corners the true weights are ~1e-10, and where only such corners cover a voxel it decides the
    blend."""
    axes = []
    for size in patch_size:
        sigma = max(size * sigma_scale, 1e-3)
        coords = np.arange(size, dtype=np.float64) - size // 2
        axis = np.exp(-0.5 * (coords / sigma) ** 2)
        axis[np.abs(coords) > int(4 * sigma + 0.5)] = 0
        axes.append(axis)
    weight = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weight = (weight / (weight.max() / 10)).astype(np.float16)
    weight[weight == 0] = weight[weight > 0].min()
    return weight


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float) -> np.ndarray:
    """:func:`nnunet_gaussian` as float32 with a maximum of 1 (the scale cancels in the blend)."""
    return nnunet_gaussian(patch_size, sigma_scale).astype(np.float32) / np.float32(10)


def window_starts(size: int, patch: int, overlap: float, align: int = 1) -> list[int]:
    """Evenly spaced starts covering [0, size) with at most (1 - overlap) * patch between them
    (rounded up to a multiple of ``align``).

    ``align``: starts are multiples of it (the network's total stride), so every window sees the
    volume on the same phase of its up-sampling grid and a window's periodic up-sampling pattern
    does not flip sign from window to window. The last window stays flush with the end; it is a
    multiple too when ``size - patch`` is (:func:`sliding_window_predict` pads the volume so)."""
    if size <= patch:
        return [0]
    step = patch * (1 - overlap)
    count = math.ceil((size - patch) / step) + 1
    align = max(int(align), 1)
    units = (size - patch) // align
    starts = [align * round(i * units / (count - 1)) for i in range(count)]
    if starts[-1] != size - patch:  # not a multiple: the last window flush with the end anyway
        starts.append(size - patch)
    return sorted(set(starts))


def _pad_to_patch(data, patch: Sequence[int], align: Sequence[int] = (1, 1, 1),
                  pad_with: str = "zero") -> tuple[np.ndarray, list[slice]]:
    """(P, z, y, x) as float32 numpy, padded up to the patch size (symmetrically), and at the end so
    that size - patch is a multiple of ``align`` (every window start aligned). ``pad_with`` "zero"
    (the normalised foreground mean: nnU-Net's predictor) or "air" (each channel's lowest value, as
    training pads: zeros would show the network a frame of liver-like intensity at the volume's
    edge)."""
    data = np.asarray(data, dtype=np.float32)
    pads, crop = [], []
    for size, p, a in zip(data.shape[1:], patch, align):
        total = max(p - size, 0)
        before = total // 2
        after = total - before + (-(size + total - p)) % max(int(a), 1)
        pads.append((before, after))
        crop.append(slice(before, before + size))
    if not any(v for pair in pads for v in pair):
        return data, crop
    shape = [data.shape[0], *(size + a + b for size, (a, b) in zip(data.shape[1:], pads))]
    padded = np.zeros(shape, dtype=np.float32)
    if pad_with == "air":
        padded[:] = data.min(axis=tuple(range(1, data.ndim)), keepdims=True)
    padded[(slice(None), *crop)] = data
    return padded, crop


def _mirror_axes(mirror: bool, axes: Sequence[int] = (0, 1, 2)) -> list[tuple[int, ...]]:
    """The unflipped batch first, then every combination of the spatial axes, as nnU-Net orders them."""
    if not mirror:
        return [()]
    spatial = [2 + a for a in sorted(axes)]
    return [c for r in range(len(spatial) + 1) for c in itertools.combinations(spatial, r)]


@contextmanager
def _inference_layout(net: "MAMLNet"):
    """Eval mode and channels-last 3D weights for the duration of inference, then as before.

    Channels-last gives ~15 % faster convolutions on the CPU (oneDNN) and is the layout cuDNN's AMP
    kernels prefer. Only the memory layout changes, not a value; the caller's network (perhaps
    mid-training) gets its mode and layout back.
    """
    import torch

    was_training = net.training
    net.eval().to(memory_format=torch.channels_last_3d)
    try:
        yield
    finally:
        net.to(memory_format=torch.contiguous_format).train(was_training)


def _predict_window(net, batch, phases: Sequence[str], mirror: bool,
                    mirror_axes: Sequence[int] = (0, 1, 2), flip: Callable = np.flip) -> WindowOutput:
    """The mean of the network's outputs over the mirrored copies of the batch; the bottleneck
    features are those of the unflipped batch (the out-of-distribution statistics are taken so).
    ``flip``: np.flip for numpy batches, torch.flip for tensors."""
    flips = _mirror_axes(mirror, mirror_axes)
    total: list | None = None
    bottleneck = None
    for axes in flips:
        out = net.predict(flip(batch, axes) if axes else batch, phases)
        maps = [flip(m, axes) if (axes and m is not None) else m for m in (*out[:3], out.logits)]
        total = maps if total is None else [t + m if m is not None else None for t, m in zip(total, maps)]
        if bottleneck is None:
            bottleneck = out.bottleneck
    scale = 1.0 / len(flips)
    probabilities, heatmaps, disagreement, logits = (m * scale if m is not None else None for m in total)
    return WindowOutput(probabilities, heatmaps, disagreement, bottleneck, logits)


@dataclass
class WindowedPrediction:
    """Outputs of a sliding-window pass on the model grid (float32 numpy on the CPU).

    probabilities (K, z, y, x); heatmaps (P, z, y, x) and disagreement (z, y, x) when the fused head
    ran, else None; per window: the pooled bottleneck features (W, P, C), its start in the padded
    volume and the fraction of its voxels inside ``body`` (NaN when no body mask was given).
    """

    probabilities: np.ndarray
    heatmaps: np.ndarray | None
    disagreement: np.ndarray | None
    window_features: np.ndarray
    window_starts: list[tuple[int, int, int]]
    window_body_fraction: np.ndarray
    logits: np.ndarray | None = None  # (K, z, y, x) when the options blend logits


class _Arrays:
    """Where a sliding-window pass keeps its sums: numpy for a backend that takes numpy batches
    (OpenVINO: no torch is imported), else torch tensors on the network's device."""

    def __init__(self, device: str, numpy: bool):
        self.numpy = numpy
        if numpy:
            self.device = None
            self.flip = np.flip
            return
        import torch

        self.torch = torch
        self.device = resolve_device(device)
        self.flip = torch.flip

    def zeros(self, shape, half: bool = False):
        if self.numpy:
            return np.zeros(shape, dtype=np.float16 if half else np.float32)
        torch = self.torch
        return torch.zeros(shape, dtype=torch.float16 if half else torch.float32, device=self.device)

    def put(self, array: np.ndarray):
        """A numpy array (the weight map, a batch of windows) where the sums are."""
        return array if self.numpy else self.torch.from_numpy(array).to(self.device)

    def as_float(self, value):
        return value.astype(np.float32, copy=False) if self.numpy else value.float()

    def to_numpy(self, value) -> np.ndarray:
        return np.asarray(value, dtype=np.float32) if self.numpy else value.float().cpu().numpy()

    def softmax(self, logits) -> np.ndarray:
        """The softmax over the class axis (0) as float32 numpy."""
        if not self.numpy:
            return self.torch.softmax(logits.float().cpu(), 0).numpy()
        shifted = logits.astype(np.float32) - logits.max(axis=0, keepdims=True)
        np.exp(shifted, out=shifted)
        shifted /= shifted.sum(axis=0, keepdims=True)
        return shifted

    def running(self, member):
        """Inference mode, autocast on CUDA and the network's inference layout, while inside."""
        if self.numpy:
            return nullcontext()
        torch = self.torch
        stack = ExitStack()
        # The layout change happens outside inference mode, so the weights stay usable for training.
        if isinstance(member, torch.nn.Module):
            stack.enter_context(_inference_layout(member))
        stack.enter_context(torch.inference_mode())
        if self.device.type == "cuda":
            stack.enter_context(torch.autocast("cuda", dtype=torch.float16))
        return stack

    def batch(self, member, windows: list[np.ndarray]):
        stacked = self.put(np.stack(windows))
        if not self.numpy and isinstance(member, self.torch.nn.Module):
            stacked = stacked.contiguous(memory_format=self.torch.channels_last_3d)
        return stacked


def _window_grid(data, body: np.ndarray | None, options: SlidingWindowOptions):
    """The padded volume (:func:`_pad_to_patch`), the crop back to ``data``, the padded body mask
    (or None) and every window's start: what both sliding passes below walk over."""
    patch = [int(p) for p in options.patch_size]
    align = [int(a) for a in options.align]
    volume, crop = _pad_to_patch(data, patch, align, options.pad_with)
    body_mask = None
    if body is not None:
        body_mask = _pad_to_patch(np.asarray(body, dtype=np.float32)[None], patch, align)[0][0]
    starts = list(itertools.product(*(window_starts(s, p, options.overlap, a)
                                      for s, p, a in zip(volume.shape[1:], patch, align))))
    return volume, crop, body_mask, starts


def sliding_window_predict(
    net,
    data: np.ndarray,
    phases: Sequence[str],
    options: SlidingWindowOptions,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    body: np.ndarray | None = None,
) -> WindowedPrediction:
    """Sliding-window inference of ``data`` (P, z, y, x), one normalised channel per present phase
    in model order. ``net``: a torch network (:class:`maml.network.MAMLNet` or an ensemble), or a
    backend object with its ``predict`` (:mod:`maml.backends`; one whose ``takes_numpy`` is true
    is fed numpy and torch is never imported). ``body``: an optional (z, y, x) mask of the voxels
    inside the body, for each window's body fraction. Cancellation is checked between window
    batches (``CancelledError``).
    """
    volume = np.asarray(data, dtype=np.float32)
    if volume.ndim != 4:
        raise InputError(f"inference input must be (phases, z, y, x), got shape {tuple(volume.shape)}")
    volume, crop, body_mask, starts = _window_grid(volume, body, options)
    patch = [int(p) for p in options.patch_size]
    shape = volume.shape[1:]
    arrays = _Arrays(options.device, bool(getattr(net, "takes_numpy", False)))
    if not arrays.numpy and isinstance(net, arrays.torch.nn.Module):
        net = net.to(arrays.device)
    weight = arrays.put(gaussian_importance(patch, options.sigma_scale))
    fused = len(phases) == len(net.phases) > 1  # one phase: its own head, no fusion maps
    if options.blend not in ("probabilities", "logits"):
        raise InputError(f"blend {options.blend!r} is not 'probabilities' or 'logits'")
    blend_logits = options.blend == "logits"
    # nnU-Net's predictor runs a whole sliding window per fold and averages the folds' logits.
    members = list(net.members) if blend_logits and hasattr(net, "members") else [net]
    nnunet_weight = arrays.put(nnunet_gaussian(patch, options.sigma_scale)) if blend_logits else None
    probabilities = None if blend_logits else arrays.zeros((net.num_classes, *shape))
    logits = None
    heatmaps = arrays.zeros((len(phases), *shape)) if fused else None
    disagreement = arrays.zeros((1, *shape)) if fused else None
    weight_sum = arrays.zeros(shape)
    features, body_fraction = [], []
    steps = len(starts) * len(members)

    for index, member in enumerate(members):
        if blend_logits:
            # float16 sums with the float16 Gaussian (maximum 10), as nnU-Net v2 accumulates: its
            # rounding decides the last digits, and near window corners more than that.
            member_logits = arrays.zeros((net.num_classes, *shape), half=True)
            member_weights = arrays.zeros(shape, half=True)
        member_features = []
        with arrays.running(member):
            for first in range(0, len(starts), options.batch_size):
                if cancel is not None and cancel():
                    raise CancelledError("inference cancelled")
                group = starts[first:first + options.batch_size]
                regions = [tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in group]
                batch = arrays.batch(member, [volume[(slice(None), *region)] for region in regions])
                out = _predict_window(member, batch, phases, options.mirror, options.mirror_axes,
                                      arrays.flip)
                if blend_logits and out.logits is None:
                    raise InputError("this network gives no logits; blend probabilities instead")
                member_features.append(arrays.to_numpy(out.bottleneck))
                for i, region in enumerate(regions):  # in place: no volume-sized temporaries
                    everything = (slice(None), *region)
                    if blend_logits:
                        member_logits[everything] += arrays.as_float(out.logits[i]) * nnunet_weight
                        member_weights[region] += nnunet_weight
                    else:
                        probabilities[everything] += arrays.as_float(out.probabilities[i]) * weight
                    if heatmaps is not None:
                        heatmaps[everything] += arrays.as_float(out.heatmaps[i]) * weight
                        disagreement[everything] += arrays.as_float(out.disagreement[i]) * weight
                    if index == 0:
                        weight_sum[region] += weight
                        body_fraction.append(float(body_mask[region].mean())
                                             if body_mask is not None else math.nan)
                if progress is not None:
                    done = index * len(starts) + min(first + options.batch_size, len(starts))
                    progress(done / steps)
        if blend_logits:
            member_logits /= member_weights
            logits = member_logits if logits is None else logits + member_logits
        features.append(np.concatenate(member_features))
    if len(members) > 1:
        logits /= len(members)

    def finish(accumulated, scale: float = 1.0) -> np.ndarray | None:
        if accumulated is None:
            return None
        accumulated /= weight_sum * scale
        return arrays.to_numpy(accumulated[(slice(None), *crop)])

    if blend_logits:
        logits = logits[(slice(None), *crop)]
        blended_probabilities = arrays.softmax(logits)
        logits = arrays.to_numpy(logits)
    else:
        blended_probabilities = finish(probabilities)
    return WindowedPrediction(
        blended_probabilities, finish(heatmaps, len(members)),
        None if disagreement is None else finish(disagreement, len(members))[0],
        np.stack(features).mean(0), starts, np.asarray(body_fraction, dtype=np.float64), logits)


def window_bottleneck_features(net: "MAMLNet", data: np.ndarray, phases: Sequence[str],
                               options: SlidingWindowOptions, body: np.ndarray | None = None
                               ) -> tuple[np.ndarray, np.ndarray]:
    """The (W, P, C) pooled bottleneck features and (W,) body fractions that
    :func:`sliding_window_predict` reports, from the same windows, computed with the encoders only
    (a fraction of the cost: for the training fingerprint). Networks without per-phase encoders
    (e.g. ensembles) take the full pass."""
    if not hasattr(net, "backbones"):
        windowed = sliding_window_predict(net, data, phases, options, body=body)
        return windowed.window_features, windowed.window_body_fraction
    import torch

    from .network import pool_bottleneck

    device = resolve_device(options.device)
    volume, _, body_mask, starts = _window_grid(data, body, options)
    patch = [int(p) for p in options.patch_size]
    present = net.present_phases(phases)
    features, fractions = [], []
    net = net.to(device)
    with _inference_layout(net), torch.inference_mode():
        for first in range(0, len(starts), options.batch_size):
            regions = [tuple(slice(s, s + p) for s, p in zip(start, patch))
                       for start in starts[first:first + options.batch_size]]
            batch = torch.from_numpy(np.stack([volume[(slice(None), *region)]
                                               for region in regions])).to(device)
            pooled = [pool_bottleneck(net.backbones[phase].encoder(batch[:, i:i + 1])[-1])
                      for i, phase in enumerate(present)]
            features.append(torch.stack(pooled, 1).cpu())
            fractions += [float(body_mask[region].mean()) if body_mask is not None else math.nan
                          for region in regions]
    return torch.cat(features).numpy(), np.asarray(fractions, dtype=np.float64)


@dataclass
class CasePrediction:
    """Outputs in the input geometry: labels (UInt8), heatmaps per phase (float32 in [0, 1], only
    when the fused head ran), the uncertainty map (float32 in [0, 1]; both in steps of 1/1024,
    :func:`unit_steps`), class probabilities (K, Z, Y, X) when asked for; and, per window, the pooled
    bottleneck features and body fraction (see :class:`WindowedPrediction`) for the
    out-of-distribution check."""

    labels: "sitk.Image"
    attention: dict[str, "sitk.Image"]
    probabilities: np.ndarray | None
    phases: list[str]
    head: str  # "fused", "<phase>" or "mean(<phases>)": which output produced the labels
    uncertainty: "sitk.Image | None" = None
    window_features: np.ndarray | None = None
    window_body_fraction: np.ndarray | None = None
    backend: str = "torch"  # which backend ran the network (maml.backends)


def uncertainty_map(probabilities: np.ndarray, disagreement: np.ndarray | None) -> np.ndarray:
    """Per voxel in [0, 1]: the normalised entropy H of the class probabilities (K, ...), combined
    with the heads' disagreement D (mean Jensen-Shannon divergence of each phase's head from the
    fused head, in bits) as 1 - (1 - H)(1 - D): either one alone can make a voxel uncertain."""
    k = probabilities.shape[0]
    p = np.clip(probabilities, 1e-12, 1.0)
    entropy = -(p * np.log(p)).sum(0) / math.log(k)
    entropy = np.clip(entropy, 0.0, 1.0)
    if disagreement is None:
        return entropy.astype(np.float32)
    return (1.0 - (1.0 - entropy) * (1.0 - np.clip(disagreement, 0.0, 1.0))).astype(np.float32)


def predict_case(
    model: "LoadedModel",
    images: Mapping[str, "sitk.Image"],
    mirror: bool = False,
    device: str = "auto",
    batch_size: int = 2,
    keep_probabilities: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    postprocess: bool = True,
    backend: str = "auto",
    overlap: float | None = None,
) -> CasePrediction:
    """Co-registered phase images (any non-empty subset of the model's phases) -> CasePrediction.

    Probabilities are accumulated on the model's grid; only the final maps are resampled to the
    input grid, so memory follows the model's resolution. ``postprocess``: apply the model's
    post-processing (:mod:`maml.postprocessing`) to the labels (probabilities are left as they are).
    ``backend``: auto, torch or openvino (:mod:`maml.backends`; auto: OpenVINO on the CPU when
    installed). ``overlap``: of the sliding windows, a fraction of a patch (default: the model's own).
    """
    from .backends import inference_network, resolve_engine
    from .preprocessing import (labels_from_probabilities, map_to_input_geometry,
                                preprocess_phases, probabilities_to_input_geometry)

    device, engine = resolve_engine(device, backend)
    case = preprocess_phases(images, model.config)
    if engine == "openvino" and not model.config.inference.is_maml:
        # Imported nnU-Net models blend logits per fold as nnU-Net does; the exported network
        # gives probabilities only, so they run in torch.
        engine = "torch"
    if overlap is None:
        overlap = model.config.inference.overlap
    options = SlidingWindowOptions(model.config.patch_size, mirror=mirror, device=device,
                                   batch_size=batch_size, overlap=overlap,
                                   mirror_axes=model.config.inference.mirror_axes,
                                   blend=model.config.inference.blend,
                                   align=window_alignment(model.config),
                                   pad_with=padding_of(model.config))
    network = inference_network(model, engine)
    windowed = sliding_window_predict(network, case.data, case.phases, options, progress,
                                      cancel, body=case.body)
    uncertainty = unit_steps(map_to_input_geometry(
        uncertainty_map(windowed.probabilities, windowed.disagreement), case))
    if windowed.logits is not None:
        # nnU-Net resamples logits to the input grid and takes the softmax there.
        import torch

        probabilities = torch.softmax(torch.from_numpy(
            probabilities_to_input_geometry(windowed.logits, case)), 0).numpy()
    else:
        probabilities = probabilities_to_input_geometry(windowed.probabilities, case)
    label_array = labels_from_probabilities(probabilities)
    if postprocess and not model.config.postprocessing.is_identity:
        from .postprocessing import postprocess as apply_postprocessing

        label_array = apply_postprocessing(label_array, case.input_geometry.spacing_zyx, model.config)
    labels = case.input_geometry.image_from_array(label_array)
    attention = {}
    if windowed.heatmaps is not None:
        for index, phase in enumerate(case.phases):
            attention[phase] = unit_steps(map_to_input_geometry(
                _antialiased(windowed.heatmaps[index], case, model.config), case))
    if len(case.phases) == len(model.config.phases) > 1:
        head = "fused"
    elif len(case.phases) == 1:
        head = case.phases[0]
    else:
        head = f"mean({', '.join(case.phases)})"
    return CasePrediction(labels, attention, probabilities if keep_probabilities else None,
                          case.phases, head, uncertainty, windowed.window_features,
                          windowed.window_body_fraction, engine)


UNIT_STEPS = 1024  # maps in [0, 1] are kept in steps of 1/1024


def unit_steps(image: "sitk.Image") -> "sitk.Image":
    """A float32 map in [0, 1] rounded to multiples of 1/UNIT_STEPS (exact in float32).

    Resampling leaves every voxel a different float (1e-7 in air, say), which deflate cannot
    compress: a full-size uncertainty map took 140 MB and 6.4 s to write, in steps of 1/1024
    17 MB and 3.3 s. A thousandth is far below what a heatmap or a mean uncertainty can tell."""
    import SimpleITK as sitk

    values = sitk.GetArrayFromImage(image)
    np.multiply(values, UNIT_STEPS, out=values)
    np.rint(values, out=values)
    values *= 1.0 / UNIT_STEPS
    rounded = sitk.GetImageFromArray(values)
    rounded.CopyInformation(image)
    return rounded


def padding_of(config) -> str:
    """MAML's own models were trained with air beyond the border; imported nnU-Net models with 0."""
    return "air" if config.inference.is_maml else "zero"


def window_alignment(config) -> tuple[int, int, int]:
    """Window starts on the network's total stride grid (so the upsampling's period-2 pattern is the
    same in every window and the attention maps show no stripes); imported nnU-Net models place
    their windows exactly as nnU-Net does."""
    if not config.inference.is_maml:
        return (1, 1, 1)
    return tuple(config.network.total_downsampling())


def _antialiased(heatmap: np.ndarray, case, config) -> np.ndarray:
    """The heatmap low-passed for resampling to the image grid (maml.attention.antialias): the
    period of the last transposed convolution removed (none with trilinear up-sampling)."""
    from .attention import antialias

    network = config.network
    stride = (1, 1, 1) if network.final_upsampling == "trilinear" else network.strides[1]
    return antialias(heatmap, case.model_geometry.spacing_zyx, case.input_geometry.spacing_zyx, stride)
