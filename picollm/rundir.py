"""The run directory: the one module that knows its layout.

    <out>/config.yaml             the resolved RunConfig (what `picollm train --resume` reads)
    <out>/environment.json        versions, device, command line
    <out>/rerun.sh                reruns the run from config.yaml
    <out>/metrics.jsonl           one JSON row per logged step and per evaluation
    <out>/summary.json            written when the run ends; "status": "finished" marks it done
    <out>/checkpoints/step-N/     periodic, resumable: a model directory + the training state
    <out>/best/                   the model with the lowest validation loss so far
    <out>/final/                  the finished model
    <out>/eval.json               what the study measured on the finished run
    <out>/train.lock              held by the training that writes the directory (`picollm.runlock`)
    <out>/history.jsonl           one row per event that changed the run's course: a recipe change
                                  allowed on resume, a restart from an earlier step, a fresh start
    <out>/discarded/<time>/       what a restart from an earlier step (`--from-step`) moved aside:
                                  later checkpoints, metrics rows, best/, final/; never deleted by picollm

The format is versioned (`FORMAT_VERSION`, recorded in environment.json as "picollm_run_format"). Version 1
(before the lock and the history) is upgraded silently: nothing in it changed meaning. A directory of a
newer version is refused.

A model directory (final/, best/, a step-N/, a hub snapshot) is one that holds `MODEL_CONFIG`; its
files are `picollm.checkpoint`'s business.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from picollm._version import __version__
from picollm.config import RunConfig, from_dict, load_yaml, to_dict
from picollm.errors import UserError
from picollm.fileio import finish_replacement, moved_aside, write_json_atomic, write_text_atomic

CONFIG = "config.yaml"
ENVIRONMENT = "environment.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
RERUN = "rerun.sh"
EVAL = "eval.json"
CHECKPOINTS = "checkpoints"
BEST = "best"
FINAL = "final"
STUDY = "study.json"  # a study directory's record (picollm.study.plan writes it)
SWEEP_DIR = "lr_sweep"  # the lr sweep's runs: <out>/lr_sweep/ of a run, <study>/lr_sweep/<model>/ of a study
REPORT_DIR = "report"  # a study's report: <study>/report/ holds REPORT_HTML and REPORT_MD (+ plots)
REPORT_HTML = "index.html"  # a report, self-contained (images embedded)
REPORT_MD = "report.md"  # the same report in Markdown, next to its PNGs
LOCK = "train.lock"
HISTORY = "history.jsonl"
DISCARDED = "discarded"
FORMAT_VERSION = 2
FORMAT_KEY = "picollm_run_format"  # in environment.json
MODEL_CONFIG = "config.json"  # what makes a directory a model checkpoint (picollm.checkpoint writes it)
# what a fresh start (not a resume) deletes from an existing run directory
OUTPUTS = (CHECKPOINTS, BEST, FINAL, METRICS, SUMMARY)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_config(out: Path, config: RunConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / CONFIG, yaml.safe_dump(to_dict(config), sort_keys=False))


def write_run_files(out: Path, config: RunConfig, device: torch.device) -> None:
    write_config(out, config)
    write_json_atomic(out / ENVIRONMENT, {
        FORMAT_KEY: FORMAT_VERSION,
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


def check_format(out: Path) -> None:
    """UserError when `out` was written by a newer picollm whose run directories this one cannot read."""
    environment = read_json(out / ENVIRONMENT)
    version = environment.get(FORMAT_KEY, 1) if isinstance(environment, dict) else 1
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"{out} is a run directory of format {version!r} ({out / ENVIRONMENT}), written by a newer "
                        f"picollm; this one ({__version__}) reads formats up to {FORMAT_VERSION}: upgrade picollm "
                        "or train into another directory")


def read_run_config(out: Path) -> RunConfig:
    path = out / CONFIG
    if not path.is_file():
        raise UserError(f"{out} is not a picollm run directory: {CONFIG} is missing")
    data = load_yaml(path)
    try:
        return from_dict(RunConfig, data)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None where it is missing, unreadable or not an object (a run that
    never finished, a damaged file)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_summary(out: Path) -> dict[str, Any] | None:
    return read_json(out / SUMMARY)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines log (metrics.jsonl, history.jsonl); a line cut off by a kill ends it."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def read_metrics(out: Path) -> list[dict[str, Any]]:
    return read_jsonl(out / METRICS)


def truncate_metrics(out: Path, last_step: int) -> None:
    """Drop log lines after `last_step` (written by a run that was killed after its last checkpoint)."""
    rows = [r for r in read_metrics(out) if r.get("step", 0) <= last_step]
    write_text_atomic(out / METRICS, "".join(json.dumps(r) + "\n" for r in rows))


def step_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:08d}"


def step_of(checkpoint: Path) -> int:
    """The step of a periodic checkpoint directory (`step-00000012` -> 12)."""
    return int(checkpoint.name.removeprefix("step-"))


def append_history(out: Path, event: str, **fields: Any) -> None:
    """One row of history.jsonl: the event, when, the command line, and its details."""
    row = {"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields, "command": sys.argv}
    with open(out / HISTORY, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_history(out: Path) -> list[dict[str, Any]]:
    return read_jsonl(out / HISTORY)


def _model_step(directory: Path) -> int | None:
    record = read_json(directory / MODEL_CONFIG)
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def discard_after(out: Path, step: int) -> dict[str, Any]:
    """Move everything the run wrote after `step` into `out/discarded/<time>/`, so that it continues from
    its checkpoint at `step`: the later checkpoints, the metrics rows after it (to a metrics.jsonl there),
    best/ when it was saved later, and final/, summary.json and eval.json. Nothing is deleted. Returns
    what was moved and where (relative to `out`)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = out / DISCARDED / stamp
    n = 1
    while dest.exists():
        n += 1
        dest = out / DISCARDED / f"{stamp}-{n}"
    later = [p for p in checkpoint_dirs(out) if step_of(p) > step]
    moves = [(p, dest / CHECKPOINTS / p.name) for p in later]
    best_step = _model_step(out / BEST) if (out / BEST).is_dir() else None
    if (out / BEST).is_dir() and (best_step is None or best_step > step):
        moves.append((out / BEST, dest / BEST))
    moves += [(out / name, dest / name) for name in (FINAL, SUMMARY, EVAL) if (out / name).exists()]
    rows = read_metrics(out)
    dropped = [r for r in rows if r.get("step", 0) > step]
    (dest / CHECKPOINTS).mkdir(parents=True)
    if dropped:
        write_text_atomic(dest / METRICS, "".join(json.dumps(r) + "\n" for r in dropped))
        truncate_metrics(out, step)
    for source, target in moves:
        os.replace(source, target)
    moved = [str(source.relative_to(out)) for source, _ in moves] + ([f"{METRICS} ({len(dropped)} rows after "
                                                                       f"step {step})"] if dropped else [])
    return {"to": str(dest.relative_to(out)), "moved": moved, "best_moved": (out / BEST) in [m[0] for m in moves]}


