"""picollm's Transformer <-> Hugging Face's GPT-2 (`GPT2LMHeadModel`): configs and weights, both ways.

A picollm Transformer *is* GPT-2 when it has LayerNorm, pre-norm, learned absolute positions and biases
(`gpt2_mismatch` says what differs otherwise). What else has to agree, and does:
- the MLP is d -> 4d -> d with GELU: picollm's `activation: gelu` is transformers' "gelu" (exact erf) and
  `gelu_tanh` is GPT-2's own "gelu_new" (the tanh approximation);
- LayerNorm eps 1e-5 (torch's default, GPT-2's `layer_norm_epsilon`); attention scaled by 1/sqrt(head size),
  not by layer (`scale_attn_weights`, no `scale_attn_by_inverse_layer_idx`); the output layer has no bias
  and is tied to the embedding unless `tie_embeddings: false` (`tie_word_embeddings`);
- the parameters are the same, renamed, with the attention and MLP matrices transposed: GPT-2 keeps them
  in `Conv1D` layers, [in, out], where picollm's `nn.Linear` keeps [out, in]. The fused q|k|v matrix
  splits in the same order in both.
Exports set every dropout to 0: picollm's dropout is for training, and both compute the same in eval.

No torch import here beyond tensors, no file access: `picollm.checkpoint` uses this to read GPT-2
directories, `picollm.export.hf` to write them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from picollm.errors import UserError

ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}  # picollm -> transformers
# transformers' names for the two GELUs picollm computes
FROM_HF_ACTIVATION = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
LAYER_NORM_EPS = 1e-5
# weights whose picollm and GPT-2 layouts are transposes of each other (Conv1D)
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_BLOCK_NAMES = {  # picollm block parameter -> GPT-2 block parameter
    "norm1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
    "norm2": "ln_2", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj",
}


def gpt2_mismatch(model_spec: dict[str, Any]) -> str | None:
    """Why a picollm model config is not exactly GPT-2 (None when it is)."""
    if model_spec.get("family") != "transformer":
        return f"the {model_spec.get('family')} family is not a Transformer"
    wanted = {"norm_type": "layernorm", "norm": "pre", "pos": "absolute", "bias": True}
    for key, value in wanted.items():
        if model_spec.get(key) != value:
            return f"model.{key} is {model_spec.get(key)!r}; GPT-2 has {value!r}"
    if model_spec.get("activation", "gelu") not in ACTIVATIONS:
        return f"model.activation {model_spec.get('activation')!r} is not one of GPT-2's"
    return None


def gpt2_config(model_spec: dict[str, Any]) -> dict[str, Any]:
    """transformers' GPT2Config fields for a picollm Transformer that `gpt2_mismatch` accepts."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": model_spec["vocab_size"],
        "n_positions": model_spec["context_length"],
        "n_embd": model_spec["d_model"],
        "n_layer": model_spec["n_layers"],
        "n_head": model_spec["n_heads"],
        "n_inner": 4 * model_spec["d_model"],
        "activation_function": ACTIVATIONS[model_spec.get("activation", "gelu")],
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": bool(model_spec.get("tie_embeddings", True)),
    }


