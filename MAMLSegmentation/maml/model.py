"""Checkpoint files: one file = configuration + weights + training metadata + format version.

Loaded with ``torch.load(weights_only=True)``: a checkpoint holds only tensors and plain data, so
opening a file from someone else cannot run code; a file that carries pickled code is refused.

Beside every checkpoint ``<name>.pt`` lies its model card ``<name>.json``: what ``maml info --json``
prints (:meth:`LoadedModel.describe`), with ``path`` reduced to the checkpoint's file name. The
Slicer panel reads it to show the model without importing torch.

Format versions: 1 = one MAMLNet. 2 adds ensembles (``ensemble_size`` networks of one
configuration, e.g. an imported nnU-Net model's folds; their weights under ``members.<i>.``) and
the configuration's ``inference`` section. A file is written as version 1 whenever it needs
nothing of version 2, so that earlier versions of the extension still read it.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import ModelConfig
from .errors import InputError, ModelError
from .io import atomic_path, write_bytes_atomic, write_json

if TYPE_CHECKING:
    import torch

    from .network import FoldEnsemble, MAMLNet

FORMAT = "maml-checkpoint"
FORMAT_VERSION = 2
SIDECAR_SUFFIX = ".json"


class LoadedModel:
    """A checkpoint's configuration, metadata and torch network.

    The network may be left unloaded (``load_model(..., lazy=True)``): it is then read from
    ``path`` on first use of :attr:`network`, so a run that never needs it (OpenVINO from its
    cache) never imports torch.
    """

    def __init__(self, config: ModelConfig, network: "MAMLNet | FoldEnsemble | None" = None,
                 metadata: dict[str, Any] | None = None, path: Path | None = None,
                 sha256: str | None = None, network_class: str | None = None,
                 device: "str | torch.device" = "cpu"):
        self.config = config
        self._network = network
        self.metadata = metadata if metadata is not None else {}
        self.path = path
        self.sha256 = sha256
        # "MAMLNet" or "FoldEnsemble": what the checkpoint holds, known without loading it
        self.network_class = network_class or (type(network).__qualname__ if network is not None
                                               else "MAMLNet")
        self._device = device

    @property
    def network(self) -> "MAMLNet | FoldEnsemble":
        if self._network is None:
            if self.path is None:
                raise ModelError(f"model {self.config.name!r} has neither a network nor a file")
            loaded = load_model(self.path, self._device)
            if self.sha256 and loaded.sha256 != self.sha256:
                raise ModelError(f"model file {self.path} changed while it was in use; run again")
            self._network = loaded.network
        return self._network

    @network.setter
    def network(self, network: "MAMLNet | FoldEnsemble") -> None:
        self._network = network

    @property
    def network_loaded(self) -> bool:
        return self._network is not None

    def describe(self) -> dict[str, Any]:
        """Plain-data summary for ``maml info`` and the Slicer module."""
        from .domain import fingerprint_summary

        fingerprint = self.metadata.get("fingerprint") or {}
        return {
            "name": self.config.name,
            "path": str(self.path) if self.path else None,
            "sha256": self.sha256,
            "format_version": FORMAT_VERSION,
            "ensemble_size": len(self.network) if self.network_class == "FoldEnsemble" else 1,
            "phases": self.config.phases,
            "labels": [{"value": l.value, "name": l.name, "color": list(l.color)}
                       for l in self.config.labels],
            "intended_use": self.config.intended_use,
            "parameters": sum(p.numel() for p in self.network.parameters()),
            "config": self.config.to_dict(),
            "data_kind": self.metadata.get("data_kind") or fingerprint.get("data_kind") or "unknown",
            "fingerprint": fingerprint_summary(fingerprint),
            "metadata": _plain({k: v for k, v in self.metadata.items() if k != "fingerprint"}),
        }

    def card(self) -> dict[str, Any]:
        """The sidecar's content: :meth:`describe` with ``path`` = the checkpoint's file name."""
        description = self.describe()
        description["path"] = self.path.name if self.path else None
        return description


def _plain(value: Any) -> Any:
    """Metadata as JSON types: tensors (e.g. statistics kept as tensors) become lists."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "tolist"):  # a tensor or numpy array
        return value.tolist()
    return value


def sidecar_path(checkpoint: str | Path) -> Path:
    """``<name>.json`` beside ``<name>.pt``."""
    return Path(checkpoint).with_suffix(SIDECAR_SUFFIX)


