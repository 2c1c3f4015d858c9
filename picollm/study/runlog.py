"""One run directory's logs (config.yaml, metrics.jsonl, summary.json, eval.json) and statistics over seeds.

Everything the report shows is read from these files, so a report can be rebuilt at any time, on any
machine, without loading a model.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from picollm import rundir
from picollm.baselines import did_not_train_threshold
from picollm.errors import UserError
from picollm.models.base import DEFAULT_CONTEXT
from picollm.models.sizing import build_on_meta


def finite(x: Any) -> bool:
    """A real number, finite (not a bool, not None, not NaN)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class RunLog:
    directory: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    eval: dict[str, Any] | None
    baseline: dict[str, Any] | None = field(default=None, repr=False)  # picollm.baselines record of its data

    @property
    def finished(self) -> bool:
        return bool(self.summary) and self.summary.get("status") == "finished"

    @property
    def curve(self) -> list[tuple[int, float]]:
        """(tokens seen, validation loss) at each evaluation, deduplicated by step (a resumed run may
        repeat one) and in order."""
        return self._rows("eval")

    def _rows(self, kind: str) -> list[tuple[int, float]]:
        by_step: dict[int, tuple[int, float]] = {}
        for row in self.metrics:
            if row.get("kind") == kind and finite(row.get("val_loss")):
                by_step[int(row.get("step", 0))] = (int(row.get("tokens", 0)), float(row["val_loss"]))
        return [by_step[s] for s in sorted(by_step)]

    @property
    def full_val(self) -> dict[float, float]:
        """{fraction of the run: NLL on the full validation split}: the `train.full_val_at` points, and
        1.0 = the final summary's."""
        points = {}
        for row in self.metrics:
            if row.get("kind") == "eval_full" and finite(row.get("val_loss")) and finite(row.get("fraction")):
                points[float(row["fraction"])] = float(row["val_loss"])
        final = ((self.summary or {}).get("val") or {}).get("nll") if self.finished else None
        if finite(final):
            points[1.0] = float(final)
        return dict(sorted(points.items()))

    @property
    def family(self) -> str:
        return str((self.summary or {}).get("family") or (self.config.get("model") or {}).get("family", "?"))

    @cached_property
    def flops_per_token(self) -> float | None:
        """Training FLOPs per token of the run's model (built on the meta device from config.yaml)."""
        model = self.config.get("model") or {}
        if not model.get("family"):
            return None
        try:
            built = build_on_meta(model)
        except UserError:
            return None
        return float(built.flops_per_token(int(model.get("context_length", DEFAULT_CONTEXT))))

    @property
    def did_not_train(self) -> bool:
        """A finished run whose validation NLL has not closed half the gap from the unigram to the bigram
        baseline of its data (picollm.baselines)."""
        val = ((self.summary or {}).get("val") or {}).get("nll")
        if not self.finished or not self.baseline or not finite(val):
            return False
        return float(val) > did_not_train_threshold(self.baseline)


def load_run(directory: str | Path, baseline: dict[str, Any] | None = None) -> RunLog:
    """A run directory's logs; missing files are None / empty (an unfinished or missing run)."""
    directory = Path(directory)
    config: dict[str, Any] = {}
    path = directory / rundir.CONFIG
    if path.is_file():
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            config = {}
    return RunLog(directory, config, rundir.read_metrics(directory), rundir.read_summary(directory),
                  rundir.read_json(directory / rundir.EVAL), baseline)


# ---------------------------------------------------------------------------------------------
# statistics over seeds


@dataclass
class Stat:
    """A quantity over seeds: the values (None where a seed has none), their mean and sample std."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        if len(self.values) >= 2:
            return statistics.stdev(self.values)
        return None

    @classmethod
    def of(cls, values: list[Any]) -> Stat:
        return cls([float(v) for v in values if finite(v)])

    def __bool__(self) -> bool:
        return bool(self.values)


def stat_diff(a: Stat, b: Stat) -> Stat:
    """a - b per seed when both have the same seeds' values, else the difference of means."""
    if a.n == b.n and a.n >= 2:
        return Stat([x - y for x, y in zip(a.values, b.values, strict=True)])
    if a and b:
        return Stat([a.mean - b.mean])  # type: ignore[operator]
    return Stat([])
