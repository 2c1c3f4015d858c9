"""Reliability and safety (issue 8): preemption, broken files, numerical faults, full disk, no code execution.

The fault points, SIGTERM, NaN skipping on one process and DDP equivalence are in test_training.py, and
loading from the hub in test_hub.py; this file adds what the issue asks beyond them. Every run is
`helpers.run_config` (a tiny Transformer on 300 stories of the sample with a 512-token BPE, one thread),
and `reference_run` (conftest.py) is that run, never interrupted.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import assert_same_weights, final_weights, logged_steps, pickle_trap, run_config, wait_for_train_rows
from safetensors.torch import load_file

import picollm
from picollm import rundir
from picollm.checkpoint import config_checksum, load_model
from picollm.cli import main
from picollm.errors import UserError
from picollm.training.trainer import train

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "picollm"
# stories made up for these tests (the sample's text is never copied into the repository)
STORIES = [
    "Mia found a blue shell on the beach. She gave it to her little brother, and he smiled all day.",
    "The old dog liked the sun. Every morning he lay on the warm step and watched the birds.",
    "Ben built a tall tower of blocks. It fell down, so he built it again, taller than before.",
    "A small cloud wanted to rain on the garden. The flowers were happy and grew very tall.",
]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse
        code = int(exc.code)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, verb: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"picollm {verb}: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def env_one_thread() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


# --- preemption ----------------------------------------------------------------------------------

# Imports picollm once, then forks one training process per moment and SIGKILLs it at a moment drawn
# from a seeded RNG over the measured duration of an uninterrupted run (forking skips the ~3 s import).
# A child that happens to finish before its moment (a load spike during the measurement) is redrawn
# in a fresh directory. Prints one JSON object per run.
KILLER = r"""
import json, os, random, signal, sys, time
from picollm.training.trainer import train
import picollm.data.loader, picollm.data.prepare, picollm.evaluation, picollm.generation  # warm imports

jobs = json.loads(sys.argv[1])

def run(config, kill_after=None):
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            train(config, progress=False)
        except BaseException:
            import traceback
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if kill_after is not None and time.perf_counter() - start >= kill_after:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.002)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return {"out": config["out"], "seconds": time.perf_counter() - start, "killed": killed,
            "exit": os.waitstatus_to_exitcode(status), "moment": kill_after}

measured = run(jobs["measure"])
assert measured["exit"] == 0, measured
print(json.dumps(measured), flush=True)
duration = measured["seconds"]
rng = random.Random(jobs["seed"])
for i, config in enumerate(jobs["kill"]):
    for attempt in range(4):
        result = run(dict(config, out=f"{config['out']}-{attempt}"), kill_after=rng.uniform(0.0, duration))
        print(json.dumps(dict(result, index=i)), flush=True)
        if result["killed"]:
            break
        duration = min(duration, result["seconds"]) * 0.9
"""


@pytest.mark.slow
def test_sigkill_at_five_random_moments_each_resume_is_bit_identical(tmp_path, data_section, reference_run):
    want = final_weights(reference_run)
    jobs = {"seed": 8, "measure": run_config(data_section, tmp_path / "measure"),
            "kill": [run_config(data_section, tmp_path / f"kill{i}") for i in range(5)]}
    proc = subprocess.run([sys.executable, "-c", KILLER, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=240, env=env_one_thread(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    # a separate process, trained without interruption, agrees with the in-process reference
    assert_same_weights(final_weights(Path(results[0]["out"])), want, "uninterrupted child")
    killed = [r for r in results[1:] if r["killed"]]
    assert sorted(r["index"] for r in killed) == list(range(5)), results
    for r in killed:
        out = Path(r["out"])
        visible = [p for p in (out / "checkpoints").glob("step-*")] if (out / "checkpoints").is_dir() else []
        if visible:
            picollm.load(str(out))  # the latest complete checkpoint loads
        config = run_config(data_section, out)
        result = train(config, progress=False)
        assert result.summary["status"] == "finished"
        assert_same_weights(final_weights(out), want, f"killed at {r['moment']:.3f}s")
        assert logged_steps(out) == logged_steps(reference_run), r  # no step lost or logged twice


@pytest.mark.slow
def test_sigint_through_the_cli_then_resume_is_bit_identical(tmp_path, data_section, reference_run, capsys):
    out = tmp_path / "run"
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(run_config(data_section, out, ckpt_interval=0)))
    proc = subprocess.Popen([sys.executable, "-m", "picollm", "train", "--config", str(config_file),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env_one_thread(), cwd=tmp_path)
    wait_for_train_rows(proc, out)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    match = re.search(r"interrupted by signal at step (\d+); checkpoint written\. Resume with: "
                      r"picollm train --resume (\S+)", err)
    assert match and Path(match.group(2)) == out, err
    step = int(match.group(1))
    assert 2 <= step < 12
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{step:08d}"]
    assert not (out / "final").exists()

    code, _, err = run_cli(capsys, "train", "--resume", str(out), "--no-progress")
    assert code == 0, err
    assert_same_weights(final_weights(out), final_weights(reference_run), "resumed after SIGINT")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 12
    assert logged_steps(out) == logged_steps(reference_run) == {"train": list(range(1, 13)), "eval": [4, 8, 12]}


FINAL_EVAL_SIGNAL = r"""
import json, os, signal, sys
import picollm.evaluation as evaluation
from picollm.training.trainer import train

