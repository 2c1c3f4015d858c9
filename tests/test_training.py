"""The training engine: recipe, schedule, config errors, checkpoints, resume, DDP, chunked loss, wandb."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import picollm
from picollm.cli import main
from picollm.config import RunConfig, from_dict, load_run_config
from picollm.device import resolve_dtype
from picollm.errors import UserError
from picollm.loss import linear_cross_entropy, model_loss
from picollm.models.registry import build_model
from picollm.training.schedule import lr_at
from picollm.training.trainer import train

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"family": "transformer", "d_model": 32, "n_heads": 2, "n_layers": 1, "context_length": 32}


@pytest.fixture(scope="module")
def data_section(tmp_path_factory, sample_path) -> dict:
    """300 stories of the sample with a 512-token BPE, prepared once for this module."""
    cache = tmp_path_factory.mktemp("cache")
    return {"data": str(sample_path), "num_stories": 300, "split": [0.8, 0.1, 0.1],
            "tokenizer": "bpe:512", "cache_dir": str(cache), "num_proc": 1}


def run_config(data_section: dict, out: Path, model: dict | None = None, **train) -> dict:
    recipe = {"batch_size": 4, "max_steps": 12, "eval_interval": 4, "eval_batches": 2, "ckpt_interval": 4,
              "log_interval": 1, "sample_tokens": 4, "threads": 1, "lr": 3e-3, **train}
    return {"data": data_section, "model": model or dict(TINY_MODEL), "train": recipe, "out": str(out)}


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


# --- schedule -------------------------------------------------------------------------------------


def test_schedule_warmup_then_cosine_to_min_lr():
    total, lr = 100, 3e-4
    assert lr_at(0, total, lr, "cosine", 0.1) == pytest.approx(lr / 10)  # first of 10 warmup steps
    assert lr_at(9, total, lr, "cosine", 0.1) == pytest.approx(lr)  # warmup ends at the peak
    assert lr_at(10, total, lr, "cosine", 0.1) == pytest.approx(lr)  # decay starts from the peak
    assert lr_at(99, total, lr, "cosine", 0.1, min_lr=1e-5) == pytest.approx(1e-5)  # the last step
    mid = 10 + (99 - 10) / 2
    assert lr_at(int(mid), total, lr, "cosine", 0.1) == pytest.approx(lr / 2, rel=0.02)
    assert lr_at(99, total, lr, "linear", 0.1) == pytest.approx(0.0)
    assert lr_at(54, total, lr, "linear", 0.1) == pytest.approx(lr * (1 - 44 / 89))
    assert lr_at(99, total, lr, "constant", 0.1) == pytest.approx(lr)


# --- config ---------------------------------------------------------------------------------------


def test_defaults_are_the_study_recipe():
    t = RunConfig().train
    assert (t.optimizer, t.lr, t.schedule, t.warmup_ratio, t.batch_size, t.epochs, t.dtype) == \
        ("adamw", 3e-4, "cosine", 0.1, 64, 5.0, "auto")


@pytest.mark.parametrize("overrides, message", [
    ({"train.lrr": 1.0}, "unknown config key train.lrr; allowed in 'train':"),
    ({"train.lr": "fast"}, "config key 'train.lr': give a number or auto, got 'fast'"),
    ({"train.lr_grid": [1e-3]}, "config key 'train.lr_grid': give two or more different positive rates"),
    ({"train.full_val_at": [0.5, 1.0]}, "config key 'train.full_val_at': give fractions of the run strictly"),
    ({"train.lr": -1.0}, "config key 'train.lr': must be positive"),
    ({"train.batch_size": 2.5}, "config key 'train.batch_size': expected an integer"),
    ({"train.schedule": "step"}, "config key 'train.schedule': use cosine, linear or constant"),
    ({"data.split": [0.5, 0.2, 0.2]}, "ratios must sum to 1"),
    ({"model.family": "rnn"}, "unknown model family 'rnn'"),
    ({"model.d_model": 0}, "model.d_model"),
    ({"model.no_such_field": 1}, "unknown config key model.no_such_field"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(UserError, match=None) as err:
        load_run_config(overrides={"model.family": "transformer", **overrides})
    assert message in str(err.value)


def test_cli_config_error_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2]\n")
    code = main(["train", "--config", str(bad), "--preset", "transformer-pico", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "train.lr" in err
    assert not (tmp_path / "r").exists()  # nothing was started
    assert main(["train", "--preset", "transformer-pico", "--train.nope", "1"]) == 2
    assert "unknown config key train.nope" in capsys.readouterr().err
    assert main(["train", "--preset", "lstm-huge"]) == 2
    assert "no preset 'huge'" in capsys.readouterr().err


def test_dotted_overrides_and_preset_precedence(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model:\n  n_layers: 3\ntrain:\n  lr: 0.01\n  batch_size: 8\n")
    cfg = load_run_config(cfg_file, {"train.lr": 1e-3, "model.d_model": 48}, preset="transformer-pico")
    assert cfg.train.lr == 1e-3 and cfg.train.batch_size == 8
    assert cfg.model["family"] == "transformer" and cfg.model["n_layers"] == 3 and cfg.model["d_model"] == 48


# --- the chunked loss -----------------------------------------------------------------------------


@pytest.mark.parametrize("family_spec", [
    dict(TINY_MODEL, vocab_size=300),
    {"family": "lstm", "vocab_size": 300, "embed_dim": 16, "hidden_size": 24, "context_length": 32},
])
def test_chunked_loss_and_gradients_equal_the_plain_path(family_spec):
    model = build_model(family_spec)
    x = torch.randint(0, 300, (3, 17))
    y = torch.randint(0, 300, (3, 17))
    plain = F.cross_entropy(model(x).reshape(-1, 300), y.reshape(-1))
    plain.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = model_loss(model, x, y, chunk_tokens=5)
    chunked.backward()
    assert abs(chunked.item() - plain.item()) < 1e-5
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name], atol=1e-5), name


def test_linear_cross_entropy_sum_bias_and_per_token():
    h = torch.randn(11, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    t = torch.randint(0, 20, (11,))
    got = linear_cross_entropy(h, w, t, b, chunk_tokens=4, reduction="sum")
    (got * 2).backward()
    g = [h.grad.clone(), w.grad.clone(), b.grad.clone()]
    h.grad = w.grad = b.grad = None
    want = F.cross_entropy(h @ w.T + b, t, reduction="sum")
    (want * 2).backward()
    assert torch.allclose(got, want, atol=1e-5)
    for a, c in zip(g, [h.grad, w.grad, b.grad]):
        assert torch.allclose(a, c, atol=1e-4)
    per_token = linear_cross_entropy(h, w, t, b, chunk_tokens=3, reduction="none")
    assert torch.allclose(per_token, F.cross_entropy(h @ w.T + b, t, reduction="none"), atol=1e-5)


# --- training end to end --------------------------------------------------------------------------


def test_tiny_model_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = build_model(dict(TINY_MODEL, vocab_size=64, context_length=16))
    x = torch.randint(0, 64, (2, 16))
    y = torch.randint(0, 64, (2, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model_loss(model, x, y, chunk_tokens=7)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_run_directory_metrics_checkpoints_and_load(tmp_path, data_section):
    out = tmp_path / "run"
    result = train(run_config(data_section, out, keep_last=2), progress=False)
    s = result.summary
    assert s["status"] == "finished" and s["steps"] == 12
    assert s["tokens_seen"] == 12 * 4 * 32
    for split in ("train", "val", "test"):
        assert math.isclose(s[split]["ppl"], math.exp(s[split]["nll"]), rel_tol=1e-9)
        assert s[split]["bpb"] > 0
    assert 0 < s["unigram_entropy"] < math.log(512)
    # dtype auto is resolved once and recorded, so that a resume keeps it
    assert s["dtype"] == load_run_config(out / "config.yaml").train.dtype == resolve_dtype("auto", "cpu")
    for name in ("config.yaml", "environment.json", "rerun.sh", "metrics.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    env = json.loads((out / "environment.json").read_text())
    assert env["torch_version"] == torch.__version__ and env["picollm_version"] == picollm.__version__
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    eval_rows = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    for key in ("step", "tokens", "epoch", "train_loss", "train_ppl", "lr", "grad_norm", "tokens_per_s", "elapsed"):
        assert key in train_rows[0], key
    assert [r["step"] for r in eval_rows] == [4, 8, 12]
    assert all("val_loss" in r and "val_ppl" in r and isinstance(r["sample"], str) for r in eval_rows)
    # periodic checkpoints: the last K kept, each resumable
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-00000008", "step-00000012"]
    assert {"config.json", "model.safetensors", "trainer_state.json", "optimizer.safetensors",
            "tokenizer_config.json"} <= {p.name for p in (out / "checkpoints" / kept[-1]).iterdir()}
    # the final model loads through the public API with its tokenizer, and matches the trained weights
    model = picollm.load(str(out))
    assert model.tokenizer is not None and model.tokenizer.name == "bpe:512"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, result.model.state_dict()[name]), name
    # the same run again is recognised as finished and not retrained
    again = train(run_config(data_section, out, keep_last=2), progress=False)
    assert again.model is None and again.summary == s


def test_registered_family_trains_through_the_normal_trainer(tmp_path, data_section):
    from dataclasses import dataclass

    from torch import nn

    @dataclass
    class BigramConfig(picollm.ModelConfig):
        pass

    class Bigram(picollm.LanguageModel):
        def __init__(self, config: BigramConfig) -> None:
            super().__init__(config)
            self.table = nn.Embedding(config.vocab_size, 32)
            self.output_layer = nn.Linear(32, config.vocab_size, bias=False)

        def features(self, tokens):
            return self.table(tokens)

        def prefill(self, tokens):
            return self.output_layer(self.table(tokens[:, -1])), None

        def decode(self, tokens, state):
            return self.output_layer(self.table(tokens)), None

    picollm.register_model("test-bigram", BigramConfig, Bigram)
    out = tmp_path / "bigram"
    result = train(run_config(data_section, out, model={"family": "test-bigram", "context_length": 16},
                              lr=0.05, max_steps=30), progress=False)
    assert result.summary["family"] == "test-bigram"
    assert result.summary["val"]["nll"] < math.log(512)
    assert picollm.load(str(out)).family == "test-bigram"


# --- resume and kills -----------------------------------------------------------------------------

RUN_SCRIPT = """
import json, sys
from picollm.training.trainer import train
config = json.loads(sys.argv[1])
faults = json.loads(sys.argv[2])
train(config, progress=False, faults=faults)
"""


def run_in_subprocess(config: dict, faults: dict | None = None, wait: bool = True):
    cmd = [sys.executable, "-c", RUN_SCRIPT, json.dumps(config), json.dumps(faults or {})]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_section) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("ref") / "run"
    train(run_config(data_section, out, ckpt_interval=2, model=dict(TINY_MODEL, dropout=0.1)), progress=False)
    return final_weights(out)


@pytest.mark.parametrize("point, step", [("inside_step", 5), ("during_eval", 8),
                                         ("between_weights_and_state", 6), ("before_rename", 4)])
def test_fault_then_resume_is_bit_identical(tmp_path, data_section, uninterrupted, point, step):
    out = tmp_path / "run"
    config = run_config(data_section, out, ckpt_interval=2, model=dict(TINY_MODEL, dropout=0.1))
    proc = run_in_subprocess(config, {point: step})
    assert proc.returncode == 99, proc.stderr
    assert not (out / "final").exists()
    if point in ("between_weights_and_state", "before_rename"):
        # the half-written checkpoint never became visible; the previous one is complete and loadable
        visible = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
        assert visible[-1] == f"step-{step - 2:08d}"
        picollm.load(str(out))  # resolves to the latest complete checkpoint
    train(config, progress=False)
    resumed = final_weights(out)
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 13))  # no step logged twice after the resume


@pytest.mark.slow
def test_full_validation_points_change_no_weight_and_are_logged_once_across_a_resume(tmp_path, data_section,
                                                                                      uninterrupted):
    """full_val_at evaluates the whole validation split at 25% and 50% of the steps (3 and 6 of 12). The
    evaluation draws no random number: the weights equal those of the run without it (dropout 0.1). A kill
    in step 4, after the row of step 3 and before the checkpoint of step 4, drops that row on resume (the
    log is cut at the last checkpoint, step 2) and logs it again: each point once."""
    out = tmp_path / "run"
    config = run_config(data_section, out, ckpt_interval=2, model=dict(TINY_MODEL, dropout=0.1),
                        full_val_at=[0.25, 0.5], keep_last=10)
    proc = run_in_subprocess(config, {"inside_step": 3})
    assert proc.returncode == 99, proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "eval_full"] == [3]  # logged before the kill
    result = train(config, progress=False)
    resumed = final_weights(out)
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    full = [r for r in rows if r["kind"] == "eval_full"]
    assert [(r["step"], r["fraction"], r["tokens"]) for r in full] == [(3, 0.25, 3 * 4 * 32), (6, 0.5, 6 * 4 * 32)]
    # the value is the whole split's NLL of the weights at that step (not the periodic 2-batch subset)
    from picollm.evaluation import evaluate

    at_six = evaluate(picollm.load(str(out / "checkpoints" / "step-00000006")), "val", batch_size=4,
                      dtype=result.summary["dtype"])
    assert at_six.tokens == result.summary["val"]["tokens"] > 2 * 4 * 32
    assert full[1]["val_loss"] == pytest.approx(at_six.nll, rel=1e-6)


def test_sigkill_at_a_random_moment_then_resume_is_bit_identical(tmp_path, data_section, uninterrupted):
    out = tmp_path / "run"
    config = run_config(data_section, out, ckpt_interval=2, model=dict(TINY_MODEL, dropout=0.1))
    proc = run_in_subprocess(config, wait=False)
    rng = random.Random()
    deadline = time.time() + 120
    while not (out / "checkpoints").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    train(config, progress=False)
    resumed = final_weights(out)
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name


def test_sigterm_writes_a_checkpoint_and_resume_continues(tmp_path, data_section, uninterrupted):
    out = tmp_path / "run"
    config = run_config(data_section, out, ckpt_interval=0, model=dict(TINY_MODEL, dropout=0.1))
    proc = run_in_subprocess(config, wait=False)
    deadline = time.time() + 120
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count('"train"') >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert "interrupted by signal" in err
    assert len(list((out / "checkpoints").iterdir())) == 1
    train(config, progress=False)
    resumed = final_weights(out)
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name


def test_nan_steps_are_skipped_then_the_run_stops(tmp_path, data_section, monkeypatch):
    from picollm.training import trainer as trainer_module

    calls = {"n": 0}
    real = trainer_module.model_loss

    def poisoned(model, x, y, chunk_tokens, reduction):
        calls["n"] += 1
        loss = real(model, x, y, chunk_tokens, reduction)
        return loss * float("nan") if calls["n"] in (3, 4) or calls["n"] >= 7 else loss

    monkeypatch.setattr(trainer_module, "model_loss", poisoned)
    out = tmp_path / "run"
    config = run_config(data_section, out, max_bad_steps=3, eval_interval=0, ckpt_interval=2)
    with pytest.raises(trainer_module.TrainingDiverged, match="3 steps in a row"):
        train(config, progress=False)
    # steps 3 and 4 were skipped (2 in a row, below the limit); the run stopped at the third of 7, 8, 9
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000006", "step-00000008"]
    weights = load_file(str(out / "checkpoints" / "step-00000008" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert "final" not in {p.name for p in out.iterdir()}


# --- distributed ----------------------------------------------------------------------------------


def test_two_process_gloo_ddp_follows_the_single_process_run(tmp_path, data_section):
    single = run_config(data_section, tmp_path / "single", batch_size=8, max_steps=6, eval_interval=0,
                        ckpt_interval=0)
    train(single, progress=False)
    ddp = run_config(data_section, tmp_path / "ddp", batch_size=4, max_steps=6, eval_interval=0, ckpt_interval=0)
    cfg_path = tmp_path / "ddp.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(ddp))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "picollm", "train",
                           "--config", str(cfg_path), "--no-progress"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(out: Path) -> list[float]:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["train_loss"] for r in rows if r["kind"] == "train"]

    a, b = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tokens_seen"] == 6 * 8 * 32


# --- observability --------------------------------------------------------------------------------


def read_wandb_history(path: Path) -> list[dict]:
    """History rows of an offline wandb run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    rows = []
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_wandb_offline_records_the_metrics_jsonl_values(tmp_path, data_section, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(run_config(data_section, out, wandb=True, wandb_run_name="t"), progress=False)
    files = list(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history = read_wandb_history(files[0])
    logged = {r["_step"]: r for r in history}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        key = "train_loss" if row["kind"] == "train" else "val_loss"
        assert logged[row["step"]][key] == pytest.approx(row[key], rel=1e-12)


def test_dry_run_reports_parameters_tokens_flops_and_time(tmp_path, data_section, capsys):
    cfg = from_dict(RunConfig, run_config(data_section, tmp_path / "dry"))
    from picollm.training.trainer import dry_run

    report = dry_run(cfg, measure_steps=2)
    assert report["steps"] == 12 and report["tokens"] == 12 * 4 * 32
    assert report["flops"] == report["flops_per_token"] * report["tokens"] > 0
    assert report["est_seconds"] > 0 and report["num_parameters"] > report["num_parameters_non_embedding"]
    assert report["dtype"] == resolve_dtype("auto", "cpu")
    assert not (tmp_path / "dry").exists()


# --- hub ------------------------------------------------------------------------------------------


def test_load_from_a_prepopulated_hub_cache_offline(tmp_path, data_section, monkeypatch):
    out = tmp_path / "run"
    train(run_config(data_section, out, max_steps=2, eval_interval=0), progress=False)
    hf_home = tmp_path / "hf"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / "models--someone--pico-lm"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in (out / "final").iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    try:
        model = picollm.load("someone/pico-lm")
        assert model.tokenizer.name == "bpe:512"
        reference = picollm.load(str(out))
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, reference.state_dict()[name])
        with pytest.raises(UserError, match="no cached copy"):
            picollm.load("someone/missing-model")
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)
