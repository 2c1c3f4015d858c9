"""Devices and mixed precision, shared by training, evaluation, generation and the benchmarks."""

from __future__ import annotations

import contextlib

import torch

from picollm.errors import UserError

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CHOICES = ("auto", *AMP_DTYPES)


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
        raise UserError(f"device '{name}': CUDA is not available here; use --train.device cpu")
    if name == "mps" and not _mps_available():
        raise UserError("device 'mps': MPS is not available here; use --train.device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matmuls run natively on `device`: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or
    AMX. Elsewhere oneDNN emulates bf16 on the CPU, which is slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> str:
    """'auto' -> bf16 autocast where bf16 runs natively, fp32 elsewhere; other names stay as they are.

    bf16 autocast keeps the weights, optimizer state and loss reduction in fp32; on the sample its loss
    curve follows fp32's while a step is faster (docs/performance.md has the curves and the times).
    """
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if name not in AMP_DTYPES:
        raise UserError(f"dtype {name!r}: use one of {', '.join(DTYPE_CHOICES)}")
    return name


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16/fp16 on `device` ('auto' resolved as in `resolve_dtype`); fp32 is no autocast."""
    amp = AMP_DTYPES[resolve_dtype(dtype, device)]
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp)