def model_spec_from_gpt2(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """The picollm model section (`family: transformer`, ...) of a GPT-2 `config.json`; a UserError naming
    the field when the checkpoint is a GPT-2 variant picollm's Transformer does not compute."""

    def field(key: str, default: Any = None) -> Any:
        value = config.get(key, default)
        if value is None:
            raise UserError(f"{path} has no '{key}'; it is not a complete GPT-2 config")
        return value

    d_model = int(field("n_embd", 768))
    activation = config.get("activation_function", "gelu_new")
    refusals = [
        (activation not in FROM_HF_ACTIVATION, "activation_function", activation,
         "picollm computes gelu and gelu_new"),
        (config.get("n_inner") not in (None, 4 * d_model), "n_inner", config.get("n_inner"),
         f"picollm's MLP is 4 x n_embd = {4 * d_model} wide"),
        (abs(float(config.get("layer_norm_epsilon", LAYER_NORM_EPS)) - LAYER_NORM_EPS) > 1e-12,
         "layer_norm_epsilon", config.get("layer_norm_epsilon"), "picollm's LayerNorm uses 1e-5"),
        (config.get("scale_attn_weights", True) is not True, "scale_attn_weights",
         config.get("scale_attn_weights"), "picollm scales attention by 1/sqrt(head size)"),
        (bool(config.get("scale_attn_by_inverse_layer_idx", False)), "scale_attn_by_inverse_layer_idx", True,
         "picollm does not scale attention by layer"),
        (bool(config.get("add_cross_attention", False)), "add_cross_attention", True,
         "picollm's Transformer is decoder-only"),
    ]
    for refused, key, value, why in refusals:
        if refused:
            raise UserError(f"{path}: {key} = {value!r} is a GPT-2 variant picollm cannot load ({why})")
    return {
        "family": "transformer",
        "vocab_size": int(field("vocab_size", 50257)),
        "context_length": int(field("n_positions", 1024)),
        "dropout": 0.0,
        "d_model": d_model,
        "n_heads": int(field("n_head", 12)),
        "n_layers": int(field("n_layer", 12)),
        "norm_type": "layernorm",
        "norm": "pre",
        "pos": "absolute",
        "tie_embeddings": bool(config.get("tie_word_embeddings", True)),
        "bias": True,
        "activation": FROM_HF_ACTIVATION[activation],
    }


def _gpt2_name(name: str) -> str:
    """picollm parameter name -> GPT2LMHeadModel parameter name."""
    if name == "output_layer.weight":
        return "lm_head.weight"
    fixed = {"embedding.weight": "wte.weight", "pos_embedding.weight": "wpe.weight",
             "final_norm.weight": "ln_f.weight", "final_norm.bias": "ln_f.bias"}
    if name in fixed:
        return "transformer." + fixed[name]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        raise ValueError(f"no GPT-2 name for picollm parameter {name}")
    layer, module, kind = match.groups()
    return f"transformer.h.{layer}.{_BLOCK_NAMES[module]}.{kind}"


def to_gpt2_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """picollm Transformer weights (tied ones stored once) -> GPT2LMHeadModel's names and layouts."""
    out = {}
    for name, tensor in state.items():
        new = _gpt2_name(name)
        out[new] = tensor.t().contiguous() if new.endswith(_TRANSPOSED) else tensor
    return out


def from_gpt2_weights(state: dict[str, torch.Tensor], tied: bool, path: Path) -> dict[str, torch.Tensor]:
    """GPT-2 weights -> picollm's names and layouts. Accepts both key styles transformers has written
    (`transformer.h.0...` from GPT2LMHeadModel, `h.0...` from GPT2Model) and drops the attention-mask
    buffers (`attn.bias`, `attn.masked_bias`) older versions saved."""
    reverse = {}
    picollm_names = ["embedding.weight", "pos_embedding.weight", "final_norm.weight", "final_norm.bias",
                     "output_layer.weight"]
    layers = {int(m.group(1)) for k in state if (m := re.match(r"(?:transformer\.)?h\.(\d+)\.", k))}
    for layer in layers:
        for module in _BLOCK_NAMES:
            picollm_names += [f"blocks.{layer}.{module}.weight", f"blocks.{layer}.{module}.bias"]
    for name in picollm_names:
        gpt2 = _gpt2_name(name)
        reverse[gpt2] = name
        reverse[gpt2.removeprefix("transformer.")] = name
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if re.fullmatch(r"(?:transformer\.)?h\.\d+\.attn\.(bias|masked_bias)", key):
            continue  # a causal-mask buffer, not a parameter
        if key not in reverse:
            raise UserError(f"{path} holds tensor '{key}', which is not a GPT-2 parameter; "
                            "is this a GPT2LMHeadModel checkpoint?")
        name = reverse[key]
        if name == "output_layer.weight" and tied:
            continue  # the same matrix as the embedding
        out[name] = tensor.t() if key.endswith(_TRANSPOSED) else tensor
    return out
