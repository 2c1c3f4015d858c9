"""Generation speed: tokens/s with the incremental state (prefill + decode) vs recomputing the window.

`picollm bench` measures one such row (transformer-small, batch 8) for its target; this script measures
what the verb does not: any preset and family, several batch sizes, a GPU, and the `cache-linear` mode.

    python benchmarks/bench_generate.py                       # transformer-small, batch 1 and 8, 256 tokens
    python benchmarks/bench_generate.py --device cuda --batch-sizes 1,8,32 --json

The model is the registry preset (random weights: speed does not depend on them) with the GPT-2
vocabulary. Each row is greedy decoding of `--new-tokens` tokens for every sequence (no stop at
eot), from a prompt of `--prompt-tokens` random tokens. "recompute" is `generate_ids(...,
use_cache=False)`: every step runs the whole window through the model again (the output layer only
at the last position). The figure is new tokens (all rows) per second of wall time, best of
`--repeats`, after one short warm-up run per mode. "cache-linear" is "cache" with the plain
`output_layer` in place of `next_token_logits` (its W @ h.T path):

    python benchmarks/bench_generate.py --preset transformer-tiny --modes cache,cache-linear --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time

import torch

from picollm.bench.workloads import random_prompts, time_generation
from picollm.evaluation import resolve_device
from picollm.models.base import LanguageModel
from picollm.models.registry import build_model, preset_fields


@contextlib.contextmanager
def plain_projection():
    """Generation steps through `output_layer` itself, as before `next_token_logits`."""
    saved = LanguageModel.next_token_logits
    LanguageModel.next_token_logits = lambda self, hidden: self.output_layer(hidden)
    try:
        yield
    finally:
        LanguageModel.next_token_logits = saved


def measure(model, batch: int, prompt_tokens: int, new_tokens: int, use_cache: bool, repeats: int) -> float:
    """New tokens per second (all rows), best of `repeats`, after a short warm-up."""
    prompts = random_prompts(model.config.vocab_size, batch, prompt_tokens)
    time_generation(model, prompts, min(8, new_tokens), use_cache)
    runs = [time_generation(model, prompts, new_tokens, use_cache) for _ in range(repeats)]
    assert all(r["tokens"] == batch * new_tokens for r in runs)
    return batch * new_tokens / min(r["seconds"] for r in runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="transformer-small")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=1,
                        help="prompt length; prompt + new tokens beyond the context make the window slide")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--modes", default="cache,recompute")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = build_model(preset_fields(args.preset)).to(device).eval()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    modes = args.modes.split(",")
    rows = []
    for batch in batches:
        row = {"batch": batch}
        for mode in modes:
            with plain_projection() if mode == "cache-linear" else contextlib.nullcontext():
                row[mode] = measure(model, batch, args.prompt_tokens, args.new_tokens, mode != "recompute",
                                    args.repeats)
            print(f"  batch {batch} {mode}: {row[mode]:,.1f} tokens/s", file=sys.stderr, flush=True)
        if "cache" in row and "recompute" in row:
            row["ratio"] = row["cache"] / row["recompute"]
        if "cache" in row and "cache-linear" in row:
            row["projection_speedup"] = row["cache"] / row["cache-linear"]
        rows.append(row)
    info = {
        "preset": args.preset, "parameters": model.num_parameters(), "context": model.max_context,
        "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"), "rows": rows,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{args.preset} ({info['parameters']:,} parameters, context {info['context']}), "
          f"{args.new_tokens} new tokens after {args.prompt_tokens} prompt token(s), greedy, "
          f"{info['device']} ({info['device_name']}, {info['threads']} threads), torch {info['torch']}")
    print(f"{'batch':>5}  {'cache tok/s':>12}  {'recompute tok/s':>16}  {'ratio':>6}")
    for row in rows:
        print(f"{row['batch']:>5}  {row.get('cache', float('nan')):>12,.1f}  "
              f"{row.get('recompute', float('nan')):>16,.1f}  {row.get('ratio', float('nan')):>5.1f}x")
        if "projection_speedup" in row:
            print(f"       cache with the plain output layer: {row['cache-linear']:,.1f} tokens/s; "
                  f"next_token_logits {row['projection_speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
