"""The interface every model family implements, so that training, evaluation and generation
never need to know which family they are running.

A family provides:
- a config dataclass deriving from `ModelConfig` (vocab size, context length, dropout + its own fields);
- a module deriving from `LanguageModel` that implements `features`, `prefill` and `decode` and owns an
  `output_layer` (`nn.Linear`, weight [vocab, d]).

`forward(tokens)` = `output_layer(features(tokens))`. Training computes the loss from `features` and the
output layer weight in chunks, so the full [B, T, V] logits tensor is never held at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from picollm.errors import check
from picollm.generation import generate

DEFAULT_CONTEXT = 256  # a model's context_length when its config does not set one


@dataclass
class ModelConfig:
    vocab_size: int = 50257
    context_length: int = DEFAULT_CONTEXT  # training window; for the Transformer also its maximum position
    dropout: float = 0.0

    def validate(self) -> None:
        check(self.vocab_size >= 2, "model.vocab_size", "must be at least 2")
        check(self.context_length >= 1, "model.context_length", "must be at least 1")
        check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")


class LanguageModel(nn.Module):
    """Next-token predictor over a window, with incremental decoding."""

    family: str = ""  # the registered name; `register_model` sets it on the class
    output_layer: nn.Linear

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # what `picollm.load` found beside the weights: the tokenizer (encodes a text prompt for
        # `generate`) and the checkpoint directory (which names the run's data for `evaluate`)
        self.tokenizer: Any = None
        self.checkpoint_path: Path | None = None

    # --- what a family implements --------------------------------------------------------------
    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] (int64) -> final hidden states [B, T, D], position t seeing tokens <= t."""
        raise NotImplementedError

    def prefill(self, tokens: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Run a prompt tokens [B, T] (T >= 1); return logits [B, V] at its last position and a state."""
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """Append one token per row, tokens [B]; return logits [B, V] for the next position and the state."""
        raise NotImplementedError

    @property
    def max_context(self) -> int | None:
        """Most tokens the state may hold (a Transformer's positions); None = unbounded."""
        return None

    # --- provided ------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] (teacher forcing)."""
        return self.output_layer(self.features(tokens))

    def next_token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer for the few rows of a generation step: hidden [B, D] -> logits [B, V].

        On a CPU in fp32, MKL multiplies a skinny [B, D] by the [D, V] weight slowly once D >= 128;
        W @ hidden.T, with one row doubled to two (a gemv is as slow), gives the same logits faster for
        B up to 16. Elsewhere, and for narrower layers, it is the plain layer, which was as fast there
        (docs/performance.md has both measurements).
        """
        layer = self.output_layer
        rows = hidden.shape[0]
        if (hidden.device.type != "cpu" or hidden.dim() != 2 or rows > 16 or layer.in_features < 128
                or hidden.dtype != layer.weight.dtype or torch.is_autocast_enabled("cpu")):
            return layer(hidden)
        columns = (torch.cat([hidden, hidden]) if rows == 1 else hidden).T
        logits = torch.mm(layer.weight, columns).T[:rows]
        return (logits + layer.bias if layer.bias is not None else logits).contiguous()

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Token/position embeddings and the output layer: what 'non-embedding' counts leave out."""
        params = [m.weight for m in self.modules() if isinstance(m, nn.Embedding)]
        params += list(self.output_layer.parameters())
        return params

    def num_parameters(self, non_embedding: bool = False) -> int:
        seen: set[int] = set()
        total = 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        if non_embedding:
            emb_seen: set[int] = set()
            for p in self.embedding_parameters():
                if id(p) not in emb_seen:
                    emb_seen.add(id(p))
                    total -= p.numel()
        return total

    def flops_per_token(self, context: int | None = None) -> int:
        """Training FLOPs per token (forward + backward) ~= 6 x parameters used per token.

        Families whose cost is not proportional to their parameters (attention) override this.
        Embedding lookups are not matmuls, so only the output layer of the embedding parameters counts.
        """
        dense = self.num_parameters(non_embedding=True) + self.output_layer.weight.numel()
        return 6 * dense

    def generate(self, prompt: str | list[int], **kwargs: Any) -> Any:
        """Continue a prompt; see `picollm.generation.generate` for the arguments."""
        return generate(self, prompt, **kwargs)
