import json

import pytest
import torch

from engine_helpers import tiny_config
from maml.cli import main
from maml.errors import ModelError
from maml.model import FORMAT_VERSION, load_model, read_checkpoint, save_checkpoint
from maml.network import MAMLNet


@pytest.fixture()
def checkpoint(tmp_path):
    config = tiny_config()
    net = MAMLNet(config).eval()
    path = save_checkpoint(tmp_path / "model.pt", net, config, {"epochs": 3, "data": "unit test"})
    return path, net, config


def test_round_trip_gives_identical_predictions(checkpoint):
    path, net, config = checkpoint
    loaded = load_model(path)
    x = torch.randn(1, 2, 8, 16, 16)
    assert torch.equal(loaded.network.predict(x)[0], net.predict(x)[0])
    assert loaded.config.to_dict() == config.to_dict()
    assert loaded.metadata == {"epochs": 3, "data": "unit test"}
    assert len(loaded.sha256) == 64


def test_checkpoint_loads_with_weights_only(checkpoint):
    payload = torch.load(checkpoint[0], weights_only=True)
    # One network, default inference: written as version 1, which earlier versions still read.
    assert payload["format_version"] == 1 <= FORMAT_VERSION
    assert "inference" not in payload["config"] and "ensemble_size" not in payload


def test_save_is_atomic_and_leaves_no_temporary_files(checkpoint):
    path = checkpoint[0]
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.json", "model.pt"]  # checkpoint + card


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nope.pt")


def test_truncated_file_names_the_file(checkpoint, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(checkpoint[0].read_bytes()[:1000])
    with pytest.raises(ModelError, match="broken.pt"):
        load_model(broken)


def test_foreign_file_is_refused(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ModelError, match="not a MAML checkpoint"):
        load_model(other)


def test_future_format_version_is_refused(checkpoint, tmp_path):
    payload = read_checkpoint(checkpoint[0])
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(ModelError, match="format version"):
        load_model(tmp_path / "future.pt")


def test_weights_that_do_not_match_the_configuration(checkpoint, tmp_path):
    payload = read_checkpoint(checkpoint[0])
    payload["config"]["network"]["base_features"] = 8
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(ModelError, match="do not match"):
        load_model(tmp_path / "mismatch.pt")


def test_malformed_configuration(checkpoint, tmp_path):
    payload = read_checkpoint(checkpoint[0])
    payload["config"]["normalization"] = {"venous": "ct"}
    torch.save(payload, tmp_path / "badconfig.pt")
    with pytest.raises(ModelError, match="normalization"):
        load_model(tmp_path / "badconfig.pt")


def test_info_command_prints_configuration(checkpoint, capsys):
    assert main(["info", str(checkpoint[0]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["phases"] == ["arterial", "venous"]
    assert [l["name"] for l in info["labels"]] == ["background", "class1", "class2"]
    assert info["metadata"]["epochs"] == 3
    assert main(["info", str(checkpoint[0])]) == 0
    text = capsys.readouterr().out
    assert "arterial, venous" in text
    assert "post-processing: none" in text and "normalisation:" in text
    assert all(": " in line for line in text.splitlines())


def test_info_command_on_missing_model_exits_non_zero(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.pt")]) == 1
    assert "missing.pt" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("maml ")


def test_a_lazy_load_reads_the_cached_description_and_loads_the_network_on_use(tmp_path, monkeypatch):
    import numpy as np

    from maml.model import description_file

    monkeypatch.setenv("MAML_CACHE", str(tmp_path / "cache"))
    config = tiny_config()
    net = MAMLNet(config).eval()
    statistics = {"mean": torch.arange(4, dtype=torch.float64) / 3, "precision": torch.eye(4) * 0.1}
    metadata = {"epochs": 3, "feature_statistics": {"venous": statistics}}  # tensors, as a fingerprint's
    path = save_checkpoint(tmp_path / "model.pt", net, config, metadata)

    first = load_model(path, lazy=True)  # reads the checkpoint, describes it for the next time
    assert first.network_loaded and description_file(first.sha256).is_file()
    second = load_model(path, lazy=True)
    assert not second.network_loaded
    assert second.config.to_dict() == first.config.to_dict() and second.sha256 == first.sha256
    cached = second.metadata["feature_statistics"]["venous"]
    for key in ("mean", "precision"):
        np.testing.assert_array_equal(cached[key], statistics[key].numpy())
        assert cached[key].dtype == statistics[key].numpy().dtype
    assert second.metadata["epochs"] == 3 and second.network_class == "MAMLNet"
    x = torch.randn(1, 2, 8, 16, 16)
    assert torch.equal(second.network.predict(x)[0], net.predict(x)[0])  # loaded now
    assert second.network_loaded


def test_a_damaged_or_stale_description_is_never_trusted(tmp_path, monkeypatch):
    from maml.model import description_file

    monkeypatch.setenv("MAML_CACHE", str(tmp_path / "cache"))
    config = tiny_config()
    path = save_checkpoint(tmp_path / "model.pt", MAMLNet(config).eval(), config, {"epochs": 3})
    digest = load_model(path, lazy=True).sha256
    entry = description_file(digest)
    entry.write_text(entry.read_text().replace('"epochs": 3', '"epochs": 4'))  # still valid JSON
    reloaded = load_model(path, lazy=True)
    assert reloaded.network_loaded and reloaded.metadata["epochs"] == 3  # read from the checkpoint
    assert load_model(path, lazy=True).metadata["epochs"] == 3  # and the entry written again
    entry.write_text('{"format": 1, "sha2')
    assert load_model(path, lazy=True).network_loaded

    # The checkpoint replaced by another: another sha256, another description.
    save_checkpoint(path, MAMLNet(config).eval(), config, {"epochs": 5})
    changed = load_model(path, lazy=True)
    assert changed.sha256 != digest and changed.metadata["epochs"] == 5


def test_a_checkpoint_replaced_before_its_network_is_loaded_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MAML_CACHE", str(tmp_path / "cache"))
    config = tiny_config()
    path = save_checkpoint(tmp_path / "model.pt", MAMLNet(config).eval(), config, {"epochs": 3})
    load_model(path, lazy=True)
    described = load_model(path, lazy=True)
    save_checkpoint(path, MAMLNet(config).eval(), config, {"epochs": 5})
    with pytest.raises(ModelError, match="changed while it was in use"):
        described.network
