"""picollm models for Hugging Face `transformers` (copied here by `picollm export`; needs torch and transformers only).

One class per picollm family; config.json's `auto_map` names the one this directory holds. The parameter
names and the arithmetic are picollm's own, so `model.safetensors` is picollm's checkpoint as it was and the
logits equal picollm's. Each class returns `CausalLMOutputWithPast` (with the shifted next-token loss when
given `labels`) and works with `generate`:

- the Transformer keeps its keys and values in transformers' `DynamicCache`, so each new token costs one
  position, not the whole sequence;
- the LSTM keeps its (h, c) state in an `LSTMCache`, so each new token costs one LSTM step;
- the k-gram needs no cache: it is fed the last k tokens, all its prediction depends on.

Batches must be unpadded (every row the same length), as in picollm.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_picollm import PicollmKGramConfig, PicollmLSTMConfig, PicollmTransformerConfig


class PicollmPreTrainedModel(PreTrainedModel):
    """What the three families share: the forward pass around `features`, the loss, the embeddings."""

    base_model_prefix = "picollm"

    def features(self, input_ids: torch.Tensor, cache: Cache | None, use_cache: bool):
        """input_ids [B, T] -> (last hidden states [B, T, D], the cache to carry to the next call)."""
        raise NotImplementedError

    def forward(self, input_ids: torch.LongTensor, cache: Cache | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        cache = kwargs.pop("past_key_values", cache)  # the name transformers used before `cache`
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("picollm models take no padding: give prompts of one length, or one at a time")
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True)
        hidden, cache = self.features(input_ids, cache, use_cache)
        logits = self.project(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:  # labels = input_ids: position t predicts token t + 1
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer: hidden [B, T, D] -> logits [B, T, V].

        A generation step has one row per sequence, and on a CPU in fp32 MKL multiplies a skinny [1, D] by
        the [D, V] weight slowly; W @ hidden.T, with a single row doubled, gives the same logits faster (as
        picollm's `next_token_logits` does).
        """
        layer = self.output_layer
        rows = hidden.shape[0] * hidden.shape[1]
        if hidden.device.type != "cpu" or hidden.dtype != torch.float32 or rows > 16 or layer.in_features < 128:
            return layer(hidden)
        flat = hidden.reshape(rows, -1)
        columns = (torch.cat([flat, flat]) if rows == 1 else flat).T
        logits = torch.mm(layer.weight, columns).T[:rows]
        if layer.bias is not None:
            logits = logits + layer.bias
        return logits.reshape(*hidden.shape[:-1], -1)

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embedding = value

    def get_output_embeddings(self) -> nn.Module:
        return self.output_layer


# ---------------------------------------------------------------------------------------------
# Transformer


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def make_norm(config: PicollmTransformerConfig) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return RMSNorm(config.d_model)
    return nn.LayerNorm(config.d_model, bias=config.bias)


def rope_tables(head_dim: int, start: int, length: int, base: float, device: torch.device):
    """cos and sin [length, head_dim] of positions start..start+length-1 (rotate-half layout)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(start, start + length, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: PicollmTransformerConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor, rope, cache: Cache | None, start: int) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:  # all keys and values so far, this chunk's included
            k, v = cache.update(k, v, self.layer)
        mask = None
        if start > 0 and T > 1:  # a chunk after a cached prefix: query i sees keys <= start + i
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=(start == 0 and T > 1))
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, D))


class MLP(nn.Module):
    def __init__(self, config: PicollmTransformerConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, 4 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(4 * config.d_model, config.d_model, bias=config.bias)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, config: PicollmTransformerConfig, layer: int) -> None:
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope, cache: Cache | None, start: int) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), rope, cache, start)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, rope, cache, start))
        return self.norm2(x + self.mlp(x))


class PicollmTransformerForCausalLM(PicollmPreTrainedModel, GenerationMixin):
    config_class = PicollmTransformerConfig
    _tied_weights_keys = {"output_layer.weight": "embedding.weight"}  # when config.tie_word_embeddings
    _no_split_modules = ["Block"]

    def __init__(self, config: PicollmTransformerConfig) -> None:
        super().__init__(config)
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embedding = nn.Embedding(config.context_length, config.d_model) if config.pos == "absolute" else None
        self.blocks = nn.ModuleList([Block(config, layer) for layer in range(config.n_layers)])
        self.final_norm = make_norm(config) if config.norm == "pre" else None
        self.output_layer = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def features(self, input_ids, cache, use_cache):
        if cache is None and use_cache:
            cache = DynamicCache(config=self.config)
        T = input_ids.shape[1]
        start = cache.get_seq_length() if cache is not None else 0  # positions already in the cache
        if start + T > self.config.context_length and (cache is not None or self.config.pos != "nope"):
            raise ValueError(f"{start + T} positions exceed the model's context_length ({self.config.context_length})")
        x = self.embedding(input_ids)
        if self.pos_embedding is not None:
            x = x + self.pos_embedding(torch.arange(start, start + T, device=input_ids.device))
        rope = None
        if self.config.pos == "rope":
            rope = rope_tables(self.config.d_model // self.config.n_heads, start, T, self.config.rope_base, x.device)
        for block in self.blocks:
            x = block(x, rope, cache, start)
        return (self.final_norm(x) if self.final_norm is not None else x), cache


# ---------------------------------------------------------------------------------------------
# LSTM


class LSTMCache(Cache):
    """The LSTM's memory between generation steps: its (h, c) state and how many tokens it has read."""

    def __init__(self) -> None:
        super().__init__(layers=[])  # no keys and values: (h, c) is all the LSTM remembers
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None
        self.length = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:  # beam search keeps some rows, repeats others
        h, c = self.state
        self.state = (h.index_select(1, beam_idx.to(h.device)), c.index_select(1, beam_idx.to(c.device)))


