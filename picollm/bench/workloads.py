"""What the bench times: picollm's training step, the plain PyTorch baseline's, the classic per-position
k-gram loop, generation, and data preparation; and the model specs they run on.

Every function here does the work once and returns what it measured or computed; timing many of them,
in fresh processes and in turn, is the worker's and the suite's job.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from picollm.bench.machine import children_peak_rss_mb, cpu_seconds, peak_rss_mb, rss_mb, sync
from picollm.config import DataConfig, TrainConfig
from picollm.data.prepare import prepare
from picollm.data.tokenizer import get_tokenizer
from picollm.device import model_device
from picollm.generation import generate_ids
from picollm.models.registry import build_model, preset_fields
from picollm.training.step import LossModule, build_optimizer, train_step

Step = Callable[[torch.Tensor, torch.Tensor], float]
STEP_KINDS = ("picollm", "baseline", "kgram_loop")

# ---------------------------------------------------------------------------------------------
# the models


def model_spec(family: str, preset: str, vocab: int, context: int, tiny_smoke: bool = False) -> dict[str, Any]:
    """The registry preset `family-preset` at vocabulary `vocab` and context `context`."""
    spec = preset_fields(f"{family}-{preset}")
    if tiny_smoke:  # a toy width so that tests run in seconds
        spec = {"family": family, **{"lstm": {"embed_dim": 8, "hidden_size": 8},
                                     "kgram": {"embed_dim": 8, "hidden_size": 8, "inner_layers": 1},
                                     "transformer": {"d_model": 16, "n_heads": 2, "n_layers": 1}}[family]}
    spec.update(vocab_size=vocab, context_length=context)
    return spec


def model_facts(spec: dict[str, Any], context: int) -> dict[str, Any]:
    model = build_model(spec)
    return {"parameters": model.num_parameters(),
            "non_embedding_parameters": model.num_parameters(non_embedding=True),
            "flops_per_token": model.flops_per_token(context)}


# ---------------------------------------------------------------------------------------------
# the training steps being compared


def picollm_step(loss_module: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                 y: torch.Tensor, cfg: TrainConfig) -> float:
    """One step of picollm's trainer, the trainer's own `train_step`: `LossModule` (chunked loss) under the
    trainer's autocast (`cfg.dtype`, already resolved), backward, gradient clipping, the non-finite check,
    the trainer's optimizer. Returns the loss."""
    return train_step(loss_module, optimizer, [(x, y)], dtype=cfg.dtype, grad_clip=cfg.grad_clip).loss.item()


def kgram_loop_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The classic starter-code k-gram, for comparison: a Python loop over batch items and positions;
    at each position the k context tokens are one-hot encoded ([k, k * (V + 1)], token i in position
    i's block), multiplied by the embedding matrix, flattened, and sent through the MLP and the output
    layer, one position at a time. Same parameters and same loss as the vectorised `KGramModel`."""
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


def baseline_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
                  ) -> float:
    """Plain PyTorch, written as a training loop usually is: the whole [B, T, V] logits, `F.cross_entropy`,
    fp32, backward, the optimizer. `logits` stays referenced until the step ends, as in such a loop, so
    the baseline's peak memory holds it through backward."""
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def kgram_loop_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
                    ) -> float:
    """`kgram_loop_loss` in fp32, backward, the optimizer."""
    loss = kgram_loop_loss(model, x, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def make_step(kind: str, model: torch.nn.Module, dtype: str = "fp32", chunk_tokens: int = 4096,
              compile: bool = False) -> Step:
    """`step(x, y) -> loss` of one kind: "picollm" (the trainer's step in `dtype`), "baseline" (full
    logits, fp32, `torch.optim.AdamW`) or "kgram_loop" (`kgram_loop_loss`, fp32, `torch.optim.AdamW`)."""
    if kind == "picollm":
        cfg = TrainConfig(dtype=dtype, loss_chunk_tokens=chunk_tokens, compile=compile)
        module = LossModule(model, cfg.loss_chunk_tokens)
        if cfg.compile:
            module = torch.compile(module)
        return functools.partial(picollm_step, module, build_optimizer(model, cfg), cfg=cfg)
    steps = {"baseline": baseline_step, "kgram_loop": kgram_loop_step}
    if kind not in steps:
        raise ValueError(f"unknown step kind {kind!r}; choose from {', '.join(STEP_KINDS)}")
    return functools.partial(steps[kind], model, torch.optim.AdamW(model.parameters(), lr=3e-4))


# ---------------------------------------------------------------------------------------------
# generation and data preparation


def random_prompts(vocab_size: int, batch: int, prompt_tokens: int) -> torch.Tensor:
    """`batch` prompts of random ids (seeded by the batch size): speed does not depend on the ids."""
    gen = torch.Generator().manual_seed(batch)
    return torch.randint(0, vocab_size, (batch, prompt_tokens), generator=gen)


def time_generation(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int, use_cache: bool) -> dict[str, Any]:
    """Greedy generation of `new_tokens` for every prompt, no stop at eot: wall seconds and new tokens."""
    device = model_device(model)
    sync(device)
    start = time.perf_counter()
    out = generate_ids(model, prompts, max_new_tokens=new_tokens, stop_at_eot=False, use_cache=use_cache)
    sync(device)
    return {"seconds": time.perf_counter() - start, "tokens": sum(len(r) for r in out)}


def time_prepare(data: str, tokenizer: str, cache_dir: str, num_proc: int | None = None,
                 warm_tokenizer: bool = False) -> dict[str, Any]:
    """`picollm.data.prepare` of `data` into a fresh `cache_dir`, once: MB/s of the whole prepare
    (`mb_per_s`) and of its tokenizing phase, CPU seconds and peak memory (meaningful in a fresh process).
    `warm_tokenizer` loads a fixed tokenizer (gpt2) before the clock starts, as a warm process would
    have it; a `bpe:N` one is trained inside prepare, so it is always timed."""
    if warm_tokenizer and tokenizer == "gpt2":
        get_tokenizer(tokenizer)
    baseline = rss_mb()
    cpu0 = cpu_seconds()
    start = time.perf_counter()
    meta = prepare(DataConfig(data=data, tokenizer=tokenizer, num_proc=num_proc, cache_dir=cache_dir),
                   progress=False).meta
    wall = time.perf_counter() - start
    total = meta["total"]
    return {"tokenizer": tokenizer, "num_proc": meta.get("num_proc"), "stories": total["stories"],
            "bytes": total["bytes"], "tokens": total["tokens"], "wall_seconds": wall,
            "mb_per_s": total["bytes"] / 1e6 / wall, "cpu_seconds": cpu_seconds() - cpu0,
            "tokenize_seconds": meta.get("tokenize_seconds"), "tokenize_mb_per_s": meta.get("megabytes_per_second"),
            "tokens_per_s": meta.get("tokens_per_second"), "bpe_seconds": (meta.get("bpe") or {}).get("seconds"),
            "baseline_rss_mb": baseline, "peak_rss_mb": peak_rss_mb(), "worker_peak_rss_mb": children_peak_rss_mb()}
