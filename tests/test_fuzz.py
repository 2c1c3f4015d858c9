"""Bad input, fuzzed (issue 8): config files and overrides, prompts, data files, damaged checkpoints.

Each input either works or gives a `UserError` (exit code 2, one line naming the key, file or value),
never another exception; data is never lost silently: every story comes back, and what was dropped
or replaced is counted. Example counts are modest so the file runs in seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import picollm.data.sources as sources
from picollm.checkpoint import load_model, save_model
from picollm.cli import main
from picollm.config import DataConfig, RunConfig, TrainConfig, from_dict, load_run_config, to_dict
from picollm.data.prepare import prepare
from picollm.data.sources import iter_stories
from picollm.data.tokenizer import train_bpe
from picollm.errors import UserError
from picollm.generation import generate
from picollm.models.registry import build_model, families
from picollm.training.trainer import RunResult

# PICOLLM_FUZZ_EXAMPLES=1000 pytest tests/test_fuzz.py fuzzes harder (the suite keeps it quick)
EXAMPLES = int(os.environ.get("PICOLLM_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=max(1, EXAMPLES * 5 // 8), deadline=None, suppress_health_check=[HealthCheck.too_slow])
EOT = "<|endoftext|>"
# made-up stories (the sample's text is never copied into the repository)
STORIES = [
    "Lily had a kite shaped like a fish. The wind took it high over the hill, and she laughed.",
    "Sam and his cat sat by the window. Rain fell on the glass, and the cat tried to catch the drops.",
    "A little frog could not jump very far. Each day he tried again, until he reached the big rock.",
    "Grandma baked bread with Max. The kitchen smelled warm and sweet, and they ate it with jam.",
] * 3


def call_main(argv: list[str]) -> tuple[int, str, str]:
    """`picollm.cli.main(argv)`: exit code, stdout, stderr. argparse's SystemExit counts as its code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def assert_clear_error(code: int, err: str, verb: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(("picollm", "usage")), err
    assert lines[0].startswith(f"picollm {verb}: error: ") or "error:" in lines[0], err


def has_message(exc: UserError) -> None:
    """A UserError says something (the CLI prints it as one line: `assert_clear_error`)."""
    assert str(exc).strip(), repr(exc)


# --- config files and overrides ------------------------------------------------------------------

