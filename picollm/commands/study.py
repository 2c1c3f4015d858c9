"""`picollm study`: run the whole comparison (the built-in study or a user's YAML) and write its report."""

from __future__ import annotations

import argparse
import sys

from picollm.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", nargs="?", metavar="STUDY.yaml",
                        help="a study file (default: the built-in study; see docs/study.md for the schema)")
    parser.add_argument("--data", help="the data every run uses: hf:NAME or a local file/folder "
                                       "(e.g. ../shared/data/tinystories-sample.txt)")
    parser.add_argument("--budget", help="quick (default: the whole study in under 30 minutes on a 2-core CPU "
                                         "with the 2,317-story sample) or full (the original recipe)")
    parser.add_argument("--seeds", type=int, metavar="K",
                        help="repeat every run with K seeds (default: the budget's; quick: 2)")
    parser.add_argument("--no-tune", action="store_true",
                        help="no lr sweep at all: every run trains at a fixed rate, and a train.lr auto (study "
                             "file or --train.lr) becomes the rate the run would have without it: the budget's "
                             "train.lr (quick: 5e-3), else base's, else 3e-4")
    parser.add_argument("--only", metavar="NAMES",
                        help="comma-separated groups (a selecting group brings the groups it selects from) or "
                             "run labels / patterns, e.g. --only size or --only 'kgram-pico-*,lstm-tiny'")
    parser.add_argument("--out", help="study directory (default: runs/study-<budget>)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print every run with its parameters, tokens, FLOPs and estimated time; train nothing")
    parser.add_argument("--jobs", type=int, metavar="N",
                        help="train N runs at once, each in its own process: one per GPU where there are GPUs; "
                             "on a CPU the cores are split between them (train.threads). Default: the number "
                             "of GPUs, or 2 on a CPU with 2 or more cores")
    parser.add_argument("--with-base", action="store_true", help="add the base size to the size grids")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="replace a grid's values wherever the study uses KEY, e.g. --grid model.k=1,2,3")
    parser.add_argument("--no-report", action="store_true", help="train and evaluate only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (lines only)")
    parser.epilog = ("Any config key can be set for every run with a dotted flag, e.g. --train.device cuda "
                     "--data.cache_dir /scratch/cache. Finished runs in --out are reused and interrupted "
                     "ones resumed: run the same command again to continue.")
    parser.set_defaults(accepts_overrides=True)


def parse_grid(items: list[str]) -> dict[str, list]:
    """['model.k=1,3,5'] -> {'model.k': [1, 3, 5]}."""
    from picollm.config import parse_value

    grid: dict[str, list] = {}
    for item in items:
        key, eq, values = item.partition("=")
        if not eq or not key or not values:
            raise UserError(f"--grid {item!r}: write KEY=V1,V2 (e.g. --grid model.k=1,3,5)")
        grid[key.strip()] = [parse_value(v.strip()) for v in values.split(",") if v.strip()]
    return grid


def run(args: argparse.Namespace) -> int:
    from picollm import rundir
    from picollm.commands.train import parse_overrides
    from picollm.fileio import check_writable_dir
    from picollm.study.dryrun import dry_run_rows, format_dry_run
    from picollm.study.plan import add_baselines, plan_study, write_study_json
    from picollm.study.report import build_study_report
    from picollm.study.runner import default_jobs, run_plan
    from picollm.study.spec import load_study

    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    spec = load_study(args.study)
    grid = parse_grid(args.grid)
    used = sorted({key for group in spec.groups.values() for block in group.runs for key in block.grid})
    unused = [key for key in grid if key not in used]
    if unused:
        raise UserError(f"--grid {unused[0]}: no group of the study has a grid over it, so it would change nothing; "
                        f"the study's grids are over: {', '.join(used) or 'nothing'}")
    budget = args.budget or spec.default_budget
    overrides = parse_overrides(getattr(args, "overrides", []) or [])
    if args.data:
        overrides["data.data"] = args.data
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    out = args.out or f"runs/study-{budget}"
    check_writable_dir(out, "--out" if args.out else "the study directory", "pass another with --out")
    plan = plan_study(spec, out, budget=budget, seeds=args.seeds, only=only, overrides=overrides,
                      grid=grid, extend={"size": ["base"]} if args.with_base else None,
                      progress=not args.no_progress, tune=False if args.no_tune else None)
    jobs = args.jobs if args.jobs is not None else default_jobs()
    n_uses = sum(len(e["runs"]) for g in plan.groups for e in g["entries"])
    tuning = (f"lr sweeps for {len(plan.sweeps)} models" if plan.sweeps else
              "no lr tuning (--no-tune)" if plan.no_tune else "no lr tuning")
    print(f"[study] {spec.title}: budget {budget}, {len(plan.groups)} groups, {len(plan.runs)} distinct runs "
          f"({n_uses} uses by the groups), {len(plan.seeds)} seed(s), {tuning}, {jobs} at a time; directory {out}",
          file=sys.stderr)
    if plan.untuned:  # auto asked for by the study file or --train.lr auto: say what it became
        by_rate: dict[float, list[str]] = {}
        for label, lr in plan.untuned.items():
            by_rate.setdefault(lr, []).append(label)
        rates = "; ".join(f"at {lr:g}: {', '.join(labels)}" for lr, labels in by_rate.items())
        print(f"[study] --no-tune: no lr sweep; the runs set to train.lr auto train at a fixed rate: {rates}",
              file=sys.stderr)
    if args.dry_run:
        print(format_dry_run(dry_run_rows(plan, jobs=jobs), jobs=jobs))
        return 0
    add_baselines(plan)
    write_study_json(plan)
    outcome = run_plan(plan, jobs=jobs, progress=not args.no_progress)
    if not args.no_report:
        index = build_study_report(plan.out)
        print(f"[study] report: {index} (and {index.with_name(rundir.REPORT_MD)})", file=sys.stderr)
    if outcome["failures"]:
        for run_id, error in outcome["failures"].items():
            print(f"[study] run {plan.runs[run_id].label} failed: {error}", file=sys.stderr)
        return 1
    if outcome["interrupted"]:
        print("[study] interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    return 0
