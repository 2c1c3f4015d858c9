"""A GPT-2-style decoder-only Transformer with a KV cache.

Read top to bottom: the config, the pieces (norms, rotary embeddings, attention, MLP, block), then the
model. Choices, all overridable through the config:

- tied input/output embeddings (`tie_embeddings`), the output layer has no bias (GPT-2's lm_head);
- `norm_type` rmsnorm (default) or layernorm, placed `pre` (x = x + f(norm(x)), plus a final norm
  before the output layer) or `post` (x = norm(x + f(x)), as in the original Transformer; no final
  norm since every block already ends in one);
- `pos` absolute (learned table, GPT-2), rope (rotary, applied to queries and keys) or nope (none: the
  causal mask alone carries order);
- attention and MLP linear layers have biases like GPT-2 (`bias: false` drops them and the LayerNorm
  bias, as in nanoGPT); RMSNorm never has one;
- the MLP's `activation` is the exact GELU (`gelu`, default) or GPT-2's tanh approximation (`gelu_tanh`,
  what published GPT-2 checkpoints were trained with);
- GPT-2 initialisation: weights N(0, 0.02), biases 0, and the two residual projections of every block
  N(0, 0.02 / sqrt(2 * n_layers)) so the residual stream's variance does not grow with depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from picollm.errors import check
from picollm.models.base import LanguageModel, ModelConfig
from picollm.models.registry import register_model


@dataclass
class TransformerConfig(ModelConfig):
    d_model: int = 128
    n_heads: int = 2
    n_layers: int = 2
    norm_type: str = "rmsnorm"  # rmsnorm | layernorm
    norm: str = "pre"  # pre | post
    pos: str = "absolute"  # absolute | rope | nope
    tie_embeddings: bool = True
    bias: bool = True  # biases in the attention/MLP linear layers (and LayerNorm)
    rope_base: float = 10000.0
    activation: str = "gelu"  # gelu (exact) | gelu_tanh (GPT-2's approximation)

    def validate(self) -> None:
        super().validate()
        check(self.d_model >= 1, "model.d_model", "must be at least 1")
        check(self.n_heads >= 1, "model.n_heads", "must be at least 1")
        check(self.n_layers >= 1, "model.n_layers", "must be at least 1")
        check(self.d_model % self.n_heads == 0, "model.n_heads",
              f"must divide model.d_model ({self.d_model}), got {self.n_heads}")
        check(self.norm_type in ("rmsnorm", "layernorm"), "model.norm_type", "use rmsnorm or layernorm")
        check(self.norm in ("pre", "post"), "model.norm", "use pre or post")
        check(self.pos in ("absolute", "rope", "nope"), "model.pos", "use absolute, rope or nope")
        head_dim = self.d_model // self.n_heads
        check(self.pos != "rope" or head_dim % 2 == 0, "model.pos",
              f"rope needs an even head size (d_model / n_heads = {head_dim})")
        check(self.rope_base > 1.0, "model.rope_base", "must be greater than 1")
        check(self.activation in ("gelu", "gelu_tanh"), "model.activation", "use gelu or gelu_tanh")


# ---------------------------------------------------------------------------------------------
# pieces


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: unit RMS per position (times the learned gain)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def make_norm(config: TransformerConfig) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return RMSNorm(config.d_model)
    return nn.LayerNorm(config.d_model, bias=config.bias)


def rope_tables(head_dim: int, length: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_dim] for rotary embeddings (the rotate-half layout of GPT-NeoX/LLaMA)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # [length, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, head_dim] by the angles of its positions (cos, sin [T, head_dim]).

    Each pair (x_i, x_{i + head_dim/2}) turns by position x frequency_i, so the dot product of a query at
    position m with a key at position n depends on m - n only.
    """
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Keys and values of every layer, preallocated to the model's context: [B, heads, max_len, head_dim].

    `length` is the number of positions filled; the next token goes to position `length`.
    """

    def __init__(self, n_layers: int, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H, T, hd] at positions start..start+T-1; return all keys/values so far."""
        if self.keys[layer] is None:
            B, H, _, hd = k.shape
            self.keys[layer] = k.new_empty(B, H, self.max_len, hd)
            self.values[layer] = v.new_empty(B, H, self.max_len, hd)
        keys, values = self.keys[layer], self.values[layer]
        assert keys is not None and values is not None
        end = start + k.shape[2]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.d_model = config.d_model
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)  # residual projection
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0, start: int = 0) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        q = q.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)
        v = v.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v, start)
        mask = None
        if start > 0 and T > 1:  # a chunk after a cached prefix: query i sees keys <= start + i
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=(start == 0 and T > 1))  # one new query sees the whole cache: no mask
        y = y.transpose(1, 2).contiguous().view(B, T, D)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, 4 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(4 * config.d_model, config.d_model, bias=config.bias)  # residual projection
        self.dropout = nn.Dropout(config.dropout)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0, start: int = 0) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), rope, cache, layer, start)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, rope, cache, layer, start))
        return self.norm2(x + self.mlp(x))


