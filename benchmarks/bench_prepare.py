"""Benchmark `prepare`: tokenization throughput for several worker counts on a larger corpus, and peak memory.

`picollm bench --data PATH` measures one `prepare` of the file as it is; this script measures what the
verb does not: the file repeated into a larger corpus, and each worker count in turn. Run on demand
(not a test):

    python benchmarks/bench_prepare.py --data ../shared/data/tinystories-sample.txt [--repeat 20]
        [--tokenizer gpt2] [--workers 1,2]

The corpus is `--data` repeated `--repeat` times, written to a temporary file that is deleted
afterwards (for timing only). Each measurement runs in a fresh bench worker process
(`picollm.bench.worker`) with a fresh cache, so peak RSS is that run's own: the main process, and
separately the largest worker. `baseline` is the RSS after imports, before preparing; a gpt2 tokenizer
is loaded before the clock starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from picollm.bench.worker import Worker, WorkerSpec

EOT = b"\n<|endoftext|>\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, metavar="PATH", help="the text to repeat (the TinyStories sample)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--tokenizer", default="gpt2")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    args = parser.parse_args(argv)
    sample_path = Path(args.data)
    if not sample_path.is_file():
        sys.exit(f"--data: no such file {sample_path}")
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        sample = sample_path.read_bytes()
        if not sample.endswith(EOT):
            sample += EOT  # the sample's last story is cut off; close it
        with open(corpus, "wb") as f:
            for _ in range(args.repeat):
                f.write(sample)
        print(f"corpus: {sample_path.name} x{args.repeat} = {corpus.stat().st_size / 1e6:.1f} MB, "
              f"tokenizer {args.tokenizer}, {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        for workers in [int(w) for w in args.workers.split(",")]:
            with Worker(WorkerSpec(kind="prepare")) as worker:
                r = worker.call("prepare", data=str(corpus), tokenizer=args.tokenizer,
                                cache_dir=str(Path(tmp) / f"cache-{workers}"), num_proc=workers, warm_tokenizer=True)
            megabytes = r["bytes"] / 1e6
            bpe = f", bpe training {r['bpe_seconds']:.1f} s" if r["bpe_seconds"] is not None else ""
            print(f"workers={r['num_proc']}: {r['tokenize_mb_per_s']:.2f} MB/s, "
                  f"{r['tokens_per_s'] / 1e6:.2f} M tokens/s (tokenizing {megabytes:.1f} MB, "
                  f"{r['tokens']:,} tokens in {r['tokenize_seconds']:.1f} s; whole prepare "
                  f"{r['wall_seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU = "
                  f"{megabytes / r['cpu_seconds']:.1f} MB per CPU-second{bpe}); peak RSS main "
                  f"{r['peak_rss_mb']:.0f} MB (baseline after imports {r['baseline_rss_mb']:.0f} MB), "
                  f"largest worker {r['worker_peak_rss_mb']:.0f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
