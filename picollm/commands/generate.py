"""`picollm generate RUN_OR_CHECKPOINT --prompt "..."`: continue a prompt with a trained model.

Every --prompt (repeatable) gets --num-samples continuations, all in one batch. Plain output prints
each prompt followed by its continuation; --json prints one JSON object. --stream prints the
continuation as it is generated; it needs a single continuation (one prompt, --num-samples 1).
"""

from __future__ import annotations

import argparse
import json
import sys

from picollm.errors import UserError
from picollm.generation import STRATEGIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="RUN_OR_CHECKPOINT",
                        help="a run directory, a checkpoint directory or a Hugging Face repo id")
    parser.add_argument("--prompt", action="append", default=None,
                        help="text to continue (repeat for several prompts); default: '' (a new story)")
    parser.add_argument("--strategy", default="greedy", choices=STRATEGIES,
                        help="greedy (argmax), top-p (nucleus), top-k or sample (full softmax)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus mass for --strategy top-p")
    parser.add_argument("--top-k", type=int, default=50, help="tokens kept by --strategy top-k")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="logits are divided by it before sampling (not used by greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="most tokens to add to each prompt")
    parser.add_argument("--num-samples", type=int, default=1, help="continuations per prompt")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    parser.add_argument("--no-stop-at-eot", dest="stop_at_eot", action="store_false",
                        help="keep going past the end-of-text token instead of stopping there")
    parser.add_argument("--no-eot-prefix", dest="add_eot", action="store_false",
                        help="do not put the story separator before the prompt (default: the prompt is "
                             "read as the start of a story)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--stream", action="store_true",
                        help="print the continuation as it is generated (one prompt, --num-samples 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:

    from picollm.checkpoint import load
    from picollm.device import resolve_device
    from picollm.generation import check_generation_args, check_prompt_text, generate

    check_generation_args(args.strategy, args.top_p, args.top_k, args.temperature, args.max_new_tokens,
                          args.num_samples)
    prompts = args.prompt if args.prompt is not None else [""]
    for i, prompt in enumerate(prompts):
        check_prompt_text(prompt, i)  # before anything is printed: --stream echoes the prompt first
    if args.stream and (len(prompts) > 1 or args.num_samples > 1):
        raise UserError("--stream prints one continuation: give one --prompt and --num-samples 1")
    if args.stream and args.json:
        raise UserError("--stream and --json do not go together; pick one")
    device = resolve_device(args.device)
    model = load(args.model, device=device)
    if getattr(model, "tokenizer", None) is None:
        raise UserError(f"{args.model} has no tokenizer files; it cannot read a text prompt")

    on_token = None
    if args.stream:
        sys.stdout.write(prompts[0])
        sys.stdout.flush()

        def on_token(row: int, piece: str) -> None:  # noqa: ARG001
            sys.stdout.write(piece)
            sys.stdout.flush()

    texts = generate(model, prompts, strategy=args.strategy, top_p=args.top_p, top_k=args.top_k,
                     temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                     num_samples=args.num_samples, seed=args.seed, stop_at_eot=args.stop_at_eot,
                     on_token=on_token, add_eot=args.add_eot)
    rows = [(k, p, s) for k, p in enumerate(prompts) for s in range(args.num_samples)]
    if args.stream:
        sys.stdout.write("\n")
    elif args.json:
        print(json.dumps({
            "model": str(args.model), "strategy": args.strategy, "top_p": args.top_p, "top_k": args.top_k,
            "temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
            "samples": [{"prompt": p, "sample": s, "continuation": t}
                        for (_, p, s), t in zip(rows, texts, strict=True)],
        }, indent=2, ensure_ascii=False))
    else:
        for i, ((k, p, s), text) in enumerate(zip(rows, texts, strict=True)):
            if len(rows) > 1:
                print(f"{'' if i == 0 else chr(10)}--- prompt {k + 1}, sample {s + 1} ---")
            print(p + text)
    return 0
