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

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from picollm.config import RunConfig, from_dict, to_dict
from picollm.errors import UserError
from picollm.study.evals import eval_is_current, evaluate_run, run_is_finished
from picollm.study.plan import StudyPlan, StudyRun, Sweep, planned_tokens, prepared_for
from picollm.study.progress import Progress, estimate_seconds
from picollm.study.spec import EvalSpec
from picollm.training import lr_search


@dataclass
class Job:
    kind: str  # "sweep" (one rate of a model's lr sweep) or "run" (a study run, then its eval.json)
    key: str  # unique: the run id, or "<sweep key>@<rate>"
    label: str
    directory: Path
    seconds: float  # estimated
    tokens: int  # planned training tokens (for the progress bar)
    run: StudyRun | None = None
    sweep: Sweep | None = None
    lr: float | None = None
    length: float | None = None  # a sweep run's length, as a fraction of the run
    priority: float = 0.0


# ---------------------------------------------------------------------------------------------
# the jobs of one worker


def train_and_evaluate(config: dict[str, Any], settings: dict[str, Any], threads: int | None = None,
                       prepared: Any = None, log: str | None = None) -> dict[str, Any]:
    """Train (or resume) one run, then write its eval.json; returns the summary. Runs in a worker too,
    where `log` names a file (in the run directory) for the trainer's own lines."""
    import contextlib

    import torch

    from picollm.device import resolve_device
    from picollm.training.trainer import train

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
    import contextlib
    import math

    import torch

    if threads:
        torch.set_num_threads(threads)
    cfg = from_dict(RunConfig, config)
    with contextlib.ExitStack() as stack:
        if log is not None:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(contextlib.redirect_stderr(stack.enter_context(open(log, "a", encoding="utf-8"))))
        done = lr_search.run_point(cfg, lr, length, total_steps)
    if done is None:
        return {"status": "interrupted"}
    loss, seconds = done
    return {"status": "finished", "val_nll": loss if math.isfinite(loss) else None, "seconds": seconds}


# ---------------------------------------------------------------------------------------------
# the order


class Schedule:
    """The jobs still to do, which of them are ready, and what each sweep has found so far."""

    def __init__(self, plan: StudyPlan, runs: list[StudyRun]) -> None:
        self.plan = plan
        self.jobs: dict[str, Job] = {}  # not started yet
        self.waiting: dict[str, list[Job]] = {}  # sweep key -> runs waiting for its rate
        self.rounds: dict[str, dict[float, dict[float, float]]] = {}  # sweep key -> {length: {rate: loss}}
        self.pending: dict[str, set[str]] = {}  # sweep key -> its jobs not finished yet
        self.chosen: dict[str, float] = {}
        self.failed: dict[str, str] = {}  # sweep key -> why
        self.thresholds: dict[str, float] = {}
        self.total = 0
        for run in runs:
            job = self._run_job(run)
            if run.sweep:
                self.waiting.setdefault(run.sweep, []).append(job)
            else:
                self._add(job)
        for key in self.waiting:
            sweep = plan.sweeps[key]
            self.rounds[key], self.pending[key] = {}, set()
            self.thresholds[key] = lr_search.threshold_for(prepared_for(plan, sweep.config))
            self._advance(key)

    def _run_job(self, run: StudyRun) -> Job:
        prep = prepared_for(self.plan, run.config)
        cfg = from_dict(RunConfig, run.config)
        seconds = estimate_seconds(run.config, prep.num_tokens("train"))
        return Job("run", run.run_id, run.label, run.directory, seconds,
                   planned_tokens(cfg, prep.num_tokens("train")), run=run, priority=seconds)

    def _add(self, job: Job) -> None:
        self.jobs[job.key] = job
        self.total += 1

    def _add_point(self, sweep: Sweep, lr: float, length: float) -> None:
        point = lr_search.point_config(from_dict(RunConfig, sweep.config), lr, length, sweep.total_steps)
        prep = prepared_for(self.plan, sweep.config)
        seconds = estimate_seconds(to_dict(point), prep.num_tokens("train"), evaluate=False)
        after = max((j.seconds for j in self.waiting.get(sweep.key, [])), default=0.0)
        steps = point.train.max_steps or 1
        tokens = steps * point.train.batch_size * point.train.grad_accum * int(point.model["context_length"])
        name = f"{sweep.label} lr {lr:g}" + (f" at {length:g}" if length != sweep.fraction else "")
        job = Job("sweep", f"{sweep.key}@{length:g}@{lr:g}", name, Path(point.out), seconds, tokens, sweep=sweep,
                  lr=lr, length=length, priority=seconds + after)
        self.pending[sweep.key].add(job.key)
        self._add(job)

    def _advance(self, key: str) -> None:
        """After a sweep run: all of this length done? then the next runs the rule asks for, or the choice.
        Sweep runs already on disk are read, not scheduled."""
        if self.pending[key] or key in self.chosen or key in self.failed:
            return
        sweep = self.plan.sweeps[key]
        cfg = from_dict(RunConfig, sweep.config)
        rounds = self.rounds[key]
        while (decision := lr_search.decide(rounds, sweep.grid, sweep.fraction, self.thresholds[key])).todo:
            for lr, length in decision.todo:
                done = lr_search.point_result(lr_search.point_dir(cfg, lr, length))
                if done is None:
                    self._add_point(sweep, lr, length)
                else:
                    rounds.setdefault(length, {})[lr] = done[0]
            if self.pending[key]:
                return
        self.chosen[key] = decision.chosen  # type: ignore[assignment]
        for job in self.waiting.get(key, []):
            self._add(job)

    def take(self) -> Job | None:
        """The ready job with the longest path to the end, or None."""
        if not self.jobs:
            return None
        job = max(self.jobs.values(), key=lambda j: (j.priority, j.seconds))
        del self.jobs[job.key]
        return job

    def finished(self, job: Job, result: dict[str, Any] | None, error: str | None) -> None:
        if job.kind != "sweep":
            return
        key = job.sweep.key  # type: ignore[union-attr]
        self.pending[key].discard(job.key)
        if error is not None:
            self.failed[key] = error
            return
        loss = (result or {}).get("val_nll")
        rounds = self.rounds[key].setdefault(job.length, {})  # type: ignore[arg-type]
        rounds[job.lr] = float("inf") if loss is None else float(loss)  # type: ignore[index]
        self._advance(key)

    def blocked(self) -> list[tuple[Job, str]]:
        """Runs that cannot start: their sweep failed."""
        out = []
        for key, why in self.failed.items():
            out += [(job, f"its lr sweep failed: {why}") for job in self.waiting.get(key, [])]
        return out


# ---------------------------------------------------------------------------------------------
# running


def _gpu_count() -> int:
    try:
        import torch

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
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

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