TRAIN_KEYS = [f.name for f in dataclasses.fields(TrainConfig)]
DATA_KEYS = [f.name for f in dataclasses.fields(DataConfig)]
MODEL_KEYS = sorted({f.name for fam in families() for f in dataclasses.fields(fam.config_cls)} | {"family"})
FAMILIES = [fam.name for fam in families()] + ["rnn", "", "Transformer"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1), st.text(max_size=12),
    st.sampled_from(["1e-3", "bpe:300", "gpt2", "cosine", "adamw", "cpu", "fp32", "rmsnorm", "absolute", "yes"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


def section(keys: list[str]) -> st.SearchStrategy:
    key = st.one_of(st.sampled_from(keys), st.sampled_from(keys), st.text(max_size=8), st.integers(-5, 5))
    return st.dictionaries(key, values, max_size=6)


model_section = st.builds(lambda family, rest: {"family": family, **rest}, st.sampled_from(FAMILIES),
                          section(MODEL_KEYS))
config_documents = st.fixed_dictionaries({}, optional={
    "data": st.one_of(section(DATA_KEYS), values),
    "model": st.one_of(model_section, section(MODEL_KEYS), values),
    "train": st.one_of(section(TRAIN_KEYS), values),
    "out": values,
}).flatmap(lambda doc: st.one_of(st.just(doc), st.builds(lambda extra: {**doc, **extra},
                                                                   st.dictionaries(st.text(max_size=5), values,
                                                                                   max_size=2))))


def check_accepted(cfg: RunConfig) -> None:
    """An accepted config is finite, and survives the round trip through the run's config.yaml."""
    data = to_dict(cfg)

    def floats(value):
        if isinstance(value, float):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from floats(v)
        elif isinstance(value, list):
            for v in value:
                yield from floats(v)

    assert all(math.isfinite(v) for v in floats(data)), data
    again = from_dict(RunConfig, yaml.safe_load(yaml.safe_dump(data, sort_keys=False)))
    assert to_dict(again) == data


def stub_trainer():
    """The trainer's entry points replaced: these tests are about reading the config, not training."""
    seen = []

    def fake_train(config, **kwargs):
        assert isinstance(config, RunConfig)
        seen.append(config)
        return RunResult(Path(config.out), {"status": "finished"})

    def fake_dry_run(config, **kwargs):
        assert isinstance(config, RunConfig)
        seen.append(config)
        return {"steps": 1}

    def fake_resume(directory, progress=True, overrides=None):
        return RunResult(Path(directory), {"status": "finished"})

    from picollm.training import trainer

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(trainer, "train", fake_train))
    stack.enter_context(mock.patch.object(trainer, "dry_run", fake_dry_run))
    stack.enter_context(mock.patch.object(trainer, "resume_run", fake_resume))
    return stack, seen


@FUZZ
@given(doc=config_documents)
@example(doc={1: 2, "train": {}})  # a number as a key
@example(doc={"model": {"family": "transformer", 1: 2, "x": 3}})
@example(doc={"train": {"epochs": math.inf}})
@example(doc={"train": {"lr": math.inf}})
@example(doc={"train": {"lr": math.nan}})
@example(doc={"data": {"split": [math.nan, 0.5, 0.5]}})
def test_fuzzed_config_files_load_or_name_the_problem(doc):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        try:
            cfg = load_run_config(path)
        except UserError as exc:
            has_message(exc)
        else:
            check_accepted(cfg)
        stack, seen = stub_trainer()
        with stack:
            code, _, err = call_main(["train", "--config", str(path), "--out", str(Path(tmp) / "run")])
        if code != 0:
            assert_clear_error(code, err, "train")
        else:
            check_accepted(seen[-1])


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200)))
@example(text="[" * 5000)
@example(text="a: {" * 3000)
@example(text=b"\xff\xfe not utf-8")
@example(text="train:\n  lr: 1e-3\n\tbad: tab\n")
@example(text="- 1\n- 2\n")
@example(text="train: !!python/object/apply:os.system ['true']\n")
def test_fuzzed_config_file_text_loads_or_names_the_problem(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        try:
            cfg = load_run_config(path, {"model.family": "transformer"})
        except UserError as exc:
            has_message(exc)
        else:
            check_accepted(cfg)


override_flags = st.sampled_from(
    ["--train.lr", "--train.batch_size", "--train.epochs", "--train.max_steps", "--model.d_model", "--model.family",
     "--model.n_layers", "--data.split", "--data.tokenizer", "--data.num_stories", "--train.betas", "--train.",
     "--.lr", "--train..lr", "--out.x", "--model", "--foo.bar", "--train.lr=", "--model.k=3", "--train.dtype=bf16",
     "--data.split=[0.5,0.5,0]", "--train.warmup_ratio=.nan", "--train.lr=1e999", "--train.epochs=.inf"])
argv_tokens = st.one_of(
    override_flags, override_flags,
    st.sampled_from(["--preset", "transformer-pico", "lstm-tiny", "kgram-nope", "--fresh", "--dry-run", "--json",
                     "--device", "cpu", "--dtype", "fp16", "--tokenizer", "bpe:300", "--compile", "--no-progress",
                     "--out", "--config", "1e-3", "[1, 2]", "{a: 1}", "null", "true", "-1", "3", "0.5", ""]),
    st.text(max_size=8).filter(lambda t: t not in ("-h", "--help", "--version") and not t.startswith("--h")),
    st.from_regex(r"--(train|model|data)\.[a-z_]{1,12}(=[-0-9a-z.e\[\], ]{0,8})?", fullmatch=True),
)


@FUZZ
@given(argv=st.lists(argv_tokens, max_size=8))
@example(argv=["--preset", "transformer-pico", "--train.epochs", "1e999"])
@example(argv=["--preset", "transformer-pico", "--model.d_model"])
@example(argv=["--model.family", "lstm", "--resume"])
def test_fuzzed_command_lines_run_or_name_the_problem(argv):
    stack, seen = stub_trainer()
    with stack:
        code, _, err = call_main(["train", *argv])
    if code == 0:
        assert all(isinstance(c, RunConfig) for c in seen)
        for cfg in seen:
            check_accepted(cfg)
    else:
        assert_clear_error(code, err, "train")


# --- prompts -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(STORIES, 300)


@pytest.fixture(scope="module")
def models(tokenizer) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    specs = {
        "transformer": {"family": "transformer", "d_model": 16, "n_heads": 2, "n_layers": 1, "context_length": 8},
        "lstm": {"family": "lstm", "embed_dim": 8, "hidden_size": 8, "context_length": 8},
        "kgram": {"family": "kgram", "k": 3, "context_length": 8},
    }
    out = {}
    for name, spec in specs.items():
        model = build_model({**spec, "vocab_size": tokenizer.vocab_size}).eval()
        model.tokenizer = tokenizer
        out[name] = model
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, models, tokenizer) -> Path:
    return save_model(models["transformer"], tmp_path_factory.mktemp("fuzz") / "ckpt", tokenizer)


