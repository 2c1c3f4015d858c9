"""`train.lr: auto`: short runs over a grid of peak learning rates choose the rate of a run.

The rule (docs/study.md explains why it is fair):

1. For each rate of `train.lr_grid` (default 1e-3, 3e-3, 1e-2, 3e-2: half a decade apart), a sweep run: a
   complete run through the normal `train()` with the same model, data, seed (`train.lr_sweep_seed`, else
   `train.seed`) and schedule shape, for `train.lr_sweep_fraction` (default 1/4) of the run's steps, the
   warmup and the decay compressed to that length; no periodic evaluation, samples or checkpoints but the
   last; only the validation split scored at the end. Its score: that final NLL on the FULL validation split.
2. The chosen rate is the one with the lowest score (ties: the lower rate). A run that diverged scores +inf.
3. When the lowest score sits at an edge of the grid, one more run one grid step beyond that edge; if that
   run is lower still, it is chosen and the run is marked "lr at grid edge" (the optimum may lie further).
4. When even the lowest score shows no learning (the run did not close half the gap from the unigram to the
   bigram baseline of the data: the report's "did not train", `picollm.baselines`), the ranking is noise:
   the sweep is repeated with runs twice as long (1/4 -> 1/2 -> the whole run), and the rate is chosen at
   the first length where a rate trains (or at the whole length, marked "no sweep run trained").

Sweep runs live in `train.lr_sweep_dir` (default `<out>/lr_sweep`), one directory per length and rate
(`f0.25/lr-0.003`), and are cached and resumed like any run: a rerun, or another seed of the same model in
a study, reuses them. The chosen rate and every sweep loss are recorded in `train.lr_found` (config.yaml)
and in summary.json (`lr`, `lr_sweep`); the run's `wall_time_s` includes the sweep's.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from picollm import rundir
from picollm.baselines import cached_baselines, did_not_train_threshold
from picollm.config import RunConfig
from picollm.data.prepare import prepare
from picollm.errors import TrainingDiverged, UserError
from picollm.fileio import write_json_atomic
from picollm.training import recipe
from picollm.training.setup import plan_for

# the trainer's `train(config, resume=..., progress=..., resume_advice=...)`, passed in: the trainer calls `tune` first
Train = Callable[..., Any]

RULE = ("lowest full-split val NLL at lr_sweep_fraction of the steps; one more rate beyond an edge minimum; "
        "twice as long while no rate closes half the unigram-to-bigram gap")
POINT = "lr_point.json"  # in a finished sweep run: its rate, final val NLL (null: diverged) and seconds


@dataclass
class Choice:
    chosen: float
    next_lr: float | None  # a rate still to run (the extension beyond an edge), else None
    at_edge: bool  # the lowest loss is still at the edge of every rate tried


def choose(losses: dict[float, float], grid: list[float]) -> Choice:
    """Rules 2-3 on the losses of one length ({rate: final val NLL}, inf or None for a diverged run); every
    grid rate must be there. Pure: the tests check it on made-up numbers."""
    grid = sorted(grid)
    missing = [lr for lr in grid if lr not in losses]
    if missing:
        raise ValueError(f"the sweep has no loss for {missing}")
    tried = sorted(losses)
    score = {lr: _score(v) for lr, v in losses.items()}
    best = min(tried, key=lambda lr: (score[lr], lr))
    extended = tried[0] < grid[0] or tried[-1] > grid[-1]
    low, high = best == tried[0], best == tried[-1]
    if not extended and (low or high) and math.isfinite(score[best]):
        step = grid[1] / grid[0] if low else grid[-1] / grid[-2]
        beyond = best / step if low else best * step
        return Choice(best, float(f"{beyond:.2g}"), at_edge=True)
    return Choice(best, None, at_edge=(low or high) and extended)


def _score(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else math.inf


def lengths(fraction: float) -> list[float]:
    """The sweep's run lengths as fractions of the run: `fraction`, twice that, ... up to the whole run."""
    out = [fraction]
    while out[-1] < 1.0:
        out.append(min(1.0, 2 * out[-1]))
    return out


@dataclass
class Decision:
    todo: list[tuple[float, float]] = field(default_factory=list)  # (rate, length) still to run
    chosen: float | None = None
    at_edge: bool = False
    length: float | None = None  # the length the rate was chosen at
    trained: bool = True  # some sweep run at that length trained


