"""Running a study: resolve every run, train each distinct one once, evaluate it, record the study.

A study directory holds

- `study.json`: the groups, the run directories of each group's entries (one per seed), the budget and
  what it changed, the eval settings and the findings' tolerances: all `picollm report` needs besides the
  run logs;
- `runs/<label>-<id>/`: one directory per distinct run, where `id` hashes the run's resolved config
  (seed included) without the keys that do not change what is trained (output paths, threads, device,
  logging and checkpoint intervals). Groups that ask for the same run share its directory;
- `report/`: index.html and report.md with the plots.

Running the same command again skips finished runs (summary.json says "finished" and eval.json is there
with the same eval settings) and resumes interrupted ones from their last checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from picollm.config import DataConfig, RunConfig, from_dict, to_dict
from picollm.errors import UserError
from picollm.progress import progress_bar
from picollm.schema import flatten_keys
from picollm.study.spec import EvalSpec, PlannedRun, StudySpec, eval_settings, expand

STUDY_JSON = "study.json"
EVAL_JSON = "eval.json"
STUDY_FORMAT = 1

# keys that say how a run is carried out, not what is trained: left out of the run identity
NOT_IDENTITY = {
    "out", "train.threads", "train.device", "train.compile", "train.wandb", "train.wandb_project",
    "train.wandb_run_name", "train.push_to_hub", "train.ckpt_interval", "train.keep_last",
    "train.log_interval", "train.sample_prompt", "train.sample_tokens", "data.num_proc", "data.cache_dir",
}


@dataclass
class StudyRun:
    """One distinct run of the study (a directory), possibly shared by several groups."""

    run_id: str
    config: dict[str, Any]  # RunConfig layout, `out` set
    label: str  # the label of its first appearance
    seed: int
    tags: dict[str, Any]
    uses: list[tuple[str, str]] = field(default_factory=list)  # (group, label)

    @property
    def directory(self) -> Path:
        return Path(self.config["out"])


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


# ---------------------------------------------------------------------------------------------
# resolving runs


def run_identity(config: RunConfig) -> str:
    """12 hex digits of sha256 over the resolved config (model defaults filled in), seed included."""
    from picollm.models.registry import model_config_from_dict, model_config_to_dict

    data = to_dict(config)
    family, model_cfg = model_config_from_dict(data["model"])
    data["model"] = model_config_to_dict(family.name, model_cfg)
    flat = {k: v for k, v in flatten_keys(data).items() if k not in NOT_IDENTITY}
    blob = json.dumps(flat, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _data_key(data: dict[str, Any]) -> str:
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
    from picollm.data.prepare import prepare

    return prepare(data_cfg, progress=progress)


def _solve(run: PlannedRun, model: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """The model fields of a `match` block: the family sized to the target by the parameter solver."""
    from picollm.models.registry import get_family, preset_fields
    from picollm.models.sizing import count_parameters, solve

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


def _planned_steps(config: RunConfig, train_tokens: int) -> int:
    t = config.train
    tokens_per_step = t.batch_size * t.grad_accum * int(config.model.get("context_length", 256))
    if t.max_steps is not None:
        return t.max_steps
    if t.max_tokens is not None:
        return max(1, math.ceil(t.max_tokens / tokens_per_step))
    return max(1, math.ceil(t.epochs * train_tokens / tokens_per_step))


def planned_tokens(config: RunConfig, train_tokens: int) -> int:
    t = config.train
    return _planned_steps(config, train_tokens) * t.batch_size * t.grad_accum * int(config.model["context_length"])


def plan_study(spec: StudySpec, out: str | Path, budget: str | None = None, seeds: int = 1,
               only: list[str] | None = None, overrides: dict[str, Any] | None = None,
               grid: dict[str, list[Any]] | None = None, extend: dict[str, list[Any]] | None = None,
               progress: bool = True) -> StudyPlan:
    """Resolve every run of the study (preparing each distinct data config once) and its directory.

    `grid` replaces the values of a grid key wherever a block uses it (`--grid`); `extend` appends values
    to it (`--with-base` is `{"size": ["base"]}`).
    """
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
    planned = expand(spec, budget, seeds=seeds, only=only, cli=overrides)
    b = spec.budgets[budget]
    settings = eval_settings(spec, budget)
    prepared: dict[str, Any] = {}
    runs: dict[str, StudyRun] = {}
    groups: list[dict[str, Any]] = []
    existing = {p.name.rsplit("-", 1)[-1]: p for p in (out / "runs").glob("*-*") if p.is_dir()} \
        if (out / "runs").is_dir() else {}
    seed_list: list[int] = []
    for pg in planned:
        entries: dict[str, dict[str, Any]] = {}
        for run in pg.runs:
            data = run.config_dict()
            _absolute_data(data)
            data_cfg = from_dict(DataConfig, data.get("data", {}), prefix="data")
            key = _data_key(to_dict(data_cfg))
            if key not in prepared:
                prepared[key] = _prepare(data_cfg, progress)
            prep = prepared[key]
            model = dict(data.get("model") or {})
            model.setdefault("vocab_size", prep.tokenizer.vocab_size)  # the tokenizer's unless set
            if run.match is not None:
                model = _solve(run, model, int(model["vocab_size"]))
            data["model"] = model
            data["out"] = "."
            config = from_dict(RunConfig, data)
            if b.evals_per_run and "train.eval_interval" not in run.explicit:
                steps = _planned_steps(config, prep.num_tokens("train"))
                config.train.eval_interval = max(1, steps // b.evals_per_run)
            run_id = run_identity(config)
            if run_id not in runs:
                directory = existing.get(run_id, out / "runs" / f"{_slug(run.label)}-{run_id}")
                config.out = str(directory)
                runs[run_id] = StudyRun(run_id, to_dict(config), run.label, run.seed, dict(run.tags))
            runs[run_id].uses.append((pg.spec.name, run.label))
            if run.seed not in seed_list:
                seed_list.append(run.seed)
            entry = entries.setdefault(run.label, {"label": run.label, "tags": run.tags, "runs": []})
            entry["runs"].append(_rel(runs[run_id].directory, out))
        g = pg.spec
        groups.append({
            "name": g.name, "title": g.title or g.name, "description": g.description, "show": list(g.show),
            "select": to_dict(g.select) if g.select else None, "entries": list(entries.values()),
        })
    return StudyPlan(spec, budget, seed_list, out, groups, runs, settings,
                     budget_changes(spec, budget), prepared)


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:60] or "run"


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(os.path.relpath(path, root)))
    except ValueError:
        return str(path)


def budget_changes(spec: StudySpec, budget: str) -> list[dict[str, Any]]:
    """What `budget` changes relative to the study's base recipe: one row per key (and per rule)."""
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
        "eval": to_dict(plan.eval),
        "findings": to_dict(spec.findings),
        "groups": plan.groups,
        "runs": {rid: {"dir": _rel(r.directory, plan.out), "label": r.label, "seed": r.seed, "tags": r.tags,
                       "groups": sorted({g for g, _ in r.uses})} for rid, r in plan.runs.items()},
    }


