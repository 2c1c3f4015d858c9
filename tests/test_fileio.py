"""Directory replacement (picollm.fileio.write_dir_atomic): a replacement a kill interrupted, which left
only the moved-aside `.NAME.old`, is finished by the next writer; readers of a run find the model there."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from picollm import rundir
from picollm.fileio import finish_replacement, moved_aside, write_dir_atomic


def _directory(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "weights.txt").write_text(text)
    return path


def test_a_lone_moved_aside_directory_is_put_back(tmp_path):
    target = tmp_path / "best"
    _directory(moved_aside(target), "old")  # killed between the two renames of a replacement
    assert moved_aside(target).name == ".best.old"
    finish_replacement(target)
    assert (target / "weights.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_a_moved_aside_directory_beside_its_replacement_is_deleted(tmp_path):
    target = _directory(tmp_path / "best", "new")  # killed after the second rename, before the clean-up
    _directory(moved_aside(target), "old")
    finish_replacement(target)
    assert (target / "weights.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_the_next_write_restores_the_old_directory_before_it_starts(tmp_path):
    target = tmp_path / "final"
    _directory(moved_aside(target), "old")

    def fail(tmp: Path) -> None:
        (tmp / "weights.txt").write_text("half")
        raise RuntimeError("killed while filling")

    with pytest.raises(RuntimeError, match="killed while filling"):
        write_dir_atomic(target, fail)
    assert (target / "weights.txt").read_text() == "old"  # the failed write replaced nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    write_dir_atomic(target, lambda tmp: (tmp / "weights.txt").write_text("new"))
    assert (target / "weights.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_a_failed_second_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    target = _directory(tmp_path / "best", "old")
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(Path(src).name)
        if len(calls) == 2:  # the new directory into place
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        write_dir_atomic(target, lambda tmp: (tmp / "weights.txt").write_text("new"))
    assert calls[0] == "best" and calls[1].startswith(".best.") and calls[1].endswith(".tmp")
    assert (target / "weights.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_a_run_reads_its_moved_aside_best_and_its_next_training_puts_it_back(tmp_path, reference_run):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    shutil.rmtree(run / rundir.FINAL)
    os.replace(run / rundir.BEST, moved_aside(run / rundir.BEST))  # a kill while best/ was being replaced
    config = (moved_aside(run / rundir.BEST) / rundir.MODEL_CONFIG).read_text()

    assert rundir.model_dir(run) == run / ".best.old"  # read where it is, never a periodic checkpoint instead
    assert rundir.find_run_dir(run / ".best.old") == run
    assert not (run / rundir.BEST).exists()  # reading moved nothing

    rundir.remove_partial_writes(run)  # what a training of the run does first, holding its lock
    assert (run / rundir.BEST / rundir.MODEL_CONFIG).read_text() == config
    assert not moved_aside(run / rundir.BEST).exists()
    assert rundir.model_dir(run) == run / rundir.BEST