def decide(rounds: dict[float, dict[float, float]], grid: list[float], fraction: float,
           threshold: float | None) -> Decision:
    """All four rules on the sweep runs so far ({length: {rate: loss}}): what to run next, or the choice.
    `threshold`: the validation NLL a run must reach to count as trained (None: every run counts)."""
    for length in lengths(fraction):
        losses = rounds.get(length, {})
        missing = [lr for lr in sorted(grid) if lr not in losses]
        if missing:
            return Decision(todo=[(lr, length) for lr in missing])
        choice = choose(losses, grid)
        if choice.next_lr is not None:
            return Decision(todo=[(choice.next_lr, length)])
        trained = threshold is None or _score(losses[choice.chosen]) <= threshold
        if trained or length >= 1.0:
            return Decision(chosen=choice.chosen, at_edge=choice.at_edge, length=length, trained=trained)
    raise AssertionError("lengths() ends at the whole run")


def sweep_dir(cfg: RunConfig) -> Path:
    t = cfg.train
    return Path(t.lr_sweep_dir).expanduser() if t.lr_sweep_dir else Path(cfg.out) / rundir.SWEEP_DIR


def point_dir(cfg: RunConfig, lr: float, length: float) -> Path:
    return sweep_dir(cfg) / f"f{length:g}" / f"lr-{lr:g}"


def planned_steps(cfg: RunConfig, train_tokens: int, world_size: int = 1) -> int:
    """The run's optimizer steps, as the trainer plans them (max_steps, else max_tokens, else epochs)."""
    return plan_for(cfg, train_tokens, world_size).total_steps


def sweep_steps(total_steps: int, length: float) -> int:
    """Steps of a sweep run `length` (a fraction) of a run of `total_steps`."""
    return max(1, round(length * total_steps))


def point_config(cfg: RunConfig, lr: float, length: float, total_steps: int) -> RunConfig:
    """The sweep run at `lr`: the same model, data and recipe, `length` of the steps, nothing periodic."""
    t = cfg.train
    seed = t.lr_sweep_seed if t.lr_sweep_seed is not None else t.seed
    train = replace(t, lr=lr, max_steps=sweep_steps(total_steps, length), max_tokens=None, eval_interval=0,
                    ckpt_interval=0, sample_tokens=0, full_val_at=[], final_splits=["val"], patience=None,
                    seed=seed, lr_sweep_seed=None, lr_sweep_dir=None, lr_found=None, wandb=False,
                    push_to_hub=None)
    return RunConfig(data=cfg.data, model=dict(cfg.model), train=train, out=str(point_dir(cfg, lr, length)))


def threshold_for(prepared: Any) -> float:
    """The validation NLL below which a run trained: half way from the unigram to the bigram baseline."""
    return did_not_train_threshold(cached_baselines(prepared))