def write_study_json(plan: StudyPlan) -> Path:
    from picollm.fileio import write_json_atomic

    path = plan.out / STUDY_JSON
    write_json_atomic(path, study_record(plan))
    return path


# ---------------------------------------------------------------------------------------------
# per-run evaluation: eval.json


def eval_record_settings(settings: EvalSpec) -> dict[str, Any]:
    return to_dict(settings)


def eval_is_current(directory: Path, settings: EvalSpec) -> bool:
    path = Path(directory) / EVAL_JSON
    if not path.is_file():
        return False
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError):
        return False
    return record.get("settings") == eval_record_settings(settings)


def evaluate_run(directory: str | Path, settings: EvalSpec, prepared: Any = None,
                 device: str = "cpu") -> dict[str, Any]:
    """Generate from a finished run and write its eval.json: diversity and samples per strategy on
    prompts from the validation split, and the study prompt's continuations."""
    import picollm
    from picollm.evaluation import diversity_eval, prepared_for_run, story_prompts
    from picollm.fileio import write_json_atomic
    from picollm.generation import generate

    directory = Path(directory)
    model = picollm.load(str(directory), device=device)
    data = prepared if prepared is not None else prepared_for_run(directory)
    tokens = data.tokens("val")
    offsets = data.story_offsets("val")
    tok = model.tokenizer
    starts = list(offsets) + [len(tokens)]
    usable = sum(1 for a, b in zip(starts[:-1], starts[1:]) if b - a >= settings.prompt_tokens + 2)
    if usable == 0:
        raise UserError(f"{directory}: no validation story is longer than {settings.prompt_tokens} tokens")
    prompts = story_prompts(tokens, offsets, min(settings.prompts, usable), settings.prompt_tokens)
    results = diversity_eval(model, prompts, settings.strategies, max_new_tokens=settings.max_new_tokens,
                             seed=settings.seed, return_texts=True)
    diversity = {name: {k: v for k, v in rep.items() if k != "continuations"} for name, rep in results.items()}
    samples = {name: list(rep.get("continuations", [])) for name, rep in results.items()}
    prompt_samples = {}
    for name, kwargs in settings.strategies.items():
        n = 1 if kwargs.get("strategy") == "greedy" else settings.prompt_samples
        prompt_samples[name] = generate(model, settings.prompt, max_new_tokens=settings.max_new_tokens,
                                        num_samples=n, seed=settings.seed, **kwargs)
    eot = getattr(tok, "eot_id", None)
    record = {
        "settings": eval_record_settings(settings),
        "prompts": [tok.decode([t for t in p if t != eot]) for p in prompts],
        "diversity": diversity,
        "samples": samples,
        "study_prompt": {"prompt": settings.prompt, "samples": prompt_samples},
    }
    write_json_atomic(directory / EVAL_JSON, record)
    return record


