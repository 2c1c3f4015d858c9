"""`picollm bench`: training, evaluation, generation and data-preparation speed, measured side by side.

What is measured (docs/performance.md has the protocol, the figures and the machine):

- training tokens/s, model FLOPs per token, MFU and peak memory for each family x preset x vocabulary,
  for picollm's real step (`LossModule`-style chunked loss under the trainer's default dtype, backward,
  gradient clipping, the trainer's AdamW) and for a plain PyTorch baseline (full logits,
  `F.cross_entropy`, fp32, `torch.optim.AdamW` with its defaults). Each runs in its own fresh worker
  process (so its peak RSS is its own) and the two take steps alternately, in ABBA order, so that load
  from other processes falls on both alike; the figure is the median step;
- MFU against a matmul peak measured in this run (square fp32 and bf16 matmuls, best of several);
- evaluation tokens/s (`evaluate_tokens`, the trainer's dtype), interleaved with the training steps of
  the same worker;
- generation tokens/s with the incremental state (prefill + decode) and by recomputing the window
  (`generate_ids(use_cache=False)`), alternately;
- the k-gram's vectorised step against the per-position Python loop of the classic starter code, on a
  small case;
- data preparation MB/s (`picollm.data.prepare` on the TinyStories sample, fresh cache).

Every target is printed with its measured value and PASS or FAIL, and `--json` writes one object with
per-config rows and a `targets` list of {name, value, threshold, pass}.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "picollm.bench/1"
VOCABS = {"gpt2": 50257, "bpe:4096": 4096}
FAMILIES = ("lstm", "kgram", "transformer")
TARGET_VOCAB = 50257  # the targets are stated at the GPT-2 vocabulary
TARGET_PRESETS = ("pico", "tiny")

# the issue's thresholds
TRAIN_SPEEDUP = 2.0
MEMORY_RATIO = 0.5
KGRAM_LOOP_SPEEDUP = 50.0
EVAL_OVER_TRAIN = 2.0
GENERATION_CACHE_SPEEDUP = 5.0
GENERATION_TARGET_PRESET = "small"
KGRAM_VEC_STEPS = 5  # vectorised steps per loop step in the k-gram comparison (one is ~1/50 of the other)

# ---------------------------------------------------------------------------------------------
# process memory


def rss_mb() -> float:
    """This process's resident set now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident set: VmHWM where /proc has it (resettable), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"VmHWM:\s+(\d+) kB", f.read())
        if match:
            return int(match.group(1)) / 1024
    except OSError:
        pass
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20  # KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        match = re.search(r"model name\s*:\s*(.+)", text)
        if match:
            cpu = match.group(1).strip()
        flags = re.search(r"flags\s*:\s*(.+)", text)
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flags and f in flags.group(1).split()]
    except OSError:
        isa = []
    memory_gb = None
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    info = {"cpu": cpu, "cpus": os.cpu_count(), "isa": isa, "memory_gb": memory_gb,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(), "load_average": _load()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def available_memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            match = re.search(r"MemAvailable:\s+(\d+) kB", f.read())
        return int(match.group(1)) / 2**20 if match else None
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# matmul peak


def matmul_peak_gflops(dtype: str = "fp32", device: str = "cpu", size: int | None = None,
                       repeats: int = 5) -> float:
    """Best-of-`repeats` GFLOP/s of a square matmul: the machine's practical peak for `dtype`."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    dev = torch.device(device)
    n = size or (8192 if dev.type == "cuda" else 2048)
    a = torch.randn(n, n, device=dev).to(dt)
    b = torch.randn(n, n, device=dev).to(dt)
    out = torch.empty(n, n, device=dev, dtype=dt)
    inner = 10 if dev.type == "cuda" else 1
    best = float("inf")
    for i in range(repeats + 1):
        _sync(dev)
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        _sync(dev)
        if i:  # the first call warms up the library
            best = min(best, (time.perf_counter() - start) / inner)
    return 2 * n**3 / best / 1e9


def _sync(device) -> None:
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# the training steps being compared


class PicollmStep:
    """The trainer's step: `LossModule` (chunked loss, sum) / tokens under the trainer's autocast,
    backward, gradient clipping, the non-finite check, the trainer's optimizer."""

    def __init__(self, model, dtype: str, chunk_tokens: int, compile: bool = False) -> None:
        import torch

        from picollm.config import TrainConfig
        from picollm.training.trainer import LossModule, build_optimizer

        self.model = model
        self.device = next(model.parameters()).device
        self.cfg = TrainConfig()
        self.dtype = dtype
        self.module = LossModule(model, chunk_tokens)
        if compile:
            self.module = torch.compile(self.module)
        self.optimizer = build_optimizer(model, self.cfg)

    def __call__(self, x, y) -> float:
        import torch

        from picollm.device import autocast

        with autocast(self.device, self.dtype):
            loss = self.module(x, y)
        loss = loss / y.numel()
        loss.backward()
        self.fwd_bwd_done = time.perf_counter()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip or float("inf"))
        value = loss.item()
        if math.isfinite(value) and torch.isfinite(norm).item():
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value


