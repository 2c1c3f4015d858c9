"""Running a study's plan: the lr sweep runs and the study runs as jobs, longest path first, N at a time.

Jobs are of two kinds: a sweep run (one rate of one model's lr sweep, `picollm.training.lr_search`) and a
study run (train, then eval.json). A run with lr auto waits until its sweep has chosen a rate: all grid
rates have run, and the one more rate beyond an edge where the rule asks for it. Among the jobs that are
ready, the next one is the one with the longest estimated path to the end of the study (its own time plus
that of the runs waiting on it), so that one long run does not trail at the end.

Running the same command again skips finished runs (summary.json says "finished" and eval.json is there
with the same eval settings) and finished sweep runs, and resumes interrupted ones from their last
checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import math
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from picollm.config import RunConfig, from_dict, to_dict
from picollm.device import resolve_device
from picollm.errors import UserError
from picollm.study.evals import eval_is_current, evaluate_run, run_is_finished
from picollm.study.plan import StudyPlan, prepared_for
from picollm.study.progress import Progress
from picollm.study.schedule import Job, Schedule
from picollm.study.spec import EvalSpec
from picollm.training import lr_search
from picollm.training.trainer import train

# ---------------------------------------------------------------------------------------------
# the jobs of one worker


def train_and_evaluate(config: dict[str, Any], settings: dict[str, Any], threads: int | None = None,
                       prepared: Any = None, log: str | None = None) -> dict[str, Any]:
    """Train (or resume) one run, then write its eval.json; returns the summary. Runs in a worker too,
    where `log` names a file (in the run directory) for the trainer's own lines."""
    if threads:
        torch.set_num_threads(threads)
    spec = from_dict(EvalSpec, settings, prefix="eval")
    with contextlib.ExitStack() as stack:
        if log is not None:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(contextlib.redirect_stderr(stack.enter_context(open(log, "a", encoding="utf-8"))))
        result = train(config, resume=True, progress=False)
        summary = dict(result.summary)
        if summary.get("status") == "finished" and not eval_is_current(result.directory, spec):
            device = resolve_device(str((config.get("train") or {}).get("device", "auto")))
            evaluate_run(result.directory, spec, prepared=prepared, device=str(device))
    return summary


def run_sweep_point(config: dict[str, Any], lr: float, length: float, total_steps: int, threads: int | None = None,
                    log: str | None = None) -> dict[str, Any]:
    """Train (or reuse) one sweep run; {"status", "val_nll", "seconds"} (val_nll None: it diverged)."""
    if threads:
        torch.set_num_threads(threads)
    cfg = from_dict(RunConfig, config)
    with contextlib.ExitStack() as stack:
        if log is not None:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(contextlib.redirect_stderr(stack.enter_context(open(log, "a", encoding="utf-8"))))
        done = lr_search.run_point(cfg, train, lr, length, total_steps)
    if done is None:
        return {"status": "interrupted"}
    loss, seconds = done
    return {"status": "finished", "val_nll": loss if math.isfinite(loss) else None, "seconds": seconds}


# ---------------------------------------------------------------------------------------------
# running


def _gpu_count() -> int:
    try:
        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA
        return 0


def default_jobs() -> int:
    """One run per GPU where there are GPUs; on a CPU two runs at once (one thread each on 2 cores).

    On a CPU, small models gain little from a second thread, and threads of one process wait on each
    other when other programs share the cores: two single-threaded runs finish sooner than one run
    with two threads, and compute exactly the same numbers."""
    gpus = _gpu_count()
    if gpus:
        return gpus
    return min(2, os.cpu_count() or 1)


def devices_for(jobs: int) -> list[str | None]:
    """Per job slot: a GPU each where there are GPUs, else None (CPU threads are split instead)."""
    count = _gpu_count()
    if count >= 1 and jobs >= 1:
        return [f"cuda:{i % count}" for i in range(jobs)]
    return [None] * jobs


