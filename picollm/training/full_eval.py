"""Evaluations on the FULL validation split during training, at `train.full_val_at` (fractions of the steps).

The periodic evaluation (`train.eval_interval`) reads a fixed subset of `eval_batches` batches: cheap,
enough for a curve. The study's verdicts need the number the final summary reports, the NLL over every
target of the validation split, at a few points of the run (25% and 50% of the steps, then the end), to
show whether a comparison holds during training. Each point is one metrics.jsonl row:

    {"kind": "eval_full", "step", "tokens", "fraction", "val_loss", "val_bpb"}

The evaluation draws no random numbers (the model runs in eval mode, without dropout), so a run with these
points trains exactly the same weights as one without, and a resumed run the same as an uninterrupted one;
a row logged after the last checkpoint is dropped with the rest of the log on resume and logged again.
"""

from __future__ import annotations

from typing import Any


def full_val_steps(fractions: list[float], total_steps: int) -> dict[int, float]:
    """{step: fraction} for the fractions of a run of `total_steps` (the end is the summary's, not here)."""
    steps = {}
    for fraction in sorted(fractions):
        step = max(1, round(fraction * total_steps))
        if step < total_steps:
            steps.setdefault(step, fraction)
    return steps


def full_val_row(model: Any, data: Any, cfg: Any, step: int, tokens: int, fraction: float,
                 device: Any) -> dict[str, Any]:
    """The model's NLL and bits per byte on the whole validation split, as a metrics row."""
    from picollm.evaluation import evaluate_tokens

    t = cfg.train
    result = evaluate_tokens(model, data.tokens("val"), cfg.model["context_length"],
                             batch_size=t.eval_batch_size or t.batch_size, num_bytes=data.num_bytes("val"),
                             device=device, dtype=t.dtype, chunk_tokens=t.loss_chunk_tokens or 4096)
    return {"kind": "eval_full", "step": step, "tokens": tokens, "fraction": fraction,
            "val_loss": result.nll, "val_bpb": result.bpb}
