"""The panel's models (MAMLSegmentationLib.models) against the real engine's ``maml models``.

The catalog is read from the model cards without torch; installs, cancels and card updates run the
real ``python -m maml.cli models ...`` in the background, as the Install model... button does.
Downloads come from the https server of test_models.py (127.0.0.1, self-signed certificate trusted
through SSL_CERT_FILE, which the engine process inherits).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import slicer_fixtures  # noqa: F401  (puts the module folder on sys.path)
from slicer_fixtures import process_alive
from test_models import https_server, sha256, snapshot, served_model, tiny_checkpoint  # noqa: F401  (fixtures)

from MAMLSegmentationLib import (PHASES, CancelledError, MAMLSegmentationError, MAMLSegmentationLogic, ModelCatalog,
                                 cardDetails, cardSummary, modelPhases)

REPO = Path(__file__).resolve().parents[1]
BUNDLED_CARD = REPO / "MAMLSegmentation" / "Resources" / "Models" / "maml_liver_demo.json"


@pytest.fixture
def user_dir(tmp_path) -> Path:
    return tmp_path / "user-models"


def engine_logic(user_dir, **kwargs) -> MAMLSegmentationLogic:
    return MAMLSegmentationLogic(pythonExecutable=sys.executable, modelsDir=user_dir, **kwargs)


def test_catalog_and_cards_are_read_without_torch(tiny_checkpoint, user_dir):  # noqa: F811
    user_dir.mkdir()
    shutil.copy(tiny_checkpoint, user_dir / "lab.pt")
    shutil.copy(tiny_checkpoint.with_suffix(".json"), user_dir / "lab.json")
    card = json.loads((user_dir / "lab.json").read_text())
    card["path"] = "lab.pt"
    (user_dir / "lab.json").write_text(json.dumps(card))
    script = f"""
import json, sys
from MAMLSegmentationLib import MAMLSegmentationLogic, cardDetails
logic = MAMLSegmentationLogic(engineCommand=["/nonexistent/engine"], modelsDir={str(user_dir)!r})
models = logic.models.models
print(json.dumps({{"names": logic.models.names(), "sources": [m.source for m in models],
                  "phases": [m.phases for m in models], "info": logic.modelInfo("lab")["name"],
                  "details": cardDetails(models[0].card), "torch": "torch" in sys.modules}}))
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                               cwd=REPO / "MAMLSegmentation")
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["names"] == ["maml_liver_demo", "lab"] and result["sources"] == ["bundled", "user"]
    assert result["phases"] == [["arterial", "venous"], ["arterial", "venous"]]
    assert result["info"] == "tiny"  # the card, not the engine (whose command does not exist)
    assert "Validation Dice (fused)" in result["details"]
    assert result["torch"] is False


def test_model_card_text_shows_kind_phases_labels_spacing_training_and_validation():
    card = json.loads(BUNDLED_CARD.read_text())
    details = cardDetails(card)
    assert "Phases: arterial, venous" in details and "Labels: 0 background, 1 liver, 2 tumor" in details
    assert "Spacing (z, y, x): 3 x 2.5 x 2.5 mm" in details
    meta = card["metadata"]  # the bundled model's own figures, as the panel must print them
    assert (f"Training: MAMLPhantom data set, {meta['train_cases']} training cases, "
            f"{meta['validation_cases']} validation cases, {meta['trained_epochs']} epochs") in details
    fused = meta["validation_dice"]["fused"]
    assert f"Validation Dice (fused): liver {fused['liver']:.3f}, tumor {fused['tumor']:.3f}" in details
    assert "Data kind: synthetic" in details
    assert "Training fingerprint: stored" in details
    synthetic = cardSummary({**card, "data_kind": "synthetic"})
    assert "Trained on synthetic data. Not for patient images." in synthetic
    assert "Labels: liver, tumor." in synthetic
    assert "No model card (no model card)" not in cardSummary(None, "model card lab.json is unreadable")
    assert "lab.json is unreadable" in cardDetails(None, "model card lab.json is unreadable")


