"""The models a user can choose: the bundled one(s) and those installed in the user models folder.

- Bundled: ``Resources/Models/*.pt`` beside this package (read-only in an installed extension).
- User folder: ``$MAML_MODELS``, else ``MAMLSegmentation/models`` under Slicer's settings folder
  (``~/.config/NA-MIC`` on Linux, ``%APPDATA%/NA-MIC`` on Windows, ``~/.config/www.na-mic.org`` on
  macOS), so the engine in a shell and the Slicer panel see the same models.
- Every checkpoint ``NAME.pt`` has its model card ``NAME.json`` beside it (:func:`maml.model.write_sidecar`).
- Catalogs ``models.json`` (the bundled one, and one a lab may put in the user folder) describe
  models by name, download address, SHA-256, phases, labels and licence.

Everything at module level is the standard library: the Slicer panel imports this module to list
models and read their cards without importing torch. Installing a model loads it (torch) to check it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import InputError, ModelError

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "Resources" / "Models"
DEFAULT_MODEL_NAME = "maml_liver_demo"
CATALOG_FILE = "models.json"
CATALOG_FORMAT = "maml-model-catalog"
CATALOG_VERSION = 1
CHECKPOINT_SUFFIX, CARD_SUFFIX = ".pt", ".json"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
DOWNLOAD_TIMEOUT_S = 60
STAGING_PREFIX = ".install-"
STALE_STAGING_S = 24 * 3600  # a staging folder this old was left by a killed install
_CHUNK = 1 << 20
_SOURCES = ("bundled", "user")
_REQUIRED_CATALOG_KEYS = {"name": str, "sha256": str, "description": str, "phases": list,
                          "labels": list, "licence": str}

Progress = Callable[[str, float, str], None]


# --- where models live --------------------------------------------------------------------------
def settings_dir() -> Path:
    """Slicer's settings folder (where Slicer.ini lives) for this platform, without Slicer."""
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming") / "NA-MIC"
    if sys.platform == "darwin":
        return Path.home() / ".config" / "www.na-mic.org"
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "NA-MIC"


def user_models_dir() -> Path:
    """``$MAML_MODELS``, else ``<Slicer settings folder>/MAMLSegmentation/models``."""
    if os.environ.get("MAML_MODELS"):
        return Path(os.environ["MAML_MODELS"]).expanduser()
    return settings_dir() / "MAMLSegmentation" / "models"


def card_path(checkpoint: str | Path) -> Path:
    return Path(checkpoint).with_suffix(CARD_SUFFIX)


def checkpoints(folder: Path) -> list[Path]:
    """``*.pt`` in ``folder`` (not hidden: installs in progress are hidden folders)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"*{CHECKPOINT_SUFFIX}") if p.is_file() and not p.name.startswith("."))


# --- model cards --------------------------------------------------------------------------------
def read_card(checkpoint: Path, check_age: bool = True) -> tuple[dict | None, str]:
    """The model card beside ``checkpoint`` and "" when it is usable, else (None, why not).

    ``check_age``: a card older than its checkpoint (the file was replaced by hand) is stale. The
    bundled cards are checked by the tests instead (a checkout does not keep file times).
    """
    path = card_path(checkpoint)
    if not path.is_file():
        return None, "no model card"
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return None, f"model card {path.name} is unreadable ({error})"
    if not isinstance(card, dict) or not isinstance(card.get("phases"), list) or card.get("path") != checkpoint.name:
        return None, f"model card {path.name} does not describe {checkpoint.name}"
    if check_age and path.stat().st_mtime_ns < checkpoint.stat().st_mtime_ns:
        return None, f"model card {path.name} is older than {checkpoint.name}"
    return card, ""


@dataclass
class InstalledModel:
    name: str
    path: Path
    source: str                      # "bundled" or "user"
    card: dict | None = None
    card_problem: str = ""

    @property
    def phases(self) -> list[str] | None:
        return list(self.card["phases"]) if self.card else None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "source": self.source,
                "card": self.card, "card_problem": self.card_problem}


def installed_models(user_dir: Path | None = None, bundled_dir: Path = BUNDLED_DIR) -> list[InstalledModel]:
    """The bundled models (the default first), then the user folder's, by name."""
    user_dir = user_models_dir() if user_dir is None else Path(user_dir)
    models = []
    for source, folder in (("bundled", bundled_dir), ("user", user_dir)):
        found = checkpoints(folder)
        if source == "bundled":
            found.sort(key=lambda p: p.stem != DEFAULT_MODEL_NAME)
        for path in found:
            card, problem = read_card(path, check_age=source == "user")
            models.append(InstalledModel(path.stem, path, source, card, problem))
    return models


