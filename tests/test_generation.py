"""Generation: filters, sampling statistics, cache == recompute, batching, context window, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from picollm.errors import UserError
from picollm.generation import generate, generate_ids, top_k_filter, top_p_filter
from picollm.models.base import LanguageModel, ModelConfig
from picollm.models.registry import build_model

# ---------------------------------------------------------------------------------------------
# toy models

class TableBigram(LanguageModel):
    """logits(next | x) = log table[x]: a bigram with fixed probabilities, no state."""

    def __init__(self, table: torch.Tensor) -> None:
        V = table.shape[0]
        super().__init__(ModelConfig(vocab_size=V, context_length=8))
        self.output_layer = nn.Linear(V, V, bias=False)
        with torch.no_grad():
            self.output_layer.weight.copy_(table.log().t())

    def features(self, tokens):
        return nn.functional.one_hot(tokens, self.config.vocab_size).float()

    def prefill(self, tokens):
        return self.output_layer(self.features(tokens[:, -1])), None

    def decode(self, tokens, state):
        return self.output_layer(self.features(tokens)), state


class ToyGRU(LanguageModel):
    """A GRU with real incremental state and an optional context limit (to exercise the window)."""

    def __init__(self, vocab: int = 23, dim: int = 16, limit: int | None = None) -> None:
        super().__init__(ModelConfig(vocab_size=vocab, context_length=limit or 64))
        self.limit = limit
        self.embedding = nn.Embedding(vocab, dim)
        self.gru = nn.GRU(dim, dim, batch_first=True)
        self.output_layer = nn.Linear(dim, vocab)
        self.calls = {"prefill": 0, "decode": 0, "features": 0, "longest": 0}
        for p in self.parameters():
            nn.init.normal_(p, std=0.7)

    @property
    def max_context(self):
        return self.limit

    def features(self, tokens):
        self.calls["features"] += 1
        return self.gru(self.embedding(tokens))[0]

    def prefill(self, tokens):
        self.calls["prefill"] += 1
        self.calls["longest"] = max(self.calls["longest"], tokens.shape[1])
        if self.limit is not None:
            assert tokens.shape[1] <= self.limit
        out, h = self.gru(self.embedding(tokens))
        return self.output_layer(out[:, -1]), (h, tokens.shape[1])

    def decode(self, tokens, state):
        self.calls["decode"] += 1
        h, n = state
        if self.limit is not None:
            assert n + 1 <= self.limit, "the state would exceed max_context"
        out, h = self.gru(self.embedding(tokens[:, None]), h)
        return self.output_layer(out[:, -1]), (h, n + 1)


def tiny(family: str, vocab: int = 40, context: int = 12) -> LanguageModel:
    fields = {
        "lstm": {"embed_dim": 16, "hidden_size": 16, "n_layers": 2},
        "kgram": {"k": 3, "embed_dim": 8, "hidden_size": 16, "inner_layers": 1},
        "transformer": {"d_model": 16, "n_heads": 2, "n_layers": 2},
    }[family]
    model = build_model({"family": family, "vocab_size": vocab, "context_length": context, **fields})
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # spread the logits so that greedy never meets a near-tie
            p.normal_(0.0, 0.5)
    return model.eval()


def recompute_reference(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy, from scratch, written independently of picollm.generation: at every step the model
    reads the window a cached run would hold (the last max_context - 1 or max_context tokens)."""
    limit = model.max_context
    seq = list(prompt[-limit:] if limit else prompt)
    held = len(seq)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            window = torch.tensor([seq[-held:]])
            logits = model.output_layer(model.features(window)[:, -1])[0]
            tok = int(logits.argmax())
            out.append(tok)
            seq.append(tok)
            held = limit - 1 if limit is not None and held + 1 > limit else held + 1
    return out


PROBS = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])


def table_model() -> TableBigram:
    table = torch.stack([PROBS.roll(i) for i in range(5)])  # row x: PROBS rotated by x
    return TableBigram(table)


