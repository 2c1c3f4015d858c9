"""Building a prepared directory: sample, split and tokenize a source into the files that
`picollm.data.prepared` reads (its layout) and `picollm.data.prepare` caches.

Stories are read three times, streaming: once to count them (and their byte lengths), which fixes the
sample and the split; for bpe:N once more for the tokenizer's training text; and once to tokenize,
in chunks handed to worker processes and appended to the token files as they come back.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from array import array
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from picollm._version import __version__
from picollm.config import DataConfig, to_dict
from picollm.data.loader import seeded_permutation
from picollm.data.packing import num_workers, tokenize_chunk, worker_pool, worker_tokenize
from picollm.data.prepared import (
    FILES_KEY,
    FORMAT_VERSION,
    MANIFEST_FILE,
    META_FILE,
    SPLITS,
    stat_key,
    token_dtype,
    write_stamp,
)
from picollm.data.sources import iter_stories
from picollm.data.tokenizer import Tokenizer, get_tokenizer, parse_spec, train_bpe
from picollm.errors import UserError
from picollm.fileio import file_record

BYTES_COUNTED = ("UTF-8 bytes of each story's text (surrounding whitespace stripped) plus 1 per story "
                 "for the separator; the same for every tokenizer")
CHUNK_BYTES = 1 << 20  # story text per tokenization task
CONTENT_HASH = ("sha256 over the split's stories in order, each as its UTF-8 byte length "
                "(8 bytes, little-endian) followed by its UTF-8 bytes")


class BuildProgress:
    """Phase lines on stderr; live counters only on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.live = enabled and sys.stderr.isatty()
        self._last = 0.0

    def line(self, text: str) -> None:
        if self.enabled:
            print(f"prepare: {text}", file=sys.stderr, flush=True)

    def update(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.live and (force or now - self._last > 0.5):
            self._last = now
            print(f"\rprepare: {text}\033[K", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.live:
            print(file=sys.stderr, flush=True)


def _stories(cfg: DataConfig) -> Any:
    return iter_stories(cfg.data, text_field=cfg.text_field, format=cfg.format,
                        encoding_errors=cfg.encoding_errors, hf_split=cfg.hf_split)


def split_sizes(n: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """Stories per split: val and test rounded (at least 1 when their ratio is positive), train the rest."""
    val, test = (max(1, round(n * r)) if r > 0 else 0 for r in ratios[1:])
    train = n - val - test
    if train < 1:
        raise UserError(f"{n} stories are too few for the split {','.join(f'{r:g}' for r in ratios)}: "
                        "train would be empty; use more stories")
    return train, val, test


def assign_splits(num_source: int, num_stories: int | None, ratios: tuple[float, float, float],
                  seed: int) -> np.ndarray:
    """int8 per source story: 0 train, 1 val, 2 test, -1 not sampled. Depends only on the arguments."""
    n = num_source if num_stories is None else num_stories
    order = seeded_permutation(num_source, seed, 0)[:n]
    train, val, _ = split_sizes(n, ratios)
    assign = np.full(num_source, -1, dtype=np.int8)
    assign[order[:train]] = 0
    assign[order[train:train + val]] = 1
    assign[order[train + val:]] = 2
    return assign


def _count(cfg: DataConfig, report: BuildProgress) -> tuple[np.ndarray, Any]:
    stream = _stories(cfg)
    lengths = array("q")
    for text in stream:
        lengths.append(len(text.encode("utf-8")))
        if len(lengths) % 10000 == 0:
            report.update(f"counting stories: {len(lengths):,}")
    report.update(f"counting stories: {len(lengths):,}", force=True)
    report.done()
    return np.frombuffer(lengths, dtype=np.int64) if lengths else np.zeros(0, np.int64), stream


def _train_tokenizer(cfg: DataConfig, assign: np.ndarray, lengths: np.ndarray, seed_order: np.ndarray,
                     report: BuildProgress) -> tuple[Tokenizer, dict[str, Any]]:
    _, vocab = parse_spec(cfg.tokenizer)
    assert vocab is not None
    # A seeded random subset of the training stories, within the byte budget.
    train_order = seed_order[assign[seed_order] == 0]
    fits = np.cumsum(lengths[train_order]) <= cfg.bpe_train_bytes
    chosen = train_order[: max(1, int(np.count_nonzero(fits)))]
    mask = np.zeros(len(assign), dtype=bool)
    mask[chosen] = True
    total = int(lengths[chosen].sum())
    report.line(f"training {cfg.tokenizer} on {len(chosen):,} training stories ({total / 1e6:.1f} MB)")

    def texts() -> Iterator[str]:
        left = len(chosen)
        for i, text in enumerate(_stories(cfg)):
            if mask[i]:
                yield text
                left -= 1
                if left == 0:
                    return

    start = time.perf_counter()
    tokenizer = train_bpe(texts(), vocab)
    info = {"train_stories": len(chosen), "train_bytes": total, "budget_bytes": cfg.bpe_train_bytes,
            "seconds": round(time.perf_counter() - start, 3), "vocab_size": tokenizer.vocab_size}
    return tokenizer, info


def build_prepared(cfg: DataConfig, out: Path, key: str, inputs: dict[str, Any],
                   report: BuildProgress) -> dict[str, Any]:
    """Write the prepared data of `cfg` into the empty directory `out`: token files, offsets, manifest, tokenizer,
    meta.json (last) and the verification stamp. `key`, `inputs`: the cache key and what it hashes
    (`picollm.data.prepare.cache_key`), recorded in meta.json. Returns meta.json's content."""
    source = cfg.data
    report.line(f"reading {source}")
    lengths, counted = _count(cfg, report)
    num_source = len(lengths)
    if num_source == 0:
        raise UserError(f"{source} holds no stories ({counted.dropped_empty} empty or whitespace-only "
                        "dropped); pass a file or folder with text")
    if cfg.num_stories is not None and cfg.num_stories > num_source:
        raise UserError(f"--data.num_stories {cfg.num_stories:,} asks for more stories than {source} has "
                        f"({num_source:,}); lower it or leave it out to use all")
    assign = assign_splits(num_source, cfg.num_stories, cfg.split, cfg.seed)
    order = seeded_permutation(num_source, cfg.seed, 0)

    kind, _ = parse_spec(cfg.tokenizer)
    bpe_info = None
    if kind == "bpe":
        tokenizer, bpe_info = _train_tokenizer(cfg, assign, lengths, order, report)
    else:
        tokenizer = get_tokenizer(cfg.tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    selected_bytes = int(lengths[assign >= 0].sum())
    workers = num_workers(cfg.num_proc, -(-selected_bytes // CHUNK_BYTES))

    files = [open(out / f"{split}.bin", "wb") for split in SPLITS]
    story_lengths: list[list[np.ndarray]] = [[] for _ in SPLITS]
    hashers = [hashlib.sha256() for _ in SPLITS]
    nbytes = [0, 0, 0]
    ntokens = [0, 0, 0]
    seen = 0

    def write(result: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        for s, (stream, lens) in result.items():
            files[s].write(stream.tobytes())
            story_lengths[s].append(lens)
            ntokens[s] += len(stream)

    report.line(f"tokenizing {int((assign >= 0).sum()):,} stories ({selected_bytes / 1e6:.1f} MB) with "
                f"{tokenizer.name}, {workers} worker{'s' if workers > 1 else ''}")
    start = time.perf_counter()
    pool = worker_pool(workers, tokenizer) if workers > 1 else None
    pending: deque[Any] = deque()
    try:
        stream = _stories(cfg)
        groups: dict[int, list[str]] = {}
        group_bytes = 0
        done_bytes = 0

        def flush() -> None:
            nonlocal groups, group_bytes
            if not groups:
                return
            if pool is None:
                write({s: tokenize_chunk(tokenizer, texts, dtype) for s, texts in groups.items()})
            else:
                pending.append(pool.apply_async(worker_tokenize, (groups, dtype.str)))
                while len(pending) > 2 * workers:
                    write(pending.popleft().get())
            groups, group_bytes = {}, 0

        for i, text in enumerate(stream):
            seen = i + 1
            if i >= num_source:
                break
            s = int(assign[i])
            if s < 0:
                continue
            raw = text.encode("utf-8")
            hashers[s].update(len(raw).to_bytes(8, "little"))
            hashers[s].update(raw)
            nbytes[s] += len(raw) + 1
            groups.setdefault(s, []).append(text)
            group_bytes += len(raw)
            done_bytes += len(raw)
            if group_bytes >= CHUNK_BYTES:
                flush()
                elapsed = time.perf_counter() - start
                report.update(f"tokenizing: {done_bytes / max(selected_bytes, 1):.0%} "
                              f"({done_bytes / 1e6 / max(elapsed, 1e-9):.1f} MB/s)")
        flush()
        while pending:
            write(pending.popleft().get())
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        for f in files:
            f.close()
    seconds = time.perf_counter() - start
    report.done()
    if seen != num_source:
        raise UserError(f"{source} changed while it was being prepared ({num_source:,} stories, then "
                        f"{seen:,}); prepare again once it is stable")

    splits: dict[str, Any] = {}
    manifest: dict[str, Any] = {
        "picollm_data_format": FORMAT_VERSION, "seed": cfg.seed, "split": list(cfg.split),
        "num_stories": cfg.num_stories, "source_stories": num_source,
        "index": "position of the story among the source's non-empty stories, 0-based, in reading order",
        "content_hash": CONTENT_HASH, "splits": {},
    }
    for s, split in enumerate(SPLITS):
        lens = np.concatenate(story_lengths[s]) if story_lengths[s] else np.zeros(0, np.int64)
        offsets = np.cumsum(lens) - lens
        np.save(out / f"{split}.offsets.npy", offsets.astype(np.int64))
        indices = np.flatnonzero(assign == s)
        assert len(indices) == len(lens)
        splits[split] = _split_counts(len(lens), ntokens[s], nbytes[s], hashers[s].hexdigest())
        manifest["splits"][split] = {"stories": len(lens), "sha256": hashers[s].hexdigest(),
                                     "indices": indices.tolist()}
    total_tokens = sum(ntokens)
    total = _split_counts(sum(v["stories"] for v in splits.values()), total_tokens, sum(nbytes), None)
    tokenizer.save(out)
    meta: dict[str, Any] = {
        "picollm_data_format": FORMAT_VERSION,
        "picollm_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "key": key,
        "config": {k: v for k, v in to_dict(cfg).items() if k not in ("num_proc", "cache_dir")},
        "source": source,
        "source_identity": inputs["source"],
        "source_files": len(counted.files),
        "source_stories": num_source,
        "dropped_empty": counted.dropped_empty,
        "replacements": counted.replacements,
        "num_stories": cfg.num_stories,
        "seed": cfg.seed,
        "split": list(cfg.split),
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": dtype.name,
        "bpe": bpe_info,
        "bytes_counted": BYTES_COUNTED,
        "tokens_counted": "story tokens plus one end-of-text token before each story",
        "splits": splits,
        "total": total,
        "num_proc": workers,
        "tokenize_seconds": round(seconds, 3),
        "tokens_per_second": round(total_tokens / max(seconds, 1e-9), 1),
        "megabytes_per_second": round(sum(nbytes) / 1e6 / max(seconds, 1e-9), 3),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest) + "\n", encoding="utf-8")
    records = {f.name: file_record(f) for f in sorted(out.iterdir()) if f.is_file()}
    meta[FILES_KEY] = records
    # meta.json last: a directory without it is never mistaken for a finished one
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    write_stamp(out, {name: {**stat_key(out / name), "sha256": r["sha256"]} for name, r in records.items()})
    return meta


def _split_counts(stories: int, tokens: int, nbytes: int, sha256: str | None) -> dict[str, Any]:
    counts: dict[str, Any] = {
        "stories": stories, "tokens": tokens, "story_tokens": tokens - stories, "eot_tokens": stories,
        "bytes": nbytes, "bytes_per_token": round(nbytes / tokens, 4) if tokens else None,
    }
    if sha256 is not None:
        counts["sha256"] = sha256
    return counts
