"""Run configuration (picollm.config, picollm.schema): defaults, one clear error per mistake, precedence."""

from __future__ import annotations

import pytest

from picollm.cli import main
from picollm.config import RunConfig, load_run_config
from picollm.errors import UserError


def test_defaults_are_the_study_recipe():
    t = RunConfig().train
    assert (t.optimizer, t.lr, t.schedule, t.warmup_ratio, t.batch_size, t.epochs, t.dtype) == \
        ("adamw", 3e-4, "cosine", 0.1, 64, 5.0, "auto")


@pytest.mark.parametrize("overrides, message", [
    ({"train.lrr": 1.0}, "unknown config key train.lrr; allowed in 'train':"),
    ({"train.lr": "fast"}, "config key 'train.lr': give a number or auto, got 'fast'"),
    ({"train.lr_grid": [1e-3]}, "config key 'train.lr_grid': give two or more different positive rates"),
    ({"train.full_val_at": [0.5, 1.0]}, "config key 'train.full_val_at': give fractions of the run strictly"),
    ({"train.lr": -1.0}, "config key 'train.lr': must be positive"),
    ({"train.batch_size": 2.5}, "config key 'train.batch_size': expected an integer"),
    ({"train.schedule": "step"}, "config key 'train.schedule': use cosine, linear or constant"),
    ({"data.split": [0.5, 0.2, 0.2]}, "ratios must sum to 1"),
    ({"model.family": "rnn"}, "unknown model family 'rnn'"),
    ({"model.d_model": 0}, "model.d_model"),
    ({"model.no_such_field": 1}, "unknown config key model.no_such_field"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(UserError, match=None) as err:
        load_run_config(overrides={"model.family": "transformer", **overrides})
    assert message in str(err.value)


def test_cli_config_error_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2]\n")
    code = main(["train", "--config", str(bad), "--preset", "transformer-pico", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "train.lr" in err
    assert not (tmp_path / "r").exists()  # nothing was started
    assert main(["train", "--preset", "transformer-pico", "--train.nope", "1"]) == 2
    assert "unknown config key train.nope" in capsys.readouterr().err
    assert main(["train", "--preset", "lstm-huge"]) == 2
    assert "no preset 'huge'" in capsys.readouterr().err


def test_dotted_overrides_and_preset_precedence(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model:\n  n_layers: 3\ntrain:\n  lr: 0.01\n  batch_size: 8\n")
    cfg = load_run_config(cfg_file, {"train.lr": 1e-3, "model.d_model": 48}, preset="transformer-pico")
    assert cfg.train.lr == 1e-3 and cfg.train.batch_size == 8
    assert cfg.model["family"] == "transformer" and cfg.model["n_layers"] == 3 and cfg.model["d_model"] == 48
