"""`picollm bench`: what its paths compute, its worker protocol, targets and output (no timing assertions)."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from helpers import assert_same_loss_and_gradients

from picollm.bench.markdown import markdown
from picollm.bench.targets import cpu_targets, target
from picollm.bench.worker import Worker, WorkerError, WorkerSpec, serve
from picollm.bench.workloads import kgram_loop_loss, make_step
from picollm.cli import main
from picollm.loss import model_loss
from picollm.models.registry import build_model

TOY_LSTM = {"family": "lstm", "embed_dim": 8, "hidden_size": 8, "vocab_size": 50, "context_length": 8}

# --- what the compared paths compute ---------------------------------------------------------------


@pytest.mark.parametrize("input_kind", ["onehot", "scaled"])
def test_kgram_loop_reference_equals_the_vectorised_model(input_kind):
    """The per-position Python loop the benchmark compares against computes the same loss and
    gradients as the vectorised k-gram model."""
    torch.manual_seed(0)
    model = build_model({"family": "kgram", "input": input_kind, "k": 3, "embed_dim": 8, "hidden_size": 8,
                         "inner_layers": 2, "vocab_size": 40, "context_length": 16})
    x = torch.randint(0, 40, (2, 7))
    y = torch.randint(0, 40, (2, 7))
    assert_same_loss_and_gradients(model, lambda: kgram_loop_loss(model, x, y),
                                   lambda: model_loss(model, x, y, chunk_tokens=5), atol=1e-6)


def test_picollm_and_baseline_steps_train_the_same_objective():
    """In fp32, from the same initialisation, both steps report the model's mean next-token loss, and
    each updates the parameters."""
    x = torch.randint(0, 50, (2, 8))
    y = torch.randint(0, 50, (2, 8))
    losses = {}
    for kind in ("picollm", "baseline"):
        torch.manual_seed(0)
        model = build_model(TOY_LSTM)
        want = model_loss(model, x, y).item()
        before = model.output_layer.weight.detach().clone()
        losses[kind] = make_step(kind, model, dtype="fp32", chunk_tokens=5)(x, y)
        assert not torch.equal(before, model.output_layer.weight)
        assert all(p.grad is None for p in model.parameters())  # gradients cleared for the next step
    assert losses["picollm"] == pytest.approx(want, abs=1e-5)
    assert losses["baseline"] == pytest.approx(want, abs=1e-5)


def test_make_step_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown step kind 'fast'"):
        make_step("fast", build_model(TOY_LSTM))


# --- the worker protocol --------------------------------------------------------------------------


def _serve(*commands: dict) -> list[dict]:
    out = io.StringIO()
    assert serve(io.StringIO("".join(json.dumps(c) + "\n" for c in commands)), out) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_worker_answers_one_line_per_command_in_process():
    init = {"op": "init", "kind": "baseline", "model": TOY_LSTM, "batch": 2, "context": 8, "time_backward": True}
    replies = _serve({"op": "stats"}, init, {"op": "step"}, {"op": "step", "rows": 1}, {"op": "eval"},
                     {"op": "stats"}, {"op": "teleport"}, {"op": "quit"}, {"op": "step"})
    assert len(replies) == 7  # nothing after quit
    assert replies[0] == {"ok": False, "error": "RuntimeError: op 'stats' before init",
                          "traceback": replies[0]["traceback"]}
    assert replies[1]["ok"] and replies[1]["rss_mb"] > 0
    for step in replies[2:4]:
        assert step["ok"] and math.isfinite(step["loss"])
        assert 0 < step["fwd_bwd_seconds"] <= step["seconds"]
    assert replies[4]["tokens"] == 2 * 8 and math.isfinite(replies[4]["nll"])
    assert replies[5]["peak_rss_mb"] >= replies[5]["rss_ready_mb"] > 0
    assert not replies[6]["ok"] and "unknown op 'teleport'" in replies[6]["error"]


@pytest.mark.slow
def test_worker_process_reports_a_failed_init():
    with pytest.raises(WorkerError, match="unknown worker kind 'nonsense'"):
        Worker(WorkerSpec(kind="nonsense"))


# --- targets and Markdown -------------------------------------------------------------------------


def test_targets_pass_at_the_threshold_and_fail_past_it_or_on_nan():
    assert target("t", 2.0, 2.0)["pass"] and not target("t", 1.99, 2.0)["pass"]
    assert target("m", 0.5, 0.5, higher_is_better=False)["pass"]
    assert not target("m", 0.51, 0.5, higher_is_better=False)["pass"]
    assert not target("t", float("nan"), 2.0)["pass"]
    assert target("t", 2.123456, 2.0) == {"name": "t", "value": 2.1235, "threshold": 2.0, "comparison": ">=",
                                          "unit": "x", "pass": True, "detail": ""}


def _row(family, preset, vocab, speedup):
    return {"family": family, "preset": preset, "vocab": vocab, "batch": 16, "context": 256,
            "flops_per_token": 9.7e6, "speedup": speedup, "memory_ratio": 0.25, "eval_over_train": 1.5,
            "picollm": {"tokens_per_s": 2000 * speedup, "peak_rss_mb": 800, "mfu": 0.2},
            "baseline": {"tokens_per_s": 2000, "peak_rss_mb": 3200, "mfu": 0.1},
            "eval": {"tokens_per_s": 3000 * speedup}}


def test_cpu_targets_read_the_target_presets_at_the_target_vocabulary():
    result = {"configs": [_row("lstm", "pico", 50257, 3.0), _row("lstm", "small", 50257, 1.0),
                          _row("lstm", "pico", 4096, 1.0)],
              "generation": [{"preset": "pico", "ratio": 1.2}, {"preset": "small", "ratio": 13.0, "batch": 8,
                                                                  "prompt_tokens": 1, "new_tokens": 255,
                                                                  "cache_tokens_per_s": 520.0,
                                                                  "recompute_tokens_per_s": 40.0}]}
    got = {t["name"]: t["pass"] for t in cpu_targets(result)}
    assert got == {"train_speedup[lstm-pico]": True, "peak_memory_ratio[lstm-pico]": True,
                   "eval_over_train[lstm-pico]": False, "generation_cache_speedup[transformer-small]": True}


def test_markdown_tables_hold_the_figures_and_the_verdicts():
    result = {"machine": {"cpu": "CPU X", "cpus": 2, "isa": ["avx2"], "torch": "2.13"},
              "settings": {"batch_size": 16, "context": 256, "threads_used": 2, "picollm_dtype": "bf16"},
              "date": "2026-01-01", "elapsed_s": 12, "configs": [_row("kgram", "tiny", 50257, 3.5)]}
    result["targets"] = cpu_targets(result)
    text = markdown(result)
    assert "| kgram-tiny | 50257 | 9.7 M | 7,000 | 20% | 800 | 2,000 | 10% | 3,200 | 3.50x | 0.25 |" in text
    assert "| train_speedup[kgram-tiny] | 3.5 | >= 2 | PASS |" in text
    assert "| eval_over_train[kgram-tiny] | 1.5 | >= 2 | FAIL |" in text


# --- the command ----------------------------------------------------------------------------------


def test_bench_rejects_unknown_parts(capsys):
    assert main(["bench", "--skip", "nothing"]) == 2
    assert "--skip: unknown part" in capsys.readouterr().err


def test_bench_rejects_a_missing_data_file(tmp_path, capsys):
    assert main(["bench", "--data", str(tmp_path / "absent.txt")]) == 2
    assert f"--data: no such file {tmp_path / 'absent.txt'}" in capsys.readouterr().err


def test_bench_without_data_skips_preparation_and_says_so(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--tiny", "--skip", "train,eval,generate,kgram,gpu", "--json", str(out)]) == 0
    assert "data preparation: skipped (no --data PATH given" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["data_preparation"] == {"skipped": "no --data PATH given"}
    assert data["targets"] == [] and "configs" not in data


@pytest.mark.slow
def test_bench_tiny_mode_emits_the_json_schema(tmp_path, sample_path):
    """A toy run of the whole command (toy widths, 2 x 16 tokens, the sample prepared with gpt2): every
    part reports, every target has its fields. The figures themselves are not checked."""
    out = tmp_path / "bench.json"
    code = main(["bench", "--tiny", "--families", "transformer,kgram", "--data", str(sample_path),
                 "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["schema"] == "picollm.bench/1"
    assert set(data["matmul_peak_gflops"]) >= {"fp32", "bf16"}
    rows = data["configs"]
    assert {(r["family"], r["preset"]) for r in rows} == {("transformer", "pico"), ("kgram", "pico")}
    for row in rows:
        for path in ("picollm", "baseline"):
            entry = row[path]
            assert entry["tokens_per_s"] > 0 and entry["peak_rss_mb"] > 0 and 0 < entry["mfu"]
        assert row["flops_per_token"] > 0 and row["speedup"] > 0 and row["memory_ratio"] > 0
        assert row["eval"]["tokens_per_s"] > 0
    assert data["generation"][0]["cache_tokens_per_s"] > 0
    assert data["kgram_loop"]["loop_fwd_bwd_tokens_per_s"] > 0 and data["kgram_loop"]["speedup"] > 0
    [prep] = data["data_preparation"]
    assert prep["tokenizer"] == "gpt2" and 0 < prep["bytes"] <= sample_path.stat().st_size
    assert prep["tokens"] > 0 and prep["mb_per_s"] > 0
    names = [t["name"] for t in data["targets"]]
    assert "train_speedup[transformer-pico]" in names and "kgram_vectorised_over_loop" in names
    for target_ in data["targets"]:
        assert set(target_) >= {"name", "value", "threshold", "pass"}
        assert isinstance(target_["pass"], bool)