def checkpoint_dirs(out: Path) -> list[Path]:
    """The periodic checkpoints, oldest first."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.startswith("."))


def remove_partial_writes(out: Path) -> None:
    """Delete the temporaries left by a kill during an atomic write (they were never visible), and finish
    the replacements of a directory (best/, final/, a checkpoint) that a kill interrupted. Called by the
    training that holds the run's lock, before it writes."""
    for parent in (out, out / CHECKPOINTS):
        if parent.is_dir():
            for tmp in parent.glob(".*.tmp"):
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)
            for old in parent.glob(".*.old"):
                finish_replacement(parent / old.name.removeprefix(".").removesuffix(".old"))


def clear_outputs(out: Path) -> None:
    """What a fresh start replaces: checkpoints, best/, final/, the metrics log and the summary."""
    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def find_run_dir(path: str | Path) -> Path | None:
    """The run directory that `path` is or holds a checkpoint of (it contains config.yaml), or None."""
    here = Path(path).expanduser()
    candidates = [here]
    if here.name in (FINAL, BEST, moved_aside(here.parent / FINAL).name, moved_aside(here.parent / BEST).name):
        candidates.append(here.parent)
    if here.parent.name == CHECKPOINTS:
        candidates.append(here.parent.parent)
    for candidate in candidates:
        if (candidate / CONFIG).is_file():
            return candidate
    return None


def _instead(run: Path, damaged: Path) -> str:
    """What to load or run instead of a damaged final/ or best/ of `run`."""
    others = [p for p in (run / BEST, *reversed(checkpoint_dirs(run))) if p != damaged and (p / MODEL_CONFIG).is_file()]
    use = f"load {others[0]} instead" if others else "no other checkpoint of the run is left"
    saved = checkpoint_dirs(run)
    if damaged.name == FINAL and saved and (run / CONFIG).is_file():
        return (f"{use}, or write it again from the last checkpoint with `picollm train --resume {run} --from-step "
                f"{step_of(saved[-1])}` (what it replaces is moved aside)")
    return use


def model_dir(directory: Path) -> Path:
    """The model directory that `directory` is or holds: itself, else a run's final model, then the
    best by validation loss, then the latest periodic checkpoint. A final/ or best/ that is there but
    damaged is a UserError naming it and what to use instead (never silently another model). A final/
    or best/ whose replacement a kill interrupted is read where it was moved aside (`.final.old`); the
    run's next training puts it back (reading never moves it: a training may be replacing it now)."""
    if (directory / MODEL_CONFIG).is_file():
        return directory
    for candidate in (directory / FINAL, directory / BEST):
        if (candidate / MODEL_CONFIG).is_file():
            return candidate
        if candidate.exists():  # written atomically, so never incomplete by a kill: damaged since
            raise UserError(f"{candidate} is damaged ({MODEL_CONFIG} is missing); {_instead(directory, candidate)}")
        if (moved_aside(candidate) / MODEL_CONFIG).is_file():
            return moved_aside(candidate)
    periodic = [p for p in checkpoint_dirs(directory) if (p / MODEL_CONFIG).is_file()]
    if periodic:
        return periodic[-1]
    raise UserError(f"{directory} holds no checkpoint (no {MODEL_CONFIG}, {FINAL}/, {BEST}/ or {CHECKPOINTS}/)")
