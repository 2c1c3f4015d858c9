"""Resuming under the recipe a run was trained with (picollm.training.recipe), `--allow-recipe-change` and the
run's history, `--from-step`, the advice for a damaged checkpoint, and the run directory's format version.

Runs are copies of `reference_run` (conftest.py): 12 steps, checkpoints kept at steps 10 and 12.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import assert_same_weights, final_weights, run_config
from safetensors.torch import load_file

from picollm import rundir
from picollm.cli import main
from picollm.config import RunConfig, from_dict
from picollm.errors import UserError
from picollm.training import recipe
from picollm.training.trainer import train


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def one_line_error(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def interrupted_copy(reference_run: Path, tmp_path: Path) -> Path:
    """reference_run as a kill after its step-12 checkpoint leaves it: no final/, no summary."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    (run / "summary.json").unlink()
    shutil.rmtree(run / "final")
    return run


def config(data_section: dict, out: Path, **train) -> RunConfig:
    return from_dict(RunConfig, run_config(data_section, out, **train))


# --- what the recipe is --------------------------------------------------------------------------


def test_the_recipe_is_what_is_trained_not_how(data_section, tmp_path):
    base = config(data_section, tmp_path)
    saved = from_dict(RunConfig, {**run_config(data_section, tmp_path),
                                  "model": {**base.model, "vocab_size": 512, "context_length": 32}})
    assert recipe.changes(saved, base) == []  # the tokenizer's vocab filled in, family defaults alike
    how = config(data_section, tmp_path, threads=2, device="cpu", dtype="fp32", eval_interval=3, ckpt_interval=5,
                 log_interval=7, wandb=True, keep_last=5, loss_chunk_tokens=0, compile=True)
    how.data.num_proc, how.data.cache_dir = 2, str(tmp_path / "elsewhere")
    assert recipe.changes(saved, how) == []
    what = config(data_section, tmp_path, lr=1e-3, batch_size=8, schedule="linear", max_steps=20)
    assert [str(c) for c in recipe.changes(saved, what)] == [
        "train.batch_size 4 -> 8", "train.lr 0.003 -> 0.001", "train.max_steps 12 -> 20",
        "train.schedule 'cosine' -> 'linear'"]
    # only the budget that wins counts: epochs do not matter while max_steps is set
    assert recipe.changes(saved, config(data_section, tmp_path, epochs=9.0)) == []
    budget = config(data_section, tmp_path, max_steps=None, max_tokens=5000)
    assert {c.key for c in recipe.changes(saved, budget)} == {"train.max_steps", "train.max_tokens"}
    other_data = config(data_section, tmp_path)
    other_data.data.num_stories = 200
    assert [c.key for c in recipe.changes(saved, other_data)] == ["data.num_stories"]


def test_a_changed_model_or_tokenizer_is_refused_even_when_changes_are_allowed(data_section, tmp_path):
    saved = config(data_section, tmp_path)
    wider = from_dict(RunConfig, {**run_config(data_section, tmp_path), "model": {**saved.model, "d_model": 64}})
    for new in (wider, config(data_section, tmp_path)):
        if new is not wider:
            new.data.tokenizer = "bpe:600"
        with pytest.raises(UserError, match="another model or tokenizer") as refused:
            recipe.check_resume(tmp_path, saved, new, allow=True)
        assert ("model.d_model 32 -> 64" if new is wider else "data.tokenizer 'bpe:512' -> 'bpe:600'") \
            in str(refused.value)


# --- resuming an interrupted run under another recipe -----------------------------------------------


def test_interrupted_run_resumed_with_another_lr_is_refused_then_allowed_and_recorded(tmp_path, reference_run,
                                                                                      data_section, capsys):
    run = interrupted_copy(reference_run, tmp_path)
    (run / "checkpoints" / "step-00000012").rename(tmp_path / "later")  # interrupted after step 10
    before = tree(run)
    for argv in (["train", "--resume", str(run), "--train.lr", "1e-3", "--no-progress"],
                 ["train", "--config", str(run / "config.yaml"), "--out", str(run), "--train.lr", "1e-3",
                  "--no-progress"]):
        line = one_line_error(*run_cli(capsys, *argv))
        assert "train.lr 0.003 -> 0.001" in line and "--allow-recipe-change" in line, line
        assert f"`picollm train --resume {run}`" in line
        assert tree(run) == before
    code, err = run_cli(capsys, "train", "--resume", str(run), "--train.lr", "1e-3", "--allow-recipe-change",
                        "--no-progress")
    assert code == 0, err
    history = rundir.read_history(run)
    assert [(h["event"], h["step"], h["changes"]) for h in history] == [
        ("recipe changed", 10, {"train.lr": [0.003, 0.001]})]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 0.001
    assert json.loads((run / "summary.json").read_text())["steps"] == 12
    # and now the run's recipe is the new one: resuming it again changes nothing and is not refused
    assert train(config(data_section, run, lr=1e-3), progress=False).summary["steps"] == 12
    assert len(rundir.read_history(run)) == 1