def with_slot(config: dict[str, Any], device: str | None, threads: int | None) -> dict[str, Any]:
    config = copy.deepcopy(config)
    train = config.setdefault("train", {})
    if device is not None and train.get("device", "auto") == "auto":
        train["device"] = device
    if threads is not None and train.get("threads") is None:
        train["threads"] = threads
    return config


def run_plan(plan: StudyPlan, jobs: int = 1, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate every run of the plan that is not finished yet (and the sweep runs they need);
    returns counts and failures."""
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    all_runs = list(plan.runs.values())
    todo = [r for r in all_runs if not (run_is_finished(r.directory) and eval_is_current(r.directory, plan.eval))]
    schedule = Schedule(plan, todo)
    display = Progress(schedule, enabled=progress)
    skipped = len(all_runs) - len(todo)
    if skipped:
        display.write(f"[study] {skipped} of {len(all_runs)} runs are finished already and are reused")
    failures: dict[str, str] = {}
    interrupted = _execute(plan, schedule, display, jobs, failures)
    for job, why in schedule.blocked():
        failures[job.key] = why
        display.write(f"[study] not run: {job.label}: {why}")
    display.close()
    return {"runs": len(all_runs), "reused": skipped, "trained": len(todo), "failures": failures,
            "interrupted": interrupted, "sweeps": dict(schedule.chosen)}


def _call(job: Job, settings: dict[str, Any], device: str | None, threads: int | None, prepared: Any = None,
          log: bool = False) -> tuple[Any, tuple]:
    """The function and arguments that do `job` (in a worker: `log` sends the trainer's lines to a file)."""
    log_file = str(job.directory / "train.log") if log else None
    if job.kind == "sweep":
        sweep = job.sweep
        assert sweep is not None
        return run_sweep_point, (with_slot(sweep.config, device, threads), job.lr, job.length, sweep.total_steps,
                                 threads, log_file)
    assert job.run is not None
    return train_and_evaluate, (with_slot(job.run.config, device, threads), settings, threads, prepared, log_file)


def _execute(plan: StudyPlan, schedule: Schedule, display: Progress, jobs: int, failures: dict[str, str]) -> bool:
    """Run the schedule's jobs, `jobs` at a time (in this process when 1); True when interrupted."""
    settings = to_dict(plan.eval)
    devices = devices_for(jobs)
    threads = None if devices[0] is not None or jobs == 1 else max(1, (os.cpu_count() or 1) // jobs)
    interrupted = False
    index = 0

    def close(job: Job, start: float, result: dict[str, Any] | None, error: str | None) -> None:
        nonlocal interrupted
        if error is not None:
            failures[job.key] = error
        elif (result or {}).get("status") != "finished":
            interrupted = True
        schedule.finished(job, result, error)
        display.finished(job, result, time.perf_counter() - start, error, schedule)

    if jobs == 1:
        while not interrupted and (job := schedule.take()) is not None:
            index += 1
            display.started(job, index, schedule.total)
            start = time.perf_counter()
            prepared = prepared_for(plan, job.run.config) if job.run is not None else None
            fn, args = _call(job, settings, devices[0], None, prepared)
            try:
                with display.lines():
                    result = fn(*args)
            except UserError as exc:
                close(job, start, None, str(exc))
                continue
            close(job, start, result, None)
        return interrupted

    free = list(range(jobs))
    running: dict[Future, tuple[int, Job, float]] = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        while True:
            while free and not interrupted and (job := schedule.take()) is not None:
                slot = free.pop(0)
                index += 1
                display.started(job, index, schedule.total)
                fn, args = _call(job, settings, devices[slot], threads, log=True)
                running[pool.submit(fn, *args)] = (slot, job, time.perf_counter())
            if not running:
                break
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                slot, job, start = running.pop(future)
                free.append(slot)
                try:
                    result = future.result()
                except UserError as exc:
                    close(job, start, None, str(exc))
                    continue
                close(job, start, result, None)
    return interrupted
