"""`picollm push RUN_OR_CHECKPOINT REPO_ID`: upload a model that both transformers and picollm load.

What is uploaded is what `picollm export` writes (with a model card naming REPO_ID): a finished run's
final model, or a checkpoint directory. See docs/export.md.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="RUN_OR_CHECKPOINT", help="a finished run directory or a checkpoint directory")
    parser.add_argument("repo_id", help="hub repository, user/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="weights' dtype")


def run(args: argparse.Namespace) -> int:
    from picollm.export.hf import push

    print(push(args.model, args.repo_id, private=args.private, dtype=args.dtype))
    return 0
