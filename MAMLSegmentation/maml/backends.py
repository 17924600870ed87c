"""Inference backends: the torch network itself, or the same network compiled by OpenVINO for the CPU.

On the CPU, OpenVINO runs the network about twice as fast as torch (its convolutions reach most of
the processor's FP32 peak); its outputs match torch's to about 1e-4. The network is converted once
per weights, phase subset and window shape, and the converted model is kept in a user cache folder
(:func:`cache_root`) with the network compiled for this processor, so later runs only read it back
(about a fifth of a second).

A backend is anything with ``phases``, ``num_classes`` and ``predict(x, phases) -> WindowOutput``,
like :class:`maml.network.MAMLNet`; :func:`maml.inference.sliding_window_predict` runs either.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import warnings
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

from .config import BACKENDS
from .errors import InputError, ModelError
from .io import write_bytes_atomic
from .network import WindowOutput

if TYPE_CHECKING:
    from .model import LoadedModel

# Bump when the exported graph changes for the same weights (wrapper, outputs): old entries are
# then ignored.
EXPORT_FORMAT = 2
ENTRY_FILE = "entry.json"
MODEL_FILES = ("model.xml", "model.bin")
INSTALL_HINT = ("install it with `pip install 'maml-segmentation[cpu-fast]'` (in Slicer: the module's "
                "dependency installer), or use --backend torch")


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve_backend(name: str, device: torch.device) -> str:
    """"torch" or "openvino" for a requested backend on a resolved torch device.

    auto: torch on CUDA, OpenVINO on the CPU when it is installed, torch otherwise.
    """
    if name not in BACKENDS:
        raise InputError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "openvino" if device.type == "cpu" and openvino_available() else "torch"
    if name == "openvino":
        if device.type != "cpu":
            raise InputError(f"the openvino backend runs on the CPU, not on {device}: use --device cpu "
                             "or --backend torch")
        if not openvino_available():
            raise InputError(f"the openvino backend needs the OpenVINO runtime: {INSTALL_HINT}")
    return name


def resolve_engine(device: str, backend: str) -> tuple[torch.device, str]:
    """The torch device and the resolved backend for a requested device and backend; asking for
    OpenVINO with device "auto" runs on the CPU even where a GPU is."""
    from .inference import resolve_device

    if backend == "openvino" and device == "auto":
        device = "cpu"
    resolved = resolve_device(device)
    return resolved, resolve_backend(backend, resolved)


def cache_root() -> Path:
    """The user's cache folder for maml: ``$MAML_CACHE``, else the platform's cache folder."""
    if os.environ.get("MAML_CACHE"):
        return Path(os.environ["MAML_CACHE"]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        return base / "maml" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "maml"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "maml"


def weights_sha256(network: nn.Module) -> str:
    """A digest of a network's class and weights, for networks that do not come from a file."""
    digest = hashlib.sha256(type(network).__qualname__.encode())
    for key, value in network.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


