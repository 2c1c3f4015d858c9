"""Devices and mixed precision, shared by training, evaluation, generation and the benchmarks."""

from __future__ import annotations

import contextlib

import torch

from picollm.errors import UserError

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name: str | torch.device | None) -> torch.device | None:
    """'auto' -> cuda, mps or cpu; a device that is not there is a UserError; None stays None."""
    if name is None or isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}': CUDA is not available here; use --device cpu")
    if name == "mps" and not _mps_available():
        raise UserError("device 'mps': MPS is not available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16/fp16 on `device`; fp32 is no autocast at all."""
    amp = AMP_DTYPES[dtype]
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp)
