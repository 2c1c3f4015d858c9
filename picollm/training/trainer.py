"""The training loop. It knows no model family: any registered `LanguageModel` trains through it.

`train(config)` prepares the data (cached), builds the model, and runs the recipe in
`config.train`: AdamW/Adam/SGD, warmup + cosine/linear/constant schedule, gradient accumulation and
clipping, periodic evaluation on a fixed validation subset, checkpoints (atomic, resumable, last K
kept, best by validation loss), a metrics log, optional Weights & Biases, and DistributedDataParallel
under torchrun. A run killed at any moment resumes from its last checkpoint; on CPU the resumed run
ends with the same weights, bit for bit, as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import resource
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from picollm.checkpoint import (
    DiskFullError,
    is_disk_full,
    save_model,
    write_dir_atomic,
    write_json_atomic,
    write_model_files,
)
from picollm.config import RunConfig, from_dict, to_dict
from picollm.device import autocast, resolve_device, resolve_dtype
from picollm.errors import UserError
from picollm.loss import model_loss
from picollm.models.base import LanguageModel
from picollm.models.registry import build_model
from picollm.training import full_eval, lr_search, run_dir
from picollm.training.distributed import Dist, any_flag, barrier, init_distributed, mean_across, shutdown
from picollm.training.schedule import lr_at
from picollm.training.state import read_training_state, write_training_state


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps: the recipe (lr, clipping, dtype) needs changing."""


@dataclass
class RunResult:
    directory: Path
    summary: dict[str, Any]
    model: LanguageModel | None = field(default=None, repr=False)


# ---------------------------------------------------------------------------------------------
# set-up helpers


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """Weight decay on matrices only (not on norms, biases or embeddings' gains), as in GPT-2/nanoGPT."""
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        # the fused kernel does the whole update in one pass over each tensor (3x faster than foreach on CPU)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True)
    if cfg.optimizer == "adam":
        # Adam's weight decay is L2 added to the gradient (the classic, coupled form)
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), foreach=True)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, foreach=True)


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the training tokens' unigram distribution: the loss of a model that ignores context."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class LossModule(nn.Module):
    """model + chunked loss as one module, so DDP and torch.compile see a single forward."""

    def __init__(self, model: LanguageModel, chunk_tokens: int) -> None:
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return model_loss(self.model, inputs, targets, self.chunk_tokens, reduction="sum")


# ---------------------------------------------------------------------------------------------
# the plan: how many steps, where the data stands


@dataclass
class Plan:
    total_steps: int
    steps_per_epoch: int
    tokens_per_step: int  # global, all ranks
    batches_per_epoch: int


def make_plan(cfg: RunConfig, batches_per_epoch: int, windows_per_epoch: int, d: Dist) -> Plan:
    t = cfg.train
    T = cfg.model["context_length"]
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / t.grad_accum))
    tokens_per_step = t.batch_size * t.grad_accum * T * d.world_size
    if t.max_steps is not None:
        total = t.max_steps
    elif t.max_tokens is not None:
        total = max(1, math.ceil(t.max_tokens / tokens_per_step))
    else:
        total = max(1, math.ceil(t.epochs * steps_per_epoch))
    return Plan(total, steps_per_epoch, tokens_per_step, batches_per_epoch)


def micro_batches(loader, start_epoch: int, start_batch: int) -> Iterator[tuple[int, int, Any, Any]]:
    """(epoch, batch index, x, y) forever, epoch after epoch, from a saved position."""
    epoch, batch = start_epoch, start_batch
    while True:
        for x, y in loader.epoch_batches(epoch, start_batch=batch):
            yield epoch, batch, x, y
            batch += 1
        epoch, batch = epoch + 1, 0


# ---------------------------------------------------------------------------------------------
# logging