def find_installed(name: str, user_dir: Path | None = None, bundled_dir: Path = BUNDLED_DIR) -> InstalledModel | None:
    return next((m for m in installed_models(user_dir, bundled_dir) if m.name == name), None)


def resolve_model(value: str | Path, user_dir: Path | None = None, bundled_dir: Path = BUNDLED_DIR) -> Path:
    """A ``--model`` argument: a checkpoint file, or the name of an installed model."""
    if Path(value).is_file():
        return Path(value)
    model = find_installed(str(value), user_dir, bundled_dir)
    if model is not None:
        return model.path
    names = ", ".join(m.name for m in installed_models(user_dir, bundled_dir)) or "none"
    raise InputError(f"model {value} is neither a checkpoint file nor an installed model "
                     f"(installed: {names}; see maml models list)")


def update_cards(models: list[InstalledModel], progress: Progress | None = None) -> list[InstalledModel]:
    """Writes the missing or stale card of every user model (loads each such checkpoint: torch).

    Stale: older than its checkpoint, or naming another checksum (a file copied in with its old
    time). A checkpoint that does not load keeps ``card`` None and says why in ``card_problem``.
    """
    todo = [m for m in models if m.source == "user"]
    try:
        from .model import file_sha256, load_model, write_sidecar
    except ImportError as error:  # no PyTorch yet (a fresh Slicer): list what the cards say
        for model in todo:
            if model.card is None:
                model.card_problem = f"{model.card_problem}; cannot read the checkpoint ({error})"
        return models
    for index, model in enumerate(todo):
        if progress:
            progress("cards", index / max(len(todo), 1), model.name)
        if model.card and model.card.get("sha256") == file_sha256(model.path):
            continue
        try:
            loaded = load_model(model.path)
        except ModelError as error:
            model.card, model.card_problem = None, str(error)
            continue
        write_sidecar(loaded)
        model.card, model.card_problem = loaded.card(), ""
    return models


# --- catalogs -----------------------------------------------------------------------------------
@dataclass
class CatalogEntry:
    name: str
    sha256: str
    description: str
    phases: list[str]
    labels: list[str]
    licence: str
    url: str | None = None
    data_kind: str | None = None
    extra: dict = field(default_factory=dict)   # further keys, kept as they are

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {**data.pop("extra"), **data}


def parse_catalog(data: Any, source: str) -> list[CatalogEntry]:
    """Validates a catalog's JSON; a bad entry raises ModelError naming the file and the entry."""
    if not isinstance(data, dict) or data.get("format") != CATALOG_FORMAT:
        raise ModelError(f"model catalog {source} is not a MAML model catalog (no \"format\": "
                         f"\"{CATALOG_FORMAT}\")")
    if not isinstance(data.get("version"), int) or data["version"] > CATALOG_VERSION:
        raise ModelError(f"model catalog {source} has version {data.get('version')!r}; this maml reads "
                         f"up to {CATALOG_VERSION}: update the extension")
    if not isinstance(data.get("models"), list):
        raise ModelError(f"model catalog {source} has no \"models\" list")
    entries, names = [], set()
    for index, item in enumerate(data["models"]):
        label = f"model catalog {source}, entry {index + 1}"
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            label += f" ({item['name']!r})"
        entry = _catalog_entry(item, label)
        if entry.name in names:
            raise ModelError(f"{label}: the name is used twice")
        names.add(entry.name)
        entries.append(entry)
    return entries


