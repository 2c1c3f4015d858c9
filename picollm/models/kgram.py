"""A k-gram MLP: the previous k tokens -> an MLP -> next-token logits (Bengio et al., 2003).

The prediction at position t uses tokens t-k+1..t, the same causality as the other families: the
logits at t are for token t+1. Positions before the start of the window are filled with a dedicated
padding id, `vocab_size`, which has its own learned embedding row (so "nothing before" is distinct from
every real token). The whole window is computed at once: the token ids are padded on the left and
unfolded into [B, T, k] context windows, then embedded and fed to the MLP; there is no loop over
positions or sequences.

Two ways to embed the k context tokens, both giving k * embed_dim inputs to the MLP:
- `onehot`: a separate learned matrix [vocab_size + 1, embed_dim] per context position applied to the
  one-hot token, i.e. k embedding tables, stored as one table of k * (vocab_size + 1) rows (position i's
  table starts at row i * (vocab_size + 1)), so it is one lookup and never a k x V one-hot tensor.
  Initialised N(0, 1): a one-hot vector times a standard normal matrix.
- `scaled`: one token embedding shared by all positions, multiplied by sqrt(embed_dim) (as in
  "Attention is all you need"); initialised N(0, 1 / embed_dim) so that the scaled vectors start at unit
  variance too.

The MLP has `inner_layers` hidden layers of width `hidden_size`, each Linear -> GELU -> dropout (He
initialisation, zero biases); the output layer (N(0, 0.02), zero bias) maps the last hidden layer to
the vocabulary. With `inner_layers: 0` the model is log-linear in the embedded context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from picollm.errors import check
from picollm.models.base import LanguageModel, ModelConfig
from picollm.models.registry import register_model


@dataclass
class KGramConfig(ModelConfig):
    k: int = 3
    input: str = "scaled"  # scaled | onehot
    embed_dim: int = 64
    inner_layers: int = 3
    hidden_size: int = 64

    def validate(self) -> None:
        super().validate()
        check(self.k >= 1, "model.k", "must be at least 1")
        check(self.input in ("scaled", "onehot"), "model.input", "use scaled or onehot")
        check(self.embed_dim >= 1, "model.embed_dim", "must be at least 1")
        check(self.inner_layers >= 0, "model.inner_layers", "must be at least 0")
        check(self.hidden_size >= 1, "model.hidden_size", "must be at least 1")


class KGramModel(LanguageModel):
    config: KGramConfig

    def __init__(self, config: KGramConfig) -> None:
        super().__init__(config)
        k, E, H = config.k, config.embed_dim, config.hidden_size
        self.pad_id = config.vocab_size  # the padding row's id
        rows = config.vocab_size + 1
        onehot = config.input == "onehot"
        self.embedding = nn.Embedding(k * rows if onehot else rows, E)
        nn.init.normal_(self.embedding.weight, mean=0.0, std=1.0 if onehot else 1.0 / math.sqrt(E))
        # onehot: position i of a window reads rows i * (V + 1) ... (i + 1) * (V + 1) - 1
        self.offsets: torch.Tensor | None
        self.register_buffer("offsets", torch.arange(k) * rows if onehot else None, persistent=False)
        self.input_scale = 1.0 if onehot else math.sqrt(E)
        layers: list[nn.Module] = []
        width = k * E
        for _ in range(config.inner_layers):
            linear = nn.Linear(width, H)
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
            layers += [linear, nn.GELU(), nn.Dropout(config.dropout)]
            width = H
        self.mlp = nn.Sequential(*layers)
        self.output_layer = nn.Linear(width, config.vocab_size)
        nn.init.normal_(self.output_layer.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.output_layer.bias)

    def windows(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> context windows [B, T, k]; window t = tokens t-k+1..t, padded on the left."""
        k = self.config.k
        pad = tokens.new_full((tokens.shape[0], k - 1), self.pad_id)
        return torch.cat([pad, tokens], dim=1).unfold(1, k, 1)

    def _hidden(self, windows: torch.Tensor) -> torch.Tensor:
        """windows [..., k] -> last hidden layer [..., hidden_size] (or [..., k * embed_dim] without one)."""
        if self.offsets is not None:
            windows = windows + self.offsets  # position i reads its own table
        x = self.embedding(windows) * self.input_scale  # [..., k, E]
        return self.mlp(x.flatten(-2))

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._hidden(self.windows(tokens))

    def prefill(self, tokens: torch.Tensor) -> tuple[torch.Tensor, Any]:
        window = self.windows(tokens)[:, -1]  # [B, k]: the state is the last k tokens
        return self.next_token_logits(self._hidden(window)), window.contiguous()

    def decode(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        window = torch.cat([state[:, 1:], tokens[:, None]], dim=1)  # slide by one
        return self.next_token_logits(self._hidden(window)), window


def scale(width: int) -> dict[str, Any]:
    """The presets' shape at any width: embedding and MLP width equal (inner_layers stays as configured)."""
    return {"embed_dim": width, "hidden_size": width}


# hidden_size = embed_dim, as the LSTM's hidden size equals its embedding: at every preset the k-gram's
# embedding and output layer (which hold almost all of the parameters) then have exactly the LSTM's sizes,
# and the families differ only in what sits between them. Depth grows with size (1, 3, 5, 7).
PRESETS: dict[str, dict[str, Any]] = {
    "pico": {"embed_dim": 32, "hidden_size": 32, "inner_layers": 1},
    "tiny": {"embed_dim": 64, "hidden_size": 64, "inner_layers": 3},
    "small": {"embed_dim": 256, "hidden_size": 256, "inner_layers": 5},
    "base": {"embed_dim": 1024, "hidden_size": 1024, "inner_layers": 7},
}

register_model("kgram", KGramConfig, KGramModel, PRESETS, scale,
               "the previous k tokens (one-hot or scaled embeddings) -> MLP -> next-token logits")
