"""Shared by the serve tests: a tiny real study to serve, servers on loopback, and models made slow,
endless or broken on purpose (pytest puts this folder on sys.path)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
# two runs of a real study on 300 stories of the sample with a 512-token BPE (about 6 s, once per session)
TINY_STUDY = """
title: serve test study
default_budget: tiny
base:
  data: {num_stories: 300, split: [0.8, 0.1, 0.1], tokenizer: "bpe:512", num_proc: 1}
  model: {context_length: 32}
  train: {batch_size: 8, max_steps: 40, eval_interval: 20, eval_batches: 2, ckpt_interval: 20, log_interval: 10,
          lr: 5.0e-3, sample_tokens: 4, threads: 1, dtype: fp32}
budgets:
  tiny: {description: the serve tests' budget}
eval: {prompts: 2, prompt_tokens: 4, max_new_tokens: 8}
groups:
  size:
    title: sizes
    runs:
      - {name: "lstm-{size}", preset: "lstm-{size}", grid: {size: [pico]}}
      - {name: "transformer-{size}", preset: "transformer-{size}", grid: {size: [pico]}}
"""
MODEL_IDS = ["lstm-pico", "transformer-pico"]


def tiny_study(tmp_path_factory: Any, sample_path: Path) -> Path:
    """The study directory, trained on first use and shared by every serve test module of the session."""
    from picollm.cli import main

    root = tmp_path_factory.getbasetemp() / "serve-study"
    out = root / "study"
    if (out / "report" / "index.html").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    spec = root / "tiny.yaml"
    spec.write_text(TINY_STUDY, encoding="utf-8")
    code = main(["study", str(spec), "--data", str(sample_path), "--out", str(out), "--no-progress",
                 f"--data.cache_dir={root / 'cache'}", "--jobs", "1"])
    assert code == 0, "the tiny study for the serve tests did not finish"
    return out


# ---------------------------------------------------------------------------------------------
# models made slow, endless or broken (patched on the instance; monkeypatch undoes it)


def make_endless(monkeypatch: Any, model: Any, delay_s: float = 0.005) -> dict[str, int]:
    """The model never chooses end-of-text and takes `delay_s` per step; returns a live step counter."""
    eot = model.tokenizer.eot_id
    calls = {"steps": 0}
    prefill, decode = model.prefill, model.decode

    def no_eot(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[:, eot] = float("-inf")
        calls["steps"] += 1
        time.sleep(delay_s)
        return logits

    def slow_prefill(tokens: torch.Tensor) -> Any:
        logits, state = prefill(tokens)
        return no_eot(logits), state

    def slow_decode(tokens: torch.Tensor, state: Any) -> Any:
        logits, state = decode(tokens, state)
        return no_eot(logits), state

    monkeypatch.setattr(model, "prefill", slow_prefill)
    monkeypatch.setattr(model, "decode", slow_decode)
    return calls


def make_broken(monkeypatch: Any, model: Any) -> None:
    """Every forward pass of the model raises, as a bug in a model would."""
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("this model is broken on purpose")

    for name in ("prefill", "decode", "features"):
        monkeypatch.setattr(model, name, broken)


# ---------------------------------------------------------------------------------------------
# servers on loopback


@contextmanager
def thread_server(app: Any):
    """`app` under uvicorn in a thread on a free loopback port; yields its base URL."""
    import uvicorn

    from picollm.serve.server import bind, url_of

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def process_server(*args: str):
    """`picollm serve ARGS --port 0` in its own process; yields (base URL, process)."""
    command = [sys.executable, "-m", "picollm", "serve", *args, "--port", "0", "--no-access-log"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    lines: list[str] = []
    url = None
    try:
        deadline = time.monotonic() + 60
        while url is None:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, f"picollm serve exited: {''.join(lines)}"
            assert time.monotonic() < deadline, f"picollm serve did not start: {''.join(lines)}"
            lines.append(line)
            found = re.search(r"playground (http://\S+)/ ", line)
            url = found.group(1) if found else None
        # keep reading stderr so that the server never blocks on a full pipe
        threading.Thread(target=lambda: [lines.append(x) for x in proc.stderr], daemon=True).start()
        yield url, proc, lines
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc")


def sse_events(text: str) -> list[Any]:
    """The JSON of each `data:` line of a server-sent event stream ("[DONE]" kept as the string)."""
    import json

    out = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                payload = line[len("data: "):]
                out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out
