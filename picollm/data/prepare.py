"""`prepare`: the prepared data of a `DataConfig`, from the cache or built now, once.

The cache directory (`<cache_dir>/prepared/<name>-<key>/`) is named by a hash of everything that
changes the data (`cache_key`). It is built (`picollm.data.build`) in a hidden temporary sibling and
renamed into place (`picollm.fileio.write_dir_atomic`), so a build killed midway is never used; an
exclusive lock on the cache makes processes that prepare the same data build it once. Opening it
verifies it (`picollm.data.prepared`); a damaged one is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from picollm.config import DataConfig
from picollm.data.build import BuildProgress, assign_splits, build_prepared, split_sizes
from picollm.data.prepared import PreparedData
from picollm.data.sources import source_identity
from picollm.data.tokenizer import parse_spec
from picollm.errors import UserError
from picollm.fileio import DiskFullError, check_writable_dir, finish_replacement, write_dir_atomic

# PreparedData, assign_splits and split_sizes are re-exported: callers import them from here
__all__ = ["CACHE_KEY_VERSION", "PreparedData", "assign_splits", "cache_key", "cache_path", "prepare", "split_sizes"]

try:
    import fcntl
except ImportError:  # not POSIX: no lock; the atomic rename still keeps the cache sound
    fcntl = None

# The version of what `cache_key` hashes: bumped when the same inputs would build different data. A new
# format of the same data (FORMAT_VERSION) keeps the key, so an old directory is rebuilt in place.
CACHE_KEY_VERSION = 1


def cache_key(cfg: DataConfig) -> tuple[str, dict[str, Any]]:
    """(hex key, the inputs it hashes): everything that changes the prepared data, nothing else."""
    kind, _ = parse_spec(cfg.tokenizer)
    inputs: dict[str, Any] = {
        "picollm_data_format": CACHE_KEY_VERSION,
        "source": source_identity(cfg.data, cfg.format, cfg.hf_split),
        "text_field": cfg.text_field,
        "format": cfg.format,
        "num_stories": cfg.num_stories,
        "split": [float(r) for r in cfg.split],
        "seed": cfg.seed,
        "tokenizer": cfg.tokenizer,
        "encoding_errors": cfg.encoding_errors,
    }
    if kind == "bpe":
        inputs["bpe_train_bytes"] = cfg.bpe_train_bytes
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest(), inputs


def cache_path(cfg: DataConfig) -> Path:
    """Where `prepare(cfg)` keeps its result."""
    key, _ = cache_key(cfg)
    return Path(cfg.cache_dir).expanduser() / "prepared" / f"{_slug(cfg)}-{key[:16]}"


def _slug(cfg: DataConfig) -> str:
    base = cfg.data[3:] if cfg.data.startswith("hf:") else Path(cfg.data).expanduser().name
    base = Path(base).stem if not cfg.data.startswith("hf:") else base
    text = f"{base}-{cfg.tokenizer}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:60] or "data"


@contextlib.contextmanager
def _locked(directory: Path, report: BuildProgress) -> Iterator[None]:
    """An exclusive lock on the cache `directory` itself (so that ranks preparing the same data build it once,
    and no lock file is left behind)."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report.line(f"waiting for another prepare in {directory} to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def prepare(cfg: DataConfig, progress: bool = True) -> PreparedData:
    """The prepared data for `cfg`, from the cache when it is there and sound, else built now."""
    cfg.validate()
    parse_spec(cfg.tokenizer)
    final = cache_path(cfg)
    root = final.parent
    fix = "pass another --data.cache_dir"
    if final.is_dir() and not os.access(root, os.W_OK):
        # a shared cache this process cannot write: its data is used as it is, without the builders' lock
        try:
            data = PreparedData.open(final)
            data.cached = True
            return data
        except UserError as exc:
            raise UserError(f"{exc} (the cache {root} is not writable, so it cannot be rebuilt here; {fix})") \
                from None
    check_writable_dir(root, "the prepared-data cache", fix)
    created = [p for p in (root, *root.parents) if not p.exists()]
    root.mkdir(parents=True, exist_ok=True)
    try:
        return _open_or_build(cfg, final, BuildProgress(progress))
    except BaseException:
        for directory in created:  # deepest first: a failed first build leaves no empty cache behind
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise


def _open_or_build(cfg: DataConfig, final: Path, report: BuildProgress) -> PreparedData:
    root = final.parent
    with _locked(root, report):
        finish_replacement(final)  # a rebuild that a kill interrupted left the previous data moved aside
        if final.exists():
            try:
                data = PreparedData.open(final)
                data.cached = True
                return data
            except UserError as exc:
                # said even without progress output: a damaged cache should not go unnoticed
                print(f"prepare: cached data is unusable ({exc}); rebuilding it", file=sys.stderr, flush=True)
        for stale in root.glob(f".{final.name}.*.tmp"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)

        def build(tmp: Path) -> None:
            tmp.chmod(0o755)  # mkdtemp's 0700 would keep a shared cache from other users
            key, inputs = cache_key(cfg)
            build_prepared(cfg, tmp, key, inputs, report)

        try:
            write_dir_atomic(final, build)
        except DiskFullError as exc:
            raise DiskFullError(f"{exc}; free some space or pass another --data.cache_dir") from None
    return PreparedData.open(final)
