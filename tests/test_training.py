"""The trainer (picollm.training): schedule, run directory, checkpoints, faults and resume, signals, NaN
skipping, DDP, wandb, dry run, progress. Runs are `helpers.run_config` on the `data_section` fixture."""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY_MODEL, final_weights, run_config, wait_for_train_rows
from safetensors.torch import load_file

import picollm
from picollm.config import RunConfig, from_dict, load_run_config
from picollm.device import resolve_dtype
from picollm.errors import UserError
from picollm.evaluation import evaluate
from picollm.models.sizing import build_on_meta, count_parameters
from picollm.training import footprint
from picollm.training import step as step_module
from picollm.training import trainer as trainer_module
from picollm.training.schedule import lr_at
from picollm.training.trainer import train

REPO = Path(__file__).resolve().parents[1]


def plain_config(data_section: dict, out: Path, model: dict | None = None, **train) -> dict:
    """`helpers.run_config` without dropout and with a checkpoint every 4 steps (this file's usual run)."""
    return run_config(data_section, out, model=model or dict(TINY_MODEL), **{"ckpt_interval": 4, **train})


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


# --- the training state ---------------------------------------------------------------------------


def test_training_state_reads_what_older_checkpoints_wrote():
    from picollm.training.state import TrainState

    # trainer_state.json's "progress" as picollm wrote it before TrainState: no final_* keys until the
    # final evaluation had run
    old = {"step": 8, "epoch": 1, "batch": 3, "tokens": 1024, "best_val_loss": 5.5, "evals_since_best": 1,
           "bad_steps": 0, "skipped_steps": 2, "elapsed": 1.5}
    state = TrainState.from_dict(old)
    assert (state.step, state.batch, state.best_val_loss, state.final_eval_step, state.final_val_loss) == \
        (8, 3, 5.5, None, None)
    assert TrainState.from_dict(state.to_dict()) == state
    assert TrainState.from_dict({**old, "final_eval_step": 12, "final_val_loss": 5.1, "later": 1}).final_eval_step == 12
    with pytest.raises(KeyError, match="tokens, elapsed"):
        TrainState.from_dict({**old, "tokens": "many", "elapsed": None})


# --- training end to end --------------------------------------------------------------------------


def test_run_directory_metrics_checkpoints_and_load(tmp_path, data_section):
    out = tmp_path / "run"
    result = train(plain_config(data_section, out, keep_last=2), progress=False)
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
    again = train(plain_config(data_section, out, keep_last=2), progress=False)
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
    result = train(plain_config(data_section, out, model={"family": "test-bigram", "context_length": 16},
                                lr=0.05, max_steps=30), progress=False)
    assert result.summary["family"] == "test-bigram"
    assert result.summary["val"]["nll"] < math.log(512)
    assert picollm.load(str(out)).family == "test-bigram"


# --- resume and kills -----------------------------------------------------------------------------

RUN_SCRIPT = """
import json, sys
from picollm.training import faults
from picollm.training.trainer import train
config = json.loads(sys.argv[1])
faults.ARMED.update(json.loads(sys.argv[2]))
train(config, progress=False)
"""


def run_in_subprocess(config: dict, faults: dict | None = None, wait: bool = True):
    cmd = [sys.executable, "-c", RUN_SCRIPT, json.dumps(config), json.dumps(faults or {})]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("point, step", [("inside_step", 5), ("during_eval", 8),
                                         ("between_weights_and_state", 6), ("before_rename", 4)])
def test_fault_then_resume_is_bit_identical(tmp_path, data_section, reference_run, point, step):
    out = tmp_path / "run"
    config = run_config(data_section, out)
    proc = run_in_subprocess(config, {point: step})
    assert proc.returncode == 99, proc.stderr
    assert not (out / "final").exists()
    if point in ("between_weights_and_state", "before_rename"):
        # the half-written checkpoint never became visible; the previous one is complete and loadable
        visible = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
        assert visible[-1] == f"step-{step - 2:08d}"
        picollm.load(str(out))  # resolves to the latest complete checkpoint
    train(config, progress=False)
    resumed, uninterrupted = final_weights(out), final_weights(reference_run)
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 13))  # no step logged twice after the resume


