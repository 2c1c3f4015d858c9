"""What one `picollm bench` run measures: the settings the CLI fills in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from picollm.bench.targets import GENERATION_TARGET_PRESET, TARGET_VOCAB

VOCABS = {"gpt2": 50257, "bpe:4096": 4096}
FAMILIES = ("lstm", "kgram", "transformer")
PARTS = ("train", "eval", "generate", "kgram", "prepare", "gpu")


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
    kgram_loop_batch: int = 8  # a small case (8 x 64 tokens): the loop's Python cost is per position
    kgram_loop_context: int = 64
    data: str | None = None  # the text prepared for the MB/s figure; None: that part is skipped
    prepare_tokenizers: tuple[str, ...] = ("gpt2", "bpe:4096")
    skip: tuple[str, ...] = ()  # parts to leave out, from PARTS
    gpu_presets: tuple[str, ...] = ("small", "base")
    gpu_batch: int = 32
    gpu_compile: bool = True
    tiny_smoke: bool = False  # tests: a toy model size, no real presets
    target_vocab: int = TARGET_VOCAB
    notes: list[str] = field(default_factory=list)


def quick_options(**overrides: Any) -> Options:
    """--quick: pico and tiny, batch 16 x 256 (the plain baseline's 64 x 256 logits alone need 13 GB), and
    generation for transformer-small only (the target's preset), data preparation with gpt2 only (bpe:4096
    trains its tokenizer first); under 10 minutes on the 2-core machine."""
    base = dict(quick=True, presets=("pico", "tiny"), batch_size=16, reps=3, gen_presets=(GENERATION_TARGET_PRESET,),
                prepare_tokenizers=("gpt2",))
    base.update(overrides)
    return Options(**base)
