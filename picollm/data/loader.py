"""Batches of (input, target) windows from a prepared token stream.

`WindowLoader` cuts the stream into non-overlapping windows of T+1 tokens with stride T, so every
token but the first is a target exactly once per epoch, and serves them in a new seeded order each
epoch; each distributed rank gets a disjoint shard. `eval_windows` covers every target token of a
stream once, in order, for full evaluations.

Batches are gathered from the (memory-mapped) stream with one vectorised numpy index per batch; on
2 CPU cores a background prefetch thread made no measurable difference (see docs/data.md), so
there is none.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic): a fixed, portable bit mixer."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _seed_key(*seeds: int) -> np.uint64:
    key = np.array([0x5DEECE66D], dtype=np.uint64)
    for s in seeds:
        key = _splitmix64(key ^ np.array([int(s) & _MASK64], dtype=np.uint64))
    return key[0]


def seeded_permutation(n: int, *seeds: int) -> np.ndarray:
    """A permutation of range(n) determined by `seeds` alone: the same on any machine and numpy version
    (it sorts hashes of the indices rather than relying on a numpy generator's stream)."""
    keys = _splitmix64(np.arange(n, dtype=np.uint64) ^ _seed_key(*seeds))
    return np.argsort(keys, kind="stable")


def _gather(tokens: np.ndarray, starts: np.ndarray, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (int64 [b, length-1]) of the windows tokens[s : s+length] for each s in `starts`."""
    index = starts[:, None] + np.arange(length, dtype=np.int64)[None, :]
    windows = tokens[index].astype(np.int64)
    return torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())


def batches_per_epoch(num_tokens: int, context_length: int, batch_size: int, world_size: int = 1) -> int:
    """A rank's batches in one epoch over `num_tokens` tokens, as `WindowLoader` cuts them: windows of
    `context_length` targets, the windows beyond a multiple of `world_size` dropped, the last batch partial."""
    windows = max(num_tokens - 1, 0) // context_length // world_size
    return -(-windows // batch_size)


class WindowLoader:
    """Shuffled training batches over `tokens` for one rank.

    Window i is tokens[i*T : i*T + T + 1] (x = the first T, y = the last T). The final partial
    window, and per epoch the windows beyond a multiple of `world_size`, are dropped:
    `dropped_tokens` counts those targets. Each epoch permutes all windows with a generator seeded
    by (seed, epoch); rank r takes every world_size-th window of that order from position r.
    """

    def __init__(self, tokens: np.ndarray, context_length: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if context_length < 1 or batch_size < 1:
            raise ValueError("context_length and batch_size must be at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if tokens.ndim != 1:
            raise ValueError("tokens must be a 1-D array")
        self.tokens = tokens
        self.context_length = context_length
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_windows = max(len(tokens) - 1, 0) // context_length  # all ranks together
        self.windows_per_epoch = self.num_windows // world_size  # this rank's
        targets = max(len(tokens) - 1, 0)
        self.dropped_tokens = targets - self.windows_per_epoch * world_size * context_length
        self.batches_per_epoch = batches_per_epoch(len(tokens), context_length, batch_size, world_size)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def window_starts(self, epoch: int) -> np.ndarray:
        """Start positions of this rank's windows in epoch `epoch`, in serving order."""
        order = seeded_permutation(self.num_windows, self.seed, epoch)
        mine = order[self.rank: self.windows_per_epoch * self.world_size: self.world_size]
        return mine.astype(np.int64) * self.context_length

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) int64 [b, T] batches of epoch `epoch`, from batch `start_batch` on (to resume)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} is not in [0, {self.batches_per_epoch}]")
        starts = self.window_starts(epoch)
        length = self.context_length + 1
        for b in range(start_batch, self.batches_per_epoch):
            yield _gather(self.tokens, starts[b * self.batch_size: (b + 1) * self.batch_size], length)


def eval_windows(tokens: np.ndarray, context_length: int,
                 batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping (x, y) windows, in order, whose targets are every token of `tokens` but the
    first exactly once: full windows in batches of up to `batch_size`, then the shorter last one."""
    if context_length < 1 or batch_size < 1:
        raise ValueError("context_length and batch_size must be at least 1")
    targets = max(len(tokens) - 1, 0)
    full = targets // context_length
    length = context_length + 1
    for b in range(0, full, batch_size):
        starts = np.arange(b, min(b + batch_size, full), dtype=np.int64) * context_length
        yield _gather(tokens, starts, length)
    rest = targets - full * context_length
    if rest:
        yield _gather(tokens, np.array([full * context_length], dtype=np.int64), rest + 1)