any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=60)  # surrogates included
prompts = st.one_of(any_text, st.text(max_size=3), st.sampled_from(["", " ", "\n", "\x00", EOT, EOT * 3, "\ufeff"]),
                    st.text(alphabet="ab \n", min_size=200, max_size=2000))


@FUZZ
@given(prompt=prompts, family=st.sampled_from(["transformer", "lstm", "kgram"]),
       strategy=st.sampled_from(["greedy", "top-p", "top-k", "sample"]), add_eot=st.booleans())
@example(prompt="\ud800", family="transformer", strategy="greedy", add_eot=True)
@example(prompt="", family="lstm", strategy="greedy", add_eot=False)
def test_fuzzed_prompts_generate_or_name_the_problem(models, prompt, family, strategy, add_eot):
    try:
        texts = generate(models[family], prompt, strategy=strategy, max_new_tokens=3, add_eot=add_eot,
                         stop_at_eot=False)
    except UserError as exc:
        has_message(exc)
        assert "prompt" in str(exc)
    else:
        assert len(texts) == 1 and isinstance(texts[0], str)
        texts[0].encode("utf-8")  # printable


@FEW
@given(prompt=prompts, mode=st.sampled_from([[], ["--json"], ["--stream"], ["--no-eot-prefix"]]))
@example(prompt="\udcff\udcfe", mode=["--stream"])  # what invalid UTF-8 bytes in argv become
@example(prompt="", mode=["--no-eot-prefix"])
def test_fuzzed_prompts_through_the_cli(checkpoint, prompt, mode):
    code, out, err = call_main(["generate", str(checkpoint), f"--prompt={prompt}", "--max-new-tokens", "2",
                                "--device", "cpu", *mode])
    if code == 0:
        out.encode("utf-8")  # a real UTF-8 stdout could print it
        if "--json" in mode:
            assert json.loads(out)["samples"][0]["prompt"] == prompt
        else:
            assert out.startswith(prompt)
    else:
        assert_clear_error(code, err, "generate")
        assert out == ""


@pytest.mark.parametrize("family", ["transformer", "lstm", "kgram"])
def test_a_very_long_prompt(models, family):
    prompt = " ".join(STORIES) * 60  # ~60k characters, far past any context
    texts = generate(models[family], prompt, max_new_tokens=4, stop_at_eot=False)
    assert len(texts) == 1


