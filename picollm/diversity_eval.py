"""The diversity of a model's generations: decoding strategies, prompts taken from a split, and one
continuation per prompt and strategy, measured by `picollm.diversity` (see docs/evaluation.md, Diversity).

Split from `picollm.evaluation` (likelihood on a token stream), which re-exports these names.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from picollm.diversity import diversity_report
from picollm.errors import UserError
from picollm.generation import encode_prompts, generate_ids


def parse_strategies(spec: str) -> dict[str, dict[str, Any]]:
    """'greedy,top-p=0.9,top-k=50,sample=0.8' -> {name: generate kwargs}.

    greedy; top-p=P (nucleus mass P); top-k=K; sample (full softmax) or sample=T (temperature T).
    """
    out: dict[str, dict[str, Any]] = {}
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        name, _, value = item.partition("=")
        name = name.strip()
        try:
            if name == "greedy" and not value:
                kwargs: dict[str, Any] = {"strategy": "greedy"}
            elif name == "top-p" and value:
                kwargs = {"strategy": "top-p", "top_p": float(value)}
            elif name == "top-k" and value:
                kwargs = {"strategy": "top-k", "top_k": int(value)}
            elif name == "sample":
                kwargs = {"strategy": "sample", **({"temperature": float(value)} if value else {})}
            else:
                raise ValueError
        except ValueError:
            raise UserError(f"strategy '{item}' is not understood; use greedy, top-p=P, top-k=K, sample or "
                            "sample=TEMPERATURE, separated by commas") from None
        out[item] = kwargs
    if not out:
        raise UserError("no strategies given; e.g. greedy,top-p=0.9,top-p=1.0")
    return out


def story_prompts(tokens: np.ndarray, story_offsets: np.ndarray, num_prompts: int,
                  prompt_tokens: int) -> list[list[int]]:
    """`num_prompts` prompts from a split: the eot and first `prompt_tokens` tokens of stories spread
    evenly over the split (among stories with at least `prompt_tokens + 1` tokens, so a continuation
    exists in the data), in stream order. Deterministic."""
    if num_prompts < 1 or prompt_tokens < 1:
        raise UserError("num-prompts and prompt-tokens must be at least 1")
    starts = np.asarray(story_offsets, dtype=np.int64)
    ends = np.append(starts[1:], len(tokens))
    long_enough = np.nonzero(ends - starts >= prompt_tokens + 2)[0]  # eot + P prompt + >=1 continuation
    if len(long_enough) == 0:
        raise UserError(f"no story in the split has more than {prompt_tokens} tokens")
    if len(long_enough) < num_prompts:
        raise UserError(f"only {len(long_enough)} stories have more than {prompt_tokens} tokens; "
                        f"ask for at most that many prompts")
    picks = long_enough[np.linspace(0, len(long_enough) - 1, num_prompts).round().astype(np.int64)]
    return [[int(t) for t in tokens[starts[i]:starts[i] + 1 + prompt_tokens]] for i in picks]


def diversity_eval(model: Any, prompts: list[str] | list[list[int]], strategies: dict[str, dict[str, Any]],
                   max_new_tokens: int = 100, seed: int = 0, tokenizer: Any = None, batch_size: int = 64,
                   return_texts: bool = False) -> dict[str, dict[str, Any]]:
    """Generate one continuation per prompt with each strategy and measure its diversity.

    `prompts`: texts (encoded with the model's tokenizer after an eot, as `generate` does) or token id
    lists (used as is, e.g. from `story_prompts`). `strategies`: {name: generate kwargs}, e.g. from
    `parse_strategies`. Returns {name: diversity_report(continuations)}, plus the continuations under
    "continuations" with `return_texts`. Prompts run `batch_size` at a time; each batch's seed is
    `seed` + its index, so results do not depend on anything but the arguments.
    """
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise UserError("diversity evaluation needs the model's tokenizer to decode its continuations")
    if not prompts:
        raise UserError("no prompts to evaluate diversity on")
    rows = [p if isinstance(p, list) else encode_prompts(p, tok)[0] for p in prompts]
    results: dict[str, dict[str, Any]] = {}
    for name, kwargs in strategies.items():
        texts: list[str] = []
        for b, first in enumerate(range(0, len(rows), batch_size)):
            ids = generate_ids(model, rows[first:first + batch_size], max_new_tokens=max_new_tokens,
                               seed=seed + b, eot_id=tok.eot_id, **kwargs)
            texts.extend(tok.decode(r) for r in ids)
        report: dict[str, Any] = dict(diversity_report(texts, tokenizer=tok))
        if return_texts:
            report["continuations"] = texts
        results[name] = report
    return results
