"""A prepared dataset on disk, opened and verified: what `picollm.data.prepare` builds.

Layout of a prepared directory (`<cache_dir>/prepared/<name>-<key>/`):

- `{train,val,test}.bin`: the split's token stream, raw little-endian uint16 (vocab <= 65,536) or
  uint32. Each story contributes `[eot] + encode(story)`, stories in source order.
- `{train,val,test}.offsets.npy`: int64 index of each story's first token (its leading eot).
- `manifest.json`: per split, the story indices (position among the source's non-empty stories) and
  a sha256 of the story texts.
- `meta.json`: source, sample, seed, tokenizer, counts, bytes, bytes per token, throughput, and the
  size and sha256 of every other file (`files`).
- the tokenizer files (`tokenizer_config.json`, plus `tokenizer.json` for bpe:N).
- `.verified.json`: the stamp of the last verification (below); not part of the data.
- `baselines.json`: the unigram and bigram baselines of the data (`picollm.baselines`), written the first
  time they are asked for (not where the cache is read-only); derived, not part of the data or its checksums.

Opening the directory checks every file against `meta.json`: its size always, its sha256 once. A file
whose content was checked is then trusted while its size, modification time and inode are those the
stamp recorded and it is older than the stamp (a file written in the same clock tick as the stamp is
checked again, as git does with its index), so a full-size cache is not re-read by every process that
opens it, while a file written or replaced since is caught. A damaged cache is named instead of used.

Format 2 added the checksums; a format-1 directory is refused (and `prepare` rebuilds it in place).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from picollm.data.tokenizer import Tokenizer, load_tokenizer
from picollm.errors import UserError
from picollm.fileio import file_record, write_json_atomic

FORMAT_VERSION = 2
SPLITS = ("train", "val", "test")
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
FILES_KEY = "files"  # in meta.json: {file name: {"bytes": size, "sha256": hex}}
STAMP_FILE = ".verified.json"  # {file name: {"bytes", "mtime_ns", "inode", "sha256"}} as last verified
BASELINES_FILE = "baselines.json"  # picollm.baselines' cache of what it computed from the data


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class PreparedData:
    """A prepared dataset: token streams, story offsets and counts per split ("train", "val", "test")."""

    directory: Path
    meta: dict
    tokenizer: Tokenizer
    cached: bool = False  # True when `prepare` found it ready instead of building it
    _offsets: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, directory: str | Path) -> PreparedData:
        """Open and verify a prepared directory; UserError naming the damaged file otherwise."""
        directory = Path(directory).expanduser()
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise UserError(f"{meta_path} is missing; {directory} is not prepared data (or is incomplete)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            splits = meta["splits"]
            dtype = np.dtype(meta["dtype"])
            version = meta["picollm_data_format"]
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{meta_path} is damaged ({exc}); prepare the data again") from None
        if version != FORMAT_VERSION:
            raise UserError(f"{directory} holds prepared-data format {version}, this picollm reads "
                            f"{FORMAT_VERSION}; prepare the data again")
        if not (directory / MANIFEST_FILE).is_file():
            raise UserError(f"{directory / MANIFEST_FILE} is missing; prepare the data again")
        verify_files(directory, meta.get(FILES_KEY), meta_path)
        data = cls(directory, meta, load_tokenizer(directory))
        if data.tokenizer.name != meta.get("tokenizer") or data.tokenizer.eot_id != meta.get("eot_id"):
            raise UserError(f"{directory}: the tokenizer files do not match {META_FILE}; "
                            "prepare the data again")
        for split in SPLITS:
            if split not in splits:
                raise UserError(f"{meta_path} has no '{split}' split; prepare the data again")
            path = directory / f"{split}.bin"
            expected = splits[split]["tokens"] * dtype.itemsize
            if not path.is_file():
                raise UserError(f"{path} is missing; prepare the data again")
            size = path.stat().st_size
            if size != expected:
                raise UserError(f"{path} holds {size:,} bytes, {META_FILE} expects {expected:,}; "
                                "the file is truncated or damaged: prepare the data again")
            offsets = data.story_offsets(split)
            n = splits[split]["stories"]
            if len(offsets) != n or (n and (offsets[0] != 0 or offsets[-1] >= splits[split]["tokens"]
                                             or data.tokens(split)[offsets[-1]] != data.tokenizer.eot_id)):
                raise UserError(f"{directory / (split + '.offsets.npy')} does not match {split}.bin; "
                                "prepare the data again")
        return data

    def tokens(self, split: str) -> np.ndarray:
        """The split's token stream, a read-only 1-D memmap."""
        n = self._split(split)["tokens"]
        dtype = np.dtype(self.meta["dtype"])
        if n == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(self.directory / f"{split}.bin", dtype=dtype, mode="r", shape=(n,))

    def story_offsets(self, split: str) -> np.ndarray:
        """int64 index in `tokens(split)` of each story's first token (its leading eot)."""
        self._split(split)
        if split not in self._offsets:
            path = self.directory / f"{split}.offsets.npy"
            try:
                offsets = np.load(path)
            except (OSError, ValueError, EOFError) as exc:
                raise UserError(f"{path} is missing or damaged ({exc}); prepare the data again") from None
            self._offsets[split] = offsets.astype(np.int64, copy=False).reshape(-1)
        return self._offsets[split]

    def num_bytes(self, split: str) -> int:
        """UTF-8 bytes of the split's stories + 1 per story (see docs/data.md)."""
        return int(self._split(split)["bytes"])

    def num_tokens(self, split: str) -> int:
        """Tokens in the split's stream (story tokens + one eot per story)."""
        return int(self._split(split)["tokens"])

    def num_stories(self, split: str) -> int:
        return int(self._split(split)["stories"])

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _split(self, split: str) -> dict[str, Any]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        return self.meta["splits"][split]


