"""The models a server offers: found from the command line's sources, loaded once, named uniquely.

A source is a study directory (it holds study.json: every finished run it lists), a run directory
(config.yaml: its final/ model, else its best/), a checkpoint directory (config.json) or a Hugging Face
repo id (user/name). Loading only reads: nothing is created in a run directory and no lock is taken or
waited for, so a run that is still training can be served (its best/ until final/ exists). Best/ is
replaced by the trainer with two renames, so a load that reads across a swap fails its checksum and is
tried again.

Ids are what requests name, never paths: a study run's label, a run's directory name, a checkpoint's
directory name or a hub repo's name; a second model with the same name gets `-2`, the next `-3`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from picollm import rundir
from picollm.checkpoint import load, load_model
from picollm.errors import UserError
from picollm.hub import is_repo_id
from picollm.models.registry import get_family, model_config_to_dict

LOAD_TRIES = 3


@dataclass
class Study:
    """A study directory given on the command line; its report is served at /studies/<index>/report."""

    index: int
    title: str
    directory: Path

    @property
    def report(self) -> Path | None:
        path = self.directory / rundir.REPORT_DIR / rundir.REPORT_HTML
        return path if path.is_file() else None


@dataclass
class ServedModel:
    """A loaded model, shared by every request, and what the models table shows about it."""

    id: str
    model: Any  # a picollm LanguageModel, in eval mode
    source: str  # where it was loaded from (shown to the user, never taken from a request)
    study: Study | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def context_length(self) -> int:
        return int(self.model.config.context_length)


@dataclass
class Catalog:
    models: dict[str, ServedModel]
    studies: list[Study]
    skipped: list[str] = field(default_factory=list)  # "what: why" for runs a study lists but that were not loaded

    def get(self, model_id: str) -> ServedModel | None:
        return self.models.get(model_id)


# ---------------------------------------------------------------------------------------------
# reading what a directory is


def run_checkpoint(run_dir: Path) -> Path:
    """final/ of a run, else best/ (a run still training); never a periodic checkpoint, which the
    trainer deletes as it goes. A damaged final/ or best/ is named, never silently replaced."""
    if (run_dir / rundir.FINAL).exists() or (run_dir / rundir.BEST).exists():
        return rundir.model_dir(run_dir)
    raise UserError(f"run {run_dir} has no final/ or best/ checkpoint yet; serve it once its first evaluation "
                    "has written best/")


def _load_read_only(checkpoint: Path, device: Any) -> Any:
    for attempt in range(LOAD_TRIES):
        try:
            return load_model(checkpoint, device=device)
        except UserError:
            if attempt == LOAD_TRIES - 1:
                raise
            time.sleep(0.2)  # best/ may have been swapped while it was read: read it again


def _size(family: str, model_config: dict[str, Any]) -> str | None:
    """The preset whose fields the model's config has (e.g. 'pico'), or None."""
    try:
        presets = get_family(family).presets
    except UserError:
        return None
    for name, fields in presets.items():
        if all(model_config.get(k) == v for k, v in fields.items()):
            return name
    return None


def model_info(model: Any, run_dir: Path | None, tags: dict[str, Any] | None = None) -> dict[str, Any]:
    """The models table's row: family, size, parameters, tokenizer and the run's final metrics."""
    config = model_config_to_dict(model.family, model.config)
    summary = rundir.read_json(run_dir / rundir.SUMMARY) if run_dir is not None else None
    summary = summary or {}
    tags = tags or {}

    def metric(split: str, key: str) -> float | None:
        value = (summary.get(split) or {}).get(key) if isinstance(summary.get(split), dict) else None
        return float(value) if isinstance(value, (int, float)) else None

    return {
        "family": model.family,
        "size": tags.get("size") or _size(model.family, config),
        "parameters": model.num_parameters(),
        "non_embedding_parameters": model.num_parameters(non_embedding=True),
        "tokenizer": getattr(model.tokenizer, "name", None),
        "vocab_size": int(model.config.vocab_size),
        "context_length": int(model.config.context_length),
        "status": summary.get("status"),
        "steps": summary.get("steps"),
        "val_nll": metric("val", "nll"),
        "val_bpb": metric("val", "bpb"),
        "test_nll": metric("test", "nll"),
        "test_bpb": metric("test", "bpb"),
    }


# ---------------------------------------------------------------------------------------------
# sources