class PicollmLSTMForCausalLM(PicollmPreTrainedModel, GenerationMixin):
    config_class = PicollmLSTMConfig

    def __init__(self, config: PicollmLSTMConfig) -> None:
        super().__init__(config)
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim)
        self.lstm = nn.LSTM(config.embed_dim, config.hidden_size, num_layers=config.n_layers, batch_first=True)
        self.output_layer = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # `generate` must not make a DynamicCache: `features` makes the LSTMCache

    def features(self, input_ids, cache, use_cache):
        if cache is not None and not isinstance(cache, LSTMCache):
            raise TypeError(f"the LSTM keeps its state in an LSTMCache, not a {type(cache).__name__}")
        if cache is None and use_cache:
            cache = LSTMCache()
        out, state = self.lstm(self.embedding(input_ids), cache.state if cache is not None else None)
        if cache is not None:
            cache.state, cache.length = state, cache.length + input_ids.shape[1]
        return out, cache


# ---------------------------------------------------------------------------------------------
# k-gram MLP


class PicollmKGramForCausalLM(PicollmPreTrainedModel, GenerationMixin):
    """Position t reads tokens t-k+1..t; positions before the start read the padding row, id vocab_size."""

    config_class = PicollmKGramConfig

    def __init__(self, config: PicollmKGramConfig) -> None:
        super().__init__(config)
        rows = config.vocab_size + 1  # the tokens and the padding row
        onehot = config.input == "onehot"
        # onehot: a table per window position i, stored as rows i * (V + 1) ... (i + 1) * (V + 1) - 1
        self.embedding = nn.Embedding(config.k * rows if onehot else rows, config.embed_dim)
        self.input_scale = 1.0 if onehot else math.sqrt(config.embed_dim)
        layers: list[nn.Module] = []
        width = config.k * config.embed_dim
        for _ in range(config.inner_layers):  # the Dropout (none here) keeps picollm's names: mlp.0, mlp.3, ...
            layers += [nn.Linear(width, config.hidden_size), nn.GELU(), nn.Dropout(0.0)]
            width = config.hidden_size
        self.mlp = nn.Sequential(*layers)
        self.output_layer = nn.Linear(width, config.vocab_size)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # nothing to cache: the last k tokens are the whole state

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, **kwargs):
        # the next token depends on the last k tokens only, so that is all each step is fed
        return super().prepare_inputs_for_generation(input_ids[:, -self.config.k:], **kwargs)

    def features(self, input_ids, cache, use_cache):
        k, rows = self.config.k, self.config.vocab_size + 1
        pad = input_ids.new_full((input_ids.shape[0], k - 1), self.config.vocab_size)
        windows = torch.cat([pad, input_ids], dim=1).unfold(1, k, 1)  # [B, T, k]
        if self.config.input == "onehot":
            windows = windows + torch.arange(k, device=input_ids.device) * rows  # position i reads its own table
        x = self.embedding(windows) * self.input_scale
        return self.mlp(x.flatten(-2)), None
