"""The models the panel offers: the bundled one(s) and those in the user models folder.

``ModelCatalog`` lists them with their model cards (the JSON sidecar beside each checkpoint) through
the engine's own ``maml.models``, whose module level is the standard library: nothing here imports
torch or runs the engine. Installing a model, or writing the card of a checkpoint copied into the
folder by hand, runs the engine's command line in the background (``ModelCommandRun``).
"""

from __future__ import annotations

from pathlib import Path

from maml import models as engineModels

from .errors import CancelledError, MAMLSegmentationError
from .process import EngineProcess, EngineRun

BUNDLED_DIR = engineModels.BUNDLED_DIR


class ModelCatalog:
    """Installed models (``models``, bundled first) and catalog models not installed (``available``).

    ``userDir``: the user models folder (default ``$MAML_MODELS``, else under Slicer's settings
    folder, as the engine decides). ``refresh()`` re-reads the folders; it is cheap (JSON files).
    """

    def __init__(self, userDir=None, bundledDir=None):
        self._userDir = Path(userDir) if userDir else None
        self.bundledDir = Path(bundledDir) if bundledDir else BUNDLED_DIR
        self.models: list = []
        self.available: list = []
        self.catalogProblem = ""
        self.refresh()

    @property
    def userDir(self) -> Path:
        return self._userDir or engineModels.user_models_dir()

    def refresh(self) -> list:
        self.models = engineModels.installed_models(self.userDir, self.bundledDir)
        try:
            entries = engineModels.catalog_entries(self.userDir, self.bundledDir)
            self.catalogProblem = ""
        except engineModels.ModelError as error:  # a bad catalog must not hide the installed models
            entries, self.catalogProblem = [], str(error)
        names = {model.name for model in self.models}
        self.available = [entry for entry in entries if entry.name not in names]
        return self.models

    def names(self) -> list:
        return [model.name for model in self.models]

    def model(self, name: str):
        return next((model for model in self.models if model.name == name), None)

    def modelForPath(self, path):
        resolved = Path(path).resolve()
        return next((model for model in self.models if model.path.resolve() == resolved), None)

    def modelsWithoutCard(self) -> list:
        return [model for model in self.models if model.card is None]

    def cardForPath(self, path) -> dict | None:
        """The card of any checkpoint (listed or not), or None when it has no usable one."""
        path = Path(path)
        card, _ = engineModels.read_card(path, check_age=path.resolve().parent != self.bundledDir.resolve())
        return card


def modelPhases(model, default=("arterial", "venous")) -> list:
    """The phases a listed model segments (its card); all phases while its card is unknown."""
    return list(model.phases) if model is not None and model.phases else list(default)


def cardSummary(card: dict | None, problem: str = "") -> str:
    """Two or three lines under the model selector."""
    if not card:
        return f"No model card ({problem or 'unknown'}); it is written in the background when the file loads."
    kind = dataKind(card)
    labels = ", ".join(label["name"] for label in card.get("labels", []) if label.get("value") != 0)
    lines = [f"Phases: {', '.join(card.get('phases', []))}. Labels: {labels}.",
             f"Trained on {kind} data." if kind != "unknown" else "Training data: not stated."]
    if kind == "synthetic":
        lines[-1] += " Not for patient images."
    lines.append(card.get("intended_use") or "Research use only. Not for clinical use.")
    return "\n".join(lines)


def cardDetails(card: dict | None, problem: str = "") -> str:
    """The model card as a tooltip: data kind, phases, labels, spacing, training, validation."""
    if not card:
        return f"No model card ({problem})." if problem else "No model card."
    metadata = card.get("metadata") or {}
    config = card.get("config") or {}
    rows = [f"Model: {card.get('name', '?')} ({card.get('path', '?')})",
            f"Data kind: {dataKind(card)}",
            f"Phases: {', '.join(card.get('phases', []))}",
            "Labels: " + ", ".join(f"{label['value']} {label['name']}" for label in card.get("labels", []))]
    if config.get("spacing"):
        rows.append("Spacing (z, y, x): " + " x ".join(f"{value:g}" for value in config["spacing"]) + " mm")
    training = [f"{metadata[key]} {text}" for key, text in (
        ("dataset", "data set"), ("train_cases", "training cases"), ("validation_cases", "validation cases"),
        ("trained_epochs", "epochs")) if metadata.get(key) not in (None, "")]
    if training:
        rows.append("Training: " + ", ".join(training))
    dice = metadata.get("validation_dice")
    if isinstance(dice, dict):
        for head, scores in dice.items():
            if isinstance(scores, dict):
                rows.append(f"Validation Dice ({head}): " + ", ".join(
                    f"{label} {value:.3f}" for label, value in scores.items() if isinstance(value, (int, float))))
    fingerprint = metadata.get("fingerprint") or card.get("fingerprint")
    if fingerprint:
        rows.append("Training fingerprint: stored (the input is checked against it)")
    if card.get("sha256"):
        rows.append(f"SHA-256: {card['sha256']}")
    rows.append(card.get("intended_use") or "Research use only. Not for clinical use.")
    return "\n".join(rows)


def dataKind(card: dict) -> str:
    """``synthetic``, ``clinical`` or ``unknown`` (cards written before models stated it)."""
    metadata = card.get("metadata") or {}
    return str(card.get("data_kind") or metadata.get("data_kind") or "unknown")


class ModelCommandRun(EngineRun):
    """``maml models install ...`` or ``maml models list`` running in the background.

    Call ``poll()`` from a timer (or ``wait()``); when it ends the catalog is re-read; ``error``
    holds a ``MAMLSegmentationError`` on failure or cancel, ``installedName`` the new model's name.
    """

    def __init__(self, process: EngineProcess, catalog: ModelCatalog, what: str, isInstall: bool = False):
        self.process = process
        self.catalog = catalog
        self.what = what
        self.isInstall = isInstall
        self.error: MAMLSegmentationError | None = None
        self.installedName = ""
        self.state = "running"

    def _finish(self) -> None:
        self.state = self.process.state
        last = self.process.lastEvent
        if self.state == "done" and last is not None:
            self.installedName = str(last.data.get("name") or "")
        if self.state == "cancelled":
            self.error = CancelledError(f"{self.what} cancelled; nothing was installed.")
        elif self.state != "done":
            self.state = "failed"
            self.error = MAMLSegmentationError(f"{self.what} failed: {self.process.errorMessage}")
        self.catalog.refresh()

    def _outcome(self):
        return self.installedName  # the installed model's name
