"""Progress on stderr: a live tqdm bar on a terminal; elsewhere (a log file, CI, `nohup`) a plain line
at most every `LINE_INTERVAL` seconds, so that a log holds readable lines instead of a frame per step."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from tqdm.auto import tqdm

LINE_INTERVAL = 30.0  # seconds between two progress lines when stderr is not a terminal


def progress_bar(total: float, desc: str, *, initial: float = 0, unit: str = "it", file: TextIO | None = None,
                 bar_format: str | None = None) -> Any:
    """A tqdm bar when `file` (default: stderr) is a terminal, else a `LineProgress` with the same methods."""
    file = file if file is not None else sys.stderr
    isatty = getattr(file, "isatty", None)
    if isatty is not None and isatty():
        return tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True, file=file,
                    bar_format=bar_format)
    return LineProgress(total, desc, initial=initial, unit=unit, file=file)


class LineProgress:
    """The part of tqdm's interface picollm uses, written as a plain line now and then: on the first
    update, then at most every `interval` seconds, and at `close` if anything moved since the last line."""

    def __init__(self, total: float, desc: str, *, initial: float = 0, unit: str = "it", file: TextIO | None = None,
                 interval: float = LINE_INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.file = file if file is not None else sys.stderr
        self.interval = interval
        self.clock = clock
        self.postfix = ""
        self._initial = initial
        self._start = clock()
        self._printed_at: float | None = None
        self._printed_n = initial

    def update(self, n: float = 1) -> None:
        self.n += n
        self.refresh()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description_str(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def write(self, text: str, file: TextIO | None = None) -> None:
        print(text, file=file if file is not None else self.file, flush=True)

    def refresh(self) -> None:
        now = self.clock()
        if self.n != self._printed_n and (self._printed_at is None or now - self._printed_at >= self.interval):
            self._print(now)

    def close(self) -> None:
        if self.n != self._printed_n:
            self._print(self.clock())

    def _print(self, now: float) -> None:
        self._printed_at, self._printed_n = now, self.n
        elapsed = now - self._start
        done = self.n - self._initial
        percent = f"{100 * self.n / max(self.total, 1e-9):.0f}%"
        counts = f"{self.n:g}/{self.total:g} {self.unit} ({percent})" if self.unit else percent
        text = f"{self.desc}: {counts}, {tqdm.format_interval(elapsed)} elapsed"
        if 0 < done and self.n < self.total:
            text += f", ETA {tqdm.format_interval(elapsed / done * (self.total - self.n))}"
        if self.postfix:
            text += f", {self.postfix}"
        self.write(text)
