"""A prepared dataset on disk, opened and verified: what `picollm.data.prepare` builds.

Layout of a prepared directory (`<cache_dir>/prepared/<name>-<key>/`):

- `{train,val,test}.bin`: the split's token stream, raw little-endian uint16 (vocab <= 65,536) or
  uint32. Each story contributes `[eot] + encode(story)`, stories in source order.
- `{train,val,test}.offsets.npy`: int64 index of each story's first token (its leading eot).
- `manifest.json`: per split, the story indices (position among the source's non-empty stories) and
  a sha256 of the story texts.
- `meta.json`: source, sample, seed, tokenizer, counts, bytes, bytes per token, throughput.
- the tokenizer files (`tokenizer_config.json`, plus `tokenizer.json` for bpe:N).

Every file size is checked against `meta.json` when the directory is opened, so a damaged cache is
named instead of used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from picollm.data.tokenizer import Tokenizer, load_tokenizer
from picollm.errors import UserError

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"


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
        data = cls(directory, meta, load_tokenizer(directory))
        if data.tokenizer.name != meta.get("tokenizer") or data.tokenizer.eot_id != meta.get("eot_id"):
            raise UserError(f"{directory}: the tokenizer files do not match {META_FILE}; "
                            "prepare the data again")
        for split in SPLITS:
            if split not in splits:
                raise UserError(f"{meta_path} has no '{split}' split; prepare the data again")
            path = directory / f"{split}.bin"
            expected = splits[split]["tokens"] * dtype.itemsize
            size = path.stat().st_size if path.is_file() else None
            if size != expected:
                raise UserError(f"{path} holds {size} bytes, {META_FILE} expects {expected}; "
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
