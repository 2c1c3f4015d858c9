"""The unigram and bigram baselines against hand-computed numbers and against the models' own evaluation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from picollm.baselines import (
    Scored,
    compute_baselines,
    count_bigrams,
    did_not_train_threshold,
    score_targets,
    unigram_probs,
)
from picollm.evaluation import evaluate_tokens

# V = 3; train pairs (0,1) (1,0) (0,1) (1,2): count(0,1) = 2, count(1,0) = 1, count(1,2) = 1
TRAIN = np.array([0, 1, 0, 1, 2])
VAL = np.array([0, 1, 2])  # targets: 1 after 0, 2 after 1
TEST = np.array([2, 0])  # target: 0 after 2, a context never seen in training
VAL_UNSEEN = np.array([0, 1, 2, 1, 1])  # (1, 1) never follows in training: the best lambda is below 1


def test_counts_by_hand():
    counts = count_bigrams(TRAIN, 3)
    assert counts.targets == 4
    assert counts.unigram.tolist() == [1, 2, 1]  # targets 1 0 1 2
    assert counts.context.tolist() == [2, 2, 0]  # contexts 0 1 0 1
    assert counts.pair_counts(np.array([0, 1, 1, 2]), np.array([1, 0, 2, 0])).tolist() == [2, 1, 1, 0]
    # unigram with add-one: (count + 1) / (4 + 3)
    assert unigram_probs(counts).tolist() == pytest.approx([2 / 7, 3 / 7, 2 / 7])
    # chunked counting merges to the same sparse counts
    stream = np.random.default_rng(0).integers(0, 50, size=5000)
    whole, chunked = count_bigrams(stream, 50), count_bigrams(stream, 50, chunk=7)
    assert np.array_equal(whole.keys, chunked.keys) and np.array_equal(whole.counts, chunked.counts)
    assert np.array_equal(whole.context, chunked.context) and whole.counts.sum() == 4999


def test_bigram_smoothing_by_hand():
    counts = count_bigrams(TRAIN, 3)
    val = score_targets(counts, VAL)
    # add-k, k = 0.5: p(1|0) = (2 + .5) / (2 + 1.5), p(2|1) = (1 + .5) / (2 + 1.5)
    assert val.add_k(0.5, 3).tolist() == pytest.approx([-math.log(2.5 / 3.5), -math.log(1.5 / 3.5)])
    # interpolated, lam = 0.6: lam * count(a,b)/count(a) + (1 - lam) * p_unigram(b)
    lam = 0.6
    assert val.interpolated(lam).tolist() == pytest.approx(
        [-math.log(lam * 1.0 + (1 - lam) * 3 / 7), -math.log(lam * 0.5 + (1 - lam) * 2 / 7)])
    # a context never seen in training: add-k gives 1/V, the interpolation falls back to the unigram
    test = score_targets(counts, TEST)
    assert test.add_k(0.5, 3).tolist() == pytest.approx([math.log(3)])
    assert test.interpolated(lam).tolist() == pytest.approx([-math.log(2 / 7)])


def test_compute_baselines_chooses_smoothing_on_val_and_scores_bits_per_byte():
    record = compute_baselines(TRAIN, {"val": (VAL_UNSEEN, 10), "test": (TEST, 4)}, vocab_size=3)
    models = record["models"]
    uni = models["unigram"]
    # targets 1 2 1 1 with p_unigram = 3/7, 2/7, 3/7, 3/7
    total = -3 * math.log(3 / 7) - math.log(2 / 7)
    assert uni["val"]["nll"] == pytest.approx(total / 4)
    assert uni["val"]["tokens"] == 4 and uni["test"]["tokens"] == 1
    # bits per byte: total NLL in bits over the split's bytes
    assert uni["val"]["bpb"] == pytest.approx(total / math.log(2) / 10)
    lam = models["bigram_interpolated"]["lambda"]
    assert 0.05 < lam < 0.95
    val = score_targets(count_bigrams(TRAIN, 3), VAL_UNSEEN)
    for other in np.linspace(0.0, 0.999, 101):  # the golden-section search found the minimum
        assert val.interpolated(lam).mean() <= val.interpolated(float(other)).mean() + 1e-8
    assert models["bigram_add_k"]["val"]["nll"] == pytest.approx(val.add_k(models["bigram_add_k"]["k"], 3).mean())
    assert models["bigram_interpolated"]["val"]["nll"] == pytest.approx(val.interpolated(lam).mean())
    best = record["bigram"]
    assert models[best]["val"]["nll"] == min(models[m]["val"]["nll"] for m in ("bigram_add_k",
                                                                                 "bigram_interpolated"))
    # did not train: above the midpoint between the unigram and the bigram on validation NLL
    assert did_not_train_threshold(record) == pytest.approx((uni["val"]["nll"] + models[best]["val"]["nll"]) / 2)


class TableModel(nn.Module):
    """A language model whose logits are a fixed table of log-probabilities of the next token."""

    def __init__(self, log_probs: np.ndarray) -> None:
        super().__init__()
        vocab = log_probs.shape[0]
        self.config = SimpleNamespace(vocab_size=vocab)
        self.output_layer = nn.Linear(vocab, vocab, bias=False)
        with torch.no_grad():
            self.output_layer.weight.copy_(torch.tensor(log_probs.T, dtype=torch.float64))  # [next, previous]
        self.double()

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(tokens, self.config.vocab_size).double()


def test_the_bigram_is_scored_on_exactly_the_targets_and_bytes_of_the_evaluation():
    """A model that predicts with the bigram's own table gets the bigram's loss from evaluate_tokens:
    the same targets (every token but the first, across window cuts) and the same bytes."""
    rng = np.random.default_rng(1)
    vocab = 11
    train, val = rng.integers(0, vocab, size=3000), rng.integers(0, vocab, size=203)
    record = compute_baselines(train, {"val": (val, 777)}, vocab_size=vocab)
    lam = record["models"]["bigram_interpolated"]["lambda"]
    counts = count_bigrams(train, vocab)
    a, b = np.repeat(np.arange(vocab), vocab), np.tile(np.arange(vocab), vocab)
    every_pair = Scored(counts.pair_counts(a, b).astype(float), counts.context[a].astype(float),
                        unigram_probs(counts)[b])
    table = -every_pair.interpolated(lam).reshape(vocab, vocab)  # log p(next | previous)
    assert np.exp(table).sum(axis=1) == pytest.approx(np.ones(vocab))
    result = evaluate_tokens(TableModel(table), val, context_length=16, batch_size=4, num_bytes=777,
                             device="cpu", dtype="fp32")
    assert result.tokens == len(val) - 1
    # float32 arithmetic inside the loss; a target shifted by one would be off by ~10%
    assert result.nll == pytest.approx(record["models"]["bigram_interpolated"]["val"]["nll"], rel=1e-6)
    assert result.bpb == pytest.approx(record["models"]["bigram_interpolated"]["val"]["bpb"], rel=1e-6)


def test_baselines_are_cached_beside_the_prepared_data(tmp_path, monkeypatch):
    from picollm import baselines

    rng = np.random.default_rng(2)
    splits = {"train": rng.integers(0, 20, 500), "val": rng.integers(0, 20, 80), "test": rng.integers(0, 20, 80)}
    prepared = SimpleNamespace(directory=tmp_path, tokenizer=SimpleNamespace(vocab_size=20, name="bpe:20"),
                               tokens=lambda s: splits[s], num_bytes=lambda s: 4 * len(splits[s]))
    first = baselines.cached_baselines(prepared)
    assert (tmp_path / "baselines.json").is_file() and first["data"] == tmp_path.name
    calls = []
    monkeypatch.setattr(baselines, "baselines_for", lambda p: calls.append(p))
    assert baselines.cached_baselines(prepared) == first and not calls  # read, not computed again