class BaselineStep:
    """Plain PyTorch: full [B, T, V] logits, `F.cross_entropy`, fp32, `torch.optim.AdamW` defaults."""

    def __init__(self, model, lr: float = 3e-4) -> None:
        import torch

        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    def __call__(self, x, y) -> float:
        import torch.nn.functional as F

        logits = self.model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        self.fwd_bwd_done = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def kgram_loop_loss(model, inputs, targets):
    """The classic starter-code k-gram, for comparison: a Python loop over batch items and positions;
    at each position the k context tokens are one-hot encoded ([k, k * (V + 1)], token i in position
    i's block), multiplied by the embedding matrix, flattened, and sent through the MLP and the output
    layer, one position at a time. Same parameters and same loss as the vectorised `KGramModel`."""
    import torch
    import torch.nn.functional as F

    cfg = model.config
    k, rows = cfg.k, cfg.vocab_size + 1
    table = model.embedding.weight
    onehot_input = cfg.input == "onehot"
    width = table.shape[0]  # k * rows for onehot, rows for scaled
    xs, ys = inputs.tolist(), targets.tolist()
    total = 0.0
    count = 0
    for b, row in enumerate(xs):
        padded = [model.pad_id] * (k - 1) + row
        for t in range(len(row)):
            context = padded[t:t + k]
            ids = [i * rows + tok for i, tok in enumerate(context)] if onehot_input else context
            onehot = F.one_hot(torch.tensor(ids, device=table.device), width).to(table.dtype)  # [k, width]
            x = (onehot @ table) * model.input_scale  # [k, E]
            hidden = model.mlp(x.reshape(1, -1))
            logits = model.output_layer(hidden)
            total = total + F.cross_entropy(logits, torch.tensor([ys[b][t]], device=table.device))
            count += 1
    return total / count


class KGramLoopStep:
    """`kgram_loop_loss` + backward + AdamW: the per-position reference the vectorised step is compared to."""

    def __init__(self, model, lr: float = 3e-4) -> None:
        import torch

        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    def __call__(self, x, y) -> float:
        loss = kgram_loop_loss(self.model, x, y)
        loss.backward()
        self.fwd_bwd_done = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


# ---------------------------------------------------------------------------------------------
# the worker: one process per (config, path), driven over stdin/stdout one JSON line at a time