class MetricsLog:
    """metrics.jsonl always; Weights & Biases too when asked. Rank 0 only."""

    def __init__(self, out: Path, cfg: RunConfig, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out / run_dir.METRICS
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


# ---------------------------------------------------------------------------------------------
# the entry points


def resolve_config(config: RunConfig | dict[str, Any]) -> RunConfig:
    if isinstance(config, RunConfig):
        return config
    return from_dict(RunConfig, config)


def _prepare(cfg: RunConfig, d: Dist, progress: bool):
    from picollm.data.prepare import prepare

    # rank 0 builds the cache; the others wait, then open it
    if d.is_main:
        data = prepare(cfg.data, progress=progress)
    barrier(d)
    if not d.is_main:
        data = prepare(cfg.data, progress=False)
    return data


def _with_vocab(cfg: RunConfig, vocab_size: int) -> RunConfig:
    """The model's vocab defaults to the tokenizer's; a larger one is allowed, a smaller one is not."""
    model = dict(cfg.model)
    model.setdefault("context_length", 256)
    if "vocab_size" not in model:
        model["vocab_size"] = vocab_size
    elif model["vocab_size"] < vocab_size:
        raise UserError(f"model.vocab_size {model['vocab_size']} is smaller than the tokenizer's "
                        f"{vocab_size} tokens; remove model.vocab_size or raise it")
    return RunConfig(data=cfg.data, model=model, train=cfg.train, out=cfg.out)


def train(config: RunConfig | dict[str, Any], *, resume: bool = True, progress: bool = True,
          faults: dict[str, int] | None = None) -> RunResult:
    """Train one run into `config.out`, resuming it if it was interrupted; returns the finished run.

    A finished run (summary.json says so) is returned as it is. `faults` is for tests: it names
    fault-injection points and the step at which each fires (see `_maybe_fault`).
    """
    cfg = resolve_config(config)
    out = Path(cfg.out)
    summary = run_dir.read_summary(out)
    if resume and summary and summary.get("status") == "finished":
        return RunResult(out, summary)
    if cfg.train.lr == "auto":  # short runs over train.lr_grid choose the rate first (lr_search.py)
        cfg = lr_search.tune(cfg, progress=progress)
        if cfg is None:  # a signal stopped a sweep run; the next call resumes it
            return RunResult(out, {"status": "interrupted", "steps": 0})
    if resume and (out / run_dir.CONFIG).is_file() and run_dir.checkpoint_dirs(out):
        if not _same_run(run_dir.read_run_config(out), cfg):
            raise UserError(f"{out} holds a run with a different model or data ({run_dir.CONFIG}); choose "
                            f"another --out, or continue that run with `picollm train --resume {out}`")
    return _Trainer(cfg, resume=resume, progress=progress, faults=faults or {}).run()


def _same_run(saved: RunConfig, cfg: RunConfig) -> bool:
    a, b = to_dict(saved), to_dict(cfg)
    # the saved config has the resolved vocab/context; compare only what the new config states
    a["model"] = {k: v for k, v in a["model"].items() if k in b["model"]}
    # budgets and intervals may change on resume (e.g. train longer); the model and data may not
    return a["model"] == b["model"] and a["data"] == b["data"]


def resume_run(directory: str | Path, progress: bool = True, overrides: dict[str, Any] | None = None) \
        -> RunResult:
    """`picollm train --resume DIR`: continue the run in DIR from its latest checkpoint."""
    from picollm.config import apply_overrides

    out = Path(directory)
    saved = run_dir.read_run_config(out)
    data = apply_overrides(to_dict(saved), overrides or {})
    data["out"] = str(out)
    return train(from_dict(RunConfig, data), resume=True, progress=progress)


def dry_run(config: RunConfig | dict[str, Any], measure_steps: int = 3) -> dict[str, Any]:
    """Parameters, tokens, FLOPs and an estimated wall time from a few measured steps, without training."""
    cfg = resolve_config(config)
    device = resolve_device(cfg.train.device)
    t = replace(cfg.train, dtype=resolve_dtype(cfg.train.dtype, device))
    if t.threads:
        torch.set_num_threads(t.threads)
    data = _prepare(cfg, Dist(), progress=False)
    cfg = _with_vocab(cfg, data.tokenizer.vocab_size)
    from picollm.data.loader import WindowLoader

    T = cfg.model["context_length"]
    loader = WindowLoader(data.tokens("train"), T, t.batch_size, t.seed)
    plan = make_plan(cfg, loader.batches_per_epoch, loader.windows_per_epoch, Dist())
    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(device)
    model.train()
    step_module = LossModule(model, t.loss_chunk_tokens)
    optimizer = build_optimizer(model, t)
    batches = micro_batches(loader, 0, 0)
    times = []
    for i in range(measure_steps + 1):
        start = time.perf_counter()
        for _ in range(t.grad_accum):
            _, _, x, y = next(batches)
            with autocast(device, t.dtype):
                loss = step_module(x.to(device), y.to(device)) / y.numel()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # the first step pays for allocation and warm-up
            times.append(time.perf_counter() - start)
    step_seconds = float(np.median(times))
    tokens = plan.total_steps * plan.tokens_per_step
    flops_per_token = model.flops_per_token(T)
    return {
        "family": cfg.model["family"],
        "num_parameters": model.num_parameters(),
        "num_parameters_non_embedding": model.num_parameters(non_embedding=True),
        "vocab_size": cfg.model["vocab_size"],
        "context_length": T,
        "train_tokens_per_epoch": int(len(data.tokens("train"))),
        "steps": plan.total_steps,
        "tokens": tokens,
        "flops_per_token": flops_per_token,
        "flops": flops_per_token * tokens,
        "step_seconds": step_seconds,
        "tokens_per_s": plan.tokens_per_step / step_seconds,
        "est_seconds": step_seconds * plan.total_steps,
        "device": str(device),
        "dtype": t.dtype,
    }


# ---------------------------------------------------------------------------------------------


class _Trainer:
    def __init__(self, cfg: RunConfig, resume: bool, progress: bool, faults: dict[str, int]) -> None:
        self.cfg = cfg
        self.resume = resume
        self.progress = progress
        self.faults = faults
        self.out = Path(cfg.out)
        self.stop_signal: int | None = None

    # -- fault injection for the reliability tests: os._exit at a named point at a given step
    def _maybe_fault(self, point: str, step: int) -> None:
        if self.faults.get(point) == step:
            import os

            os._exit(99)

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def run(self) -> RunResult:
        t = self.cfg.train
        device = resolve_device(t.device)
        d = init_distributed(device.type)
        if d.enabled and device.type == "cuda":
            device = torch.device("cuda", d.local_rank)
            torch.cuda.set_device(device)
        if t.threads:
            torch.set_num_threads(t.threads)
        # config.yaml and the summary record the dtype the run used, so that a resume keeps it
        self.cfg = replace(self.cfg, train=replace(t, dtype=resolve_dtype(t.dtype, device)))
        diverged: TrainingDiverged | None = None
        try:
            return self._run(device, d)
        except TrainingDiverged as exc:
            # Every rank raises it at the same step. Its traceback holds the DDP wrapper and, through it,
            # the process group: drop both and meet the other ranks, so that the group is torn down on
            # all of them together (otherwise gloo could abort a rank at exit).
            diverged = exc.with_traceback(None)
        except Exception as exc:
            # checkpoints raise DiskFullError; the run's own files (metrics, config) a plain OSError
            if (isinstance(exc, UserError) and not isinstance(exc, DiskFullError)) or not is_disk_full(exc):
                raise
            what = exc if isinstance(exc, DiskFullError) else \
                f"no space left on device while writing {getattr(exc, 'filename', None) or self.out}"
            raise DiskFullError(
                f"{what} (training into {self.out}). The checkpoints already in {self.out / run_dir.CHECKPOINTS} "
                f"are intact: free some space, then continue with `picollm train --resume {self.out}`") from None
        finally:
            if diverged is not None:
                gc.collect()
                barrier(d)
            shutdown(d)
        raise diverged

    def _run(self, device: torch.device, d: Dist) -> RunResult:
        from picollm.data.loader import WindowLoader
        from picollm.evaluation import evaluate_tokens

        cfg, t = self.cfg, self.cfg.train
        data = _prepare(cfg, d, self.progress)
        cfg = self.cfg = _with_vocab(cfg, data.tokenizer.vocab_size)
        out = self.out
        T = cfg.model["context_length"]

        torch.manual_seed(t.seed)
        model = build_model(cfg.model).to(device)
        loss_module = LossModule(model, t.loss_chunk_tokens)
        step_module: nn.Module = loss_module
        if t.compile:
            step_module = torch.compile(step_module)
        if d.enabled:
            step_module = nn.parallel.DistributedDataParallel(
                step_module, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = build_optimizer(model, t)
        scaler = torch.amp.GradScaler(device.type, enabled=(t.dtype == "fp16" and device.type == "cuda"))

        train_tokens = data.tokens("train")
        loader = WindowLoader(train_tokens, T, t.batch_size, t.seed, rank=d.rank, world_size=d.world_size)
        if loader.batches_per_epoch == 0:
            raise UserError(f"the training split has {len(train_tokens)} tokens, too few for one window of "
                            f"model.context_length {T}; use more stories or a shorter context")
        plan = make_plan(cfg, loader.batches_per_epoch, loader.windows_per_epoch, d)
        val_tokens = data.tokens("val")
        eval_bs = t.eval_batch_size or t.batch_size

        # where to start: a fresh run, or the latest complete checkpoint
        progress_state = {"step": 0, "epoch": 0, "batch": 0, "tokens": 0, "best_val_loss": None,
                          "evals_since_best": 0, "bad_steps": 0, "skipped_steps": 0, "elapsed": 0.0}
        if d.is_main:
            run_dir.remove_partial_writes(out)
        checkpoints = run_dir.checkpoint_dirs(out) if self.resume else []
        if not self.resume and out.exists() and any(out.iterdir()):
            if d.is_main:
                for p in [out / "checkpoints", out / "best", out / "final", out / run_dir.METRICS,
                          out / run_dir.SUMMARY]:
                    if p.is_dir():
                        shutil.rmtree(p)
                    elif p.exists():
                        p.unlink()
            barrier(d)
        if checkpoints:
            from picollm.checkpoint import load_state_dict, load_weights_into

            latest = checkpoints[-1]
            load_weights_into(model, load_state_dict(latest / "model.safetensors"), latest / "model.safetensors")
            progress_state = read_training_state(latest, optimizer, scaler)
            if d.is_main:
                run_dir.truncate_metrics(out, progress_state["step"])
        if d.is_main:
            run_dir.write_run_files(out, cfg, device)
        barrier(d)

        entropy = unigram_entropy(train_tokens, cfg.model["vocab_size"])
        log = MetricsLog(out, cfg, enabled=d.is_main)
        bar = None
        if self.progress and d.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=plan.total_steps, initial=progress_state["step"], unit="step",
                       desc=f"{cfg.model['family']} {out.name}", dynamic_ncols=True, file=sys.stderr)
        if d.is_main and progress_state["step"] == 0:
            print(f"[picollm] {out}: {model.num_parameters():,} parameters "
                  f"({model.num_parameters(non_embedding=True):,} non-embedding), {plan.total_steps} steps of "
                  f"{plan.tokens_per_step:,} tokens on {device} in {t.dtype}, unigram entropy {entropy:.3f} nats, "
                  f"{loader.dropped_tokens} tokens dropped per epoch", file=sys.stderr)

        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, self._on_signal)

        step = progress_state["step"]
        full_val = full_eval.full_val_steps(t.full_val_at, plan.total_steps)  # {step: fraction}
        batches = micro_batches(loader, progress_state["epoch"], progress_state["batch"])
        position = (progress_state["epoch"], progress_state["batch"])
        elapsed_before = progress_state["elapsed"]
        started = time.perf_counter()
        window_start, window_tokens = time.perf_counter(), 0
        stopped_early = False

        def save_checkpoint(step_now: int) -> None:
            if d.is_main:
                self._write_checkpoint(model, data.tokenizer, optimizer, scaler, progress_state, step_now)
            barrier(d)

        def evaluate_now(step_now: int) -> float:
            nonlocal stopped_early
            result = evaluate_tokens(model, val_tokens, T, batch_size=eval_bs, num_bytes=data.num_bytes("val"),
                                     max_windows=t.eval_batches * eval_bs, device=device, dtype=t.dtype,
                                     chunk_tokens=t.loss_chunk_tokens or 4096)
            val_loss = mean_across(result.nll, d, device)
            row = {"kind": "eval", "step": step_now, "tokens": progress_state["tokens"],
                   "epoch": progress_state["tokens"] / max(1, len(train_tokens)),
                   "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700)), "val_bpb": result.bpb,
                   "elapsed": elapsed_before + time.perf_counter() - started}
            if d.is_main and t.sample_tokens > 0:
                row["sample"] = self._sample(model, data.tokenizer)
            log.write(row)
            best = progress_state["best_val_loss"]
            if best is None or val_loss < best:
                progress_state["best_val_loss"] = val_loss
                progress_state["evals_since_best"] = 0
                if d.is_main:
                    save_model(model, out / "best", data.tokenizer, extra={"step": step_now, "val_loss": val_loss})
            else:
                progress_state["evals_since_best"] += 1
                if t.patience is not None and progress_state["evals_since_best"] >= t.patience:
                    stopped_early = True
            barrier(d)
            return val_loss

        model.train()
        try:
            while step < plan.total_steps and not stopped_early:
                lr = lr_at(step, plan.total_steps, t.lr, t.schedule, t.warmup_ratio, t.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                micro = [next(batches) for _ in range(t.grad_accum)]
                step_tokens = sum(y.numel() for _, _, _, y in micro)
                loss_sum = 0.0
                for i, (_, _, x, y) in enumerate(micro):
                    sync = contextlib.nullcontext()
                    if d.enabled and i < len(micro) - 1:
                        sync = step_module.no_sync()
                    with sync:
                        with autocast(device, t.dtype):
                            loss = step_module(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                        loss = loss / step_tokens
                        self._maybe_fault("inside_step", step)
                        scaler.scale(loss).backward()
                    loss_sum += loss.item()
                epoch_now, batch_now, _, _ = micro[-1]
                position = (epoch_now, batch_now + 1)
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                           t.grad_clip if t.grad_clip > 0 else float("inf"))
                # gradients are all-reduced, so the norm agrees across ranks; the loss may not
                bad = any_flag(not (math.isfinite(loss_sum) and torch.isfinite(grad_norm).item()), d, device)
                if bad:
                    optimizer.zero_grad(set_to_none=True)
                    progress_state["bad_steps"] += 1
                    progress_state["skipped_steps"] += 1
                    if d.is_main:
                        print(f"[picollm] step {step}: non-finite loss or gradient, step skipped "
                              f"({progress_state['bad_steps']} in a row)", file=sys.stderr)
                    if scaler.is_enabled():
                        scaler.update()
                else:
                    progress_state["bad_steps"] = 0
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                step += 1
                progress_state["step"] = step
                progress_state["epoch"], progress_state["batch"] = position
                progress_state["tokens"] += step_tokens * d.world_size
                window_tokens += step_tokens * d.world_size
                if progress_state["bad_steps"] >= t.max_bad_steps:
                    saved = run_dir.checkpoint_dirs(out)
                    where = (f"its last checkpoint, {saved[-1]}, holds the last good weights" if saved else
                             "no checkpoint was written before it (see train.ckpt_interval)")
                    raise TrainingDiverged(
                        f"{t.max_bad_steps} steps in a row had a non-finite loss or gradient; the run stopped "
                        f"at step {step} and {where}; lower train.lr, set train.grad_clip, or use train.dtype "
                        f"fp32/bf16, then resume with `picollm train --resume {out}`")

                if step % t.log_interval == 0 or step == plan.total_steps:
                    loss_mean = mean_across(loss_sum, d, device)
                    now = time.perf_counter()
                    tps = window_tokens / max(now - window_start, 1e-9)
                    window_start, window_tokens = now, 0
                    log.write({"kind": "train", "step": step, "tokens": progress_state["tokens"],
                               "epoch": progress_state["tokens"] / max(1, len(train_tokens)), "lr": lr,
                               "train_loss": loss_mean, "train_ppl": math.exp(min(loss_mean, 700)),
                               "grad_norm": float(grad_norm), "tokens_per_s": tps,
                               "elapsed": elapsed_before + now - started})
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_mean:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                if bar is not None:
                    bar.update(1)
                progress_state["elapsed"] = elapsed_before + time.perf_counter() - started
                if t.eval_interval and step % t.eval_interval == 0 and step < plan.total_steps:
                    self._maybe_fault("during_eval", step)
                    evaluate_now(step)
                    model.train()
                if step in full_val:  # the full validation split at train.full_val_at (full_eval.py)
                    log.write(full_eval.full_val_row(model, data, cfg, step, progress_state["tokens"],
                                                     full_val[step], device))
                if t.ckpt_interval and step % t.ckpt_interval == 0 and step < plan.total_steps:
                    save_checkpoint(step)
                if any_flag(self.stop_signal is not None, d, device):
                    save_checkpoint(step)
                    if d.is_main:
                        print(f"[picollm] interrupted by signal at step {step}; checkpoint written. "
                              f"Resume with: picollm train --resume {out}", file=sys.stderr)
                    log.close()
                    return RunResult(out, {"status": "interrupted", "steps": step}, model)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if bar is not None:
                bar.close()

        # the end: final evaluation on full splits, checkpoint, summary
        wall = elapsed_before + time.perf_counter() - started
        # a signal before the last checkpoint is written still checkpoints (else, with ckpt_interval 0, the
        # whole run would be lost); after it, the rest is redone by a resume
        for s in previous:
            signal.signal(s, self._on_signal)
        try:
            if progress_state.get("final_eval_step") == step:  # done before an interruption: not logged twice
                final_val = progress_state["final_val_loss"]
            else:
                final_val = evaluate_now(step)
                progress_state["final_eval_step"], progress_state["final_val_loss"] = step, final_val
            save_checkpoint(step)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if any_flag(self.stop_signal is not None, d, device):
            if d.is_main:
                print(f"[picollm] interrupted by signal at step {step}; checkpoint written. "
                      f"Resume with: picollm train --resume {out}", file=sys.stderr)
            log.close()
            return RunResult(out, {"status": "interrupted", "steps": step}, model)
        splits = {}
        for split in t.final_splits:  # an lr sweep run scores val only (lr_search.py)
            tokens = data.tokens(split)
            if len(tokens) < 2:
                continue
            # train: a fixed subset as large as the validation split (the full train split is huge)
            limit = None
            if split == "train":
                limit = max(1, math.ceil(len(val_tokens) / T))
            result = evaluate_tokens(model, tokens, T, batch_size=eval_bs, num_bytes=data.num_bytes(split),
                                     max_windows=limit, device=device, dtype=t.dtype,
                                     chunk_tokens=t.loss_chunk_tokens or 4096)
            splits[split] = result.as_dict()
        summary = {
            "status": "stopped_early" if stopped_early else "finished",
            "family": cfg.model["family"],
            "num_parameters": model.num_parameters(),
            "num_parameters_non_embedding": model.num_parameters(non_embedding=True),
            "tokens_seen": progress_state["tokens"],
            "steps": step,
            "epochs": progress_state["tokens"] / max(1, len(train_tokens)),
            "skipped_steps": progress_state["skipped_steps"],
            "wall_time_s": wall,
            "tokens_per_s": progress_state["tokens"] / max(wall, 1e-9),
            "peak_memory_mb": peak_memory_mb(device),
            "unigram_entropy": entropy,
            "best_val_loss": progress_state["best_val_loss"],
            "final_val_loss_subset": final_val,
            "dropped_tokens_per_epoch": loader.dropped_tokens,
            "tokenizer": data.tokenizer.name,
            "vocab_size": cfg.model["vocab_size"],
            "context_length": T,
            "device": str(device),
            "dtype": t.dtype,
            "world_size": d.world_size,
            **splits,
        }
        if stopped_early:
            summary["status"] = "finished"
            summary["stopped_early"] = True
        summary.update(lr_search.summary_fields(t, wall))  # the peak lr; with lr auto the sweep, its time
        if d.is_main:
            save_model(model, out / "final", data.tokenizer,
                       extra={"step": step, "val_loss": splits.get("val", {}).get("nll")})
            write_json_atomic(out / run_dir.SUMMARY, summary)
            log.close(summary)
            print(f"[picollm] {out}: done in {wall:.0f}s, {summary['tokens_per_s']:,.0f} tokens/s; "
                  + ", ".join(f"{s} nll {v['nll']:.3f} ppl {v['ppl']:.1f}" for s, v in splits.items()),
                  file=sys.stderr)
        barrier(d)
        if t.push_to_hub and d.is_main:
            from picollm.hub import push

            push(out, t.push_to_hub)
        return RunResult(out, summary, model)

    def _sample(self, model: LanguageModel, tokenizer) -> str:
        from picollm.generation import generate

        t = self.cfg.train
        texts = generate(model, t.sample_prompt, strategy="greedy", max_new_tokens=t.sample_tokens,
                         tokenizer=tokenizer)
        model.train()
        return t.sample_prompt + texts[0]

    def _write_checkpoint(self, model, tokenizer, optimizer, scaler, progress_state, step: int) -> None:
        root = self.out / run_dir.CHECKPOINTS

        def fill(tmp: Path) -> None:
            write_model_files(model, tmp, tokenizer, extra={"step": step})
            self._maybe_fault("between_weights_and_state", step)
            write_training_state(tmp, optimizer, progress_state, scaler)
            self._maybe_fault("before_rename", step)

        write_dir_atomic(root / f"step-{step:08d}", fill)
        for old in run_dir.checkpoint_dirs(self.out)[:-self.cfg.train.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
