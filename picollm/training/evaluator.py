"""A run's evaluations: the periodic one on a fixed validation subset (which keeps the best model and
counts towards early stopping), the full validation split at `train.full_val_at` (fractions of the steps),
and the final one on every split of `train.final_splits` for the summary.

The periodic evaluation is cheap and enough for a curve; the study's verdicts need the number the summary
reports, the NLL over every target of the validation split, at a few points of the run, to show whether a
comparison holds during training. Each such point is one metrics.jsonl row
`{"kind": "eval_full", "step", "tokens", "fraction", "val_loss", "val_bpb"}`. No evaluation draws random
numbers (the model runs in eval mode), so a run with these points trains the same weights as one without, and
a row logged after the last checkpoint is dropped with the rest of the log on resume and logged again."""

from __future__ import annotations

import math
from typing import Any

import torch

from picollm import evaluation, rundir
from picollm.config import RunConfig
from picollm.data.prepared import SPLITS, PreparedData
from picollm.generation import generate
from picollm.models.base import LanguageModel
from picollm.training.checkpoints import Checkpoints
from picollm.training.distributed import Dist, barrier, mean_across
from picollm.training.metrics import TrainingLog
from picollm.training.state import TrainState


class Evaluator:
    def __init__(self, cfg: RunConfig, data: PreparedData, device: torch.device, d: Dist, log: TrainingLog,
                 checkpoints: Checkpoints, total_steps: int) -> None:
        self.t = cfg.train
        self.full_val_steps = full_val_steps(self.t.full_val_at, total_steps)
        self.data, self.device, self.d, self.log, self.checkpoints = data, device, d, log, checkpoints
        self.context = cfg.model["context_length"]
        self.batch_size = self.t.eval_batch_size or self.t.batch_size

    def _evaluate(self, model: LanguageModel, split: str, max_windows: int | None) -> evaluation.EvalResult:
        return evaluation.evaluate_tokens(model, self.data.tokens(split), self.context, batch_size=self.batch_size,
                                          num_bytes=self.data.num_bytes(split), max_windows=max_windows,
                                          device=self.device, dtype=self.t.dtype,
                                          chunk_tokens=self.t.loss_chunk_tokens or 4096)

    def validate(self, model: LanguageModel, state: TrainState) -> float:
        """The validation loss on the fixed subset, logged (with a greedy sample); a new best is saved
        to best/, and an evaluation without improvement counts towards `train.patience`."""
        result = self._evaluate(model, "val", self.t.eval_batches * self.batch_size)
        val_loss = mean_across(result.nll, self.d, self.device)
        row = {"kind": "eval", "step": state.step, "tokens": state.tokens, "epoch": self.log.epochs(state),
               "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700)), "val_bpb": result.bpb,
               "elapsed": self.log.clock.elapsed()}
        if self.d.is_main and self.t.sample_tokens > 0:
            row["sample"] = self.t.sample_prompt + generate(model, self.t.sample_prompt, strategy="greedy",
                                                            max_new_tokens=self.t.sample_tokens,
                                                            tokenizer=self.data.tokenizer)[0]
        self.log.metrics.write(row)
        if state.best_val_loss is None or val_loss < state.best_val_loss:
            state.best_val_loss, state.evals_since_best = val_loss, 0
            self.checkpoints.save_model(rundir.BEST, model, self.data.tokenizer, state.step, val_loss)
        else:
            state.evals_since_best += 1
        barrier(self.d)
        model.train()
        return val_loss

    def validate_full(self, model: LanguageModel, state: TrainState) -> None:
        """NLL and bits per byte on the whole validation split, logged as an `eval_full` row."""
        result = self._evaluate(model, "val", None)
        self.log.metrics.write({"kind": "eval_full", "step": state.step, "tokens": state.tokens,
                                "fraction": self.full_val_steps[state.step], "val_loss": result.nll,
                                "val_bpb": result.bpb})
        model.train()

    def should_stop(self, state: TrainState) -> bool:
        """Early stopping: `train.patience` evaluations in a row without a new best."""
        return self.t.patience is not None and state.evals_since_best >= self.t.patience

    def splits(self, model: LanguageModel) -> dict[str, Any]:
        """NLL, perplexity and bits per byte on each split; on train, a fixed subset as large as the
        validation split (the full train split is huge)."""
        results = {}
        for split in (s for s in SPLITS if s in self.t.final_splits):
            tokens = self.data.tokens(split)
            if len(tokens) < 2:
                continue
            limit = max(1, math.ceil(len(self.data.tokens("val")) / self.context)) if split == "train" else None
            results[split] = self._evaluate(model, split, limit).as_dict()
        return results


def full_val_steps(fractions: list[float], total_steps: int) -> dict[int, float]:
    """{step: fraction} for the fractions of a run of `total_steps` (the end is the summary's, not here)."""
    steps: dict[int, float] = {}
    for fraction in sorted(fractions):
        step = max(1, round(fraction * total_steps))
        if step < total_steps:
            steps.setdefault(step, fraction)
    return steps
