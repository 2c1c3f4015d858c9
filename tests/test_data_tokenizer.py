from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from picollm.data.tokenizer import (
    EOT,
    Tokenizer,
    get_tokenizer,
    load_tokenizer,
    train_bpe,
)
from picollm.errors import UserError

TRICKY = [
    "",
    " ",
    "Hello world",
    "naïve café, Ærøskøbing, Łódź, straße",
    "日本語のテキストと한국어 텍스트",
    "emoji 🙂👩‍👩‍👧‍👦🏳️‍🌈 and a flag 🇫🇷",
    "line one\r\nline two\r\n\r\nline four\r",
    "tabs\tand\x00nul\x1fcontrol\x7f",
    "  leading and trailing spaces   ",
    "combining e\u0301 and rtl \u05e9\u05dc\u05d5\u05dd \u202e",
    "a literal " + EOT + " inside a story",
    EOT,
    "\n\n\n",
    "\ufffd replacement char and \U0010ffff max code point",
]


def _made_up_corpus(n: int = 300, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "little", "dog", "ran", "happy", "sun", "tree", "said",
             "Tom", "Mia", "big", "red", "ball", "played", "day", "café", "über", "🙂"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(_made_up_corpus(), 320)


def test_gpt2_known_ids(gpt2: Tokenizer) -> None:
    assert gpt2.name == "gpt2"
    assert gpt2.vocab_size == 50257
    assert gpt2.eot_id == 50256
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" world") == [995]
    assert gpt2.encode("The cat") == [464, 3797]
    assert gpt2.decode([15496, 995]) == "Hello world"
    assert gpt2.decode([gpt2.eot_id]) == EOT


@pytest.mark.parametrize("name", ["gpt2", "bpe"])
@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky(name: str, text: str, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(name)
    ids = tok.encode(text)
    assert tok.eot_id not in ids  # never emitted from text, even for a literal <|endoftext|>
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, text]) == [ids, ids]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80))
def test_round_trip_any_text(gpt2: Tokenizer, bpe: Tokenizer, text: str) -> None:
    for tok in (gpt2, bpe):
        ids = tok.encode(text)
        assert tok.eot_id not in ids
        assert tok.decode(ids) == text


def test_bpe_training(bpe: Tokenizer) -> None:
    assert bpe.name == "bpe:320"
    assert 257 <= bpe.vocab_size <= 320
    assert 0 <= bpe.eot_id < bpe.vocab_size
    assert bpe.decode([bpe.eot_id]) == EOT
    # merges were learned: a frequent word is shorter than its bytes
    assert len(bpe.encode("the cat sat")) < len(b"the cat sat")


def test_bpe_training_is_deterministic(bpe: Tokenizer) -> None:
    again = train_bpe(_made_up_corpus(), 320)
    text = " ".join(_made_up_corpus(5, seed=9))
    assert again.encode(text) == bpe.encode(text)


def test_decode_out_of_vocabulary_ids(gpt2: Tokenizer, bpe: Tokenizer) -> None:
    assert gpt2.decode([15496, 50300, 995]) == "Hello\ufffd world"
    assert bpe.decode([bpe.vocab_size + 5]) == "\ufffd"


@pytest.mark.parametrize("name", ["gpt2", "bpe"])
def test_save_load_and_pickle(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(name)
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer"] == tok.name
    assert (tmp_path / "tokenizer.json").exists() == (name == "bpe")
    loaded = load_tokenizer(tmp_path)
    copied = pickle.loads(pickle.dumps(tok))
    for other in (loaded, copied):
        assert (other.name, other.vocab_size, other.eot_id) == (tok.name, tok.vocab_size, tok.eot_id)
        for text in TRICKY:
            assert other.encode(text) == tok.encode(text)


def test_load_errors(tmp_path: Path, bpe: Tokenizer) -> None:
    with pytest.raises(UserError, match="tokenizer_config.json is missing"):
        load_tokenizer(tmp_path)
    bpe.save(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="tokenizer.json is missing"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[]")
    with pytest.raises(UserError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("spec", ["gpt3", "bpe", "bpe:x", "bpe:10", "BPE:4096", ""])
def test_unknown_spec(spec: str) -> None:
    with pytest.raises(UserError, match="gpt2, bpe:N"):
        get_tokenizer(spec)


def test_bpe_spec_needs_training() -> None:
    with pytest.raises(UserError, match="trained"):
        get_tokenizer("bpe:4096")
