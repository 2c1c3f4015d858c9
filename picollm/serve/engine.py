"""Where model work runs: a fixed pool of worker threads behind a bounded queue.

The event loop only parses requests and writes responses; every forward pass runs in a worker thread,
so `/health` answers while models are busy. A request becomes one `Job`: a function run in a worker
that reports events (tokens, results) through `emit`. The queue holds at most `workers + queue_size`
jobs (running and waiting); one more is refused at once (`Busy`: HTTP 503 with Retry-After) instead
of waiting without bound. A job's consumer that goes away (a client that disconnects) cancels it: the
job sees `cancelled` between tokens and stops; one that had not started yet never starts.

A job that raises is reported to its own consumer only: the worker logs the traceback and takes the
next job, so one model's failure does not take the others down.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from picollm.errors import UserError

log = logging.getLogger("picollm.serve")


class Busy(Exception):
    """The queue is full: the request is refused, to be retried later."""


class Cancelled(Exception):
    """Raised inside a job when its consumer has gone away."""


@dataclass
class Failure:
    """The last event of a job that raised."""

    error: BaseException


_DONE = object()


class Job:
    """One request's work. The worker calls `emit(event)`; the event loop iterates `events()`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._cancel = threading.Event()
        self.finished = threading.Event()

    # --- in the worker ---------------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check(self) -> None:
        """Raise `Cancelled` if the consumer has gone away."""
        if self._cancel.is_set():
            raise Cancelled

    def emit(self, event: Any) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    # --- in the event loop -----------------------------------------------------------------------
    def cancel(self) -> None:
        self._cancel.set()

    async def events(self) -> AsyncIterator[Any]:
        """The job's events as they come; a `Failure` is the last one when the job raised. Leaving the
        loop early (a disconnect, a closed stream) cancels the job."""
        try:
            while True:
                event = await self._queue.get()
                if event is _DONE:
                    return
                yield event
                if isinstance(event, Failure):
                    return
        finally:
            self.cancel()


class Engine:
    """A pool of `workers` threads and room for `queue_size` more jobs waiting for one."""

    def __init__(self, workers: int = 2, queue_size: int = 16) -> None:
        if workers < 1 or queue_size < 0:
            raise ValueError("workers must be >= 1 and queue_size >= 0")
        self.workers = workers
        self.queue_size = queue_size
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="picollm-serve")
        self._lock = threading.Lock()
        self._active = 0  # jobs running or waiting
        self.stats = {"started": 0, "finished": 0, "cancelled": 0, "failed": 0, "refused": 0}

    @property
    def capacity(self) -> int:
        return self.workers + self.queue_size

    @property
    def active(self) -> int:
        return self._active

    def submit(self, work: Callable[[Job], None]) -> Job:
        """Queue `work(job)` for a worker; `Busy` if the queue is full. Must be called in the event loop."""
        job = Job(asyncio.get_running_loop())
        with self._lock:
            if self._active >= self.capacity:
                self.stats["refused"] += 1
                raise Busy
            self._active += 1
            self.stats["started"] += 1
        self._pool.submit(self._run, work, job)
        return job

    def _run(self, work: Callable[[Job], None], job: Job) -> None:
        outcome = "finished"
        try:
            job.check()
            work(job)
        except Cancelled:
            outcome = "cancelled"
        except Exception as exc:  # reported to this job's consumer; the worker lives on
            outcome = "failed"
            if not isinstance(exc, UserError):
                log.exception("a job failed")
            job.emit(Failure(exc))
        finally:
            with self._lock:
                self._active -= 1
                self.stats[outcome] += 1
            job.emit(_DONE)
            job.finished.set()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
