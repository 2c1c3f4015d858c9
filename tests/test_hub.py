"""The Hugging Face hub (picollm.hub): loading from an offline cache, and only safetensors and JSON from it.

Every test runs offline: `hub_cache` (conftest.py) fills a local Hugging Face cache.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import assert_same_weights, pickle_trap

import picollm
from picollm.checkpoint import config_checksum
from picollm.errors import UserError
from picollm.hub import is_repo_id


def test_load_from_a_prepopulated_hub_cache_offline(reference_run, hub_cache):
    hub_cache("someone/pico-lm", {f.name: f.read_bytes() for f in (reference_run / "final").iterdir()})
    model = picollm.load("someone/pico-lm")
    assert model.tokenizer.name == "bpe:512"
    reference = picollm.load(str(reference_run))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[name])
    with pytest.raises(UserError, match="no cached copy"):
        picollm.load("someone/missing-model")


def test_hub_snapshot_with_code_or_pickles_loads_only_safetensors_and_json(tmp_path, reference_run, hub_cache):
    markers = tmp_path / "markers"
    markers.mkdir()
    files = {f.name: f.read_bytes() for f in (reference_run / "final").iterdir()}
    config = json.loads(files["config.json"])
    config.update(auto_map={"AutoModel": "modeling_evil.EvilModel"}, trust_remote_code=True)
    config["config_sha256"] = config_checksum(config)  # an uploader can seal what it edits: no authenticity
    files["config.json"] = json.dumps(config).encode()
    evil = {
        "modeling_evil.py": f"open({str(markers / 'py')!r}, 'w').close()\n".encode(),
        "__init__.py": f"open({str(markers / 'init')!r}, 'w').close()\n".encode(),
        "pytorch_model.bin": pickle_trap(markers / "bin"),
        "model.pt": pickle_trap(markers / "pt"),
        "training_args.bin": pickle_trap(markers / "args"),
        "optimizer.pt": pickle_trap(markers / "opt"),
    }
    hub_cache("someone/evil", {**files, **evil})
    hub_cache("someone/pickle-only", {"config.json": files["config.json"], **evil})
    model = picollm.load("someone/evil")
    reference_model = picollm.load(str(reference_run))
    assert_same_weights(model.state_dict(), reference_model.state_dict(), "hub copy")
    assert model.generate("Once", max_new_tokens=3)
    with pytest.raises(UserError, match="model.safetensors is missing"):
        picollm.load("someone/pickle-only")
    assert not list(markers.iterdir()), "a file of the snapshot was executed or unpickled"
    assert "modeling_evil" not in sys.modules


def test_hub_download_fetches_only_config_safetensors_and_tokenizer_json(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    from picollm import hub

    asked = {}

    def fake_snapshot_download(repo_id, **kwargs):
        asked.update(kwargs, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert hub.download("someone/model") == tmp_path
    assert asked["repo_id"] == "someone/model"
    assert "trust_remote_code" not in asked
    repo_files = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
                  "modeling_evil.py", "pytorch_model.bin", "model.pt", "model.ckpt", "optimizer.pt", "x.pkl",
                  "training_args.bin", "sub/config.json", "sub/model.safetensors", "tokenizer.py", "setup.py",
                  ".gitattributes", "model.safetensors.index.json", "evil.json.py"]
    fetched = set(filter_repo_objects(repo_files, allow_patterns=asked["allow_patterns"],
                                      ignore_patterns=asked.get("ignore_patterns")))
    assert fetched == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"}


def test_a_repo_id_is_user_slash_name_and_not_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_repo_id("someone/pico-lm")
    assert not any(is_repo_id(text) for text in ("pico-lm", "a/b/c", "./a", "/abs/path", "~/runs", "../x"))
    (tmp_path / "runs" / "pico").mkdir(parents=True)
    assert not is_repo_id("runs/pico")  # a directory here wins over a repo of that name
