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
from picollm.data.tokenizer import CONFIG_FILE as TOKENIZER_CONFIG
from picollm.data.tokenizer import load_tokenizer
from picollm.errors import UserError
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

    def resume_point(self, resume: bool, from_step: int | None = None) -> Path | None:
        """The checkpoint to resume from: the one at `from_step`, else the latest; None to start afresh.
        Reads only."""
        saved = rundir.checkpoint_dirs(self.out) if resume else []
        if from_step is not None:
            saved = [p for p in saved if rundir.step_of(p) == from_step]
        return saved[-1] if saved else None

    def tidy(self, resume_from: Path | None, resume: bool) -> None:
        """Tidy the run directory for a start (rank 0): the temporaries of a killed write go; starting
        afresh (not resuming, or nothing to resume from) deletes a previous run's checkpoints, models, log
        and summary (recorded in its history when asked for), and resuming cuts the metrics log back to the
        checkpoint's step."""
        if not self.d.is_main:
            return
        rundir.remove_partial_writes(self.out)
        if resume_from is not None:
            rundir.truncate_metrics(self.out, rundir.step_of(resume_from))
            return
        present = [name for name in rundir.OUTPUTS if (self.out / name).exists()]
        if present:
            rundir.clear_outputs(self.out)
            if not resume:
                rundir.append_history(self.out, "started afresh", deleted=present)

    def restore(self, directory: Path, model: LanguageModel, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, tokenizer: Any = None) -> TrainState:
        """Weights, optimizer, RNG and scaler from `directory` (reads only). A damaged checkpoint is a
        UserError that says how to continue from the one before it."""
        try:
            weights = directory / WEIGHTS_FILE
            load_weights_into(model, load_state_dict(weights), weights)
            saved_tokenizer = load_tokenizer(directory) if (directory / TOKENIZER_CONFIG).is_file() else None
            state = read_training_state(directory, optimizer, scaler)
        except UserError as exc:
            raise UserError(f"{exc}. {self._earlier(directory)}") from None
        if tokenizer is not None and saved_tokenizer is not None and not _same_tokenizer(saved_tokenizer, tokenizer):
            raise UserError(f"{directory} was trained with another {saved_tokenizer.name} tokenizer than the one "
                            f"prepared from the data now (a changed source or sample retrains it); its weights "
                            f"cannot continue on these token ids: train into another directory, or resume with the "
                            f"data in {self.out / rundir.CONFIG}")
        return state

    def _earlier(self, damaged: Path) -> str:
        """What to do about a checkpoint that cannot be resumed from: a command the user can run."""
        before = [p for p in rundir.checkpoint_dirs(self.out) if rundir.step_of(p) < rundir.step_of(damaged)]
        if before:
            step = rundir.step_of(before[-1])
            return (f"To continue from step {step}, the checkpoint before it (later ones are moved aside, not "
                    f"deleted): `picollm train --resume {self.out} --from-step {step}`")
        return f"No earlier checkpoint is left: start over with `picollm train --resume {self.out} --fresh`"

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


def _same_tokenizer(a: Any, b: Any) -> bool:
    """The same name and, for a learned (bpe) tokenizer, the same merges and vocabulary."""
    to_str = getattr(a, "to_str", None)
    return a.name == b.name and (to_str is None or to_str() == b.to_str())
