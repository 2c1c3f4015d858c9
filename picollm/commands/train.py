"""`picollm train`: train one model from a YAML config, a preset and dotted overrides."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from picollm.config import SECTIONS
from picollm.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with data/model/train sections")
    parser.add_argument("--preset", help="model preset FAMILY-SIZE, e.g. transformer-pico (see `picollm models`)")
    parser.add_argument("--out", help="run directory (default: runs/<preset or family>)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    parser.add_argument("--from-step", type=int, metavar="N",
                        help="with --resume: continue from the checkpoint at step N; later checkpoints and metrics "
                             "rows are moved to RUN_DIR/discarded/, not deleted")
    parser.add_argument("--allow-recipe-change", action="store_true",
                        help="continue an interrupted run under a changed recipe (lr, schedule, batch, budget, "
                             "data); the change is recorded in the run's history.jsonl")
    parser.add_argument("--dry-run", action="store_true",
                        help="print parameters, tokens, FLOPs and estimated time; train nothing")
    parser.add_argument("--no-tune", action="store_true",
                        help="never run an lr sweep: a run whose train.lr is auto is refused (one model has no "
                             "fixed rate to fall back on; give one with --train.lr)")
    parser.add_argument("--fresh", action="store_true",
                        help="start over even if the run directory holds checkpoints (with --resume: from its config)")
    parser.add_argument("--data", help="shortcut for --data.data (hf:NAME or a local file/folder)")
    parser.add_argument("--tokenizer", help="shortcut for --data.tokenizer (gpt2 or bpe:N)")
    parser.add_argument("--device", help="shortcut for --train.device (auto|cpu|cuda|mps)")
    parser.add_argument("--dtype", help="shortcut for --train.dtype (auto|fp32|bf16|fp16)")
    parser.add_argument("--compile", action="store_true", help="shortcut for --train.compile true")
    parser.add_argument("--wandb", action="store_true", help="log to Weights & Biases (honours WANDB_MODE)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the final checkpoint when done")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.epilog = ("Any config key can be set with a dotted flag: --train.lr 1e-3 --model.n_layers 4 "
                     "--data.num_stories 10000. Values are read as YAML.")
    parser.set_defaults(accepts_overrides=True)


def parse_overrides(extra: list[str]) -> dict[str, object]:
    """['--train.lr', '1e-3', '--model.k=5'] -> {'train.lr': 0.001, 'model.k': 5}."""
    from picollm.config import parse_value

    overrides: dict[str, object] = {}
    i = 0
    while i < len(extra):
        flag = extra[i]
        if not flag.startswith("--") or "." not in flag:
            raise UserError(f"unrecognized argument '{flag}'; config overrides look like --train.lr 1e-3")
        key, eq, value = flag[2:].partition("=")
        if not eq:
            if i + 1 >= len(extra) or (extra[i + 1].startswith("--") and "." in extra[i + 1]):
                raise UserError(f"override '{flag}' needs a value, e.g. {flag} 1e-3")
            value = extra[i + 1]
            i += 1
        section = key.split(".", 1)[0]
        if section not in SECTIONS:
            raise UserError(f"override '--{key}': unknown section '{section}'; use one of {', '.join(SECTIONS)}")
        overrides[key.replace("-", "_")] = parse_value(value)
        i += 1
    return overrides


def _refuse_auto(lr: object, what: str) -> None:
    """--no-tune with train.lr auto: a sweep is the only way `picollm train` has to choose that rate (a study
    falls back on its budget's fixed rate; one run has none that suits every model), so say which to drop."""
    if lr == "auto":
        raise UserError(f"--no-tune and {what} contradict: give the rate, e.g. --train.lr 3e-3, or drop "
                        "--no-tune to let an lr sweep choose it")


def run(args: argparse.Namespace) -> int:
    from picollm import rundir
    from picollm.config import load_run_config

    overrides = parse_overrides(args.overrides)
    shortcuts = {"data.data": args.data, "data.tokenizer": args.tokenizer, "train.device": args.device,
                 "train.dtype": args.dtype, "train.push_to_hub": args.push_to_hub}
    for key, value in shortcuts.items():
        if value is not None:
            overrides.setdefault(key, value)
    if args.compile:
        overrides.setdefault("train.compile", True)
    if args.wandb:
        overrides.setdefault("train.wandb", True)

    from picollm.training import lr_search
    from picollm.training.trainer import dry_run, resume_run, train

    if args.no_tune and "train.lr" in overrides:
        _refuse_auto(overrides["train.lr"], "--train.lr auto")
    if args.from_step is not None and not args.resume:
        raise UserError("--from-step N goes with --resume RUN_DIR (the run to continue from its step N)")
    if args.fresh and (args.from_step is not None or args.allow_recipe_change):
        raise UserError("--fresh starts over: it does not go with --from-step or --allow-recipe-change")
    if args.resume:
        if args.config or args.preset:
            raise UserError("--resume continues a run from its own config.yaml; drop --config/--preset")
        if args.dry_run:
            raise UserError("--dry-run estimates a new run: use it with --config or --preset, not --resume")
        if args.no_tune and "train.lr" not in overrides:
            _refuse_auto(rundir.read_run_config(Path(args.resume)).train.lr,
                         f"train.lr auto in {Path(args.resume) / rundir.CONFIG} (its lr sweep has not chosen a rate)")
        result = resume_run(args.resume, progress=not args.no_progress, overrides=overrides,
                            allow_recipe_change=args.allow_recipe_change, from_step=args.from_step,
                            fresh=args.fresh)
    else:
        if args.config is None and args.preset is None and "model.family" not in overrides:
            raise UserError("say what to train: --preset transformer-pico, --config FILE.yaml or --model.family NAME")
        name = args.preset or "run"
        if args.out is not None:
            overrides["out"] = args.out
        elif args.config is None:
            overrides["out"] = f"runs/{name}"
        config = load_run_config(args.config, overrides, preset=args.preset)
        if args.no_tune and "train.lr" not in overrides:
            _refuse_auto(config.train.lr, f"train.lr auto in {args.config}")
        if args.dry_run:
            report = dry_run(lr_search.timing_config(config))
            if config.train.lr == "auto":  # the sweep: a run per grid rate at lr_sweep_fraction of the steps
                runs = len(config.train.lr_grid)
                report["lr_sweep_runs"] = (f"{runs} (+1 if the best rate is at an edge of train.lr_grid; the "
                                           "grid again twice as long if no rate trains)")
                if report["est_seconds"] is not None:
                    report["lr_sweep_est_seconds"] = runs * config.train.lr_sweep_fraction * report["est_seconds"]
            if args.json:
                print(json.dumps(report))
            else:
                for key, value in report.items():
                    if value is None:
                        continue  # not measured: `not_measured` says why
                    print(f"{key:>30}: {value:,.4g}" if isinstance(value, float) else f"{key:>30}: {value}")
            return 0
        result = train(config, resume=not args.fresh, progress=not args.no_progress,
                       allow_recipe_change=args.allow_recipe_change)
    if args.json:
        print(json.dumps({"directory": str(result.directory), **result.summary}))
    else:
        print(f"run directory: {result.directory}", file=sys.stderr)
    return 0 if result.summary.get("status") != "interrupted" else 130
