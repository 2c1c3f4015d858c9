"""How `picollm.load` reads a transformers-layout directory (docs/export.md). Reads JSON only: never a .py file.

Three kinds of `config.json` share the name:
- picollm's own checkpoint: a top-level `model` section (read as it is);
- a directory `picollm export` (or `picollm push`) wrote: a `picollm` section holding picollm's checkpoint
  config (model spec, tokenizer spec, file hashes) and the layout of the weights: `picollm` (picollm's
  parameter names) or `gpt2` (GPT2LMHeadModel's);
- any other GPT-2 checkpoint (`model_type: gpt2`): its fields are mapped onto picollm's Transformer.
`picollm_view` turns the last two into the first, with `layout` saying how to read the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from picollm.errors import UserError
from picollm.export.gpt2 import model_spec_from_gpt2

SECTION = "picollm"  # the key of picollm's section in an exported config.json
FORMAT_VERSION = 1
CUSTOM_CLASSES = {  # family -> (config class, model class) in the template files
    "transformer": ("PicollmTransformerConfig", "PicollmTransformerForCausalLM"),
    "lstm": ("PicollmLSTMConfig", "PicollmLSTMForCausalLM"),
    "kgram": ("PicollmKGramConfig", "PicollmKGramForCausalLM"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PICKLE_WEIGHTS = ("pytorch_model.bin", "model.bin", "pytorch_model.bin.index.json")


def picollm_view(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """A picollm checkpoint config for the config.json at `path`, with `layout` (picollm | gpt2) added."""
    if isinstance(config.get("model"), dict):
        return {**config, "layout": "picollm"}
    section = config.get(SECTION)
    if isinstance(section, dict) and isinstance(section.get("model"), dict):
        layout = section.get("layout")
        if layout not in ("picollm", "gpt2"):
            raise UserError(f"{path}: picollm.layout is {layout!r}; expected picollm or gpt2 (the file is damaged, "
                            "or was written by a newer picollm)")
        return {**section, "layout": layout, "exported": True}
    model_type = config.get("model_type")
    if model_type == "gpt2":
        return {"model": model_spec_from_gpt2(config, path), "layout": "gpt2", "tokenizer": None, "foreign": True}
    if isinstance(model_type, str):
        raise UserError(f"{path} describes a transformers '{model_type}' model; picollm loads its own checkpoints "
                        "and GPT-2-architecture (model_type gpt2) directories")
    raise UserError(f"{path} has no 'model' section; is this a picollm checkpoint?")


def refuse_pickled_weights(directory: Path) -> None:
    """A directory with only pickled weights: say how to convert them instead of loading them."""
    for name in PICKLE_WEIGHTS:
        if (directory / name).is_file():
            raise UserError(
                f"{directory / 'model.safetensors'} is missing and picollm never loads {directory / name} "
                "(a pickle, which can run code): convert it to safetensors where you trust it, e.g. "
                "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR) with transformers")
