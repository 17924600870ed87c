"""Models the user chooses: model cards (sidecars), the catalog, ``maml models list|install|remove``.

Downloads are served over https on 127.0.0.1 by a server in a thread, with a self-signed certificate
made here by the ``openssl`` command and passed as ``--ca-bundle``; an interrupted download is the
server closing the connection in the middle of the body.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from engine_helpers import tiny_config
from maml import models
from maml.cli import main
from maml.errors import CancelledError, InputError, ModelError
from maml.model import load_model, save_checkpoint, write_sidecar
from maml.network import MAMLNet

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "MAMLSegmentation" / "Resources" / "Models"


def json_round_trip(data):
    return json.loads(json.dumps(data))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict:
    """Every file and folder under ``folder`` (hidden ones too) with its bytes' checksum."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (sha256(p) if p.is_file() else "dir") for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    config = tiny_config()
    return save_checkpoint(tmp_path_factory.mktemp("src") / "tiny.pt", MAMLNet(config).eval(), config,
                           {"note": "unit test"})


@pytest.fixture
def user_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "user-models"
    monkeypatch.setenv("MAML_MODELS", str(folder))
    return folder


# --- model cards ----------------------------------------------------------------------------------

def test_save_checkpoint_writes_the_card_that_maml_info_prints(tiny_checkpoint, capsys):
    card = json.loads(models.card_path(tiny_checkpoint).read_text())
    assert main(["info", str(tiny_checkpoint), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == str(tiny_checkpoint) and card["path"] == "tiny.pt"
    assert {**info, "path": "tiny.pt"} == card
    assert card["sha256"] == sha256(tiny_checkpoint)
    assert card["metadata"] == {"note": "unit test"} and card["phases"] == ["arterial", "venous"]
    assert models.read_card(tiny_checkpoint) == (card, "")


def test_the_bundled_card_is_what_describe_gives_for_the_bundled_model():
    """Regenerate with: python -c "from maml.model import *; write_sidecar(load_model(PATH))"."""
    model = load_model(BUNDLED / "maml_liver_demo.pt")
    card = json.loads((BUNDLED / "maml_liver_demo.json").read_text())
    assert card == json_round_trip({**model.describe(), "path": "maml_liver_demo.pt"})


def test_the_bundled_catalog_describes_the_bundled_model():
    entries = models.read_catalog(BUNDLED / "models.json")
    entry = next(e for e in entries if e.name == models.DEFAULT_MODEL_NAME)
    card = json.loads((BUNDLED / "maml_liver_demo.json").read_text())
    assert entry.url is None and entry.sha256 == sha256(BUNDLED / "maml_liver_demo.pt") == card["sha256"]
    assert entry.phases == card["phases"]
    assert entry.labels == [label["name"] for label in card["labels"]]
    assert entry.data_kind == "synthetic" and entry.licence
    for other in entries:  # every entry is bundled (that very file) or can be downloaded
        bundled = BUNDLED / f"{other.name}.pt"
        assert (other.url is None and sha256(bundled) == other.sha256) or other.url.startswith("https://")


def test_stale_or_foreign_card_is_not_used(tiny_checkpoint, tmp_path):
    copy = tmp_path / "other.pt"
    shutil.copy(tiny_checkpoint, copy)
    assert models.read_card(copy) == (None, "no model card")
    shutil.copy(models.card_path(tiny_checkpoint), models.card_path(copy))
    card, problem = models.read_card(copy)
    assert card is None and "does not describe other.pt" in problem
    write_sidecar(load_model(copy))
    os.utime(copy, ns=(time.time_ns() + 10**9,) * 2)  # the checkpoint replaced after its card
    card, problem = models.read_card(copy)
    assert card is None and "older than other.pt" in problem


def test_list_writes_the_card_of_a_checkpoint_copied_in_by_hand(tiny_checkpoint, user_dir, capsys):
    user_dir.mkdir()
    shutil.copy(tiny_checkpoint, user_dir / "copied.pt")
    (user_dir / "garbage.pt").write_bytes(b"not a model")
    assert main(["models", "list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    by_name = {m["name"]: m for m in listing["models"]}
    assert listing["models"][0]["name"] == "maml_liver_demo" and by_name["maml_liver_demo"]["source"] == "bundled"
    assert by_name["maml_liver_demo"]["card"]["phases"] == ["arterial", "venous"]
    assert by_name["copied"]["card"] == json.loads((user_dir / "copied.json").read_text())
    assert by_name["copied"]["card"]["path"] == "copied.pt"
    assert by_name["garbage"]["card"] is None and "garbage.pt" in by_name["garbage"]["card_problem"]
    assert not (user_dir / "garbage.json").exists()


def test_user_models_folder_default_is_under_slicer_settings(monkeypatch, tmp_path):
    monkeypatch.delenv("MAML_MODELS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setattr(sys, "platform", "linux")
    assert models.user_models_dir() == tmp_path / "NA-MIC" / "MAMLSegmentation" / "models"
    monkeypatch.setenv("MAML_MODELS", str(tmp_path / "mine"))
    assert models.user_models_dir() == tmp_path / "mine"


# --- the pickled-code message ---------------------------------------------------------------------

class _Payload:
    """What a hostile checkpoint carries: unpickling it would call os.system."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_checkpoint_with_pickled_code_is_refused_in_our_own_words(tiny_checkpoint, tmp_path, user_dir, capsys):
    marker = tmp_path / "code-ran"
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["metadata"] = {"note": _Payload(f"touch {marker}")}
    hostile = tmp_path / "hostile.pt"
    torch.save(payload, hostile)
    with pytest.raises(ModelError) as error:
        load_model(hostile)
    message = str(error.value)
    assert "hostile.pt" in message and "executable content" in message and "was not loaded" in message
    assert "weights_only" not in message and "torch.load" not in message and "\n" not in message
    assert main(["models", "install", str(hostile)]) == 1
    assert "executable content" in capsys.readouterr().err
    assert not marker.exists()
    assert snapshot(user_dir) == {}


def test_other_unpicklable_content_is_not_called_code(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelError, match="garbage.pt is not a MAML checkpoint") as error:
        load_model(garbage)
    assert "weights_only" not in str(error.value) and "executable" not in str(error.value)


# --- catalogs ---------------------------------------------------------------------------------------

def catalog(**changes) -> dict:
    entry = {"name": "liver-ct", "url": "https://example.org/liver.pt", "sha256": "a" * 64,
             "description": "a model", "phases": ["arterial", "venous"],
             "labels": ["background", "liver", "tumor"], "licence": "CC-BY-4.0"}
    entry.update(changes)
    return {"format": "maml-model-catalog", "version": 1, "models": [entry]}


@pytest.mark.parametrize("changes, complaint", [
    ({"sha256": "abc"}, "sha256 must be 64"),
    ({"url": "http://example.org/liver.pt"}, "url must be an https address"),
    ({"phases": []}, "\"phases\" must be a non-empty list"),
    ({"licence": None}, "\"licence\" must be a str"),
    ({"name": "../escape"}, "name must be letters"),
    ({"data_kind": "phantom"}, "data_kind must be"),
])
def test_bad_catalog_entry_is_named(changes, complaint, tmp_path):
    path = tmp_path / "models.json"
    path.write_text(json.dumps(catalog(**changes)))
    with pytest.raises(ModelError, match="entry 1") as error:
        models.read_catalog(path)
    assert complaint in str(error.value) and str(path) in str(error.value)


def test_catalog_structure_errors(tmp_path):
    twice = catalog()
    twice["models"].append(dict(twice["models"][0]))
    with pytest.raises(ModelError, match=r"entry 2 \('liver-ct'\): the name is used twice"):
        models.parse_catalog(twice, "test")
    with pytest.raises(ModelError, match="not a MAML model catalog"):
        models.parse_catalog({"models": []}, "test")
    with pytest.raises(ModelError, match="update the extension"):
        models.parse_catalog({**catalog(), "version": 99}, "test")
    (tmp_path / "models.json").write_text("{")
    with pytest.raises(ModelError, match="not valid JSON"):
        models.read_catalog(tmp_path / "models.json")
    entry = models.parse_catalog(catalog(homepage="https://example.org"), "test")[0]
    assert entry.to_dict()["homepage"] == "https://example.org"


# --- install and remove from files ------------------------------------------------------------------

def test_install_from_file_then_remove(tiny_checkpoint, user_dir, capsys):
    assert main(["models", "install", str(tiny_checkpoint), "--name", "my-model",
                 "--sha256", sha256(tiny_checkpoint).upper(), "--phases", "venous,arterial"]) == 0
    assert sorted(p.name for p in user_dir.iterdir()) == ["my-model.json", "my-model.pt"]
    assert (user_dir / "my-model.pt").read_bytes() == tiny_checkpoint.read_bytes()
    card = json.loads((user_dir / "my-model.json").read_text())
    assert card == json_round_trip(load_model(user_dir / "my-model.pt").card())
    installed = {m.name: m for m in models.installed_models()}
    assert installed["my-model"].source == "user" and installed["my-model"].card == card
    capsys.readouterr()
    assert main(["models", "install", str(tiny_checkpoint), "--name", "my-model"]) == 1
    assert "already installed" in capsys.readouterr().err
    assert main(["models", "remove", "maml_liver_demo"]) == 1
    assert "bundled" in capsys.readouterr().err
    assert main(["models", "remove", "my-model"]) == 0
    assert list(user_dir.iterdir()) == []
    assert main(["models", "remove", "my-model"]) == 1
    assert "no installed model named 'my-model'" in capsys.readouterr().err


def failed_install(capsys, user_dir, *argv) -> str:
    """Runs a failing install; returns its one-line error after checking nothing changed."""
    before_files, before_models = snapshot(user_dir), [m.to_dict() for m in models.installed_models()]
    assert main(["models", "install", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("maml models: error: "), err
    assert snapshot(user_dir) == before_files  # no staging folder, no half-written file
    assert [m.to_dict() for m in models.installed_models()] == before_models
    return err


def test_file_install_failures_leave_nothing(tiny_checkpoint, user_dir, tmp_path, capsys):
    assert "checksum mismatch" in failed_install(capsys, user_dir, str(tiny_checkpoint), "--sha256", "0" * 64)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    err = failed_install(capsys, user_dir, str(corrupt), "--sha256", sha256(corrupt))
    assert "corrupt.pt is not a readable MAML checkpoint" in err and ".install-" not in err
    err = failed_install(capsys, user_dir, str(tiny_checkpoint), "--phases", "venous")
    assert "segments the phases arterial, venous, not the expected venous" in err
    assert "not a SHA-256" in failed_install(capsys, user_dir, str(tiny_checkpoint), "--sha256", "xyz")
    assert "neither a file" in failed_install(capsys, user_dir, str(tmp_path / "absent.pt"))
    assert "only https" in failed_install(capsys, user_dir, "http://127.0.0.1:1/m.pt", "--sha256", "0" * 64)
    assert "give its --sha256" in failed_install(capsys, user_dir, "https://127.0.0.1:1/m.pt")
    assert "bundled" in failed_install(capsys, user_dir, "maml_liver_demo")


def test_phases_that_differ_from_a_user_catalog_entry(tiny_checkpoint, user_dir, capsys, https_server):
    """A catalog in the user folder names a model by name; install checks what the entry promises."""
    user_dir.mkdir()
    single = tiny_config(phases=("venous",))
    venous_only = save_checkpoint(https_server.root / "venous-only.pt", MAMLNet(single), single)
    (user_dir / "models.json").write_text(json.dumps(catalog(
        name="lab-liver", url=https_server.url("venous-only.pt"), sha256=sha256(venous_only),
        labels=["background", "class1", "class2"])))
    err = failed_install(capsys, user_dir, "lab-liver", "--ca-bundle", str(https_server.cert))
    assert "segments the phases venous, not the expected arterial, venous" in err
    assert main(["models", "list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in listing["available"]] == ["lab-liver"]


# --- downloads over https ---------------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        name = self.path.strip("/").split("?")[0]
        path = server.root / name.replace("short-", "").replace("slow-", "")
        if not path.is_file():
            self.send_error(404, "Not Found")
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if name.startswith("short-"):  # the connection drops half-way through the body
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        step = 4096 if name.startswith("slow-") else len(data)
        for start in range(0, len(data), step):
            try:
                self.wfile.write(data[start:start + step])
                self.wfile.flush()
            except OSError:
                return
            if name.startswith("slow-"):
                time.sleep(0.1)


class HTTPSServer:
    def __init__(self, root: Path, cert: Path, key: Path):
        self.root, self.cert = root, cert
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.root = root
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"https://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def https_server(tmp_path_factory):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("https")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    root = folder / "served"
    root.mkdir()
    server = HTTPSServer(root, cert, key)
    yield server
    server.close()


@pytest.fixture(scope="module")
def served_model(https_server, tiny_checkpoint) -> Path:
    path = https_server.root / "served-model.pt"
    shutil.copy(tiny_checkpoint, path)
    return path


def test_install_from_https_with_checksum(https_server, served_model, user_dir):
    steps = []
    model = models.install_model(https_server.url("served-model.pt"), sha256(served_model),
                                 ca_bundle=https_server.cert, progress=lambda s, f, m="": steps.append((s, f)))
    assert model.name == "served-model" and model.path == user_dir / "served-model.pt"
    assert model.path.read_bytes() == served_model.read_bytes() and model.card["sha256"] == sha256(served_model)
    assert sorted(p.name for p in user_dir.iterdir()) == ["served-model.json", "served-model.pt"]
    fractions = [f for s, f in steps if s == "download"]
    assert fractions and fractions[-1] == pytest.approx(0.9)
    assert [s for s, _ in steps][-3:] == ["verify", "validate", "install"]


def test_https_install_failures_leave_nothing(https_server, served_model, user_dir, capsys):
    user_dir.mkdir()
    good = sha256(served_model)
    ca = ["--ca-bundle", str(https_server.cert)]
    err = failed_install(capsys, user_dir, https_server.url("served-model.pt"), "--sha256", "f" * 64, *ca)
    assert "checksum mismatch" in err
    err = failed_install(capsys, user_dir, https_server.url("short-served-model.pt"), "--sha256", good, *ca)
    assert "interrupted after" in err and "short-served-model.pt" in err, err
    err = failed_install(capsys, user_dir, https_server.url("absent.pt"), "--sha256", good, *ca)
    assert "answered 404" in err
    err = failed_install(capsys, user_dir, "https://127.0.0.1:1/served-model.pt", "--sha256", good, *ca)
    assert "cannot be reached" in err
    # Without the test certificate the self-signed server is not trusted.
    err = failed_install(capsys, user_dir, https_server.url("served-model.pt"), "--sha256", good)
    assert "certificate cannot be verified" in err and "--ca-bundle" in err
    corrupt = https_server.root / "corrupt.pt"
    corrupt.write_bytes(served_model.read_bytes()[:-4000])
    err = failed_install(capsys, user_dir, https_server.url("corrupt.pt"), "--sha256", sha256(corrupt), *ca)
    assert "not a readable MAML checkpoint" in err and "nothing was installed" in err


def test_cancelled_download_leaves_nothing(https_server, served_model, user_dir):
    """SIGTERM during the download (the Slicer panel's Cancel): exit 130, no file, no staging folder."""
    user_dir.mkdir()
    command = [sys.executable, "-m", "maml.cli", "models", "install", https_server.url("slow-served-model.pt"),
               "--sha256", sha256(served_model), "--ca-bundle", str(https_server.cert), "--json-progress"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "MAML_MODELS": str(user_dir)})
    for line in process.stdout:
        record = json.loads(line)
        if record["step"] == "download" and record["fraction"] > 0.05:
            break
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    last = json.loads(stdout.strip().splitlines()[-1])
    assert last["step"] == "error" and last["cancelled"] is True
    assert snapshot(user_dir) == {}


def test_keyboard_interrupt_during_install_removes_the_staging_folder(served_model, user_dir):
    def interrupt(step, fraction, message=""):
        if step == "copy":
            raise CancelledError("stopped by the test")

    with pytest.raises(CancelledError):
        models.install_model(str(served_model), progress=interrupt)
    assert snapshot(user_dir) == {}


def test_name_is_checked(served_model, user_dir):
    with pytest.raises(InputError, match="model name"):
        models.install_model(str(served_model), name="../../etc/x")
    assert snapshot(user_dir) == {}


def test_list_rewrites_a_card_that_names_another_checksum(tiny_checkpoint, user_dir, capsys):
    """A checkpoint replaced with ``cp -p`` keeps an old time: its card is caught by the checksum."""
    user_dir.mkdir()
    target = user_dir / "lab.pt"
    shutil.copy(tiny_checkpoint, target)
    write_sidecar(load_model(target))
    config = tiny_config(base_features=2)
    other = save_checkpoint(user_dir.parent / "other.pt", MAMLNet(config), config, sidecar=False)
    shutil.copy2(other, target)
    os.utime(target, ns=(0, 0))
    assert models.read_card(target)[0]["sha256"] == sha256(tiny_checkpoint)  # looks fresh by time
    assert main(["models", "list", "--json"]) == 0
    listing = {m["name"]: m for m in json.loads(capsys.readouterr().out)["models"]}
    assert listing["lab"]["card"]["sha256"] == sha256(target)
    assert json.loads((user_dir / "lab.json").read_text())["config"]["network"]["base_features"] == 2


def test_listing_without_pytorch_reports_instead_of_failing(tiny_checkpoint, user_dir, monkeypatch):
    """A fresh Slicer has no PyTorch yet: the cards are listed, a card-less checkpoint says why."""
    user_dir.mkdir()
    shutil.copy(tiny_checkpoint, user_dir / "copied.pt")
    monkeypatch.setitem(sys.modules, "maml.model", None)  # makes `from .model import ...` fail
    listed = {m.name: m for m in models.update_cards(models.installed_models())}
    assert listed["maml_liver_demo"].card is not None
    assert listed["copied"].card is None and "cannot read the checkpoint" in listed["copied"].card_problem
    assert not (user_dir / "copied.json").exists()


def test_a_killed_install_s_staging_folder_is_removed_a_day_later(tiny_checkpoint, user_dir):
    old, recent = user_dir / ".install-old", user_dir / ".install-recent"
    for folder in (old, recent):
        folder.mkdir(parents=True)
        (folder / "half.pt").write_bytes(b"half")
    os.utime(old, (time.time() - 2 * models.STALE_STAGING_S,) * 2)
    models.install_model(str(tiny_checkpoint))
    assert not old.exists() and recent.exists()  # a recent one may be another install under way
    assert [m.name for m in models.installed_models()] == ["maml_liver_demo", "tiny"]


def test_a_model_argument_is_a_file_or_an_installed_name(tiny_checkpoint, user_dir):
    assert models.resolve_model(tiny_checkpoint) == tiny_checkpoint
    assert models.resolve_model("maml_liver_demo") == BUNDLED / "maml_liver_demo.pt"
    models.install_model(str(tiny_checkpoint), name="lab")
    assert models.resolve_model("lab") == user_dir / "lab.pt"
    with pytest.raises(InputError, match=r"installed: maml_liver_demo, lab; see maml models list"):
        models.resolve_model("absent")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_models_folder_is_one_clear_error(tiny_checkpoint, user_dir):
    user_dir.mkdir()
    user_dir.chmod(0o500)
    try:
        with pytest.raises(InputError, match="cannot write to the models folder"):
            models.install_model(str(tiny_checkpoint))
    finally:
        user_dir.chmod(0o700)
    assert snapshot(user_dir) == {}


def test_card_of_metadata_holding_tensors_is_plain_json(tmp_path, capsys):
    """Training may keep statistics as tensors in the metadata: the card and maml info stay JSON."""
    config = tiny_config()
    path = save_checkpoint(tmp_path / "stats.pt", MAMLNet(config), config,
                           {"statistics": {"mean": torch.tensor([1.5, 2.0]), "count": 3}})
    card = json.loads(models.card_path(path).read_text())
    assert card["metadata"]["statistics"] == {"mean": [1.5, 2.0], "count": 3}
    assert main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metadata"] == card["metadata"]


def test_maml_train_writes_the_cards_of_its_checkpoints(tmp_path):
    from maml.training.trainer import train
    from test_training import tiny_model_config, tiny_options, write_tiny_dataset

    dataset = write_tiny_dataset(tmp_path / "Dataset001_Tiny", n_cases=3)
    torch.set_num_threads(1)
    train(dataset, tmp_path / "run", tiny_model_config(),
          tiny_options(epochs=1, iterations_per_epoch=1, augmentation="none"), progress=False)
    for name in ("checkpoint_latest", "checkpoint_best"):
        checkpoint = tmp_path / "run" / f"{name}.pt"
        card, problem = models.read_card(checkpoint)
        assert problem == "" and card == json_round_trip(load_model(checkpoint).card())
        assert card["metadata"]["trained_epochs"] == 1