calls = {"n": 0}
real = evaluation.evaluate_tokens

def evaluate_then_signal(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == int(sys.argv[2]):  # the evaluation after the last step
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)

evaluation.evaluate_tokens = evaluate_then_signal
result = train(json.loads(sys.argv[1]), progress=False)
print(json.dumps(result.summary))
"""


@pytest.mark.slow
def test_sigterm_during_the_final_evaluation_still_checkpoints(tmp_path, data_section, reference_run):
    """After the last step, the run evaluates and only then writes its checkpoint: a preemption there
    must not lose the run (with ckpt_interval 0 there is no other checkpoint)."""
    out = tmp_path / "run"
    config = run_config(data_section, out, ckpt_interval=0)
    # evaluations at steps 4 and 8, then the final one at step 12: the third call
    proc = subprocess.run([sys.executable, "-c", FINAL_EVAL_SIGNAL, json.dumps(config), "3"], capture_output=True,
                          text=True, timeout=120, env=env_one_thread())
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert json.loads(proc.stdout)["status"] == "interrupted"
    assert "interrupted by signal at step 12" in proc.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000012"]
    assert train(run_config(data_section, out, ckpt_interval=0), progress=False).summary["status"] == "finished"
    assert_same_weights(final_weights(out), final_weights(reference_run), "resumed after a signal in the final eval")
    assert logged_steps(out) == logged_steps(reference_run)  # the final evaluation is not logged twice
    summary, want = (json.loads((run / "summary.json").read_text()) for run in (out, reference_run))
    assert summary["final_val_loss_subset"] == want["final_val_loss_subset"]


# --- broken files --------------------------------------------------------------------------------


def _flip(path: Path, at: int, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(at, min(at + count, len(data))):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _edit_config(directory: Path, edit, reseal: bool = True) -> None:
    """Edit config.json; `reseal`: with a checksum that matches the edit (what the checks behind it see)."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    if reseal:
        config["config_sha256"] = config_checksum(config)
    path.write_text(json.dumps(config, indent=2))


def _other_tokenizer(directory: Path, vocab: int, text: str) -> None:
    from picollm.data.tokenizer import train_bpe

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).unlink()
    train_bpe([text] * 3, vocab).save(directory)


def _gpt2_tokenizer(directory: Path) -> None:
    (directory / "tokenizer.json").unlink()
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"picollm_tokenizer_format": 1, "tokenizer": "gpt2", "vocab_size": 50257, "eot_id": 50256,
         "eot_token": "<|endoftext|>"}))


