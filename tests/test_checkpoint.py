"""Checkpoint config.json (picollm.checkpoint): its own checksum since format 2, format 1 still loads."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import assert_same_weights

from picollm.checkpoint import FORMAT_VERSION, config_checksum, load, load_model
from picollm.errors import UserError


def test_config_json_carries_the_checksum_of_its_own_content(reference_run):
    config = json.loads((reference_run / "final" / "config.json").read_text())
    assert config["picollm_format"] == FORMAT_VERSION == 2
    assert config["config_sha256"] == config_checksum(config)
    assert config_checksum({**config, "model": {**config["model"], "n_heads": 1}}) != config["config_sha256"]


def test_an_edited_head_count_is_refused_and_a_format_1_checkpoint_loads(tmp_path, reference_run):
    directory = tmp_path / "final"
    shutil.copytree(reference_run / "final", directory)
    original = json.loads((directory / "config.json").read_text())
    edited = {**original, "model": {**original["model"], "n_heads": 1}}  # 32 wide: 1 head divides it too
    (directory / "config.json").write_text(json.dumps(edited, indent=2))
    with pytest.raises(UserError, match="config.json was changed after it was written"):
        load_model(directory)
    # format 1, as picollm wrote it before the checksum: it loads as it did then
    old = {k: v for k, v in original.items() if k != "config_sha256"}
    old["picollm_format"] = 1
    (directory / "config.json").write_text(json.dumps(old, indent=2))
    assert_same_weights(load_model(directory).state_dict(), load_model(reference_run / "final").state_dict(),
                        "a format-1 checkpoint")


def test_loading_onto_a_device_that_does_not_exist_names_the_allowed_ones(reference_run):
    with pytest.raises(UserError, match="unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps"):
        load(reference_run, device="tpu")
