"""`picollm prepare`: sample, split, tokenize and cache a dataset; print what it holds."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from picollm.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="hf:NAME or a local file/folder (default: hf:roneneldan/TinyStories)")
    parser.add_argument("--text-field", help="column/key holding the story text (default: text)")
    parser.add_argument("--format", help="tinystories|text|jsonl|json|parquet (default: from the extension)")
    parser.add_argument("--hf-split", help="split of an hf: dataset to sample from (default: train)")
    parser.add_argument("--num-stories", type=int, help="seeded random sample of N stories (default: all)")
    parser.add_argument("--split", help="train,val,test ratios over whole stories (default: 0.98,0.01,0.01)")
    parser.add_argument("--seed", type=int, help="seed of the sample and split (default: 0)")
    parser.add_argument("--tokenizer", help="gpt2 or bpe:N, e.g. bpe:4096 (default: gpt2)")
    parser.add_argument("--bpe-train-bytes", type=int,
                        help="most training text read to learn bpe:N (default: 200000000)")
    parser.add_argument("--encoding-errors", choices=("strict", "replace"),
                        help="invalid UTF-8 in local files: fail (strict, default) or replace with U+FFFD")
    parser.add_argument("--num-proc", type=int, help="tokenizer worker processes (default: all cores)")
    parser.add_argument("--cache-dir", help="prepared-data cache root (default: ~/.cache/picollm)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead")


def _parse_split(text: str) -> list[float]:
    try:
        ratios = [float(part) for part in text.split(",")]
    except ValueError:
        ratios = []
    if len(ratios) != 3:
        raise UserError(f"--split {text!r}: give three comma-separated ratios train,val,test, "
                        "e.g. 0.98,0.01,0.01")
    return ratios


def config_from_args(args: argparse.Namespace) -> Any:
    from picollm.config import DataConfig, from_dict

    values: dict[str, Any] = {}
    for name in ("data", "text_field", "format", "hf_split", "num_stories", "seed", "tokenizer",
                 "bpe_train_bytes", "encoding_errors", "num_proc", "cache_dir"):
        value = getattr(args, name)
        if value is not None:
            values[name] = value
    if args.split is not None:
        values["split"] = _parse_split(args.split)
    return from_dict(DataConfig, values, prefix="data")


def summary(data: Any) -> dict[str, Any]:
    meta = data.meta
    return {
        "directory": str(data.directory),
        "cached": data.cached,
        "source": meta["source"],
        "tokenizer": meta["tokenizer"],
        "vocab_size": meta["vocab_size"],
        "eot_id": meta["eot_id"],
        "dtype": meta["dtype"],
        "seed": meta["seed"],
        "num_stories": meta["num_stories"],
        "source_stories": meta["source_stories"],
        "dropped_empty": meta["dropped_empty"],
        "replacements": meta["replacements"],
        "splits": meta["splits"],
        "total": meta["total"],
        "bytes_counted": meta["bytes_counted"],
        "tokens_counted": meta["tokens_counted"],
        "num_proc": meta["num_proc"],
        "tokenize_seconds": meta["tokenize_seconds"],
        "tokens_per_second": meta["tokens_per_second"],
    }


def run(args: argparse.Namespace) -> int:
    from picollm.data.prepare import prepare
    from picollm.data.prepared import SPLITS

    cfg = config_from_args(args)
    data = prepare(cfg, progress=sys.stderr.isatty())
    info = summary(data)
    if args.json:
        print(json.dumps(info))
        return 0
    meta = data.meta
    print(f"prepared {meta['source']} with {meta['tokenizer']} (vocab {meta['vocab_size']:,}, "
          f"{meta['dtype']}) in {data.directory}" + (" (cached)" if data.cached else ""))
    print(f"{'split':<6} {'stories':>10} {'tokens':>14} {'bytes':>15} {'bytes/token':>12}")
    for split in [*SPLITS, "total"]:
        c = meta["total"] if split == "total" else meta["splits"][split]
        bpt = f"{c['bytes_per_token']:.3f}" if c["bytes_per_token"] else "-"
        print(f"{split:<6} {c['stories']:>10,} {c['tokens']:>14,} {c['bytes']:>15,} {bpt:>12}")
    print(f"tokens include one end-of-text per story ({meta['total']['eot_tokens']:,}); "
          f"bytes = UTF-8 bytes of the stories + 1 per story")
    extra = f", {meta['replacements']:,} invalid UTF-8 sequences replaced" if meta["replacements"] else ""
    print(f"{meta['source_stories']:,} stories in the source, {meta['dropped_empty']:,} empty dropped{extra}")
    when = "when built" if data.cached else "now"
    print(f"tokenized at {meta['tokens_per_second']:,.0f} tokens/s with {meta['num_proc']} "
          f"worker{'s' if meta['num_proc'] > 1 else ''} ({when})")
    return 0
