"""Training speed variants and the fp32-vs-bf16 loss curve, for docs/performance.md.

`picollm bench` compares picollm's step in one dtype with the plain baseline; this script measures what
the verb does not: several variants side by side (dtypes, the OpenMP wait policy), and real training
runs' loss curves.

    python benchmarks/bench_training.py speed [--presets pico,tiny] [--batch 16] [--reps 3]
    python benchmarks/bench_training.py curve --data ../shared/data/tinystories-sample.txt
        [--families transformer,lstm,kgram] [--steps 150]

`speed`: for each family x preset at the GPT-2 vocabulary, the plain baseline (fp32, full logits), and
picollm's step in fp32 and in bf16, each also with `OMP_WAIT_POLICY=PASSIVE` where named so: fresh
bench worker processes (`picollm.bench.worker`) per config stepping in turn (ABBA...), median step,
peak RSS. It separates what the
chunked loss, bf16 and the OpenMP wait policy each bring.

`curve`: real short training runs on `--data` (the TinyStories sample; GPT-2 tokenizer) with `picollm.train`, the
same recipe in fp32 (seeds 0 and 1: the seed-to-seed difference is the noise) and in bf16 (seed 0);
prints the train and validation losses side by side, and re-evaluates every final model in fp32 on the
validation split so that the comparison does not depend on the evaluation dtype.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from picollm.bench.worker import Worker, WorkerSpec, alternate
from picollm.bench.workloads import model_spec
from picollm.checkpoint import load_model
from picollm.config import DataConfig, from_dict
from picollm.data.prepare import prepare
from picollm.evaluation import evaluate_tokens
from picollm.models.registry import preset_fields
from picollm.training.trainer import train

# idle OpenMP threads sleep instead of spinning: a win when other jobs share the cores, a loss on an idle
# machine (docs/performance.md has the figures), so picollm leaves it to the user
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}
DEFAULT = {"OMP_WAIT_POLICY": None}
VARIANTS = {
    # name: (worker kind, dtype, OpenMP environment)
    "baseline": ("baseline", "fp32", DEFAULT),
    "baseline+passive": ("baseline", "fp32", PASSIVE),
    "picollm-fp32": ("picollm", "fp32", DEFAULT),
    "picollm-bf16": ("picollm", "bf16", DEFAULT),
    "picollm-bf16+passive": ("picollm", "bf16", PASSIVE),
}


def speed(args: argparse.Namespace) -> list[dict]:
    rows = []
    names = [v for v in args.variants.split(",") if v]
    for preset in args.presets.split(","):
        for family in args.families.split(","):
            spec = model_spec(family, preset, args.vocab, args.context)
            workers = {}
            try:
                for name in names:
                    kind, dtype, env = VARIANTS[name]
                    workers[name] = Worker(WorkerSpec(kind=kind, model=spec, batch=args.batch, context=args.context,
                                                      dtype=dtype, chunk_tokens=args.chunk_tokens,
                                                      threads=args.threads, env=env))
                steps = alternate(workers, "step", args.reps)
                row = {"family": family, "preset": preset, "vocab": args.vocab, "batch": args.batch}
                for name, replies in steps.items():
                    secs = statistics.median(r["seconds"] for r in replies)
                    row[name] = {"tokens_per_s": args.batch * args.context / secs,
                                 "peak_rss_mb": workers[name].call("stats")["peak_rss_mb"]}
            finally:
                for w in workers.values():
                    w.close()
            base = row[names[0]]["tokens_per_s"]
            print(f"{family}-{preset}: " + ", ".join(
                f"{n} {row[n]['tokens_per_s']:,.0f} tok/s ({row[n]['tokens_per_s'] / base:.2f}x, "
                f"{row[n]['peak_rss_mb']:,.0f} MB)" for n in names), flush=True)
            rows.append(row)
    return rows


def _run(family: str, preset: str, dtype: str, seed: int, args: argparse.Namespace, root: Path, data: dict) -> dict:
    out = root / f"{family}-{preset}-{dtype}-s{seed}"
    cfg = {"data": data, "model": preset_fields(f"{family}-{preset}"),
           "train": {"batch_size": args.batch, "max_steps": args.steps, "eval_interval": args.eval_interval,
                     "eval_batches": 8, "ckpt_interval": 0, "log_interval": args.eval_interval, "sample_tokens": 0,
                     "dtype": dtype, "seed": seed, "lr": args.lr},
           "out": str(out)}
    start = time.perf_counter()
    result = train(cfg, progress=False)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_loss = {r["step"]: r["train_loss"] for r in rows if r["kind"] == "train"}
    val_loss = {r["step"]: r["val_loss"] for r in rows if r["kind"] == "eval"}
    return {"dir": str(out), "wall_s": wall, "train": train_loss, "val": val_loss, "summary": result.summary}


def _fp32_val(run_dir: str, data_cfg: dict) -> float:
    model = load_model(Path(run_dir) / "final")
    prepared = prepare(from_dict(DataConfig, data_cfg), progress=False)
    return evaluate_tokens(model, prepared.tokens("val"), 256, batch_size=16, dtype="fp32").nll


def curve(args: argparse.Namespace) -> list[dict]:
    sample = Path(args.data)
    if not sample.is_file():
        sys.exit(f"--data: no such file {sample}")
    root = Path(args.out or tempfile.mkdtemp(prefix="picollm-curve-"))
    data = {"data": str(sample), "tokenizer": "gpt2", "cache_dir": str(root / "cache")}
    results = []
    for family in args.families.split(","):
        runs = {}
        for dtype, seed in (("fp32", 0), ("bf16", 0), ("fp32", 1)):
            r = _run(family, args.preset, dtype, seed, args, root, data)
            r["fp32_final_val"] = _fp32_val(r["dir"], data)
            runs[f"{dtype}-s{seed}"] = r
            print(f"{family}-{args.preset} {dtype} seed {seed}: {r['wall_s']:.0f} s, final val (fp32 eval) "
                  f"{r['fp32_final_val']:.4f}", flush=True)
        a, b, c = runs["fp32-s0"], runs["bf16-s0"], runs["fp32-s1"]
        print(f"\n{family}-{args.preset}, batch {args.batch} x 256, lr {args.lr}, {args.steps} steps")
        print("step | val fp32 s0 | val bf16 s0 | val fp32 s1 | bf16 - fp32 s0 | fp32 s1 - fp32 s0")
        for step in sorted(a["val"]):
            print(f"{step} | {a['val'][step]:.4f} | {b['val'][step]:.4f} | {c['val'][step]:.4f} | "
                  f"{b['val'][step] - a['val'][step]:+.4f} | {c['val'][step] - a['val'][step]:+.4f}")
        steps = sorted(a["val"])
        bf16_gap = max(abs(b["val"][s] - a["val"][s]) for s in steps)
        seed_gap = max(abs(c["val"][s] - a["val"][s]) for s in steps)
        row = {"family": family, "preset": args.preset, "batch": args.batch, "steps": args.steps, "lr": args.lr,
               "val": {k: r["val"] for k, r in runs.items()}, "train": {k: r["train"] for k, r in runs.items()},
               "fp32_final_val": {k: r["fp32_final_val"] for k, r in runs.items()},
               "wall_s": {k: r["wall_s"] for k, r in runs.items()},
               "max_abs_val_gap_bf16": bf16_gap, "max_abs_val_gap_seed": seed_gap}
        print(f"max |val bf16 - val fp32| = {bf16_gap:.4f}; max |val seed 1 - val seed 0| = {seed_gap:.4f}; "
              f"wall fp32 {a['wall_s']:.0f} s vs bf16 {b['wall_s']:.0f} s\n", flush=True)
        results.append(row)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--families", default="lstm,kgram,transformer")
    s.add_argument("--presets", default="pico,tiny")
    s.add_argument("--variants", default=",".join(VARIANTS))
    s.add_argument("--vocab", type=int, default=50257)
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--context", type=int, default=256)
    s.add_argument("--reps", type=int, default=3)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--chunk-tokens", type=int, default=4096)
    c = sub.add_parser("curve")
    c.add_argument("--families", default="transformer,lstm,kgram")
    c.add_argument("--preset", default="tiny")
    c.add_argument("--steps", type=int, default=150)
    c.add_argument("--batch", type=int, default=16)
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--eval-interval", type=int, default=25)
    c.add_argument("--data", required=True, metavar="PATH", help="the text to train on (the TinyStories sample)")
    c.add_argument("--out", default=None, help="where the runs go (default: a temporary folder, kept)")
    for p in (s, c):
        p.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    rows = speed(args) if args.what == "speed" else curve(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
