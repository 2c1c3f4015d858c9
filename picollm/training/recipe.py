"""A run's recipe: the settings that change what is trained, as opposed to how it is carried out.

Resuming a run compares its saved config (config.yaml) with the one it is resumed under. A changed
model or tokenizer can never continue (the checkpoint's weights would not fit or would mean other
tokens); any other change of the recipe is refused unless the user says `--allow-recipe-change`, and
is then recorded in the run's history (`history.jsonl`), because the run's curves and results mix the
two recipes from that step on.

`check_start` decides, reading only, whether a run directory can start as asked.

`RECIPE` is the one list of what counts: extend it when a setting that changes the training is added. With
`train.lr: auto` the recipe is `auto` and the sweep's settings (grid, fraction, seed), not the rate the sweep
chose, so a resume compares the same thing before and after the sweep. A config is `auto` while its rate is
`auto` or the one the sweep chose (`train.lr_found` records it); a rate the user set since (`--train.lr` on a
resume, allowed and recorded like any change) is a number again, and `lr_found` stays as the record of the
sweep that was run. Not in it, on purpose: threads, device, dtype, compile, the evaluation, checkpoint and
logging intervals, W&B, the hub, and the data's cache directory and worker count.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from picollm import rundir
from picollm.config import RunConfig, to_dict
from picollm.errors import UserError
from picollm.models.registry import model_config_from_dict, model_config_to_dict
from picollm.schema import flatten_keys

# dotted config keys (shell patterns) that change what is trained
RECIPE = (
    "data.*",  # the source, sample, split, seed and tokenizer (but see NOT_RECIPE)
    "model.*",
    "train.optimizer", "train.lr", "train.betas", "train.momentum", "train.weight_decay",
    "train.schedule", "train.warmup_ratio", "train.min_lr", "train.grad_clip",
    "train.batch_size", "train.grad_accum",
    "train.epochs", "train.max_steps", "train.max_tokens",  # the budget (the one that wins, see _budget)
    "train.patience", "train.seed",
    "train.lr_grid", "train.lr_sweep_fraction", "train.lr_sweep_seed",  # with lr auto only (see `recipe`)
)
SWEEP = ("train.lr_grid", "train.lr_sweep_fraction", "train.lr_sweep_seed")
NOT_RECIPE = ("data.num_proc", "data.cache_dir")  # where and how fast the data is prepared
# what no resume can change: the checkpoint's weights belong to this model and these token ids
FIXED = ("model.*", "data.tokenizer")


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key} {self.old!r} -> {self.new!r}"


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(key, p) for p in patterns)


def recipe(config: RunConfig, vocab_size: int | None = None) -> dict[str, Any]:
    """The recipe of `config` as flat dotted keys. The model's fields are resolved with their family's
    defaults (`vocab_size`, when the config leaves it to the tokenizer, is filled in); of the budget
    keys only the one that wins is kept, of the optimizer's only those it uses."""
    data = to_dict(config)
    model = dict(data["model"])
    if vocab_size is not None:
        model.setdefault("vocab_size", vocab_size)
    family, model_config = model_config_from_dict(model)
    data["model"] = model_config_to_dict(family.name, model_config)
    flat = {k: v for k, v in flatten_keys(data).items() if _matches(k, RECIPE) and not _matches(k, NOT_RECIPE)}
    t = config.train
    budget = ("train.max_steps" if t.max_steps is not None else
              "train.max_tokens" if t.max_tokens is not None else "train.epochs")
    unused = {"train.max_steps", "train.max_tokens", "train.epochs"} - {budget}
    unused.add("train.momentum" if t.optimizer != "sgd" else "train.betas")
    if is_auto(config):
        flat["train.lr"] = "auto"
    else:
        unused.update(SWEEP)
    return {k: v for k, v in flat.items() if k not in unused}


def is_auto(config: RunConfig) -> bool:
    """Whether the run's rate is the sweep's: `auto`, or the rate its sweep chose (`train.lr_found`)."""
    t = config.train
    return t.lr == "auto" or bool(t.lr_found and t.lr == t.lr_found.get("chosen"))


def changes(saved: RunConfig, new: RunConfig) -> list[Change]:
    """What `new` changes in the recipe of the run saved as `saved` (config.yaml), key by key."""
    old = recipe(saved)
    now = recipe(new, vocab_size=saved.model.get("vocab_size"))
    if is_auto(saved) != is_auto(new):  # `auto` against a number: that is the change, not the sweep's settings
        old, now = ({k: v for k, v in r.items() if not _matches(k, SWEEP)} for r in (old, now))
    return [Change(k, old.get(k), now.get(k)) for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)]


def check_resume(out: Path, saved: RunConfig, new: RunConfig, allow: bool, finished: bool = False) -> list[Change]:
    """The recipe changes a resume of the run in `out` under `new` would make: UserError when one can never be
    made (the model, the tokenizer) or is not allowed; the allowed ones otherwise (empty: the same recipe)."""
    found = changes(saved, new)
    fixed = [c for c in found if _matches(c.key, FIXED)]
    if fixed:
        raise UserError(f"{out} holds a run of another model or tokenizer ({'; '.join(map(str, fixed))}), which "
                        f"its checkpoints cannot continue: train into another --out, start over with --fresh, or "
                        f"continue that run as it was with `picollm train --resume {out}`")
    if found and not allow:
        changed = "; ".join(map(str, found))
        if finished:
            head = f"{out} holds a run finished under another recipe ({changed}), whose results are there"
        else:
            head = (f"{out} was trained under another recipe ({changed}) and continuing under this one would mix "
                    f"the two: continue it as it was with `picollm train --resume {out}`")
        raise UserError(f"{head}; start over with --fresh, train into another --out, or pass --allow-recipe-change "
                        "to continue it under the new recipe (the change is recorded in the run's history.jsonl)")
    return found


def check_start(out: Path, cfg: RunConfig, resume: bool, allow_recipe_change: bool,
                from_step: int | None) -> tuple[dict[str, Any] | None, list[Change]]:
    """Whether the run directory `out` can start under `cfg` as asked (reads only): (the summary of a
    finished run to return as it is, or None; the recipe changes allowed). UserError when it cannot: a
    newer format, no checkpoint at `from_step`, a recipe change not allowed."""
    if not out.is_dir():
        if from_step is not None:
            raise UserError(f"{out} does not exist: --from-step continues a run that has checkpoints")
        return None, []
    rundir.check_format(out)
    if not resume:
        return None, []
    summary = rundir.read_summary(out)
    finished = bool(summary) and summary.get("status") == "finished"
    saved = rundir.checkpoint_dirs(out)
    if from_step is not None:
        steps = [rundir.step_of(p) for p in saved]
        if from_step not in steps:
            have = f"its checkpoints are at steps {', '.join(map(str, steps))}" if steps else "it has no checkpoints"
            raise UserError(f"{out} has no checkpoint at step {from_step} (--from-step): {have}")
    found: list[Change] = []
    if (out / rundir.CONFIG).is_file() and (saved or finished):
        found = check_resume(out, rundir.read_run_config(out), cfg, allow_recipe_change, finished)
    if finished and not found and from_step is None:
        return summary, []
    return None, found
