"""Learning-rate schedules: linear warmup, then cosine, linear or constant."""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return int(round(total_steps * warmup_ratio))


def lr_at(step: int, total_steps: int, lr: float, schedule: str = "cosine", warmup_ratio: float = 0.1,
          min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.

    Warmup rises linearly from lr/warmup to lr over the first `warmup_ratio` of the steps (step 0
    already moves the weights); then cosine or linear decay reaches `min_lr` at the last step, or
    the rate stays constant.
    """
    warmup = warmup_steps(total_steps, warmup_ratio)
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    decay_steps = max(1, total_steps - 1 - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        factor = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return min_lr + (lr - min_lr) * factor
