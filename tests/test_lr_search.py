"""lr auto: the choice rule on made-up losses, the sweep runs' recipe, and `picollm train --train.lr auto`."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import yaml

from picollm.cli import main
from picollm.config import load_run_config
from picollm.training import faults, lr_search
from picollm.training.lr_search import choose, decide, lengths

GRID = [1e-3, 3e-3, 1e-2, 3e-2]


def test_the_lowest_loss_is_chosen_and_a_tie_goes_to_the_lower_rate():
    c = choose({1e-3: 4.5, 3e-3: 4.2, 1e-2: 4.3, 3e-2: 4.9}, GRID)
    assert (c.chosen, c.next_lr, c.at_edge) == (3e-3, None, False)
    c = choose({1e-3: 4.5, 3e-3: 4.2, 1e-2: 4.2, 3e-2: 4.9}, GRID)
    assert c.chosen == 3e-3
    with pytest.raises(ValueError, match="no loss"):
        choose({1e-3: 4.5}, GRID)


def test_a_minimum_at_an_edge_asks_for_one_more_point_beyond_it():
    # lowest at the top: one grid step (3x) further
    c = choose({1e-3: 5.0, 3e-3: 4.8, 1e-2: 4.6, 3e-2: 4.4}, GRID)
    assert (c.chosen, c.next_lr, c.at_edge) == (3e-2, 0.09, True)
    # the extra point is worse: the edge rate is bracketed now, chosen, not at the edge any more
    c = choose({1e-3: 5.0, 3e-3: 4.8, 1e-2: 4.6, 3e-2: 4.4, 0.09: 4.7}, GRID)
    assert (c.chosen, c.next_lr, c.at_edge) == (3e-2, None, False)
    # the extra point is better still: chosen, marked "at grid edge", and no second extension
    c = choose({1e-3: 5.0, 3e-3: 4.8, 1e-2: 4.6, 3e-2: 4.4, 0.09: 4.3}, GRID)
    assert (c.chosen, c.next_lr, c.at_edge) == (0.09, None, True)
    # lowest at the bottom: one step down (1e-3 / 3, two significant digits)
    c = choose({1e-3: 4.1, 3e-3: 4.2, 1e-2: 4.6, 3e-2: 5.4}, GRID)
    assert (c.chosen, c.next_lr) == (1e-3, 0.00033)
    c = choose({1e-3: 4.1, 3e-3: 4.2, 1e-2: 4.6, 3e-2: 5.4, 0.00033: 4.0}, GRID)
    assert (c.chosen, c.next_lr, c.at_edge) == (0.00033, None, True)


def test_when_no_rate_trains_the_sweep_runs_again_twice_as_long():
    assert lengths(0.25) == [0.25, 0.5, 1.0] and lengths(0.3) == [0.3, 0.6, 1.0] and lengths(1.0) == [1.0]
    plateau = {1e-3: 6.20, 3e-3: 6.13, 1e-2: 5.90, 3e-2: 6.15}  # every run stuck near the unigram
    # nothing run yet: the grid at a quarter
    assert decide({}, GRID, 0.25, threshold=5.11).todo == [(lr, 0.25) for lr in GRID]
    # no rate trained (all above 5.11): the grid at half the steps; 1e-2's 5.90 is not chosen
    assert decide({0.25: plateau}, GRID, 0.25, threshold=5.11).todo == [(lr, 0.5) for lr in GRID]
    half = {1e-3: 5.51, 3e-3: 4.72, 1e-2: 4.70, 3e-2: 5.63}
    d = decide({0.25: plateau, 0.5: half}, GRID, 0.25, threshold=5.11)
    assert (d.todo, d.chosen, d.length, d.trained, d.at_edge) == ([], 1e-2, 0.5, True, False)
    # still nothing at half, nor at the whole run: the lowest is taken, marked untrained
    stuck = {lr: v + 0.01 for lr, v in plateau.items()}
    assert decide({0.25: plateau, 0.5: stuck}, GRID, 0.25, 5.11).todo == [(lr, 1.0) for lr in GRID]
    d = decide({0.25: plateau, 0.5: stuck, 1.0: stuck}, GRID, 0.25, 5.11)
    assert (d.chosen, d.length, d.trained) == (1e-2, 1.0, False)
    # a rate that trains at a quarter ends it there; an edge asks for its extra rate first
    d = decide({0.25: {1e-3: 5.0, 3e-3: 5.2, 1e-2: 5.4, 3e-2: 6.0}}, GRID, 0.25, 5.11)
    assert d.todo == [(0.00033, 0.25)]
    d = decide({0.25: {1e-3: 5.0, 3e-3: 5.2, 1e-2: 5.4, 3e-2: 6.0, 0.00033: 5.05}}, GRID, 0.25, 5.11)
    assert (d.chosen, d.length, d.at_edge) == (1e-3, 0.25, False)
    # without a threshold every run counts as trained
    assert decide({0.25: plateau}, GRID, 0.25, threshold=None).chosen == 1e-2


def test_a_diverged_rate_loses():
    c = choose({1e-3: 4.5, 3e-3: 4.4, 1e-2: math.inf, 3e-2: None}, GRID)  # type: ignore[dict-item]
    assert (c.chosen, c.next_lr) == (3e-3, None)


def test_sweep_runs_are_short_complete_runs_of_the_same_model():
    cfg = load_run_config(overrides={"model.family": "lstm", "model.context_length": 64, "train.lr": "auto",
                                     "train.batch_size": 16, "train.max_tokens": 409_600, "train.seed": 3,
                                     "train.lr_sweep_seed": 0, "train.lr_sweep_dir": "/tmp/sweeps/x",
                                     "train.full_val_at": [0.25, 0.5], "train.sample_tokens": 16,
                                     "out": "/tmp/runs/x"})
    total = lr_search.planned_steps(cfg, train_tokens=465_000)
    assert total == 400 and lr_search.sweep_steps(total, 0.25) == 100  # 400 steps of 16 x 64 tokens
    point = lr_search.point_config(cfg, 3e-3, 0.25, total)
    t = point.train
    assert (t.lr, t.max_steps, t.max_tokens, t.seed) == (3e-3, 100, None, 0)
    assert (t.eval_interval, t.ckpt_interval, t.sample_tokens, t.full_val_at, t.final_splits) == (0, 0, 0, [], ["val"])
    assert (t.schedule, t.warmup_ratio, t.batch_size) == (cfg.train.schedule, cfg.train.warmup_ratio, 16)
    assert point.model == cfg.model and point.out == "/tmp/sweeps/x/f0.25/lr-0.003"
    assert lr_search.point_config(cfg, 3e-3, 0.5, total).out == "/tmp/sweeps/x/f0.5/lr-0.003"
    # by epochs: the trainer's own count of windows and batches
    by_epochs = load_run_config(overrides={"model.family": "lstm", "model.context_length": 64, "train.batch_size": 16,
                                           "train.epochs": 2.0})
    windows = (465_000 - 1) // 64
    assert lr_search.planned_steps(by_epochs, 465_000) == 2 * -(-windows // 16)
    # the default sweep directory is inside the run's
    assert lr_search.sweep_dir(load_run_config(overrides={"out": "/r"})) == Path("/r/lr_sweep")


def test_a_fixed_rate_is_recorded_as_it_is():
    cfg = load_run_config(overrides={"train.lr": 5e-3})
    assert lr_search.summary_fields(cfg.train, 10.0) == {"lr": 5e-3}
    assert lr_search.timing_config(cfg) is cfg


@pytest.fixture(scope="module")
def data_args(tmp_path_factory, sample_path) -> list[str]:
    cache = tmp_path_factory.mktemp("cache")
    return ["--data", str(sample_path), "--data.num_stories", "200", "--data.split", "[0.8, 0.1, 0.1]",
            "--tokenizer", "bpe:300", f"--data.cache_dir={cache}", "--data.num_proc", "1"]


@pytest.mark.slow
def test_train_lr_auto_sweeps_prints_records_and_reuses(tmp_path, data_args, capsys):
    run = tmp_path / "run"
    common = ["train", "--preset", "transformer-pico", *data_args, "--model.context_length", "16",
              "--train.batch_size", "4", "--train.max_steps", "16", "--train.eval_interval", "8",
              "--train.threads", "1", "--no-progress", "--train.lr", "auto", "--train.lr_grid", "[0.003, 0.03]"]
    assert main([*common, "--out", str(run)]) == 0
    err = capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    sweep = summary["lr_sweep"]
    losses = dict((lr, loss) for lr, loss in sweep["losses"])  # at the length the rate was chosen at
    assert set(GRID[1::2]) <= set(losses) and len(losses) in (2, 3)  # + one point when an edge won
    best = min(losses, key=lambda lr: losses[lr])
    assert summary["lr"] == sweep["chosen"] == best
    assert f"chose lr {best:g}" in err
    assert sweep["fraction"] == 0.25 and sweep["steps"] == round(16 * sweep["length"])
    assert sweep["rounds"][0]["length"] == 0.25 and sweep["rounds"][0]["steps"] == 4
    # 16 steps of a 300-token vocabulary may not train: then the sweep ran again, twice as long
    assert sweep["trained"] or sweep["length"] == 1.0
    assert [r["length"] for r in sweep["rounds"]] == [0.25, 0.5, 1.0][:len(sweep["rounds"])]
    for lr, loss in losses.items():  # each sweep run: finished, its steps, scored on the full val split only
        point = json.loads((run / "lr_sweep" / f"f{sweep['length']:g}" / f"lr-{lr:g}" / "summary.json").read_text())
        assert point["steps"] == sweep["steps"] and point["val"]["nll"] == loss and "test" not in point
    # the run's wall time includes the sweep's
    assert summary["wall_time_s"] == pytest.approx(summary["train_wall_time_s"] + sweep["wall_time_s"])
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["lr"] == best and config["train"]["lr_found"]["losses"] == sweep["losses"]

    # another seed with the same sweep directory and sweep seed reuses every sweep run
    again = tmp_path / "seed1"
    shared = ["--train.lr_sweep_dir", str(run / "lr_sweep"), "--train.lr_sweep_seed", "0", "--train.seed", "1"]
    before = sorted(str(p) for p in (run / "lr_sweep").glob("*/*"))
    assert main([*common, "--out", str(again), *shared]) == 0
    err = capsys.readouterr().err
    assert err.count("tokens/s") == 1  # only the run itself trained
    assert sorted(str(p) for p in (run / "lr_sweep").glob("*/*")) == before
    assert json.loads((again / "summary.json").read_text())["lr"] == best


@pytest.mark.slow
def test_a_run_stopped_during_its_sweep_resumes_with_the_advice_it_prints(tmp_path, data_args, capsys, monkeypatch):
    """Ctrl-C in a sweep run: the advice printed is the run's own `--resume OUT` (config.yaml, lr auto, is
    written before the sweep), never the sweep run's directory, and following it finishes the whole run."""
    run = tmp_path / "run"
    fired = []

    def ctrl_c(point: str, step: int) -> None:  # a SIGINT in the first step of the first sweep run
        if point == "inside_step" and not fired:
            fired.append(step)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(faults, "reached", ctrl_c)
    argv = ["train", "--preset", "transformer-pico", *data_args, "--model.context_length", "16",
            "--train.batch_size", "4", "--train.max_steps", "6", "--train.eval_interval", "0",
            "--train.log_interval", "1", "--train.threads", "1", "--no-progress", "--train.lr", "auto",
            "--train.lr_grid", "[0.003, 0.03]", "--train.lr_sweep_fraction", "1.0", "--out", str(run)]
    capsys.readouterr()
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert fired == [0] and "interrupted by signal at step 1" in err
    advice = [line for line in err.splitlines() if "Resume with" in line or "--resume" in line]
    assert advice == [f"[picollm] {run}: the lr sweep was interrupted; Resume with: picollm train --resume {run}"], err
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == "auto"
    stopped = run / "lr_sweep" / "f1" / "lr-0.003"
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["step-00000001"]

    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 6 and summary["lr"] == summary["lr_sweep"]["chosen"]
    # the stopped sweep run continued from its step 1 (a fresh start would have deleted that checkpoint):
    # each of its 6 steps logged once
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["step-00000001", "step-00000006"]
    steps = [json.loads(r)["step"] for r in (stopped / "metrics.jsonl").read_text().splitlines()
             if json.loads(r)["kind"] == "train"]
    assert steps == list(range(1, 7))
