"""SIGTERM and SIGINT as requests to stop: while `caught()` is active a signal only sets `received`,
and the trainer checkpoints at the end of the step it is in, then exits (status "interrupted")."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    def __init__(self) -> None:
        self.received: int | None = None

    def _record(self, signum, frame) -> None:
        self.received = signum

    @contextlib.contextmanager
    def caught(self) -> Iterator[None]:
        previous = {s: signal.getsignal(s) for s in SIGNALS}
        for s in SIGNALS:
            signal.signal(s, self._record)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
