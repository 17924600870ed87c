"""Inference backends: the torch network itself, or the same network compiled by OpenVINO for the CPU.

On the CPU, OpenVINO runs the network about twice as fast as torch (its convolutions reach most of
the processor's FP32 peak); its outputs match torch's to about 1e-4. The network is converted once
per weights, phase subset and window shape, and the converted model is kept in a user cache folder
(:func:`cache_root`) with the network compiled for this processor, so later runs only read it back
(about a fifth of a second).

A run that finds its network in the cache never imports torch (about 3 s of a 20 s case): the
model's configuration and metadata come from their own cache entry (:func:`maml.model.load_model`
with ``lazy``), the sliding window sums numpy arrays, and device "auto" is the CPU without asking
torch where no GPU driver is installed (:func:`gpu_driver_present`).

A backend is anything with ``phases``, ``num_classes`` and ``predict(x, phases) -> WindowOutput``,
like :class:`maml.network.MAMLNet`; :func:`maml.inference.sliding_window_predict` runs either
(numpy batches for a backend whose ``takes_numpy`` is true, torch tensors otherwise).
"""

from __future__ import annotations

import ctypes.util
import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .config import BACKENDS
from .errors import InputError, ModelError
from .inference import WindowOutput
from .io import write_bytes_atomic
from .model import LoadedModel, file_sha256

if TYPE_CHECKING:
    from torch import nn

# Bump when the exported graph changes for the same weights (wrapper, outputs): old entries are
# then ignored.
EXPORT_FORMAT = 2
ENTRY_FILE = "entry.json"
MODEL_FILES = ("model.xml", "model.bin")
INSTALL_HINT = ("install it with `pip install 'maml-segmentation[cpu-fast]'` (in Slicer: the module's "
                "dependency installer), or use --backend torch")


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def gpu_driver_present() -> bool:
    """Whether this computer could have a GPU that torch runs on: an NVIDIA driver (or AMD's ROCm,
    which torch serves as "cuda"). Where there is none, torch.cuda cannot be available, so device
    "auto" is the CPU without importing torch (about 3 s of a run)."""
    if sys.platform == "darwin":
        return False
    if sys.platform == "win32":
        return ctypes.util.find_library("nvcuda") is not None
    return (os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/kfd")
            or ctypes.util.find_library("cuda") is not None)


def resolve_backend(name: str, device) -> str:
    """"torch" or "openvino" for a requested backend on a resolved device ("cpu", "cuda", "cuda:1"
    or the torch.device of one).

    auto: torch on CUDA, OpenVINO on the CPU when it is installed, torch otherwise.
    """
    device = str(device)
    if name not in BACKENDS:
        raise InputError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "openvino" if device == "cpu" and openvino_available() else "torch"
    if name == "openvino":
        if device != "cpu":
            raise InputError(f"the openvino backend runs on the CPU, not on {device}: use --device cpu "
                             "or --backend torch")
        if not openvino_available():
            raise InputError(f"the openvino backend needs the OpenVINO runtime: {INSTALL_HINT}")
    return name


def resolve_engine(device: str, backend: str) -> tuple[str, str]:
    """The resolved device ("cpu", "cuda", "cuda:1") and backend for a requested device and backend;
    asking for OpenVINO with device "auto" runs on the CPU even where a GPU is. Torch is imported
    only when it decides (a GPU driver is present, or torch is asked for)."""
    if device == "auto" and (backend == "openvino" or not gpu_driver_present()):
        device = "cpu"
    if device != "cpu":
        from .inference import resolve_device

        device = str(resolve_device(device))
    return device, resolve_backend(backend, device)


def default_threads() -> int | None:
    """The threads OpenVINO runs with: torch's setting when torch is loaded (the suite and the
    benchmarks set it), else ``OMP_NUM_THREADS`` when set, else None (OpenVINO's own choice: the
    physical cores, as torch's default)."""
    if "torch" in sys.modules:
        return sys.modules["torch"].get_num_threads()
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


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


