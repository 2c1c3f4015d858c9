"""`picollm study --dry-run`: every job (study runs per seed, lr sweep runs) with its measured speed and
estimated time, and the study's wall time simulated with the runner's own order and N jobs at a time.

A run's estimate = its training steps x the step time measured here (3 steps, after a warm-up one) + its
evaluations (the forward passes of the periodic and full-split evaluations, at EVAL_COST of a training
step's time per token) + the eval.json generation and the fixed cost of a job (GENERATION_S, JOB_S).
The constants were fitted to measured quick studies on the project's 2-core machine (docs/study.md).
"""

from __future__ import annotations

import heapq
import math
import os
from pathlib import Path
from typing import Any

import torch

from picollm.config import RunConfig, from_dict
from picollm.data.prepared import SPLITS
from picollm.schema import flatten_keys
from picollm.study.evals import run_is_finished
from picollm.study.plan import StudyPlan, prepared_for
from picollm.study.runner import devices_for, with_slot
from picollm.training import lr_search
from picollm.training.setup import plan_for
from picollm.training.trainer import dry_run

EVAL_COST = 0.45  # an evaluated token costs this fraction of a trained one (forward only, larger batches)
GENERATION_S = 2.0  # eval.json: the prompts continued with each strategy, the model loaded again
JOB_S = 1.5  # a job's fixed cost: data opened, model built, checkpoints and final weights written


