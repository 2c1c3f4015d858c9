"""Generation in Hugging Face transformers from a `picollm export`: with the cache vs `use_cache=False`.

    python benchmarks/bench_hf_generate.py                    # transformer-small, context 256, 200 new tokens
    python benchmarks/bench_hf_generate.py --layouts picollm,gpt2 --repeats 3 --json

The model is the registry preset (random weights: speed does not depend on them) with the GPT-2
vocabulary, saved as a picollm checkpoint and exported with `picollm.export.hf.export_hf`:
- `picollm`: the preset as it is (RMSNorm), so transformers runs the exported `modeling_picollm.py`
  (loaded through the Auto classes with remote code allowed: the file this repository ships);
- `gpt2`: the same shape with LayerNorm, which exports as a native `GPT2LMHeadModel`.
Each row is `model.generate` greedy, `--new-tokens` tokens from a `--prompt-tokens`-token prompt, with
no end-of-text stop (`min_new_tokens`), batch 1: "cache" keeps keys and values between steps, "no cache"
(`use_cache=False`) runs the whole sequence again at every step. Best of `--repeats` (the two modes
interleaved) after a warm-up; the ratio is measured within the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


def build_export(layout: str, preset: str, context: int, root: Path) -> Path:
    from picollm.checkpoint import save_model
    from picollm.data.tokenizer import get_tokenizer
    from picollm.export.hf import export_hf
    from picollm.models.registry import build_model, preset_fields

    spec = {**preset_fields(preset), "context_length": context, "vocab_size": 50257}
    if layout == "gpt2":
        spec["norm_type"] = "layernorm"  # with pre-norm, absolute positions and biases: exactly GPT-2
    torch.manual_seed(0)
    model = build_model(spec)
    checkpoint = save_model(model, root / f"{layout}-checkpoint", get_tokenizer("gpt2"))
    return export_hf(checkpoint, root / f"bench-{layout}-export", force=True)


def measure(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> tuple[float, float]:
    """Best seconds of (cache, no cache), the two interleaved so that a change in the machine's load
    affects both alike."""
    kwargs = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    model.generate(prompt, **{**kwargs, "min_new_tokens": 4, "max_new_tokens": 4})  # warm-up
    best = {True: float("inf"), False: float("inf")}
    for _ in range(repeats):
        for use_cache in (True, False):
            start = time.perf_counter()
            out = model.generate(prompt, use_cache=use_cache, **kwargs)
            best[use_cache] = min(best[use_cache], time.perf_counter() - start)
            assert out.shape[1] == prompt.shape[1] + new_tokens
    return best[True], best[False]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="transformer-small")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--layouts", default="picollm,gpt2", help="comma-separated: picollm, gpt2")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.prompt_tokens + args.new_tokens > args.context:
        parser.error(f"--prompt-tokens + --new-tokens must fit in --context ({args.context})")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layout in args.layouts.split(","):
            directory = build_export(layout, args.preset, args.context, Path(tmp))
            model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=(layout == "picollm")).eval()
            prompt = torch.randint(0, 50256, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
            cached, recompute = measure(model, prompt, args.new_tokens, args.repeats)
            rows.append({"layout": layout, "model": type(model).__name__, "cache_s": cached, "no_cache_s": recompute,
                         "cache_tokens_per_s": args.new_tokens / cached,
                         "no_cache_tokens_per_s": args.new_tokens / recompute, "ratio": recompute / cached})
    import transformers

    report = {"preset": args.preset, "context": args.context, "new_tokens": args.new_tokens,
              "prompt_tokens": args.prompt_tokens, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "machine": platform.platform(), "rows": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.preset}, context {args.context}: {args.new_tokens} new tokens from {args.prompt_tokens}, batch 1, "
          f"{report['threads']} threads, transformers {report['transformers']}")
    print(f"{'layout':<8} {'model':<32} {'cache':>10} {'no cache':>10} {'ratio':>7}")
    for r in rows:
        print(f"{r['layout']:<8} {r['model']:<32} {r['cache_s']:>9.2f}s {r['no_cache_s']:>9.2f}s "
              f"{r['ratio']:>6.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
