"""Run logs -> the numbers the report shows: per group, per entry (one label, its seeds), mean ± std.

Everything here reads only what a run directory holds (config.yaml, metrics.jsonl, summary.json,
eval.json) and the study's study.json, so a report can be rebuilt at any time, on any machine.

Definitions (docs/study.md repeats them):

- did not train: a run whose final validation NLL has not closed half the gap from the unigram to the
  bigram baseline of its data (`picollm.baselines`); an entry did not train when one of its seeds did not.
- margin to the bigram: validation NLL - the bigram baseline's (negative: better than the bigram).

- reference loss of a group: the worst (highest) final validation loss among its entries (the last
  evaluation of each run's curve, mean over seeds). Every entry reaches it by the end of its run, so
  "tokens to reference" compares how fast each gets there: lower is quicker convergence.
- tokens to reference: the tokens seen at the first evaluation whose validation loss is at or below the
  reference (per seed, then mean ± std).
- roughness of a curve: the standard deviation of successive differences of the validation loss over the
  second half of the run (by tokens). A smooth decline has nearly equal differences (roughness near 0);
  a noisy curve's differences jump around. The first half is left out because the initial drop would
  dominate any curve.
- diversity score: the mean of word distinct-1..5 of the continuations under the study's diversity
  strategy (top-p 1.0 by default).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from picollm import rundir
from picollm.data.prepared import SPLITS
from picollm.errors import UserError
from picollm.schema import flatten_keys
from picollm.study.runlog import RunLog, Stat, finite, load_run, stat_diff
from picollm.study.spec import TREND_POINTS, tags_match

__all__ = ["Entry", "GroupResult", "RunLog", "Stat", "StudyResults", "finite", "load_results", "load_run",
           "stat_diff"]


# ---------------------------------------------------------------------------------------------
# entries and groups


@dataclass
class Entry:
    """One label of a group (a configuration), with its run per seed."""

    label: str
    tags: dict[str, Any]
    runs: list[RunLog]
    metrics: dict[str, Stat] = field(default_factory=dict)
    source_group: str = ""  # for entries of a selecting group: where the run comes from

    @property
    def finished(self) -> list[RunLog]:
        return [r for r in self.runs if r.finished]

    @property
    def family(self) -> str:
        return str(self.tags.get("family") or (self.runs[0].family if self.runs else "?"))

    def get(self, name: str) -> Stat:
        return self.metrics.get(name, Stat([]))

    @property
    def untrained(self) -> list[RunLog]:
        """Its finished runs that did not train (see the module doc)."""
        return [r for r in self.finished if r.did_not_train]

    @property
    def baseline(self) -> dict[str, Any] | None:
        return next((r.baseline for r in self.runs if r.baseline), None)

    def curve(self) -> tuple[list[float], list[float], list[float]]:
        """Mean validation curve over seeds: tokens, mean loss, std (0 with one seed), aligned by index."""
        curves = [r.curve for r in self.finished or self.runs if r.curve]
        if not curves:
            return [], [], []
        length = min(len(c) for c in curves)
        tokens = [statistics.fmean(c[i][0] for c in curves) for i in range(length)]
        losses = [[c[i][1] for c in curves] for i in range(length)]
        means = [statistics.fmean(v) for v in losses]
        stds = [statistics.stdev(v) if len(v) >= 2 else 0.0 for v in losses]
        return tokens, means, stds


@dataclass
class GroupResult:
    name: str
    title: str
    description: str
    show: list[str]
    entries: list[Entry]
    select: dict[str, Any] | None = None
    reference_loss: float | None = None
    reference_label: str | None = None


def roughness(curve: list[tuple[int, float]]) -> float | None:
    """Std of successive validation-loss differences over the second half of the run (by tokens)."""
    if len(curve) < 4:
        return None
    half = curve[-1][0] / 2
    tail = [loss for tokens, loss in curve if tokens >= half]
    diffs = [b - a for a, b in zip(tail, tail[1:])]
    if len(diffs) < 2:
        return None
    return statistics.stdev(diffs)


def diversity_score(report: dict[str, Any] | None, max_n: int = 5) -> float | None:
    if not report:
        return None
    values = [report.get(f"word_distinct_{n}") for n in range(1, max_n + 1)]
    values = [v for v in values if finite(v)]
    return statistics.fmean(values) if values else None


def run_metrics(run: RunLog, diversity_strategy: str | None) -> dict[str, Any]:
    """The per-run numbers (None where the logs lack them)."""
    s = run.summary or {}
    out: dict[str, Any] = {
        "params": s.get("num_parameters"),
        "params_ne": s.get("num_parameters_non_embedding"),
        "tokens": s.get("tokens_seen"),
        "wall": s.get("wall_time_s"),
        "tok_s": s.get("tokens_per_s"),
        "epochs": s.get("epochs"),
    }
    for split in SPLITS:
        part = s.get(split) or {}
        out[f"{split}_nll"] = part.get("nll")
        out[f"{split}_ppl"] = part.get("ppl")
        out[f"{split}_bpb"] = part.get("bpb")
    curve = run.curve
    out["final_val_loss"] = curve[-1][1] if curve else None
    out["lr"] = s.get("lr") if finite(s.get("lr")) else (run.config.get("train") or {}).get("lr")
    out["lr_at_edge"] = 1.0 if (s.get("lr_sweep") or {}).get("at_edge") else 0.0
    points = run.full_val
    for fraction in TREND_POINTS:
        out[f"val_nll@{fraction:g}"] = points.get(fraction)
    if run.baseline and finite(out["val_nll"]):
        bigram = run.baseline["models"][run.baseline["bigram"]]["val"]["nll"]
        out["margin_bigram"] = out["val_nll"] - bigram
    out["flops"] = run.flops_per_token * out["tokens"] if run.flops_per_token and finite(out["tokens"]) else None
    out["roughness"] = roughness(curve)
    diversity = (run.eval or {}).get("diversity") or {}
    for strategy, report in diversity.items():
        for key, value in report.items():
            out[f"{strategy}:{key}"] = value
        out[f"{strategy}:score"] = diversity_score(report)
    if diversity_strategy and diversity_strategy in diversity:
        out["diversity"] = diversity_score(diversity[diversity_strategy])
        for n in range(1, 6):
            out[f"distinct_{n}"] = diversity[diversity_strategy].get(f"word_distinct_{n}")
        out["repetition"] = diversity[diversity_strategy].get("repetition_4")
    return out


def aggregate(entry: Entry, diversity_strategy: str | None) -> None:
    per_run = [run_metrics(r, diversity_strategy) for r in entry.finished]
    keys = sorted({k for m in per_run for k in m})
    entry.metrics = {k: Stat.of([m.get(k) for m in per_run]) for k in keys}


def tokens_to_reference(group: GroupResult) -> None:
    """Set the group's reference loss (worst final validation loss) and each entry's tokens to reach it."""
    finals = [(e.get("final_val_loss").mean, e.label) for e in group.entries if e.get("final_val_loss")]
    if not finals:
        return
    group.reference_loss, group.reference_label = max(finals)
    for entry in group.entries:
        values = []
        for run in entry.finished:
            reached = next((tokens for tokens, loss in run.curve if loss <= group.reference_loss + 1e-12), None)
            if reached is not None:
                values.append(reached)
        entry.metrics["tokens_to_ref"] = Stat.of(values)


# ---------------------------------------------------------------------------------------------
# the study


@dataclass
class StudyResults:
    directory: Path
    record: dict[str, Any]
    groups: list[GroupResult]

    def group(self, name: str) -> GroupResult | None:
        return next((g for g in self.groups if g.name == name), None)

    @property
    def eval_settings(self) -> dict[str, Any]:
        return self.record.get("eval") or {}

    @property
    def diversity_strategy(self) -> str | None:
        return self.eval_settings.get("diversity_strategy")

    @property
    def baselines(self) -> dict[str, Any]:
        """Prepared data name -> picollm.baselines record (the unigram and bigram of that data)."""
        return self.record.get("baselines") or {}

    @property
    def seeds(self) -> int:
        return len(self.record.get("seeds") or []) or max((len(e.runs) for g in self.groups for e in g.entries),
                                                           default=1)

    def sweeps(self) -> list[dict[str, Any]]:
        """The lr sweeps of the runs, one per model configuration (its seeds share it), from the runs'
        summaries: {label, losses [[lr, val NLL or None]], chosen, at_edge, wall_time_s, ...} and the
        baselines of the data it ran on (`baseline`: a picollm.baselines record, or None)."""
        out: dict[str, dict[str, Any]] = {}
        for g in self.groups:
            for e in g.entries:
                for r in e.finished:
                    sweep = (r.summary or {}).get("lr_sweep")
                    if isinstance(sweep, dict) and sweep.get("losses") and sweep.get("dir") not in out:
                        out[sweep.get("dir")] = {**sweep, "label": e.label, "baseline": r.baseline}
        return list(out.values())

    def runs(self) -> list[RunLog]:
        seen: dict[Path, RunLog] = {}
        for g in self.groups:
            for e in g.entries:
                for r in e.runs:
                    seen.setdefault(r.directory.resolve(), r)
        return list(seen.values())


def read_study_record(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / rundir.STUDY
    record = rundir.read_json(path)
    if not isinstance(record, dict) or "groups" not in record:
        raise UserError(f"{path} is missing or not a study record; pass a directory written by `picollm study` "
                        "(or use `picollm compare RUN_DIR...` for loose runs)")
    return record


def load_results(directory: str | Path, record: dict[str, Any] | None = None) -> StudyResults:
    """Read study.json and every run it names; compute each group's numbers (selection groups last)."""
    directory = Path(directory)
    record = record if record is not None else read_study_record(directory)
    strategy = (record.get("eval") or {}).get("diversity_strategy")
    cache: dict[Path, RunLog] = {}
    baselines = record.get("baselines") or {}

    def at(rel: str) -> Path:
        return (directory / rel) if not Path(rel).is_absolute() else Path(rel)

    data_of = {at(r["dir"]).resolve(): r.get("data") for r in (record.get("runs") or {}).values() if "dir" in r}

    def run_at(rel: str) -> RunLog:
        path = at(rel)
        key = path.resolve()
        if key not in cache:
            cache[key] = load_run(path, baselines.get(data_of.get(key) or ""))
        return cache[key]

    groups: list[GroupResult] = []
    for g in record["groups"]:
        entries = [Entry(e["label"], dict(e.get("tags") or {}), [run_at(p) for p in e.get("runs", [])])
                   for e in g.get("entries", [])]
        for entry in entries:
            aggregate(entry, strategy)
        groups.append(GroupResult(g["name"], g.get("title") or g["name"], g.get("description", ""),
                                  list(g.get("show") or []), entries, g.get("select")))
    for group in groups:
        if group.select:
            group.entries = select_entries(groups, group.select)
    for group in groups:
        tokens_to_reference(group)
    return StudyResults(directory, record, groups)