class _WorkerState:
    def __init__(self, spec: dict[str, Any]) -> None:
        import torch

        from picollm.models.registry import build_model

        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        self.device = torch.device(spec.get("device", "cpu"))
        torch.manual_seed(spec.get("seed", 0))
        self.spec = spec
        self.model = build_model(spec["model"]).to(self.device)
        self.model.train()
        V = self.model.config.vocab_size
        B, T = spec["batch"], spec["context"]
        gen = torch.Generator().manual_seed(spec.get("seed", 0) + 1)
        # a few distinct batches, cycled: speed does not depend on the ids
        self.batches = [(torch.randint(0, V, (B, T), generator=gen).to(self.device),
                         torch.randint(0, V, (B, T), generator=gen).to(self.device)) for _ in range(2)]
        self.eval_tokens = torch.randint(0, V, (spec.get("eval_windows", B) * T + 1,), generator=gen).numpy()
        kind = spec["kind"]
        if kind == "picollm":
            self.step_fn = PicollmStep(self.model, spec["dtype"], spec["chunk_tokens"], spec.get("compile", False))
        elif kind == "baseline":
            self.step_fn = BaselineStep(self.model)
        elif kind == "kgram_loop":
            self.step_fn = KGramLoopStep(self.model)
        elif kind == "model":  # generation only
            self.step_fn = None
        else:
            raise ValueError(f"unknown worker kind {kind!r}")
        self.steps = 0
        self.rss_ready = rss_mb()

    def step(self, rows: int | None = None) -> dict[str, Any]:
        """One training step on the next batch (its first `rows` sequences only, for a cheap warm-up)."""
        x, y = self.batches[self.steps % len(self.batches)]
        if rows is not None:
            x, y = x[:rows], y[:rows]
        self.steps += 1
        _sync(self.device)
        start = time.perf_counter()
        loss = self.step_fn(x, y)
        _sync(self.device)
        end = time.perf_counter()
        # forward + backward alone: up to the end of backward, before clipping and the optimizer step
        fwd_bwd = getattr(self.step_fn, "fwd_bwd_done", end) - start
        return {"seconds": end - start, "fwd_bwd_seconds": fwd_bwd, "loss": loss}

    def eval(self) -> dict[str, Any]:
        from picollm.evaluation import evaluate_tokens

        s = self.spec
        _sync(self.device)
        start = time.perf_counter()
        result = evaluate_tokens(self.model, self.eval_tokens, s["context"], batch_size=s["batch"],
                                 device=self.device, dtype=s["dtype"], chunk_tokens=s["chunk_tokens"] or 4096)
        _sync(self.device)
        return {"seconds": time.perf_counter() - start, "tokens": result.tokens, "nll": result.nll}

    def generate(self, use_cache: bool, batch: int, new_tokens: int, prompt_tokens: int) -> dict[str, Any]:
        import torch

        from picollm.generation import generate_ids

        gen = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, self.model.config.vocab_size, (batch, prompt_tokens), generator=gen)
        _sync(self.device)
        start = time.perf_counter()
        out = generate_ids(self.model, prompts, max_new_tokens=new_tokens, stop_at_eot=False, use_cache=use_cache)
        _sync(self.device)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "tokens": sum(len(r) for r in out)}

    def stats(self) -> dict[str, Any]:
        out = {"peak_rss_mb": peak_rss_mb(), "rss_ready_mb": self.rss_ready, "rss_mb": rss_mb()}
        if self.device.type == "cuda":
            import torch

            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out


def worker_main() -> int:
    """`python -m picollm.bench --worker`: answer one JSON line per JSON command line."""
    out = sys.stdout
    sys.stdout = sys.stderr  # anything printed by the code under test stays off the protocol
    state: _WorkerState | None = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            if op == "init":
                state = _WorkerState(cmd)
                reply: dict[str, Any] = {"ok": True, "rss_mb": state.rss_ready}
            elif op == "quit":
                return 0
            else:
                assert state is not None, "init first"
                reply = getattr(state, op)(**cmd)
                reply["ok"] = True
        except Exception as exc:  # reported to the parent, which says which config failed
            import traceback

            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


class WorkerError(RuntimeError):
    pass


class Worker:
    """A fresh Python process holding one model and one kind of step."""

    def __init__(self, spec: dict[str, Any]) -> None:
        env = dict(os.environ)
        for key, value in (spec.get("env") or {}).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "picollm.bench", "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.spec = spec
        self.call("init", **spec)

    def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self.log.seek(0)
            tail = self.log.read()[-2000:]
            code = self.proc.wait()
            raise WorkerError(f"worker for {self.spec.get('model')} ({self.spec.get('kind')}) died (exit {code}; "
                              f"killed for memory if -9):\n{tail}")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise WorkerError(f"worker {self.spec.get('kind')} {self.spec.get('model')}: {reply['error']}\n"
                              f"{reply.get('traceback', '')}")
        return reply

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
        except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def alternate(workers: dict[str, Worker], op: str, reps: int, warmup: int = 1, between=None,
              **kwargs: Any) -> dict[str, list[dict[str, Any]]]:
    """Run `op` on every worker in turn, `warmup` unrecorded rounds then `reps` recorded ones, the order
    reversed every other round (ABBA), so that slow phases of the machine fall on all alike.
    `between(name)` runs after each recorded op of that worker (e.g. an interleaved eval)."""
    names = list(workers)
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(warmup + reps):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            reply = workers[name].call(op, **kwargs)
            if r >= warmup:
                results[name].append(reply)
                if between is not None:
                    between(name)
    return results


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------
# the benchmark