def _catalog_entry(item: Any, label: str) -> CatalogEntry:
    if not isinstance(item, dict):
        raise ModelError(f"{label}: not an object")
    for key, kind in _REQUIRED_CATALOG_KEYS.items():
        if not isinstance(item.get(key), kind):
            raise ModelError(f"{label}: \"{key}\" must be a {kind.__name__}")
    if not NAME_PATTERN.match(item["name"]):
        raise ModelError(f"{label}: name must be letters, digits, '.', '_' or '-'")
    if not SHA256_PATTERN.match(item["sha256"]):
        raise ModelError(f"{label}: sha256 must be 64 lowercase hexadecimal digits")
    for key in ("phases", "labels"):
        if not item[key] or not all(isinstance(v, str) and v for v in item[key]):
            raise ModelError(f"{label}: \"{key}\" must be a non-empty list of names")
    url = item.get("url")
    if url is not None and (not isinstance(url, str) or urllib.parse.urlsplit(url).scheme != "https"):
        raise ModelError(f"{label}: url must be an https address or null (bundled)")
    data_kind = item.get("data_kind")
    if data_kind not in (None, "synthetic", "clinical"):
        raise ModelError(f"{label}: data_kind must be \"synthetic\" or \"clinical\"")
    known = {*_REQUIRED_CATALOG_KEYS, "url", "data_kind"}
    return CatalogEntry(item["name"], item["sha256"], item["description"], list(item["phases"]),
                        list(item["labels"]), item["licence"], url, data_kind,
                        {k: v for k, v in item.items() if k not in known})


def read_catalog(path: Path) -> list[CatalogEntry]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ModelError(f"model catalog {path} cannot be read: {error.strerror or error}") from None
    except ValueError as error:
        raise ModelError(f"model catalog {path} is not valid JSON: {error}") from None
    return parse_catalog(data, str(path))


def catalog_entries(user_dir: Path | None = None, bundled_dir: Path = BUNDLED_DIR) -> list[CatalogEntry]:
    """The bundled catalog's entries, then those of the user folder's models.json (same name: the
    bundled one wins)."""
    user_dir = user_models_dir() if user_dir is None else Path(user_dir)
    entries: dict[str, CatalogEntry] = {}
    for folder in (bundled_dir, user_dir):
        path = folder / CATALOG_FILE
        if path.is_file():
            for entry in read_catalog(path):
                entries.setdefault(entry.name, entry)
    return list(entries.values())


