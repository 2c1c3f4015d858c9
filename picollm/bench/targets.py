"""The bench's targets: each a measured ratio against a threshold, PASS or FAIL.

A target is a dict `{name, value, threshold, comparison, unit, pass, detail}` (the JSON's `targets` list).
"""

from __future__ import annotations

import math
from typing import Any

TARGET_VOCAB = 50257  # the targets are stated at the GPT-2 vocabulary
TARGET_PRESETS = ("pico", "tiny")
GENERATION_TARGET_PRESET = "small"

TRAIN_SPEEDUP = 2.0  # picollm's training tokens/s over the plain baseline's, at least
MEMORY_RATIO = 0.5  # picollm's peak resident set over the baseline's, at most
EVAL_OVER_TRAIN = 2.0  # evaluation tokens/s over picollm's training tokens/s, at least
GENERATION_CACHE_SPEEDUP = 5.0  # generation with the incremental state over recomputing the window, at least
KGRAM_LOOP_SPEEDUP = 50.0  # the k-gram's vectorised forward + backward over the per-position loop's, at least
GPU_MFU_BASE = 0.40  # transformer-base in bf16 + compile on a GPU, at least


def target(name: str, value: float, threshold: float, higher_is_better: bool = True, unit: str = "x",
           detail: str = "") -> dict[str, Any]:
    """One target; a value that is not finite FAILs."""
    ok = math.isfinite(value) and (value >= threshold if higher_is_better else value <= threshold)
    return {"name": name, "value": round(value, 4), "threshold": threshold,
            "comparison": ">=" if higher_is_better else "<=", "unit": unit, "pass": bool(ok), "detail": detail}


def target_line(t: dict[str, Any]) -> str:
    unit = t["unit"]
    return (f"  TARGET {t['name']}: {t['value']:.3g}{unit} (need {t['comparison']} {t['threshold']:g}{unit}) "
            f"{'PASS' if t['pass'] else 'FAIL'}{' - ' + t['detail'] if t['detail'] else ''}")


def cpu_targets(result: dict[str, Any], target_vocab: int = TARGET_VOCAB, every_preset: bool = False
                ) -> list[dict[str, Any]]:
    """The CPU targets that `result` has figures for: training speed, peak memory and evaluation speed for
    the target presets at `target_vocab`, generation at `GENERATION_TARGET_PRESET` (every preset where
    `every_preset`, for toy runs), and the k-gram's vectorised step over the loop."""
    targets = []
    for row in result.get("configs", []):
        if row["vocab"] != target_vocab or row["preset"] not in TARGET_PRESETS:
            continue
        name = f"{row['family']}-{row['preset']}"
        if "speedup" in row:
            targets.append(target(
                f"train_speedup[{name}]", row["speedup"], TRAIN_SPEEDUP,
                detail=f"{row['picollm']['tokens_per_s']:,.0f} vs {row['baseline']['tokens_per_s']:,.0f} "
                       f"tok/s, batch {row['batch']}x{row['context']}"))
            targets.append(target(
                f"peak_memory_ratio[{name}]", row["memory_ratio"], MEMORY_RATIO, higher_is_better=False,
                detail=f"{row['picollm']['peak_rss_mb']:,.0f} vs {row['baseline']['peak_rss_mb']:,.0f} MB"))
        if "eval_over_train" in row:
            targets.append(target(
                f"eval_over_train[{name}]", row["eval_over_train"], EVAL_OVER_TRAIN,
                detail=f"{row['eval']['tokens_per_s']:,.0f} vs {row['picollm']['tokens_per_s']:,.0f} tok/s"))
    for g in result.get("generation", []):
        if g["preset"] == GENERATION_TARGET_PRESET or every_preset:
            targets.append(target(
                f"generation_cache_speedup[transformer-{g['preset']}]", g["ratio"], GENERATION_CACHE_SPEEDUP,
                detail=f"{g['cache_tokens_per_s']:,.1f} vs {g['recompute_tokens_per_s']:,.1f} tok/s, "
                       f"batch {g['batch']}, prompt {g['prompt_tokens']} + {g['new_tokens']} new"))
    k = result.get("kgram_loop")
    if k:
        targets.append(target(
            "kgram_vectorised_over_loop", k["speedup"], KGRAM_LOOP_SPEEDUP,
            detail=f"forward+backward {k['vectorised_fwd_bwd_tokens_per_s']:,.0f} vs "
                   f"{k['loop_fwd_bwd_tokens_per_s']:,.1f} tok/s, batch {k['batch']}x{k['context']} "
                   f"(whole step with AdamW: {k['speedup_with_optimizer']:,.0f}x)"))
    return targets
