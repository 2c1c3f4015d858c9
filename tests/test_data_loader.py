from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from picollm.data.loader import WindowLoader, eval_windows


def _stream(n: int, tmp_path: Path | None = None) -> np.ndarray:
    """Token i has value i (as uint32), so a batch says exactly which positions it used."""
    values = np.arange(n, dtype=np.uint32)
    if tmp_path is None:
        return values
    path = tmp_path / "tokens.bin"
    values.tofile(path)
    return np.memmap(path, dtype=np.uint32, mode="r", shape=(n,))


def _targets(loader: WindowLoader, epoch: int, start_batch: int = 0) -> list[np.ndarray]:
    out = []
    for x, y in loader.epoch_batches(epoch, start_batch):
        assert x.dtype == y.dtype == torch.int64
        assert x.shape == y.shape and x.shape[1] == loader.context_length
        assert torch.equal(x + 1, y)  # y is x shifted by one token
        assert torch.equal(x[:, 0] % loader.context_length, torch.zeros_like(x[:, 0]))  # stride T
        out.append(y.numpy())
    return out


def test_every_training_token_once_per_epoch(tmp_path: Path) -> None:
    n, t, b = 1003, 16, 5
    loader = WindowLoader(_stream(n, tmp_path), context_length=t, batch_size=b, seed=3)
    assert loader.windows_per_epoch == (n - 1) // t == 62
    assert loader.dropped_tokens == (n - 1) - 62 * t == 10
    assert loader.batches_per_epoch == len(loader) == 13
    orders = []
    for epoch in range(3):
        batches = _targets(loader, epoch)
        assert len(batches) == 13 and len(batches[-1]) == 62 - 12 * b  # the last batch is smaller
        targets = np.concatenate([y.ravel() for y in batches])
        assert np.array_equal(np.sort(targets), np.arange(1, 62 * t + 1))  # each target exactly once
        orders.append(targets)
    assert not np.array_equal(orders[0], orders[1])  # a new order each epoch
    again = WindowLoader(_stream(n), context_length=t, batch_size=b, seed=3)
    assert np.array_equal(np.concatenate([y.ravel() for y in _targets(again, 1)]), orders[1])  # seeded
    other = WindowLoader(_stream(n), context_length=t, batch_size=b, seed=4)
    assert not np.array_equal(np.concatenate([y.ravel() for y in _targets(other, 1)]), orders[1])


def test_rank_shards_are_disjoint() -> None:
    n, t, b, world = 2001, 8, 7, 3
    loaders = [WindowLoader(_stream(n), t, b, seed=1, rank=r, world_size=world) for r in range(world)]
    windows = (n - 1) // t  # 250
    assert all(ld.windows_per_epoch == windows // world for ld in loaders)
    assert len({ld.batches_per_epoch for ld in loaders}) == 1  # ranks step together
    assert loaders[0].dropped_tokens == (n - 1) - (windows // world) * world * t
    for epoch in range(2):
        per_rank = [np.concatenate([y.ravel() for y in _targets(ld, epoch)]) for ld in loaders]
        union = np.concatenate(per_rank)
        assert len(np.unique(union)) == len(union) == (windows // world) * world * t
    with pytest.raises(ValueError):
        WindowLoader(_stream(n), t, b, seed=1, rank=3, world_size=3)


def test_resume_with_start_batch() -> None:
    loader = WindowLoader(_stream(500), context_length=10, batch_size=4, seed=0)
    full = list(loader.epoch_batches(2))
    resumed = list(loader.epoch_batches(2, start_batch=5))
    assert len(resumed) == len(full) - 5
    for (x1, y1), (x2, y2) in zip(full[5:], resumed, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert list(loader.epoch_batches(2, start_batch=loader.batches_per_epoch)) == []
    with pytest.raises(ValueError):
        next(loader.epoch_batches(0, start_batch=loader.batches_per_epoch + 1))


def test_short_stream() -> None:
    loader = WindowLoader(_stream(5), context_length=8, batch_size=2, seed=0)
    assert (loader.windows_per_epoch, loader.batches_per_epoch, loader.dropped_tokens) == (0, 0, 4)
    assert list(loader.epoch_batches(0)) == []


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 300), t=st.integers(1, 20), b=st.integers(1, 9))
def test_eval_windows_cover_every_target_once(n: int, t: int, b: int) -> None:
    tokens = _stream(n)
    ys = []
    for x, y in eval_windows(tokens, t, b):
        assert x.dtype == torch.int64 and x.shape == y.shape
        assert x.shape[0] <= b and x.shape[1] <= t
        assert torch.equal(x + 1, y)
        ys.append(y.ravel().numpy())
    targets = np.concatenate(ys) if ys else np.zeros(0, dtype=np.int64)
    assert np.array_equal(targets, np.arange(1, max(n, 1)))  # in order, each once


def test_eval_windows_last_is_shorter() -> None:
    shapes = [tuple(x.shape) for x, _ in eval_windows(_stream(26), context_length=4, batch_size=4)]
    assert shapes == [(4, 4), (2, 4), (1, 1)]