def _eval_tokens(cfg: RunConfig, steps: int, split_tokens: dict[str, int], sweep: bool) -> int:
    """Tokens the run evaluates: the periodic subsets, the full-split points and the final summary."""
    t = cfg.train
    T = int(cfg.model["context_length"])
    eval_bs = t.eval_batch_size or t.batch_size
    subset = min(split_tokens["val"], t.eval_batches * eval_bs * T)
    periodic = (steps // t.eval_interval if t.eval_interval and not sweep else 0) + 1
    full_points = 0 if sweep else len([f for f in t.full_val_at if round(f * steps) < steps])
    sizes = {"train": min(split_tokens["train"], split_tokens["val"]), "val": split_tokens["val"],
             "test": split_tokens["test"]}  # the train split is scored on a subset as large as val
    final = sum(sizes[s] for s in t.final_splits)  # a sweep run: val only
    return periodic * subset + full_points * split_tokens["val"] + final


def job_seconds(cfg: RunConfig, steps: int, step_seconds: float | None, split_tokens: dict[str, int],
                sweep: bool) -> float | None:
    """None where the step was not measured (the model does not clearly fit in this machine's memory)."""
    if step_seconds is None:
        return None
    per_token = step_seconds / plan_for(cfg, split_tokens["train"]).tokens_per_step
    seconds = steps * step_seconds + _eval_tokens(cfg, steps, split_tokens, sweep) * per_token * EVAL_COST + JOB_S
    return seconds + (0.0 if sweep else GENERATION_S)


def dry_run_rows(plan: StudyPlan, jobs: int = 1) -> list[dict[str, Any]]:
    """Per job: parameters, tokens, FLOPs, measured tokens/s and the estimated time. A step's time is
    measured once per model configuration (seeds and sweep runs share it)."""
    cores = os.cpu_count() or 1
    devices = devices_for(jobs)
    threads = None if devices[0] is not None or jobs == 1 else max(1, cores // jobs)
    before = torch.get_num_threads()
    measured: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    try:
        for run in plan.runs.values():
            config = with_slot(run.config, devices[0], threads)
            key = repr(sorted((k, v) for k, v in flatten_keys(config).items() if k not in ("out", "train.seed")))
            if key not in measured:
                measured[key] = dry_run(lr_search.timing_config(from_dict(RunConfig, config)))
            info = measured[key]
            prep = prepared_for(plan, run.config)
            split_tokens = {s: prep.num_tokens(s) for s in SPLITS}
            cfg = from_dict(RunConfig, run.config)
            est = job_seconds(cfg, info["steps"], info["step_seconds"], split_tokens, sweep=False)
            rows.append({**info, "kind": "run", "run": run.label, "seed": run.seed, "dir": run.directory.name,
                         "groups": sorted({g for g, _ in run.uses}), "finished": run_is_finished(run.directory),
                         "est_seconds": est, "key": run.run_id, "sweep": run.sweep, "lr": cfg.train.lr})
        runs_by_id = {r["key"]: r for r in rows}
        for sweep in plan.sweeps.values():
            info = runs_by_id[sweep.runs[0]]
            cfg = from_dict(RunConfig, sweep.config)
            prep = prepared_for(plan, sweep.config)
            split_tokens = {s: prep.num_tokens(s) for s in SPLITS}
            points = [(lr, sweep.fraction) for lr in sweep.grid]  # and the runs beyond it already on disk
            for run_dir in sorted(sweep.directory.glob("f*/lr-*")):
                point = (float(run_dir.name[3:]), float(run_dir.parent.name[1:]))
                if point not in points and lr_search.point_result(run_dir) is not None:
                    points.append(point)
            for lr, length in points:
                point = lr_search.point_config(cfg, lr, length, sweep.total_steps)
                steps = point.train.max_steps or 1
                tokens = steps * info["tokens"] // max(1, info["steps"])
                est = job_seconds(point, steps, info["step_seconds"], split_tokens, sweep=True)
                name = f"{sweep.label} lr {lr:g}" + (f" at {length:g}" if length != sweep.fraction else "")
                rows.append({**info, "kind": "sweep", "run": name, "seed": point.train.seed,
                             "dir": f"{sweep.key}/f{length:g}/lr-{lr:g}", "groups": ["lr sweep"], "steps": steps,
                             "tokens": tokens, "flops": info["flops_per_token"] * tokens, "est_seconds": est,
                             "finished": lr_search.point_result(Path(point.out)) is not None,
                             "key": f"{sweep.key}@{length:g}@{lr:g}", "sweep": sweep.key, "lr": lr,
                             "beyond_grid": (lr, length) not in points[:len(sweep.grid)]})
    finally:
        torch.set_num_threads(before)
    return rows


def simulate(rows: list[dict[str, Any]], jobs: int) -> float:
    """The wall time of the unfinished jobs run `jobs` at a time in the runner's order: ready jobs by the
    longest path to the end (a sweep run: its time + the longest run waiting on its sweep); a run with lr
    auto is ready when every run of its sweep is done."""
    todo = [r for r in rows if not r["finished"]]
    waiting: dict[str, list[dict[str, Any]]] = {}
    for r in todo:
        if r["kind"] == "run" and r.get("sweep"):
            waiting.setdefault(r["sweep"], []).append(r)
    left = {key: sum(1 for r in todo if r["kind"] == "sweep" and r["sweep"] == key) for key in waiting}

    def priority(r: dict[str, Any]) -> float:
        if r["kind"] == "sweep":
            return seconds(r) + max((seconds(w) for w in waiting.get(r["sweep"], [])), default=0.0)
        return seconds(r)

    ready = [r for r in todo if r["kind"] == "sweep" or not r.get("sweep") or not left.get(r["sweep"])]
    running: list[tuple[float, int, dict[str, Any]]] = []
    now, counter = 0.0, 0
    while ready or running:
        while ready and len(running) < jobs:
            ready.sort(key=priority)
            job = ready.pop()
            counter += 1
            heapq.heappush(running, (now + seconds(job), counter, job))
        now, _, job = heapq.heappop(running)
        if job["kind"] == "sweep" and job["sweep"] in left:
            left[job["sweep"]] -= 1
            if left[job["sweep"]] == 0:
                ready.extend(waiting[job["sweep"]])
    return now


def format_dry_run(rows: list[dict[str, Any]], jobs: int = 1) -> str:
    head = f"{'job':40s} {'seed':>4s} {'groups':22s} {'lr':>7s} {'params':>10s} {'non-emb':>10s} {'tokens':>11s} " \
           f"{'FLOPs':>9s} {'tok/s':>8s} {'est.':>8s}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        speed = (f"{r['tokens_per_s']:>8,.0f} {duration(r['est_seconds']):>8s}" if r["est_seconds"] is not None
                 else f"{'n/a':>8s} {'n/a':>8s}")  # not measured: too large for this machine's memory
        lr = r["lr"] if isinstance(r["lr"], str) else f"{r['lr']:g}"  # auto: the sweep chooses it
        lines.append(f"{r['run'][:40]:40s} {r['seed']:>4} {','.join(r['groups'])[:22]:22s} {lr:>7s} "
                     f"{r['num_parameters']:>10,} "
                     f"{r['num_parameters_non_embedding']:>10,} {r['tokens']:>11,} {r['flops']:>9.2e} "
                     f"{speed}  {'finished' if r['finished'] else 'to train'}")
    lines.append("-" * len(head))
    runs = [r for r in rows if r["kind"] == "run"]
    sweeps = [r for r in rows if r["kind"] == "sweep"]
    todo = [r for r in rows if not r["finished"]]
    total = sum(seconds(r) for r in todo)
    unmeasured = sum(1 for r in todo if r["est_seconds"] is None)
    seeds = sorted({r["seed"] for r in runs})
    models = len({r["sweep"] for r in sweeps})
    on_grid = sum(1 for r in sweeps if not r["beyond_grid"])
    beyond = len(sweeps) - on_grid
    already = f", and {beyond} beyond it already run (an edge's next rate, a longer sweep)" if beyond else ""
    sweep_text = (f", {len(sweeps)} lr sweep runs ({models} models x {on_grid // max(1, models)} rates of the "
                  f"grid{already}; not counted: one more rate per model whose best is at an edge of the grid, and "
                  "the grid again twice as long for a model none of whose sweep runs trained)") if sweeps else ""
    lines.append(f"{len(runs)} distinct runs ({len(seeds)} seed(s): {', '.join(map(str, seeds))}){sweep_text}; "
                 f"{len(rows) - len(todo)} finished, {len(todo)} to run: {duration(total)} of work"
                 + (f", about {duration(simulate(rows, jobs))} with {jobs} at a time" if jobs > 1 else "")
                 + ", evaluation and generation included"
                 + (f"; {unmeasured} jobs not measured (n/a: too large for this machine's memory) are not counted"
                    if unmeasured else ""))
    return "\n".join(lines)


def seconds(row: dict[str, Any]) -> float:
    """A job's estimated seconds (0 where it was not measured)."""
    return row["est_seconds"] or 0.0


def duration(seconds: float) -> str:
    seconds = int(round(seconds)) if math.isfinite(seconds) else 0
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
