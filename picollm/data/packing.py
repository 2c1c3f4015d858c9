"""Packing stories into a token stream: tokenized in this process or in a pool of worker processes.

A story becomes `[eot] + encode(story)`. `prepare` hands chunks of text to
the workers and appends what comes back to the split files; `evaluate` tokenizes a file in process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from typing import Any

import numpy as np

from picollm.data.tokenizer import Tokenizer

# worker side: the tokenizer is set once per process
_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def tokenize_chunk(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(stream, lengths): `[eot] + encode(t)` for each text, concatenated; each story's stream length."""
    encoded = tokenizer.encode_batch(texts)
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    total = int(lengths.sum())
    stream = np.empty(total, dtype=dtype)
    starts = np.cumsum(lengths) - lengths
    body = np.ones(total, dtype=bool)
    body[starts] = False
    stream[starts] = tokenizer.eot_id
    flat = np.fromiter((i for ids in encoded for i in ids), dtype=np.int64, count=total - len(encoded))
    if len(flat) and (flat.max() >= tokenizer.vocab_size or flat.min() < 0
                      or (flat == tokenizer.eot_id).any()):
        raise RuntimeError(f"{tokenizer.name} produced an id outside its vocabulary or an eot from text")
    stream[body] = flat
    return stream, lengths


def worker_tokenize(groups: dict[int, list[str]], dtype: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    assert _WORKER_TOKENIZER is not None
    return {s: tokenize_chunk(_WORKER_TOKENIZER, texts, np.dtype(dtype)) for s, texts in groups.items()}


def worker_pool(workers: int, tokenizer: Tokenizer) -> Any:
    # fork shares the loaded tokenizer and skips re-importing picollm (and torch) in each worker.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    ctx = mp.get_context(method)
    had = "TOKENIZERS_PARALLELISM" in os.environ
    # HF tokenizers warns at fork when the parent used its thread pool (bpe training); workers are
    # single-threaded by design, so say so before forking.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer,))
    finally:
        if not had:
            del os.environ["TOKENIZERS_PARALLELISM"]


def num_workers(num_proc: int | None, chunks: int) -> int:
    """Worker processes for `chunks` tasks: `num_proc` (default: the usable cores), at most one per task."""
    if num_proc is not None:
        wanted = num_proc
    else:
        try:
            wanted = len(os.sched_getaffinity(0))
        except AttributeError:
            wanted = os.cpu_count() or 1
    return max(1, min(wanted, chunks))