def tuned(run: Path, chosen: float = 0.003) -> None:
    """Make `run`'s config.yaml what `train.lr: auto` writes once its sweep chose `chosen`: that rate and
    `train.lr_found` recording the sweep (the reference run trained at 0.003)."""
    path = run / "config.yaml"
    data = yaml.safe_load(path.read_text())
    data["train"].update(lr=chosen, lr_grid=[0.001, 0.003], lr_found={
        "grid": [0.001, 0.003], "losses": [[0.001, 6.1], [0.003, 5.9]], "chosen": chosen, "at_edge": False,
        "wall_time_s": 2.0})
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_the_recipe_of_a_tuned_run_is_auto_until_its_rate_is_set_by_hand(data_section, tmp_path):
    found = {"chosen": 0.003, "grid": [0.001, 0.003]}
    saved = config(data_section, tmp_path, lr=0.003, lr_found=found)
    assert recipe.changes(saved, config(data_section, tmp_path, lr="auto")) == []
    assert recipe.changes(saved, config(data_section, tmp_path, lr=0.003, lr_found=found)) == []
    # the sweep's settings count while both sides are auto ...
    assert [str(c) for c in recipe.changes(saved, config(data_section, tmp_path, lr="auto", lr_grid=[0.01, 0.03]))] == [
        "train.lr_grid [0.001, 0.003, 0.01, 0.03] -> [0.01, 0.03]"]
    # ... and a rate set by hand is a number, whatever lr_found still records
    by_hand = config(data_section, tmp_path, lr=0.001, lr_found=found)
    assert [str(c) for c in recipe.changes(saved, by_hand)] == ["train.lr 'auto' -> 0.001"]
    assert recipe.changes(by_hand, config(data_section, tmp_path, lr=0.001)) == []


def test_a_tuned_run_resumed_with_another_lr_is_refused_then_allowed_and_recorded(tmp_path, reference_run, capsys):
    run = interrupted_copy(reference_run, tmp_path)
    (run / "checkpoints" / "step-00000012").rename(tmp_path / "later")  # interrupted after step 10
    tuned(run)
    before = tree(run)
    line = one_line_error(*run_cli(capsys, "train", "--resume", str(run), "--train.lr", "1e-3", "--no-progress"))
    assert "train.lr 'auto' -> 0.001" in line and "--allow-recipe-change" in line, line
    assert tree(run) == before
    code, err = run_cli(capsys, "train", "--resume", str(run), "--train.lr", "1e-3", "--allow-recipe-change",
                        "--no-progress")
    assert code == 0, err
    assert [(h["event"], h["step"], h["changes"]) for h in rundir.read_history(run)] == [
        ("recipe changed", 10, {"train.lr": ["auto", 0.001]})]
    # the run's rate is the one set by hand; lr_found stays, the record of the sweep that chose 0.003
    train_cfg = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert train_cfg["lr"] == 0.001 and train_cfg["lr_found"]["chosen"] == 0.003
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["lr"], summary["lr_sweep"]["chosen"], summary["steps"]) == (0.001, 0.003, 12)
    # resumed again as it now is: the same recipe, nothing refused or recorded
    code, err = run_cli(capsys, "train", "--resume", str(run), "--no-progress")
    assert code == 0 and len(rundir.read_history(run)) == 1, err


def test_a_finished_run_is_returned_as_it_is_only_under_its_own_recipe(tmp_path, reference_run, data_section):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    before = tree(run)
    assert train(config(data_section, run), progress=False).summary["status"] == "finished"
    with pytest.raises(UserError, match=r"finished under another recipe \(train.max_steps 12 -> 14\)"):
        train(config(data_section, run, max_steps=14), progress=False)
    assert tree(run) == before
    # allowed: it trains on to step 14; the finished run's final/ and summary are moved aside, not deleted
    result = train(config(data_section, run, max_steps=14), progress=False, allow_recipe_change=True)
    assert result.summary["steps"] == 14
    events = [h["event"] for h in rundir.read_history(run)]
    assert events == ["recipe changed", "continued from an earlier step"]
    moved = run / rundir.read_history(run)[1]["to"]
    assert json.loads((moved / "summary.json").read_text())["steps"] == 12
    assert_same_weights(load_file(str(moved / "final" / "model.safetensors")), final_weights(reference_run),
                        "the finished run's final/, moved aside")