# ---------------------------------------------------------------------------------------------
# filters


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = PROBS.log()
    # mass before each token: 0, .4, .65, .85, .95
    for p, kept in [(0.3, {0}), (0.4, {0}), (0.41, {0, 1}), (0.65, {0, 1}), (0.7, {0, 1, 2}),
                    (0.9, {0, 1, 2, 3}), (0.96, {0, 1, 2, 3, 4})]:
        probs = top_p_filter(logits, p)
        assert set(torch.nonzero(probs).flatten().tolist()) == kept, p
        expected = torch.zeros(5)
        idx = sorted(kept)
        expected[idx] = PROBS[idx] / PROBS[idx].sum()
        assert torch.allclose(probs, expected, atol=1e-6)
    # order in the vocabulary does not matter
    perm = torch.tensor([3, 0, 4, 2, 1])
    assert torch.nonzero(top_p_filter(logits[perm], 0.7)).flatten().tolist() == [1, 3, 4]


def test_top_p_edge_cases():
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    # p = 1.0 keeps everything (the plain softmax), even the tiny tail
    assert torch.allclose(top_p_filter(logits, 1.0), torch.softmax(logits, -1))
    tail = torch.tensor([30.0, 0.0, 0.0])
    assert (top_p_filter(tail, 1.0) > 0).all()
    # tiny p is greedy, ties going to the lowest id as argmax does
    tiny_p = top_p_filter(logits, 1e-9)
    assert tiny_p.argmax(-1).tolist() == logits.argmax(-1).tolist() == [0, 0]
    assert (tiny_p.max(-1).values == 1.0).all()
    # ties at the boundary: only as many tied tokens as needed, lowest ids first
    uniform = top_p_filter(logits[1], 0.5)  # four of 0.2 ... mass before: 0, .2, .4, .6
    assert torch.nonzero(uniform).flatten().tolist() == [0, 1, 2]
    probs = torch.softmax(logits[0], -1)
    p = float(probs[0] + probs[1]) + 1e-4  # top token + one of the three tied ones, then a bit more
    assert torch.nonzero(top_p_filter(logits[0], p)).flatten().tolist() == [0, 1, 2]
    # deterministic
    assert torch.equal(top_p_filter(logits, 0.5), top_p_filter(logits, 0.5))


def test_top_k():
    logits = torch.tensor([1.0, 3.0, 2.0, 3.0, 0.0])
    assert torch.nonzero(top_k_filter(logits, 1)).flatten().tolist() == [1]  # tie: lowest id
    assert torch.nonzero(top_k_filter(logits, 3)).flatten().tolist() == [1, 2, 3]
    assert torch.allclose(top_k_filter(logits, 10), torch.softmax(logits, -1))
    assert top_k_filter(logits, 2).sum().item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# sampling statistics


def chi_square(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs, strict=True))


# critical values of the chi-square distribution at alpha = 0.001 (scipy is not a dependency)
CHI2_CRIT_001 = {2: 13.816, 3: 16.266, 4: 18.467}


@pytest.mark.parametrize("strategy,kwargs", [("top-p", {"top_p": 1.0}), ("sample", {})])
def test_full_sampling_matches_model_probabilities(strategy, kwargs):
    model = table_model()
    n = 4000
    ids = generate_ids(model, [[0]], strategy=strategy, max_new_tokens=1, num_samples=n, seed=0,
                       stop_at_eot=False, **kwargs)
    counts = [sum(r[0] == v for r in ids) for v in range(5)]
    assert chi_square(counts, PROBS.tolist()) < CHI2_CRIT_001[4], counts


def test_nucleus_and_temperature_sample_frequencies():
    model = table_model()
    n = 3000
    ids = generate_ids(model, [[0]], strategy="top-p", top_p=0.7, max_new_tokens=1, num_samples=n, seed=1,
                       stop_at_eot=False)
    counts = [sum(r[0] == v for r in ids) for v in range(5)]
    assert counts[3] == counts[4] == 0
    nucleus = (PROBS[:3] / PROBS[:3].sum()).tolist()
    assert chi_square(counts[:3], nucleus) < CHI2_CRIT_001[2]
    ids = generate_ids(model, [[0]], strategy="sample", temperature=2.0, max_new_tokens=1, num_samples=n,
                       seed=2, stop_at_eot=False)
    counts = [sum(r[0] == v for r in ids) for v in range(5)]
    hot = torch.softmax(PROBS.log() / 2.0, -1).tolist()
    assert chi_square(counts, hot) < CHI2_CRIT_001[4]


