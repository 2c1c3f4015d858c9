"""`picollm eval`: a run directory's splits, a checkpoint with --data, diversity, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import exit_code

from picollm.checkpoint import load, save_model
from picollm.cli import main
from picollm.config import DataConfig, RunConfig, to_dict
from picollm.device import resolve_dtype
from picollm.evaluation import evaluate_tokens, stream_from_file
from picollm.models.registry import build_model

MODEL = {"family": "transformer", "context_length": 16, "d_model": 16, "n_heads": 2, "n_layers": 1}

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sample_path):
    """A run directory as the trainer leaves it: config.yaml and final/ (an untrained model)."""
    from picollm.data.prepare import prepare

    root = tmp_path_factory.mktemp("evalcli")
    text = sample_path.read_text(encoding="utf-8")[:8000]
    stories = [s.strip() for s in text.split("<|endoftext|>")][:-1]
    data_file = root / "stories.txt"
    data_file.write_text("\n<|endoftext|>\n".join(stories) + "\n", encoding="utf-8")
    data = DataConfig(data=str(data_file), tokenizer="bpe:300", split=(0.5, 0.25, 0.25),
                      cache_dir=str(root / "cache"), num_proc=1)
    prepared = prepare(data, progress=False)
    model_fields = {**MODEL, "vocab_size": prepared.tokenizer.vocab_size}
    run = root / "run"
    run.mkdir()
    config = RunConfig(data=data, model=model_fields, out=str(run))
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
    torch.manual_seed(0)
    save_model(build_model(model_fields), run / "final", prepared.tokenizer)
    return run, data_file, prepared


def test_eval_run_directory_split(run_dir, capsys):
    run, _, prepared = run_dir
    assert main(["eval", str(run), "--split", "val", "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    want = evaluate_tokens(load(run), prepared.tokens("val"), 16, num_bytes=prepared.num_bytes("val"))
    assert report["dtype"] == want.dtype == resolve_dtype("auto", "cpu")  # both default to auto
    for key, value in want.as_dict().items():
        assert report[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-9)), key
    # plain output names every number
    assert main(["eval", str(run / "final"), "--split", "test", "--max-windows", "2"]) == 0
    out = capsys.readouterr().out
    for word in ("nll", "ppl", "bpb", "tokens", "bytes"):
        assert word in out
    assert "tokens 32 " in out and "windows 2" in out  # 2 windows of 16 targets


def test_eval_checkpoint_with_data(run_dir, tmp_path, capsys):
    run, data_file, _ = run_dir
    assert main(["eval", str(run / "final"), "--data", str(data_file), "--json", "--batch-size", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    model = load(run / "final")
    tokens, num_bytes, _ = stream_from_file(data_file, model.tokenizer)
    want = evaluate_tokens(model, tokens, 16, batch_size=4, num_bytes=num_bytes)
    assert report["nll"] == pytest.approx(want.nll, rel=1e-9)
    assert report["bytes"] == num_bytes


def test_eval_diversity(run_dir, capsys):
    run, _, _ = run_dir
    argv = ["eval", str(run), "--split", "train", "--diversity", "--num-prompts", "3", "--prompt-tokens", "4",
            "--new-tokens", "8", "--strategies", "greedy,top-p=0.9,top-p=1.0", "--max-windows", "1"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["diversity"]) == ["greedy", "top-p=0.9", "top-p=1.0"]
    for entry in report["diversity"].values():
        # a rate is None (n/a) only when no continuation is n units long: 8 new tokens may be < 5 words
        for n in range(1, 6):
            for key in (f"word_distinct_{n}", f"token_distinct_{n}"):
                assert entry[key] is None or 0.0 <= entry[key] <= 1.0
        assert entry["word_distinct_1"] is not None or entry["words"] == 0
        assert entry["token_distinct_1"] is not None and 0.0 <= entry["token_distinct_1"] <= 1.0
        assert entry["repetition_4"] is None or 0.0 <= entry["repetition_4"] <= 1.0
    assert main([*argv, "--no-nll"]) == 0
    out = capsys.readouterr().out
    assert "top-p=0.9" in out and "rep-4" in out and "nll" not in out


@pytest.mark.parametrize("extra,message", [
    (["--max-windows", "0"], "--max-windows must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--diversity", "--strategies", "beam"], "strategy 'beam' is not understood"),
    (["--diversity", "--strategies", "top-p=2"], "top-p must be in (0, 1]"),
    (["--split", "dev"], "invalid choice: 'dev'"),
    (["--split", "val", "--data", "x.txt"], "not allowed with argument"),
])
def test_bad_arguments(run_dir, capsys, extra, message):
    run, _, _ = run_dir
    assert exit_code(["eval", str(run), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_bare_checkpoint_needs_data(run_dir, tmp_path, capsys):
    run, _, _ = run_dir
    model = load(run / "final")
    bare = save_model(model, tmp_path / "bare", model.tokenizer)
    assert exit_code(["eval", str(bare)]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and len(err.strip().splitlines()) == 1
    assert exit_code(["eval", str(tmp_path / "missing")]) == 2
    assert exit_code(["eval", str(bare), "--data", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 2  # one line per failing command
