"""A run's checkpoints: the periodic resumable ones (the last `keep_last` kept), best/ and final/.

Rank 0 writes; every rank then waits at a barrier, so that no rank runs ahead of a checkpoint.
A periodic checkpoint is a model directory plus the training state (`picollm.training.state`),
written atomically: a kill at any moment leaves the previous checkpoints complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from picollm import rundir
from picollm.checkpoint import WEIGHTS_FILE, load_state_dict, load_weights_into, save_model, write_model_files
from picollm.fileio import write_dir_atomic
from picollm.models.base import LanguageModel
from picollm.training import faults
from picollm.training.distributed import Dist, barrier
from picollm.training.state import TrainState, read_training_state, write_training_state


class Checkpoints:
    def __init__(self, out: Path, keep_last: int, d: Dist) -> None:
        self.out = out
        self.keep_last = keep_last
        self.d = d

    def start(self, resume: bool) -> Path | None:
        """Tidy the run directory for a start; the checkpoint to resume from (None: start afresh).

        A fresh start (`resume` false) deletes a previous run's checkpoints, models, log and summary."""
        if self.d.is_main:
            rundir.remove_partial_writes(self.out)
        if resume:
            saved = rundir.checkpoint_dirs(self.out)
            return saved[-1] if saved else None
        if self.out.exists() and any(self.out.iterdir()):
            if self.d.is_main:
                rundir.clear_outputs(self.out)
            barrier(self.d)
        return None

    def restore(self, directory: Path, model: LanguageModel, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler) -> TrainState:
        """Weights, optimizer, RNG and scaler from `directory`; the metrics log cut back to its step."""
        weights = directory / WEIGHTS_FILE
        load_weights_into(model, load_state_dict(weights), weights)
        state = read_training_state(directory, optimizer, scaler)
        if self.d.is_main:
            rundir.truncate_metrics(self.out, state.step)
        return state

    def save(self, state: TrainState, model: LanguageModel, tokenizer: Any, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler) -> None:
        """A resumable checkpoint at `state.step`; the oldest beyond `keep_last` are deleted."""
        if self.d.is_main:
            step = state.step

            def fill(tmp: Path) -> None:
                write_model_files(model, tmp, tokenizer, extra={"step": step})
                faults.reached("between_weights_and_state", step)
                write_training_state(tmp, optimizer, state, scaler)
                faults.reached("before_rename", step)

            write_dir_atomic(rundir.step_dir(self.out, step), fill)
            for old in rundir.checkpoint_dirs(self.out)[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier(self.d)

    def save_model(self, name: str, model: LanguageModel, tokenizer: Any, step: int, val_loss: float | None) -> None:
        """best/ or final/ (rank 0 only; the caller meets the other ranks after it)."""
        if self.d.is_main:
            save_model(model, self.out / name, tokenizer, extra={"step": step, "val_loss": val_loss})
