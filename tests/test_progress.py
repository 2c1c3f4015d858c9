"""Progress display: a live bar on a terminal, plain lines every ~30 s anywhere else (a log file, CI)."""

from __future__ import annotations

import io

from picollm.progress import LINE_INTERVAL, LineProgress, progress_bar


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_it_writes_a_plain_line_at_most_every_interval():
    out, clock = io.StringIO(), FakeClock()
    bar = LineProgress(400, "transformer run", unit="step", file=out, clock=clock)
    for step in range(400):
        clock.now += 0.125  # 400 steps in 50 s: the first line, then one when 30 s have passed
        bar.set_postfix(loss=f"{5 - step / 100:.3f}")
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    assert text.splitlines() == [
        "transformer run: 1/400 step (0%), 00:00 elapsed, ETA 00:49, loss=5.000",
        "transformer run: 241/400 step (60%), 00:30 elapsed, ETA 00:19, loss=2.600",
        "transformer run: 400/400 step (100%), 00:50 elapsed, loss=1.010",
    ]


def test_refresh_without_progress_prints_nothing_and_close_after_the_last_line_adds_none():
    out, clock = io.StringIO(), FakeClock()
    bar = LineProgress(10.0, "study", unit="", file=out, clock=clock)
    for _ in range(100):  # the study's poll thread refreshes every second
        clock.now += 1
        bar.refresh()
    assert out.getvalue() == ""
    bar.n = 2.5
    bar.set_description_str("study 1/4 runs")
    bar.refresh()
    assert out.getvalue().splitlines() == ["study 1/4 runs: 25%, 01:40 elapsed, ETA 05:00"]
    clock.now += LINE_INTERVAL - 1
    bar.n = 5.0
    bar.refresh()  # too soon for another line
    assert len(out.getvalue().splitlines()) == 1
    clock.now += 1
    bar.refresh()
    bar.close()
    assert out.getvalue().splitlines()[1:] == ["study 1/4 runs: 50%, 02:10 elapsed, ETA 02:10"]
    bar.write("[study] done 1/4")
    assert out.getvalue().splitlines()[-1] == "[study] done 1/4"


def test_a_terminal_gets_the_live_bar_and_anything_else_the_lines():
    terminal = Terminal()
    live = progress_bar(10, "run", unit="step", file=terminal)
    assert not isinstance(live, LineProgress)
    live.update(3)
    live.close()
    assert "\r" in terminal.getvalue() and "3/10" in terminal.getvalue()
    assert isinstance(progress_bar(10, "run", file=io.StringIO()), LineProgress)