@pytest.mark.slow
def test_full_validation_points_change_no_weight_and_are_logged_once_across_a_resume(tmp_path, data_section,
                                                                                      reference_run):
    """full_val_at evaluates the whole validation split at 25% and 50% of the steps (3 and 6 of 12). The
    evaluation draws no random number: the weights equal those of the run without it (dropout 0.1). A kill
    in step 4, after the row of step 3 and before the checkpoint of step 4, drops that row on resume (the
    log is cut at the last checkpoint, step 2) and logs it again: each point once."""
    out = tmp_path / "run"
    config = run_config(data_section, out, full_val_at=[0.25, 0.5], keep_last=10)
    proc = run_in_subprocess(config, {"inside_step": 3})
    assert proc.returncode == 99, proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "eval_full"] == [3]  # logged before the kill
    result = train(config, progress=False)
    resumed = final_weights(out)
    for name in resumed:
        assert torch.equal(resumed[name], final_weights(reference_run)[name]), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    full = [r for r in rows if r["kind"] == "eval_full"]
    assert [(r["step"], r["fraction"], r["tokens"]) for r in full] == [(3, 0.25, 3 * 4 * 32), (6, 0.5, 6 * 4 * 32)]
    # the value is the whole split's NLL of the weights at that step (not the periodic 2-batch subset)
    at_six = evaluate(picollm.load(str(out / "checkpoints" / "step-00000006")), "val", batch_size=4,
                      dtype=result.summary["dtype"])
    assert at_six.tokens == result.summary["val"]["tokens"] > 2 * 4 * 32
    assert full[1]["val_loss"] == pytest.approx(at_six.nll, rel=1e-6)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_resume_continues(tmp_path, data_section, reference_run):
    out = tmp_path / "run"
    config = run_config(data_section, out, ckpt_interval=0)
    proc = run_in_subprocess(config, wait=False)
    wait_for_train_rows(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert "interrupted by signal" in err
    assert len(list((out / "checkpoints").iterdir())) == 1
    train(config, progress=False)
    resumed, uninterrupted = final_weights(out), final_weights(reference_run)
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name


def test_nan_steps_are_skipped_then_the_run_stops(tmp_path, data_section, monkeypatch):
    calls = {"n": 0}
    real = step_module.model_loss

    def poisoned(model, x, y, chunk_tokens, reduction):
        calls["n"] += 1
        loss = real(model, x, y, chunk_tokens, reduction)
        return loss * float("nan") if calls["n"] in (3, 4) or calls["n"] >= 7 else loss

    monkeypatch.setattr(step_module, "model_loss", poisoned)
    out = tmp_path / "run"
    config = plain_config(data_section, out, max_bad_steps=3, eval_interval=0, ckpt_interval=2)
    with pytest.raises(trainer_module.TrainingDiverged, match="3 steps in a row"):
        train(config, progress=False)
    # steps 3 and 4 were skipped (2 in a row, below the limit); the run stopped at the third of 7, 8, 9
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000006", "step-00000008"]
    weights = load_file(str(out / "checkpoints" / "step-00000008" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert "final" not in {p.name for p in out.iterdir()}


# --- distributed ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_gloo_ddp_follows_the_single_process_run(tmp_path, data_section):
    single = plain_config(data_section, tmp_path / "single", batch_size=8, max_steps=6, eval_interval=0,
                          ckpt_interval=0)
    train(single, progress=False)
    ddp = plain_config(data_section, tmp_path / "ddp", batch_size=4, max_steps=6, eval_interval=0, ckpt_interval=0)
    cfg_path = tmp_path / "ddp.yaml"
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


@pytest.mark.slow
def test_wandb_offline_records_the_metrics_jsonl_values(tmp_path, data_section, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(plain_config(data_section, out, wandb=True, wandb_run_name="t"), progress=False)
    files = list(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history = read_wandb_history(files[0])
    logged = {r["_step"]: r for r in history}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        key = "train_loss" if row["kind"] == "train" else "val_loss"
        assert logged[row["step"]][key] == pytest.approx(row[key], rel=1e-12)


def test_dry_run_reports_parameters_tokens_flops_and_time(tmp_path, data_section, capsys):
    cfg = from_dict(RunConfig, plain_config(data_section, tmp_path / "dry"))
    report = trainer_module.dry_run(cfg, measure_steps=2)
    assert report["steps"] == 12 and report["tokens"] == 12 * 4 * 32
    assert report["flops"] == report["flops_per_token"] * report["tokens"] > 0
    assert report["est_seconds"] > 0 and report["num_parameters"] > report["num_parameters_non_embedding"]
    assert report["dtype"] == resolve_dtype("auto", "cpu")
    assert not (tmp_path / "dry").exists()


WIDE = {"family": "transformer", "d_model": 16384, "n_heads": 128, "n_layers": 48, "context_length": 32}


def test_dry_run_sizes_a_model_too_large_for_memory_without_building_it(tmp_path, data_section, monkeypatch):
    """155B parameters: the sizes and FLOPs come from the meta device, and no step is measured."""
    monkeypatch.setattr(trainer_module, "set_up", lambda *a, **k: pytest.fail("the dry run built the model"))
    monkeypatch.setattr(footprint, "available_bytes", lambda device: 64 * 2**30)
    cfg = from_dict(RunConfig, plain_config(data_section, tmp_path / "dry", model=WIDE))
    report = trainer_module.dry_run(cfg)
    assert report["num_parameters"] == count_parameters({**WIDE, "vocab_size": 512}) > 150e9
    assert report["flops"] == report["flops_per_token"] * report["tokens"] > 0
    assert report["step_seconds"] is None and report["est_seconds"] is None
    assert report["not_measured"].startswith("a step needs about 2,") and "64.0 GiB available on cpu" in \
        report["not_measured"]
    assert report["memory_available"] == "64.0 GiB"


def test_a_run_whose_weights_cannot_fit_is_refused_before_they_are_allocated(tmp_path, data_section):
    cfg = plain_config(data_section, tmp_path / "wide", model=WIDE)
    with pytest.raises(UserError, match=r"parameters need .* GiB for their weights, gradients and adamw state alone"):
        train(cfg, progress=False)
    assert not (tmp_path / "wide").exists()


def test_the_activation_estimate_grows_with_the_batch_and_context():
    model = build_on_meta({**TINY_MODEL, "vocab_size": 512})
    one, two = (footprint.activation_bytes(model, b, 32, 4096) for b in (4, 8))
    assert 1.8 * one < two < 2 * one  # the weights a matmul saves do not grow with the batch
    longer = build_on_meta({**TINY_MODEL, "vocab_size": 512, "context_length": 64})
    assert footprint.activation_bytes(longer, 4, 64, 4096) > 2 * one  # attention grows faster than T


def test_a_batch_larger_than_the_data_is_refused_not_cut(tmp_path, data_section):
    cfg = plain_config(data_section, tmp_path / "big", batch_size=100_000)
    with pytest.raises(UserError, match=r"train.batch_size 100000 is more than the [0-9,]+ windows of "
                                        r"model.context_length 32 tokens in the training split"):
        train(cfg, progress=False)


def test_progress_off_a_terminal_is_a_few_plain_lines(tmp_path, data_section, capsys):
    """stderr is not a terminal here (a log file, CI): no carriage-return frame per step."""
    train(plain_config(data_section, tmp_path / "run", eval_interval=0), progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    bar = [line for line in err.splitlines() if line.startswith("transformer run: ")]
    # 12 steps in far less than 30 s: the line of the first step and the one of the last
    assert len(bar) == 2, err
    assert bar[0].startswith("transformer run: 1/12 step (8%)")
    assert bar[1].startswith("transformer run: 12/12 step (100%)") and "loss=" in bar[1]
