"""`picollm export --verify`: load the export with transformers and check it against picollm, before it is
put in place. Needs the `hf` extra (`pip install "picollm[hf]"`).

The custom layout is loaded through the classes of picollm's own `hf_template` package (the same files
the export copied), never by running the copies in the directory, so no remote code runs here.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from picollm.errors import UserError
from picollm.export.card import PROMPT
from picollm.export.layout import CUSTOM_CLASSES, DTYPES

TOLERANCE = 1e-4  # fp32 logits, absolute: picollm and transformers run the same arithmetic


def require_transformers() -> None:
    if importlib.util.find_spec("transformers") is None:
        raise UserError("--verify loads the export with transformers, which is not installed: "
                        "pip install \"picollm[hf]\"")


def _load(directory: Path, layout: str, family: str) -> torch.nn.Module:
    if layout == "gpt2":
        from transformers import GPT2LMHeadModel

        return GPT2LMHeadModel.from_pretrained(directory, dtype=torch.float32)
    from picollm.export.hf_template import modeling_picollm

    model_class = getattr(modeling_picollm, CUSTOM_CLASSES[family][1])
    return model_class.from_pretrained(directory, dtype=torch.float32)


def verify_export(directory: Path, model: torch.nn.Module, dtype: str) -> None:
    """Raise (a bug: exit 1) unless transformers' logits and token ids equal picollm's for the card's prompt."""
    section = json.loads((directory / "config.json").read_text(encoding="utf-8"))["picollm"]
    hf_model = _load(directory, section["layout"], section["model"]["family"]).eval()
    tokenizer = getattr(model, "tokenizer", None)
    ids = [tokenizer.eot_id, *tokenizer.encode(PROMPT)] if tokenizer is not None else [0, 1, 2]
    if tokenizer is not None:
        from transformers import AutoTokenizer

        # the loaded model's config: AutoTokenizer would otherwise load it again, running the remote code
        hf_ids = AutoTokenizer.from_pretrained(directory, config=hf_model.config)(PROMPT)["input_ids"]
        if hf_ids != ids:
            raise RuntimeError(f"the exported tokenizer gives {hf_ids} for {PROMPT!r}, picollm {ids}")
    # picollm's model with its weights rounded as the export stored them
    reference = {name: t.to(DTYPES[dtype]).float() for name, t in model.state_dict().items()}
    original = {name: t.clone() for name, t in model.state_dict().items()}
    tokens = torch.tensor([ids])
    try:
        model.load_state_dict(reference)
        with torch.no_grad():
            want = model.eval()(tokens)
    finally:
        model.load_state_dict(original)
    with torch.no_grad():
        got = hf_model(tokens).logits
    gap = float((got - want).abs().max())
    if gap > TOLERANCE * max(1.0, float(want.abs().max())):
        raise RuntimeError(f"transformers' logits differ from picollm's by {gap:.3g} on {PROMPT!r}: "
                           f"the {section['layout']} export is wrong")
