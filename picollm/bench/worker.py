"""The bench's worker: a fresh Python process holding one model and one kind of step, driven one JSON
line at a time.

The parent (`Worker`) starts `python -m picollm.bench.worker` and writes one command per line to its
stdin, `{"op": "init", ...WorkerSpec}` first, then `{"op": "step"}`, `{"op": "eval"}`, ...; the child
(`serve`) answers each with one JSON line on stdout, `{"ok": true, ...}` or `{"ok": false, "error": ...}`.
A process per path makes its peak resident set its own, and lets paths that are compared take their
steps in turn (`alternate`), so that load from other processes falls on all of them alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import torch

from picollm.bench.machine import peak_rss_mb, rss_mb, sync
from picollm.bench.workloads import STEP_KINDS, make_step, random_prompts, time_generation, time_prepare
from picollm.evaluation import evaluate_tokens
from picollm.models.registry import build_model

WORKER_KINDS = (*STEP_KINDS, "model", "prepare")


@dataclass
class WorkerSpec:
    """What one worker holds. `kind`: a step kind (picollm, baseline, kgram_loop), "model" (a model for
    generation, no step) or "prepare" (no model at all)."""

    kind: str
    model: dict[str, Any] | None = None
    batch: int = 1
    context: int = 256
    dtype: str = "fp32"  # picollm's autocast dtype (resolved) for its step and for eval
    chunk_tokens: int = 4096
    threads: int | None = None
    device: str = "cpu"
    compile: bool = False
    seed: int = 0
    eval_windows: int | None = None  # windows of the eval batch (default: `batch`)
    time_backward: bool = False  # also report forward + backward alone (parameter hooks; eager only)
    env: dict[str, str | None] = field(default_factory=dict)  # the process's environment: set, or unset (None)


# ---------------------------------------------------------------------------------------------
# the child


class WorkerState:
    """The child's side: the model, its batches and its step, and one method per op."""

    def __init__(self, spec: WorkerSpec) -> None:
        if spec.kind not in WORKER_KINDS:
            raise ValueError(f"unknown worker kind {spec.kind!r}; choose from {', '.join(WORKER_KINDS)}")
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        self.device = torch.device(spec.device)
        self.steps = 0
        self.backward_end: float | None = None
        if spec.kind != "prepare":
            self._build_model()
        self.rss_ready = rss_mb()

    def _build_model(self) -> None:
        s = self.spec
        torch.manual_seed(s.seed)
        self.model = build_model(s.model).to(self.device)
        self.model.train()
        V = self.model.config.vocab_size
        gen = torch.Generator().manual_seed(s.seed + 1)
        # a few distinct batches, cycled: speed does not depend on the ids
        self.batches = [(torch.randint(0, V, (s.batch, s.context), generator=gen).to(self.device),
                         torch.randint(0, V, (s.batch, s.context), generator=gen).to(self.device)) for _ in range(2)]
        self.eval_tokens = torch.randint(0, V, ((s.eval_windows or s.batch) * s.context + 1,), generator=gen).numpy()
        self.step_fn = make_step(s.kind, self.model, s.dtype, s.chunk_tokens, s.compile) if s.kind in STEP_KINDS \
            else None
        if s.time_backward:
            # the last gradient accumulated ends backward: timed without touching the step itself
            for p in self.model.parameters():
                p.register_post_accumulate_grad_hook(self._backward_done)

    def _backward_done(self, _param: torch.Tensor) -> None:
        self.backward_end = time.perf_counter()

    def step(self, rows: int | None = None) -> dict[str, Any]:
        """One training step on the next batch (its first `rows` sequences only, for a cheap warm-up)."""
        x, y = self.batches[self.steps % len(self.batches)]
        if rows is not None:
            x, y = x[:rows], y[:rows]
        self.steps += 1
        self.backward_end = None
        sync(self.device)
        start = time.perf_counter()
        loss = self.step_fn(x, y)
        sync(self.device)
        end = time.perf_counter()
        reply = {"seconds": end - start, "loss": loss}
        if self.spec.time_backward:
            reply["fwd_bwd_seconds"] = (self.backward_end or end) - start
        return reply

    def eval(self) -> dict[str, Any]:
        s = self.spec
        sync(self.device)
        start = time.perf_counter()
        result = evaluate_tokens(self.model, self.eval_tokens, s.context, batch_size=s.batch, device=self.device,
                                 dtype=s.dtype, chunk_tokens=s.chunk_tokens or 4096)
        sync(self.device)
        return {"seconds": time.perf_counter() - start, "tokens": result.tokens, "nll": result.nll}

    def generate(self, use_cache: bool, batch: int, new_tokens: int, prompt_tokens: int) -> dict[str, Any]:
        prompts = random_prompts(self.model.config.vocab_size, batch, prompt_tokens)
        return time_generation(self.model, prompts, new_tokens, use_cache)

    def prepare(self, data: str, tokenizer: str, cache_dir: str, num_proc: int | None = None,
                warm_tokenizer: bool = False) -> dict[str, Any]:
        return time_prepare(data, tokenizer, cache_dir, num_proc, warm_tokenizer)

    def stats(self) -> dict[str, Any]:
        out = {"peak_rss_mb": peak_rss_mb(), "rss_ready_mb": self.rss_ready, "rss_mb": rss_mb()}
        if self.device.type == "cuda":
            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out