@dataclass
class Options:
    quick: bool = False
    presets: tuple[str, ...] = ("pico", "tiny", "small")
    families: tuple[str, ...] = FAMILIES
    vocabs: tuple[str, ...] = ("gpt2", "bpe:4096")
    batch_size: int = 64
    context: int = 256
    reps: int = 3
    dtype: str | None = None  # None: the trainer's default
    chunk_tokens: int | None = None  # None: the trainer's default
    threads: int | None = None
    device: str = "cpu"
    # generation: benchmarks/bench_generate.py's batch-8 row (transformer-small, a 1-token prompt and 255
    # new tokens, so the window grows to the full 256-token context without sliding)
    gen_presets: tuple[str, ...] = ("pico", "tiny", "small")
    gen_batch: int = 8
    gen_prompt_tokens: int = 1
    gen_new_tokens: int = 255
    gen_reps: int = 1
    kgram_loop_batch: int = 8  # the small case: 8 x 64 = 512 tokens (the loop takes ~5 s a step here)
    kgram_loop_context: int = 64
    data: str | None = None  # the TinyStories sample by default
    skip: tuple[str, ...] = ()  # parts to leave out: train, eval, generate, kgram, prepare, gpu
    gpu_presets: tuple[str, ...] = ("small", "base")
    gpu_batch: int = 32
    gpu_compile: bool = True
    tiny_smoke: bool = False  # tests: a toy model size, no real presets
    target_vocab: int = TARGET_VOCAB
    notes: list[str] = field(default_factory=list)


def quick_options(**overrides: Any) -> Options:
    """--quick: pico and tiny, batch 16 x 256 (the plain baseline's 64 x 256 logits alone need 13 GB), and
    generation for transformer-small only (the target's preset); under 10 minutes on the 2-core machine."""
    base = dict(quick=True, presets=("pico", "tiny"), batch_size=16, reps=3, gen_presets=(GENERATION_TARGET_PRESET,))
    base.update(overrides)
    return Options(**base)


def default_sample() -> Path | None:
    here = Path(__file__).resolve().parents[1]
    for candidate in (here.parent / "shared" / "data" / "tinystories-sample.txt",
                      Path.cwd().parent / "shared" / "data" / "tinystories-sample.txt"):
        if candidate.is_file():
            return candidate
    return None


def _emit(text: str, stream=None) -> None:
    print(text, file=stream or sys.stdout, flush=True)


def model_spec(family: str, preset: str, vocab: int, context: int, tiny_smoke: bool = False) -> dict[str, Any]:
    from picollm.models.registry import preset_fields

    spec = preset_fields(f"{family}-{preset}")
    if tiny_smoke:  # a toy width so that tests run in seconds
        spec = {"family": family, **{"lstm": {"embed_dim": 8, "hidden_size": 8},
                                     "kgram": {"embed_dim": 8, "hidden_size": 8, "inner_layers": 1},
                                     "transformer": {"d_model": 16, "n_heads": 2, "n_layers": 1}}[family]}
    spec.update(vocab_size=vocab, context_length=context)
    return spec


def model_facts(spec: dict[str, Any], context: int) -> dict[str, Any]:
    from picollm.models.registry import build_model

    model = build_model(spec)
    return {"parameters": model.num_parameters(),
            "non_embedding_parameters": model.num_parameters(non_embedding=True),
            "flops_per_token": model.flops_per_token(context)}


def baseline_fits(batch: int, context: int, vocab: int) -> bool:
    """The plain baseline holds about four [B, T, V] fp32 tensors at once (logits, log-softmax, their
    gradients); leave it out where that would not fit in the memory available now."""
    need = 4 * batch * context * vocab * 4 / 2**30 + 1.0
    have = available_memory_gb()
    return have is None or need < 0.8 * have


