"""`picollm report DIR`: rebuild a study's report from its run logs (study.json + the run directories)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="a study directory written by `picollm study`")
    parser.add_argument("--out", help="where to write index.html and report.md (default: DIR/report)")


def run(args: argparse.Namespace) -> int:
    from picollm import rundir
    from picollm.fileio import check_writable_dir
    from picollm.study.report import write_report
    from picollm.study.results import load_results

    directory = Path(args.directory)
    if args.out:
        out = check_writable_dir(args.out, "--out")
    else:
        out = check_writable_dir(directory / rundir.REPORT_DIR, "the report directory", "pass another with --out")
    index = write_report(load_results(directory), out)
    print(f"report: {index} (and {index.with_name(rundir.REPORT_MD)})", file=sys.stderr)
    return 0
