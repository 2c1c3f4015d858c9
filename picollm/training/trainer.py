"""The training loop. It knows no model family: any registered `LanguageModel` trains through it.

`train(config)` prepares the data (cached), builds the model, and runs the recipe in
`config.train`: AdamW/Adam/SGD, warmup + cosine/linear/constant schedule, gradient accumulation and
clipping, periodic evaluation on a fixed validation subset, checkpoints (atomic, resumable, last K
kept, best by validation loss), a metrics log, optional Weights & Biases, and DistributedDataParallel
under torchrun. A run killed at any moment resumes from its last checkpoint; on CPU the resumed run
ends with the same weights, bit for bit, as one that was never interrupted.

The loop is `Trainer.loop`; one step is `picollm.training.step.train_step`. Its collaborators:
`setup` (data, model, optimizer, plan), `checkpoints`, `evaluator`, `metrics` (log and progress),
`state` (`TrainState`, saved with each checkpoint), `signals` (SIGTERM/SIGINT), `distributed`.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from picollm import rundir, runlock
from picollm.config import RunConfig, apply_overrides, from_dict, to_dict
from picollm.device import resolve_device, resolve_dtype
from picollm.errors import TrainingDiverged, UserError
from picollm.export.hf import push
from picollm.fileio import DiskFullError, check_writable_dir, is_disk_full, write_json_atomic
from picollm.models.base import LanguageModel
from picollm.models.sizing import build_on_meta
from picollm.training import faults, footprint, lr_search, recipe
from picollm.training.checkpoints import Checkpoints
from picollm.training.distributed import any_flag, barrier, init_distributed, shutdown
from picollm.training.evaluator import Evaluator
from picollm.training.metrics import Clock, TrainingLog, peak_memory_mb, unigram_entropy
from picollm.training.schedule import lr_at
from picollm.training.setup import data_plan, micro_batches, prepared_data, set_up
from picollm.training.signals import StopSignals
from picollm.training.state import TrainState
from picollm.training.step import LossModule, build_optimizer, set_lr, train_step

# LossModule and build_optimizer live in step.py; the benchmarks import them from here too
__all__ = ["LossModule", "RunResult", "Trainer", "TrainingDiverged", "build_optimizer", "dry_run", "resume_run",
           "train"]


@dataclass
class RunResult:
    directory: Path
    summary: dict[str, Any]
    model: LanguageModel | None = field(default=None, repr=False)


def resolve_config(config: RunConfig | dict[str, Any]) -> RunConfig:
    return config if isinstance(config, RunConfig) else from_dict(RunConfig, config)


def train(config: RunConfig | dict[str, Any], *, resume: bool = True, progress: bool = True,
          allow_recipe_change: bool = False, from_step: int | None = None, resume_advice: bool = True) -> RunResult:
    """Train one run into `config.out`, resuming it if it was interrupted; returns the finished run.

    A finished run (summary.json says so) trained with the same recipe is returned as it is. Resuming
    under another recipe is refused unless `allow_recipe_change` (see `picollm.training.recipe`);
    `from_step` continues from the checkpoint at that step, moving what came after it aside
    (`picollm.rundir.discard_after`). The run directory is locked while it trains (`picollm.runlock`).
    `resume_advice=False`: a signal stops the run without printing how to resume it (an lr sweep run, whose
    caller prints the advice for the run it belongs to)."""
    cfg = resolve_config(config)
    out = Path(cfg.out)
    check_writable_dir(out, "the run directory")
    finished, _ = recipe.check_start(out, cfg, resume, allow_recipe_change, from_step)
    if finished is not None:
        return RunResult(out, finished)
    if cfg.train.lr == "auto":  # short runs over train.lr_grid choose the rate first (lr_search.py)
        resumable = _config_before_sweep(out, cfg)
        cfg = lr_search.tune(cfg, train, progress=progress)
        if cfg is None:  # a signal stopped a sweep run; the next call resumes it
            if resume_advice and int(os.environ.get("RANK", "0")) == 0:
                how = (f"Resume with: picollm train --resume {out}" if resumable else
                       "run the same command again to continue it")
                print(f"[picollm] {out}: the lr sweep was interrupted; {how}", file=sys.stderr)
            return RunResult(out, {"status": "interrupted", "steps": 0})
    return Trainer(cfg, resume=resume, progress=progress, allow_recipe_change=allow_recipe_change,
                   from_step=from_step, resume_advice=resume_advice).run()


def _config_before_sweep(out: Path, cfg: RunConfig) -> bool:
    """Write the run's config.yaml (lr auto) before its sweep, so that `--resume OUT` continues a sweep that
    was stopped, when nothing of another run is there to resume (no checkpoint, no summary: its config.yaml
    is compared with no other). Whether OUT's config.yaml is now this run's."""
    if rundir.checkpoint_dirs(out) or (out / rundir.SUMMARY).exists():
        return False
    if int(os.environ.get("RANK", "0")) == 0:
        rundir.write_config(out, cfg)
    return True


def resume_run(directory: str | Path, progress: bool = True, overrides: dict[str, Any] | None = None, *,
               allow_recipe_change: bool = False, from_step: int | None = None, fresh: bool = False) -> RunResult:
    """`picollm train --resume DIR`: continue the run in DIR from its latest checkpoint (or the one at
    `from_step`); `fresh`: start it over from its config.yaml."""
    out = Path(directory)
    data = apply_overrides(to_dict(rundir.read_run_config(out)), overrides or {})
    data["out"] = str(out)
    return train(from_dict(RunConfig, data), resume=not fresh, progress=progress,
                 allow_recipe_change=allow_recipe_change, from_step=from_step)


def dry_run(config: RunConfig | dict[str, Any], measure_steps: int = 3) -> dict[str, Any]:
    """Parameters, tokens, FLOPs and the memory a step needs, computed on the meta device without allocating
    the model; then, where that estimate clearly fits in the memory available (half of it at most), a few
    measured steps and the wall time they predict. Trains nothing."""
    cfg = resolve_config(config)
    device = resolve_device(cfg.train.device)
    cfg = replace(cfg, train=replace(cfg.train, dtype=resolve_dtype(cfg.train.dtype, device)))
    t = cfg.train
    data = prepared_data(cfg)
    cfg, _, plan = data_plan(cfg, data)
    model = build_on_meta(cfg.model)
    T = cfg.model["context_length"]
    tokens = plan.total_steps * plan.tokens_per_step
    flops_per_token = model.flops_per_token(T)
    needed = footprint.estimate(model, cfg)
    available = footprint.available_bytes(device)
    report: dict[str, Any] = {
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
        "memory_estimate": footprint.gigabytes(needed.total),
        "memory_available": footprint.gigabytes(available) if available is not None else None,
        "step_seconds": None,
        "tokens_per_s": None,
        "est_seconds": None,
        "device": str(device),
        "dtype": t.dtype,
    }
    if available is not None and needed.total > available / 2:
        report["not_measured"] = (f"a step needs about {footprint.gigabytes(needed.total)} (weights, gradients, "
                                  f"optimizer state, activations), more than half of the "
                                  f"{footprint.gigabytes(available)} available on {device}")
        return report
    if t.threads:
        torch.set_num_threads(t.threads)
    s = set_up(cfg, device)
    batches = micro_batches(s.loader, 0, 0)
    times = []
    for i in range(measure_steps + 1):
        start = time.perf_counter()
        train_step(s.module, s.optimizer, [next(batches)[2:] for _ in range(t.grad_accum)], dtype=t.dtype,
                   grad_clip=t.grad_clip, scaler=s.scaler)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # the first step pays for allocation and warm-up
            times.append(time.perf_counter() - start)
    step_seconds = float(np.median(times))
    report.update(step_seconds=step_seconds, tokens_per_s=plan.tokens_per_step / step_seconds,
                  est_seconds=step_seconds * plan.total_steps)
    return report


class Trainer:
    """One call of `train`: set-up, the loop, the end (final evaluation, final model, summary)."""

    def __init__(self, cfg: RunConfig, resume: bool, progress: bool, allow_recipe_change: bool = False,
                 from_step: int | None = None, resume_advice: bool = True) -> None:
        self.cfg = cfg
        self.resume = resume
        self.progress = progress
        self.resume_advice = resume_advice
        self.allow_recipe_change = allow_recipe_change
        self.from_step = from_step
        self.out = Path(cfg.out)
        self.signals = StopSignals()

    def run(self) -> RunResult:
        """Train on this process's device and rank; errors that leave the run resumable become one clear
        message (divergence, a full disk)."""
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
        self.device, self.d = device, d
        diverged: TrainingDiverged | None = None
        try:
            return self._train()
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
                f"{what} (training into {self.out}). The checkpoints already in {self.out / rundir.CHECKPOINTS} "
                f"are intact: free some space, then continue with `picollm train --resume {self.out}`") from None
        finally:
            if diverged is not None:
                gc.collect()
                barrier(d)
            shutdown(d)
        raise diverged

    def _train(self) -> RunResult:
        d = self.d
        self.s = set_up(self.cfg, self.device, d, self.progress)
        self.cfg = self.s.cfg
        with runlock.hold(self.out, d.rank) as lock:
            return self._train_locked(lock)

    def _record_course(self, step: int, changed: list[recipe.Change]) -> bool:
        """In the run's history: a recipe change allowed at `step`, and a continuation from an earlier step
        than the run reached (`--from-step`, or a finished run continued under a changed recipe), for which
        what came after `step` is moved aside. Whether best/ was moved aside."""
        out = self.out
        if changed:
            rundir.append_history(out, "recipe changed", step=step, changes={c.key: [c.old, c.new] for c in changed})
        ended = any((out / name).exists() for name in (rundir.FINAL, rundir.SUMMARY))
        if not self.resume or (self.from_step is None and not (changed and ended)):
            return False
        moved = rundir.discard_after(out, step)
        best_moved = moved.pop("best_moved")
        rundir.append_history(out, "continued from an earlier step", step=step, **moved)
        print(f"[picollm] {out}: continuing from step {step}; moved to {out / moved['to']}: "
              f"{', '.join(moved['moved']) or 'nothing'}", file=sys.stderr)
        return best_moved

    def _train_locked(self, lock: runlock.RunLock) -> RunResult:
        d, device, s, out = self.d, self.device, self.s, self.out
        self.checkpoints = Checkpoints(out, self.cfg.train.keep_last, d)
        # read first: a refused or damaged start leaves the directory as it was
        _, changed = recipe.check_start(out, self.cfg, self.resume, self.allow_recipe_change, self.from_step)
        latest = self.checkpoints.resume_point(self.resume, self.from_step)
        state = (self.checkpoints.restore(latest, s.model, s.optimizer, s.scaler, s.data.tokenizer) if latest
                 else TrainState())
        barrier(d)  # every rank has read before rank 0 writes
        # then write: who trains here, what changes the run's course, the run files
        lock.announce()
        if d.is_main:
            if self._record_course(state.step, changed):  # best/ was saved later: the next evaluation saves it
                state.best_val_loss = None
            self.checkpoints.tidy(latest, self.resume)
            rundir.write_run_files(out, self.cfg, device)
        barrier(d)

        train_tokens = s.data.tokens("train")
        self.entropy = unigram_entropy(train_tokens, self.cfg.model["vocab_size"])
        self.clock = Clock(state.elapsed)
        self.log = TrainingLog(self.out, self.cfg, d, device, s.plan.total_steps, state, len(train_tokens),
                               self.clock, self.progress)
        self.evaluator = Evaluator(self.cfg, s.data, device, d, self.log, self.checkpoints, s.plan.total_steps)
        if state.step == 0:
            self.log.say(f"{self.out}: {s.model.num_parameters():,} parameters "
                         f"({s.model.num_parameters(non_embedding=True):,} non-embedding), {s.plan.total_steps} "
                         f"steps of {s.plan.tokens_per_step:,} tokens on {device} in {self.cfg.train.dtype}, "
                         f"unigram entropy {self.entropy:.3f} nats, {s.loader.dropped_tokens} tokens dropped "
                         "per epoch")
        with self.signals.caught():
            interrupted = self.loop(state)
        return self._stopped(state) if interrupted else self._finish(state)

    def loop(self, state: TrainState) -> bool:
        """Steps until the budget is spent or early stopping; True when a signal stopped it first (a
        checkpoint is then written at once)."""
        s, t = self.s, self.cfg.train
        total = s.plan.total_steps
        batches = micro_batches(s.loader, state.epoch, state.batch)
        s.model.train()
        while state.step < total and not self.evaluator.should_stop(state):
            lr = lr_at(state.step, total, t.lr, t.schedule, t.warmup_ratio, t.min_lr)
            set_lr(s.optimizer, lr)
            micro = [next(batches) for _ in range(t.grad_accum)]
            result = train_step(s.module, s.optimizer, [(x, y) for _, _, x, y in micro], dtype=t.dtype,
                                grad_clip=t.grad_clip, scaler=s.scaler,
                                agree=lambda bad: any_flag(bad, self.d, self.device))
            faults.reached("inside_step", state.step)
            self._record(state, result.skipped, result.tokens, micro[-1])
            self.log.step(state, lr, result)
            state.elapsed = self.clock.elapsed()
            if t.eval_interval and state.step % t.eval_interval == 0 and state.step < total:
                faults.reached("during_eval", state.step)
                self.evaluator.validate(s.model, state)
            if state.step in self.evaluator.full_val_steps:
                self.evaluator.validate_full(s.model, state)
            if t.ckpt_interval and state.step % t.ckpt_interval == 0 and state.step < total:
                self._checkpoint(state)
            if self._signalled():
                self._checkpoint(state)
                return True
        return False

    def _record(self, state: TrainState, skipped: bool, tokens: int, last_micro: tuple) -> None:
        """Count the step; stop the run when too many in a row were not finite."""
        t = self.cfg.train
        if skipped:
            state.bad_steps += 1
            state.skipped_steps += 1
            self.log.say(f"step {state.step}: non-finite loss or gradient, step skipped "
                         f"({state.bad_steps} in a row)")
        else:
            state.bad_steps = 0
        epoch, batch, _, _ = last_micro
        state.step += 1
        state.epoch, state.batch = epoch, batch + 1
        state.tokens += tokens * self.d.world_size
        if state.bad_steps >= t.max_bad_steps:
            saved = rundir.checkpoint_dirs(self.out)
            where = (f"its last checkpoint, {saved[-1]}, holds the last good weights" if saved else
                     "no checkpoint was written before it (see train.ckpt_interval)")
            lower = f"{t.lr / 3:.2g}" if isinstance(t.lr, float) else "LOWER"
            raise TrainingDiverged(
                f"{t.max_bad_steps} steps in a row had a non-finite loss or gradient; the run stopped "
                f"at step {state.step} and {where}; continue it with a lower learning rate, e.g. `picollm train "
                f"--resume {self.out} --allow-recipe-change --train.lr {lower}` (or a lower train.grad_clip, or "
                "train.dtype fp32)")

    def _checkpoint(self, state: TrainState) -> None:
        self.checkpoints.save(state, self.s.model, self.s.data.tokenizer, self.s.optimizer, self.s.scaler)

    def _signalled(self) -> bool:
        """Whether SIGTERM or SIGINT arrived, on any rank (so that every rank stops at the same step)."""
        return any_flag(self.signals.received is not None, self.d, self.device)

    def _stopped(self, state: TrainState) -> RunResult:
        self.log.end_progress()
        advice = f" Resume with: picollm train --resume {self.out}" if self.resume_advice else ""
        self.log.say(f"interrupted by signal at step {state.step}; checkpoint written.{advice}")
        self.log.close()
        return RunResult(self.out, {"status": "interrupted", "steps": state.step}, self.s.model)

    def _finish(self, state: TrainState) -> RunResult:
        """The last evaluation and checkpoint, then every split, final/, the summary (and the hub)."""
        s, t, d = self.s, self.cfg.train, self.d
        self.log.end_progress()
        wall = self.clock.elapsed()
        # A signal before the last checkpoint is written still checkpoints (with ckpt_interval 0 the
        # whole run would be lost otherwise); after it, the rest is redone by a resume.
        with self.signals.caught():
            if state.final_eval_step != state.step:  # done before an interruption: not logged twice
                state.final_val_loss = self.evaluator.validate(s.model, state)
                state.final_eval_step = state.step
            self._checkpoint(state)
        if self._signalled():
            return self._stopped(state)
        splits = self.evaluator.splits(s.model)
        summary = {
            "status": "finished",
            "family": self.cfg.model["family"],
            "num_parameters": s.model.num_parameters(),
            "num_parameters_non_embedding": s.model.num_parameters(non_embedding=True),
            "tokens_seen": state.tokens,
            "steps": state.step,
            "epochs": self.log.epochs(state),
            "skipped_steps": state.skipped_steps,
            "wall_time_s": wall,
            "tokens_per_s": state.tokens / max(wall, 1e-9),
            "peak_memory_mb": peak_memory_mb(self.device),
            "unigram_entropy": self.entropy,
            "best_val_loss": state.best_val_loss,
            "final_val_loss_subset": state.final_val_loss,
            "dropped_tokens_per_epoch": s.loader.dropped_tokens,
            "tokenizer": s.data.tokenizer.name,
            "vocab_size": self.cfg.model["vocab_size"],
            "context_length": self.cfg.model["context_length"],
            "device": str(self.device),
            "dtype": t.dtype,
            "world_size": d.world_size,
            **splits,
            **lr_search.summary_fields(t, wall),
        }
        if self.evaluator.should_stop(state):
            summary["stopped_early"] = True
        if d.is_main:
            self.checkpoints.save_model(rundir.FINAL, s.model, s.data.tokenizer, state.step,
                                        splits.get("val", {}).get("nll"))
            write_json_atomic(self.out / rundir.SUMMARY, summary)
            self.log.close(summary)
            self.log.say(f"{self.out}: done in {wall:.0f}s, {summary['tokens_per_s']:,.0f} tokens/s; "
                         + ", ".join(f"{k} nll {v['nll']:.3f} ppl {v['ppl']:.1f}" for k, v in splits.items()))
        barrier(d)
        if t.push_to_hub and d.is_main:
            push(self.out, t.push_to_hub)
        return RunResult(self.out, summary, s.model)