class OpenVINONetwork:
    """``network`` compiled by OpenVINO for the CPU, with MAMLNet's ``predict``.

    One compiled model per phase subset and window shape, each exported on first use (or read from
    the cache). Batches run window by window (static batch 1: no padding of a last, smaller batch).
    ``weights_key``: the checkpoint's sha256 (default: a digest of the weights).
    """

    def __init__(self, network: nn.Module, weights_key: str | None = None,
                 threads: int | None = None, cache: Path | None = None):
        import openvino as ov

        self._ov = ov
        self.network = network
        self.phases = list(network.phases)
        self.num_classes = network.num_classes
        self.weights_key = weights_key or weights_sha256(network)
        self.threads = threads or torch.get_num_threads()
        self.cache = Path(cache) if cache is not None else cache_root() / "openvino"
        self._compiled: dict[tuple, tuple[object, list[str]]] = {}

    # ---------------------------------------------------------------------------------- cache
    def entry_description(self, phases: Sequence[str], window: Sequence[int]) -> dict:
        return {"format": EXPORT_FORMAT, "openvino": self._ov.get_version(),
                "weights_sha256": self.weights_key, "network": type(self.network).__qualname__,
                "phases": list(phases), "input_shape": [1, *map(int, window)]}

    def entry_folder(self, description: dict) -> Path:
        key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]
        return self.cache / key

    def _read_entry(self, folder: Path, description: dict) -> dict | None:
        """The entry's record when its files are whole and of this description, else None."""
        try:
            record = json.loads((folder / ENTRY_FILE).read_text())
            if {k: record.get(k) for k in description} != description:
                return None
            if any(_file_sha256(folder / name) != record["sha256"][name] for name in MODEL_FILES):
                return None
            return record
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _export(self, phases: Sequence[str], window: Sequence[int], folder: Path,
                description: dict) -> dict:
        """Converts the network into a temporary folder beside the entry, then renames it into place
        (another process converting the same entry at once is harmless: one rename wins)."""
        ov = self._ov
        example = torch.zeros((1, *map(int, window)), dtype=torch.float32)
        was_training = self.network.training
        graph = _PredictGraph(self.network, phases).eval()
        try:
            with torch.no_grad(), _exportable_norms(self.network), warnings.catch_warnings():
                # The network's shape checks become constants of the trace: the shape is fixed.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                # check_trace=False: the check re-runs the network twice for nothing (eval mode).
                traced = torch.jit.trace(graph, example, check_trace=False)
            model = ov.convert_model(traced, example_input=example)
        finally:
            self.network.train(was_training)
        model.reshape({model.inputs[0]: ov.PartialShape(list(example.shape))})
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=self.cache))
        except OSError as error:
            raise ModelError(f"cannot write the OpenVINO cache folder {self.cache}: "
                             f"{error.strerror or error}; set MAML_CACHE to a writable folder or use "
                             "--backend torch") from None
        try:
            ov.save_model(model, temporary / MODEL_FILES[0], compress_to_fp16=False)
            record = dict(description, fields=graph.fields,
                          sha256={name: _file_sha256(temporary / name) for name in MODEL_FILES})
            (temporary / ENTRY_FILE).write_text(json.dumps(record, indent=1))
            if folder.exists():  # a broken entry (a sound one would have been used)
                shutil.rmtree(folder, ignore_errors=True)
            try:
                os.rename(temporary, folder)
            except OSError:
                if self._read_entry(folder, description) is None:
                    raise
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
        return record

    def prepare(self, phases: Sequence[str], window: Sequence[int]):
        """The compiled model and its output fields for a phase subset and (P, z, y, x) window."""
        present = [p for p in self.phases if p in phases]
        key = (tuple(present), tuple(map(int, window)))
        if key in self._compiled:
            return self._compiled[key]
        description = self.entry_description(present, window)
        folder = self.entry_folder(description)
        record = self._read_entry(folder, description)
        if record is None:
            record = self._export(present, window, folder, description)
        compiled = self._compiled_model(folder)
        self._compiled[key] = (compiled.create_infer_request(), record["fields"])
        return self._compiled[key]

    def _compiled_model(self, folder: Path):
        """The entry's network compiled for this CPU: read back from the entry's compiled blob when
        that is whole (our own sha256 of it matches) and imports, else compiled from the model files
        and the blob written for the next process. Importing takes a fifth of compiling."""
        core = self._ov.Core()
        config = {"INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "f32"}
        # A blob holds kernels chosen for one processor, thread count and OpenVINO version.
        target = {"config": config, "openvino": self._ov.get_version(),
                  "cpu": core.get_property("CPU", "FULL_DEVICE_NAME")}
        name = hashlib.sha256(json.dumps(target, sort_keys=True).encode()).hexdigest()[:16]
        blob_file, record_file = folder / f"compiled-{name}.blob", folder / f"compiled-{name}.json"
        try:
            if json.loads(record_file.read_text()).get("sha256") == _file_sha256(blob_file):
                return core.import_model(io.BytesIO(blob_file.read_bytes()), "CPU", config)
        except (OSError, ValueError, AttributeError, RuntimeError):
            pass  # missing, partial, from another build: compile afresh
        try:
            compiled = core.compile_model(core.read_model(folder / MODEL_FILES[0]), "CPU", config)
        except RuntimeError as error:
            raise ModelError(f"OpenVINO cannot compile the cached network in {folder}: {error}; "
                             "delete that folder or use --backend torch") from error
        try:
            blob = compiled.export_model().getvalue()
            write_bytes_atomic(blob, blob_file)
            write_bytes_atomic(json.dumps(dict(target, sha256=hashlib.sha256(blob).hexdigest()),
                                          indent=1).encode(), record_file)
        except (OSError, RuntimeError, InputError):
            pass  # a read-only or full cache still serves its model files
        return compiled

    # ---------------------------------------------------------------------------------- inference
    def predict(self, x: torch.Tensor, phases: Sequence[str] | None = None) -> WindowOutput:
        """As :meth:`maml.network.MAMLNet.predict`, for a (B, P, z, y, x) batch on the CPU."""
        phases = list(self.phases) if phases is None else list(phases)
        request, fields = self.prepare(phases, x.shape[1:])
        array = x.detach().float().cpu().numpy()
        outputs: dict[str, list[torch.Tensor]] = {name: [] for name in fields}
        for sample in array:
            request.infer({0: np.ascontiguousarray(sample[None])})
            for index, name in enumerate(fields):
                outputs[name].append(torch.from_numpy(request.get_output_tensor(index).data.copy()))
        return WindowOutput(**{name: torch.cat(outputs[name]) if name in outputs else None
                               for name in WindowOutput._fields})


def inference_network(model: "LoadedModel", backend: str, device: torch.device):
    """The network that runs inference for ``model``: the torch module or its OpenVINO version.

    ``backend`` is already resolved ("torch" or "openvino", see :func:`resolve_backend`).
    """
    if backend == "torch":
        return model.network
    key = model.sha256 or weights_sha256(model.network)
    compiled = _OPENVINO_NETWORKS.get(model.network)
    if compiled is None or compiled.weights_key != key:
        compiled = _OPENVINO_NETWORKS[model.network] = OpenVINONetwork(model.network, key)
    return compiled


# One OpenVINONetwork per torch network, so that its compiled models serve every case of a batch.
_OPENVINO_NETWORKS: "weakref.WeakKeyDictionary[nn.Module, OpenVINONetwork]" = weakref.WeakKeyDictionary()
