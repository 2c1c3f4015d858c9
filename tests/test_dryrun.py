"""The dry run's schedule simulation: the runner's order (longest path first, runs wait for their sweep)."""

from __future__ import annotations

from picollm.study.dryrun import duration, simulate


def _row(kind: str, key: str, seconds: float, sweep: str | None = None, finished: bool = False) -> dict:
    return {"kind": kind, "key": key, "est_seconds": seconds, "sweep": sweep, "finished": finished}


def test_sweeps_first_then_their_runs_then_the_rest():
    rows = [_row("sweep", "a@1", 10, "a"), _row("sweep", "a@2", 10, "a"),
            _row("run", "a0", 100, "a"), _row("run", "a1", 100, "a"), _row("run", "b", 50)]
    # 2 at a time: a's sweep runs (priority 10 + 100) before b (50); a0 and a1 at 10 s; b at 110 s
    assert simulate(rows, 2) == 160
    assert simulate(rows, 1) == 270  # one at a time: everything in a row
    # finished jobs cost nothing; a run whose sweep is done is ready at once
    done = [{**r, "finished": r["kind"] == "sweep"} for r in rows]
    assert simulate(done, 2) == 150  # a0 and a1 at 0 (the longest first), b at 100


def test_durations_read_like_the_progress_lines():
    assert (duration(42), duration(125), duration(3725)) == ("42s", "2m05s", "1h02m")
