"""The run-directory lock: one training at a time writes a run directory.

`hold(out)` takes an exclusive `fcntl.flock` on `<out>/train.lock` for the whole training and writes
who holds it into the file (pid, host, start time, command line). A second training into the same
directory is refused at once with a `RunInUse` that quotes the holder.

The lock belongs to the open file, so it ends with its process however that ends (an exception,
SIGKILL, a crash, a reboot): a lock left by a dead process is never in the way, and the file's content
is only what a refusal quotes. The file is never deleted: deleting it would let two processes lock two
different files of the same name.

Readers never take it: final/, best/ and the checkpoints are replaced atomically (`picollm.fileio`),
so `picollm.load`, `eval`, `generate` and a server read them without the lock and never wait for it.
Under torchrun only rank 0 takes it (the ranks of one training share the directory).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from picollm import rundir
from picollm.errors import UserError
from picollm.fileio import check_writable_dir

try:
    import fcntl
except ImportError:  # not POSIX: no lock (the atomic writes still keep each file whole)
    fcntl = None


class RunInUse(UserError):
    """Another process is training into the same run directory."""


def _command() -> str:
    """This process's command line, as the user would type it again."""
    argv = list(sys.argv)
    first = Path(argv[0]) if argv else Path()
    if first.name == "picollm" or (first.name == "__main__.py" and first.parent.name == "picollm"):
        argv[0] = "picollm"
    text = shlex.join(argv)
    return text if len(text) <= 300 else text[:297] + "..."


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": _command()}


def describe(holder: Any) -> str:
    """'pid 42 on host h since 2026-12-02 05:13:09, running `picollm train ...`' from a lock file's content."""
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        return "a process that has not yet said which"  # it holds the lock, and is writing its details
    since = holder.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) \
        if isinstance(since, (int, float)) else ""
    return f"pid {holder['pid']} on host {holder.get('host', '?')}{when}, running `{holder.get('command', '?')}`"


def _read(fd: int) -> Any:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, ValueError):
        return None


class RunLock:
    """The lock of one run directory, held by this process (`hold` makes one)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.announced = False

    def announce(self) -> None:
        """Write who holds the lock into the lock file, for a refusal to quote. Called when the training
        starts to write the directory, so a start that fails before leaves the file as it was."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, (json.dumps(_holder()) + "\n").encode("utf-8"), 0)
            self.announced = True


@contextlib.contextmanager
def hold(out: str | Path, rank: int = 0) -> Iterator[RunLock]:
    """Hold the lock of run directory `out` (created if missing) inside the block; RunInUse when another
    process holds it. `rank`: this process's torchrun rank; only rank 0 locks."""
    out = Path(out)
    if rank != 0 or fcntl is None:
        yield RunLock(None)
        return
    check_writable_dir(out, "the run directory")
    out.mkdir(parents=True, exist_ok=True)
    path = out / rundir.LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    lock = RunLock(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunInUse(f"{out} is being trained by another process ({describe(_read(fd))}); wait for it "
                           "to finish or stop it, or train into another directory") from None
        yield lock
    finally:
        if lock.announced:  # ended: nobody to quote (a process that dies keeps its details, unlocked)
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the lock
