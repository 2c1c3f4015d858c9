"""The study's progress display: a line per job started and finished, and one bar for the whole study
whose ETA follows the measured pace."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from typing import Any

from picollm import rundir
from picollm.progress import progress_bar
from picollm.study.schedule import Job, Schedule


class Progress:
    """A line per job started and finished, and one bar for the whole study with its ETA."""

    def __init__(self, schedule: Schedule, enabled: bool) -> None:
        self.enabled = enabled
        self.err = sys.stderr  # the real one: the trainer's lines are redirected through `write`
        self.active: dict[str, Job] = {}
        self.done_weight = 0.0
        self.done_count = 0
        self.lock = threading.Lock()
        self.bar = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.total_weight = self._remaining(schedule)
        if enabled and self.total_weight:
            self.bar = progress_bar(round(self.total_weight, 1), "study", unit="", file=self.err,
                                    bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed} elapsed, ETA {remaining}")
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.err)
        else:
            print(text, file=self.err, flush=True)

    @staticmethod
    def _remaining(schedule: Schedule) -> float:
        """Estimated seconds of the jobs not started yet, the runs waiting for a sweep included."""
        waiting = [j for key, jobs in schedule.waiting.items() if key not in schedule.chosen
                   and key not in schedule.failed for j in jobs]
        return sum(j.seconds for j in [*schedule.jobs.values(), *waiting])

    def started(self, job: Job, index: int, total: int) -> None:
        with self.lock:
            self.active[job.key] = job
        if job.kind == "sweep":
            self.write(f"[study] start {index}/{total} lr sweep {job.label} ({job.sweep.key})")  # type: ignore[union-attr]
            return
        run = job.run
        assert run is not None
        groups = ", ".join(sorted({g for g, _ in run.uses}))
        self.write(f"[study] start {index}/{total} {run.label} ({run.directory.name}; {groups})")

    def finished(self, job: Job, result: dict | None, seconds: float, error: str | None,
                 schedule: Schedule) -> None:
        remaining = self._remaining(schedule)  # here, in the thread that changes the schedule
        with self.lock:
            self.active.pop(job.key, None)
            self.done_weight += job.seconds
            self.done_count += 1
            self.total_weight = self.done_weight + sum(j.seconds for j in self.active.values()) + remaining
        if error:
            self.write(f"[study] FAILED {job.label} after {seconds:.0f}s: {error}")
        elif (result or {}).get("status") != "finished":
            self.write(f"[study] stopped {job.label} after {seconds:.0f}s "
                       f"({(result or {}).get('status', 'unknown')}); run the study again to resume it")
        elif job.kind == "sweep":
            sweep = job.sweep
            assert sweep is not None
            loss = result.get("val_nll")  # type: ignore[union-attr]
            line = f"[study] done  lr sweep {job.label} in {seconds:.0f}s: val nll {_num(loss, 'diverged')}"
            if sweep.key in schedule.chosen:
                line += f"; {sweep.label} trains at lr {schedule.chosen[sweep.key]:g}"
            self.write(line)
        else:
            s = result or {}
            test = (s.get("test") or {}).get("nll")
            val = (s.get("val") or {}).get("nll")
            lr = s.get("lr")
            self.write(f"[study] done  {job.label} in {seconds:.0f}s: {s.get('num_parameters', 0):,} parameters, "
                       f"{s.get('tokens_seen', 0):,} tokens" + (f", lr {lr:g}" if isinstance(lr, float) else "")
                       + f", val nll {_num(val)}, test nll {_num(test)}")
        self._refresh()

    def _fraction(self, job: Job) -> float:
        path = job.directory / rundir.METRICS
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 4096))
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return 0.0
        for line in reversed(lines):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            return min(1.0, row.get("tokens", 0) / max(1, job.tokens))
        return 0.0

    def _refresh(self) -> None:
        if self.bar is None:
            return
        with self.lock:
            active = list(self.active.values())
            total = self.total_weight
        value = self.done_weight + sum(j.seconds * self._fraction(j) * 0.9 for j in active)
        self.bar.total = round(max(total, value, 1e-3), 1)
        self.bar.n = round(min(value, self.bar.total), 1)
        names = ", ".join(j.label for j in active)
        self.bar.set_description_str(f"study {self.done_count} jobs done" + (f" [{names[:50]}]" if names else ""),
                                     refresh=False)
        self.bar.refresh()

    def _poll(self) -> None:
        while not self._stop.wait(1.0):
            self._refresh()

    def lines(self) -> Any:
        """A context in which the trainer's own stderr lines are printed above the bar, not through it."""
        if self.bar is None:
            return contextlib.nullcontext()
        return contextlib.redirect_stderr(_LineWriter(self.write))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.bar is not None:
            self._refresh()
            self.bar.close()


class _LineWriter:
    """A file-like object that hands complete lines to `emit`."""

    def __init__(self, emit: Any) -> None:
        self.emit = emit
        self.buffer = ""

    def write(self, text: str) -> int:
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            if line.strip():
                self.emit(line)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _num(x: Any, none: str = "-") -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else none
