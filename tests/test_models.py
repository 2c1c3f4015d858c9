"""Every family and option behind the one interface: shapes, causality, incremental decoding, learning,
checkpoints, and a family registered from user code."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import picollm
from picollm.checkpoint import load_model, save_model
from picollm.models import registry
from picollm.models.registry import build_model

V, T = 97, 16
DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"

CONFIGS: dict[str, dict] = {
    "lstm": {"family": "lstm", "embed_dim": 24, "hidden_size": 32, "n_layers": 1},
    "lstm-2layers": {"family": "lstm", "embed_dim": 16, "hidden_size": 24, "n_layers": 2},
    "kgram-scaled": {"family": "kgram", "k": 3, "input": "scaled", "embed_dim": 16, "hidden_size": 32,
                     "inner_layers": 2},
    "kgram-onehot": {"family": "kgram", "k": 3, "input": "onehot", "embed_dim": 16, "hidden_size": 32,
                     "inner_layers": 2},
    "kgram-k1-loglinear": {"family": "kgram", "k": 1, "embed_dim": 16, "inner_layers": 0},
    "kgram-k5-onehot": {"family": "kgram", "k": 5, "input": "onehot", "embed_dim": 8, "hidden_size": 16,
                        "inner_layers": 1},
    **{
        f"transformer-{pos}-{norm}-{norm_type}": {
            "family": "transformer", "d_model": 32, "n_heads": 4, "n_layers": 2, "pos": pos, "norm": norm,
            "norm_type": norm_type}
        for pos in ("absolute", "rope", "nope")
        for norm in ("pre", "post")
        for norm_type in ("rmsnorm", "layernorm")
    },
    "transformer-untied-nobias": {"family": "transformer", "d_model": 32, "n_heads": 2, "n_layers": 2,
                                  "tie_embeddings": False, "bias": False, "pos": "rope"},
}


def make(name: str, **extra) -> picollm.LanguageModel:
    torch.manual_seed(0)
    model = build_model({**CONFIGS[name], "vocab_size": V, "context_length": 64, "dropout": 0.1, **extra})
    return model.eval()


def tokens(batch: int = 2, length: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CONFIGS)
def test_shapes_and_features_feed_the_output_layer(name):
    model = make(name)
    x = tokens()
    logits = model(x)
    assert logits.shape == (2, T, V)
    hidden = model.features(x)
    assert hidden.shape[:2] == (2, T) and hidden.shape[2] == model.output_layer.in_features
    # training computes the loss from features and the output layer's weight/bias: same logits
    layer = model.output_layer
    assert torch.allclose(F.linear(hidden, layer.weight, layer.bias), logits, atol=1e-6)
    assert model.family == CONFIGS[name]["family"]


@pytest.mark.parametrize("name", CONFIGS)
def test_causality(name):
    model = make(name)
    x = tokens()
    base = model(x)
    for t in (0, 6, T - 2):
        changed = x.clone()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1 + torch.arange(T - t - 1)) % V
        out = model(changed)
        assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-5), f"position <= {t} saw the future"
        assert not torch.allclose(out[:, t + 1:], base[:, t + 1:]), "later positions should see their tokens"


@pytest.mark.parametrize("name", CONFIGS)
def test_incremental_decoding_equals_full_forward(name):
    model = make(name)
    prompt, steps = 5, 50
    seq = tokens(length=prompt + steps, seed=2)
    with torch.no_grad():
        full = model(seq)
        logits, state = model.prefill(seq[:, :prompt])
        assert logits.shape == (2, V)
        assert (logits - full[:, prompt - 1]).abs().max() < 1e-4
        for i in range(steps):
            logits, state = model.decode(seq[:, prompt + i], state)
            assert (logits - full[:, prompt + i]).abs().max() < 1e-4, f"step {i}"


@pytest.mark.parametrize("name", ["lstm", "kgram-scaled", "kgram-onehot", "transformer-rope-pre-rmsnorm"])
def test_prefill_of_one_token(name):
    model = make(name)
    seq = tokens(length=3)
    with torch.no_grad():
        logits, state = model.prefill(seq[:, :1])
        logits, state = model.decode(seq[:, 1], state)
        assert (logits - model(seq[:, :2])[:, 1]).abs().max() < 1e-4


WIDE_OUTPUT = {  # output layers 128 wide: where next_token_logits takes its W @ h.T path on the CPU
    "lstm": {"hidden_size": 128},
    "kgram-onehot": {"hidden_size": 128},
    "transformer-untied-nobias": {"d_model": 128},
    "transformer-rope-pre-rmsnorm": {"d_model": 128},
}


@pytest.mark.parametrize("name", WIDE_OUTPUT)
@pytest.mark.parametrize("rows", [1, 2, 16, 17])
def test_next_token_logits_equal_the_output_layer(name, rows, monkeypatch):
    """The generation-step projection gives the output layer's logits, by W @ h.T for up to 16 rows."""
    model = make(name, **WIDE_OUTPUT[name])
    assert model.output_layer.in_features == 128
    hidden = torch.randn(rows, 128, generator=torch.Generator().manual_seed(3))
    calls = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a: calls.append(a) or mm(*a))
    with torch.no_grad():
        logits = model.next_token_logits(hidden)
        expected = model.output_layer(hidden)
    assert len(calls) == (1 if rows <= 16 else 0)
    assert logits.shape == (rows, V) and logits.is_contiguous()
    assert (logits - expected).abs().max() < 1e-5
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.next_token_logits(hidden).dtype == torch.bfloat16  # autocast: the plain layer
    assert len(calls) == (1 if rows <= 16 else 0)


