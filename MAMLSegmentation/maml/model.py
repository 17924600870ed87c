"""Checkpoint files: one file = configuration + weights + training metadata + format version.

Loaded with ``torch.load(weights_only=True)``: a checkpoint holds only tensors and plain data, so
opening a file from someone else cannot run code.

Format versions: 1 = one MAMLNet. 2 adds ensembles (``ensemble_size`` networks of one
configuration, e.g. an imported nnU-Net model's folds; their weights under ``members.<i>.``) and
the configuration's ``inference`` section. A file is written as version 1 whenever it needs
nothing of version 2, so that earlier versions of the extension still read it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .errors import ModelError
from .io import atomic_path
from .network import FoldEnsemble, MAMLNet

FORMAT = "maml-checkpoint"
FORMAT_VERSION = 2


@dataclass
class LoadedModel:
    config: ModelConfig
    network: MAMLNet | FoldEnsemble
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    sha256: str | None = None

    def describe(self) -> dict[str, Any]:
        """Plain-data summary for ``maml info`` and the Slicer module."""
        return {
            "name": self.config.name,
            "path": str(self.path) if self.path else None,
            "sha256": self.sha256,
            "format_version": FORMAT_VERSION,
            "ensemble_size": len(self.network) if isinstance(self.network, FoldEnsemble) else 1,
            "phases": self.config.phases,
            "labels": [{"value": l.value, "name": l.name, "color": list(l.color)}
                       for l in self.config.labels],
            "intended_use": self.config.intended_use,
            "parameters": sum(p.numel() for p in self.network.parameters()),
            "config": self.config.to_dict(),
            "metadata": self.metadata,
        }


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(path: str | Path, network: MAMLNet | FoldEnsemble, config: ModelConfig,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Writes atomically: a temporary file in the same folder, then a rename."""
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
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw payload, checked for format and version."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise ModelError(f"model file {path} is not a readable MAML checkpoint: {error}") from error
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


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    path = Path(path)
    payload = read_checkpoint(path)
    try:
        config = ModelConfig.from_dict(payload["config"])
    except ModelError as error:
        raise ModelError(f"model file {path}: {error}") from error
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
    return LoadedModel(config, network, dict(payload.get("metadata", {})), path, file_sha256(path))