def select_entries(groups: list[GroupResult], select: dict[str, Any]) -> list[Entry]:
    """The best entry (lowest mean loss) per value of `select.per` among matching entries of the groups."""
    by = {"val_loss": "val_nll", "test_loss": "test_nll"}.get(select.get("by", "val_loss"), "val_nll")
    per = select.get("per", "family")
    candidates: list[Entry] = []
    seen_runs: set[tuple[Path, ...]] = set()
    for g in groups:
        if g.name not in select.get("groups", []):
            continue
        for e in g.entries:
            key = tuple(r.directory.resolve() for r in e.runs)
            if key in seen_runs or not tags_match(e.tags, select.get("where") or {}):
                continue
            seen_runs.add(key)
            candidates.append(Entry(e.label, e.tags, e.runs, e.metrics, source_group=g.name))
    best: dict[str, Entry] = {}
    order: list[str] = []
    for e in candidates:
        value = e.get(by).mean
        if value is None:
            continue
        key = str(e.tags.get(per, e.family))
        if key not in best:
            order.append(key)
            best[key] = e
        elif value < best[key].get(by).mean:  # type: ignore[operator]
            best[key] = e
    return [best[k] for k in order]


def results_from_runs(directories: list[str | Path], diversity_strategy: str | None = None,
                      title: str = "Comparison") -> StudyResults:
    """`picollm compare`: loose run directories as one group; runs that differ only in train.seed are
    one entry (their seeds)."""
    logs = []
    for d in directories:
        path = Path(d)
        if not (path / rundir.CONFIG).is_file() and not (path / rundir.SUMMARY).is_file():
            raise UserError(f"{path} is not a run directory (no config.yaml or summary.json)")
        logs.append(load_run(path))
    entries: dict[str, Entry] = {}
    for log in logs:
        flat = {k: v for k, v in flatten_keys(log.config).items() if k not in ("out", "train.seed")}
        key = json.dumps(flat, sort_keys=True, default=str)
        if key not in entries:
            tags = {"family": log.family}
            entries[key] = Entry(log.directory.name, tags, [])
        entries[key].runs.append(log)
    if diversity_strategy is None:
        for log in logs:
            settings = (log.eval or {}).get("settings") or {}
            if settings.get("diversity_strategy"):
                diversity_strategy = settings["diversity_strategy"]
                break
        else:
            diversity_strategy = next(iter((logs[0].eval or {}).get("diversity") or {}), None) if logs else None
    for entry in entries.values():
        aggregate(entry, diversity_strategy)
    settings = next(((log.eval or {}).get("settings") for log in logs if (log.eval or {}).get("settings")), {})
    group = GroupResult("compare", title, f"{len(logs)} runs", ["curves", "results", "diversity", "samples",
                                                                "prompt_samples"], list(entries.values()))
    tokens_to_reference(group)
    record = {"title": title, "description": "", "groups": [], "eval": {**settings,
              "diversity_strategy": diversity_strategy}, "budget": None, "budget_changes": [], "seeds": []}
    return StudyResults(Path("."), record, [group])
