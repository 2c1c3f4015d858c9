"""Configuration: the run's sections as typed dataclasses, from YAML files and dotted overrides.

A run is described by a `RunConfig` with three sections: `data` (what `prepare` builds), `model`
(a family name plus that family's fields, validated by the family's own config dataclass) and
`train` (the recipe). Every value is checked before any work starts: an unknown key, a wrong type
or an impossible value raises `UserError` naming the key and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from picollm.data.prepared import SPLITS
from picollm.errors import check
from picollm.models.registry import model_config_from_dict, preset_fields

# re-exported: the generic helpers the sections are built on, so that the config API is one import
from picollm.schema import apply_overrides, coerce, from_dict, load_yaml, parse_value, to_dict

__all__ = ["SECTIONS", "DataConfig", "TrainConfig", "RunConfig", "load_run_config", "apply_overrides", "check",
           "coerce", "from_dict", "load_yaml", "parse_value", "to_dict"]

SECTIONS = ("data", "model", "train")  # a RunConfig's sections: what every dotted config key starts with


# ---------------------------------------------------------------------------------------------
# the sections


@dataclass
class DataConfig:
    """What `picollm prepare` builds: source, sample, split, tokenizer."""

    data: str = "hf:roneneldan/TinyStories"  # "hf:NAME" or a local file/folder
    text_field: str = "text"  # column/key holding the story text (hf, jsonl, json, parquet)
    format: str | None = None  # tinystories|jsonl|json|parquet|text; None = from the extension
    hf_split: str = "train"  # which split of an hf: dataset to sample from
    num_stories: int | None = None  # seeded random sample of N stories; None = all
    split: tuple[float, float, float] = (0.98, 0.01, 0.01)  # train/val/test, whole stories
    seed: int = 0
    tokenizer: str = "gpt2"  # gpt2 | bpe:N
    bpe_train_bytes: int = 200_000_000  # at most this much training text is read to learn bpe:N
    encoding_errors: str = "strict"  # strict | replace (invalid UTF-8 in local files)
    num_proc: int | None = None  # tokenizer worker processes; None = all cores
    cache_dir: str = "~/.cache/picollm"

    def validate(self) -> None:
        check(len(self.split) == 3 and all(r >= 0 for r in self.split), "data.split",
              "give three non-negative ratios train,val,test")
        check(abs(sum(self.split) - 1.0) < 1e-6, "data.split",
              f"ratios must sum to 1 (got {sum(self.split):g}), e.g. 0.98,0.01,0.01")
        check(self.split[0] > 0, "data.split", "the train ratio must be positive")
        check(self.num_stories is None or self.num_stories > 0, "data.num_stories", "must be positive")
        check(self.encoding_errors in ("strict", "replace"), "data.encoding_errors",
              "must be 'strict' or 'replace'")
        check(self.num_proc is None or self.num_proc >= 1, "data.num_proc", "must be at least 1")
        check(self.bpe_train_bytes > 0, "data.bpe_train_bytes", "must be positive")


@dataclass
class TrainConfig:
    """The recipe. Defaults are the seed study's: AdamW 3e-4, cosine with 10% warmup, batch 64, 5 epochs."""

    # optimisation
    optimizer: str = "adamw"  # adamw | adam | sgd
    lr: float | str = 3e-4  # the peak rate, or "auto": short runs over lr_grid choose it (training/lr_search.py)
    lr_grid: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2, 3e-2])  # peak rates lr auto tries
    lr_sweep_fraction: float = 0.25  # each sweep run trains this fraction of the run's steps
    lr_sweep_dir: str | None = None  # where the sweep runs live; None: <out>/lr_sweep (a study shares one per model)
    lr_sweep_seed: int | None = None  # the sweep runs' seed; None: train.seed (a study: its first seed)
    lr_found: dict | None = None  # written by lr auto: the chosen rate and every sweep loss (a record, not a setting)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.01
    schedule: str = "cosine"  # cosine | linear | constant (each with linear warmup)
    warmup_ratio: float = 0.1
    min_lr: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    batch_size: int = 64  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step: global batch = batch_size x ranks x grad_accum
    # budget: the first of these that is set wins, in this order: max_steps, max_tokens, epochs
    epochs: float = 5.0
    max_steps: int | None = None
    max_tokens: int | None = None
    # evaluation, checkpoints, logging
    eval_interval: int = 200  # steps; 0 = only at the end
    eval_batches: int = 16  # size of the fixed validation subset used during training
    full_val_at: list[float] = field(default_factory=list)  # fractions of the steps at which the FULL val split
    # is evaluated too (rows of kind "eval_full" in metrics.jsonl; the study's verdicts during training)
    final_splits: list[str] = field(default_factory=lambda: list(SPLITS))  # scored in summary.json
    eval_batch_size: int | None = None  # default: batch_size
    ckpt_interval: int = 1000  # steps; 0 = only at the end
    keep_last: int = 2
    patience: int | None = None  # early stopping after this many evaluations without improvement
    log_interval: int = 10
    sample_prompt: str = "Once upon a time"
    sample_tokens: int = 32
    max_bad_steps: int = 20  # consecutive non-finite steps before the run stops
    seed: int = 0
    # hardware
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto (bf16 where the hardware runs it natively, else fp32) | fp32 | bf16 | fp16
    compile: bool = False
    loss_chunk_tokens: int = 4096  # rows of logits computed at once in the chunked loss; 0 = plain loss
    threads: int | None = None  # torch CPU threads; None = torch's default
    # integrations
    wandb: bool = False
    wandb_project: str = "picollm"
    wandb_run_name: str | None = None
    push_to_hub: str | None = None

    def validate(self) -> None:
        check(self.optimizer in ("adamw", "adam", "sgd"), "train.optimizer",
              f"use adamw, adam or sgd, got {self.optimizer!r}")
        auto = isinstance(self.lr, str)
        check(not auto or self.lr == "auto", "train.lr", f"give a number or auto, got {self.lr!r}")
        check(auto or self.lr > 0, "train.lr", f"must be positive, got {self.lr}")
        check(len(self.lr_grid) >= 2 and all(x > 0 for x in self.lr_grid)
              and len(set(self.lr_grid)) == len(self.lr_grid), "train.lr_grid",
              f"give two or more different positive rates, e.g. [1e-3, 3e-3, 1e-2, 3e-2], got {self.lr_grid}")
        check(0 < self.lr_sweep_fraction <= 1, "train.lr_sweep_fraction", "must be in (0, 1]")
        check(bool(self.final_splits) and all(x in SPLITS for x in self.final_splits),
              "train.final_splits", f"name one or more of {', '.join(SPLITS)}, got {self.final_splits}")
        check(all(0 < f < 1 for f in self.full_val_at), "train.full_val_at",
              f"give fractions of the run strictly between 0 and 1 (the end is always evaluated), "
              f"got {self.full_val_at}")
        check(all(0 <= b < 1 for b in self.betas), "train.betas", "each beta must be in [0, 1)")
        check(self.schedule in ("cosine", "linear", "constant"), "train.schedule",
              f"use cosine, linear or constant, got {self.schedule!r}")
        check(0 <= self.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
        peak = min(self.lr_grid) if auto else self.lr
        check(0 <= self.min_lr <= peak, "train.min_lr",
              "must be in [0, train.lr] (with lr auto: the lowest of lr_grid)")
        check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
        check(self.batch_size >= 1, "train.batch_size", "must be at least 1")
        check(self.grad_accum >= 1, "train.grad_accum", "must be at least 1")
        check(self.epochs > 0, "train.epochs", "must be positive")
        check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", "must be at least 1")
        check(self.max_tokens is None or self.max_tokens >= 1, "train.max_tokens", "must be at least 1")
        check(self.eval_interval >= 0, "train.eval_interval", "must be >= 0")
        check(self.eval_batches >= 1, "train.eval_batches", "must be at least 1")
        check(self.ckpt_interval >= 0, "train.ckpt_interval", "must be >= 0")
        check(self.keep_last >= 1, "train.keep_last", "must be at least 1")
        check(self.patience is None or self.patience >= 1, "train.patience", "must be at least 1")
        check(self.log_interval >= 1, "train.log_interval", "must be at least 1")
        check(self.max_bad_steps >= 1, "train.max_bad_steps", "must be at least 1")
        check(self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:"),
              "train.device", f"use auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        check(self.dtype in ("auto", "fp32", "bf16", "fp16"), "train.dtype",
              f"use auto, fp32, bf16 or fp16, got {self.dtype!r}")
        check(self.loss_chunk_tokens >= 0, "train.loss_chunk_tokens", "must be >= 0 (0 = plain loss)")
        check(self.threads is None or self.threads >= 1, "train.threads", "must be at least 1")


@dataclass
class RunConfig:
    """One training run: data, model (family + fields), recipe, output directory."""

    data: DataConfig = field(default_factory=DataConfig)
    model: dict = field(default_factory=lambda: {"family": "transformer"})
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str = "runs/run"

    def validate(self) -> None:
        model_config_from_dict(self.model)  # raises UserError on a bad family or field


def load_run_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                    preset: str | None = None) -> RunConfig:
    """Resolve a RunConfig from an optional YAML file, an optional model preset and dotted overrides.

    Precedence (last wins): defaults < preset < file < overrides.
    """
    data: dict = {}
    if preset is not None:
        data["model"] = preset_fields(preset)
    if path is not None:
        file_data = load_yaml(path)
        if preset is not None and "model" in file_data:
            file_data["model"] = {**data["model"], **(file_data["model"] or {})}
        data.update(file_data)
    data = apply_overrides(data, overrides or {})
    return from_dict(RunConfig, data)