class Bench:
    def __init__(self, opts: Options) -> None:
        from picollm.config import TrainConfig
        from picollm.device import resolve_dtype

        self.opts = opts
        defaults = TrainConfig()
        self.dtype = resolve_dtype(opts.dtype or defaults.dtype, opts.device)
        self.chunk_tokens = defaults.loss_chunk_tokens if opts.chunk_tokens is None else opts.chunk_tokens
        self.result: dict[str, Any] = {}
        self.targets: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    # -- helpers
    def _spec(self, kind: str, model: dict[str, Any], batch: int, context: int, **extra: Any) -> dict[str, Any]:
        return {"kind": kind, "model": model, "batch": batch, "context": context, "dtype": self.dtype,
                "chunk_tokens": self.chunk_tokens, "threads": self.opts.threads, "device": self.opts.device,
                "seed": 0, **extra}

    def target(self, name: str, value: float, threshold: float, higher_is_better: bool = True,
               unit: str = "x", detail: str = "") -> None:
        ok = bool(value >= threshold) if higher_is_better else bool(value <= threshold)
        if not math.isfinite(value):
            ok = False
        self.targets.append({"name": name, "value": round(value, 4), "threshold": threshold,
                             "comparison": ">=" if higher_is_better else "<=", "unit": unit, "pass": ok,
                             "detail": detail})
        sign = ">=" if higher_is_better else "<="
        _emit(f"  TARGET {name}: {value:.3g}{unit} (need {sign} {threshold:g}{unit}) "
              f"{'PASS' if ok else 'FAIL'}{' - ' + detail if detail else ''}")

    # -- parts
    def peaks(self) -> None:
        o = self.opts
        import torch

        if o.threads:
            torch.set_num_threads(o.threads)
        size = 256 if o.tiny_smoke else None
        self.result["matmul_peak_gflops"] = {
            "fp32": round(matmul_peak_gflops("fp32", "cpu", size), 2),
            "bf16": round(matmul_peak_gflops("bf16", "cpu", size), 2),
            "size": size or 2048, "threads": torch.get_num_threads(),
        }
        p = self.result["matmul_peak_gflops"]
        _emit(f"matmul peak ({p['size']}x{p['size']}, {p['threads']} threads): fp32 {p['fp32']:.1f} GFLOP/s, "
              f"bf16 {p['bf16']:.1f} GFLOP/s")

    def training(self) -> None:
        o = self.opts
        _emit(f"training: batch {o.batch_size} x context {o.context}, picollm dtype {self.dtype}, loss chunk "
              f"{self.chunk_tokens}, threads {o.threads or 'torch default'} (both paths); "
              f"baseline: fp32, full logits, F.cross_entropy, torch.optim.AdamW; "
              f"{o.reps} alternating (ABBA) steps each after 1 warm-up, median")
        for vocab_name in o.vocabs:
            for preset in o.presets:
                for family in o.families:
                    row = self.train_config(family, preset, vocab_name)
                    self.result.setdefault("configs", []).append(row)
                    _emit(self._train_line(row))

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
        step, alternately in one worker. The target is read at `GENERATION_TARGET_PRESET`: at pico and
        tiny the GPT-2 output layer, which both modes compute once per new token, is most of the work."""
        o = self.opts
        _emit(f"generation: transformer, V=50257, batch {o.gen_batch}, prompt {o.gen_prompt_tokens} + "
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
            row = {"family": "transformer", "preset": preset, "vocab": 50257, "batch": o.gen_batch,
                   "prompt_tokens": o.gen_prompt_tokens, "new_tokens": o.gen_new_tokens,
                   "cache_tokens_per_s": cache, "recompute_tokens_per_s": recompute, "ratio": cache / recompute,
                   **model_facts(spec, o.context)}
            rows.append(row)
            _emit(f"  transformer-{preset}: cache {cache:,.1f} tok/s, recompute {recompute:,.1f} tok/s: "
                  f"{cache / recompute:.1f}x")

    @staticmethod
    def _train_line(row: dict[str, Any]) -> str:
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

    def kgram_loop(self) -> None:
        """The k-gram's vectorised step against the classic per-position loop (`kgram_loop_loss`) on a
        small case, the same model and batch in both. The target compares forward + backward, as the
        issue states it; the whole step with the optimizer (AdamW in both) is reported beside it."""
        o = self.opts
        B, T = o.kgram_loop_batch, o.kgram_loop_context
        V = 50257 if not o.tiny_smoke else 300
        spec = {"family": "kgram", "input": "onehot", "k": 3, "embed_dim": 32, "hidden_size": 32,
                "inner_layers": 1, "vocab_size": V, "context_length": T}
        _emit(f"k-gram: vectorised vs the per-position Python loop, kgram-pico one-hot (k 3), V={V}, batch {B} x {T}, "
              f"AdamW in both; in turn (one loop step, then {KGRAM_VEC_STEPS} vectorised), after a warm-up, median")
        results: dict[str, list[dict[str, Any]]] = {"vectorised": [], "loop": []}
        with Worker(self._spec("picollm", spec, B, T)) as vec, Worker(self._spec("kgram_loop", spec, B, T)) as loop:
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
        _emit(f"  forward+backward: vectorised {out['vectorised_fwd_bwd_tokens_per_s']:,.0f} tok/s, loop "
              f"{out['loop_fwd_bwd_tokens_per_s']:,.1f} tok/s: {out['speedup']:,.0f}x; whole step with AdamW: "
              f"{out['vectorised_tokens_per_s']:,.0f} vs {out['loop_tokens_per_s']:,.1f} tok/s: "
              f"{out['speedup_with_optimizer']:,.0f}x")

    def prepare(self) -> None:
        o = self.opts
        data = Path(o.data) if o.data else default_sample()
        if data is None or not data.is_file():
            self.result["data_preparation"] = {"skipped": "no data: pass --data PATH (the TinyStories sample)"}
            _emit("data preparation: skipped (no data file; pass --data PATH)")
            return
        rows = []
        for tokenizer in (("gpt2",) if o.quick else ("gpt2", "bpe:4096")):
            with tempfile.TemporaryDirectory(prefix="picollm-bench-") as tmp:
                code = ("import json,sys,time\nfrom picollm.config import DataConfig\n"
                        "from picollm.data.prepare import prepare\n"
                        "cfg=DataConfig(data=sys.argv[1],tokenizer=sys.argv[2],cache_dir=sys.argv[3])\n"
                        "t=time.perf_counter(); d=prepare(cfg,progress=False); w=time.perf_counter()-t\n"
                        "m=d.meta; print(json.dumps({'wall_seconds':w,'bytes':m['total']['bytes'],"
                        "'tokens':m['total']['tokens'],'tokenize_mb_per_s':m.get('megabytes_per_second'),"
                        "'num_proc':m.get('num_proc')}))\n")
                proc = subprocess.run([sys.executable, "-c", code, str(data), tokenizer, tmp], capture_output=True,
                                      text=True)
            if proc.returncode != 0:
                rows.append({"tokenizer": tokenizer, "error": proc.stderr.strip().splitlines()[-1:]})
                _emit(f"data preparation ({tokenizer}): failed: {proc.stderr.strip()[-300:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["tokenizer"] = tokenizer
            r["mb_per_s"] = r["bytes"] / 1e6 / r["wall_seconds"]
            rows.append(r)
            tk = r.get("tokenize_mb_per_s")
            _emit(f"data preparation ({tokenizer}, {data.name}, {r['bytes'] / 1e6:.1f} MB, {r['num_proc']} workers): "
                  f"{r['mb_per_s']:.2f} MB/s whole prepare"
                  + (f", {tk:.2f} MB/s tokenizing" if tk else ""))
        self.result["data_preparation"] = rows

    def gpu(self) -> None:
        """bf16 autocast + torch.compile for the larger Transformers, MFU against the GPU's measured bf16
        matmul peak. Only where CUDA is available."""
        import torch

        if not torch.cuda.is_available():
            self.result["gpu"] = {"skipped": "no CUDA device"}
            return
        o = self.opts
        peak = matmul_peak_gflops("bf16", "cuda")
        rows = []
        for preset in o.gpu_presets:
            spec = model_spec("transformer", preset, 50257, o.context)
            facts = model_facts(spec, o.context)
            with Worker({"kind": "picollm", "model": spec, "batch": o.gpu_batch, "context": o.context,
                         "dtype": "bf16", "chunk_tokens": self.chunk_tokens, "threads": None, "device": "cuda",
                         "compile": o.gpu_compile, "seed": 0}) as w:
                for _ in range(3):  # compilation and autotuning
                    w.call("step")
                secs = median([w.call("step")["seconds"] for _ in range(max(5, o.reps))])
                stats = w.call("stats")
            tps = o.gpu_batch * o.context / secs
            mfu = tps * facts["flops_per_token"] / 1e9 / peak
            rows.append({"preset": preset, "batch": o.gpu_batch, "context": o.context, **facts, "tokens_per_s": tps,
                         "mfu": mfu, "cuda_peak_mb": stats.get("cuda_peak_mb"), "compile": o.gpu_compile})
            _emit(f"gpu transformer-{preset}: {tps:,.0f} tok/s, MFU {mfu:.1%} of {peak / 1e3:.0f} TFLOP/s bf16")
            if preset == "base":
                self.target("gpu_mfu_transformer_base", mfu, 0.40, unit="", detail="bf16 + compile on "
                            + torch.cuda.get_device_name(0))
        self.result["gpu"] = {"device": torch.cuda.get_device_name(0), "bf16_peak_gflops": peak, "rows": rows}

    # -- the targets
    def cpu_targets(self) -> None:
        rows = self.result.get("configs", [])
        _emit("targets:")
        for row in rows:
            if row["vocab"] != self.opts.target_vocab or row["preset"] not in TARGET_PRESETS:
                continue
            name = f"{row['family']}-{row['preset']}"
            if "speedup" in row:
                self.target(f"train_speedup[{name}]", row["speedup"], TRAIN_SPEEDUP,
                            detail=f"{row['picollm']['tokens_per_s']:,.0f} vs {row['baseline']['tokens_per_s']:,.0f} "
                                   f"tok/s, batch {row['batch']}x{row['context']}")
                self.target(f"peak_memory_ratio[{name}]", row["memory_ratio"], MEMORY_RATIO, higher_is_better=False,
                            detail=f"{row['picollm']['peak_rss_mb']:,.0f} vs {row['baseline']['peak_rss_mb']:,.0f} MB")
            if "eval_over_train" in row:
                self.target(f"eval_over_train[{name}]", row["eval_over_train"], EVAL_OVER_TRAIN,
                            detail=f"{row['eval']['tokens_per_s']:,.0f} vs {row['picollm']['tokens_per_s']:,.0f} tok/s")
        for g in self.result.get("generation", []):
            if g["preset"] == GENERATION_TARGET_PRESET or self.opts.tiny_smoke:
                self.target(f"generation_cache_speedup[transformer-{g['preset']}]", g["ratio"],
                            GENERATION_CACHE_SPEEDUP,
                            detail=f"{g['cache_tokens_per_s']:,.1f} vs {g['recompute_tokens_per_s']:,.1f} tok/s, "
                                   f"batch {g['batch']}, prompt {g['prompt_tokens']} + {g['new_tokens']} new")
        k = self.result.get("kgram_loop")
        if k:
            self.target("kgram_vectorised_over_loop", k["speedup"], KGRAM_LOOP_SPEEDUP,
                        detail=f"forward+backward {k['vectorised_fwd_bwd_tokens_per_s']:,.0f} vs "
                               f"{k['loop_fwd_bwd_tokens_per_s']:,.1f} tok/s, batch {k['batch']}x{k['context']} "
                               f"(whole step with AdamW: {k['speedup_with_optimizer']:,.0f}x)")

    def run(self) -> dict[str, Any]:
        o = self.opts
        import torch

        from picollm import __version__
        from picollm.device import native_bf16

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
        _emit(f"picollm bench{' --quick' if o.quick else ''}: {m['cpu']}, {m['cpus']} CPUs, torch {m['torch']}, "
              f"{m['torch_threads']} threads, load average {m['load_average']}")
        if o.device == "cpu":
            self.peaks()
            if "train" not in o.skip:
                self.training()
            if "generate" not in o.skip:
                self.generation()
            if "kgram" not in o.skip:
                self.kgram_loop()
            if "prepare" not in o.skip:
                self.prepare()
            self.cpu_targets()
        if "gpu" not in o.skip:
            self.gpu()
        self.result["targets"] = self.targets
        self.result["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        self.result["machine"]["load_average_end"] = _load()
        self.result["notes"] = o.notes
        passed = sum(t["pass"] for t in self.targets)
        _emit(f"{passed}/{len(self.targets)} targets PASS in {self.result['elapsed_s']:.0f} s")
        return self.result


def run_bench(opts: Options) -> dict[str, Any]:
    return Bench(opts).run()


def _f(x: float | None, fmt: str = ",.0f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def markdown(result: dict[str, Any]) -> str:
    """The figures of one `picollm bench` result as Markdown tables (for docs/performance.md)."""
    m, s = result["machine"], result["settings"]
    peak = result.get("matmul_peak_gflops", {})
    lines = [f"`{result.get('command') or 'picollm bench'}`, {result['date']}, {m['cpu']} ({m['cpus']} CPUs, "
             f"{', '.join(m.get('isa', []))}), torch {m['torch']}, {s.get('threads_used')} threads, load average "
             f"{m.get('load_average')} at the start and {m.get('load_average_end')} at the end; "
             f"{result.get('elapsed_s', 0):.0f} s in all. picollm dtype **{s.get('picollm_dtype')}**, batch "
             f"{s['batch_size']} x {s['context']}; matmul peak fp32 {_f(peak.get('fp32'), '.1f')} GFLOP/s, bf16 "
             f"{_f(peak.get('bf16'), '.1f')} GFLOP/s.", ""]
    rows = result.get("configs", [])
    if rows:
        lines += ["| model | V | FLOPs/token | picollm tok/s | MFU | peak MB | baseline tok/s | MFU | peak MB | "
                  "speedup | memory | eval tok/s | eval/train |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            p, b, e = r.get("picollm", {}), r.get("baseline", {}), r.get("eval", {})
            lines.append(
                f"| {r['family']}-{r['preset']} | {r['vocab']} | {r['flops_per_token'] / 1e6:.1f} M | "
                f"{_f(p.get('tokens_per_s'))} | {_f(p.get('mfu'), '.0%')} | {_f(p.get('peak_rss_mb'))} | "
                f"{_f(b.get('tokens_per_s'))} | {_f(b.get('mfu'), '.0%')} | {_f(b.get('peak_rss_mb'))} | "
                f"{_f(r.get('speedup'), '.2f')}x | {_f(r.get('memory_ratio'), '.2f')} | {_f(e.get('tokens_per_s'))} | "
                f"{_f(r.get('eval_over_train'), '.2f')}x |")
        lines.append("")
    gen = result.get("generation", [])
    if gen:
        lines += ["| generation | batch | prompt + new | cache tok/s | recompute tok/s | ratio |",
                  "|---|---|---|---|---|---|"]
        for g in gen:
            lines.append(f"| transformer-{g['preset']} | {g['batch']} | {g['prompt_tokens']} + {g['new_tokens']} | "
                         f"{_f(g['cache_tokens_per_s'], ',.1f')} | {_f(g['recompute_tokens_per_s'], ',.1f')} | "
                         f"{g['ratio']:.1f}x |")
        lines.append("")
    k = result.get("kgram_loop")
    if k:
        lines += [f"k-gram (kgram-pico one-hot, k 3, V {k['model']['vocab_size']}, batch {k['batch']} x "
                  f"{k['context']}): "
                  f"forward+backward {_f(k['vectorised_fwd_bwd_tokens_per_s'])} tok/s vectorised vs "
                  f"{_f(k['loop_fwd_bwd_tokens_per_s'], ',.1f')} tok/s per-position loop = **{k['speedup']:.0f}x**; "
                  f"whole step with AdamW {_f(k['vectorised_tokens_per_s'])} vs {_f(k['loop_tokens_per_s'], ',.1f')} "
                  f"tok/s = {k['speedup_with_optimizer']:.0f}x.", ""]
    for d in result.get("data_preparation", []) if isinstance(result.get("data_preparation"), list) else []:
        if "mb_per_s" in d:
            lines += [f"Data preparation ({d['tokenizer']}, {d['bytes'] / 1e6:.1f} MB, {d.get('num_proc')} workers): "
                      f"{d['mb_per_s']:.2f} MB/s for the whole `prepare`, {_f(d.get('tokenize_mb_per_s'), '.2f')} MB/s "
                      f"tokenizing.", ""]
    targets = result.get("targets", [])
    if targets:
        lines += ["| target | value | threshold | |", "|---|---|---|---|"]
        for t in targets:
            lines.append(f"| {t['name']} | {t['value']:.3g} | {t['comparison']} {t['threshold']:g} | "
                         f"{'PASS' if t['pass'] else 'FAIL'} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        sys.exit(worker_main())
    sys.exit("usage: picollm bench [--quick] [--json PATH]  (python -m picollm.bench --worker is internal)")