def run_is_finished(directory: Path) -> bool:
    from picollm.rundir import read_summary

    summary = read_summary(Path(directory))
    return bool(summary) and summary.get("status") == "finished"


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


# ---------------------------------------------------------------------------------------------
# the progress display


def _estimate_seconds(config: dict[str, Any], train_tokens: int) -> float:
    """A rough wall time for one run on this machine: per-token overhead + FLOPs at a CPU-ish rate.
    Only the overall bar uses it; its ETA then follows the measured pace."""
    from picollm.models.registry import build_model

    cfg = from_dict(RunConfig, config)
    import torch

    with torch.device("meta"):
        model = build_model(cfg.model)
    flops = model.flops_per_token(int(cfg.model["context_length"]))
    tokens = planned_tokens(cfg, train_tokens)
    return tokens * (4e-5 + flops / 6e10) * 1.15 + 2.0  # + evaluation and generation


class Progress:
    """A line per run started and finished, and one bar for the whole study with its ETA."""

    def __init__(self, plan: StudyPlan, todo: list[StudyRun], enabled: bool) -> None:
        self.enabled = enabled
        self.todo = todo
        self.err = sys.stderr  # the real one: the trainer's lines are redirected through `write`
        self.weights: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        for run in todo:
            prep = _prepared_for(plan, run)
            cfg = from_dict(RunConfig, run.config)
            self.tokens[run.run_id] = planned_tokens(cfg, prep.num_tokens("train"))
            self.weights[run.run_id] = _estimate_seconds(run.config, prep.num_tokens("train"))
        self.active: dict[str, StudyRun] = {}
        self.done_weight = 0.0
        self.done_count = 0
        self.lock = threading.Lock()
        self.bar = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if enabled and todo:
            self.bar = progress_bar(round(sum(self.weights.values()), 1), "study", unit="", file=self.err,
                                    bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed} elapsed, ETA {remaining}")
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.err)
        else:
            print(text, file=self.err, flush=True)

    def started(self, run: StudyRun, index: int, total: int) -> None:
        with self.lock:
            self.active[run.run_id] = run
        groups = ", ".join(sorted({g for g, _ in run.uses}))
        self.write(f"[study] start {index}/{total} {run.label} ({run.directory.name}; {groups})")

    def finished(self, run: StudyRun, index: int, total: int, summary: dict | None, seconds: float,
                 error: str | None = None) -> None:
        with self.lock:
            self.active.pop(run.run_id, None)
            self.done_weight += self.weights.get(run.run_id, 0.0)
            self.done_count += 1
        if error:
            self.write(f"[study] FAILED {index}/{total} {run.label} after {seconds:.0f}s: {error}")
        elif summary and summary.get("status") == "finished":
            test = (summary.get("test") or {}).get("nll")
            val = (summary.get("val") or {}).get("nll")
            self.write(f"[study] done  {index}/{total} {run.label} in {seconds:.0f}s: "
                       f"{summary.get('num_parameters', 0):,} parameters, {summary.get('tokens_seen', 0):,} tokens, "
                       f"val nll {_num(val)}, test nll {_num(test)}")
        else:
            self.write(f"[study] stopped {index}/{total} {run.label} after {seconds:.0f}s "
                       f"({(summary or {}).get('status', 'unknown')}); run the study again to resume it")
        self._refresh()

    def _fraction(self, run: StudyRun) -> float:
        path = run.directory / "metrics.jsonl"
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 4096))
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return 0.0
        for line in reversed(lines):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            return min(1.0, row.get("tokens", 0) / max(1, self.tokens.get(run.run_id, 1)))
        return 0.0

    def _refresh(self) -> None:
        if self.bar is None:
            return
        with self.lock:
            active = list(self.active.values())
            value = self.done_weight + sum(self.weights.get(r.run_id, 0.0) * self._fraction(r) * 0.9
                                           for r in active)
        self.bar.n = round(min(value, self.bar.total), 1)
        names = ", ".join(r.label for r in active)
        self.bar.set_description_str(f"study {self.done_count}/{len(self.todo)} runs" + (f" [{names[:50]}]" if names
                                                                                       else ""), refresh=False)
        self.bar.refresh()

    def _poll(self) -> None:
        while not self._stop.wait(1.0):
            self._refresh()

    def lines(self) -> Any:
        """A context in which the trainer's own stderr lines are printed above the bar, not through it."""
        import contextlib

        if self.bar is None:
            return contextlib.nullcontext()
        return contextlib.redirect_stderr(_LineWriter(self.write))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.bar is not None:
            self._refresh()
            self.bar.close()