BREAKAGES = {
    "truncated weights": (lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:5000]), ["model.safetensors", "truncated"]),
    "corrupted weights": (lambda d: _flip(d / "model.safetensors", (d / "model.safetensors").stat().st_size // 2),
                          ["model.safetensors", "corrupted"]),
    "corrupted weights header": (lambda d: _flip(d / "model.safetensors", 9), ["model.safetensors", "corrupted"]),
    "missing weights": (lambda d: (d / "model.safetensors").unlink(), ["model.safetensors", "missing"]),
    "config not JSON": (lambda d: (d / "config.json").write_text('{"model": {"family": "transformer",'),
                        ["config.json", "not valid JSON"]),
    "config not a mapping": (lambda d: (d / "config.json").write_text("[1, 2]"),
                             ["config.json", "no 'model' section"]),
    "head count edited": (lambda d: _edit_config(d, lambda c: c["model"].update(n_heads=1), reseal=False),
                          ["config.json", "was changed after it was written", "config_sha256"]),
    "newer format": (lambda d: _edit_config(d, lambda c: c.update(picollm_format=3)),
                     ["config.json", "format 3", "upgrade picollm"]),
    "unknown family": (lambda d: _edit_config(d, lambda c: c["model"].update(family="mamba")),
                       ["config.json", "unknown model family 'mamba'"]),
    "bad model field": (lambda d: _edit_config(d, lambda c: c["model"].update(n_layers="two")),
                        ["config.json", "model.n_layers"]),
    "shapes do not match the config": (lambda d: _edit_config(d, lambda c: c["model"].update(d_model=48)),
                                       ["model.safetensors", "shape", "do not match the config"]),
    "tokenizer larger than the model's vocab": (_gpt2_tokenizer,
                                                ["tokenizer_config.json", "50257 tokens", "vocab_size is 512"]),
    "tokenizer of another name": (lambda d: _other_tokenizer(d, 300, "a tiny other corpus"),
                                  ["tokenizer_config.json", "bpe:300", "bpe:512"]),
    "tokenizer of the same name, other merges": (
        lambda d: _other_tokenizer(d, 512, " ".join(f"word{i} and thing{i * 7}" for i in range(400))),
        ["tokenizer", "does not belong to this checkpoint"]),
    "tokenizer file damaged": (lambda d: (d / "tokenizer.json").write_text("{not json"), ["tokenizer.json"]),
}


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def stories_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stories") / "stories.txt"
    path.write_text("\n<|endoftext|>\n".join(STORIES) + "\n<|endoftext|>\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_checkpoint_is_one_clear_error_and_untouched(tmp_path, reference_run, stories_file, capsys, breakage):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(reference_run / "final", checkpoint)
    # sound, it works
    code, _, err = run_cli(capsys, "generate", str(checkpoint), "--prompt", "Once", "--max-new-tokens", "3",
                           "--device", "cpu")
    assert code == 0, err
    damage, needles = BREAKAGES[breakage]
    damage(checkpoint)
    before = _snapshot(checkpoint)
    time.sleep(0.01)
    for argv in (["generate", str(checkpoint), "--prompt", "Once", "--max-new-tokens", "3", "--device", "cpu"],
                 ["eval", str(checkpoint), "--data", str(stories_file), "--device", "cpu"]):
        code, out, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, argv[0], *needles)
        assert out == ""
        assert _snapshot(checkpoint) == before, "a failed command changed the broken checkpoint"
    with pytest.raises(UserError):
        load_model(checkpoint)


