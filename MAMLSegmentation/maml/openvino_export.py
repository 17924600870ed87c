"""The torch network traced and converted for OpenVINO (:class:`maml.backends.OpenVINONetwork`).

Only converting needs torch; running a converted network from the cache does not, so this module
is imported only when a cache entry is made.
"""

from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager
from typing import Sequence

import torch
from torch import nn

from .inference import WindowOutput


def _staged_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean over the spatial axes (2, 3, 4), one axis at a time.

    OpenVINO's CPU plugin sums a whole channel in one float32 accumulator; over a window with large
    uniform regions (air, padding) the rounding errors add up instead of cancelling, and InstanceNorm
    outputs drift by up to 1e-2 (probabilities by up to 0.1 after the network). Summing 32-128 values
    per step keeps the error at float32's level. The exact scalings by 2 between the steps keep
    OpenVINO from merging the steps back into one reduction."""
    return (x.mean(4, keepdim=True) * 2.0).mean(3, keepdim=True).mul(0.25).mean(2, keepdim=True) * 2.0


def _accurate_instance_norm(norm: nn.modules.instancenorm._InstanceNorm, x: torch.Tensor) -> torch.Tensor:
    """InstanceNorm (no running statistics) with staged means: what is exported for OpenVINO."""
    centred = x - _staged_mean(x)
    y = centred * torch.rsqrt(_staged_mean(centred * centred) + norm.eps)
    if norm.affine:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        y = y * norm.weight.view(shape) + norm.bias.view(shape)
    return y


@contextmanager
def _exportable_norms(network: nn.Module):
    """Every InstanceNorm of ``network`` computes as :func:`_accurate_instance_norm` while inside."""
    norms = [m for m in network.modules()
             if isinstance(m, nn.modules.instancenorm._InstanceNorm) and not m.track_running_stats]
    for norm in norms:
        norm.forward = functools.partial(_accurate_instance_norm, norm)
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward


class _PredictGraph(nn.Module):
    """What is exported: ``network.predict(x, phases)`` for one phase subset, its outputs that are
    not None as a tuple (``fields`` records which they are). Any module with MAMLNet's ``predict``
    (an ensemble too) exports so."""

    def __init__(self, network: nn.Module, phases: Sequence[str]):
        super().__init__()
        self.network = network
        self.phases = list(phases)
        self.fields: list[str] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.network.predict(x, self.phases)
        self.fields = [name for name, value in zip(WindowOutput._fields, out) if value is not None]
        return tuple(value for value in out if value is not None)


def convert_network(network: nn.Module, phases: Sequence[str], window: Sequence[int]):
    """``network.predict(x, phases)`` for a (1, *window) input as an OpenVINO model, and the names
    of the :class:`~maml.inference.WindowOutput` fields its outputs are, in order."""
    import openvino as ov

    example = torch.zeros((1, *map(int, window)), dtype=torch.float32)
    was_training = network.training
    graph = _PredictGraph(network, phases).eval()
    try:
        with torch.no_grad(), _exportable_norms(network), warnings.catch_warnings():
            # The network's shape checks become constants of the trace: the shape is fixed.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # check_trace=False: the check re-runs the network twice for nothing (eval mode).
            traced = torch.jit.trace(graph, example, check_trace=False)
        model = ov.convert_model(traced, example_input=example)
    finally:
        network.train(was_training)
    model.reshape({model.inputs[0]: ov.PartialShape(list(example.shape))})
    return model, graph.fields


def weights_sha256(network: nn.Module) -> str:
    """A digest of a network's class and weights, for networks that do not come from a file."""
    import hashlib

    digest = hashlib.sha256(type(network).__qualname__.encode())
    for key, value in network.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