# --- install and remove -------------------------------------------------------------------------
def install_model(source: str, sha256: str | None = None, name: str | None = None,
                  phases: list[str] | None = None, user_dir: Path | None = None,
                  ca_bundle: str | Path | None = None, progress: Progress | None = None,
                  bundled_dir: Path = BUNDLED_DIR) -> InstalledModel:
    """Installs a checkpoint from a file, an https URL or a catalog entry's name.

    The file is fetched into a hidden folder inside the models folder, its SHA-256 checked (required
    for a URL), loaded as a MAML checkpoint, its phases compared with what was expected (``phases``,
    else the catalog entry's), and only then moved in with its card. Any failure, Ctrl-C or SIGTERM
    removes the hidden folder: nothing half-installed is left.
    """
    user_dir = user_models_dir() if user_dir is None else Path(user_dir)
    progress = progress or (lambda step, fraction, message="": None)
    sha256 = _check_sha256(sha256)
    entry = _catalog_entry_for(source, user_dir, bundled_dir)
    labels = None
    if entry is not None:
        if entry.url is None:
            raise InputError(f"model {entry.name!r} is bundled with the extension: it is already installed")
        source, sha256 = entry.url, sha256 or entry.sha256
        if sha256 != entry.sha256:
            raise InputError(f"--sha256 differs from the catalog's checksum of {entry.name!r}")
        name, phases, labels = name or entry.name, phases or entry.phases, entry.labels
    is_url = "://" in source
    if is_url:
        if urllib.parse.urlsplit(source).scheme != "https":
            raise InputError(f"model address {source} is not https: only https downloads are installed")
        if sha256 is None:
            raise InputError(f"model address {source}: give its --sha256 so the download can be verified")
    elif not Path(source).is_file():
        raise InputError(f"model {source} is neither a file, an https address nor a catalog entry "
                         "(see maml models list)")
    name = name or _name_from(source)
    if not NAME_PATTERN.match(name) or name.endswith(CHECKPOINT_SUFFIX):
        raise InputError(f"model name {name!r}: use letters, digits, '.', '_' or '-' (give --name)")
    existing = find_installed(name, user_dir, bundled_dir)
    if existing is not None:
        raise InputError(f"a model named {name!r} is already installed ({existing.path}): remove it with "
                         f"'maml models remove {name}' or choose another --name")
    try:
        user_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(user_dir)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=user_dir))
    except OSError as error:
        raise InputError(f"cannot write to the models folder {user_dir}: {error.strerror or error}") from None
    try:
        staged = staging / f"{name}{CHECKPOINT_SUFFIX}"
        if is_url:
            digest = download(source, staged, progress, ca_bundle)
        else:
            digest = _copy(Path(source), staged, progress)
        progress("verify", 0.9, "checking the checksum")
        if sha256 is not None and digest != sha256:
            raise ModelError(f"model {source}: checksum mismatch (expected sha256 {sha256}, got {digest}): "
                             "the file is corrupt or not the one meant; nothing was installed")
        progress("validate", 0.93, "loading the checkpoint")
        loaded = _load_staged(staged, source)
        _check_expected(loaded, source, phases, labels)
        from .model import write_sidecar

        write_sidecar(loaded)
        progress("install", 0.98, f"moving {name} into {user_dir}")
        target = user_dir / staged.name
        # The card first: a card without its checkpoint is ignored; the checkpoint then completes it.
        os.replace(card_path(staged), card_path(target))
        try:
            os.replace(staged, target)
        except OSError:
            card_path(target).unlink(missing_ok=True)
            raise
    except OSError as error:  # a full disk, a folder that became read-only
        raise InputError(f"cannot install model {name} into {user_dir}: {error.strerror or error}; "
                         "nothing was installed") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    card, problem = read_card(target)
    return InstalledModel(name, target, "user", card, problem)


def remove_model(name: str, user_dir: Path | None = None, bundled_dir: Path = BUNDLED_DIR) -> Path:
    """Removes a user model (checkpoint and card); bundled models cannot be removed."""
    user_dir = user_models_dir() if user_dir is None else Path(user_dir)
    model = find_installed(name, user_dir, bundled_dir)
    if model is None:
        raise InputError(f"no installed model named {name!r} (see maml models list)")
    if model.source != "user":
        raise InputError(f"model {name!r} is bundled with the extension and cannot be removed")
    model.path.unlink()  # the checkpoint first: a card left alone is ignored
    card_path(model.path).unlink(missing_ok=True)
    return model.path


def _remove_stale_staging(user_dir: Path) -> None:
    """SIGKILL (or a power cut) skips the clean-up; such folders are hidden and removed a day later."""
    now = time.time()
    for folder in user_dir.glob(f"{STAGING_PREFIX}*"):
        try:
            if folder.is_dir() and now - folder.stat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass


def _check_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if not SHA256_PATTERN.match(value):
        raise InputError(f"--sha256 {sha256!r} is not a SHA-256 checksum (64 hexadecimal digits)")
    return value