def test_broken_run_directory_errors_name_the_file(tmp_path, reference_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    latest = sorted((run / "checkpoints").glob("step-*"))[-1]
    cases = [
        (run / "config.yaml", "train: [unclosed\n", ["config.yaml", "not valid YAML"]),
        (latest / "trainer_state.json", "{}", ["trainer_state.json"]),
        (latest / "trainer_state.json", "{not json", ["trainer_state.json", "not valid JSON"]),
        (latest / "optimizer.safetensors", None, ["optimizer.safetensors"]),
    ]
    (run / "summary.json").unlink()  # unfinished: --resume loads the latest checkpoint
    shutil.rmtree(run / "final")
    for path, text, needles in cases:
        original = path.read_bytes()
        if text is None:
            _flip(path, path.stat().st_size // 2)
        else:
            path.write_text(text)
        before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
        code, out, err = run_cli(capsys, "train", "--resume", str(run), "--no-progress")
        assert_one_line_error(code, err, "train", *needles)
        assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()} == before
        path.write_bytes(original)


def test_prepare_rebuilds_a_damaged_cache_and_says_so(tmp_path, sample_path, capsys):
    args = ["prepare", "--data", str(sample_path), "--num-stories", "60", "--tokenizer", "bpe:300",
            "--split", "0.8,0.1,0.1", "--num-proc", "1", "--cache-dir", str(tmp_path / "cache"), "--json"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    directory = Path(json.loads(out)["directory"])
    kept = ("meta.json", ".verified.json")  # timings; the stamp of the files as built
    original = {p.name: p.read_bytes() for p in directory.iterdir() if p.name not in kept}

    def truncate(path: Path) -> None:
        path.write_bytes(path.read_bytes()[:-3])

    damages = [("train.bin", truncate, "truncated"), ("val.offsets.npy", lambda p: p.write_bytes(b"garbage"),
                                                      "damaged"),
               ("meta.json", lambda p: p.write_text("{"), "damaged"),
               ("tokenizer.json", lambda p: p.unlink(), "missing")]
    for name, damage, word in damages:
        damage(directory / name)
        code, out, err = run_cli(capsys, *args)
        assert code == 0, err
        assert "Traceback" not in err
        assert f"cached data is unusable ({directory / name}" in err and word in err and "rebuilding" in err, err
        info = json.loads(out)
        assert not info["cached"] and Path(info["directory"]) == directory
        assert {p.name: p.read_bytes() for p in directory.iterdir() if p.name not in kept} == original
        code, out, err = run_cli(capsys, *args)
        assert code == 0 and json.loads(out)["cached"] and err == ""


# --- numerical faults ----------------------------------------------------------------------------


def test_nan_and_inf_loss_or_gradient_are_skipped_and_counted(tmp_path, data_section, monkeypatch):
    from picollm.training import step as step_module

    class NanGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    calls = {"n": 0}
    real = step_module.model_loss

    def faulty(model, x, y, chunk_tokens, reduction):
        loss = real(model, x, y, chunk_tokens, reduction)
        if not model.training:
            return loss
        calls["n"] += 1
        if calls["n"] == 2:
            return loss + float("inf")  # an infinite loss with finite gradients
        if calls["n"] == 5:
            return NanGradient.apply(loss)  # a finite loss with NaN gradients
        if calls["n"] == 6:
            return loss * float("-inf")
        return loss

    monkeypatch.setattr(step_module, "model_loss", faulty)
    result = train(run_config(data_section, tmp_path / "run", eval_interval=0, max_bad_steps=3, max_steps=8),
                   progress=False)
    assert result.summary["status"] == "finished"
    assert result.summary["skipped_steps"] == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 9))
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path / "run").values())


