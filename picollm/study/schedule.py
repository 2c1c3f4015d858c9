"""The study's jobs and their order: the lr sweep runs and the study runs, which of them are ready, and the
longest path to the end of the study first.

A run with lr auto waits until its sweep has chosen a rate: all grid rates have run, and the one more rate
beyond an edge where the rule asks for it (`picollm.training.lr_search`). Among the jobs that are ready, the
next one is the one with the longest estimated path to the end of the study (its own time plus that of the
runs waiting on it), so that one long run does not trail at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from picollm.config import RunConfig, from_dict, to_dict
from picollm.models.sizing import build_on_meta
from picollm.study.plan import StudyPlan, StudyRun, Sweep, planned_tokens, prepared_for
from picollm.training import lr_search


def estimate_seconds(config: dict[str, Any], train_tokens: int, evaluate: bool = True) -> float:
    """A rough wall time for one run on this machine, from its FLOPs: what orders the jobs and weighs
    the bar (the dry run measures steps instead). `evaluate`: with the eval.json generation after it."""
    cfg = from_dict(RunConfig, config)
    flops = build_on_meta(cfg.model).flops_per_token(int(cfg.model["context_length"]))
    tokens = planned_tokens(cfg, train_tokens)
    return tokens * (4e-5 + flops / 6e10) * 1.15 + (2.0 if evaluate else 1.0)


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
        tokens = planned_tokens(point, prep.num_tokens("train"))
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