class OpenVINONetwork:
    """A network compiled by OpenVINO for the CPU, with MAMLNet's ``predict`` on numpy batches.

    ``source``: a torch network, or a :class:`~maml.model.LoadedModel`, whose torch network is then
    loaded only if a cache entry has to be made (a run from the cache never imports torch). One
    compiled model per phase subset and window shape, each converted on first use or read from the
    cache. Batches run window by window (static batch 1: no padding of a last, smaller batch).
    ``weights_key``: the checkpoint's sha256 (default: the model's, else a digest of the weights).
    """

    takes_numpy = True  # sliding_window_predict feeds numpy batches and keeps numpy sums

    def __init__(self, source: "nn.Module | LoadedModel", weights_key: str | None = None,
                 threads: int | None = None, cache: Path | None = None):
        import openvino as ov

        self._ov = ov
        if isinstance(source, LoadedModel):
            self._model, self._network = source, None
            self.phases = list(source.config.phases)
            self.num_classes = source.config.num_classes
            self.network_class = source.network_class
            weights_key = weights_key or source.sha256
        else:
            self._model, self._network = None, source
            self.phases = list(source.phases)
            self.num_classes = source.num_classes
            self.network_class = type(source).__qualname__
        if weights_key is None:
            from .openvino_export import weights_sha256

            weights_key = weights_sha256(self.network)
        self.weights_key = weights_key
        self.threads = threads or default_threads()
        self.cache = Path(cache) if cache is not None else cache_root() / "openvino"
        self._compiled: dict[tuple, tuple[object, list[str]]] = {}

    @property
    def network(self) -> "nn.Module":
        """The torch network (loaded from the model's file on first use)."""
        return self._network if self._network is not None else self._model.network

    # ---------------------------------------------------------------------------------- cache
    def entry_description(self, phases: Sequence[str], window: Sequence[int]) -> dict:
        return {"format": EXPORT_FORMAT, "openvino": self._ov.get_version(),
                "weights_sha256": self.weights_key, "network": self.network_class,
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
            if any(file_sha256(folder / name) != record["sha256"][name] for name in MODEL_FILES):
                return None
            return record
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _export(self, phases: Sequence[str], window: Sequence[int], folder: Path,
                description: dict) -> dict:
        """Converts the network into a temporary folder beside the entry, then renames it into place
        (another process converting the same entry at once is harmless: one rename wins)."""
        from .openvino_export import convert_network

        model, fields = convert_network(self.network, phases, window)
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=self.cache))
        except OSError as error:
            raise ModelError(f"cannot write the OpenVINO cache folder {self.cache}: "
                             f"{error.strerror or error}; set MAML_CACHE to a writable folder or use "
                             "--backend torch") from None
        try:
            self._ov.save_model(model, temporary / MODEL_FILES[0], compress_to_fp16=False)
            record = dict(description, fields=fields,
                          sha256={name: file_sha256(temporary / name) for name in MODEL_FILES})
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
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        # A blob holds kernels chosen for one processor, thread count and OpenVINO version.
        target = {"config": config, "openvino": self._ov.get_version(),
                  "cpu": core.get_property("CPU", "FULL_DEVICE_NAME")}
        name = hashlib.sha256(json.dumps(target, sort_keys=True).encode()).hexdigest()[:16]
        blob_file, record_file = folder / f"compiled-{name}.blob", folder / f"compiled-{name}.json"
        try:
            if json.loads(record_file.read_text()).get("sha256") == file_sha256(blob_file):
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
    def predict(self, x: np.ndarray, phases: Sequence[str] | None = None) -> WindowOutput:
        """As :meth:`maml.network.MAMLNet.predict`, for a (B, P, z, y, x) numpy batch; numpy out."""
        phases = list(self.phases) if phases is None else list(phases)
        request, fields = self.prepare(phases, x.shape[1:])
        outputs: dict[str, list[np.ndarray]] = {name: [] for name in fields}
        for sample in np.asarray(x, dtype=np.float32):
            request.infer({0: np.ascontiguousarray(sample[None])})
            for index, name in enumerate(fields):
                outputs[name].append(request.get_output_tensor(index).data.copy())
        return WindowOutput(**{name: np.concatenate(outputs[name]) if name in outputs else None
                               for name in WindowOutput._fields})


def inference_network(model: "LoadedModel", backend: str):
    """What runs inference for ``model``: its torch network, or its OpenVINO version (which loads
    the torch network only to fill the cache).

    ``backend`` is already resolved ("torch" or "openvino", see :func:`resolve_backend`).
    """
    if backend == "torch":
        return model.network
    if model.sha256:
        key = model.sha256
    else:  # a model made in memory (training): its weights may have changed since
        from .openvino_export import weights_sha256

        key = weights_sha256(model.network)
    compiled = _OPENVINO_NETWORKS.get(model)
    if compiled is None or compiled.weights_key != key:
        compiled = _OPENVINO_NETWORKS[model] = OpenVINONetwork(model, key)
    return compiled


# One OpenVINONetwork per model, so that its compiled models serve every case of a batch.
_OPENVINO_NETWORKS: "weakref.WeakKeyDictionary[LoadedModel, OpenVINONetwork]" = weakref.WeakKeyDictionary()
