"""`picollm export RUN_OR_CHECKPOINT --out DIR`: a directory Hugging Face transformers loads without picollm.

A run exports its final model (it must have finished); a checkpoint directory exports as it is. A
Transformer that is exactly GPT-2 becomes a native GPT2LMHeadModel; every other model a custom one
(transformers runs its code when allowed to: `trust_remote_code`). See docs/export.md.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="RUN_OR_CHECKPOINT", help="a finished run directory or a checkpoint directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="the directory to write (must be empty or new)")
    parser.add_argument("--format", default="hf", choices=("hf",), help="hf: Hugging Face transformers (the only one)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="weights' dtype")
    parser.add_argument("--layout", default="auto", choices=("auto", "picollm"),
                        help="auto: native GPT-2 where the model is exactly GPT-2, else custom code; "
                             "picollm: always the custom code")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    parser.add_argument("--verify", action="store_true",
                        help="load the export with transformers and check its logits and tokenizer against "
                             "picollm's before writing it (needs pip install \"picollm[hf]\")")


def run(args: argparse.Namespace) -> int:
    from picollm.export.hf import export_hf

    out = export_hf(args.model, args.out, dtype=args.dtype, force=args.force, layout=args.layout,
                    verify=args.verify)
    layout = json.loads((out / "config.json").read_text(encoding="utf-8"))["picollm"]["layout"]
    how = "GPT2LMHeadModel, no remote code" if layout == "gpt2" else "custom code (load with trust_remote_code)"
    print(f"{out}: {args.dtype} weights, {how}{', verified with transformers' if args.verify else ''}; "
          f"see {out / 'README.md'}")
    return 0