# --- data files ----------------------------------------------------------------------------------

INVALID_UTF8 = [b"\xff", b"\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf5\x80\x80\x80", b"\xe2\x82", b"\xc3"]
story_chars = st.one_of(st.characters(exclude_categories=("Cs",)),
                        st.sampled_from(["\r", "\n", "\x00", " ", "\t", "\ufeff", "\u2028", "\x85", "\ufffd", "\x0c"]))
stories = st.lists(st.one_of(st.text(story_chars, max_size=30), st.sampled_from(["", " ", "\n \r\n", "\x00"])),
                   min_size=1, max_size=8)


def _without_separator_lines(story: str) -> str:
    # a line reading exactly "<|endoftext|>" would be a separator, not text
    return story.replace(EOT, "<|end of text|>")


@st.composite
def tinystories_files(draw):
    """(file bytes, the stories, each as raw bytes) in TinyStories' layout with optional damage."""
    texts = [_without_separator_lines(s) for s in draw(stories)]
    crlf = draw(st.booleans())
    if crlf:
        texts = [t.replace("\r\n", "\n").replace("\n", "\r\n") for t in texts]
    raws = []
    for text in texts:
        raw = text.encode("utf-8")
        if draw(st.integers(0, 3)) == 0:  # invalid bytes, at a character boundary
            chars = list(text)
            at = draw(st.integers(0, len(chars)))
            raw = ("".join(chars[:at])).encode() + draw(st.sampled_from(INVALID_UTF8)) + "".join(chars[at:]).encode()
        raws.append(raw)
    newline = b"\r\n" if crlf else b"\n"
    sep = newline + EOT.encode() + newline
    body = sep.join(raws) + sep
    bom = draw(st.booleans())
    return (b"\xef\xbb\xbf" if bom else b"") + body, raws


def expected_stories(raws: list[bytes]) -> tuple[list[str], int]:
    """What reading them must give: the non-empty stories (stripped, invalid bytes replaced) and the
    count of empty ones dropped (blank text before the file's first separator is no story)."""
    texts = [r.decode("utf-8", errors="replace").strip() for r in raws]
    dropped = sum(1 for i, t in enumerate(texts) if not t and i > 0)
    return [t for t in texts if t], dropped


@FUZZ
@given(case=tinystories_files(), block=st.sampled_from([1, 5, 64, 4096, 8 << 20]))
def test_fuzzed_tinystories_files_lose_nothing_silently(case, block):
    data, raws = case
    want, dropped = expected_stories(raws)
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(sources, "_BLOCK_BYTES", block):
        path = Path(tmp) / "stories.txt"
        path.write_bytes(data)
        body = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
        replaced = body.decode("utf-8", errors="replace").count("\ufffd") - body.count("\ufffd".encode())
        stream = iter_stories(str(path), encoding_errors="replace")
        got = list(stream)
        assert got == want
        assert stream.dropped_empty == dropped and stream.replacements == replaced
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            with pytest.raises(UserError, match=f"invalid UTF-8 at byte offset {exc.start}") as err:
                list(iter_stories(str(path)))
            assert str(path) in str(err.value) and "--data.encoding_errors replace" in str(err.value)
        else:
            assert list(iter_stories(str(path))) == want


@st.composite
def jsonl_files(draw):
    """(file bytes, records' texts) as JSON lines; texts may be null, blank or hold lone surrogates."""
    texts = draw(st.lists(st.one_of(st.text(story_chars, max_size=30), st.none(), st.just(""),
                                    st.text(st.characters(exclude_categories=()), max_size=8)),
                          min_size=1, max_size=8))
    ascii_only = draw(st.booleans())
    lines = []
    for text in texts:
        lines.append(json.dumps({"id": len(lines), "text": text}, ensure_ascii=ascii_only))
        if draw(st.integers(0, 5)) == 0:
            lines.append("   ")  # blank lines between records are allowed
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    text = newline.join(lines) + draw(st.sampled_from(["", newline]))
    raw = text.encode("utf-8", errors="surrogatepass")  # ensure_ascii=False can write a lone surrogate raw
    bom = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
    return bom + raw, texts


