"""`Bench`: one `picollm bench` run, part by part (matmul peaks, training, generation, the k-gram loop,
data preparation, GPU), each printing its figures as it goes; then the targets.

Every figure is a ratio of two paths measured side by side in the same run, in fresh worker processes
taking their turns (picollm.bench.worker); docs/performance.md has the protocol and the latest figures.
"""

from __future__ import annotations

import datetime
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from picollm import __version__
from picollm.bench.machine import baseline_fits, load_average, machine_info, matmul_peak_gflops
from picollm.bench.options import VOCABS, Options
from picollm.bench.targets import GPU_MFU_BASE, cpu_targets, target, target_line
from picollm.bench.worker import Worker, WorkerError, WorkerSpec, alternate
from picollm.bench.workloads import model_facts, model_spec
from picollm.config import TrainConfig
from picollm.device import native_bf16, resolve_dtype

SCHEMA = "picollm.bench/1"
KGRAM_VEC_STEPS = 5  # vectorised steps per loop step in the k-gram comparison, so both take similar time


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def emit(text: str) -> None:
    print(text, flush=True)


class Bench:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        defaults = TrainConfig()
        self.dtype = resolve_dtype(opts.dtype or defaults.dtype, opts.device)
        self.chunk_tokens = defaults.loss_chunk_tokens if opts.chunk_tokens is None else opts.chunk_tokens
        self.result: dict[str, Any] = {}
        self.targets: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    def _spec(self, kind: str, model: dict[str, Any], batch: int, context: int, **extra: Any) -> WorkerSpec:
        return WorkerSpec(kind=kind, model=model, batch=batch, context=context, dtype=self.dtype,
                          chunk_tokens=self.chunk_tokens, threads=self.opts.threads, device=self.opts.device, **extra)

    def _add_target(self, t: dict[str, Any]) -> None:
        self.targets.append(t)
        emit(target_line(t))

    # -- parts
    def peaks(self) -> None:
        o = self.opts
        if o.threads:
            torch.set_num_threads(o.threads)
        size = 256 if o.tiny_smoke else None
        self.result["matmul_peak_gflops"] = p = {
            "fp32": round(matmul_peak_gflops("fp32", "cpu", size), 2),
            "bf16": round(matmul_peak_gflops("bf16", "cpu", size), 2),
            "size": size or 2048, "threads": torch.get_num_threads(),
        }
        emit(f"matmul peak ({p['size']}x{p['size']}, {p['threads']} threads): fp32 {p['fp32']:.1f} GFLOP/s, "
             f"bf16 {p['bf16']:.1f} GFLOP/s")

    def training(self) -> None:
        o = self.opts
        emit(f"training: batch {o.batch_size} x context {o.context}, picollm dtype {self.dtype}, loss chunk "
             f"{self.chunk_tokens}, threads {o.threads or 'torch default'} (both paths); "
             f"baseline: fp32, full logits, F.cross_entropy, torch.optim.AdamW; "
             f"{o.reps} alternating (ABBA) steps each after 1 warm-up, median")
        for vocab_name in o.vocabs:
            for preset in o.presets:
                for family in o.families:
                    row = self.train_config(family, preset, vocab_name)
                    self.result.setdefault("configs", []).append(row)
                    emit(train_line(row))

    def train_config(self, family: str, preset: str, vocab_name: str) -> dict[str, Any]:
        """One family x preset x vocabulary: picollm and the baseline in two fresh workers, stepping in turn;
        picollm's worker also evaluates after each of its steps."""
        o = self.opts
        V = VOCABS[vocab_name]
        spec = model_spec(family, preset, V, o.context, o.tiny_smoke)
        row: dict[str, Any] = {"family": family, "preset": preset, "vocab": V, "tokenizer": vocab_name,
                               "batch": o.batch_size, "context": o.context, **model_facts(spec, o.context)}
        tokens = o.batch_size * o.context
        peak = self.result.get("matmul_peak_gflops", {})
        workers: dict[str, Worker] = {}
        evals: list[dict[str, Any]] = []

        def between(name: str) -> None:
            if name == "picollm" and "eval" not in o.skip:
                evals.append(workers["picollm"].call("eval"))

        try:
            workers["picollm"] = Worker(self._spec("picollm", spec, o.batch_size, o.context,
                                                   eval_windows=o.batch_size))
            if baseline_fits(o.batch_size, o.context, V):
                workers["baseline"] = Worker(self._spec("baseline", spec, o.batch_size, o.context))
            else:
                row["baseline_skipped"] = "not enough free memory for the full logits"
            steps = alternate(workers, "step", o.reps, between=between)
            for name, replies in steps.items():
                secs = median([r["seconds"] for r in replies])
                stats = workers[name].call("stats")
                dtype = self.dtype if name == "picollm" else "fp32"
                entry = {"tokens_per_s": tokens / secs, "step_seconds": secs,
                         "step_seconds_all": [round(r["seconds"], 4) for r in replies],
                         "loss": replies[-1]["loss"], "dtype": dtype,
                         "peak_rss_mb": round(stats["peak_rss_mb"], 1), "rss_ready_mb": round(stats["rss_ready_mb"], 1)}
                gflops = row["flops_per_token"] * entry["tokens_per_s"] / 1e9
                entry["model_gflops"] = gflops
                if peak:
                    entry["mfu"] = gflops / peak["bf16" if dtype == "bf16" else "fp32"]
                    entry["mfu_vs_fp32_peak"] = gflops / peak["fp32"]
                    entry["mfu_vs_bf16_peak"] = gflops / peak["bf16"]
                row[name] = entry
        finally:
            for w in workers.values():
                w.close()
        if "baseline" in row:
            row["speedup"] = row["picollm"]["tokens_per_s"] / row["baseline"]["tokens_per_s"]
            row["memory_ratio"] = row["picollm"]["peak_rss_mb"] / row["baseline"]["peak_rss_mb"]
        if evals:
            esecs = median([e["seconds"] for e in evals])
            row["eval"] = {"tokens_per_s": evals[0]["tokens"] / esecs, "seconds": esecs,
                           "tokens": evals[0]["tokens"], "dtype": self.dtype}
            row["eval_over_train"] = row["eval"]["tokens_per_s"] / row["picollm"]["tokens_per_s"]
        return row

    def generation(self) -> None:
        """Transformer generation with the KV cache (prefill + decode) vs recomputing the window at every
        step, alternately in one worker. The target is read at transformer-small: at pico and tiny the
        GPT-2 output layer, which both modes compute once per new token, is most of the work."""
        o = self.opts
        emit(f"generation: transformer, V=50257, batch {o.gen_batch}, prompt {o.gen_prompt_tokens} + "
             f"{o.gen_new_tokens} new tokens (greedy, no stop), cache vs recompute alternately, "
             f"{o.gen_reps} run(s) each, median")
        rows = self.result.setdefault("generation", [])
        for preset in o.gen_presets:
            spec = model_spec("transformer", preset, 50257, o.context, o.tiny_smoke)
            args = dict(batch=o.gen_batch, prompt_tokens=o.gen_prompt_tokens)
            results: dict[str, list[float]] = {"cache": [], "recompute": []}
            with Worker(self._spec("model", spec, 1, o.context)) as worker:
                for use_cache in (True, False):  # warm-up
                    worker.call("generate", use_cache=use_cache, new_tokens=4, **args)
                for r in range(o.gen_reps):
                    for use_cache in ((True, False) if r % 2 == 0 else (False, True)):
                        reply = worker.call("generate", use_cache=use_cache, new_tokens=o.gen_new_tokens, **args)
                        results["cache" if use_cache else "recompute"].append(reply["tokens"] / reply["seconds"])
            cache, recompute = median(results["cache"]), median(results["recompute"])
            rows.append({"family": "transformer", "preset": preset, "vocab": 50257, "batch": o.gen_batch,
                         "prompt_tokens": o.gen_prompt_tokens, "new_tokens": o.gen_new_tokens,
                         "cache_tokens_per_s": cache, "recompute_tokens_per_s": recompute,
                         "ratio": cache / recompute, **model_facts(spec, o.context)})
            emit(f"  transformer-{preset}: cache {cache:,.1f} tok/s, recompute {recompute:,.1f} tok/s: "
                 f"{cache / recompute:.1f}x")

    def kgram_loop(self) -> None:
        """The k-gram's vectorised step against the classic per-position loop (`kgram_loop_loss`) on a
        small case, the same model and batch in both. The target compares forward + backward, as the
        issue states it; the whole step with the optimizer (AdamW in both) is reported beside it."""
        o = self.opts
        B, T = o.kgram_loop_batch, o.kgram_loop_context
        V = 50257 if not o.tiny_smoke else 300
        spec = {"family": "kgram", "input": "onehot", "k": 3, "embed_dim": 32, "hidden_size": 32,
                "inner_layers": 1, "vocab_size": V, "context_length": T}
        emit(f"k-gram: vectorised vs the per-position Python loop, kgram-pico one-hot (k 3), V={V}, batch {B} x {T}, "
             f"AdamW in both; in turn (one loop step, then {KGRAM_VEC_STEPS} vectorised), after a warm-up, median")
        results: dict[str, list[dict[str, Any]]] = {"vectorised": [], "loop": []}
        with Worker(self._spec("picollm", spec, B, T, time_backward=True)) as vec, \
                Worker(self._spec("kgram_loop", spec, B, T, time_backward=True)) as loop:
            vec.call("step")
            loop.call("step", rows=1)  # a warm-up on one sequence: the loop's cost is per position
            for _ in range(max(2, o.reps - 1)):
                results["loop"].append(loop.call("step"))
                results["vectorised"] += [vec.call("step") for _ in range(KGRAM_VEC_STEPS)]
        tokens = B * T
        out: dict[str, Any] = {"model": spec, "batch": B, "context": T, "dtype": self.dtype}
        for name, replies in results.items():
            out[f"{name}_tokens_per_s"] = tokens / median([r["seconds"] for r in replies])
            out[f"{name}_fwd_bwd_tokens_per_s"] = tokens / median([r["fwd_bwd_seconds"] for r in replies])
        out["speedup"] = out["vectorised_fwd_bwd_tokens_per_s"] / out["loop_fwd_bwd_tokens_per_s"]
        out["speedup_with_optimizer"] = out["vectorised_tokens_per_s"] / out["loop_tokens_per_s"]
        self.result["kgram_loop"] = out
        emit(f"  forward+backward: vectorised {out['vectorised_fwd_bwd_tokens_per_s']:,.0f} tok/s, loop "
             f"{out['loop_fwd_bwd_tokens_per_s']:,.1f} tok/s: {out['speedup']:,.0f}x; whole step with AdamW: "
             f"{out['vectorised_tokens_per_s']:,.0f} vs {out['loop_tokens_per_s']:,.1f} tok/s: "
             f"{out['speedup_with_optimizer']:,.0f}x")

    def prepare(self) -> None:
        """`picollm.data.prepare` of `--data` into a fresh cache, in a fresh worker per tokenizer. Without
        `--data` the part is skipped: its MB/s is only worth quoting on real text."""
        o = self.opts
        if not o.data:
            self.result["data_preparation"] = {"skipped": "no --data PATH given"}
            emit("data preparation: skipped (no --data PATH given; pass the TinyStories sample to measure it)")
            return
        data = Path(o.data)
        rows = []
        for tokenizer in o.prepare_tokenizers:
            try:
                with tempfile.TemporaryDirectory(prefix="picollm-bench-") as tmp, \
                        Worker(WorkerSpec(kind="prepare", threads=o.threads)) as worker:
                    r = worker.call("prepare", data=str(data), tokenizer=tokenizer, cache_dir=tmp)
            except WorkerError as exc:  # the figures measured so far still count: say so, carry on
                rows.append({"tokenizer": tokenizer, "error": str(exc).splitlines()[0]})
                emit(f"data preparation ({tokenizer}): failed: {exc}")
                continue
            rows.append(r)
            tk = r.get("tokenize_mb_per_s")
            emit(f"data preparation ({tokenizer}, {data.name}, {r['bytes'] / 1e6:.1f} MB, {r['num_proc']} workers): "
                 f"{r['mb_per_s']:.2f} MB/s whole prepare" + (f", {tk:.2f} MB/s tokenizing" if tk else ""))
        self.result["data_preparation"] = rows

    def gpu(self) -> None:
        """bf16 autocast + torch.compile for the larger Transformers, MFU against the GPU's measured bf16
        matmul peak. Only where CUDA is available."""
        if not torch.cuda.is_available():
            self.result["gpu"] = {"skipped": "no CUDA device"}
            return
        o = self.opts
        peak = matmul_peak_gflops("bf16", "cuda")
        rows = []
        for preset in o.gpu_presets:
            spec = model_spec("transformer", preset, 50257, o.context)
            facts = model_facts(spec, o.context)
            with Worker(WorkerSpec(kind="picollm", model=spec, batch=o.gpu_batch, context=o.context, dtype="bf16",
                                   chunk_tokens=self.chunk_tokens, device="cuda", compile=o.gpu_compile)) as w:
                for _ in range(3):  # compilation and autotuning
                    w.call("step")
                secs = median([w.call("step")["seconds"] for _ in range(max(5, o.reps))])
                stats = w.call("stats")
            tps = o.gpu_batch * o.context / secs
            mfu = tps * facts["flops_per_token"] / 1e9 / peak
            rows.append({"preset": preset, "batch": o.gpu_batch, "context": o.context, **facts, "tokens_per_s": tps,
                         "mfu": mfu, "cuda_peak_mb": stats.get("cuda_peak_mb"), "compile": o.gpu_compile})
            emit(f"gpu transformer-{preset}: {tps:,.0f} tok/s, MFU {mfu:.1%} of {peak / 1e3:.0f} TFLOP/s bf16")
            if preset == "base":
                self._add_target(target("gpu_mfu_transformer_base", mfu, GPU_MFU_BASE, unit="",
                                        detail="bf16 + compile on " + torch.cuda.get_device_name(0)))
        self.result["gpu"] = {"device": torch.cuda.get_device_name(0), "bf16_peak_gflops": peak, "rows": rows}

    def run(self) -> dict[str, Any]:
        o = self.opts
        self.result.update({
            "schema": SCHEMA, "picollm": __version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["picollm", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else None,
            "machine": machine_info() | {"native_bf16": native_bf16(o.device)},
            "settings": {k: v for k, v in asdict(o).items() if k != "notes"} | {
                "picollm_dtype": self.dtype, "loss_chunk_tokens": self.chunk_tokens,
                "threads_used": o.threads or torch.get_num_threads()},
        })
        m = self.result["machine"]
        emit(f"picollm bench{' --quick' if o.quick else ''}: {m['cpu']}, {m['cpus']} CPUs, torch {m['torch']}, "
             f"{m['torch_threads']} threads, load average {m['load_average']}")
        if o.device == "cpu":
            self.peaks()
            for part, measure in (("train", self.training), ("generate", self.generation),
                                  ("kgram", self.kgram_loop), ("prepare", self.prepare)):
                if part not in o.skip:
                    measure()
            emit("targets:")
            for t in cpu_targets(self.result, o.target_vocab, every_preset=o.tiny_smoke):
                self._add_target(t)
        if "gpu" not in o.skip:
            self.gpu()
        self.result["targets"] = self.targets
        self.result["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        self.result["machine"]["load_average_end"] = load_average()
        self.result["notes"] = o.notes
        passed = sum(t["pass"] for t in self.targets)
        emit(f"{passed}/{len(self.targets)} targets PASS in {self.result['elapsed_s']:.0f} s")
        return self.result


def train_line(row: dict[str, Any]) -> str:
    p = row["picollm"]
    text = (f"  {row['family']}-{row['preset']} V={row['vocab']}: picollm {p['tokens_per_s']:,.0f} tok/s "
            f"(MFU {p.get('mfu', float('nan')):.1%}, peak {p['peak_rss_mb']:,.0f} MB)")
    if "baseline" in row:
        b = row["baseline"]
        text += (f" | baseline {b['tokens_per_s']:,.0f} tok/s (MFU {b.get('mfu', float('nan')):.1%}, peak "
                 f"{b['peak_rss_mb']:,.0f} MB) | speedup {row['speedup']:.2f}x, memory {row['memory_ratio']:.2f}")
    if "eval" in row:
        text += f" | eval {row['eval']['tokens_per_s']:,.0f} tok/s ({row['eval_over_train']:.1f}x train)"
    return text


def run_bench(opts: Options) -> dict[str, Any]:
    return Bench(opts).run()
