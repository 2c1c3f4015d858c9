"""`picollm generate`: output, JSON, streaming, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import exit_code

from picollm.checkpoint import load, save_model
from picollm.cli import main
from picollm.generation import generate
from picollm.models.registry import build_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sample_path):
    from picollm.data.tokenizer import train_bpe

    text = sample_path.read_text(encoding="utf-8")[:6000]
    tokenizer = train_bpe([s.strip() for s in text.split("<|endoftext|>")], 300)
    torch.manual_seed(0)
    model = build_model({"family": "transformer", "vocab_size": tokenizer.vocab_size, "context_length": 16,
                         "d_model": 16, "n_heads": 2, "n_layers": 1})
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "model", tokenizer)


def test_generate_plain_and_json(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--prompt", "Once upon a time", "--max-new-tokens", "20",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    model = load(checkpoint)
    expected = generate(model, "Once upon a time", max_new_tokens=20)[0]
    assert out == "Once upon a time" + expected + "\n"

    assert main(["generate", str(checkpoint), "--prompt", "The cat", "--prompt", "A dog", "--strategy",
                 "top-p", "--top-p", "0.8", "--num-samples", "2", "--seed", "3", "--max-new-tokens", "10",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(s["prompt"], s["sample"]) for s in data["samples"]] == [
        ("The cat", 0), ("The cat", 1), ("A dog", 0), ("A dog", 1)]
    assert [s["continuation"] for s in data["samples"]] == generate(
        model, ["The cat", "A dog"], strategy="top-p", top_p=0.8, num_samples=2, seed=3, max_new_tokens=10)


def test_generate_stream(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--prompt", "Lily", "--max-new-tokens", "15", "--stream",
                 "--strategy", "sample", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    expected = generate(load(checkpoint), "Lily", strategy="sample", seed=1, max_new_tokens=15)[0]
    assert out == "Lily" + expected + "\n"


@pytest.mark.parametrize("flags,message", [
    (["--top-p", "1.5"], "top-p must be in (0, 1]"),
    (["--top-p", "0"], "top-p must be in (0, 1]"),
    (["--temperature", "0"], "temperature must be a positive number"),
    (["--top-k", "0"], "top-k must be an integer >= 1"),
    (["--max-new-tokens", "-1"], "max-new-tokens must be an integer >= 0"),
    (["--num-samples", "0"], "num-samples must be an integer >= 1"),
    (["--strategy", "beam"], "invalid choice: 'beam'"),
    (["--stream", "--num-samples", "2"], "--stream prints one continuation"),
])
def test_bad_arguments_exit_2_with_one_line(checkpoint, capsys, flags, message):
    assert exit_code(["generate", str(checkpoint), "--prompt", "x", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err


def test_missing_checkpoint(tmp_path, capsys):
    assert exit_code(["generate", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