# ---------------------------------------------------------------------------------------------
# the model


class TransformerModel(LanguageModel):
    config: TransformerConfig

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        d = config.d_model
        self.embedding = nn.Embedding(config.vocab_size, d)
        self.pos_embedding = nn.Embedding(config.context_length, d) if config.pos == "absolute" else None
        if config.pos == "rope":
            cos, sin = rope_tables(d // config.n_heads, config.context_length, config.rope_base)
            # derived from the config, so not saved with the weights
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.final_norm = make_norm(config) if config.norm == "pre" else None
        self.output_layer = nn.Linear(d, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # attn.proj and mlp.proj write into the residual stream
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))
        if config.tie_embeddings:
            self.output_layer.weight = self.embedding.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def max_context(self) -> int:
        return self.config.context_length

    def _run(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """tokens [B, T] at positions start..start+T-1 (start: what the cache holds) -> features [B, T, D]."""
        T = tokens.shape[1]
        start = cache.length if cache is not None else 0
        if start + T > self.config.context_length and (cache is not None or self.config.pos != "nope"):
            raise ValueError(
                f"{start + T} positions exceed the Transformer's context_length "
                f"({self.config.context_length}); re-prefill with the last context_length tokens instead")
        x = self.embedding(tokens)
        if self.pos_embedding is not None:
            x = x + self.pos_embedding(torch.arange(start, start + T, device=tokens.device))
        x = self.dropout(x)
        rope = None
        if self.config.pos == "rope":
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer, start)
        if cache is not None:
            cache.length = start + T
        return self.final_norm(x) if self.final_norm is not None else x

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._run(tokens)

    def prefill(self, tokens: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        cache = KVCache(self.config.n_layers, self.config.context_length)
        x = self._run(tokens, cache)
        return self.next_token_logits(x[:, -1]), cache

    def decode(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, KVCache]:
        x = self._run(tokens[:, None], state)
        return self.next_token_logits(x[:, -1]), state

    def flops_per_token(self, context: int | None = None) -> int:
        """6 N (dense matmuls, forward + backward) + 12 L d T (attention scores and values), as in PaLM."""
        T = context if context is not None else self.config.context_length
        return super().flops_per_token(context) + 12 * self.config.n_layers * self.config.d_model * T


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def _heads_for(width: int) -> int:
    """Heads for a width: about one per 64 dimensions, splitting the width into heads of 32 to 128
    (preferring even sizes, which RoPE needs). A width with no such split gets a head count that does not
    divide it, so the solver skips that width."""
    if width < 32:
        return 1
    splits = [h for h in range(1, width // 32 + 1) if width % h == 0 and width // h <= 128]
    if splits:
        return min(splits, key=lambda h: ((width // h) % 2, abs(math.log(width / h / 64))))
    return next(h for h in range(max(2, _round(width / 64)), width) if width % h)


def scale(width: int) -> dict[str, Any]:
    """The presets' shape at any width: d_model = width, heads and blocks about width / 64."""
    return {"d_model": width, "n_heads": _heads_for(width), "n_layers": max(1, _round(width / 64))}


PRESETS: dict[str, dict[str, Any]] = {
    "pico": {"d_model": 64, "n_heads": 1, "n_layers": 1},
    "tiny": {"d_model": 128, "n_heads": 2, "n_layers": 2},
    "small": {"d_model": 384, "n_heads": 6, "n_layers": 6},
    "base": {"d_model": 768, "n_heads": 12, "n_layers": 12},
}

register_model("transformer", TransformerConfig, TransformerModel, PRESETS, scale,
               "GPT-2-style decoder: tied embeddings, pre/post RMSNorm/LayerNorm, absolute/RoPE/no positions")
