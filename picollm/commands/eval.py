"""`picollm eval RUN_OR_CHECKPOINT`: NLL, perplexity and bits per byte, optionally diversity.

A run directory evaluates on its own prepared data (`--split`, from its config.yaml; cached);
a checkpoint, or any model with `--data PATH`, on a text file tokenized with the model's tokenizer.
`--diversity` also generates a continuation of M prompts (the first P tokens of stories spread
over the split) with each strategy and reports distinct-1..5 and 4-gram repetition.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from picollm.data.prepared import SPLITS
from picollm.device import DTYPE_CHOICES
from picollm.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="RUN_OR_CHECKPOINT",
                        help="a run directory, a checkpoint directory or a Hugging Face repo id")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--split", default="test", choices=SPLITS,
                       help="a run's prepared split (default: test)")
    where.add_argument("--data", metavar="PATH",
                       help="evaluate on this file instead (any format prepare reads)")
    parser.add_argument("--text-field", default="text", help="the text column/key of --data (jsonl, parquet)")
    parser.add_argument("--format", default=None, help="format of --data; default: from its extension")
    parser.add_argument("--encoding-errors", default="strict", choices=("strict", "replace"),
                        help="invalid UTF-8 in --data: fail (strict, default) or replace with U+FFFD")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per forward pass")
    parser.add_argument("--max-windows", type=int, default=None,
                        help="evaluate only the first N windows (bytes scaled to match)")
    parser.add_argument("--context-length", type=int, default=None,
                        help="window length; default: the model's training context")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="autocast dtype; auto = bf16 where the hardware runs it natively, else fp32")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    div = parser.add_argument_group("diversity")
    div.add_argument("--diversity", action="store_true",
                     help="also measure distinct-n and repetition of generated continuations")
    div.add_argument("--no-nll", dest="nll", action="store_false", help="with --diversity: skip the NLL")
    div.add_argument("--num-prompts", type=int, default=100, help="prompts M (default 100)")
    div.add_argument("--prompt-tokens", type=int, default=16, help="tokens P of each story used as prompt")
    div.add_argument("--new-tokens", type=int, default=100, help="tokens L generated per prompt")
    div.add_argument("--strategies", default="greedy,top-p=0.9,top-p=1.0",
                     help="comma-separated: greedy, top-p=P, top-k=K, sample, sample=TEMPERATURE")
    div.add_argument("--seed", type=int, default=0, help="sampling seed")


def _check(args: argparse.Namespace) -> None:

    for flag, value in (("--batch-size", args.batch_size), ("--num-prompts", args.num_prompts),
                        ("--prompt-tokens", args.prompt_tokens)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.max_windows is not None and args.max_windows < 1:
        raise UserError(f"--max-windows must be at least 1, got {args.max_windows}")
    if args.context_length is not None and args.context_length < 1:
        raise UserError(f"--context-length must be at least 1, got {args.context_length}")
    if args.new_tokens < 0:
        raise UserError(f"--new-tokens must be >= 0, got {args.new_tokens}")
    if not args.nll and not args.diversity:
        raise UserError("--no-nll leaves nothing to do without --diversity")


def run(args: argparse.Namespace) -> int:

    from picollm.checkpoint import load_model, resolve_checkpoint
    from picollm.device import resolve_device
    from picollm.diversity_eval import diversity_eval, parse_strategies, story_prompts
    from picollm.evaluation import evaluate_tokens, prepared_for_run, stream_from_file
    from picollm.generation import check_generation_args
    from picollm.rundir import find_run_dir

    _check(args)
    strategies = parse_strategies(args.strategies) if args.diversity else {}
    for kwargs in strategies.values():
        check_generation_args(kwargs["strategy"], kwargs.get("top_p", 0.9), kwargs.get("top_k", 50),
                              kwargs.get("temperature", 1.0), args.new_tokens)
    device = resolve_device(args.device)
    run_dir = find_run_dir(args.model) if Path(args.model).expanduser().is_dir() else None
    if args.data is None and run_dir is None:
        # fail before loading anything
        resolve_checkpoint(args.model)
        raise UserError(f"{args.model} is a checkpoint without its run directory, so it names no data: "
                        "pass --data PATH (a text file to evaluate on)")
    model = load_model(resolve_checkpoint(args.model), device=device)
    tokenizer = getattr(model, "tokenizer", None)
    if args.data is not None:
        tokens, num_bytes, offsets = stream_from_file(args.data, tokenizer, args.text_field, args.format,
                                                     args.encoding_errors)
        source = str(args.data)
    else:
        prepared = prepared_for_run(run_dir, progress=True)
        name = getattr(getattr(prepared, "tokenizer", None), "name", None)
        if tokenizer is not None and name is not None and name != tokenizer.name:
            raise UserError(f"the model uses tokenizer '{tokenizer.name}' but {run_dir}'s data was prepared "
                            f"with '{name}'")
        tokens, num_bytes = prepared.tokens(args.split), prepared.num_bytes(args.split)
        offsets = prepared.story_offsets(args.split)
        if len(tokens) < 2:
            raise UserError(f"the {args.split} split of {run_dir} is empty; use another --split")
        source = f"{run_dir} {args.split} split"
        if tokenizer is None:
            tokenizer = model.tokenizer = prepared.tokenizer
    context = args.context_length or model.config.context_length

    report: dict = {"model": str(args.model), "data": source, "context_length": context}
    if args.nll:
        result = evaluate_tokens(model, tokens, context, batch_size=args.batch_size, num_bytes=num_bytes,
                                 max_windows=args.max_windows, device=device, dtype=args.dtype)
        report.update(result.as_dict())
    if args.diversity:
        prompts = story_prompts(tokens, offsets, args.num_prompts, args.prompt_tokens)
        report["diversity"] = diversity_eval(model, prompts, strategies, max_new_tokens=args.new_tokens,
                                             seed=args.seed, tokenizer=tokenizer)
        report["diversity_settings"] = {"num_prompts": args.num_prompts, "prompt_tokens": args.prompt_tokens,
                                        "new_tokens": args.new_tokens, "seed": args.seed}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['model']} on {source} (windows of {context} tokens)")
    if args.nll:
        bpb = "n/a" if report["bpb"] is None else f"{report['bpb']:.4f}"
        nbytes = "n/a" if report["bytes"] is None else f"{report['bytes']:,.0f}"
        print(f"nll {report['nll']:.4f}  ppl {report['ppl']:.3f}  bpb {bpb}  "
              f"tokens {report['tokens']:,}  bytes {nbytes}  windows {report['windows']:,}")
    if args.diversity:
        s = report["diversity_settings"]
        print(f"diversity: {s['num_prompts']} prompts of {s['prompt_tokens']} tokens, "
              f"{s['new_tokens']} new tokens, seed {s['seed']}")
        width = max(len("strategy"), *(len(n) for n in report["diversity"]))
        head = " ".join(f"{'w-d' + str(n):>6}" for n in range(1, 6))
        tok_head = " ".join(f"{'t-d' + str(n):>6}" for n in range(1, 6))
        print(f"{'strategy':<{width}}  {head}  {tok_head}  {'rep-4':>6}  {'words':>7}")
        for name, r in report["diversity"].items():
            words = " ".join(_rate(r[f"word_distinct_{n}"]) for n in range(1, 6))
            toks = " ".join(_rate(r.get(f"token_distinct_{n}")) for n in range(1, 6))
            print(f"{name:<{width}}  {words}  {toks}  {_rate(r['repetition_4'])}  {r['mean_words']:7.1f}")
    return 0


def _rate(value: float | None) -> str:
    """A distinct-n or repetition rate; n/a where the texts hold no n-gram to count."""
    return f"{'n/a':>6}" if value is None else f"{value:6.3f}"
