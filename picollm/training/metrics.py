"""What a run reports while it trains: metrics.jsonl rows (and Weights & Biases), the progress display,
and the few figures of its summary that are not losses."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from picollm import rundir
from picollm.config import RunConfig, to_dict
from picollm.errors import UserError
from picollm.progress import progress_bar
from picollm.training.distributed import Dist, mean_across
from picollm.training.state import TrainState
from picollm.training.step import StepResult


class Clock:
    """Seconds of training: those of earlier processes (a resumed run) plus this one's since `start`."""

    def __init__(self, before: float) -> None:
        self.before = before
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.started


class MetricsLog:
    """metrics.jsonl always; Weights & Biases too when asked. Rank 0 only."""

    def __init__(self, out: Path, cfg: RunConfig, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out / rundir.METRICS
        self.wandb = None
        if enabled and cfg.train.wandb:
            try:
                import wandb
            except ImportError:
                raise UserError("train.wandb is set but wandb is not installed: pip install 'picollm[wandb]'") \
                    from None
            self.wandb = wandb.init(project=cfg.train.wandb_project, name=cfg.train.wandb_run_name,
                                    config=to_dict(cfg), dir=str(out), resume="allow")

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k not in ("kind", "step")}, step=row["step"])

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if self.wandb is not None:
            if summary:
                for key, value in summary.items():
                    if isinstance(value, (int, float, str)):
                        self.wandb.summary[key] = value
            self.wandb.finish()


class TrainingLog:
    """The training rows of metrics.jsonl, the progress bar and the run's own stderr lines.

    Every rank calls it, because a logged loss is averaged across ranks; rank 0 writes."""

    def __init__(self, out: Path, cfg: RunConfig, d: Dist, device: torch.device, total_steps: int,
                 state: TrainState, train_tokens: int, clock: Clock, progress: bool) -> None:
        self.cfg, self.d, self.device, self.clock = cfg, d, device, clock
        self.total_steps = total_steps
        self.train_tokens = max(1, train_tokens)
        self.metrics = MetricsLog(out, cfg, enabled=d.is_main)
        self.bar = progress_bar(total_steps, f"{cfg.model['family']} {out.name}", initial=state.step, unit="step") \
            if progress and d.is_main else None
        self._window_start, self._window_tokens = time.perf_counter(), 0

    def say(self, text: str) -> None:
        if self.d.is_main:
            print(f"[picollm] {text}", file=sys.stderr)

    def step(self, state: TrainState, lr: float, result: StepResult) -> None:
        """After each step: a metrics row every `log_interval` steps and at the last; the bar."""
        self._window_tokens += result.tokens * self.d.world_size
        if state.step % self.cfg.train.log_interval == 0 or state.step == self.total_steps:
            loss = mean_across(result.loss.item(), self.d, self.device)
            now = time.perf_counter()
            tps = self._window_tokens / max(now - self._window_start, 1e-9)
            self._window_start, self._window_tokens = now, 0
            self.metrics.write({"kind": "train", "step": state.step, "tokens": state.tokens,
                                "epoch": self.epochs(state), "lr": lr, "train_loss": loss,
                                "train_ppl": math.exp(min(loss, 700)), "grad_norm": float(result.grad_norm),
                                "tokens_per_s": tps, "elapsed": self.clock.elapsed()})
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
        if self.bar is not None:
            self.bar.update(1)

    def epochs(self, state: TrainState) -> float:
        return state.tokens / self.train_tokens

    def end_progress(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self, summary: dict[str, Any] | None = None) -> None:
        self.end_progress()
        self.metrics.close(summary)


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the training tokens' unigram distribution: the loss of a model that ignores context."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