@dataclass
class _Found:
    name: str
    checkpoint: Path | str  # a directory, or a hub repo id
    run_dir: Path | None
    study: Study | None = None
    tags: dict[str, Any] | None = None


def _study_runs(directory: Path, study: Study, skipped: list[str]) -> list[_Found]:
    record = rundir.read_json(directory / rundir.STUDY)
    if record is None or not isinstance(record.get("runs"), dict):
        raise UserError(f"{directory / rundir.STUDY} is not a readable study record; rerun `picollm study`")
    runs = [info for info in record["runs"].values() if isinstance(info, dict)]
    labels = [str(info.get("label")) for info in runs]
    found = []
    for info in runs:
        run_dir = directory / str(info.get("dir", ""))
        label = str(info.get("label") or run_dir.name)
        if labels.count(label) > 1 and info.get("seed") is not None:
            label = f"{label}-seed{info['seed']}"
        summary = rundir.read_json(run_dir / rundir.SUMMARY)
        finished = bool(summary) and summary.get("status") == "finished"
        if not finished or not (run_dir / rundir.FINAL / rundir.MODEL_CONFIG).is_file():
            skipped.append(f"{label}: not finished ({run_dir})")
            continue
        found.append(_Found(label, run_dir / rundir.FINAL, run_dir, study, info.get("tags")))
    return found


def _find(source: str, studies: list[Study], skipped: list[str]) -> list[_Found]:
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / rundir.STUDY).is_file():
            record = rundir.read_json(path / rundir.STUDY) or {}
            study = Study(len(studies), str(record.get("title") or path.name), path.resolve())
            studies.append(study)
            return _study_runs(path, study, skipped)
        if (path / rundir.MODEL_CONFIG).is_file():  # a checkpoint directory
            run_dir = rundir.find_run_dir(path)
            if run_dir is None:
                return [_Found(path.resolve().name, path, None)]
            name = run_dir.name if path.name == rundir.FINAL else f"{run_dir.name}-{path.name}"
            return [_Found(name, path, run_dir)]
        if (path / rundir.CONFIG).is_file():  # a run directory
            return [_Found(path.resolve().name, run_checkpoint(path), path)]
        raise UserError(f"{source} is neither a study (study.json), a run (config.yaml) nor a checkpoint "
                        "(config.json) directory")
    if is_repo_id(source):
        return [_Found(source.split("/")[1], source, None)]
    raise UserError(f"{source} does not exist; pass a study, run or checkpoint directory or a hub repo id "
                    "(user/name)")


def unique_ids(names: list[str]) -> list[str]:
    """Names made unique in order: the first keeps its name, later ones get -2, -3, ..."""
    taken: set[str] = set()
    out = []
    for name in names:
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name}-{n}"
        taken.add(candidate)
        out.append(candidate)
    return out


def load_catalog(sources: list[str], device: Any = "cpu", log: Any = None) -> Catalog:
    """Load every model `sources` name. A source that is wrong is a UserError; a study's run that fails
    to load is skipped with a line on `log` (default stderr), so one bad run does not stop the others."""
    log = log if log is not None else sys.stderr
    if not sources:
        raise UserError("no models to serve: pass study, run or checkpoint directories or hub repo ids")
    studies: list[Study] = []
    skipped: list[str] = []
    found = [f for source in sources for f in _find(source, studies, skipped)]
    models: dict[str, ServedModel] = {}
    for f, model_id in zip(found, unique_ids([f.name for f in found])):
        try:
            if isinstance(f.checkpoint, Path):
                model = _load_read_only(f.checkpoint, device)
            else:
                model = load(f.checkpoint, device=device)
        except UserError as exc:
            if f.study is None:
                raise
            skipped.append(f"{model_id}: {exc}")
            continue
        if getattr(model, "tokenizer", None) is None:
            message = f"{f.checkpoint} has no tokenizer files; the server needs one to read and write text"
            if f.study is None:
                raise UserError(message)
            skipped.append(f"{model_id}: {message}")
            continue
        model.requires_grad_(False)
        models[model_id] = ServedModel(model_id, model, str(f.checkpoint), f.study,
                                       model_info(model, f.run_dir, f.tags))
    for line in skipped:
        print(f"[serve] skipped {line}", file=log)
    if not models:
        raise UserError(f"none of {', '.join(sources)} holds a finished model to serve")
    return Catalog(models, studies, skipped)