def point_result(directory: Path) -> tuple[float, float] | None:
    """(final val NLL, seconds) of a finished sweep run (inf for one that diverged), else None. The
    seconds are the whole run's, its evaluations included: what the sweep cost."""
    try:
        record = json.loads((directory / POINT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    nll = record.get("val_nll")
    return (float(nll) if nll is not None else math.inf), float(record.get("seconds", 0.0))


def run_point(cfg: RunConfig, train: Train, lr: float, length: float, total_steps: int) -> tuple[float, float] | None:
    """Train (or reuse) the sweep run at `lr` and `length`; (final val NLL, seconds), None if a signal
    stopped it."""
    point = point_config(cfg, lr, length, total_steps)
    directory = Path(point.out)
    done = point_result(directory)
    if done is not None:
        _check_same_point(directory, point)
        return done
    started = time.perf_counter()
    try:
        result = train(point, resume=True, progress=False, resume_advice=False)  # the run's own advice is printed
    except TrainingDiverged as exc:  # a rate too high for this model: it loses the sweep, nothing more
        record = {"lr": lr, "val_nll": None, "diverged": str(exc)}
    else:
        if result.summary.get("status") != "finished":
            return None
        record = {"lr": lr, "val_nll": result.summary["val"]["nll"]}
    record.update(length=length, steps=point.train.max_steps, seconds=time.perf_counter() - started)
    if int(os.environ.get("RANK", "0")) == 0:
        write_json_atomic(directory / POINT, record)
    return (record["val_nll"] if record["val_nll"] is not None else math.inf), record["seconds"]


def _check_same_point(directory: Path, point: RunConfig) -> None:
    """A cached sweep run must be this model's, on this data, with this recipe (a reused directory)."""
    changed = recipe.changes(rundir.read_run_config(directory), point)
    if changed:
        raise UserError(f"{directory} holds a sweep run of another model, data or recipe "
                        f"({'; '.join(map(str, changed))}); delete it, or give this run another train.lr_sweep_dir")


def tune(cfg: RunConfig, train: Train, progress: bool = True) -> RunConfig | None:
    """`cfg` with `train.lr` chosen by the sweep and `train.lr_found` recording it (runs what is missing,
    each sweep run through `train`, the trainer's own entry point); None when a signal stopped a sweep run
    (run again to resume)."""
    t = cfg.train
    data = prepare(cfg.data, progress=progress)
    total = planned_steps(cfg, data.num_tokens("train"), int(os.environ.get("WORLD_SIZE", "1")))
    threshold = threshold_for(data)
    main = int(os.environ.get("RANK", "0")) == 0
    rounds: dict[float, dict[float, float]] = {}
    seconds = 0.0
    started = time.perf_counter()
    while (decision := decide(rounds, t.lr_grid, t.lr_sweep_fraction, threshold)).todo:
        for lr, length in decision.todo:
            done = run_point(cfg, train, lr, length, total)
            if done is None:
                return None
            rounds.setdefault(length, {})[lr] = done[0]
            seconds += done[1]
            if main:
                print(f"[picollm] lr sweep: lr {lr:g} for {sweep_steps(total, length)} steps -> val nll "
                      f"{_loss(done[0])}", file=sys.stderr, flush=True)
    record = sweep_record(cfg, rounds, decision, threshold, total, seconds)
    if main:
        notes = [" (lr at grid edge: the best rate may lie beyond)" if decision.at_edge else "",
                 f" at {decision.length:g} of the steps" if decision.length != t.lr_sweep_fraction else "",
                 " (no sweep run trained)" if not decision.trained else ""]
        print(f"[picollm] lr auto: chose lr {decision.chosen:g} of {sum(map(len, rounds.values()))} sweep runs"
              f"{''.join(notes)} ({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
    return replace(cfg, train=replace(t, lr=decision.chosen, lr_found=record))


def sweep_record(cfg: RunConfig, rounds: dict[float, dict[float, float]], decision: Decision, threshold: float,
                 total_steps: int, seconds: float) -> dict[str, Any]:
    """What config.yaml (`train.lr_found`) and summary.json (`lr_sweep`) record of a finished sweep."""
    t = cfg.train

    def pairs(losses: dict[float, float]) -> list[list[float | None]]:
        return [[lr, losses[lr] if math.isfinite(losses[lr]) else None] for lr in sorted(losses)]

    return {
        "rule": RULE, "grid": sorted(t.lr_grid), "fraction": t.lr_sweep_fraction,
        "seed": t.lr_sweep_seed if t.lr_sweep_seed is not None else t.seed, "threshold": threshold,
        "rounds": [{"length": length, "steps": sweep_steps(total_steps, length), "losses": pairs(rounds[length])}
                   for length in sorted(rounds)],
        "length": decision.length, "steps": sweep_steps(total_steps, decision.length or 1.0),
        "losses": pairs(rounds[decision.length]) if decision.length in rounds else [],
        "chosen": decision.chosen, "at_edge": decision.at_edge, "trained": decision.trained,
        "wall_time_s": seconds, "dir": str(sweep_dir(cfg)),
    }


def timing_config(cfg: RunConfig) -> RunConfig:
    """For a dry run's timing: a step takes as long at any rate, so lr auto times at the grid's first."""
    if cfg.train.lr != "auto":
        return cfg
    return replace(cfg, train=replace(cfg.train, lr=min(cfg.train.lr_grid)))


def summary_fields(train_cfg: Any, wall: float) -> dict[str, Any]:
    """What summary.json adds: the peak rate used, and for lr auto the sweep and a wall time with it."""
    fields: dict[str, Any] = {"lr": train_cfg.lr}
    found = train_cfg.lr_found
    if found:
        fields.update({"lr_sweep": found, "train_wall_time_s": wall,
                       "wall_time_s": wall + float(found.get("wall_time_s", 0.0))})
    return fields


def _loss(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "inf (diverged)"
