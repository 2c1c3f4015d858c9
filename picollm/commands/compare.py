"""`picollm compare RUN_DIR...`: the study's tables and plots for any runs (no claims are checked)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (from train or study)")
    parser.add_argument("--out", default="runs/compare", help="where to write index.html and report.md "
                                                               "(default: runs/compare)")
    parser.add_argument("--title", default="Comparison", help="the report's title")


def run(args: argparse.Namespace) -> int:
    from picollm import rundir
    from picollm.fileio import check_writable_dir
    from picollm.study.report import write_report
    from picollm.study.results import results_from_runs

    check_writable_dir(args.out, "--out")
    results = results_from_runs(args.runs, title=args.title)
    index = write_report(results, args.out, findings=False)
    print(f"report: {index} (and {index.with_name(rundir.REPORT_MD)})", file=sys.stderr)
    return 0