class _LineWriter:
    """A file-like object that hands complete lines to `emit`."""

    def __init__(self, emit: Any) -> None:
        self.emit = emit
        self.buffer = ""

    def write(self, text: str) -> int:
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            if line.strip():
                self.emit(line)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _num(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "-"


def _prepared_for(plan: StudyPlan, run: StudyRun) -> Any:
    key = _data_key(run.config["data"])
    if key not in plan.prepared:
        plan.prepared[key] = _prepare(from_dict(DataConfig, run.config["data"], prefix="data"), False)
    return plan.prepared[key]


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


def _devices(jobs: int) -> list[str | None]:
    """Per job slot: a GPU each where there are GPUs, else None (CPU threads are split instead)."""
    count = _gpu_count()
    if count >= 1 and jobs >= 1:
        return [f"cuda:{i % count}" for i in range(jobs)]
    return [None] * jobs


def run_plan(plan: StudyPlan, jobs: int = 1, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate every run of the plan that is not finished yet; returns counts and failures."""
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    all_runs = list(plan.runs.values())
    todo = [r for r in all_runs if not (run_is_finished(r.directory) and eval_is_current(r.directory, plan.eval))]
    skipped = len(all_runs) - len(todo)
    display = Progress(plan, todo, enabled=progress)
    if skipped:
        display.write(f"[study] {skipped} of {len(all_runs)} runs are finished already and are reused")
    settings = to_dict(plan.eval)
    cores = os.cpu_count() or 1
    devices = _devices(jobs)
    failures: dict[str, str] = {}
    interrupted = False
    total = len(todo)
    if jobs == 1 or len(todo) <= 1:
        for i, run in enumerate(todo, 1):
            config = _with_slot(run.config, devices[0], None)
            display.started(run, i, total)
            start = time.perf_counter()
            try:
                with display.lines():
                    summary = train_and_evaluate(config, settings, prepared=_prepared_for(plan, run))
            except UserError as exc:
                failures[run.run_id] = str(exc)
                display.finished(run, i, total, None, time.perf_counter() - start, error=str(exc))
                continue
            display.finished(run, i, total, summary, time.perf_counter() - start)
            if summary.get("status") not in ("finished",):
                interrupted = True
                break
    else:
        interrupted = _run_parallel(plan, todo, jobs, devices, cores, settings, display, failures)
    display.close()
    return {"runs": len(all_runs), "reused": skipped, "trained": total, "failures": failures,
            "interrupted": interrupted}


def _with_slot(config: dict[str, Any], device: str | None, threads: int | None) -> dict[str, Any]:
    config = copy.deepcopy(config)
    train = config.setdefault("train", {})
    if device is not None and train.get("device", "auto") == "auto":
        train["device"] = device
    if threads is not None and train.get("threads") is None:
        train["threads"] = threads
    return config


def _run_parallel(plan: StudyPlan, todo: list[StudyRun], jobs: int, devices: list[str | None], cores: int,
                  settings: dict[str, Any], display: Progress, failures: dict[str, str]) -> bool:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = None if devices[0] is not None else max(1, cores // jobs)
    pending = list(enumerate(todo, 1))
    free = list(range(jobs))
    running: dict[Any, tuple[int, int, StudyRun, float]] = {}
    interrupted = False
    total = len(todo)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        while pending or running:
            while pending and free and not interrupted:
                slot = free.pop(0)
                index, run = pending.pop(0)
                config = _with_slot(run.config, devices[slot], threads)
                display.started(run, index, total)
                future = pool.submit(train_and_evaluate, config, settings, threads, None,
                                     str(run.directory / "train.log"))
                running[future] = (slot, index, run, time.perf_counter())
            if not running:
                break
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                slot, index, run, start = running.pop(future)
                free.append(slot)
                seconds = time.perf_counter() - start
                try:
                    summary = future.result()
                except UserError as exc:
                    failures[run.run_id] = str(exc)
                    display.finished(run, index, total, None, seconds, error=str(exc))
                    continue
                display.finished(run, index, total, summary, seconds)
                if summary.get("status") != "finished":
                    interrupted = True
    return interrupted


# ---------------------------------------------------------------------------------------------
# dry run


def dry_run_rows(plan: StudyPlan, jobs: int = 1) -> list[dict[str, Any]]:
    """Per distinct run: parameters, tokens, FLOPs and the time estimated from a few measured steps."""
    import torch

    from picollm.training.trainer import dry_run

    cores = os.cpu_count() or 1
    devices = _devices(jobs)
    threads = None if devices[0] is not None or jobs == 1 else max(1, cores // jobs)
    before = torch.get_num_threads()
    rows = []
    try:
        for run in plan.runs.values():
            config = _with_slot(run.config, devices[0], threads)
            info = dry_run(config)
            info = {**info, "run": run.label, "dir": run.directory.name,
                    "groups": sorted({g for g, _ in run.uses}), "finished": run_is_finished(run.directory)}
            rows.append(info)
    finally:
        torch.set_num_threads(before)
    return rows


def format_dry_run(rows: list[dict[str, Any]], jobs: int = 1) -> str:
    head = f"{'run':34s} {'groups':22s} {'params':>10s} {'non-emb':>10s} {'tokens':>11s} {'FLOPs':>9s} " \
           f"{'tok/s':>8s} {'est.':>8s}  status"
    lines = [head, "-" * len(head)]
    total = 0.0
    for r in rows:
        measured = r["est_seconds"] is not None  # not: too large for the memory here (r["not_measured"])
        est = float(r["est_seconds"]) if measured else 0.0
        if not r["finished"]:
            total += est
        speed = f"{r['tokens_per_s']:>8,.0f} {_duration(est):>8s}" if measured else f"{'n/a':>8s} {'n/a':>8s}"
        lines.append(f"{r['run'][:34]:34s} {','.join(r['groups'])[:22]:22s} {r['num_parameters']:>10,} "
                     f"{r['num_parameters_non_embedding']:>10,} {r['tokens']:>11,} {r['flops']:>9.2e} "
                     f"{speed}  {'finished' if r['finished'] else 'to train'}")
    lines.append("-" * len(head))
    todo = sum(1 for r in rows if not r["finished"])
    lines.append(f"{len(rows)} distinct runs, {len(rows) - todo} finished; {todo} to train: {_duration(total)} of "
                 f"training" + (f", about {_duration(total / jobs)} with {jobs} at a time" if jobs > 1 else "")
                 + ", plus evaluation and generation after each run")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