def test_model_phases_choose_the_phase_selectors(tiny_checkpoint, user_dir):  # noqa: F811
    from maml.config import Label
    from maml.model import save_checkpoint
    from maml.network import MAMLNet

    from engine_helpers import tiny_config

    config = tiny_config(phases=("venous",))
    config.labels = [Label(0, "background"), Label(1, "liver"), Label(2, "tumor")]
    save_checkpoint(user_dir / "venous-only.pt", MAMLNet(config), config)
    catalog = ModelCatalog(user_dir)
    assert modelPhases(catalog.model("venous-only")) == ["venous"]
    assert modelPhases(catalog.model("maml_liver_demo")) == ["arterial", "venous"]
    assert modelPhases(None) == list(PHASES)


def test_install_from_file_through_the_logic(tiny_checkpoint, user_dir):  # noqa: F811
    logic = engine_logic(user_dir)
    events = []
    assert logic.installModel(tiny_checkpoint, name="lab", progressCallback=events.append) == "lab"
    assert [e.step for e in events][-1] == "done" and any(e.step == "copy" for e in events)
    assert logic.models.names() == ["maml_liver_demo", "lab"]
    assert logic.resolveModel("lab") == user_dir / "lab.pt"
    assert logic.modelInfo("lab")["sha256"] == sha256(tiny_checkpoint)
    with pytest.raises(MAMLSegmentationError, match="already installed"):
        logic.installModel(tiny_checkpoint, name="lab")


def test_refused_requests_start_no_engine(user_dir, tmp_path):
    def no_process(*args, **kwargs):
        raise AssertionError("no engine should be started")

    logic = engine_logic(user_dir, popen=no_process)
    with pytest.raises(MAMLSegmentationError, match="Only https"):
        logic.startModelInstall("http://example.org/model.pt", "a" * 64)
    with pytest.raises(MAMLSegmentationError, match="SHA-256"):
        logic.startModelInstall("https://example.org/model.pt")
    with pytest.raises(MAMLSegmentationError, match="not found"):
        logic.startModelInstall(tmp_path / "absent.pt")


def test_download_with_wrong_checksum_changes_nothing(https_server, served_model, user_dir, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SSL_CERT_FILE", str(https_server.cert))
    logic = engine_logic(user_dir)
    before = [m.to_dict() for m in logic.models.refresh()]
    with pytest.raises(MAMLSegmentationError, match="checksum mismatch"):
        logic.installModel(https_server.url("served-model.pt"), "0" * 64)
    assert [m.to_dict() for m in logic.models.models] == before
    assert snapshot(user_dir) == {}
    assert logic.installModel(https_server.url("served-model.pt"), sha256(served_model)) == "served-model"
    assert "served-model" in logic.models.names()


def test_cancel_during_download_leaves_nothing(https_server, served_model, user_dir, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SSL_CERT_FILE", str(https_server.cert))
    logic = engine_logic(user_dir)
    run = logic.startModelInstall(https_server.url("slow-served-model.pt"), sha256(served_model))
    deadline = time.monotonic() + 60
    while run.isRunning and not any(e.step == "download" for e in run.poll()):
        assert time.monotonic() < deadline, run.process.logText()
        time.sleep(0.05)
    assert run.isRunning, run.process.logText()
    run.cancel()
    assert run.state == "cancelled" and isinstance(run.error, CancelledError)
    assert not process_alive(run.process.pid)
    assert snapshot(user_dir) == {}
    assert logic.models.names() == ["maml_liver_demo"]


def test_card_of_a_hand_copied_checkpoint_is_written_in_the_background(tiny_checkpoint, user_dir):  # noqa: F811
    user_dir.mkdir()
    shutil.copy(tiny_checkpoint, user_dir / "copied.pt")
    logic = engine_logic(user_dir)
    assert [m.name for m in logic.models.modelsWithoutCard()] == ["copied"]
    run = logic.startModelCardUpdate()
    assert run.wait(timeout=120) == ""
    assert logic.models.modelsWithoutCard() == []
    assert logic.models.model("copied").card["path"] == "copied.pt"


def test_a_bad_user_catalog_is_reported_and_hides_no_installed_model(tiny_checkpoint, user_dir):  # noqa: F811
    user_dir.mkdir()
    shutil.copy(tiny_checkpoint, user_dir / "lab.pt")
    (user_dir / "models.json").write_text(json.dumps({"format": "maml-model-catalog", "version": 1,
                                                      "models": [{"name": "x"}]}))
    catalog = ModelCatalog(user_dir)
    assert catalog.names() == ["maml_liver_demo", "lab"]
    assert "entry 1 ('x')" in catalog.catalogProblem and "models.json" in catalog.catalogProblem
    assert catalog.available == []
