"""Atomic file and directory writes, and what a full disk looks like.

Every file picollm writes for later (checkpoints, run files, the prepared-data cache) goes through a
hidden temporary sibling and a rename, so a kill at any moment leaves either the previous complete
file or directory or the new complete one, never a half-written one (a directory being replaced may be
left under its hidden `.NAME.old` name, which the next write puts back). A full disk while writing is a
`DiskFullError` (a `UserError`) that names the place and says that nothing was replaced.

`check_writable_dir` and `check_writable_file` say, before any work starts, that an output path cannot
be written (a file where a directory should be, a read-only filesystem, no permission).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from picollm.errors import UserError


class DiskFullError(UserError):
    """The filesystem ran out of space (or quota) while writing; nothing was replaced."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` reports a full disk: an OSError (ENOSPC, EDQUOT), or the same error as the
    Rust-backed writers (safetensors, tokenizers) word it."""
    if isinstance(exc, DiskFullError):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return any(s in text for s in ("No space left on device", "os error 28", "Disk quota exceeded",
                                   "os error 122"))


def file_record(path: Path) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex} of a file, read in chunks of 1 MiB."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _why_not_writable(directory: Path) -> str | None:
    """Why files cannot be created in the existing `directory`, or None when they can."""
    if not directory.is_dir():
        return f"{directory} is a file, not a directory"
    if os.access(directory, os.W_OK | os.X_OK):
        return None
    try:
        read_only = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return f"{directory} is on a read-only filesystem" if read_only else f"{directory} is not writable by this user"


def check_writable_dir(path: str | Path, what: str, fix: str = "choose another path") -> Path:
    """UserError unless directory `path` exists and is writable, or can be created; creates nothing.
    `what` names it for the user: a flag (`--out`) or a description (`the run directory`); `fix` says
    what to do instead."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a directory; {fix}")
    why = _why_not_writable(_nearest_existing(path))
    if why is not None:
        raise UserError(f"{what} {path} cannot be written: {why}; {fix}")
    return path


def check_writable_file(path: str | Path, what: str) -> Path:
    """UserError unless file `path` can be written (created or replaced); creates nothing."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory, not a file; name a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{what} {path} cannot be written: the file is read-only; choose another path")
    why = _why_not_writable(_nearest_existing(path.parent))
    if why is not None:
        raise UserError(f"{what} {path} cannot be written: {why}; choose another path")
    return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(exc):
            kept = f"the existing {path.name} is unchanged" if path.exists() else "nothing was left behind"
            raise DiskFullError(f"no space left on device in {path.parent} while writing {path.name}; {kept}") \
                from None
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as indented JSON to `path` through a temporary file and a rename."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def moved_aside(directory: Path) -> Path:
    """Where `write_dir_atomic` keeps the directory it replaces until the new one is in place:
    `.<name>.old` beside it."""
    return directory.with_name(f".{directory.name}.old")


def finish_replacement(directory: Path) -> None:
    """Finish a replacement of `directory` that a kill interrupted (`write_dir_atomic`): when only its
    moved-aside copy `.<name>.old` is left, that copy (the last complete directory) goes back under the
    name; when both are there, the new one was already in place and the copy is deleted.

    Only the writer of `directory` calls it, holding whatever lock keeps other writers out: done while
    another process is between the two renames of a replacement, it would make that one fail. Readers
    find a lone copy with `moved_aside` instead (`picollm.rundir.model_dir` does).
    """
    old = moved_aside(directory)
    if not old.is_dir():
        return
    if directory.exists():
        shutil.rmtree(old)
    else:
        os.replace(old, directory)


def write_dir_atomic(directory: Path, fill: Callable[[Path], None]) -> Path:
    """Call `fill(tmp_dir)` then move `tmp_dir` to `directory`, replacing an existing one.

    The temporary directory is `.<name>.<random>.tmp` beside `directory`: a kill leaves only such a
    hidden directory behind, which the next writer of the same place may delete. An existing
    `directory` is replaced by two renames, the old one to `.<name>.old` (`moved_aside`) and the new one
    into place, so at every moment either `directory` is there, old or new and complete, or `.<name>.old`
    holds the old one; a replacement a kill interrupted is finished first (`finish_replacement`).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    finish_replacement(directory)
    try:
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(f"no space left on device in {directory.parent} while writing {directory.name}; "
                                "nothing was replaced") from None
        raise
    try:
        fill(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        if directory.exists():
            # a directory cannot be renamed over a non-empty one: move the old one aside first. Between
            # the two renames only `old` holds a complete directory (finish_replacement restores it).
            old = moved_aside(directory)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
        fsync_dir(directory.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not directory.exists():  # the second rename failed: the old one goes back
            finish_replacement(directory)
        if is_disk_full(exc):
            kept = f"the existing {directory.name} is unchanged" if directory.exists() else "nothing was left behind"
            raise DiskFullError(f"no space left on device in {directory.parent} while writing {directory.name}; "
                                f"{kept}") from None
        raise
    return directory