@FUZZ
@given(case=jsonl_files(), block=st.sampled_from([3, 64, 8 << 20]))
@example(case=(b'{"text": "a\\ud800b"}\n{"text": "ok"}\n', ["a\ud800b", "ok"]), block=64)
def test_fuzzed_jsonl_files_lose_nothing_silently(case, block):
    data, texts = case
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(sources, "_BLOCK_BYTES", block):
        path = Path(tmp) / "stories.jsonl"
        path.write_bytes(data)
        stream = iter_stories(str(path), encoding_errors="replace")
        got = list(stream)
        fixed = [None if t is None else t.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
                 for t in texts]
        # a surrogate escaped in JSON is one U+FFFD; written raw (3 invalid bytes), three
        want = [f.strip() for f in fixed if f is not None and f.strip()]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.replace("\ufffd", "") == w.replace("\ufffd", "")
        assert stream.dropped_empty == sum(1 for f in fixed if f is None or not f.strip())
        assert stream.replacements == sum(g.count("\ufffd") for g in got) - sum(
            t.count("\ufffd") for t in texts if t and t.strip())
        bad = any(t is not None and any("\ud800" <= c <= "\udfff" for c in t) for t in texts)
        if bad:
            with pytest.raises(UserError, match="UTF-8|surrogate") as err:
                list(iter_stories(str(path)))
            assert str(path) in str(err.value)
        else:
            assert list(iter_stories(str(path))) == got


@FUZZ
@given(data=st.binary(max_size=400), ext=st.sampled_from([".txt", ".jsonl", ".json"]),
       errors=st.sampled_from(["strict", "replace"]))
@example(data=b"\x00\x00\x00", ext=".txt", errors="strict")
@example(data=b"[" * 3000, ext=".json", errors="strict")
@example(data=b'{"text": 5}', ext=".jsonl", errors="strict")
@example(data=b'["a", null, 3]', ext=".json", errors="strict")
@example(data=b'"just a string"', ext=".json", errors="strict")
def test_fuzzed_bytes_read_or_name_the_file(data, ext, errors):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{ext}"
        path.write_bytes(data)
        try:
            got = list(iter_stories(str(path), encoding_errors=errors))
        except UserError as exc:
            has_message(exc)
            assert str(path) in str(exc)
        else:
            assert all(isinstance(s, str) and s == s.strip() and s for s in got)
            if ext == ".txt" and errors == "replace":
                assert sum(len(s) for s in got) <= len(data)


@FEW
@given(case=tinystories_files())
def test_fuzzed_files_prepare_into_the_same_stories(case):
    """Through `prepare`: every story decodes back from the token files, and the counts are in meta."""
    data, raws = case
    want, dropped = expected_stories(raws)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stories.txt"
        path.write_bytes(data)
        cfg = DataConfig(data=str(path), split=(1.0, 0.0, 0.0), tokenizer="bpe:260", encoding_errors="replace",
                         num_proc=1, cache_dir=str(Path(tmp) / "cache"))
        try:
            prepared = prepare(cfg, progress=False)
        except UserError as exc:
            has_message(exc)
            assert not want and "holds no stories" in str(exc)
            return
        meta = prepared.meta
        assert meta["source_stories"] == len(want) and meta["dropped_empty"] == dropped
        body = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
        assert meta["replacements"] == body.decode("utf-8", "replace").count("\ufffd") - body.count(
            "\ufffd".encode())
        tokens, offsets = prepared.tokens("train"), prepared.story_offsets("train")
        bounds = list(offsets[1:]) + [len(tokens)]
        decoded = [prepared.tokenizer.decode(tokens[a + 1:b]) for a, b in zip(offsets, bounds)]
        assert decoded == want
        assert meta["splits"]["train"]["bytes"] == sum(len(s.encode()) + 1 for s in want)


