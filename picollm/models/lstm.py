"""An LSTM language model: token embedding -> `n_layers` LSTM -> dropout -> untied output layer.

The recurrent state (h, c) is the whole memory, so incremental decoding just carries it forward and the
model has no maximum context. Initialisation: PyTorch's defaults for the embedding (N(0, 1)) and the LSTM
(U(-1/sqrt(hidden), 1/sqrt(hidden))); the output layer N(0, 0.02) with a zero bias, so the first loss is
close to ln(vocab_size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from picollm.errors import check
from picollm.models.base import LanguageModel, ModelConfig
from picollm.models.registry import register_model


@dataclass
class LSTMConfig(ModelConfig):
    embed_dim: int = 64
    hidden_size: int = 64
    n_layers: int = 1

    def validate(self) -> None:
        super().validate()
        check(self.embed_dim >= 1, "model.embed_dim", "must be at least 1")
        check(self.hidden_size >= 1, "model.hidden_size", "must be at least 1")
        check(self.n_layers >= 1, "model.n_layers", "must be at least 1")


class LSTMModel(LanguageModel):
    config: LSTMConfig

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__(config)
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim)
        # between stacked layers nn.LSTM applies the dropout itself; after the last one we do
        self.lstm = nn.LSTM(config.embed_dim, config.hidden_size, num_layers=config.n_layers,
                            batch_first=True, dropout=config.dropout if config.n_layers > 1 else 0.0)
        self.dropout = nn.Dropout(config.dropout)
        self.output_layer = nn.Linear(config.hidden_size, config.vocab_size)
        nn.init.normal_(self.output_layer.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.output_layer.bias)

    def _run(self, tokens: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        out, state = self.lstm(self.embedding(tokens), state)
        return self.dropout(out), state

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._run(tokens)[0]

    def prefill(self, tokens: torch.Tensor) -> tuple[torch.Tensor, Any]:
        out, state = self._run(tokens)
        return self.next_token_logits(out[:, -1]), state

    def decode(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        out, state = self._run(tokens[:, None], state)  # state = (h, c), each [n_layers, B, hidden]
        return self.next_token_logits(out[:, -1]), state


def scale(width: int) -> dict[str, Any]:
    """The presets' shape at any width: embedding and hidden size equal."""
    return {"embed_dim": width, "hidden_size": width}


PRESETS: dict[str, dict[str, Any]] = {
    "pico": {"embed_dim": 32, "hidden_size": 32, "n_layers": 1},
    "tiny": {"embed_dim": 64, "hidden_size": 64, "n_layers": 1},
    "small": {"embed_dim": 256, "hidden_size": 256, "n_layers": 1},
    "base": {"embed_dim": 1024, "hidden_size": 1024, "n_layers": 1},
}

register_model("lstm", LSTMConfig, LSTMModel, PRESETS, scale,
               "token embedding -> stacked LSTM -> untied output layer")
