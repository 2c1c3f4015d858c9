"""`picollm models`: the size presets of every family with their parameter counts, or the dimensions of a
family that hit a parameter target.

    picollm models [--vocab-size V] [--json]                      # every preset
    picollm models --family kgram --set input=onehot              # one family's presets, with a field set
    picollm models --family F --params 3.2M [--non-embedding]     # solve for a size
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from picollm.errors import UserError

# counted beside each preset: (column, the fields that make the variant)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"kgram": ("onehot", {"input": "onehot"})}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", help="only this family; required with --params")
    parser.add_argument("--params", metavar="N", help="solve for this many parameters, e.g. 3.2M, 110M, 7e6")
    parser.add_argument("--non-embedding", action="store_true",
                        help="with --params: count without the embeddings and the output layer")
    parser.add_argument("--vocab-size", default="50257", metavar="V", help="vocabulary size (default 50257)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="fields",
                        help="a model field to hold (e.g. k=4, input=onehot, n_layers=4, context_length=512)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _fields(items: list[str]) -> dict[str, Any]:
    from picollm.config import parse_value

    fields: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: write KEY=VALUE, e.g. --set k=4")
        fields[key.strip()] = parse_value(value)
    return fields


def _vocab_size(text: str) -> int:
    try:
        vocab = int(text)
    except ValueError:
        raise UserError(f"--vocab-size {text!r} is not an integer") from None
    if vocab < 2:
        raise UserError(f"--vocab-size must be at least 2, got {vocab}")
    return vocab


def _dims(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in fields.items() if k != "family")


def _list(families: list[Any], vocab: int, fields: dict[str, Any]) -> dict[str, Any]:

    from picollm.models.sizing import count_parameters

    rows = []
    for fam in families:
        known = {f.name for f in dataclasses.fields(fam.config_cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise UserError(f"--set {unknown[0]}: not a field of family '{fam.name}'; add --family to list "
                            "one family's presets")
        for preset, preset_fields in fam.presets.items():
            spec = {"family": fam.name, **preset_fields, **fields, "vocab_size": vocab}
            row: dict[str, Any] = {
                "family": fam.name, "preset": preset, "name": f"{fam.name}-{preset}",
                "fields": {**preset_fields, **fields},
                "parameters": count_parameters(spec),
                "non_embedding_parameters": count_parameters(spec, non_embedding=True),
            }
            if fam.name in VARIANTS:
                column, variant = VARIANTS[fam.name]
                row[f"{column}_parameters"] = count_parameters({**spec, **variant})
            rows.append(row)
    return {"vocab_size": vocab, "presets": rows}


def _print_list(result: dict[str, Any]) -> None:
    rows = result["presets"]
    extra = sorted({k for r in rows for k in r if k.endswith("_parameters")} - {"non_embedding_parameters"})
    print(f"vocab size {result['vocab_size']:,}")
    header = ["name", "dimensions", "parameters", "non-embedding"]
    header += [k.removesuffix("_parameters") for k in extra]
    table = [[r["name"], _dims(r["fields"]), f"{r['parameters']:,}", f"{r['non_embedding_parameters']:,}",
              *[f"{r[k]:,}" if k in r else "" for k in extra]] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *table, strict=True)]
    for line in [header, *table]:
        cells = [c.ljust(w) if i < 2 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        print("  ".join(cells).rstrip())
    if any(r["family"] in VARIANTS and "input" not in r["fields"] for r in rows):
        print("k-gram counts use k=3 and input 'scaled'; the onehot column has one embedding table per "
              "context position (input 'onehot').")


def run(args: argparse.Namespace) -> int:
    from picollm.models.registry import families, get_family
    from picollm.models.sizing import count_parameters, parse_count, solve

    vocab = _vocab_size(args.vocab_size)
    fields = _fields(args.fields)
    if args.params is None:
        if args.non_embedding:
            raise UserError("--non-embedding goes with --params (the listing shows both counts)")
        chosen = [get_family(args.family)] if args.family else families()
        result = _list(chosen, vocab, fields)
        if args.json:
            print(json.dumps(result))
        else:
            _print_list(result)
        return 0

    if not args.family:
        raise UserError("--params needs --family (one of: " + ", ".join(f.name for f in families()) + ")")
    target = parse_count(args.params)
    solved = solve(args.family, target, vocab_size=vocab, non_embedding=args.non_embedding, base=fields)
    spec = {**solved, "vocab_size": vocab}
    total = count_parameters(spec)
    non_embedding = count_parameters(spec, non_embedding=True)
    achieved = non_embedding if args.non_embedding else total
    result = {
        "family": args.family, "target": target, "non_embedding": args.non_embedding, "vocab_size": vocab,
        "fields": {k: v for k, v in solved.items() if k != "family"},
        "parameters": total, "non_embedding_parameters": non_embedding,
        "relative_error": (achieved - target) / target,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    what = "non-embedding parameters" if args.non_embedding else "parameters"
    print(f"{args.family} with {target:,} {what} at vocab size {vocab:,}:")
    print(f"  {_dims(result['fields'])}")
    print(f"  parameters {total:,}, non-embedding {non_embedding:,} "
          f"({result['relative_error']:+.2%} from the target)")
    return 0