def _catalog_entry_for(source: str, user_dir: Path, bundled_dir: Path) -> CatalogEntry | None:
    if "://" in source or Path(source).exists() or not NAME_PATTERN.match(source):
        return None
    return next((e for e in catalog_entries(user_dir, bundled_dir) if e.name == source), None)


def _name_from(source: str) -> str:
    last = urllib.parse.unquote(urllib.parse.urlsplit(source).path).rsplit("/", 1)[-1] if "://" in source \
        else Path(source).name
    stem = last[: -len(CHECKPOINT_SUFFIX)] if last.endswith(CHECKPOINT_SUFFIX) else last
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip("._-") or "model"


def _load_staged(staged: Path, source: str):
    from .model import load_model

    try:
        return load_model(staged)
    except ModelError as error:
        message = str(error).replace(f"model file {staged}", f"model {source}")
        raise ModelError(f"{message}; nothing was installed") from None


def _check_expected(loaded, source: str, phases: list[str] | None, labels: list[str] | None) -> None:
    actual_phases = list(loaded.config.phases)
    if phases is not None and sorted(phases) != sorted(actual_phases):
        raise ModelError(f"model {source} segments the phases {', '.join(actual_phases)}, not the expected "
                         f"{', '.join(phases)}; nothing was installed")
    actual_labels = [label.name for label in loaded.config.labels]
    if labels is not None and sorted(labels) != sorted(actual_labels):
        raise ModelError(f"model {source} has the labels {', '.join(actual_labels)}, not the expected "
                         f"{', '.join(labels)}; nothing was installed")


def _copy(source: Path, target: Path, progress: Progress) -> str:
    total = max(source.stat().st_size, 1)
    digest, done = hashlib.sha256(), 0
    with open(source, "rb") as reader, open(target, "wb") as writer:
        for block in iter(lambda: reader.read(_CHUNK), b""):
            digest.update(block)
            writer.write(block)
            done += len(block)
            progress("copy", 0.9 * done / total, f"{done / 1e6:.1f} of {total / 1e6:.1f} MB")
    return digest.hexdigest()


def download(url: str, target: Path, progress: Progress, ca_bundle: str | Path | None = None,
             timeout: float = DOWNLOAD_TIMEOUT_S) -> str:
    """Streams ``url`` into ``target``; returns its SHA-256. A short body is an error."""
    context = ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle else None)
    request = urllib.request.Request(url, headers={"User-Agent": "maml-models"})
    digest, done = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response, \
                open(target, "wb") as writer:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            while True:
                block = response.read(_CHUNK)
                if not block:
                    break
                digest.update(block)
                writer.write(block)
                done += len(block)
                fraction = 0.9 * done / total if total else 0.0
                progress("download", min(fraction, 0.9), f"{done / 1e6:.1f}"
                         + (f" of {total / 1e6:.1f} MB" if total else " MB"))
    except urllib.error.HTTPError as error:
        raise InputError(f"model address {url}: the server answered {error.code} {error.reason}; "
                         "nothing was installed") from None
    except urllib.error.URLError as error:
        if isinstance(error.reason, ssl.SSLCertVerificationError):
            raise InputError(f"model address {url}: the server's certificate cannot be verified "
                             f"({error.reason.verify_message}); if your network uses its own "
                             "certificate authority, give it with --ca-bundle. Nothing was installed") from None
        raise InputError(f"model address {url} cannot be reached ({_reason(error.reason)}); "
                         "nothing was installed") from None
    except (OSError, ValueError, http.client.HTTPException) as error:
        raise InputError(f"model download from {url} was interrupted after {done / 1e6:.1f} MB "
                         f"({_reason(error)}); nothing was installed") from None
    if total is not None and done != total:
        raise InputError(f"model download from {url} was interrupted after {done} of {total} bytes; "
                         "nothing was installed")
    return digest.hexdigest()


def _reason(error: Any) -> str:
    text = str(error) if str(error) else type(error).__name__
    return text.splitlines()[0]
