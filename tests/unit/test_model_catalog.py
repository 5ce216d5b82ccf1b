"""The model catalog: local model directories and the HF hub cache found from the file system only."""
from __future__ import annotations

import json

import pytest

from explorer.core import model_catalog
from explorer.core.model_catalog import describe_dir, hf_cache_dir, local_models, scan_folder, scan_hf_cache
from tiny_models import make_tiny_model

VOCAB = 64


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two tiny saved models (llama, gpt2) and an unsupported config, in a folder of models and
    in a fake HF hub cache (``models--org--name/snapshots/<rev>``, refs/main naming one)."""
    root = tmp_path_factory.mktemp("catalog")
    models = root / "models"
    make_tiny_model("llama", VOCAB).save_pretrained(models / "tiny-llama")
    make_tiny_model("gpt2", VOCAB).save_pretrained(models / "tiny-gpt2")
    (models / "not-a-model").mkdir()
    (models / "not-a-model" / "notes.txt").write_text("no config here")
    hub = root / "hub"
    repo = hub / "models--acme--tiny-llama"
    make_tiny_model("llama", VOCAB).save_pretrained(repo / "snapshots" / "abc123")
    (repo / "snapshots" / "old999").mkdir(parents=True)
    (repo / "snapshots" / "old999" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    bert = hub / "models--acme--tiny-bert" / "snapshots" / "def456"
    bert.mkdir(parents=True)
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    broken = hub / "models--acme--broken" / "snapshots" / "0000"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{not json")
    (hub / "models--acme--empty" / "snapshots").mkdir(parents=True)  # a download that never finished
    (hub / "datasets--acme--data" / "snapshots" / "1").mkdir(parents=True)  # not a model
    return models, hub


def test_a_folder_of_models_lists_each_model_directory(saved):
    models, _ = saved
    found = scan_folder(models)
    assert [(c.name, c.family, c.source) for c in found] == [("tiny-gpt2", "gpt2", "folder"),
                                                             ("tiny-llama", "llama", "folder")]
    assert all(c.supported and c.note == "" for c in found)
    assert scan_folder(models / "tiny-llama")[0].path == str(models / "tiny-llama")  # a model dir itself
    assert scan_folder(models / "missing") == []


def test_hf_cache_models_are_named_org_name_at_refs_main(saved):
    _, hub = saved
    found = {c.name: c for c in scan_hf_cache(hub)}
    assert set(found) == {"acme/tiny-llama", "acme/tiny-bert", "acme/broken"}
    llama = found["acme/tiny-llama"]
    assert llama.path.endswith("abc123") and llama.family == "llama" and llama.source == "hf-cache"


def test_unsupported_and_unreadable_configs_are_flagged_not_hidden(saved):
    _, hub = saved
    found = {c.name: c for c in scan_hf_cache(hub)}
    bert, broken = found["acme/tiny-bert"], found["acme/broken"]
    assert not bert.supported and bert.model_type == "bert" and "no adapter for model type 'bert'" in bert.note
    assert not broken.supported and "config.json unreadable" in broken.note
    assert broken.to_dict()["supported"] is False


def test_local_models_merges_sources_without_duplicates(saved):
    models, hub = saved
    found = local_models([models, models / "tiny-llama"], hf_cache=hub, include_project_cache=False)
    names = [c.name for c in found]
    assert names == ["tiny-gpt2", "tiny-llama", "acme/broken", "acme/tiny-bert", "acme/tiny-llama"]


def test_the_project_cache_is_listed(saved, tmp_path, monkeypatch):
    models, _ = saved
    monkeypatch.setattr("explorer.core.defaults.default_model_dir", lambda: models / "SmolLM2-135M-Instruct")
    found = local_models(hf_cache=tmp_path / "no-hub")
    assert {c.name: c.source for c in found} == {"tiny-gpt2": "project", "tiny-llama": "project"}


def test_hf_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hf_cache_dir() == tmp_path / "hub"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hf_cache_dir() == tmp_path / "hf" / "hub"


def test_scanning_never_touches_the_network(saved, monkeypatch):
    """Only config.json is read: no socket is opened, transformers and the hub client are not used."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("the catalog opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    models, hub = saved
    assert len(local_models([models], hf_cache=hub, include_project_cache=False)) == 5
    assert "transformers" not in model_catalog.__dict__ and "huggingface_hub" not in model_catalog.__dict__


def test_describe_dir_without_config_is_none(tmp_path):
    assert describe_dir(tmp_path) is None


def test_the_cli_lists_what_the_picker_offers(saved, tmp_path, monkeypatch, capsys):
    from cli.main import main

    models, hub = saved
    monkeypatch.setenv("EXPLORER_CACHE", str(tmp_path / "no-project-cache"))
    assert main(["models", "--json", "--dir", str(models), "--hf-cache", str(hub)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["hf_cache"] == str(hub)
    assert [m["name"] for m in data["models"]] == [c.name for c in local_models([models], hf_cache=hub)]
    bert = next(m for m in data["models"] if m["name"] == "acme/tiny-bert")
    assert bert["supported"] is False and bert["model_type"] == "bert"
    assert main(["models", "--dir", str(models), "--hf-cache", str(hub)]) == 0
    assert "unsupported: no adapter for model type 'bert'" in capsys.readouterr().out
    assert main(["models", "--dir", str(tmp_path / "missing")]) == 2
    assert "folder of models not found" in capsys.readouterr().err