def test_seeded_sampling_is_deterministic():
    model = ToyGRU()
    kwargs = {"strategy": "top-p", "top_p": 0.95, "num_samples": 3, "max_new_tokens": 15}
    a = generate_ids(model, [[1, 2, 3]], seed=7, **kwargs)
    b = generate_ids(model, [[1, 2, 3]], seed=7, **kwargs)
    c = generate_ids(model, [[1, 2, 3]], seed=8, **kwargs)
    assert a == b
    assert a != c
    assert len({tuple(r) for r in a}) > 1  # samples of one call differ


# ---------------------------------------------------------------------------------------------
# cache == recompute, batching, the context window


@pytest.mark.parametrize("family", ["lstm", "kgram", "transformer"])
def test_cached_equals_recompute_for_every_family(family):
    model = tiny(family, context=12)
    prompts = [[1, 2, 3, 4, 5], [7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11]]
    steps = 16  # past the Transformer's 12 positions: the window slides
    cached = generate_ids(model, prompts, max_new_tokens=steps, stop_at_eot=False)
    recomputed = generate_ids(model, prompts, max_new_tokens=steps, stop_at_eot=False, use_cache=False)
    assert cached == recomputed
    for prompt, row in zip(prompts, cached, strict=True):
        assert row == recompute_reference(model, prompt, steps)


@pytest.mark.parametrize("family", ["lstm", "kgram", "transformer"])
def test_batched_equals_one_by_one(family):
    model = tiny(family, context=10)
    prompts = [[3], [1, 2, 3, 4, 5, 6], [5, 5, 2], [30, 31, 32, 33, 34, 35, 36, 37, 38]]
    batched = generate_ids(model, prompts, max_new_tokens=14, stop_at_eot=False)
    single = [generate_ids(model, [p], max_new_tokens=14, stop_at_eot=False)[0] for p in prompts]
    assert batched == single


def test_prefix_is_never_recomputed():
    model = ToyGRU()
    generate_ids(model, [[1, 2, 3], [4, 5]], max_new_tokens=10, stop_at_eot=False)
    # one prefill of the shortest prompt; then one decode per step: 1 prompt token + 9 fed tokens
    assert model.calls["prefill"] == 1
    assert model.calls["decode"] == 1 + 9
    assert model.calls["features"] == 0


def test_sliding_window_past_max_context():
    model = ToyGRU(limit=6)
    out = generate_ids(model, [[1, 2, 3, 4, 5]], max_new_tokens=40, stop_at_eot=False)
    assert len(out[0]) == 40
    assert model.calls["longest"] <= 6
    assert out == generate_ids(model, [[1, 2, 3, 4, 5]], max_new_tokens=40, stop_at_eot=False,
                               use_cache=False)
    # a Transformer with 8 positions, far past them, prompts longer than the context included
    transformer = tiny("transformer", context=8)
    long_prompt = list(range(1, 30))
    out = generate_ids(transformer, [long_prompt, [2]], max_new_tokens=50, stop_at_eot=False)
    assert [len(r) for r in out] == [50, 50]
    # a prompt longer than the context is cut to its last max_context tokens
    assert out[0] == generate_ids(transformer, [long_prompt[-8:]], max_new_tokens=50, stop_at_eot=False)[0]
    # max_context 1: every step is a re-prefill of one token
    assert len(generate_ids(ToyGRU(limit=1), [[1, 2]], max_new_tokens=5, stop_at_eot=False)[0]) == 5


def test_stops_per_row_at_eot():
    table = torch.full((4, 4), 0.01)
    table[0, 1] = table[1, 2] = table[2, 3] = table[3, 0] = 0.97  # 0 -> 1 -> 2 -> 3 -> 0 (eot)
    table = table / table.sum(1, keepdim=True)
    model = TableBigram(table)
    out = generate_ids(model, [[1], [3], [2]], max_new_tokens=10, eot_id=0)
    assert out == [[2, 3], [], [3]]
    assert generate_ids(model, [[1]], max_new_tokens=5, eot_id=0, stop_at_eot=False) == [[2, 3, 0, 1, 2]]
    assert generate_ids(model, [[1]], max_new_tokens=0) == [[]]


