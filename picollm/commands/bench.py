"""`picollm bench [--quick] [--json PATH]`: training, evaluation, generation and data-preparation speed,
picollm against a plain PyTorch baseline measured alternately in the same run, with PASS/FAIL targets.

See `picollm/bench/` for what is measured and docs/performance.md for the latest figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from picollm.bench.options import FAMILIES, PARTS, VOCABS, Options, quick_options
from picollm.errors import UserError
from picollm.models.registry import PRESET_NAMES


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="pico and tiny presets, batch 16 x 256, under 10 minutes on 2 cores")
    parser.add_argument("--json", metavar="PATH", help="write every figure and the targets to PATH")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default=None,
                        help="picollm's autocast dtype (default: the trainer's default, train.dtype)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences per training step (default: 64; 16 with --quick)")
    parser.add_argument("--context", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--reps", type=int, default=None, help="measured steps per path (default 3)")
    parser.add_argument("--families", type=_csv, default=None, help="comma-separated (default: lstm,kgram,transformer)")
    parser.add_argument("--presets", type=_csv, default=None,
                        help="comma-separated (default: pico,tiny,small; pico,tiny with --quick)")
    parser.add_argument("--vocabs", type=_csv, default=None, help="comma-separated: gpt2, bpe:4096 (default both)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--chunk-tokens", type=int, default=None,
                        help="picollm's loss chunk (default: the trainer's train.loss_chunk_tokens)")
    parser.add_argument("--skip", type=_csv, default=(), help=f"parts to leave out: {','.join(PARTS)}")
    parser.add_argument("--data", metavar="PATH", default=None,
                        help="text to prepare for the MB/s figure, e.g. the TinyStories sample "
                             "(without it, the data-preparation part is skipped)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cpu: every CPU target; cuda: bf16 + compile for the small and base Transformers")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="cuda: leave out torch.compile")
    parser.add_argument("--gpu-batch", type=int, default=32, help="cuda: sequences per step (default 32)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the figures as Markdown tables to PATH")
    parser.add_argument("--strict", action="store_true", help="exit with status 3 when any target FAILs")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: toy models, seconds


def options_from_args(args: argparse.Namespace) -> Options:
    unknown = [p for p in args.skip if p not in PARTS]
    if unknown:
        raise UserError(f"--skip: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    for flag, value in (("--batch-size", args.batch_size), ("--reps", args.reps), ("--threads", args.threads),
                        ("--context", args.context), ("--gpu-batch", args.gpu_batch)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.data is not None and not Path(args.data).is_file():
        raise UserError(f"--data: no such file {args.data}; pass a text file to prepare (the TinyStories sample)")
    fields = {"context": args.context, "threads": args.threads, "dtype": args.dtype, "device": args.device,
              "skip": tuple(args.skip), "data": args.data,
              "chunk_tokens": args.chunk_tokens, "gpu_batch": args.gpu_batch, "gpu_compile": args.compile}
    for name in ("batch_size", "reps", "families", "presets", "vocabs"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    if args.tiny:
        fields.update(tiny_smoke=True, gen_presets=("pico",), gen_new_tokens=4, gen_prompt_tokens=4,
                      kgram_loop_batch=1, kgram_loop_context=4, context=min(args.context, 16), target_vocab=4096,
                      prepare_tokenizers=("gpt2",))
        fields.setdefault("presets", ("pico",))
        fields.setdefault("vocabs", ("bpe:4096",))
        fields.setdefault("batch_size", 2)
        fields.setdefault("reps", 1)
    opts = quick_options(**fields) if args.quick else Options(**fields)
    for fam in opts.families:
        if fam not in FAMILIES:
            raise UserError(f"--families: unknown family '{fam}'; choose from {', '.join(FAMILIES)}")
    for preset in opts.presets:
        if preset not in PRESET_NAMES:
            raise UserError(f"--presets: unknown preset '{preset}'; choose from {', '.join(PRESET_NAMES)}")
    for vocab in opts.vocabs:
        if vocab not in VOCABS:
            raise UserError(f"--vocabs: unknown vocabulary '{vocab}'; choose from {', '.join(VOCABS)}")
    return opts


def run(args: argparse.Namespace) -> int:
    import torch

    from picollm.bench.markdown import markdown
    from picollm.bench.suite import run_bench
    from picollm.errors import UserError
    from picollm.fileio import check_writable_file

    opts = options_from_args(args)
    for flag, path in (("--json", args.json), ("--markdown", args.markdown)):
        if path is not None:
            check_writable_file(path, flag)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: CUDA is not available here")
    result = run_bench(opts)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    if args.markdown:
        Path(args.markdown).write_text(markdown(result) + "\n", encoding="utf-8")
        print(f"wrote {args.markdown}")
    if args.strict and not all(t["pass"] for t in result["targets"]):
        return 3
    return 0