# --- --from-step and a damaged checkpoint ------------------------------------------------------------


def test_from_step_continues_from_an_earlier_checkpoint_and_moves_the_rest_aside(tmp_path, reference_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    code, err = run_cli(capsys, "train", "--resume", str(run), "--from-step", "9", "--no-progress")
    line = one_line_error(code, err)
    assert "no checkpoint at step 9 (--from-step): its checkpoints are at steps 10, 12" in line, line
    code, err = run_cli(capsys, "train", "--resume", str(run), "--from-step", "10", "--no-progress")
    assert code == 0, err
    # the same weights as the uninterrupted run: steps 11 and 12 were trained again from the same state
    assert_same_weights(final_weights(run), final_weights(reference_run), "continued from step 10")
    event = rundir.read_history(run)[-1]
    assert event["event"] == "continued from an earlier step" and event["step"] == 10
    aside = run / event["to"]
    assert aside.parent == run / "discarded"
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step-00000012"]
    assert (aside / "final" / "model.safetensors").read_bytes() == \
        (reference_run / "final" / "model.safetensors").read_bytes()
    assert [json.loads(r)["step"] for r in (aside / "metrics.jsonl").read_text().splitlines()] == [11, 12, 12]
    steps = [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(r)["kind"] == "train"]
    assert steps == list(range(1, 13))


def test_a_damaged_latest_checkpoint_names_a_command_that_continues_from_the_one_before(tmp_path, reference_run,
                                                                                        capsys):
    run = interrupted_copy(reference_run, tmp_path)
    state = run / "checkpoints" / "step-00000012" / "optimizer.safetensors"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    before = tree(run)
    line = one_line_error(*run_cli(capsys, "train", "--resume", str(run), "--no-progress"))
    assert "optimizer.safetensors" in line and "step 10" in line, line
    assert tree(run) == before
    command = re.search(r"`(picollm train [^`]*)`", line).group(1)
    assert command == f"picollm train --resume {run} --from-step 10"
    code, err = run_cli(capsys, *shlex.split(command)[1:], "--no-progress")
    assert code == 0, err
    assert_same_weights(final_weights(run), final_weights(reference_run), "continued from step 10")
    aside = run / rundir.read_history(run)[-1]["to"]
    assert (aside / "checkpoints" / "step-00000012" / "optimizer.safetensors").read_bytes() == bytes(data)


def test_only_checkpoint_damaged_says_start_over(tmp_path, reference_run, capsys):
    run = interrupted_copy(reference_run, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step-00000010")
    (run / "checkpoints" / "step-00000012" / "trainer_state.json").write_text("{}")
    line = one_line_error(*run_cli(capsys, "train", "--resume", str(run), "--no-progress"))
    assert f"`picollm train --resume {run} --fresh`" in line, line


# --- the run directory's format ------------------------------------------------------------------


def test_a_run_directory_of_format_1_is_upgraded_silently_and_a_newer_one_refused(tmp_path, reference_run, capsys):
    run = interrupted_copy(reference_run, tmp_path)
    # format 1: no lock file, no history, environment.json without the format key
    (run / "train.lock").unlink()
    environment = json.loads((run / "environment.json").read_text())
    del environment["picollm_run_format"]
    (run / "environment.json").write_text(json.dumps(environment))
    code, err = run_cli(capsys, "train", "--resume", str(run), "--no-progress")
    assert code == 0, err
    assert json.loads((run / "environment.json").read_text())["picollm_run_format"] == rundir.FORMAT_VERSION
    assert_same_weights(final_weights(run), final_weights(reference_run), "an old run directory resumed")
    environment = json.loads((run / "environment.json").read_text())
    environment["picollm_run_format"] = rundir.FORMAT_VERSION + 1
    (run / "environment.json").write_text(json.dumps(environment))
    (run / "summary.json").unlink()
    before = tree(run)
    line = one_line_error(*run_cli(capsys, "train", "--resume", str(run), "--no-progress"))
    assert f"format {rundir.FORMAT_VERSION + 1}" in line and "newer picollm" in line and "environment.json" in line
    assert tree(run) == before