def test_divergence_stops_with_a_message_naming_the_last_good_checkpoint(tmp_path, data_section, monkeypatch,
                                                                         capsys):
    from picollm.training import step as step_module

    real = step_module.model_loss
    calls = {"n": 0}

    def poisoned(model, x, y, chunk_tokens, reduction):
        loss = real(model, x, y, chunk_tokens, reduction)
        calls["n"] += model.training
        return loss * float("nan") if model.training and calls["n"] >= 6 else loss

    monkeypatch.setattr(step_module, "model_loss", poisoned)
    out = tmp_path / "run"
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(run_config(data_section, out, eval_interval=0, ckpt_interval=4,
                                                     max_bad_steps=2)))
    code, _, err = run_cli(capsys, "train", "--config", str(config_file), "--no-progress")
    lines = [line for line in err.splitlines() if line.startswith("picollm train: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "2 steps in a row had a non-finite loss or gradient" in lines[0]
    assert "stopped at step 7" in lines[0]
    last_good = out / "checkpoints" / "step-00000004"
    assert str(last_good) in lines[0], lines[0]
    assert err.count("step skipped") == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [last_good.name]
    model = load_model(last_good)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the advice is a command that runs: from the last good checkpoint, at a lower rate (here, the fault gone)
    command = re.search(r"`(picollm train [^`]*)`", lines[0]).group(1)
    assert command == f"picollm train --resume {out} --allow-recipe-change --train.lr 0.001", command
    monkeypatch.setattr(step_module, "model_loss", real)
    code, _, err = run_cli(capsys, *command.split()[1:], "--no-progress")
    assert code == 0, err
    assert rundir.read_history(out)[-1]["changes"] == {"train.lr": [0.003, 0.001]}
    monkeypatch.setattr(step_module, "model_loss", poisoned)
    # with no checkpoint before the divergence, the message says so rather than pointing at nothing
    calls["n"] = 0
    code, _, err = run_cli(capsys, "train", "--config", str(config_file), "--no-progress", "--fresh",
                           "--train.ckpt_interval", "100")
    assert code == 2 and "no checkpoint was written before" in err, err


NAN_RUNNER = r"""
import json, os, sys
import torch
from safetensors.torch import save_file
from picollm.training import setup as setup_module
from picollm.training import step as step_module
from picollm.training import trainer as trainer_module

rank = int(os.environ["RANK"])
calls = {"n": 0}
stepped = []
real = step_module.model_loss

def poisoned(model, x, y, chunk_tokens, reduction):
    loss = real(model, x, y, chunk_tokens, reduction)
    if not model.training:
        return loss
    calls["n"] += 1
    if rank == 1 and calls["n"] in (3, 4):
        return loss + torch.tensor(float("nan"))  # NaN loss, finite gradients: only rank 1 can tell
    if rank == 1 and calls["n"] >= 7:
        return loss * float("nan")  # NaN loss and gradients
    return loss

step_module.model_loss = poisoned
from torch.optim.optimizer import register_optimizer_step_post_hook
register_optimizer_step_post_hook(lambda opt, args, kwargs: stepped.append(calls["n"]))
models = []
real_build = setup_module.build_model
setup_module.build_model = lambda spec: models.append(real_build(spec)) or models[-1]
config = json.loads(sys.argv[1])
report = {"rank": rank}
try:
    trainer_module.train(config, progress=False)
except trainer_module.TrainingDiverged as exc:
    report["error"] = str(exc)
report["stepped"] = stepped
save_file({k: v.detach().clone() for k, v in models[-1].state_dict().items()},
          os.path.join(config["out"], f"rank{rank}.safetensors"))
with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
    json.dump(report, f)
"""


@pytest.mark.slow
def test_nan_on_one_of_two_gloo_ranks_both_skip_then_stop(tmp_path, data_section):
    out = tmp_path / "ddp"
    config = run_config(data_section, out, max_bad_steps=3, eval_interval=0, ckpt_interval=2, max_steps=16)
    config["model"]["dropout"] = 0.0
    # the data is prepared before the ranks start (rank 0 would build it while rank 1 waits: slower)
    from picollm.config import DataConfig, from_dict
    from picollm.data.prepare import prepare

    prepare(from_dict(DataConfig, config["data"]), progress=False)
    runner = tmp_path / "nan_runner.py"
    runner.write_text(NAN_RUNNER)
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(runner), json.dumps(config)],
                          capture_output=True, text=True, timeout=300, env=env_one_thread(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    # rank 0 never saw a NaN itself, yet it skipped exactly the steps rank 1 skipped
    assert reports[0]["stepped"] == reports[1]["stepped"] == [1, 2, 5, 6], reports
    for report in reports:
        assert "3 steps in a row had a non-finite loss or gradient" in report["error"]
        assert "stopped at step 9" in report["error"]
    weights = [load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)]
    assert_same_weights(weights[0], weights[1], "rank 0 vs rank 1")
    assert all(torch.isfinite(t).all() for t in weights[0].values())
    # the last checkpoint holds those same weights (steps 7 and 8 were skipped), and loads
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000006", "step-00000008"]
    model = load_model(out / "checkpoints" / "step-00000008")
    assert_same_weights({k: v for k, v in model.state_dict().items()}, weights[0], "last checkpoint")
    assert proc.stderr.count("step skipped") == 5  # rank 0 reports each skipped step once


# --- internal errors keep their traceback --------------------------------------------------------


def test_an_internal_bug_is_not_swallowed(reference_run, monkeypatch, capsys):
    import picollm.generation

    def bug(*args, **kwargs):
        raise RuntimeError("an injected internal bug")

    monkeypatch.setattr(picollm.generation, "generate", bug)
    with pytest.raises(RuntimeError, match="an injected internal bug"):
        main(["generate", str(reference_run), "--prompt", "Once", "--device", "cpu"])
    script = ("import sys, picollm.generation as g\n"
              "def bug(*a, **k): raise RuntimeError('an injected internal bug')\n"
              "g.generate = bug\n"
              "from picollm.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", script, "generate", str(reference_run), "--prompt", "Once",
                           "--device", "cpu"], capture_output=True, text=True, timeout=120, env=env_one_thread())
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.rstrip().endswith("RuntimeError: an injected internal bug")


# --- safety: nothing loaded can run code ---------------------------------------------------------

UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
UNSAFE_CALLS = {"yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load",
                "yaml.full_load_all", "torch.jit.load", "torch.package.PackageImporter", "eval", "exec",
                "numpy.lib.format.read_array"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _is_constant(keywords: dict[str, ast.expr], key: str, value: object) -> bool:
    node = keywords.get(key)
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_uses(source: str, filename: str = "<source>") -> list[str]:
    """Places in `source` that could unpickle or run loaded code."""
    found = []
    aliases = {"np": "numpy"}
    tree = ast.parse(source)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNSAFE_MODULES:
                    found.append(f"{where}: import {alias.name}")
                if alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] in UNSAFE_MODULES:
                found.append(f"{where}: from {module} import ...")
            for alias in node.names:
                full = f"{module}.{alias.name}"
                if full in ("torch.load", "numpy.load") or full in UNSAFE_CALLS:
                    found.append(f"{where}: from {module} import {alias.name}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            head, _, rest = name.partition(".")
            name = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
            keywords = {k.arg: k.value for k in node.keywords if k.arg}
            if name == "torch.load" and not _is_constant(keywords, "weights_only", True):
                found.append(f"{where}: torch.load without weights_only=True")
            if name in UNSAFE_CALLS:
                found.append(f"{where}: {name}(...)")
            if "allow_pickle" in keywords and not _is_constant(keywords, "allow_pickle", False):
                found.append(f"{where}: allow_pickle")
            if "trust_remote_code" in keywords and not _is_constant(keywords, "trust_remote_code", False):
                found.append(f"{where}: trust_remote_code")
    for lineno, line in enumerate(source.splitlines(), 1):
        if re.search(r"trust_remote_code[\"']?\s*[:=]\s*True", line):
            found.append(f"{filename}:{lineno}: trust_remote_code=True")
    return found


def test_the_safety_scanner_catches_unsafe_code():
    unsafe = ["import pickle", "from pickle import loads", "import dill as d", "torch.load(f)",
              "torch.load(f, weights_only=False)", "from torch import load",
              "import numpy as n\nn.load(p, allow_pickle=True)",
              "np.load(p, allow_pickle=flag)", "yaml.load(text)", "yaml.unsafe_load(text)",
              "load_dataset(name, trust_remote_code=True)", "kwargs = {'trust_remote_code': True}",
              "AutoModel.from_pretrained(p, trust_remote_code=x)", "eval(text)", "torch.jit.load(p)"]
    for snippet in unsafe:
        assert unsafe_uses(snippet), snippet
    safe = ["torch.load(f, weights_only=True)", "np.load(p)", "np.load(p, allow_pickle=False)", "yaml.safe_load(t)",
            "json.loads(t)", "load_file(p)", "load_dataset(name, trust_remote_code=False)", "model.eval()"]
    for snippet in safe:
        assert not unsafe_uses(snippet), snippet


# Text that looks like remote-code loading but is not picollm loading anything: the model card's usage
# snippet (picollm/export/card.py) tells transformers users to pass trust_remote_code=True for a custom
# export. The template files copied into exports (picollm/export/hf_template/) are scanned like all code.
ALLOWED_REMOTE_CODE_TEXT = {"picollm/export/card.py": 'REMOTE_CODE_ARGUMENT = ", trust_remote_code=True"'}


def test_package_source_has_no_pickle_or_remote_code():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    assert PACKAGE / "export" / "hf_template" / "modeling_picollm.py" in files
    found = []
    for path in files:
        name = str(path.relative_to(REPO))
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for hit in unsafe_uses(source, name):
            lineno = int(hit.split(":")[1])
            allowed = ALLOWED_REMOTE_CODE_TEXT.get(name)
            if allowed is not None and lines[lineno - 1].strip() == allowed and hit.endswith("trust_remote_code=True"):
                continue
            found.append(hit)
    assert not found, "unsafe loading in the package:\n" + "\n".join(found)


def test_pickle_trap_is_live(tmp_path):
    marker = tmp_path / "control"
    pickle.loads(pickle_trap(marker)).close()
    assert marker.exists()  # so the files below would give themselves away if anything unpickled them


def _block_unpickling(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("something unpickled")

    for target in (pickle, torch):
        monkeypatch.setattr(target, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


def test_loading_and_resuming_never_unpickle(tmp_path, reference_run, data_section, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    (run / "summary.json").unlink()
    shutil.rmtree(run / "final")
    _block_unpickling(monkeypatch)
    model = picollm.load(str(reference_run))
    assert model.tokenizer is not None
    config = run_config(data_section, run, max_steps=13)  # one step more: a recipe change, allowed
    assert train(config, progress=False, allow_recipe_change=True).summary["steps"] == 13


# --- full disk -----------------------------------------------------------------------------------


def _mount_tmpfs(directory: Path, size: int) -> bool:
    directory.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                          capture_output=True, text=True)
    return proc.returncode == 0


def _unmount(directory: Path) -> None:
    subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def _checkpoint_bytes(run: Path) -> tuple[int, int]:
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    return (sum(p.stat().st_size for p in ckpt.iterdir()),
            sum(p.stat().st_size for p in (run / "best").iterdir()))


def _fill_disk_at_second_checkpoint(monkeypatch) -> None:
    """The fallback without a small filesystem: the second checkpoint's optimizer state hits ENOSPC,
    as safetensors reports it."""
    from safetensors import SafetensorError

    from picollm.training import state

    real = state.save_file
    calls = {"n": 0}

    def full(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:
            Path(path).write_bytes(b"\0" * 1000)  # a partly written file, as a full disk leaves it
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(state, "save_file", full)


@pytest.mark.parametrize("disk", ["tmpfs", "patched writer"])
def test_full_disk_is_a_clear_error_and_the_last_checkpoint_survives(tmp_path, data_section, reference_run, monkeypatch,
                                                                     capsys, disk):
    mount = tmp_path / "disk"
    out = mount / "run"
    ckpt_bytes, best_bytes = _checkpoint_bytes(reference_run)
    # room for one checkpoint, best/ and the run's small files; not for a second checkpoint beside the first
    size = -(-int(1.5 * ckpt_bytes + best_bytes + 96 * 1024) // 4096) * 4096
    mounted = disk == "tmpfs" and _mount_tmpfs(mount, size)
    if not mounted:
        mount.mkdir(parents=True, exist_ok=True)
        _fill_disk_at_second_checkpoint(monkeypatch)
    try:
        config_file = tmp_path / "run.yaml"
        config_file.write_text(yaml.safe_dump(run_config(data_section, out, keep_last=1)))
        code, _, err = run_cli(capsys, "train", "--config", str(config_file), "--no-progress")
        lines = [line for line in err.splitlines() if line.startswith("picollm train: error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert "no space left on device" in lines[0] and str(out) in lines[0], lines[0]
        # the failed checkpoint left nothing behind; the previous one is complete, loadable and resumable
        entries = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert entries == ["step-00000002"], entries
        before = _snapshot(out / "checkpoints" / "step-00000002")
        picollm.load(str(out / "checkpoints" / "step-00000002"))
        assert not (out / "final").exists()
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        else:
            monkeypatch.undo()
        code, _, err = run_cli(capsys, "train", "--resume", str(out), "--no-progress")
        assert code == 0, err
        assert_same_weights(final_weights(out), final_weights(reference_run), "resumed after a full disk")
        assert before  # the checkpoint resumed from was intact
    finally:
        if mounted:
            _unmount(mount)


@pytest.mark.parametrize("disk", ["tmpfs", "patched writer"])
def test_full_data_cache_is_a_clear_error(tmp_path, sample_path, monkeypatch, capsys, disk):
    import picollm.data.build as build_module

    cache = tmp_path / "cache"
    mounted = disk == "tmpfs" and _mount_tmpfs(cache, 64 * 1024)
    if not mounted:
        def full_open(path, mode="r", *args, **kwargs):
            handle = open(path, mode, *args, **kwargs)
            if str(path).endswith(".bin") and "w" in mode:
                handle.close()

                class Full:
                    def write(self, data):
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

                    def close(self):
                        pass
                return Full()
            return handle

        monkeypatch.setattr(build_module, "open", full_open, raising=False)  # shadows the builtin there
    try:
        code, out, err = run_cli(capsys, "prepare", "--data", str(sample_path), "--num-stories", "300",
                                 "--tokenizer", "bpe:300", "--num-proc", "1", "--cache-dir", str(cache))
        assert_one_line_error(code, err, "prepare", "no space left on device", str(cache))
        assert not (cache / "prepared").exists()  # the failed first build left no empty cache behind
    finally:
        if mounted:
            _unmount(cache)