def test_one_huge_story_passes_whole(tmp_path):
    """A story larger than the reader's 8 MiB blocks, one line of it longer than a block."""
    line = "The sun was warm and the grass was soft. " * 250_000  # ~10 MB, no newline
    big = line + "\n\nShe slept.\r\n" + "x" * 10
    path = tmp_path / "big.txt"
    path.write_text(f"First.\n{EOT}\n{big}\n{EOT}\nLast.\n{EOT}\n", encoding="utf-8")
    assert path.stat().st_size > 9 * 2**20
    stream = iter_stories(str(path))
    got = list(stream)
    assert got == ["First.", big.strip(), "Last."]
    assert stream.dropped_empty == 0 and stream.replacements == 0


def test_data_file_errors_through_the_cli(tmp_path):
    cases = {
        "nul.jsonl": (b'{"text": "a"}\n{"text": "b\x00c"}\n', "not valid JSON"),
        "bad.txt": (b"ok\n<|endoftext|>\n" + b"caf\xe9\n<|endoftext|>\n", "invalid UTF-8 at byte offset 20"),
        "surrogate.json": (b'[{"text": "fine"}, {"text": "x\\udc80y"}]', "unpaired surrogate \\udc80"),
        "notext.jsonl": (b'{"body": "a"}\n', "no field 'text'"),
        "empty.txt": (b"\xef\xbb\xbf \r\n\r\n", "holds no stories"),
    }
    for name, (data, needle) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        code, out, err = call_main(["prepare", "--data", str(path), "--split", "1,0,0", "--tokenizer", "bpe:260",
                                    "--num-proc", "1", "--cache-dir", str(tmp_path / "cache")])
        assert_clear_error(code, err, "prepare")
        assert str(path) in err and needle in err, err
    # with replacement, what was replaced is counted and reported
    code, out, err = call_main(["prepare", "--data", str(tmp_path / "surrogate.json"), "--split", "1,0,0",
                                "--tokenizer", "bpe:260", "--num-proc", "1", "--encoding-errors", "replace",
                                "--cache-dir", str(tmp_path / "cache"), "--json"])
    assert code == 0, err
    assert json.loads(out)["replacements"] == 1


# --- damaged checkpoints -------------------------------------------------------------------------

CHECKPOINT_FILES = ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"]


@FUZZ
@given(name=st.sampled_from(CHECKPOINT_FILES), cut=st.one_of(st.none(), st.integers(0, 10**6)),
       flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=3),
       recorded=st.booleans())
def test_fuzzed_checkpoint_damage_loads_or_names_the_file(checkpoint, name, cut, flips, recorded):
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "ckpt"
        shutil.copytree(checkpoint, directory)
        if not recorded:  # as a checkpoint of format 1, written without the files' sizes and hashes
            config = json.loads((directory / "config.json").read_text())
            config.pop("files")
            config.pop("config_sha256")
            config["picollm_format"] = 1
            (directory / "config.json").write_text(json.dumps(config))
        original = (directory / name).read_bytes()
        path = directory / name
        data = bytearray(path.read_bytes())
        for at, mask in flips:
            data[at % len(data)] ^= mask
        if cut is not None:
            data = data[:cut % (len(data) + 1)]
        path.write_bytes(bytes(data))
        changed = bytes(data) != original
        try:
            load_model(directory)
        except UserError as exc:
            has_message(exc)
            assert str(directory) in str(exc)
        else:
            if recorded and name != "config.json":
                assert not changed, "a changed file was loaded despite its recorded sha256"
            if recorded and name == "config.json":  # only a change the JSON does not see (whitespace) loads
                assert json.loads(bytes(data)) == json.loads(original), "an edited config.json was loaded"
