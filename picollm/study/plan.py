"""Planning a study: every run's resolved config and directory, the lr sweeps, and study.json.

A study directory holds

- `study.json`: the groups, the run directories of each group's entries (one per seed), the budget and
  what it changed, the lr sweeps, the baselines, the eval settings and the findings' tolerances: all
  `picollm report` needs besides the run logs;
- `runs/<label>-<id>/`: one directory per distinct run, where `id` hashes the run's resolved config
  (seed included) without the keys that do not change what is trained (output paths, threads, device,
  logging and checkpoint intervals). Groups that ask for the same run share its directory;
- `lr_sweep/<label>-<id>/lr-<rate>/`: with lr auto, the sweep runs of one model configuration, shared by
  its seeds (`id` is the first seed's run id);
- `report/`: index.html and report.md with the plots.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from picollm import rundir
from picollm.baselines import cached_baselines
from picollm.config import DataConfig, RunConfig, from_dict, to_dict
from picollm.data.prepare import prepare
from picollm.fileio import write_json_atomic
from picollm.models.registry import get_family, model_config_from_dict, model_config_to_dict, preset_fields
from picollm.models.sizing import count_parameters, solve
from picollm.schema import flatten_keys
from picollm.study.spec import TREND_POINTS, EvalSpec, PlannedRun, StudySpec, eval_settings, expand
from picollm.training.lr_search import RULE, planned_steps
from picollm.training.setup import plan_for

STUDY_FORMAT = 2

# keys that say how a run is carried out, not what is trained: left out of the run identity
NOT_IDENTITY = {
    "out", "train.threads", "train.device", "train.compile", "train.wandb", "train.wandb_project",
    "train.wandb_run_name", "train.push_to_hub", "train.ckpt_interval", "train.keep_last",
    "train.log_interval", "train.sample_prompt", "train.sample_tokens", "data.num_proc", "data.cache_dir",
    "train.lr_sweep_dir", "train.lr_found", "train.full_val_at", "train.final_splits",
}
# the sweep's settings: part of the identity of an lr auto run only (a fixed rate ignores them)
SWEEP_KEYS = ("train.lr_grid", "train.lr_sweep_fraction", "train.lr_sweep_seed")


@dataclass
class StudyRun:
    """One distinct run of the study (a directory), possibly shared by several groups."""

    run_id: str
    config: dict[str, Any]  # RunConfig layout, `out` set
    label: str  # the label of its first appearance
    seed: int
    tags: dict[str, Any]
    uses: list[tuple[str, str]] = field(default_factory=list)  # (group, label)
    sweep: str | None = None  # the key of its lr sweep (lr auto), else None

    @property
    def directory(self) -> Path:
        return Path(self.config["out"])


@dataclass
class Sweep:
    """The lr sweep of one model configuration: a run per rate, shared by the seeds of that model."""

    key: str  # the directory name, <label>-<first seed's run id>
    config: dict[str, Any]  # the first seed's run config (lr auto, lr_sweep_dir = directory)
    label: str
    total_steps: int  # the run's steps: a sweep run has lr_sweep_fraction of them (more if none trains)
    runs: list[str] = field(default_factory=list)  # ids of the runs that use it

    @property
    def directory(self) -> Path:
        return Path(self.config["train"]["lr_sweep_dir"])

    @property
    def grid(self) -> list[float]:
        return sorted(self.config["train"]["lr_grid"])

    @property
    def fraction(self) -> float:
        return float(self.config["train"]["lr_sweep_fraction"])


@dataclass
class StudyPlan:
    spec: StudySpec
    budget: str
    seeds: list[int]
    out: Path
    groups: list[dict[str, Any]]  # as written to study.json
    runs: dict[str, StudyRun]  # run_id -> run, in study order
    eval: EvalSpec
    budget_changes: list[dict[str, Any]]
    prepared: dict[str, Any] = field(default_factory=dict)  # data key -> PreparedData
    sweeps: dict[str, Sweep] = field(default_factory=dict)
    tune: bool = False  # whether the budget (or --tune) sets train.lr auto
    no_tune: bool = False  # --no-tune: nothing is tuned, whatever asked for auto
    untuned: dict[str, float] = field(default_factory=dict)  # --no-tune: label -> the fixed rate of a run that
    # asked for train.lr auto itself (study file or command line), not merely by the budget's `tune`
    baselines: dict[str, Any] = field(default_factory=dict)  # prepared data name -> picollm.baselines record


# ---------------------------------------------------------------------------------------------
# resolving runs


def run_identity(config: RunConfig) -> str:
    """12 hex digits of sha256 over the resolved config (model defaults filled in), seed included. An lr
    auto run hashes `auto` with the sweep's grid, fraction, seed and rule (not the rate it will choose),
    so its id is known before anything trains; a fixed rate leaves the sweep settings out."""
    data = to_dict(config)
    family, model_cfg = model_config_from_dict(data["model"])
    data["model"] = model_config_to_dict(family.name, model_cfg)
    flat = {k: v for k, v in flatten_keys(data).items() if k not in NOT_IDENTITY}
    if flat.get("train.lr") == "auto":
        flat["train.lr_rule"] = RULE
    else:
        flat = {k: v for k, v in flat.items() if k not in SWEEP_KEYS}
    blob = json.dumps(flat, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def data_key(data: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in data.items() if k not in ("num_proc",)}, sort_keys=True, default=str)


def _absolute_data(config: dict[str, Any]) -> None:
    """A local data path as an absolute path, so the identity does not depend on the working directory."""
    data = config.setdefault("data", {})
    source = data.get("data")
    if isinstance(source, str) and not source.startswith("hf:"):
        path = Path(source).expanduser()
        if path.exists():
            data["data"] = str(path.resolve())


def _prepare(data_cfg: DataConfig, progress: bool) -> Any:
    return prepare(data_cfg, progress=progress)


def prepared_for(plan: StudyPlan, config: dict[str, Any]) -> Any:
    """The prepared data of a run config (prepared once per study)."""
    key = data_key(config["data"])
    if key not in plan.prepared:
        plan.prepared[key] = _prepare(from_dict(DataConfig, config["data"], prefix="data"), False)
    return plan.prepared[key]


def _solve(run: PlannedRun, model: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """The model fields of a `match` block: the family sized to the target by the parameter solver."""
    assert run.match is not None
    family = get_family(model["family"])
    target = run.match.target
    context = model.get("context_length")
    if isinstance(target, str):
        ref = preset_fields(target)
        if context is not None:
            ref["context_length"] = context
        target = count_parameters({**ref, "vocab_size": vocab_size}, non_embedding=run.match.non_embedding)
    owned = set(family.scale(1)) if family.scale else set()
    base = {k: v for k, v in model.items() if k not in owned and k not in ("family", "vocab_size")}
    solved = solve(family.name, int(target), vocab_size=vocab_size, non_embedding=run.match.non_embedding,
                   base=base)
    return {**model, **solved, "vocab_size": vocab_size}


def planned_tokens(config: RunConfig, train_tokens: int) -> int:
    """The tokens a run trains on, as the trainer plans it (steps x tokens per step)."""
    plan = plan_for(config, train_tokens)
    return plan.total_steps * plan.tokens_per_step


def _existing(root: Path) -> dict[str, Path]:
    """Directories <label>-<id> under `root` by id: a renamed label keeps its run."""
    if not root.is_dir():
        return {}
    return {p.name.rsplit("-", 1)[-1]: p for p in root.glob("*-*") if p.is_dir()}


def plan_study(spec: StudySpec, out: str | Path, budget: str | None = None, seeds: int | None = None,
               only: list[str] | None = None, overrides: dict[str, Any] | None = None,
               grid: dict[str, list[Any]] | None = None, extend: dict[str, list[Any]] | None = None,
               progress: bool = True, tune: bool | None = None) -> StudyPlan:
    """Resolve every run of the study (preparing each distinct data config once) and its directory.

    `seeds` and `tune` default to the budget's; `tune=False` is --no-tune: no sweep at all, and a run that
    asks for train.lr auto trains at the fixed rate (`spec.fixed_lr`). `grid` replaces the values of a grid
    key wherever a block uses it (`--grid`); `extend` appends values to it (`--with-base` is
    `{"size": ["base"]}`)."""
    budget = budget or spec.default_budget
    out = Path(out)
    spec = copy.deepcopy(spec)
    for group in spec.groups.values():
        for block in group.runs:
            for key, values in (grid or {}).items():
                if key in block.grid:
                    block.grid[key] = list(values)
            for key, values in (extend or {}).items():
                if key in block.grid:
                    block.grid[key] = block.grid[key] + [v for v in values if v not in block.grid[key]]
    b = spec.budgets.get(budget)
    tuning = (b.tune if b else False) if tune is None else tune
    planned = expand(spec, budget, seeds=seeds, only=only, cli=overrides, tune=tune)
    b = spec.budgets[budget]
    settings = eval_settings(spec, budget)
    plan = StudyPlan(spec, budget, [], out, [], {}, settings, budget_changes(spec, budget, no_tune=tune is False),
                     tune=tuning, no_tune=tune is False)
    existing = _existing(out / "runs")
    existing_sweeps = _existing(out / rundir.SWEEP_DIR)
    first_seed = min((r.seed for pg in planned for r in pg.runs), default=0)
    for pg in planned:
        entries: dict[str, dict[str, Any]] = {}
        for run in pg.runs:
            data = run.config_dict()
            _absolute_data(data)
            data_cfg = from_dict(DataConfig, data.get("data", {}), prefix="data")
            key = data_key(to_dict(data_cfg))
            if key not in plan.prepared:
                plan.prepared[key] = _prepare(data_cfg, progress)
            prep = plan.prepared[key]
            model = dict(data.get("model") or {})
            model.setdefault("vocab_size", prep.tokenizer.vocab_size)  # the tokenizer's unless set
            if run.match is not None:
                model = _solve(run, model, int(model["vocab_size"]))
            data["model"] = model
            data["out"] = "."
            if "train.full_val_at" not in run.overrides:
                data.setdefault("train", {})["full_val_at"] = list(TREND_POINTS)
            config = from_dict(RunConfig, data)
            if b.evals_per_run and "train.eval_interval" not in run.explicit:
                steps = planned_steps(config, prep.num_tokens("train"))
                config.train.eval_interval = max(1, steps // b.evals_per_run)
            sweep_key = None
            if run.untuned:
                plan.untuned[run.label] = float(config.train.lr)
            if config.train.lr == "auto":
                config.train.lr_sweep_seed = first_seed
                first = copy.deepcopy(config)
                first.train.seed = first_seed
                first_id = run_identity(first)
                known = next((s.directory for s in plan.sweeps.values() if s.key.endswith(f"-{first_id}")), None)
                sweep_dir = known or existing_sweeps.get(first_id,
                                                         out / rundir.SWEEP_DIR / f"{_slug(run.label)}-{first_id}")
                config.train.lr_sweep_dir = str(sweep_dir)
                sweep_key = sweep_dir.name
                if sweep_key not in plan.sweeps:
                    first.train.lr_sweep_dir = str(sweep_dir)
                    first.out = str(sweep_dir)
                    plan.sweeps[sweep_key] = Sweep(sweep_key, to_dict(first), run.label,
                                                   planned_steps(first, prep.num_tokens("train")))
            run_id = run_identity(config)
            if run_id not in plan.runs:
                directory = existing.get(run_id, out / "runs" / f"{_slug(run.label)}-{run_id}")
                config.out = str(directory)
                plan.runs[run_id] = StudyRun(run_id, to_dict(config), run.label, run.seed, dict(run.tags),
                                             sweep=sweep_key)
                if sweep_key:
                    plan.sweeps[sweep_key].runs.append(run_id)
            plan.runs[run_id].uses.append((pg.spec.name, run.label))
            if run.seed not in plan.seeds:
                plan.seeds.append(run.seed)
            entry = entries.setdefault(run.label, {"label": run.label, "tags": run.tags, "runs": []})
            entry["runs"].append(_rel(plan.runs[run_id].directory, out))
        g = pg.spec
        plan.groups.append({
            "name": g.name, "title": g.title or g.name, "description": g.description, "show": list(g.show),
            "select": to_dict(g.select) if g.select else None, "entries": list(entries.values()),
        })
    return plan


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:60] or "run"


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(os.path.relpath(path, root)))
    except ValueError:
        return str(path)


def budget_changes(spec: StudySpec, budget: str, no_tune: bool = False) -> list[dict[str, Any]]:
    """What `budget` changes relative to the study's base recipe: one row per key (and per rule);
    `no_tune`: as run with --no-tune (the budget's fixed rate, no sweep)."""
    b = spec.budgets[budget]
    defaults = flatten_keys(to_dict(RunConfig()))
    rows = []
    for key, value in b.set.items():
        before = spec.base.get(key, defaults.get(key, "(preset)" if key.startswith("model.") else None))
        if before != value:
            rows.append({"key": key, "base": before, "budget": value, "where": "all runs"})
    for rule in b.rules:
        where = ", ".join(f"{k}={v}" for k, v in rule.where.items())
        for key, value in rule.set.items():
            before = b.set.get(key, spec.base.get(key, defaults.get(key)))
            rows.append({"key": key, "base": before, "budget": value, "where": f"runs with {where}"})
    if b.tune and no_tune:  # the fixed rate, and why it is not the sweep's
        for row in rows:
            if row["key"] == "train.lr":
                row["where"] = f"{row['where']} (--no-tune: no lr sweep)"
    elif b.tune:  # the fixed rate applies with --no-tune only
        for row in rows:
            if row["key"] == "train.lr":
                row["budget"] = f"auto: an lr sweep per model (--no-tune: {row['budget']:g})"
        if not any(row["key"] == "train.lr" for row in rows):
            rows.append({"key": "train.lr", "base": spec.base.get("train.lr", defaults["train.lr"]),
                         "budget": "auto: an lr sweep per model", "where": "all runs"})
    if b.seeds != 1:
        rows.append({"key": "seeds", "base": 1, "budget": b.seeds, "where": "all runs (--seeds K)"})
    if b.evals_per_run:
        rows.append({"key": "train.eval_interval", "base": spec.base.get("train.eval_interval",
                                                                          defaults["train.eval_interval"]),
                     "budget": f"steps / {b.evals_per_run}", "where": "all runs"})
    base_eval = to_dict(spec.eval)
    for key, value in b.eval.items():
        if base_eval.get(key) != value:
            rows.append({"key": f"eval.{key}", "base": base_eval.get(key), "budget": value, "where": "all runs"})
    return rows


# ---------------------------------------------------------------------------------------------
# study.json


def study_record(plan: StudyPlan) -> dict[str, Any]:
    spec = plan.spec
    return {
        "format": STUDY_FORMAT,
        "title": spec.title,
        "description": spec.description,
        "source": spec.source,
        "budget": plan.budget,
        "budget_description": spec.budgets[plan.budget].description,
        "budget_changes": plan.budget_changes,
        "seeds": plan.seeds,
        "tune": plan.tune,
        "no_tune": plan.no_tune,
        "untuned": plan.untuned,
        "eval": to_dict(plan.eval),
        "findings": to_dict(spec.findings),
        "groups": plan.groups,
        "runs": {rid: {"dir": _rel(r.directory, plan.out), "label": r.label, "seed": r.seed, "tags": r.tags,
                       "groups": sorted({g for g, _ in r.uses}), "sweep": r.sweep,
                       "data": _data_name(plan, r.config)} for rid, r in plan.runs.items()},
        "sweeps": {k: {"dir": _rel(s.directory, plan.out), "label": s.label, "grid": s.grid,
                       "total_steps": s.total_steps, "fraction": s.fraction, "runs": s.runs}
                   for k, s in plan.sweeps.items()},
        "baselines": plan.baselines,
    }


def _data_name(plan: StudyPlan, config: dict[str, Any]) -> str | None:
    prep = plan.prepared.get(data_key(config["data"]))
    directory = getattr(prep, "directory", None)
    return directory.name if directory is not None else None


def write_study_json(plan: StudyPlan) -> Path:
    path = plan.out / rundir.STUDY
    write_json_atomic(path, study_record(plan))
    return path


def add_baselines(plan: StudyPlan) -> None:
    """The unigram and bigram baselines of each prepared data (picollm.baselines), computed once and kept
    in study.json, so a report rebuilds without the data."""
    for prep in plan.prepared.values():
        plan.baselines[prep.directory.name] = cached_baselines(prep)
