"""The run-directory lock (picollm.runlock): one training per directory, stale locks never in the way, and
two real trainings into one directory (one refused, the other's results intact)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import run_config, wait_for_train_rows

from picollm import runlock
from picollm.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_a_second_holder_is_refused_with_the_first_ones_details(tmp_path):
    out = tmp_path / "run"
    with runlock.hold(out) as lock:
        lock.announce()
        with pytest.raises(runlock.RunInUse) as refused, runlock.hold(out):
            pass
    message = str(refused.value)
    assert str(out) in message and f"pid {os.getpid()}" in message and "since 20" in message
    assert "another directory" in message
    # released: the next holder gets it, and an ended holder leaves nothing to quote
    with runlock.hold(out):
        pass
    assert (out / "train.lock").read_text() == ""


def test_a_holder_that_has_not_announced_itself_is_still_a_holder(tmp_path):
    with runlock.hold(tmp_path) as lock, pytest.raises(runlock.RunInUse, match="not yet said which"), \
            runlock.hold(tmp_path):
        assert not lock.announced


def test_only_rank_zero_locks(tmp_path):
    with runlock.hold(tmp_path / "run", rank=0), runlock.hold(tmp_path / "run", rank=1) as other:
        assert other.fd is None


HOLD_THEN_WAIT = """
import sys, time
from picollm import runlock
with runlock.hold(sys.argv[1]) as lock:
    lock.announce()
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_lock_left_by_a_killed_process_is_stale_and_free(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD_THEN_WAIT, str(out)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(runlock.RunInUse, match=f"pid {proc.pid} "):
            with runlock.hold(out):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads((out / "train.lock").read_text())["pid"] == proc.pid  # its details stay, unlocked
    with runlock.hold(out) as lock:
        lock.announce()
        assert json.loads((out / "train.lock").read_text())["pid"] == os.getpid()


def test_a_read_only_or_occupied_run_directory_is_named_before_anything(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(runlock.UserError, match="is a file, not a directory"), runlock.hold(tmp_path / "file"):
        pass


@pytest.mark.slow
def test_two_trainings_into_one_directory_one_is_refused_the_other_finishes_intact(tmp_path, data_section, capsys):
    """The first trains (long enough to be caught at it), the same command and one with --fresh are refused
    while it does; then it is stopped with SIGTERM and its log and checkpoints are those of one run alone."""
    out = tmp_path / "run"
    config = run_config(data_section, out, max_steps=100_000, eval_interval=10, keep_last=100)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(config))
    first = subprocess.Popen([sys.executable, "-m", "picollm", "train", "--config", str(config_file), "--no-progress"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    try:
        wait_for_train_rows(first, out, rows=2)
        for extra in ([], ["--fresh"]):
            assert first.poll() is None, first.stderr.read()
            capsys.readouterr()
            code = main(["train", "--config", str(config_file), "--no-progress", *extra])
            err = capsys.readouterr().err
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
            assert lines[0].startswith("picollm train: error: ") and str(out) in lines[0], lines[0]
            assert f"pid {first.pid} " in lines[0] and "picollm train --config" in lines[0], lines[0]
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2
    assert [r["step"] for r in rows if r["kind"] == "eval"] == list(range(10, len(steps) + 1, 10))
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == [f"step-{s:08d}" for s in range(2, len(steps) + 1, 2)] + \
        ([f"step-{len(steps):08d}"] if len(steps) % 2 else [])
    assert not (out / "history.jsonl").exists()  # the refused --fresh deleted and recorded nothing
    assert (out / "train.lock").read_text() == ""  # released
