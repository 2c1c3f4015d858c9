"""One `picollm bench` result as Markdown tables: the form docs/performance.md keeps its figures in."""

from __future__ import annotations

import math
from typing import Any


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