@pytest.mark.parametrize("name", ["lstm-2layers", "kgram-scaled", "kgram-onehot",
                                  "transformer-absolute-pre-rmsnorm", "transformer-rope-post-layernorm",
                                  "transformer-untied-nobias"])
def test_a_few_steps_lower_the_loss(name):
    model = make(name).train()
    batch = tokens(batch=4, length=T + 1, seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(V), rel=0.15)  # a near-uniform start
    assert losses[-1] < losses[0] - 0.3


@pytest.mark.parametrize("name", ["lstm-2layers", "kgram-onehot", "kgram-scaled",
                                  "transformer-rope-post-layernorm", "transformer-untied-nobias"])
def test_checkpoint_round_trip(name, tmp_path):
    model = make(name)
    with torch.no_grad():  # weights that differ from a fresh build
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.family == model.family and loaded.config == model.config
    x = tokens()
    assert torch.equal(loaded(x), model(x))
    assert loaded.num_parameters() == model.num_parameters()


def test_a_model_built_directly_saves_a_loadable_checkpoint(tmp_path):
    from picollm.models.lstm import LSTMConfig, LSTMModel

    model = LSTMModel(LSTMConfig(vocab_size=V, embed_dim=8, hidden_size=8))  # not through the registry
    assert model.family == "lstm" and model.tokenizer is None and model.checkpoint_path is None
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.family == "lstm" and loaded.config == model.config
    assert loaded.checkpoint_path == tmp_path / "ckpt" and loaded.tokenizer is None  # none was saved

    class Unregistered(LSTMModel):
        family = ""

    with pytest.raises(picollm.UserError, match="not a registered model family.*register_model"):
        save_model(Unregistered(model.config), tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_flops_per_token_counts_dense_parameters():
    model = make("lstm")
    dense = model.num_parameters(non_embedding=True) + model.output_layer.weight.numel()
    assert model.flops_per_token() == 6 * dense


# ---------------------------------------------------------------------------------------------
# a family from user code: the example in docs/models.md, run as written


def _docs_example() -> str:
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("## Your own family", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def bigram_family():
    namespace: dict = {}
    code = _docs_example()
    code = code.split("# train, evaluate and generate")[0]  # those need a prepared dataset
    exec(compile(code, str(DOCS), "exec"), namespace)
    yield namespace
    registry._FAMILIES.pop("bigram", None)


def test_registered_family_builds_and_decodes(bigram_family):
    model = build_model({"family": "bigram", "vocab_size": V, "dim": 8})
    assert isinstance(model, bigram_family["Bigram"]) and model.family == "bigram"
    seq = tokens(length=10)
    full = model(seq)
    assert full.shape == (2, 10, V)
    logits, state = model.prefill(seq[:, :4])
    for i in range(4, 10):
        assert torch.allclose(logits, full[:, i - 1], atol=1e-5)
        logits, state = model.decode(seq[:, i], state)
    assert registry.preset_fields("bigram-pico") == {"family": "bigram", "dim": 32}
    from picollm.models.sizing import solve

    dim = solve("bigram", 100_000, vocab_size=1000)["dim"]  # 1000 dim (embedding) + 1000 dim + 1000 (output)
    assert abs(2000 * dim + 1000 - 100_000) <= 2000


def test_register_model_rejects_non_classes():
    with pytest.raises(TypeError):
        picollm.register_model("broken", dict, picollm.LanguageModel)  # type: ignore[arg-type]
