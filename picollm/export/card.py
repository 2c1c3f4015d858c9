"""The model card (README.md) of an export: card.md, beside this file, filled in from the run.

It says what the model is (family, sizes), what it was trained on and how (the run's data and train
sections), how well it does (the run's final NLL, perplexity and bits per byte per split) and how to use
it, with a snippet that a test runs against an exported directory.
"""

from __future__ import annotations

import math
from pathlib import Path
from string import Template
from typing import Any

import yaml

from picollm.data.prepared import SPLITS

TEMPLATE = Path(__file__).parent / "card.md"
PROMPT = "Once upon a time"
FAMILY_NAMES = {"lstm": "LSTM", "kgram": "k-gram MLP", "transformer": "Transformer"}

# transformers runs the custom layout's configuration_picollm.py and modeling_picollm.py only when asked: the
# snippet asks, for the tokenizer too (AutoTokenizer reads the model's config first).
# (tests/test_reliability.py allows this one line: it is the model card's text, not picollm loading code.)
REMOTE_CODE_ARGUMENT = ", trust_remote_code=True"


def new_tokens(spec: dict[str, Any]) -> int:
    """How many tokens the snippet generates: 100, or fewer where a Transformer's positions end sooner."""
    if spec["family"] != "transformer":
        return 100
    context = int(spec["context_length"])
    return max(1, min(100, context - 32 if context > 64 else context // 2))


def snippet(name: str, layout: str, has_tokenizer: bool, max_new_tokens: int = 100) -> str:
    """Python that loads the export with transformers and continues a prompt."""
    remote = REMOTE_CODE_ARGUMENT if layout == "picollm" else ""
    if not has_tokenizer:
        return "\n".join([
            "import torch",
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{name}"{remote})',
            "output = model.generate(torch.tensor([[0]]), max_new_tokens=20)  # this model has no tokenizer files",
            "print(output[0].tolist())",
        ])
    return "\n".join([
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{name}"{remote})',
        f'model = AutoModelForCausalLM.from_pretrained("{name}"{remote})',
        f'inputs = tokenizer("{PROMPT}", return_tensors="pt")',
        f"output = model.generate(**inputs, max_new_tokens={max_new_tokens}, do_sample=True, top_p=0.9)",
        "print(tokenizer.decode(output[0], skip_special_tokens=True))",
    ])


def _data_source(recipe: dict[str, Any]) -> str | None:
    data = recipe.get("data") if isinstance(recipe.get("data"), dict) else {}
    source = data.get("data")
    if not isinstance(source, str):
        return None
    if source.startswith("hf:"):
        return source[3:]
    return Path(source).name  # a local file: its name, not the trainer's path


def _front_matter(family: str, layout: str, recipe: dict[str, Any]) -> str:
    source = _data_source(recipe) or ""
    tags = ["picollm", family] + (["tinystories"] if "tinystories" in source.lower() else [])
    tags += ["custom_code"] if layout == "picollm" else []
    lines = ["library_name: transformers", "pipeline_tag: text-generation", f"tags: [{', '.join(tags)}]"]
    data = recipe.get("data") if isinstance(recipe.get("data"), dict) else {}
    if isinstance(data.get("data"), str) and data["data"].startswith("hf:"):
        lines.append(f"datasets: [{source}]")
    return "\n".join(lines)


def _data_section(recipe: dict[str, Any]) -> str:
    data = recipe.get("data") if isinstance(recipe.get("data"), dict) else None
    if not data:
        return "Not recorded: this export was made from a checkpoint directory without its run."
    source = _data_source(recipe)
    stories = data.get("num_stories")
    split = data.get("split")
    lines = [f"- source: `{source}`" + (" (the Hugging Face dataset)" if str(data.get("data")).startswith("hf:")
                                         else " (a local file)"),
             f"- stories: {stories:,} sampled with seed {data.get('seed', 0)}" if isinstance(stories, int)
             else "- stories: all",
             f"- split train/val/test: {', '.join(str(r) for r in split)} (whole stories)" if split else "",
             f"- tokenizer: `{data.get('tokenizer', 'gpt2')}`"]
    return "\n".join(line for line in lines if line)


def _recipe_section(recipe: dict[str, Any]) -> str:
    train = recipe.get("train") if isinstance(recipe.get("train"), dict) else None
    if not train:
        return "Not recorded: this export was made from a checkpoint directory without its run."
    return "The `train` section of the run's config (`picollm train --config`):\n\n```yaml\n" + \
        yaml.safe_dump(train, sort_keys=False).rstrip() + "\n```"


def _number(value: Any, digits: int) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.{digits}f}"
    return "-"


def _metrics_section(summary: dict[str, Any], section: dict[str, Any], final: bool) -> str:
    rows = [(split, summary[split]) for split in SPLITS if isinstance(summary.get(split), dict)]
    if not final or not rows:
        where = f"step {section['step']}" if "step" in section else "a checkpoint"
        val = f", validation loss {_number(section.get('val_loss'), 4)} nats/token" \
            if section.get("val_loss") is not None else ""
        return (f"This export is from {where}{val}, not from the run's final model, so the run's final "
                "metrics do not describe it. Measure it with `picollm eval`.")
    lines = ["Measured by picollm at the end of training, on windows of "
             f"{summary.get('context_length', '?')} tokens (train: a subset as large as the validation split):", "",
             "| split | NLL (nats/token) | perplexity | bits per byte |", "|---|---|---|---|"]
    for split, metrics in rows:
        lines.append(f"| {split} | {_number(metrics.get('nll'), 4)} | {_number(metrics.get('ppl'), 2)} "
                     f"| {_number(metrics.get('bpb'), 4)} |")
    tokens, wall = summary.get("tokens_seen"), summary.get("wall_time_s")
    if isinstance(tokens, int) and isinstance(wall, (int, float)):
        lines += ["", f"Trained on {tokens:,} tokens in {wall:.0f} s ({summary.get('device', '?')}, "
                      f"{summary.get('dtype', '?')})."]
    return "\n".join(lines)


def model_card(spec: dict[str, Any], section: dict[str, Any], layout: str, recipe: dict[str, Any],
               summary: dict[str, Any], name: str, final: bool) -> str:
    """README.md text for an export. `name` is what the snippets load (a hub repo id or a directory)."""
    family = spec["family"]
    params = section["num_parameters"]
    rows = [f"| family | {family} |"]
    rows += [f"| {key} | {value} |" for key, value in spec.items() if key != "family"]
    rows += [f"| parameters | {params:,} |",
             f"| non-embedding parameters | {section['num_parameters_non_embedding']:,} |",
             f"| tokenizer | {section.get('tokenizer') or 'none'} |",
             f"| weights | {section['dtype']} |"]
    if layout == "gpt2":
        layout_sentence = ("Its architecture is exactly GPT-2's, so it is a native `GPT2LMHeadModel`: "
                           "transformers loads it without remote code.")
        note = ""
    else:
        layout_sentence = ("It loads in transformers with the model code in this repository "
                           "(`configuration_picollm.py`, `modeling_picollm.py`; torch and transformers only).")
        note = ("\n`trust_remote_code` lets transformers run `modeling_picollm.py` from this repository: "
                "read it first, it is short.\n")
    source = _data_source(recipe)
    values = {
        "front_matter": _front_matter(family, layout, recipe),
        "title": f"picollm {FAMILY_NAMES.get(family, family)} ({params:,} parameters)",
        "family": FAMILY_NAMES.get(family, family),
        "data_phrase": f" on {source}" if source else "",
        "layout_sentence": layout_sentence,
        "snippet": snippet(name, layout, section.get("tokenizer") is not None, new_tokens(spec)),
        "remote_code_note": note,
        "name": name,
        "model_rows": "\n".join(rows),
        "data_section": _data_section(recipe),
        "recipe_section": _recipe_section(recipe),
        "metrics_section": _metrics_section(summary, section, final),
    }
    return Template(TEMPLATE.read_text(encoding="utf-8")).substitute(values)
