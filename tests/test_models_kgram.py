"""k-gram specifics: windows and padding, the onehot input against an explicit one-hot product."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from picollm.models.registry import build_model

V = 11


def kgram(**fields):
    spec = {"family": "kgram", "vocab_size": V, "k": 3, "embed_dim": 4, "hidden_size": 8, "inner_layers": 2,
            **fields}
    return build_model(spec).eval()


def tokens(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_windows_are_the_last_k_tokens_padded_with_vocab_size():
    model = kgram()
    x = torch.tensor([[5, 6, 7, 8]])
    assert model.windows(x).tolist() == [[[V, V, 5], [V, 5, 6], [5, 6, 7], [6, 7, 8]]]
    assert model.pad_id == V
    assert model.embedding.num_embeddings == V + 1  # the padding id has its own row


@pytest.mark.parametrize("input", ["onehot", "scaled"])
def test_only_the_last_k_tokens_matter(input):
    model = kgram(input=input)
    x = tokens()
    base = model(x)
    changed = x.clone()
    changed[:, :4] = (changed[:, :4] + 1) % V  # positions 0..3: outside the windows of t >= 6
    out = model(changed)
    assert torch.allclose(out[:, 6:], base[:, 6:])
    assert not torch.allclose(out[:, 4:6], base[:, 4:6])


def test_onehot_equals_an_explicit_one_hot_times_matrix():
    model = kgram(input="onehot")
    x = tokens()
    windows = model.windows(x)  # [B, T, k]
    rows = V + 1
    table = model.embedding.weight  # k stacked [V + 1, E] matrices
    one_hot = F.one_hot(windows, rows).float()  # [B, T, k, V + 1]
    inputs = torch.cat([one_hot[:, :, i] @ table[i * rows:(i + 1) * rows] for i in range(3)], dim=-1)
    reference = model.output_layer(model.mlp(inputs))
    assert torch.allclose(model(x), reference, atol=1e-5)
    assert table.shape == (3 * rows, 4)


def test_scaled_shares_one_table_scaled_by_sqrt_dim():
    model = kgram(input="scaled", embed_dim=9)
    x = tokens()
    windows = model.windows(x)
    inputs = (model.embedding.weight[windows] * math.sqrt(9)).flatten(-2)
    assert torch.allclose(model.features(x), model.mlp(inputs), atol=1e-6)
    assert model.embedding.weight.shape == (V + 1, 9)
    # both inputs start at unit variance
    big = build_model({"family": "kgram", "vocab_size": 5000, "embed_dim": 64})
    assert (big.embedding.weight * 8).std().item() == pytest.approx(1.0, rel=0.05)


def test_decode_state_slides_the_window():
    model = kgram(k=4)
    x = tokens(length=6)
    with torch.no_grad():
        _, state = model.prefill(x[:, :2])
        assert state.tolist() == [[V, V, *row] for row in x[:, :2].tolist()]
        _, state = model.decode(x[:, 2], state)
        _, state = model.decode(x[:, 3], state)
        _, state = model.decode(x[:, 4], state)
    assert torch.equal(state, x[:, 1:5])
    assert model.max_context is None


def test_features_run_on_a_long_window_at_once():
    model = kgram(inner_layers=1)
    x = tokens(batch=3, length=2048)
    assert model.features(x).shape == (3, 2048, 8)


@pytest.mark.parametrize("field,value", [("k", 0), ("input", "binary"), ("inner_layers", -1),
                                         ("embed_dim", 0)])
def test_bad_fields_name_the_key(field, value):
    from picollm.errors import UserError

    with pytest.raises(UserError, match=f"model.{field}"):
        kgram(**{field: value})
