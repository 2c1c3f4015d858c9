"""Evaluation: NLL / perplexity / bits per byte by hand, the windows, the subset mode, files and splits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from picollm.errors import UserError
from picollm.evaluation import (
    EvalResult,
    diversity_eval,
    evaluate,
    evaluate_tokens,
    parse_strategies,
    story_prompts,
    stream_from_file,
)
from picollm.models.base import LanguageModel, ModelConfig
from picollm.models.registry import build_model


class TableBigram(LanguageModel):
    """P(next | x) = table[x], as logits log(table[x]); optionally plus a per-position bias, which
    makes the result depend on where each window starts."""

    def __init__(self, table: torch.Tensor, position_logits: torch.Tensor | None = None) -> None:
        V = table.shape[0]
        P = 0 if position_logits is None else position_logits.shape[0]
        super().__init__(ModelConfig(vocab_size=V, context_length=max(P, 4)))
        self.P = P
        self.output_layer = nn.Linear(V + P, V, bias=False)
        with torch.no_grad():
            weight = table.log().t()
            if position_logits is not None:
                weight = torch.cat([weight, position_logits.t()], dim=1)
            self.output_layer.weight.copy_(weight)

    def features(self, tokens):
        h = nn.functional.one_hot(tokens, self.config.vocab_size).float()
        if self.P:
            B, T = tokens.shape
            pos = nn.functional.one_hot(torch.arange(T).clamp(max=self.P - 1), self.P).float()
            h = torch.cat([h, pos.expand(B, T, self.P)], dim=-1)
        return h

    def prefill(self, tokens):
        return self.output_layer(self.features(tokens)[:, -1]), None

    def decode(self, tokens, state):
        raise NotImplementedError


TABLE = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.25, 0.25, 0.5]])


def test_nll_and_perplexity_by_hand():
    model = TableBigram(TABLE)
    stream = np.array([0, 1, 2, 2, 0, 0, 1, 1, 2], dtype=np.uint16)
    # targets: 0->1 1->2 2->2 2->0 0->0 0->1 1->1 1->2
    logs = [math.log(p) for p in (0.3, 0.8, 0.5, 0.25, 0.5, 0.3, 0.1, 0.8)]
    expected = -sum(logs) / 8
    for context, batch, chunk in [(3, 1, 4096), (3, 2, 2), (8, 32, 1), (100, 4, 5), (1, 3, 4096)]:
        result = evaluate_tokens(model, stream, context, batch_size=batch, chunk_tokens=chunk, dtype="fp32")
        assert result.nll == pytest.approx(expected, rel=1e-6), (context, batch, chunk)
        assert result.tokens == 8
        assert result.ppl == pytest.approx(math.exp(result.nll), rel=1e-12)
        assert result.bpb is None and result.bytes is None
    assert evaluate_tokens(model, stream, 3, dtype="fp32").windows == 3  # 3 + 3 + 2 targets


def test_windows_are_non_overlapping_and_start_fresh():
    torch.manual_seed(0)
    P = 4
    position_logits = torch.randn(P, 3) * 2
    model = TableBigram(TABLE, position_logits)
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 3, size=23).astype(np.uint16)
    for C in (1, 2, 4):
        total = 0.0
        # by hand: target g (1..22) sits at position (g - 1) % C of its window
        for g in range(1, len(stream)):
            pos = min((g - 1) % C, P - 1)
            logits = TABLE[stream[g - 1]].log() + position_logits[pos]
            total += float(torch.logsumexp(logits, 0) - logits[stream[g]])
        result = evaluate_tokens(model, stream, C, batch_size=3, dtype="fp32")
        assert result.nll == pytest.approx(total / 22, rel=1e-6)
        assert result.windows == math.ceil(22 / C)


def test_bits_per_byte_constructed_case():
    # a uniform model over 4 tokens: exactly 2 bits per token
    model = TableBigram(torch.full((4, 4), 0.25))
    stream = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0], dtype=np.uint16)  # 8 targets -> 16 bits
    result = evaluate_tokens(model, stream, 4, num_bytes=4, dtype="fp32")
    assert result.nll == pytest.approx(math.log(4))
    assert result.ppl == pytest.approx(4.0)
    assert result.bpb == pytest.approx(16 / 4)
    assert result.bytes == 4
    assert evaluate_tokens(model, stream, 4, num_bytes=32, dtype="fp32").bpb == pytest.approx(0.5)
    assert result.as_dict() == {"nll": result.nll, "ppl": result.ppl, "bpb": result.bpb, "tokens": 8,
                                "bytes": 4, "windows": 2, "dtype": "fp32"}


def test_fixed_subset_mode():
    model = TableBigram(TABLE)
    stream = np.array([0, 1, 2, 2, 0, 0, 1, 1, 2, 0], dtype=np.uint16)  # 9 targets, windows of 3
    full = evaluate_tokens(model, stream, 3, num_bytes=90)
    sub = evaluate_tokens(model, stream, 3, num_bytes=90, max_windows=2)
    first = evaluate_tokens(model, stream[:7], 3)  # the first 6 targets alone
    assert (sub.tokens, sub.windows) == (6, 2)
    assert sub.nll == pytest.approx(first.nll)
    assert sub.bytes == pytest.approx(90 * 6 / 9)  # bytes scaled by the share of targets evaluated
    assert sub.bpb == pytest.approx(sub.nll * 6 / math.log(2) / 60)
    assert evaluate_tokens(model, stream, 3, num_bytes=90, max_windows=99).as_dict() == full.as_dict()
    assert evaluate_tokens(model, stream, 3, max_windows=1).tokens == 3


def test_eval_mode_restored_memmap_and_chunking(tmp_path):
    torch.manual_seed(0)
    model = build_model({"family": "transformer", "vocab_size": 50, "context_length": 8, "d_model": 16,
                         "n_heads": 2, "n_layers": 1, "dropout": 0.5})
    rng = np.random.default_rng(1)
    path = tmp_path / "tokens.bin"
    rng.integers(0, 50, size=61).astype(np.uint16).tofile(path)
    stream = np.memmap(path, dtype=np.uint16, mode="r")
    model.train()
    a = evaluate_tokens(model, stream, 8, batch_size=3, chunk_tokens=7)
    assert model.training  # restored
    b = evaluate_tokens(model, stream, 8, batch_size=64, chunk_tokens=0)  # plain loss, one batch
    assert a.nll == pytest.approx(b.nll, rel=1e-5)  # and dropout was off: deterministic
    # the reference: teacher forcing with full logits, window by window
    with torch.no_grad():
        model.eval()
        total = 0.0
        tokens = torch.from_numpy(np.asarray(stream, dtype=np.int64))
        for start in range(0, 60, 8):
            x, y = tokens[start:start + 8], tokens[start + 1:start + 9]
            logits = model(x[None, :len(y)])[0]
            total += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
    assert a.nll == pytest.approx(total / 60, rel=1e-5)


def test_bad_inputs():
    model = TableBigram(TABLE)
    with pytest.raises(UserError, match="at least 2"):
        evaluate_tokens(model, np.array([0]), 4)
    with pytest.raises(UserError, match="token id 7"):
        evaluate_tokens(model, np.array([0, 1, 7]), 4)
    with pytest.raises(UserError, match="batch size"):
        evaluate_tokens(model, np.array([0, 1, 2]), 4, batch_size=0)
    with pytest.raises(UserError, match="max windows"):
        evaluate_tokens(model, np.array([0, 1, 2]), 4, max_windows=0)
    with pytest.raises(UserError, match="context length"):
        evaluate_tokens(model, np.array([0, 1, 2]), 0)
    transformer = build_model({"family": "transformer", "vocab_size": 10, "context_length": 4, "d_model": 8,
                               "n_heads": 1, "n_layers": 1})
    with pytest.raises(UserError, match="longer than the model's 4 positions"):
        evaluate_tokens(transformer, np.array([0, 1, 2]), 5)


def test_parse_strategies():
    assert parse_strategies("greedy, top-p=0.9,top-p=1.0,top-k=5,sample,sample=0.7") == {
        "greedy": {"strategy": "greedy"},
        "top-p=0.9": {"strategy": "top-p", "top_p": 0.9},
        "top-p=1.0": {"strategy": "top-p", "top_p": 1.0},
        "top-k=5": {"strategy": "top-k", "top_k": 5},
        "sample": {"strategy": "sample"},
        "sample=0.7": {"strategy": "sample", "temperature": 0.7},
    }
    for bad in ("beam", "top-p", "top-p=x", "greedy=1", ""):
        with pytest.raises(UserError):
            parse_strategies(bad)


def test_story_prompts():
    eot = 9
    stream = np.array([eot, 1, 2, 3, eot, 4, eot, 5, 6, 7, 8, eot, 1, 1, 1], dtype=np.uint16)
    offsets = np.array([0, 4, 6, 11])
    # stories with >= P + 2 tokens (eot + 2 + a continuation): at 0, 6 and 11
    assert story_prompts(stream, offsets, 3, 2) == [[eot, 1, 2], [eot, 5, 6], [eot, 1, 1]]
    assert story_prompts(stream, offsets, 2, 2) == [[eot, 1, 2], [eot, 1, 1]]  # spread: first and last
    with pytest.raises(UserError, match="only 3 stories"):
        story_prompts(stream, offsets, 4, 2)


# ---------------------------------------------------------------------------------------------
# files, prepared splits, diversity


@pytest.fixture(scope="module")
def stories_file(tmp_path_factory, sample_path):
    text = sample_path.read_text(encoding="utf-8")[:8000]
    stories = [s.strip() for s in text.split("<|endoftext|>")][:-1]  # whole stories only
    path = tmp_path_factory.mktemp("data") / "stories.txt"
    path.write_text("\n<|endoftext|>\n".join(stories) + "\n", encoding="utf-8")
    return path, stories


@pytest.fixture(scope="module")
def bpe(stories_file):
    from picollm.data.tokenizer import train_bpe

    return train_bpe(stories_file[1], 300)


def small_transformer(tokenizer, context: int = 16):
    torch.manual_seed(0)
    model = build_model({"family": "transformer", "vocab_size": tokenizer.vocab_size,
                         "context_length": context, "d_model": 16, "n_heads": 2, "n_layers": 1})
    model.tokenizer = tokenizer
    return model.eval()


def test_evaluate_on_a_file_uses_the_stream_layout(stories_file, bpe):
    path, stories = stories_file
    model = small_transformer(bpe)
    tokens, num_bytes, offsets = stream_from_file(path, bpe)
    manual = np.concatenate([[bpe.eot_id] + bpe.encode(s) for s in stories])
    assert np.array_equal(tokens, manual)
    assert num_bytes == sum(len(s.encode("utf-8")) + 1 for s in stories)
    assert len(offsets) == len(stories) and (tokens[offsets] == bpe.eot_id).all()
    result = evaluate(model, data=path, batch_size=8)
    assert result.tokens == len(manual) - 1
    assert result.as_dict() == evaluate_tokens(model, manual, 16, batch_size=8, num_bytes=num_bytes).as_dict()
    assert isinstance(result, EvalResult) and result.tokens == len(manual) - 1
    assert 0 < result.bpb < 20
    with pytest.raises(UserError, match="no data to evaluate on"):
        evaluate(model)


def test_evaluate_a_prepared_split(stories_file, cache_dir):
    from picollm.config import DataConfig
    from picollm.data.prepare import prepare

    prepared = prepare(DataConfig(data=str(stories_file[0]), tokenizer="bpe:300", split=(0.6, 0.2, 0.2),
                                  cache_dir=str(cache_dir), num_proc=1), progress=False)
    model = small_transformer(prepared.tokenizer)
    for split in ("val", "test"):
        got = evaluate(model, split=split, prepared=prepared, max_windows=3)
        want = evaluate_tokens(model, prepared.tokens(split), 16, num_bytes=prepared.num_bytes(split),
                               max_windows=3)
        assert got.as_dict() == want.as_dict()
    with pytest.raises(UserError, match="split must be"):
        evaluate(model, split="dev", prepared=prepared)


def test_diversity_eval(bpe):
    model = small_transformer(bpe)
    prompts = ["Once upon a time", "The dog", [bpe.eot_id, 5, 6]]
    strategies = parse_strategies("greedy,top-p=0.9,top-p=1.0")
    report = diversity_eval(model, prompts, strategies, max_new_tokens=12, seed=0, return_texts=True,
                            batch_size=2)
    assert list(report) == ["greedy", "top-p=0.9", "top-p=1.0"]
    for entry in report.values():
        assert 0 <= entry["word_distinct_1"] <= 1 and 0 <= entry["token_distinct_5"] <= 1
        assert len(entry["continuations"]) == 3
        # repetition-4 is undefined (None) exactly when no continuation has 4 words
        longest = max(len(t.split()) for t in entry["continuations"])
        assert (entry["repetition_4"] is None) == (longest < 4)
        assert entry["repetition_4"] is None or 0 <= entry["repetition_4"] <= 1
    again = diversity_eval(model, prompts, strategies, max_new_tokens=12, seed=0, return_texts=True,
                           batch_size=2)
    assert again == report  # deterministic by seed