OPS = ("step", "eval", "generate", "prepare", "stats")


def serve(stdin: TextIO, out: TextIO) -> int:
    """Answer one JSON line on `out` per JSON command line of `stdin`, until "quit" or the end of `stdin`."""
    state: WorkerState | None = None
    for line in stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "quit":
            return 0
        try:
            if op == "init":
                state = WorkerState(WorkerSpec(**cmd))
                reply: dict[str, Any] = {"rss_mb": state.rss_ready}
            elif op not in OPS:
                raise ValueError(f"unknown op {op!r}; choose from init, {', '.join(OPS)}, quit")
            elif state is None:
                raise RuntimeError(f"op {op!r} before init")
            else:
                reply = getattr(state, op)(**cmd)
            reply["ok"] = True
        except Exception as exc:  # reported to the parent, which says which config failed
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


# ---------------------------------------------------------------------------------------------
# the parent


class WorkerError(RuntimeError):
    pass


class Worker:
    """The parent's handle on one worker process; `call(op, **kwargs)` returns the op's reply."""

    def __init__(self, spec: WorkerSpec) -> None:
        env = dict(os.environ)
        for key, value in spec.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "picollm.bench.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.spec = spec
        self.call("init", **{k: v for k, v in asdict(spec).items() if k != "env"})

    def _name(self) -> str:
        return f"{self.spec.kind} worker for {self.spec.model}" if self.spec.model else f"{self.spec.kind} worker"

    def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self.log.seek(0)
            tail = self.log.read()[-2000:]
            code = self.proc.wait()
            raise WorkerError(f"{self._name()} died (exit {code}; killed for memory if -9):\n{tail}")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise WorkerError(f"{self._name()}, op {op}: {reply['error']}\n{reply.get('traceback', '')}")
        return reply

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
        except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def alternate(workers: dict[str, Worker], op: str, reps: int, warmup: int = 1, between=None,
              **kwargs: Any) -> dict[str, list[dict[str, Any]]]:
    """Run `op` on every worker in turn, `warmup` unrecorded rounds then `reps` recorded ones, the order
    reversed every other round (ABBA), so that slow phases of the machine fall on all alike.
    `between(name)` runs after each recorded op of that worker (e.g. an interleaved eval)."""
    names = list(workers)
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(warmup + reps):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            reply = workers[name].call(op, **kwargs)
            if r >= warmup:
                results[name].append(reply)
                if between is not None:
                    between(name)
    return results


def main() -> int:
    """`python -m picollm.bench.worker`: the protocol on stdin and stdout."""
    protocol = sys.stdout
    sys.stdout = sys.stderr  # anything printed by the code under test stays off the protocol
    return serve(sys.stdin, protocol)


if __name__ == "__main__":
    sys.exit(main())