def write_sidecar(model: LoadedModel, path: str | Path | None = None) -> Path:
    """Writes the model card beside the checkpoint (or at ``path``), atomically."""
    target = Path(path) if path is not None else sidecar_path(model.path)
    return write_json(model.card(), target)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(path: str | Path, network: "MAMLNet | FoldEnsemble", config: ModelConfig,
                    metadata: dict[str, Any] | None = None, sidecar: bool = True) -> Path:
    """Writes atomically: a temporary file in the same folder, then a rename; then its model card
    (``sidecar``), written after the checkpoint so it is never older than it."""
    import torch

    from .network import FoldEnsemble

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    ensemble = isinstance(network, FoldEnsemble)
    payload = {
        "format": FORMAT,
        "format_version": 2 if ensemble or not config.inference.is_default else 1,
        "config": config.to_dict(),
        "state_dict": state,
        "metadata": metadata or {},
    }
    if ensemble:
        payload["ensemble_size"] = len(network)
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
        digest = file_sha256(temporary)
    if sidecar:
        write_sidecar(LoadedModel(config, network, dict(payload["metadata"]), path, digest))
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw payload, checked for format and version."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message advises loading with weights_only=False: never for a file from elsewhere,
        # so none of its text is passed on.
        raise ModelError(_unpickling_refusal(path, str(error))) from None
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise ModelError(f"model file {path} is not a readable MAML checkpoint: "
                         f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelError(f"model file {path} is not a MAML checkpoint (no '{FORMAT}' marker)")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelError(
            f"model file {path} has format version {version}; this maml reads up to "
            f"{FORMAT_VERSION}: update the extension"
        )
    for key in ("config", "state_dict"):
        if key not in payload:
            raise ModelError(f"model file {path} has no {key!r} entry")
    return payload


def _unpickling_refusal(path: Path, torch_message: str) -> str:
    """Our sentence for a file torch's safe unpickler refused."""
    if "GLOBAL" in torch_message:  # the file names a function or class to call: pickled code
        return (f"model file {path} holds executable content (pickled code) that a model file must "
                "not have; it was not loaded. Use only checkpoints written by maml train or from a "
                "source you trust, and do not open this one with other tools")
    operand = re.search(r"Unsupported operand \d+", torch_message)
    return (f"model file {path} is not a MAML checkpoint: its content is not plain data"
            f"{f' ({operand.group(0)})' if operand else ''}; it was not loaded")


def _recognise_linear_attention(config: ModelConfig, state_dict) -> None:
    """Models saved before the MA module followed its 1x1x1 convolution with instance norm and
    leaky ReLU say "paper" but have no weights for that norm: they are the "paper-linear" form."""
    if config.network.ma_variant != "paper" or len(config.phases) < 2 or not hasattr(state_dict, "keys"):
        return
    norms = [k for k in state_dict.keys() if ".attention." in k and k.endswith(".4.weight")]
    if not norms:
        config.network.ma_variant = "paper-linear"


def load_model(path: str | Path, device: "str | torch.device" = "cpu", lazy: bool = False) -> LoadedModel:
    """The checkpoint at ``path``. ``lazy``: when this checkpoint (by its sha256) was loaded
    before, its configuration and metadata come from the user's cache (:func:`described_model`)
    and the network is loaded only when used; otherwise the whole file is read and the cache
    filled for the next time."""
    path = Path(path)
    if not (lazy and path.is_file()):  # a missing file: read_checkpoint says so
        return _load_checkpoint(path, device)
    digest = file_sha256(path)
    described = described_model(path, digest, device)
    if described is None:
        described = _load_checkpoint(path, device, digest)
        remember_model(described)
    return described


def _load_checkpoint(path: Path, device: "str | torch.device", digest: str | None = None) -> LoadedModel:
    """``digest``: the file's sha256 when the caller has it already (else it is computed)."""
    from .network import FoldEnsemble, MAMLNet

    payload = read_checkpoint(path)
    try:
        config = ModelConfig.from_dict(payload["config"])
    except ModelError as error:
        raise ModelError(f"model file {path}: {error}") from error
    _recognise_linear_attention(config, payload.get("state_dict", {}))
    size = payload.get("ensemble_size", 1)
    if not isinstance(size, int) or size < 1:
        raise ModelError(f"model file {path} has an invalid ensemble size {size!r}")
    network = MAMLNet(config) if size == 1 and "ensemble_size" not in payload else \
        FoldEnsemble([MAMLNet(config) for _ in range(size)])
    try:
        network.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as error:
        first_line = str(error).splitlines()[0]
        raise ModelError(f"model file {path}: weights do not match its configuration: {first_line}") from error
    network.to(device).eval()
    return LoadedModel(config, network, dict(payload.get("metadata", {})), path,
                       digest or file_sha256(path), device=device)


# --------------------------------------------------------------------------------------------------
# What a checkpoint holds besides its weights, cached by its sha256: reading it back takes
# milliseconds, where reading the checkpoint needs torch (about 3 s to import).
# --------------------------------------------------------------------------------------------------

DESCRIPTION_FORMAT = 1


def description_file(digest: str) -> Path:
    from .backends import cache_root

    return cache_root() / "models" / f"{digest}.json"


def _to_json(value: Any) -> Any:
    """Metadata as JSON, tensors and arrays marked so that they come back as numpy arrays."""
    if isinstance(value, dict):
        return {str(key): _to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    if hasattr(value, "tolist") and hasattr(value, "shape"):
        array = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
        return {"__array__": array.tolist(), "dtype": str(array.dtype), "shape": list(array.shape)}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if "__array__" in value:
            return np.asarray(value["__array__"], dtype=value["dtype"]).reshape(value["shape"])
        return {key: _from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    return value


def _content_digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def remember_model(model: LoadedModel) -> None:
    """Writes the model's description to the cache (atomically); a cache that cannot be written
    only costs the next run its speed."""
    if not model.sha256:
        return
    record = {"format": DESCRIPTION_FORMAT, "sha256": model.sha256, "config": model.config.to_dict(),
              "metadata": _to_json(model.metadata), "network_class": model.network_class}
    try:
        record["content_sha256"] = _content_digest(record)  # fails as json.dumps does, if it does
        write_bytes_atomic(json.dumps(record).encode(), description_file(model.sha256))
    except (OSError, ValueError, TypeError, InputError):
        pass


def described_model(path: Path, digest: str, device: "str | torch.device" = "cpu") -> LoadedModel | None:
    """The model from its cached description, its network not loaded; None when there is none or
    it is not whole (a damaged entry is never trusted: the checkpoint is read again)."""
    try:
        record = json.loads(description_file(digest).read_text())
        content = {key: value for key, value in record.items() if key != "content_sha256"}
        if (record.get("format") != DESCRIPTION_FORMAT or record.get("sha256") != digest
                or record.get("content_sha256") != _content_digest(content)):
            return None
        config = ModelConfig.from_dict(record["config"])
        return LoadedModel(config, None, _from_json(record["metadata"]), path, digest,
                           record["network_class"], device)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ModelError):
        return None
