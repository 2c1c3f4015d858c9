"""What a training step needs in memory, estimated on the meta device before anything is allocated.

`estimate(model, cfg)` takes a model built on the meta device (`picollm.models.sizing.build_on_meta`) and
adds up, in fp32: the weights, their gradients and the optimizer's state (AdamW/Adam two moments, SGD one
momentum), which are exact; and the activations autograd saves for the backward pass of one
micro-batch, measured by running the model's `features` on meta tensors (shapes only) and summing
every tensor it saves, plus the output layer's block of logits and its gradient (the chunked loss holds
at most `train.loss_chunk_tokens` rows of them at once). The activations are an upper bound: views of
one tensor are counted once each, and autocast's half-precision copies as fp32.

`check_fits` refuses, before the real model is built, a run whose weights, gradients and optimizer state
alone exceed the memory available (a context or width typed with too many zeros): a certain shortfall,
not an estimate. `picollm train --dry-run` measures steps only when the whole estimate clearly fits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from picollm.config import RunConfig
from picollm.errors import UserError
from picollm.models.base import LanguageModel

OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 1}  # fp32 tensors per parameter


@dataclass
class Footprint:
    state_bytes: int  # weights + gradients + optimizer state
    activation_bytes: int  # saved for backward, one micro-batch, plus the loss's logits block

    @property
    def total(self) -> int:
        return self.state_bytes + self.activation_bytes


def state_bytes(model: LanguageModel, optimizer: str) -> int:
    return 4 * model.num_parameters() * (2 + OPTIMIZER_STATES.get(optimizer, 2))


def activation_bytes(model: LanguageModel, batch_size: int, context: int, chunk_tokens: int) -> int:
    """Bytes autograd saves for one micro-batch of `model` (built on the meta device), plus the logits."""
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    tokens = torch.zeros(batch_size, context, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        hidden = model.features(tokens)
    rows = batch_size * context if chunk_tokens <= 0 else min(chunk_tokens, batch_size * context)
    logits = 2 * 4 * rows * model.output_layer.out_features  # the block and its gradient
    return sum(saved.values()) + 4 * hidden.numel() + logits


def estimate(model: LanguageModel, cfg: RunConfig) -> Footprint:
    t = cfg.train
    return Footprint(state_bytes(model, t.optimizer),
                     activation_bytes(model, t.batch_size, int(cfg.model["context_length"]), t.loss_chunk_tokens))


def available_bytes(device: torch.device) -> int | None:
    """Memory free for training on `device` (the GPU's free memory; on a CPU the system's available memory,
    from /proc/meminfo where there is one); None where it cannot be told."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gigabytes(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def check_fits(model: LanguageModel, cfg: RunConfig, device: torch.device) -> None:
    """UserError when the weights, gradients and optimizer state alone exceed the memory available."""
    needed = state_bytes(model, cfg.train.optimizer)
    available = available_bytes(device)
    if available is not None and needed > available:
        raise UserError(f"the model's {model.num_parameters():,} parameters need {gigabytes(needed)} for their "
                        f"weights, gradients and {cfg.train.optimizer} state alone, and {device} has "
                        f"{gigabytes(available)} available; make the model smaller (its width, depth or "
                        f"model.context_length, now {cfg.model['context_length']:,})")
