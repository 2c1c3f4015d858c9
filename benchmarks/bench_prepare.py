"""Benchmark `prepare`: tokenization throughput with 1 and 2 workers, and peak memory.

Run on demand (not a test):

    python benchmarks/bench_prepare.py [--repeat 20] [--tokenizer gpt2] [--workers 1,2]

The corpus is the TinyStories sample (../shared/data/tinystories-sample.txt) repeated `--repeat`
times, written to a temporary file that is deleted afterwards (for timing only). Each measurement runs
in a fresh subprocess with a fresh cache, so peak RSS (ru_maxrss) is that run's own: the main process,
and separately the largest worker. `baseline` is the RSS after imports, before preparing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "tinystories-sample.txt"


def _rss_mb(who: int) -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / (1 << 20)
    return resource.getrusage(who).ru_maxrss * scale


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    except OSError:
        return float("nan")


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the workers)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def one(corpus: str, tokenizer: str, workers: int, cache: str) -> None:
    """Child: prepare once and print one JSON line of figures."""
    from picollm.config import DataConfig
    from picollm.data.prepare import prepare
    from picollm.data.tokenizer import get_tokenizer

    if tokenizer == "gpt2":
        get_tokenizer("gpt2")  # load outside the timed part, as a warm process would have it
    baseline = _current_rss_mb()
    cpu0 = _cpu_seconds()
    start = time.perf_counter()
    data = prepare(DataConfig(data=corpus, tokenizer=tokenizer, num_proc=workers, cache_dir=cache),
                   progress=False)
    wall = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu0
    meta = data.meta
    print(json.dumps({
        "tokenizer": tokenizer, "workers": meta["num_proc"], "stories": meta["total"]["stories"],
        "megabytes": meta["total"]["bytes"] / 1e6, "tokens": meta["total"]["tokens"],
        "tokenize_seconds": meta["tokenize_seconds"], "mb_per_s": meta["megabytes_per_second"],
        "tokens_per_s": meta["tokens_per_second"], "wall_seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "bpe_seconds": (meta["bpe"] or {}).get("seconds"),
        "baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(_rss_mb(resource.RUSAGE_SELF), 1),
        "worker_peak_rss_mb": round(_rss_mb(resource.RUSAGE_CHILDREN), 1),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--tokenizer", default="gpt2")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--one", nargs=4, metavar=("CORPUS", "TOKENIZER", "WORKERS", "CACHE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        corpus, tokenizer, workers, cache = args.one
        one(corpus, tokenizer, int(workers), cache)
        return
    if not SAMPLE.is_file():
        sys.exit(f"the TinyStories sample is expected at {SAMPLE}")
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        sample = SAMPLE.read_bytes()
        if not sample.endswith(b"\n<|endoftext|>\n"):
            sample += b"\n<|endoftext|>\n"  # the sample's last story is cut off; close it
        with open(corpus, "wb") as f:
            for _ in range(args.repeat):
                f.write(sample)
        print(f"corpus: the sample x{args.repeat} = {corpus.stat().st_size / 1e6:.1f} MB, "
              f"tokenizer {args.tokenizer}, {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        for workers in [int(w) for w in args.workers.split(",")]:
            cache = Path(tmp) / f"cache-{workers}"
            result = subprocess.run(
                [sys.executable, __file__, "--one", str(corpus), args.tokenizer, str(workers), str(cache)],
                capture_output=True, text=True, check=True)
            r = json.loads(result.stdout.strip().splitlines()[-1])
            bpe = f", bpe training {r['bpe_seconds']:.1f} s" if r["bpe_seconds"] is not None else ""
            print(f"workers={r['workers']}: {r['mb_per_s']:.2f} MB/s, "
                  f"{r['tokens_per_s'] / 1e6:.2f} M tokens/s (tokenizing {r['megabytes']:.1f} MB, "
                  f"{r['tokens']:,} tokens in {r['tokenize_seconds']:.1f} s; whole prepare "
                  f"{r['wall_seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU = "
                  f"{r['megabytes'] / r['cpu_seconds']:.1f} MB per CPU-second{bpe}); peak RSS main "
                  f"{r['peak_rss_mb']:.0f} MB (baseline after imports {r['baseline_rss_mb']:.0f} MB), "
                  f"largest worker {r['worker_peak_rss_mb']:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
