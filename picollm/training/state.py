"""Where a run stands (`TrainState`), saved beside each checkpoint in safetensors + JSON (never pickle).

`optimizer.safetensors` holds every tensor of the optimizer state (keys `state.<param>.<name>`) and
the RNG states; `trainer_state.json` holds the rest: the `TrainState` (under "progress"), the
optimizer's param groups, the grad scaler, and the size and sha256 of `optimizer.safetensors`.
Reading checks those and the model weights' record in `config.json`, so a damaged checkpoint is
named instead of resumed from.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from picollm.checkpoint import CONFIG_FILE, FILES_KEY, WEIGHTS_FILE, file_record, load_state_dict, verify_file
from picollm.errors import UserError

STATE_FILE = "trainer_state.json"
TENSORS_FILE = "optimizer.safetensors"


@dataclass
class TrainState:
    """Where a run stands: what a resumed run needs besides the weights, the optimizer and the RNG."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the data position: the next micro-batch is batch `batch` of epoch `epoch`
    batch: int = 0
    tokens: int = 0  # training tokens seen, all ranks
    best_val_loss: float | None = None
    evals_since_best: int = 0  # evaluations since the best one (early stopping counts them)
    bad_steps: int = 0  # consecutive steps with a non-finite loss or gradient
    skipped_steps: int = 0  # all such steps
    elapsed: float = 0.0  # seconds of training so far, over every process that ran it
    final_eval_step: int | None = None  # the final evaluation ran at this step (before an interruption)
    final_val_loss: float | None = None  # and gave this loss

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, progress: Any) -> TrainState:
        """From trainer_state.json's "progress"; KeyError naming the missing or mistyped fields.
        Keys a newer picollm wrote are ignored; fields an older one did not write take their defaults."""
        if not isinstance(progress, dict):
            raise KeyError("progress")
        counts = ("step", "epoch", "batch", "tokens", "evals_since_best", "bad_steps", "skipped_steps")
        missing = [k for k in counts if not isinstance(progress.get(k), int)]
        missing += [k for k in ("elapsed",) if not isinstance(progress.get(k), (int, float))]
        missing += [k for k in ("best_val_loss", "final_val_loss")
                    if not isinstance(progress.get(k), (int, float, type(None)))]
        missing += [k for k in ("final_eval_step",) if not isinstance(progress.get(k), (int, type(None)))]
        if missing:
            raise KeyError(", ".join(missing))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in progress.items() if k in names})


def write_training_state(directory: Path, optimizer: torch.optim.Optimizer, state: TrainState,
                         scaler: torch.amp.GradScaler | None = None) -> None:
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in opt["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    save_file(tensors, str(directory / TENSORS_FILE))
    record = {
        "progress": state.to_dict(),
        "param_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
        "grad_scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        FILES_KEY: {TENSORS_FILE: file_record(directory / TENSORS_FILE)},
    }
    (directory / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def read_training_state(directory: Path, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler | None = None) -> TrainState:
    """Restore optimizer, RNG and scaler state from `directory`; return the run's `TrainState`."""
    path = directory / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {directory} is a model checkpoint, not a resumable one") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}): the checkpoint is damaged") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a training state (a JSON object): the checkpoint is damaged")
    _verify_checkpoint(directory, state, path)
    tensors = load_state_dict(directory / TENSORS_FILE)
    try:
        opt_state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("state."):
                _, index, name = key.split(".", 2)
                opt_state.setdefault(int(index), {})[name] = value
        for index, entries in state["optimizer_scalars"].items():
            opt_state.setdefault(int(index), {}).update(entries)
        optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
        if scaler is not None and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        progress = TrainState.from_dict(state["progress"])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        what = f"missing or bad {exc}" if isinstance(exc, KeyError) else " ".join(str(exc).split())[:200]
        raise UserError(f"{path} and {TENSORS_FILE} do not hold this run's training state ({what}): "
                        "the checkpoint is damaged") from None
    return progress


def _verify_checkpoint(directory: Path, state: dict[str, Any], path: Path) -> None:
    """Sizes and sha256 of the optimizer tensors (recorded in trainer_state.json) and of the model
    weights (recorded in config.json), where recorded."""
    files = state.get(FILES_KEY)
    if isinstance(files, dict):
        verify_file(directory / TENSORS_FILE, files.get(TENSORS_FILE), path)
    try:
        config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the weights were loaded (and their errors named) before the state is read
    records = config.get(FILES_KEY) if isinstance(config, dict) else None
    if isinstance(records, dict):
        verify_file(directory / WEIGHTS_FILE, records.get(WEIGHTS_FILE), directory / CONFIG_FILE)
