"""What a training run is made of, built once from its config: the prepared data, the model and the
module that computes its loss, the optimizer, the data loader and the plan (how many steps)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from picollm.config import RunConfig
from picollm.data.loader import WindowLoader, batches_per_epoch
from picollm.data.prepare import prepare
from picollm.data.prepared import PreparedData
from picollm.errors import UserError
from picollm.models.base import DEFAULT_CONTEXT, LanguageModel
from picollm.models.registry import build_model
from picollm.models.sizing import build_on_meta
from picollm.training import footprint
from picollm.training.distributed import Dist, barrier
from picollm.training.step import LossModule, build_optimizer


@dataclass
class Plan:
    total_steps: int
    steps_per_epoch: int
    tokens_per_step: int  # global, all ranks


def make_plan(cfg: RunConfig, batches: int, world_size: int = 1) -> Plan:
    """The step budget: the first of train.max_steps, train.max_tokens and train.epochs that is set;
    `batches`: a rank's batches per epoch."""
    t = cfg.train
    steps_per_epoch = max(1, math.ceil(batches / t.grad_accum))
    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.get("context_length", DEFAULT_CONTEXT) * world_size
    if t.max_steps is not None:
        total = t.max_steps
    elif t.max_tokens is not None:
        total = max(1, math.ceil(t.max_tokens / tokens_per_step))
    else:
        total = max(1, math.ceil(t.epochs * steps_per_epoch))
    return Plan(total, steps_per_epoch, tokens_per_step)


def plan_for(cfg: RunConfig, train_tokens: int, world_size: int = 1) -> Plan:
    """The plan of a run whose training split holds `train_tokens` tokens, without loading them."""
    context = cfg.model.get("context_length", DEFAULT_CONTEXT)
    return make_plan(cfg, batches_per_epoch(train_tokens, context, cfg.train.batch_size, world_size), world_size)


def micro_batches(loader: WindowLoader, start_epoch: int, start_batch: int) -> Iterator[tuple[int, int, Any, Any]]:
    """(epoch, batch index, x, y) forever, epoch after epoch, from a saved position."""
    epoch, batch = start_epoch, start_batch
    while True:
        for x, y in loader.epoch_batches(epoch, start_batch=batch):
            yield epoch, batch, x, y
            batch += 1
        epoch, batch = epoch + 1, 0


def with_vocab(cfg: RunConfig, vocab_size: int) -> RunConfig:
    """The model's vocab defaults to the tokenizer's; a larger one is allowed, a smaller one is not."""
    model = dict(cfg.model)
    model.setdefault("context_length", DEFAULT_CONTEXT)
    if "vocab_size" not in model:
        model["vocab_size"] = vocab_size
    elif model["vocab_size"] < vocab_size:
        raise UserError(f"model.vocab_size {model['vocab_size']} is smaller than the tokenizer's "
                        f"{vocab_size} tokens; remove model.vocab_size or raise it")
    return RunConfig(data=cfg.data, model=model, train=cfg.train, out=cfg.out)


@dataclass
class TrainingSetup:
    cfg: RunConfig  # with the model's vocab_size and context_length filled in
    data: PreparedData
    model: LanguageModel
    module: nn.Module  # computes the summed loss: LossModule, compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16 on CUDA only; otherwise disabled (a no-op)
    loader: WindowLoader
    plan: Plan


def prepared_data(cfg: RunConfig, d: Dist | None = None, progress: bool = False) -> PreparedData:
    """The run's prepared data: rank 0 builds the cache, the others wait for it and open it."""
    d = d or Dist()
    if d.is_main:
        data = prepare(cfg.data, progress=progress)
    barrier(d)
    if not d.is_main:
        data = prepare(cfg.data, progress=False)
    return data


def data_plan(cfg: RunConfig, data: PreparedData, d: Dist | None = None) -> tuple[RunConfig, WindowLoader, Plan]:
    """The config with the model's vocab and context filled in, this rank's loader and the step plan.
    UserError when the training split cannot fill one window, or one batch, of the config's size."""
    d = d or Dist()
    cfg = with_vocab(cfg, data.tokenizer.vocab_size)
    t, T = cfg.train, cfg.model["context_length"]
    train_tokens = data.tokens("train")
    loader = WindowLoader(train_tokens, T, t.batch_size, t.seed, rank=d.rank, world_size=d.world_size)
    if loader.batches_per_epoch == 0:
        raise UserError(f"the training split has {len(train_tokens):,} tokens, too few for one window of "
                        f"model.context_length {T:,}; use more stories or a shorter context")
    if loader.windows_per_epoch < t.batch_size:
        ranks = f" per rank ({d.world_size} ranks)" if d.enabled else ""
        raise UserError(f"train.batch_size {t.batch_size} is more than the {loader.windows_per_epoch:,} windows of "
                        f"model.context_length {T:,} tokens in the training split{ranks}: a batch would be cut to "
                        f"{loader.windows_per_epoch}; lower train.batch_size to {loader.windows_per_epoch} or less, "
                        "or use more stories")
    return cfg, loader, make_plan(cfg, loader.batches_per_epoch, d.world_size)


def set_up(cfg: RunConfig, device: torch.device, d: Dist | None = None, progress: bool = False) -> TrainingSetup:
    """Prepare the data, check that the run fits the data and the memory (before any weight is allocated),
    then build the rest. The model's initial weights depend only on train.seed. `d`: this process's rank
    (default: the only one)."""
    t = cfg.train
    d = d or Dist()
    data = prepared_data(cfg, d, progress)
    cfg, loader, plan = data_plan(cfg, data, d)
    footprint.check_fits(build_on_meta(cfg.model), cfg, device)

    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(device)
    module: nn.Module = LossModule(model, t.loss_chunk_tokens)
    if t.compile:
        module = torch.compile(module)
    if d.enabled:
        module = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda"
                                                     else None)
    optimizer = build_optimizer(model, t)
    scaler = torch.amp.GradScaler(device.type, enabled=(t.dtype == "fp16" and device.type == "cuda"))
    return TrainingSetup(cfg, data, model, module, optimizer, scaler, loader, plan)
