"""`picollm push RUN_DIR REPO_ID`: upload a run's final checkpoint with a generated model card."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory or checkpoint directory")
    parser.add_argument("repo_id", help="hub repository, user/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")


def run(args: argparse.Namespace) -> int:
    from picollm.hub import push

    print(push(args.run, args.repo_id, private=args.private))
    return 0