def stat_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _read_stamp(directory: Path) -> tuple[dict[str, Any], int]:
    """The stamp's entries and its own modification time (0 when there is none)."""
    path = directory / STAMP_FILE
    try:
        stamp = json.loads(path.read_text(encoding="utf-8"))
        return (stamp if isinstance(stamp, dict) else {}), path.stat().st_mtime_ns
    except (OSError, ValueError):
        return {}, 0


def write_stamp(directory: Path, entries: dict[str, Any]) -> None:
    """Record `entries` (file name -> its stat key and sha256, as just verified) as trusted."""
    try:
        write_json_atomic(directory / STAMP_FILE, entries)
        (directory / STAMP_FILE).chmod(0o644)  # a cache shared between users: any reader may trust it
    except OSError:
        pass  # a read-only cache: every open verifies again, which is only slower


def verify_files(directory: Path, records: Any, recorded_in: Path) -> None:
    """UserError unless every file of `records` has its recorded size and sha256. Content is hashed only
    for files the stamp does not vouch for; the stamp is updated when any was."""
    if not isinstance(records, dict):
        raise UserError(f"{recorded_in} lists no file checksums ('{FILES_KEY}'); prepare the data again")
    stamp, stamped_at = _read_stamp(directory)
    trusted: dict[str, Any] = {}
    hashed = False
    for name, record in records.items():
        path = directory / name
        if not isinstance(record, dict) or "/" in name or not path.is_file():
            raise UserError(f"{path} is missing or not a file; {recorded_in.name} lists it: prepare the data again")
        key = stat_key(path)
        if key["bytes"] != record.get("bytes"):
            raise UserError(f"{path} holds {key['bytes']:,} bytes, {recorded_in.name} records {record.get('bytes')}: "
                            "the file is truncated or damaged; prepare the data again")
        known = stamp.get(name)
        if known == {**key, "sha256": record.get("sha256")} and key["mtime_ns"] < stamped_at:
            trusted[name] = known
            continue
        hashed = True
        if file_record(path)["sha256"] != record.get("sha256"):
            raise UserError(f"{path} does not match the sha256 recorded in {recorded_in.name}: the file is damaged; "
                            "prepare the data again")
        trusted[name] = {**key, "sha256": record["sha256"]}
    if hashed:
        write_stamp(directory, trusted)
