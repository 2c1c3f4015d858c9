"""The run directory: resolved config, environment, rerun command, metrics log and summary."""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from picollm.checkpoint import write_json_atomic
from picollm.config import RunConfig, from_dict, load_yaml, to_dict
from picollm.errors import UserError

CONFIG = "config.yaml"
ENVIRONMENT = "environment.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
RERUN = "rerun.sh"
CHECKPOINTS = "checkpoints"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_run_files(out: Path, config: RunConfig, device: torch.device) -> None:
    from picollm import __version__

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{CONFIG}.tmp"
    tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
    tmp.replace(out / CONFIG)
    write_json_atomic(out / ENVIRONMENT, {
        "picollm_version": __version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "command_line": sys.argv,
    })
    (out / RERUN).write_text(
        "#!/usr/bin/env bash\n# Reruns this training run from its resolved config (resuming if interrupted).\n"
        f"picollm train --config {shlex.quote(str(out / CONFIG))} --out {shlex.quote(str(out))}\n",
        encoding="utf-8")


def read_run_config(out: Path) -> RunConfig:
    path = out / CONFIG
    if not path.is_file():
        raise UserError(f"{out} is not a picollm run directory: {CONFIG} is missing")
    data = load_yaml(path)
    try:
        return from_dict(RunConfig, data)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def read_summary(out: Path) -> dict[str, Any] | None:
    path = out / SUMMARY
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def read_metrics(out: Path) -> list[dict[str, Any]]:
    path = out / METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut off by a kill ends the log
    return rows


def truncate_metrics(out: Path, last_step: int) -> None:
    """Drop log lines after `last_step` (written by a run that was killed after its last checkpoint)."""
    rows = [r for r in read_metrics(out) if r.get("step", 0) <= last_step]
    tmp = out / f".{METRICS}.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out / METRICS)


def checkpoint_dirs(out: Path) -> list[Path]:
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.startswith("."))


def remove_partial_writes(out: Path) -> None:
    """Delete temporary directories left by a kill during an atomic write; they were never visible."""
    import shutil

    for parent in (out, out / CHECKPOINTS):
        if parent.is_dir():
            for tmp in parent.glob(".*.tmp"):
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
