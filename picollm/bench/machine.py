"""The machine a bench runs on: what it is, how fast its matmuls can go, and how much memory a process holds."""

from __future__ import annotations

import os
import platform
import re
import resource
import sys
import time
from typing import Any

import torch

# ru_maxrss is in KiB on Linux and in bytes on macOS
_MAXRSS_TO_MB = 1 / 2**20 if sys.platform == "darwin" else 1 / 1024


def rss_mb() -> float:
    """This process's resident set now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident set: VmHWM where /proc has it, else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"VmHWM:\s+(\d+) kB", f.read())
        if match:
            return int(match.group(1)) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_TO_MB


def children_peak_rss_mb() -> float:
    """The largest peak resident set among this process's finished children (e.g. a pool's workers)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * _MAXRSS_TO_MB


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def available_memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            match = re.search(r"MemAvailable:\s+(\d+) kB", f.read())
        return int(match.group(1)) / 2**20 if match else None
    except OSError:
        return None


def baseline_fits(batch: int, context: int, vocab: int) -> bool:
    """The plain baseline holds about four [B, T, V] fp32 tensors at once (logits, log-softmax, their
    gradients): whether that fits in the memory available now (unknown: assume it does)."""
    need = 4 * batch * context * vocab * 4 / 2**30 + 1.0
    have = available_memory_gb()
    return have is None or need < 0.8 * have


def machine_info() -> dict[str, Any]:
    """CPU model and the instruction sets that decide bf16's speed, memory, torch and its threads, the load."""
    cpu = platform.processor() or platform.machine()
    isa: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        match = re.search(r"model name\s*:\s*(.+)", text)
        if match:
            cpu = match.group(1).strip()
        flags = re.search(r"flags\s*:\s*(.+)", text)
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flags and f in flags.group(1).split()]
    except OSError:
        pass
    memory_gb = None
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    info = {"cpu": cpu, "cpus": os.cpu_count(), "isa": isa, "memory_gb": memory_gb,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(), "load_average": load_average()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work, so that a wall-clock interval covers it."""
    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


def matmul_peak_gflops(dtype: str = "fp32", device: str = "cpu", size: int | None = None,
                       repeats: int = 5) -> float:
    """Best-of-`repeats` GFLOP/s of a square matmul: the machine's practical peak for `dtype`."""
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    dev = torch.device(device)
    n = size or (8192 if dev.type == "cuda" else 2048)
    a = torch.randn(n, n, device=dev).to(dt)
    b = torch.randn(n, n, device=dev).to(dt)
    out = torch.empty(n, n, device=dev, dtype=dt)
    inner = 10 if dev.type == "cuda" else 1
    best = float("inf")
    for i in range(repeats + 1):
        sync(dev)
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        sync(dev)
        if i:  # the first call warms up the library
            best = min(best, (time.perf_counter() - start) / inner)
    return 2 * n**3 / best / 1e9