def test_training_mode_restored_and_tensor_prompts():
    model = ToyGRU().train()
    out = generate_ids(model, torch.tensor([[1, 2], [3, 4]]), max_new_tokens=3, stop_at_eot=False)
    assert model.training
    assert out == generate_ids(model, [[1, 2], [3, 4]], max_new_tokens=3, stop_at_eot=False)
    assert out[:1] == generate_ids(model, torch.tensor([1, 2]), max_new_tokens=3, stop_at_eot=False)


# ---------------------------------------------------------------------------------------------
# text level


class CharTokenizer:
    """'a'..'z' -> 1..26, eot = 0; a stand-in with the Tokenizer interface."""

    name = "chars"
    vocab_size = 27
    eot_id = 0

    def encode(self, text):
        return [ord(c) - 96 for c in text]

    def decode(self, ids):
        return "".join(chr(96 + i) for i in ids if i != 0)


def test_generate_text_streaming_and_prompts():
    tok = CharTokenizer()
    model = ToyGRU(vocab=27)
    model.tokenizer = tok
    pieces: dict[int, list[str]] = {}
    texts = generate(model, ["ab", "xyz"], strategy="top-k", top_k=5, num_samples=2, max_new_tokens=12,
                     on_token=lambda row, piece: pieces.setdefault(row, []).append(piece))
    assert len(texts) == 4
    assert all("".join(pieces.get(i, [])) == t for i, t in enumerate(texts))
    # a text prompt is read as the start of a story: eot first
    ids = generate_ids(model, [[0, 1, 2], [0, 24, 25, 26]], strategy="top-k", top_k=5, num_samples=2,
                       max_new_tokens=12)
    assert texts == [tok.decode(r) for r in ids]
    # list[int] prompts are used as they are; "" starts from eot alone
    assert generate(model, [1, 2], max_new_tokens=5) == [tok.decode(generate_ids(model, [[1, 2]],
                                                                                 max_new_tokens=5)[0])]
    assert len(generate(model, "", max_new_tokens=5, stop_at_eot=False)[0]) == 5
    # model.generate delegates
    assert model.generate("ab", max_new_tokens=4) == generate(model, "ab", max_new_tokens=4)


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("kwargs,match", [
    ({"strategy": "beam"}, "unknown generation strategy 'beam'"),
    ({"strategy": "top-p", "top_p": 0.0}, "top-p must be in"),
    ({"top_p": 1.5}, "top-p must be in"),
    ({"temperature": 0.0}, "temperature must be a positive number"),
    ({"temperature": -1.0}, "temperature must be a positive number"),
    ({"top_k": 0}, "top-k must be an integer >= 1"),
    ({"max_new_tokens": -1}, "max-new-tokens must be an integer >= 0"),
    ({"num_samples": 0}, "num-samples must be an integer >= 1"),
])
def test_bad_arguments_raise_user_errors(kwargs, match):
    model = ToyGRU(vocab=27)
    with pytest.raises(UserError, match=match):
        generate_ids(model, [[1]], **kwargs)
    with pytest.raises(UserError, match=match):
        generate(model, "ab", tokenizer=CharTokenizer(), **kwargs)


def test_bad_prompts():
    model = ToyGRU(vocab=27)
    with pytest.raises(UserError, match="empty"):
        generate_ids(model, [[]])
    with pytest.raises(UserError, match="not an id"):
        generate_ids(model, [[27]])
    with pytest.raises(UserError, match="no tokenizer"):
        generate(model, "ab")
    with pytest.raises(UserError):
        generate(model, [], tokenizer=CharTokenizer())


def test_non_finite_logits():
    model = ToyGRU()
    with torch.no_grad():
        model.output_layer.bias.fill_(math.nan)
    with pytest.raises(UserError, match="non-finite"):
        generate_ids(model, [[1]], strategy="sample", max_new_tokens=2)
