"""Small helpers shared by the tests (pytest puts this folder on sys.path); fixtures are in conftest.py."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from picollm.cli import main

# the training tests' model: a one-block Transformer small enough to train 12 steps in about a second
TINY_MODEL = {"family": "transformer", "d_model": 32, "n_heads": 2, "n_layers": 1, "context_length": 32}


def exit_code(argv: list[str]) -> int:
    """`picollm.cli.main`'s return code, or the code of argparse's SystemExit (a bad flag value)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


def run_config(data_section: dict, out: Path, model: dict | None = None, **train) -> dict:
    """A 12-step run of `TINY_MODEL` (dropout 0.1) on the `data_section` fixture's data: evaluations at
    steps 4, 8 and 12, a checkpoint every 2 steps, a log row every step."""
    recipe = {"batch_size": 4, "max_steps": 12, "eval_interval": 4, "eval_batches": 2, "ckpt_interval": 2,
              "log_interval": 1, "sample_tokens": 4, "threads": 1, "lr": 3e-3, **train}
    return {"data": dict(data_section), "model": model or dict(TINY_MODEL, dropout=0.1), "train": recipe,
            "out": str(out)}


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str = "") -> None:
    assert got.keys() == want.keys(), what
    for name in want:
        assert torch.equal(got[name], want[name]), f"{what}: {name} differs"


def logged_steps(out: Path) -> dict[str, list[int]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {kind: [r["step"] for r in rows if r["kind"] == kind] for kind in ("train", "eval")}


def pickle_trap(marker: Path) -> bytes:
    """A pickle that creates `marker` when it is unpickled (as a malicious one would run anything)."""
    return b"c__builtin__\nopen\n(V" + str(marker).encode() + b"\nVw\ntR."


def wait_for_train_rows(proc: subprocess.Popen, out: Path, rows: int = 2, timeout: float = 120) -> None:
    """Until the run training in `proc` has logged `rows` training steps in out/metrics.jsonl (or it ended)."""
    metrics = out / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count('"train"') >= rows:
            return
        time.sleep(0.01)


def assert_same_loss_and_gradients(model: torch.nn.Module, want_loss, got_loss, atol: float = 1e-5) -> None:
    """`got_loss()` and `want_loss()` (each a scalar loss of `model`) agree, and so do their gradients."""
    want = want_loss()
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = got_loss()
    got.backward()
    assert abs(got.item() - want.item()) < 1e-5
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, want_grads[name], atol=atol), name
