"""One optimizer step, the unit that the trainer, `dry_run` and the benchmarks share.

`train_step` runs the forward and backward passes of a step's micro-batches (gradient accumulation),
clips the gradient, skips the update if the loss or the gradient is not finite, and otherwise steps
the optimizer. The loss stays on the device: reading it (`StepResult.loss.item()`) is the caller's
choice, so a step costs one host-device sync, the finite check, and none when that is turned off.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from picollm.device import autocast
from picollm.loss import model_loss
from picollm.models.base import LanguageModel


class LossModule(nn.Module):
    """model + chunked loss as one module, so DDP and torch.compile see a single forward.

    Returns the summed next-token loss of a batch (fp32); `train_step` divides by the step's tokens."""

    def __init__(self, model: LanguageModel, chunk_tokens: int) -> None:
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return model_loss(self.model, inputs, targets, self.chunk_tokens, reduction="sum")


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """Weight decay on matrices only (not on norms, biases or embeddings' gains), as in GPT-2/nanoGPT.

    `cfg`: a `TrainConfig` (optimizer, lr, betas, momentum, weight_decay)."""
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        # the fused kernel updates each tensor in one pass (docs/performance.md has the comparison)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True)
    if cfg.optimizer == "adam":
        # Adam's weight decay is L2 added to the gradient (the classic, coupled form)
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), foreach=True)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, foreach=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class StepResult:
    loss: torch.Tensor  # mean loss per target token of the step (0-d, on the device: `.item()` syncs)
    grad_norm: torch.Tensor  # the gradient's global norm before clipping (0-d, on the device)
    tokens: int  # target tokens of the step, on this process
    skipped: bool  # the update was skipped: the loss or the gradient was not finite
    backward_end: float  # time.perf_counter() when the last backward returned (on a GPU: was queued)


def train_step(module: nn.Module, optimizer: torch.optim.Optimizer,
               batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *, dtype: str = "fp32",
               grad_clip: float = 0.0, scaler: torch.amp.GradScaler | None = None, check_finite: bool = True,
               agree: Callable[[bool], bool] | None = None) -> StepResult:
    """One optimizer step over `batches`, the micro-batches (inputs, targets) of the step.

    `module(inputs, targets)` returns a batch's summed loss: a `LossModule`, compiled or wrapped in
    DistributedDataParallel (whose gradient all-reduce then runs once, after the last micro-batch).
    Each micro-batch's loss is divided by the step's target tokens, so the gradient is that of the
    step's mean loss. `dtype`: the autocast dtype (fp32: none). `grad_clip`: the most global gradient
    norm (0: no clipping; the norm is measured either way). `scaler`: fp16's gradient scaler.
    `check_finite`: skip the update when the loss or the gradient is not finite (one host sync);
    `agree(bad)` makes that decision the same on every process (DDP: true if any rank is bad).
    """
    params = list(module.parameters())
    device = params[0].device
    tokens = sum(y.numel() for _, y in batches)
    accumulate = module.no_sync if isinstance(module, nn.parallel.DistributedDataParallel) else None
    loss_sum = torch.zeros((), device=device)
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        with contextlib.nullcontext() if last or accumulate is None else accumulate():
            with autocast(device, dtype):
                loss = module(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            loss = loss / tokens
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += loss.detach()
    backward_end = time.perf_counter()
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    skipped = False
    if check_finite:
        bad = not bool(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
        skipped = agree(bad) if agree is not None else bad
    if skipped:
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.update()
    else:
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, grad_norm, tokens, skipped, backward_end)
